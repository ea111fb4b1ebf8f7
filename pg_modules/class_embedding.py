"""Initial class embedding of the conditional mini-discriminators (docs/method.md §10, docs/checkpoint-format.md
§2.3), and the one place that decides which table a run uses: `resolve_class_embedding`.

The official conditional discriminator starts from a pretrained ImageNet table, `in_embeddings/
tf_efficientnet_lite0.pkl` of the official repository; `load_official_class_embedding` fetches it
through the download cache from a pinned commit and checks its SHA-256.

Accepted files, each holding a [N, 320] table (row k = class k):
  .pkl       the official file: a protocol-3 (dill) pickle of {'embed': nn.Embedding(1000, 320)}, read with the
             restricted unpickler (torch_utils/safe_pickle.py): only tensor rebuilders, plain containers and `set`
             resolve; the Embedding comes back as inert data and only its weight is kept.
  .pt/.pth   a torch.save file (read by the same restricted unpickler) of a tensor or of an Embedding state
             dict {'weight': tensor}.
  .npy       a float array (np.load without pickle)."""
import hashlib
import os
import pickle

import numpy as np
import torch

from dnnlib import util
from torch_utils import npy_header, safe_pickle

EMBED_DIM = 320  # width of tf_efficientnet_lite0's last stage, which the official embeddings were built from
OFFICIAL_COMMIT = '9f8124de0ee48ddfcad6ced7101fae6b9f8c1380'
OFFICIAL_URL = (f'https://raw.githubusercontent.com/Zyriix/D2O/{OFFICIAL_COMMIT}/'
                f'in_embeddings/tf_efficientnet_lite0.pkl')
OFFICIAL_SHA256 = 'c109f9a8a2371b78fbd464adaa51f82a4c0015db131b98ad74d8e63e0edcf2c6'
EXPECTED = ('expected a .pkl of {"embed": nn.Embedding(N, 320)}, a .pt/.pth tensor or Embedding state dict, '
            'or a .npy array, each of shape [N, 320]')


class _ModuleRecord(safe_pickle.Record):
    """Stands in for a pickled nn.Module: BUILD keeps its state as a plain dict, no torch.nn code runs."""


def _dill_load_type(name):
    # dill pickles the builtin `set` type as dill._dill._load_type('set'); nothing else is needed.
    if name != 'set':
        raise pickle.UnpicklingError(f'dill._dill._load_type({safe_pickle.short_repr(name)}) is not allowed (only set)')
    return set


EMBEDDING_GLOBALS = {
    **safe_pickle.TENSOR_GLOBALS,
    ('dill._dill', '_load_type'): _dill_load_type,
    ('torch.nn.modules.sparse', 'Embedding'): _ModuleRecord,
}


def _read_pickled_embedding(path):
    tree = safe_pickle.load_path(path, EMBEDDING_GLOBALS, f'class embedding {path}')
    try:
        return tree['embed'].state['_parameters']['weight']
    except (TypeError, KeyError, AttributeError):
        raise ValueError(f'class embedding {path}: no embed._parameters.weight in the pickle; {EXPECTED}') from None


def _read_npy(path):
    """np.load without pickle, its header's declared size checked against the file first."""
    with open(path, 'rb') as f:
        shape, _, declared = npy_header.declared_array(f)
        if declared > os.fstat(f.fileno()).st_size:
            raise ValueError(f'declares shape {list(shape)} ({declared:,} bytes) in a file of '
                             f'{os.fstat(f.fileno()).st_size:,} bytes')
        f.seek(0)
        return np.load(f, allow_pickle=False)


def load_class_embedding(path):
    """Return the [N, 320] float32 table stored in `path`."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError(f'class embedding {path}: no such file')
    try:
        if ext == '.pkl':
            table = _read_pickled_embedding(path)
        elif ext in ('.pt', '.pth'):
            table = safe_pickle.load_path(path, safe_pickle.TENSOR_GLOBALS, f'class embedding {path}')
            table = table.get('weight') if isinstance(table, dict) else table
        elif ext == '.npy':
            table = torch.from_numpy(_read_npy(path))
        else:
            raise ValueError(f'unknown extension {ext!r}')
    except Exception as err:  # nothing in the file runs, so any failure means a malformed or foreign file
        message = str(err)
        prefix = f'class embedding {path}: '
        raise ValueError(prefix + (message[len(prefix):] if message.startswith(prefix) else
                                   f'cannot read it ({err.__class__.__name__}: {message})') + f'; {EXPECTED}') from None
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[1] != EMBED_DIM:
        shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f'class embedding {path}: got {shape}; {EXPECTED}')
    return table.detach().to(torch.float32).clone()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def load_official_class_embedding():
    """The official [1000, 320] table (module doc), from the dnnlib download cache or downloaded once into it.
    Offline without a cached copy → a clear error naming the URL, the cache file and `--d-embedding=PATH`."""
    try:
        path = util.open_url(OFFICIAL_URL, return_filename=True)
    except (OSError, ImportError) as err:
        raise FileNotFoundError(
            f'The official class-embedding table is not available: {err}\n'
            f'  Conditional runs start the discriminator from it, as the official code does. Either make '
            f'{OFFICIAL_URL} reachable, or pass a local copy with --d-embedding=PATH (or --d-embedding=random for '
            f'random rows).') from None
    digest = sha256_of(path)
    if digest != OFFICIAL_SHA256:
        raise ValueError(f'class embedding {path} (downloaded from {OFFICIAL_URL}): SHA-256 {digest}, expected '
                         f'{OFFICIAL_SHA256}; delete the file and retry, or pass --d-embedding=PATH')
    return load_class_embedding(path)


def resolve_class_embedding(spec, c_dim, log=print, generator=None):
    """(table [N ≥ c_dim, 320] or None, info str or None) for `--d-embedding=spec` and `c_dim` classes.

    spec None or 'official' → the official table (default of conditional runs); 'random' → N(0,1) rows from
    `generator` (explicit opt-in, logged; info says so); anything else → a file (see load_class_embedding).
    Unconditional (c_dim 0) → (None, None); an explicit spec there is an error."""
    if c_dim == 0:
        if spec is not None:
            raise ValueError(f'--d-embedding={spec} was given but the discriminator is unconditional (c_dim=0)')
        return None, None
    if spec == 'random':
        table = torch.randn(max(1000, c_dim), EMBED_DIM, generator=generator)
        info = f'random N(0,1) rows ({table.shape[0]}×{EMBED_DIM}, --d-embedding=random)'
        log(f'WARNING: the conditional discriminator starts from a RANDOM class embedding ({info}); the official '
            f'code uses the pretrained table')
        return table, info
    if spec is None or spec == 'official':
        table, info = load_official_class_embedding(), f'official {OFFICIAL_URL} (sha256 {OFFICIAL_SHA256[:12]}…)'
    else:
        table, info = load_class_embedding(spec), f'file {spec}'
    if table.shape[0] < c_dim:
        raise ValueError(f'class embedding {spec or "official"} has {table.shape[0]} rows but c_dim={c_dim} classes')
    return table, f'{info} ({table.shape[0]}×{EMBED_DIM})'
