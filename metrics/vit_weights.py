"""Weights of the ViT feature networks (CLIP, DINOv2): where they come from, read without running code.

Sources, in order (`resolve_state_dict`): an explicit `--clip-weights` / `--dinov2-weights` PATH|URL (URLs
through `dnnlib.util.open_url`'s cache); else the network's default download (a URL through the same
cache, or timm's pretrained download through the Hugging Face cache); else a clear error naming the
option. Accepted files: safetensors; `torch.save` state dicts and TorchScript archives such as OpenAI's
`ViT-B-32.pt`, all read by the project's restricted unpickler (torch_utils/safe_pickle.py: tensors only,
every other global an inert node; a TorchScript archive's code is never loaded). Key layouts are converted by timm's own
`checkpoint_filter_fn` (OpenAI CLIP `visual.*`, DINOv2 `blocks.*` + `mask_token`, timm)."""
import hashlib
import logging
import socket
import urllib.parse

import torch

from dnnlib import util
from torch_utils import safe_pickle


def read_weights_file(path, what):
    """{name: tensor} of a weights file (module doc); errors name the file and `what` it should hold."""
    try:
        if str(path).endswith('.safetensors'):
            import safetensors.torch
            return safetensors.torch.load_file(path)
        tree = safe_pickle.load_path(path, safe_pickle.TENSOR_GLOBALS, inert=safe_pickle.InertNode,
                                     torchscript_data=True)
        for key in ('state_dict', 'model'):  # common training-checkpoint wrappers
            if isinstance(tree, dict) and isinstance(tree.get(key), dict):
                tree = tree[key]
        state = safe_pickle.collect_tensors(tree, '', {})  # visited-set and node budget: shared or cyclic data stay cheap
    except Exception as err:  # nothing in the file runs, so any failure means a malformed or foreign file
        raise ValueError(f'{path}: cannot read {what} weights ({err.__class__.__name__}: {err})') from None
    if not state:
        raise ValueError(f'{path}: no tensors found; expected a state dict of {what} weights')
    return state


def resolve_state_dict(weights, what, option, default_url=None, timm_name=None):
    """The state dict from `weights` (PATH|URL) or the default sources (module doc)."""
    if weights is not None:
        return read_weights_file(util.open_url(weights, return_filename=True), what)
    errors = []
    if default_url is not None:
        try:
            return read_weights_file(util.open_url(default_url, return_filename=True), what)
        except (OSError, ImportError) as err:
            errors.append(f'{default_url}: {str(err).splitlines()[0]}')
    if timm_name is not None:
        try:
            return timm_pretrained_state(timm_name)
        except Exception as err:  # offline: huggingface_hub raises its own error classes
            errors.append(f'timm {timm_name}: {err.__class__.__name__}: {str(err).splitlines()[0][:200]}')
    raise util.InputError(f'No {what} weights available ({"; ".join(errors) or "no default source"}); pass '
                       f'{option}=PATH|URL')


def timm_pretrained_state(timm_name):
    """State dict of timm's pretrained `timm_name` (Hugging Face download and cache). An unresolvable hub
    host fails at once instead of after huggingface_hub's minute of logged retries."""
    import huggingface_hub
    import timm
    host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        raise OSError(f'offline? cannot resolve {host} ({err})') from None
    hub_logger = logging.getLogger('huggingface_hub')
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # it logs each failed request before raising
    try:
        return timm.create_model(timm_name, pretrained=True).state_dict()
    finally:
        hub_logger.setLevel(level)


def load_converted(model, state, path_label, what):
    """Load `state` (any layout timm converts) into `model` strictly; a clear error on a foreign layout."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    try:
        model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
    except (RuntimeError, KeyError, ValueError, AttributeError) as err:
        first = str(err).splitlines()[0][:300]
        raise ValueError(f'{path_label}: not {what} weights of the expected architecture ({first})') from None
    return model


def state_fingerprint(module):
    """First 16 hex digits of SHA-256 over the sorted names and float32 values of `module`'s state:
    reference statistics record it, so statistics of other weights are refused (metrics/reference.py)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
