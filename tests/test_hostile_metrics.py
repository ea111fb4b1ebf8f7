"""Hostile inputs to the metrics and fid.py (issue 12.8, 12.11): bad statistics fail fast with a message
naming the file; every expected CLI failure is one line, exit status 1, no traceback (--debug shows it)."""
import io
import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import fid
import metrics
from metrics import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_zip(path, num, resolution=8, seed=0):
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(num):
            png = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3)).astype(np.uint8)).save(png, 'PNG')
            archive.writestr(f'00000/img{i:08d}.png', png.getvalue())
    return str(path)


def run(*args):
    result = CliRunner().invoke(fid.main, [str(arg) for arg in args])
    return result.exit_code, result.output, result


def assert_one_line_error(code, out, *fragments):
    assert code == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and 'Traceback' not in out, out
    for fragment in fragments:
        assert fragment in lines[0], out


# --- 12.11: statistics that would make the matrix square root spin or return NaN --------------------
def test_rank_deficient_2048_covariances_give_the_low_rank_value():
    """2048-d covariances of 5 and 6 points (rank 4 and 5): the eigenvalue form needs no ε and no
    iteration; its value equals the nuclear-norm formula computed from the points themselves."""
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((5, 2048)), rng.standard_normal((6, 2048)) + 0.1
    fid_value = metrics.frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    nuclear = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(4 * 5)
    diff = x1.mean(0) - x2.mean(0)
    expected = diff @ diff + (c1 ** 2).sum() / 4 + (c2 ** 2).sum() / 5 - 2 * nuclear
    assert fid_value == pytest.approx(expected, rel=1e-8)


def test_zero_covariance_is_fine_and_non_finite_or_asymmetric_statistics_are_refused():
    zeros = np.zeros((4, 4))
    assert metrics.frechet_distance(np.ones(4), zeros, np.zeros(4), zeros) == pytest.approx(4.0)
    bad_mu = np.array([0.0, np.nan, 0.0, 0.0])
    with pytest.raises(ValueError, match=r'generated: mu has 1 non-finite \(NaN/Inf\) entries'):
        metrics.frechet_distance(bad_mu, np.eye(4), np.zeros(4), np.eye(4))
    bad_sigma = np.eye(4)
    bad_sigma[1, 2] = np.inf
    with pytest.raises(ValueError, match='reference: sigma has 1 non-finite'):
        metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), bad_sigma)
    asymmetric = np.eye(4)
    asymmetric[0, 1] = 1
    with pytest.raises(ValueError, match='not symmetric'):
        metrics.frechet_distance(np.zeros(4), asymmetric, np.zeros(4), np.eye(4))


def test_nan_reference_file_is_refused_at_load_naming_the_file(tmp_path):
    path = tmp_path / 'nan-ref.npz'
    sigma = np.eye(2048)
    sigma[3, 3] = np.nan
    np.savez(path, mu=np.zeros(2048), sigma=sigma)
    with pytest.raises(ValueError, match=r'nan-ref\.npz \(mu, sigma\): sigma has 1 non-finite'):
        metrics.load_ref_stats(str(path))


# --- 12.8: fid.py ----------------------------------------------------------------------------------
def test_missing_garbled_and_foreign_reference_files(tmp_path):
    images = make_zip(tmp_path / 'images.zip', 3)
    common = ['calc', f'--images={images}', '--num=3']
    code, out, _ = run(*common, f'--ref={tmp_path / "missing.npz"}')
    assert_one_line_error(code, out, 'missing.npz', 'does not exist')
    garbled = tmp_path / 'garbled.npz'
    garbled.write_bytes(b'PK\x03\x04 this is not a zip')
    code, out, _ = run(*common, f'--ref={garbled}')
    assert_one_line_error(code, out, 'garbled.npz')
    truncated = tmp_path / 'truncated.npz'
    np.savez(truncated, mu=np.zeros(2048), sigma=np.eye(2048))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    code, out, _ = run(*common, f'--ref={truncated}')
    assert_one_line_error(code, out, 'truncated.npz')
    pickled = tmp_path / 'pickled.npz'
    np.savez(pickled, mu=np.array([object()], dtype=object), sigma=np.eye(2))
    code, out, _ = run(*common, f'--ref={pickled}')
    assert_one_line_error(code, out, 'pickled.npz', 'not a readable reference .npz')
    other = tmp_path / 'other.npz'
    np.savez(other, weights=np.zeros(3))
    code, out, _ = run(*common, f'--ref={other}')
    assert_one_line_error(code, out, 'other.npz: no reference statistics')


def test_empty_or_wrong_image_sources(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, out, _ = run('calc', f'--images={empty}', f'--ref={empty}', '--num=2')
    assert_one_line_error(code, out, 'empty: no image files')
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    code, out, _ = run('calc', f'--images={text}', f'--ref={text}', '--num=2')
    assert_one_line_error(code, out, 'notes.txt: not a zip archive or a folder of images')
    code, out, _ = run('ref', f'--data={tmp_path / "nowhere"}', f'--dest={tmp_path / "r.npz"}')
    assert_one_line_error(code, out, 'nowhere: dataset path does not exist')


def test_offline_url_is_one_line_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    images = make_zip(tmp_path / 'images.zip', 3)
    code, out, _ = run('calc', f'--images={images}', '--num=3', '--ref=http://127.0.0.1:9/refs/cifar10.npz')
    assert_one_line_error(code, out, 'Cannot download http://127.0.0.1:9/refs/cifar10.npz', 'pass its local path')


def test_unwritable_outputs_fail_before_any_work(tmp_path):
    images = make_zip(tmp_path / 'images.zip', 3)
    folder = tmp_path / 'a-folder'
    folder.mkdir()
    code, out, _ = run('ref', f'--data={images}', f'--dest={folder}')
    assert_one_line_error(code, out, f'--dest={folder}: is a folder')
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    code, out, _ = run('calc', f'--images={images}', f'--ref={images}', '--num=3', f'--json={blocker}/r.json')
    assert_one_line_error(code, out, f'--json={blocker}/r.json: cannot write there')
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o500)
        code, out, _ = run('ref', f'--data={images}', f'--dest={locked}/r.npz')
        assert_one_line_error(code, out, 'cannot write there')


