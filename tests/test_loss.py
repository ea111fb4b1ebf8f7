"""training/loss.py: adversarial terms and their scaling, R1 against an independent computation, gradient
routing of the G and D stages, EDM diffusion losses, the non-finite gradient check."""
import copy
import math

import pytest
import torch
from torch import nn

from training import freeze, loss, networks


class ToyD(nn.Module):
    """Stand-in for ProjectedDiscriminator with its interface: a frozen random conv 'feature network' per
    backbone (optionally 'augmenting' by adding noise) and trainable heads with train-mode batch norm
    (samples interact, as in the real D). Backbones give different N_k (16 and 4 logits)."""

    def __init__(self, diffaug=False, c_dim=0):
        super().__init__()
        self.diffaug, self.c_dim = diffaug, c_dim
        self.feature_nets = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1)])
        self.feature_nets.requires_grad_(False)
        self.heads = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1),
                                                  nn.BatchNorm2d(4, track_running_stats=False), nn.Tanh(),
                                                  nn.Conv2d(4, 1, 1)) for _ in range(2)])
        self.embed = nn.Linear(c_dim, 1, bias=False) if c_dim else None

    def features(self, img, augment=True):
        if augment and self.diffaug:
            img = img + 0.3 * torch.randn_like(img)
        return [[torch.tanh(net(img))] for net in self.feature_nets]

    def score(self, features, c=None):
        bias = self.embed(c) if self.embed is not None else 0
        return [head(maps[0]).flatten(1) + bias for head, maps in zip(self.heads, features)]

    def forward(self, img, c=None):
        return self.score(self.features(img), c)


class PixelD(nn.Module):
    """Logits are given pixels (backbone 0: row 0, backbone 1: row 1 first 3 columns), so tests choose them."""
    diffaug = False

    def forward(self, img, c=None):
        return [img[:, 0, 0, :], img[:, 0, 1, :3]]


def tiny_generator(label_dim=0):
    torch.manual_seed(0)
    return networks.D2OPrecond(16, 3, label_dim=label_dim, model_type='SongUNet', embedding_type='fourier',
                               encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                               model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                               dropout=0)


def logit_images(rows0, rows1):
    img = torch.zeros(len(rows0), 3, 2, 4)
    img[:, 0, 0] = torch.tensor(rows0)
    img[:, 0, 1, :3] = torch.tensor(rows1)
    return img


softplus = lambda x: math.log1p(math.exp(x))
REAL = ([[1.0, -2.0, 0.5, 3.0], [0.0, 1.5, -1.0, 2.0]], [[0.2, -0.7, 1.1], [2.5, -3.0, 0.0]])
FAKE = ([[-1.0, 0.3, 2.0, -0.5], [1.0, -2.5, 0.0, 0.7]], [[-0.4, 1.3, 0.6], [-2.0, 0.1, 3.5]])


def backbone_means(rows, f):
    """Σ_k mean_{b,j} f(ℓ_k[b,j]) over plain Python numbers."""
    return sum(sum(f(v) for row in k for v in row) / sum(len(row) for row in k) for k in rows)


@pytest.mark.parametrize('loss_type', ['ns', 'hinge'])
def test_discriminator_loss_values(loss_type):
    f_fake, f_real = {'ns': (softplus, lambda l: softplus(-l)),
                      'hinge': (lambda l: max(0, 1 + l), lambda l: max(0, 1 - l))}[loss_type]
    value, stats = loss.discriminator_loss(PixelD(), logit_images(*REAL), logit_images(*FAKE), None, 3.0, loss_type)
    expected = 3.0 * (backbone_means(FAKE, f_fake) + backbone_means(REAL, f_real))
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert stats['Loss/D/loss'].item() == pytest.approx(expected, rel=1e-6)
    assert stats['Loss/logits/real'].item() == pytest.approx(backbone_means(REAL, lambda l: l) / 2, rel=1e-6)
    assert stats['Loss/signs/real'].item() == pytest.approx(backbone_means(REAL, lambda l: (l > 0) - (l < 0)) / 2)
    assert not any(s.requires_grad for s in stats.values())


