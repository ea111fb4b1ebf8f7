"""Random, frozen Projected-GAN projection: CCM + CSM (docs/method.md §10).

The official draws these weights from each rank's own global RNG, so every GPU had different projections
(defect 12.5). Here they come from a caller-owned torch.Generator: same seed → identical weights on every rank
and in every separately built instance, and the global RNG stream is left untouched."""
import math

import torch
import torch.nn.functional as F
from torch import nn

CSM_CHANNELS = [64, 64, 128, 256]  # output channels per level; CCM widens level i to 64·2^i


def reset_conv_parameters_(module, generator):
    """PyTorch's default Conv2d/ConvTranspose2d init (kaiming-uniform a=√5 → U(±1/√fan_in), bias likewise),
    drawn from `generator`. fan_in = numel of weight[0] for both layer kinds, as torch computes it."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            bound = 1 / math.sqrt(m.weight[0].numel())
            with torch.no_grad():
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    return module


class Projector(nn.Module):
    """CCM: 1×1 conv per level, in_i → 64·2^i. CSM: y3 = conv(up2(c3)); y_i = conv(up2(y_{i+1} + c_i)),
    up2 = bilinear ×2 (align_corners=True), 1×1 convs to CSM_CHANNELS. Returns [y0, y1, y2, y3]."""

    def __init__(self, in_channels, generator):
        super().__init__()
        widths = [64 * 2 ** i for i in range(len(in_channels))]
        self.ccm = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(in_channels, widths))
        self.csm = nn.ModuleList(nn.Conv2d(w, out, 1) for w, out in zip(widths, CSM_CHANNELS))
        reset_conv_parameters_(self, generator)

    def forward(self, feats):
        outs, y = [], 0
        for i in reversed(range(len(feats))):
            y = y + self.ccm[i](feats[i])
            y = self.csm[i](F.interpolate(y, scale_factor=2, mode='bilinear', align_corners=True))
            outs.insert(0, y)
        return outs
