"""The training-state file `training-state-*.pt` (docs/checkpoint-format.md §3), owned here alone: its
format and version, saving it, finding one to resume from, reading and checking it field by field, and
checking that the resumed run trains the same thing (EDM2's CheckpointIO idea: one object written and
read in one place).

A state holds G, its EMA, D, both optimisers, the progress counters, the non-finite streaks and every
rank's RNG state, as plain tensors and lists (loadable with `torch.load(weights_only=True)`). The data
order is a pure function of (seed, position), so these are all a bit-exact continuation needs.

API:
  TrainingState(G, G_ema, opt_G, guard, D=None, opt_D=None)   the networks, optimisers, counters and the
      NonFiniteGuard (training/steps.py), the one owner of the non-finite streak counts.
      .save(path, config)   collective; rank 0 writes atomically.   .load(data, path)   .load_rng(data, rank)
  find_resume_state(resume, outdir, config=None, log=print) -> path | None   --resume=FILE|DIR|auto (rank 0).
  load_training_state(path, mmap=False) -> dict   one ValueError line for corrupt, truncated, wrong-kind,
      incomplete or wrong-version files and for fields of the wrong type or range (check_fields), naming
      the file (and field) and what to use instead.
  restoring(path, field)             a saved field that does not fit this run -> one ValueError line.
  saved_run_config(state) -> dict    the state's config plus its data shape (DATASET_KEYS).
  check_resume(saved_cfg, new_cfg, path=None) -> [(option, saved, new)]   refuses changed WHAT_OPTIONS,
      returns the changed HOW_OPTIONS (they take effect; the loop logs them); IGNORED_OPTIONS are neither.
"""
import contextlib
import dataclasses
import glob
import os
import pickle
import random
import re
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training.run_dir import STATE_NAME

STATE_VERSION = 1
STATE_KEYS = ('version', 'config', 'G_record', 'G', 'G_ema', 'opt_G', 'D', 'opt_D', 'cur_nimg', 'cur_tick',
              'batch_idx', 'nonfinite_streak', 'rng')


def rng_state():
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=np.random.get_state()[1].tolist(), numpy_pos=int(np.random.get_state()[2]),
                python=list(random.getstate()[1]))


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])
    np.random.set_state(('MT19937', np.array(state['numpy'], dtype=np.uint32), state['numpy_pos'], 0, 0.0))
    random.setstate((3, tuple(state['python']), None))


def gather_rng_states():
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    local = rng_state()
    if dist.world_size() == 1:
        return [local]
    states = [None] * dist.world_size()
    torch.distributed.all_gather_object(states, local)
    return states


@dataclasses.dataclass
class TrainingState:
    """The networks and optimisers being trained (D and opt_D None for diffusion training), the progress
    counters, and the guard whose per-stage non-finite streaks are saved and restored with them."""
    G: torch.nn.Module
    G_ema: torch.nn.Module
    opt_G: torch.optim.Optimizer
    guard: object  # training.steps.NonFiniteGuard: `guard.streak` is the one copy of the streak counts
    D: torch.nn.Module = None
    opt_D: torch.optim.Optimizer = None
    cur_nimg: int = 0
    cur_tick: int = 0
    batch_idx: int = 0

    _STATEFUL = ('G', 'G_ema', 'opt_G', 'D', 'opt_D')
    _COUNTERS = ('cur_nimg', 'cur_tick', 'batch_idx')

    def to_dict(self, config, rng):
        data = dict(version=STATE_VERSION, config=config, G_record=checkpoint.network_constructor_record(self.G),
                    nonfinite_streak=dict(self.guard.streak), rng=rng)
        data.update({name: None if getattr(self, name) is None else getattr(self, name).state_dict()
                     for name in self._STATEFUL})
        data.update({name: getattr(self, name) for name in self._COUNTERS})
        return data

    def save(self, path, config):
        """Collective (gathers every rank's RNG state); rank 0 writes `path` atomically."""
        rng = gather_rng_states()
        if dist.rank() == 0:
            with dnnlib.atomic_write(path) as f:
                torch.save(self.to_dict(config, rng), f)

    def load(self, data, path=None):
        """Weights, optimiser moments, counters and streaks from a state read by load_training_state (not
        the RNG: see load_rng); `path` names the file in errors."""
        for name in self._STATEFUL:
            if getattr(self, name) is not None:
                with restoring(path, name):
                    getattr(self, name).load_state_dict(data[name])
        for name in self._COUNTERS:
            setattr(self, name, int(data[name]))
        self.guard.streak = dict(data['nonfinite_streak'])

    @staticmethod
    def load_rng(data, rank):
        """This rank's RNG state; called last, after everything that seeds or draws at start-up."""
        set_rng_state(data['rng'][rank])


