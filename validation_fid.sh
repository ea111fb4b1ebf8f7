#!/usr/bin/env bash
# Metrics of one-step generators, as D2O's validation script: for every (checkpoint, reference) pair, generate
# NUM images in one step (generate.py --sampler=onestep --subdirs, NGPUS processes via torchrun), score them
# with `fid.py calc` (also under torchrun) and record the result. Two selection protocols on top:
#
#   PROTOCOL=single          one seed set, seeds 0..NUM-1 (default; D2O's validate_fid.sh)
#   PROTOCOL=best-of-seeds   EDM's protocol: SEED_SETS sets of NUM seeds (set k = k*NUM .. (k+1)*NUM-1), report
#                            the minimum of SELECT over the sets (EDM: 3 sets, FID-50k, minimum reported)
#   PROTOCOL=best-checkpoint the official D2O practice: score every checkpoint given (a run directory expands to
#                            its network-snapshot-*.pkl) and report the one with the lowest SELECT
#
# Usage:
#   bash validation_fid.sh NETWORK REF [NETWORK REF ...]
#
#   NGPUS=8 bash validation_fid.sh runs/00000-cifar10-.../network-snapshot-005000.pkl fid-refs/cifar10-32x32.npz
#   NGPUS=8 PROTOCOL=best-of-seeds SEED_SETS=3 bash validation_fid.sh snapshot.pkl fid-refs/cifar10-32x32.npz
#   NGPUS=8 PROTOCOL=best-checkpoint bash validation_fid.sh runs/00000-cifar10-... fid-refs/cifar10-32x32.npz
#   FID_ARGS="--metrics=fid,is,pr --detector=inception-2015-12-05.pkl" bash validation_fid.sh \
#       imagenet.pkl VIRTUAL_imagenet64_labeled.npz          # ADM's IS/precision/recall protocol
#
#   NETWORK  network-snapshot pickle (path or URL), anything generate.py --network accepts, or a run directory
#   REF      fid.py calc --ref: reference .npz (ours, EDM's or guided-diffusion's; path or URL) or images
#
# Environment (defaults in brackets):
#   NGPUS [1]           processes per run, one per GPU
#   NUM [50000]         images per seed set (the FID-50k protocol)
#   PROTOCOL [single]   single | best-of-seeds | best-checkpoint (above)
#   SEED_SETS [3]       seed sets for best-of-seeds
#   SELECT [fid]        the result that picks the best (lowest): fid, clip_fid or fd_dinov2
#   OUTROOT [fid-eval]  images go to a new folder OUTROOT/images.XXXXXX/<checkpoint name>[-seeds<k>]/ made for
#                       this invocation, results to OUTROOT/fid-results.txt
#   KEEP [0]            1 keeps the generated images, 0 deletes them once scored (and the images.XXXXXX folder
#                       at exit); nothing else under OUTROOT is ever removed
#   PYTHON [python]     interpreter (torchrun runs as `$PYTHON -m torch.distributed.run`)
#   GEN_ARGS, FID_ARGS  extra options for generate.py / fid.py calc, e.g. GEN_ARGS="--batch=128"
#                       FID_ARGS="--metrics=fid,is,pr,clip_fid,fd_dinov2 --clip-weights=ViT-B-32.pt"
#
# Each result line is "<network> <ref> seeds=<first>-<last> <fid.py output on one line>", e.g. "... fid 2.0312";
# each protocol ends with a "best: ..." line.
set -euo pipefail

NGPUS="${NGPUS:-1}"
NUM="${NUM:-50000}"
PROTOCOL="${PROTOCOL:-single}"
SEED_SETS="${SEED_SETS:-3}"
SELECT="${SELECT:-fid}"
OUTROOT="${OUTROOT:-fid-eval}"
KEEP="${KEEP:-0}"
PYTHON="${PYTHON:-python}"
read -r -a gen_args <<< "${GEN_ARGS:-}"
read -r -a fid_args <<< "${FID_ARGS:-}"

die() { echo "$0: $*" >&2; exit 2; }
if [ $# -eq 0 ] || [ $(($# % 2)) -ne 0 ]; then
    die "usage: $0 NETWORK REF [NETWORK REF ...]   (see the header of $0 for options)"
fi
case "$PROTOCOL" in single|best-of-seeds|best-checkpoint) ;; *) die "PROTOCOL=$PROTOCOL: expected single, best-of-seeds or best-checkpoint";; esac
case "$SELECT" in fid|clip_fid|fd_dinov2) ;; *) die "SELECT=$SELECT: expected fid, clip_fid or fd_dinov2";; esac
[[ "$NUM" =~ ^[1-9][0-9]*$ ]] || die "NUM=$NUM: expected a positive integer"
[[ "$SEED_SETS" =~ ^[1-9][0-9]*$ ]] || die "SEED_SETS=$SEED_SETS: expected a positive integer"
# stem NETWORK: the file name without its extension (empty for a file named `.pkl`)
stem() {
    local file
    file="$(basename "$1")"
    echo "${file%.*}"
}

