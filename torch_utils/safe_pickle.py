"""The one restricted unpickler of the project: every pickle it reads (network snapshots, training states of
other code, the class-embedding table, FID Inception weights, CIFAR-10 batches) goes through `RestrictedUnpickler`
with an allow-list chosen by that use (docs/checkpoint-format.md §2.3; what it promises: docs/threat-model.md).

Why: a pickle is a program. Safe by construction, not by list:
- `find_class` is the only way a stream reaches Python callables; it resolves only allow-listed (module, name)
  pairs, mostly to our own harmless functions;
- the opcodes that act on objects are our own: BUILD (set an object's state) only on our record classes,
  InertNode and numpy arrays/dtypes with validated state; NEWOBJ only on records and plain containers; item and
  list opcodes only on dicts/lists; INST/OBJ, extensions and out-of-band buffers are refused;
- numpy arrays and scalars only of plain numeric dtypes, rebuilt from their type string;
- a stream may run at most `MAX_OPCODES` opcodes, and no read allocates more than the file holds.
Zip-format torch files are read the same way: `*/data.pkl` goes through the restricted unpickler and each member's
declared size is checked (storage: numel × itemsize; all: an inflation budget) before it is read. TorchScript
archives (`code/`, `constants.pkl`) are refused, since torch would hand them to `torch.jit.load`, which runs their
code.

API (stable; other modules build on it):
  load(file, allowed, source, ...)   read a plain pickle or a zip-format torch file from a binary file object;
  load_path(path, allowed, ...)      the same for a local path;
  read_zip(archive, allowed, ...)    `*/data.pkl` of an open zipfile.ZipFile;
  is_torchscript(names)              whether zip member names are those of a TorchScript archive;
  RestrictedUnpickler                the unpickler itself;
  Record                             base of the stand-ins an allow-list maps pickled classes to (BUILD stores);
  InertNode                          optional fallback for unknown globals (inspection-only uses);
  TENSOR_GLOBALS, NUMPY_GLOBALS      allow-list building blocks: tensors/parameters/storages, numpy arrays/scalars;
  collect_tensors(tree, ...)         {attribute path: tensor} of a loaded tree (FID and ViT weight files).
Every error is a `pickle.UnpicklingError` whose message starts with the source (file name)."""
import collections
import importlib
import io
import math
import pickle
import reprlib
import struct
import zipfile

import numpy as np
import torch

from torch_utils import zip_members

ZIP_MAGIC = b'PK\x03\x04'
TRUNCATED = 'the file ends early (truncated or empty)'
STORAGE_DTYPES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
                  'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                  'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                  'BoolStorage': torch.bool, 'UntypedStorage': torch.uint8}
MAX_OPCODES = 10_000_000  # ~100x the opcodes of a large EDM snapshot; bounds the time of one load
MAX_OBJECTS = 10_000_000  # objects one walk of loaded data may visit (training/checkpoint.py, collect_tensors)
MAX_PICKLE_BYTES = 1 << 30  # a zip's data.pkl (real ones are kilobytes to a few megabytes)
ZIP_INFLATION, ZIP_SLACK = 8, 32 << 20  # members may inflate to 8x the archive + 32 MiB (torch stores them raw)
READ_CHUNK = 1 << 20
PLAIN_NUMPY_TYPES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16')
MAX_ARRAY_DIMS = 32
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxtuple, _short.maxlist = 60, 60, 3, 10, 10


def short_repr(value):
    """repr bounded in length and depth, for messages about untrusted data (a plain repr of a shared
    structure is exponential in its depth: a 500-byte pickle could take hours to print)."""
    return _short.repr(value)


class Record:
    """Base of the stand-ins an allow-list maps a pickled class to (e.g. a torch.nn container): NEWOBJ makes an
    empty one and BUILD may only store a plain dict as `state`. Nothing of the class it stands for runs."""

    def __setstate__(self, state):
        self.state = state


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


