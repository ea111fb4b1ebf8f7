"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023; EDM2's headline metric), following EDM2's
`DINOv2Detector` with its default `resize_mode='torch'`:

1. uint8 images → float, `F.interpolate(size=(224, 224), mode='bicubic', antialias=True)` (no crop, no
   re-quantisation; 1-channel images repeated to 3);
2. x / 255, ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225);
3. the torch.hub `dinov2_vitl14` forward: the 1024-d CLS token after the final LayerNorm.

The network is timm's `vit_large_patch14_dinov2` built at 224² (16×16 patches). The hub model keeps its
37×37 (518²) position embedding and resamples it on every call with a bicubic `F.interpolate` given a
scale factor of (16 + 0.1) / 37 and no antialiasing (DINOv2's "interpolate_offset" kludge); timm's
checkpoint converter would resample by output size with antialiasing instead, which samples other
positions. So the 37×37 table is resampled here once, at load time, exactly as the hub model does it.
Weights: metrics/vit_weights.py — by default Meta's `dinov2_vitl14_pretrain.pth` (the file torch.hub loads
for EDM2) through the download cache."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from metrics.vit_weights import load_converted, resolve_state_dict, state_fingerprint

RESOLUTION = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
INTERPOLATE_OFFSET = 0.1
VERSION = 'dinov2-vit-l-14/edm2-v1: torch bicubic antialias 224, ImageNet mean/std, final-norm CLS token'


def hub_resampled_pos_embed(pos_embed, grid):
    """[1, 1 + M², D] (CLS first) → [1, 1 + grid², D] as DINOv2's `interpolate_pos_encoding` (module doc)."""
    num_patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f'DINOv2 pos_embed holds {num_patches} patch positions, not a square grid')
    if side == grid:
        return pos_embed
    table = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + INTERPOLATE_OFFSET) / side
    table = F.interpolate(table, mode='bicubic', antialias=False, scale_factor=(scale, scale))
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos_embed[:, :1].float(), table], dim=1).to(pos_embed.dtype)


class DINOv2Encoder(nn.Module):
    """`forward(uint8 [N, C, H, W])` → float32 [N, 1024] DINOv2 CLS features (module doc)."""
    version = VERSION

    def __init__(self, **model_kwargs):
        super().__init__()
        import timm
        self.net = timm.create_model('vit_large_patch14_dinov2', pretrained=False, num_classes=0,
                                     img_size=RESOLUTION, **model_kwargs)
        self.num_features = self.net.num_features
        self.register_buffer('mean', torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.weights_id = None

    def forward(self, images):
        x = images.to(self.mean.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bicubic', antialias=True)
            return self.net((x / 255 - self.mean) / self.std).float()


def load_dinov2(weights=None, device='cpu', state=None, **model_kwargs):
    """The FD-DINOv2 encoder (eval mode, frozen) from `state` (a state dict, tests), `weights` (PATH|URL,
    `--dinov2-weights`) or Meta's file through the download cache; `model_kwargs` shrink it for tests."""
    label = weights or DEFAULT_URL
    if state is None:
        state = resolve_state_dict(weights, 'DINOv2 ViT-L/14', '--dinov2-weights', default_url=DEFAULT_URL)
    encoder = DINOv2Encoder(**model_kwargs)
    state = dict(state)
    if isinstance(state.get('pos_embed'), torch.Tensor) and state['pos_embed'].ndim == 3:
        grid = encoder.net.patch_embed.grid_size[0]
        state['pos_embed'] = hub_resampled_pos_embed(state['pos_embed'], grid)
    load_converted(encoder.net, state, label, 'DINOv2 ViT-L/14')
    encoder.weights_id = state_fingerprint(encoder.net)
    return encoder.eval().requires_grad_(False).to(device)
