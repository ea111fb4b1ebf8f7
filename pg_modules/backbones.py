"""The discriminator's feature networks by name, and the paper's `--backbone` integers (docs/method.md §10).

Looking a backbone up imports nothing heavy: `training/config.py` validates `--backbone` and `train.py --help`
lists the names without torch, timm or torchvision. Those are imported inside the builders, which only
`pg_modules/feature_networks.py` calls. Adding a backbone is one `BACKBONES` entry and its builder, here.

A builder takes (state dict in timm/torchvision key names or None for random weights, torch.Generator for any
random layer it adds, **constructor overrides) and returns a frozen body whose forward yields the 4 stage maps
with `channels`; the body's `input_size` and `always_resize` say how inputs are resized (feature_networks.py).
Pretrained weights: a file `<name>.pth|.safetensors` (the offline key is the name), else the source in
`weights` (pg_modules/weights.py, docs/offline-weights.md)."""
import dataclasses
from typing import Callable

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclasses.dataclass(frozen=True)
class Backbone:
    build: Callable     # build(state or None, generator, **kwargs) → body yielding 4 stage maps
    mean_std: tuple     # normalisation of the input after mapping [−1, 1] to [0, 1]
    channels: tuple     # channels of the 4 stage maps (the projector's input)
    weights: str        # 'timm' (timm's pretrained config of this name) or 'torchvision:<WeightsEnum>.<MEMBER>'


def _vgg16_bn(state, generator, **kwargs):
    """torchvision vgg16_bn `features` only (the 124M-parameter classifier is never used), split [0:13],
    [13:23], [23:33], [33:43] → 128, 256, 512, 512 channels at 1/2 … 1/16 of the input."""
    import torchvision
    from torch import nn
    from .feature_networks import Stages, load_exactly
    if kwargs:
        raise ValueError(f'vgg16_bn takes no constructor arguments, got {sorted(kwargs)}')
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D'], batch_norm=True)
    if state is None:  # torchvision's VGG init: random features keep their scale through the 13 layers
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)
    else:
        load_exactly(features, {k[len('features.'):]: v for k, v in state.items() if k.startswith('features.')},
                     'vgg16_bn', [k for k in state if not k.startswith(('features.', 'classifier.'))])
    return Stages([features[0:13], features[13:23], features[23:33], features[33:43]])


def _tf_efficientnet_lite0(state, generator, **kwargs):
    """timm tf_efficientnet_lite0 split (conv_stem, bn1, blocks[0:2]), blocks[2:3], blocks[3:5], blocks[5:]
    → 24, 40, 112, 320 channels at 1/4 … 1/32. (timm ≥ 0.9: bn1 already applies the ReLU6; there is no act1.)"""
    import timm
    from torch import nn
    from .feature_networks import Stages, load_exactly
    from .frozen_layers import replace_grouped_convs_
    net = timm.create_model('tf_efficientnet_lite0', **kwargs)
    # The converted weights are only right for the TF variant (TF-SAME padding, BN eps 1e-3); timm's
    # `efficientnet_lite0` accepts the same keys but differs by up to 3 in logits (docs/offline-weights.md §1.3).
    if not (isinstance(net.conv_stem, timm.layers.Conv2dSame) and net.bn1.eps == 1e-3):
        raise RuntimeError('timm tf_efficientnet_lite0 is no longer the TF variant (Conv2dSame stem, BN eps 1e-3); '
                           'the EfficientNet-Lite0 weights would be wrong in it')
    if state is not None:
        load_exactly(net, state, 'tf_efficientnet_lite0')
    replace_grouped_convs_(net)
    return Stages([nn.Sequential(net.conv_stem, net.bn1, *net.blocks[0:2]), net.blocks[2:3], net.blocks[3:5],
                   net.blocks[5:]])


def _deit_base_distilled(state, generator, **kwargs):
    import timm
    from .feature_networks import ViTStages, load_exactly
    net = timm.create_model('deit_base_distilled_patch16_224', **kwargs)
    if state is not None:
        load_exactly(net, state, 'deit_base_distilled_patch16_224')
    return ViTStages(net, generator)


BACKBONES = {
    'vgg16_bn': Backbone(_vgg16_bn, IMAGENET_MEAN_STD, (128, 256, 512, 512),
                         'torchvision:VGG16_BN_Weights.IMAGENET1K_V1'),
    'tf_efficientnet_lite0': Backbone(_tf_efficientnet_lite0, HALF_MEAN_STD, (24, 40, 112, 320), 'timm'),
    'deit_base_distilled_patch16_224': Backbone(_deit_base_distilled, IMAGENET_MEAN_STD, (96, 192, 384, 768),
                                                'timm'),
}

# The official `--backbone` integers, kept as aliases: 2 (hf_hub ViT + EfficientNet-B0) is not supported and
# any integer above 3 means lite0 alone, as in the official code (docs/method.md §10).
BACKBONE_SETS = {
    0: ('deit_base_distilled_patch16_224', 'tf_efficientnet_lite0'),
    1: ('vgg16_bn', 'tf_efficientnet_lite0'),
    3: ('tf_efficientnet_lite0',),
}
BACKBONE_HELP = ('Feature networks: 0 DeiT+EffNet-lite0, 1 VGG16-BN+EffNet-lite0, 3 EffNet-lite0, or names joined '
                 'by commas: ' + ', '.join(BACKBONES))


def backbone_option(value):
    """The canonical `--backbone` value: an official integer stays that integer (also given as digits); names
    joined by commas become the integer of the same official set, else the names joined by ','. So old
    training states (which hold integers) and runs given by name resume alike. Raises ValueError."""
    if isinstance(value, str) and value.strip().lstrip('-').isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        backbone_set(value)
        return value
    if not isinstance(value, str):
        raise ValueError(f'--backbone={value!r}: expected an integer 0, 1, 3 or backbone names')
    names = tuple(name.strip() for name in value.split(','))
    unknown = [name for name in names if name not in BACKBONES]
    if unknown:
        raise ValueError(f'--backbone={value}: unknown backbone {unknown[0]!r}; expected 0, 1, 3 or names from '
                         f'{", ".join(BACKBONES)} joined by commas')
    if len(set(names)) != len(names):
        raise ValueError(f'--backbone={value}: a backbone is named twice')
    official = [index for index, members in BACKBONE_SETS.items() if members == names]
    return official[0] if official else ','.join(names)


def backbone_set(value):
    """The feature-network names of a `--backbone` value (an official integer or names joined by commas)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 2:
            raise ValueError('--backbone=2 (hf_hub:timm/vit_base_patch16_224.augreg_in21k_ft_in1k + '
                             'tf_efficientnet_b0.ns_jft_in1k) is not supported; use 0, 1 or 3')
        if value < 0:
            raise ValueError(f'--backbone must be >= 0, got {value}')
        return list(BACKBONE_SETS[min(value, 3)])
    value = backbone_option(value)
    return backbone_set(value) if isinstance(value, int) else value.split(',')
