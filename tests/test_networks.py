"""training/networks.py: architecture tables, parameter totals, preconditioning math, precision."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training import networks
from training.sampling import SIGMA_MAX

FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures' / 'checkpoints'

CIFAR = dict(img_resolution=32, img_channels=3, model_type='SongUNet', model_channels=128, channel_mult=[2, 2, 2], dropout=0.13)
DDPMPP = dict(embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
              resample_filter=[1, 1])
NCSNPP = dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
TINY_NCSNPP = dict(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[8], dropout=0.0, **NCSNPP)
TINY_ADM = dict(img_resolution=16, img_channels=3, model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[8], dropout=0.0)


def build_on_meta(cls, **kwargs):
    with torch.device('meta'):
        return cls(**kwargs)


def perturbed(net, seed=0):
    """Random non-zero weights everywhere (zero-initialised output layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (p if p.ndim == 1 else 0))
    return net.eval()


# docs/edm-networks.md §4 "Parameter totals"
@pytest.mark.parametrize('cls, kwargs, expected', [
    (networks.EDMPrecond, dict(label_dim=10, augment_dim=9, **CIFAR, **DDPMPP), 55_735_299),
    (networks.EDMPrecond, dict(label_dim=10, augment_dim=9, **CIFAR, **NCSNPP), 56_400_643),
    (networks.EDMPrecond, dict(img_resolution=64, img_channels=3, model_type='SongUNet', model_channels=128,
                               channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05, **NCSNPP), 62_761_091),
    (networks.EDMPrecond, dict(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
                               model_channels=192, channel_mult=[1, 2, 3, 4], use_fp16=True), 295_899_267),
    (networks.D2OPrecond, dict(**CIFAR, **NCSNPP), 56_395_523),
], ids=['ddpmpp-cifar-cond', 'ncsnpp-cifar-cond', 'ncsnpp-64-uncond', 'adm-imagenet64', 'd2o-ncsnpp-cifar'])
def test_full_size_parameter_totals_on_meta(cls, kwargs, expected):
    net = build_on_meta(cls, **kwargs)
    assert all(t.is_meta for t in net.parameters())
    assert sum(p.numel() for p in net.parameters()) == expected


def test_full_size_key_names():
    # docs/edm-networks.md §3.4 concrete keys (CIFAR NCSN++).
    sd = build_on_meta(networks.EDMPrecond, label_dim=10, augment_dim=9, **CIFAR, **NCSNPP).state_dict()
    assert sd['model.enc.16x16_block0.qkv.weight'].shape == (768, 256, 1, 1)
    assert sd['model.dec.32x32_aux_conv.weight'].shape == (3, 256, 3, 3)
    assert sd['model.map_noise.freqs'].shape == (128,)
    assert sd['model.enc.16x16_aux_residual.weight'].shape == (256, 3, 3, 3)
    assert sd['model.dec.32x32_block4.conv0.weight'].shape == (256, 384, 3, 3)
    assert 'model.dec.16x16_block4.qkv.weight' in sd and 'model.dec.16x16_block3.qkv.weight' not in sd


def manifests():
    if not FIXTURES.is_dir():
        pytest.skip(f'fixtures not found at {FIXTURES}')
    out = {}
    for name in ('manifest_edm.json', 'manifest_d2o.json'):
        out.update(json.loads((FIXTURES / name).read_text()))
    return out


@pytest.mark.parametrize('fixture', ['edm_vp_ddpmpp_cond16', 'edm_ve_ncsnpp_uncond16', 'edm_edm_ncsnpp_uncond32',
                                     'edm_edm_adm_cond16', 'edm_iddpm_adm_uncond16', 'd2o_ncsnpp_uncond16', 'd2o_adm_cond16'])
def test_state_dict_matches_original_keys_order_and_shapes(fixture):
    entry = manifests()[fixture]
    net = build_on_meta(getattr(networks, entry['precond']), **entry['init_kwargs'])
    ours = [(name, list(t.shape)) for name, t in net.state_dict().items()]
    assert ours == list(entry['state_dict'].items())
    assert sum(p.numel() for p in net.parameters()) == entry['num_params']


def test_plain_attributes():
    net = build_on_meta(networks.D2OPrecond, **TINY_NCSNPP)
    assert (net.sigma_min, net.sigma_max, net.sigma_data, net.eps, net.counter) == (0, float('inf'), 0.5, 2e-3, 0)
    block = net.model.enc['8x8_block0']
    assert (block.num_heads, block.adaptive_scale, block.emb_channels) == (1, False, 64)
    assert block.skip_scale == pytest.approx(np.sqrt(0.5))
    assert net.model.enc['16x16_conv'].resample_filter is None
    assert net.model.enc['8x8_down'].skip.weight.shape == (16, 16, 1, 1)  # resample_proj=True in SongUNet
    adm = build_on_meta(networks.EDMPrecond, **TINY_ADM)
    assert adm.model.enc['8x8_down'].skip.weight is None                # kernel 0: resampling only
    assert adm.model.enc['8x8_block0'].num_heads == 1 and adm.model.dec['8x8_in0'].num_heads == 1


