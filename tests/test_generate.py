"""generate.py: images equal the library's, layouts, and one-line errors for every expected failure (exit 2 for
usage errors, 1 for failures while running; dnnlib/cli.py)."""
import contextlib
import errno
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from training.checkpoint import load_network
from training.image_grid import image_grid, save_image_grid
from training.sampling import generate_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    result = CliRunner().invoke(generate.main, [str(a) for a in args], catch_exceptions=False, env=env)
    return result.exit_code, result.output


def _error_line(out):
    """The failure is reported as exactly one `Error:` line and no traceback."""
    errors = [line for line in out.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'Traceback' not in out, out
    return errors[0]


def _png(data):
    return np.asarray(PIL.Image.open(io.BytesIO(data)))


def test_image_names():
    assert generate.image_name(1234, subdirs=True) == '001000/001234.png' and generate.image_name(7) == '000007.png'


def test_image_grid_layout(tmp_path):
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones([1, 2, 3, 3], np.uint8) + 1
    grid = image_grid(images)  # ceil(sqrt(5)) = 3 columns, 2 rows, last cell black
    assert grid.shape == (4, 9, 3)
    assert grid[::2, ::3, 0].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert image_grid(torch.from_numpy(images), cols=5).shape == (2, 15, 3)
    save_image_grid(images[:, :, :, :1], tmp_path / 'g.png', cols=1)
    assert np.asarray(PIL.Image.open(tmp_path / 'g.png')).shape == (10, 3)
    with pytest.raises(ValueError, match='extension'):
        save_image_grid(images, tmp_path / 'g.unknown')
    with pytest.raises(ValueError, match='uint8'):
        image_grid(images.astype(np.float32))


def test_cli_heun_writes_seed_pngs_independent_of_batch(fixtures_dir, tmp_path):
    pkl = fixtures_dir / 'edm_edm_adm_cond16.pkl'
    code, out = _run(f'--network={pkl}', '--seeds=0-7', '--steps=18', f'--outdir={tmp_path / "a"}')
    assert code == 0, out
    assert 'heun' in out
    names = [f'{s:06d}.png' for s in range(8)]
    assert sorted(p.name for p in (tmp_path / 'a').iterdir()) == names
    code, out = _run(f'--network={pkl}', '--seeds=0-7', '--steps=18', '--batch=3', f'--outdir={tmp_path / "b"}')
    assert code == 0, out
    for name in names:
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    # The PNGs hold exactly the library's images (checked on two seeds to keep the test fast).
    (_, images), = generate_images(load_network(pkl), [6, 7], num_steps=18)
    for name, image in zip(names[6:], images.numpy()):
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'a' / name)), image)
        assert image.shape == (16, 16, 3)


def test_cli_onestep_zip_subdirs_and_grid(fixtures_dir, tmp_path):
    pkl = fixtures_dir / 'd2o_adm_cond16.pkl'
    zip_path, grid = tmp_path / 'out.zip', tmp_path / 'grid.png'
    code, out = _run(f'--network={pkl}', '--seeds=998-1002', '--subdirs', '--class=3', '--batch=2',
                     f'--outdir={zip_path}', f'--grid={grid}')
    assert code == 0, out
    assert 'onestep' in out and 'Note' not in out
    seeds = list(range(998, 1003))
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted(generate.image_name(s, subdirs=True) for s in seeds)
        pngs = [_png(zf.read(generate.image_name(s, subdirs=True))) for s in seeds]
    assert not [p for p in tmp_path.iterdir() if p.name not in ('out.zip', 'grid.png')]  # no temp/part files
    (_, images), = generate_images(load_network(pkl), seeds, class_idx=3)
    assert np.array_equal(np.stack(pngs), images.numpy())
    # 5 images of 16² → 3 columns × 2 rows, row-major in seed order.
    picture = np.asarray(PIL.Image.open(grid))
    assert picture.shape == (32, 48, 3)
    assert np.array_equal(picture[16:32, 0:16], pngs[3]) and not picture[16:32, 32:48].any()


