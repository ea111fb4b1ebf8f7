"""Frequency analysis of a diffusion network (paper §4.5, Fig. 4; Appendix E, Fig. 6).

The paper's metric is the log-frequency difference
    D_FFT(x1, x2) = log(|FFT(x1)| + 1) − log(|FFT(x2)| + 1)
on centred 2-D spectra (fftshift), summarised by radial averages: bin k holds the frequencies whose distance
from the centre rounds to k, i.e. k cycles per image along the radius. Spectra are the plain (unnormalised)
DFT over the last two dimensions, as numpy's/torch's default FFT.

Two analyses run on one EDM sampler trajectory (training.sampling.edm_sampler, unchanged):
- trajectory (Fig. 4): at sampler step t (t = 0 is the first step, σ_t = σmax) I_t is the image the denoiser
  receives, x̂_t (noise level σ_t; with S_churn > 0 the churned x̂ at t̂), and O_t = D(x̂_t; σ_t) its output,
  the x₀ estimate. For the Heun sampler only the first network call of each step counts (the one at σ_t;
  the corrector call at σ_{t+1} is left out), so every step contributes exactly one (I_t, O_t) pair.
  Reported: radial D_FFT(O_t, O_{t−1}) for t ≥ 1 and radial D_FFT(O_t, I_t) for every t;
- blocks (Fig. 6): forward hooks on every U-Net block (UNetBlock, encoder then decoder) record, per network
  call, D_t^b = D_FFT(x_t^b, x_t^{b−1}) between the block's output x^b and its input x^{b−1}. Blocks change
  the channel count (and decoder inputs are concatenations with skips), so each side's log spectrum is
  averaged over batch and channels first; up/down blocks change the resolution, so both spectra are scaled
  to the input's pixel count (a constant image keeps its DC value) and compared on the common radial bins
  (same cycles per image). Also the average feature maps (batch and channel mean of each block's output).
Everything is averaged over the batch; float64 throughout."""
import torch

from training.networks import UNetBlock
from training.sampling import edm_sampler

#----------------------------------------------------------------------------
# Spectra and radial averages.


def log_spectrum(x, scale=1.0):
    """Centred log(|FFT(x)|·scale + 1) over the last two dimensions (float64)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.to(torch.float64)), dim=(-2, -1))
    return torch.log1p(spectrum.abs() * scale)


def d_fft(x1, x2):
    """The paper's D_FFT(x1, x2) = log(|FFT(x1)|+1) − log(|FFT(x2)|+1), centred (paper §4.5)."""
    return log_spectrum(x1) - log_spectrum(x2)


def radial_bins(height, width, device=None):
    """(bin index [H, W], pixel count per bin [R]) of a centred H×W spectrum: bin = round(distance from the
    fftshift centre (H//2, W//2)), so bin k collects frequencies of about k cycles per image."""
    rows = torch.arange(height, device=device, dtype=torch.float64) - height // 2
    cols = torch.arange(width, device=device, dtype=torch.float64) - width // 2
    radius = torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)
    index = torch.round(radius).to(torch.int64)
    return index, torch.bincount(index.flatten())


def radial_average(spectrum):
    """Mean of a centred spectrum [..., H, W] over each radial bin → [..., R]. With the bin weights of
    `radial_bins` the weighted mean of the profile equals the mean of the spectrum."""
    index, counts = radial_bins(*spectrum.shape[-2:], device=spectrum.device)
    flat = spectrum.reshape(-1, index.numel()).to(torch.float64)
    sums = torch.zeros(flat.shape[0], len(counts), dtype=torch.float64, device=spectrum.device)
    sums.index_add_(1, index.flatten(), flat)
    return (sums / counts.to(torch.float64)).reshape(*spectrum.shape[:-2], len(counts))


def mean_log_spectrum(x, scale=1.0):
    """log spectrum averaged over every leading dimension (batch, channels) → [H, W]."""
    return log_spectrum(x, scale).reshape(-1, *x.shape[-2:]).mean(0)


def block_difference(x_out, x_in):
    """Radial D_FFT between a block's output and input feature maps [B, C, H, W] (module doc): channel- and
    batch-averaged log spectra, both scaled to the input's pixel count, on their common bins."""
    pixels_in = x_in.shape[-2] * x_in.shape[-1]
    profile_out = radial_average(mean_log_spectrum(x_out, pixels_in / (x_out.shape[-2] * x_out.shape[-1])))
    profile_in = radial_average(mean_log_spectrum(x_in))
    bins = min(len(profile_out), len(profile_in))
    return profile_out[:bins] - profile_in[:bins]

#----------------------------------------------------------------------------
# Recording a sampler trajectory.


