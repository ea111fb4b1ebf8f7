"""Helpers that EDM's own persisted code imports from `torch_utils.misc`.

Snapshots of EDM runs embed the source of EDM's `training/augment.py` (an AugmentPipe object), which does
`from torch_utils import misc` and calls `misc.constant`. Loading such a snapshot with
`--allow-unsafe-pickle` executes that source, so this module must exist and provide what it calls.
Our own code does not use it."""
import numpy as np
import torch

_constant_cache = {}


def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A cached constant tensor (EDM semantics: broadcast `value` to `shape`)."""
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device or 'cpu')
    memory_format = memory_format or torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor
