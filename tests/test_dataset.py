import json
import zipfile

import numpy as np
import PIL.Image
import pytest

from training.dataset import ImageFolderDataset


def _write_folder(root, images, labels=None):
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f'{i:03d}.png'
        PIL.Image.fromarray(img).save(root / name)
        names.append(name)
    if labels is not None:
        (root / 'dataset.json').write_text(json.dumps({'labels': [[n, int(l)] for n, l in zip(names, labels)]}))
    return names


def test_folder_items_labels_and_properties(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    _write_folder(tmp_path / 'd', images, labels=[0, 2, 1, 2, 0])
    ds = ImageFolderDataset(tmp_path / 'd', use_labels=True)
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim, ds.has_labels, ds.name) == (5, 8, 3, 3, True, 'd')
    img, label = ds[1]
    assert img.dtype == np.uint8 and img.shape == (3, 8, 8)
    np.testing.assert_array_equal(img, images[1].transpose(2, 0, 1))
    np.testing.assert_array_equal(label, [0, 0, 1])
    assert label.dtype == np.float32
    # Without use_labels the label vector is empty.
    assert ImageFolderDataset(tmp_path / 'd')[0][1].shape == (0,)


def test_xflip_and_max_size(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(6)]
    _write_folder(tmp_path / 'd', images)
    ds = ImageFolderDataset(tmp_path / 'd', xflip=True)
    assert len(ds) == 12
    np.testing.assert_array_equal(ds[6 + 2][0], images[2].transpose(2, 0, 1)[:, :, ::-1])
    sub = ImageFolderDataset(tmp_path / 'd', max_size=3, random_seed=5)
    again = ImageFolderDataset(tmp_path / 'd', max_size=3, random_seed=5)
    assert len(sub) == 3
    assert [sub.image_name(i) for i in range(3)] == [again.image_name(i) for i in range(3)]
    assert [sub.image_name(i) for i in range(3)] == sorted(sub.image_name(i) for i in range(3))


def test_subset_keeps_the_label_dim_of_the_whole_dataset(tmp_path):
    # EDM sizes the one-hot vector from every label in dataset.json, not from the images a max_size subset keeps.
    _write_folder(tmp_path / 'd', [np.full((4, 4, 3), i, np.uint8) for i in range(6)], labels=[0, 1, 0, 1, 0, 7])
    for seed in range(4):
        sub = ImageFolderDataset(tmp_path / 'd', use_labels=True, max_size=2, random_seed=seed)
        assert sub.label_dim == 8
        for i in range(2):
            assert int(sub[i][1].argmax()) == [0, 1, 0, 1, 0, 7][int(sub.image_name(i)[:3])]


def test_grayscale_is_one_channel(tmp_path):
    _write_folder(tmp_path / 'g', [np.full((4, 4), 7, np.uint8)] * 2)
    ds = ImageFolderDataset(tmp_path / 'g')
    assert ds.num_channels == 1 and ds[0][0].shape == (1, 4, 4) and int(ds[0][0][0, 0, 0]) == 7


def test_mixed_sizes_name_the_file(tmp_path):
    _write_folder(tmp_path / 'm', [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match='001.png'):
        ImageFolderDataset(tmp_path / 'm')


def test_missing_labels_are_an_error(tmp_path):
    _write_folder(tmp_path / 'n', [np.zeros((4, 4, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match='no dataset.json'):
        ImageFolderDataset(tmp_path / 'n', use_labels=True)
    (tmp_path / 'n' / 'dataset.json').write_text(json.dumps({'labels': [['000.png', 1]]}))
    with pytest.raises(ValueError, match='001.png'):
        ImageFolderDataset(tmp_path / 'n', use_labels=True)


def test_corrupt_zip_and_corrupt_image_name_the_file(tmp_path):
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'PK\x03\x04 this is not really a zip' + b'\0' * 64)
    with pytest.raises(ValueError, match='bad.zip'):
        ImageFolderDataset(bad)
    broken = tmp_path / 'broken.zip'
    with zipfile.ZipFile(broken, 'w') as zf:
        zf.writestr('00000/img00000000.png', b'\x89PNG garbage')
    with pytest.raises(ValueError, match='img00000000.png'):
        ImageFolderDataset(broken)


def test_resolution_mismatch(tmp_path):
    _write_folder(tmp_path / 'r', [np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match='expected resolution 8'):
        ImageFolderDataset(tmp_path / 'r', resolution=8)


def test_missing_path():
    with pytest.raises(FileNotFoundError, match='does-not-exist'):
        ImageFolderDataset('/does-not-exist.zip')


def test_forked_dataloader_workers_read_the_zip_correctly(synth_zip):
    # Workers forked after the dataset opened its zip must not share the parent's file handle.
    import torch
    ds = ImageFolderDataset(synth_zip)
    expected = np.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=3, multiprocessing_context='fork')
    for _ in range(3):
        got = np.concatenate([images.numpy() for images, _ in loader])
        np.testing.assert_array_equal(got, expected)
