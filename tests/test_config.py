import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import PRESETS, TrainConfig, make_config

ROOT = str(Path(__file__).resolve().parents[1])


def test_the_papers_ten_runs_are_presets():
    expected = [f'cifar10-{c}-{v}' for c in ('uncond', 'cond') for v in ('d2o', 'd2o-f')] + \
        [f'{d}-{v}' for d in ('afhqv2', 'ffhq', 'imagenet') for v in ('d2o', 'd2o-f')]
    assert sorted(PRESETS) == sorted(expected)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, values in PRESETS.items():
        assert set(values) <= fields, name
        assert values['freeze'] == (1 if name.endswith('-f') else 0)
    # Paper Table 10 values, including where the paper overrides the official train.sh.
    assert PRESETS['imagenet-d2o']['r1_gamma'] == 4e-4 and PRESETS['imagenet-d2o']['batch'] == 512
    assert PRESETS['imagenet-d2o-f']['adv_scale'] == 64 and PRESETS['cifar10-uncond-d2o']['adv_scale'] == 32
    assert PRESETS['cifar10-cond-d2o-f']['cond'] and PRESETS['cifar10-cond-d2o-f']['backbone'] == 1
    assert PRESETS['ffhq-d2o']['duration'] == 5 and PRESETS['ffhq-d2o-f']['duration'] == 10
    assert PRESETS['afhqv2-d2o']['transfer'].endswith('edm-afhqv2-64x64-uncond-ve.pkl')


def test_explicit_options_override_the_preset():
    cfg = make_config(preset='cifar10-uncond-d2o-f', outdir='o', data='d', lr=3e-5, batch=None)
    assert cfg.lr == 3e-5 and cfg.batch == 256 and cfg.freeze == 1 and cfg.dlr == 1e-4
    assert make_config(outdir='o', data='d').freeze == 0  # no preset: plain defaults


def test_unknown_preset_and_key_are_errors():
    with pytest.raises(ValueError, match='unknown preset'):
        make_config(preset='cifar100')
    with pytest.raises(ValueError, match='unknown configuration keys'):
        make_config(not_an_option=1)


def test_train_cli_dry_run_prints_the_merged_config(synth_zip):
    res = subprocess.run([sys.executable, 'train.py', '--outdir=unused', f'--data={synth_zip}',
                          '--preset=imagenet-d2o', '--lr=1e-5', '-n'], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert '"lr": 1e-05' in res.stdout and '"r1_gamma": 0.0004' in res.stdout and 'Dry run' in res.stdout
    bad = subprocess.run([sys.executable, 'train.py', '--outdir=o', f'--data={synth_zip}', '--metrics=fid',
                          '--metric-ref=x.npz', '-n'], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode != 0 and 'fid50k' in bad.stderr
