"""pg_modules/class_embedding.py: the official table (pinned URL, SHA-256, download cache, offline error), read
without running code and equal to an independent read; the resolver's three kinds of spec."""
import collections
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dnnlib import util
from pg_modules import class_embedding as ce

OFFICIAL_FILE = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures' / 'in_embeddings' / \
    'tf_efficientnet_lite0.pkl'


def official_file():
    if not OFFICIAL_FILE.is_file():
        pytest.skip(f'{OFFICIAL_FILE} not found: the shared fixtures are not checked out beside this repo')
    return OFFICIAL_FILE


class _IndependentReader(pickle.Unpickler):
    """A second, minimal reader of the official file: torch's own rebuilders and a real nn.Embedding."""
    GLOBALS = {('collections', 'OrderedDict'): collections.OrderedDict,
               ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
               ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
               ('torch.storage', '_load_from_bytes'): lambda b: torch.load(io.BytesIO(b), weights_only=True),
               ('torch.nn.modules.sparse', 'Embedding'): torch.nn.Embedding,
               ('dill._dill', '_load_type'): lambda name: {'set': set}[name]}

    def find_class(self, module, name):
        return self.GLOBALS[module, name]


def _in_cache(tmp_path, monkeypatch, source):
    """Put `source` where open_url looks for the official URL in a fresh cache dir."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    cached = Path(util.make_cache_dir_path('downloads', util._cache_file_name(ce.OFFICIAL_URL)))
    cached.parent.mkdir(parents=True)
    shutil.copyfile(source, cached)
    return cached


def test_official_table_equals_an_independent_read():
    path = official_file()
    assert ce.sha256_of(path) == ce.OFFICIAL_SHA256
    table = ce.load_class_embedding(path)
    with open(path, 'rb') as f:
        reference = _IndependentReader(f).load()['embed'].weight.detach()
    assert table.shape == (1000, 320) and table.dtype == torch.float32 and torch.equal(table, reference)
    # Golden first values (class 0 and 1), and structure unlike N(0,1) rows: a shared mean direction.
    expected = torch.tensor([[-0.5723, 1.1751, -1.0622, 1.5790, 0.7581, -0.6983],
                             [1.2732, -0.9341, -1.0435, 0.5170, 1.8259, 0.3724]])
    assert torch.allclose(table[:2, :6], expected, atol=1e-4)
    assert table.mean(0).abs().mean() > 0.15  # random 1000x320 N(0,1): about 0.025


def test_official_url_is_pinned():
    assert ce.OFFICIAL_URL == ('https://raw.githubusercontent.com/Zyriix/D2O/9f8124de0ee48ddfcad6ced7101fae6b9f8c1380/'
                               'in_embeddings/tf_efficientnet_lite0.pkl')


def test_official_table_comes_from_the_download_cache(tmp_path, monkeypatch):
    _in_cache(tmp_path, monkeypatch, official_file())
    table, info = ce.resolve_class_embedding(None, 10, log=lambda msg: None)
    assert torch.equal(table, ce.load_class_embedding(OFFICIAL_FILE))
    assert info.startswith('official ' + ce.OFFICIAL_URL) and '1000×320' in info
    assert torch.equal(ce.resolve_class_embedding('official', 1000)[0], table)


def test_tampered_cached_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / 'fake.pkl'
    fake.write_bytes(b'not the official table')
    cached = _in_cache(tmp_path, monkeypatch, fake)
    with pytest.raises(ValueError, match=f'{cached}.*SHA-256 [0-9a-f]{{64}}, expected {ce.OFFICIAL_SHA256}'):
        ce.load_official_class_embedding()


def test_offline_without_the_file_names_the_url_and_the_option(monkeypatch):
    def offline(url, **kwargs):
        assert url == ce.OFFICIAL_URL
        raise OSError(f'Cannot download {url}: ConnectionError')
    monkeypatch.setattr(ce.util, 'open_url', offline)
    with pytest.raises(FileNotFoundError, match=r'(?s)Cannot download https://raw\.githubusercontent\.com/Zyriix/D2O/'
                                                r'9f8124de.*--d-embedding=PATH'):
        ce.resolve_class_embedding(None, 10)


def test_random_rows_are_an_explicit_logged_choice():
    logged = []
    table, info = ce.resolve_class_embedding('random', 10, log=logged.append,
                                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(table, torch.randn(1000, 320, generator=torch.Generator().manual_seed(3)))
    assert 'random N(0,1)' in info and '--d-embedding=random' in info
    assert len(logged) == 1 and logged[0].startswith('WARNING') and 'RANDOM' in logged[0]
    assert ce.resolve_class_embedding('random', 1500)[0].shape == (1500, 320)


def test_file_specs_and_unconditional(tmp_path):
    torch.save(torch.ones(12, 320), tmp_path / 'e.pt')
    table, info = ce.resolve_class_embedding(str(tmp_path / 'e.pt'), 12)
    assert torch.equal(table, torch.ones(12, 320)) and info == f'file {tmp_path / "e.pt"} (12×320)'
    with pytest.raises(ValueError, match='12 rows but c_dim=13'):
        ce.resolve_class_embedding(str(tmp_path / 'e.pt'), 13)
    assert ce.resolve_class_embedding(None, 0) == (None, None)
    for spec in ('random', 'official', str(tmp_path / 'e.pt')):
        with pytest.raises(ValueError, match='unconditional'):
            ce.resolve_class_embedding(spec, 0)
    with pytest.raises(FileNotFoundError, match='no such file'):
        ce.resolve_class_embedding(str(tmp_path / 'missing.pkl'), 10)
