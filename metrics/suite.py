"""The evaluation suite: which feature network each metric needs, what the reference must provide, and the
metric values from the features of one pass (`fid.py calc --metrics=fid,is,pr,clip_fid,fd_dinov2`).

| metric      | network (module)                   | generated side          | reference side             |
|-------------|------------------------------------|-------------------------|----------------------------|
| `fid`       | NVIDIA Inception pool3 (inception) | mu, sigma               | mu, sigma                  |
| `is`        | Inception 1008-way head            | features → logits       | —                          |
| `pr`        | Inception pool3                    | features                | features (k-NN radii)      |
| `clip_fid`  | CLIP ViT-B/32 embedding (clip)     | mu, sigma               | mu, sigma                  |
| `fd_dinov2` | DINOv2 ViT-L/14 CLS (dinov2)       | mu, sigma               | mu, sigma                  |

One pass: every image is decoded once and handed to each network in the same batch. Each network then
resizes it once, its own way, because each reference protocol fixes the resize: Inception TF1-bilinear to
299² in float, CLIP PIL-bicubic to 224² re-quantised to uint8 (clean-fid), DINOv2 torch-bicubic with
antialiasing to 224² in float (EDM2). CLIP and DINOv2 share the size but not the resampling, so sharing one
224² resize would change one of the two metrics.

Protocols: EDM/NVIDIA by default (IS over 10 equal splits, float32 distances for precision/recall);
`adm=True` (an ADM reference batch) follows guided-diffusion's evaluator (IS over chunks of 5,000 rows,
float16 distance blocks), docs/checkpoint-format.md §7."""
from metrics import scores
from metrics.reference import network_identity

METRICS = ('fid', 'is', 'pr', 'clip_fid', 'fd_dinov2')
NETWORK = {'fid': 'inception', 'is': 'inception', 'pr': 'inception', 'clip_fid': 'clip', 'fd_dinov2': 'dinov2'}
FRECHET = {'fid': 'inception', 'clip_fid': 'clip', 'fd_dinov2': 'dinov2'}  # Fréchet distance metrics
WEIGHT_OPTIONS = {'inception': '--detector', 'clip': '--clip-weights', 'dinov2': '--dinov2-weights'}
ADM_IS_SPLIT_SIZE = 5000


def parse_metrics(text, option='--metrics'):
    """'fid,is' → ['fid', 'is'] (order kept, duplicates dropped); a clear error for anything else."""
    names = [name.strip() for name in str(text).split(',') if name.strip()]
    if not names or any(name not in METRICS for name in names):
        raise ValueError(f'{option}: expected a comma-separated subset of {",".join(METRICS)}, got {text}')
    return list(dict.fromkeys(names))


def needed_networks(which):
    return list(dict.fromkeys(NETWORK[name] for name in which))


def load_feature_network(name, weights, device):
    """One feature network by name, from `weights` (PATH|URL) or its default sources."""
    if name == 'inception':
        from metrics.detector import load_detector
        return load_detector(weights, device)
    if name == 'clip':
        from metrics.clip import load_clip
        return load_clip(weights, device)
    from metrics.dinov2 import load_dinov2
    return load_dinov2(weights, device)


def load_networks(which, weights, device):
    """{network name: module} for the metrics `which`; `weights`: {network name: PATH|URL or None}.
    The Inception Score's head is checked here, before any long feature pass."""
    networks = {name: load_feature_network(name, weights.get(name), device) for name in needed_networks(which)}
    if 'is' in which:
        networks['inception'].require_logits()
    return networks


def generated_captures(which):
    """Networks whose per-image features the generated side must keep."""
    return {'inception'} if {'is', 'pr'} & set(which) else set()


def reference_needs(which, reference, networks, label):
    """What the reference file (metrics/reference.py `Reference`) provides for `which`, checked against the
    networks in use: `(stats {network: (mu, sigma)}, features {network: [N, D]}, to_compute {network:
    keep_features})` — the last lists what must come from the file's images (ADM reference batches)."""
    stats, features, to_compute = {}, {}, {}
    for metric in which:
        name = NETWORK[metric]
        identity = network_identity(networks[name])
        if metric in FRECHET:
            found = reference.stats(name, identity)
            if found is not None:
                stats[name] = found
            else:
                to_compute.setdefault(name, False)
        elif metric == 'pr':
            found = reference.features(name, identity)
            if found is not None:
                features[name] = found
            else:
                to_compute[name] = True
    if to_compute and reference.images is None:
        missing = ', '.join(sorted(to_compute))
        raise ValueError(f'{label}: holds no {missing} statistics/features for --metrics={",".join(which)}; '
                         f'recompute it with `fid.py ref --metrics={",".join(which)}` or pass image folders')
    return stats, features, to_compute


def compute_results(which, networks, generated, ref_stats, ref_features, adm=False):
    """{result name: value} from the generated side's statistics (`generated` {network: EasyDict}) and the
    reference's (`ref_stats` {network: (mu, sigma)}, `ref_features` {network: [N, D]})."""
    results = {}
    for metric in which:
        name = NETWORK[metric]
        if metric in FRECHET:
            results[metric] = scores.frechet_distance(generated[name].mu, generated[name].sigma, *ref_stats[name],
                                                      names=(f'generated {name}', f'reference {name}'))
        elif metric == 'is':
            logits = networks[name].logits(generated[name].features)
            split_size = ADM_IS_SPLIT_SIZE if adm else None
            results['is_mean'], results['is_std'] = scores.inception_score(logits, split_size=split_size)
        elif metric == 'pr':
            results['precision'], results['recall'] = scores.precision_recall(
                ref_features[name], generated[name].features, half=adm)
    return results
