"""Training losses: D2O's GAN stages (G main, D main, lazy R1; docs/method.md §5–§6) and EDM's diffusion
losses for teacher training (docs/edm-networks.md §7).

Pure functions of (networks, batch) returning (loss, stats): the loop owns requires_grad toggles,
backward, accumulation, optimizers and gradient all-reduce. Stats are detached 0-d tensors (no host
sync here). The discriminator and its losses always run in float32, also inside the caller's autocast
(docs/method.md §9).

D interface used: `D(img, c) -> [logits [B, N_k] per backbone]`, `D.features(img)` (frozen part, DiffAugment
included when D augments) and `D.score(features, c)` (trainable part), `D.diffaug` (whether D's passes augment).

Sharing real features between D main and R1 (r1_features → discriminator_loss(real_features=...)) is exact
only when D does not augment (diffaug off, the default and the paper's setting): with DiffAugment the official
D main and R1 passes each draw their own augmentation, so the caller must not share them (refused here).
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from training import sampling
from training.loss_types import LOSS_TYPES  # `--loss-type` → f(ℓ) per stage (docs/method.md §5)

R1_INTERVAL = 16  # lazy R1 every 16th iteration with its loss multiplied by 16 (StyleGAN2; docs/method.md §4)

#----------------------------------------------------------------------------
# Adversarial weighting (docs/method.md §6).
#
# The official D returns its logits as 2·B_gpu separate rows, so every adversarial loss is effectively
# B_gpu · Σ_k mean_{b,j} f(ℓ_k[b,j]) (per-backbone means summed, whatever N_k), while R1 is a plain batch
# mean. The adversarial-vs-R1 balance therefore depends on the per-GPU batch. Here the factor is an explicit
# `adv_scale`: loss = adv_scale · Σ_k mean f(ℓ_k). The official run on G GPUs had adv_scale = batch / G; the
# default (training/config.py, batch / PAPER_NUM_GPUS) and the presets use the paper's 8 GPUs (256 → 32, 512 → 64).


def _adversarial(logits, term):
    return sum(term(F, l).mean() for l in logits)


def _logit_stats(kind, logits):
    """Detached logit statistics, averaged over backbones like the loss (per-backbone means)."""
    mean = lambda f: sum(f(l.detach()).mean() for l in logits) / len(logits)
    stats = {f'Loss/logits/{kind}': mean(torch.as_tensor), f'Loss/probs/{kind}': mean(torch.sigmoid)}
    if kind == 'real':
        stats['Loss/signs/real'] = mean(torch.sign)  # ADA's overfitting heuristic r_t
    return stats


def _loss_type(name):
    if name not in LOSS_TYPES:
        raise ValueError(f'loss_type={name!r}: expected one of {tuple(LOSS_TYPES)} (--loss-type)')
    return LOSS_TYPES[name]


def _no_autocast(device):
    return torch.autocast(device.type, enabled=False)

#----------------------------------------------------------------------------
# GAN stages (docs/method.md §5).

def generator_loss(G, D, z, labels, adv_scale, loss_type='ns', num_steps=1, middle_sigma=0.8):
    """G main: fakes G(80·z, 80) (or the k-step schedule) with gradients, scored by D.
    The caller freezes D (requires_grad False) for this stage: only G's trainable parameters (and the
    input path through D) need gradients. Runs G under the caller's autocast, D in float32."""
    terms = _loss_type(loss_type)
    fake = sampling.generator_sample(G, z, labels, num_steps=num_steps, middle_sigma=middle_sigma)
    with _no_autocast(z.device):
        logits = D(fake.float(), labels)
        loss = adv_scale * _adversarial(logits, terms.g)
    return loss, {'Loss/G/loss': loss.detach(), **_logit_stats('fake', logits)}


