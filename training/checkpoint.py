"""Network checkpoint file formats: EDM/D2O snapshot pickles (read safely by default), our own snapshots, and
constructor records for training states. (Building a generator from a teacher is training/generator.py.)

Safe loading (docs/checkpoint-format.md §2.3–2.4): the project's restricted unpickler
(torch_utils/safe_pickle.py) resolves only an allow-list of globals (tensor/storage rebuilders, numpy
scalars, OrderedDict, ...); zip-format files are read the same way and TorchScript archives are refused.
EDM's persistence global `torch_utils.persistence._reconstruct_persistent_obj` is mapped to
`PersistentRecord`, which keeps the class name and instance dict and drops the embedded module source
unread. Records of our network classes are then rebuilt from their constructor record (`_init_kwargs`)
and filled by name with the pickled tensors; every other record (EDMLoss, AugmentPipe, ...) stays an
inert record.
"""
import copy
import inspect
import math
import pickle
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import persistence, safe_pickle
from training import networks

NETWORK_CLASSES = {obj.__name__: obj for obj in vars(networks).values()
                   if isinstance(obj, type) and persistence.is_persistent(obj)}
UNSAFE_HINT = ('If you trust this file, pass allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle); that unpickles it '
               'with plain pickle and runs any code it carries.')

#----------------------------------------------------------------------------
# Restricted unpickling (torch_utils/safe_pickle.py; allow-list of docs/checkpoint-format.md §2.3).

