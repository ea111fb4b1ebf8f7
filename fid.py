"""FID (plus Inception Score and precision/recall) of image folders/zips, EDM-compatible (checkpoint-format.md §5–§7).

  python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
  python fid.py calc --images=out --ref=datasets/cifar10-32x32.zip --metrics=fid,is,pr

Results are printed by rank 0 as `name value` lines (`fid`, `is_mean`, `is_std`, `precision`, `recall`).
Under torchrun, put `--` before `calc` when passing `--num`: torchrun would read it as `--numa-binding`."""
import functools
import json
import os
import zipfile

import click

import metrics
from dnnlib import util
from torch_utils import distributed as dist

METRICS = ('fid', 'is', 'pr')


def is_image_set(path):
    """A folder or an image zip (an `.npz` is a zip too, but holds `mu.npy`); URLs are always statistics."""
    if util.is_url(path) or not os.path.exists(path):
        return False
    if os.path.isdir(path):
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return 'mu.npy' not in archive.namelist()


def calc(image_path, ref_path, num=50000, seed=0, batch=64, which=('fid',), detector=None, workers=3):
    """Metrics of `num` images of `image_path` (EDM semantics: fewer → error, more → random subset by `seed`)
    against `ref_path` (EDM `.npz` path/URL, or a folder/zip of reference images, all of them used).
    Returns a dict with `fid`, `is_mean`/`is_std`, `precision`/`recall` as requested in `which`."""
    if set(which) - set(METRICS) or not which:
        raise ValueError(f'--metrics: expected a comma-separated subset of {",".join(METRICS)}, got {",".join(which)}')
    which = set(which)
    images = metrics.open_image_set(image_path, num=num, seed=seed)
    ref_set = None
    if which & {'fid', 'pr'}:
        if ref_path is None:
            raise ValueError('--ref is required for fid and pr')
        if is_image_set(ref_path):
            ref_set = metrics.open_image_set(ref_path)
        elif 'pr' in which:
            raise ValueError(f'--ref={ref_path}: precision/recall compares the features of both image sets, so the '
                             'reference must be a folder or zip of images, not precomputed statistics (.npz)')
        else:
            mu_ref, sigma_ref = metrics.load_ref_stats(ref_path)
    if ref_set is not None and images.image_shape != ref_set.image_shape:
        raise ValueError(f'--images={image_path} holds {"x".join(map(str, images.image_shape))} (CxHxW) images but '
                         f'--ref={ref_path} holds {"x".join(map(str, ref_set.image_shape))}; compare sets of the '
                         'same resolution and channels')
    detector = metrics.load_detector(detector, dist.device())
    if 'is' in which:
        detector.require_logits()  # fail before the long feature pass

    dist.print0(f'Computing Inception features of {len(images)} images from {image_path}...')
    gen = metrics.dataset_feature_stats(images, detector, batch, workers, capture_features=bool(which & {'is', 'pr'}))
    if ref_set is not None:
        dist.print0(f'Computing Inception features of {len(ref_set)} reference images from {ref_path}...')
        ref = metrics.dataset_feature_stats(ref_set, detector, batch, workers, capture_features='pr' in which)
        mu_ref, sigma_ref = ref.mu, ref.sigma
    results = {}
    if 'fid' in which:
        results['fid'] = metrics.frechet_distance(gen.mu, gen.sigma, mu_ref, sigma_ref)
    if 'is' in which:
        results['is_mean'], results['is_std'] = metrics.inception_score(detector.logits(gen.features))
    if 'pr' in which:
        results['precision'], results['recall'] = metrics.precision_recall(ref.features, gen.features)
    return results


@click.group()
def main():
    """Compute FID reference statistics (`ref`) or metrics of generated images (`calc`); run under torchrun
    to shard the feature extraction over GPUs."""


def user_errors(fn):
    """Report bad inputs as one-line click errors instead of tracebacks (once, from rank 0)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, RuntimeError) as err:
            if dist.rank() != 0:
                raise SystemExit(1) from None
            raise click.ClickException(str(err)) from None
    return wrapper


@main.command('calc')
@click.option('--images', 'image_path', metavar='DIR|ZIP', required=True, help='Generated images')
@click.option('--ref', 'ref_path', metavar='NPZ|URL|DIR|ZIP', help='Reference statistics, or reference images')
@click.option('--num', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True,
              help='Number of images to evaluate (fewer available is an error)')
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Subset seed when more exist')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
              help='Maximum batch size per process')
@click.option('--metrics', 'which', metavar='LIST', default='fid', show_default=True, help='Any of fid,is,pr')
@click.option('--detector', metavar='PATH|URL', help='Inception weights (default: NVIDIA pkl, else fid-helper)')
@click.option('--workers', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True,
              help='DataLoader worker processes')
@click.option('--json', 'json_path', metavar='PATH', help='Also write the results (and inputs) as a JSON file')
@user_errors
def calc_command(image_path, ref_path, num, seed, batch, which, detector, workers, json_path):
    """Metrics of generated images against a reference."""
    dist.init()
    which = [name.strip() for name in which.split(',')]
    results = calc(image_path, ref_path, num, seed, batch, which, detector, workers)
    for name, value in results.items():
        dist.print0(f'{name} {value:g}')
    if json_path and dist.rank() == 0:
        with util.atomic_write(json_path, "w") as f:
            json.dump(dict(results, images=image_path, ref=ref_path, num=num, seed=seed), f, indent=2)


@main.command('ref')
@click.option('--data', 'dataset_path', metavar='DIR|ZIP', required=True, help='Dataset images (all are used)')
@click.option('--dest', 'dest_path', metavar='NPZ', required=True, help='Output statistics file')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
              help='Maximum batch size per process')
@click.option('--detector', metavar='PATH|URL', help='Inception weights (default: NVIDIA pkl, else fid-helper)')
@click.option('--workers', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True,
              help='DataLoader worker processes')
@user_errors
def ref_command(dataset_path, dest_path, batch, detector, workers):
    """Reference statistics (mu, sigma) of a dataset, as EDM's fid-refs/*.npz."""
    dist.init()
    dataset = metrics.open_image_set(dataset_path)
    detector = metrics.load_detector(detector, dist.device())
    dist.print0(f'Computing Inception features of {len(dataset)} images from {dataset_path}...')
    stats = metrics.dataset_feature_stats(dataset, detector, batch, workers)
    if dist.rank() == 0:
        metrics.save_ref_stats(dest_path, stats.mu, stats.sigma)
        print(f'Saved reference statistics to {dest_path}')
    dist.barrier()


if __name__ == '__main__':
    main()
