"""Building the generator G of a run from explicit fields: the architecture tables, the
preconditioner, the precision, and the teacher → generator transfer (docs/method.md §2, §4).

`build_generator(cfg, dataset, log)` is the one entry point the training loop calls. Every choice it makes
that the options do not spell out (preconditioner for diffusion training, `use_fp16` from `--precision`,
tensors dropped/left new by the transfer) is logged."""
import copy
import dataclasses
import pickle
import re

import numpy as np
import torch

from torch_utils import persistence
from training import checkpoint, networks

ARCHS = {  # docs/method.md §2
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECONDS = {'d2o': networks.D2OPrecond, 'edm': networks.EDMPrecond, 'vp': networks.VPPrecond,
            've': networks.VEPrecond}

# Teacher preconditioner kwargs with no meaning for D2OPrecond (noise schedules of VP/VE/iDDPM, σ range).
_TEACHER_ONLY_KWARGS = ('beta_d', 'beta_min', 'M', 'epsilon_t', 'C_1', 'C_2', 'sigma_min', 'sigma_max')
_DROPPED_ON_TRANSFER = re.compile(r'(^|\.)map_augment\.')  # D2O generators have no augmentation map (docs/method.md §4)

# ----------------------------------------------------------------------------------------------
# Architecture.

def arch_kwargs(cfg):
    """U-Net constructor kwargs of `--arch` (default ncsnpp) with `--cbase`/`--cres` applied."""
    kw = copy.deepcopy(ARCHS[cfg.arch or 'ncsnpp'])
    if cfg.cbase is not None:
        kw['model_channels'] = cfg.cbase
    if cfg.cres is not None:
        kw['channel_mult'] = list(cfg.cres)
    return kw


def check_arch_matches(cfg, recorded):
    """--transfer fixes the architecture; explicit options that contradict it are an error."""
    if cfg.arch is None and cfg.cbase is None and cfg.cres is None:
        return
    wanted = arch_kwargs(cfg)
    if cfg.arch is None:  # only cbase/cres given: compare just those
        wanted = {k: v for k, v in wanted.items() if k in ('model_channels', 'channel_mult') and
                  ((k == 'model_channels' and cfg.cbase is not None) or (k == 'channel_mult' and cfg.cres is not None))}
    clashes = {k: (v, recorded.get(k, '(default)')) for k, v in wanted.items()
               if k in recorded and list(np.atleast_1d(recorded[k])) != list(np.atleast_1d(v))}
    if 'model_type' in wanted and recorded.get('model_type', 'DhariwalUNet') != wanted['model_type']:
        clashes['model_type'] = (wanted['model_type'], recorded.get('model_type', 'DhariwalUNet'))
    if clashes:
        lines = ', '.join(f'{k}: option {a} vs checkpoint {b}' for k, (a, b) in clashes.items())
        raise ValueError(f'--transfer={cfg.transfer}: architecture options contradict the checkpoint ({lines}); '
                         f'drop --arch/--cbase/--cres to use the checkpoint architecture')


def choose_preconditioner(cfg):
    """(name, reason). The GAN objective trains whatever `--precond` says; a diffusion loss cannot train the
    D2O wrapper (its c_skip/c_out are shifted for one-step generation, docs/method.md §4), so `--precond=d2o`
    (the default) with `--loss=edm|vp|ve` means EDMPrecond — said in the log, never swapped silently."""
    if cfg.precond not in PRECONDS:
        raise ValueError(f'--precond={cfg.precond}: expected one of {", ".join(PRECONDS)}')
    if cfg.loss != 'd2o' and cfg.precond == 'd2o':
        return 'edm', f'--loss={cfg.loss} trains a diffusion model; D2OPrecond is for one-step generators'
    return cfg.precond, f'--precond={cfg.precond}'


def use_fp16_for(cfg):
    """`use_fp16` of G comes from `--precision`, never from the teacher's pickle: bf16 runs the
    U-Net in bfloat16 on CUDA (EDM/D2O wrappers' half dtype; docs/method.md §9), fp32 keeps it float32."""
    if cfg.precision not in ('fp32', 'bf16'):
        raise ValueError(f'--precision={cfg.precision}: expected fp32 or bf16')
    return cfg.precision == 'bf16'

# ----------------------------------------------------------------------------------------------
# Teacher transfer (docs/method.md §4 Transfer).

def generator_kwargs_from_teacher(teacher, **overrides):
    """D2OPrecond constructor kwargs with the teacher's architecture (from its recorded `_init_kwargs`):
    no augmentation map (augment_dim=0, docs/method.md §4), then `overrides` (e.g. dropout, use_fp16)."""
    if not persistence.is_persistent(teacher) or not hasattr(teacher, 'model'):
        raise ValueError(f'generator_kwargs_from_teacher: {type(teacher).__name__} is not a preconditioned EDM/D2O '
                         f'network')
    if teacher._init_args:
        raise ValueError(f'generator_kwargs_from_teacher: {type(teacher).__name__} was built with positional '
                         f'arguments {teacher._init_args}; only keyword constructor records are supported')
    kwargs = {k: v for k, v in teacher._init_kwargs.items() if k not in _TEACHER_ONLY_KWARGS}
    kwargs['model_type'] = type(teacher.model).__name__  # VP/VE records may rely on their class default
    kwargs['augment_dim'] = 0
    kwargs.update(overrides)
    return kwargs


@dataclasses.dataclass
class TransferReport:
    copied: list   # names copied from the source
    dropped: list  # source names not used (map_augment.*, or absent from the destination)
    new: list      # destination names left at their initial values

    def __str__(self):
        return f'copied {len(self.copied)} tensors, dropped {self.dropped}, left new {self.new}'


def transfer_weights(src_net, dst_net):
    """Copy parameters and buffers by name from a teacher (VP/VE/iDDPM/EDM precond) or D2O network into
    `dst_net` (docs/method.md §4 Transfer). A name present in both with different shapes is an error."""
    src = dict(src_net.state_dict())
    dst = {**dict(dst_net.named_parameters()), **dict(dst_net.named_buffers())}
    mismatched = [f'{name} {tuple(t.shape)} -> {tuple(dst[name].shape)}' for name, t in src.items()
                  if name in dst and not _DROPPED_ON_TRANSFER.search(name) and t.shape != dst[name].shape]
    if mismatched:
        raise ValueError(f'transfer_weights: shapes differ between {type(src_net).__name__} and '
                         f'{type(dst_net).__name__}: {mismatched}')
    copied, dropped = [], []
    with torch.no_grad():
        for name, t in src.items():
            if _DROPPED_ON_TRANSFER.search(name) or name not in dst:
                dropped.append(name)
            else:
                dst[name].copy_(t)
                copied.append(name)
    return TransferReport(copied=copied, dropped=dropped, new=[name for name in dst if name not in set(copied)])


def load_teacher(cfg, dataset):
    """The `ema` network of `--transfer`, read safely (unless --allow-unsafe-pickle), checked against the data."""
    try:
        teacher = checkpoint.load_network(cfg.transfer, key='ema', allow_unsafe_pickle=cfg.allow_unsafe_pickle)
    except (pickle.UnpicklingError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ValueError(f'--transfer: {message}') from None
    if teacher.img_resolution != dataset.resolution or teacher.img_channels != dataset.num_channels:
        raise ValueError(f'--transfer={cfg.transfer}: network is {teacher.img_channels}x{teacher.img_resolution}^2 '
                         f'but --data={cfg.data} is {dataset.num_channels}x{dataset.resolution}^2')
    if teacher.label_dim != dataset.label_dim:
        raise ValueError(f'--transfer={cfg.transfer}: label_dim {teacher.label_dim} but the dataset gives '
                         f'{dataset.label_dim} (check --cond)')
    return teacher

# ----------------------------------------------------------------------------------------------
# The entry point.

def build_generator(cfg, dataset, log):
    """G from --transfer (teacher weights copied by name into the chosen preconditioner) or random init
    (from the global torch RNG, which the caller seeds)."""
    precond, reason = choose_preconditioner(cfg)
    use_fp16 = use_fp16_for(cfg)
    log(f'Generator: {PRECONDS[precond].__name__} ({reason}); use_fp16={use_fp16} from --precision={cfg.precision}'
        + (' (bfloat16 U-Net on CUDA)' if use_fp16 else ''))
    if cfg.transfer:
        log(f'Loading transfer source {cfg.transfer} ...')
        teacher = load_teacher(cfg, dataset)
        kwargs = generator_kwargs_from_teacher(teacher, dropout=cfg.dropout, use_fp16=use_fp16)
        if teacher.use_fp16 != use_fp16:
            log(f'Note: the teacher was saved with use_fp16={teacher.use_fp16}; G uses {use_fp16} (--precision)')
        check_arch_matches(cfg, kwargs)
        G = PRECONDS[precond](**kwargs)
        log(f'Transfer: {transfer_weights(teacher, G)}')
        return G
    kwargs = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim,
                  dropout=cfg.dropout, augment_dim=cfg.augment_dim if cfg.loss != 'd2o' else 0, use_fp16=use_fp16,
                  **arch_kwargs(cfg))
    if cfg.loss == 'd2o':
        log('WARNING: no --transfer given: the generator starts from RANDOM weights (D2O expects a pretrained '
            'diffusion model; pass --transfer=PKL)')
    return PRECONDS[precond](**kwargs)
