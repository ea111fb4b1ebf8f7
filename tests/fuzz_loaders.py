"""Fuzzing harness for every loader of untrusted files (docs/fuzzing.md).

Each loader is one `Loader` entry: how to call it on a file, which errors it documents, the real files its
mutations start from, and the pickle globals it allows (for grammar-built opcode streams). Cases are drawn with
hypothesis (seeded: the same seed gives the same cases) and run by a worker subprocess under RLIMIT_AS; the runner
gives every case a deadline, pins the case a dying worker was on, reruns it alone and saves it under the findings
folder for `python -m tests.fuzz_loaders replay <finding>`.

    python -m tests.fuzz_loaders run [--minutes=M | --cases=N] [--loaders=a,b] [--seed=S] [--findings=DIR]
    python -m tests.fuzz_loaders replay <finding folder or case file> [--loader=NAME]
"""
import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import resource
import select
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures'
MEMORY_HEADROOM = 1 << 30  # address space a worker may add to what its imports use: any case needing more fails
CASE_SECONDS = 20.0  # a loader gets this long per case; real files of the project load in well under a second
BOMB_SIZE = 3 << 30  # a zip member that inflates past the memory bound (compressed: ~3 MiB)
# Failures that are the loader's fault however they are reported (also when wrapped in a documented error).
RESOURCE_WORDS = ('MemoryError', "can't allocate memory", 'std::bad_alloc', 'Cannot allocate memory')


@dataclasses.dataclass
class Loader:
    """One loader of untrusted files. `call(path)` returns the loaded object or raises one of `errors`;
    `seeds()` gives real files (bytes) to mutate; `allowed` the pickle globals it resolves (None: no pickle);
    `wrap(stream)` puts a pickle stream in the container the loader reads (None: a plain pickle file)."""
    name: str
    suffix: str
    call: object
    errors: tuple
    seeds: object
    allowed: object = None
    zip_pickle: bool = False  # grammar streams also go in as `archive/data.pkl` of a torch zip
    spec: object = None  # a hypothesis strategy of whole cases (replaces mutation + grammar), e.g. folders


LOADERS = {}


def register(loader):
    LOADERS[loader.name] = loader
    return loader

# ----------------------------------------------------------------------------------------------
# Seeds: small real files of every kind, made with the project's own writers (and the shared fixtures).

def _torch_bytes(obj, zip_format=True):
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def _tiny_network():
    import torch
    from training import networks
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8,
                               channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0,
                               channel_mult_noise=1, resample_filter=[1, 1])


def stable_storage_keys(data):
    """Tensors pickled without torch.save carry legacy streams keyed by storage addresses: renumber the keys
    (same length, so every enclosing size stays right) to make the file the same in every process."""
    import re
    keys = {}

    def renumber(match):
        digits = match.group(2)
        if len(digits) != match.group(1)[0]:
            return match.group(0)
        key = keys.setdefault(digits, str(len(keys)).zfill(len(digits)).encode())
        return match.group(0)[:5] + key
    return re.sub(rb'X([\x08-\x18])\x00\x00\x00(\d{8,24})', renumber, data)


def snapshot_seeds():
    from training import checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'snapshot.pkl')
        checkpoint.save_snapshot(path, dict(ema=_tiny_network(), augment_pipe=None, dataset_kwargs=dict(resolution=8)))
        seeds = [stable_storage_keys(Path(path).read_bytes())]
    fixture = FIXTURES / 'checkpoints' / 'edm_vp_ddpmpp_cond16.pkl'
    return seeds + ([fixture.read_bytes()] if fixture.is_file() else [])


def state_seeds():
    import torch
    from training import checkpoint, state as training_state
    net = _tiny_network()
    state = {key: 0 for key in training_state.STATE_KEYS}
    state.update(version=training_state.STATE_VERSION, config=dict(batch=4, lr=1e-3), G=net.state_dict(),
                 G_record=checkpoint.network_constructor_record(net), rng=dict(torch=torch.get_rng_state()))
    return [_torch_bytes(state)]


def weights_seeds():
    import torch
    torch.manual_seed(0)
    state = {'layers.conv.weight': torch.randn(4, 3, 3, 3), 'layers.conv.bias': torch.zeros(4),
             'output.weight': torch.randn(2, 4).half()}
    legacy = {'layers.conv.weight': state['layers.conv.weight']}  # one storage: the stream's order is fixed
    return [_torch_bytes(state), stable_storage_keys(_torch_bytes(legacy, zip_format=False)),
            stable_storage_keys(pickle.dumps(state, protocol=2))]


def safetensors_seeds():
    import safetensors.torch
    import torch
    return [safetensors.torch.save({'visual.proj': torch.ones(2, 3), 'cls_token': torch.zeros(1, 1, 4)})]


def embedding_pkl_seeds():
    fixture = FIXTURES / 'in_embeddings' / 'tf_efficientnet_lite0.pkl'
    return [fixture.read_bytes()] if fixture.is_file() else [pickle.dumps({'embed': None}, protocol=4)]


def embedding_pt_seeds():
    import torch
    table = torch.arange(4 * 320, dtype=torch.float32).reshape(4, 320)
    return [_torch_bytes(table), _torch_bytes({'weight': table}),
            stable_storage_keys(_torch_bytes(table, zip_format=False))]


def embedding_npy_seeds():
    buffer = io.BytesIO()
    np.save(buffer, np.ones((3, 320), np.float32))
    return [buffer.getvalue()]


def cifar_seeds():
    batch = {'data': np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072), 'labels': [3, 7]}
    return [pickle.dumps(batch, protocol=2), pickle.dumps(batch, protocol=4)]


def mnist_seeds():
    split = (np.full((2, 784), 1 / 256, np.float32), np.array([1, 2], np.int64))
    return [pickle.dumps((split, split, split), protocol=2)]


def npz_seeds():
    plain, compressed = io.BytesIO(), io.BytesIO()
    np.savez(plain, mu=np.zeros(8), sigma=np.eye(8))
    np.savez_compressed(compressed, mu=np.zeros(8), sigma=np.eye(8), features=np.ones((3, 8), np.float32))
    return [plain.getvalue(), compressed.getvalue()]


