"""Where a D2O training iteration spends its time: torch.profiler tables of the G-main and D-main stages (the
loop's own `training/steps.py` code, built as `bench/train_step.py` builds it) and a ceiling analysis.

The ceiling: G's own forward + backward (G main) and forward (D main's fakes) are work no change outside G's
arithmetic can remove, so `g_share = (G fwd+bwd + G fwd) / (G main + D main)` is the lowest s/iter ratio that
optimising everything else could reach; `conv_gflops` vs `sgemm_gflops` says how close G's dominant 3×3
convolution already runs to this CPU's matrix-multiply speed. BENCHMARKS.md (2026-11-30, "where the time goes,
the fp32 ceiling") has the numbers.

    python -m bench.profile_step --cbase=128 --cres=2,2,2 --freeze=1 --threads=2 [--rows=15] [--out=FILE.md]
"""
import json

import click
import torch
from torch.profiler import ProfilerActivity, profile

import dnnlib
from dnnlib import cli
from bench import common, train_step
from training import config, steps

CPU = torch.device('cpu')


def median_seconds(fn, reps):
    return common.median([common.timed(fn, CPU)[0] for _ in range(reps)])


def matmul_gflops(reps=5):
    """Float32 GEMM speed (2048³) at the current thread count: the practical peak for convolutions."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    return 2 * 2048 ** 3 / median_seconds(lambda: a @ b, reps) / 1e9


def conv_gflops(channels, res, batch, reps=5):
    """Float32 3×3 convolution speed at one of G's shapes (stride 1, padding 1)."""
    x, w = torch.randn(batch, channels, res, res), torch.randn(channels, channels, 3, 3)
    torch.nn.functional.conv2d(x, w, padding=1)
    seconds = median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), reps)
    return 2 * batch * res * res * channels * channels * 9 / seconds / 1e9


def op_table(fn, rows):
    """The profiler's per-op table (self CPU time, descending) of one call of `fn`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows, max_name_column_width=44)


def profile_iteration(arch='ncsnpp', cbase=128, cres=(2, 2, 2), blocks=4, res=32, batch=8, freeze_level=0,
                      threads=2, reps=3, rows=15):
    device = common.setup(threads, 'cpu')
    G, _ema, opt_g, D, opt_d = train_step.build(arch, cbase, cres, blocks, res, ['tf_efficientnet_lite0'],
                                                freeze_level, 1e-4, device)
    settings = steps.GanSettings(adv_scale=batch / config.PAPER_NUM_GPUS, r1_gamma=1e-4)
    stages = steps.GanStages(G, D, opt_g, opt_d, settings, steps.NonFiniteGuard(max_nonfinite=1 << 30),
                             autocast=torch.autocast('cpu', enabled=False))
    real = torch.rand([batch, 3, res, res], generator=torch.Generator().manual_seed(1)) * 2 - 1
    batches = [(real, None)]
    z, sigma = torch.randn(batch, 3, res, res) * 80, torch.full([batch], 80.0)

    def g_forward():
        with torch.no_grad():
            G(z, sigma)

    def g_forward_backward():  # G main's G part: the same parameters require grad as in the stage
        G.zero_grad(set_to_none=True)
        G(z, sigma).square().mean().backward()

    parts = {'g_main': lambda: stages.g_main(batches), 'd_main': lambda: stages.d_main(batches),
             'g_forward': g_forward, 'g_forward_backward': g_forward_backward}
    for fn in parts.values():  # warm-up
        fn()
    samples = {name: [] for name in parts}
    for _ in range(reps):  # interleaved, so a slow phase of a shared machine hits every part alike
        for name, fn in parts.items():
            samples[name].append(common.timed(fn, CPU)[0])
    seconds = {name: common.median(values) for name, values in samples.items()}
    g_share = (seconds['g_forward'] + seconds['g_forward_backward']) / (seconds['g_main'] + seconds['d_main'])
    widest = cbase * max(cres)
    record = dict(bench='profile_step', config=dict(arch=arch, cbase=cbase, cres=list(cres), blocks=blocks, res=res,
                                                    batch=batch, freeze=freeze_level, threads=threads, reps=reps),
                  seconds=seconds, samples=samples, g_share=g_share, sgemm_gflops=matmul_gflops(),
                  conv_gflops=conv_gflops(widest, res, batch), conv_shape=[batch, widest, res, res],
                  load=common.loadavg(), machine=common.machine())
    tables = {'G main': op_table(parts['g_main'], rows), 'D main': op_table(parts['d_main'], rows)}
    return record, tables


def markdown(record, tables):
    s, c = record['seconds'], record['config']
    lines = [f"### freeze {c['freeze']}, cbase {c['cbase']} cres {c['cres']}, {c['threads']} threads",
             '', '| G main | D main | G fwd+bwd | G fwd | G share (ceiling) | sgemm GFLOP/s | 3×3 conv GFLOP/s |',
             '|---|---|---|---|---|---|---|',
             f"| {s['g_main']:.2f} s | {s['d_main']:.2f} s | {s['g_forward_backward']:.2f} s | {s['g_forward']:.2f} s | "
             f"{record['g_share']:.2f} | {record['sgemm_gflops']:.0f} | {record['conv_gflops']:.0f} |", '']
    for stage, table in tables.items():
        lines += [f'{stage}:', '```', table.rstrip(), '```', '']
    return '\n'.join(lines)


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--arch', type=click.Choice(['ncsnpp', 'ddpmpp']), default='ncsnpp', show_default=True)
@click.option('--cbase', type=int, default=128, show_default=True)
@click.option('--cres', type=str, default='2,2,2', show_default=True)
@click.option('--blocks', type=int, default=4, show_default=True)
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--freeze', 'freeze_level', type=int, default=0, show_default=True, help='0 = D2O, 1 = D2O-F')
@click.option('--threads', type=int, default=2, show_default=True)
@click.option('--reps', type=int, default=3, show_default=True, help='Interleaved repetitions (median)')
@click.option('--rows', type=int, default=15, show_default=True, help='Ops per profiler table')
@click.option('--out', type=click.Path(dir_okay=False), default=None, help='Also write the markdown here')
def main(cres, out, **kwargs):
    """Profile one D2O iteration's stages and print the ceiling analysis."""
    record, tables = profile_iteration(cres=dnnlib.util.parse_int_list(cres), **kwargs)
    text = markdown(record, tables)
    print(text)
    if out:
        with dnnlib.util.atomic_write(out, 'w') as f:
            f.write(text + '\n')
    print(json.dumps(record))


if __name__ == '__main__':
    main()
