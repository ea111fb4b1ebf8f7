"""Generate images with an EDM diffusion model or a D2O generator (EDM's generate.py interface).

Examples:
  python generate.py --network=d2o-cifar10.pkl --seeds=0-49999 --outdir=out.zip
  torchrun --nproc_per_node=8 generate.py --network=edm-cifar10-32x32-cond-vp.pkl --seeds=0-63 --outdir=out
"""
import contextlib
import io
import os
import zipfile

import click
import PIL.Image
import torch
import tqdm

from dnnlib import cli
from dnnlib.util import atomic_write, parse_int_list
from torch_utils import distributed as dist
from training.checkpoint import load_network
from training.image_grid import save_image_grid
from training.sampling import (DEFAULT_STEPS, MAX_SEED, SAMPLERS, check_class_idx, default_sampler, generate_images,
                               is_generator)

POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
MAX_SEEDS = 10_000_000  # images per run: the seed list is held in memory (and far above a 50k FID)


def sampler_options(sampler, num_steps):
    """The sampler keyword options that have an effect for this sampler and step count."""
    if sampler in ('heun', 'euler'):
        return ('sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise')
    if sampler == 'onestep':
        return ('sigma_max',)
    return ('sigma_min', 'sigma_max') + (('middle_sigma',) if num_steps == 2 else ())


def _seeds_option(ctx, param, value):
    try:
        seeds = parse_int_list(value, limit=MAX_SEEDS)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if len(set(seeds)) != len(seeds):
        raise click.BadParameter('a seed is listed more than once (its images would overwrite each other)')
    if seeds and max(seeds) > MAX_SEED:
        raise click.BadParameter(f'seed {max(seeds)} is out of range (0 to {MAX_SEED})')
    return seeds


def image_name(seed, subdirs=False):
    return (f'{seed - seed % 1000:06d}/' if subdirs else '') + f'{seed:06d}.png'


def png_bytes(image):
    """uint8 [H,W,C] numpy → PNG file contents."""
    buf = io.BytesIO()
    pil = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    pil.save(buf, format='png')
    return buf.getvalue()


@contextlib.contextmanager
def image_writer(outdir):
    """Yields write(name, data) into the folder `outdir` or, for a .zip path, into that archive: each rank
    writes its own part atomically, then rank 0 merges the parts into the final zip atomically."""
    if outdir is None:
        yield lambda name, data: None
    elif not outdir.lower().endswith('.zip'):
        def write(name, data):
            with atomic_write(os.path.join(outdir, name)) as f:  # no half-written PNG survives a crash or full disk
                f.write(data)
        yield write
    else:
        world = dist.world_size()
        parts = [outdir if world == 1 else f'{outdir}.part{r}-of-{world}' for r in range(world)]
        with atomic_write(parts[dist.rank()]) as f, zipfile.ZipFile(f, 'w') as zf:
            yield zf.writestr
        dist.barrier()
        if world > 1 and dist.rank() == 0:
            with atomic_write(outdir) as f, zipfile.ZipFile(f, 'w') as zf:
                for part in parts:
                    with zipfile.ZipFile(part) as src:
                        for name in src.namelist():
                            zf.writestr(name, src.read(name))
            for part in parts:
                os.remove(part)


def gather_images(local):
    """{seed: image} from every rank, on rank 0 (None elsewhere)."""
    if dist.world_size() == 1:
        return local
    parts = [None] * dist.world_size() if dist.rank() == 0 else None
    torch.distributed.gather_object(local, parts, dst=0)
    return {seed: image for part in parts for seed, image in part.items()} if dist.rank() == 0 else None