class _NotConstructible:
    """What ('numpy', 'ndarray') resolves to: a name `_reconstruct` recognises, never callable or instantiated."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NDARRAY = _NotConstructible('numpy.ndarray')


# ----------------------------------------------------------------------------------------------
# Safe versions of the tensor rebuilders torch writes (docs/checkpoint-format.md §2.3, §2.5). torch's own
# functions also install backward hooks and arbitrary attribute state taken from the stream; ours refuse both.
# A tensor's view is set once, here, after _check_view; no opcode can reach it afterwards (BUILD and item
# assignment on tensors are refused by the unpickler).

def _refuse_hooks(hooks, what):
    if hooks:
        raise pickle.UnpicklingError(f'{what} carries backward hooks, which would be code; refusing')


def _check_view(storage, offset, size, stride):
    # torch's set_ would silently grow a too-small storage (zeros, or a huge allocation) instead of failing.
    ints = [offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else [None]
    if not all(type(v) is int and v >= 0 for v in ints) or len(size) != len(stride):
        raise pickle.UnpicklingError(f'invalid tensor view: offset {_short.repr(offset)}, size {_short.repr(size)}, '
                                     f'stride {_short.repr(stride)}')
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if end > storage._size():
        raise pickle.UnpicklingError(f'tensor view (offset {offset}, size {_short.repr(tuple(size))}, stride '
                                     f'{_short.repr(tuple(stride))}) reaches beyond its storage of {storage._size()} '
                                     f'elements')


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2` without hooks; the view is checked against the storage first."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f'tensor storage is a {type(storage).__name__}, not a torch storage')
    _refuse_hooks(backward_hooks, 'a tensor')
    _check_view(storage, offset, tuple(size) if isinstance(size, (tuple, list)) else size,
                tuple(stride) if isinstance(stride, (tuple, list)) else stride)
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


def weights_only_reason(err):
    """One line for a failure of torch.load(weights_only=True): torch's message spans a dozen lines of advice
    (including to retry without weights_only, which would run the file's code); its own reason is the line
    after 'WeightsUnpickler error:'."""
    text = str(err)
    reason = text.split('WeightsUnpickler error:', 1)[1] if 'WeightsUnpickler error:' in text else text
    lines = [line for line in reason.splitlines() if line.strip()]
    return ' '.join((lines[0] if lines else '').split()[:60]) or type(err).__name__


def storage_from_legacy_bytes(data):
    """`torch.storage._load_from_bytes`: each storage of a snapshot pickle is a nested legacy torch.save stream
    (docs/checkpoint-format.md §2.5); torch's own weights-only loader reads it (and refuses anything else)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f'storage payload is a {type(data).__name__}, not bytes')
    declared = _declared_legacy_bytes(data)
    if declared > len(data):  # torch would reserve the declared size before reading a byte
        raise pickle.UnpicklingError(f'storage payload declares {declared:,} bytes of data but holds {len(data):,}')
    try:
        storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 — nothing runs (weights_only), so any failure is a malformed payload
        # (torch's legacy reader also fails by AssertionError); its message is a page of advice: keep the reason
        raise pickle.UnpicklingError(f'storage payload: {type(err).__name__}: {weights_only_reason(err)}') from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f'storage payload holds a {type(storage).__name__}, not a storage')
    return storage


def _declared_legacy_bytes(data):
    """Bytes of storage data a legacy torch.save stream declares: its first three pickles are plain data (magic
    number, protocol version, system info), the fourth names each storage with its numel (§2.5)."""
    stream, declared = io.BytesIO(data), []
    for _ in range(3):
        RestrictedUnpickler(stream, {}).load()
    RestrictedUnpickler(stream, TENSOR_GLOBALS, storage=lambda dtype, key, numel: declared.append(
        numel * torch.empty(0, dtype=dtype).element_size())).load()
    return sum(declared)


