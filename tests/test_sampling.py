import copy
import functools
import math

import numpy as np
import pytest
import torch

from training import checkpoint
from training.sampling import (cut_sigma, edm_sampler, generate_images, generator_sample, generator_sigmas,
                               rank_batches, seeded_latents, to_uint8)

EDM_FIXTURES = ['edm_vp_ddpmpp_cond16', 'edm_ve_ncsnpp_uncond16', 'edm_edm_ncsnpp_uncond32', 'edm_edm_adm_cond16',
                'edm_iddpm_adm_uncond16']
D2O_FIXTURES = ['d2o_ncsnpp_uncond16', 'd2o_adm_cond16']


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser D(x;σ) = E[x0 | x0 + σn] for data x0 ~ N(mu, s²) per pixel; records its calls.
    A learnable `gain` multiplies the output so gradients have somewhere to go."""
    sigma_min, sigma_max, img_channels, img_resolution = 0, float('inf'), 1, 4

    def __init__(self, mu=0.3, s=0.5, label_dim=0, round_to=None):
        super().__init__()
        self.mu, self.s, self.label_dim, self.round_to = mu, s, label_dim, round_to
        self.gain = torch.nn.Parameter(torch.ones([]))
        self.calls = []

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma if self.round_to is None else (sigma / self.round_to).round() * self.round_to

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **kwargs):
        self.calls.append(dict(x=x, sigma=sigma, class_labels=class_labels, force_fp32=force_fp32, **kwargs))
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return (self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)) * self.gain

    def ode_solution(self, z, sigma_max=80.0, sigma_min=0.002):
        """Exact probability-flow ODE from σmax to σmin ((x−mu)/sqrt(s²+σ²) is constant), then D at σmin,
        which is what a perfect solver with EDM's final step returns."""
        s = self.s
        scale = s ** 2 / (math.sqrt(s ** 2 + sigma_min ** 2) * math.sqrt(s ** 2 + sigma_max ** 2))
        return self.mu + (z * sigma_max - self.mu) * scale