def test_vp_and_iddpm_noise_ranges():
    vp = build_on_meta(networks.VPPrecond, **dict(TINY_NCSNPP, embedding_type='positional', channel_mult_noise=1))
    assert vp.sigma_max == pytest.approx(152.17, abs=0.01)
    assert vp.sigma_min == pytest.approx(0.001, rel=0.03)  # EDM evaluates it in float32
    iddpm = networks.iDDPMPrecond(**dict(TINY_ADM, model_type='DhariwalUNet'))
    assert iddpm.sigma_min == pytest.approx(0.00642, rel=1e-3) and iddpm.sigma_max == pytest.approx(20291, rel=1e-4)
    assert iddpm.u.shape == (1001,) and iddpm.model.out_conv.weight.shape[0] == 6
    sigma = torch.tensor([0.5, 3.0, 1e4])
    rounded = iddpm.round_sigma(sigma)
    index = iddpm.round_sigma(sigma, return_index=True)
    assert torch.equal(rounded, iddpm.u[index])
    assert ((iddpm.u[index] - sigma).abs() <= (iddpm.u[index - 1] - sigma).abs()).all()
    assert ((iddpm.u[index] - sigma).abs() <= (iddpm.u[index + 1] - sigma).abs()).all()


def test_d2o_scalings_and_consistency_boundary():
    c_skip, c_out, c_in, c_noise = networks.edm_scalings(torch.tensor(80.0, dtype=torch.float64), 0.5, networks.D2O_EPSILON)
    assert float(c_skip) == pytest.approx(3.9e-5, rel=0.01) and float(c_out) == pytest.approx(0.49998, abs=1e-5)
    assert float(c_in) == pytest.approx(1 / np.sqrt(0.25 + 6400)) and float(c_noise) == pytest.approx(np.log(80) / 4)
    torch.manual_seed(0)
    net = perturbed(networks.D2OPrecond(**TINY_ADM, label_dim=10))
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[:2]
    for sigma in (networks.D2O_EPSILON, torch.full([2, 1, 1, 1], networks.D2O_EPSILON)):
        assert torch.equal(net(x, sigma, class_labels=labels), x)  # D(x; ε) = x exactly
    assert not torch.allclose(net(x, 1.0, class_labels=labels), x)


def test_d2o_accepts_sigma_next_and_ignores_it():
    torch.manual_seed(1)
    net = perturbed(networks.D2OPrecond(**TINY_NCSNPP))
    x = torch.randn(2, 3, 16, 16) * SIGMA_MAX
    sigma = torch.full([2, 1, 1, 1], SIGMA_MAX, dtype=torch.float64)
    one_step = net(x, sigma, class_labels=None, augment_labels=None)
    two_step_call = net(x, sigma, torch.full_like(sigma, 2.5), class_labels=None, augment_labels=None)
    assert torch.equal(one_step, two_step_call) and one_step.dtype == torch.float32
    with pytest.raises(ValueError, match='pass class_labels by keyword'):
        net(x, sigma, torch.eye(10)[:2])  # labels given positionally would bind to sigma_next


def test_forward_broadcasts_scalar_sigma_and_default_labels():
    torch.manual_seed(2)
    net = perturbed(networks.EDMPrecond(**TINY_ADM, label_dim=10))
    x = torch.randn(3, 3, 16, 16)
    batched = net(x, torch.full([3], 2.0), class_labels=torch.zeros(3, 10))
    assert (net(x, 2.0) - batched).abs().max() <= 1e-5 * batched.abs().max()  # labels None -> zeros, batch-1 emb


def test_augment_labels_reach_songunet_map_augment():
    torch.manual_seed(3)
    net = perturbed(networks.EDMPrecond(**dict(TINY_NCSNPP, augment_dim=9)))
    x, sigma, aug = torch.randn(2, 3, 16, 16), torch.ones(2), torch.randn(2, 9)
    assert not torch.allclose(net(x, sigma), net(x, sigma, augment_labels=aug))
    assert torch.equal(net(x, sigma, augment_labels=torch.zeros(2, 9)), net(x, sigma))  # no bias: zeros = none


def test_label_dropout_zeroes_labels_in_training_only():
    torch.manual_seed(4)
    net = perturbed(networks.VPPrecond(**dict(TINY_NCSNPP, label_dim=10, label_dropout=1.0)))
    x, labels = torch.randn(2, 3, 16, 16), torch.eye(10)[:2]
    unconditional = net(x, 1.0, class_labels=torch.zeros(2, 10))
    assert not torch.allclose(net(x, 1.0, class_labels=labels), unconditional)
    net.train()
    assert torch.allclose(net(x, 1.0, class_labels=labels), unconditional, atol=1e-6)