def dataset_zip_seeds():
    from dataset_tool import write_dataset
    from training.synth import synth_image
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        path = os.path.join(tmp, 'data.zip')
        write_dataset((synth_image(0, i, 8) for i in range(3)), path, force=False, desc='seed')
        return [Path(path).read_bytes()]

# ----------------------------------------------------------------------------------------------
# The loaders, called as the CLIs call them. Each returns what the program would go on with.

def _tar_gz(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def call_cifar(path):
    import dataset_tool
    tarball = path + '.tar.gz'
    Path(tarball).write_bytes(_tar_gz({'cifar-10-batches-py/test_batch': Path(path).read_bytes()}))
    try:
        return sum(1 for _ in dataset_tool.iterate_cifar10(tarball, split='test'))
    finally:
        os.remove(tarball)


def call_mnist(path):
    import dataset_tool
    compressed = path + '.gz'
    Path(compressed).write_bytes(gzip.compress(Path(path).read_bytes(), mtime=0))
    try:
        return dataset_tool.read_mnist_pickle(compressed)
    finally:
        os.remove(compressed)


def call_dataset(path):
    """What train.py and dataset_tool.py do with a dataset: open it (labels too) and convert every image."""
    import dataset_tool
    from training.dataset import ImageFolderDataset
    with contextlib.suppress(ValueError):  # unlabelled data is fine without labels: retry so images get read
        return len(ImageFolderDataset(path, use_labels=True))
    dataset = ImageFolderDataset(path)
    return len(dataset), sum(1 for _ in dataset_tool.iterate_images(path, folder_labels=False))


def call_folder(path):
    """The case is a JSON list of folder entries (`folder_specs`); they are made beside it and loaded."""
    folder = path + '.d'
    make_folder(json.loads(Path(path).read_text()), folder)
    try:
        return call_dataset(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _register_all():
    """Fill LOADERS (once); FUZZ_EXTRA_LOADER=module:NAME adds one more `Loader` (the harness's own tests)."""
    if LOADERS:
        return
    extra = os.environ.get('FUZZ_EXTRA_LOADER')
    if extra:
        import importlib
        module, name = extra.split(':')
        register(getattr(importlib.import_module(module), name))
    import click
    import dataset_tool
    from metrics import detector, reference, vit_weights
    from pg_modules import class_embedding
    from torch_utils import safe_pickle
    from training import checkpoint, state as training_state
    unpickle = (pickle.UnpicklingError, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile)
    from dnnlib import cli
    # what dataset_tool's policy prints as one line, less running out of memory or recursion depth: a fuzz failure
    tool = (click.ClickException, *(e for e in cli.EXPECTED_ERRORS if e not in (MemoryError, RecursionError)))
    register(Loader('snapshot', '.pkl', checkpoint.load_network, unpickle, snapshot_seeds,
                    checkpoint.SNAPSHOT_GLOBALS, zip_pickle=True))
    register(Loader('state', '.pt', training_state.load_training_state, (ValueError, OSError), state_seeds,
                    safe_pickle.TENSOR_GLOBALS, zip_pickle=True))
    register(Loader('detector', '.pkl', detector.read_detector_state_dict, (ValueError,), weights_seeds,
                    detector.DETECTOR_GLOBALS, zip_pickle=True))
    register(Loader('vit', '.pt', lambda p: vit_weights.read_weights_file(p, 'CLIP'), (ValueError,), weights_seeds,
                    safe_pickle.TENSOR_GLOBALS, zip_pickle=True))
    register(Loader('vit-safetensors', '.safetensors', lambda p: vit_weights.read_weights_file(p, 'CLIP'),
                    (ValueError,), safetensors_seeds))
    embedding_errors = (ValueError, FileNotFoundError)
    register(Loader('embedding-pkl', '.pkl', class_embedding.load_class_embedding, embedding_errors,
                    embedding_pkl_seeds, class_embedding.EMBEDDING_GLOBALS))
    register(Loader('embedding-pt', '.pt', class_embedding.load_class_embedding, embedding_errors,
                    embedding_pt_seeds, safe_pickle.TENSOR_GLOBALS, zip_pickle=True))
    register(Loader('embedding-npy', '.npy', class_embedding.load_class_embedding, embedding_errors,
                    embedding_npy_seeds))
    register(Loader('cifar', '.batch', call_cifar, tool, cifar_seeds, dataset_tool.NUMPY_PICKLE_GLOBALS))
    register(Loader('mnist', '.pkl', call_mnist, tool, mnist_seeds, dataset_tool.NUMPY_PICKLE_GLOBALS))
    register(Loader('npz', '.npz', reference.load_ref_stats, (ValueError, OSError), npz_seeds))
    register(Loader('dataset-zip', '.zip', call_dataset, (*tool, FileNotFoundError), dataset_zip_seeds))
    register(Loader('dataset-folder', '.json', call_folder, (*tool, FileNotFoundError), None, spec=folder_specs()))
    if (ROOT / 'checkpoint_tool.py').is_file():  # safetensors snapshots (docs/fuzzing.md: adding a loader)
        register(Loader('snapshot-safetensors', '.safetensors', checkpoint.load_network, unpickle,
                        safetensors_snapshot_seeds))


def safetensors_snapshot_seeds():
    with tempfile.TemporaryDirectory() as tmp:
        source, dest = os.path.join(tmp, 'snapshot.pkl'), os.path.join(tmp, 'snapshot.safetensors')
        Path(source).write_bytes(snapshot_seeds()[0])
        subprocess.run([sys.executable, str(ROOT / 'checkpoint_tool.py'), 'convert', f'--source={source}',
                        f'--dest={dest}'], check=True, capture_output=True)
        return [Path(dest).read_bytes()]

# ----------------------------------------------------------------------------------------------
# (a) Mutations of real files: byte flips, truncation, splicing, digits made huge, zip header edits,
# duplicated members, a member that inflates past the memory bound.

ZIP_LOCAL, ZIP_CENTRAL = b'PK\x03\x04', b'PK\x01\x02'
# (signature, field offset, field size) of the fields a reader trusts: CRC, sizes, name/extra lengths, offset.
ZIP_FIELDS = [(ZIP_LOCAL, 14, 4), (ZIP_LOCAL, 18, 4), (ZIP_LOCAL, 22, 4), (ZIP_LOCAL, 26, 2), (ZIP_LOCAL, 28, 2),
              (ZIP_LOCAL, 8, 2), (ZIP_CENTRAL, 16, 4), (ZIP_CENTRAL, 20, 4), (ZIP_CENTRAL, 24, 4),
              (ZIP_CENTRAL, 28, 2), (ZIP_CENTRAL, 42, 4), (ZIP_CENTRAL, 10, 2)]
EDGE_INTS = [0, 1, 0x7f, 0xff, 0xffff, 0x7fffffff, 0xffffffff, 0xfffffffe]


def _positions(data, signature):
    found, start = [], data.find(signature)
    while start >= 0:
        found.append(start)
        start = data.find(signature, start + 1)
    return found


def edit_zip_field(data, which, pick, value):
    signature, offset, size = ZIP_FIELDS[which % len(ZIP_FIELDS)]
    places = [p for p in _positions(data, signature) if p + offset + size <= len(data)]
    if not places:
        return data
    at = places[pick % len(places)] + offset
    return data[:at] + (value & ((1 << 8 * size) - 1)).to_bytes(size, 'little') + data[at + size:]


def _zip_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if sum(info.file_size for info in archive.infolist()) > 64 << 20:  # e.g. a bomb made by an earlier step
            raise ValueError('too large to rewrite')
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def duplicate_zip_member(data, pick, payload):
    """The same zip with member `pick` stored twice, the second copy holding `payload` (or None: itself)."""
    try:
        members = _zip_members(data)
    except Exception:  # already broken: nothing to duplicate
        return data
    if not members:
        return data
    name, original = members[pick % len(members)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive, _quiet():
        for member, content in members + [(name, original if payload is None else payload)]:
            archive.writestr(zipfile.ZipInfo(member), content)  # ZipInfo: a fixed 1980 timestamp
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # zipfile warns about the duplicate name we write on purpose
        yield


_BOMB = {}


def deflated_zeros(size):
    """(raw deflate stream, crc32) of `size` zero bytes (a multiple of 16 MiB). After a full flush the
    compressor starts afresh, so every further 16 MiB of zeros compresses to the same block: made once, repeated."""
    if size not in _BOMB:
        chunk, squeeze = bytes(16 << 20), zlib.compressobj(9, zlib.DEFLATED, -15)
        first = squeeze.compress(chunk) + squeeze.flush(zlib.Z_FULL_FLUSH)
        block = squeeze.compress(chunk) + squeeze.flush(zlib.Z_FULL_FLUSH)
        crc, count = 0, size // len(chunk)
        for _ in range(count):
            crc = zlib.crc32(chunk, crc)
        _BOMB[size] = first + block * (count - 1) + squeeze.flush(), crc
    return _BOMB[size]


def bomb_zip_member(data, pick):
    """The same zip (stored members) with member `pick` replaced by zeros that inflate to BOMB_SIZE bytes."""
    try:
        members = _zip_members(data)
    except Exception:
        return data
    if not members:
        return data
    target = pick % len(members)
    local, central = [], []
    for index, (name, content) in enumerate(members):
        method, stream, crc, size = 0, content, zlib.crc32(content), len(content)
        if index == target:
            (stream, crc), method, size = deflated_zeros(BOMB_SIZE), 8, BOMB_SIZE
        head = struct.pack('<HHHHHIIIHH', 20, 0, method, 0, 0, crc, len(stream), size, len(name.encode()), 0)
        central.append(ZIP_CENTRAL + struct.pack('<H', 20) + head + struct.pack('<HHHII', 0, 0, 0, 0,
                                                                                  sum(map(len, local)))
                       + name.encode())
        local.append(ZIP_LOCAL + head + name.encode() + stream)
    body, directory = b''.join(local), b''.join(central)
    end = b'PK\x05\x06' + struct.pack('<HHHHIIH', 0, 0, len(members), len(members), len(directory), len(body), 0)
    return body + directory + end


def _replace_digits(data, pick, digits):
    """Turn one run of ASCII digits (an npy/JSON header size, a shape) into `digits`."""
    runs, start = [], None
    for i, byte in enumerate(data[:4096]):
        if 48 <= byte <= 57 and start is None:
            start = i
        elif not 48 <= byte <= 57 and start is not None:
            runs.append((start, i))
            start = None
    if not runs:
        return data
    a, b = runs[pick % len(runs)]
    return data[:a] + digits + data[b:]


def apply_mutation(data, mutation, seeds):
    kind, a, b, value = mutation
    n = max(len(data), 1)
    if kind == 'flip':
        return data[:a % n] + bytes([data[a % n] ^ (1 << (value % 8))]) + data[a % n + 1:] if data else data
    if kind == 'byte':
        return data[:a % n] + bytes([value & 0xff]) + data[a % n + 1:]
    if kind == 'truncate':
        return data[:a % n]
    if kind == 'delete':
        return data[:a % n] + data[a % n + 1 + b % 64:]
    if kind == 'splice':  # a stretch of another seed (or this one) pasted in
        other = seeds[value % len(seeds)]
        start = b % max(len(other), 1)
        return data[:a % n] + other[start:start + 1 + (value >> 8) % 4096] + data[a % n:]
    if kind == 'digits':
        return _replace_digits(data, a, str([10 ** 12, 4000, 2 ** 31, 2 ** 63, 0, 10 ** 6][value % 6]).encode())
    if kind == 'zip-field':
        return edit_zip_field(data, a, b, EDGE_INTS[value % len(EDGE_INTS)] if value % 3 else value)
    if kind == 'zip-duplicate':
        return duplicate_zip_member(data, a, None if value % 2 else data[:b % 200])
    if kind == 'zip-bomb':
        return bomb_zip_member(data, a)
    raise ValueError(kind)


MUTATION_KINDS = ['flip', 'byte', 'truncate', 'delete', 'splice', 'digits', 'zip-field', 'zip-duplicate',
                  'zip-bomb']


def mutated_files(seeds):
    """Strategy: (bytes, origin) of a seed after 1-4 mutations."""
    from hypothesis import strategies as st
    mutation = st.tuples(st.sampled_from(MUTATION_KINDS), st.integers(0, 1 << 30), st.integers(0, 1 << 30),
                         st.integers(0, 1 << 32))

    @st.composite
    def build(draw):
        index = draw(st.integers(0, len(seeds) - 1))
        mutations = draw(st.lists(mutation, min_size=1, max_size=4))
        data = seeds[index]
        for m in mutations:
            data = apply_mutation(data, m, seeds)
        return data, {'seed': index, 'mutations': mutations}
    return build()

# ----------------------------------------------------------------------------------------------
# (b) Grammar-built pickle opcode streams: values made of the loader's allowed globals (and a few it refuses),
# called with REDUCE/NEWOBJ, given state with BUILD, nested, shared through the memo, self-referencing, and
# literals that declare huge sizes.

WORDS = ['storage', 'cpu', '0', '1', 'ema', 'net', '_init_kwargs', '_init_args', 'class_name', 'state', 'version',
         'type', 'class', 'module_src', '_parameters', '_buffers', '_modules', 'weight', 'embed', 'data', 'labels',
         'layers.conv.weight', 'num_blocks', 'model_channels', 'EDMPrecond', 'SongUNet', '__dict__', '<f4', '<f8',
         '|u1', 'O', 'O8', 'V8', 'f4', 'latin1', '<', '|', 'state_dict', 'config', 'G_record', 'cur_nimg', 'rng']
REFUSED = [('os', 'system'), ('builtins', 'eval'), ('builtins', 'getattr'), ('torch', 'load'),
           ('numpy', 'frombuffer'), ('torch._utils', '_rebuild_tensor')]
SIMPLE_OPS = [pickle.POP, pickle.DUP, pickle.MARK, pickle.POP_MARK, pickle.BUILD, pickle.REDUCE, pickle.APPEND,
              pickle.SETITEM, pickle.TUPLE2, pickle.NEWOBJ, pickle.STOP, pickle.EMPTY_TUPLE, b'\x94']


class Emitter:
    """Collects opcodes and counts memo slots (MEMOIZE numbers them in order)."""

    def __init__(self):
        self.out, self.memo = [], 0

    def emit(self, *parts):
        self.out.extend(parts)

    def memoize(self):
        self.emit(pickle.MEMOIZE)
        self.memo += 1

    def get(self, index):
        self.emit(pickle.BINGET + bytes([index]) if index < 256 else pickle.LONG_BINGET + struct.pack('<I', index))

    def int(self, value):
        if 0 <= value < 256:
            self.emit(pickle.BININT1 + bytes([value]))
        elif -2 ** 31 <= value < 2 ** 31:
            self.emit(pickle.BININT + struct.pack('<i', value))
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
            self.emit(pickle.LONG1 + bytes([len(raw)]) + raw)

    def str(self, text):
        raw = text.encode('utf-8', 'surrogatepass')
        self.emit((pickle.SHORT_BINUNICODE + bytes([len(raw)]) if len(raw) < 256 else
                   pickle.BINUNICODE + struct.pack('<I', len(raw))) + raw)

    def bytes(self, raw):
        self.emit((pickle.SHORT_BINBYTES + bytes([len(raw)]) if len(raw) < 256 else
                   pickle.BINBYTES + struct.pack('<I', len(raw))) + raw)

    def global_(self, module, name, stack):
        if stack:
            self.str(module)
            self.str(name)
            self.emit(pickle.STACK_GLOBAL)
        else:
            self.emit(pickle.GLOBAL + f'{module}\n{name}\n'.encode())

    def stream(self):
        return b''.join(self.out)


def _literal(draw, out, st):
    kind = draw(st.sampled_from(['int', 'int', 'str', 'str', 'bytes', 'float', 'none', 'bool', 'huge']))
    if kind == 'int':
        out.int(draw(st.one_of(st.integers(-3, 300), st.sampled_from([4000, 2 ** 31, 2 ** 63, -2 ** 64, 10 ** 12]))))
    elif kind == 'str':
        out.str(draw(st.one_of(st.sampled_from(WORDS), st.text(max_size=6))))
    elif kind == 'bytes':
        out.bytes(draw(st.binary(max_size=64)))
    elif kind == 'float':
        out.emit(pickle.BINFLOAT + struct.pack('>d', draw(st.floats(allow_nan=True))))
    elif kind == 'none':
        out.emit(pickle.NONE)
    elif kind == 'bool':
        out.emit(draw(st.sampled_from([pickle.NEWTRUE, pickle.NEWFALSE])))
    else:  # a length field far beyond the stream: readers must not allocate it up front
        opcode, fmt = draw(st.sampled_from([(pickle.BINBYTES, '<I'), (pickle.BINUNICODE, '<I'),
                                            (pickle.BINBYTES8, '<Q'), (pickle.BYTEARRAY8, '<Q'),
                                            (pickle.BINUNICODE8, '<Q')]))
        size = draw(st.sampled_from([2 ** 31 - 1, 2 ** 32 - 1, 2 ** 40]))
        out.emit(opcode + struct.pack(fmt, min(size, 2 ** 32 - 1) if fmt == '<I' else size) + b'x' * 8)


def _container(draw, out, st, value, depth):
    kind = draw(st.sampled_from(['list', 'tuple', 'dict', 'set', 'frozenset', 'appends', 'setitems']))
    count = draw(st.integers(0, 4))
    if kind in ('appends', 'setitems'):  # filled after memoizing: children may refer to it (self references)
        out.emit(pickle.EMPTY_LIST if kind == 'appends' else pickle.EMPTY_DICT)
        out.memoize()
        out.emit(pickle.MARK)
        for _ in range(count * (2 if kind == 'setitems' else 1)):
            value(depth + 1)
        out.emit(pickle.APPENDS if kind == 'appends' else pickle.SETITEMS)
        return
    out.emit(pickle.MARK)
    for _ in range(count * (2 if kind == 'dict' else 1)):
        value(depth + 1)
    out.emit({'list': pickle.LIST, 'tuple': pickle.TUPLE, 'dict': pickle.DICT, 'set': pickle.EMPTY_SET,
              'frozenset': pickle.FROZENSET}[kind])
    if kind == 'set':  # EMPTY_SET takes no mark: fill it the protocol-4 way
        out.emit(pickle.MARK, pickle.ADDITEMS)


# Argument and BUILD-state shapes of the allowed callables (by name), so that a call often gets past its first
# type check: a slot is a list of literals to pick from, or one of 'dtype', 'bytes', 'ndarray', 'shape', 'storage'.
ARG_HINTS = {'dtype': [['O8', 'O', 'f8', 'V8', 'u1'], [False], [True]], 'scalar': ['dtype', 'bytes'],
             '_reconstruct': ['ndarray', 'shape', [b'b']], 'Size': ['shape'],
             '_rebuild_tensor_v2': ['storage', [0, 1, 2 ** 40], 'shape', 'shape', [False, True]]}
BUILD_HINTS = {'dtype': [[3], ['|', '<'], [None], [None], [None], [-1, 8], [-1, 1], [0, 16, 63]],
               '_rebuild_tensor_v2': ['storage', [0, 3], 'shape', 'shape'],
               '_reconstruct': [[1], 'shape', 'dtype', [False], 'bytes']}


def _plain(out, literal):
    if isinstance(literal, bool) or literal is None:
        out.emit({True: pickle.NEWTRUE, False: pickle.NEWFALSE, None: pickle.NONE}[literal])
    elif isinstance(literal, int):
        out.int(literal)
    elif isinstance(literal, str):
        out.str(literal)
    else:
        out.bytes(literal)


def _hinted(draw, out, st, slots, names):
    out.emit(pickle.MARK)
    for slot in slots:
        if isinstance(slot, list):
            _plain(out, draw(st.sampled_from(slot)))
        elif slot == 'dtype':
            out.global_('numpy', 'dtype', False)
            _hinted(draw, out, st, ARG_HINTS['dtype'], names)
            out.emit(pickle.REDUCE)
            if draw(st.booleans()):
                _hinted(draw, out, st, BUILD_HINTS['dtype'], names)
                out.emit(pickle.BUILD)
        elif slot == 'bytes':
            out.bytes(draw(st.binary(min_size=1, max_size=16)))
        elif slot == 'ndarray':
            out.global_('numpy', 'ndarray', False)
        elif slot == 'shape':
            _hinted(draw, out, st, [[0, 1, 2, 3, 2 ** 31]] * draw(st.integers(0, 3)), names)
        else:
            _persistent_id(draw, out, st, names)
    out.emit(pickle.TUPLE)


def _call(draw, out, st, value, depth, names):
    module, name = draw(st.sampled_from(names)) if draw(st.integers(0, 9)) else draw(st.sampled_from(REFUSED))
    out.global_(module, name, draw(st.booleans()))
    if name in ARG_HINTS and draw(st.booleans()):
        _hinted(draw, out, st, ARG_HINTS[name], names)
    else:
        out.emit(pickle.MARK)
        for _ in range(draw(st.integers(0, 5))):
            value(depth + 1)
        out.emit(pickle.TUPLE)
    out.emit(draw(st.sampled_from([pickle.REDUCE, pickle.REDUCE, pickle.NEWOBJ])))
    if draw(st.integers(0, 2)) == 0:  # BUILD: state as a dict, a (dict, slots) pair, or a tuple of plain values
        if name in BUILD_HINTS and draw(st.booleans()):
            _hinted(draw, out, st, BUILD_HINTS[name], names)
        else:
            value(depth + 1)
        out.emit(pickle.BUILD)


def shared_tower(out, height):
    """L0 = []; L(k+1) = [Lk, Lk]: a few hundred bytes, 2**height paths for a walk without a visited set."""
    out.emit(pickle.EMPTY_LIST)
    out.memoize()
    for _ in range(height):
        out.emit(pickle.POP, pickle.MARK)
        out.get(out.memo - 1)
        out.get(out.memo - 1)
        out.emit(pickle.LIST)
        out.memoize()


def _persistent_id(draw, out, st, names):
    storages = [n for n in names if n[1].endswith('Storage')] or [('torch', 'FloatStorage')]
    out.emit(pickle.MARK)
    out.str('storage')
    out.global_(*draw(st.sampled_from(storages)), False)
    out.str(draw(st.sampled_from(['0', '1', 'x', '../data.pkl'])))
    out.str('cpu')
    out.int(draw(st.sampled_from([0, 1, 4, 2 ** 31, 2 ** 62])))
    out.emit(pickle.TUPLE, pickle.BINPERSID)


def _value(draw, out, st, names, depth):
    deep = depth >= 4
    kind = draw(st.sampled_from(['literal'] * 3 + ([] if deep else ['container', 'container', 'call', 'call']) +
                                ['ref', 'tower', 'persid', 'nest', 'op']))
    value = lambda d: _value(draw, out, st, names, d)  # noqa: E731 (a recursion handle for the builders)
    if kind == 'literal':
        _literal(draw, out, st)
    elif kind == 'container':
        _container(draw, out, st, value, depth)
    elif kind == 'call':
        _call(draw, out, st, value, depth, names)
    elif kind == 'ref' and out.memo:
        out.get(draw(st.integers(0, out.memo + 1)))  # sometimes one past the memo: a dangling reference
    elif kind == 'tower':
        shared_tower(out, draw(st.integers(8, 60)))
    elif kind == 'persid':
        _persistent_id(draw, out, st, names)
    elif kind == 'nest':  # nesting far past the recursion limit of any recursive walk
        height = draw(st.sampled_from([100, 5000, 100_000]))
        out.emit(pickle.MARK * height, pickle.EMPTY_LIST, pickle.LIST * height)
    elif kind == 'op':
        out.emit(draw(st.sampled_from(SIMPLE_OPS)))
    else:
        out.emit(pickle.NONE)
    if kind in ('container', 'call') and draw(st.booleans()):
        out.memoize()


def pickle_streams(allowed):
    """Strategy: (bytes, origin) of one grammar-built pickle using `allowed` {(module, name): ...}."""
    from hypothesis import strategies as st
    names = sorted(allowed)

    @st.composite
    def build(draw):
        out = Emitter()
        out.emit(pickle.PROTO + bytes([draw(st.sampled_from([2, 4]))]))
        if draw(st.booleans()):  # most loaders expect a dict at the top: {word: value, ...}
            out.emit(pickle.EMPTY_DICT)
            out.memoize()
            out.emit(pickle.MARK)
            for _ in range(draw(st.integers(1, 4))):
                out.str(draw(st.sampled_from(WORDS)))
                _value(draw, out, st, names, 1)
            out.emit(pickle.SETITEMS)
        else:
            _value(draw, out, st, names, 0)
        if draw(st.integers(0, 3)) == 0:
            _value(draw, out, st, names, 0)  # a second value left on the stack
        out.emit(pickle.STOP)
        return out.stream(), {'grammar': True}
    return build()


def known_attacks():
    """{name: pickle stream}: hand-built instances of the attack classes the grammar reaches only by chance
    (docs/fuzzing.md §2), run against every pickle loader in the bounded run."""
    attacks = {}
    # numpy.dtype('O8') whose BUILD state clears its flags, then a scalar of it made from raw bytes
    attacks['object-dtype-scalar'] = (
        b'\x80\x04cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(\x8c\x02O8\x89\x88tR(K\x03\x8c\x01|NNN'
        b'J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbC\x08AAAAAAAAtR.')
    attacks['binbytes8-2**40'] = pickle.PROTO + b'\x04' + pickle.BINBYTES8 + struct.pack('<Q', 2 ** 40) + b'x.'
    out = Emitter()
    out.emit(pickle.PROTO + b'\x04', pickle.EMPTY_DICT, pickle.MEMOIZE)
    out.memo = 1
    out.str('ema')
    shared_tower(out, 64)
    out.emit(pickle.SETITEM, pickle.STOP)
    attacks['shared-tower-64'] = out.stream()
    attacks['self-list'] = b'\x80\x04}\x94\x8c\x03ema\x94]\x94h\x02a\x85\x94s.'  # {'ema': (L,)}, L = [L]
    attacks['nest-100000'] = b'\x80\x04' + b'(' * 100_000 + b']' + b'l' * 100_000 + b'.'
    return attacks


def torch_zip(stream, storages=(b'\0' * 16, b'\0' * 4)):
    """`stream` as `archive/data.pkl` of a zip-format torch file, with storages '0' and '1'."""
    buffer = io.BytesIO()
    members = {'archive/data.pkl': stream, 'archive/byteorder': b'little', 'archive/version': b'3\n',
               **{f'archive/data/{key}': data for key, data in enumerate(storages)}}
    with zipfile.ZipFile(buffer, 'w') as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)  # ZipInfo: a fixed 1980 timestamp
    return buffer.getvalue()

# ----------------------------------------------------------------------------------------------
# Dataset folders: entries that are not plain files (FIFOs, links to devices or loops), odd names, bad JSON.

def folder_specs():
    """Strategy: (JSON bytes, origin) of a folder listing: [{"name", "kind", "data" (hex) | "target"}]."""
    from hypothesis import strategies as st
    names = st.sampled_from(['a.png', 'b.png', 'sub/c.png', 'dataset.json', 'x.jpg', 'deep/er/d.webp', 'e.PNG'])
    png = _tiny_png()
    data = st.one_of(st.just(png), st.binary(max_size=64), st.builds(lambda n: png[:n], st.integers(0, len(png))),
                     st.sampled_from([b'{"labels": [["a.png", 0]]}', b'{"labels": [["a.png", 1e999]]}',
                                      b'{"labels": null}', b'[' * 100_000, b'{"labels": [["a.png", -1]]}']))
    plain = st.fixed_dictionaries({'name': names, 'kind': st.just('file'), 'data': data.map(bytes.hex)})
    odd = st.fixed_dictionaries({'name': names, 'kind': st.sampled_from(['fifo', 'symlink', 'dir']),
                                 'target': st.sampled_from(['/dev/zero', '/dev/null', 'missing', '.', 'a.png'])})
    return st.lists(st.one_of(plain, plain, odd), min_size=1, max_size=5).map(
        lambda entries: (json.dumps(entries).encode(), {'folder': True}))


def _tiny_png():
    import PIL.Image
    buffer = io.BytesIO()
    PIL.Image.new('RGB', (4, 4), (10, 20, 30)).save(buffer, format='PNG')
    return buffer.getvalue()


def make_folder(entries, folder):
    os.makedirs(folder)
    for entry in entries:
        path = os.path.join(folder, entry['name'])
        if os.path.lexists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if entry['kind'] == 'file':
            Path(path).write_bytes(bytes.fromhex(entry['data']))
        elif entry['kind'] == 'fifo':
            os.mkfifo(path)
        elif entry['kind'] == 'symlink':
            os.symlink(entry['target'], path)
        else:
            os.makedirs(path)

# ----------------------------------------------------------------------------------------------
# Drawing cases: hypothesis strategies, run with a fixed seed, so a (loader, seed, count) is always the same cases.

def stable_zip_times(data):
    """Zip writers (np.savez, the dataset writer) stamp the current time: clear it in every header, so a seed
    file is the same in every run."""
    if data[:4] != ZIP_LOCAL:
        return data
    data = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = [info.header_offset for info in archive.infolist()]
        at = archive.start_dir
    for offset in local:
        data[offset + 10:offset + 14] = bytes(4)
    while data[at:at + 4] == ZIP_CENTRAL:
        data[at + 12:at + 16] = bytes(4)
        at += 46 + sum(struct.unpack('<HHH', data[at + 28:at + 34]))
    return bytes(data)


def case_strategy(loader):
    from hypothesis import strategies as st
    if loader.spec is not None:
        return loader.spec
    seeds = [stable_zip_times(seed) for seed in loader.seeds()]
    parts = [mutated_files(seeds)]
    if loader.allowed is not None:
        streams = pickle_streams(loader.allowed)
        parts.append(streams)
        if loader.zip_pickle:
            parts.append(streams.map(lambda case: (torch_zip(case[0]), dict(case[1], zip=True))))
    return st.one_of(parts)


def draw_cases(loader, count, seed):
    """`count` cases [(bytes, origin)] of `loader`, the same for the same seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed
    cases = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @fixed_seed(seed)
    @given(case_strategy(loader))
    def collect(case):
        cases.append(case)
    collect()
    return cases[:count]

# ----------------------------------------------------------------------------------------------
# The worker: runs cases in-process under RLIMIT_AS and reports one JSON line per case.

def _tensors_in(obj, budget=100_000):
    """Tensors reachable from a loaded object (visited set and node budget: the object may be hostile)."""
    import torch
    stack, seen, found = [obj], set(), []
    while stack and budget > 0:
        item = stack.pop()
        budget -= 1
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, torch.nn.Module):
            stack.extend(item.state_dict(keep_vars=True).values())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def check_loaded(obj):
    """A returned object must be sound: every tensor view inside its storage (else it reads foreign heap)."""
    for tensor in _tensors_in(obj):
        if tensor.is_meta or tensor.numel() == 0:
            continue
        end = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) + 1
        if end * tensor.element_size() > tensor.untyped_storage().nbytes():
            return f'a loaded tensor of shape {tuple(tensor.shape)} reaches beyond its storage'
    return None


def class_fingerprint():
    """What BUILD on an allowed instance must never change: the attributes of the classes it could reach."""
    import dnnlib
    import torch
    from torch_utils import safe_pickle
    from training import checkpoint
    classes = [dnnlib.EasyDict, dict, list, torch.Tensor, torch.nn.Parameter, safe_pickle.InertNode,
               checkpoint.PersistentRecord, checkpoint._ModuleDictRecord, np.ndarray, np.dtype]
    return {cls.__qualname__: sorted((k, id(v)) for k, v in vars(cls).items()) for cls in classes}


def _message(err):
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


def run_case(loader, path):
    """('ok', detail) or (failure kind, detail) for one case, in this process."""
    try:
        result = loader.call(path)
    except MemoryError as err:
        return 'memory', f'MemoryError: {err}'
    except loader.errors as err:
        message = _message(err)
        if any(word in message for word in RESOURCE_WORDS):
            return 'memory', message[:300]
        if '\n' in message.strip() or not message.strip():
            return 'not-one-line', f'{type(err).__name__}: {message[:300]!r}'
        if os.path.basename(path) not in message:
            return 'unnamed-source', f'{type(err).__name__}: {message[:300]}'
        return 'ok', f'{type(err).__name__}: {message[:200]}'
    except BaseException as err:  # anything else reaches the user as a traceback
        kind = 'recursion' if isinstance(err, RecursionError) else 'traceback'
        return kind, f'{type(err).__name__}: {str(err)[:300]}'
    problem = check_loaded(result)
    return ('unsound-result', problem) if problem else ('ok', f'loaded {type(result).__name__}')


def worker(batch_file):
    """Run the cases listed in `batch_file` ([{"loader", "path"}]); print `start i` and a JSON result per case."""
    import torch
    torch.set_num_threads(1)
    sys.setrecursionlimit(1000)
    _register_all()
    cases = json.loads(Path(batch_file).read_text())
    limit = _vm_size() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    before = class_fingerprint()
    for i, case in enumerate(cases):
        print(json.dumps({'start': i}), flush=True)
        began = time.perf_counter()
        kind, detail = run_case(LOADERS[case['loader']], case['path'])
        seconds = time.perf_counter() - began
        if kind == 'ok' and class_fingerprint() != before:
            kind, detail = 'global-state', f'class attributes changed while loading ({detail})'
            before = class_fingerprint()
        print(json.dumps({'done': i, 'kind': kind, 'detail': detail, 'seconds': seconds}), flush=True)


def _vm_size():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmSize:'):
            return int(line.split()[1]) * 1024
    return 0

# ----------------------------------------------------------------------------------------------
# The runner: batches of cases in worker subprocesses; a case that kills its worker or runs past its deadline
# is pinned (the worker announced it), rerun alone, and saved as a finding.

@dataclasses.dataclass
class Case:
    loader: str
    data: bytes
    origin: dict


def _write_batch(cases, folder):
    listing = []
    for i, case in enumerate(cases):
        path = os.path.join(folder, f'case-{i:05d}{LOADERS[case.loader].suffix}')
        Path(path).write_bytes(case.data)
        listing.append({'loader': case.loader, 'path': path})
    Path(folder, 'batch.json').write_text(json.dumps(listing))
    return os.path.join(folder, 'batch.json')


DEATHS = ('timeout', 'signal', 'exit')


def _death(process, timed_out, deadline):
    if timed_out:
        return 'timeout', f'no answer within {deadline:g} s (killed)', deadline
    code = process.returncode
    return ('signal', f'worker killed by signal {-code}', 0.0) if code < 0 else \
        ('exit', f'worker exited with {code}', 0.0)


def _tail(path, lines=5):
    with open(path, errors='replace') as f:
        return ' | '.join(f.read().splitlines()[-lines:])


def run_batch(cases, folder, deadline=CASE_SECONDS):
    """[(kind, detail) or None] per case; the list stops after a case that killed its worker."""
    batch = _write_batch(cases, folder)
    with open(os.path.join(folder, 'worker.log'), 'wb') as log:
        process = subprocess.Popen([sys.executable, '-m', 'tests.fuzz_loaders', 'worker', batch], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=log)
    results, current, due, buffer = [], None, None, b''
    try:
        while True:
            wait = None if due is None else max(due - time.monotonic(), 0)
            ready, _, _ = select.select([process.stdout], [], [], wait)
            if not ready:  # the current case is past its deadline
                process.kill()
                process.wait()
                return results + [_death(process, True, deadline)]
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                process.wait()
                if current is None and process.returncode != 0 and len(results) < len(cases):
                    raise RuntimeError(f'fuzz worker exited with status {process.returncode} between cases; its '
                                       f'log: {_tail(os.path.join(folder, "worker.log"))}')
                return results + ([_death(process, False, None)] if current is not None else [])
            buffer += chunk
            *lines, buffer = buffer.split(b'\n')
            for line in map(json.loads, lines):
                if 'start' in line:
                    current, due = line['start'], time.monotonic() + deadline
                else:
                    results.append((line['kind'], line['detail'], line['seconds']))
                    current, due = None, None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_cases(cases, findings=None, log=print, deadline=CASE_SECONDS, stop_on_failure=False):
    """Run the cases; returns [(case, kind, detail, seconds)] (failures also saved under `findings`).
    `stop_on_failure`: once a loader fails, its remaining cases are skipped (the bounded run needs one)."""
    outcomes, pending = [], list(cases)
    with tempfile.TemporaryDirectory(prefix='fuzz-') as tmp:
        while pending:
            results = run_batch(pending, tmp, deadline)
            if not results:
                raise RuntimeError(f'the fuzz worker did not start; see {tmp}/worker.log')
            for offset, (kind, detail, seconds) in enumerate(results):
                outcomes.append((pending[offset], kind, detail, seconds))
                if kind == 'ok' or findings is None:
                    continue
                sequence = pending[:offset + 1]
                if kind in DEATHS:  # always the last result of its batch
                    sequence = pin_down(sequence, kind, tmp)
                log(f'  {sequence[-1].loader}: {kind}: {detail} -> {save_finding(findings, sequence, kind, detail)}')
            pending = pending[len(results):]
            if stop_on_failure:
                failed = {case.loader for case, kind, _, _ in outcomes if kind != 'ok'}
                pending = [case for case in pending if case.loader not in failed]
    return outcomes


def pin_down(sequence, kind, tmp):
    """The shortest run that reproduces a dead worker: the last case alone, or with the cases before it."""
    alone = run_batch(sequence[-1:], tmp) if len(sequence) > 1 else [(kind,)]
    if alone and alone[-1][0] == kind:
        return sequence[-1:]
    return sequence  # it needs the earlier cases (e.g. state they changed): keep the whole prefix


def save_finding(folder, sequence, kind, detail):
    digest = hashlib.sha256(b''.join(case.data for case in sequence)).hexdigest()[:12]
    target = Path(folder) / f'{sequence[-1].loader}-{kind}-{digest}'
    target.mkdir(parents=True, exist_ok=True)
    files = []
    for i, case in enumerate(sequence):
        name = f'case-{i:03d}{LOADERS[case.loader].suffix}'
        (target / name).write_bytes(case.data)
        files.append({'file': name, 'loader': case.loader, 'origin': case.origin})
    record = {'loader': sequence[-1].loader, 'kind': kind, 'detail': detail, 'cases': files}
    (target / 'finding.json').write_text(json.dumps(record, indent=1) + '\n')
    return target


def replay(target, loader=None):
    """Rerun a saved finding (folder) or one case file (`loader` names its loader); returns the failures."""
    target = Path(target)
    if target.is_dir():
        record = json.loads((target / 'finding.json').read_text())
        cases = [Case(c['loader'], (target / c['file']).read_bytes(), c['origin']) for c in record['cases']]
    else:
        cases = [Case(loader, target.read_bytes(), {'file': str(target)})]
    with tempfile.TemporaryDirectory(prefix='fuzz-') as tmp:
        results = run_batch(cases, tmp)
    for case, (kind, detail, _) in zip(cases, results):
        print(f'{case.loader}: {kind}: {detail}')
    return [r for r in results if r[0] != 'ok']

# ----------------------------------------------------------------------------------------------
# Command line.

def fuzz(names, count, seed, findings, minutes=None, batch=500, log=print):
    """Rounds of `count` cases per loader (seeds seed, seed+1, ...) until `minutes` are spent (or one round);
    returns {loader: [cases, failures, seconds inside the loader]}."""
    stop = time.monotonic() + 60 * minutes if minutes else None
    totals = {name: [0, 0, 0.0] for name in names}
    round_seed = seed
    while True:
        cases = [Case(name, data, dict(origin, seed=round_seed))
                 for name in names for data, origin in draw_cases(LOADERS[name], count, round_seed)]
        for start in range(0, len(cases), batch):
            for case, kind, _detail, seconds in run_cases(cases[start:start + batch], findings, log):
                total = totals[case.loader]
                total[:] = total[0] + 1, total[1] + (kind != 'ok'), total[2] + seconds
        log(f'round {round_seed}: ' + ', '.join(f'{n} {t[0]}/{t[1]}' for n, t in totals.items()))
        round_seed += 1
        if stop is None or time.monotonic() > stop:
            return totals


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m tests.fuzz_loaders', description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', help='fuzz the loaders')
    run.add_argument('--loaders', default='', help='comma-separated names (default: all)')
    run.add_argument('--cases', type=int, default=100, help='cases per loader and round')
    run.add_argument('--minutes', type=float, default=None, help='repeat rounds (new seeds) for this long')
    run.add_argument('--seed', type=int, default=0)
    run.add_argument('--findings', default='fuzz-findings')
    again = commands.add_parser('replay', help='rerun a saved finding')
    again.add_argument('target')
    again.add_argument('--loader', default=None, help='for a bare case file: its loader')
    commands.add_parser('worker').add_argument('batch')
    commands.add_parser('list')
    args = parser.parse_args(argv)
    if args.command == 'worker':
        return worker(args.batch)
    _register_all()
    if args.command == 'list':
        print('\n'.join(LOADERS))
        return 0
    if args.command == 'replay':
        return 1 if replay(args.target, args.loader) else 0
    names = [n for n in args.loaders.split(',') if n] or list(LOADERS)
    unknown = sorted(set(names) - set(LOADERS))
    if unknown:
        parser.error(f'--loaders: unknown {unknown}; known: {sorted(LOADERS)}')
    totals = fuzz(names, args.cases, args.seed, args.findings, args.minutes, log=lambda line: print(line, flush=True))
    for name, (count, failed, seconds) in totals.items():
        print(f'{name:20s} {count:7d} cases {failed:5d} failures {count / max(seconds, 1e-9):8.1f} cases/s')
    return 1 if any(failed for _, failed, _ in totals.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
