"""ImageFolderDataset: images from a zip or a folder in EDM's dataset layout (docs/checkpoint-format.md §4).

Items are `(uint8 CHW ndarray, float32 label vector)`; the label vector has length `label_dim`
(0 when unlabelled). Everything is checked up front, so a bad dataset fails before training starts
with an error that names the offending file: every image is decoded once (a truncated or corrupt file
is found here, not hours into a run; measured on one core: 1.1 s per 10,000 32x32 PNGs, headers only 0.6 s),
and dataset.json must hold [file name, label] pairs of one kind."""
import io
import json
import os
import stat
import warnings
import zipfile
import zlib

import numpy as np
import PIL.Image

from torch_utils import zip_members

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
MAX_IMAGE_BYTES = 64 << 20  # one image file (a 4096x4096 RGB BMP is 48 MB): a /dev/zero link or zip bomb is refused
MAX_JSON_BYTES = 1 << 30  # dataset.json: the labels of tens of millions of images
MAX_CLASSES = 100_000  # label_dim is the width of the network's class input; a stray 1e9 must not allocate GiBs

# Modes that become 8-bit gray (L) or RGB, and what the conversion drops (a warning once per mode and process);
# 16-bit gray is scaled separately.
_SIXTEEN_BIT_GRAY = ('I;16', 'I;16L', 'I;16B', 'I')
_TO_GRAY = {'1': None, 'L': None, 'LA': 'alpha dropped', 'La': 'alpha dropped'}
_TO_RGB = {'RGB': None, 'RGBX': None, 'P': 'palette expanded, transparency dropped', 'PA': 'alpha dropped',
           'RGBA': 'alpha dropped', 'RGBa': 'alpha dropped', 'CMYK': 'converted from CMYK',
           'YCbCr': 'converted from YCbCr', 'LAB': 'converted from LAB', 'HSV': 'converted from HSV'}
_warned_modes = set()


