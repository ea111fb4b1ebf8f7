"""Train a one-step generator with D2O / D2O-F (or a diffusion teacher with --loss=edm|vp|ve).

  torchrun --standalone --nproc_per_node=8 train.py --preset=cifar10-uncond-d2o-f \\
      --outdir=training-runs --data=datasets/cifar10-32x32.zip
  python train.py --outdir=runs --data=synth.zip --transfer=teacher.pkl --freeze=1 --backbone=3 \\
      --batch=8 --duration=0.002 --tick=1 --snap=1 --dump=1

Explicit options override the preset's values. See README.md for the recipes and resuming."""
import click

from torch_utils import distributed as dist
from training.config import PRESETS, make_config


def parse_int_list(value):
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(x) for x in value.split(',') if x.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated integers, got {value!r}') from None


def parse_str_list(value):
    return None if value is None else [x.strip() for x in value.split(',') if x.strip()]


@click.command(context_settings=dict(show_default=True))
# Main
@click.option('--outdir', help='Where to save the results', metavar='DIR', required=True)
@click.option('--data', help='Dataset zip or folder (EDM layout)', metavar='ZIP|DIR', required=True)
@click.option('--preset', help='A paper run: ' + ', '.join(sorted(PRESETS)), type=click.Choice(sorted(PRESETS)))
@click.option('--cond', help='Class-conditional (dataset labels required)', type=bool)
@click.option('--loss', help='d2o = GAN fine-tuning; edm/vp/ve = diffusion teacher training',
              type=click.Choice(['d2o', 'edm', 'vp', 've']))