class PersistentRecord(safe_pickle.Record):
    """A persistent object read in safe mode: class name + instance dict (plain data and tensors).
    Nothing of it is executed; network records are turned into modules by `load_snapshot`."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f'PersistentRecord({self.class_name!r})'


class _ModuleDictRecord(PersistentRecord):
    """Stands in for torch.nn.ModuleDict (`enc`/`dec`), which is pickled as NEWOBJ + BUILD."""

    def __setstate__(self, state):
        self.class_name = 'ModuleDict'
        self.state = state


def _record_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != persistence.FORMAT_VERSION:
        raise pickle.UnpicklingError(f'Unsupported persistent object record (expected type \'class\', version '
                                     f'{persistence.FORMAT_VERSION})')
    if not isinstance(meta.get('class_name'), str) or not isinstance(meta.get('state'), dict):
        raise pickle.UnpicklingError('Persistent object record lacks class_name/state')
    return PersistentRecord(meta['class_name'], meta['state'])  # meta['module_src'] is never run


SNAPSHOT_GLOBALS = {
    **safe_pickle.TENSOR_GLOBALS,
    **safe_pickle.NUMPY_GLOBALS,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _record_persistent_obj,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictRecord,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
}

#----------------------------------------------------------------------------
# Rebuilding our network classes from records (or from live modules of unsafe pickles).

def _node_class_name(node):
    return node.class_name if isinstance(node, PersistentRecord) else type(node).__name__


def _node_state(node):
    return node.state if isinstance(node, PersistentRecord) else node.__dict__


def _node_tensors(node, prefix=''):
    """{dotted name: tensor} of every parameter and persistent buffer, like state_dict()."""
    state = _node_state(node)
    non_persistent = state.get('_non_persistent_buffers_set', set())
    tensors = {prefix + name: t for name, t in state.get('_parameters', {}).items() if t is not None}
    tensors.update({prefix + name: t for name, t in state.get('_buffers', {}).items()
                    if t is not None and name not in non_persistent})
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            tensors.update(_node_tensors(child, f'{prefix}{name}.'))
    return tensors


def _is_plain(value):
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def _same_value(a, b):
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)) and not isinstance(a, bool):
        return a == b or math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def _check_structure(node, module, path, source):
    """The record must describe the module we rebuilt: same classes and same plain attributes
    (e.g. sigma_min, skip_scale, num_heads), so the stored numbers mean what our code assumes."""
    if _node_class_name(node) != type(module).__name__:
        raise ValueError(f'{source}: {path or "<root>"} is a {_node_class_name(node)} in the checkpoint but '
                         f'{type(module).__name__} when rebuilt from its constructor record')
    state, where = _node_state(node), path or '<root>'
    if not all(isinstance(key, str) for key in state) or not isinstance(state.get('_modules', {}), dict):
        raise ValueError(f'{source}: {where} has attribute names that are not strings or _modules that is not a dict')
    for key, value in state.items():
        ours = module.__dict__.get(key, value)  # attributes only the file has (e.g. D2O's SongUNet.augment_dim) pass
        if key.startswith('_') or key == 'training' or not _is_plain(value) or not _is_plain(ours):
            continue
        if not _same_value(value, ours):
            raise ValueError(f'{source}: attribute {path + "." if path else ""}{key} is {value!r} in the checkpoint '
                             f'but {ours!r} when rebuilt; the file was written by incompatible code')
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            _check_structure(child, getattr(module, name, None), f'{path}.{name}' if path else name, source)


# Bounds of a constructor record, checked before anything is built: generous over every EDM/ADM/EDM2 config
# (EDM's ADM ImageNet-64: model_channels 192, channel_mult [1,2,3,4], num_blocks 3), tight enough that a record
# is refused in milliseconds instead of costing minutes and gigabytes (docs/threat-model.md §1).
CONSTRUCTOR_INT_LIMITS = {'img_resolution': 4096, 'img_channels': 64, 'in_channels': 64, 'out_channels': 128,
                          'label_dim': 100_000, 'augment_dim': 64, 'model_channels': 1024, 'channel_mult_emb': 16,
                          'channel_mult_noise': 16, 'num_blocks': 16}
CONSTRUCTOR_LIST_LIMITS = {'channel_mult': 16, 'attn_resolutions': 4096}  # per entry; other lists: any number
CONSTRUCTOR_LIST_LENGTHS = {'channel_mult': 8}  # levels; other lists: MAX_CONSTRUCTOR_LIST entries
MAX_CONSTRUCTOR_LIST, MAX_CONSTRUCTOR_INT, MAX_CONSTRUCTOR_STR = 16, 1_000_000, 64
MAX_PARAMETERS = 2_000_000_000  # estimated from the record; EDM's largest network has ~300M


def _constructor_arguments(cls, args, kwargs):
    """{name: value} of every argument the constructor of `cls` (and of a preconditioner's U-Net) will see."""
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise TypeError(f'_init_args/_init_kwargs are {type(args).__name__}/{type(kwargs).__name__}')
    bound = inspect.signature(cls.__mro__[1]).bind(*args, **kwargs)  # __mro__[1]: the class under persistence's
    bound.apply_defaults()
    values = dict(bound.arguments)
    model_kwargs = values.pop('model_kwargs', None)
    if model_kwargs is not None:
        unet = networks._MODEL_TYPES.get(values['model_type']) if isinstance(values['model_type'], str) else None
        if unet is None:
            raise TypeError(f'model_type={_short(values["model_type"])} is not one of {list(networks._MODEL_TYPES)}')
        inner = inspect.signature(unet.__mro__[1]).bind_partial(**model_kwargs)
        inner.apply_defaults()
        values.update(inner.arguments)
    return values


def _check_bound(name, value):
    """None if `value` is a plain constructor argument within the bounds, else what is wrong with it."""
    if isinstance(value, (list, tuple)):
        limit = CONSTRUCTOR_LIST_LIMITS.get(name, MAX_CONSTRUCTOR_INT)
        length = CONSTRUCTOR_LIST_LENGTHS.get(name, MAX_CONSTRUCTOR_LIST)
        if len(value) > length:
            return f'has {len(value)} entries (at most {length})'
        return next((f'entry {_short(v)} is not a number in [0, {limit}]' for v in value if isinstance(v, bool) or
                     not isinstance(v, (int, float)) or not 0 <= v <= limit), None)
    if value is None or isinstance(value, (bool, float, np.floating)):
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_CONSTRUCTOR_STR else f'is a string of {len(value)} characters'
    if isinstance(value, (int, np.integer)):
        limit = CONSTRUCTOR_INT_LIMITS.get(name, MAX_CONSTRUCTOR_INT)
        return None if 0 <= value <= limit else f'is out of bounds (expected 0..{limit})'
    return f'is a {type(value).__name__}, not plain data'


def _parameter_estimate(values):
    channels = [values['model_channels'] * m for m in values['channel_mult']]
    emb = values['model_channels'] * values['channel_mult_emb']
    blocks = 2 * values['num_blocks'] + 1  # encoder and decoder blocks per level, two 3x3 convolutions each
    return sum(blocks * (18 * c * c + 2 * emb * c) for c in channels) + values['label_dim'] * emb + 2 * emb * emb


def _check_constructor_record(class_name, args, kwargs, source):
    """Refuse a constructor record outside the bounds above before anything is built."""
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f'{source}: unknown network class {_short(class_name)}; expected one of '
                         f'{sorted(NETWORK_CLASSES)}')
    try:
        values = _constructor_arguments(NETWORK_CLASSES[class_name], args, kwargs)
    except TypeError as err:
        raise ValueError(f'{source}: cannot rebuild {class_name} from its constructor record: {err}') from None
    for name, value in values.items():
        problem = _check_bound(name, value)
        if problem:
            raise ValueError(f'{source}: constructor record of {class_name}: {name}={_short(value)} {problem}; '
                             f'refusing to build it')
    estimate = _parameter_estimate(values)
    if estimate > MAX_PARAMETERS:
        raise ValueError(f'{source}: constructor record of {class_name} describes a network of about {estimate:,} '
                         f'parameters (more than {MAX_PARAMETERS:,}); refusing to build it')