def _z(shape=(2, 1, 4, 4), seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@functools.lru_cache(maxsize=None)
def _load_cached(path, key):
    return checkpoint.load_network(path, key=key)


def _load(fixtures_dir, name, key='ema'):
    """(network, golden arrays); the network is shared between tests, so tests must not modify it."""
    return _load_cached(str(fixtures_dir / f'{name}.pkl'), key), np.load(fixtures_dir / f'{name}.npz')


#----------------------------------------------------------------------------
# EDM sampler on the analytic denoiser.

def test_heun_converges_to_exact_ode_solution_at_second_order():
    net, z = GaussianDenoiser(), _z()
    exact = net.ode_solution(z)
    err = {}
    for second_order in (True, False):
        for n in (32, 64):
            net.calls.clear()
            out = edm_sampler(net, z, num_steps=n, second_order=second_order)
            err[second_order, n] = (out - exact).abs().max().item()
            assert len(net.calls) == (2 * n - 1 if second_order else n)  # NFE
    assert 3.6 < err[True, 32] / err[True, 64] < 4.8   # Heun: error ∝ h²
    assert 1.8 < err[False, 32] / err[False, 64] < 2.2  # Euler: error ∝ h
    assert (edm_sampler(net, z, num_steps=512) - exact).abs().max().item() < 1e-4
    assert edm_sampler(net, z.float(), num_steps=4).dtype == torch.float64


def test_edm_sampler_clamps_to_net_sigma_range_and_rounds():
    net, z = GaussianDenoiser(round_to=0.01), _z()
    net.sigma_min, net.sigma_max = 0.05, 20.0
    edm_sampler(net, z, num_steps=5)
    sigmas = [float(c['sigma']) for c in net.calls]
    i = np.arange(5)
    expected = (20 ** (1 / 7) + i / 4 * (0.05 ** (1 / 7) - 20 ** (1 / 7))) ** 7
    expected = np.round(expected / 0.01) * 0.01
    # Heun: (t_i, t_{i+1}) pairs, then the final Euler step at t_{N-1}.
    assert np.allclose(sigmas, [expected[0], expected[1], expected[1], expected[2], expected[2], expected[3],
                                expected[3], expected[4], expected[4]], rtol=0, atol=1e-12)
    assert torch.equal(net.calls[0]['x'], z * 20.0)


def test_stochastic_heun_noise_is_per_seed():
    net = GaussianDenoiser()
    kwargs = dict(sampler='heun', num_steps=6, S_churn=10, S_min=0.01, S_max=50, S_noise=1.003)
    full = next(generate_images(net, list(range(8)), batch=8, **kwargs))[1]
    split = torch.cat([images for _, images in generate_images(net, list(range(8)), batch=3, **kwargs)])
    assert torch.equal(full, split)
    deterministic = next(generate_images(net, list(range(8)), batch=8, sampler='heun', num_steps=6))[1]
    assert not torch.equal(full, deterministic)  # churn noise really was added


#----------------------------------------------------------------------------
# Generator schedule (docs/method.md §7).

def test_cut_sigma_and_generator_sigmas():
    assert cut_sigma(1) == pytest.approx(80, rel=1e-12) and cut_sigma(0) == pytest.approx(0.002, rel=1e-12)
    assert cut_sigma(0.5) == pytest.approx(((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, rel=1e-12)
    assert generator_sigmas(1) == [80.0, 0.002]
    assert generator_sigmas(2, middle_sigma=0.8) == [80.0, 0.8, 0.002]
    expected = [80.0, cut_sigma(0.75), cut_sigma(0.5), cut_sigma(0.25), 0.002]
    assert generator_sigmas(4) == pytest.approx(expected, rel=1e-12)


def test_one_step_call_is_the_official_one():
    net, z = GaussianDenoiser(), _z(dtype=torch.float32)
    out = generator_sample(net, z)
    (call,) = net.calls
    assert torch.equal(call['x'], 80 * z) and 'sigma_next' not in call
    assert call['sigma'].shape == (2, 1, 1, 1) and call['sigma'].dtype == torch.float32 and (call['sigma'] == 80).all()
    assert out.dtype == torch.float32 and torch.allclose(out, net(80 * z, 80.0), rtol=0, atol=0)


def test_two_step_moves_to_middle_sigma():
    net, z = GaussianDenoiser(), _z()
    out = generator_sample(net, z, num_steps=2, middle_sigma=0.8)
    first, second = net.calls
    assert (first['sigma'] == 80).all() and (first['sigma_next'] == 0.8).all()
    assert (second['sigma'] == 0.8).all() and (second['sigma_next'] == 0.002).all()
    v, x0 = 80 * z, net(80 * z, 80.0)
    assert torch.allclose(second['x'], v + (x0 - v) * (80 - 0.8) / 80, rtol=0, atol=1e-11)
    assert out.dtype == torch.float32 and torch.equal(out, net(second['x'], 0.8).float())


def test_k_step_generator_is_euler_on_the_rho_schedule():
    # On a denoiser, K Euler moves along cut_sigma(i/K) equal EDM's Euler sampler with N=K steps ending at
    # σmin = cut_sigma(1/K): its ρ-spaced points are exactly cut_sigma((K−i)/K), and its step to 0 returns D.
    net, z = GaussianDenoiser(), _z()
    for k in (3, 5):
        multi = generator_sample(net, z, num_steps=k).double()
        euler = edm_sampler(net, z, num_steps=k, sigma_min=cut_sigma(1 / k), second_order=False)
        assert (multi - euler.float().double()).abs().max() < 1e-6


@pytest.mark.parametrize('num_steps', [1, 2, 3])
def test_generator_sample_is_differentiable(num_steps):
    net, z = GaussianDenoiser(), _z(dtype=torch.float32)
    generator_sample(net, z, num_steps=num_steps).square().sum().backward()
    assert net.gain.grad is not None and net.gain.grad.abs() > 0


#----------------------------------------------------------------------------
# Per-seed randomness and conversions.

def test_seeded_latents_follow_edm_generator_semantics():
    seeds = [0, 5, 2 ** 32 + 7]
    latents, labels, rnd = seeded_latents(seeds, [3, 4, 4], 'cpu', label_dim=10)
    for k, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed % 2 ** 32)
        assert torch.equal(latents[k], torch.randn([3, 4, 4], generator=gen))
        assert labels[k].sum() == 1 and labels[k, torch.randint(10, [], generator=gen)] == 1
        assert torch.equal(rnd.generators[k].get_state(), gen.get_state())  # ready for the sampler's noise
    assert latents.dtype == torch.float32
    same, _, _ = seeded_latents([7], [3, 4, 4], 'cpu')
    assert torch.equal(same[0], latents[2])  # seed mod 2^32
    _, forced, _ = seeded_latents(seeds, [3, 4, 4], 'cpu', label_dim=10, class_idx=4)
    assert torch.equal(forced, torch.eye(10)[[4, 4, 4]])
    assert seeded_latents(seeds, [1], 'cpu')[1] is None
    with pytest.raises(ValueError, match='unconditional'):
        seeded_latents(seeds, [1], 'cpu', class_idx=0)
    with pytest.raises(ValueError, match='out of range'):
        seeded_latents(seeds, [1], 'cpu', label_dim=10, class_idx=10)


def test_rank_batches_split_like_edm():
    # ceil(10/(3·2))·2 = 4 chunks of 3,3,2,2; rank r takes chunks r, r+2.
    assert rank_batches(range(10), 3, rank=0, world_size=2) == [[0, 1, 2], [6, 7]]
    assert rank_batches(range(10), 3, rank=1, world_size=2) == [[3, 4, 5], [8, 9]]
    assert rank_batches([4, 9], 64) == [[4, 9]]
    assert rank_batches([1], 64, rank=1, world_size=2) == []


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, -0.001, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 128, 191, 255, 255]


#----------------------------------------------------------------------------
# Real checkpoints with golden outputs.

@pytest.mark.parametrize('name', EDM_FIXTURES)
def test_edm_sampler_reproduces_fixture_goldens(fixtures_dir, name):
    net, data = _load(fixtures_dir, name)
    latents = torch.from_numpy(data['sampler_latents'])
    labels = torch.from_numpy(data['sampler_class_labels']) if 'sampler_class_labels' in data else None
    for n in (4, 18):
        out = edm_sampler(net, latents, labels, num_steps=n).numpy()
        ref = data[f'sampler_out_{n}steps']
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), (name, n)


