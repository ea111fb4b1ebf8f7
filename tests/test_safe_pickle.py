"""torch_utils/safe_pickle.py: tensors of plain and zip-format files come back exactly; everything not on the
allow-list is refused (or inert), hooks and TorchScript are refused, and bad streams name the file."""
import collections
import io
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch

from torch_utils import safe_pickle

TENSORS = dict(safe_pickle.TENSOR_GLOBALS)


def _sample_state():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {'view': base[:, 1:3], 'base': base, 'param': torch.nn.Parameter(torch.full([2], 0.5)),
            'flags': torch.tensor([True, False, True]), 'index': torch.arange(5),
            'half': torch.ones(3, dtype=torch.bfloat16),
            'nested': collections.OrderedDict(a=torch.zeros(0)), 'size': torch.Size([2, 3]), 'set': {1, 2}}


def _assert_same(loaded, expected):
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert type(loaded[key]) is type(value) and loaded[key].dtype == value.dtype
            assert torch.equal(loaded[key], value) and loaded[key].stride() == value.stride()
        elif isinstance(value, dict):
            _assert_same(loaded[key], value)
        else:
            assert loaded[key] == value


@pytest.mark.parametrize('fmt', ['zip', 'pickle'])
def test_tensors_come_back_exactly(tmp_path, fmt):
    state = _sample_state()
    path = tmp_path / 'state.pt'
    if fmt == 'zip':
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=4))  # storages as nested legacy streams (_load_from_bytes)
    loaded = safe_pickle.load_path(path, TENSORS)
    _assert_same(loaded, state)
    assert loaded['param'].requires_grad and isinstance(loaded['param'], torch.nn.Parameter)
    if fmt == 'zip':  # views share their storage as in the file
        assert loaded['view'].untyped_storage().data_ptr() == loaded['base'].untyped_storage().data_ptr()


def test_numpy_arrays_and_scalars_only_with_numpy_globals(tmp_path):
    data = {'array': np.arange(6, dtype=np.uint8).reshape(2, 3), 'scalar': np.float64(0.5) ** 0.5}
    blob = pickle.dumps(data, protocol=2)
    loaded = safe_pickle.load(io.BytesIO(blob), {**TENSORS, **safe_pickle.NUMPY_GLOBALS}, 'np.pkl')
    assert np.array_equal(loaded['array'], data['array']) and loaded['scalar'] == data['scalar']
    with pytest.raises(pickle.UnpicklingError, match=r'np\.pkl: global numpy\..* is not allowed'):
        safe_pickle.load(io.BytesIO(blob), TENSORS, 'np.pkl')
    objects = pickle.dumps(np.array([None, 1], dtype=object), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"^o\.pkl: numpy dtype 'O8' is not allowed \(only plain numeric"):
        safe_pickle.load(io.BytesIO(objects), {**TENSORS, **safe_pickle.NUMPY_GLOBALS}, 'o.pkl')


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_unknown_globals_are_refused_or_inert(tmp_path):
    marker = tmp_path / 'pwned'
    blob = pickle.dumps({'x': RunsCommand(marker)}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r'^evil\.pkl: global posix\.system is not allowed.*nothing in '
                                                     r'the file was run\)\. trust hint$'):
        safe_pickle.load(io.BytesIO(blob), TENSORS, 'evil.pkl', hint='trust hint')
    tree = safe_pickle.load(io.BytesIO(blob), TENSORS, 'evil.pkl', inert=safe_pickle.InertNode)
    assert isinstance(tree['x'], safe_pickle.InertNode) and tree['x'].args == (f'touch {marker}',)
    assert not marker.exists()


class HookedTensor:
    def __reduce__(self):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # TypedStorage is deprecated; torch still pickles tensors with it
            storage = torch.ones(2).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (2,), (1,), False, collections.OrderedDict(h=1))


class HooksByBuild:
    """A clean tensor, then BUILD with state (requires_grad, _, hooks): Tensor.__setstate__ installs the hooks."""

    def __reduce__(self):
        tensor_args = HookedTensor().__reduce__()[1][:5] + (collections.OrderedDict(),)
        return torch._utils._rebuild_tensor_v2, tensor_args, (False, None, collections.OrderedDict(h=set))


class OutOfBounds:
    def __reduce__(self):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            storage = torch.ones(2).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (100,), (1,), False, collections.OrderedDict())