def encode_latin1(text, encoding='latin1'):
    """`_codecs.encode` as protocol-2 pickles use it to write bytes; only that encoding."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f'_codecs.encode with encoding {_short.repr(encoding)} is not allowed '
                                     f'(only latin1)')
    return text.encode('latin1')

# ----------------------------------------------------------------------------------------------
# numpy: arrays and scalars of plain numeric dtypes only. A pickled dtype's state could clear its flags (an object
# dtype that claims to hold no objects makes numpy read raw bytes as pointers), so dtypes are made from their type
# string only, a BUILD may only repeat their canonical state, and arrays/scalars use a dtype rebuilt from its
# `str`.

def _multiarray():
    try:
        return importlib.import_module('numpy._core.multiarray')  # NumPy >= 2
    except ImportError:
        return importlib.import_module('numpy.core.multiarray')


def _plain_dtype(dtype):
    """The canonical dtype for `dtype` (an np.dtype of a plain numeric type), rebuilt from its type string."""
    text = dtype.str if isinstance(dtype, np.dtype) else None
    if text is None or text[:1] not in '<>|' or text[1:] not in PLAIN_NUMPY_TYPES:
        raise pickle.UnpicklingError(f'numpy dtype {_short.repr(dtype)} is not allowed (only plain numeric types: '
                                     f'{", ".join(PLAIN_NUMPY_TYPES)})')
    return np.dtype(text)


def numpy_dtype(spec, align=False, copy=False):
    """`numpy.dtype(spec, align, copy)` as numpy pickles it (`('f8', False, True)`; Python-2 pickles such as
    CIFAR-10's: `('u1', 0, 1)`): a fresh plain dtype."""
    if not isinstance(spec, str) or spec not in PLAIN_NUMPY_TYPES or type(align) not in (bool, int) or align:
        raise pickle.UnpicklingError(f'numpy dtype {_short.repr(spec)} is not allowed (only plain numeric types: '
                                     f'{", ".join(PLAIN_NUMPY_TYPES)})')
    return np.dtype(spec, False, True)  # a copy: its (checked) BUILD must not touch numpy's shared instance


def _build_dtype(dtype, state):
    byteorders = ('|',) if dtype.itemsize == 1 else ('<', '>', '=')
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in byteorders
            and state[2:] == (None, None, None, -1, -1, 0)):
        raise pickle.UnpicklingError(f'numpy dtype state {_short.repr(state)} is not the plain state of '
                                     f'{dtype.str[1:]}; refusing it')
    dtype.__setstate__(state)


def _raw_bytes(data, what):
    if isinstance(data, str):  # Python-2 pickles (CIFAR-10) hold raw data as latin1 text
        data = data.encode('latin1')
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f'{what} data is a {type(data).__name__}, not raw bytes')
    return data


def _build_array(array, state):
    """ndarray.__setstate__ after checking (version 1, shape, plain dtype, fortran flag, raw bytes of the size)."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[1], tuple)
            and len(state[1]) <= MAX_ARRAY_DIMS and all(type(n) is int and 0 <= n < 1 << 40 for n in state[1])
            and type(state[3]) is bool):
        raise pickle.UnpicklingError(f'numpy array state {_short.repr(state)} is not (1, shape, dtype, fortran, '
                                     f'bytes); refusing it')
    _, shape, dtype, fortran, data = state
    dtype, data = _plain_dtype(dtype), _raw_bytes(data, 'numpy array')
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f'numpy array of shape {_short.repr(shape)} and dtype {dtype.str[1:]} has '
                                     f'{len(data)} bytes of data, expected {math.prod(shape) * dtype.itemsize}')
    array.__setstate__((1, shape, dtype, fortran, data))


def numpy_reconstruct(cls, shape, typecode):
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`: the empty array a BUILD then fills."""
    if cls is not NDARRAY or shape != (0,) or typecode not in (b'b', 'b'):
        raise pickle.UnpicklingError(f'refusing numpy _reconstruct{_short.repr((cls, shape, typecode))} (only '
                                     f'plain numpy arrays)')
    return np.empty(0, np.int8)


def numpy_scalar(dtype, data=None):
    """`numpy.core.multiarray.scalar(dtype, raw bytes)` of a plain numeric dtype."""
    dtype, data = _plain_dtype(dtype), _raw_bytes(data, 'numpy scalar')
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f'numpy scalar of dtype {dtype.str[1:]} has {len(data)} bytes, expected '
                                     f'{dtype.itemsize}')
    return _multiarray().scalar(dtype, data)


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
    allowed = {('numpy', 'dtype'): numpy_dtype, ('numpy', 'ndarray'): NDARRAY}
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # NumPy 1 writes the first, NumPy 2 the second
        allowed[(module, 'scalar')] = numpy_scalar
        allowed[(module, '_reconstruct')] = numpy_reconstruct
    return allowed