@pytest.mark.parametrize('name', D2O_FIXTURES)
@pytest.mark.parametrize('key', ['ema', 'net'])
def test_one_step_generator_reproduces_fixture_goldens(fixtures_dir, name, key):
    net, data = _load(fixtures_dir, name, key)
    labels = torch.from_numpy(data['class_labels']) if 'class_labels' in data else None
    ref = data[f'y_onestep_{key}']
    for dtype in (torch.float32, torch.float64):  # training (float32) and D2O's generate.py (float64)
        out = generator_sample(net, torch.from_numpy(data['z']).to(dtype), labels).numpy()
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_multi_step_generator_gradient_reaches_fixture_weights(fixtures_dir):
    net, data = _load(fixtures_dir, 'd2o_adm_cond16', 'net')
    net = copy.deepcopy(net).train().requires_grad_(True)
    out = generator_sample(net, torch.from_numpy(data['z']).float(), torch.from_numpy(data['class_labels']).float(),
                           num_steps=2)
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize('name,sampler', [('edm_edm_adm_cond16', 'heun'), ('d2o_adm_cond16', 'onestep'),
                                          ('d2o_ncsnpp_uncond16', 'multistep')])
def test_generate_images_is_batch_size_invariant(fixtures_dir, name, sampler):
    net, _ = _load(fixtures_dir, name)
    steps = 4 if sampler == 'heun' else None
    seeds = list(range(8))
    by_8 = list(generate_images(net, seeds, sampler=sampler, num_steps=steps, batch=8))
    by_3 = list(generate_images(net, seeds, sampler=sampler, num_steps=steps, batch=3))
    assert [s for s, _ in by_3] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert torch.equal(by_8[0][1], torch.cat([images for _, images in by_3]))
    assert by_8[0][1].shape == (8, 16, 16, 3) and by_8[0][1].dtype == torch.uint8
    # The images are the sampler's output on the per-seed latents.
    latents, labels, _ = seeded_latents(seeds, [3, 16, 16], 'cpu', net.label_dim)
    if sampler == 'heun':
        expected = edm_sampler(net, latents, labels, num_steps=4)
    else:
        expected = generator_sample(net, latents.double(), labels, num_steps=1 if sampler == 'onestep' else 2)
    assert torch.equal(by_8[0][1], to_uint8(expected))


def test_generate_images_checks_arguments_eagerly():
    net = GaussianDenoiser()
    with pytest.raises(ValueError, match='unconditional'):
        generate_images(net, [0], class_idx=0)
    with pytest.raises(ValueError, match='exactly 1 step'):
        generate_images(net, [0], sampler='onestep', num_steps=2)
    with pytest.raises(ValueError, match='unknown sampler'):
        generate_images(net, [0], sampler='ddim')


def test_training_sampler_options_and_sample_uint8_is_generate_images():
    from training.sampling import MIDDLE_SIGMA, SIGMA_MAX, SIGMA_MIN, sample_uint8, training_sampler
    assert (SIGMA_MAX, SIGMA_MIN, MIDDLE_SIGMA) == (80.0, 0.002, 0.8) and generator_sigmas(1) == [SIGMA_MAX, SIGMA_MIN]
    assert training_sampler(gan=False) == dict(sampler='heun', num_steps=18)
    assert training_sampler(gan=True) == dict(sampler='onestep', num_steps=1)
    assert training_sampler(gan=True, multi_step_g=2, middle_sigma=0.5) == dict(sampler='multistep', num_steps=2,
                                                                                 middle_sigma=0.5)
    net = GaussianDenoiser(label_dim=3)
    seeds = [4, 0, 7, 2, 9]
    for options in (training_sampler(True), training_sampler(True, 2, 0.5), dict(sampler='heun', num_steps=3)):
        # What grids and in-training FID get (any batch size) is generate.py's output, image for image.
        expected = torch.cat([images for _, images in generate_images(net, seeds, batch=64, **options)])
        assert torch.equal(sample_uint8(net, seeds, 'cpu', batch=2, **options), expected)
        assert expected.shape == (5, 4, 4, 1) and expected.dtype == torch.uint8
