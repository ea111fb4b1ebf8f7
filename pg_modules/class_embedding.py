"""Initial class embedding of the conditional mini-discriminators (d2o-method.md §10, checkpoint-format.md §2.3).

Accepted files, each holding a [N, 320] table (row k = class k):
  .pkl       the official `in_embeddings/tf_efficientnet_lite0.pkl`: a protocol-3 (dill) pickle of
             {'embed': nn.Embedding(1000, 320)}. Read with a restricted unpickler: only tensor rebuilders, plain
             containers and `set` resolve; the Embedding comes back as inert data and only its weight is kept.
  .pt/.pth   torch.load(weights_only=True) of a tensor or of an Embedding state dict {'weight': tensor}.
  .npy       a float array (np.load without pickle)."""
import collections
import io
import os
import pickle

import numpy as np
import torch

EMBED_DIM = 320  # width of tf_efficientnet_lite0's last stage, which the official embeddings were built from


class _ModuleRecord:
    """Stands in for a pickled nn.Module: its state is kept as a plain dict, no torch.nn code runs."""

    def __setstate__(self, state):
        self.state = state


def _storage_from_bytes(data):
    # torch's own `_load_from_bytes` reads this legacy torch.save stream with weights_only=False.
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)


def _load_type(name):
    if name != 'set':
        raise pickle.UnpicklingError(f'dill._dill._load_type({name!r}) is not allowed (only set)')
    return set


class _RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('builtins', 'set'): set,
        ('__builtin__', 'set'): set,
        ('dill._dill', '_load_type'): _load_type,
        ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
        ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
        ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
        ('torch.nn.modules.sparse', 'Embedding'): _ModuleRecord,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'global {module}.{name} is not allowed in a class-embedding pickle')
        return self.ALLOWED[module, name]


def load_class_embedding(path):
    """Return the [N, 320] float32 table stored in `path`."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    expected = ('expected a .pkl of {"embed": nn.Embedding(N, 320)}, a .pt/.pth tensor or Embedding state dict, '
                'or a .npy array, each of shape [N, 320]')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'class embedding {path}: no such file')
    try:
        if ext == '.pkl':
            with open(path, 'rb') as f:
                table = _RestrictedUnpickler(f).load()['embed'].state['_parameters']['weight']
        elif ext in ('.pt', '.pth'):
            table = torch.load(path, map_location='cpu', weights_only=True)
            table = table['weight'] if isinstance(table, dict) else table
        elif ext == '.npy':
            table = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            raise ValueError(f'unknown extension {ext!r}')
    except Exception as err:
        raise ValueError(f'class embedding {path}: cannot read it ({err.__class__.__name__}: {err}); '
                         f'{expected}') from None
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[1] != EMBED_DIM:
        shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f'class embedding {path}: got {shape}; {expected}')
    return table.detach().to(torch.float32).clone()