def check_outputs(outdir, grid):
    """Output paths are checked before the network loads, so a typo costs no sampling time."""
    if outdir is None and grid is None:
        raise click.UsageError('give --outdir, --grid, or both')
    if outdir is not None:
        is_zip = outdir.lower().endswith('.zip')
        if os.path.isdir(outdir) if is_zip else os.path.exists(outdir) and not os.path.isdir(outdir):
            kind = 'a folder' if is_zip else 'an existing file'
            raise click.BadParameter(f'{outdir} is {kind}; expected {"a .zip file path" if is_zip else "a folder"}',
                                     param_hint='--outdir')
        _check_parent(outdir, '--outdir')
    if grid is not None:
        if os.path.splitext(grid)[1].lower() not in PIL.Image.registered_extensions():
            raise click.BadParameter(f'{grid}: unknown image file extension; expected e.g. .png', param_hint='--grid')
        if os.path.isdir(grid):
            raise click.BadParameter(f'{grid} is a folder; expected an image file path', param_hint='--grid')
        _check_parent(grid, '--grid')


def _check_parent(path, option):
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the first existing ancestor must be a folder (makedirs creates the rest)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise click.BadParameter(f'{path}: {parent} is a file, not a folder', param_hint=option)


def check_device(device):
    """torch.device of `--device` (None: chosen per rank later); a clear error for unknown/unavailable ones."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f'{device!r} is not a torch device; expected e.g. cpu, cuda, cuda:1',
                                 param_hint='--device') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter(f'{device}: CUDA is not available on this machine; use --device=cpu',
                                 param_hint='--device')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise click.BadParameter(f'{device}: this machine has {torch.cuda.device_count()} CUDA device(s)',
                                 param_hint='--device')
    if dev.type not in ('cpu', 'cuda'):
        raise click.BadParameter(f'{device}: expected a cpu or cuda device', param_hint='--device')
    return dev


def load_generator(network_pkl, key, allow_unsafe_pickle):
    """The network to sample (eval mode, frozen); load errors name --network. Rank 0 loads first so a URL is
    downloaded into the cache once."""
    if dist.rank() != 0:
        dist.barrier()
    dist.print0(f'Loading network from "{network_pkl}"...')
    try:
        with cli.task(f'loading --network={network_pkl}'):
            net = load_network(network_pkl, key=key, allow_unsafe_pickle=allow_unsafe_pickle)
    except Exception as err:  # noqa: BLE001 — a failure that is the file's fault names --network (cause: --debug)
        if not cli.is_expected(err):
            raise
        raise click.ClickException(f'--network: {cli.describe(err, "generate.py")}') from err
    if dist.rank() == 0:
        dist.barrier()
    return net.eval().requires_grad_(False)


def check_sampler(net, sampler, num_steps, sampler_kwargs):
    """(sampler, num_steps, the options given) after checking they fit the network and each other."""
    sampler = sampler or default_sampler(net)
    if sampler == 'multistep' and not is_generator(net):
        raise click.BadParameter(f'multistep needs a D2O generator (it passes sigma_next); '
                                 f'{type(net).__name__} supports heun, euler or onestep', param_hint='--sampler')
    if is_generator(net) != (sampler in ('onestep', 'multistep')):
        dist.print0(f'Note: sampling {type(net).__name__} with --sampler={sampler} '
                    f'(its usual sampler is {default_sampler(net)}).')
    if sampler == 'onestep' and num_steps not in (None, 1):
        raise click.BadParameter('onestep takes exactly 1 step; use --sampler=multistep', param_hint='--steps')
    if sampler in ('heun', 'euler') and num_steps == 1:
        raise click.BadParameter(f'{sampler} needs at least 2 steps', param_hint='--steps')
    num_steps = num_steps or DEFAULT_STEPS[sampler]
    sampler_kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    for k in sampler_kwargs:
        if k not in sampler_options(sampler, num_steps):
            raise click.BadParameter(f'does not apply to --sampler={sampler} with {num_steps} steps',
                                     param_hint='--' + k.replace('_', '-'))
    return sampler, num_steps, sampler_kwargs


def write_images(images, outdir, subdirs, keep, progress_total):
    """Write this rank's (seeds, images) batches; returns {seed: image} when `keep` (for the grid)."""
    kept = {}
    try:
        with image_writer(outdir) as write:
            for batch_seeds, batch_images in tqdm.tqdm(images, total=progress_total, unit='batch',
                                                       disable=(dist.rank() != 0)):
                for seed, image in zip(batch_seeds, batch_images.cpu().numpy()):
                    write(image_name(seed, subdirs), png_bytes(image))
                    if keep:
                        kept[seed] = image
    except OSError as err:  # e.g. a full disk: the atomic writes leave no partial file behind
        raise click.ClickException(f'--outdir={outdir}: cannot write the images: {err.strerror or err}') from None
    return kept