TENSOR_GLOBALS = _tensor_globals()
NUMPY_GLOBALS = _numpy_globals()

# ----------------------------------------------------------------------------------------------
# The unpickler: pickle's pure-Python machine with our own handlers for every opcode that acts on an object.

def _type_name(obj):
    cls = obj if isinstance(obj, type) else type(obj)
    return f'{cls.__module__}.{cls.__qualname__}'


def _reading_what_exists(read):
    """`file.read(n)` that allocates no more than the file holds (pickle length fields come from the stream, and
    a buffered read of n bytes reserves n bytes first); a short read is the end of the file."""
    def read_exactly(n=-1):
        if n is None or n < 0:
            return read(n)
        parts, left = [], n
        while left > 0:
            part = read(min(left, READ_CHUNK))
            if not part:
                raise EOFError
            parts.append(part)
            left -= len(part)
        return parts[0] if len(parts) == 1 else b''.join(parts)
    return read_exactly


def _is_dict_like(obj):  # SETITEM(S) may only fill dicts whose item assignment is dict's own
    return isinstance(obj, dict) and type(obj).__setitem__ in (dict.__setitem__, collections.OrderedDict.__setitem__)


def _refuse_opcode(name, why):
    def refuse(self):
        raise pickle.UnpicklingError(f'opcode {name} is not allowed ({why})')
    return refuse


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only `allowed` {(module, name): object}; any other global raises naming it and `source`
    (or becomes `inert`, e.g. InertNode, when given). `storage(dtype, key, numel)` serves the persistent ids
    `('storage', <dtype>, key, location, numel)` of zip-format files; plain pickles have none.
    `hint` is appended to refusals (e.g. how to opt in to trusted loading). At most `max_opcodes` opcodes run."""
    dispatch = dict(pickle._Unpickler.dispatch)
    max_opcodes = MAX_OPCODES

    def __init__(self, file, allowed, source='<stream>', inert=None, storage=None, hint='', **kwargs):
        super().__init__(file, **kwargs)
        self._file_read = _reading_what_exists(self._file_read)
        self.allowed, self.source, self.inert, self.storage, self.hint = allowed, source, inert, storage, hint
        self.storages = {}

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is not None:
            return obj
        if self.inert is not None:
            return self.inert
        raise pickle.UnpicklingError(f'{self.source}: global {_short.repr(module)[1:-1]}.{_short.repr(name)[1:-1]} '
                                     f'is not allowed in this kind of file (refused; nothing in the file was run)'
                                     f'{". " + self.hint if self.hint else ""}')

    def load(self):
        """pickle's loop, counting opcodes (the budget bounds the time and memory one stream can cost)."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readinto, self.readline = self._unframer.read, self._unframer.readinto, self._unframer.readline
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch = self.read, self.dispatch
        try:
            for _ in range(self.max_opcodes):
                key = read(1)
                if not key:
                    raise EOFError
                handler = dispatch.get(key[0])
                if handler is None:
                    raise pickle.UnpicklingError(f'invalid load key, {key!r}')
                handler(self)
        except pickle._Stop as stop:
            return stop.value
        raise pickle.UnpicklingError(f'the pickle holds more than {self.max_opcodes:,} objects (opcodes); refusing '
                                     f'it')

    def persistent_load(self, pid):
        ok = (self.storage is not None and isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'
              and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and type(pid[4]) is int
              and pid[4] >= 0)
        if not ok:
            raise pickle.UnpicklingError(f'unsupported persistent id {_short.repr(pid)}')
        if pid[2] not in self.storages:  # tensors sharing a storage get the same one
            self.storages[pid[2]] = self.storage(pid[1], pid[2], pid[4])
        return self.storages[pid[2]]

    # Opcodes that act on objects. -----------------------------------------------------------

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, InertNode):
            inst.state = state
        elif isinstance(inst, Record):
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise pickle.UnpicklingError(f'state of a {type(inst).__name__} is not a dict of attributes')
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            _build_array(inst, state)
        elif isinstance(inst, np.dtype):
            _build_dtype(inst, state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) == {'_metadata'}:
            pass  # a state dict's per-module versions: nothing of ours reads them
        else:
            raise pickle.UnpicklingError(f'BUILD (setting the state) of a {_type_name(inst)} is not allowed (only of '
                                         f'records, numpy arrays and dtypes); refusing it')
    dispatch[pickle.BUILD[0]] = load_build

    def _new(self, cls, args, kwargs):
        plain = (isinstance(cls, type) and (issubclass(cls, (Record, InertNode)) or cls in (list, set, dict)
                                             or (_is_dict_like_type(cls) and cls.__new__ is dict.__new__)))
        if not plain or not isinstance(args, tuple) or not isinstance(kwargs, dict):
            name = _type_name(cls) if isinstance(cls, type) else _short.repr(cls)
            raise pickle.UnpicklingError(f'NEWOBJ (creating an instance) of {name} is not allowed (only of records '
                                         f'and plain containers); refusing it')
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_newobj(self):
        args = self.stack.pop()
        self._new(self.stack.pop(), args, {})
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        self._new(self.stack.pop(), args, kwargs)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        containers_only = isinstance(func, type) and not issubclass(func, (Record, InertNode))
        if not isinstance(args, tuple) or (containers_only and not all(
                isinstance(a, (list, tuple, dict, set, frozenset)) for a in args)):
            raise pickle.UnpicklingError(f'REDUCE (a call) of {_short.repr(func)} with arguments {_short.repr(args)} '
                                         f'is not allowed; refusing it')
        self.stack[-1] = func(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _filled(self, accept, opcode):
        target = self.stack[-1]
        if not (accept(target) or isinstance(target, InertNode)):
            raise pickle.UnpicklingError(f'{opcode} on a {_type_name(target)} is not allowed; refusing it')
        return target

    def load_append(self):
        value = self.stack.pop()
        self._filled(lambda t: type(t) is list, 'APPEND').append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._filled(lambda t: type(t) is list, 'APPENDS').extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._filled(_is_dict_like, 'SETITEM')[key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        target = self._filled(_is_dict_like, 'SETITEMS')
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise pickle.UnpicklingError(f'ADDITEMS on a {_type_name(target)} is not allowed; refusing it')
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    for _opcode, _why in [(pickle.INST, 'protocol-0 class instances'), (pickle.OBJ, 'protocol-1 class instances'),
                          (pickle.EXT1, 'extension registry'), (pickle.EXT2, 'extension registry'),
                          (pickle.EXT4, 'extension registry'), (pickle.BYTEARRAY8, 'protocol-5 buffers'),
                          (pickle.NEXT_BUFFER, 'protocol-5 buffers'), (pickle.READONLY_BUFFER, 'protocol-5 buffers')]:
        dispatch[_opcode[0]] = _refuse_opcode(_opcode.decode('latin1'), _why)
    del _opcode, _why


def _is_dict_like_type(cls):
    return issubclass(cls, dict) and cls.__setitem__ in (dict.__setitem__, collections.OrderedDict.__setitem__)


def is_torchscript(names):
    """TorchScript archives hold compiled code (`<root>/code/…`) and `<root>/constants.pkl`."""
    return any(n.count('/') >= 1 and (n.split('/', 1)[1].startswith('code/') or n.split('/', 1)[1] == 'constants.pkl')
               for n in names)

# ----------------------------------------------------------------------------------------------
# Zip-format torch files: every member's declared size is checked before it is read.

class _ZipMembers:
    """Reads members of one archive; together they may inflate to ZIP_INFLATION × the archive + ZIP_SLACK."""

    def __init__(self, archive, source):
        self.archive, self.source = archive, source
        self.archive_bytes = zip_members.archive_bytes(archive)
        self.left = self.limit = ZIP_INFLATION * self.archive_bytes + ZIP_SLACK

    def info(self, name, what):
        try:
            return self.archive.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f'{self.source}: {what} is missing from the archive') from None

    def read(self, info):
        overrun = zip_members.compressed_overrun(info, self.archive_bytes)
        if overrun:
            raise pickle.UnpicklingError(f'{self.source}: member {_short.repr(info.filename)} {overrun}')
        if info.file_size > self.left:
            raise pickle.UnpicklingError(f'{self.source}: member {_short.repr(info.filename)} declares '
                                         f'{info.file_size:,} bytes; the archive of {self.archive_bytes:,} bytes may '
                                         f'inflate to at most {self.limit:,}; refusing it')
        self.left -= info.file_size
        return self.archive.read(info)


def _zip_storage(members, root):
    def storage(dtype, key, numel):
        info = members.info(f'{root}data/{key}', f'storage {_short.repr(key)}')
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if info.file_size != numel * itemsize:
            raise pickle.UnpicklingError(f'{members.source}: storage {_short.repr(key)} has {info.file_size} bytes, '
                                         f'expected {numel}×{itemsize}')
        data = members.read(info)
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
    members, root = _ZipMembers(archive, source), pickles[0][:-len('data.pkl')]
    if f'{root}byteorder' in names:
        info = members.info(f'{root}byteorder', 'byteorder')
        if info.file_size > 16 or members.read(info) != b'little':
            raise pickle.UnpicklingError(f'{source}: big-endian torch files are not supported')
    info = members.info(pickles[0], 'data.pkl')
    if info.file_size > MAX_PICKLE_BYTES:
        raise pickle.UnpicklingError(f'{source}: data.pkl declares {info.file_size:,} bytes, more than '
                                     f'{MAX_PICKLE_BYTES:,}; refusing it')
    unpickler = RestrictedUnpickler(io.BytesIO(members.read(info)), allowed, source, inert=inert,
                                    storage=_zip_storage(members, root), hint=hint)
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
        message = ' '.join(str(err).split())  # one line, whatever raised it
        if message in ('pickle data was truncated', 'pickle exhausted before end of frame'):
            message = TRUNCATED
        raise pickle.UnpicklingError(message if message.startswith(source) else f'{source}: {message}') from None
    except EOFError:
        raise pickle.UnpicklingError(f'{source}: {TRUNCATED}') from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise pickle.UnpicklingError(f'{source}: corrupt zip archive ({err})') from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError, OverflowError,
            UnicodeDecodeError, ImportError, MemoryError, RecursionError, struct.error) as err:
        raise pickle.UnpicklingError(f'{source}: not a readable pickle of the expected kind '
                                     f'({err.__class__.__name__}: {_first_line(err)})') from None


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ''


