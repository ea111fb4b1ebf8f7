"""Frozen feature networks of the Projected-GAN discriminator (docs/method.md §10, docs/offline-weights.md §1.6).
The backbones themselves (builders, normalisation, channels, weight sources) are named in backbones.py.

Each `FeatureNetwork` maps images in [−1, 1] at dataset resolution to 4 projected feature maps:
DiffAugment (optional) → (x+1)/2 → per-network normalisation → bilinear resize to 224 → backbone stages →
random CCM/CSM projection. Everything in it is frozen: parameters never require grad and it stays in eval mode
whatever `train()` says, yet it is differentiable w.r.t. its input (G's loss and R1 need that).
Because the BatchNorm statistics are frozen, each conv → BatchNorm pair of VGG16-BN and EfficientNet-lite0
computes as one conv with the BN folded in (fold_batchnorm_; same state dict; unfold_batchnorm_ undoes it)."""
import torch
import torch.nn.functional as F
from torch import nn

import dnnlib
from .backbones import BACKBONES
from .diffaug import diff_augment
from .frozen_layers import fold_batchnorm_
from .projector import Projector, reset_conv_parameters_
from .weights import load_pretrained

class Stages(nn.Module):
    """Consecutive CNN stages; returns every stage's output."""
    always_resize = False
    input_size = 224

    def __init__(self, stages):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ViTStages(nn.Module):
    """DeiT tokens after blocks 2, 5, 8, 11 (cls + dist tokens dropped, reshaped to the patch grid), each through a
    random frozen readout: 1×1 conv to 96/192/384/768 channels, then ConvT 4×4/4, ConvT 2×2/2, nothing, 3×3/2 conv.
    The input is always resized to the model's own size (224), so the token grid equals the position-embedding
    grid and the official per-call resize of the position embedding is the identity: it is not needed."""
    always_resize = True

    def __init__(self, vit, generator):
        super().__init__()
        if len(vit.blocks) != 12 or vit.num_prefix_tokens != 2:
            raise ValueError(f'expected a distilled ViT with 12 blocks (got {len(vit.blocks)} blocks, '
                             f'{vit.num_prefix_tokens} prefix tokens)')
        self.patch_embed, self.norm_pre = vit.patch_embed, vit.norm_pre
        self.cls_token, self.dist_token, self.pos_embed = vit.cls_token, vit.dist_token, vit.pos_embed
        self.stages = nn.ModuleList(vit.blocks[i:i + 3] for i in (0, 3, 6, 9))
        dim = vit.embed_dim
        self.readouts = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, 96, 1), nn.ConvTranspose2d(96, 96, 4, stride=4)),
            nn.Sequential(nn.Conv2d(dim, 192, 1), nn.ConvTranspose2d(192, 192, 2, stride=2)),
            nn.Conv2d(dim, 384, 1),
            nn.Sequential(nn.Conv2d(dim, 768, 1), nn.Conv2d(768, 768, 3, stride=2, padding=1))])
        reset_conv_parameters_(self.readouts, generator)
        self.input_size = self.patch_embed.img_size[0]

    def forward(self, x):
        patch = self.patch_embed.patch_size
        grid = (x.shape[2] // patch[0], x.shape[3] // patch[1])
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(x.shape[0], -1, -1)
        tokens = self.norm_pre(torch.cat([prefix, self.patch_embed(x)], dim=1) + self.pos_embed)
        feats = []
        for stage, readout in zip(self.stages, self.readouts):
            tokens = stage(tokens)
            feats.append(readout(tokens[:, 2:].transpose(1, 2).unflatten(2, grid)))
        return feats


def load_exactly(module, state, name, unexpected=()):
    result = module.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys) + list(unexpected)
    if result.missing_keys or unexpected:
        raise dnnlib.InputError(f'the weights given for {name} do not fit its architecture: '
                           f'{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, '
                           f'{len(unexpected)} unexpected keys {unexpected[:5]}')


class FeatureNetwork(nn.Module):
    """One backbone's frozen path. `provenance` says where its weights came from (or that they are random).
    `folded_batchnorms`: how many of the body's BatchNorms compute folded into their convs (0 for DeiT)."""

    FOLD_PROBE_SIZE = 32  # the probe pass that verifies conv → BN pairs (conv_bn_pairs) runs on 1×3×32×32 zeros

    def __init__(self, name, generator, pretrained=True, weights=None, interp224=True, diffaug=False, log=print,
                 **kwargs):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f'unknown discriminator backbone {name!r}; expected one of {sorted(BACKBONES)}')
        backbone = BACKBONES[name]
        (mean, std), channels = backbone.mean_std, list(backbone.channels)
        if pretrained:
            state, self.provenance = load_pretrained(name, weights, log)
        else:
            state, self.provenance = None, 'random (pretrained=False)'
            log(f'D feature net {name}: RANDOM weights (pretrained=False)')
        # Every random value here (projections, ViT readouts, the backbone when pretrained=False) derives from
        # `generator`: identical on every rank. Layer constructors also draw default inits from the global RNG,
        # so building happens in a forked, seeded RNG and leaves the caller's stream as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2 ** 62, [], generator=generator)))
            self.body = backbone.build(state, generator, **kwargs)
            self.projector = Projector(channels, generator)
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.interp224, self.diffaug = interp224, diffaug
        self.requires_grad_(False)
        self.train(False)  # before folding: only eval-mode BatchNorm is an affine map
        probe = torch.zeros(1, 3, self.FOLD_PROBE_SIZE, self.FOLD_PROBE_SIZE)
        self.folded_batchnorms = fold_batchnorm_(self.body, probe)

    def train(self, mode=True):
        return super().train(False)  # frozen BatchNorm statistics, whatever the enclosing D's mode

    def map_sizes(self, resolution):
        """Spatial size of each projected map for a resolution² input, measured by a forward pass (exact
        whatever the backbone's padding and rounding rules)."""
        with torch.no_grad():
            return [f.shape[-1] for f in self(torch.zeros(1, 3, resolution, resolution), augment=False)]

    def forward(self, x, augment=True):
        if self.diffaug and augment:
            x = diff_augment(x)
        x = ((x + 1) / 2 - self.mean) / self.std
        size = self.body.input_size
        if x.shape[-2:] != (size, size) and (self.body.always_resize or (self.interp224 and x.shape[-1] < size)):
            x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
        return self.projector(self.body(x))