def test_cli_sampler_choice_is_logged_and_validated(fixtures_dir, tmp_path):
    d2o, edm = fixtures_dir / 'd2o_ncsnpp_uncond16.pkl', fixtures_dir / 'edm_edm_adm_cond16.pkl'
    code, out = _run(f'--network={d2o}', '--sampler=heun', '--steps=2', '--seeds=0', f'--grid={tmp_path / "h.png"}')
    assert code == 0 and 'Note: sampling D2OPrecond with --sampler=heun' in out
    code, out = _run(f'--network={d2o}', '--key=net', '--sampler=multistep', '--steps=3', '--seeds=0-1',
                     f'--grid={tmp_path / "m.png"}')
    assert code == 0 and 'Note' not in out, out
    errors = [
        ([f'--network={edm}', '--seeds=0'], 'give --outdir, --grid, or both'),
        ([f'--network={edm}', '--seeds=1-x'], "'1-x' is not a non-negative integer"),
        ([f'--network={edm}', '--seeds=1,1'], 'more than once'),
        ([f'--network={edm}', '--class=10'], 'out of range: the network has 10 classes'),
        ([f'--network={d2o}', '--class=0'], 'unconditional'),
        ([f'--network={edm}', '--sampler=multistep'], 'multistep needs a D2O generator'),
        ([f'--network={d2o}', '--steps=2'], 'onestep takes exactly 1 step'),
        ([f'--network={d2o}', '--S-churn=1'], '--S-churn: does not apply to --sampler=onestep'),
        ([f'--network={edm}', '--middle-sigma=1'], '--middle-sigma: does not apply to --sampler=heun'),
        ([f'--network={d2o}', '--sampler=multistep', '--steps=3', '--middle-sigma=1'],
         '--middle-sigma: does not apply to --sampler=multistep with 3 steps'),
        ([f'--network={edm}', '--steps=1'], 'heun needs at least 2 steps'),
        ([f'--network={fixtures_dir / "missing.pkl"}'], 'missing.pkl: no such file'),
        ([f'--network={edm}', '--key=net'], "snapshot has no 'net'"),
    ]
    failures_while_running = ('missing.pkl: no such file', "snapshot has no 'net'")  # the rest are usage errors
    for args, message in errors:
        grid = [] if 'give --outdir' in message else [f'--grid={tmp_path / "e.png"}']
        code, out = _run(*args, *grid)
        assert code == (1 if message in failures_while_running else 2) and message in _error_line(out), (args, out)
    assert not (tmp_path / 'e.png').exists()


