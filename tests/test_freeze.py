"""Freeze groups and levels (training/freeze.py) on the full-size generators, counted on the meta device."""
import re

import pytest
import torch

from training import freeze, networks

NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
DDPMPP = dict(NCSNPP, embedding_type='positional', encoder_type='standard', channel_mult_noise=1,
              resample_filter=[1, 1])
ADM = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])

# (resolution, label_dim, U-Net kwargs) -> (#params, frozen % at levels 1/2/3), docs/method.md §3 / docs/edm-networks.md §4.
FULL_SIZE = {
    'ncsnpp-cifar10-uncond': ((32, 0, NCSNPP), 56_395_523, (84.40, 86.50, 90.46)),
    'ddpmpp-cifar10-uncond': ((32, 0, DDPMPP), 55_732_739, (85.40, 87.53, 91.54)),
    'ncsnpp-64-uncond': ((64, 0, dict(NCSNPP, channel_mult=[1, 2, 2, 2])), 62_758_787, (83.84, 85.72, 89.70)),
    'adm-imagenet64-cond': ((64, 1000, ADM), 295_899_267, (78.77, 86.96, 90.17)),
}


@pytest.fixture(scope='module')
def full_size():
    nets = {}
    for name, ((res, label_dim, kwargs), _, _) in FULL_SIZE.items():
        with torch.device('meta'):  # no memory allocated
            nets[name] = networks.D2OPrecond(res, 3, label_dim=label_dim, dropout=0, **kwargs)
    return nets


OFFICIAL_LISTS = {1: ['conv', 'proj'], 2: ['conv', 'proj', 'qkv'], 3: ['conv', 'proj', 'qkv', 'skip']}  # docs/method.md §2


def official_frozen(name, level, loss_rule=False):
    """The official substring tests (docs/method.md §3): optimizer setup, or the per-step loss rule."""
    entries = OFFICIAL_LISTS[level]
    where = ['block', 'in'] if loss_rule else ['block', 'up', 'down', 'in']
    return any(w in name for w in where) and any(e in name for e in entries)


def frozen_percent(net, trainable):
    total = sum(p.numel() for p in net.parameters())
    return 100 * (total - sum(p.numel() for _, p in trainable)) / total


@pytest.mark.parametrize('name', FULL_SIZE)
def test_frozen_shares_match_official(full_size, name):
    net = full_size[name]
    _, num_params, shares = FULL_SIZE[name]
    assert sum(p.numel() for p in net.parameters()) == num_params
    for level, share in zip((1, 2, 3), shares):
        trainable = freeze.select_trainable(net, level=level)
        assert round(frozen_percent(net, trainable), 2) == share
        # The frozen set is exactly the official optimizer rule's; requires_grad agrees with the returned list.
        names = [n for n, _ in trainable]
        assert names == [n for n, p in net.named_parameters() if not official_frozen(n, level)]
        assert names == [n for n, p in net.named_parameters() if p.requires_grad]


def test_loss_rule_missed_up_down_blocks(full_size):
    """The official loss rule (no `up`/`down`) leaves up/down blocks' convs trainable-but-unapplied; ours
    freezes them, as the optimizer rule did (docs/method.md §3: loss rule alone freezes 76.0/78.1/81.6 %)."""
    net = full_size['ncsnpp-cifar10-uncond']
    total = sum(p.numel() for p in net.parameters())
    for level, share in zip((1, 2, 3), (76.0, 78.1, 81.6)):
        by_optimizer = {n for n, _ in net.named_parameters() if official_frozen(n, level)}
        by_loss = {n for n, _ in net.named_parameters() if official_frozen(n, level, loss_rule=True)}
        assert by_loss < by_optimizer
        assert all(re.search(r'_(up|down)\.(conv[01]|skip)\.', n) for n in by_optimizer - by_loss)
        frozen = sum(p.numel() for n, p in net.named_parameters() if n in by_loss)
        assert round(100 * frozen / total, 1) == share


