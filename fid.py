"""Image-quality metrics of image sets, EDM-compatible (docs/checkpoint-format.md §5–§7): FID, Inception Score,
precision/recall, CLIP-FID and FD-DINOv2, all in one pass over the images.

  python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
  python fid.py calc --images=out --ref=VIRTUAL_imagenet64_labeled.npz --metrics=fid,is,pr
  python fid.py calc --images=out --ref=refs.npz --metrics=fid,is,pr,clip_fid,fd_dinov2

`--images` / `--data`: a folder or zip of images (EDM layout), or an `.npz` whose `arr_0` holds uint8
[N, H, W, C] images (D2O's image_pack.npz, guided-diffusion's batches). `--ref`: a folder/zip of images,
or a reference `.npz` (ours, EDM's `mu`/`sigma`, or guided-diffusion's reference batch; metrics/reference.py).
Results are printed by rank 0 as `name value` lines (`fid`, `is_mean`, `is_std`, `precision`, `recall`,
`clip_fid`, `fd_dinov2`). Errors follow dnnlib/cli.py: a usage error exits 2, an expected failure is one
line and exit status 1; `--debug` (or D2O_DEBUG=1) shows the traceback. Under torchrun, put `--` before `calc`
when passing `--num`."""
import json
import os
import zipfile

import click
import numpy as np
import torch

from dnnlib import cli, util
from metrics import feature_stats, reference as reference_files, suite
from torch_utils import distributed as dist
from training.dataset import ImageFolderDataset


# --- image sources (metrics/ takes batches; the CLI opens the files) ---------------------------------
class NpzImages:
    """uint8 images from `arr_0` [N, H, W, C] of an `.npz`, optionally a seeded subset as EDM's dataset."""

    def __init__(self, path, images=None, num=None, seed=0):
        self.path = path
        if images is None:
            images = reference_files.load_reference(path).images
            if images is None:
                raise ValueError(f'{path}: an .npz of images must hold `arr_0` (uint8 [N, H, W, C])')
        self.images = images
        self.index = np.arange(len(images))
        if num is not None and len(images) > num:
            self.index = np.sort(np.random.RandomState(seed).choice(self.index, size=num, replace=False))

    def __len__(self):
        return len(self.index)

    @property
    def image_shape(self):
        return [self.images.shape[3], *self.images.shape[1:3]]

    def batches(self, chunks, workers):
        for chunk in chunks:
            yield chunk, torch.from_numpy(np.ascontiguousarray(self.images[self.index[chunk]].transpose(0, 3, 1, 2)))


class FolderImages:
    """An EDM-layout folder/zip through ImageFolderDataset, decoded by DataLoader workers."""

    def __init__(self, path, num=None, seed=0):
        self.dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
        self.path = path

    def __len__(self):
        return len(self.dataset)

    @property
    def image_shape(self):
        return self.dataset.image_shape

    def batches(self, chunks, workers):
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=chunks, num_workers=workers,
                                             prefetch_factor=2 if workers else None)
        for chunk, (images, _labels) in zip(chunks, loader):
            yield chunk, images


def is_npz(path):
    return util.is_url(path) or (os.path.isfile(path) and reference_files.is_reference_file(path))


def open_images(path, option, num=None, seed=0):
    """All images of `path` (`num=None`), or `num` of them as EDM's fid.py: fewer available is an error,
    more → a random subset chosen with `seed`."""
    source = NpzImages(path, num=num, seed=seed) if is_npz(path) else FolderImages(path, num=num, seed=seed)
    if len(source) < 2:
        raise ValueError(f'{option}={path}: found {len(source)} image(s); the metrics need at least 2')
    if num is not None and len(source) < num:
        raise ValueError(f'{option}={path}: found {len(source)} images, but {num} are requested (--num={num}); '
                         f'generate more images or pass --num={len(source)}')
    return source


def feature_pass(source, networks, capture, batch, workers, label):
    """Statistics of every network over `source` in one pass (each image decoded once)."""
    dist.print0(f'Computing {", ".join(networks)} features of {len(source)} images from {label}...')
    chunks = feature_stats.rank_chunks(len(source), batch)
    return feature_stats.compute_feature_stats(source.batches(chunks, workers), networks, len(source),
                                               capture_features=capture, progress=len(chunks))


