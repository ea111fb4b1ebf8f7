"""training/generator.py: G built from explicit fields — architecture tables and checks, preconditioner choice
(logged), use_fp16 from --precision (not the teacher), teacher → generator transfer."""
import numpy as np
import pytest
import torch

import dnnlib
from training import checkpoint, generator, networks
from training.config import make_config

TINY = dict(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], dropout=0.0, embedding_type='fourier', encoder_type='residual',
            channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
DATA16 = dnnlib.EasyDict(resolution=16, num_channels=3, label_dim=0)


def fixture(fixtures_dir, name):
    return fixtures_dir / f'{name}.pkl', np.load(fixtures_dir / f'{name}.npz')


def _teacher(tmp_path, cls=networks.EDMPrecond, **kwargs):
    """A tiny teacher snapshot on disk (as EDM writes it), with non-trivial weights."""
    torch.manual_seed(1)
    net = cls(**dict(TINY, **kwargs))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / 'teacher.pkl'
    checkpoint.save_snapshot(path, dict(ema=net, dataset_kwargs=dict(resolution=16)))
    return path, net


def test_arch_tables_and_options():
    cfg = make_config(arch='adm', cbase=64, cres=[1, 2])
    assert generator.arch_kwargs(cfg) == dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2])
    assert generator.arch_kwargs(make_config())['embedding_type'] == 'fourier'  # default ncsnpp
    generator.arch_kwargs(make_config(arch='ddpmpp'))['channel_mult'].append(9)  # a copy: the table is untouched
    assert generator.ARCHS['ddpmpp']['channel_mult'] == [2, 2, 2]


def test_check_arch_matches_names_each_clash():
    recorded = dict(TINY)
    generator.check_arch_matches(make_config(transfer='t.pkl'), recorded)  # nothing given: the teacher decides
    generator.check_arch_matches(make_config(transfer='t.pkl', cbase=16, cres=[1, 2]), recorded)
    with pytest.raises(ValueError, match=r'--transfer=t\.pkl: .*model_channels: option 32 vs checkpoint 16'):
        generator.check_arch_matches(make_config(transfer='t.pkl', cbase=32), recorded)
    with pytest.raises(ValueError, match=r'model_type: option DhariwalUNet vs checkpoint SongUNet'):
        generator.check_arch_matches(make_config(transfer='t.pkl', arch='adm'), recorded)


def test_preconditioner_choice_is_explicit():
    assert generator.choose_preconditioner(make_config())[0] == 'd2o'
    assert generator.choose_preconditioner(make_config(precond='edm'))[0] == 'edm'
    name, reason = generator.choose_preconditioner(make_config(loss='edm'))
    assert name == 'edm' and '--loss=edm' in reason and 'D2OPrecond' in reason
    assert generator.choose_preconditioner(make_config(loss='vp', precond='vp'))[0] == 'vp'
    with pytest.raises(ValueError, match='--precond=x: expected one of d2o, edm, vp, ve'):
        generator.choose_preconditioner(make_config(precond='x'))
    with pytest.raises(ValueError, match='--precision=fp16: expected fp32 or bf16'):
        generator.use_fp16_for(make_config(precision='fp16'))


@pytest.mark.parametrize('precision, expected', [('fp32', False), ('bf16', True)])
def test_use_fp16_comes_from_precision_not_the_teacher(tmp_path, precision, expected):
    path, teacher = _teacher(tmp_path, use_fp16=not expected)  # the teacher says the opposite
    logged = []
    G = generator.build_generator(make_config(transfer=str(path), precision=precision, data='d.zip'), DATA16,
                                  logged.append)
    assert type(G) is networks.D2OPrecond and G.use_fp16 is expected and G._init_kwargs['use_fp16'] is expected
    assert any(f'use_fp16={expected} from --precision={precision}' in line for line in logged)
    assert any(f'teacher was saved with use_fp16={not expected}' in line for line in logged)
    # Every teacher tensor arrives unchanged; the transfer summary is logged.
    G_state = G.state_dict()
    assert all(torch.equal(G_state[name], t) for name, t in teacher.state_dict().items())
    assert any(line.startswith(f'Transfer: copied {len(teacher.state_dict())} tensors') for line in logged)


