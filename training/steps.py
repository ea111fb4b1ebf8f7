"""The stages of one training iteration (docs/method.md §4–§5): G main, D main, lazy R1, and the diffusion
step that trains a teacher.

Each stage owns everything between "here are this process's micro-batches" and "the weights moved": its
requires-grad toggles, the accumulation rounds (one backward per micro-batch, losses divided by the number
of rounds), one gradient all-reduce after the last round, the finiteness check (a non-finite stage skips its
optimiser step and is counted; `max_nonfinite` in a row abort) and the optimiser step. The training loop,
`bench/train_step.py` and the unit tests call these same functions.
"""
import dataclasses
import contextlib

import torch

from torch_utils import distributed as dist
from training import consistency, loss as losses, sampling

R1_INTERVAL = losses.R1_INTERVAL  # lazy R1 every 16th iteration, its loss multiplied by 16 (docs/method.md §4)
ADAM_BETAS = (0.0, 0.99)  # paper Table 10; 0.0 not 0 (an int/float mix fails in torch's Adam)
TEACHER_ADAM_BETAS = (0.9, 0.999)  # EDM's teacher training
ADAM_EPS = 1e-8
STAGES = ('G', 'D', 'R1')


# ----------------------------------------------------------------------------------------------
# Optimisers: built and re-tuned in one place, so a resumed run applies the new --lr/--dlr/--r1-gamma.

def g_adam_settings(lr, gan=True):
    return dict(lr=lr, betas=ADAM_BETAS if gan else TEACHER_ADAM_BETAS)


def d_adam_settings(dlr, r1_gamma):
    """Lazy R1 runs every 16 iterations, so D's Adam uses lr·16/17 and β₂^(16/17) (StyleGAN2's correction,
    docs/method.md §4); without R1 the plain values."""
    lazy = R1_INTERVAL / (R1_INTERVAL + 1) if r1_gamma > 0 else 1.0
    return dict(lr=dlr * lazy, betas=(ADAM_BETAS[0], ADAM_BETAS[1] ** lazy))


def make_adam(params, settings, foreach=True):
    return torch.optim.Adam(params, eps=ADAM_EPS, foreach=foreach, **settings)


def apply_settings(opt, settings):
    """Overwrite lr/betas of every parameter group (after load_state_dict, which restores the saved ones)."""
    for group in opt.param_groups:
        group.update(settings)


def rampup_lr(lr, rampup_kimg, cur_nimg):
    """Linear learning-rate warm-up over `rampup_kimg` (EDM's teacher training; 0 = none)."""
    return lr * min(cur_nimg / (rampup_kimg * 1000), 1.0) if rampup_kimg > 0 else lr


def optimizer_params(opt):
    return [p for group in opt.param_groups for p in group['params']]


# ----------------------------------------------------------------------------------------------
# Gradient reduction and the non-finite guard.

