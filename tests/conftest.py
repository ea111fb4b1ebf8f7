import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures'
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
