"""The one training configuration object, the paper's runs as presets (docs/method.md §1, §11), and
`resolve`, which validates a configuration and derives every dependent value once, before any file is read.

`train.py` fills a TrainConfig from a preset and the options given explicitly on the command line
(explicit options win), resolves it, prints it and hands it to the loop, which stores the resolved values
in training_options.json. Without a preset the defaults are the CIFAR-10 D2O-F recipe (paper Table 10),
except `precision` (fp32: exact on every device; the paper and the presets use bf16) and what the data
fixes (`--data`, `--transfer`, `--cond`)."""
import dataclasses
import json
import math
import os
import re
from typing import Optional, Union

from pg_modules.backbones import backbone_option, backbone_set  # torch-free registries
from training.loss_types import LOSS_TYPES

EDM_PRETRAINED = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'


@dataclasses.dataclass
class TrainConfig:
    outdir: str = 'training-runs'
    data: Optional[str] = None
    cond: bool = False
    # Generator / objective
    loss: str = 'd2o'                   # d2o (GAN only) | edm | vp | ve (diffusion teacher training)
    arch: Optional[str] = None          # ddpmpp | ncsnpp | adm (None: from --transfer, else ncsnpp)
    precond: str = 'd2o'                # d2o | edm | vp | ve
    transfer: Optional[str] = None      # EDM/D2O pickle whose `ema` initialises G
    allow_unsafe_pickle: bool = False
    cbase: Optional[int] = None
    cres: Optional[list] = None
    dropout: float = 0.0
    augment_dim: int = 0                # EDM teacher training only (no augment pipe here: labels are zeros)
    multi_step_g: int = 1
    middle_sigma: float = 0.8           # = sampling.MIDDLE_SIGMA (kept literal: this module imports no torch)
    freeze: Optional[int] = None        # None → 1 (D2O-F) for --loss=d2o, 0 for diffusion training
    train_groups: Optional[list] = None
    # Discriminator
    backbone: Union[int, str] = 1       # official integer or backbone names (pg_modules/backbones.py); 1: CIFAR-10
    d_pretrained: bool = True
    d_weights: Optional[str] = None
    d_embedding: Optional[str] = None   # PATH | official | random; None → official for conditional runs
    d_bn_group: Optional[int] = None    # ghost-BatchNorm group of D; None → the per-process batch
    diffaug: bool = False
    interp224: bool = True
    loss_type: str = 'ns'               # training/loss_types.py: ns (non-saturating) | hinge
    r1_gamma: float = 1e-4
    adv_scale: Optional[float] = None   # None → batch / 8 (the paper's per-GPU batch on 8 GPUs; loss.py)
    # Extra consistency-distillation objective (paper §4.4; training/consistency.py, docs/consistency.md)
    cd_weight: float = 0.0              # weight of the CD term added to G's loss (0 = off, GAN only)
    cd_only: bool = False               # CD alone, no discriminator: the paper's CD / CD-F (Fig. 3A)
    cd_distance: str = 'l2'             # l2 | pseudo_huber | lpips (the paper: lpips)
    cd_scales: int = 18                 # N of the schedule T(i, N) (Appendix C)
    lpips_vgg: Optional[str] = None     # LPIPS weight files (only for --cd-distance=lpips; never downloaded)
    lpips_lin: Optional[str] = None
    # Optimisation
    lr: float = 1e-4
    dlr: float = 1e-4
    lr_rampup: float = 0.0              # kimg of linear LR warm-up (EDM teachers: 10000)
    batch: int = 256
    batch_gpu: Optional[int] = None
    duration: float = 5.0               # Mimg
    ema: float = 0.5                    # Mimg half-life
    ema_warmup: float = 0.05
    precision: str = 'fp32'             # fp32 | bf16 (generator autocast; D and R1 stay fp32, docs/method.md §9)
    max_nonfinite: int = 20             # abort after this many non-finite steps in a row
    # Data
    xflip: bool = False
    cache: bool = True
    workers: int = 1
    # Bookkeeping
    tick: float = 25.0                  # kimg per tick
    snap: int = 10                      # ticks per snapshot
    dump: int = 50                      # ticks per training-state dump
    seed: int = 0
    resume: Optional[str] = None
    metrics: Optional[list] = None      # e.g. ['fid10k']
    metric_ref: Optional[str] = None
    metrics_at_start: bool = True      # also evaluate at tick 0 (the transferred network after one step)
    desc: Optional[str] = None
    nosubdir: bool = False
    grid_seeds: int = 64
    preset: Optional[str] = None
    device: Optional[str] = None        # default: cuda when available, else cpu

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2)


DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
# How a None default resolves (shown by `train.py --help`).
DEFAULT_NOTES = dict(
    arch='from --transfer, else ncsnpp', freeze='1 (D2O-F); 0 with --loss=edm|vp|ve', adv_scale='batch/8',
    batch_gpu='batch / processes', d_embedding='official for conditional runs',
    lpips_vgg='the torch.hub cache\'s vgg16 file', lpips_lin='the installed lpips package\'s v0.1 heads', d_bn_group='per-process batch',
    device='cuda if available, else cpu', cres='from --transfer, else the architecture\'s', cbase='from --transfer, '
    'else the architecture\'s')
PAPER_NUM_GPUS = 8  # default adv_scale = the paper's per-GPU batch (loss.py, docs/method.md §6)


def _paper(dataset, variant, cond, **kw):
    # d_bn_group = the paper's per-GPU batch, so D's BatchNorm sees the paper's statistics on any GPU count.
    return dict(preset=f'{dataset}-{"cond" if cond else "uncond"}-{variant}' if dataset == 'cifar10'
                else f'{dataset}-{variant}', cond=cond, loss='d2o', precond='d2o', freeze=1 if variant == 'd2o-f' else 0,
                loss_type='ns', diffaug=False, dropout=0.0, precision='bf16', ema_warmup=0.05,
                d_bn_group=int(kw['batch'] // PAPER_NUM_GPUS), **kw)


# Paper Table 10 (and docs/method.md §11). Where the official train.sh disagrees with the paper we follow
# the paper: ImageNet R1 γ = 4e-4 (train.sh: 1e-4); D2O durations 5 Mimg everywhere (train.sh: 10 for
# AFHQv2/FFHQ/ImageNet). adv_scale = the paper's per-GPU batch (8 GPUs), which fixes the effective
# GAN-vs-R1 weighting independently of the GPU count you run on (docs/method.md §6).
_CIFAR = dict(arch='ncsnpp', backbone=1, lr=1e-4, dlr=1e-4, batch=256, ema=0.5, r1_gamma=1e-4, adv_scale=32.0,
              duration=5.0)
_FACES = dict(arch='ncsnpp', cres=[1, 2, 2, 2], backbone=0, lr=2e-5, dlr=4e-5, batch=256, ema=0.5, r1_gamma=1e-4,
              adv_scale=32.0)
_IMAGENET = dict(arch='adm', backbone=0, lr=8e-6, dlr=4e-5, batch=512, ema=50.0, r1_gamma=4e-4, adv_scale=64.0,
                 duration=5.0, transfer=EDM_PRETRAINED + 'edm-imagenet-64x64-cond-adm.pkl')

PRESETS = {}
for _variant in ('d2o', 'd2o-f'):
    for _cond in (False, True):
        _p = _paper('cifar10', _variant, _cond, transfer=EDM_PRETRAINED +
                    f'edm-cifar10-32x32-{"cond" if _cond else "uncond"}-ve.pkl', **_CIFAR)
        PRESETS[_p['preset']] = _p
    for _name in ('afhqv2', 'ffhq'):
        # Paper: D2O 5 Mimg, D2O-F 10 Mimg on the 64x64 face datasets.
        _p = _paper(_name, _variant, False, transfer=EDM_PRETRAINED + f'edm-{_name}-64x64-uncond-ve.pkl',
                    duration=5.0 if _variant == 'd2o' else 10.0, **_FACES)
        PRESETS[_p['preset']] = _p
    _p = _paper('imagenet', _variant, True, **_IMAGENET)
    PRESETS[_p['preset']] = _p


def make_config(preset=None, **explicit):
    """Defaults ← preset ← explicit options (None means 'not given')."""
    values = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f'--preset={preset}: unknown preset; choose one of {", ".join(sorted(PRESETS))}')
        values.update(PRESETS[preset])
    values.update({k: v for k, v in explicit.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f'unknown configuration keys: {sorted(unknown)}')
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------
# Resolution: validate once and derive every dependent value, before the dataset or teacher loads.

CHOICES = dict(loss=('d2o', 'edm', 'vp', 've'), precond=('d2o', 'edm', 'vp', 've'),
               arch=(None, 'ddpmpp', 'ncsnpp', 'adm'), loss_type=tuple(LOSS_TYPES), precision=('fp32', 'bf16'),
               cd_distance=('l2', 'pseudo_huber', 'lpips'))
MAX_TRAIN_SEED = 2 ** 31 - 1  # train.py --seed; per-rank seeds are (seed·world + rank) mod 2³¹ (docs/method.md §4)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Values derived from the options, never given directly."""
    world_size: int
    rounds: int                 # gradient-accumulation rounds per process: batch = batch_gpu × rounds × world
    total_nimg: int
    backbones: tuple            # D's feature networks (empty for diffusion training)
    metric_images: dict         # metric name → number of generated images


def metric_num_images(name):
    """'fid50k' → 50000, 'fid10k' → 10000, 'fid500' → 500 (FID over that many generated images)."""
    m = re.fullmatch(r'fid(\d+)(k?)', name)
    if not m or int(m.group(1)) < 2:
        raise ValueError(f'--metrics: unknown metric {name!r}; expected fid50k, fid10k or fid<N>[k]')
    return int(m.group(1)) * (1000 if m.group(2) else 1)


def _check_choices(cfg):
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            shown = ', '.join(str(a) for a in allowed if a is not None)
            raise ValueError(f'--{name.replace("_", "-")}={getattr(cfg, name)}: expected one of {shown}')


def _check_numbers(cfg):
    if not 0 <= cfg.seed <= MAX_TRAIN_SEED:
        raise ValueError(f'--seed={cfg.seed}: expected an integer in 0..{MAX_TRAIN_SEED}')
    if not cfg.middle_sigma > 0 or not math.isfinite(cfg.middle_sigma):
        raise ValueError(f'--middle-sigma={cfg.middle_sigma}: expected a finite noise level > 0')
    positive = dict(batch=cfg.batch, duration=cfg.duration, lr=cfg.lr, dlr=cfg.dlr, tick=cfg.tick, snap=cfg.snap,
                    dump=cfg.dump, multi_step_g=cfg.multi_step_g, max_nonfinite=cfg.max_nonfinite,
                    grid_seeds=cfg.grid_seeds)
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f'--{name.replace("_", "-")}={value}: expected a value > 0')
    for name in ('batch_gpu', 'd_bn_group', 'adv_scale', 'cbase'):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f'--{name.replace("_", "-")}={value}: expected a value > 0')