def load_path(path, allowed, source=None, **kwargs):
    """`load` for a local file path; errors name `source` (default: the path)."""
    with open(path, 'rb') as f:
        return load(f, allowed, str(path) if source is None else source, **kwargs)


def collect_tensors(obj, prefix, out, limit=MAX_OBJECTS):
    """Flatten a tree of nodes/dicts into `{dotted attribute path: tensor}`; nn.Module instance dicts
    contribute their `_parameters/_buffers/_modules` under the module's own path. Each node or dict is walked
    once (the first path reaching it names its tensors), so shared or cyclic data cost their size, not their
    paths; more than `limit` of them raise. Tensors are recorded under every path (tied weights keep both names)."""
    stack, seen = [(obj, prefix)], set()
    while stack:
        node, path = stack.pop()
        if isinstance(node, torch.Tensor):
            out[path] = node
            continue
        if not isinstance(node, (InertNode, dict)) or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > limit:
            raise ValueError(f'more than {limit:,} nodes to search for tensors; refusing the file')
        if isinstance(node, InertNode):
            stack += [(node.items, path), (node.state, path)]  # popped in reverse: state first
            continue
        children = []
        for key, value in node.items():
            if key in ('_parameters', '_buffers', '_modules'):
                children.append((value, path))
            elif isinstance(key, str) and not key.startswith('_'):
                children.append((value, f'{path}.{key}' if path else key))
        stack += reversed(children)
    return out
