"""The metrics themselves, from Inception features or their statistics: FID, Inception Score, precision/recall."""
import numpy as np
import scipy.linalg
import torch


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) in float64 (checkpoint-format.md §6).
    A singular product (e.g. fewer images than 2048 feature dimensions) whose square root comes out
    non-finite is retried with `eps` added to both diagonals; the square root's imaginary part, which
    is numerical noise for a product of two PSD matrices, must be negligible and is then dropped."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}')
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # tolerance relative to the trace: FID-scale traces are in the hundreds
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3 * max(1.0, np.abs(np.trace(covmean.real))):
            raise ValueError(f'FID: matrix square root has a large imaginary component ({imaginary:g})')
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, num_splits=10):
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) per split of consecutive rows; returns (mean, std) over splits
    (Salimans et al. 2016, 10 splits as NVIDIA/OpenAI report). `logits`: [N, classes]."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if len(logits) < num_splits:
        raise ValueError(f'Inception Score needs at least {num_splits} images (one per split), got {len(logits)}')
    log_p = logits.log_softmax(dim=1)
    scores = []
    for part in log_p.tensor_split(num_splits):
        log_marginal = part.exp().mean(dim=0).log()
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def knn_radii(features, k, batch):
    """Squared distance of every point to its k-th nearest neighbour in its own set (itself excluded)."""
    radii = []
    for rows in features.split(batch):
        nearest = torch.cat([squared_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1, largest=False).values
                             for cols in features.split(batch)], dim=1)
        radii.append(nearest.topk(k + 1, dim=1, largest=False).values[:, k])  # rank 0 is the point itself
    return torch.cat(radii)


def squared_distances(a, b):
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)


def fraction_covered(points, centres, radii, batch):
    """Fraction of `points` inside at least one hypersphere (centre, squared radius)."""
    covered = []
    for rows in points.split(batch):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(centres.split(batch), radii.split(batch)):
            hit |= (squared_distances(rows, cols) <= col_radii).any(dim=1)
        covered.append(hit)
    return torch.cat(covered).double().mean().item()


def precision_recall(real_features, gen_features, k=3, batch=10000):
    """Improved precision and recall (Kynkäänniemi et al. 2019) on pool3 features, as OpenAI's evaluator:
    k-NN hyperspheres with k = 3, squared Euclidean distances in row/column blocks of `batch` (float32).
    Precision: fraction of generated points inside the real manifold; recall: the converse."""
    real = torch.as_tensor(real_features, dtype=torch.float32)
    gen = torch.as_tensor(gen_features, dtype=torch.float32, device=real.device)
    for name, feats in (('reference', real), ('generated', gen)):
        if len(feats) <= k:
            raise ValueError(f'precision/recall needs more than k={k} {name} images, got {len(feats)}')
    precision = fraction_covered(gen, real, knn_radii(real, k, batch), batch)
    recall = fraction_covered(real, gen, knn_radii(gen, k, batch), batch)
    return precision, recall
