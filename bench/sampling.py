"""Sampling benchmark: images/s of one network under EDM's Heun sampler (N steps, 2N−1 evaluations) and as a
one-step and k-step D2O generator, through `sampling.generate_images` — per-seed latents, the sampler and the
uint8 conversion, as generate.py and FID evaluation run it. Random weights: speed does not depend on them.

    python -m bench.sampling --cbase=128 --cres=2,2,2 --heun-steps=18 --multi-steps=2
"""
import click
import torch

import dnnlib
from dnnlib import cli
from bench import common
from training import generator, networks, sampling


def measure(arch='ncsnpp', cbase=128, cres=(2, 2, 2), blocks=4, res=32, batch=8, heun_steps=18, multi_steps=(2,),
            reps=3, warmup=1, heun_reps=1, threads=2, device='cpu'):
    """Heun is timed `heun_reps` times without its own warm-up: the one-step warm-up already ran the network at
    this batch size, and one Heun batch averages over 2N−1 evaluations."""
    config = dict(arch=arch, cbase=cbase, cres=list(cres), blocks=blocks, res=res, batch=batch, heun_steps=heun_steps,
                  multi_steps=list(multi_steps), reps=reps, warmup=warmup, heun_reps=heun_reps, threads=threads,
                  device=str(device))
    device = common.setup(threads, device)
    load_before = common.loadavg()
    torch.manual_seed(0)
    kwargs = generator.arch_kwargs(dnnlib.EasyDict(arch=arch, cbase=cbase, cres=cres))
    net = networks.D2OPrecond(img_resolution=res, img_channels=3, num_blocks=blocks, dropout=0.0, **kwargs)
    net.eval().requires_grad_(False).to(device)
    seeds = list(range(batch))

    def images_per_s(sampler, num_steps, runs, warm):
        run = lambda: list(sampling.generate_images(net, seeds, sampler=sampler, num_steps=num_steps,  # noqa: E731
                                                    batch=batch, device=device))
        before = common.loadavg()
        times = [common.timed(run, device)[0] for _ in range(warm + runs)][warm:]
        return dict(img_s=batch / common.median(times), samples=times, load_before=before,
                    load_after=common.loadavg())

    results = {'onestep': images_per_s('onestep', 1, reps, warmup)}
    for k in multi_steps:
        results[f'multistep{k}'] = images_per_s('multistep', k, reps, 0)
    results[f'heun{heun_steps}'] = images_per_s('heun', heun_steps, heun_reps, 0)
    summary = {f'{name}_img_s': r['img_s'] for name, r in results.items()}
    heun = summary[f'heun{heun_steps}_img_s']
    summary['onestep_vs_heun'] = summary['onestep_img_s'] / heun
    return dict(bench='sampling', config=config, **summary, runs=results, peak_mb=common.peak_memory_mb(device),
                load_before=load_before, load_after=common.loadavg(), machine=common.machine())


def table(r):
    return ' | '.join(f'{k[:-len("_img_s")]} {v:.2f} img/s' for k, v in r.items() if k.endswith('_img_s')) + \
        f' | one-step / Heun {r["onestep_vs_heun"]:.1f}x'


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--arch', type=click.Choice(['ncsnpp', 'ddpmpp']), default='ncsnpp', show_default=True)
@click.option('--cbase', type=int, default=128, show_default=True)
@click.option('--cres', type=str, default='2,2,2', show_default=True)
@click.option('--blocks', type=int, default=4, show_default=True)
@click.option('--res', type=int, default=32, show_default=True)
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--heun-steps', type=int, default=18, show_default=True)
@click.option('--multi-steps', type=str, default='2', show_default=True, help='k-step generators, comma list')
@click.option('--reps', type=int, default=3, show_default=True, help='Timed batches for one-/k-step (median)')
@click.option('--warmup', type=int, default=1, show_default=True)
@click.option('--heun-reps', type=int, default=1, show_default=True)
@click.option('--threads', type=int, default=2, show_default=True)
@click.option('--device', type=str, default='cpu', show_default=True)
def main(cres, multi_steps, **kwargs):
    """Images/s: Heun vs one-step vs k-step sampling of the same network; one JSON line on stdout."""
    r = measure(cres=dnnlib.parse_int_list(cres), multi_steps=dnnlib.parse_int_list(multi_steps), **kwargs)
    print(table(r))
    common.emit(r)


if __name__ == '__main__':
    main()
