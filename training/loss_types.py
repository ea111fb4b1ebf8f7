"""The adversarial loss types of `--loss-type` by name (docs/method.md §5): config validation, `train.py`'s
choices and training/loss.py all read `LOSS_TYPES`, so a new type is one entry here.

Torch-free, so validating an option imports no torch: each term is f(F, ℓ) on the logits ℓ, with
F = torch.nn.functional handed in by training/loss.py."""
import collections

# g: G's term on fakes; d_fake, d_real: D's terms on fakes and on reals.
LossType = collections.namedtuple('LossType', 'help g d_fake d_real')

LOSS_TYPES = {
    'ns': LossType('non-saturating softplus', g=lambda F, l: F.softplus(-l), d_fake=lambda F, l: F.softplus(l),
                   d_real=lambda F, l: F.softplus(-l)),
    'hinge': LossType('hinge', g=lambda F, l: -l, d_fake=lambda F, l: F.relu(1 + l),
                      d_real=lambda F, l: F.relu(1 - l)),
}
