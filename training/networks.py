"""EDM U-Nets (DDPM++/NCSN++ `SongUNet`, ADM `DhariwalUNet`), their building blocks and the
preconditioning wrappers (VP, VE, iDDPM, EDM, D2O), per docs/edm-networks.md.

Module keys, parameter/buffer names, shapes and plain attributes equal NVlabs EDM's (and D2O's), so
released checkpoints map onto these classes 1:1. This file's source is embedded in every snapshot and
must also run inside EDM's own code, so it imports only numpy, torch and `torch_utils.persistence`.
"""
import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

D2O_EPSILON = 2e-3      # consistency boundary: D2OPrecond(x, σ=ε) = x (docs/edm-networks.md §5)

#----------------------------------------------------------------------------
# Layers (docs/edm-networks.md §1, §2).

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode {mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform '
                     f'or kaiming_normal')


@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **init_kwargs) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **init_kwargs) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional 2× up/downsampling by a separable FIR filter; kernel=0 resamples only.
    `groups` is D2O's extension (fan-in/out still computed as for a dense conv)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=[1, 1],
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0, groups=1):
        if up and down:
            raise ValueError('Conv2d: up and down are mutually exclusive')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.groups = groups
        init_kwargs = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels // groups, kernel, kernel], **init_kwargs)
                                         * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **init_kwargs) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv2d, conv_transpose2d = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                 padding=max(f_pad - w_pad, 0))
            x = conv2d(x, w, b, padding=max(w_pad - f_pad, 0), groups=self.groups)
            b = None  # added by the conv: one fewer full-size add (and reduction in backward) per layer
        elif self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad, groups=self.groups)
            x = conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                     padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, b, padding=w_pad, groups=self.groups)
                b = None
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Always normalises in float32 and casts back (D2O's rule; identical to EDM for float32 input)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        y = torch.nn.functional.group_norm(x.float(), num_groups=self.num_groups, weight=self.weight.float(),
                                           bias=self.bias.float(), eps=self.eps)
        return y.to(x.dtype)


def float32_region(x):
    """Autocast off for the mapping network and the `affine` layers: the official networks compute the noise/
    class embedding and its per-block projections in float32 also in mixed precision (docs/method.md §9), so
    bf16 autocast must not lower them."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def attention_weights(q, k):
    """softmax over keys of qᵀk/sqrt(c) for q, k of shape [N, c, HW], computed in float32 also under
    autocast (docs/edm-networks.md §2.4); autograd's backward then runs in float32 too."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        w = torch.einsum('ncq,nck->nqk', q.float(), (k / np.sqrt(k.shape[1])).float()).softmax(dim=2)
    return w.to(q.dtype)

#----------------------------------------------------------------------------
# U-Net block and noise embeddings (docs/edm-networks.md §2.5–2.7).

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=[1, 1],
                 resample_proj=False, adaptive_scale=True, init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        with float32_region(emb):
            params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            # qkv channels are interleaved per head as [c, (q, k, v)] (docs/edm-networks.md §2.5 step 5).
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum('nqk,nck->ncq', w, v)
            x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
        return x


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _drop_labels(class_labels, batch_size, p):
    # Classifier-free-guidance style label dropout: zero whole rows with probability p.
    keep = torch.rand([batch_size, 1], device=class_labels.device) >= p
    return class_labels * keep.to(class_labels.dtype)

