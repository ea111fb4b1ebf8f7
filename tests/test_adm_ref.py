"""fid.py with guided-diffusion reference batches and the whole suite in one pass (issue 16.3, 16.4), with a
small stand-in for the Inception network (the real one is tested in test_metrics.py) and tiny random
CLIP / DINOv2 weight files; every value is checked against an independent computation."""
import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from metrics import clip, dinov2, suite
from metrics.scores import frechet_distance
from test_metrics import brute_force_precision_recall  # ADM's definition, full float64 matrices

CLIP_TINY = dict(embed_dim=32, depth=1, num_heads=2, num_classes=8)
DINO_TINY = dict(embed_dim=32, depth=1, num_heads=2)


class StandInInception(torch.nn.Module):
    """6 small-integer features (2×2-pooled pixels / 32, rounded: ADM's float16 distances are then exact,
    so the brute-force float64 reference must agree to the last point, ties included) and a 5-class head."""
    num_features, version, weights_id = 6, 'stand-in-v1', 'stand-in-weights'

    def __init__(self):
        super().__init__()
        self.register_buffer('head', torch.randn(5, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        return (torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)[:, :6] / 32).round()

    def require_logits(self):
        pass

    def logits(self, features):
        return features.to(self.head.dtype) @ self.head.T


def write_zip(path, images):
    with zipfile.ZipFile(path, 'w') as archive:
        for i, image in enumerate(images):
            png = io.BytesIO()
            PIL.Image.fromarray(image).save(png, format='PNG')
            archive.writestr(f'00000/img{i:08d}.png', png.getvalue())
    return str(path)


def random_nhwc(num, seed, res=16, low=0):
    return np.random.default_rng(seed).integers(low, 256, (num, res, res, 3)).astype(np.uint8)


@pytest.fixture
def networks(tmp_path, monkeypatch):
    """suite.load_feature_network → the stand-in Inception and tiny CLIP/DINOv2 read from the weight files given."""
    torch.manual_seed(0)
    import timm
    clip_path, dino_path = tmp_path / 'clip.pt', tmp_path / 'dinov2.pt'
    torch.save(timm.create_model('vit_base_patch32_clip_224', act_layer='quick_gelu', **CLIP_TINY).state_dict(),
               clip_path)
    dino = timm.create_model('vit_large_patch14_dinov2', num_classes=0, img_size=518, **DINO_TINY).state_dict()
    torch.save(dict(dino, mask_token=torch.zeros(1, 32)), dino_path)
    inception = StandInInception()

    def load_feature_network(name, weights, device):
        if name == 'inception':
            return inception
        if name == 'clip':
            return clip.load_clip(weights, device, **CLIP_TINY)
        return dinov2.load_dinov2(weights, device, **DINO_TINY)
    monkeypatch.setattr(suite, 'load_feature_network', load_feature_network)
    passes = []
    for cls in (fid.FolderImages, fid.NpzImages):
        original = cls.batches
        monkeypatch.setattr(cls, 'batches', lambda self, *a, original=original: passes.append(self.path) or
                            original(self, *a))
    return dict(inception=inception, clip=str(clip_path), dinov2=str(dino_path), passes=passes)


def run(*args):
    result = CliRunner().invoke(fid.main, [str(arg) for arg in args] + ['--workers=0', '--batch=7'])
    assert result.exit_code == 0, result.output
    return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2
                and line.split()[0] in ('fid', 'is_mean', 'is_std', 'precision', 'recall', 'clip_fid', 'fd_dinov2'))


def inception_score_by_hand(logits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))


def features(net, nhwc):
    with torch.no_grad():
        return net(torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()).double().numpy()


