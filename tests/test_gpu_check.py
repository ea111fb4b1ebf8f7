"""bench/gpu_check.py: the `--dry` run on the CPU (every check and throughput variant reported with its numbers,
the resume check really compared the two final states and found them equal, a deliberately broken check is a FAIL
with exit status 1), plus the pieces in-process: the bitwise state comparison, fail-soft checks, the budget's
skip rule, the random FID detector and the bad-option message. No timing asserts."""
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    """One `--dry` run with the fid check broken on purpose (it then costs nothing); runs kept in `work`."""
    tmp = tmp_path_factory.mktemp('gpu-check')
    out, work = tmp / 'out', tmp / 'work'
    proc = subprocess.run([sys.executable, '-m', 'bench.gpu_check', '--dry', f'--outdir={out}', f'--workdir={work}',
                           '--budget=100000', '--inject-fault=fid'], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert (out / 'gpu_check.json').is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / 'gpu_check.json').read_text())
    return proc, data, out, work


def by_name(records):
    return {r['name']: r for r in records}


def test_every_check_is_reported_and_the_broken_one_fails_the_run(dry_run):
    proc, data, out, _ = dry_run
    checks = by_name(data['checks'])
    assert [r['name'] for r in data['checks']] == [name for name, _ in gpu_check.CHECKS]
    assert {n: r['status'] for n, r in checks.items()} == {n: 'FAIL' if n == 'fid' else 'PASS' for n in checks}, \
        {n: r.get('error') for n, r in checks.items()}
    assert 'injected fault' in checks['fid']['error'] and 'traceback' in checks['fid']
    assert proc.returncode == 1 and data['failed'] == ['fid'] and data['dry'] is True
    assert '[FAIL] fid' in proc.stdout and 'FAILED: fid' in proc.stdout
    markdown = (out / 'gpu_check.md').read_text()
    assert all(f'| {name} |' in markdown for name in checks)
    assert '===== train_torchrun' in (out / 'gpu_check.log').read_text()


def test_resume_check_compared_the_final_states_and_found_them_equal(dry_run):
    _, data, _, work = dry_run
    numbers = by_name(data['checks'])['resume_bitexact']['numbers']
    assert numbers['tensors_differ'] == 0 and numbers['max_abs_diff'] == 0 and numbers['iterations'] == '2+2'
    # Independently: the two final states on disk, network by network.
    full, _ = gpu_check.newest_state(work / 'full')
    resumed, _ = gpu_check.newest_state(work / 'part')
    networks = 0
    for key in ('G', 'G_ema', 'D'):
        assert full[key].keys() == resumed[key].keys()
        assert all(torch.equal(full[key][n], resumed[key][n]) for n in full[key])
        networks += len(full[key])
    optimizer_moments = sum(len(s) for key in ('opt_G', 'opt_D') for s in full[key]['state'].values())
    assert numbers['tensors_compared'] >= networks + optimizer_moments > 0
    assert full['batch_idx'] == resumed['batch_idx'] == 4


def test_in_process_checks_carry_their_numbers(dry_run):
    _, data, _, _ = dry_run
    c = {name: r['numbers'] for name, r in by_name(data['checks']).items()}
    for arch in ('ncsnpp', 'adm'):
        assert c['bf16_generator'][f'{arch}_mapping_affine_dtypes'] == ['float32']
        assert c['bf16_generator'][f'{arch}_conv_dtypes'] == ['bfloat16']
        assert c['bf16_generator'][f'{arch}_out_dtype'] == 'torch.float32'
        assert 1e-3 < c['bf16_generator'][f'{arch}_rel_err_vs_fp32'] < 0.1  # bf16 really ran, and stayed close
    assert c['fp32_discriminator']['d_output_dtypes'] == ['float32'] and c['fp32_discriminator']['rel_diff'] == 0
    r1 = c['r1_double_backward']  # CPU against CPU in the dry run: identical
    assert r1['nonzero_grads'] > 0 and r1['penalty'] > 0 and r1['rel_grad_diff_vs_cpu'] == 0
    it = c['gan_iteration']
    assert it['g_moved'] == it['g_trainable'] > 0 and it['g_frozen_moved'] == it['d_frozen_moved'] == it['skipped'] == 0
    assert c['nccl'] == dict(backend='gloo', world=1, all_reduce_ok=True)
    assert c['train_torchrun']['iterations'] == 4 and c['generate']['images'] == 4
    assert c['generate']['shape'] == [32, 32, 3]


def test_throughput_records_follow_from_their_stage_times(dry_run):
    _, data, _, _ = dry_run
    records = by_name(data['throughput'])
    expected = [f'cifar10_d2o_f/{v.name}' for v in gpu_check.VARIANTS if not v.compile] + \
        ['imagenet64_d2o/baseline', 'cifar10_d2o_f/compile']
    assert list(records) == expected
    for r in records.values():
        assert r['status'] == 'PASS', r.get('error')
        ms = r['ms']
        assert math.isclose(r['iter_ms'], ms['total'] + ms['R1_iteration_extra'] / 16)
        assert math.isclose(r['img_s'], r['batch_per_gpu'] * 1000 / r['iter_ms'])
        assert math.isclose(r['vs_paper'], r['img_s'] / (5e6 / (6 * 3600) / 8))
        assert ms['G'] > 0 and ms['D'] > 0 and ms['R1'] > 0 and r['peak_gib'] > 0 and r['nonfinite_skipped'] == 0
    base = records['cifar10_d2o_f/baseline']
    assert base['speedup'] == 1.0
    tf32 = records['cifar10_d2o_f/tf32']
    assert math.isclose(tf32['speedup'], tf32['img_s'] / base['img_s'])
    assert records['cifar10_d2o_f/fused_adam']['settings']['fused_adam'] is True