# --- checks before any work ------------------------------------------------------------------------
def check_writable(path, option):
    """Fail now, not after the feature pass, if `path` cannot be written (a folder, or an unwritable place)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f'{option}={path}: is a folder; expected a file name')
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f'{option}={path}: cannot write there ({folder} is not a writable folder)')


def check_dest(dest_path, dataset_path):
    """`ref` must not replace what it reads (--dest equal to --data replaced the dataset zip with the
    statistics), write into the dataset's folder, or replace another set of images."""
    dest = os.path.realpath(dest_path)
    data = None if util.is_url(dataset_path) else os.path.realpath(dataset_path)
    if data is not None and (dest == data or dest.startswith(os.path.join(data, ''))):
        raise ValueError(f'--dest={dest_path}: is --data={dataset_path} or lies inside it; write the statistics to '
                         f'another file')
    if os.path.isfile(dest) and zipfile.is_zipfile(dest):
        with zipfile.ZipFile(dest) as archive:
            names = archive.namelist()
        if not reference_files.is_reference_file(dest) or f'{reference_files.ADM_IMAGES_KEY}.npy' in names:
            raise ValueError(f'--dest={dest_path}: an existing set of images (a dataset zip or an .npz with '
                             f'{reference_files.ADM_IMAGES_KEY}), not statistics; write the statistics to another file')


def same_shape(images, ref, image_path, ref_path):
    if list(images.image_shape) != list(ref.image_shape):
        shape = 'x'.join(map(str, images.image_shape))
        raise ValueError(f'--images={image_path} holds {shape} (CxHxW) images but --ref={ref_path} holds '
                         f'{"x".join(map(str, ref.image_shape))}; compare sets of the same resolution and channels')


# --- the two commands ------------------------------------------------------------------------------
def calc(image_path, ref_path, num=50000, seed=0, batch=64, which=('fid',), weights=None, workers=3):
    """Metrics `which` of `num` images of `image_path` against `ref_path` (module doc); `weights`:
    {network name: PATH|URL}. Returns {result name: value}."""
    which = suite.parse_metrics(','.join(which))
    images = open_images(image_path, '--images', num=num, seed=seed)
    needs_ref = [m for m in which if m != 'is']
    if needs_ref and ref_path is None:
        raise ValueError(f'--ref is required for {",".join(needs_ref)}')
    reference = ref_set = None
    if needs_ref:
        if is_npz(ref_path):
            reference = reference_files.load_reference(ref_path)
        else:
            ref_set = open_images(ref_path, '--ref')
            same_shape(images, ref_set, image_path, ref_path)
    adm = reference is not None and reference.images is not None
    if adm:
        ref_set = NpzImages(ref_path, images=reference.images)
        same_shape(images, ref_set, image_path, ref_path)
        dist.print0(f'{ref_path}: guided-diffusion reference batch; IS and precision/recall follow ADM\'s evaluator')
    networks = suite.load_networks(which, weights or {}, dist.device())

    if reference is not None:
        ref_stats, ref_features, to_compute = suite.reference_needs(which, reference, networks, f'--ref={ref_path}')
    else:
        ref_stats, ref_features = {}, {}
        to_compute = {name: 'pr' in which and name == 'inception' for name in suite.needed_networks(needs_ref)}
    generated = feature_pass(images, networks, suite.generated_captures(which), batch, workers, image_path)
    if to_compute:
        computed = feature_pass(ref_set, {n: networks[n] for n in to_compute}, {n for n, keep in to_compute.items()
                                                                                if keep}, batch, workers, ref_path)
        for name, st in computed.items():
            ref_stats.setdefault(name, (st.mu, st.sigma))
            if st.features is not None:
                ref_features[name] = st.features
    return suite.compute_results(which, networks, generated, ref_stats, ref_features, adm=adm)