for ((i = 1; i <= $#; i++)); do  # fail before hours of generation, not after
    arg="${!i}"
    if [[ "$arg" != *://* && ! -e "$arg" ]]; then
        die "$arg: no such file or folder"
    fi
    if ((i % 2 == 1)) && [[ ! -d "$arg" ]] && [[ -z "$(stem "$arg")" || "$(stem "$arg")" == . ]]; then
        die "$arg: cannot name its image folder after it (nothing before the extension); rename the file"
    fi
done

here="$(cd "$(dirname "$0")" && pwd)"
# Script options go after `--`: torchrun's argparse would otherwise claim abbreviations of its own
# options (`--num=…` is ambiguous with `--numa-binding`).
torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS")
mkdir -p "$OUTROOT"
results="$OUTROOT/fid-results.txt"
# Images go into a folder made for this invocation: the only folder this script ever removes.
images="$(mktemp -d "$OUTROOT/images.XXXXXX")"
if [ "$KEEP" != 1 ]; then
    trap 'rm -rf -- "$images"' EXIT
fi

# score NETWORK REF FIRST_SEED TAG: generate NUM images from seeds FIRST_SEED.., score them, append a result line
score() {
    local network="$1" ref="$2" first="$3" tag="$4"
    local last=$((first + NUM - 1))
    local name outdir scores line
    # runs/00000-cifar10-.../network-snapshot-005000.pkl -> 00000-cifar10-...-network-snapshot-005000
    name="$(basename "$(dirname "$network")")-$(stem "$network")"
    outdir="$images/${name#.-}$tag"
    echo "== $network: generating $NUM images (seeds $first-$last) into $outdir" >&2
    "${torchrun[@]}" "$here/generate.py" -- --network="$network" --seeds="$first-$last" --outdir="$outdir" \
        --subdirs --sampler=onestep ${gen_args[@]+"${gen_args[@]}"} >&2
    echo "== $network: scoring against $ref" >&2
    scores=$("${torchrun[@]}" "$here/fid.py" -- calc --images="$outdir" --ref="$ref" --num="$NUM" \
        ${fid_args[@]+"${fid_args[@]}"} | tee /dev/stderr |
        grep -E '^(fid|is_mean|is_std|precision|recall|clip_fid|fd_dinov2) ')
    line="$network $ref seeds=$first-$last $(echo "$scores" | tr '\n' ' ' | sed 's/ $//')"
    echo "$line" >> "$results"
    echo "$line"
    if [ "$KEEP" != 1 ]; then
        rm -rf -- "$outdir"
    fi
}

# best LINES...: the result line with the lowest SELECT value, read from the "name value" pairs that end each
# line only (a network *named* "... fid 0.5 .pkl" must not be read as its score)
best() {
    printf '%s\n' "$@" | awk -v key="$SELECT" '{
        for (i = NF - 1; i > 0 && $i ~ /^(fid|is_mean|is_std|precision|recall|clip_fid|fd_dinov2)$/; i -= 2) if ($i == key) { v = $(i + 1) + 0; if (!found || v < min) { min = v; line = $0; found = 1 } }
    } END { if (found) print line; else { print "no " key " in the results" > "/dev/stderr"; exit 1 } }'
}

# checkpoints NETWORK: the network itself, or every network-snapshot-*.pkl of a run directory (not -best)
checkpoints() {
    if [ -d "$1" ]; then
        find "$1" -maxdepth 1 -name 'network-snapshot-*.pkl' ! -name 'network-snapshot-best.pkl' | sort
    else
        echo "$1"
    fi
}

while [ $# -gt 0 ]; do
    network="$1" ref="$2"
    shift 2
    mapfile -t nets < <(checkpoints "$network")
    [ ${#nets[@]} -gt 0 ] || die "$network: no network-snapshot-*.pkl in this folder"
    lines=()
    for net in "${nets[@]}"; do
        case "$PROTOCOL" in
            best-of-seeds)
                set_lines=()
                for ((k = 0; k < SEED_SETS; k++)); do
                    set_lines+=("$(score "$net" "$ref" $((k * NUM)) "-seeds$k")")
                done
                printf '%s\n' "${set_lines[@]}"
                echo "best of $SEED_SETS seed sets by $SELECT: $(best "${set_lines[@]}")" | tee -a "$results"
                ;;
            *)
                lines+=("$(score "$net" "$ref" 0 "")")
                echo "${lines[-1]}"
                ;;
        esac
    done
    if [ "$PROTOCOL" = best-checkpoint ]; then
        echo "best checkpoint by $SELECT: $(best "${lines[@]}")" | tee -a "$results"
    fi
done
echo "Results appended to $results"
