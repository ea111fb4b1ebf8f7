"""ImageFolderDataset: images from a zip or a folder in EDM's dataset layout (checkpoint-format.md §4).

Items are `(uint8 CHW ndarray, float32 label vector)`; the label vector has length `label_dim`
(0 when unlabelled). Everything that can be checked cheaply is checked up front, so a bad dataset
fails before training starts with an error that names the offending file."""
import json
import os
import zipfile

import numpy as np
import PIL.Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def is_image_file(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(data, name):
    """Decode image bytes into a uint8 CHW array (grayscale stays 1 channel, RGBA/P become RGB)."""
    import io
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            if img.mode not in ('L', 'RGB'):
                img = img.convert('RGB')
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:
        raise ValueError(f'{name}: cannot decode image ({err.__class__.__name__}: {err})') from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.transpose(2, 0, 1)


def labels_to_array(raw_labels, source):
    """dataset.json labels → float32 [N, label_dim]: integers become one-hot, lists stay vectors."""
    try:
        arr = np.asarray(raw_labels)
    except Exception:
        raise ValueError(f'{source}: dataset.json labels are neither all integers nor equal-length lists') from None
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0:
            raise ValueError(f'{source}: dataset.json has a negative class label')
        onehot = np.zeros([arr.size, int(arr.max()) + 1], dtype=np.float32)
        onehot[np.arange(arr.size), arr] = 1
        return onehot
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.number):
        return arr.astype(np.float32)
    raise ValueError(f'{source}: dataset.json labels must be integers or equal-length lists of numbers')


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
            except (zipfile.BadZipFile, OSError) as err:
                raise ValueError(f'{self.path}: corrupt zip archive ({err})') from None
        else:
            raise FileNotFoundError(f'{self.path}: dataset path does not exist')
        self._all_names = set(names)
        self._image_names = sorted(n for n in names if is_image_file(n))
        if not self._image_names:
            raise ValueError(f'{self.path}: no image files ({", ".join(IMAGE_EXTENSIONS)}) found')

        self._raw_idx = np.arange(len(self._image_names), dtype=np.int64)
        if max_size is not None and len(self._raw_idx) > max_size:
            rnd = np.random.RandomState(random_seed)
            self._raw_idx = np.sort(rnd.choice(self._raw_idx, size=int(max_size), replace=False))
        self._raw_shape = self._check_shapes()
        self._labels = self._load_labels() if self._use_labels else None
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

    def _read_bytes(self, name):
        try:
            if self._type == 'dir':
                with open(os.path.join(self.path, name), 'rb') as f:
                    return f.read()
            return self._get_zipfile().read(name)
        except (zipfile.BadZipFile, OSError, KeyError) as err:
            raise ValueError(f'{self.path}: cannot read {name} ({err})') from None

    def _open_header(self, name):
        """Size and band count from the image header only (no full decode)."""
        import io
        try:
            with PIL.Image.open(io.BytesIO(self._read_bytes(name))) as img:
                channels = 1 if img.mode == 'L' else 3
                return channels, img.height, img.width
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f'{self.path}: {name} is not a readable image ({err.__class__.__name__}: {err})') from None

    def _check_shapes(self):
        shapes = {}
        for idx in self._raw_idx:
            name = self._image_names[idx]
            shape = self._open_header(name)
            if shapes and shape not in shapes:
                first_shape, first_name = next(iter(shapes.items()))
                raise ValueError(f'{self.path}: {name} has shape {shape} (channels, H, W) but {first_name} '
                                 f'has {first_shape}; all images must share size and channels')
            shapes.setdefault(shape, name)
        return [len(self._raw_idx), *next(iter(shapes))]

    def _load_labels(self):
        if 'dataset.json' not in self._all_names:
            raise ValueError(f'{self.path}: labels requested (use_labels / --cond) but there is no dataset.json')
        try:
            meta = json.loads(self._read_bytes('dataset.json'))
        except json.JSONDecodeError as err:
            raise ValueError(f'{self.path}: dataset.json is not valid JSON ({err})') from None
        labels = meta.get('labels') if isinstance(meta, dict) else None
        if labels is None:
            raise ValueError(f'{self.path}: labels requested but dataset.json has "labels": null')
        by_name = {str(n).replace('\\', '/'): lab for n, lab in labels}
        missing = [n for n in (self._image_names[i] for i in self._raw_idx) if n not in by_name]
        if missing:
            raise ValueError(f'{self.path}: dataset.json has no label for {missing[0]} '
                             f'({len(missing)} image(s) unlabelled)')
        return labels_to_array([by_name[self._image_names[i]] for i in self._raw_idx], f'{self.path}')

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
        return self._labels[idx % len(self._labels)].copy()

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
        return 0 if self._labels is None else self._labels.shape[1]

    @property
    def has_labels(self):
        return self._labels is not None

    def dataset_kwargs(self):
        """EDM's `dataset_kwargs` record (stored in snapshots)."""
        return dict(class_name='training.dataset.ImageFolderDataset', path=self.path, use_labels=self._use_labels,
                    xflip=self._xflip, cache=self._cache, resolution=self.resolution,
                    max_size=len(self._raw_idx) // (2 if self._xflip else 1))
