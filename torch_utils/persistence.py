"""EDM's pickle format for network classes (docs/checkpoint-format.md §2).

A class decorated with `persistent_class` pickles as a call to the global
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the full source of
the module that defined the class, the class name, the instance dict and the constructor record
(`_init_args`, `_init_kwargs`). NVlabs EDM/D2O read such pickles by exec'ing that source, and so does
`_reconstruct_persistent_obj` below: that is the *unsafe* path, used only by plain `pickle.load` and by
`training.checkpoint` when the user passes `allow_unsafe_pickle=True`. The default, safe loader
(`training/checkpoint.py` through `torch_utils/safe_pickle.py`) maps the same global to an inert record and
never runs the embedded source.
"""
import copy
import inspect
import sys
import types
import uuid

FORMAT_VERSION = 6  # EDM's reconstruct asserts this exact number (docs/checkpoint-format.md §2.1)

_persistent_classes = set()
_module_to_src = {}  # module object -> its source text
_src_to_module = {}  # source text -> module object (shared by every class of that module)


def _module_source(module):
    if module not in _module_to_src:
        src = inspect.getsource(module)
        _module_to_src[module] = src
        _src_to_module.setdefault(src, module)
    return _module_to_src[module]


def persistent_class(orig_class):
    """Return a subclass of `orig_class` (same name and module) that records its constructor
    arguments and pickles in EDM's persistence format."""
    if not isinstance(orig_class, type):
        raise TypeError(f'persistent_class expects a class, got {type(orig_class).__name__}')
    if is_persistent(orig_class):
        return orig_class
    module_src = _module_source(sys.modules[orig_class.__module__])

    class Persistent(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The constructor record lets any loader rebuild the architecture (docs/checkpoint-format.md §2.2).
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            meta = dict(type='class', version=FORMAT_VERSION, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=self.__getstate__())
            return _reconstruct_persistent_obj, (meta,), None

    Persistent.__name__ = orig_class.__name__
    Persistent.__qualname__ = orig_class.__qualname__
    Persistent.__module__ = orig_class.__module__
    Persistent.__doc__ = orig_class.__doc__
    _persistent_classes.add(Persistent)
    return Persistent


def is_persistent(obj):
    """True for a persistent class or an instance of one."""
    return (obj if isinstance(obj, type) else type(obj)) in _persistent_classes


def _src_to_module_or_exec(src):
    # Same text as an already imported module -> reuse it; otherwise exec the text as a new module,
    # exactly as EDM does. This runs whatever code the pickle carries.
    if src not in _src_to_module:
        module = types.ModuleType(f'_imported_module_{uuid.uuid4().hex}')
        sys.modules[module.__name__] = module
        _module_to_src[module] = src
        _src_to_module[src] = module
        exec(src, module.__dict__)  # pylint: disable=exec-used
    return _src_to_module[src]


def _reconstruct_persistent_obj(meta):
    """EDM semantics (docs/checkpoint-format.md §2.4): exec `meta['module_src']`, allocate `class_name` without running its
    constructor and restore the instance dict. UNSAFE for untrusted files."""
    if meta.get('type') != 'class' or meta.get('version') != FORMAT_VERSION:
        raise ValueError(f'Unsupported persistent object: type={meta.get("type")!r} version={meta.get("version")!r} '
                         f'(expected type \'class\', version {FORMAT_VERSION})')
    module = _src_to_module_or_exec(meta['module_src'])
    cls = persistent_class(getattr(module, meta['class_name']))
    obj = cls.__new__(cls)
    if hasattr(obj, '__setstate__'):
        obj.__setstate__(meta['state'])
    else:
        obj.__dict__.update(meta['state'])
    return obj