def test_bad_metric_names_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    images = make_zip(tmp_path / 'images.zip', 3)
    code, out, _ = run('calc', f'--images={images}', f'--ref={images}', '--num=3', '--metrics=fid,kid')
    assert_one_line_error(code, out, '--metrics: expected a comma-separated subset of fid,is,pr,clip_fid,fd_dinov2')
    code, _, result = run('calc', f'--images={images}', f'--ref={images}', '--num=3', '--metrics=kid', '--debug')
    assert code == 1 and isinstance(result.exception, ValueError)
    monkeypatch.setenv('D2O_DEBUG', '1')
    code, _, result = run('calc', f'--images={images}', f'--ref={images}', '--num=3', '--metrics=kid')
    assert code == 1 and isinstance(result.exception, ValueError)


def test_reference_of_other_weights_or_protocol_is_refused(tmp_path):
    """A reference records each network's protocol version and weights fingerprint (metrics/reference.py)."""
    path = tmp_path / 'refs.npz'
    stats = dict(clip=dict(mu=np.zeros(4), sigma=np.eye(4), features=None))
    reference.save_reference(path, {k: metrics.feature_stats.util.EasyDict(v) for k, v in stats.items()},
                             dict(clip=dict(version='clip-v1', weights='aaaa')))
    ref = reference.load_reference(str(path))
    mu, sigma = ref.stats('clip', dict(version='clip-v1', weights='aaaa'))
    assert np.array_equal(mu, np.zeros(4)) and np.array_equal(sigma, np.eye(4))
    with pytest.raises(ValueError, match="computed with weights 'aaaa', but this run uses 'bbbb'"):
        ref.stats('clip', dict(version='clip-v1', weights='bbbb'))
    with pytest.raises(ValueError, match="computed with version 'clip-v1', but this run uses 'clip-v2'"):
        ref.stats('clip', dict(version='clip-v2', weights='aaaa'))
    assert ref.stats('dinov2', dict(version='x', weights='y')) is None  # absent: the caller reports it


def test_offline_without_clip_or_dinov2_weights_is_one_line_naming_the_option(tmp_path, monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, 'Name or service not known')
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    images = make_zip(tmp_path / 'images.zip', 3)
    code, out, _ = run('calc', f'--images={images}', f'--ref={images}', '--num=3', '--metrics=clip_fid')
    assert_one_line_error(code, out, 'No CLIP ViT-B/32 weights available', 'cannot resolve huggingface.co',
                          '--clip-weights=PATH|URL')
    code, out, _ = run('calc', f'--images={images}', f'--ref={images}', '--num=3', '--metrics=fd_dinov2')
    assert_one_line_error(code, out, 'No DINOv2 ViT-L/14 weights available', 'dinov2_vitl14_pretrain.pth',
                          '--dinov2-weights=PATH|URL')


# --- reference files whose headers or types lie ------------------------------------------------------
def test_npz_header_declaring_terabytes_is_refused_before_np_load(tmp_path):
    path = tmp_path / 'huge.npz'
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr='<f8', fortran_order=False, shape=(10**6, 10**6)))
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('mu.npy', header.getvalue() + bytes(64))  # declares 8 TB, holds 64 bytes
        archive.writestr('sigma.npy', header.getvalue())
    code = ('import resource; resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))\n'  # torch needs ~4 GiB
            f'from metrics.reference import load_ref_stats\ntry:\n    load_ref_stats({str(path)!r})\n'
            'except ValueError as err:\n    raise SystemExit(f"Error: {err}")\n')
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == (
        f'Error: {path}: mu.npy declares shape [1000000, 1000000] (8,000,000,000,000 bytes), but the file holds '
        f'192 bytes for it (at most 4,294,967,296 are read)'), res.stderr


def test_complex_statistics_are_refused(tmp_path):
    path = tmp_path / 'complex.npz'
    np.savez(path, mu=np.zeros(2048, complex), sigma=np.eye(2048, dtype=complex))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no ComplexWarning: refused before any cast
        with pytest.raises(ValueError) as info:
            metrics.load_ref_stats(str(path))
    assert str(info.value) == f'{path}: `mu` must be a real float array, got complex128'


def test_reference_with_an_encrypted_member_is_one_line(tmp_path):
    """zipfile refuses an encrypted member with a RuntimeError (found by the fuzzing harness as a traceback)."""
    path = tmp_path / 'ref.npz'
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    data = bytearray(path.read_bytes())
    for signature, flags in ((b'PK\x03\x04', 6), (b'PK\x01\x02', 8)):  # local and central headers: bit 0 = encrypted
        at = data.find(signature)
        data[at + flags] |= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        reference.load_ref_stats(str(path))
    assert str(err.value).startswith(f'{path}: not a readable reference .npz (RuntimeError: ') and \
        'encrypted' in str(err.value) and '\n' not in str(err.value)
