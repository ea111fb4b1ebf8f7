"""The consistency-distillation objective (training/consistency.py): the T(i, N) schedule, the teacher's Heun
step against a hand computation, the loss against closed forms on a toy ODE whose consistency function is
known, stop-gradient on the target side, the distances' limits, LPIPS against torchvision's VGG16, and the
real fixture networks through one loss + backward (with and without freezing)."""
import copy
import math

import numpy as np
import pytest
import torch
import torchvision

from training import consistency as cd
from training import freeze, networks
from training.checkpoint import load_network

EPS = networks.D2O_EPSILON


class ScaledDenoiser(torch.nn.Module):
    """D(x; σ) = x·s²/(s² + σ²): the exact denoiser of Gaussian data N(0, s²I); its PF-ODE solution is
    x(σ) = x(σ₀)·√((s² + σ²)/(s² + σ₀²))."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s

    def forward(self, x, sigma, class_labels=None):
        return x * self.s ** 2 / (self.s ** 2 + torch.as_tensor(sigma) ** 2)


class PointDenoiser(torch.nn.Module):
    """D(x; σ) = μ: data at the single image μ. Its ODE paths x(σ) = μ + (x_t − μ)·σ/t are straight lines in σ,
    so a Heun step is exact, and f(x, σ) = μ + (x − μ)·ε/σ is its exact consistency function."""

    def __init__(self, mu):
        super().__init__()
        self.mu = torch.nn.Parameter(mu.clone())

    def forward(self, x, sigma, class_labels=None):
        return self.mu.expand_as(x)


class PointStudent(torch.nn.Module):
    """F_θ(x, σ) = μ_θ + (x − μ_θ)·ε/σ, with F_θ(x, ε) = x (the consistency boundary)."""

    def __init__(self, mu):
        super().__init__()
        self.mu = torch.nn.Parameter(mu.clone())

    def forward(self, x, sigma, class_labels=None):
        return self.mu + (x - self.mu) * (EPS / sigma)


def schedule_closed_form(i, n, sigma_min=0.002, sigma_max=80.0, rho=7):
    """Appendix C's T(i, N), written out independently."""
    return (sigma_max ** (1 / rho) + (1 - i / n) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_pair(t, u, batch):
    return torch.full([batch, 1, 1, 1], t), torch.full([batch, 1, 1, 1], u)

#----------------------------------------------------------------------------
# Schedule.

def test_schedule_is_appendix_c_and_reversed_edm():
    sigmas = cd.cd_sigmas(18).numpy()
    expected = np.array([schedule_closed_form(i, 18) for i in range(19)])
    np.testing.assert_allclose(sigmas, expected, rtol=1e-12)
    assert sigmas[0] == pytest.approx(0.002, rel=1e-12) and sigmas[-1] == pytest.approx(80.0, rel=1e-12)
    # EDM's 19-point ρ-schedule (σmax → σmin) is the same grid read backwards.
    k = np.arange(19)
    edm = (80 ** (1 / 7) + k / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[::-1], edm, rtol=1e-12)
    assert np.all(np.diff(sigmas) > 0)
    with pytest.raises(ValueError, match='num_scales'):
        cd.cd_sigmas(0)


def test_sigma_pairs_are_adjacent_and_cover_every_step():
    torch.manual_seed(0)
    t, u = cd.draw_sigma_pairs(4000, 'cpu')
    grid = cd.cd_sigmas(18).to(torch.float32)
    i_t = (t.flatten()[:, None] == grid[None]).float().argmax(dim=1)
    i_u = (u.flatten()[:, None] == grid[None]).float().argmax(dim=1)
    assert torch.equal(grid[i_t], t.flatten()) and torch.equal(grid[i_u], u.flatten())  # on the grid exactly
    assert torch.equal(i_t, i_u + 1)
    assert set(i_t.tolist()) == set(range(1, 19))  # i ~ U{1..18}: all 18 pairs occur, none outside
    counts = torch.bincount(i_t, minlength=19)[1:].float()
    assert counts.min() > 4000 / 18 * 0.7 and counts.max() < 4000 / 18 * 1.3
    assert float(u.min()) == float(torch.tensor(0.002, dtype=torch.float32))

#----------------------------------------------------------------------------
# Heun step.

def test_heun_step_equals_hand_computation():
    # s = 0.5, t = 2, u = 1, x = 1: c(2) = 1/17, slope_t = (16/17)/2 = 8/17, Euler 1 − 8/17 = 9/17,
    # c(1) = 1/5, slope_u = (9/17)(4/5) = 7.2/17, Heun 1 − (8/17 + 7.2/17)/2 = 9.4/17.
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    out = cd.heun_step(ScaledDenoiser(0.5), x, torch.tensor(2.0, dtype=torch.float64),
                       torch.tensor(1.0, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), 9.4 / 17, rtol=1e-14)


def test_heun_step_is_second_order():
    """Local error against the exact ODE solution shrinks ~h³ (factor ~8 when h halves)."""
    teacher, x = ScaledDenoiser(0.5), torch.ones(1, 1, 1, 1, dtype=torch.float64)
    exact = lambda t, u: math.sqrt((0.25 + u ** 2) / (0.25 + t ** 2))
    errors = []
    for h in (0.2, 0.1, 0.05):
        t, u = 1.0, 1.0 - h
        step = cd.heun_step(teacher, x, torch.tensor(t, dtype=torch.float64), torch.tensor(u, dtype=torch.float64))
        errors.append(abs(float(step) - exact(t, u)))
    assert 6 < errors[0] / errors[1] < 10 and 6 < errors[1] / errors[2] < 10


def test_heun_step_is_exact_on_straight_paths():
    mu = torch.randn(1, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4)
    t, u = sigma_pair(5.0, 3.0, 2)
    out = cd.heun_step(PointDenoiser(mu), x, t, u)
    torch.testing.assert_close(out, mu + (x - mu) * 3.0 / 5.0, rtol=1e-6, atol=1e-6)

#----------------------------------------------------------------------------
# The loss on the point-data ODE.

@pytest.mark.parametrize('distance', ['l2', 'pseudo_huber'])
def test_loss_is_zero_for_the_exact_consistency_function(distance):
    torch.manual_seed(1)
    mu = torch.randn(1, 3, 8, 8)
    loss, stats = cd.consistency_loss(PointStudent(mu), PointDenoiser(mu), torch.randn(16, 3, 8, 8), distance=distance)
    assert float(loss.detach()) < 1e-10
    assert float(stats['Loss/CD/loss']) == float(loss.detach())


def test_terms_and_gradient_equal_closed_form():
    """online − target = (μ − μ_θ)·ε·(1/t − 1/u); with the target under stop-gradient the L2 gradient is
    2·mean_b[r·(1 − ε/t)]/d per element; a gradient through the target would add −(1 − ε/u)."""
    torch.manual_seed(2)
    mu, mu_theta = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)
    student, teacher = PointStudent(mu_theta), PointDenoiser(mu)
    t = torch.tensor([80.0, 2.5, 0.01], dtype=torch.float64).reshape(-1, 1, 1, 1)
    u = torch.tensor([60.0, 1.0, 0.002], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_t = torch.randn(3, 3, 4, 4, dtype=torch.float64) * t
    terms, online, goal = cd.consistency_terms(student, teacher, x_t, t, u)
    residual = (mu - mu_theta) * EPS * (1 / t - 1 / u)
    torch.testing.assert_close(online - goal, residual, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(terms, residual.square().flatten(1).mean(1), rtol=1e-8, atol=0)
    assert not goal.requires_grad and online.requires_grad
    terms.mean().backward()
    d = mu[0].numel()
    expected = (2 * residual * (1 - EPS / t) / d).mean(dim=0, keepdim=True)
    torch.testing.assert_close(student.mu.grad, expected, rtol=1e-8, atol=1e-18)
    assert teacher.mu.grad is None  # the frozen teacher gets nothing even with requires_grad on


def test_loss_equals_terms_at_the_drawn_sigmas():
    """consistency_loss = mean of consistency_terms at the (t, u, noise) it draws: i first, then the noise."""
    mu, images = torch.randn(1, 3, 4, 4), torch.rand(5, 3, 4, 4) * 2 - 1
    student, teacher = PointStudent(mu + 0.3), PointDenoiser(mu)
    torch.manual_seed(3)
    loss, stats = cd.consistency_loss(student, teacher, images)
    torch.manual_seed(3)
    t, u = cd.draw_sigma_pairs(5, 'cpu')
    x_t = images + t * torch.randn_like(images)
    terms, _, _ = cd.consistency_terms(student, teacher, x_t, t, u)
    torch.testing.assert_close(loss, terms.mean(), rtol=1e-6, atol=0)
    assert float(stats['Loss/CD/sigma']) == pytest.approx(float(t.mean()))


def test_separate_target_network_gets_no_gradient():
    mu = torch.randn(1, 3, 4, 4)
    student, target = PointStudent(mu + 0.1), PointStudent(mu - 0.2)
    loss, _ = cd.consistency_loss(student, PointDenoiser(mu), torch.randn(4, 3, 4, 4), target=target)
    loss.backward()
    assert target.mu.grad is None and student.mu.grad is not None and float(student.mu.grad.abs().sum()) > 0

#----------------------------------------------------------------------------
# Distances.

def test_pseudo_huber_limits():
    a = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    c = cd.PSEUDO_HUBER_C * math.sqrt(3 * 8 * 8)
    small = a + 1e-6 * torch.randn_like(a)
    norm2 = (small - a).square().flatten(1).sum(1)
    got = cd.pseudo_huber_distance(small, a)
    torch.testing.assert_close(got, norm2 / (2 * c), rtol=1e-6, atol=0)  # quadratic: ‖r‖²/(2c)
    torch.testing.assert_close(got, cd.l2_distance(small, a) * a[0].numel() / (2 * c), rtol=1e-6, atol=0)
    large = a + 10 * torch.randn_like(a)
    norm = (large - a).flatten(1).norm(dim=1)
    got = cd.pseudo_huber_distance(large, a)
    torch.testing.assert_close(got, norm - c + c * c / (2 * norm), rtol=1e-12, atol=0)  # linear: ‖r‖ − c + O(c²/‖r‖)
    assert torch.all(got / norm > 0.9999)
    assert torch.equal(cd.pseudo_huber_distance(a, a), torch.zeros(2, dtype=torch.float64))


def test_pseudo_huber_c_for_cifar10_is_icts_value():
    # iCT uses c = 0.03 for CIFAR-10 (d = 3·32·32): 0.00054·√3072 = 0.02993.
    assert cd.PSEUDO_HUBER_C * math.sqrt(3 * 32 * 32) == pytest.approx(0.029930, abs=1e-6)


def test_distance_names_are_checked():
    assert cd.make_distance('l2') is cd.l2_distance
    with pytest.raises(ValueError, match='unknown distance'):
        cd.make_distance('l1')
    with pytest.raises(ValueError, match='LPIPS weight files'):
        cd.make_distance('lpips')

#----------------------------------------------------------------------------
# LPIPS from weight files.

@pytest.fixture(scope='module')
def lpips_files(tmp_path_factory):
    """Random VGG16 features (torchvision's own layer builder; the classifier, which LPIPS ignores, is left out of
    the file) and random positive linear heads, saved like the real files."""
    torch.manual_seed(4)
    vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D']).eval()
    lin = {f'lin{k}.model.1.weight': torch.rand(1, c, 1, 1) for k, c in enumerate([64, 128, 256, 512, 512])}
    folder = tmp_path_factory.mktemp('lpips')
    torch.save({f'features.{key}': value for key, value in vgg.state_dict().items()}, folder / 'vgg16.pth')
    torch.save(lin, folder / 'lin.pth')
    return vgg, lin, str(folder / 'vgg16.pth'), str(folder / 'lin.pth')


def test_lpips_matches_torchvision_vgg16(lpips_files, monkeypatch):
    monkeypatch.setattr(cd, 'LPIPS_RESOLUTION', 32)  # small input: same layers, cheaper
    vgg, lin, vgg_file, lin_file = lpips_files
    metric = cd.LPIPS(vgg_file, lin_file)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1

    def taps(x):  # torchvision's features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        x = torch.nn.functional.interpolate(x, size=32, mode='bilinear', align_corners=False)
        x = (x - torch.tensor([-.030, -.088, -.188]).reshape(1, 3, 1, 1)) / torch.tensor([.458, .448, .450]).reshape(1, 3, 1, 1)
        out = []
        for index, layer in enumerate(vgg[:30]):
            x = layer(x)
            if index in (3, 8, 15, 22, 29):
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    with torch.no_grad():
        expected = sum(((fa - fb) ** 2 * lin[f'lin{k}.model.1.weight']).sum(1).mean([1, 2])
                       for k, (fa, fb) in enumerate(zip(taps(a), taps(b))))
        got = metric(a, b)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert torch.all(got > 0) and torch.equal(metric(a, a), torch.zeros(2))
    # As the CD distance: the toy loss runs through it and is zero at the exact consistency function.
    mu = torch.randn(1, 3, 16, 16)
    loss, _ = cd.consistency_loss(PointStudent(mu), PointDenoiser(mu), a, distance='lpips', lpips=metric)
    assert float(loss.detach()) < 1e-6


def test_lpips_files_found_in_the_torch_hub_cache(lpips_files, tmp_path, monkeypatch):
    _, _, vgg_file, lin_file = lpips_files
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    assert cd.lpips_weight_files(None, lin_file) == (None, lin_file)  # empty cache: nothing found
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / cd.VGG16_CACHE_NAME).write_bytes(open(vgg_file, 'rb').read())
    assert cd.lpips_weight_files(None, lin_file) == (str(tmp_path / 'checkpoints' / cd.VGG16_CACHE_NAME), lin_file)
    assert cd.lpips_weight_files(vgg_file, lin_file) == (vgg_file, lin_file)  # given paths win
    with pytest.raises(FileNotFoundError, match='none was given or found'):
        cd.LPIPS(None, lin_file)


def test_lpips_file_errors(lpips_files, tmp_path):
    _, lin, vgg_file, lin_file = lpips_files
    with pytest.raises(FileNotFoundError, match='nothing is downloaded'):
        cd.LPIPS(str(tmp_path / 'missing.pth'), lin_file)
    bad = tmp_path / 'lin-bad.pth'
    torch.save({k: v[:, :3] for k, v in lin.items()}, bad)
    with pytest.raises(ValueError, match=r'lin0.model.1.weight should be a tensor of shape \(1, 64, 1, 1\)'):
        cd.LPIPS(vgg_file, str(bad))
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match='not a plain tensor state dict'):
        cd.LPIPS(str(junk), lin_file)

