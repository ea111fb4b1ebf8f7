"""Consistency distillation (CD) as the paper's extra distillation objective (paper §4.4, Fig. 3; Appendix B
Tables 7–9; Appendix C), usable on its own (CD / CD-F, Fig. 3A) or added to the GAN loss (Fig. 3B).

One CD term, per sample (Table 7–9, CD row; Song et al. 2023, Algorithm 2):
    i ~ U{1..N},  t = T(i, N),  u = T(i−1, N),  s = T(0, N) = σ_min = ε
    x_t = x₀ + t·n,  n ~ N(0, I)                         x₀ a real image
    x̂_u = S_φ(x_t, t, u)                                 one Heun step of the frozen teacher's PF-ODE
    L   = d( F_θ(x_t, t),  F_θ^sg(x̂_u, u) )             λ ≡ 1 (CD's weighting)

F_θ(x, σ) is the generator itself, a D2OPrecond: its shifted EDM scalings (Appendix C, c_skip/c_out with ε)
give F_θ(x, ε) = x exactly, which is the consistency boundary that Table 9's (t−s)/t form expresses with
s = ε. The target F_θ^sg is the online student under stop-gradient (Table 9 writes F_θ^sg, not an EMA copy
θ⁻; docs/consistency.md §2); `target=` accepts another network (e.g. an EMA) for experiments.

Pure functions returning (loss, stats) like training/loss.py: the caller owns requires_grad toggles (freezing
is training/freeze.py's job), backward, optimisers and autocast. Random draws use torch's default generator
on the images' device, like the EDM losses. Documentation: docs/consistency.md.
"""
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from training import sampling

CD_NUM_SCALES = 18  # N (Appendix C: "Following Consistency Distillation, we set N = 18")
DISTANCES = ('l2', 'pseudo_huber', 'lpips')
PSEUDO_HUBER_C = 0.00054  # c = 0.00054·√d, d = values per image (Song & Dhariwal 2023, "Improved techniques", §3.3)
LPIPS_RESOLUTION = 224  # Appendix C: images are resized to 224 before the CD-LPIPS loss

#----------------------------------------------------------------------------
# The schedule T(i, N) and the teacher's solver step (Appendix C; paper §2.1).

def cd_sigmas(num_scales=CD_NUM_SCALES):
    """T(i, N) for i = 0..N as a float64 tensor: σ_min = T(0, N) < … < T(N, N) = σ_max (Appendix C; the
    paper's index runs upwards, EDM's downwards). sampling.cut_sigma is T with r = i/N."""
    if num_scales < 1:
        raise ValueError(f'consistency: num_scales must be >= 1, got {num_scales}')
    return torch.tensor([sampling.cut_sigma(i / num_scales) for i in range(num_scales + 1)], dtype=torch.float64)


def draw_sigma_pairs(batch, device, num_scales=CD_NUM_SCALES):
    """Adjacent (t, u) = (T(i, N), T(i−1, N)) with i ~ U{1..N} per sample (Table 7, CD row), each [B,1,1,1]
    float32 on `device`. u = T(0, N) = σ_min lands exactly on the preconditioner's ε boundary."""
    sigmas = cd_sigmas(num_scales).to(torch.float32).to(device)
    i = torch.randint(1, num_scales + 1, [batch], device=device)
    return sigmas[i].reshape(-1, 1, 1, 1), sigmas[i - 1].reshape(-1, 1, 1, 1)


def heun_step(teacher, x, t, u, labels=None):
    """One Heun step of the teacher's PF-ODE dx/dσ = (x − D_φ(x; σ))/σ from σ = t down to σ = u > 0 (EDM's
    second-order solver, Appendix C "we use Heun solver"): Euler predictor, then the trapezoid of both slopes.
    t, u: [B,1,1,1] tensors (or floats). No gradient: the teacher is frozen (paper §2.2, "sg")."""
    with torch.no_grad():
        slope_t = (x - teacher(x, t, class_labels=labels).to(x.dtype)) / t
        x_euler = x + (u - t) * slope_t
        slope_u = (x_euler - teacher(x_euler, u, class_labels=labels).to(x.dtype)) / u
        return x + (u - t) * (0.5 * slope_t + 0.5 * slope_u)

#----------------------------------------------------------------------------
# Distances d(a, b) per sample (Table 8's D).

