"""Frozen layers of the discriminator's feature networks (docs/method.md §10): convs whose weights never train
but whose input gradient (G main) and double backward (R1) are needed, and the folding of eval-mode BatchNorm
into those convs. Used by feature_networks.py."""
import timm
import torch
import torch.nn.functional as F
from torch import nn


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


def replace_grouped_convs_(net):
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