def discriminator_loss(D, real_img, fake_img, labels, adv_scale, loss_type='ns', real_features=None):
    """D main: separate passes for fakes (detached here: no gradient reaches G) and reals, so BatchNorm
    normalises each with its own batch statistics as in the official code.
    `real_features`: r1_features(D, real_img) computed for an R1 stage in the same iteration; the real pass
    then reuses those frozen features instead of recomputing them. Allowed only when D does not augment
    (checked); identical up to rounding where R1's math attention kernel replaces a fused one."""
    terms = _loss_type(loss_type)
    with _no_autocast(real_img.device):
        logits_fake = D(fake_img.detach().float(), labels)
        if real_features is None:
            logits_real = D(real_img.float(), labels)
        else:
            if D.diffaug:
                raise ValueError('discriminator_loss: real_features (R1\'s pass) cannot be shared when D applies '
                                 'DiffAugment: its real pass draws its own augmentation; compute it without them')
            logits_real = D.score([[f.detach() for f in maps] for maps in real_features[1]], labels)
        loss_fake = adv_scale * _adversarial(logits_fake, terms.d_fake)
        loss_real = adv_scale * _adversarial(logits_real, terms.d_real)
    loss = loss_fake + loss_real
    return loss, {'Loss/D/loss': loss.detach(), **_logit_stats('fake', logits_fake), **_logit_stats('real', logits_real)}


def r1_features(D, real_img):
    """R1's input: the reals as a fresh leaf requiring grad and D's frozen features of it with the graph to
    the leaf. When D augments (diffaug), the features are of DiffAugmented reals, as the official R1 runs D's
    full forward on them; the gradient is still taken w.r.t. the un-augmented leaf, through the augmentation
    (docs/method.md §5, §10). DiffAugment draws from torch's default generator here.
    Pass the pair to r1_penalty, and, only when D does not augment, to discriminator_loss when both stages run
    in one iteration, to compute the frozen feature networks once on the reals."""
    x = real_img.detach().float().requires_grad_(True)
    # R1 differentiates twice through the frozen feature net: fused attention kernels (DeiT's
    # scaled_dot_product_attention) have no double backward, the math kernel has.
    with _no_autocast(x.device), sdpa_kernel(SDPBackend.MATH):
        return x, D.features(x)


def r1_penalty(D, real_img, labels, gamma, real_features=None):
    """Lazy R1 (docs/method.md §5): g = ∂(Σ all logits)/∂x on the reals x (through DiffAugment when D augments),
    loss = mean_b γ/2 · Σ_chw g².
    The graph is kept (create_graph) so that backward reaches D's weights. The loop multiplies the loss by
    R1_INTERVAL. `real_features`: r1_features(D, real_img), if already computed."""
    x, features = real_features if real_features is not None else r1_features(D, real_img)
    with _no_autocast(x.device):
        logits = D.score(features, labels)
        total = sum(l.sum() for l in logits)
        grad, = torch.autograd.grad(total, x, create_graph=True)
        penalty = grad.square().sum(dim=[1, 2, 3])
        loss = (penalty * (gamma / 2)).mean()
    return loss, {'Loss/r1_penalty': penalty.detach().mean(), 'Loss/D/r1_loss': loss.detach()}


def grads_finite(params):
    """0-d bool tensor: every existing gradient of `params` is finite. One fused max-abs reduction per
    gradient list (max propagates NaN, and cannot overflow); no host sync until the caller reads it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.stack(torch._foreach_norm(grads, float('inf'))).isfinite().all()

#----------------------------------------------------------------------------
# EDM diffusion losses (docs/edm-networks.md §7): per-element weight·(D(y + n, σ) − y)², n = σ·N(0, I); images are
# already augmented by the caller, which passes the matching augment_labels. Draws use torch's default
# generator on the images' device.

class _DiffusionLoss:
    def __call__(self, net, images, labels=None, augment_labels=None):
        sigma = self.draw_sigma([images.shape[0], 1, 1, 1], images.device)
        noise = torch.randn_like(images) * sigma
        denoised = net(images + noise, sigma, class_labels=labels, augment_labels=augment_labels)
        return self.weight(sigma) * (denoised - images).square()

    def weight(self, sigma):
        return 1 / sigma ** 2


class VPLoss(_DiffusionLoss):
    """σ = σ_VP(t), t = 1 + u·(ε_t − 1), u ~ U(0, 1); weight 1/σ²."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def draw_sigma(self, shape, device):
        t = 1 + torch.rand(shape, device=device) * (self.epsilon_t - 1)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()


class VELoss(_DiffusionLoss):
    """σ = σmin·(σmax/σmin)^u, u ~ U(0, 1) (log-uniform); weight 1/σ²."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def draw_sigma(self, shape, device):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand(shape, device=device)


class EDMLoss(_DiffusionLoss):
    """ln σ ~ N(P_mean, P_std²); weight (σ² + σd²)/(σ·σd)², the inverse of c_out² (EDM's unit loss weight)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def draw_sigma(self, shape, device):
        return (torch.randn(shape, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