def _short(value):
    return safe_pickle.short_repr(value)


def _rebuild_network(node, source):
    class_name = _node_class_name(node)
    state = _node_state(node)
    if '_init_kwargs' not in state:
        raise ValueError(f'{source}: {class_name} has no constructor record (_init_kwargs)')
    args, kwargs = state.get('_init_args', ()), state['_init_kwargs']
    _check_constructor_record(class_name, args, kwargs, source)
    with torch.device('meta'):  # no allocation or random init: every tensor comes from the checkpoint
        try:
            net = NETWORK_CLASSES[class_name](*args, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f'{source}: cannot rebuild {class_name} from its constructor record: {err}') from None
    _check_structure(node, net, '', source)
    tensors = {name: t.detach() for name, t in _node_tensors(node).items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f'{name} {tuple(tensors[name].shape)} (expected {tuple(t.shape)})'
                   for name, t in expected.items() if name in tensors and tensors[name].shape != t.shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f'{source}: tensors of {class_name} do not match its architecture; missing {missing}, '
                         f'unexpected {unexpected}, wrong shape {wrong_shape}')
    net.load_state_dict(tensors, strict=True, assign=True)
    return net.to(torch.float32).eval().requires_grad_(False)


def _is_network(obj):
    if isinstance(obj, PersistentRecord):
        return obj.class_name in NETWORK_CLASSES
    return persistence.is_persistent(obj) and type(obj).__name__ in NETWORK_CLASSES  # unsafe mode: live objects


MAX_NESTING = 100  # containers around the networks of a snapshot (real ones: 1 or 2 levels)
_IN_PROGRESS = object()  # memo entry of a container whose items are being rebuilt


