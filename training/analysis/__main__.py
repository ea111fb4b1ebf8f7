"""The paper's analyses as commands (docs/analysis.md has the exact runs):

  python -m training.analysis frequency --network=PKL --outdir=DIR [--seeds=0-7 --steps=18 --sampler=heun]
  python -m training.analysis teacher-student --student=PKL --outdir=DIR [--teacher=PKL --teacher-at=K:PKL
      --steps=2,4,6,8,10 --sigmas=0.1,0.8,5 --num=1000 --data-ref=NPZ]

Errors follow dnnlib/cli.py: a usage error exits 2; bad input ends with one line `Error: ...` naming the option
or file, exit status 1 (`--debug` or D2O_DEBUG=1 shows the traceback)."""
import json
import os

import click
import torch

from dnnlib import cli
from dnnlib.util import atomic_write, parse_int_list
from training.analysis import frequency, plots, teacher_student
from training.checkpoint import load_network
from training.sampling import RHO, SIGMA_MAX, SIGMA_MIN, seeded_latents
MAX_LIST = 100_000  # seeds / step counts: a batch held in memory at once


def int_list(option):
    def parse(ctx, param, value):
        try:
            return parse_int_list(value, limit=MAX_LIST)
        except ValueError as err:
            raise click.BadParameter(f'{err}', param_hint=option) from None
    return parse


def float_list(ctx, param, value):
    try:
        values = [float(v) for v in value.split(',') if v.strip()] if value else []
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got {value!r}', param_hint='--sigmas') from None
    if any(not SIGMA_MIN < v < SIGMA_MAX for v in values):
        raise click.BadParameter(f'every σ must lie strictly between {SIGMA_MIN} and {SIGMA_MAX}, got {value!r}',
                                 param_hint='--sigmas')
    return values


def open_network(path, option):
    if not os.path.isfile(path):
        raise click.ClickException(f'{option}: {path}: no such file')
    with cli.task(f'loading {option}={path}'):
        net = load_network(path)
    return net.eval().requires_grad_(False)


def write_json(path, record):
    with atomic_write(path, 'w') as f:
        json.dump(record, f, separators=(',', ':'))  # compact: the figure arrays are large
        f.write('\n')


@click.group(cls=cli.Group)
@cli.debug_option
def main():
    """The paper's analyses: frequency (§4.5, Fig. 4; Appendix E, Fig. 6) and teacher–student FID (§2.3, Fig. 2)."""

#----------------------------------------------------------------------------


