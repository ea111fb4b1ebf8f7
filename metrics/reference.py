"""Reference files for the metrics: one `.npz` per dataset holding every metric's statistics.

Three layouts are read (all with `allow_pickle=False`: a reference file never runs code):
- ours (`fid.py ref`): `mu`/`sigma` of Inception pool3 — EDM's layout (docs/checkpoint-format.md §5), so
  EDM's fid.py reads our files — plus `clip_mu`/`clip_sigma`, `dinov2_mu`/`dinov2_sigma` and
  `inception_features` [N, 2048] (precision/recall needs the reference points themselves) for the
  metrics asked for, and `d2o_meta`: a JSON string recording, per feature network, its protocol
  version and a fingerprint of its weights. Statistics whose version or weights differ from the
  network in use are refused: a CLIP-FID against statistics of other weights is meaningless;
- EDM's (`mu`, `sigma` only): Inception pool3 statistics, accepted for FID;
- guided-diffusion's reference batches (ADM, e.g. `VIRTUAL_imagenet64_labeled.npz`,
  docs/checkpoint-format.md §7): `arr_0` uint8 [N, H, W, 3] images, plus precomputed pool3 `mu`/`sigma`
  (and spatial `mu_s`/`sigma_s`, unused here). FID uses the precomputed statistics as ADM's evaluator
  does; every other metric runs our networks over `arr_0`."""
import json
import zipfile
import zlib

import numpy as np

from dnnlib import util
from metrics.inception import NUM_FEATURES
from metrics.scores import check_statistics
from torch_utils import npy_header, zip_members

STATS_KEYS = {'inception': ('mu', 'sigma'), 'clip': ('clip_mu', 'clip_sigma'), 'dinov2': ('dinov2_mu', 'dinov2_sigma')}
FEATURES_KEYS = {'inception': 'inception_features'}
META_KEY = 'd2o_meta'
ADM_IMAGES_KEY = 'arr_0'
FORMAT = 'd2o-metric-refs-1'
MAX_ARRAY_BYTES = 4 << 30  # the largest real reference, ADM's 256x256 batch (arr_0), holds 1.9 GB of images
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this (zlib's technical details)


def network_identity(network):
    """What a reference must have been computed with: the network's protocol version and weights."""
    return dict(version=network.version, weights=network.weights_id)


def save_reference(path, stats, identities, keep_features=(), extra_meta=None):
    """Write `stats` ({network name: EasyDict(mu, sigma, features)}) atomically; `identities` as
    `network_identity`; `keep_features`: names whose features are stored (precision/recall)."""
    arrays = {}
    for name, st in stats.items():
        mu_key, sigma_key = STATS_KEYS[name]
        arrays[mu_key], arrays[sigma_key] = np.asarray(st.mu, np.float64), np.asarray(st.sigma, np.float64)
        if name in keep_features:
            arrays[FEATURES_KEYS[name]] = st.features.cpu().numpy().astype(np.float32)
    meta = dict(format=FORMAT, networks={name: identities[name] for name in stats}, **(extra_meta or {}))
    arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    with util.atomic_write(path) as f:
        np.savez(f, **arrays)


class Reference:
    """The contents of one reference `.npz` (any of the three layouts), checked on access."""

    def __init__(self, path, arrays):
        self.path = path
        self.arrays = arrays
        self.meta = None
        if META_KEY in arrays:
            try:
                self.meta = json.loads(str(arrays[META_KEY]))
                assert self.meta['format'] == FORMAT and isinstance(self.meta['networks'], dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise ValueError(f'{path}: `{META_KEY}` is not a {FORMAT} record; recompute the file with '
                                 '`fid.py ref`') from None
        images = arrays.get(ADM_IMAGES_KEY)
        if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3)):
            raise ValueError(f'{path}: `{ADM_IMAGES_KEY}` must hold uint8 [N, H, W, 3] images (guided-diffusion '
                             f'reference batch), got {images.dtype} {list(images.shape)}')
        self.images = images
        if not any(key in arrays for key in (ADM_IMAGES_KEY, 'mu', 'clip_mu', 'dinov2_mu')):
            raise ValueError(f'{path}: no reference statistics (`mu`/`sigma`, EDM layout) and no images '
                             f'(`{ADM_IMAGES_KEY}`, guided-diffusion layout); found keys {sorted(arrays)}')

    def check_identity(self, name, identity):
        """Refuse statistics of another protocol version or other weights (`identity` None: not checked)."""
        if self.meta is None or identity is None:
            return
        recorded = self.meta['networks'].get(name)
        for field in ('version', 'weights'):
            if recorded is not None and recorded.get(field) != identity[field]:
                raise ValueError(f'{self.path}: its {name} statistics were computed with {field} '
                                 f'{recorded.get(field)!r}, but this run uses {identity[field]!r}; recompute '
                                 'the reference with `fid.py ref` and the same weights')

    def stats(self, name, identity):
        """(mu, sigma) for network `name`, or None when the file has none (then images must be used)."""
        mu_key, sigma_key = STATS_KEYS[name]
        if mu_key not in self.arrays:
            return None
        if self.meta is None and name != 'inception':
            raise ValueError(f'{self.path}: `{mu_key}` without a `{META_KEY}` record cannot be checked against '
                             'this run\'s network; recompute the reference with `fid.py ref`')
        self.check_identity(name, identity)
        if sigma_key not in self.arrays:
            raise ValueError(f'{self.path}: has `{mu_key}` but no `{sigma_key}`')
        for key in (mu_key, sigma_key):
            if self.arrays[key].dtype.kind != 'f':  # a complex or integer array is not statistics we wrote
                raise ValueError(f'{self.path}: `{key}` must be a real float array, got {self.arrays[key].dtype}')
        return check_statistics(self.arrays[mu_key], self.arrays[sigma_key], f'{self.path} ({mu_key}, {sigma_key})')

    def features(self, name, identity):
        key = FEATURES_KEYS.get(name)
        if key not in self.arrays:
            return None
        self.check_identity(name, identity)
        feats = self.arrays[key]
        if feats.ndim != 2 or not np.isfinite(feats).all():
            raise ValueError(f'{self.path}: `{key}` must be a finite [N, D] array, got {list(feats.shape)}')
        return feats


