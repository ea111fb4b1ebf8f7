"""Attacks on the restricted unpickler through allow-listed globals (docs/threat-model.md): each is refused with one
line naming the file, no signal, bounded memory (RLIMIT_AS in a subprocess) and bounded work (opcode and node
budgets, asserted by lowering them, never by timing). Loads that crashed the interpreter before run in a
subprocess."""
import collections
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import torch

import dnnlib
from metrics import detector
from torch_utils import safe_pickle
from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTIARRAY = safe_pickle._multiarray()
NUMPY = {**safe_pickle.TENSOR_GLOBALS, **safe_pickle.NUMPY_GLOBALS}


class Reduce:
    """Pickles as whatever `__reduce__` tuple it is given: (callable, args[, state, listitems, dictitems])."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def flagless_object_dtype():
    """An object dtype whose BUILD clears its flags: numpy then believes it holds no PyObject pointers."""
    return Reduce(np.dtype, ('O8', False, True), (3, '|', None, None, None, -1, -1, 0))


def dtype_attack(kind):
    raw = struct.pack('<Q', 0x4141414141414141)  # read as a PyObject* by numpy
    if kind == 'scalar':
        return Reduce(MULTIARRAY.scalar, (flagless_object_dtype(), raw))
    return Reduce(MULTIARRAY._reconstruct, (np.ndarray, (0,), b'b'), (1, (1,), flagless_object_dtype(), False, raw))


def storage_of(values):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage is deprecated; torch still pickles tensors with it
        return torch.tensor(values).storage()


def tensor_reduce(*extra):
    return Reduce(torch._utils._rebuild_tensor_v2, (storage_of([1.0, 2.0]), 0, (2,), (1,), False,
                                                     collections.OrderedDict()), *extra)


def nested_shared_lists(levels):
    """{'x': L} with L_k+1 = [L_k, L_k]: 9 bytes per level, 2**levels paths (docs/threat-model.md §1)."""
    ops = [b'\x80\x02}X\x01\x00\x00\x00x]q\x000']
    for k in range(levels):  # MARK BINGET k BINGET k LIST BINPUT k+1 POP
        ops.append(bytes([0x28, 0x68, k, 0x68, k, 0x6c, 0x71, k + 1, 0x30]))
    return b''.join(ops) + bytes([0x68, levels]) + b's.'


def shared_dicts(levels):
    """{'a': D, 'b': D} nested `levels` deep with a tensor-free leaf: 2**levels paths for a naive walk."""
    ops = [b'\x80\x02}q\x00']
    for k in range(levels):
        ops.append(bytes([0x7d, 0x71, k + 1, 0x28]) + b'X\x01\x00\x00\x00a' + bytes([0x68, k])
                   + b'X\x01\x00\x00\x00b' + bytes([0x68, k, 0x75]))
    return b''.join(ops) + b'.'


LOADERS = {  # name -> call of the loader in a subprocess, as the CLIs call them
    'snapshot': 'checkpoint.load_snapshot(path)',
    'numpy': 'dataset_tool.load_numpy_pickle(open(path, "rb"), path)',
    'detector': 'detector.read_detector_state_dict(path)',
}
SUBPROCESS = '''
import pickle, resource, sys
import dataset_tool
from metrics import detector
from training import checkpoint
headroom, refused = int(sys.argv[1]), False
if headroom:  # address space: what the imports took + headroom
    size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
for path, call in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        eval(call)
        print('loaded')
    except (ValueError, pickle.UnpicklingError) as err:
        print(str(err))
        refused = True
sys.exit(1 if refused else 0)
'''


def load_in_subprocess(loads, headroom_mib=0):
    """(return code, one stdout line per load, stderr) of [(loader, path), ...] run in a fresh interpreter (a
    crash shows as a signal); exit status 1 when any load was refused."""
    args = [str(headroom_mib << 20)] + [item for loader, path in loads for item in (str(path), LOADERS[loader])]
    result = subprocess.run([sys.executable, '-c', SUBPROCESS, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout.splitlines(), result.stderr

# ----------------------------------------------------------------------------------------------
# Memory corruption through numpy dtypes.

def test_dtype_whose_build_clears_flags_is_refused_without_a_crash(tmp_path):
    loads = []
    for kind in ('scalar', 'array'):
        path = tmp_path / f'{kind}.pkl'
        path.write_bytes(pickle.dumps({'ema': dtype_attack(kind)}, protocol=4))
        loads += [('snapshot', path), ('numpy', path)]
    code, lines, stderr = load_in_subprocess(loads)
    assert code == 1, (code, stderr)  # not -11 (SIGSEGV)
    assert lines == [f"{path}: numpy dtype 'O8' is not allowed (only plain numeric types: b1, i1, i2, i4, i8, u1, "
                     f"u2, u4, u8, f2, f4, f8, c8, c16)" for _, path in loads]


def test_generate_cli_reports_the_dtype_attack_in_one_line(tmp_path):
    path = tmp_path / 'network.pkl'
    path.write_bytes(pickle.dumps({'ema': dtype_attack('scalar')}, protocol=4))
    result = subprocess.run([sys.executable, 'generate.py', f'--network={path}', f'--outdir={tmp_path / "out"}',
                             '--seeds=0'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1 and "numpy dtype 'O8' is not allowed" in lines[0] and 'Traceback' not in result.stderr


def test_cifar_batch_with_the_dtype_attack_is_refused_by_convert(tmp_path):
    batch = pickle.dumps({'data': dtype_attack('array'), 'labels': [0]}, protocol=2)
    source = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(source, 'w:gz') as tar:
        for b in range(1, 6):
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{b}')
            info.size = len(batch)
            tar.addfile(info, io.BytesIO(batch))
    result = subprocess.run([sys.executable, 'dataset_tool.py', 'convert', f'--source={source}',
                             f'--dest={tmp_path / "out.zip"}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert "numpy dtype 'O8' is not allowed" in result.stderr.strip().splitlines()[-1]


def load_numpy(obj, protocol=4):
    blob = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol)
    return safe_pickle.load(io.BytesIO(blob), NUMPY, 'np.pkl')


def test_numpy_only_plain_dtypes_with_validated_state():
    for array in (np.arange(6, dtype=np.int16).reshape(2, 3), np.ones((2, 2), '>f4'), np.zeros(1, np.complex64),
                  np.zeros((0, 3), np.uint8), np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array([True, False])):
        for protocol in (2, 4) if array.size else (4,):  # protocol 2 writes b'' as a call of bytes
            loaded, by_numpy = load_numpy(array, protocol), pickle.loads(pickle.dumps(array, protocol=protocol))
            assert loaded.dtype == by_numpy.dtype and np.array_equal(loaded, array)  # numpy makes '>f4' native
            assert loaded.strides == by_numpy.strides
    python2 = Reduce(MULTIARRAY._reconstruct, (np.ndarray, (0,), 'b'),  # as CIFAR-10's batches hold arrays
                     (1, (2,), Reduce(np.dtype, ('u1', 0, 1), (3, '|', None, None, None, -1, -1, 0)), False, 'ab'))
    assert load_numpy(python2, 2).tolist() == [97, 98]
    refusals = [
        (Reduce(np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 63)),
         r"numpy dtype state \(3, '<', None, None, None, -1, -1, 63\) is not the plain state of f8"),
        (Reduce(np.dtype, ('f8', False, True), (3, '<', None, ('a',), None, 8, 1, 0)),
         'numpy dtype state .* is not the plain state of f8'),
        (np.zeros(2, 'V8'), r"numpy dtype 'V8' is not allowed"),
        (np.zeros(2, [('a', 'i4')]), r"numpy dtype 'V4' is not allowed"),
        (np.zeros(2, 'U3'), r"numpy dtype 'U3' is not allowed"),
        (Reduce(MULTIARRAY._reconstruct, (np.ndarray, (0,), b'b'), (1, (1000,), np.dtype('f8'), False, b'x' * 8)),
         r'numpy array of shape \(1000,\) and dtype f8 has 8 bytes of data, expected 8000'),
        (Reduce(MULTIARRAY._reconstruct, (np.ndarray, (0,), b'b'), (1, (2,), np.dtype('f8'), False, [1.0, 2.0])),
         'numpy array data is a list, not raw bytes'),
        (Reduce(MULTIARRAY._reconstruct, (np.ndarray, (10 ** 6, 10 ** 6), b'b')), 'refusing numpy _reconstruct'),
        (Reduce(MULTIARRAY.scalar, (np.dtype('f8'), b'\x00' * 4)), 'numpy scalar of dtype f8 has 4 bytes, expected 8'),
        (Reduce(MULTIARRAY.scalar, (np.dtype('O'), 1)), "numpy dtype 'O8' is not allowed"),
        (b'\x80\x02cnumpy\nndarray\nJ\x40\x42\x0f\x00\x85\x81.',  # NEWOBJ numpy.ndarray(1000000)
         r'NEWOBJ \(creating an instance\) of numpy.ndarray is not allowed'),
    ]
    for obj, message in refusals:
        with pytest.raises(pickle.UnpicklingError, match=r'^np\.pkl: ' + message):
            load_numpy(obj)

# ----------------------------------------------------------------------------------------------
# BUILD and item opcodes on allow-listed objects.

def test_build_only_on_records_numpy_and_inert_nodes():
    getattr_before = dnnlib.EasyDict.__getattr__
    attempts = [
        (tensor_reduce((storage_of([1.0, 2.0]), 0, (10 ** 6,), (1,))), 'torch.Tensor'),  # set_ past the storage
        (Reduce(dnnlib.EasyDict, (), {'__getattr__': set}), 'dnnlib.util.EasyDict'),
        (Reduce(collections.OrderedDict, (), {'items': set}), 'collections.OrderedDict'),
        (Reduce(torch.Size, ([2],), {'x': 1}), 'torch.Size'),
        (Reduce(set, ([1],), {'x': 1}), 'builtins.set'),
    ]
    for obj, name in attempts:
        with pytest.raises(pickle.UnpicklingError, match=rf'^b\.pkl: BUILD \(setting the state\) of a {name} is not '
                                                        rf'allowed \(only of records, numpy arrays and dtypes\)'):
            safe_pickle.load(io.BytesIO(pickle.dumps([obj], protocol=4)),
                             {**checkpoint.SNAPSHOT_GLOBALS, ('builtins', 'set'): set}, 'b.pkl')
    assert dnnlib.EasyDict.__getattr__ is getattr_before
    state_dict = torch.nn.Linear(2, 2).state_dict()  # an OrderedDict whose BUILD holds only `_metadata`
    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(state_dict, protocol=2)), safe_pickle.TENSOR_GLOBALS, 's')
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_item_and_list_opcodes_only_on_containers():
    cases = [(tensor_reduce(None, None, iter([(0, 5.0)])), 'SETITEMS? on a torch.Tensor'),
             (tensor_reduce(None, iter([5.0])), 'APPENDS? on a torch.Tensor')]
    for obj, message in cases:
        with pytest.raises(pickle.UnpicklingError, match=r'^i\.pkl: ' + message):
            safe_pickle.load(io.BytesIO(pickle.dumps(obj, protocol=4)), checkpoint.SNAPSHOT_GLOBALS, 'i.pkl')
    streams = [(b'\x80\x02ctorch.nn.modules.container\nModuleDict\n)\x81X\x01\x00\x00\x00kK\x01s.',
                'SETITEM on a training.checkpoint._ModuleDictRecord is not allowed'),
               (b'\x80\x02ctorch\nSize\n)\x81.', r'NEWOBJ \(creating an instance\) of torch.Size is not allowed'),
               (b'\x80\x02(icollections\nOrderedDict\n.', r'opcode i is not allowed \(protocol-0 class instances\)'),
               (b'\x80\x02\x82\x01.', r'opcode \x82 is not allowed \(extension registry\)'),
               (b'\x80\x05\x96' + struct.pack('<Q', 1 << 40) + b'.', r'opcode \x96 is not allowed')]
    for blob, message in streams:
        with pytest.raises(pickle.UnpicklingError, match=r'^s\.pkl: ' + message):
            safe_pickle.load(io.BytesIO(blob), checkpoint.SNAPSHOT_GLOBALS, 's.pkl')

# ----------------------------------------------------------------------------------------------
# Tiny files, huge cost.

def test_shared_and_cyclic_data_cost_their_size(tmp_path):
    path = tmp_path / 'lists.pkl'
    path.write_bytes(nested_shared_lists(60))
    assert len(path.read_bytes()) < 600
    code, lines, stderr = load_in_subprocess([('snapshot', path), ('detector', path)], headroom_mib=512)
    assert (code, lines) == (1, ['loaded', f'{path}: no FID Inception weights found (expected tensors named like '
                                           f"NVIDIA's `layers.conv.weight`; found 0 tensors, e.g. [])"]), stderr
    loaded = checkpoint.load_snapshot(path)  # a DAG stays a DAG
    assert loaded['x'][0] is loaded['x'][1]
    cyclic, deep = tmp_path / 'cyclic.pkl', tmp_path / 'deep.pkl'
    cyclic.write_bytes(b'\x80\x02}X\x01\x00\x00\x00x]q\x00h\x00as.')
    deep.write_bytes(b'\x80\x02}X\x01\x00\x00\x00x' + b']' * 100_000 + b'a' * 99_999 + b's.')
    with pytest.raises(ValueError, match=rf'^{cyclic}: the snapshot contains itself'):
        checkpoint.load_snapshot(cyclic)
    with pytest.raises(ValueError, match=rf'^{deep}: the snapshot nests containers more than 100 deep$'):
        checkpoint.load_snapshot(deep)


def test_walks_visit_each_node_once_within_a_budget(tmp_path, monkeypatch):
    path = tmp_path / 'inception.pkl'
    path.write_bytes(shared_dicts(40))  # 2**40 paths, 41 dicts
    assert len(path.read_bytes()) < 1300
    tree = safe_pickle.load_path(path, detector.DETECTOR_GLOBALS, inert=safe_pickle.InertNode)
    assert safe_pickle.collect_tensors(tree, '', {}, limit=41) == {}
    with pytest.raises(ValueError, match='more than 40 nodes'):
        safe_pickle.collect_tensors(tree, '', {}, limit=40)
    with pytest.raises(ValueError, match=rf'^{path}: no FID Inception weights found'):
        detector.read_detector_state_dict(path)
    monkeypatch.setattr(safe_pickle, 'MAX_OBJECTS', 30)
    (tmp_path / 'many.pkl').write_bytes(pickle.dumps({'x': [[i] for i in range(40)]}, protocol=4))
    with pytest.raises(ValueError, match=r'many\.pkl: the snapshot holds more than 30 objects'):
        checkpoint.load_snapshot(tmp_path / 'many.pkl')


def test_opcode_budget_and_reads_bounded_by_the_file(tmp_path, monkeypatch):
    huge = tmp_path / 'huge.pkl'  # declares a 1 TiB string in 20 bytes
    huge.write_bytes(b'\x80\x04\x8e' + struct.pack('<Q', 1 << 40) + b'xxxx.')
    code, lines, _ = load_in_subprocess([('snapshot', huge)], headroom_mib=256)
    assert (code, lines) == (1, [f'{huge}: the file ends early (truncated or empty)'])
    blob = pickle.dumps(list(range(2000)), protocol=4)
    assert len(safe_pickle.load(io.BytesIO(blob), {}, 'ok.pkl')) == 2000
    monkeypatch.setattr(safe_pickle.RestrictedUnpickler, 'max_opcodes', 1000)
    with pytest.raises(pickle.UnpicklingError, match=r'^big\.pkl: the pickle holds more than 1,000 objects '
                                                     r'\(opcodes\); refusing it$'):
        safe_pickle.load(io.BytesIO(blob), {}, 'big.pkl')


def test_nested_legacy_storage_cannot_declare_more_than_it_holds():
    payload = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage is deprecated
        torch.save(torch.ones(2).storage(), payload, _use_new_zipfile_serialization=False)
    evil = re.sub(rb'(cpu.{0,3})K\x02', lambda m: m.group(1) + b'J\xff\xff\xff\x7f', payload.getvalue())  # 2**31-1
    assert evil != payload.getvalue()
    assert torch.equal(torch.tensor(safe_pickle.storage_from_legacy_bytes(payload.getvalue()).tolist()), torch.ones(2))
    with pytest.raises(pickle.UnpicklingError, match=rf'^storage payload declares 8,589,934,588 bytes of data but '
                                                     rf'holds {len(evil)}$'):
        safe_pickle.storage_from_legacy_bytes(evil)


def test_zip_members_are_sized_before_they_are_read(tmp_path, monkeypatch):
    plain = io.BytesIO()
    torch.save({'w': torch.zeros(16 << 20)}, plain)  # 64 MiB of zeros: deflates ~1000x
    bomb = tmp_path / 'bomb.pt'
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    size = bomb.stat().st_size
    assert size < 1 << 20
    limit = 8 * size + (32 << 20)
    with pytest.raises(pickle.UnpicklingError, match=rf"^{bomb}: member '[^']*/data/0' declares 67,108,864 bytes; "
                                                     rf"the archive of {size:,} bytes may inflate to at most "
                                                     rf"{limit:,}; refusing it$"):
        safe_pickle.load_path(bomb, safe_pickle.TENSOR_GLOBALS)
    monkeypatch.setattr(safe_pickle, 'MAX_PICKLE_BYTES', 10)
    with pytest.raises(pickle.UnpicklingError, match=r'data\.pkl declares \d+ bytes, more than 10; refusing it'):
        safe_pickle.load_path(bomb, safe_pickle.TENSOR_GLOBALS)

# ----------------------------------------------------------------------------------------------
# Constructor records.

def snapshot_with(tmp_path, net, **changes):
    original = net._init_kwargs
    net._init_kwargs = dnnlib.EasyDict({**original, **changes})
    path = tmp_path / 'changed.pkl'
    checkpoint.save_snapshot(path, {'ema': net})
    net._init_kwargs = original
    return path


def test_constructor_records_are_bounded_before_building(tmp_path, fixtures_dir):
    net = checkpoint.load_network(str(fixtures_dir / 'edm_vp_ddpmpp_cond16.pkl'))
    for changes, message in [(dict(num_blocks=4000), r'num_blocks=4000 is out of bounds \(expected 0\.\.16\)'),
                             (dict(channel_mult=[1] * 1000), 'channel_mult=.* has 1000 entries'),
                             (dict(model_channels=1024, channel_mult=[16, 16, 16, 16]),
                              r'describes a network of about [\d,]+ parameters \(more than 2,000,000,000\)'),
                             (dict(img_resolution=-1), r'img_resolution=-1 is out of bounds'),
                             (dict(model_type='Linear'), "model_type='Linear' is not one of")]:
        path = snapshot_with(tmp_path, net, **changes)
        with pytest.raises(ValueError, match=rf'^{path}: (constructor record of VPPrecond|cannot rebuild)'
                                             rf'.*{message}'):
            checkpoint.load_snapshot(path)
    real = {'EDMPrecond': dict(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
                               model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, dropout=0.1),
            'VEPrecond': dict(img_resolution=256, img_channels=3, model_type='SongUNet', model_channels=128,
                              channel_mult=[1, 1, 2, 2, 2, 2, 2], num_blocks=2, embedding_type='fourier',
                              channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1]),
            'VPPrecond': dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_channels=128,
                              channel_mult=[2, 2, 2], num_blocks=4)}
    for class_name, kwargs in real.items():  # EDM's ADM ImageNet-64, NCSN++ 256, DDPM++ CIFAR-10 pass
        checkpoint._check_constructor_record(class_name, (), kwargs, 'real')


def test_record_with_attribute_names_that_are_not_strings_is_one_line():
    """A network record whose state dict has a tuple key (found by the fuzzing harness: an AttributeError
    traceback in the structure check)."""
    teacher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo', 'teacher-mnist32.pkl')
    data = safe_pickle.load_path(teacher, checkpoint.SNAPSHOT_GLOBALS)
    data['ema'].state['_modules']['model'].state[('x',)] = 1
    with pytest.raises(ValueError) as err:
        checkpoint._materialize(data, 'f.pkl')
    assert str(err.value) == ('f.pkl: model has attribute names that are not strings or _modules that is not a dict')


def test_refusals_print_shared_structures_briefly():
    """A refusal naming a 64-level shared list (a few hundred bytes as a pickle) printed it with repr, which is
    exponential in the depth (found by the fuzzing harness as a timeout); messages use a bounded repr."""
    from pg_modules import class_embedding
    tower = []
    for _ in range(64):
        tower = [tower, tower]
    with pytest.raises(pickle.UnpicklingError) as err:
        class_embedding._dill_load_type(tower)
    assert len(str(err.value)) < 300 and str(err.value).startswith('dill._dill._load_type([[[[...]')
    assert len(checkpoint._short(tower)) < 200
