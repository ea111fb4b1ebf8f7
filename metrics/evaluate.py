"""FID of a generator during training: the training loop supplies the sampler, so metrics never imports training/."""
import numpy as np

from metrics.detector import load_detector
from metrics.feature_stats import compute_feature_stats, rank_chunks
from metrics.reference import load_ref_stats, network_identity
from metrics.scores import frechet_distance


def evaluate_generator(net, ref_stats, num_images, batch, device, sample_fn, detector=None):
    """FID of `num_images` images made by `sample_fn(seeds) -> uint8 [B, C, H, W]` for seeds 0..num_images−1,
    shared out over the torchrun ranks like EDM's generate.py (every rank must call this).

    `ref_stats`: path/URL of an EDM `.npz` or a dict with `mu` and `sigma`. `net` is put in eval mode for
    the duration and restored afterwards. `detector`: InceptionV3 module, weights PATH|URL, or None for the
    default sources. Returns `dict(fid=float)`, identical on all ranks."""
    if detector is None or isinstance(detector, str):
        detector = load_detector(detector, device)
    if isinstance(ref_stats, dict):
        mu_ref, sigma_ref = np.asarray(ref_stats['mu'], np.float64), np.asarray(ref_stats['sigma'], np.float64)
    else:  # a reference of ours records the detector's weights: statistics of other weights are refused
        identity = network_identity(detector) if hasattr(detector, 'weights_id') else None
        mu_ref, sigma_ref = load_ref_stats(ref_stats, identity)
    was_training = net.training
    net.eval()
    try:
        batches = ((seeds, sample_fn(seeds)) for seeds in rank_chunks(num_images, batch))
        stats = compute_feature_stats(batches, detector, num_images)
    finally:
        net.train(was_training)
    return dict(fid=frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref))