def test_compare_tree_counts_tensors_and_names_each_difference():
    a = dict(G={'w': torch.arange(6.0).view(2, 3), 'b': torch.zeros(2)}, rng=[torch.tensor([1, 2]), 7], batch_idx=3)
    same = gpu_check.compare_tree(a, {k: v for k, v in a.items()})
    assert same == dict(tensors=3, values=2, differ=[], max_abs_diff=0.0)
    b = dict(G={'w': torch.arange(6.0).view(2, 3), 'b': torch.tensor([0.0, 0.25])}, rng=[torch.tensor([1, 2]), 8],
             batch_idx=3)
    diff = gpu_check.compare_tree(a, b)
    assert diff['differ'] == ['/G/b', '/rng/1'] and diff['max_abs_diff'] == 0.25 and diff['tensors'] == 3
    assert gpu_check.compare_tree({'x': torch.ones(1)}, {'y': torch.ones(1)})['differ'] == ['/ keys']


def report_and_context(tmp_path, deadline_in):
    report = gpu_check.Report(tmp_path, dict(dry=True, machine=dict(torch='t')))
    ctx = types.SimpleNamespace(deadline=time.monotonic() + deadline_in, first_estimate_s=5.0, scale=gpu_check.DRY,
                                faults=set(), status={})
    return report, ctx


def test_a_failing_or_skipped_check_does_not_stop_the_run(tmp_path):
    report, ctx = report_and_context(tmp_path, 100)

    def broken(_ctx):
        raise gpu_check.CheckFailed('value off', {'value': 2.0})

    def skipped(_ctx):
        raise gpu_check.Skipped('needs x')

    for name, fn in (('a', broken), ('b', skipped), ('c', lambda _ctx: {'n': 1})):
        gpu_check.run_check(report, name, fn, ctx)
    assert [(r['name'], r['status']) for r in report.checks] == [('a', 'FAIL'), ('b', 'SKIP'), ('c', 'PASS')]
    assert report.checks[0]['numbers'] == {'value': 2.0} and report.checks[0]['error'] == 'CheckFailed: value off'
    assert report.failed() == ['a'] and ctx.status == {'a': 'FAIL', 'b': 'SKIP', 'c': 'PASS'}
    assert json.loads((tmp_path / 'gpu_check.json').read_text())['failed'] == ['a']


def test_budget_skips_a_variant_it_cannot_cover(tmp_path, monkeypatch):
    rig = types.SimpleNamespace(cfg=gpu_check.DRY.throughput[0], device=torch.device('cpu'))
    timed = dict(img_s=20.0, iter_ms=100.0, ms=dict(G=40.0, D=50.0, R1=30.0, R1_iteration_extra=160.0), peak_gib=1.0)
    monkeypatch.setattr(gpu_check, 'time_variant', lambda *args: dict(timed))
    report, ctx = report_and_context(tmp_path, deadline_in=-1)
    assert gpu_check.run_variant(report, ctx, rig, gpu_check.VARIANTS[1], {}) is None
    assert report.throughput[0]['status'] == 'SKIP' and 'budget' in report.throughput[0]['error']
    report, ctx = report_and_context(tmp_path, deadline_in=1000)
    record = gpu_check.run_variant(report, ctx, rig, gpu_check.VARIANTS[1], dict(img_s=10.0, seconds=3.0))
    assert record['status'] == 'PASS' and record['speedup'] == 2.0
    assert math.isclose(record['vs_paper'], 20.0 / gpu_check.PAPER_IMG_S_PER_GPU)
    # A compiled variant also needs the compile estimate: 3 s + 5 s > 6 s left.
    report, ctx = report_and_context(tmp_path, deadline_in=6)
    assert gpu_check.run_variant(report, ctx, rig, gpu_check.VARIANTS[-1], dict(img_s=10.0, seconds=3.0)) is None


def test_a_variant_running_past_the_budget_is_stopped_and_reported(tmp_path, monkeypatch):
    rig = types.SimpleNamespace(cfg=gpu_check.DRY.throughput[0], device=torch.device('cpu'))
    monkeypatch.setattr(gpu_check, 'OVERRUN_S', 0)
    monkeypatch.setattr(gpu_check, 'time_variant', lambda *args: time.sleep(30))
    report, ctx = report_and_context(tmp_path, deadline_in=1.0)
    start = time.monotonic()
    record = gpu_check.run_variant(report, ctx, rig, gpu_check.VARIANTS[0], dict(img_s=1.0, seconds=0.1))
    assert time.monotonic() - start < 20
    assert record['status'] == 'FAIL' and record['error'].startswith('VariantTimeout: stopped after')


@pytest.mark.slow
def test_random_detector_file_loads_safely_and_gives_spread_features(tmp_path):
    from metrics.detector import load_detector
    path = gpu_check.random_detector_file(tmp_path / 'inception.pt')
    net = load_detector(path)
    images = torch.randint(0, 256, [2, 3, 32, 32], generator=torch.Generator().manual_seed(0)).float()
    features = net(images)
    assert features.shape == (2, 2048) and bool(features.isfinite().all())
    assert features.std() > 0 and not torch.equal(features[0], features[1])


def test_unknown_names_are_one_line_and_exit_status_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main.main([f'--outdir={tmp_path}', '--only=bogus'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert '--only=bogus' in err and 'resume_bitexact' in err
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main.main([f'--outdir={tmp_path / "file"}'])
    assert exit_info.value.code == 1 and 'is a file' in capsys.readouterr().err