def _materialize(obj, source, memo=None, depth=0):
    """Replace network records (or networks built by embedded code) in the snapshot's containers by our modules.
    Memoised by id: shared containers and networks are rebuilt once (a DAG stays a DAG, never exponential);
    a container that contains itself or nests deeper than MAX_NESTING is refused."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        if memo[id(obj)] is _IN_PROGRESS:
            raise ValueError(f'{source}: the snapshot contains itself (a container refers back to itself)')
        return memo[id(obj)]
    if depth > MAX_NESTING:
        raise ValueError(f'{source}: the snapshot nests containers more than {MAX_NESTING} deep')
    if len(memo) > safe_pickle.MAX_OBJECTS:
        raise ValueError(f'{source}: the snapshot holds more than {safe_pickle.MAX_OBJECTS:,} objects')
    memo[id(obj)] = _IN_PROGRESS
    if _is_network(obj):
        result = _rebuild_network(obj, source)
    elif isinstance(obj, dict):
        result = type(obj)((key, _materialize(value, source, memo, depth + 1)) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        result = type(obj)(_materialize(value, source, memo, depth + 1) for value in obj)
    else:
        result = obj
    memo[id(obj)] = result
    return result

def _read_trusted(f, name):
    """EDM's own way (plain pickle / torch.load), for files the user vouches for; TorchScript archives are
    still refused: they are never network snapshots, and torch would run their code on load."""
    if f.read(4) == safe_pickle.ZIP_MAGIC:
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            if safe_pickle.is_torchscript(archive.namelist()):
                raise pickle.UnpicklingError(f'{name}: is a TorchScript archive, not a network snapshot; refusing it '
                                             f'(loading TorchScript runs the code inside the file)')
        f.seek(0)
        return torch.load(f, map_location='cpu', weights_only=False)
    f.seek(0)
    return pickle.load(f)

#----------------------------------------------------------------------------
# Public API.

def load_snapshot(source, allow_unsafe_pickle=False):
    """Load a snapshot dict (`network-snapshot-*.pkl` of EDM, D2O or ours; path or URL).

    Networks of our classes come back as our modules (eval mode, requires_grad False, float32);
    other persistent objects (EDMLoss, AugmentPipe, ...) as inert `PersistentRecord`s.

    allow_unsafe_pickle=True reads the file with plain `pickle` and EDM's persistence semantics, which
    executes the module source embedded in the file — and any other code a malicious pickle carries.
    Use it only for files from a trusted source that the safe loader refuses.

    A `.safetensors` snapshot (checkpoint_tool.py convert; docs/checkpoint-format.md §9) holds no code, so it
    is read the same way in both modes."""
    from training import safetensors_snapshot  # imports this module
    if safetensors_snapshot.is_safetensors(source):
        return safetensors_snapshot.load_snapshot(source)
    name = str(source)
    with dnnlib.util.open_url(source) as f:
        data = _read_trusted(f, name) if allow_unsafe_pickle else \
            safe_pickle.load(f, SNAPSHOT_GLOBALS, name, hint=UNSAFE_HINT)
    if not isinstance(data, dict):
        raise ValueError(f'{name}: expected a snapshot dict, found {type(data).__name__}')
    return _materialize(data, name)


def load_network(source, key='ema', allow_unsafe_pickle=False):
    """Load one network of a snapshot (`ema`, or D2O's `net`) as our module class, eval mode,
    requires_grad False, float32. See `load_snapshot` for `allow_unsafe_pickle`."""
    snapshot = load_snapshot(source, allow_unsafe_pickle=allow_unsafe_pickle)
    if key not in snapshot:
        hint = ('; it is a training state of train.py: sample from a network-snapshot-*.pkl of the same run'
                if 'G_record' in snapshot else '')
        raise KeyError(f'{source}: snapshot has no {key!r}; it holds {_short(list(snapshot))}{hint}')
    net = snapshot[key]
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f'{source}: {key!r} is {_short(net)}, not one of the networks {sorted(NETWORK_CLASSES)}')
    return net


def cpu_copy(module):
    """A deep copy of `module` in eval mode with its parameters (requires_grad False) and buffers copied straight
    to the CPU: no second copy on the module's device (a snapshot of a GPU network costs no GPU memory)."""
    memo = {id(b): b.detach().to('cpu', copy=True) for b in module.buffers()}
    memo.update({id(p): torch.nn.Parameter(p.detach().to('cpu', copy=True), requires_grad=False)
                 for p in module.parameters()})
    return copy.deepcopy(module, memo).eval()


def save_snapshot(path, snapshot):
    """Atomically pickle a snapshot dict in EDM's format (protocol 4, readable by EDM/D2O code and by our
    safe loader). Modules are stored as `cpu_copy`s (the one copy: callers pass their live networks)."""
    data = {key: cpu_copy(value) if isinstance(value, torch.nn.Module) else value for key, value in snapshot.items()}
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(data, f, protocol=4)


def _plain_data(value, where):
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_data(v, where) for v in value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain_data(v, where) for k, v in value.items()}
    raise ValueError(f'{where}: constructor argument {value!r} is not plain data')


def network_constructor_record(net):
    """{'class_name', 'init_args', 'init_kwargs'} of one of our networks, as plain data that
    `torch.load(weights_only=True)` accepts; `build_network` turns it back into a (fresh) module."""
    if type(net).__name__ not in NETWORK_CLASSES or not persistence.is_persistent(net):
        raise ValueError(f'network_constructor_record: {type(net).__name__} is not one of {sorted(NETWORK_CLASSES)}')
    name = type(net).__name__
    return dict(class_name=name, init_args=list(_plain_data(net._init_args, name)),
                init_kwargs=_plain_data(net._init_kwargs, name))


def check_constructor_record(record, source):
    """A `network_constructor_record` read from a file (training state, safetensors header): one of our classes
    with plain arguments within the bounds above; ValueError naming `source` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f'{source}: the constructor record is a {type(record).__name__}, not a dict')
    _check_constructor_record(record.get('class_name'), record.get('init_args', ()), record.get('init_kwargs', {}),
                              source)


def build_network(record, source='build_network'):
    """Construct a freshly initialised network from `network_constructor_record` output (checked first: it may
    come from a file)."""
    check_constructor_record(record, source)
    return NETWORK_CLASSES[record['class_name']](*record.get('init_args', ()), **record.get('init_kwargs', {}))