def _batch_split(cfg, world_size):
    """(batch_gpu, rounds): real gradient accumulation (the official code silently shrinks the batch)."""
    if cfg.batch % world_size:
        raise ValueError(f'--batch={cfg.batch} is not divisible by the number of processes ({world_size})')
    per_process = cfg.batch // world_size
    batch_gpu = cfg.batch_gpu or per_process
    if per_process % batch_gpu:
        raise ValueError(f'--batch-gpu={batch_gpu} must divide the per-process batch {per_process}')
    if cfg.d_bn_group is not None and batch_gpu % cfg.d_bn_group:
        raise ValueError(f'--d-bn-group={cfg.d_bn_group} must divide the per-process micro-batch {batch_gpu} '
                         f'(--batch / processes / rounds)')
    return batch_gpu, per_process // batch_gpu


def _check_paths(cfg):
    """Files named on the command line exist (URLs are fetched later); --outdir is not a file."""
    from dnnlib.util import is_url  # a light import: config.py stays usable without torch
    if cfg.data is None:
        raise ValueError('--data: a dataset zip or folder is required')
    if not os.path.exists(cfg.data):
        raise ValueError(f'--data={cfg.data}: no such file or folder (expected an EDM dataset zip or folder)')
    if os.path.exists(cfg.outdir) and not os.path.isdir(cfg.outdir):
        raise ValueError(f'--outdir={cfg.outdir}: is a file, expected a folder (existing or to be created)')
    for name in ('transfer', 'metric_ref'):
        path = getattr(cfg, name)
        if path and not is_url(path) and not os.path.isfile(path):
            raise ValueError(f'--{name.replace("_", "-")}={path}: no such file')
    if cfg.d_weights and not os.path.exists(cfg.d_weights):
        raise ValueError(f'--d-weights={cfg.d_weights}: no such file or folder')
    if cfg.d_embedding not in (None, 'official', 'random') and not os.path.isfile(cfg.d_embedding):
        raise ValueError(f'--d-embedding={cfg.d_embedding}: no such file (expected PATH, official or random)')


def _check_device(device):
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f'--device={device}: not a torch device (expected cpu, cuda or cuda:N)') from None
    if dev.type == 'cuda' and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f'--device={device}: no such CUDA device on this machine '
                         f'({torch.cuda.device_count()} visible)')
    if dev.type not in ('cpu', 'cuda'):
        raise ValueError(f'--device={device}: expected cpu, cuda or cuda:N')


