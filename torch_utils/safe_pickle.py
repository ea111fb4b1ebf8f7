"""The one restricted unpickler of the project: every pickle it reads (network snapshots, training states of
other code, the class-embedding table, FID Inception weights, CIFAR-10 batches) goes through `RestrictedUnpickler`
with an allow-list chosen by that use (docs/checkpoint-format.md §2.3).

Why: a pickle is a program. `find_class` is the only way a stream can reach Python callables, so resolving only
allow-listed (module, name) pairs — to our own harmless functions — means nothing in a file ever runs. Zip-format
torch files are read the same way: `*/data.pkl` goes through the restricted unpickler and its storages are read
from the archive; TorchScript archives (`code/`, `constants.pkl`) are refused, since torch would hand them to
`torch.jit.load`, which runs their code (issue 12.1).

API (stable; other modules build on it):
  load(file, allowed, source, ...)   read a plain pickle or a zip-format torch file from a binary file object;
  load_path(path, allowed, ...)      the same for a local path;
  read_zip(archive, allowed, ...)    `*/data.pkl` of an open zipfile.ZipFile;
  is_torchscript(names)              whether zip member names are those of a TorchScript archive;
  RestrictedUnpickler                the unpickler itself (find_class + zip storages);
  InertNode                          optional fallback for unknown globals (inspection-only uses);
  TENSOR_GLOBALS, NUMPY_GLOBALS      allow-list building blocks: tensors/parameters/storages, numpy arrays/scalars.
Every error is a `pickle.UnpicklingError` whose message starts with the source (file name)."""
import collections
import importlib
import io
import pickle
import zipfile

import torch

ZIP_MAGIC = b'PK\x03\x04'
TRUNCATED = 'the file ends early (truncated or empty)'
STORAGE_DTYPES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
                  'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                  'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                  'BoolStorage': torch.bool, 'UntypedStorage': torch.uint8}


class InertNode:
    """Stand-in for any global a pickle names when the use allows unknown globals (inspection only, e.g. the FID
    detector's tensors): it keeps the arguments, state and items it is given and runs nothing."""

    def __new__(cls, *args, **kwargs):
        node = object.__new__(cls)
        node.args, node.state, node.items, node.list = args, None, {}, []
        return node

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):  # a node used as a callable (REDUCE on a node) yields another node
        return InertNode(*args)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses (e.g. EasyDict) are filled item by item
        self.items[key] = value

    def append(self, value):  # list subclasses
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

# ----------------------------------------------------------------------------------------------
# Safe versions of the tensor rebuilders torch writes (docs/checkpoint-format.md §2.3, §2.5). torch's own
# functions also install backward hooks and arbitrary attribute state taken from the stream; ours refuse both.

def _refuse_hooks(hooks, what):
    if hooks:
        raise pickle.UnpicklingError(f'{what} carries backward hooks, which would be code; refusing')