class DenoiserRecorder(torch.nn.Module):
    """Wraps a denoiser so that edm_sampler runs unchanged and every call's (σ, input, output) is kept."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, sigma, class_labels=None, **kwargs):
        out = self.net(x, sigma, class_labels=class_labels, **kwargs)
        self.calls.append((float(torch.as_tensor(sigma).flatten()[0]), x.detach().to(torch.float64).cpu(),
                           out.detach().to(torch.float64).cpu()))
        return out

    def __getattr__(self, name):
        # sigma_min, sigma_max, round_sigma, label_dim, ... come from the wrapped network.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__('net'), name)


def step_call_indices(num_steps, heun):
    """Indices of the network calls that open each sampler step: Heun calls the network twice per step
    except the last (2N−1 calls), Euler once per step."""
    return [2 * i for i in range(num_steps)] if heun else list(range(num_steps))


def sample_trajectory(net, latents, class_labels=None, num_steps=18, heun=True, randn_like=torch.randn_like,
                      **schedule):
    """Run edm_sampler with `net` wrapped; returns (final images, steps, number of network calls), where
    steps[t] = (σ_t, I_t, O_t) (module doc). `schedule`: sigma_min, sigma_max, rho, S_churn, ..."""
    recorder = DenoiserRecorder(net)
    with torch.no_grad():
        images = edm_sampler(recorder, latents, class_labels, randn_like=randn_like, num_steps=num_steps,
                             second_order=heun, **schedule)
    steps = [recorder.calls[i] for i in step_call_indices(num_steps, heun)]
    return images, steps, len(recorder.calls)


def trajectory_profiles(steps):
    """Radial averages (batch and channel mean) of D_FFT(O_t, O_{t−1}) [T−1, R] and D_FFT(O_t, I_t) [T, R],
    and the matching centred 2-D maps (batch and channel mean), for the steps of `sample_trajectory`."""
    out_out = [d_fft(steps[t][2], steps[t - 1][2]).mean(dim=(0, 1)) for t in range(1, len(steps))]
    out_in = [d_fft(o, i).mean(dim=(0, 1)) for _, i, o in steps]
    return dict(sigmas=[s for s, _, _ in steps],
                out_prev_maps=torch.stack(out_out) if out_out else torch.zeros(0),
                out_in_maps=torch.stack(out_in),
                out_prev_radial=radial_average(torch.stack(out_out)) if out_out else torch.zeros(0),
                out_in_radial=radial_average(torch.stack(out_in)))

#----------------------------------------------------------------------------
# Block-wise recording (forward hooks).


def unet_blocks(net):
    """(name, UNetBlock) of a preconditioned SongUNet/DhariwalUNet in execution order: encoder, then decoder."""
    unet = getattr(net, 'model', net)
    if not hasattr(unet, 'enc') or not hasattr(unet, 'dec'):
        raise ValueError(f'{type(unet).__name__} is not a SongUNet/DhariwalUNet: no enc/dec blocks to hook')
    return [(f'{part}.{name}', block) for part in ('enc', 'dec') for name, block in getattr(unet, part).items()
            if isinstance(block, UNetBlock)]


class BlockRecorder:
    """Context manager: forward hooks on every U-Net block; `records[name]` gets, per call of the block, a
    dict with the radial D_t^b (`radial`), the output's resolution and its average feature map (`map`,
    mean over batch and channels). Hooks are removed on exit."""

    def __init__(self, net):
        self.blocks = unet_blocks(net)
        self.records = {name: [] for name, _ in self.blocks}
        self.handles = []

    def hook(self, name):
        def record(module, inputs, output):
            x_in = inputs[0].detach()
            x_out = output.detach()
            self.records[name].append(dict(radial=block_difference(x_out, x_in).cpu(),
                                           resolution=int(x_out.shape[-1]),
                                           map=x_out.to(torch.float64).mean(dim=(0, 1)).cpu()))
        return record

    def __enter__(self):
        self.handles = [block.register_forward_hook(self.hook(name)) for name, block in self.blocks]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

#----------------------------------------------------------------------------
# The whole analysis.


def analyze(net, latents, class_labels=None, num_steps=18, heun=True, randn_like=torch.randn_like, **schedule):
    """Fig. 4 and Fig. 6 numbers for one batch of latents: trajectory profiles plus, per block, D_t^b [T, R_b]
    and the average output map per step [T, H_b, W_b] (first network call of each step, as the trajectory)."""
    with BlockRecorder(net) as blocks:
        images, steps, num_calls = sample_trajectory(net, latents, class_labels, num_steps, heun, randn_like,
                                                     **schedule)
    keep = step_call_indices(num_steps, heun)
    per_block = {}
    for name, records in blocks.records.items():
        if len(records) != num_calls:
            raise RuntimeError(f'block {name} ran {len(records)} times in {num_calls} network calls')
        chosen = [records[i] for i in keep]
        per_block[name] = dict(resolution=chosen[0]['resolution'],
                               radial=torch.stack([r['radial'] for r in chosen]),
                               maps=torch.stack([r['map'] for r in chosen]))
    return dict(images=images, steps=steps, trajectory=trajectory_profiles(steps), blocks=per_block)


def depth_maps(blocks, step, part='dec'):
    """Fig. 6A: per resolution (deepest first), the mean over that part's blocks of their average output
    map at `step`."""
    by_res = {}
    for name, data in blocks.items():
        if name.startswith(part + '.'):
            by_res.setdefault(data['resolution'], []).append(data['maps'][step])
    return {res: torch.stack(maps).mean(0) for res, maps in sorted(by_res.items())}


def default_blocks(blocks):
    """(shallow, deep) block names for Fig. 6B/C: the decoder's last block (highest resolution) and its
    first (lowest resolution)."""
    decoder = [name for name in blocks if name.startswith('dec.')]
    return decoder[-1], decoder[0]

