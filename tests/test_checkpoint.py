"""training/checkpoint.py: safe loading of real EDM/D2O snapshots, refusal of code in pickles, our own
snapshots and training states (teacher transfer: tests/test_generator.py)."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import checkpoint, networks

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures' / 'checkpoints'
EDM_FIXTURES = ['edm_vp_ddpmpp_cond16', 'edm_ve_ncsnpp_uncond16', 'edm_edm_ncsnpp_uncond32', 'edm_edm_adm_cond16',
                'edm_iddpm_adm_uncond16']
D2O_FIXTURES = ['d2o_ncsnpp_uncond16', 'd2o_adm_cond16']
TINY = dict(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], dropout=0.0, embedding_type='fourier', encoder_type='residual',
            channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
TOLERANCE = 1e-5  # relative to max |golden| (fixtures README)


def fixture(name):
    pkl = FIXTURES / f'{name}.pkl'
    if not pkl.is_file():
        pytest.skip(f'fixture {pkl} not found')
    return pkl, np.load(FIXTURES / f'{name}.npz')


def relative_error(y, golden):
    return float(np.abs(y.detach().double().numpy() - golden).max() / np.abs(golden).max())


@pytest.mark.parametrize('name', EDM_FIXTURES + D2O_FIXTURES)
def test_fixture_loads_safely_and_matches_golden(name):
    pkl, golden = fixture(name)
    snapshot = checkpoint.load_snapshot(pkl)
    labels = torch.from_numpy(golden['class_labels']) if 'class_labels' in golden else None
    extra = dict(augment_labels=torch.from_numpy(golden['augment_labels'])) if 'augment_labels' in golden else {}
    ema = snapshot['ema']
    assert type(ema) is getattr(networks, type(ema).__name__) and not ema.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in ema.parameters())
    y = ema(torch.from_numpy(golden['x']), torch.from_numpy(golden['sigma']), class_labels=labels, **extra)
    assert relative_error(y, golden['y']) < TOLERANCE
    if name in D2O_FIXTURES:
        z = torch.from_numpy(golden['z'])
        sigma = torch.full([z.shape[0], 1, 1, 1], 80.0, dtype=torch.float64)  # the official one-step call
        for key in ('ema', 'net'):
            net = checkpoint.load_network(pkl, key=key) if key == 'net' else ema
            y = net(z * 80, sigma, class_labels=labels, augment_labels=None)
            assert relative_error(y, golden[f'y_onestep_{key}']) < TOLERANCE
        assert not torch.equal(snapshot['net'].model.map_layer0.weight, ema.model.map_layer0.weight)
    else:
        # Non-network persistent objects stay inert records; nothing of their code runs.
        assert isinstance(snapshot['loss_fn'], checkpoint.PersistentRecord)
        assert snapshot['loss_fn'].class_name == 'EDMLoss' and snapshot['loss_fn'].state['P_mean'] == -1.2
        assert snapshot['augment_pipe'] is None or snapshot['augment_pipe'].class_name == 'AugmentPipe'
    assert snapshot['dataset_kwargs']['class_name'] == 'training.dataset.ImageFolderDataset'


def test_load_network_names_missing_key():
    pkl, _ = fixture('edm_ve_ncsnpp_uncond16')
    with pytest.raises(KeyError, match=r"no 'net'.*'ema'"):
        checkpoint.load_network(pkl, key='net')


def test_unsafe_mode_uses_original_code_semantics():
    # The escape hatch execs the embedded (here: trusted, original) source; we convert to our classes after.
    pkl, golden = fixture('d2o_adm_cond16')
    net = checkpoint.load_network(pkl, allow_unsafe_pickle=True)
    assert type(net) is networks.D2OPrecond
    y = net(torch.from_numpy(golden['x']), torch.from_numpy(golden['sigma']), class_labels=torch.from_numpy(golden['class_labels']))
    assert relative_error(y, golden['y']) < TOLERANCE


def test_unsafe_mode_runs_edm_augment_pipe():
    # EDM snapshots carry an AugmentPipe whose embedded source imports torch_utils.misc.
    pkl, _ = fixture('edm_edm_ncsnpp_uncond32')
    snap = checkpoint.load_snapshot(pkl, allow_unsafe_pickle=True)
    assert type(snap['augment_pipe']).__name__ == 'AugmentPipe'
    torch.manual_seed(0)
    images, labels = snap['augment_pipe'](torch.zeros(2, 3, 32, 32))
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 9)
    # In safe mode the same object is an inert record.
    assert isinstance(checkpoint.load_snapshot(pkl)['augment_pipe'], checkpoint.PersistentRecord)


class ShellCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f'touch {self.path}',)


class EmbeddedSource:
    """Pickles as EDM's persistence call with a module source that writes a file when exec'd."""

    def __init__(self, path, class_name, state):
        self.meta = dict(type='class', version=6, class_name=class_name, state=state,
                         module_src=f'open({str(path)!r}, "w").write("pwned")\nclass {class_name}:\n    pass\n')

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)


def test_pickle_running_a_shell_command_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'ema': ShellCommand(marker)}))
    with pytest.raises(pickle.UnpicklingError, match=r'global posix\.system is not allowed.*allow_unsafe_pickle=True'):
        checkpoint.load_snapshot(path)
    assert not marker.exists()
    torch.save({'net': ShellCommand(marker)}, tmp_path / 'evil.pt')  # zip (training-state) path too
    with pytest.raises(pickle.UnpicklingError, match=r'evil\.pt: global posix\.system is not allowed'):
        checkpoint.load_snapshot(tmp_path / 'evil.pt')
    assert not marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = tmp_path / 'pwned'
    real = networks.D2OPrecond(**TINY).eval()
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'ema': EmbeddedSource(marker, 'D2OPrecond', real.__getstate__()),
                                   'loss_fn': EmbeddedSource(marker, 'Evil', {'p': 1})}))
    snapshot = checkpoint.load_snapshot(path)
    assert not marker.exists()
    assert type(snapshot['ema']) is networks.D2OPrecond  # rebuilt from our code, not the embedded one
    assert torch.equal(snapshot['ema'].model.map_noise.freqs, real.model.map_noise.freqs)
    assert snapshot['loss_fn'].class_name == 'Evil' and snapshot['loss_fn'].state == {'p': 1}
    # The escape hatch does run it (this is the documented risk).
    path.write_bytes(pickle.dumps({'loss_fn': EmbeddedSource(marker, 'Evil', {'p': 1})}))
    assert checkpoint.load_snapshot(path, allow_unsafe_pickle=True)['loss_fn'].p == 1
    assert marker.read_text() == 'pwned'


def test_numpy_1_scalar_path_and_protocol_2_bytes(tmp_path):
    # NumPy 1 writes numpy.core.multiarray.scalar (NumPy 2: numpy._core); protocol 2 writes bytes via _codecs.
    data = pickle.dumps({'skip_scale': np.float64(0.5) ** 0.5}, protocol=2)
    assert b'numpy._core.multiarray\nscalar' in data and b'_codecs\nencode' in data
    (tmp_path / 'np1.pkl').write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    assert checkpoint.load_snapshot(tmp_path / 'np1.pkl') == {'skip_scale': np.float64(0.5) ** 0.5}


def test_architecture_attributes_names_and_shapes_are_checked(tmp_path):
    def load_with(net, init_kwargs=TINY):
        state = dict(net.__getstate__(), _init_kwargs=init_kwargs)
        path = tmp_path / 'wrong.pkl'
        path.write_bytes(pickle.dumps({'ema': EmbeddedSource(tmp_path / 'x', 'D2OPrecond', state)}))
        return checkpoint.load_snapshot(path)

    net = networks.D2OPrecond(**TINY)
    with pytest.raises(ValueError, match=r'wrong.pkl: attribute model\.map_layer0\.in_features is 32 in the checkpoint but 64'):
        load_with(net, dict(TINY, model_channels=32))
    net.model.map_layer0.weight = torch.nn.Parameter(torch.zeros(64, 31))
    with pytest.raises(ValueError, match=r'wrong shape .*model\.map_layer0\.weight \(64, 31\) \(expected \(64, 32\)\)'):
        load_with(net)
    del net.model.map_noise._buffers['freqs']
    with pytest.raises(ValueError, match=r"missing \['model\.map_noise\.freqs'\]"):
        load_with(net)


def test_own_snapshot_roundtrip_safe_and_in_plain_subprocess(tmp_path):
    torch.manual_seed(0)
    net = networks.EDMPrecond(**dict(TINY, label_dim=4, augment_dim=9)).train()
    with torch.no_grad():
        net.model.dec['16x16_aux_conv'].weight.normal_()
    path = tmp_path / 'network-snapshot-000000.pkl'
    checkpoint.save_snapshot(path, dict(ema=net, augment_pipe=None, dataset_kwargs=dict(resolution=16)))
    assert net.training and net.model.map_layer0.weight.requires_grad  # the caller's module is untouched
    x, labels = torch.randn(2, 3, 16, 16), torch.eye(4)[:2]
    expected = net.eval()(x, torch.tensor([0.3, 7.0]), labels)

    loaded = checkpoint.load_network(path)
    assert torch.equal(loaded(x, torch.tensor([0.3, 7.0]), labels), expected)
    assert loaded._init_kwargs == net._init_kwargs

    np.savez(tmp_path / 'io.npz', x=x.numpy(), labels=labels.numpy())
    script = (f'import pickle, sys, numpy as np, torch; sys.path.insert(0, {str(REPO)!r})\n'
              f'net = pickle.load(open({str(path)!r}, "rb"))["ema"]\n'
              f'assert "training.networks" not in sys.modules and type(net).__module__.startswith("_imported_module_")\n'
              f'd = np.load({str(tmp_path / "io.npz")!r})\n'
              f'y = net(torch.from_numpy(d["x"]), torch.tensor([0.3, 7.0]), torch.from_numpy(d["labels"]))\n'
              f'np.save({str(tmp_path / "y.npy")!r}, y.numpy())\n')
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, timeout=120)
    assert np.array_equal(np.load(tmp_path / 'y.npy'), expected.detach().numpy())


def test_cpu_copy_is_one_detached_eval_copy_with_ties_kept():
    torch.manual_seed(0)
    net = networks.EDMPrecond(**TINY).train()
    net.model.tied = net.model.map_layer0  # a module reached twice stays one module in the copy
    snap = checkpoint.cpu_copy(net)
    assert net.training and all(p.requires_grad for p in net.parameters())  # the live network is untouched
    assert not snap.training and not any(p.requires_grad for p in snap.parameters())
    assert snap.model.tied is snap.model.map_layer0
    live, copied = net.state_dict(keep_vars=True), snap.state_dict(keep_vars=True)
    assert live.keys() == copied.keys()
    for name, value in live.items():
        assert torch.equal(value, copied[name]) and value.data_ptr() != copied[name].data_ptr()
        assert type(copied[name]) is type(value) and copied[name].device.type == 'cpu'


def test_constructor_record_and_state_dict_load_with_weights_only(tmp_path):
    net = networks.D2OPrecond(**dict(TINY, use_fp16=True))
    record = checkpoint.network_constructor_record(net)
    assert record == dict(class_name='D2OPrecond', init_args=[], init_kwargs=dict(TINY, use_fp16=True))
    torch.save(dict(net=record, net_state=net.state_dict()), tmp_path / 'state.pt')
    data = torch.load(tmp_path / 'state.pt', weights_only=True)
    rebuilt = checkpoint.build_network(data['net'])
    rebuilt.load_state_dict(data['net_state'])
    x = torch.randn(1, 3, 16, 16)
    assert type(rebuilt) is networks.D2OPrecond and torch.equal(rebuilt.eval()(x, 2.0), net.eval()(x, 2.0))
    with pytest.raises(ValueError, match="unknown network class 'Evil'"):
        checkpoint.build_network(dict(class_name='Evil'))


def test_original_training_state_zip_loads_safely(tmp_path):
    net = networks.D2OPrecond(**TINY).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.0, 0.99))
    net(torch.randn(1, 3, 16, 16), 80.0).mean().backward()
    optimizer.step()
    torch.save(dict(net=net, optimizer_state=optimizer.state_dict()), tmp_path / 'training-state-000010.pt')
    state = checkpoint.load_snapshot(tmp_path / 'training-state-000010.pt')
    assert type(state['net']) is networks.D2OPrecond
    assert torch.equal(state['net'].model.map_layer0.weight, net.model.map_layer0.weight)
    assert state['optimizer_state']['param_groups'][0]['betas'] == (0.0, 0.99)