def test_resampling_filters():
    x = torch.randn(1, 2, 4, 4)
    down = networks.Conv2d(2, 2, kernel=0, down=True)
    up = networks.Conv2d(2, 2, kernel=0, up=True)
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2))
    assert torch.equal(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    binomial = networks.Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert binomial.resample_filter.shape == (1, 1, 4, 4) and float(binomial.resample_filter.sum()) == pytest.approx(1)
    assert torch.allclose(binomial(torch.ones(1, 2, 8, 8))[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


def test_positional_embedding_formula():
    emb = networks.PositionalEmbedding(8, endpoint=True)(torch.tensor([0.5, 3.0]))
    freqs = (1 / 10000) ** (np.arange(4) / 3)
    arg = np.array([0.5, 3.0])[:, None] * freqs
    assert np.allclose(emb.numpy(), np.concatenate([np.cos(arg), np.sin(arg)], axis=1), atol=1e-6)


def test_attention_weights_are_float32_softmax():
    q, k = torch.randn(2, 8, 5).bfloat16(), torch.randn(2, 8, 7).bfloat16()
    w = networks.attention_weights(q, k)
    ref = torch.softmax(torch.einsum('ncq,nck->nqk', q.double(), k.double()) / np.sqrt(8), dim=2)
    assert w.dtype == torch.bfloat16 and torch.allclose(w.double(), ref, atol=4e-3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        w32 = networks.attention_weights(q.float(), k.float())
    assert w32.dtype == torch.float32 and torch.allclose(w32.double(), ref, atol=1e-6)


@pytest.mark.parametrize('cls, half', [(networks.VPPrecond, torch.float16), (networks.VEPrecond, torch.float16),
                                       (networks.iDDPMPrecond, torch.float16), (networks.EDMPrecond, torch.bfloat16),
                                       (networks.D2OPrecond, torch.bfloat16)])
def test_use_fp16_dtype_per_class(cls, half):
    assert cls.half_dtype == half


def test_bfloat16_unet_and_autocast():
    torch.manual_seed(5)
    for kwargs in (TINY_NCSNPP, TINY_ADM):
        net = perturbed(networks.D2OPrecond(**kwargs, use_fp16=True))
        x = torch.randn(1, 3, 16, 16)
        ref = net(x, 2.0)
        assert torch.equal(ref, net(x, 2.0, force_fp32=True))  # CPU: use_fp16 stays float32
        out = net.model(x.bfloat16(), torch.tensor([0.1]), class_labels=None)  # the CUDA use_fp16 path
        assert out.dtype == torch.bfloat16
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = net(x, 2.0)
        assert amp.dtype == torch.float32
        assert (amp - ref).abs().max() <= 0.05 * ref.abs().max()


def _mapping_and_affine_outputs(net, x, sigma, labels):
    """(mapping output, {affine module name: output}) of one forward pass."""
    outputs = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, module in net.named_modules() if name.endswith('affine') or name == 'model.map_layer1']
    net(x, sigma, class_labels=labels)
    for hook in hooks:
        hook.remove()
    return outputs.pop('model.map_layer1'), outputs


@pytest.mark.parametrize('kwargs', [TINY_NCSNPP, TINY_ADM], ids=['ncsnpp', 'adm'])
def test_mapping_and_affine_stay_float32_under_bf16_autocast(kwargs):
    # Official networks keep the noise/class embedding and its per-block projections in float32 (docs/method.md §9).
    torch.manual_seed(7)
    net = perturbed(networks.D2OPrecond(**kwargs, label_dim=4))
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([80.0, 0.5]), torch.eye(4)[[1, 3]]
    map32, affine32 = _mapping_and_affine_outputs(net, x, sigma, labels)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        map16, affine16 = _mapping_and_affine_outputs(net, x, sigma, labels)
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast does lower plain matmuls
    assert map16.dtype == torch.float32 and torch.equal(map16, map32)
    assert len(affine16) == len([m for m in net.modules() if isinstance(m, networks.UNetBlock)]) > 0
    for name, out in affine16.items():
        assert out.dtype == torch.float32 and torch.equal(out, affine32[name]), name
    emb = net.model.mapping(torch.tensor([0.3, -0.2]), labels, None, 2)  # the same computation, called directly
    assert emb.dtype == torch.float32 and emb.shape == (2, net.model.map_layer1.out_features)


def test_gradients_reach_every_parameter():
    torch.manual_seed(6)
    net = perturbed(networks.D2OPrecond(**TINY_NCSNPP)).train()
    net(torch.randn(2, 3, 16, 16) * 80, torch.full([2, 1, 1, 1], 80.0)).square().mean().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