def make_reference(dataset_path, dest_path, which=('fid',), weights=None, batch=64, workers=3):
    """Write one reference `.npz` with the statistics of every metric in `which` (metrics/reference.py)."""
    which = [m for m in suite.parse_metrics(','.join(which)) if m != 'is']  # IS has no reference side
    if not which:
        raise ValueError('--metrics: the Inception Score needs no reference; add fid, pr, clip_fid or fd_dinov2')
    dataset = open_images(dataset_path, '--data')
    networks = suite.load_networks(which, weights or {}, dist.device())
    keep = {'inception'} if 'pr' in which else set()
    stats = feature_pass(dataset, networks, keep, batch, workers, dataset_path)
    if dist.rank() == 0:
        identities = {name: reference_files.network_identity(net) for name, net in networks.items()}
        reference_files.save_reference(dest_path, stats, identities, keep_features=keep,
                                       extra_meta=dict(num_images=len(dataset), metrics=which))
        print(f'Saved reference statistics ({", ".join(which)}) of {len(dataset)} images to {dest_path}')
    dist.barrier()


# --- CLI -------------------------------------------------------------------------------------------
def common_options(fn):
    options = [
        click.option('--metrics', 'which', metavar='LIST', default='fid', show_default=True,
                     help=f'Any of {",".join(suite.METRICS)}'),
        click.option('--detector', metavar='PATH|URL', help='Inception weights (default: NVIDIA pkl, else fid-helper)'),
        click.option('--clip-weights', metavar='PATH|URL', help='CLIP ViT-B/32 weights (default: timm download)'),
        click.option('--dinov2-weights', metavar='PATH|URL', help='DINOv2 ViT-L/14 weights (default: Meta\'s file)'),
        click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
                     help='Maximum batch size per process'),
        click.option('--workers', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True,
                     help='DataLoader worker processes'),
        cli.debug_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def weight_sources(detector, clip_weights, dinov2_weights):
    return dict(inception=detector, clip=clip_weights, dinov2=dinov2_weights)


@click.group(cls=cli.Group)
def main():
    """Compute reference statistics (`ref`) or metrics of generated images (`calc`); run under torchrun
    to shard the feature extraction over GPUs."""


@main.command('calc')
@click.option('--images', 'image_path', metavar='DIR|ZIP|NPZ', required=True, help='Generated images')
@click.option('--ref', 'ref_path', metavar='NPZ|URL|DIR|ZIP', help='Reference statistics, or reference images')
@click.option('--num', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True,
              help='Number of images to evaluate (fewer available is an error)')
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Subset seed when more exist')
@click.option('--json', 'json_path', metavar='PATH', help='Also write the results (and inputs) as a JSON file')
@common_options
def calc_command(image_path, ref_path, num, seed, which, detector, clip_weights, dinov2_weights, batch, workers,
                 json_path):
    """Metrics of generated images against a reference."""
    check_writable(json_path, '--json')
    dist.init()
    which = suite.parse_metrics(which)
    with cli.task(f'computing {",".join(which)} of --images={image_path}'):
        results = calc(image_path, ref_path, num, seed, batch, which,
                       weight_sources(detector, clip_weights, dinov2_weights), workers)
    for name, value in results.items():
        dist.print0(f'{name} {value:g}')
    if json_path and dist.rank() == 0:
        with util.atomic_write(json_path, 'w') as f:
            json.dump(dict(results, images=image_path, ref=ref_path, num=num, seed=seed, metrics=which), f, indent=2)


@main.command('ref')
@click.option('--data', 'dataset_path', metavar='DIR|ZIP|NPZ', required=True, help='Dataset images (all are used)')
@click.option('--dest', 'dest_path', metavar='NPZ', required=True, help='Output statistics file')
@common_options
def ref_command(dataset_path, dest_path, which, detector, clip_weights, dinov2_weights, batch, workers):
    """Reference statistics of a dataset: EDM's fid-refs/*.npz (`mu`, `sigma`) plus every other metric's."""
    check_writable(dest_path, '--dest')
    check_dest(dest_path, dataset_path)
    dist.init()
    make_reference(dataset_path, dest_path, suite.parse_metrics(which),
                   weight_sources(detector, clip_weights, dinov2_weights), batch, workers)


if __name__ == '__main__':
    main()
