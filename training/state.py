"""Everything a resume needs, in one object written and read in one place (EDM2's CheckpointIO idea).

A `training-state-*.pt` holds G, its EMA, D, both optimisers, the progress counters, the non-finite
streaks and every rank's RNG state, as plain tensors and lists (loadable with
`torch.load(weights_only=True)`; docs/checkpoint-format.md §3). The data order is a pure function of (seed,
position), so these are all a bit-exact continuation needs."""
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

    def load(self, data):
        """Weights, optimiser moments and counters from a loaded state dict (not the RNG: see load_rng)."""
        for name in self._STATEFUL:
            if getattr(self, name) is not None:
                getattr(self, name).load_state_dict(data[name])
        for name in self._COUNTERS:
            setattr(self, name, int(data[name]))
        self.nonfinite_streak.clear()
        self.nonfinite_streak.update(data['nonfinite_streak'])

    @staticmethod
    def load_rng(data, rank):
        """This rank's RNG state; called last, after everything that seeds or draws at start-up."""
        set_rng_state(data['rng'][rank])