@click.command(cls=cli.Command)
@click.option('--network', 'network_pkl', help='Network snapshot (.pkl or .safetensors) path or URL',
              metavar='PKL|URL', required=True)
@click.option('--outdir', help='Where to save the PNGs: a folder, or a .zip archive', metavar='DIR|ZIP')
@click.option('--subdirs', help='Put images in subfolders of 1000 seeds', is_flag=True)
@click.option('--seeds', help='Random seeds, e.g. 1,2,5-10', metavar='LIST', default='0-63', show_default=True,
              callback=_seeds_option)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--sampler', help='[default: onestep for D2O generators, heun otherwise]', type=click.Choice(SAMPLERS))
@click.option('--steps', 'num_steps', help='Steps  [default: heun/euler 18, multistep 2]', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--middle-sigma', help='Intermediate noise level of 2-step multistep  [default: 0.8]', metavar='FLOAT',
              type=POSITIVE)
@click.option('--sigma-min', help='Lowest noise level  [default: 0.002]', metavar='FLOAT', type=POSITIVE)
@click.option('--sigma-max', help='Highest noise level  [default: 80]', metavar='FLOAT', type=POSITIVE)
@click.option('--rho', help='Time step exponent  [default: 7]', metavar='FLOAT', type=POSITIVE)
@click.option('--S-churn', 'S_churn', help='Stochasticity strength  [default: 0]', metavar='FLOAT', type=NON_NEGATIVE)
@click.option('--S-min', 'S_min', help='Stoch. min noise level  [default: 0]', metavar='FLOAT', type=NON_NEGATIVE)
@click.option('--S-max', 'S_max', help='Stoch. max noise level  [default: inf]', metavar='FLOAT', type=NON_NEGATIVE)
@click.option('--S-noise', 'S_noise', help='Stoch. noise inflation  [default: 1]', metavar='FLOAT', type=float)
@click.option('--key', help='Snapshot entry to sample from', type=click.Choice(['ema', 'net']), default='ema',
              show_default=True)
@click.option('--grid', help='Also save all images as one grid picture', metavar='PNG')
@click.option('--device', help='Torch device  [default: cuda (per rank) if available, else cpu]', metavar='STR')
@click.option('--allow-unsafe-pickle', help='Let the pickle run its own code (only for trusted files)', is_flag=True)
@cli.debug_option
def main(network_pkl, outdir, subdirs, seeds, class_idx, max_batch_size, sampler, num_steps, key, grid, device,
         allow_unsafe_pickle, **sampler_kwargs):
    """Generate images with an EDM diffusion model (Heun/Euler) or a D2O generator (one/multi-step)."""
    check_outputs(outdir, grid)
    device = check_device(device)
    dist.init()
    device = device or dist.device()
    net = load_generator(network_pkl, key, allow_unsafe_pickle).to(device)

    try:
        check_class_idx(net.label_dim, class_idx)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--class') from None
    sampler, num_steps, sampler_kwargs = check_sampler(net, sampler, num_steps, sampler_kwargs)

    rank, world = dist.rank(), dist.world_size()
    dist.print0(f'Generating {len(seeds)} images with the {sampler} sampler to "{outdir or grid}"...')
    images = generate_images(net, seeds, sampler=sampler, num_steps=num_steps, class_idx=class_idx,
                             batch=max_batch_size, rank=rank, world_size=world, device=device, **sampler_kwargs)
    with cli.task(f'generating {len(seeds)} images'):
        kept = write_images(images, outdir, subdirs, keep=grid is not None,
                            progress_total=len(dist.rank_batches(seeds, max_batch_size, rank, world)))
    if grid:
        kept = gather_images(kept)
        if rank == 0:
            try:
                save_image_grid([kept[seed] for seed in seeds], grid)
            except OSError as err:
                raise click.ClickException(f'--grid={grid}: cannot write it: {err.strerror or err}') from None
    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()


if __name__ == '__main__':
    main()
