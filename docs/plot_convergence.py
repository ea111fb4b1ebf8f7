"""Draw (and record as JSON) FID-vs-GAN-images curves of finished or running training runs: the figures of
docs/convergence-mnist.md. Reads each run's `metric-fid<N>.jsonl` (what train.py writes at every tick) and the
demo's `fid-<name>.json` levels, so the figures can be redrawn from the run folders at any time.

    python docs/plot_convergence.py --title="..." --json=docs/x.json --png=docs/x.png \
        --run="D2O-F=runs/d2o-f" --run="D2O=runs/d2o" \
        --level="teacher, 35 NFE=demo-out/fid-teacher-35nfe.json" [--start=349.96]

--start adds the point (0 images, value) to every curve (the teacher's 1-NFE FID: where fine-tuning starts).
"""
import datetime
import glob
import json
import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo  # noqa: E402  (save_fid_plot: the demo's own plot, so both figures look alike)
from dnnlib import cli  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402


def name_and_path(text, option):
    name, sep, path = text.partition('=')
    if not sep or not name or not path:
        raise click.ClickException(f'{option}: expected NAME=PATH, got {text!r}')
    return name, path


def run_points(run_dir):
    """[(images, fid)] from the run's metric file (the newest point per kimg wins: a resumed tick re-measures)."""
    files = sorted(glob.glob(os.path.join(run_dir, 'metric-fid*.jsonl')))
    if not files:
        raise click.ClickException(f'{run_dir}: no metric-fid*.jsonl (was the run started with --metrics=fidN?)')
    points = {}
    with open(files[0]) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                points[round(record['kimg'] * 1000)] = record['fid']
    return sorted(points.items())


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--run', 'runs', multiple=True, required=True, help='NAME=RUN_DIR (repeatable)')
@click.option('--level', 'levels', multiple=True, help='NAME=fid-<name>.json from the demo (repeatable)')
@click.option('--start', type=float, default=None, help='FID at 0 images added to every curve')
@click.option('--title', required=True)
@click.option('--json', 'json_path', required=True, type=click.Path(dir_okay=False))
@click.option('--png', 'png_path', required=True, type=click.Path(dir_okay=False))
def main(runs, levels, start, title, json_path, png_path):
    curves = {}
    for text in runs:
        name, run_dir = name_and_path(text, '--run')
        curves[name] = ([(0, start)] if start is not None else []) + run_points(run_dir)
    level_values = {}
    for text in levels:
        name, path = name_and_path(text, '--level')
        with open(path) as f:
            level_values[name] = json.load(f)['fid']
    demo.save_fid_plot(curves, level_values, png_path, title)
    record = dict(title=title, command=' '.join(sys.argv), levels=level_values,
                  curves={name: [dict(images=x, fid=y) for x, y in points] for name, points in curves.items()},
                  updated_utc=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'))
    with atomic_write(json_path, 'w') as f:
        json.dump(record, f, indent=1)
    for name, points in curves.items():
        print(f'{name}: ' + ', '.join(f'{x}: {y:.2f}' for x, y in points))


if __name__ == '__main__':
    main()
