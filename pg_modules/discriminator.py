"""Projected-GAN discriminator of D2O (d2o-method.md §6, §10).

Per backbone: a frozen `FeatureNetwork` (feature_networks.py) yields 4 projected maps, and 4 trainable
spectral-norm mini-discriminators turn them into logit maps, flattened and concatenated to [B, N_k].
`features(img, augment=True)` is the frozen part and `score(features, c)` the trainable one, so the training loop can reuse
real-image features for the D step and R1; `forward(img, c) = score(features(img), c)`."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from .class_embedding import EMBED_DIM, load_class_embedding
from .feature_networks import FeatureNetwork
from .projector import CSM_CHANNELS

# Official `--backbone` integers; 2 (hf_hub ViT + EfficientNet-B0) is not supported, >= 3 means lite0 only.
BACKBONE_SETS = {
    0: ['deit_base_distilled_patch16_224', 'tf_efficientnet_lite0'],
    1: ['vgg16_bn', 'tf_efficientnet_lite0'],
    3: ['tf_efficientnet_lite0'],
}

# Mini-disc widths by feature resolution. The official sizes the discs for a declared 256² input
# (projected maps at 128, 64, 32, 16), whatever the real sizes: 4, 3, 2, 1 down-blocks down to 8, then the head.
NFC = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}
DECLARED_RES = [128, 64, 32, 16]
CMAP_DIM = 64


def backbone_set(index):
    """Backbone names for the official `--backbone` integer."""
    if index == 2:
        raise ValueError('--backbone=2 (hf_hub:timm/vit_base_patch16_224.augreg_in21k_ft_in1k + '
                         'tf_efficientnet_b0.ns_jft_in1k) is not supported; use 0, 1 or 3')
    if index < 0:
        raise ValueError(f'--backbone must be >= 0, got {index}')
    return list(BACKBONE_SETS[min(index, 3)])


def sn_conv(in_channels, out_channels, kernel, stride, padding, bias=True):
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=bias))


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.main = nn.Sequential(sn_conv(in_channels, out_channels, 4, 2, 1), nn.BatchNorm2d(out_channels),
                                  nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.main(x)


class FullyConnected(nn.Module):
    """StyleGAN2 FullyConnectedLayer with 'lrelu': weight N(0,1) scaled by 1/√in at run time, bias 0,
    leaky ReLU 0.2 then ×√2."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        x = F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


class SingleDisc(nn.Module):
    """DownBlocks while the (declared) size > 8, then a 4×4 spectral-norm head → one logit channel.
    Conditional (embed_table given): `cls` projects to 64 channels, scored against the projected class embedding:
    out = Σ_ch cls(h)·cmap / √64 (SingleDiscCond)."""

    def __init__(self, in_channels, start_res, embed_table=None):
        super().__init__()
        blocks, res, channels = [], start_res, in_channels
        while res > 8:
            blocks.append(DownBlock(channels, NFC[res // 2]))
            channels, res = NFC[res // 2], res // 2
        self.conditional = embed_table is not None
        if self.conditional:
            self.main = nn.Sequential(*blocks)
            self.cls = sn_conv(channels, CMAP_DIM, 4, 1, 0, bias=False)
            self.embed = nn.Embedding.from_pretrained(embed_table.clone(), freeze=False)
            self.embed_proj = FullyConnected(EMBED_DIM, CMAP_DIM)
        else:
            self.main = nn.Sequential(*blocks, sn_conv(channels, 1, 4, 1, 0, bias=False))

    def forward(self, x, class_index=None):
        h = self.main(x)
        if not self.conditional:
            return h
        cmap = self.embed_proj(self.embed(class_index))
        return (self.cls(h) * cmap[:, :, None, None]).sum(dim=1, keepdim=True) / math.sqrt(CMAP_DIM)


class MultiScaleD(nn.Module):
    def __init__(self, channels, embed_table=None):
        super().__init__()
        self.mini_discs = nn.ModuleDict({str(i): SingleDisc(c, res, embed_table)
                                         for i, (c, res) in enumerate(zip(channels, DECLARED_RES))})

    def forward(self, features, class_index=None):
        return torch.cat([disc(f, class_index).flatten(1) for disc, f in zip(self.mini_discs.values(), features)], 1)


class ProjectedDiscriminator(nn.Module):
    """D2O's discriminator. forward(img ∈ [−1,1] [B,3,R,R], c one-hot [B,c_dim]) → one [B, N_k] logit tensor per
    backbone (N_k = 64 for lite0/DeiT, 484 for vgg16_bn). `weights_info` records each backbone's weight source and
    `embedding_info` the class embedding's. `backbone_kwargs` = {name: timm constructor overrides} (tests use tiny
    configs). Frozen projections and random backbones derive from `seed` only."""

    def __init__(self, backbones=('tf_efficientnet_lite0',), c_dim=0, pretrained=True, weights=None,
                 interp224=True, diffaug=False, seed=0, embedding=None, log=print, backbone_kwargs=None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        backbone_kwargs = backbone_kwargs or {}
        self.c_dim, self.diffaug = c_dim, diffaug
        self.feature_networks = nn.ModuleDict({
            name: FeatureNetwork(name, generator, pretrained=pretrained, weights=weights, interp224=interp224,
                                 diffaug=diffaug, log=log, **backbone_kwargs.get(name, {}))
            for name in backbones})
        self.weights_info = {name: net.provenance for name, net in self.feature_networks.items()}
        embed_table, self.embedding_info = self._class_embedding(c_dim, embedding)
        if embed_table is not None:
            log(f'D class embedding: {self.embedding_info}')
        # The projected maps have CSM_CHANNELS = [64, 64, 128, 256] whatever the backbone.
        self.discriminators = nn.ModuleDict({name: MultiScaleD(CSM_CHANNELS, embed_table) for name in backbones})

    @staticmethod
    def _class_embedding(c_dim, embedding):
        if c_dim == 0:
            if embedding is not None:
                raise ValueError(f'embedding={embedding} was given but the discriminator is unconditional (c_dim=0)')
            return None, None
        if embedding is None:  # the official initialises from in_embeddings/tf_efficientnet_lite0.pkl instead
            return torch.randn(max(1000, c_dim), EMBED_DIM), 'random N(0,1) (no embedding file given)'
        table = load_class_embedding(embedding)
        if table.shape[0] < c_dim:
            raise ValueError(f'class embedding {embedding} has {table.shape[0]} rows but c_dim={c_dim} classes')
        return table, f'file {embedding} ({table.shape[0]}×{EMBED_DIM})'

    def trainable_parameters(self):
        return self.discriminators.parameters()

    def requires_grad_(self, requires_grad=True):
        """Toggles only the trainable mini-discriminators: the feature networks stay frozen."""
        self.discriminators.requires_grad_(requires_grad)
        return self

    def features(self, img, augment=True):
        """Frozen part: per backbone, its 4 projected feature maps. augment=False skips DiffAugment (R1 uses
        clean reals, d2o-method.md §5)."""
        return [net(img, augment) for net in self.feature_networks.values()]

    def score(self, features, c=None):
        """Trainable part: per backbone, logits [B, N_k]. The class index is argmax(c)."""
        class_index = None
        if self.c_dim:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f'conditional discriminator needs one-hot labels c of shape [B, {self.c_dim}], got '
                                 f'{None if c is None else list(c.shape)}')
            class_index = c.argmax(dim=1)
        return [disc(f, class_index) for disc, f in zip(self.discriminators.values(), features)]

    def forward(self, img, c=None):
        return self.score(self.features(img), c)
