"""Small utilities shared by every room of the project (EDM's `dnnlib` name, kept for pickles)."""
from .util import EasyDict, InputError, atomic_write, open_url, make_cache_dir_path, parse_int_list  # noqa: F401
