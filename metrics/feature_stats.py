"""Features of image batches through one or more feature networks in one pass, sharded over torchrun ranks.

The caller supplies the images (metrics/ never opens datasets: fid.py and the training loop do), as
an iterable of this rank's `(indices, uint8 [B, C, H, W])`. Each image is decoded once and handed to
every network, which resizes it its own way (docs/checkpoint-format.md §6 for Inception; metrics/clip.py
and metrics/dinov2.py for the others).

Sharding follows EDM's fid.py (docs/checkpoint-format.md §6): the index range is split into
ceil(N / (batch·world))·world chunks and rank r takes every world-th one; each rank accumulates
Σf and Σffᵀ in float64, which are summed over ranks. Optionally the features themselves are kept
(Inception Score, precision/recall): each rank writes its rows into an [N, D] buffer at the images'
global indices and the buffers are summed, so every rank ends with all features in index order."""
import torch
import tqdm

from dnnlib import util
from torch_utils import distributed as dist


def rank_chunks(num_items, batch):
    """This rank's share of 0..num_items−1 as index chunks of at most `batch` (EDM's rank-strided split)."""
    return dist.rank_batches(range(num_items), batch)


class MomentAccumulator:
    """Σf, Σffᵀ (float64) and optionally the features by global index, for one feature network."""

    def __init__(self, network, num_images, capture_features):
        self.network = network
        device, dim = network_device(network), network.num_features
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.total_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = torch.zeros([], dtype=torch.float64, device=device)
        self.features = torch.zeros(num_images, dim, device=device) if capture_features else None

    def add(self, indices, images):
        feats = self.network(images.to(self.total.device))
        f64 = feats.double()
        self.total += f64.sum(dim=0)
        self.total_outer += f64.T @ f64
        self.count += len(feats)
        if self.features is not None:
            self.features[torch.as_tensor(indices, device=self.total.device)] = feats.to(self.features.dtype)

    def finish(self, num_images, name):
        for tensor in (self.total, self.total_outer, self.count) + ((self.features,) if self.features is not None
                                                                    else ()):
            dist.all_reduce_sum(tensor)
        num = int(self.count.item())
        if num != num_images:
            raise RuntimeError(f'{name} feature extraction saw {num} images, expected {num_images}')
        if num < 2:
            raise ValueError(f'feature statistics need at least 2 images, got {num}')
        mu = self.total / num
        sigma = (self.total_outer - num * torch.outer(mu, mu)) / (num - 1)  # unbiased, as EDM
        return util.EasyDict(num=num, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), features=self.features)


def network_device(network):
    tensor = next(iter(network.buffers()), None)
    if tensor is None:
        tensor = next(network.parameters())
    return tensor.device


def compute_feature_stats(batches, networks, num_images, capture_features=False, progress=None):
    """Feature statistics of `num_images` images spread over the ranks.

    `batches` yields this rank's `(indices, images)`: global image indices (0..num_images−1, each on
    exactly one rank) and uint8 [B, C, H, W] images. `networks`: one feature network, or a dict
    `{name: network}`; each maps such images to [B, network.num_features]. `capture_features`: bool, or
    the set of names whose features to keep. Returns, per network, an EasyDict with `num`, `mu` [D] and
    `sigma` [D, D] (float64 numpy, unbiased covariance) and `features` (float32 torch [N, D] on the
    network's device, or None) — a dict of them when `networks` is a dict. `progress`: total batch count
    for a tqdm bar on rank 0."""
    single = not isinstance(networks, dict)
    named = {'features': networks} if single else networks
    keep = set(named) if capture_features is True else set(capture_features or ())
    accumulators = {name: MomentAccumulator(net, num_images, name in keep) for name, net in named.items()}
    bar = tqdm.tqdm(total=progress, unit='batch', disable=progress is None or dist.rank() != 0)
    with torch.inference_mode():
        for indices, images in batches:
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise TypeError(f'feature extraction expects uint8 [N, C, H, W] images, got {images.dtype} '
                                f'{list(images.shape)}')
            for accumulator in accumulators.values():
                accumulator.add(indices, images)
            bar.update(1)
    bar.close()
    stats = {name: acc.finish(num_images, name) for name, acc in accumulators.items()}
    return stats['features'] if single else stats