def test_hooks_and_out_of_bounds_views_are_refused():
    with pytest.raises(pickle.UnpicklingError, match='h.pkl: a tensor carries backward hooks'):
        safe_pickle.load(io.BytesIO(pickle.dumps(HookedTensor(), protocol=4)), TENSORS, 'h.pkl')
    with pytest.raises(pickle.UnpicklingError, match=r'^h\.pkl: BUILD \(setting the state\) of a torch\.Tensor is not '
                                                     r'allowed'):
        safe_pickle.load(io.BytesIO(pickle.dumps({'x': [HooksByBuild()]}, protocol=4)), TENSORS, 'h.pkl')
    with pytest.raises(pickle.UnpicklingError, match=r'b\.pkl: tensor view .* beyond its storage of 2 elements'):
        safe_pickle.load(io.BytesIO(pickle.dumps(OutOfBounds(), protocol=4)), TENSORS, 'b.pkl')
    with pytest.raises(pickle.UnpicklingError, match="only latin1"):
        safe_pickle.encode_latin1('x', 'zlib')


def test_truncated_foreign_and_tampered_files(tmp_path):
    blob = pickle.dumps(_sample_state(), protocol=4)
    for cut in (0, 1, 50, len(blob) // 2, len(blob) - 1):
        with pytest.raises(pickle.UnpicklingError, match=r'^t\.pkl: (the file ends early|not a readable pickle)'):
            safe_pickle.load(io.BytesIO(blob[:cut]), TENSORS, 't.pkl')
    with pytest.raises(pickle.UnpicklingError, match=r"^x: not a pickle or a zip-format torch file \(it starts with "
                                                     r"b'GIF8'\)"):
        safe_pickle.load(io.BytesIO(b'GIF89a...'), TENSORS, 'x')
    path = tmp_path / 'state.pt'
    torch.save({'w': torch.ones(4)}, path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / 'short.pt', 'w') as dst:
        for name in src.namelist():  # the storage loses its last float
            dst.writestr(name, src.read(name)[:-4] if name.endswith('/data/0') else src.read(name))
    with pytest.raises(pickle.UnpicklingError, match=r"short\.pt: storage '0' has 12 bytes, expected 4×4"):
        safe_pickle.load_path(tmp_path / 'short.pt', TENSORS)
    (tmp_path / 'broken.pt').write_bytes(path.read_bytes()[:200])
    with pytest.raises(pickle.UnpicklingError, match=r'broken\.pt: corrupt zip archive'):
        safe_pickle.load_path(tmp_path / 'broken.pt', TENSORS)


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(3.0))

    def forward(self, x):
        return x * self.weight


def test_torchscript_archives_are_refused_or_read_as_data_only(tmp_path):
    path = tmp_path / 'scripted.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(Scaled()), str(path))
    with zipfile.ZipFile(path) as archive:
        assert safe_pickle.is_torchscript(archive.namelist())
    with pytest.raises(pickle.UnpicklingError, match=r'scripted\.pt: is a TorchScript archive .*refusing it'):
        safe_pickle.load_path(path, TENSORS)
    tree = safe_pickle.load_path(path, TENSORS, inert=safe_pickle.InertNode, torchscript_data=True)
    assert torch.equal(tree.state['weight'], torch.arange(3.0))  # the module's data, its code never loaded
    assert not safe_pickle.is_torchscript(['state/data.pkl', 'state/data/0', 'state/version'])


def test_weights_only_failures_become_their_one_line_reason():
    """torch.load(weights_only=True) explains a refusal in a page of advice (found by the fuzzing harness as a
    multi-line error); the project's messages keep only torch's reason."""
    import datetime
    saved = io.BytesIO()
    torch.save({'a': datetime.date(2020, 1, 1)}, saved)
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    assert len(str(err.value).splitlines()) > 3
    reason = safe_pickle.weights_only_reason(err.value)
    assert '\n' not in reason and 'datetime.date' in reason and 'Check the documentation' not in reason, reason


def test_legacy_storage_payload_naming_a_missing_storage_is_one_line():
    """A nested legacy torch.save stream whose key list names a storage it never defined: torch's reader fails
    by AssertionError (found by the fuzzing harness as a traceback)."""
    import re
    import warnings
    saved = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage is deprecated; EDM's pickles hold exactly these
        torch.save(torch.zeros(4).storage(), saved, _use_new_zipfile_serialization=False)
    data = saved.getvalue()
    assert isinstance(safe_pickle.storage_from_legacy_bytes(data), torch.storage.TypedStorage)
    key = re.findall(rb'\d{6,}', data)[0]
    at = data.rfind(key)  # the trailing list of storage keys
    forged = data[:at] + b'9' * len(key) + data[at + len(key):]
    with pytest.raises(pickle.UnpicklingError) as err:
        safe_pickle.storage_from_legacy_bytes(forged)
    assert str(err.value) == f"storage payload: AssertionError: storage key '{'9' * len(key)}' not found in " \
                             f"deserialized_objects"
