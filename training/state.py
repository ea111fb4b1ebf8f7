"""Everything a resume needs, in one object written and read in one place (EDM2's CheckpointIO idea).

A `training-state-*.pt` holds G, its EMA, D, both optimisers, the progress counters, the non-finite
streaks and every rank's RNG state, as plain tensors and lists (loadable with
`torch.load(weights_only=True)`; docs/checkpoint-format.md §3). The data order is a pure function of (seed,
position), so these are all a bit-exact continuation needs."""
import contextlib
import dataclasses
import random

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint

STATE_VERSION = 1


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


# ----------------------------------------------------------------------------------------------
# Checking a loaded state field by field (docs/checkpoint-format.md §3): a forged or broken state is one
# line naming the field, not a run that never ends (cur_nimg < 0) or a traceback deep in the loop.

MAX_COUNT = 10 ** 12  # images, ticks and iterations: far beyond any real run
MT_WORDS = 624  # MT19937 state words (numpy's and Python's generators)
CUDA_RNG_BYTES = 16  # a CUDA generator's state: Philox seed and offset, 8 bytes each
RNG_KEYS = ('torch', 'cuda', 'numpy', 'numpy_pos', 'python')


def _describe(value):
    if torch.is_tensor(value):
        return f'a {str(value.dtype).removeprefix("torch.")} tensor of shape {list(value.shape)}'
    if isinstance(value, (list, tuple, dict)):
        return f'a {type(value).__name__} of {len(value)} items'
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + '...'


def _bad(field, value, expected):
    return ValueError(f'field {field!r} is {_describe(value)}, expected {expected}')


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
        raise ValueError(f'--resume={path}: field {field!r} does not fit this run ({text[:300]}); resume from an '
                         f'earlier training-state-*.pt of the same run') from err


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
    counters and the per-stage non-finite streaks."""
    G: torch.nn.Module
    G_ema: torch.nn.Module
    opt_G: torch.optim.Optimizer
    D: torch.nn.Module = None
    opt_D: torch.optim.Optimizer = None
    cur_nimg: int = 0
    cur_tick: int = 0
    batch_idx: int = 0
    nonfinite_streak: dict = dataclasses.field(default_factory=dict)

    _STATEFUL = ('G', 'G_ema', 'opt_G', 'D', 'opt_D')
    _COUNTERS = ('cur_nimg', 'cur_tick', 'batch_idx')

    def to_dict(self, config, rng):
        data = dict(version=STATE_VERSION, config=config, G_record=checkpoint.network_constructor_record(self.G),
                    nonfinite_streak=dict(self.nonfinite_streak), rng=rng)
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
        """Weights, optimiser moments and counters from a state dict checked by check_fields (not the RNG:
        see load_rng); `path` names the file in errors."""
        for name in self._STATEFUL:
            if getattr(self, name) is not None:
                with restoring(path, name):
                    getattr(self, name).load_state_dict(data[name])
        for name in self._COUNTERS:
            setattr(self, name, int(data[name]))
        self.nonfinite_streak.clear()
        self.nonfinite_streak.update(data['nonfinite_streak'])

    @staticmethod
    def load_rng(data, rank):
        """This rank's RNG state; called last, after everything that seeds or draws at start-up."""
        set_rng_state(data['rng'][rank])