def is_image_file(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _warn_conversion(mode, what, name):
    if mode not in _warned_modes:
        _warned_modes.add(mode)
        warnings.warn(f'{name}: image mode {mode} converted to {"gray" if mode in _TO_GRAY else "RGB"} ({what}); '
                      f'further {mode} images are converted without a warning', stacklevel=3)


def _to_uint8(img, name):
    """8-bit gray or RGB pixels of an open PIL image. 16-bit gray is scaled (v / 257, nearest level: the
    8-bit value k stored in 16 bits is k * 257), not clipped, which would turn it white."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_GRAY:
        wide = np.asarray(img).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f'{name}: 32-bit integer pixels outside 0..65535; expected 8- or 16-bit images')
        return np.round(wide / 257).astype(np.uint8)
    if mode not in _TO_GRAY and mode not in _TO_RGB:
        raise ValueError(f'{name}: image mode {mode} is not supported; expected 8/16-bit gray, RGB, RGBA or palette')
    what = _TO_GRAY.get(mode) or _TO_RGB.get(mode)
    if what:
        _warn_conversion(mode, what, name)
    if mode not in ('L', 'RGB'):
        img = img.convert('L' if mode in _TO_GRAY else 'RGB')
    return np.asarray(img, dtype=np.uint8)


def decode_image(data, name):
    """Decode image bytes into a uint8 CHW array: gray (8/16-bit, LA) is 1 channel, everything else RGB.
    A truncated or corrupt file raises ValueError naming `name`."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            arr = _to_uint8(img, name)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
        if isinstance(err, ValueError) and str(err).startswith(f'{name}: '):  # ours, already naming the file
            raise
        raise ValueError(f'{name}: cannot decode image ({err.__class__.__name__}: {err})') from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.transpose(2, 0, 1)


def read_regular_file(path, name, limit=MAX_IMAGE_BYTES):
    """The bytes of `path` if it is a regular file (after symlinks) of at most `limit` bytes. Anything else is
    a ValueError naming `name`, raised before a byte is read: a FIFO would block, /dev/zero never ends."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f'{name}: not a regular file (a FIFO, device or socket?); expected an image file')
    with open(os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0)), 'rb') as f:  # swapped for a FIFO: no wait
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise ValueError(f'{name}: {info.st_size:,} bytes or not a regular file; expected an image file of at '
                             f'most {limit:,} bytes')
        data = f.read(info.st_size + 1)  # (not limit + 1: read(n) reserves n bytes up front)
    if len(data) > limit:
        raise ValueError(f'{name}: grew past {limit:,} bytes while being read')
    return data


def read_zip_member(archive, name, label, limit=MAX_IMAGE_BYTES):
    """A member of an open zip, its declared size checked first: a 3 MB member that inflates to GiBs is
    refused without inflating it (zipfile stops at the declared size)."""
    info = archive.getinfo(name)
    zip_members.check_member(archive, info, limit, label)
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as err:  # bad CRC or deflate stream, cut
        # short; RuntimeError: an encrypted member or a compression method zipfile lacks
        raise ValueError(f'{label}: corrupt zip member ({err})') from None


def check_label_names(image_names, by_name, source):
    """Every image has a label and every label names an image (a typo would otherwise drop it silently)."""
    missing = [n for n in image_names if n not in by_name]
    if missing:
        raise ValueError(f'{source}: dataset.json has no label for {missing[0]} ({len(missing)} image(s) unlabelled)')
    strays = sorted(set(by_name) - set(image_names))
    if strays:
        raise ValueError(f'{source}: dataset.json has a label for {strays[0]}, which is not an image of the dataset '
                         f'({len(strays)} such label(s))')


def read_labels_json(data, source):
    """dataset.json bytes → {image name: raw label}, or None for `"labels": null`."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; '[' * 10**5 nests too deep
        reason = 'nested too deeply' if isinstance(err, RecursionError) else err
        raise ValueError(f'{source}: dataset.json is not valid JSON ({reason})') from None
    return parse_label_pairs(meta, source)


def parse_label_pairs(meta, source):
    """dataset.json contents → {image name: raw label}, or None for `"labels": null` (unlabelled)."""
    if not isinstance(meta, dict):
        raise ValueError(f'{source}: dataset.json must be an object {{"labels": [[file name, label], ...]}}, '
                         f'got a {type(meta).__name__}')
    labels = meta.get('labels')
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise ValueError(f'{source}: dataset.json "labels" must be a list of [file name, label] pairs, '
                         f'got a {"dict" if isinstance(labels, dict) else type(labels).__name__}')
    for pair in labels:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f'{source}: dataset.json "labels" must be a list of [file name, label] pairs, '
                             f'found the entry {json.dumps(pair)[:80]}')
    by_name = {}
    for name, label in labels:
        name = name.replace('\\', '/')
        if name in by_name:
            raise ValueError(f'{source}: dataset.json lists {name} twice; expected one label per image')
        by_name[name] = label
    return by_name


def labels_to_array(names, raw_labels, source):
    """Validated labels of `names` (parallel list `raw_labels`): int64 class indices [N] (one-hot on access)
    or float32 vectors [N, D]. JSON bools, floats as classes, NaN/Inf, ragged or mixed labels are errors
    that start with `source` and name the image."""
    is_class = [type(label) is int for label in raw_labels]  # bool is not a class index
    if all(is_class):
        classes = np.asarray([max(-1, min(label, MAX_CLASSES)) for label in raw_labels], dtype=np.int64)
        for bad, why in ((classes < 0, 'is negative'), (classes >= MAX_CLASSES, f'is not below {MAX_CLASSES:,}')):
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f'{source}: class label {raw_labels[i]} of {names[i]} {why}')
        return classes
    expected = 'expected a class index (integer >= 0) for every image or a list of finite numbers for every image'
    if any(is_class):
        i, j = is_class.index(True), is_class.index(False)
        raise ValueError(f'{source}: label of {names[j]} is {json.dumps(raw_labels[j])[:80]} but {names[i]} has '
                         f'class index {raw_labels[i]}; {expected}')
    for name, label in zip(names, raw_labels):
        if not (isinstance(label, list) and all(type(v) in (int, float) for v in label) and all(np.isfinite(label))):
            raise ValueError(f'{source}: label of {name} is {json.dumps(label)[:80]}; {expected}')
    lengths = {len(label) for label in raw_labels}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f'{source}: label vectors must share one length > 0; found lengths {sorted(lengths)[:5]}')
    return np.asarray(raw_labels, dtype=np.float32).reshape(len(raw_labels), -1)