# ----------------------------------------------------------------------------------------------
# Finding the state to resume from: --resume=FILE, DIR or auto (docs/checkpoint-format.md §3).

def _state_kimg(path):
    return float(STATE_NAME.fullmatch(os.path.basename(path)).group(1))


def _states_in(folder):
    """training-state-*.pt in `folder`, by kimg (temporaries and other names do not match)."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(folder), 'training-state-*.pt'))
             if STATE_NAME.fullmatch(os.path.basename(p))]
    return sorted(paths, key=_state_kimg)

def find_resume_state(resume, outdir, config=None, log=print):
    """--resume=FILE (a training state), DIR (its newest state) or auto: the most recently written
    state under --outdir (directly or one run folder down) whose WHAT options match `config` (a dict;
    None matches all). States of other configurations are skipped with a note, unreadable ones with a
    warning; `*.tmp` never match. Returns None for `resume` None/'' or when auto finds nothing."""
    if resume in (None, ''):
        return None
    if resume == 'auto':
        candidates = _states_in(outdir) + [p for d in sorted(glob.glob(os.path.join(glob.escape(outdir), '*', '')))
                                           for p in _states_in(d)]
        for path in sorted(candidates, key=lambda p: (os.path.getmtime(p), _state_kimg(p)), reverse=True):
            reason = _auto_mismatch(path, config)
            if reason is None:
                return path
            log(f'--resume=auto: skipping {path}: {reason}')
        return None
    if os.path.isdir(resume):
        states = _states_in(resume)
        if not states:
            raise FileNotFoundError(f'--resume={resume}: no training-state-*.pt in this folder')
        return states[-1]
    if not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume={resume}: no such file (expected training-state-*.pt, a run dir, or auto)')
    return resume



def _auto_mismatch(path, config):
    """Why --resume=auto must not continue `path` (None: it may)."""
    try:
        saved = saved_run_config(load_training_state(path, mmap=True))
    except ValueError as err:
        return f'WARNING: unreadable ({err})'
    refused = what_differences(saved, config) if config is not None else []
    return f'another configuration ({_describe_changes(refused)})' if refused else None


def _refuse(path, problem, instead):
    return ValueError(f'--resume={path}: {problem}; {instead}')


USE_EARLIER = 'resume from an earlier training-state-*.pt of the same run'
USE_OURS = 'pass a training-state-*.pt written by train.py'


def _check_state_file(path):
    """Tell wrong-kind and truncated files apart before torch reads them (torch's own errors name
    neither the file nor a remedy)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except OSError as err:
        raise _refuse(path, f'cannot be read ({err.strerror})', 'check the path and permissions') from None
    if path.endswith('.pkl') or head[:1] == b'\x80':
        raise _refuse(path, 'this is a pickle (a network snapshot?), not a training state',
                      'pass training-state-*.pt or its run directory; to start from a snapshot use '
                      f'--transfer={path}')
    if head != b'PK\x03\x04':
        raise _refuse(path, 'not a training state (not a torch zip file)', USE_OURS)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError):  # (a member name that is not UTF-8)
        raise _refuse(path, 'corrupt or truncated training state (unreadable zip directory)', USE_EARLIER) from None
    if any('/code/' in n or n.endswith('/constants.pkl') for n in names):
        raise _refuse(path, 'a TorchScript archive, which would run code when loaded; refused', USE_OURS)
    if not any(n.endswith('/data.pkl') for n in names):
        raise _refuse(path, 'a zip file without data.pkl (a dataset?), not a training state', USE_OURS)


