"""Hostile datasets and conversions (issue 12 items 3, 8, 9, 10): each attack ends in one clear line naming
the file/option, exit status 1 and nothing lost; images and labels that can be read are read correctly."""
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training import dataset as dataset_module
from training.dataset import ImageFolderDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv('D2O_DEBUG', raising=False)  # a developer's D2O_DEBUG=1 would turn errors into tracebacks


def run(*args):
    return CliRunner().invoke(dataset_tool.cli, list(args))


def error_line(res, *fragments):
    """The single `Error: ...` line of an expected failure (exit 1, no traceback), checked for `fragments`."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert 'Traceback' not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1, res.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def png_bytes(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png')
    return buf.getvalue()


def write_images(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(arrays):
        (folder / f'{i:02d}.png').write_bytes(png_bytes(arr))


def zip_dataset(path, images, labels_json=None):
    """An EDM-layout zip with the given PNG bytes and raw dataset.json contents."""
    with zipfile.ZipFile(path, 'w') as zf:
        for i, data in enumerate(images):
            zf.writestr(f'00000/img{i:08d}.png', data)
        if labels_json is not None:
            zf.writestr('dataset.json', labels_json)
    return path


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


def good_images(n=3):
    return [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(n)]


# --- --force and overlapping destinations never lose data (12.3) -----------------------------------------

@pytest.mark.parametrize('dest_name', ['old.zip', 'old-folder'])
def test_force_with_failing_conversion_keeps_the_old_dataset(tmp_path, dest_name):
    write_images(tmp_path / 'good', good_images())
    dest = tmp_path / dest_name
    assert run('convert', f'--source={tmp_path / "good"}', f'--dest={dest}').exit_code == 0
    before = {p: p.read_bytes() for p in ([dest] if dest.is_file() else sorted(dest.rglob('*.*')))}
    write_images(tmp_path / 'bad', good_images())
    noise = png_bytes(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / 'bad' / '01.png').write_bytes(noise[:len(noise) // 2])  # truncated mid-file
    error_line(run('convert', f'--source={tmp_path / "bad"}', f'--dest={dest}', '--force'), '01.png')
    assert {p: p.read_bytes() for p in before} == before and len(ImageFolderDataset(dest)) == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]


def test_force_replaces_a_dataset_only_when_the_new_one_is_complete(tmp_path):
    write_images(tmp_path / 'a', good_images(3))
    write_images(tmp_path / 'b', good_images(5))
    dest = tmp_path / 'out'
    assert run('convert', f'--source={tmp_path / "a"}', f'--dest={dest}').exit_code == 0
    assert run('convert', f'--source={tmp_path / "b"}', f'--dest={dest}', '--force').exit_code == 0
    assert len(ImageFolderDataset(dest)) == 5 and not [p for p in os.listdir(tmp_path) if p.startswith('.')]


@pytest.mark.parametrize('dest_of', [lambda src: src, lambda src: src / 'out.zip', lambda src: src / 'sub',
                                     lambda src: src.parent])
def test_destination_overlapping_the_source_is_refused_and_nothing_deleted(tmp_path, dest_of):
    src = tmp_path / 'src'
    write_images(src, good_images())
    (tmp_path / 'unrelated.txt').write_text('keep me')
    before = listing(tmp_path)
    error_line(run('convert', f'--source={src}', f'--dest={dest_of(src)}', '--force'), '--dest=', '--source=')
    assert listing(tmp_path) == before and (tmp_path / 'unrelated.txt').read_text() == 'keep me'


def test_zip_source_as_its_own_destination_is_refused(tmp_path):
    zip_dataset(tmp_path / 'd.zip', [png_bytes(img) for img in good_images()])
    before = (tmp_path / 'd.zip').read_bytes()
    error_line(run('convert', f'--source={tmp_path / "d.zip"}', f'--dest={tmp_path / "d.zip"}', '--force'), 'd.zip')
    assert (tmp_path / 'd.zip').read_bytes() == before


def test_force_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    write_images(tmp_path / 'src', good_images())
    home = tmp_path / 'home'
    (home / 'docs').mkdir(parents=True)
    (home / 'docs' / 'thesis.tex').write_text('years of work')
    error_line(run('convert', f'--source={tmp_path / "src"}', f'--dest={home}', '--force'), 'docs/thesis.tex',
               'not part of an EDM dataset')
    assert (home / 'docs' / 'thesis.tex').read_text() == 'years of work'


# --- images (12.9) -----------------------------------------------------------------------------------------

def test_16_bit_png_is_scaled_not_white(tmp_path):
    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4  # 8-bit levels 0..252
    wide = levels * 257  # their exact 16-bit encodings
    wide[0, 0], wide[0, 1] = 65535, 128  # 255 and round(128 / 257) = 0
    zip_dataset(tmp_path / 'w.zip', [png_bytes(wide)] * 2)
    ds = ImageFolderDataset(tmp_path / 'w.zip')
    expected = levels.astype(np.uint8)
    expected[0, 0], expected[0, 1] = 255, 0
    assert ds.num_channels == 1
    np.testing.assert_array_equal(ds[0][0][0], expected)
    res = run('convert', f'--source={tmp_path / "w.zip"}', f'--dest={tmp_path / "c.zip"}')
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(ImageFolderDataset(tmp_path / 'c.zip')[1][0][0], expected)


def png16_rgb_bytes(values):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), chunk by chunk as the PNG spec lays it out."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    h, w, _ = values.shape
    rows = b''.join(b'\x00' + values[y].astype('>u2').tobytes() for y in range(h))  # filter type 0 per row
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def test_16_bit_rgb_png_keeps_its_levels(tmp_path):
    levels = np.random.default_rng(4).integers(0, 256, (4, 5, 3))
    zip_dataset(tmp_path / 'rgb16.zip', [png16_rgb_bytes(levels * 257)])
    ds = ImageFolderDataset(tmp_path / 'rgb16.zip')
    assert ds.num_channels == 3
    np.testing.assert_array_equal(ds[0][0], levels.transpose(2, 0, 1))


def test_rgba_palette_and_la_convert_with_one_warning_per_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, '_warned_modes', set())
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (4, 8, 8, 4), dtype=np.uint8)
    zip_dataset(tmp_path / 'a.zip', [png_bytes(img) for img in rgba])
    with pytest.warns(UserWarning, match='mode RGBA converted to RGB .alpha dropped') as record:
        ds = ImageFolderDataset(tmp_path / 'a.zip')
        images = [ds[i][0] for i in range(len(ds))]
    assert len(record) == 1  # four RGBA images (checked and read): one warning
    for img, src in zip(images, rgba):
        np.testing.assert_array_equal(img, src[:, :, :3].transpose(2, 0, 1))
    gray_alpha = np.stack([np.full((8, 8), 77, np.uint8), np.zeros((8, 8), np.uint8)], axis=2)
    zip_dataset(tmp_path / 'la.zip', [png_bytes(gray_alpha)])
    with pytest.warns(UserWarning, match='mode LA converted to gray'):
        la = ImageFolderDataset(tmp_path / 'la.zip')
    assert la.num_channels == 1 and int(la[0][0][0, 3, 3]) == 77
    pal = PIL.Image.fromarray(rgba[0, :, :, :3]).convert('P')
    buf = io.BytesIO()
    pal.save(buf, format='png')
    zip_dataset(tmp_path / 'p.zip', [buf.getvalue()])
    with pytest.warns(UserWarning, match='mode P converted to RGB'):
        p = ImageFolderDataset(tmp_path / 'p.zip')
    np.testing.assert_array_equal(p[0][0], np.asarray(pal.convert('RGB')).transpose(2, 0, 1))


def test_truncated_image_is_found_up_front(tmp_path):
    data = png_bytes(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    zip_dataset(tmp_path / 't.zip', [data, data[:len(data) // 2], data])
    with pytest.raises(ValueError, match=r't.zip: 00000/img00000001.png: cannot decode image'):
        ImageFolderDataset(tmp_path / 't.zip')  # the header alone is intact: only decoding finds it
    error_line(run('convert', f'--source={tmp_path / "t.zip"}', f'--dest={tmp_path / "o.zip"}'),
               'img00000001.png', 'cannot decode')
    assert not (tmp_path / 'o.zip').exists()


# --- labels (12.10) ----------------------------------------------------------------------------------------

def bad_label_files():
    names = [f'00000/img{i:08d}.png' for i in range(2)]
    return {
        'flat list': ([0, 1], ['list of [file name, label] pairs']),
        'dict': ({names[0]: 0, names[1]: 1}, ['got a dict']),
        'huge class': ([[names[0], 0], [names[1], 10 ** 9]], ['class label 1000000000 of', names[1],
                                                             'not below 100,000']),
        'negative class': ([[names[0], -3], [names[1], 1]], ['class label -3 of', names[0], 'is negative']),
        'NaN': ([[names[0], 0], [names[1], float('nan')]], [f'{names[1]} is NaN']),
        'NaN vector': ([[names[0], [0.5, 1]], [names[1], [float('nan'), 1]]], [f'{names[1]} is [NaN, 1]']),
        'float class': ([[names[0], 1.0], [names[1], 2]], [f'{names[0]} is 1.0']),
        'bool': ([[names[0], True], [names[1], 0]], [f'{names[0]} is true']),
        'ragged vectors': ([[names[0], [1, 2]], [names[1], [1]]], ['share one length']),
        'mixed kinds': ([[names[0], 1], [names[1], [0, 1]]], [f'{names[1]} is [0, 1]', 'class index 1']),
    }


@pytest.mark.parametrize('kind', list(bad_label_files()))
def test_bad_labels_are_clear_errors_at_load(tmp_path, kind):
    labels, fragments = bad_label_files()[kind]
    path = zip_dataset(tmp_path / 'l.zip', [png_bytes(img) for img in good_images(2)],
                       json.dumps({'labels': labels}))
    with pytest.raises(ValueError, match='l.zip: dataset.json') as err:
        ImageFolderDataset(path, use_labels=True)
    assert all(fragment in str(err.value) for fragment in fragments), str(err.value)
    # The converter refuses the same labels instead of writing a dataset the loader would refuse.
    error_line(run('convert', f'--source={path}', f'--dest={tmp_path / "o.zip"}'), *fragments)
    assert not (tmp_path / 'o.zip').exists()


def test_valid_labels_still_load(tmp_path):
    names = [f'00000/img{i:08d}.png' for i in range(3)]
    path = zip_dataset(tmp_path / 'v.zip', [png_bytes(img) for img in good_images()],
                       json.dumps({'labels': [[names[0], 2], [names[1], 0], [names[2], 99_999]]}))
    ds = ImageFolderDataset(path, use_labels=True)
    assert ds.label_dim == 100_000 and int(ds[0][1].argmax()) == 2 and ds[2][1][99_999] == 1 and ds[2][1].sum() == 1


def test_folder_labels_with_an_image_outside_any_class_folder(tmp_path):
    src = tmp_path / 'src'
    write_images(src / 'cat', good_images(2))
    (src / 'stray.png').write_bytes(png_bytes(good_images(1)[0]))
    error_line(run('convert', f'--source={src}', f'--dest={tmp_path / "o.zip"}', '--folder-labels'),
               '--folder-labels', 'stray.png', 'not in a class sub-folder')
    assert not (tmp_path / 'o.zip').exists()


# --- the command line itself (12.8) ------------------------------------------------------------------------

def test_cli_failure_is_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / 'src').mkdir()
    (tmp_path / 'src' / 'x.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
    cmd = [sys.executable, 'dataset_tool.py', 'convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "o.zip"}']
    env = dict(os.environ, D2O_DEBUG='0')
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in res.stderr.splitlines() if line.startswith('Error: ')]
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert len(lines) == 1 and 'x.png: cannot decode image' in lines[0]
    debug = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(env, D2O_DEBUG='1'))
    assert debug.returncode == 1 and 'Traceback' in debug.stderr and 'x.png' in debug.stderr


def test_corrupt_cifar_tarball_is_named(tmp_path):
    bad = tmp_path / 'cifar-10-python.tar.gz'
    bad.write_bytes(b'\x1f\x8b' + b'not really gzip' * 10)
    error_line(run('convert', f'--source={bad}', f'--dest={tmp_path / "c.zip"}'), str(bad), 'CIFAR-10 python tarball')
    assert not (tmp_path / 'c.zip').exists()


def test_debug_flag_lets_the_exception_through(tmp_path):
    (tmp_path / 'src').mkdir()
    (tmp_path / 'src' / 'x.png').write_bytes(b'junk')
    res = run('--debug', 'convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "o.zip"}')
    assert isinstance(res.exception, ValueError) and 'x.png: cannot decode image' in str(res.exception)


def test_cli_warns_once_per_mode_in_one_plain_line(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, '_warned_modes', set())
    write_images(tmp_path / 'src', [np.full((8, 8, 4), 50, np.uint8)] * 3)
    res = run('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "o.zip"}')
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.replace('\r', '\n').splitlines() if line.startswith('Warning: ')]
    assert len(warned) == 1 and '00.png: image mode RGBA converted to RGB (alpha dropped)' in warned[0]
    assert 'UserWarning' not in res.output
    np.testing.assert_array_equal(ImageFolderDataset(tmp_path / 'o.zip')[2][0], np.full((3, 8, 8), 50, np.uint8))


# --- files that are not images: FIFOs, devices, zip bombs; inconsistent labels --------------------------------

def bounded(code, limit_mib=256, timeout=60):
    """Run `code` in a fresh interpreter under an address-space limit: (exit status, stderr). An unbounded read
    would end in MemoryError there; a blocking one in the timeout (which fails the test)."""
    prelude = f'import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_mib} << 20, {limit_mib} << 20))\n'
    res = subprocess.run([sys.executable, '-c', prelude + code], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    return res.returncode, res.stderr


def open_dataset_code(path):
    return (f'from training.dataset import ImageFolderDataset\ntry:\n    ImageFolderDataset({str(path)!r})\n'
            f'except ValueError as err:\n    raise SystemExit(f"Error: {{err}}")\n')


def test_fifo_and_dev_zero_are_refused_unread(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'a.png').write_bytes(png_bytes(good_images(1)[0]))
    os.mkfifo(src / 'fifo.png')  # reading it would wait forever for a writer
    code, err = bounded(open_dataset_code(src))
    assert code == 1 and err.strip() == f'Error: {src}: fifo.png: not a regular file (a FIFO, device or socket?); ' \
                                        'expected an image file', err
    res = subprocess.run([sys.executable, 'dataset_tool.py', 'convert', f'--source={src}',
                          f'--dest={tmp_path / "o.zip"}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.startswith('Error: ')]
    assert res.returncode == 1 and len(lines) == 1 and 'fifo.png: not a regular file' in lines[0], res.stderr
    assert not (tmp_path / 'o.zip').exists()
    os.remove(src / 'fifo.png')
    os.symlink('/dev/zero', src / 'zero.png')  # never ends: read whole, it exhausts memory
    code, err = bounded(open_dataset_code(src))
    assert code == 1 and 'zero.png: not a regular file' in err and 'MemoryError' not in err, err


def test_zip_member_inflating_past_the_cap_is_refused_before_inflating(tmp_path):
    bomb = tmp_path / 'bomb.zip'
    info = zipfile.ZipInfo('00000/img00000000.png')
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(bomb, 'w') as zf, zf.open(info, 'w', force_zip64=True) as member:
        for _ in range(80):  # 80 MiB of zeros in 80 KB, more than MAX_IMAGE_BYTES (64 MiB)
            member.write(bytes(1 << 20))
    code, err = bounded(open_dataset_code(bomb), limit_mib=192)  # the interpreter needs ~150 MiB
    assert code == 1 and err.strip() == f'Error: {bomb}: 00000/img00000000.png: inflates to 83,886,080 bytes; ' \
        'at most 67,108,864 are read per member', err
    error_line(run('convert', f'--source={bomb}', f'--dest={tmp_path / "o.zip"}'), 'inflates to 83,886,080 bytes')


def test_zip_member_declaring_more_compressed_bytes_than_the_archive_is_refused_before_reading(tmp_path):
    """A 1 KB zip whose stored member declares 4 GiB of compressed bytes: zipfile's read reserves the declared
    size first (found by the fuzzing harness, docs/fuzzing.md)."""
    forged = tmp_path / 'forged.zip'
    zip_dataset(forged, [png_bytes(img) for img in good_images()])
    data = bytearray(forged.read_bytes())
    central = data.find(b'PK\x01\x02')  # first central-directory entry: compressed size at offset 20
    data[central + 20:central + 24] = (0xFFFFFFFE).to_bytes(4, 'little')
    forged.write_bytes(bytes(data))
    code, err = bounded(open_dataset_code(forged), limit_mib=192)
    assert code == 1 and err.strip() == (f'Error: {forged}: 00000/img00000000.png: declares 4,294,967,294 '
                                         f'compressed bytes in an archive of {len(data):,} bytes'), err


def test_file_names_with_control_characters_are_refused(tmp_path):
    """A member named '00\\n00/img.png' split every message naming it over two lines (found by fuzzing)."""
    path = tmp_path / 'names.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('00\n00/img00000000.png', png_bytes(good_images()[0]))
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(path)
    assert str(err.value) == (f"{path}: file name '00\\n00/img00000000.png' has control characters; expected plain "
                              f"file names")


def test_dataset_json_with_a_duplicate_or_a_stray_label_is_refused(tmp_path):
    images = good_images(2)
    for labels, message in (([['a.png', 0], ['a.png', 1], ['b.png', 0]],
                             'dataset.json lists a.png twice; expected one label per image'),
                            ([['a.png', 0], ['b.png', 1], ['c.png', 1]],
                             'dataset.json has a label for c.png, which is not an image of the dataset')):
        src = tmp_path / f'src{len(message)}'
        src.mkdir()
        for name, image in zip(('a.png', 'b.png'), images):
            (src / name).write_bytes(png_bytes(image))
        (src / 'dataset.json').write_text(json.dumps({'labels': labels}))
        with pytest.raises(ValueError) as info:
            ImageFolderDataset(src, use_labels=True)
        assert str(info.value) == f'{src}: {message}' + ('' if 'twice' in message else ' (1 such label(s))')
        error_line(run('convert', f'--source={src}', f'--dest={tmp_path / "o.zip"}'), str(src), message)