@pytest.mark.parametrize('loss_type', ['ns', 'hinge'])
def test_generator_loss_values(loss_type, monkeypatch):
    fake = logit_images(*FAKE)
    monkeypatch.setattr(loss.sampling, 'generator_sample', lambda G, z, labels, **kw: G(z))
    value, stats = loss.generator_loss(lambda z: z, PixelD(), fake, None, 2.0, loss_type)
    f = {'ns': lambda l: softplus(-l), 'hinge': lambda l: -l}[loss_type]
    assert value.item() == pytest.approx(2.0 * backbone_means(FAKE, f), rel=1e-6)
    assert stats['Loss/probs/fake'].item() == pytest.approx(backbone_means(FAKE, lambda l: 1 / (1 + math.exp(-l))) / 2)
    with pytest.raises(ValueError, match="loss_type='wgan'"):
        loss.generator_loss(lambda z: z, PixelD(), fake, None, 2.0, 'wgan')


def test_adv_scale_reproduces_official_row_list():
    """docs/method.md §6: the official D returns 2·B_gpu rows (`list += tensor`); its loss Σ_rows mean f(row) equals
    adv_scale · Σ_k mean f(ℓ_k) with adv_scale = the per-GPU batch (global batch / GPUs)."""
    torch.manual_seed(0)
    per_gpu = 4
    logits = [torch.randn(per_gpu, 64), torch.randn(per_gpu, 484)]
    rows = []
    for t in logits:
        rows += t  # the official quirk, reproduced
    official = sum(nn.functional.softplus(-r).mean() for r in rows)
    ours = per_gpu * sum(nn.functional.softplus(-t).mean() for t in logits)
    assert len(rows) == 2 * per_gpu
    torch.testing.assert_close(ours, official)


def independent_r1(D, real, gamma, seed):
    """γ/2 · mean_b Σ ‖∂(Σ logits)/∂x_b‖² through torch.func (no autograd.grad/create_graph) of D's plain
    forward, which augments when D does, with the default generator seeded to `seed` first."""
    def total_logits(x):
        return sum(l.sum() for l in D(x))
    torch.manual_seed(seed)
    grad = torch.func.grad(total_logits)(real)
    return gamma / 2 * grad.square().sum(dim=[1, 2, 3]).mean()


def seeded_r1(D, real, gamma, seed, **kwargs):
    torch.manual_seed(seed)
    return loss.r1_penalty(D, real, None, gamma, **kwargs)


@pytest.mark.parametrize('diffaug', [False, True])
def test_r1_penalty_value_and_weight_gradients(diffaug):
    """R1 on D's own (augmented when diffaug) pass of the reals, differentiated w.r.t. the un-augmented reals."""
    torch.manual_seed(1)
    D, real, gamma = ToyD(diffaug=diffaug), torch.randn(3, 3, 8, 8), 0.7
    value, stats = seeded_r1(D, real, gamma, seed=7)
    assert not real.requires_grad  # the caller's tensor is untouched
    torch.testing.assert_close(value, independent_r1(D, real, gamma, seed=7), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats['Loss/r1_penalty'], value.detach() * 2 / gamma, rtol=1e-5, atol=0)
    assert value.item() > 0
    # The augmentation matters: another draw gives another penalty (a D without it always gives the same).
    other = seeded_r1(D, real, gamma, seed=8)[0]
    assert (abs(other.item() - value.item()) > 1e-4 * value.item()) == diffaug
    # create_graph: backward reaches D's trainable weights, with the gradient of the independent formula.
    value.backward()
    params = dict(D.heads.named_parameters())
    torch.manual_seed(7)
    func_grads = torch.func.grad(r1_of_head_params)({k: v.detach() for k, v in params.items()}, D, real, gamma)
    for k, p in params.items():  # biases that do not affect ∂logits/∂x get no gradient (None vs zeros)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grad, func_grads[k], rtol=1e-4, atol=1e-7)
    assert sum(p.grad.abs().sum() for p in params.values() if p.grad is not None) > 0
    assert all(p.grad is None for p in D.feature_nets.parameters())


def r1_of_head_params(head_params, D, real, gamma):
    """The R1 loss as a function of the heads' weights (torch.func second-order gradient)."""
    def total_logits(x):
        return sum(torch.func.functional_call(head, {n.split('.', 1)[1]: v for n, v in head_params.items()
                                                     if n.split('.', 1)[0] == str(i)}, (maps[0],)).sum()
                   for i, (head, maps) in enumerate(zip(D.heads, D.features(x))))
    grad = torch.func.grad(total_logits)(real)
    return gamma / 2 * grad.square().sum(dim=[1, 2, 3]).mean()


