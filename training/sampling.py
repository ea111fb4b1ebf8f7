"""Samplers: EDM's Heun/Euler ODE/SDE solver and the D2O generator's one-/few-step schedule, per-seed
latents (image k depends only on seed k), and `generate_images`, the one sampling loop shared by generate.py,
snapshot grids and in-training FID (so all three sample alike). Pure tensor code: no file I/O, any device."""
import math

import torch

from torch_utils.distributed import rank_batches  # noqa: F401  (one per-rank split for sampling, FID, generate.py)

# The paper's noise levels, defined once (docs/method.md §7; EDM's schedule): the one-step generator starts from
# σmax = 80, EDM's schedule ends at σmin = 0.002 with ρ = 7, and a 2-step generator passes through σ = 0.8.
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
RHO = 7
MIDDLE_SIGMA = 0.8

# A sample's seed: its latent comes from torch.Generator().manual_seed(seed), which takes the seed mod 2³², so
# larger seeds would alias smaller ones. EDM's generate.py takes seeds < 2³² too (docs/edm-networks.md §6). The
# training --seed is a different number with its own bound (training/config.py: the per-rank seeds are mod 2³¹).
MAX_SEED = (1 << 32) - 1
GENERATOR_CLASS = 'D2OPrecond'  # networks sampled with the generator schedule by default
DEFAULT_STEPS = {'heun': 18, 'euler': 18, 'onestep': 1, 'multistep': 2}
SAMPLERS = tuple(DEFAULT_STEPS)


def is_generator(net):
    return type(net).__name__ == GENERATOR_CLASS


