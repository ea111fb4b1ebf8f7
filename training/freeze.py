"""Parameter groups of the generator U-Net (paper Table 3) and the D2O-F freeze levels.

Every parameter name is classified by explicit patterns over its dotted path; a name that matches no
pattern is an error. Inside every U-Net block (`enc`/`dec` entries `{R}x{R}_block{i}`, `_in0/1`, `_up`,
`_down`) the groups are by layer kind: `norm` (GroupNorms norm0/1/2 and the embedding `affine`),
`conv` (conv0, conv1 and the attention output `proj`), `qkv`, `skip`. Outside the blocks: `embedding`
(the mapping network `map_*`) and `stem` (the U-Net's input/output layers: enc `_conv`/`_aux_*`,
dec `_aux_norm`/`_aux_conv`, ADM `out_norm`/`out_conv`).

The levels reproduce the parameter sets the official optimizer setup freezes (docs/method.md §3): its
substring test ("block/up/down/in" and "conv/proj/qkv/skip") hits exactly conv0/conv1/proj, qkv and
skip inside blocks. One rule drives both the optimizer list and requires_grad, fixing the official
mismatch where the loss forgot `_up`/`_down` blocks (docs/method.md §12.6).
"""
import re

GROUPS = ('norm', 'conv', 'qkv', 'skip', 'embedding', 'stem')

# Frozen groups per `--freeze` level; paper Table 3 rows 2-4 (level 1 = D2O-F, best FID).
FREEZE_LEVELS = {
    0: (),
    1: ('conv',),
    2: ('conv', 'qkv'),
    3: ('conv', 'qkv', 'skip'),
}

_PREFIX = r'(?:.+\.)?'  # wrapper prefixes such as `model.`, `module.model.`
_BLOCK = r'(?:enc|dec)\.(\d+)x\1_(?:block\d+|in[01]|up|down)\.'
_LEAF = r'\.(?:weight|bias)'
_PATTERNS = [(group, re.compile(_PREFIX + body + _LEAF)) for group, body in [
    ('norm', _BLOCK + r'(?:norm[012]|affine)'),
    ('conv', _BLOCK + r'(?:conv[01]|proj)'),
    ('qkv', _BLOCK + r'qkv'),
    ('skip', _BLOCK + r'skip'),
    ('embedding', r'map_(?:label|augment|layer[01])'),
    ('stem', r'(?:enc\.(\d+)x\1_(?:conv|aux_residual|aux_skip)|dec\.(\d+)x\2_aux_(?:norm|conv)|out_(?:norm|conv))'),
]]


def param_group(name):
    """Table-3 group of a generator parameter name; ValueError for a name no pattern covers."""
    groups = [group for group, pattern in _PATTERNS if pattern.fullmatch(name)]
    if len(groups) != 1:
        raise ValueError(f'freeze: parameter {name!r} matches {groups or "no group"}; '
                         f'expected exactly one of {GROUPS} (update training/freeze.py patterns)')
    return groups[0]


def select_trainable(net, level=None, train_groups=None):
    """Freeze by `--freeze` level or by naming the groups to train (a level > 0 and groups together are an
    error; neither = train all).
    Sets requires_grad on every parameter (False = no weight gradients are computed) and returns the
    trainable (name, param) pairs in named_parameters() order, for the optimizer."""
    if level and train_groups is not None:
        raise ValueError(f'freeze: give either --freeze={level} or train_groups {list(train_groups)}, not both')
    if train_groups is None:
        level = level or 0
        if level not in FREEZE_LEVELS:
            raise ValueError(f'freeze: --freeze={level} is not a level; expected one of {sorted(FREEZE_LEVELS)}')
        frozen = FREEZE_LEVELS[level]
        train_groups = [g for g in GROUPS if g not in frozen]
    unknown = set(train_groups) - set(GROUPS)
    if unknown:
        raise ValueError(f'freeze: unknown group(s) {sorted(unknown)}; expected names from {GROUPS}')
    named = [(name, param, param_group(name)) for name, param in net.named_parameters()]  # all names valid first
    for _, param, group in named:
        param.requires_grad_(group in train_groups)
    return [(name, param) for name, param, group in named if group in train_groups]


def freeze_table(net, trainable_names):
    """Text table: per group #params, share of the total, trainable yes/no/partial; then the frozen share."""
    trainable_names = set(trainable_names)
    count = {g: [0, 0] for g in GROUPS}  # group -> [total, trainable]
    for name, param in net.named_parameters():
        count[param_group(name)][0] += param.numel()
        count[param_group(name)][1] += param.numel() if name in trainable_names else 0
    total = sum(c[0] for c in count.values())
    frozen = total - sum(c[1] for c in count.values())
    lines = [f'{"group":<10} {"params":>13} {"share":>8}  trainable']
    for group, (n, n_train) in count.items():
        if n:
            state = 'yes' if n_train == n else 'no' if n_train == 0 else 'partial'
            lines.append(f'{group:<10} {n:>13,} {100 * n / total:>7.2f}%  {state}')
    lines.append(f'{"total":<10} {total:>13,} {100.0:>7.2f}%  frozen {frozen:,} ({100 * frozen / max(total, 1):.2f}%)')
    return '\n'.join(lines)