def test_groups_of_ncsnpp_cifar10(full_size):
    """Group shares vs paper Table 3 (Norm 7.9 %, Conv 85.8 %, QKV 2.1 %, Skip 4.0 %): ours count only block
    layers (conv0/conv1/proj 84.40 %); the stem convs and mapping network are separate, always-trained groups."""
    net = full_size['ncsnpp-cifar10-uncond']
    counts = {g: 0 for g in freeze.GROUPS}
    for name, p in net.named_parameters():
        counts[freeze.param_group(name)] += p.numel()
    total = sum(counts.values())
    shares = {g: round(100 * n / total, 2) for g, n in counts.items()}
    assert shares == {'norm': 7.76, 'conv': 84.40, 'qkv': 2.10, 'skip': 3.96, 'embedding': 0.70, 'stem': 1.08}
    table = freeze.freeze_table(net, [n for n, _ in freeze.select_trainable(net, level=1)])
    assert re.search(r'conv\s+47,\d{3},\d{3}\s+84\.40%\s+no', table)
    assert re.search(r'qkv\s+.*\s+2\.10%\s+yes', table)
    assert table.splitlines()[-1].endswith('(84.40%)')


def test_adm_groups_cover_every_name(full_size):
    net = full_size['adm-imagenet64-cond']
    groups = {n: freeze.param_group(n) for n, _ in net.named_parameters()}
    assert groups['model.map_label.weight'] == 'embedding'
    assert groups['model.out_conv.weight'] == 'stem' and groups['model.out_norm.bias'] == 'stem'
    assert groups['model.enc.64x64_conv.weight'] == 'stem'
    assert groups['model.dec.32x32_up.affine.weight'] == 'norm'
    assert groups['model.dec.8x8_in0.proj.weight'] == 'conv'


def test_train_groups_and_partial_table(full_size):
    net = full_size['ncsnpp-cifar10-uncond']
    trainable = freeze.select_trainable(net, train_groups=['norm'])
    names = [n for n, _ in trainable]
    assert names and all(freeze.param_group(n) == 'norm' for n in names)
    assert not any(p.requires_grad for n, p in net.named_parameters() if n not in names)
    assert freeze.select_trainable(net, level=0, train_groups=['norm']) == trainable  # level 0 freezes nothing itself
    assert len(freeze.select_trainable(net)) == len(list(net.parameters()))  # neither → train all
    assert all(p.requires_grad for p in net.parameters())
    half = [n for n, _ in net.named_parameters() if freeze.param_group(n) == 'qkv'][::2]
    assert re.search(r'qkv\s+.*partial', freeze.freeze_table(net, half))


def test_errors():
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.enc = torch.nn.ModuleDict({'16x16_block0': torch.nn.Module()})
    net.model.enc['16x16_block0'].conv0 = torch.nn.Linear(1, 1)
    assert freeze.param_group('model.enc.16x16_block0.conv0.weight') == 'conv'
    net.model.enc['16x16_block0'].gain = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=r"'model\.enc\.16x16_block0\.gain' matches no group"):
        freeze.select_trainable(net, level=1)
    # Patterns are anchored on path components, not substrings.
    for name in ['model.enc.16x8_block0.conv0.weight', 'model.enc.16x16_blockA.conv0.weight',
                 'model.enc.16x16_block0.conv0.weight_orig', 'model.map_layer0x.weight', 'model.my_out_conv.weight']:
        with pytest.raises(ValueError, match='matches no group'):
            freeze.param_group(name)
    with pytest.raises(ValueError, match='--freeze=4 is not a level'):
        freeze.select_trainable(torch.nn.Linear(1, 1), level=4)
    with pytest.raises(ValueError, match='not both'):
        freeze.select_trainable(torch.nn.Linear(1, 1), level=1, train_groups=['norm'])
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['convs'\]"):
        freeze.select_trainable(torch.nn.Linear(1, 1), train_groups=['convs'])