def _check_view(storage, offset, size, stride):
    # torch's set_ would silently grow a too-small storage (zeros, or a huge allocation) instead of failing.
    ints = [offset, *size, *stride]
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise pickle.UnpicklingError(f'invalid tensor view: offset {offset!r}, size {size!r}, stride {stride!r}')
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if end > storage._size():
        raise pickle.UnpicklingError(f'tensor view (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) '
                                     f'reaches beyond its storage of {storage._size()} elements')


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2` without hooks; torch checks size/stride against the storage."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f'tensor storage is a {type(storage).__name__}, not a torch storage')
    _refuse_hooks(backward_hooks, 'a tensor')
    _check_view(storage, offset, size, stride)
    tensor = torch._utils._rebuild_tensor(storage, offset, size, stride)
    if metadata:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, bool)
                                                     for k, v in metadata.items()):
            raise pickle.UnpicklingError('tensor metadata is not a dict of flags')
        torch._utils.set_tensor_metadata(tensor, metadata)
    tensor.requires_grad = bool(requires_grad)
    return tensor


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """`_rebuild_parameter` / `_rebuild_parameter_with_state` without hooks or extra attributes."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f'parameter data is a {type(data).__name__}, not a tensor')
    _refuse_hooks(backward_hooks, 'a parameter')
    if state:
        raise pickle.UnpicklingError('a parameter carries extra attribute state; refusing')
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def storage_from_legacy_bytes(data):
    """`torch.storage._load_from_bytes`: each storage of a snapshot pickle is a nested legacy torch.save stream
    (docs/checkpoint-format.md §2.5); torch's own weights-only loader reads it (and refuses anything else)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f'storage payload is a {type(data).__name__}, not bytes')
    storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f'storage payload holds a {type(storage).__name__}, not a storage')
    return storage


def encode_latin1(text, encoding='latin1'):
    """`_codecs.encode` as protocol-2 pickles use it to write bytes; only that encoding."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r} is not allowed (only latin1)')
    return text.encode('latin1')


def _multiarray():
    try:
        return importlib.import_module('numpy._core.multiarray')  # NumPy >= 2
    except ImportError:
        return importlib.import_module('numpy.core.multiarray')


def _numpy_scalar(dtype, *args):
    import numpy as np
    if not isinstance(dtype, np.dtype) or dtype.hasobject:  # an object scalar would be built from raw bytes
        raise pickle.UnpicklingError(f'refusing numpy scalar of dtype {dtype!r}')
    return _multiarray().scalar(dtype, *args)


def _numpy_reconstruct(cls, *args):
    import numpy as np
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f'refusing numpy array of class {cls!r}')
    return _multiarray()._reconstruct(cls, *args)


def _tensor_globals():
    rebuilders = {
        ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
        ('torch._utils', '_rebuild_parameter'): rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): rebuild_parameter,
        ('torch.storage', '_load_from_bytes'): storage_from_legacy_bytes,
        ('torch', 'Size'): torch.Size,
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('builtins', 'set'): set,
        ('__builtin__', 'set'): set,  # protocol-2 name (torch.save streams)
        ('_codecs', 'encode'): encode_latin1,
    }
    # Storage classes appear only inside zip persistent ids; they resolve to plain dtypes (not callables).
    rebuilders.update({('torch', name): dtype for name, dtype in STORAGE_DTYPES.items()})
    return rebuilders


def _numpy_globals():
    import numpy as np
    allowed = {('numpy', 'dtype'): np.dtype, ('numpy', 'ndarray'): np.ndarray}
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # NumPy 1 writes the first, NumPy 2 the second
        allowed[(module, 'scalar')] = _numpy_scalar
        allowed[(module, '_reconstruct')] = _numpy_reconstruct
    return allowed


TENSOR_GLOBALS = _tensor_globals()
NUMPY_GLOBALS = _numpy_globals()

# ----------------------------------------------------------------------------------------------
# The unpickler.

def _refuse_hooked_tensors(root):
    """BUILD on a tensor runs Tensor.__setstate__, which installs backward hooks from the stream (only allow-listed
    callables can get there, but hooks are code paths nobody asked for): refuse any loaded tensor that has them."""
    stack, seen = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if getattr(obj, '_backward_hooks', None):
                raise pickle.UnpicklingError('a tensor carries backward hooks, which would be code; refusing')
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__ == 'numpy' and getattr(getattr(obj, 'dtype', None), 'hasobject', False):
            stack.extend(obj.flat)
        elif hasattr(obj, '__dict__') and not isinstance(obj, type):
            stack.append(vars(obj))


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `allowed` {(module, name): object}; any other global raises naming it and `source`
    (or becomes `inert`, e.g. InertNode, when given). `storage(dtype, key, numel)` serves the persistent ids
    `('storage', <dtype>, key, location, numel)` of zip-format files; plain pickles have none.
    `hint` is appended to refusals (e.g. how to opt in to trusted loading)."""

    def __init__(self, file, allowed, source='<stream>', inert=None, storage=None, hint='', **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.source, self.inert, self.storage, self.hint = allowed, source, inert, storage, hint
        self.storages = {}

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is not None:
            return obj
        if self.inert is not None:
            return self.inert
        raise pickle.UnpicklingError(f'{self.source}: global {module}.{name} is not allowed in this kind of file '
                                     f'(refused; nothing in the file was run){". " + self.hint if self.hint else ""}')

    def load(self):
        obj = super().load()
        _refuse_hooked_tensors(obj)
        return obj

    def persistent_load(self, pid):
        ok = (self.storage is not None and isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'
              and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and isinstance(pid[4], int))
        if not ok:
            raise pickle.UnpicklingError(f'{self.source}: unsupported persistent id {pid!r}')
        if pid[2] not in self.storages:  # tensors sharing a storage get the same one
            self.storages[pid[2]] = self.storage(pid[1], pid[2], pid[4])
        return self.storages[pid[2]]


def is_torchscript(names):
    """TorchScript archives hold compiled code (`<root>/code/…`) and `<root>/constants.pkl`."""
    return any(n.count('/') >= 1 and (n.split('/', 1)[1].startswith('code/') or n.split('/', 1)[1] == 'constants.pkl')
               for n in names)


def _zip_storage(archive, root, source):
    def storage(dtype, key, numel):
        try:
            data = archive.read(f'{root}data/{key}')
        except KeyError:
            raise pickle.UnpicklingError(f'{source}: storage {key!r} is missing from the archive') from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if len(data) != numel * itemsize:
            raise pickle.UnpicklingError(f'{source}: storage {key!r} has {len(data)} bytes, '
                                         f'expected {numel}×{itemsize}')
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)
    return storage


def read_zip(archive, allowed, source, inert=None, hint='', torchscript_data=False):
    """Unpickle `<root>/data.pkl` of a zip-format torch file with storages from `<root>/data/`. TorchScript
    archives are refused unless `torchscript_data` (then only their data.pkl is read: no code is loaded)."""
    names = archive.namelist()
    if is_torchscript(names) and not torchscript_data:
        raise pickle.UnpicklingError(f'{source}: is a TorchScript archive (it has code/ and constants.pkl members); '
                                     f'refusing it: loading TorchScript runs the code inside the file. Expected a '
                                     f'pickle or a torch.save file of tensors and plain data')
    pickles = [n for n in names if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pickles) != 1:
        raise pickle.UnpicklingError(f'{source}: zip file without exactly one <root>/data.pkl; not a torch.save file')
    root = pickles[0][:-len('data.pkl')]
    if f'{root}byteorder' in names and archive.read(f'{root}byteorder') != b'little':
        raise pickle.UnpicklingError(f'{source}: big-endian torch files are not supported')
    unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), allowed, source, inert=inert,
                                    storage=_zip_storage(archive, root, source), hint=hint)
    return unpickler.load()


def load(file, allowed, source='<stream>', inert=None, hint='', torchscript_data=False, encoding='ASCII'):
    """Read a plain pickle or a zip-format torch file from the seekable binary `file`. Truncated or malformed
    streams raise `pickle.UnpicklingError` naming `source` (nothing in them has run)."""
    try:
        head = file.read(4)
        file.seek(0)
        if head == ZIP_MAGIC:
            with zipfile.ZipFile(file) as archive:
                return read_zip(archive, allowed, source, inert=inert, hint=hint, torchscript_data=torchscript_data)
        if head[:1] != b'\x80':  # PROTO opcode: every pickle of protocol 2+ (all the project reads) starts with it
            raise pickle.UnpicklingError(f'{source}: not a pickle or a zip-format torch file (it starts with '
                                         f'{head!r})' if head else TRUNCATED)
        return RestrictedUnpickler(file, allowed, source, inert=inert, hint=hint, encoding=encoding).load()
    except pickle.UnpicklingError as err:
        message = str(err)
        if message == 'pickle data was truncated':
            message = TRUNCATED
        raise pickle.UnpicklingError(message if message.startswith(source) else f'{source}: {message}') from None
    except EOFError:
        raise pickle.UnpicklingError(f'{source}: {TRUNCATED}') from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise pickle.UnpicklingError(f'{source}: corrupt zip archive ({err})') from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError, OverflowError,
            UnicodeDecodeError, ImportError) as err:  # malformed opcodes or arguments
        raise pickle.UnpicklingError(f'{source}: not a readable pickle of the expected kind '
                                     f'({err.__class__.__name__}: {err})') from None


def load_path(path, allowed, source=None, **kwargs):
    """`load` for a local file path; errors name `source` (default: the path)."""
    with open(path, 'rb') as f:
        return load(f, allowed, str(path) if source is None else source, **kwargs)