def reduce_gradients(params, world):
    """Average the gradients of `params` over ranks with one flat all-reduce, once per stage after all
    accumulation rounds (what DDP's no_sync + final sync does, without DDP's limits on double backward
    for R1 and on toggling requires_grad between stages). Parameters without a gradient are ignored."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


class NonFiniteGuard:
    """Decides whether a stage may step. A stage with non-finite gradients skips its step, is counted in
    `skipped` (per tick, stats.jsonl `Skipped/*`) and in `streak` (in a row, part of the training state);
    `max_nonfinite` in a row abort with FloatingPointError.

    `where()` names the current position for messages; `last_state()` returns the newest training state
    on disk or None, so the abort message points only to a state that exists (docs/method.md §4)."""

    def __init__(self, max_nonfinite, log=print, where=lambda: '', last_state=lambda: None):
        self.max_nonfinite, self.log, self.where, self.last_state = max_nonfinite, log, where, last_state
        self.streak = {}
        self.skipped = {}

    def allow_step(self, stage, finite):
        if finite:
            self.streak[stage] = 0
            return True
        self.streak[stage] = self.streak.get(stage, 0) + 1
        self.skipped[stage] = self.skipped.get(stage, 0) + 1
        self.log(f'WARNING: non-finite {stage} loss/gradients at {self.where()}: step skipped '
                 f'({self.streak[stage]} in a row)')
        if self.streak[stage] >= self.max_nonfinite:
            raise FloatingPointError(self.abort_message(stage))
        return False

    def abort_message(self, stage):
        state = self.last_state()
        hint = (f'the newest saved state is {state} (--resume={state})' if state else
                'no training state was saved before this point: restart from the beginning')
        return (f'{self.streak[stage]} non-finite {stage} steps in a row at {self.where()} (--max-nonfinite='
                f'{self.max_nonfinite}). Lower the learning rates or check the data; {hint}')

    def take_skipped(self):
        """Per-stage skip counts since the last call (every stage listed), then reset."""
        counts = {stage: self.skipped.get(stage, 0) for stage in STAGES}
        self.skipped = {}
        return counts


def step_optimizer(opt, stage, guard, world):
    """All-reduce, check, step (or skip and count). One host sync per stage decides the skip; the decision is
    the same on every rank because the gradients were reduced first."""
    params = optimizer_params(opt)
    reduce_gradients(params, world)
    if guard.allow_step(stage, bool(losses.grads_finite(params))):
        opt.step()


def update_ema(ema, net, cur_nimg, batch, halflife_kimg, rampup_ratio):
    """p_ema ← p + β·(p_ema − p), β = 0.5^(batch / h), h = min(half-life, cur_nimg·ratio) in images
    (EDM's EMA with warm-up, docs/method.md §4). Returns β."""
    h = halflife_kimg * 1000
    if rampup_ratio:
        h = min(h, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch / max(h, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - beta)
    return beta


# ----------------------------------------------------------------------------------------------
# The stages.

@dataclasses.dataclass
class GanSettings:
    """The GAN objective's knobs (docs/method.md §5–§7)."""
    adv_scale: float
    loss_type: str = 'ns'
    r1_gamma: float = 0.0
    num_steps: int = 1                  # generator steps (--multi-step-g)
    middle_sigma: float = sampling.MIDDLE_SIGMA
    cd_weight: float = 0.0              # extra consistency-distillation term (paper §4.4; needs `teacher`)
    cd_distance: str = 'l2'
    cd_scales: int = consistency.CD_NUM_SCALES


class GanStages:
    """G main → D main → (every 16th iteration) lazy R1 on one process's micro-batches `[(real, labels), ...]`.

    `autocast` wraps the generator's forward (D and R1 run in float32 inside the losses); `record(stats)`
    receives each round's detached statistics. With `settings.cd_weight > 0`, G main adds the CD loss against
    the frozen diffusion `teacher`."""

    def __init__(self, G, D, opt_g, opt_d, settings, guard, world=1, autocast=None, record=lambda stats: None,
                 teacher=None, lpips=None):
        if settings.cd_weight and teacher is None:
            raise ValueError('the consistency-distillation term (--cd-weight) needs the diffusion teacher')
        self.G, self.D, self.opt_g, self.opt_d = G, D, opt_g, opt_d
        self.teacher, self.lpips = teacher, lpips
        self.settings, self.guard, self.world, self.record = settings, guard, world, record
        self.autocast = autocast or contextlib.nullcontext()
        self.d_params = optimizer_params(opt_d)

    def r1_due(self, batch_idx):
        return self.settings.r1_gamma > 0 and batch_idx % R1_INTERVAL == 0 and batch_idx != 0

    def g_main(self, batches):
        """Fakes from fresh noise with gradients through D; D's weights get no gradients (saves their
        weight gradients, docs/method.md §5)."""
        s = self.settings
        self.D.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for real, labels in batches:
            with self.autocast:
                loss, stats = losses.generator_loss(self.G, self.D, torch.randn_like(real), labels, s.adv_scale,
                                                    s.loss_type, num_steps=s.num_steps, middle_sigma=s.middle_sigma)
                if s.cd_weight:
                    cd_loss, cd_stats = consistency.consistency_loss(self.G, self.teacher, real, labels, s.cd_distance,
                                                                     s.cd_scales, lpips=self.lpips)
                    loss, stats = loss + s.cd_weight * cd_loss, dict(stats, **cd_stats)
            (loss / len(batches)).backward()
            self.record(stats)
        step_optimizer(self.opt_g, 'G', self.guard, self.world)

    def real_features(self, batches):
        """The frozen feature pass over the reals with its graph, computed once when R1 is due and shared by D
        main and R1 (exact: the features do not depend on D's trainable weights). None per batch when D
        augments its real pass, which R1's un-augmented features would not match."""
        if self.D.diffaug:
            return [None] * len(batches)
        return [losses.r1_features(self.D, real) for real, _ in batches]

    def d_main(self, batches, real_features=None):
        """Fakes from fresh noise, generated without gradients; separate real and fake passes."""
        s = self.settings
        real_features = real_features or [None] * len(batches)
        for p in self.d_params:
            p.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        for (real, labels), features in zip(batches, real_features):
            with torch.no_grad(), self.autocast:
                fake = sampling.generator_sample(self.G, torch.randn_like(real), labels, num_steps=s.num_steps,
                                                 middle_sigma=s.middle_sigma)
            loss, stats = losses.discriminator_loss(self.D, real, fake, labels, s.adv_scale, s.loss_type,
                                                    real_features=features)
            (loss / len(batches)).backward()
            self.record(stats)
        step_optimizer(self.opt_d, 'D', self.guard, self.world)

    def r1(self, batches, real_features=None):
        """Lazy R1 with gain R1_INTERVAL (docs/method.md §4–§5)."""
        real_features = real_features or [None] * len(batches)
        self.opt_d.zero_grad(set_to_none=True)
        for (real, labels), features in zip(batches, real_features):
            loss, stats = losses.r1_penalty(self.D, real, labels, self.settings.r1_gamma, real_features=features)
            (loss * R1_INTERVAL / len(batches)).backward()
            self.record(stats)
        step_optimizer(self.opt_d, 'R1', self.guard, self.world)

    def iteration(self, batches, batch_idx):
        self.g_main(batches)
        r1_due = self.r1_due(batch_idx)
        features = self.real_features(batches) if r1_due else None
        self.d_main(batches, features)
        if r1_due:
            self.r1(batches, features)


class DiffusionStage:
    """One step of EDM teacher training (`--loss=edm|vp|ve`): the per-element loss summed and divided by the
    process's batch (EDM's loss scaling), accumulated over the rounds."""

    def __init__(self, net, opt, loss_fn, guard, world=1, autocast=None, record=lambda stats: None):
        self.net, self.opt, self.loss_fn, self.guard, self.world, self.record = net, opt, loss_fn, guard, world, record
        self.autocast = autocast or contextlib.nullcontext()

    def iteration(self, batches, batch_idx=None):
        self.opt.zero_grad(set_to_none=True)
        for real, labels in batches:
            with self.autocast:
                loss = self.loss_fn(self.net, real, labels)
            loss = loss.float().sum() / (len(real) * len(batches))
            loss.backward()
            # Reported as the mean per-element loss of this micro-batch.
            self.record({'Loss/diffusion': loss.detach() * len(batches) / real[0].numel()})
        step_optimizer(self.opt, 'G', self.guard, self.world)


class ConsistencyStage:
    """Consistency distillation alone (`--cd-only`, the paper's CD / CD-F of Fig. 3A): the CD loss of
    training/consistency.py against the frozen diffusion `teacher`, accumulated over the rounds; no D."""

    def __init__(self, G, opt, teacher, settings, guard, world=1, autocast=None, record=lambda stats: None,
                 lpips=None):
        self.G, self.opt, self.teacher, self.settings, self.guard, self.world = G, opt, teacher, settings, guard, world
        self.autocast, self.record, self.lpips = autocast or contextlib.nullcontext(), record, lpips

    def iteration(self, batches, batch_idx=None):
        s = self.settings
        self.opt.zero_grad(set_to_none=True)
        for real, labels in batches:
            with self.autocast:
                loss, stats = consistency.consistency_loss(self.G, self.teacher, real, labels, s.cd_distance,
                                                           s.cd_scales, lpips=self.lpips)
            (s.cd_weight * loss / len(batches)).backward()
            self.record(stats)
        step_optimizer(self.opt, 'G', self.guard, self.world)
