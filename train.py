"""Train a one-step generator with D2O / D2O-F (or a diffusion teacher with --loss=edm|vp|ve).

  torchrun --standalone --nproc_per_node=8 train.py --preset=cifar10-uncond-d2o-f \\
      --outdir=training-runs --data=datasets/cifar10-32x32.zip
  python train.py --outdir=runs --data=synth.zip --transfer=teacher.pkl --freeze=1 --backbone=3 \\
      --batch=8 --duration=0.002 --tick=1 --snap=1 --dump=1

Without --preset the defaults are the CIFAR-10 D2O-F recipe (paper Table 10) except --precision (fp32);
explicit options override the preset's values. Errors follow dnnlib/cli.py: a usage error exits 2, an
expected failure prints one line and exits 1 (--debug or D2O_DEBUG=1 shows the traceback); after SIGINT/SIGTERM
the state is saved and the exit status is 128 + the signal number (130, 143). See README.md for the recipes and
resuming."""
import sys

import click

import dnnlib
from dnnlib import cli as cli_policy
from torch_utils import distributed as dist
from pg_modules.backbones import BACKBONE_HELP
from training.config import CHOICES, DEFAULT_NOTES, DEFAULTS, PRESETS, make_config, resolve


def shown_default(field):
    """The default `--help` shows for a TrainConfig field: its value, or how a None resolves."""
    value = DEFAULTS[field]
    if value is None:
        return DEFAULT_NOTES.get(field, False)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def option(*decls, **kwargs):
    """A click option for the TrainConfig field of the same name. default=None means "not given" (so a preset
    can fill it); --help shows the dataclass default (or how a None default resolves)."""
    shown = shown_default(decls[0].lstrip('-').replace('-', '_'))
    if shown is not False and not kwargs.get('required'):
        kwargs['help'] += f'  [default: {shown}]'
    return click.option(*decls, **kwargs)


def int_list(ctx, param, value):
    try:
        return None if value is None else dnnlib.parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def int_or_names(ctx, param, value):
    """--backbone: digits are an official integer, anything else names (config.resolve validates both)."""
    return int(value) if value is not None and value.strip().lstrip('-').isdigit() else value


def str_list(ctx, param, value):
    return None if value is None else [x.strip() for x in value.split(',') if x.strip()]


POSITIVE = click.FloatRange(min=0, min_open=True)


@click.command(cls=cli_policy.Command)
# Main
@option('--outdir', help='Where to save the results', metavar='DIR', required=True)
@option('--data', help='Dataset zip or folder (EDM layout)', metavar='ZIP|DIR', required=True)
@option('--preset', help='A paper run: ' + ', '.join(sorted(PRESETS)), type=click.Choice(sorted(PRESETS)))
@option('--cond', help='Class-conditional (dataset labels required)', type=bool)
@option('--loss', help='d2o = GAN fine-tuning; edm/vp/ve = diffusion teacher training',
        type=click.Choice(CHOICES['loss']))