@click.option('--arch', help='Generator architecture (default: from --transfer, else ncsnpp)',
              type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']))
@click.option('--precond', help='Preconditioning (d2o for generators; edm/vp/ve for teachers)',
              type=click.Choice(['d2o', 'edm', 'vp', 've']))
@click.option('--transfer', help='Initialise G from this EDM/D2O pickle (its ema)', metavar='PKL|URL')
@click.option('--allow-unsafe-pickle', help='Load pickles with embedded code the way EDM does (RUNS THEIR CODE)',
              is_flag=True, default=None)
@click.option('--cbase', help='Channel base (model_channels)', type=click.IntRange(min=1))
@click.option('--cres', help='Channel multipliers per resolution, e.g. 1,2,2,2', callback=lambda c, p, v: parse_int_list(v))
@click.option('--dropout', help='U-Net dropout', type=click.FloatRange(0, 1))
@click.option('--augment-dim', help='map_augment width for teacher training (labels are zeros: no augment pipe)',
              type=click.IntRange(min=0))
@click.option('--multi-step-g', help='Generator steps (1 = one-step)', type=click.IntRange(min=1))
@click.option('--middle-sigma', help='Intermediate sigma of a 2-step generator', type=click.FloatRange(min=0))
@click.option('--freeze', help='Freeze level: 0 none, 1 conv, 2 +qkv, 3 +skip (paper Table 3)', type=click.IntRange(0, 3))
@click.option('--train-groups', help='Train exactly these groups instead of --freeze (e.g. norm,qkv,skip)',
              callback=lambda c, p, v: parse_str_list(v))
# Discriminator
@click.option('--backbone', help='Feature networks: 0 DeiT+EffNet-lite0, 1 VGG16-BN+EffNet-lite0, 3 EffNet-lite0',
              type=click.IntRange(min=0))
@click.option('--d-pretrained', help='Use pretrained feature networks (false: random features, logged)', type=bool)
@click.option('--d-weights', help='Feature-network weight file or folder (also $D2O_WEIGHTS_DIR)', metavar='PATH')
@click.option('--d-embedding', help='Class-embedding file for the conditional D (e.g. tf_efficientnet_lite0.pkl)',
              metavar='PATH')
@click.option('--diffaug', help='DiffAugment in D (paper: off)', type=bool)
@click.option('--interp224', help='Resize D inputs to 224', type=bool)
@click.option('--loss-type', help='Adversarial loss', type=click.Choice(['ns', 'hinge']))
@click.option('--r1-gamma', help='R1 weight gamma (0 disables R1)', type=click.FloatRange(min=0))
@click.option('--adv-scale', help='Adversarial loss multiplier [default: batch/8, the paper\'s per-GPU batch]',
              type=click.FloatRange(min=0, min_open=True))
# Optimisation
@click.option('--lr', help='G learning rate', type=click.FloatRange(min=0, min_open=True))
@click.option('--dlr', help='D learning rate (before the lazy-R1 correction)', type=click.FloatRange(min=0, min_open=True))
@click.option('--lr-rampup', help='Linear LR warm-up in kimg', type=click.FloatRange(min=0))
@click.option('--batch', help='Total batch size', type=click.IntRange(min=1))
@click.option('--batch-gpu', help='Per-process batch limit (gradient accumulation)', type=click.IntRange(min=1))
@click.option('--duration', help='Training duration in Mimg', type=click.FloatRange(min=0, min_open=True))
@click.option('--ema', help='EMA half-life in Mimg', type=click.FloatRange(min=0))
@click.option('--ema-warmup', help='EMA warm-up ratio (0 disables)', type=click.FloatRange(min=0))
@click.option('--precision', help='Generator precision', type=click.Choice(['fp32', 'bf16']))
@click.option('--max-nonfinite', help='Abort after this many non-finite steps in a row', type=click.IntRange(min=1))
# Data and I/O
@click.option('--xflip', help='Double the dataset with x-flips', type=bool)
@click.option('--cache', help='Cache the decoded dataset in RAM', type=bool)
@click.option('--workers', help='DataLoader worker processes', type=click.IntRange(min=0))
@click.option('--tick', help='kimg per progress tick', type=click.FloatRange(min=0, min_open=True))
@click.option('--snap', help='Ticks per snapshot (network pickle + grid)', type=click.IntRange(min=1))
@click.option('--dump', help='Ticks per training-state dump', type=click.IntRange(min=1))
@click.option('--seed', help='Random seed', type=int)
@click.option('--resume', help='training-state-*.pt, a run dir, or auto (newest under --outdir)', metavar='PT|DIR|auto')
@click.option('--metrics', help='Evaluate the EMA generator at every snapshot: fid50k, fid10k, fid<N>', callback=lambda c, p, v: parse_str_list(v))
@click.option('--metric-ref', help='FID reference statistics (EDM npz) for --metrics', metavar='NPZ|URL')
@click.option('--metrics-at-start', help='Also evaluate --metrics at tick 0 [default: true]', type=bool)
@click.option('--grid-seeds', help='Images in the per-snapshot sample grid (seeds 0..N-1)', type=click.IntRange(min=1))
@click.option('--desc', help='String to include in the run directory name')
@click.option('--nosubdir', help='Write directly into --outdir', is_flag=True, default=None)
@click.option('--device', help='Torch device (default: cuda if available, else cpu)')
@click.option('-n', '--dry-run', help='Print the configuration and exit', is_flag=True)
def main(dry_run, **opts):
    """Fine-tune a diffusion U-Net into a one-step generator with a GAN objective alone (D2O, D2O-F)."""
    try:
        cfg = make_config(**opts)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if cfg.metrics:
        from training.training_loop import metric_num_images
        for name in cfg.metrics:
            try:
                metric_num_images(name)
            except ValueError as err:
                raise click.ClickException(str(err)) from None
        if not cfg.metric_ref:
            raise click.ClickException('--metrics needs --metric-ref=NPZ (reference statistics, e.g. from fid.py ref)')
    if cfg.resume and cfg.transfer and cfg.resume != 'auto':
        raise click.ClickException('--resume and --transfer are exclusive: a training state holds the generator')
    dist.init()
    dist.print0('Training options:\n' + cfg.to_json())
    if dry_run:
        dist.print0('Dry run; exiting.')
        return
    from training import training_loop
    try:
        training_loop.run(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    finally:
        dist.shutdown()


if __name__ == '__main__':
    main()