#----------------------------------------------------------------------------
# SongUNet: DDPM++ / NCSN++ (docs/edm-networks.md §3).

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10,
                 label_dropout=0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=[1, 1]):
        for name, value, allowed in [('embedding_type', embedding_type, ['fourier', 'positional']),
                                     ('encoder_type', encoder_type, ['standard', 'skip', 'residual']),
                                     ('decoder_type', decoder_type, ['standard', 'skip'])]:
            if value not in allowed:
                raise ValueError(f'SongUNet: {name}={value!r}, expected one of {allowed}')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping.
        self.map_noise = (PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional'
                          else FourierEmbedding(num_channels=noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                                                                    resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def mapping(self, noise_labels, class_labels, augment_labels, batch_size):
        """Embedding [N, emb_channels] of noise level, class and augmentation labels, in float32 (float32_region)."""
        with float32_region(noise_labels):
            emb = self.map_noise(noise_labels)
            emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
            if self.map_label is not None:
                labels = class_labels
                if self.training and self.label_dropout:
                    labels = _drop_labels(labels, batch_size, self.label_dropout)
                emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
            if self.map_augment is not None and augment_labels is not None:
                emb = emb + self.map_augment(augment_labels)
            emb = silu(self.map_layer0(emb))
            return silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.mapping(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# DhariwalUNet: ADM (docs/edm-networks.md §4).

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8],
                 dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def mapping(self, noise_labels, class_labels, augment_labels, batch_size):
        """Embedding [N, emb_channels] of noise level, class and augmentation labels, in float32 (float32_region)."""
        with float32_region(noise_labels):
            emb = self.map_noise(noise_labels)
            if self.map_augment is not None and augment_labels is not None:
                emb = emb + self.map_augment(augment_labels)
            emb = silu(self.map_layer0(emb))
            emb = self.map_layer1(emb)
            if self.map_label is not None:
                labels = class_labels
                if self.training and self.label_dropout:
                    labels = _drop_labels(labels, batch_size, self.label_dropout)
                emb = emb + self.map_label(labels)
            return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.mapping(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Preconditioning wrappers (docs/edm-networks.md §5): D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise).

_MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}


class Preconditioner(torch.nn.Module):
    """Shared constructor and forward of the wrappers; subclasses set sigma_min/sigma_max and provide
    `scalings(sigma) -> (c_skip, c_out, c_in, c_noise)`."""
    half_dtype = torch.float16  # what use_fp16 means on CUDA

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_out_channels, model_kwargs):
        if model_type not in _MODEL_TYPES:
            raise ValueError(f'{type(self).__name__}: model_type={model_type!r}, expected one of {list(_MODEL_TYPES)}')
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                              out_channels=model_out_channels, label_dim=label_dim, **model_kwargs)

    def _denoise(self, x, sigma, class_labels, force_fp32, model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.half_dtype if self.use_fp16 and not force_fp32 and x.device.type == 'cuda' else torch.float32
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return self._denoise(x, sigma, class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@persistence.persistent_class
class VPPrecond(Preconditioner):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                 epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # float32 on the CPU like EDM (also when constructed under torch.device('meta')).
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float32, device='cpu')))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float32, device='cpu')))

    def scalings(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        t = t if isinstance(t, torch.Tensor) else torch.tensor(t)  # keeps the ctor's CPU tensor under a device context
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@persistence.persistent_class
class VEPrecond(Preconditioner):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def scalings(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(Preconditioner):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', **model_kwargs):
        # The U-Net also predicts variances (2·img_channels outputs); only the first half is used.
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2, model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = torch.zeros(M + 1, device='cpu')  # float32 on the CPU like EDM, also under torch.device('meta')
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def scalings(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def alpha_bar(self, j):
        j = torch.as_tensor(j, device='cpu')
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Nearest discrete noise level u_j (or its index j)."""
        sigma = torch.as_tensor(sigma)
        index = (sigma.to(self.u.device).to(torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


def edm_scalings(sigma, sigma_data, eps=0):
    """EDM's c_skip, c_out, c_in, c_noise; D2O shifts σ by ε in c_skip and c_out so that c_skip(ε) = 1 and
    c_out(ε) = 0 (docs/edm-networks.md §5)."""
    c_skip = sigma_data ** 2 / ((sigma - eps) ** 2 + sigma_data ** 2)
    c_out = (sigma - eps) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


@persistence.persistent_class
class EDMPrecond(Preconditioner):
    half_dtype = torch.bfloat16  # D2O runs EDM/D2O wrappers in bfloat16 (docs/method.md §9)

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)


@persistence.persistent_class
class D2OPrecond(Preconditioner):
    """EDM scalings shifted so that D(x; ε) = x exactly (consistency boundary, docs/edm-networks.md §5)."""
    half_dtype = torch.bfloat16  # docs/method.md §9

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.eps = D2O_EPSILON
        self.counter = 0  # attribute of the released class (kept so snapshots match); unused

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data, self.eps)

    def forward(self, x, sigma, sigma_next=None, class_labels=None, augment_labels=None, force_fp32=False, **model_kwargs):
        # sigma_next is accepted so k-step generators can call G(x, σ, σ_next, ...) (the released class raises
        # TypeError there) and ignored: the output stays an x0 estimate (docs/edm-networks.md §5). x is cast to float32
        # like EDM (the released class kept float64, docs/method.md §12.13).
        if sigma_next is not None and torch.as_tensor(sigma_next).numel() not in (1, x.shape[0]):
            raise ValueError(f'D2OPrecond: sigma_next has shape {tuple(torch.as_tensor(sigma_next).shape)}, expected one '
                             f'noise level per sample; pass class_labels by keyword (the 3rd positional is sigma_next)')
        return self._denoise(x, sigma, class_labels, force_fp32, dict(model_kwargs, augment_labels=augment_labels))