def l2_distance(a, b):
    """Mean squared difference per sample (the consistency-models code's "l2": ‖a−b‖²/d, so the weight does not
    scale with the resolution)."""
    return (a - b).square().flatten(1).mean(dim=1)


def pseudo_huber_distance(a, b, c=None):
    """√(‖a−b‖² + c²) − c per sample, c = 0.00054·√d by default (Song & Dhariwal 2023, §3.3): ‖r‖²/(2c) for
    ‖r‖ ≪ c, ‖r‖ − c for ‖r‖ ≫ c."""
    d = a[0].numel()
    c = PSEUDO_HUBER_C * math.sqrt(d) if c is None else c
    return ((a - b).square().flatten(1).sum(dim=1) + c * c).sqrt() - c

#----------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, VGG variant, v0.1 linear heads) from user-provided weight files. No package ships
# the VGG16 backbone's weights (docs/offline-weights.md §0), so nothing is downloaded: both files are given.

_VGG16_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]
_LPIPS_TAPS = (1, 3, 6, 9, 12)  # conv indices (0-based, in _VGG16_CFG's conv order) after whose ReLU LPIPS reads
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' input scaling layer for [-1, 1] images
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(torch.nn.Module):
    """d(a, b) = Σ_layers mean_hw Σ_c w_c·(â_c − b̂_c)², â = VGG16 relu1_2…relu5_3 features unit-normalised over
    channels; images in [-1, 1], resized to 224² first (Appendix C). Frozen, float32.

    vgg_file: torchvision's VGG16 (no BatchNorm) ImageNet state dict (`vgg16-397923af.pth`, keys features.N.*);
    lin_file: the LPIPS v0.1 VGG heads (`vgg.pth` of the lpips package, keys linL.model.1.weight [1,C,1,1]).
    Both are read with torch.load(weights_only=True): no pickled code runs."""

    def __init__(self, vgg_file, lin_file):
        super().__init__()
        self.convs = torch.nn.ModuleList()
        channels = 3
        for width in _VGG16_CFG:
            if width != 'M':
                # skip_init: every weight is overwritten from the file (or construction fails) in _load.
                self.convs.append(torch.nn.utils.skip_init(torch.nn.Conv2d, channels, width, 3, padding=1))
                channels = width
        self.lins = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1, self.convs[k].out_channels, 1, 1))
                                            for k in _LPIPS_TAPS])
        self._load(vgg_file, lin_file)
        self.register_buffer('shift', torch.tensor(_LPIPS_SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer('scale', torch.tensor(_LPIPS_SCALE).reshape(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def _load(self, vgg_file, lin_file):
        vgg, lin = _read_state(vgg_file, 'VGG16'), _read_state(lin_file, 'LPIPS linear heads')
        conv_keys = [int(k.split('.')[1]) for k in vgg if k.startswith('features.') and k.endswith('.weight')]
        if len(conv_keys) != len(self.convs):
            raise ValueError(f'{vgg_file}: expected a torchvision VGG16 state dict with {len(self.convs)} '
                             f'features.N.weight convolutions, found {len(conv_keys)}')
        for conv, index in zip(self.convs, sorted(conv_keys)):
            _copy(conv.weight, vgg, f'features.{index}.weight', vgg_file)
            _copy(conv.bias, vgg, f'features.{index}.bias', vgg_file)
        for layer, weight in enumerate(self.lins):
            _copy(weight, lin, f'lin{layer}.model.1.weight', lin_file)

    def features(self, x):
        x = (F.interpolate(x, size=LPIPS_RESOLUTION, mode='bilinear', align_corners=False) - self.shift) / self.scale
        taps, layer = [], 0
        for width in _VGG16_CFG:
            if width == 'M':
                x = F.max_pool2d(x, 2)
                continue
            x = F.relu(self.convs[layer](x))
            if layer in _LPIPS_TAPS:
                taps.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
            layer += 1
        return taps

    def forward(self, a, b):
        total = 0
        for fa, fb, w in zip(self.features(a.float()), self.features(b.float()), self.lins):
            total = total + ((fa - fb).square() * w).sum(dim=1).mean(dim=[1, 2])
        return total


VGG16_CACHE_NAME = 'vgg16-397923af.pth'  # torchvision's ImageNet VGG16 file name in the torch.hub cache
LPIPS_PACKAGE_LIN = os.path.join('weights', 'v0.1', 'vgg.pth')  # inside an installed `lpips` package


def lpips_weight_files(vgg_file=None, lin_file=None):
    """(vgg_file, lin_file): the given paths, else the torch.hub cache's VGG16 and the installed lpips package's
    heads when present (located without importing or downloading anything; None where not found, which
    LPIPS() then reports)."""
    if vgg_file is None:
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', VGG16_CACHE_NAME)
        vgg_file = cached if os.path.isfile(cached) else None
    if lin_file is None:
        spec = importlib.util.find_spec('lpips')
        if spec is not None and spec.submodule_search_locations:
            packaged = os.path.join(spec.submodule_search_locations[0], LPIPS_PACKAGE_LIN)
            lin_file = packaged if os.path.isfile(packaged) else None
    return vgg_file, lin_file


def _read_state(path, what):
    if not path or not os.path.isfile(path):
        where = 'none was given or found in the torch.hub cache / lpips package' if not path else f'{path!r} does not exist'
        raise FileNotFoundError(f'LPIPS needs the {what} weights as a file; {where} (nothing is downloaded: '
                                f'docs/consistency.md §4)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # any unreadable or code-carrying file ends as one clear message
        raise ValueError(f'{path}: not a plain tensor state dict ({type(error).__name__}: {error})') from None
    if not isinstance(state, dict):
        raise ValueError(f'{path}: expected a state dict of tensors, found {type(state).__name__}')
    return state


def _copy(param, state, key, path):
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        found = 'missing' if value is None else f'shape {tuple(getattr(value, "shape", ()))}'
        raise ValueError(f'{path}: {key} should be a tensor of shape {tuple(param.shape)}, found {found}')
    with torch.no_grad():
        param.copy_(value)


def make_distance(name, lpips=None):
    """The per-sample distance function for `--cd-distance`; 'lpips' needs an LPIPS module (built once by the
    caller from its weight files, so no file is read per iteration)."""
    if name == 'l2':
        return l2_distance
    if name == 'pseudo_huber':
        return pseudo_huber_distance
    if name == 'lpips':
        if lpips is None:
            raise ValueError('consistency: distance lpips needs LPIPS weight files (build training.consistency.LPIPS '
                             'from the VGG16 and linear-head files; docs/consistency.md §4)')
        return lpips
    raise ValueError(f'consistency: unknown distance {name!r}; expected one of {DISTANCES}')

#----------------------------------------------------------------------------
# The CD loss.

def consistency_terms(student, teacher, x_t, t, u, labels=None, distance=l2_distance, target=None):
    """Per-sample CD distances for given noisy images x_t at σ = t and the adjacent u < t (Table 8, CD row):
    d(F_θ(x_t, t), F_θ^sg(S_φ(x_t, t, u), u)). The target side runs without a graph (stop-gradient); `target`
    defaults to the student itself (Table 9). Outputs keep the networks' dtype (float32 for the preconditioners,
    also under autocast). Returns (distances [B], student output, target output)."""
    x_u = heun_step(teacher, x_t, t, u, labels)
    with torch.no_grad():
        goal = (student if target is None else target)(x_u, u, class_labels=labels)
    online = student(x_t, t, class_labels=labels)
    return distance(online, goal), online, goal


def consistency_loss(student, teacher, images, labels=None, distance='l2', num_scales=CD_NUM_SCALES, target=None,
                     lpips=None):
    """The CD loss on real images (mean over the batch, λ ≡ 1) and detached stats. Runs the student under the
    caller's autocast; the teacher and the target without gradients. Add `weight · loss` to the GAN loss for
    `--cd-weight`, or use it alone for CD / CD-F (freezing left to the caller)."""
    distance_fn = make_distance(distance, lpips)
    x0 = images.float()
    t, u = draw_sigma_pairs(x0.shape[0], x0.device, num_scales)
    x_t = x0 + t * torch.randn_like(x0)
    terms, _, _ = consistency_terms(student, teacher, x_t, t, u, labels, distance_fn, target)
    loss = terms.mean()
    return loss, {'Loss/CD/loss': loss.detach(), 'Loss/CD/sigma': t.detach().mean()}