def _check_combinations(cfg, gan):
    if cfg.resume and cfg.transfer and cfg.resume != 'auto':
        raise ValueError('--resume and --transfer are exclusive: a training state holds the generator')
    if cfg.freeze and cfg.train_groups is not None:
        raise ValueError(f'--freeze={cfg.freeze} and --train-groups={",".join(cfg.train_groups)}: give one of them')
    if cfg.train_groups is not None:
        from training.freeze import GROUPS
        unknown = sorted(set(cfg.train_groups) - set(GROUPS))
        if unknown:
            raise ValueError(f'--train-groups: unknown group(s) {unknown}; expected names from {", ".join(GROUPS)}')
    if cfg.freeze is not None and cfg.freeze not in (0, 1, 2, 3):
        raise ValueError(f'--freeze={cfg.freeze}: expected 0, 1, 2 or 3')
    if cfg.metrics and not cfg.metric_ref:
        raise ValueError('--metrics needs --metric-ref=NPZ (reference statistics, e.g. from fid.py ref)')
    if cfg.multi_step_g > 1 and not gan:
        raise ValueError(f'--multi-step-g={cfg.multi_step_g} applies to --loss=d2o only')
    _check_consistency(cfg, gan)


def _check_consistency(cfg, gan):
    """The CD objective (paper §4.4) needs a one-step generator and the diffusion teacher it came from."""
    if not cfg.cd_weight >= 0 or not math.isfinite(cfg.cd_weight):
        raise ValueError(f'--cd-weight={cfg.cd_weight}: expected a finite value >= 0')
    if not (cfg.cd_weight or cfg.cd_only):
        return
    if not gan:
        raise ValueError(f'--cd-weight/--cd-only apply to --loss=d2o only, not --loss={cfg.loss}')
    if cfg.multi_step_g > 1:
        raise ValueError(f'--cd-weight/--cd-only train a one-step generator; got --multi-step-g={cfg.multi_step_g}')
    if not cfg.transfer and not cfg.resume:
        raise ValueError('--cd-weight/--cd-only need the diffusion teacher: pass --transfer=PKL')
    if not cfg.cd_scales >= 2:
        raise ValueError(f'--cd-scales={cfg.cd_scales}: expected an integer >= 2')


def resolve(cfg, world_size=1, check_files=True):
    """Validate `cfg` and derive its dependent values: returns (resolved TrainConfig, RunPlan). The resolved
    config has every derived option filled in (freeze, preconditioner, adv_scale, batch_gpu, d_embedding)
    and is what training_options.json and the training state record; resolving it again changes nothing.
    Raises ValueError naming the option. `check_files=False` skips the file-system checks (dry runs)."""
    _check_choices(cfg)
    _check_numbers(cfg)
    gan = cfg.loss == 'd2o'
    _check_combinations(cfg, gan)
    metric_images = {name: metric_num_images(name) for name in cfg.metrics or []}
    batch_gpu, rounds = _batch_split(cfg, world_size)
    _check_device(cfg.device)
    if check_files:
        _check_paths(cfg)
    backbone, backbones = cfg.backbone, ()
    if gan and not cfg.cd_only:
        backbone = backbone_option(cfg.backbone)  # names of an official set → its integer (resume compares it)
        backbones = tuple(backbone_set(backbone))
    resolved = dataclasses.replace(
        cfg, batch_gpu=batch_gpu, backbone=backbone,
        freeze=cfg.freeze if cfg.freeze is not None else (1 if gan and cfg.train_groups is None else 0),
        # A diffusion teacher cannot use the D2O preconditioner (it is an x₀ predictor at one σ).
        precond=cfg.precond if gan or cfg.precond != 'd2o' else 'edm',
        adv_scale=float(cfg.adv_scale if cfg.adv_scale is not None else cfg.batch / PAPER_NUM_GPUS),
        d_embedding=cfg.d_embedding or ('official' if gan and cfg.cond and not cfg.cd_only else None),
        cd_weight=float(cfg.cd_weight or (1.0 if cfg.cd_only else 0.0)))
    plan = RunPlan(world_size=world_size, rounds=rounds, total_nimg=int(round(cfg.duration * 1e6)),
                   backbones=backbones, metric_images=metric_images)
    return resolved, plan


def options_record(cfg, plan, **extra):
    """training_options.json: the resolved options, the derived plan and what the loop adds (run dir, ...)."""
    return dict(dataclasses.asdict(cfg), **dataclasses.asdict(plan), **extra)