def is_reference_file(path):
    """True for a `.npz` (a zip of `.npy` members) — as opposed to a zip/folder of images."""
    if util.is_url(path):
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return bool(names) and all(name.endswith('.npy') for name in names)


def oversized_array(f):
    """The first `.npy` member whose declared shape needs more bytes than the archive can hold for it, as
    a message (None: all fit). Headers only: np.load allocates what a header declares (1 KB can declare 8 TB)."""
    with zipfile.ZipFile(f) as archive:
        size = zip_members.archive_bytes(archive)
        for info in archive.infolist():
            overrun = zip_members.compressed_overrun(info, size)
            if overrun:
                return f'{info.filename} {overrun}'
            available = info.file_size if info.compress_type == zipfile.ZIP_STORED else \
                min(info.file_size, DEFLATE_MAX_RATIO * info.compress_size + 1024)
            with archive.open(info) as member:
                try:
                    shape, _, declared = npy_header.declared_array(member)
                except ValueError as err:
                    return f'{info.filename} is {err}'
            if declared > min(available, MAX_ARRAY_BYTES):
                return (f'{info.filename} declares shape {list(shape)} ({declared:,} bytes), but the file holds '
                        f'{available:,} bytes for it (at most {MAX_ARRAY_BYTES:,} are read)')
    f.seek(0)
    return None


def read_arrays(f):
    with np.load(f) as data:
        if not hasattr(data, 'files'):
            raise ValueError('a single array, not an .npz archive')
        return {key: data[key] for key in data.files}


def load_reference(path_or_url):
    """A `Reference` from a local `.npz` or a URL (through the download cache); clear errors for
    missing, truncated or foreign files, and for headers declaring more than the file holds."""
    with util.open_url(path_or_url) as f:
        try:
            oversized = oversized_array(f)
            arrays = None if oversized else read_arrays(f)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, KeyError) as err:
            # (RuntimeError: zipfile's "encrypted, password required" and "compression method not supported")
            raise ValueError(f'{path_or_url}: not a readable reference .npz ({err.__class__.__name__}: '
                             f'{err})') from None
    if oversized:
        raise ValueError(f'{path_or_url}: {oversized}')
    return Reference(path_or_url, arrays)


def load_ref_stats(path_or_url, identity=None):
    """(mu, sigma) of Inception pool3 from an EDM-style `.npz` (path or URL), finite and 2048-dimensional;
    `identity` (`network_identity` of the detector in use), when given, must match the file's record."""
    ref = load_reference(path_or_url)
    mu_sigma = ref.stats('inception', identity)
    if mu_sigma is None:
        raise ValueError(f'{path_or_url}: not an FID reference .npz with `mu` and `sigma`')
    mu, sigma = mu_sigma
    if mu.shape != (NUM_FEATURES,):
        raise ValueError(f'{path_or_url}: expected mu [{NUM_FEATURES}] and sigma [{NUM_FEATURES}, {NUM_FEATURES}], '
                         f'got {list(mu.shape)} and {list(sigma.shape)}')
    return mu, sigma
