"""Projected-GAN discriminator of D2O (docs/method.md §6, §10).

Per backbone (named in backbones.py): a frozen `FeatureNetwork` (feature_networks.py) yields 4 projected maps,
and 4 trainable spectral-norm mini-discriminators turn them into logit maps, flattened and concatenated to [B, N_k].
`features(img)` is the frozen part (DiffAugment included when on) and `score(features, c)` the trainable one, so
the training loop can reuse real-image features for the D step and R1; `forward(img, c) = score(features(img), c)`."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from .class_embedding import EMBED_DIM, resolve_class_embedding
from .feature_networks import FeatureNetwork
from .projector import CSM_CHANNELS

# Mini-disc widths by feature resolution. When the D input is resized to 224 (or never resized, interp224 on)
# the official sizes the discs for a declared 256² input (projected maps at 128, 64, 32, 16), whatever the real
# sizes: 4, 3, 2, 1 down-blocks down to 8, then the head (docs/method.md §10). With interp224 off they are sized
# from the maps' measured sizes instead (docs/method.md §10; see ProjectedDiscriminator).
NFC = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}
DECLARED_RES = [128, 64, 32, 16]
END_RES = 8
HEAD_KERNEL = 4  # the 4×4 valid head conv: a mini-disc needs a map of at least 4×4 after its down-blocks
CMAP_DIM = 64


def sn_conv(in_channels, out_channels, kernel, stride, padding, bias=True):
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=bias))


def nearest_start_res(size):
    """The official rule for a map size that is not an NFC key: the nearest key (ties → the smaller)."""
    return min(NFC, key=lambda res: abs(res - size))


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics come from fixed groups of `group` consecutive samples (ghost
    batch norm), so a D step normalises like `batch / group` processes of `group` samples each, whatever the
    process count (the official D normalises over the per-GPU batch, docs/method.md §5).
    group=None: plain BatchNorm2d over the whole batch (the official behaviour at any per-process batch).

    Each group goes through F.batch_norm on its own, the very call a process holding that group would make, so
    outputs and gradients equal the multi-process ones to the last bit of the kernels. Running statistics (used
    only in eval mode; D trains in train mode throughout) are updated once per forward with the mean over
    groups of each group's batch mean and unbiased variance: the average over processes of the buffers that
    per-process BatchNorms would hold after the same forward."""

    def __init__(self, channels, group=None):
        super().__init__(channels)
        if group is not None and group < 1:
            raise ValueError(f'D BatchNorm group size (--d-bn-group) must be >= 1, got {group}')
        self.group = group

    def forward(self, x):
        if not self.training or self.group is None:
            return super().forward(x)
        if x.shape[0] % self.group:
            raise ValueError(f'D BatchNorm group size --d-bn-group={self.group} must divide the per-process '
                             f'batch, got a batch of {x.shape[0]}')
        chunks = x.split(self.group)
        out = torch.cat([F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)
                         for chunk in chunks])
        with torch.no_grad():
            grouped = x.detach().unflatten(0, (len(chunks), self.group)).transpose(1, 2).flatten(2)  # [G, C, n]
            mean, var = grouped.mean(dim=2).mean(dim=0), grouped.var(dim=2, correction=1).mean(dim=0)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, bn_group=None):
        super().__init__()
        self.main = nn.Sequential(sn_conv(in_channels, out_channels, 4, 2, 1),
                                  GroupBatchNorm2d(out_channels, bn_group), nn.LeakyReLU(0.2))

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

    def __init__(self, in_channels, start_res, embed_table=None, bn_group=None):
        super().__init__()
        blocks, res, channels = [], start_res, in_channels
        while res > END_RES:
            blocks.append(DownBlock(channels, NFC[res // 2], bn_group))
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
    def __init__(self, channels, start_resolutions, embed_table=None, bn_group=None):
        super().__init__()
        self.mini_discs = nn.ModuleDict({str(i): SingleDisc(c, res, embed_table, bn_group)
                                         for i, (c, res) in enumerate(zip(channels, start_resolutions))})

    def forward(self, features, class_index=None):
        return torch.cat([disc(f, class_index).flatten(1) for disc, f in zip(self.mini_discs.values(), features)], 1)


class ProjectedDiscriminator(nn.Module):
    """D2O's discriminator. forward(img ∈ [−1,1] [B,3,R,R], c one-hot [B,c_dim]) → one [B, N_k] logit tensor per
    backbone (N_k = 64 for lite0/DeiT, 484 for vgg16_bn at 224). `weights_info` records each backbone's weight
    source and `embedding_info` the class embedding's. `backbone_kwargs` = {name: timm constructor overrides}
    (tests use tiny configs). Frozen projections and random backbones derive from `seed` only.
    `img_resolution` (R) is needed with interp224=False, where the mini-discs are sized from the real maps.
    `bn_group`: the mini-discs' BatchNorm normalises over groups of this many consecutive samples instead of
    the whole per-process batch (GroupBatchNorm2d; None = per-process batch, the official behaviour)."""

    def __init__(self, backbones=('tf_efficientnet_lite0',), c_dim=0, pretrained=True, weights=None,
                 interp224=True, diffaug=False, seed=0, embedding=None, log=print, backbone_kwargs=None,
                 img_resolution=None, bn_group=None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        backbone_kwargs = backbone_kwargs or {}
        self.c_dim, self.diffaug, self.bn_group = c_dim, diffaug, bn_group
        self.feature_networks = nn.ModuleDict({
            name: FeatureNetwork(name, generator, pretrained=pretrained, weights=weights, interp224=interp224,
                                 diffaug=diffaug, log=log, **backbone_kwargs.get(name, {}))
            for name in backbones})
        self.weights_info = {name: net.provenance for name, net in self.feature_networks.items()}
        # `embedding`: None/'official' → the official ImageNet table, 'random' (rows from `generator`: the same
        # on every rank) or a file. All N rows are kept and class k reads row k = argmax of its one-hot label,
        # as the official nn.Embedding(1000, 320) does: 10 classes use rows 0–9 (docs/method.md §10).
        embed_table, self.embedding_info = resolve_class_embedding(embedding, c_dim, log=log, generator=generator)
        if embed_table is not None:
            log(f'D class embedding: {self.embedding_info}')
        # The projected maps have CSM_CHANNELS = [64, 64, 128, 256] whatever the backbone.
        self.discriminators = nn.ModuleDict({
            name: MultiScaleD(CSM_CHANNELS, self._start_resolutions(name, net, interp224, img_resolution),
                              embed_table, bn_group)
            for name, net in self.feature_networks.items()})

    @staticmethod
    def _start_resolutions(name, net, interp224, img_resolution):
        """Per level, the resolution its mini-disc is built for. Resized to 224 (or interp224 on): the official
        declared sizes. interp224 off: the official nearest-NFC-key rule applied to the projected maps' measured
        size at `img_resolution` instead of the declared one, so every disc ends at 8×8 or less before its 4×4
        head (docs/method.md §10); maps too small for that head are refused with a clear error."""
        if interp224 or net.body.always_resize:
            return DECLARED_RES
        if img_resolution is None:
            raise ValueError('interp224=False: the discriminator needs img_resolution (the dataset resolution) to '
                             'size its mini-discriminators from the feature maps it will get')
        sizes = net.map_sizes(img_resolution)
        starts = [nearest_start_res(size) for size in sizes]
        for level, (size, start) in enumerate(zip(sizes, starts)):
            while start > END_RES:  # each DownBlock (4×4, stride 2, pad 1) halves the map, rounding down
                size, start = size // 2, start // 2
            if size < HEAD_KERNEL:
                raise ValueError(f'--interp224=false: at {img_resolution}×{img_resolution} input, {name}\'s level-'
                                 f'{level} maps end {size}×{size}, smaller than the mini-discriminator\'s 4×4 head; '
                                 f'use --interp224=true or a larger resolution')
        return starts

    def trainable_parameters(self):
        return self.discriminators.parameters()

    def requires_grad_(self, requires_grad=True):
        """Toggles only the trainable mini-discriminators: the feature networks stay frozen."""
        self.discriminators.requires_grad_(requires_grad)
        return self

    def features(self, img, augment=True):
        """Frozen part: per backbone, its 4 projected feature maps, after DiffAugment when D was built with
        diffaug=True (drawn independently per backbone; R1 too sees augmented reals, as in the official
        code). augment=False skips DiffAugment."""
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