def test_adm_reference_batch_fid_from_its_statistics_is_and_pr_like_adms_evaluator(tmp_path, networks):
    ref_images, gen_images = random_nhwc(30, seed=1), random_nhwc(24, seed=2, low=40)
    inception = networks['inception']
    ref_feats = features(inception, ref_images)
    stored_mu, stored_sigma = ref_feats.mean(0) + 0.5, np.cov(ref_feats, rowvar=False) * 2  # ≠ arr_0's statistics
    adm = tmp_path / 'VIRTUAL_tiny_labeled.npz'
    np.savez(adm, arr_0=ref_images, mu=stored_mu, sigma=stored_sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    gen = write_zip(tmp_path / 'gen.zip', gen_images)
    results = run('calc', f'--images={gen}', f'--ref={adm}', '--num=24', '--metrics=fid,is,pr')
    gen_feats = features(inception, gen_images)
    expected_fid = frechet_distance(gen_feats.mean(0), np.cov(gen_feats, rowvar=False), stored_mu, stored_sigma)
    assert float(results['fid']) == pytest.approx(expected_fid, rel=1e-5)
    logits = gen_feats @ inception.head.double().numpy().T
    assert float(results['is_mean']) == pytest.approx(inception_score_by_hand(logits), rel=1e-5)  # one 5000-chunk
    precision, recall = brute_force_precision_recall(ref_feats, gen_feats)
    assert 0 < precision < 1 and 0 < recall < 1
    assert (float(results['precision']), float(results['recall'])) == pytest.approx((precision, recall), abs=1e-6)
    assert networks['passes'] == [gen, str(adm)]  # one pass over each set


def test_all_metrics_in_one_pass_and_through_a_reference_file(tmp_path, networks):
    ref_images, gen_images = random_nhwc(20, seed=3), random_nhwc(20, seed=4, low=64)
    real, gen = write_zip(tmp_path / 'real.zip', ref_images), write_zip(tmp_path / 'gen.zip', gen_images)
    weights = [f'--clip-weights={networks["clip"]}', f'--dinov2-weights={networks["dinov2"]}']
    every = '--metrics=fid,is,pr,clip_fid,fd_dinov2'
    direct = run('calc', f'--images={gen}', f'--ref={real}', '--num=20', every, *weights)
    assert networks['passes'] == [gen, real]
    refs = tmp_path / 'refs' / 'real.npz'
    run('ref', f'--data={real}', f'--dest={refs}', every, *weights)
    with np.load(refs) as data:
        assert sorted(data.files) == ['clip_mu', 'clip_sigma', 'd2o_meta', 'dinov2_mu', 'dinov2_sigma',
                                      'inception_features', 'mu', 'sigma']
        meta = json.loads(str(data['d2o_meta']))
    assert meta['networks']['clip']['version'] == clip.VERSION and meta['num_images'] == 20
    networks['passes'].clear()
    via_file = run('calc', f'--images={gen}', f'--ref={refs}', '--num=20', every, *weights)
    assert networks['passes'] == [gen]  # the reference file replaces the second pass
    assert via_file.keys() == direct.keys() == {'fid', 'is_mean', 'is_std', 'precision', 'recall', 'clip_fid',
                                                'fd_dinov2'}
    for key in direct:
        assert float(via_file[key]) == pytest.approx(float(direct[key]), rel=1e-6, abs=1e-9), key
    # independent: each extractor's own forward pass on the images, Fréchet distance of their moments
    for metric, net in (('clip_fid', clip.load_clip(networks['clip'], **CLIP_TINY)),
                        ('fd_dinov2', dinov2.load_dinov2(networks['dinov2'], **DINO_TINY))):
        a, b = features(net, gen_images), features(net, ref_images)
        expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert float(direct[metric]) == pytest.approx(expected, rel=1e-4), metric
    # statistics of other CLIP weights are refused
    torch.save({k: v + 1 for k, v in torch.load(networks['clip']).items()}, tmp_path / 'other-clip.pt')
    result = CliRunner().invoke(fid.main, ['calc', f'--images={gen}', f'--ref={refs}', '--num=20',
                                           '--metrics=clip_fid', f'--clip-weights={tmp_path / "other-clip.pt"}'])
    assert result.exit_code == 1 and 'its clip statistics were computed with weights' in result.output


def test_npz_image_pack_as_generated_images_with_a_seeded_subset(tmp_path, networks):
    """D2O's generate.py writes image_pack.npz (`arr_0` NHWC); more images than --num → EDM's seeded subset."""
    pack, ref_images = random_nhwc(12, seed=5), random_nhwc(10, seed=6)
    np.savez(tmp_path / 'image_pack.npz', arr_0=pack)
    real = write_zip(tmp_path / 'real.zip', ref_images)
    results = run('calc', f'--images={tmp_path / "image_pack.npz"}', f'--ref={real}', '--num=8', '--seed=3')
    chosen = np.sort(np.random.RandomState(3).choice(12, size=8, replace=False))
    inception = networks['inception']
    a, b = features(inception, pack[chosen]), features(inception, ref_images)
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert float(results['fid']) == pytest.approx(expected, rel=1e-5)
