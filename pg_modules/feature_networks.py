"""Frozen feature networks of the Projected-GAN discriminator (docs/method.md §10, docs/offline-weights.md §1.6).

Each `FeatureNetwork` maps images in [−1, 1] at dataset resolution to 4 projected feature maps:
DiffAugment (optional) → (x+1)/2 → per-network normalisation → bilinear resize to 224 → backbone stages →
random CCM/CSM projection. Everything in it is frozen: parameters never require grad and it stays in eval mode
whatever `train()` says, yet it is differentiable w.r.t. its input (G's loss and R1 need that).
Because the BatchNorm statistics are frozen, each conv → BatchNorm pair of VGG16-BN and EfficientNet-lite0
computes as one conv with the BN folded in (fold_batchnorm_; same state dict; unfold_batchnorm_ undoes it)."""
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .diffaug import diff_augment
from .projector import Projector, reset_conv_parameters_
from .weights import load_pretrained

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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


class _ConvWithConvInputGrad(torch.autograd.Function):
    """conv2d with a constant weight whose input gradient is computed by a differentiable conv_transpose2d.
    For grouped (depthwise) convs, ATen's generic double backward loops over the groups (≈9000 small convs
    per R1 step in EfficientNet-Lite0); differentiating conv_transpose2d instead is one grouped conv."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError('FrozenGroupedConv2d weights must not require grad')
        ctx.save_for_backward(weight)
        ctx.conf = stride, padding, dilation, groups, x.shape[2:]
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups, in_size = ctx.conf
        # output_padding recovers input rows that the strided forward never reached
        output_padding = [in_size[i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] +
                                        dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(2)]
        grad_x = F.conv_transpose2d(grad, weight.to(grad.dtype), None, stride, padding, output_padding, groups,
                                    dilation)
        return grad_x, None, None, None, None, None, None


class FrozenConv2d(nn.Module):
    """Stands in for a frozen nn.Conv2d or timm Conv2dSame (TF-SAME padding): same outputs, same state-dict keys
    (`weight`, `bias` are the conv's own Parameters). `folded` (a BatchNormFold, set by fold_batchnorm_) makes it
    compute with the following eval-mode BatchNorm folded into its weight and bias. `original`: the module it
    replaced, given back by unfold_batchnorm_ (None when it stands in from the start, as grouped convs do)."""

    def __init__(self, conv):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.tf_same = isinstance(conv, timm.layers.Conv2dSame) or getattr(conv, 'tf_same', False)
        self.training = conv.training
        # Plain attributes, not submodules: the state dict holds only weight and bias.
        object.__setattr__(self, 'folded', getattr(conv, 'folded', None))
        object.__setattr__(self, 'original', None)

    def conv(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        if self.tf_same:
            x = timm.layers.pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        weight, bias = (self.weight, self.bias) if self.folded is None else self.folded(self.weight, self.bias)
        return self.conv(x, weight, bias)

    def extra_repr(self):
        return f'{tuple(self.weight.shape)}, stride={self.stride}, tf_same={self.tf_same}, ' \
               f'folded_bn={self.folded is not None}'


class FrozenGroupedConv2d(FrozenConv2d):
    """FrozenConv2d for a grouped conv, with a cheap double backward (see _ConvWithConvInputGrad); R1 runs
    through it with the folded weight and bias as well."""

    def conv(self, x, weight, bias):
        return _ConvWithConvInputGrad.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _replace_grouped_convs_(net):
    """Swap every grouped conv of a frozen network for FrozenGroupedConv2d (same weights, same names)."""
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            net.set_submodule(name, FrozenGroupedConv2d(module.requires_grad_(False)))
    return net

#----------------------------------------------------------------------------
# Folding the frozen networks' BatchNorm into their convolutions.
#
# The feature networks run every BatchNorm in eval mode with frozen statistics (FeatureNetwork.train), so
# BN(y) = (y − μ)·s + β with s = γ/√(σ² + ε) is an affine map per channel, and BN(conv(x; W, b)) =
# conv(x; W·s, (b − μ)·s + β): one conv instead of a conv plus a batch_norm (and its backward and, in R1,
# double backward). The stored tensors stay as they are — training states and snapshots keep their keys and
# values — and the folded weight and bias are derived from them, cached until any of them changes.

# BatchNorm types folded, and what each applies after normalising (timm's BatchNormAct2d: drop, then act).
_AFTER_NORMALISATION = {nn.BatchNorm2d: (), timm.layers.BatchNormAct2d: ('drop', 'act')}
# Exact types (compared with `type(m) in`): a subclass may compute something else.
_FOLDABLE_CONVS = (nn.Conv2d, timm.layers.Conv2dSame, FrozenConv2d, FrozenGroupedConv2d)


class BatchNormFold:
    """(weight, bias) of conv ∘ eval-mode BN for a conv's current weight and bias and `bn`'s current tensors.
    Cached; recomputed when any source tensor is replaced (load_state_dict(assign=True), .to(), ...) or changed
    in place (load_state_dict's copies, any in-place edit): the cache key holds each tensor's address and version
    counter, and the cache pins the source storages so that no other tensor can take over a cached address."""

    def __init__(self, bn):
        self.bn = bn
        self.key = self.value = self.pinned = None

    def __call__(self, weight, bias):
        bn = self.bn
        sources = (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if any(t is not None and t.requires_grad for t in sources):
            raise RuntimeError('folded BatchNorm: the conv and BatchNorm tensors must be frozen (requires_grad False)')
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if key != self.key:
            self.value = self.fold(weight, bias)
            self.key, self.pinned = key, [t.detach() for t in sources if t is not None]
        return self.value

    def fold(self, weight, bias):
        """W' = W·s, b' = (b − μ)·s + β, s = γ/√(σ² + ε), computed in float64 (where the device has it), then
        rounded once to the conv's dtype."""
        bn = self.bn
        wide = torch.float64 if weight.device.type in ('cpu', 'cuda') else torch.float32
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.to(wide)
            shift = -bn.running_mean.to(wide) if bias is None else bias.to(wide) - bn.running_mean.to(wide)
            shift = shift * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(wide)
            return (weight.to(wide) * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype)


class FoldedBatchNorm(nn.Module):
    """Stands in for an eval-mode BatchNorm2d / timm BatchNormAct2d whose affine map is folded into the conv
    feeding it. It holds the BN's own tensors under the same names (the state dict, its version metadata and
    loading are the BN's) and applies only what the BN applies after normalising (drop and act for timm)."""
    _version = nn.BatchNorm2d._version

    def __init__(self, bn):
        super().__init__()
        self.num_features, self.eps, self.after = bn.num_features, bn.eps, _AFTER_NORMALISATION[type(bn)]
        self.training = bn.training  # False: only eval-mode BNs are folded
        _share_state(bn, self)
        object.__setattr__(self, 'original', bn)  # given back by unfold_batchnorm_; not a submodule

    def forward(self, x):
        if self.training:
            raise RuntimeError('a folded BatchNorm works in eval mode only (the feature networks stay in eval mode)')
        for name in self.after:
            x = getattr(self, name)(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Exactly BatchNorm's loading (old-version states, shape checks, messages), into the shared tensors.
        _share_state(self, self.original)
        self.original._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _share_state(self.original, self)

    def extra_repr(self):
        return f'{self.num_features}, eps={self.eps}, folded into the preceding conv'


def _share_state(source, target):
    """Give `target` the very Parameters, buffers and child modules of `source`, under the same names."""
    for name, param in source._parameters.items():
        if param is None:
            target.register_parameter(name, None)
        else:
            setattr(target, name, param)
    for name, buffer in source._buffers.items():
        target.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
    for name, module in source._modules.items():
        setattr(target, name, module)


def _is_foldable_conv(module):
    return (type(module) in _FOLDABLE_CONVS and getattr(module, 'padding_mode', 'zeros') == 'zeros' and
            getattr(module, 'folded', None) is None)


def _is_foldable_bn(module):
    """Eval mode with running statistics (so the BN is affine), and nothing inside but what we re-apply."""
    return (type(module) in _AFTER_NORMALISATION and not module.training and module.running_mean is not None and
            module.running_var is not None and set(module._modules) == set(_AFTER_NORMALISATION[type(module)]))


def _consumer_counts(roots):
    """{autograd node: number of edges into it} over the graph reachable from the `roots` nodes."""
    counts, seen, stack = {}, set(roots), list(roots)
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            counts[node] = counts.get(node, 0) + 1
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return counts, seen


def conv_bn_pairs(net, example):
    """(conv, bn) pairs of `net` whose BN input is exactly, and only, the conv's output, verified on the autograd
    graph of one forward pass of `example` (not guessed from names or order): each runs once; the BN receives
    the conv's output tensor unmodified; nothing but the BN consumes it; the BN's output reaches net's outputs."""
    convs = [m for m in net.modules() if _is_foldable_conv(m)]
    bns = [m for m in net.modules() if _is_foldable_bn(m)]
    if not convs or not bns:
        return []
    calls = {m: [] for m in convs + bns}  # module → [(tensor, its version), ...] per call
    bn_out = {}
    hooks = [m.register_forward_hook(lambda m, args, out: calls[m].append((out, out._version))) for m in convs]
    hooks += [m.register_forward_pre_hook(lambda m, args: calls[m].append((args[0], args[0]._version))) for m in bns]
    hooks += [m.register_forward_hook(lambda m, args, out: bn_out.__setitem__(m, out.grad_fn)) for m in bns]
    try:
        with torch.enable_grad():
            outputs = net(example.detach().requires_grad_(True))
    finally:
        for hook in hooks:
            hook.remove()
    outputs = [outputs] if torch.is_tensor(outputs) else list(outputs)
    counts, reached = _consumer_counts([t.grad_fn for t in outputs if t.grad_fn is not None])
    producer = {id(calls[c][0][0]): c for c in convs if len(calls[c]) == 1 and calls[c][0][0].grad_fn is not None}
    pairs = []
    for bn in bns:
        if len(calls[bn]) != 1:
            continue
        tensor, version = calls[bn][0]
        conv = producer.get(id(tensor))
        if (conv is not None and calls[conv][0][0] is tensor and calls[conv][0][1] == version and
                counts.get(tensor.grad_fn) == 1 and bn_out[bn] in reached and conv.weight.shape[0] == bn.num_features):
            pairs.append((conv, bn))
    return pairs


def fold_batchnorm_(net, example):
    """Fold every eval-mode BatchNorm of the frozen `net` that conv_bn_pairs verifies into its conv (in place;
    `example`: an input for the verifying forward pass, on net's device, of any size the net accepts):
    the BN becomes a FoldedBatchNorm, the conv a FrozenConv2d (grouped ones already are FrozenGroupedConv2d)
    computing with the folded weight and bias. State dict unchanged. Returns the number of BNs folded."""
    names = {}
    for name, module in net.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    folded = 0
    for conv, bn in conv_bn_pairs(net, example):
        if len(names[conv]) != 1 or len(names[bn]) != 1:
            continue  # registered under two names: replacing one would split it
        stand_in = FoldedBatchNorm(bn)
        net.set_submodule(names[bn][0], stand_in)
        if not isinstance(conv, FrozenConv2d):
            frozen = FrozenConv2d(conv)
            object.__setattr__(frozen, 'original', conv)
            net.set_submodule(names[conv][0], frozen)
            conv = frozen
        object.__setattr__(conv, 'folded', BatchNormFold(stand_in))
        folded += 1
    return folded


def unfold_batchnorm_(net):
    """Undo fold_batchnorm_ in place (for A/B measurements: `bench/train_step.py --no-fold-bn`): the original
    BatchNorm and conv modules come back, holding the current tensors. Returns the number of BNs unfolded."""
    unfolded = 0
    for name, module in list(net.named_modules()):
        if isinstance(module, FoldedBatchNorm):
            _share_state(module, module.original)
            net.set_submodule(name, module.original)
            unfolded += 1
        elif isinstance(module, FrozenConv2d) and module.folded is not None:
            object.__setattr__(module, 'folded', None)
            if module.original is not None:
                module.original.weight, module.original.bias = module.weight, module.bias
                net.set_submodule(name, module.original)
    return unfolded


def _load_exactly(module, state, name, unexpected=()):
    result = module.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys) + list(unexpected)
    if result.missing_keys or unexpected:
        raise RuntimeError(f'the weights given for {name} do not fit its architecture: '
                           f'{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, '
                           f'{len(unexpected)} unexpected keys {unexpected[:5]}')


def _vgg16_bn(state, generator, **kwargs):
    """torchvision vgg16_bn `features` only (the 124M-parameter classifier is never used), split [0:13],
    [13:23], [23:33], [33:43] → 128, 256, 512, 512 channels at 1/2 … 1/16 of the input."""
    if kwargs:
        raise ValueError(f'vgg16_bn takes no constructor arguments, got {sorted(kwargs)}')
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D'], batch_norm=True)
    if state is None:  # torchvision's VGG init: random features keep their scale through the 13 layers
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)
    else:
        _load_exactly(features, {k[len('features.'):]: v for k, v in state.items() if k.startswith('features.')},
                      'vgg16_bn', [k for k in state if not k.startswith(('features.', 'classifier.'))])
    return Stages([features[0:13], features[13:23], features[23:33], features[33:43]])


def _tf_efficientnet_lite0(state, generator, **kwargs):
    """timm tf_efficientnet_lite0 split (conv_stem, bn1, blocks[0:2]), blocks[2:3], blocks[3:5], blocks[5:]
    → 24, 40, 112, 320 channels at 1/4 … 1/32. (timm ≥ 0.9: bn1 already applies the ReLU6; there is no act1.)"""
    net = timm.create_model('tf_efficientnet_lite0', **kwargs)
    # The converted weights are only right for the TF variant (TF-SAME padding, BN eps 1e-3); timm's
    # `efficientnet_lite0` accepts the same keys but differs by up to 3 in logits (docs/offline-weights.md §1.3).
    if not (isinstance(net.conv_stem, timm.layers.Conv2dSame) and net.bn1.eps == 1e-3):
        raise RuntimeError('timm tf_efficientnet_lite0 is no longer the TF variant (Conv2dSame stem, BN eps 1e-3); '
                           'the EfficientNet-Lite0 weights would be wrong in it')
    if state is not None:
        _load_exactly(net, state, 'tf_efficientnet_lite0')
    _replace_grouped_convs_(net)
    return Stages([nn.Sequential(net.conv_stem, net.bn1, *net.blocks[0:2]), net.blocks[2:3], net.blocks[3:5],
                   net.blocks[5:]])


def _deit_base_distilled(state, generator, **kwargs):
    net = timm.create_model('deit_base_distilled_patch16_224', **kwargs)
    if state is not None:
        _load_exactly(net, state, 'deit_base_distilled_patch16_224')
    return ViTStages(net, generator)


# name: (builder(state or None, generator, **constructor kwargs), (mean, std), stage channels)
FEATURE_NETWORKS = {
    'vgg16_bn': (_vgg16_bn, IMAGENET_MEAN_STD, [128, 256, 512, 512]),
    'tf_efficientnet_lite0': (_tf_efficientnet_lite0, HALF_MEAN_STD, [24, 40, 112, 320]),
    'deit_base_distilled_patch16_224': (_deit_base_distilled, IMAGENET_MEAN_STD, [96, 192, 384, 768]),
}


class FeatureNetwork(nn.Module):
    """One backbone's frozen path. `provenance` says where its weights came from (or that they are random).
    `folded_batchnorms`: how many of the body's BatchNorms compute folded into their convs (0 for DeiT)."""

    FOLD_PROBE_SIZE = 32  # the probe pass that verifies conv → BN pairs (conv_bn_pairs) runs on 1×3×32×32 zeros

    def __init__(self, name, generator, pretrained=True, weights=None, interp224=True, diffaug=False, log=print,
                 **kwargs):
        super().__init__()
        if name not in FEATURE_NETWORKS:
            raise ValueError(f'unknown discriminator backbone {name!r}; expected one of {sorted(FEATURE_NETWORKS)}')
        build, (mean, std), channels = FEATURE_NETWORKS[name]
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
            self.body = build(state, generator, **kwargs)
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
