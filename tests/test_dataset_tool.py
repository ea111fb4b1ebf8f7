import io
import os
import pickle
import stat
import tarfile

import click
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset
from training.synth import NUM_CLASSES, synth_image


def run(*args):
    return CliRunner().invoke(dataset_tool.cli, list(args), catch_exceptions=False)


def test_folder_to_zip_round_trip_is_pixel_exact(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / 'src'
    images = {}
    for cls in ('cat', 'dog'):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            PIL.Image.fromarray(img).save(src / cls / f'{i}.png')
            images[f'{cls}/{i}.png'] = (img, ('cat', 'dog').index(cls))
    res = run('convert', f'--source={src}', f'--dest={tmp_path / "out.zip"}', '--folder-labels')
    assert res.exit_code == 0, res.output
    ds = ImageFolderDataset(tmp_path / 'out.zip', use_labels=True)
    assert len(ds) == 6 and ds.label_dim == 2
    for idx, (img, label) in enumerate(v for _, v in sorted(images.items())):
        got, onehot = ds[idx]
        np.testing.assert_array_equal(got, img.transpose(2, 0, 1))
        assert int(onehot.argmax()) == label
    assert ds.image_name(0) == '00000/img00000000.png'
    # zip -> folder keeps pixels and labels
    res = run('convert', f'--source={tmp_path / "out.zip"}', f'--dest={tmp_path / "copy"}')
    assert res.exit_code == 0, res.output
    copy = ImageFolderDataset(tmp_path / 'copy', use_labels=True)
    for i in range(6):
        np.testing.assert_array_equal(copy[i][0], ds[i][0])
        np.testing.assert_array_equal(copy[i][1], ds[i][1])


def test_resize_of_non_square_folder(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((50, 40, 3), 30 * i, np.uint8)).save(src / f'{i}.png')
    res = run('convert', f'--source={src}', f'--dest={tmp_path / "o.zip"}', '--resolution=32x32')
    assert res.exit_code == 0, res.output
    ds = ImageFolderDataset(tmp_path / 'o.zip')
    assert ds.resolution == 32 and len(ds) == 3 and int(ds[2][0][0, 5, 5]) == 60
    res = run('convert', f'--source={src}', f'--dest={tmp_path / "c.zip"}', '--resolution=16x16', '--transform=center-crop')
    assert res.exit_code == 0 and ImageFolderDataset(tmp_path / 'c.zip').resolution == 16


def test_mixed_sizes_without_resize_fail(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / 'a.png')
    PIL.Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(src / 'b.png')
    res = CliRunner().invoke(dataset_tool.cli, ['convert', f'--source={src}', f'--dest={tmp_path / "x.zip"}'])
    assert res.exit_code != 0 and '--resolution' in res.output
    assert not (tmp_path / 'x.zip').exists()  # nothing half-written


def _mini_cifar_tarball(path, per_batch=4):
    """Five training batches and a test batch of random images; returns (training, test) [(CHW, label)]."""
    rng = np.random.default_rng(3)
    expected = {'train': [], 'test': []}
    with tarfile.open(path, 'w:gz') as tar:
        for name in [f'data_batch_{b}' for b in range(1, 6)] + ['test_batch']:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, per_batch)]
            payload = pickle.dumps({'data': data, 'labels': labels}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            expected['test' if name == 'test_batch' else 'train'] += [(d.reshape(3, 32, 32), l)
                                                                      for d, l in zip(data, labels)]
    return expected['train'], expected['test']


@pytest.mark.parametrize('split', ['train', 'test'])
def test_cifar10_tarball_converts_with_pixels_and_labels(tmp_path, split):
    train, test = _mini_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz')
    expected = train if split == 'train' else test
    res = run('convert', f'--source={tmp_path / "cifar-10-python.tar.gz"}', f'--dest={tmp_path / "c.zip"}',
              f'--split={split}')
    assert res.exit_code == 0, res.output
    ds = ImageFolderDataset(tmp_path / 'c.zip', use_labels=True)
    assert len(ds) == len(expected) == (20 if split == 'train' else 4)
    for i, (img, label) in enumerate(expected):
        np.testing.assert_array_equal(ds[i][0], img)
        assert int(ds[i][1].argmax()) == label


def test_split_is_refused_for_folders(tmp_path):
    (tmp_path / 'src').mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'src' / 'a.png')
    res = CliRunner().invoke(dataset_tool.cli, ['convert', f'--source={tmp_path / "src"}', '--split=test',
                                                f'--dest={tmp_path / "x.zip"}'])
    assert res.exit_code == 1 and '--split=test applies to --source=mnist and the CIFAR-10 tarball only' in res.output


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    path = tmp_path / 'evil.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        payload = pickle.dumps({'data': Evil(), 'labels': []}, protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(pickle.UnpicklingError, match='print'):
        list(dataset_tool.iterate_cifar10(path))


@pytest.mark.parametrize('batch', [np.zeros((2, 3072), np.uint8), {'data': [[2 ** 70] * 3072], 'labels': [0]}],
                         ids=['array', 'huge-int'])
def test_cifar_batch_of_the_wrong_kind_is_one_clear_error(tmp_path, batch):
    """A batch pickling a bare array instead of {"data", "labels"}, or integers too large for uint8 (both found
    by the fuzzing harness, as IndexError / OverflowError tracebacks)."""
    path = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        payload = pickle.dumps(batch, protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/test_batch')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(click.ClickException) as err:
        list(dataset_tool.iterate_cifar10(path, split='test'))
    assert err.value.message == (f'{path}: cifar-10-batches-py/test_batch is not a CIFAR-10 batch (a dict of '
                                 f'"data": N x 3072 bytes and N "labels")')


def test_synth_is_deterministic_balanced_and_refuses_overwrite(tmp_path):
    args = ['synth', '--num=100', '--resolution=32', '--seed=3']
    assert run(*args, f'--dest={tmp_path / "a.zip"}').exit_code == 0
    assert run(*args, f'--dest={tmp_path / "b.zip"}').exit_code == 0
    assert (tmp_path / 'a.zip').read_bytes() == (tmp_path / 'b.zip').read_bytes()
    res = CliRunner().invoke(dataset_tool.cli, args + [f'--dest={tmp_path / "a.zip"}'])
    assert res.exit_code != 0 and '--force' in res.output
    ds = ImageFolderDataset(tmp_path / 'a.zip', use_labels=True)
    counts = np.bincount([int(ds[i][1].argmax()) for i in range(len(ds))], minlength=NUM_CLASSES)
    assert ds.label_dim == NUM_CLASSES and counts.tolist() == [10] * NUM_CLASSES
    # Different seeds give different images; images have real structure (not flat).
    img_a, _ = synth_image(3, 0, 32)
    img_b, _ = synth_image(4, 0, 32)
    assert not np.array_equal(img_a, img_b)
    assert img_a.std() > 10


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_dataset_folder_gets_the_mode_of_a_plain_mkdir(tmp_path, umask):
    old = os.umask(umask)
    try:
        res = run('synth', f'--dest={tmp_path / "out"}', '--num=2', '--resolution=8')
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(os.stat(tmp_path / 'out').st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
