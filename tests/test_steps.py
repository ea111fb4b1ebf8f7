"""The training stages (training/steps.py) on toy networks: accumulation, skip counting, the abort message,
the R1 schedule and the optimiser settings. Each assertion compares against an independent computation."""
import copy

import pytest
import torch

from training import steps


class ToyG(torch.nn.Module):
    """x̂ = conv(x/σ): a generator with the preconditioner's call signature."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **kwargs):
        return self.conv(x / sigma)


class ToyD(torch.nn.Module):
    """D with a frozen feature part (tanh of a fixed conv) and a trainable score; no batch-dependent layer, so
    splitting a batch into micro-batches must not change any gradient."""
    diffaug = False

    def __init__(self):
        super().__init__()
        self.feature = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def trainable_parameters(self):
        return self.head.parameters()

    def features(self, img, augment=False):
        return [[torch.tanh(self.feature(img))]]

    def score(self, features, c=None):
        return [self.head(maps[0]).square().mean(dim=[2, 3]) for maps in features]

    def forward(self, img, c=None):
        return self.score(self.features(img), c)


def noise_from_images(x):
    """Deterministic per-sample 'noise', so one batch and its halves see the same latents."""
    return torch.sin(3 * x + 1)


def make_stages(rounds_guard=None, r1_gamma=0.5):
    torch.manual_seed(0)
    G, D = ToyG(), ToyD()
    opt_g = steps.make_adam(list(G.parameters()), steps.g_adam_settings(1e-2))
    opt_d = steps.make_adam(list(D.trainable_parameters()), steps.d_adam_settings(1e-2, r1_gamma))
    guard = rounds_guard or steps.NonFiniteGuard(max_nonfinite=3, log=lambda *_: None)
    settings = steps.GanSettings(adv_scale=2.0, r1_gamma=r1_gamma)
    return steps.GanStages(G, D, opt_g, opt_d, settings, guard)


def grads(module):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.fixture
def images():
    return torch.rand([4, 3, 8, 8], generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_two_rounds_give_the_gradients_of_one_doubled_batch(images, monkeypatch):
    monkeypatch.setattr(torch, 'randn_like', noise_from_images)
    one, two = make_stages(), make_stages()
    whole, halves = [(images, None)], [(images[:2], None), (images[2:], None)]
    for stage, net in (('g_main', 'G'), ('d_main', 'D'), ('r1', 'D')):
        getattr(one, stage)(whole)
        getattr(two, stage)(halves)
        a, b = grads(getattr(one, net)), grads(getattr(two, net))
        assert len(a) == len(b) > 0
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    for pa, pb in zip(list(one.G.parameters()) + list(one.D.parameters()),
                      list(two.G.parameters()) + list(two.D.parameters())):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_g_main_leaves_d_without_gradients_and_d_main_leaves_g_alone(images):
    stages = make_stages()
    g_before = [p.detach().clone() for p in stages.G.parameters()]
    stages.g_main([(images, None)])
    assert all(p.grad is None for p in stages.D.parameters())
    stages.d_main([(images, None)])
    assert all(p.grad is not None for p in stages.D.head.parameters())
    assert stages.D.feature.weight.grad is None  # frozen features never get gradients
    # D main made fakes without gradients: G's weights are those of G main's step, its grads those of G main.
    assert not all(torch.equal(a, b) for a, b in zip(g_before, stages.G.parameters()))


def test_r1_gradient_matches_an_independent_penalty(images):
    stages = make_stages(r1_gamma=0.5)
    D = copy.deepcopy(stages.D)
    stages.r1([(images, None)])
    x = images.clone().requires_grad_(True)
    g, = torch.autograd.grad(sum(l.sum() for l in D(x)), x, create_graph=True)
    loss = (g.square().sum(dim=[1, 2, 3]) * 0.5 / 2).mean() * steps.R1_INTERVAL  # γ/2·‖g‖², gain 16
    loss.backward()
    # The optimizer stepped after R1: compare the gradients it stepped with.
    for ours, ref in zip(stages.D.head.parameters(), D.head.parameters()):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-8)


def test_injected_nan_skips_the_step_and_is_counted(images):
    stages = make_stages()
    bad = images.clone()
    bad[0, 0, 0, 0] = float('nan')
    d_before = [p.detach().clone() for p in stages.D.parameters()]
    stages.d_main([(bad, None)])
    assert all(torch.equal(a, b) for a, b in zip(d_before, stages.D.parameters()))  # no step
    assert stages.guard.streak['D'] == 1 and stages.guard.take_skipped() == {'G': 0, 'D': 1, 'R1': 0}
    assert stages.guard.take_skipped() == {'G': 0, 'D': 0, 'R1': 0}  # counts are per tick
    stages.d_main([(images, None)])
    assert stages.guard.streak['D'] == 0  # a finite step ends the streak
    assert not all(torch.equal(a, b) for a, b in zip(d_before, stages.D.parameters()))


def test_abort_after_max_nonfinite_names_only_an_existing_state():
    messages = []
    guard = steps.NonFiniteGuard(max_nonfinite=2, log=messages.append, where=lambda: '0.012 kimg')
    assert guard.allow_step('G', False) is False
    with pytest.raises(FloatingPointError) as err:
        guard.allow_step('G', False)
    text = str(err.value)
    assert '2 non-finite G steps in a row at 0.012 kimg' in text and '--max-nonfinite=2' in text
    assert 'no training state was saved' in text and '--resume' not in text
    assert len(messages) == 2 and 'step skipped' in messages[0]
    guard = steps.NonFiniteGuard(max_nonfinite=1, log=lambda *_: None, last_state=lambda: '/run/training-state-1.pt')
    with pytest.raises(FloatingPointError, match=r'--resume=/run/training-state-1\.pt'):
        guard.allow_step('R1', False)


def test_r1_schedule():
    stages = make_stages(r1_gamma=1e-4)
    assert [i for i in range(40) if stages.r1_due(i)] == [16, 32]
    assert not any(make_stages(r1_gamma=0.0).r1_due(i) for i in range(40))


def test_adam_settings_and_resume_override():
    assert steps.d_adam_settings(1e-4, 1e-4) == dict(lr=1e-4 * 16 / 17, betas=(0.0, 0.99 ** (16 / 17)))
    assert steps.d_adam_settings(1e-4, 0.0) == dict(lr=1e-4, betas=(0.0, 0.99))
    assert steps.g_adam_settings(3e-4, gan=False) == dict(lr=3e-4, betas=(0.9, 0.999))
    assert steps.rampup_lr(1e-3, 2, 500) == pytest.approx(2.5e-4) and steps.rampup_lr(1e-3, 0, 5) == 1e-3
    # load_state_dict brings back the saved lr; apply_settings makes the new options win (issue 12.6).
    w = torch.nn.Parameter(torch.ones(3))
    old = steps.make_adam([w], steps.g_adam_settings(1e-2))
    w.sum().backward()
    old.step()
    new = steps.make_adam([w], steps.g_adam_settings(5e-3))
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]['lr'] == 1e-2
    steps.apply_settings(new, steps.g_adam_settings(5e-3))
    assert new.param_groups[0]['lr'] == 5e-3 and torch.equal(new.state[w]['exp_avg'], old.state[w]['exp_avg'])


def test_diffusion_stage_accumulates_like_one_batch(images):
    def loss_fn(net, x, labels):  # per-element loss, as EDM's losses return it
        return (net(x, torch.ones([]), class_labels=labels) - x).square()
    results = []
    for batches in ([(images, None)], [(images[:2], None), (images[2:], None)]):
        torch.manual_seed(0)
        net = ToyG()
        start = copy.deepcopy(net)
        recorded = []
        opt = steps.make_adam(list(net.parameters()), steps.g_adam_settings(1e-2, gan=False))
        stage = steps.DiffusionStage(net, opt, loss_fn, steps.NonFiniteGuard(3, log=lambda *_: None),
                                     record=recorded.append)
        stage.iteration(batches)
        # Reported: the mean per-element loss (the mean over rounds of equal-sized rounds is the batch mean).
        reported = torch.stack([r['Loss/diffusion'] for r in recorded]).mean()
        torch.testing.assert_close(reported, loss_fn(start, images, None).mean().detach(), rtol=1e-5, atol=0)
        results.append(grads(net))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_update_ema_matches_formula():
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    beta = steps.update_ema(ema, net, cur_nimg=1000, batch=8, halflife_kimg=500, rampup_ratio=0.05)
    assert beta == pytest.approx(0.5 ** (8 / min(500 * 1000, 1000 * 0.05)))
    for pe, p0, pn in zip(ema.parameters(), before, net.parameters()):
        torch.testing.assert_close(pe, pn + beta * (p0 - pn))
    assert steps.update_ema(ema, net, cur_nimg=0, batch=8, halflife_kimg=500, rampup_ratio=0.05) == 0.0
