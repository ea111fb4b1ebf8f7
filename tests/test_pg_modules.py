"""Projected discriminator: shapes, frozen/trainable split, determinism, conditioning, DiffAugment, class embeddings.
Weight resolution and the offline EfficientNet-Lite0 package are in tests/test_feature_weights.py."""
import copy
import hashlib
import math
import pickle
import pickletools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pg_modules import class_embedding
from pg_modules.diffaug import diff_augment
from pg_modules.backbones import BACKBONE_SETS, backbone_option, backbone_set
from pg_modules.discriminator import DownBlock, ProjectedDiscriminator
from pg_modules.feature_networks import FeatureNetwork
from pg_modules.frozen_layers import replace_grouped_convs_

LITE0 = 'tf_efficientnet_lite0'
DEIT = 'deit_base_distilled_patch16_224'
TINY_DEIT = {DEIT: dict(embed_dim=32, num_heads=2)}  # DeiT-base's layout (12 blocks, patch 16, 224) at 1/24 width
QUIET = dict(log=lambda *args: None)
OFFICIAL_TABLE = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'in_embeddings' / f'{LITE0}.pkl'


def random_d(**kwargs):
    return ProjectedDiscriminator(pretrained=False, **QUIET, **kwargs)


@pytest.fixture(scope='module')
def lite0_d():
    return random_d()


def images(batch=2, res=32, seed=0):
    return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_backbone_sets():
    assert backbone_set(0) == list(BACKBONE_SETS[0]) == [DEIT, LITE0]
    assert backbone_set(1) == ['vgg16_bn', LITE0]
    assert backbone_set(3) == backbone_set(7) == [LITE0]
    with pytest.raises(ValueError, match='hf_hub'):
        backbone_set(2)
    with pytest.raises(ValueError, match='>= 0'):
        backbone_set(-1)


def test_backbones_by_name():
    # An official set by name is its integer (what old states hold); other lists keep their names, in order.
    assert backbone_option('vgg16_bn, tf_efficientnet_lite0') == 1 and backbone_option(LITE0) == 3
    assert backbone_option('7') == 7 and backbone_set('7') == [LITE0]
    assert backbone_option(f'{LITE0},vgg16_bn') == f'{LITE0},vgg16_bn'
    assert backbone_set(f'{LITE0},{DEIT}') == [LITE0, DEIT]
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'; expected 0, 1, 3 or names from vgg16_bn"):
        backbone_set('resnet50')
    with pytest.raises(ValueError, match='named twice'):
        backbone_set(f'{LITE0},{LITE0}')


# Per official integer: a digest of D's state dict (names, exact values) and its logit sums, taken before the
# backbones moved to backbones.py (pretrained=False, seed 5, torch.manual_seed(0), the tiny DeiT, 1 thread).
BEFORE_REGISTRY = {0: ('c23e86e9685601a8', [-32.071, -70.805]), 1: ('6f1cbba7d67a1423', [-184.902, -25.384]),
                   3: ('787203a2e9e3c9c3', [-10.991]), 7: ('787203a2e9e3c9c3', [-10.991])}


@pytest.mark.parametrize('code', sorted(BEFORE_REGISTRY))
def test_official_integers_build_the_same_discriminator(code):
    torch.manual_seed(0)  # the mini-discs' own initialisation draws from the global RNG
    d = random_d(backbones=backbone_set(code), seed=5, backbone_kwargs=TINY_DEIT)
    digest = hashlib.sha256()
    for key, value in sorted(d.state_dict().items()):
        digest.update(key.encode() + value.float().contiguous().numpy().tobytes())
    with torch.no_grad():
        sums = [x.double().sum().item() for x in d(images(batch=2, res=32, seed=1))]
    assert (digest.hexdigest()[:16], list(d.feature_networks)) == (BEFORE_REGISTRY[code][0], backbone_set(code))
    assert sums == pytest.approx(BEFORE_REGISTRY[code][1], abs=2e-3)


def test_vgg_and_lite0_logit_widths():
    d = random_d(backbones=['vgg16_bn', LITE0])
    assert d.weights_info == {'vgg16_bn': 'random (pretrained=False)', LITE0: 'random (pretrained=False)'}
    with torch.no_grad():
        feats = d.features(images(batch=1))
        logits = d.score(feats)
    # vgg projections at 224, 112, 56, 28 → 11×11 per mini-disc; lite0 at 112 … 14 → 4×4 (docs/method.md §10).
    assert [[tuple(f.shape[1:]) for f in fs] for fs in feats] == [
        [(64, 224, 224), (64, 112, 112), (128, 56, 56), (256, 28, 28)],
        [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14)]]
    assert [tuple(x.shape) for x in logits] == [(1, 484), (1, 64)]


