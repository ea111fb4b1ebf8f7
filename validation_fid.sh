#!/usr/bin/env bash
# FID of one-step generators, as D2O's validation script: for every (checkpoint, reference) pair, generate
# NUM images with seeds 0..NUM-1 in one step (generate.py --sampler=onestep --subdirs, NGPUS processes
# via torchrun), then score them with `fid.py calc` (also under torchrun) and record the result.
#
# Usage:
#   bash validation_fid.sh NETWORK REF [NETWORK REF ...]
#
#   NGPUS=8 bash validation_fid.sh \
#       runs/00000-cifar10-32x32-uncond-ddpmpp-d2o-gpus8-batch256-fp32/network-snapshot-005000.pkl \
#       fid-refs/cifar10-32x32.npz \
#       runs/00001-imagenet-64x64-cond-adm-d2o-gpus8-batch512-fp16/network-snapshot-010000.pkl \
#       https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz
#
#   NETWORK  network-snapshot pickle (path or URL), anything generate.py --network accepts
#   REF      fid.py calc --ref: EDM statistics .npz (path or URL) or a dataset folder/zip
#
# Environment (defaults in brackets):
#   NGPUS [1]           processes per run, one per GPU
#   NUM [50000]         images per checkpoint (the FID-50k protocol); seeds 0..NUM-1
#   OUTROOT [fid-eval]  images go to OUTROOT/<checkpoint name>/, results to OUTROOT/fid-results.txt
#   KEEP [0]            1 keeps the generated images, 0 deletes them once scored
#   PYTHON [python]     interpreter (torchrun runs as `$PYTHON -m torch.distributed.run`)
#   GEN_ARGS, FID_ARGS  extra options for generate.py / fid.py calc, e.g. GEN_ARGS="--batch=128"
#                       FID_ARGS="--metrics=fid,is,pr --detector=inception-2015-12-05.pkl"
#
# Each result line is "<network> <ref> <fid.py output on one line>", e.g. "... fid 2.0312".
set -euo pipefail

NGPUS="${NGPUS:-1}"
NUM="${NUM:-50000}"
OUTROOT="${OUTROOT:-fid-eval}"
KEEP="${KEEP:-0}"
PYTHON="${PYTHON:-python}"
read -r -a gen_args <<< "${GEN_ARGS:-}"
read -r -a fid_args <<< "${FID_ARGS:-}"

if [ $# -eq 0 ] || [ $(($# % 2)) -ne 0 ]; then
    echo "usage: $0 NETWORK REF [NETWORK REF ...]   (see the header of $0 for options)" >&2
    exit 2
fi
for ((i = 1; i <= $#; i++)); do  # fail before hours of generation, not after
    arg="${!i}"
    if [[ "$arg" != *://* && ! -e "$arg" ]]; then
        echo "$0: $arg: no such file or folder" >&2
        exit 2
    fi
done

here="$(cd "$(dirname "$0")" && pwd)"
# Script options go after `--`: torchrun's argparse would otherwise claim abbreviations of its own
# options (`--num=…` is ambiguous with `--numa-binding`).
torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS")
mkdir -p "$OUTROOT"
results="$OUTROOT/fid-results.txt"

while [ $# -gt 0 ]; do
    network="$1" ref="$2"
    shift 2
    # runs/00000-cifar10-.../network-snapshot-005000.pkl -> 00000-cifar10-...-network-snapshot-005000
    name="$(basename "$(dirname "$network")")-$(basename "${network%.*}")"
    outdir="$OUTROOT/${name#.-}"
    echo "== $network: generating $NUM images into $outdir"
    "${torchrun[@]}" "$here/generate.py" -- --network="$network" --seeds="0-$((NUM - 1))" --outdir="$outdir" \
        --subdirs --sampler=onestep ${gen_args[@]+"${gen_args[@]}"}
    echo "== $network: scoring against $ref"
    scores=$("${torchrun[@]}" "$here/fid.py" -- calc --images="$outdir" --ref="$ref" --num="$NUM" \
        ${fid_args[@]+"${fid_args[@]}"} | tee /dev/stderr | grep -E '^(fid|is_mean|is_std|precision|recall) ')
    line="$network $ref $(echo "$scores" | tr '\n' ' ' | sed 's/ $//')"
    echo "$line" | tee -a "$results"
    if [ "$KEEP" != 1 ]; then
        rm -rf "$outdir"
    fi
done
echo "Results appended to $results"
