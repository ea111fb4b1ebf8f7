"""GPU-count-independent BatchNorm of the mini-discriminators (pg_modules/discriminator.py GroupBatchNorm2d,
issue 13.5): one process with bn_group 4 and batch 8 equals 2 processes × 4 (torch.distributed, gloo, CPU)."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pg_modules.discriminator import GroupBatchNorm2d, ProjectedDiscriminator
from training import loss

WORLD, GROUP, RES = 2, 4, 64


def test_group_none_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    plain, grouped = nn.BatchNorm2d(3), GroupBatchNorm2d(3)
    torch.testing.assert_close(grouped(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(grouped.running_var, plain.running_var, rtol=0, atol=0)


def test_groups_normalise_like_separate_batchnorms():
    """Outputs, input gradients and second-order (R1-style) weight gradients equal those of one BatchNorm2d per
    group; running statistics equal the mean of the per-group BatchNorms' buffers; eval mode uses them."""
    torch.manual_seed(1)
    x = (torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3).requires_grad_(True)
    grouped = GroupBatchNorm2d(3, group=GROUP)
    with torch.no_grad():
        grouped.weight.uniform_(0.5, 1.5), grouped.bias.uniform_(-1, 1)
    per_group = [copy.deepcopy(grouped) for _ in range(2)]
    for bn in per_group:
        bn.group = None  # plain BatchNorm2d behaviour
    for _ in range(3):  # a few updates: the running statistics stay the average of the separate ones
        out = grouped(x)
        expected = torch.cat([bn(chunk) for bn, chunk in zip(per_group, x.split(GROUP))])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name in ('running_mean', 'running_var'):
        mean = (getattr(per_group[0], name) + getattr(per_group[1], name)) / 2
        torch.testing.assert_close(getattr(grouped, name), mean, rtol=1e-6, atol=1e-7)
    assert grouped.num_batches_tracked.item() == 3

    def r1_like(normalise, params):
        """∂/∂x of a fixed function of the normalised x (create_graph), then the weights' gradient of its square."""
        y = normalise(x)
        (g,) = torch.autograd.grad((y.tanh() * torch.arange(y.numel()).view_as(y).sin()).sum(), x, create_graph=True)
        return g, torch.autograd.grad(g.square().sum(), params)
    g1, (w1, b1) = r1_like(grouped, [grouped.weight, grouped.bias])
    g2, (w2a, b2a, w2b, b2b) = r1_like(lambda x: torch.cat([bn(c) for bn, c in zip(per_group, x.split(GROUP))]),
                                       [p for bn in per_group for p in (bn.weight, bn.bias)])
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(w1, w2a + w2b, rtol=1e-5, atol=1e-6)  # the shared weight gets both groups' share
    torch.testing.assert_close(b1, b2a + b2b, rtol=1e-5, atol=1e-6)
    grouped.eval()
    torch.testing.assert_close(grouped(x), nn.functional.batch_norm(
        x, grouped.running_mean, grouped.running_var, grouped.weight, grouped.bias, eps=grouped.eps))
    with pytest.raises(ValueError, match='--d-bn-group=4 must divide the per-process batch, got a batch of 6'):
        grouped.train()(x[:6])


def build_d(bn_group):
    torch.manual_seed(0)
    return ProjectedDiscriminator(pretrained=False, interp224=False, img_resolution=RES, bn_group=bn_group,
                                  log=lambda *args: None).train()


def d_stages(D, real, fake):
    """D main (ns loss, separate fake and real passes) then R1 (γ = 1), as the loop runs them: the logits and
    the trainable parameters' gradients of each stage."""
    outputs, grads = [], []
    for stage in ('main', 'r1'):
        D.zero_grad(set_to_none=True)
        if stage == 'main':
            fake_logits, real_logits = D(fake)[0], D(real)[0]
            value = nn.functional.softplus(fake_logits).mean() + nn.functional.softplus(-real_logits).mean()
            outputs += [fake_logits.detach(), real_logits.detach()]
        else:
            value = loss.r1_penalty(D, real, None, 1.0)[0]
        value.backward()
        grads += [p.grad.clone() for p in D.trainable_parameters()]
    return outputs, grads


def _rank_worker(rank, workdir):
    """One of WORLD processes: the shared initial D state, its slice of the batch, gradients averaged."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{workdir}/rendezvous', rank=rank, world_size=WORLD)
    init = torch.load(os.path.join(workdir, 'init.pt'), weights_only=True)
    D = build_d(GROUP)
    D.load_state_dict(init['state'])
    part = slice(rank * GROUP, (rank + 1) * GROUP)
    outputs, grads = d_stages(D, init['real'][part], init['fake'][part])
    for g in grads:
        dist.all_reduce(g)
        g /= WORLD
    torch.save({'outputs': outputs, 'grads': grads, 'buffers': dict(D.discriminators.named_buffers())},
               os.path.join(workdir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def max_abs_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_one_process_with_groups_equals_two_processes(tmp_path):
    """Issue 13.5: batch 8 with bn_group 4 in one process = 2 processes × 4 (gloo), in D's outputs, its D-main
    and R1 gradients (averaged over processes, as DDP does) and its buffers. Both sides start from the same
    state, spectral norm's power-iteration vectors included (they advance once per forward on each side)."""
    D = build_d(GROUP)
    real = torch.rand(WORLD * GROUP, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fake = torch.rand(WORLD * GROUP, 3, RES, RES, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.save({'state': D.state_dict(), 'real': real, 'fake': fake}, tmp_path / 'init.pt')
    ungrouped = copy.deepcopy(D)
    for m in ungrouped.modules():
        if isinstance(m, GroupBatchNorm2d):
            m.group = None
    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]

    outputs, grads = d_stages(D, real, fake)
    two_outputs = [torch.cat([r['outputs'][i] for r in ranks]) for i in range(2)]
    assert [o.shape for o in outputs] == [(8, 76), (8, 76)]
    print(f'logits: max abs diff 1 vs 2 processes {max_abs_diff(outputs, two_outputs):.3g}')
    assert max_abs_diff(outputs, two_outputs) < 1e-5
    assert torch.equal(ranks[0]['grads'][0], ranks[1]['grads'][0])  # all-reduced
    stage_size = len(grads) // 2
    for stage in range(2):  # D main, R1: float32 rounding only (sums over 8 vs means of two sums over 4)
        part = slice(stage * stage_size, (stage + 1) * stage_size)
        scale = max(h.abs().max().item() for h in ranks[0]['grads'][part])
        diff = max_abs_diff(grads[part], ranks[0]['grads'][part])
        print(f'{("D main", "R1")[stage]}: max |grad| {scale:.4g}, max abs diff 1 vs 2 processes {diff:.3g}')
        assert diff <= 1e-5 * scale
    for name, value in D.discriminators.named_buffers():
        if name.endswith('num_batches_tracked'):
            assert value.item() == ranks[0]['buffers'][name].item() == 3  # fake, real, R1 passes
        else:  # power-iteration vectors identical on all sides; running statistics = mean over processes
            expected = (ranks[0]['buffers'][name] + ranks[1]['buffers'][name]) / 2
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # Without groups, one process normalises over all 8 samples: visibly different logits.
    with torch.no_grad():
        assert max_abs_diff(ungrouped(fake), two_outputs[:1]) > 1e-2