def test_random_init_and_diffusion_training(tmp_path):
    logged = []
    torch.manual_seed(0)
    G = generator.build_generator(make_config(loss='edm', arch='ncsnpp', cbase=16, cres=[1, 2], precision='bf16',
                                              augment_dim=9), DATA16, logged.append)
    assert type(G) is networks.EDMPrecond and G.use_fp16 and G.model.map_augment is not None
    assert 'EDMPrecond (--loss=edm trains a diffusion model' in logged[0]
    torch.manual_seed(0)
    again = generator.build_generator(make_config(loss='edm', arch='ncsnpp', cbase=16, cres=[1, 2], precision='bf16',
                                                  augment_dim=9), DATA16, lambda msg: None)
    assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), again.state_dict().values()))
    G = generator.build_generator(make_config(cbase=16, cres=[1, 2]), DATA16, logged.append)
    assert type(G) is networks.D2OPrecond and not G.use_fp16 and G.model.map_augment is None
    assert 'RANDOM weights' in logged[-1]


def test_transfer_checks_the_data(tmp_path):
    path, _ = _teacher(tmp_path)
    cfg = make_config(transfer=str(path), data='d.zip')
    with pytest.raises(ValueError, match=r'network is 3x16\^2 but --data=d\.zip is 1x16\^2'):
        generator.build_generator(cfg, dnnlib.EasyDict(DATA16, num_channels=1), print)
    with pytest.raises(ValueError, match=r'label_dim 0 but the dataset gives 10 \(check --cond\)'):
        generator.build_generator(cfg, dnnlib.EasyDict(DATA16, label_dim=10), print)
    with pytest.raises(ValueError, match=r'^--transfer: .*missing\.pkl: no such file'):
        generator.build_generator(make_config(transfer=str(tmp_path / 'missing.pkl')), DATA16, print)


def test_transfer_from_edm_teacher(fixtures_dir):
    # NCSN++ with augment_dim 9, like edm-cifar10-32x32-uncond-ve.pkl
    pkl, _ = fixture(fixtures_dir, 'edm_edm_ncsnpp_uncond32')
    teacher = checkpoint.load_network(pkl)
    kwargs = generator.generator_kwargs_from_teacher(teacher, dropout=0.0)
    assert kwargs['augment_dim'] == 0 and kwargs['dropout'] == 0.0 and kwargs['model_type'] == 'SongUNet'
    assert kwargs['channel_mult'] == teacher._init_kwargs['channel_mult']
    G = networks.D2OPrecond(**kwargs)
    report = generator.transfer_weights(teacher, G)
    assert report.dropped == ['model.map_augment.weight'] and report.new == []
    assert 'model.map_noise.freqs' in report.copied
    assert len(report.copied) == len(G.state_dict())
    assert torch.equal(G.model.map_noise.freqs, teacher.model.map_noise.freqs)
    for name, t in G.state_dict().items():
        assert torch.equal(t, teacher.state_dict()[name])


def test_transfer_between_d2o_nets_reproduces_outputs(fixtures_dir):
    pkl, golden = fixture(fixtures_dir, 'd2o_adm_cond16')
    source = checkpoint.load_network(pkl)
    G = networks.D2OPrecond(**generator.generator_kwargs_from_teacher(source))
    report = generator.transfer_weights(source, G)
    assert report.dropped == [] and report.new == []
    x, sigma, labels = (torch.from_numpy(golden[key]) for key in ('x', 'sigma', 'class_labels'))
    assert torch.equal(G.eval()(x, sigma, class_labels=labels), source(x, sigma, class_labels=labels))


def test_transfer_rejects_shape_mismatch_and_reports_unused(fixtures_dir):
    pkl, _ = fixture(fixtures_dir, 'edm_iddpm_adm_uncond16')
    teacher = checkpoint.load_network(pkl)
    kwargs = generator.generator_kwargs_from_teacher(teacher)
    assert 'C_1' not in kwargs and 'M' not in kwargs and kwargs['model_type'] == 'DhariwalUNet'
    with pytest.raises(ValueError, match=r'model\.out_conv\.weight \(6, 32, 3, 3\) -> \(3, 32, 3, 3\)'):
        generator.transfer_weights(teacher, networks.D2OPrecond(**kwargs))