def label_dim_of(labels):
    """Length of the label vector for labels from `labels_to_array`."""
    return int(labels.max()) + 1 if labels.ndim == 1 else labels.shape[1]


class ImageFolderDataset:
    """EDM-compatible dataset over a zip archive or a folder of PNG/JPEG/WebP images.

    `resolution`: expected resolution (error if the data differs); `use_labels`: require and return
    labels from dataset.json; `xflip`: double the dataset with mirrored copies (second half);
    `max_size`: random subset (RandomState(random_seed)), kept in sorted order; `cache`: keep
    decoded images in RAM."""

    def __init__(self, path, resolution=None, use_labels=False, xflip=False, max_size=None, cache=False,
                 random_seed=0):
        self.path = os.fspath(path)
        self._use_labels = bool(use_labels)
        self._xflip = bool(xflip)
        self._cache = bool(cache)
        self._cached = {}
        self._zipfile = self._zipfile_pid = None
        if os.path.isdir(self.path):
            self._type = 'dir'
            names = [os.path.relpath(os.path.join(root, f), self.path).replace('\\', '/')
                     for root, _dirs, files in os.walk(self.path) for f in files]
        elif os.path.isfile(self.path):
            if not zipfile.is_zipfile(self.path):
                raise ValueError(f'{self.path}: not a zip archive or a folder of images')
            self._type = 'zip'
            try:
                names = self._get_zipfile().namelist()
            except (zipfile.BadZipFile, OSError, NotImplementedError, UnicodeDecodeError) as err:  # (a zip version
                # or a member name zipfile cannot read: fuzz findings)
                raise ValueError(f'{self.path}: corrupt zip archive ({err})') from None
        else:
            raise FileNotFoundError(f'{self.path}: dataset path does not exist')
        unprintable = next((n for n in names if not n.isprintable()), None)
        if unprintable is not None:  # (a newline in a name would split every message that names the file)
            raise ValueError(f'{self.path}: file name {ascii(unprintable)[:100]} has control characters; expected '
                             f'plain file names')
        self._all_names = set(names)
        self._image_names = sorted(n for n in names if is_image_file(n))
        if not self._image_names:
            raise ValueError(f'{self.path}: no image files ({", ".join(IMAGE_EXTENSIONS)}) found')

        self._raw_idx = np.arange(len(self._image_names), dtype=np.int64)
        if max_size is not None and len(self._raw_idx) > max_size:
            rnd = np.random.RandomState(random_seed)
            self._raw_idx = np.sort(rnd.choice(self._raw_idx, size=int(max_size), replace=False))
        self._labels, self._label_dim = self._load_labels() if self._use_labels else (None, 0)  # cheap checks first
        self._raw_shape = self._check_images()
        self._flip = np.zeros(len(self._raw_idx), dtype=bool)
        if self._xflip:
            self._raw_idx = np.concatenate([self._raw_idx, self._raw_idx])
            self._flip = np.concatenate([self._flip, np.ones_like(self._flip)])
        if resolution is not None and self.resolution != resolution:
            raise ValueError(f'{self.path}: images are {self._raw_shape[2]}x{self._raw_shape[1]}, '
                             f'expected resolution {resolution}')

    # --- file access -------------------------------------------------------------------------
    def _get_zipfile(self):
        # One handle per process: a forked DataLoader worker must not share the parent's file offset.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self.path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _read_bytes(self, name, limit=MAX_IMAGE_BYTES):
        label = f'{self.path}: {name}'
        try:
            if self._type == 'dir':
                return read_regular_file(os.path.join(self.path, name), label, limit)
            return read_zip_member(self._get_zipfile(), name, label, limit)
        except (zipfile.BadZipFile, OSError, KeyError) as err:
            raise ValueError(f'{self.path}: cannot read {name} ({err})') from None

    def _check_images(self):
        """Decode every selected image once: size, channels and readability are known before training."""
        first = None
        for idx in self._raw_idx:
            name = self._image_names[idx]
            image = decode_image(self._read_bytes(name), f'{self.path}: {name}')
            if first is None:
                first = image.shape, name
            elif image.shape != first[0]:
                raise ValueError(f'{self.path}: {name} has shape {image.shape} (channels, H, W) but {first[1]} '
                                 f'has {first[0]}; all images must share size and channels')
            if self._cache:  # decoded anyway: keep it when caching
                self._cached[int(idx)] = image
        return [len(self._raw_idx), *first[0]]

    def _load_labels(self):
        if 'dataset.json' not in self._all_names:
            raise ValueError(f'{self.path}: labels requested (use_labels / --cond) but there is no dataset.json')
        by_name = read_labels_json(self._read_bytes('dataset.json', MAX_JSON_BYTES), self.path)
        if by_name is None:
            raise ValueError(f'{self.path}: labels requested but dataset.json has "labels": null')
        check_label_names(self._image_names, by_name, self.path)
        # All images, as EDM does: a max_size subset keeps the dataset's label_dim.
        labels = labels_to_array(self._image_names, [by_name[n] for n in self._image_names],
                                 f'{self.path}: dataset.json')
        return labels[self._raw_idx], label_dim_of(labels)

    # --- dataset protocol --------------------------------------------------------------------
    def __len__(self):
        return len(self._raw_idx)

    def __getitem__(self, idx):
        raw = int(self._raw_idx[idx])
        image = self._cached.get(raw)
        if image is None:
            name = self._image_names[raw]
            image = decode_image(self._read_bytes(name), f'{self.path}: {name}')
            if list(image.shape) != self._raw_shape[1:]:
                raise ValueError(f'{self.path}: {name} decodes to shape {tuple(image.shape)}, '
                                 f'expected {tuple(self._raw_shape[1:])}')
            if self._cache:
                self._cached[raw] = image
        if self._flip[idx]:
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image), self.get_label(idx)

    def get_label(self, idx):
        if self._labels is None:
            return np.zeros([0], dtype=np.float32)
        label = self._labels[idx % len(self._labels)]
        if self._labels.ndim == 2:
            return label.copy()
        onehot = np.zeros([self._label_dim], dtype=np.float32)  # class indices: one-hot per item, not N x C
        onehot[label] = 1
        return onehot

    def image_name(self, idx):
        return self._image_names[int(self._raw_idx[idx])]

    def __getstate__(self):  # DataLoader workers reopen the zip themselves
        return dict(self.__dict__, _zipfile=None)

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
            self._zipfile = None

    # --- properties --------------------------------------------------------------------------
    @property
    def name(self):
        return os.path.splitext(os.path.basename(self.path.rstrip('/\\')))[0]

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self._raw_shape[1]

    @property
    def resolution(self):
        if self._raw_shape[2] != self._raw_shape[3]:
            raise ValueError(f'{self.path}: images are {self._raw_shape[3]}x{self._raw_shape[2]}, not square')
        return self._raw_shape[2]

    @property
    def label_dim(self):
        return self._label_dim

    @property
    def has_labels(self):
        return self._labels is not None

    def dataset_kwargs(self):
        """EDM's `dataset_kwargs` record (stored in snapshots)."""
        return dict(class_name='training.dataset.ImageFolderDataset', path=self.path, use_labels=self._use_labels,
                    xflip=self._xflip, cache=self._cache, resolution=self.resolution,
                    max_size=len(self._raw_idx) // (2 if self._xflip else 1))
