import os

import pytest

import dnnlib
from dnnlib.util import _cache_file_name


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    del d.a
    with pytest.raises(AttributeError):
        d.a


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / 'f.bin'
    with dnnlib.atomic_write(path) as f:
        f.write(b'old')
    with pytest.raises(RuntimeError):
        with dnnlib.atomic_write(path) as f:
            f.write(b'partial')
            raise RuntimeError('interrupted')
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['f.bin']  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_open_url_local_file_and_cache(tmp_path, monkeypatch):
    (tmp_path / 'x.txt').write_bytes(b'hello')
    with dnnlib.open_url(str(tmp_path / 'x.txt')) as f:
        assert f.read() == b'hello'
    with dnnlib.open_url((tmp_path / 'x.txt').as_uri()) as f:
        assert f.read() == b'hello'
    # A URL already in the cache is served from disk without any network access.
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    url = 'https://example.invalid/some/file.pkl'
    cache_file = tmp_path / 'cache' / 'downloads' / _cache_file_name(url)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b'cached')
    with dnnlib.open_url(url) as f:
        assert f.read() == b'cached'
    assert dnnlib.open_url(url, return_filename=True) == str(cache_file)


def test_open_url_offline_error_names_url_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    url = 'http://127.0.0.1:9/missing-detector.pkl'  # discard port: refused immediately
    with pytest.raises(OSError) as err:
        dnnlib.open_url(url, timeout=2)
    assert url in str(err.value) and 'local path' in str(err.value)


def test_missing_local_file():
    with pytest.raises(FileNotFoundError, match='nope.pkl'):
        dnnlib.open_url('/tmp/definitely/nope.pkl')


def test_parse_int_list_grammar():
    assert dnnlib.parse_int_list('0-3,7, 10-11') == [0, 1, 2, 3, 7, 10, 11]
    assert dnnlib.parse_int_list('2,2,2') == [2, 2, 2] and dnnlib.parse_int_list('5') == [5]
    assert dnnlib.parse_int_list([1, 2]) == [1, 2]  # already parsed (a preset's list)
    for bad, message in [('3-1', 'empty'), ('a', "'a'"), ('-1', "'-1'"), ('1,,2', "''"), ('1.5', "'1.5'")]:
        with pytest.raises(ValueError, match=message):
            dnnlib.parse_int_list(bad)