#----------------------------------------------------------------------------
# The real fixture networks: D2O student, EDM (VE) teacher of the same shape.

@pytest.fixture(scope='module')
def loaded_pair(fixtures_dir):
    student = load_network(str(fixtures_dir / 'd2o_ncsnpp_uncond16.pkl'), key='net')
    teacher = load_network(str(fixtures_dir / 'edm_ve_ncsnpp_uncond16.pkl'))
    assert (student.img_resolution, student.img_channels) == (teacher.img_resolution, teacher.img_channels)
    return student, teacher


@pytest.fixture()
def fixture_pair(loaded_pair):
    student, teacher = (copy.deepcopy(net) for net in loaded_pair)
    return student.train().requires_grad_(True), teacher


def test_fixture_boundary_target_is_the_heun_point(fixture_pair):
    """At u = T(0, N) = ε the D2O preconditioner returns its input, so the target equals the teacher's Heun
    step exactly."""
    student, teacher = fixture_pair
    torch.manual_seed(5)
    sigmas = cd.cd_sigmas().to(torch.float32)
    t, u = sigma_pair(float(sigmas[1]), float(sigmas[0]), 2)
    x_t = torch.rand(2, 3, 16, 16) * 2 - 1 + t * torch.randn(2, 3, 16, 16)
    _, _, goal = cd.consistency_terms(student, teacher, x_t, t, u)
    assert torch.equal(goal, cd.heun_step(teacher, x_t, t, u))


@pytest.mark.parametrize('level', [0, 1])
def test_fixture_loss_backward_reaches_only_trainable_student_params(fixture_pair, level):
    student, teacher = fixture_pair
    teacher.requires_grad_(True)  # even so, the teacher runs without a graph
    trainable = {name for name, _ in freeze.select_trainable(student, level=level)}
    torch.manual_seed(6)
    loss, stats = cd.consistency_loss(student, teacher, torch.rand(2, 3, 16, 16) * 2 - 1, distance='pseudo_huber')
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    with_grad = {name for name, p in student.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in teacher.parameters())
    if level == 1:
        assert len(trainable) < len(list(student.parameters()))