def load_training_state(path, mmap=False):
    """The training-state dict saved by the loop (plain tensors and data: torch.load(weights_only=True),
    nothing in the file can execute). Every way the file can be wrong is one ValueError line naming
    the file and what to use instead. `mmap` maps the tensors lazily (cheap when only `config` is read)."""
    _check_state_file(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # torch names a refused class 'GLOBAL module.name'
        refused = re.search(r'GLOBAL (\S+)', str(err))
        if refused is None:
            raise _refuse(path, 'corrupt training state (unreadable pickle)', USE_EARLIER) from None
        raise _refuse(path, f'holds pickled objects ({refused.group(1)}), not plain tensors (an EDM training state, '
                            f'or not written by train.py)', 'to start from an EDM run use '
                      '--transfer=network-snapshot-*.pkl') from None
    except Exception as err:  # torch reports truncation/corruption with RuntimeError, EOFError, KeyError...
        raise _refuse(path, f'corrupt or truncated training state ({type(err).__name__})', USE_EARLIER) from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if 'version' not in missing and not (type(state['version']) is int and state['version'] == STATE_VERSION):
        raise _refuse(path, f'training-state version {state["version"]!r}, this code reads version {STATE_VERSION}',
                      'resume it with the d2o version that wrote it')
    if not missing and not isinstance(state['config'], dict):
        missing = ['config (not a dict)']
    if missing:
        raise _refuse(path, f'incomplete training state (missing {", ".join(missing)})', USE_EARLIER)
    try:
        check_fields(state)
    except ValueError as err:
        raise _refuse(path, str(err), USE_EARLIER) from None
    return state


# ----------------------------------------------------------------------------------------------
# Checking a loaded state field by field (docs/checkpoint-format.md §3): a forged or broken state is one
# line naming the field, not a run that never ends (cur_nimg < 0) or a traceback deep in the loop.

MAX_COUNT = 10 ** 12  # images, ticks and iterations: far beyond any real run
MT_WORDS = 624  # MT19937 state words (numpy's and Python's generators)
CUDA_RNG_BYTES = 16  # a CUDA generator's state: Philox seed and offset, 8 bytes each
RNG_KEYS = ('torch', 'cuda', 'numpy', 'numpy_pos', 'python')


def _describe_value(value):
    if torch.is_tensor(value):
        return f'a {str(value.dtype).removeprefix("torch.")} tensor of shape {list(value.shape)}'
    if isinstance(value, (list, tuple, dict)):
        return f'a {type(value).__name__} of {len(value)} items'
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + '...'


def _bad(field, value, expected):
    return ValueError(f'field {field!r} is {_describe_value(value)}, expected {expected}')


def _is_count(value, limit=MAX_COUNT):
    return type(value) is int and 0 <= value <= limit  # not bool, not float


def _is_bytes(value, length):
    return torch.is_tensor(value) and value.dtype == torch.uint8 and list(value.shape) == [length]


def _is_words(values, count):
    return isinstance(values, list) and len(values) == count and all(_is_count(v, 2 ** 32 - 1) for v in values)


def check_rng(state, field):
    """One process's rng_state() as saved: the exact types and shapes set_rng_state accepts."""
    if not isinstance(state, dict) or not all(k in state for k in RNG_KEYS):
        raise _bad(field, state, f'a dict of {", ".join(RNG_KEYS)}')
    torch_bytes = torch.get_rng_state().numel()
    if not _is_bytes(state['torch'], torch_bytes):
        raise _bad(f'{field}.torch', state['torch'], f'a uint8 tensor of shape [{torch_bytes}]')
    cuda = state['cuda']
    if not (isinstance(cuda, list) and all(_is_bytes(s, CUDA_RNG_BYTES) for s in cuda)):
        raise _bad(f'{field}.cuda', cuda, f'a list of uint8 tensors of shape [{CUDA_RNG_BYTES}]')
    if not _is_words(state['numpy'], MT_WORDS):
        raise _bad(f'{field}.numpy', state['numpy'], f'a list of {MT_WORDS} integers from 0 to 2**32-1')
    if not _is_count(state['numpy_pos'], MT_WORDS):
        raise _bad(f'{field}.numpy_pos', state['numpy_pos'], f'an integer from 0 to {MT_WORDS}')
    python = state['python']
    if not (isinstance(python, list) and _is_words(python[:-1], MT_WORDS) and _is_count(python[-1], MT_WORDS)):
        raise _bad(f'{field}.python', python, f'a list of {MT_WORDS} integers from 0 to 2**32-1 and a position '
                                              f'from 0 to {MT_WORDS}')


def check_fields(data):
    """ValueError naming the first field of a loaded state (every STATE_KEYS key present) that to_dict
    could not have written. Weights are checked when loaded into the networks (see `restoring`)."""
    for name in TrainingState._COUNTERS:
        if not _is_count(data[name]):
            raise _bad(name, data[name], f'an integer from 0 to {MAX_COUNT}')
    record = data['G_record']
    if not (isinstance(record, dict) and isinstance(record.get('class_name'), str) and
            isinstance(record.get('init_args', []), (list, tuple)) and isinstance(record.get('init_kwargs', {}), dict)):
        raise _bad('G_record', record, 'a dict of class_name (a string), init_args (a list), init_kwargs (a dict)')
    for name in TrainingState._STATEFUL:
        optional = name in ('D', 'opt_D')
        if not (isinstance(data[name], dict) or (optional and data[name] is None)):
            raise _bad(name, data[name], 'a state dict' + (' or None' if optional else ''))
    streak = data['nonfinite_streak']
    if not isinstance(streak, dict):
        raise _bad('nonfinite_streak', streak, 'a dict of stage name: count')
    for stage, count in streak.items():
        if not (isinstance(stage, str) and _is_count(count)):
            raise _bad(f'nonfinite_streak[{stage!r}]', count, f'an integer from 0 to {MAX_COUNT}')
    if not (isinstance(data['rng'], list) and data['rng']):
        raise _bad('rng', data['rng'], 'a non-empty list (one RNG state per process)')
    for rank, state in enumerate(data['rng']):
        check_rng(state, f'rng[{rank}]')


@contextlib.contextmanager
def restoring(path, field):
    """A saved field that passed check_fields but does not fit what this run builds (load_state_dict's
    RuntimeError, a constructor's TypeError) → one ValueError naming the file and the field."""
    try:
        yield
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as err:
        text = ' '.join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise _refuse(path, f'field {field!r} does not fit this run ({text[:300]})', USE_EARLIER) from err


# ----------------------------------------------------------------------------------------------
# What a resume may change (docs/checkpoint-format.md §3). Options fall in three lists (every TrainConfig field is
# in exactly one): WHAT is trained cannot change on resume; HOW it is trained may, takes effect and is
# logged; the rest says where files are, and is ignored.

DATASET_KEYS = ('resolution', 'channels', 'label_dim')  # from the dataset / the saved generator, not options
WHAT_OPTIONS = (
    'cond', 'loss', 'loss_type', 'arch', 'precond', 'cbase', 'cres', 'dropout', 'augment_dim',  # the model
    'multi_step_g', 'middle_sigma', 'freeze', 'train_groups',  # what G computes and which weights train
    'cd_weight', 'cd_only', 'cd_distance', 'cd_scales',  # the objective (training/consistency.py)
    'backbone', 'd_pretrained', 'd_embedding', 'interp224',  # D's structure (its weights are in the state)
    'batch', 'xflip', 'seed',  # the data stream: order and EMA/adv-scale defaults derive from them
) + DATASET_KEYS
HOW_OPTIONS = (
    'data',  # the file may move; its shape is checked through DATASET_KEYS
    'lr', 'dlr', 'lr_rampup', 'r1_gamma', 'adv_scale', 'diffaug', 'ema', 'ema_warmup', 'precision', 'batch_gpu',
    'max_nonfinite', 'duration', 'cache', 'workers', 'tick', 'snap', 'dump', 'metrics', 'metric_ref',
    'metrics_at_start', 'grid_seeds', 'd_bn_group',
)
IGNORED_OPTIONS = (
    'outdir', 'resume', 'desc', 'nosubdir', 'device', 'preset',  # where, not what or how
    'transfer', 'allow_unsafe_pickle', 'd_weights',  # initial weights: the state's weights replace them
    'lpips_vgg', 'lpips_lin',  # fixed pretrained weights, located again on every start
)

def saved_run_config(state):
    """The saved TrainConfig dict plus DATASET_KEYS (the data shape the saved generator was built for)."""
    config = dict(state['config'])
    kwargs = (state.get('G_record') or {}).get('init_kwargs') or {}
    for key, name in zip(DATASET_KEYS, ('img_resolution', 'img_channels', 'label_dim')):
        if name in kwargs:
            config[key] = kwargs[name]
    return config


def _plain(value):
    """Tuples and lists compare equal (JSON round trips turn one into the other)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _option_name(key):
    return f'--data {key}' if key in DATASET_KEYS else '--' + key.replace('_', '-')


def _changed(saved_cfg, new_cfg, keys):
    """[(option, saved, new)] for the `keys` present in both dicts whose values differ."""
    return [(_option_name(k), saved_cfg[k], new_cfg[k]) for k in keys
            if k in saved_cfg and k in new_cfg and _plain(saved_cfg[k]) != _plain(new_cfg[k])]


def what_differences(saved_cfg, new_cfg):
    return _changed(saved_cfg, new_cfg, WHAT_OPTIONS)


def _describe_changes(changes):
    return '; '.join(f'{option} saved {saved!r}, now {new!r}' for option, saved, new in changes)


def check_resume(saved_cfg, new_cfg, path=None):
    """Compare the saved run's configuration with this run's (dicts; keys missing on either side are not
    compared). A changed WHAT option → ValueError naming every such option with its saved and new value;
    otherwise the changed HOW options as [(option, saved, new)] for the loop to log. A key in none of
    the three lists (a field newer than this table) counts as HOW: it takes effect, and is logged."""
    refused = what_differences(saved_cfg, new_cfg)
    if refused:
        raise ValueError(f'{f"--resume={path}" if path else "--resume"}: cannot change what is trained: '
                         f'{_describe_changes(refused)}; use the saved values or start a new run without --resume')
    unlisted = sorted(set(new_cfg) - set(WHAT_OPTIONS) - set(HOW_OPTIONS) - set(IGNORED_OPTIONS))
    return _changed(saved_cfg, new_cfg, HOW_OPTIONS + tuple(unlisted))
