"""Hostile files at every loading entry point (issue 12.1, 12.8): a TorchScript archive whose code writes a file
when loaded, pickles that call os.system, truncated and wrong-kind files. Each must give a clear message naming
the file and run nothing."""
import os
import pickle
import warnings
from typing import Tuple

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
from metrics import detector
from pg_modules import class_embedding
from training import checkpoint, generator
from training.config import make_config


class WritesOnLoad(torch.nn.Module):
    """TorchScript proof of concept: `__setstate__` is compiled code that runs inside torch.jit.load and creates
    `path` through aten::from_file (shared=True creates the file)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.buffer = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.buffer = torch.from_file(self.path, shared=True, size=1)

    def forward(self, x):
        return x + self.buffer


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture
def torchscript_poc(tmp_path):
    """(archive path, marker path); the archive really runs its code under torch.jit.load (checked here)."""
    marker, archive = tmp_path / 'pwned', tmp_path / 'network.pkl'  # the name of a snapshot, to look harmless
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), str(archive))
        assert not marker.exists()
        torch.jit.load(str(archive))
    assert marker.exists(), 'the proof of concept must be live: torch.jit.load runs its code'
    marker.unlink()
    return archive, marker


def test_torch_load_would_run_the_archive(torchscript_poc):
    # What checkpoint.py did before (torch.load with weights_only=False hands TorchScript to torch.jit.load).
    archive, marker = torchscript_poc
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.load(archive, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('unsafe', [False, True], ids=['safe', 'allow_unsafe_pickle'])
def test_checkpoint_loaders_refuse_torchscript(torchscript_poc, unsafe):
    archive, marker = torchscript_poc
    for load in (checkpoint.load_snapshot, checkpoint.load_network):
        with pytest.raises(pickle.UnpicklingError, match=f'^{archive}: is a TorchScript archive'):
            load(archive, allow_unsafe_pickle=unsafe)
    assert not marker.exists()


def test_generate_refuses_torchscript(torchscript_poc, tmp_path):
    archive, marker = torchscript_poc
    result = CliRunner().invoke(generate.main, [f'--network={archive}', f'--outdir={tmp_path / "out"}'])
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert lines == [f'Error: --network: {archive}: is a TorchScript archive (it has code/ and '
                     f'constants.pkl members); refusing it: loading TorchScript runs the code inside the file. '
                     f'Expected a pickle or a torch.save file of tensors and plain data']
    assert not marker.exists() and not (tmp_path / 'out').exists()


def test_transfer_refuses_torchscript(torchscript_poc):
    archive, marker = torchscript_poc
    cfg = make_config(transfer=str(archive), data='d.zip')
    with pytest.raises(ValueError, match=f'^--transfer: {archive}: is a TorchScript archive'):
        generator.build_generator(cfg, dnnlib.EasyDict(resolution=16, num_channels=3, label_dim=0), lambda m: None)
    assert not marker.exists()


def test_class_embedding_refuses_torchscript(torchscript_poc, tmp_path):
    archive, marker = torchscript_poc
    os.link(archive, tmp_path / 'embed.pt')
    with pytest.raises(ValueError, match=f'class embedding {archive}: is a TorchScript archive'):
        class_embedding.load_class_embedding(archive)
    with pytest.raises(ValueError, match=r'embed\.pt: is a TorchScript archive'):
        class_embedding.load_class_embedding(tmp_path / 'embed.pt')
    assert not marker.exists()


def test_detector_reads_torchscript_data_only(torchscript_poc):
    archive, marker = torchscript_poc  # fid-helper ships its Inception as TorchScript: data.pkl only, no code
    with pytest.raises(ValueError, match=f'{archive}: no FID Inception weights found'):
        detector.read_detector_state_dict(archive)
    assert not marker.exists()


def test_code_in_pickles_is_refused_everywhere(tmp_path):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pkl'
    evil.write_bytes(pickle.dumps({'ema': RunsCommand(marker), 'embed': RunsCommand(marker)}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=f'^{evil}: global posix.system is not allowed'):
        checkpoint.load_network(evil)
    with pytest.raises(ValueError, match=f'^class embedding {evil}: global posix.system is not allowed'):
        class_embedding.load_class_embedding(evil)
    result = CliRunner().invoke(generate.main, [f'--network={evil}', f'--grid={tmp_path / "g.png"}'])
    assert result.exit_code == 1 and 'global posix.system is not allowed' in result.output
    assert not marker.exists()


def test_truncated_and_wrong_kind_files_name_the_file(tmp_path):
    real = tmp_path / 'real.pkl'
    checkpoint.save_snapshot(real, dict(ema=None, dataset_kwargs=dict(resolution=16), weights=torch.ones(1000)))
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(real.read_bytes()[:-100])
    state = tmp_path / 'training-state.pt'
    torch.save({'G': {'w': torch.ones(2)}}, state)
    with pytest.raises(pickle.UnpicklingError, match=f'^{truncated}: the file ends early'):
        checkpoint.load_snapshot(truncated)
    with pytest.raises(ValueError, match=f"^{real}: 'ema' is None, not one of the networks"):
        checkpoint.load_network(real)
    with pytest.raises(KeyError, match=f"{state}: snapshot has no 'ema'; it holds \\['G'\\]"):
        checkpoint.load_network(state)
    torch.save({'G': {'w': torch.ones(2)}, 'G_record': {}}, state)  # the loop's own training state
    with pytest.raises(KeyError, match='training state of train.py: sample from a network-snapshot'):
        checkpoint.load_network(state)
    with pytest.raises(ValueError, match=f'^class embedding {truncated}: the file ends early'):
        class_embedding.load_class_embedding(truncated)
    with pytest.raises(ValueError, match=f'^{truncated}: cannot read FID Inception weights'):
        detector.read_detector_state_dict(truncated)