def test_deit_readouts_and_logits():
    d = random_d(backbones=[DEIT], backbone_kwargs=TINY_DEIT)
    body = d.feature_networks[DEIT].body
    stage_shapes = [tuple(f.shape[1:]) for f in body(torch.zeros(1, 3, 224, 224))]
    assert stage_shapes == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    assert [tuple(x.shape) for x in d(images(res=16))] == [(2, 64)]


def test_parameter_counts(lite0_d):
    count = lambda d: sum(p.numel() for p in d.trainable_parameters())  # noqa: E731
    assert count(lite0_d) == 10_331_328  # docs/method.md §10: ~10.33M per backbone
    cond = random_d(c_dim=10, embedding='random')
    assert count(cond) == 13_757_888  # ~13.76M with cls / Embedding(1000, 320) / embed_proj per mini-disc
    two = random_d(backbones=['vgg16_bn', LITE0])
    assert count(two) == 2 * 10_331_328
    assert all(not p.requires_grad for p in two.feature_networks.parameters())


def test_gradients_reach_input_and_mini_discs_only():
    d = random_d()
    d.train().requires_grad_(True)
    fnet = d.feature_networks[LITE0]
    assert not fnet.training and all(not m.training for m in fnet.modules())
    assert all(m.training for m in d.discriminators.modules())
    stats = fnet.body.stages[0][1].running_mean.clone()
    x = images().requires_grad_(True)
    # R1-style: gradient of all logits w.r.t. the image, with create_graph, then backward of the penalty.
    (grad,) = torch.autograd.grad(sum(l.sum() for l in d(x)), x, create_graph=True)
    grad.square().sum().backward()
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in fnet.parameters())
    trainable = dict(d.discriminators.named_parameters())
    assert all(p.requires_grad and p.grad is not None for p in trainable.values())
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if n.endswith('weight_orig'))
    assert torch.equal(fnet.body.stages[0][1].running_mean, stats)  # frozen BN statistics untouched


