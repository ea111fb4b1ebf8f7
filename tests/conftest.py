import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures'
sys.path.insert(0, str(ROOT))
# One intra-op thread: tests are many small ops, and on a loaded 2-core machine two OpenMP threads per
# process wait on each other (measured 8-100x slower); subprocess tests (torchrun) also run 2 processes.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: runs the full-size FID Inception network (seconds on a CPU)')


@pytest.fixture(scope='session')
def fixtures_dir():
    """The real EDM/D2O checkpoints with golden outputs (../shared/fixtures), or skip."""
    path = FIXTURES / 'checkpoints'
    if not path.is_dir():
        pytest.skip(f'{path} not found: the shared fixtures are not checked out beside this repo')
    return path


@pytest.fixture(scope='session')
def synth_zip(tmp_path_factory):
    """A small labelled synth dataset (64 images, 32x32) shared by the tests that need data."""
    from dataset_tool import write_dataset
    from training.synth import synth_image
    path = tmp_path_factory.mktemp('data') / 'synth-32x32.zip'
    write_dataset((synth_image(0, i, 32) for i in range(64)), str(path), force=False, desc='test data')
    return path
