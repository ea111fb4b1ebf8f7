"""The metrics themselves, from features or their statistics: Fréchet distance (FID, CLIP-FID, FD-DINOv2),
Inception Score, precision/recall."""
import numpy as np
import torch


def check_statistics(mu, sigma, name):
    """float64 (mu, sigma) after checking what would otherwise break the matrix square root: shapes,
    non-finite entries (e.g. a reference file computed from a diverged generator) and asymmetry."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f'{name}: expected mu [D] and sigma [D, D], got {list(mu.shape)} and {list(sigma.shape)}')
    for key, value in (('mu', mu), ('sigma', sigma)):
        bad = int((~np.isfinite(value)).sum())
        if bad:
            raise ValueError(f'{name}: {key} has {bad} non-finite (NaN/Inf) entries; recompute these statistics')
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f'{name}: sigma is not symmetric, so it is not a covariance matrix')
    return mu, (sigma + sigma.T) / 2


def psd_eigenvalues_clean(w):
    """Eigenvalues of a symmetric PSD matrix with rounding noise (|λ| ≲ D·ε·λ_max, either sign) set to 0:
    a rank-deficient covariance otherwise adds Σ √noise to the trace."""
    return np.where(w > len(w) * np.finfo(w.dtype).eps * max(w.max(), 0), w, 0)


def psd_sqrt(sigma):
    """Symmetric square root of a covariance."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(psd_eigenvalues_clean(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, names=('generated', 'reference')):
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) in float64 (docs/checkpoint-format.md §6).

    EDM takes `scipy.linalg.sqrtm(Σ₁Σ₂)`, an iterative Schur method that can run for minutes or return
    NaN on singular products (fewer images than dimensions). Only the trace of the root is needed, and
    Σ₁Σ₂ is similar to the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½, so tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½): two
    symmetric eigendecompositions, a fixed O(D³) cost that also holds for singular covariances, with
    no ε fallback or imaginary part. Equal to sqrtm's value to ~1e-9 relative on regular inputs (tested).
    `names` label the two statistics in errors."""
    mu1, sigma1 = check_statistics(mu1, sigma1, names[0])
    mu2, sigma2 = check_statistics(mu2, sigma2, names[1])
    if mu1.shape != mu2.shape:
        raise ValueError(f'Fréchet distance: {names[0]} statistics have {len(mu1)} dimensions but {names[1]} '
                         f'have {len(mu2)}')
    root1 = psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(psd_eigenvalues_clean(np.linalg.eigvalsh((product + product.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits, num_splits=10, split_size=None):
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) per split of consecutive rows; returns (mean, std) over splits.
    Default: 10 equal splits (Salimans et al. 2016; NVIDIA's metric). `split_size=5000`: ADM's evaluator
    (docs/checkpoint-format.md §7) — consecutive chunks of 5,000 rows, the last one possibly shorter
    (identical to 10 splits at 50,000 images). `logits`: [N, classes] (NVIDIA's head, no bias)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    parts = logits.split(split_size) if split_size else logits.tensor_split(num_splits)
    if split_size is None and len(logits) < num_splits:
        raise ValueError(f'Inception Score needs at least {num_splits} images (one per split), got {len(logits)}')
    scores = []
    for part in parts:
        log_p = part.log_softmax(dim=1)
        log_marginal = log_p.exp().mean(dim=0).log()
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def squared_distances(a, b, half=False):
    """‖aᵢ − bⱼ‖² as ADM's `DistanceBlock`: ‖a‖² − 2abᵀ + ‖b‖², clamped at 0; `half=True` computes it in
    float16 as ADM does and recomputes the block in float32 when any value is not finite."""
    if half:
        a16, b16 = a.half(), b.half()
        d = (a16.square().sum(1, keepdim=True) - 2 * a16 @ b16.T + b16.square().sum(1)).clamp(min=0).float()
        if torch.isfinite(d).all():
            return d
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp(min=0)


def knn_radii(features, k, batch, half=False):
    """Squared distance of every point to its k-th nearest neighbour in its own set: position k of its
    sorted distance row, position 0 being the point itself (ADM's `manifold_radii`, nhood_sizes=(k,))."""
    radii = []
    for rows in features.split(batch):
        nearest = torch.cat([squared_distances(rows, cols, half).topk(min(k + 1, len(cols)), dim=1, largest=False)
                             .values for cols in features.split(batch)], dim=1)
        radii.append(nearest.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def fraction_covered(points, centres, radii, batch, half=False):
    """Fraction of `points` inside at least one hypersphere (centre, squared radius), `<=` as ADM."""
    covered = []
    for rows in points.split(batch):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(centres.split(batch), radii.split(batch)):
            hit |= (squared_distances(rows, cols, half) <= col_radii).any(dim=1)
        covered.append(hit)
    return torch.cat(covered).double().mean().item()


def precision_recall(real_features, gen_features, k=3, batch=10000, half=False):
    """Improved precision and recall (Kynkäänniemi et al. 2019) on pool3 features, as ADM's evaluator
    (docs/checkpoint-format.md §7): k-NN hyperspheres with k = 3 from squared Euclidean distances, rows and
    columns in blocks of `batch` = 10,000. Precision: fraction of generated points inside at least one
    reference hypersphere; recall: the converse. The only difference from ADM: distances are float32
    unless `half=True` (fid.py does so for ADM reference batches), which reproduces ADM's float16
    distance blocks with their float32 recompute. Radii of the k-NN within a set include the point
    itself at position 0 in both."""
    real = torch.as_tensor(real_features, dtype=torch.float32)
    gen = torch.as_tensor(gen_features, dtype=torch.float32, device=real.device)
    for name, feats in (('reference', real), ('generated', gen)):
        if len(feats) <= k:
            raise ValueError(f'precision/recall needs more than k={k} {name} images, got {len(feats)}')
    precision = fraction_covered(gen, real, knn_radii(real, k, batch, half), batch, half)
    recall = fraction_covered(real, gen, knn_radii(gen, k, batch, half), batch, half)
    return precision, recall
