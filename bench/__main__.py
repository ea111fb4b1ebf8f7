"""The default benchmark set: `python -m bench --outdir=bench-out` (what `make bench` runs).

Runs every measurement in a fresh subprocess (so peak RSS does not mix between configurations), prints each
one's table line, and writes `results.jsonl` (every record) and `summary.json` (headline numbers, the
official D2O reference, speedups, targets met/missed, load averages) to --outdir.
--ablations adds runs that each undo one optimisation; --compile adds a torch.compile run; --quick shrinks
everything to tiny sizes and one iteration (smoke test: the numbers mean nothing)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

import dnnlib
from dnnlib import cli
from bench import common

ROOT = Path(__file__).resolve().parents[1]

# Official D2O code, 2 cores / 2 threads, batch 8, 32², one random tf_efficientnet_lite0 backbone (BENCHMARKS.md).
# Seconds per stage; peak RSS in GB (read as 10⁹ bytes, the stricter reading of "GB").
REFERENCE = {
    'd2o': dict(g_s=6.88, d_s=2.71, r1_s=3.26, iter_s=9.79, peak_gb=3.47),
    'd2o_f': dict(g_s=5.27, d_s=2.96, r1_s=2.82, iter_s=8.40, peak_gb=3.07),
    'small_d2o': dict(g_s=0.93, d_s=1.15, r1_s=3.46, iter_s=2.30, peak_gb=2.43),
    'small_d2o_f': dict(g_s=0.86, d_s=1.08, r1_s=2.57, iter_s=2.10, peak_gb=2.38),
}

FULL = dict(cbase=128, cres='2,2,2', blocks=4, res=32, batch=8)  # CIFAR-10 NCSN++ (56.4M parameters)
SMALL = dict(cbase=32, cres='1,2,2', blocks=4, res=32, batch=8)
TINY = dict(cbase=16, cres='1,1', blocks=1, res=16, batch=2)


def run(module, outdir, name, **options):
    """One measurement in a fresh `python -m bench.<module>`; returns its JSON record (tagged with `name`)."""
    args = [sys.executable, '-m', f'bench.{module}'] + [
        f'--{k.replace("_", "-")}' if v is True else f'--{k.replace("_", "-")}={v}'
        for k, v in options.items() if v is not False]
    print(f'[{name}] {" ".join(args[1:])}', flush=True)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        (Path(outdir) / f'{name}.stderr.txt').write_text(proc.stderr)
        last = (proc.stderr.strip().splitlines() or ['(no stderr)'])[-1]
        raise click.ClickException(f'{name}: `{" ".join(args[1:])}` failed (exit {proc.returncode}): {last} '
                                   f'(all of its stderr: {outdir}/{name}.stderr.txt)')
    lines = proc.stdout.splitlines()
    record = json.loads(next(line for line in reversed(lines) if line.startswith('{')))
    for line in lines:
        if not line.startswith('{'):
            print(f'[{name}] {line}', flush=True)
    record['name'] = name
    return record


def plan(quick, iters, warmup, threads, device, ablations, compile):
    """(name, module, options) of every measurement in the set."""
    full, small = (TINY, TINY) if quick else (FULL, SMALL)
    # Tiny ops with 2 OpenMP threads on a busy 2-core machine wait on each other (10-40x slower): quick uses 1.
    common_opts = dict(threads=threads or (1 if quick else 2), device=device)
    train = dict(iters=1 if quick else iters, warmup=0 if quick else warmup, **common_opts)
    runs = [('d2o', 'train_step', dict(full, freeze=0, **train)),
            ('d2o_f', 'train_step', dict(full, freeze=1, **train)),
            ('small_d2o', 'train_step', dict(small, freeze=0, **train)),
            ('small_d2o_f', 'train_step', dict(small, freeze=1, **train)),
            ('sampling', 'sampling', dict(full, heun_steps=18, multi_steps='2', reps=1 if quick else 3,
                                          warmup=0 if quick else 1, **common_opts)),
            ('fid', 'fid_pipeline', dict(num=2 if quick else 16, batch=2 if quick else 8, reps=1 if quick else 3,
                                         warmup=0 if quick else 2, channels_last_ablation=ablations, **common_opts))]
    if ablations:  # each undoes one optimisation of the code (or tries a candidate) on the full D2O config
        runs += [('d2o_d_grad_in_g', 'train_step', dict(full, d_grad_in_g=True, **train)),
                 ('d2o_adam_loop', 'train_step', dict(full, no_adam_foreach=True, **train)),
                 ('d2o_d_channels_last', 'train_step', dict(full, d_channels_last=True, **train)),
                 ('d2o_bf16', 'train_step', dict(full, precision='bf16', **train)),
                 ('small_d2o_plain_grouped_convs', 'train_step', dict(small, plain_grouped_convs=True, **train))]
    if compile:
        runs.append(('d2o_compile', 'train_step', dict(full, compile=True, **train)))
    return runs


def summarize(records, wall_s):
    """Headline numbers (the keys BENCHMARKS.md and the issue name), reference, speedups and targets."""
    by_name = {r['name']: r for r in records}
    s = dict(machine=common.machine(), wall_s=wall_s)
    for name in REFERENCE:
        r = by_name[name]
        for key in ('g_s', 'd_s', 'r1_s', 'r1_extra_s', 'iter_s'):
            s[f'{name}_{key}'] = r[key]
        s[f'{name}_peak_mb'] = r['peak_mb']
        ref = REFERENCE[name]
        s[f'{name}_speedup'] = ref['iter_s'] / r['iter_s']
        s[f'{name}_peak_vs_reference'] = r['peak_mb'] * 2 ** 20 / (ref['peak_gb'] * 1e9)
    sampling, fid = by_name['sampling'], by_name['fid']
    s.update(heun18_img_s=sampling['heun18_img_s'], onestep_img_s=sampling['onestep_img_s'],
             multistep2_img_s=sampling['multistep2_img_s'], onestep_vs_heun18=sampling['onestep_vs_heun'],
             fid_pipeline_img_s=fid['pipeline_img_s'], detector_img_s=fid['detector_img_s'],
             fid_speedup=fid['speedup'], fid_max_abs_diff=fid['max_abs_diff'])
    if 'pipeline_nchw_img_s' in fid:
        s['fid_pipeline_nchw_img_s'] = fid['pipeline_nchw_img_s']
    s['targets'] = {
        'd2o_iter_s <= 6.5': s['d2o_iter_s'] <= 6.5,
        'd2o_f_iter_s <= 5.6': s['d2o_f_iter_s'] <= 5.6,
        'peak RSS <= official (all four configs)': all(s[f'{n}_peak_vs_reference'] <= 1 for n in REFERENCE),
        'one-step >= 30x Heun-18': s['onestep_vs_heun18'] >= 30,
        'FID pipeline >= 1.5x detector, features within 1e-4': (s['fid_speedup'] >= 1.5 and
                                                                 s['fid_max_abs_diff'] <= 1e-4),
    }
    s['ablations'] = {r['name']: {k: r[k] for k in ('g_s', 'd_s', 'r1_s', 'r1_extra_s', 'iter_s', 'peak_mb')}
                      for r in records if r['bench'] == 'train_step' and r['name'] not in REFERENCE}
    s['load'] = {r['name']: dict(before=r['load_before'], after=r['load_after']) for r in records}
    s['reference'] = REFERENCE
    return s


def report(s):
    lines = [f'{"config":<12} {"G s":>7} {"D s":>7} {"R1 s":>7} {"s/iter":>7} {"peak MB":>8} | '
             f'{"official s/iter":>15} {"peak MB":>8} | speedup']
    for name, ref in REFERENCE.items():
        lines.append(f'{name:<12} {s[name + "_g_s"]:>7.2f} {s[name + "_d_s"]:>7.2f} {s[name + "_r1_s"]:>7.2f} '
                     f'{s[name + "_iter_s"]:>7.2f} {s[name + "_peak_mb"]:>8.0f} | {ref["iter_s"]:>15.2f} '
                     f'{ref["peak_gb"] * 1e9 / 2 ** 20:>8.0f} | {s[name + "_speedup"]:.2f}x')
    lines.append(f'sampling: Heun-18 {s["heun18_img_s"]:.2f} img/s, one-step {s["onestep_img_s"]:.2f} img/s '
                 f'({s["onestep_vs_heun18"]:.1f}x), 2-step {s["multistep2_img_s"]:.2f} img/s')
    lines.append(f'FID: pipeline {s["fid_pipeline_img_s"]:.2f} img/s vs reference detector {s["detector_img_s"]:.2f} '
                 f'img/s ({s["fid_speedup"]:.2f}x), max |Δfeature| {s["fid_max_abs_diff"]:.1e}')
    lines += [f'target {"met   " if ok else "MISSED"} {t}' for t, ok in s['targets'].items()]
    return '\n'.join(lines)


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--outdir', type=str, default='bench-out', show_default=True, help='Where results go')
@click.option('--iters', type=int, default=5, show_default=True, help='Measured training iterations (median)')
@click.option('--warmup', type=int, default=2, show_default=True, help='Warm-up training iterations')
@click.option('--threads', type=int, default=None, help='torch intra-op threads  [default: 2; 1 with --quick]')
@click.option('--device', type=str, default='cpu', show_default=True, help='cpu or cuda[:N]')
@click.option('--ablations', is_flag=True, help='Also run one-optimisation-off variants (slow)')
@click.option('--compile', is_flag=True, help='Also measure the full D2O config with torch.compile on G')
@click.option('--quick', is_flag=True, help='Tiny sizes, one iteration (smoke test; numbers are meaningless)')
def main(outdir, iters, warmup, threads, device, ablations, compile, quick):
    """Default benchmark set: training step (4 configs), sampling, FID features; JSON in --outdir."""
    os.makedirs(outdir, exist_ok=True)
    start = time.time()
    records = [run(module, outdir, name, **options)
               for name, module, options in plan(quick, iters, warmup, threads, device, ablations, compile)]
    with dnnlib.atomic_write(os.path.join(outdir, 'results.jsonl'), 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in records))
    summary = dict(summarize(records, time.time() - start), quick=quick)
    with dnnlib.atomic_write(os.path.join(outdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(report(summary))
    print(f'Wrote {outdir}/summary.json and {outdir}/results.jsonl ({summary["wall_s"]:.0f} s)')


if __name__ == '__main__':
    main()
