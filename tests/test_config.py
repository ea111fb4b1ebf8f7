import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import DEFAULT_NOTES, DEFAULTS, PRESETS, TrainConfig, make_config, resolve

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


def test_train_sh_launches_each_preset_on_its_dataset(tmp_path):
    """train.sh takes the dataset from the preset (its EDM teacher's data); an unknown run is a usage error."""
    (tmp_path / 'torchrun').write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # stands in for torchrun: prints its args
    (tmp_path / 'torchrun').chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', DATA='/data')
    dataset = dict(cifar10='cifar10-32x32', afhqv2='afhqv2-64x64', ffhq='ffhq-64x64', imagenet='imagenet-64x64')
    for run in sorted(PRESETS):
        result = subprocess.run(['bash', os.path.join(ROOT, 'train.sh'), run], env=env, capture_output=True, text=True)
        assert result.returncode == 0 and f'--data=/data/{dataset[run.split("-")[0]]}.zip' in result.stdout.split()
    result = subprocess.run(['bash', os.path.join(ROOT, 'train.sh'), 'mnist-d2o'], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.startswith("Error: unknown run 'mnist-d2o'; expected one of afhqv2-d2o, afhqv2-d2o-f, ")


def test_explicit_options_override_the_preset():
    cfg = make_config(preset='cifar10-uncond-d2o-f', outdir='o', data='d', lr=3e-5, batch=None)
    assert cfg.lr == 3e-5 and cfg.batch == 256 and cfg.freeze == 1 and cfg.dlr == 1e-4
    assert make_config(outdir='o', data='d').freeze is None  # no preset: plain defaults (resolved later)


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


def test_defaults_without_a_preset_are_the_cifar10_d2o_f_recipe():
    cfg, plan = resolve(make_config(outdir='o', data='d'), check_files=False)
    recipe = dict(PRESETS['cifar10-uncond-d2o-f'])
    # Everything but what the teacher fixes (transfer, arch), the precision (fp32: exact on every device) and
    # d_bn_group (None: the per-process batch, = the paper's 32 on its 8 GPUs).
    for key in ('transfer', 'arch', 'precision', 'preset', 'd_bn_group'):
        recipe.pop(key)
    assert {k: getattr(cfg, k) for k in recipe} == {**recipe, 'adv_scale': 32.0}
    assert cfg.precision == 'fp32' and cfg.d_bn_group is None
    assert plan.backbones == ('vgg16_bn', 'tf_efficientnet_lite0')


def test_resolve_derives_every_dependent_value_once():
    cfg, plan = resolve(make_config(outdir='o', data='d', batch=64, batch_gpu=8, metrics=['fid10k', 'fid500'],
                                    metric_ref='r.npz', backbone=3, duration=0.5), world_size=2, check_files=False)
    assert (cfg.batch_gpu, plan.rounds, plan.world_size) == (8, 4, 2)  # 64 = 8 per process x 4 rounds x 2
    assert cfg.adv_scale == 8.0 and cfg.freeze == 1 and cfg.precond == 'd2o' and plan.total_nimg == 500_000
    assert plan.metric_images == {'fid10k': 10_000, 'fid500': 500} and plan.backbones == ('tf_efficientnet_lite0',)
    assert resolve(cfg, world_size=2, check_files=False) == (cfg, plan)  # resolving again changes nothing
    teacher, teacher_plan = resolve(make_config(outdir='o', data='d', loss='edm'), check_files=False)
    assert teacher.precond == 'edm' and teacher.freeze == 0 and teacher_plan.backbones == ()
    cond, _ = resolve(make_config(preset='cifar10-cond-d2o', outdir='o', data='d'), check_files=False)
    assert cond.d_embedding == 'official' and cond.d_bn_group == 32
    assert PRESETS['imagenet-d2o']['d_bn_group'] == 64 and PRESETS['ffhq-d2o-f']['d_bn_group'] == 32


@pytest.mark.parametrize('options, message', [
    (dict(batch=10, batch_gpu=3), '--batch-gpu=3 must divide the per-process batch 10'),
    (dict(batch=8, d_bn_group=3), '--d-bn-group=3 must divide'),
    (dict(freeze=1, train_groups=['norm']), '--freeze=1 and --train-groups=norm'),
    (dict(train_groups=['norms']), "unknown group(s) ['norms']"),
    (dict(metrics=['fid10k']), '--metrics needs --metric-ref'),
    (dict(metrics=['is50k'], metric_ref='r.npz'), "unknown metric 'is50k'"),
    (dict(seed=-1), '--seed=-1'),
    (dict(seed=2 ** 31), '--seed=2147483648'),
    (dict(middle_sigma=0.0), '--middle-sigma=0.0'),
    (dict(device='tpu'), '--device=tpu'),
    (dict(resume='x.pt', transfer='t.pkl'), '--resume and --transfer are exclusive'),
    (dict(loss='edm', multi_step_g=2), '--multi-step-g=2 applies to --loss=d2o only'),
    (dict(backbone=2), '--backbone=2'),
    (dict(backbone=-1), '--backbone must be >= 0, got -1'),
    (dict(backbone='resnet50'), "--backbone=resnet50: unknown backbone 'resnet50'"),
    (dict(loss_type='wgan'), '--loss-type=wgan: expected one of ns, hinge'),
])
def test_conflicts_surface_in_resolve(options, message):
    with pytest.raises(ValueError) as err:
        resolve(make_config(outdir='o', data='d', **options), check_files=False)
    assert message in str(err.value)


def test_backbone_by_integer_or_name():
    # Integers (what old training_options.json and states hold) stay as they are, 7 included; an official set by
    # name is stored as its integer, so a resume compares equal; other lists keep their names.
    resolved = lambda backbone: resolve(make_config(outdir='o', data='d', backbone=backbone), check_files=False)
    lite0 = ('tf_efficientnet_lite0',)
    assert [(cfg.backbone, plan.backbones) for cfg, plan in map(resolved, (7, '3', 'vgg16_bn,tf_efficientnet_lite0'))] \
        == [(7, lite0), (3, lite0), (1, ('vgg16_bn',) + lite0)]
    cfg, plan = resolved('tf_efficientnet_lite0, deit_base_distilled_patch16_224')
    assert cfg.backbone == 'tf_efficientnet_lite0,deit_base_distilled_patch16_224'
    assert plan.backbones == ('tf_efficientnet_lite0', 'deit_base_distilled_patch16_224')
    assert resolved(cfg.backbone) == (cfg, plan)


def test_option_validation_imports_no_torch():
    # config.py reads the backbone and loss-type registries without torch, timm or torchvision (docs/design.md).
    code = ('import sys; from training.config import make_config, resolve; '
            "resolve(make_config(outdir='o', data='.', backbone='vgg16_bn,tf_efficientnet_lite0', loss_type='hinge')); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert (res.returncode, res.stdout) == (0, '[]\n'), res.stderr


def test_train_cli_takes_backbone_names(synth_zip):
    res = subprocess.run([sys.executable, 'train.py', '--outdir=unused', f'--data={synth_zip}', '-n',
                          '--backbone=vgg16_bn,tf_efficientnet_lite0'], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert '"backbone": 1,' in res.stdout and "backbones=('vgg16_bn', 'tf_efficientnet_lite0')" in res.stdout
    bad = subprocess.run([sys.executable, 'train.py', '--outdir=unused', f'--data={synth_zip}', '-n',
                          '--backbone=vgg16'], capture_output=True, text=True, cwd=ROOT)
    assert (bad.returncode, bad.stderr.splitlines()[-1]) == (
        1, "Error: --backbone=vgg16: unknown backbone 'vgg16'; expected 0, 1, 3 or names from vgg16_bn, "
           'tf_efficientnet_lite0, deit_base_distilled_patch16_224 joined by commas')


def test_resolve_checks_files_before_anything_loads(tmp_path, synth_zip):
    (tmp_path / 'a-file').write_text('')
    cases = [(dict(data=str(tmp_path / 'nope.zip')), '--data='), (dict(outdir=str(tmp_path / 'a-file')), 'is a file'),
             (dict(transfer=str(tmp_path / 't.pkl')), '--transfer='),
             (dict(metrics=['fid10k'], metric_ref=str(tmp_path / 'r.npz')), '--metric-ref='),
             (dict(cond=True, d_embedding=str(tmp_path / 'e.pkl')), '--d-embedding=')]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve(make_config(**dict(dict(outdir=str(tmp_path / 'runs'), data=str(synth_zip)), **options)))
    resolve(make_config(outdir=str(tmp_path / 'runs'), data=str(synth_zip), transfer='https://example.invalid/t.pkl'))


def test_every_config_field_is_an_option_whose_help_shows_the_default():
    import train
    options = {p.name: p for p in train.main.params}
    assert set(DEFAULTS) <= set(options), sorted(set(DEFAULTS) - set(options))
    assert set(options) - set(DEFAULTS) == {'dry_run', 'debug'}
    for name, default in DEFAULTS.items():
        help_text = options[name].help
        if options[name].required:
            continue
        if default is None and name not in DEFAULT_NOTES:
            assert '[default:' not in help_text, name  # no default: nothing claimed
        else:
            shown = DEFAULT_NOTES[name] if default is None else str(default).lower() if isinstance(default, bool) \
                else str(default)
            assert help_text.endswith(f'[default: {shown}]'), (name, help_text)
