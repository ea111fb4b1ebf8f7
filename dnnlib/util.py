"""EasyDict, atomic file writes, `open_url` with an on-disk download cache (EDM conventions), and the
integer-list parser every command line uses."""
import contextlib
import hashlib
import io
import os
import re
import tempfile
import urllib.parse


class EasyDict(dict):
    """dict whose keys are also attributes (EDM's EasyDict; snapshots may reference it by name)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


class InputError(RuntimeError):
    """A failure that is the input's or the machine's fault (weights that are missing or do not fit), not a
    bug: one line from every CLI (dnnlib/cli.py). A RuntimeError, so callers that catch that still do."""


def with_umask(mode):
    """`mode` as open()/mkdir() would apply it: without the process umask's bits (os.umask can only be read
    by setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Write `path` through a temporary file in the same folder, renamed into place only on success,
    so an interrupted run never leaves a truncated snapshot/state/stats file behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, with_umask(0o666))  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


FALSE_WORDS = ('', '0', 'false', 'no', 'off', 'n', 'f')
TRUE_WORDS = ('1', 'true', 'yes', 'on', 'y', 't')


def debug_enabled():
    """Whether D2O_DEBUG asks for tracebacks of expected failures (dnnlib/cli.py): unset or one of
    FALSE_WORDS (any case) is off, one of TRUE_WORDS is on; anything else is a ValueError, since a guess
    either way would hide what the user asked for."""
    value = os.environ.get('D2O_DEBUG', '').strip().lower()
    if value in FALSE_WORDS or value in TRUE_WORDS:
        return value in TRUE_WORDS
    raise ValueError(f'D2O_DEBUG={os.environ["D2O_DEBUG"]!r}: expected 1/true/yes/on or 0/false/no/off (or unset)')


def make_cache_dir_path(*paths):
    """Download cache root: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib (EDM's layout)."""
    root = os.environ.get('DNNLIB_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib')
    return os.path.join(root, *paths)


def is_url(obj):
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if obj.startswith('file://'):
        return True
    res = urllib.parse.urlparse(obj)
    return bool(res.scheme and res.netloc)


def _cache_file_name(url):
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    safe = re.sub(r'[^0-9a-zA-Z._-]+', '_', url.rstrip('/').split('/')[-1])
    return f'{md5}_{safe}'


def open_url(url, cache_dir=None, cache=True, return_filename=False, timeout=30):
    """Open a local path, a file:// URL, or an http(s) URL (downloaded once into the cache).

    Returns a binary file object (or its local path with `return_filename=True`). Offline, a URL that
    is not cached raises an error that names the URL, the cache file we looked for and how to pass a
    local file instead."""
    if not is_url(url):
        path = os.fspath(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such file')
        return path if return_filename else open(path, 'rb')
    if url.startswith('file://'):
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        return open_url(path, return_filename=return_filename)

    cache_dir = cache_dir or make_cache_dir_path('downloads')
    cache_file = os.path.join(cache_dir, _cache_file_name(url))
    if cache and os.path.isfile(cache_file):
        return cache_file if return_filename else open(cache_file, 'rb')

    import requests  # only needed for real downloads
    try:
        with requests.get(url, timeout=timeout, stream=True) as res:
            res.raise_for_status()
            data = res.content
    except requests.RequestException as err:
        raise OSError(
            f'Cannot download {url}: {err.__class__.__name__}: {err}\n'
            f'  This machine may be offline. Download the file elsewhere and either pass its local path '
            f'instead of the URL, or place it at {cache_file} (cache dir: $DNNLIB_CACHE_DIR).') from None
    if cache:
        with atomic_write(cache_file) as f:
            f.write(data)
        if return_filename:
            return cache_file
    if return_filename:
        raise ValueError('return_filename=True requires cache=True for URLs')
    return io.BytesIO(data)


def parse_int_list(text, limit=None):
    """'0-3,7,10-11' → [0, 1, 2, 3, 7, 10, 11]: EDM's list/range grammar of non-negative integers, used by
    every command line (--seeds, --cres, ...). A list passes through unchanged. ValueError names the bad part,
    or the count when it exceeds `limit` (checked from the ranges' ends, before any list is built)."""
    if isinstance(text, (list, tuple)):
        return list(text)
    ranges = []
    for part in str(text).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m:
            raise ValueError(f'{part!r} is not a non-negative integer or a range A-B')
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f'range {part!r} is empty (end before start)')
        ranges.append(range(lo, hi + 1))
    count = sum(r.stop - r.start for r in ranges)  # len() overflows past 2**63
    if limit is not None and count > limit:
        raise ValueError(f'{text!r} lists {count:,} values; at most {limit:,} are allowed')
    return [value for r in ranges for value in r]
