"""Inception features of image sets, sharded over torchrun ranks, and FID reference statistics (`*.npz`).

Sharding follows EDM's fid.py (checkpoint-format.md §6): the index range is split into
ceil(N / (batch·world))·world chunks and rank r takes every world-th one; each rank accumulates
Σf and Σffᵀ in float64, which are summed over ranks. Optionally the features themselves are kept
(Inception Score, precision/recall): each rank writes its rows into an [N, 2048] buffer at the images'
global indices and the buffers are summed, so every rank ends with all features in index order."""
import numpy as np
import torch
import tqdm

from dnnlib import util
from metrics.inception import NUM_FEATURES
from torch_utils import distributed as dist
from training.dataset import ImageFolderDataset


def rank_chunks(num_items, batch):
    """This rank's share of 0..num_items−1 as index chunks of at most `batch` (EDM's rank-strided split)."""
    world = dist.world_size()
    num_chunks = max(-(-num_items // (batch * world)), 1) * world
    chunks = np.array_split(np.arange(num_items), num_chunks)[dist.rank()::world]
    return [chunk.tolist() for chunk in chunks if len(chunk)]


def compute_feature_stats(batches, detector, num_images, capture_features=False, progress=None):
    """Feature statistics of `num_images` images spread over the ranks.

    `batches` yields this rank's `(indices, images)`: global image indices (0..num_images−1, each on
    exactly one rank) and uint8 [B, C, H, W] images. `detector` maps such images to
    [B, detector.num_features] (InceptionV3: 2048). Returns an EasyDict with `num`, `mu` [D] and
    `sigma` [D, D] (float64 numpy, unbiased covariance) and `features` (float32 torch [N, D] on the
    detector's device, or None). `progress`: total batch count for a tqdm bar on rank 0."""
    device, dim = next(detector.buffers()).device, detector.num_features
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    total_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    count = torch.zeros([], dtype=torch.float64, device=device)
    features = torch.zeros(num_images, dim, device=device) if capture_features else None
    bar = tqdm.tqdm(total=progress, unit='batch', disable=progress is None or dist.rank() != 0)
    with torch.inference_mode():
        for indices, images in batches:
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise TypeError(f'feature extraction expects uint8 [N, C, H, W] images, got {images.dtype} '
                                f'{list(images.shape)}')
            feats = detector(images.to(device))
            f64 = feats.double()
            total += f64.sum(dim=0)
            total_outer += f64.T @ f64
            count += len(feats)
            if features is not None:
                features[torch.as_tensor(indices, device=device)] = feats
            bar.update(1)
    bar.close()
    for tensor in (total, total_outer, count) + ((features,) if features is not None else ()):
        dist.all_reduce_sum(tensor)
    num = int(count.item())
    if num != num_images:
        raise RuntimeError(f'feature extraction saw {num} images, expected {num_images}')
    if num < 2:
        raise ValueError(f'FID statistics need at least 2 images, got {num}')
    mu = total / num
    sigma = (total_outer - num * torch.outer(mu, mu)) / (num - 1)
    return util.EasyDict(num=num, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), features=features)


def open_image_set(path, num=None, seed=0):
    """ImageFolderDataset over a folder/zip: all images (`num=None`), or `num` of them as EDM's fid.py —
    fewer available is an error, more → a random subset chosen with `seed`."""
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if len(dataset) < 2:
        raise ValueError(f'{path}: found {len(dataset)} image(s); FID statistics need at least 2')
    if num is not None and len(dataset) < num:
        raise ValueError(f'{path}: found {len(dataset)} images, but {num} are requested (--num={num}); '
                         f'generate more images or pass --num={len(dataset)}')
    return dataset


def dataset_feature_stats(dataset, detector, batch=64, workers=3, capture_features=False):
    """`compute_feature_stats` over an ImageFolderDataset, this rank's chunks loaded by `workers` processes."""
    chunks = rank_chunks(len(dataset), batch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    batches = ((chunk, images) for chunk, (images, _labels) in zip(chunks, loader))
    return compute_feature_stats(batches, detector, len(dataset), capture_features, progress=len(chunks))


def save_ref_stats(path, mu, sigma):
    """EDM's reference file (checkpoint-format.md §5): `mu` [2048] and `sigma` [2048, 2048], float64."""
    with util.atomic_write(path) as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_ref_stats(path_or_url):
    """(mu, sigma) from an EDM-style `.npz` (local path or URL through the download cache)."""
    with util.open_url(path_or_url) as f:
        try:
            with np.load(f) as data:
                mu, sigma = data['mu'], data['sigma']
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f'{path_or_url}: not an FID reference .npz with `mu` and `sigma` ({err})') from None
    if mu.shape != (NUM_FEATURES,) or sigma.shape != (NUM_FEATURES, NUM_FEATURES):
        raise ValueError(f'{path_or_url}: expected mu [{NUM_FEATURES}] and sigma [{NUM_FEATURES}, {NUM_FEATURES}], '
                         f'got {list(mu.shape)} and {list(sigma.shape)}')
    return mu.astype(np.float64), sigma.astype(np.float64)