def default_sampler(net):
    return 'onestep' if is_generator(net) else 'heun'


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=SIGMA_MIN,
                sigma_max=SIGMA_MAX, rho=RHO, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, second_order=True):
    """EDM's sampler (docs/edm-networks.md §6), float64 throughout. With second_order=False every step is plain
    Euler (NFE = N); otherwise Heun with a plain Euler last step to σ=0 (NFE = 2N−1)."""
    if num_steps < 2:
        raise ValueError(f'edm_sampler needs num_steps >= 2, got {num_steps}')
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # Time steps: ρ-spaced from σmax to σmin, rounded to what the net supports, then 0.
    step = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t_steps = (hi + step / (num_steps - 1) * (lo - hi)) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: temporarily raise the noise level (noise is drawn even when γ=0, as EDM does, so the
        # per-seed random streams stay aligned with EDM's).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        denoised = net(x_hat, t_hat, class_labels=class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if second_order and i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels=class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def cut_sigma(r, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """ρ-schedule point at fraction r ∈ [0,1]: r=1 → σmax, r=0 → σmin (docs/method.md §7; the paper's
    T(i,N) with r=i/N)."""
    return (sigma_max ** (1 / rho) + (1 - r) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def generator_sigmas(num_steps=1, middle_sigma=MIDDLE_SIGMA, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    """Noise levels σ_0 = σmax > … > σ_K = σmin visited by a K-step generator (docs/method.md §7): two steps
    go through `middle_sigma`, K ≥ 3 follow cut_sigma(i/K)."""
    if num_steps < 1:
        raise ValueError(f'generator needs num_steps >= 1, got {num_steps}')
    if num_steps == 2:
        inner = [middle_sigma]
    else:
        inner = [cut_sigma(i / num_steps, sigma_min, sigma_max) for i in range(num_steps - 1, 0, -1)]
    return [float(sigma_max), *map(float, inner), float(sigma_min)]


def generator_sample(net, latents, class_labels=None, num_steps=1, middle_sigma=MIDDLE_SIGMA, sigma_max=SIGMA_MAX,
                     sigma_min=SIGMA_MIN, force_fp32=False):
    """Image from the D2O generator G (an x₀ predictor): one step x̂ = G(σmax·z, σmax); with K > 1 steps
    each G output moves v along the straight line to it, v ← v + (d − v)(σ_c − σ_n)/σ_c, and the last
    output is returned (docs/method.md §7). Differentiable, so the training loss uses it for fakes.
    σ is a [B,1,1,1] tensor of the latents' dtype; multi-step calls also pass `sigma_next` (the one-step
    call is exactly the official one, so any EDM preconditioner works there too). Returns float32."""
    sigmas = generator_sigmas(num_steps, middle_sigma, sigma_max, sigma_min)
    v = latents * sigmas[0]
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        sigma = torch.full([latents.shape[0], 1, 1, 1], s_cur, dtype=latents.dtype, device=latents.device)
        extra = {} if num_steps == 1 else {'sigma_next': torch.full_like(sigma, s_next)}
        d = net(v, sigma, class_labels=class_labels, force_fp32=force_fp32, **extra)
        if i == num_steps - 1:
            return d.to(torch.float32)
        v = v + (d.to(v.dtype) - v) * ((s_cur - s_next) / s_cur)


class StackedRandomGenerator:
    """One torch.Generator per seed (seed mod 2³²); every draw stacks one slice per generator along dim 0,
    so sample k depends only on seed k, whatever the batch size or GPU count (EDM semantics).
    Streams differ between CPU and CUDA generators."""

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (MAX_SEED + 1)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, device=self.device, **kwargs)
                            for gen in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout)

    def randint(self, high, size):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(high, size=size[1:], generator=gen, device=self.device)
                            for gen in self.generators])


def seeded_latents(seeds, shape, device, label_dim=0, class_idx=None):
    """Per-seed float32 latents [len(seeds), *shape] and one-hot class labels (None when label_dim=0):
    each generator draws its latent, then its class via randint(label_dim); `class_idx` forces one class.
    Also returns the generators, positioned after those draws, whose `randn_like` feeds the stochastic
    Heun sampler so its noise is per-seed too."""
    check_class_idx(label_dim, class_idx)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *shape])
    class_labels = None
    if label_dim:
        class_labels = torch.eye(label_dim, device=rnd.device)[rnd.randint(label_dim, size=[len(seeds)])]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
    return latents, class_labels, rnd


def check_class_idx(label_dim, class_idx):
    if class_idx is None:
        return
    if not label_dim:
        raise ValueError(f'class index {class_idx} given, but the network is unconditional (label_dim=0)')
    if not 0 <= class_idx < label_dim:
        raise ValueError(f'class index {class_idx} out of range: the network has {label_dim} classes '
                         f'(0..{label_dim - 1})')


def to_uint8(images):
    """[-1,1] NCHW images → uint8 NHWC on the same device: clip(x·127.5 + 128, 0, 255), truncated (EDM)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def generate_images(net, seeds, sampler=None, num_steps=None, class_idx=None, batch=64, rank=0, world_size=1,
                    device=None, **sampler_kwargs):
    """Iterator of (batch_seeds, uint8 NHWC images on `device`) for this rank's share of `seeds`.

    sampler: 'heun' / 'euler' (edm_sampler; default 18 steps; kwargs sigma_min, sigma_max, rho, S_churn,
    S_min, S_max, S_noise) or 'onestep' / 'multistep' (generator_sample in float64 with force_fp32, as
    D2O's generate.py; default 1 / 2 steps; kwargs middle_sigma, sigma_min, sigma_max). None picks onestep
    for a D2OPrecond, heun otherwise. Arguments are checked before the first batch is drawn.
    The caller puts `net` in eval mode."""
    sampler = sampler or default_sampler(net)
    if sampler not in SAMPLERS:
        raise ValueError(f'unknown sampler {sampler!r}; expected one of {", ".join(SAMPLERS)}')
    if sampler == 'onestep' and num_steps not in (None, 1):
        raise ValueError(f'the onestep sampler takes exactly 1 step, got num_steps={num_steps}')
    num_steps = num_steps or DEFAULT_STEPS[sampler]
    check_class_idx(net.label_dim, class_idx)
    if device is None:
        device = next(iter(net.parameters()), torch.empty(0)).device
    shape = [net.img_channels, net.img_resolution, net.img_resolution]

    def sample(batch_seeds):
        latents, class_labels, rnd = seeded_latents(batch_seeds, shape, device, net.label_dim, class_idx)
        with torch.no_grad():
            if sampler in ('heun', 'euler'):
                images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=num_steps,
                                     second_order=(sampler == 'heun'), **sampler_kwargs)
            else:
                images = generator_sample(net, latents.to(torch.float64), class_labels, num_steps=num_steps,
                                          force_fp32=True, **sampler_kwargs)
        return batch_seeds, to_uint8(images)
    return map(sample, rank_batches(seeds, batch, rank, world_size))


def training_sampler(gan, multi_step_g=1, middle_sigma=MIDDLE_SIGMA):
    """generate_images options for a network being trained: a GAN generator samples with its own K-step schedule
    (whatever its preconditioner class), a diffusion teacher with 18-step Heun."""
    if not gan:
        return dict(sampler='heun', num_steps=DEFAULT_STEPS['heun'])
    if multi_step_g == 1:
        return dict(sampler='onestep', num_steps=1)
    return dict(sampler='multistep', num_steps=multi_step_g, middle_sigma=middle_sigma)


def sample_uint8(net, seeds, device, batch=64, **options):
    """uint8 NHWC images of `seeds` (all of them, on this process) through generate_images: what snapshot
    grids and in-training FID use, so they sample exactly as generate.py does (float64 latents, fp32 network)."""
    images = [x for _, x in generate_images(net, seeds, batch=batch, rank=0, world_size=1, device=device, **options)]
    return torch.cat(images)