def test_cli_checks_outputs_seeds_and_device_before_loading(tmp_path):
    # The network does not exist: each error below must come first, proving the check runs before any work.
    missing = tmp_path / 'missing.pkl'
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'dir.zip').mkdir()
    cases = [
        ([f'--grid={tmp_path / "g.xyz"}'], "--grid: " + str(tmp_path / 'g.xyz') + ': unknown image file extension'),
        ([f'--grid={tmp_path / "g.png"}', f'--outdir={tmp_path / "file"}'], 'is an existing file; expected a folder'),
        ([f'--outdir={tmp_path / "dir.zip"}'], 'dir.zip is a folder; expected a .zip file path'),
        ([f'--outdir={tmp_path / "file" / "out"}'], f'{tmp_path / "file"} is a file, not a folder'),
        ([f'--grid={tmp_path / "file" / "g.png"}'], 'Invalid value for --grid'),
        ([f'--grid={tmp_path / "g.png"}', '--seeds=4294967296'], 'seed 4294967296 is out of range'),
        ([f'--grid={tmp_path / "g.png"}', '--device=foo'], "'foo' is not a torch device"),
        ([f'--grid={tmp_path / "g.png"}', '--device=xla'], 'expected a cpu or cuda device'),
        ([f'--grid={tmp_path / "g.png"}', '--seeds=1-x'], "Invalid value for '--seeds'"),
        ([f'--grid={tmp_path / "g.png"}'], f'--network: {missing}: no such file'),
    ]
    if not torch.cuda.is_available():
        cases.append(([f'--grid={tmp_path / "g.png"}', '--device=cuda'], 'CUDA is not available'))
    for args, message in cases:
        code, out = _run(f'--network={missing}', *args)
        assert code == (1 if message.startswith('--network: ') else 2) and message in _error_line(out), (args, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dir.zip', 'file']


def test_cli_bad_network_files_give_one_line(fixtures_dir, tmp_path):
    pkl = fixtures_dir / 'edm_ve_ncsnpp_uncond16.pkl'
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(pkl.read_bytes()[:100_000])
    image = tmp_path / 'picture.pkl'
    PIL.Image.new('RGB', (4, 4)).save(image, format='png')
    tensor = tmp_path / 'tensor.pt'
    torch.save(torch.zeros(3), tensor)
    dataset = tmp_path / 'dataset.zip'
    with zipfile.ZipFile(dataset, 'w') as zf:
        zf.writestr('00000/img00000000.png', b'not really')
    cases = [(truncated, 'truncated.pkl: the file ends early'),
             (image, "picture.pkl: not a pickle or a zip-format torch file (it starts with b'\\x89PNG')"),
             (tensor, 'tensor.pt: expected a snapshot dict, found Tensor'),
             (dataset, 'dataset.zip: zip file without exactly one <root>/data.pkl'),
             ('http://127.0.0.1:9/offline.pkl', 'Cannot download http://127.0.0.1:9/offline.pkl')]
    env = {'DNNLIB_CACHE_DIR': str(tmp_path / 'cache')}
    for network, message in cases:
        code, out = _run(f'--network={network}', f'--grid={tmp_path / "g.png"}', env=env)
        assert code == 1 and message in _error_line(out) and '--network: ' in _error_line(out), (network, out)
    assert not (tmp_path / 'g.png').exists()
    # --debug (or D2O_DEBUG=1) shows the traceback, with the cause.
    for args, env_debug in (([], {'D2O_DEBUG': '1'}), (['--debug'], {})):
        code, out = _run(f'--network={truncated}', f'--grid={tmp_path / "g.png"}', *args, env=env_debug)
        assert code == 1 and 'Traceback' in out and 'UnpicklingError' in out, out


def test_cli_full_disk_is_one_line_and_leaves_no_partial_file(fixtures_dir, tmp_path, monkeypatch):
    written = []

    @contextlib.contextmanager
    def full_disk(path, mode='wb'):
        class Full(io.BytesIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + '.tmp')
        written.append(path)
        yield Full()
    monkeypatch.setattr(generate, 'atomic_write', full_disk)
    code, out = _run(f'--network={fixtures_dir / "d2o_ncsnpp_uncond16.pkl"}', '--seeds=0-1',
                     f'--outdir={tmp_path / "out"}')
    assert code == 1 and 'No space left on device' in _error_line(out) and '--outdir=' in _error_line(out), out
    assert written and not (tmp_path / 'out').exists()


def test_a_seed_range_past_the_limit_is_refused_before_any_list_is_built(tmp_path):
    code, out = _run(f'--network={tmp_path / "missing.pkl"}', '--seeds=0-4294967295', f'--grid={tmp_path / "g.png"}')
    assert code == 2 and _error_line(out) == ("Error: Invalid value for '--seeds': '0-4294967295' lists "
                                              "4,294,967,296 values; at most 10,000,000 are allowed"), out
    # The count comes from the ranges' ends: under 256 MiB of address space (a list of 2^32 ints needs 137 GB).
    code = ('import resource; resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))\n'
            'from dnnlib.util import parse_int_list\ntry:\n    parse_int_list("0-4294967295,7", limit=10**7)\n'
            'except ValueError as err:\n    raise SystemExit(f"Error: {err}")\n')
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.strip() == ("Error: '0-4294967295,7' lists 4,294,967,297 values; "
                                                          "at most 10,000,000 are allowed"), res.stderr