@option('--arch', help='Generator architecture', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']))
@option('--precond', help='Preconditioning (d2o for generators; a diffusion loss with d2o uses edm)',
        type=click.Choice(['d2o', 'edm', 'vp', 've']))
@option('--transfer', help='Initialise G from this EDM/D2O snapshot, .pkl or .safetensors (its ema)', metavar='PKL|URL')
@option('--allow-unsafe-pickle', help='Load pickles with embedded code the way EDM does (RUNS THEIR CODE)',
        is_flag=True, default=None)
@option('--cbase', help='Channel base (model_channels)', type=click.IntRange(min=1))
@option('--cres', help='Channel multipliers per resolution, e.g. 1,2,2,2', metavar='LIST', callback=int_list)
@option('--dropout', help='U-Net dropout', type=click.FloatRange(0, 1))
@option('--augment-dim', help='map_augment width for teacher training (labels are zeros: no augment pipe)',
        type=click.IntRange(min=0))
@option('--multi-step-g', help='Generator steps (1 = one-step)', type=click.IntRange(min=1))
@option('--middle-sigma', help='Intermediate sigma of a 2-step generator (> 0)', type=POSITIVE)
@option('--freeze', help='Freeze level: 0 none, 1 conv (D2O-F), 2 +qkv, 3 +skip (paper Table 3)',
        type=click.IntRange(0, 3))
@option('--train-groups', help='Train exactly these groups instead of --freeze (e.g. norm,qkv,skip)',
        metavar='LIST', callback=str_list)
# Discriminator
@option('--backbone', help=BACKBONE_HELP, metavar='INT|NAMES', callback=int_or_names)
@option('--d-pretrained', help='Use pretrained feature networks (false: random features, logged)', type=bool)
@option('--d-weights', help='Feature-network weight file or folder (also $D2O_WEIGHTS_DIR)', metavar='PATH')
@option('--d-embedding', help='Class embedding of the conditional D: PATH | official (the official '
        'ImageNet table) | random (explicit opt-in to random rows)', metavar='PATH|official|random')
@option('--d-bn-group', help="Ghost-BatchNorm group size of D's mini-discriminators (presets: the paper's "
        'per-GPU batch, so BatchNorm statistics do not depend on the GPU count)', type=click.IntRange(min=1))
@option('--diffaug', help='DiffAugment in D (paper: off)', type=bool)
@option('--interp224', help='Resize D inputs to 224', type=bool)
@option('--loss-type', help='Adversarial loss', type=click.Choice(CHOICES['loss_type']))
@option('--r1-gamma', help='R1 weight gamma (0 disables R1)', type=click.FloatRange(min=0))
@option('--adv-scale', help="Adversarial loss multiplier (the paper's per-GPU batch)", type=POSITIVE)
# Extra consistency-distillation objective (paper §4.4, docs/consistency.md)
@option('--cd-weight', help='Weight of a consistency-distillation term added to the GAN loss (0 = off)',
        type=click.FloatRange(min=0))
@option('--cd-only', help='Consistency distillation alone, no discriminator (the paper\'s CD / CD-F)', type=bool)
@option('--cd-distance', help='CD distance', type=click.Choice(['l2', 'pseudo_huber', 'lpips']))
@option('--cd-scales', help='N of the CD schedule T(i, N)', type=click.IntRange(min=2))
@option('--lpips-vgg', help='VGG16 ImageNet weights for --cd-distance=lpips (torchvision state dict)', metavar='PTH')
@option('--lpips-lin', help='LPIPS v0.1 linear-head weights for --cd-distance=lpips', metavar='PTH')
# Optimisation
@option('--lr', help='G learning rate', type=POSITIVE)
@option('--dlr', help='D learning rate (before the lazy-R1 correction)', type=POSITIVE)
@option('--lr-rampup', help='Linear LR warm-up in kimg', type=click.FloatRange(min=0))
@option('--batch', help='Total batch size', type=click.IntRange(min=1))
@option('--batch-gpu', help='Per-process micro-batch (gradient accumulation)', type=click.IntRange(min=1))
@option('--duration', help='Training duration in Mimg', type=POSITIVE)
@option('--ema', help='EMA half-life in Mimg', type=click.FloatRange(min=0))
@option('--ema-warmup', help='EMA warm-up ratio (0 disables)', type=click.FloatRange(min=0))
@option('--precision', help='Generator precision (paper and presets: bf16)', type=click.Choice(['fp32', 'bf16']))
@option('--max-nonfinite', help='Abort after this many non-finite steps in a row', type=click.IntRange(min=1))
# Data and I/O
@option('--xflip', help='Double the dataset with x-flips', type=bool)
@option('--cache', help='Cache the decoded dataset in RAM', type=bool)
@option('--workers', help='DataLoader worker processes', type=click.IntRange(min=0))
@option('--tick', help='kimg per progress tick', type=POSITIVE)
@option('--snap', help='Ticks per snapshot (network pickle + grid)', type=click.IntRange(min=1))
@option('--dump', help='Ticks per training-state dump', type=click.IntRange(min=1))
@option('--seed', help='Random seed (0..2^31-1)', type=int)
@option('--resume', help='training-state-*.pt, a run dir, or auto (newest under --outdir)', metavar='PT|DIR|auto')
@option('--metrics', help='Evaluate the EMA generator at every snapshot: fid50k, fid10k, fid<N>', metavar='LIST',
        callback=str_list)
@option('--metric-ref', help='FID reference statistics (EDM npz) for --metrics', metavar='NPZ|URL')
@option('--metrics-at-start', help='Also evaluate --metrics at tick 0', type=bool)
@option('--grid-seeds', help='Images in the per-snapshot sample grid (seeds 0..N-1)', type=click.IntRange(min=1))
@option('--desc', help='String to include in the run directory name')
@option('--nosubdir', help='Write directly into --outdir', is_flag=True, default=None)
@option('--device', help='Torch device: cpu, cuda or cuda:N')
@click.option('-n', '--dry-run', help='Print the resolved configuration and exit', is_flag=True)
@cli_policy.debug_option
def main(dry_run, **opts):
    """Fine-tune a diffusion U-Net into a one-step generator with a GAN objective alone (D2O, D2O-F)."""
    dist.init()
    try:
        cfg, plan = resolve(make_config(**opts), dist.world_size())
        dist.print0('Training options:\n' + cfg.to_json())
        if dry_run:
            dist.print0(f'Derived: {plan}\nDry run; exiting.')
            return
        from training import run_dir, training_loop
        try:
            with cli_policy.task('training'):
                training_loop.run(cfg)
        except training_loop.Interrupted as err:  # the state is saved: exit 128 + signum, as a shell would
            print(f'train.py: {err}', file=sys.stderr)
            sys.exit(run_dir.exit_status_for_signal(err.signum))
    finally:
        dist.shutdown()


def cli(args=None):
    main.main(args, prog_name='train.py')


if __name__ == '__main__':
    cli()
