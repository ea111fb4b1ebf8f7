"""bench/profile_step.py: the ceiling analysis adds up and the profiler tables name the stages' real ops."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_ceiling_and_tables(tmp_path):
    out = tmp_path / 'profile.md'
    proc = subprocess.run([sys.executable, '-m', 'bench.profile_step', '--cbase=8', '--cres=1', '--blocks=1',
                           '--batch=2', '--threads=1', '--reps=1', '--rows=8', f'--out={out}'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    s = record['seconds']
    assert all(s[k] > 0 for k in ('g_main', 'd_main', 'g_forward', 'g_forward_backward'))
    expected = (s['g_forward'] + s['g_forward_backward']) / (s['g_main'] + s['d_main'])
    assert abs(record['g_share'] - expected) < 1e-12
    assert record['config']['freeze'] == 0 and record['config']['cres'] == [1]
    assert record['conv_shape'] == [2, 8, 32, 32] and record['sgemm_gflops'] > 0 and record['conv_gflops'] > 0
    text = out.read_text()
    assert text.startswith('### freeze 0, cbase 8 cres [1], 1 threads') and f"{s['g_main']:.2f} s" in text
    g_table, d_table = text.split('D main:')
    # Both stages convolve (G and the feature network); D main also runs the mini-discriminators' backward.
    assert 'convolution' in g_table and 'aten::convolution_backward' in d_table