@main.command('frequency', short_help='Frequency analysis of a sampler trajectory (paper Fig. 4, Fig. 6)')
@click.option('--network', 'network_path', required=True, metavar='PKL', help='Diffusion network snapshot (ema)')
@click.option('--outdir', required=True, metavar='DIR', help='Where the PNGs and the JSON go')
@click.option('--name', default='analysis-frequency', show_default=True, help='File name prefix')
@click.option('--seeds', default='0-7', show_default=True, callback=int_list('--seeds'), help='Batch of seeds')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), default=None, help='Class (conditional nets)')
@click.option('--sampler', type=click.Choice(['heun', 'euler']), default='heun', show_default=True)
@click.option('--steps', 'num_steps', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--sigma-min', type=click.FloatRange(min=0, min_open=True), default=SIGMA_MIN, show_default=True)
@click.option('--sigma-max', type=click.FloatRange(min=0, min_open=True), default=SIGMA_MAX, show_default=True)
@click.option('--rho', type=click.FloatRange(min=0, min_open=True), default=RHO, show_default=True)
@click.option('--churn', 'S_churn', type=click.FloatRange(min=0), default=0, show_default=True, help='EDM S_churn')
@click.option('--columns', type=click.IntRange(min=2), default=6, show_default=True, help='Steps shown in Fig. 4A')
@click.option('--shallow-block', default=None, help='Block for Fig. 6B [default: last decoder block]')
@click.option('--deep-block', default=None, help='Block for Fig. 6C [default: first decoder block]')
@click.option('--map-step', type=int, default=-1, show_default=True, help='Step of the Fig. 6A maps')
def frequency_command(network_path, outdir, name, seeds, class_idx, sampler, num_steps, columns, shallow_block,
                      deep_block, map_step, **schedule):
    """Fig. 4 and Fig. 6 on one EDM sampler trajectory: PNGs and the JSON behind them."""
    if not seeds:
        raise click.BadParameter('needs at least one seed', param_hint='--seeds')
    if schedule['sigma_min'] >= schedule['sigma_max']:
        raise click.BadParameter('must be below --sigma-max', param_hint='--sigma-min')
    if not -num_steps <= map_step < num_steps:
        raise click.BadParameter(f'must index one of the {num_steps} steps', param_hint='--map-step')
    net = open_network(network_path, '--network')
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    latents, labels, rnd = seeded_latents(seeds, shape, 'cpu', net.label_dim, class_idx)
    result = frequency.analyze(net, latents.to(torch.float64), labels, num_steps, heun=(sampler == 'heun'),
                               randn_like=rnd.randn_like, **schedule)
    shallow, deep = frequency.default_blocks(result['blocks'])
    traj = plots.trajectory_data(result, columns)
    blocks = plots.blocks_data(result, shallow_block or shallow, deep_block or deep, map_step % num_steps)
    title = f'{os.path.basename(network_path)}, {sampler} {num_steps} steps, seeds {seeds[0]}..{seeds[-1]}'
    os.makedirs(outdir, exist_ok=True)
    plots.plot_trajectory(traj, os.path.join(outdir, f'{name}-trajectory.png'), title)
    plots.plot_blocks(blocks, os.path.join(outdir, f'{name}-blocks.png'), title)
    settings = dict(network=network_path, seeds=seeds, class_idx=class_idx, sampler=sampler, num_steps=num_steps,
                    **schedule)
    write_json(os.path.join(outdir, f'{name}.json'),
               plots.plain(dict(settings=settings, fig4=traj, fig6=blocks)))
    click.echo(f'wrote {name}-trajectory.png, {name}-blocks.png, {name}.json to {outdir}')


#----------------------------------------------------------------------------


def parse_teacher_at(values):
    """--teacher-at K:PKL (repeatable) → {K: network}."""
    teachers = {}
    for value in values:
        k, sep, path = value.partition(':')
        if not sep or not k.strip().isdigit() or int(k) < 1:
            raise click.BadParameter(f'expected K:PKL with K >= 1, got {value!r}', param_hint='--teacher-at')
        teachers[int(k)] = open_network(path, '--teacher-at')
    return teachers


@main.command('teacher-student', short_help='FID of K-step teachers vs a one-step student (paper Fig. 2)')
@click.option('--student', 'student_path', required=True, metavar='PKL', help='One-step student (ema)')
@click.option('--teacher', 'teacher_path', default=None, metavar='PKL',
              help='Network sampled with K steps as every teacher [default: the student]')
@click.option('--teacher-at', multiple=True, metavar='K:PKL', help='A trained K-step teacher (repeatable)')
@click.option('--outdir', required=True, metavar='DIR')
@click.option('--name', default='analysis-teacher-student', show_default=True, help='File name prefix')
@click.option('--steps', default='2,4,6,8,10', show_default=True, callback=int_list('--steps'), help='Teacher K')
@click.option('--sigmas', default='0.1,0.3,0.8,2,5,15', show_default=True, callback=float_list,
              help='Middle σ of the 2-step sweep (empty: skip)')
@click.option('--num', 'num_images', type=click.IntRange(min=2), default=1000, show_default=True,
              help='Images per set (seeds 0..N−1); the paper used 50,000')
@click.option('--data-ref', default=None, metavar='NPZ', help='FID reference of the data (fid.py ref) for gray')
@click.option('--detector', default=None, metavar='PATH', help='FID Inception weights [default: metrics/ sources]')
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True)
def teacher_student_command(student_path, teacher_path, teacher_at, outdir, name, steps, sigmas, num_images,
                            data_ref, detector, batch):
    """Fig. 2: FID of K-step teachers against a one-step student's images (and the data)."""
    from metrics.detector import load_detector
    from metrics.reference import load_ref_stats
    if any(k < 2 for k in steps):
        raise click.BadParameter(f'teachers take at least 2 steps, got {steps}', param_hint='--steps')
    student = open_network(student_path, '--student')
    teachers = parse_teacher_at(teacher_at)
    default_teacher = open_network(teacher_path, '--teacher') if teacher_path else student
    teachers = {k: teachers.get(k, default_teacher) for k in sorted(set(steps) | {2})}
    data_stats = None
    if data_ref:
        mu, sigma = load_ref_stats(data_ref)
        data_stats = dict(mu=mu, sigma=sigma)
    net = load_detector(detector, 'cpu')
    student_vs_data, rows = teacher_student.teacher_student_table(student, teachers, steps, sigmas, num_images, net,
                                                                  data_stats, batch=batch)
    os.makedirs(outdir, exist_ok=True)
    title = f'student {os.path.basename(student_path)}, teachers {os.path.basename(teacher_path or student_path)}' \
            f', {num_images} images'
    plots.plot_teacher_student(rows, os.path.join(outdir, f'{name}.png'), student_vs_data, title)
    table = teacher_student.markdown_table(rows, student_vs_data)
    with atomic_write(os.path.join(outdir, f'{name}.md'), 'w') as f:
        f.write(f'{title}\n\n{table}')
    settings = dict(student=student_path, teacher=teacher_path, teacher_at=list(teacher_at), num_images=num_images,
                    seeds=f'0-{num_images - 1}', data_ref=data_ref)
    write_json(os.path.join(outdir, f'{name}.json'),
               plots.plain(dict(settings=settings, student_vs_data=student_vs_data, rows=rows)))
    click.echo(table + f'wrote {name}.png, {name}.md, {name}.json to {outdir}')


if __name__ == '__main__':
    main()