def test_frozen_grouped_conv_matches_plain_conv_to_second_order():
    """The depthwise-conv stand-in gives the same outputs, input gradients and R1 parameter gradients."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(timm.layers.Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=4), torch.nn.Conv2d(8, 4, 1))
    frozen = replace_grouped_convs_(copy.deepcopy(plain))
    assert [type(m).__name__ for m in frozen] == ['FrozenGroupedConv2d', 'FrozenGroupedConv2d', 'Conv2d']
    assert frozen.state_dict().keys() == plain.state_dict().keys()
    for net in (plain, frozen):
        net[0].requires_grad_(False), net[1].requires_grad_(False)
    x = torch.randn(2, 8, 15, 15, requires_grad=True)
    grads = []
    for net in (plain, frozen):
        y = net(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        net[2].weight.grad = None
        g.square().sum().backward()
        grads.append((y, g, net[2].weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_part_is_seeded_and_identical_across_ranks():
    torch.manual_seed(1)  # different global RNG states stand in for different ranks
    a = random_d(seed=5, interp224=False, img_resolution=64)
    torch.manual_seed(2)
    b = random_d(seed=5, interp224=False, img_resolution=64)
    state = torch.get_rng_state()
    c = random_d(seed=6, interp224=False, img_resolution=64)
    frozen = lambda d: d.feature_networks.state_dict()  # noqa: E731
    assert all(torch.equal(v, frozen(b)[k]) for k, v in frozen(a).items())
    assert not torch.equal(a.feature_networks[LITE0].projector.ccm[0].weight,
                           c.feature_networks[LITE0].projector.ccm[0].weight)
    x = images()
    assert all(torch.equal(u, v) for u, v in zip(a.features(x)[0], b.features(x)[0]))
    # Building the frozen part leaves the global RNG stream as it was (only the trainable mini-discs draw from it).
    torch.set_rng_state(state)
    expected = torch.rand(3)
    torch.set_rng_state(state)
    FeatureNetwork(LITE0, torch.Generator().manual_seed(0), pretrained=False, **QUIET)
    assert torch.equal(torch.rand(3), expected)


def test_deit_frozen_part_is_seeded():
    a, b = (random_d(backbones=[DEIT], backbone_kwargs=TINY_DEIT, seed=3) for _ in range(2))
    sa, sb = a.feature_networks.state_dict(), b.feature_networks.state_dict()
    assert any('readouts' in k for k in sa) and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_spectral_norm_on_every_mini_disc_conv(lite0_d):
    convs = [(n, m) for n, m in lite0_d.discriminators.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 + 3 + 2 + 1 + 4  # down-blocks + heads
    for name, conv in convs:
        assert hasattr(conv, 'weight_orig') and hasattr(conv, 'weight_u') and hasattr(conv, 'weight_v'), name
    names = dict(lite0_d.named_parameters())
    assert f'discriminators.{LITE0}.mini_discs.0.main.0.main.0.weight_orig' in names
    assert f'discriminators.{LITE0}.mini_discs.3.main.1.weight_orig' in names  # head of the 1-block disc
    assert names[f'discriminators.{LITE0}.mini_discs.0.main.3.main.0.weight_orig'].shape == (512, 256, 4, 4)


def down_blocks(d, name):
    discs = d.discriminators[name].mini_discs.values()
    return [sum(isinstance(m, DownBlock) for m in disc.main) for disc in discs]


@pytest.mark.parametrize('name, res, maps, blocks, width', [
    (LITE0, 64, [32, 16, 8, 4], [2, 1, 0, 0], 3 * 25 + 1),           # strides 4…32, projected ×2
    ('vgg16_bn', 32, [32, 16, 8, 4], [2, 1, 0, 0], 3 * 25 + 1),      # strides 2…16, projected ×2
    ('vgg16_bn', 64, [64, 32, 16, 8], [3, 2, 1, 0], 4 * 25),
    (DEIT, 32, [112, 56, 28, 14], [4, 3, 2, 1], 4 * 16),            # a ViT always resizes to 224: official sizes
])
def test_interp224_off_sizes_mini_discs_from_real_maps(name, res, maps, blocks, width):
    """Issue 13.3: without the 224 resize, each mini-disc is built for the map it really gets (nearest NFC key,
    down to 8, then the 4×4 head) instead of the 256²-declared sizes that crashed."""
    d = random_d(backbones=[name], interp224=False, img_resolution=res,
                 backbone_kwargs=TINY_DEIT if name == DEIT else None)
    assert d.feature_networks[name].map_sizes(res) == maps
    assert down_blocks(d, name) == blocks
    x = images(batch=2, res=res).requires_grad_(True)
    (logits,) = d.train()(x)
    assert logits.shape == (2, width)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert grad.abs().sum() > 0


def test_interp224_off_refuses_maps_smaller_than_the_head():
    with pytest.raises(ValueError, match=r"--interp224=false: at 32×32 input, tf_efficientnet_lite0's level-3 "
                                         r"maps end 2×2, smaller than the mini-discriminator's 4×4 head"):
        random_d(interp224=False, img_resolution=32)
    with pytest.raises(ValueError, match='needs img_resolution'):
        random_d(interp224=False)
    assert down_blocks(random_d(img_resolution=32), LITE0) == [4, 3, 2, 1]  # interp224 on: the official sizes


def test_conditional_logits_depend_on_label():
    d = random_d(c_dim=10, embedding='random', interp224=False, img_resolution=64).eval()
    x = images(batch=1, res=64).expand(3, -1, -1, -1)
    c = torch.nn.functional.one_hot(torch.tensor([3, 3, 5]), 10).float()
    with torch.no_grad():
        (logits,) = d(x, c)
    assert logits.shape == (3, 76)  # 64² without resize: maps 32, 16, 8, 4 → 5×5, 5×5, 5×5, 1×1
    assert torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])
    with pytest.raises(ValueError, match=r'one-hot labels c of shape \[B, 10\]'):
        d(x)


def test_diffaug_only_when_on():
    x = images()
    torch.manual_seed(0)
    y = diff_augment(x)
    torch.manual_seed(0)
    assert y.shape == x.shape and not torch.equal(y, x) and torch.equal(diff_augment(x), y)
    assert (y == 0).float().mean() > 0.02  # cutout (20% square) and translation zero-fill
    off, on = (FeatureNetwork(LITE0, torch.Generator().manual_seed(1), pretrained=False, interp224=False,
                              diffaug=diffaug, **QUIET) for diffaug in (False, True))
    with torch.no_grad():
        assert torch.equal(off(x)[0], off(x)[0])
        assert not torch.equal(on(x)[0], on(x)[0])
        assert not torch.equal(on(x)[0], off(x)[0])
        assert torch.equal(on(x, augment=False)[0], off(x)[0])  # R1's clean pass


def _fake_dill_pickle(path, obj, monkeypatch):
    """Pickle `obj` the way dill does for the official class embedding (protocol 3, set type via
    dill._dill._load_type), with a stand-in dill module so that dill itself is not needed."""
    dill_mod = types.ModuleType('dill._dill')

    def _load_type(name):
        return {'set': set}[name]
    _load_type.__module__, _load_type.__qualname__ = 'dill._dill', '_load_type'
    dill_mod._load_type = _load_type
    monkeypatch.setitem(sys.modules, 'dill', types.ModuleType('dill'))
    monkeypatch.setitem(sys.modules, 'dill._dill', dill_mod)

    class DillLike(pickle.Pickler):
        def reducer_override(self, value):
            return (_load_type, ('set',)) if value is set else NotImplemented
    with open(path, 'wb') as f:
        DillLike(f, protocol=3).dump(obj)
    return path.read_bytes()


def test_official_class_embedding_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    embed = torch.nn.Embedding(1000, 320)
    data = _fake_dill_pickle(tmp_path / 'tf_efficientnet_lite0.pkl', {'embed': embed}, monkeypatch)
    globals_used = {arg for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL'}
    assert {'dill._dill _load_type', 'torch.nn.modules.sparse Embedding',
            'torch.storage _load_from_bytes'} <= globals_used
    d = random_d(c_dim=10, embedding=tmp_path / 'tf_efficientnet_lite0.pkl')
    assert d.embedding_info.startswith('file ') and '1000×320' in d.embedding_info
    tables = [disc.embed.weight for disc in d.discriminators[LITE0].mini_discs.values()]
    assert all(torch.equal(t, embed.weight) and t.requires_grad for t in tables)
    assert tables[0].data_ptr() != tables[1].data_ptr()  # one trainable copy per mini-disc


def test_class_embedding_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'embed': Evil()}, protocol=3))
    with pytest.raises(ValueError, match='builtins.print is not allowed'):
        class_embedding.load_class_embedding(path)


def test_class_embedding_tensor_files(tmp_path):
    table = torch.randn(12, 320)
    np.save(tmp_path / 'e.npy', table.numpy())
    torch.save({'weight': table}, tmp_path / 'e.pt')
    for name in ('e.npy', 'e.pt'):
        assert torch.equal(class_embedding.load_class_embedding(tmp_path / name), table)
    torch.save(torch.randn(12, 64), tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match=r'got \[12, 64\]'):
        class_embedding.load_class_embedding(tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match='12 rows but c_dim=20'):
        random_d(c_dim=20, embedding=tmp_path / 'e.pt')
    with pytest.raises(ValueError, match='unconditional'):
        random_d(embedding=tmp_path / 'e.pt')


def official_table_path():
    if not OFFICIAL_TABLE.is_file():
        pytest.skip(f'{OFFICIAL_TABLE} not found: the shared fixtures are not checked out beside this repo')
    return OFFICIAL_TABLE


def conditional_output(disc, feature, row):
    """SingleDiscCond by hand (docs/method.md §10): Σ_ch cls(main(f))·cmap / √64 with
    cmap = √2·lrelu_0.2(W/√320·row + b), the table row given explicitly."""
    proj = disc.embed_proj
    cmap = torch.nn.functional.leaky_relu(row @ proj.weight.T / math.sqrt(320) + proj.bias, 0.2) * math.sqrt(2)
    return (disc.cls(disc.main(feature)) * cmap[:, :, None, None]).sum(dim=1) / 8


@pytest.mark.parametrize('c_dim, classes', [(10, [0, 3, 9]), (1000, [0, 517, 999])])
def test_official_class_embedding_rows_follow_class_index(c_dim, classes, monkeypatch):
    """Issue 13.1: a conditional D starts from the official table by default, keeps all its 1000 rows (also for
    10 classes, like the official nn.Embedding(1000, 320)) and scores class k, given one-hot, with row k."""
    table = class_embedding.load_class_embedding(official_table_path())
    assert table.shape == (1000, 320)
    # The download cache already holds the official file (the fixture): no network.
    monkeypatch.setattr(class_embedding.util, 'open_url', lambda url, return_filename: str(official_table_path()))
    torch.manual_seed(0)
    d = random_d(c_dim=c_dim, interp224=False, img_resolution=64).eval()
    assert d.embedding_info.startswith(f'official {class_embedding.OFFICIAL_URL}')
    discs = list(d.discriminators[LITE0].mini_discs.values())
    assert all(torch.equal(disc.embed.weight, table) for disc in discs)
    x = images(batch=1, res=64).expand(len(classes), -1, -1, -1)
    c = torch.nn.functional.one_hot(torch.tensor(classes), c_dim).float()
    with torch.no_grad():
        (logits,) = d(x, c)
        features = d.features(x)[0]
        expected = torch.cat([conditional_output(disc, f, table[classes]).flatten(1)
                              for disc, f in zip(discs, features)], 1)
    # Random backbone, eval-mode BatchNorm at its initial statistics: logits reach ~1e4, hence a relative bound.
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(logits[0], logits[1], rtol=1e-3, atol=0)  # same image, other class, other row