def param_grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_shared_real_features_are_exact():
    """r1_features computed once serve the D main real pass and R1, with identical values and gradients."""
    torch.manual_seed(2)
    D, real, fake = ToyD(c_dim=5), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    labels = torch.eye(5)[[0, 3, 1, 3]]
    shared = loss.r1_features(D, real)

    def grads(**kw):
        D.zero_grad(set_to_none=True)
        d_loss, _ = loss.discriminator_loss(D, real, fake, labels, 4.0, 'ns', real_features=kw.get('shared'))
        d_loss.backward()
        g_d = param_grads(D)
        D.zero_grad(set_to_none=True)
        r1, _ = loss.r1_penalty(D, real, labels, 0.5, real_features=kw.get('shared'))
        r1.backward()
        return d_loss.detach(), r1.detach(), g_d, param_grads(D)

    fresh, reused = grads(), grads(shared=shared)
    for a, b in zip(fresh, reused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match='applies DiffAugment'):
        loss.discriminator_loss(ToyD(diffaug=True), real, fake, None, 1.0, real_features=shared)


def test_generator_loss_gradient_routing():
    """G stage: gradients reach exactly G's trainable (unfrozen) parameters; the frozen D gets none."""
    G, D = tiny_generator(), ToyD()
    trainable = {n for n, _ in freeze.select_trainable(G, level=1)}
    D.requires_grad_(False)  # what the loop does for this stage
    torch.manual_seed(3)
    value, stats = loss.generator_loss(G, D, torch.randn(2, 3, 16, 16), None, 1.0)
    value.backward()
    for name, p in G.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert sum(p.grad.abs().sum() for p in G.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in D.parameters())


def test_discriminator_loss_gives_no_gradient_to_generator():
    G, D = tiny_generator(label_dim=5), ToyD(c_dim=5)
    labels = torch.eye(5)[[1, 4]]
    fake = loss.sampling.generator_sample(G, torch.randn(2, 3, 16, 16), labels)  # still attached to G's graph
    value, stats = loss.discriminator_loss(D, torch.randn(2, 3, 16, 16), fake, labels, 1.0)
    value.backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.heads.parameters())
    assert set(stats) == {'Loss/D/loss', 'Loss/logits/fake', 'Loss/probs/fake', 'Loss/logits/real',
                          'Loss/probs/real', 'Loss/signs/real'}


def test_d_runs_in_float32_under_autocast():
    D, img = ToyD(), torch.randn(2, 3, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value, _ = loss.discriminator_loss(D, img, img, None, 1.0)
        r1, _ = loss.r1_penalty(D, img, None, 1.0)
    assert value.dtype == r1.dtype == torch.float32
    torch.testing.assert_close(value, loss.discriminator_loss(D, img, img, None, 1.0)[0])


DEIT = 'deit_base_distilled_patch16_224'


def real_d(diffaug=False):
    """The real projected D with a random DeiT layout at 1/24 width (its attention is what R1 must
    differentiate twice)."""
    from pg_modules.discriminator import ProjectedDiscriminator
    return ProjectedDiscriminator(backbones=[DEIT], pretrained=False, diffaug=diffaug, seed=0, log=lambda *args: None,
                                  backbone_kwargs={DEIT: dict(embed_dim=32, num_heads=2)}).train()


def test_generator_loss_with_real_discriminator():
    """Integration: tiny D2O generator (freeze level 2) + the real projected D."""
    G, D = tiny_generator(), real_d()
    trainable = {n for n, _ in freeze.select_trainable(G, level=2)}
    D.requires_grad_(False)
    torch.manual_seed(0)
    value, _ = loss.generator_loss(G, D, torch.randn(2, 3, 16, 16), None, 32.0)
    value.backward()
    assert {n for n, p in G.named_parameters() if p.grad is not None} == trainable
    assert all(p.grad is None for p in D.parameters())


def test_r1_with_real_discriminator():
    """R1 through DeiT attention (double backward) and, with diffaug, through the real DiffAugment: equal to the
    independent computation with the same augmentation draws, and different from the un-augmented penalty."""
    real = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    D, D_aug = real_d(), real_d(diffaug=True)
    D_aug.load_state_dict(D.state_dict())  # same weights and spectral-norm vectors
    D_aug_copy = copy.deepcopy(D_aug)  # the same state again: spectral norm's power iteration updates u per pass
    value, _ = seeded_r1(D_aug, real, 1e-4, seed=3)
    # Independently: D's plain forward on a leaf, first-order autograd (torch.func cannot run BatchNorm's and
    # spectral norm's in-place buffer updates), the same default-generator draws.
    x = real.clone().requires_grad_(True)
    torch.manual_seed(3)
    grad, = torch.autograd.grad(sum(l.sum() for l in D_aug_copy(x)), x)
    torch.testing.assert_close(value, 1e-4 / 2 * grad.square().sum(dim=[1, 2, 3]).mean(), rtol=1e-5, atol=0)
    plain, _ = seeded_r1(D, real, 1e-4, seed=3)
    assert abs(plain.item() - value.item()) > 1e-3 * value.item()  # DiffAugment changed the penalty
    value.backward()
    assert all(p.grad is None for p in D_aug.feature_networks.parameters())
    assert sum(p.grad.abs().sum() for p in D_aug.trainable_parameters() if p.grad is not None) > 0


class RecordingNet:
    """A 'denoiser' returning the clean point mass plus `offset`; records σ and the keyword arguments."""

    def __init__(self, target, offset=0.0):
        self.target, self.offset, self.calls = target, offset, []

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, class_labels=class_labels, augment_labels=augment_labels))
        return self.target.expand_as(x) + self.offset


def test_edm_loss_point_mass():
    images = torch.full([4096, 1, 1, 1], 0.3)
    perfect = RecordingNet(images[:1])
    assert loss.EDMLoss()(perfect, images).abs().max() == 0  # the ideal denoiser of a point mass
    off = RecordingNet(images[:1], offset=0.1)
    labels, aug = torch.ones(4096, 2), torch.zeros(4096, 9)
    per_element = loss.EDMLoss()(off, images, labels, augment_labels=aug)
    call = off.calls[0]
    assert call['class_labels'] is labels and call['augment_labels'] is aug
    sigma = call['sigma']
    noise = ((call['x'] - images) / sigma).flatten()  # n = σ·N(0, 1)
    assert abs(noise.mean().item()) < 5 / math.sqrt(4096) and abs(noise.std().item() - 1) < 0.06
    torch.testing.assert_close(per_element, (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * 0.1 ** 2)
    ln = sigma.log().flatten()  # ln σ ~ N(−1.2, 1.2²): mean within 5 standard errors
    assert abs(ln.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(4096)
    assert abs(ln.std().item() - 1.2) < 0.06


def test_ve_vp_losses():
    images = torch.zeros([4096, 1, 1, 1])
    ve, vp = RecordingNet(images[:1], 0.5), RecordingNet(images[:1], 0.5)
    ve_loss, vp_loss = loss.VELoss()(ve, images), loss.VPLoss()(vp, images)
    s_ve, s_vp = ve.calls[0]['sigma'], vp.calls[0]['sigma']
    torch.testing.assert_close(ve_loss, 0.25 / s_ve ** 2)
    torch.testing.assert_close(vp_loss, 0.25 / s_vp ** 2)
    u = (s_ve / 0.02).log() / math.log(100 / 0.02)  # log-uniform on [0.02, 100]
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * 4096)
    vp_sigma = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t * t + 0.1 * t) - 1)
    assert vp_sigma(1e-5) * 0.999 < s_vp.min() and s_vp.max() < vp_sigma(1.0) * 1.001


def test_diffusion_loss_draws_from_default_generator():
    net, images = tiny_generator(), torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    a = loss.EDMLoss()(net, images)
    torch.manual_seed(5)
    b = loss.EDMLoss()(net, images)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == images.shape


def test_grads_finite():
    params = [nn.Parameter(torch.zeros(3)) for _ in range(3)]
    assert loss.grads_finite(params).item()  # no gradients at all
    params[0].grad = torch.tensor([1.0, -3e38, 2.0])
    params[2].grad = torch.ones(3)
    result = loss.grads_finite(params)
    assert result.dtype == torch.bool and result.ndim == 0 and result.item()
    for bad in (float('nan'), float('inf'), -float('inf')):
        params[2].grad = torch.tensor([0.0, bad, 1.0])
        assert not loss.grads_finite(params).item()
