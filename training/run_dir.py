"""The run directory, other than the formats of the files in it (networks: training/checkpoint.py;
the training state: training/state.py): the directory's name and lock, log.txt, the JSONL records, the
best snapshot, and the signal conventions that let a stopped run save its state. Importing this module
does not import torch.

API (rank 0 only unless noted):

Naming and lock
  make_run_dir(cfg, dataset_name, world, batch) -> path   `<outdir>/<id:05d>-<desc>`, EDM's naming. Call it
      on rank 0 and broadcast the path (a rank listing --outdir after rank 0 created it gets the next id).
  check_desc(desc) -> desc           --desc must be a plain name; ValueError naming --desc otherwise.
  RunDirLock(run_dir, log)           `with RunDirLock(run_dir, log):` one run per directory (run.lock);
      a live holder -> RunDirLocked (a ValueError naming the folder and the holder's pid); a stale lock of
      a dead process is taken over with a warning; once the lock is held, the temporaries our own writers
      left (OWN_TEMPORARY) are removed, and nothing else.
  refuse_other_run(run_dir)          a fresh run refuses a folder that already holds a run (RunDirTaken).
Records
  Logger(path)                       tees stdout/stderr into log.txt.
  append_jsonl(path, record)         appends one line (flush + fsync), never rewrites the file.
  saving(path)                       `with saving(path) as path:` a failed write is one OSError naming the file.
  read_jsonl(path) -> [record]       skips a line cut short by a crash.
  truncate_jsonl_after(path, kimg)   drops records past the resume point, atomically.
  record_metric(run_dir, name, record) -> bool   metric-<name>.jsonl + network-snapshot-best.pkl.
Signals
  worker_init_fn(worker_id)          DataLoader workers ignore SIGINT, and SIGTERM unless their parent
      sends it (it stops them at exit), so that the main process can save.
  StopSignals()                      `with StopSignals() as stop:` records SIGINT/SIGTERM in stop.signum.
  exit_status_for_signal(signum)     128 + signum, what the process exits with after a signal.

In the loop, roughly: run_dir = dirname(the resumed state) or make_run_dir(...);
`with RunDirLock(run_dir, log), StopSignals() as stop:` ... DataLoader(..., worker_init_fn=worker_init_fn)
...; after a stop: save, then sys.exit(exit_status_for_signal(stop.signum)).
"""
import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time

import dnnlib

# ----------------------------------------------------------------------------------------------
# Run-directory name (EDM's `00003-<desc>`). --desc is a user string joined into a path: it must stay
# one plain path component (`--desc=/../../x` must not escape --outdir; docs/checkpoint-format.md §8).

NAME_CHARS = r'A-Za-z0-9._+=,@-'
DESC_PATTERN = re.compile(rf'[A-Za-z0-9][{NAME_CHARS}]{{0,99}}')


def check_desc(desc):
    """Refuse (rather than silently rewrite) a --desc that is not a plain name: the user then sees
    exactly which folder name the run gets."""
    if desc is None or desc == '':
        return desc
    if not DESC_PATTERN.fullmatch(desc) or '..' in desc:
        raise ValueError(f'--desc={desc!r}: expected a plain name of at most 100 letters, digits and . _ + = , @ - '
                         f"starting with a letter or digit (no path separators, no '..', no spaces or control "
                         f'characters)')
    return desc


def _plain_component(text):
    """A dataset name (from the --data file name) as one safe path component."""
    return re.sub(rf'[^{NAME_CHARS}]', '_', text).lstrip('.') or 'data'


def make_run_dir(cfg, dataset_name, world, batch):
    """`<outdir>/<next id:05d>-<desc>`, or --outdir itself with --nosubdir. The id is one more than the
    largest among the existing `NNNNN-*` entries; two runs racing for one id are stopped by RunDirLock."""
    if cfg.nosubdir:
        return cfg.outdir
    check_desc(cfg.desc)
    existing = os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else []
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in existing) if m]
    desc = (f'{_plain_component(dataset_name)}-{"cond" if cfg.cond else "uncond"}-{cfg.arch or "transfer"}-'
            f'{cfg.precond}-{cfg.loss}-gpus{world}-batch{batch}-{cfg.precision}' + (f'-{cfg.desc}' if cfg.desc else ''))
    path = os.path.join(cfg.outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(cfg.outdir):  # defence in depth
        raise ValueError(f'--desc={cfg.desc!r}: the run directory {path} would lie outside --outdir={cfg.outdir}')
    return path


# ----------------------------------------------------------------------------------------------
# One run per directory: two runs sharing a folder would overwrite each other's snapshots and
# interleave stats.jsonl. The lock is an fcntl.flock on run.lock: the kernel drops it when the holder
# dies, even by SIGKILL, so a lock file whose flock is free is stale by construction. The file holds
# the holder's pid, host and start time, for the error message and the stale-lock warning.

LOCK_NAME = 'run.lock'
# The run folder may be the user's own (--nosubdir, --resume=FILE): only the temporaries our writers leave
# are ever deleted. dnnlib.atomic_write names them `.<name>.<8 random characters of tempfile's
# [a-z0-9_]>.tmp`, and <name> is one of the files the loop writes.
_TAG = r'\d+(?:\.\d+)?'  # RunOutputs.tag(): 000005 or 000000.012
STATE_NAME = re.compile(rf'training-state-({_TAG})\.pt')  # the file's format: training/state.py
OWN_FILES = (STATE_NAME.pattern, rf'network-snapshot-(?:{_TAG}|best)\.pkl', rf'fakes-{_TAG}\.png',
             r'stats\.jsonl', r'training_options\.json')
OWN_TEMPORARY = re.compile(rf'\.(?:{"|".join(OWN_FILES)})\.[a-z0-9_]{{8}}\.tmp')


class RunDirLocked(ValueError):
    """Another live run holds the run directory."""


def _holder_record():
    return dict(pid=os.getpid(), host=socket.gethostname(), start=time.time(),
                start_utc=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


def _read_holder(fd):
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or 'null')
    except (ValueError, UnicodeDecodeError, OSError):
        return None


def _holder_text(holder):
    if not isinstance(holder, dict):
        return 'an unknown process'
    return f'pid {holder.get("pid")} on {holder.get("host")}, started {holder.get("start_utc")}'


def _pid_alive_here(holder):
    """True/False for a holder on this host, None when it cannot be told (another host, no record)."""
    if not isinstance(holder, dict) or holder.get('host') != socket.gethostname():
        return None
    try:
        os.kill(int(holder['pid']), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (KeyError, TypeError, ValueError):
        return None
    return True


def remove_stale_temporaries(run_dir, log=print):
    """Delete the OWN_TEMPORARY files a writer left when it died mid-write; only the lock holder may (a
    live run's temporaries are in use). Any other file, `*.tmp` or not, is the user's and stays."""
    removed = sorted(os.path.join(run_dir, name) for name in os.listdir(run_dir) if OWN_TEMPORARY.fullmatch(name))
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        log(f'Removed stale temporary file {path}')
    return removed


class RunDirLock:
    """`with RunDirLock(run_dir, log):` holds run_dir for this process (rank 0); released on exit, by
    the kernel if the process dies. Raises RunDirLocked when another live run holds it."""

    def __init__(self, run_dir, log=print):
        self.run_dir, self.log, self.fd = run_dir, log, None
        self.path = os.path.join(run_dir, LOCK_NAME)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        os.makedirs(self.run_dir, exist_ok=True)
        fd = self._lock_current_file()
        previous = _read_holder(fd)
        if previous is not None:
            self.log(f'WARNING: {self.run_dir}: took over the stale lock of {_holder_text(previous)}, which is no '
                     f'longer running')
        record = json.dumps(_holder_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self.fd = fd
        remove_stale_temporaries(self.run_dir, self.log)

    def _lock_current_file(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirLocked(self._busy_message(holder)) from None
            except OSError:  # no flock on this file system: fall back to the recorded holder alone
                holder = _read_holder(fd)
                if holder is not None and _pid_alive_here(holder) is not False:
                    os.close(fd)
                    raise RunDirLocked(self._busy_message(holder)) from None
                return fd
            # A holder releasing between our open and flock unlinks the file we opened: lock the new one.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            os.close(fd)

    def _busy_message(self, holder):
        hint = 'wait for it to finish or stop it, or choose another --outdir'
        if _pid_alive_here(holder) is False:  # its DataLoader workers, which inherited the lock, still run
            hint = 'that process has exited but its child processes still hold the lock; retry in a few seconds'
        elif _pid_alive_here(holder) is None and isinstance(holder, dict):
            hint += f'; if no run is using it any more, delete {self.path}'
        return f'{self.run_dir}: run directory in use by another run ({_holder_text(holder)}); {hint}'

    def release(self):
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):  # unlink first: a waiter then re-opens a fresh file
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)
        os.close(self.fd)
        self.fd = None


class RunDirTaken(ValueError):
    """A fresh run was pointed at a folder that already holds a run."""


RUN_FILES = ('training_options.json', 'stats.jsonl', 'network-snapshot-*', 'training-state-*')


def refuse_other_run(run_dir):
    """A fresh run (no --resume) must not overwrite another run's snapshots and options nor append to its
    stats.jsonl: --nosubdir into a used folder, or two runs racing for one id. Call it holding the lock."""
    found = sorted(os.path.basename(p) for pattern in RUN_FILES
                   for p in glob.glob(os.path.join(glob.escape(run_dir), pattern)))
    if not found:
        return
    names = ', '.join(found[:3]) + (f' and {len(found) - 3} more' if len(found) > 3 else '')
    resumable = any(STATE_NAME.fullmatch(name) for name in found)
    hint = f'continue it with --resume={run_dir}' if resumable else 'it has no training state to resume'
    raise RunDirTaken(f'{run_dir}: already holds another run ({names}); {hint}, or choose another --outdir')


# ----------------------------------------------------------------------------------------------
# log.txt and the JSONL records (stats.jsonl, metric-*.jsonl), appended one line at a time.

class Logger:
    """Copies stdout/stderr into log.txt (EDM's log.txt), rank 0 only."""

    def __init__(self, path):
        self.file = open(path, 'a', encoding='utf-8')
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self, self

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        self.stdout.write(text)

    def flush(self):
        self.file.flush()
        self.stdout.flush()

    def isatty(self):
        return False

    def close(self):
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()


def append_jsonl(path, record):
    """Append `record` as one line with a single O_APPEND write, then fsync. A line cut short by an
    earlier crash is closed first, so the new record always starts its own line."""
    line = (json.dumps(record) + '\n').encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b'\n':
            line = b'\n' + line
        written = os.write(fd, line)
        if written != len(line):  # a full disk or RLIMIT_FSIZE stops a write part way, without an error
            raise OSError(f'only {written} of {len(line)} bytes written')
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def saving(path):
    """A failed write of `path` (disk full, file-size limit; torch's zip writer reports the OSError as a
    RuntimeError) becomes one OSError naming the file. Writers go through dnnlib.atomic_write, so what was
    saved before is intact. Other RuntimeErrors pass unchanged."""
    try:
        yield path
    except (OSError, RuntimeError) as err:
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        reason = cause.strerror or str(cause)
        raise OSError(f'{path}: could not be written ({reason}); the files saved before it are intact') from err


def read_jsonl(path):
    """The records of a JSONL file ([] when absent); lines that do not parse (cut short) are skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            with contextlib.suppress(ValueError):
                if line.strip():
                    records.append(json.loads(line))
    return records


def truncate_jsonl_after(path, kimg):
    """Keep only the records at or before `kimg` (a resumed run re-records what follows), rewriting the
    file atomically. Returns the number of records dropped."""
    if not os.path.exists(path):
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if isinstance(r, dict) and r.get('kimg', float('inf')) <= kimg + 1e-9]
    with dnnlib.atomic_write(path, 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in kept))
    return len(records) - len(kept)


def record_metric(run_dir, name, record, key='fid'):
    """Append `record` (holding `key`, lower is better, and 'snapshot', the file it was measured on) to
    metric-<name>.jsonl; a new best copies that snapshot to network-snapshot-best.pkl atomically.
    Returns True for a new best."""
    path = os.path.join(run_dir, f'metric-{name}.jsonl')
    best = min((r[key] for r in read_jsonl(path) if isinstance(r, dict) and key in r), default=float('inf'))
    append_jsonl(path, record)
    if not record[key] < best:
        return False
    with open(os.path.join(run_dir, record['snapshot']), 'rb') as src, \
            dnnlib.atomic_write(os.path.join(run_dir, 'network-snapshot-best.pkl')) as dst:
        shutil.copyfileobj(src, dst)
    return True


# ----------------------------------------------------------------------------------------------
# Signals (docs/design.md "Errors"). `docker stop`, Kubernetes and Slurm send SIGTERM to the whole process group:
# DataLoader workers must outlive it so that the main process can finish its iteration, save the
# state and exit. The exit status then says "stopped by a signal", never success.

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_EXIT_BASE = 128  # exit status 128 + signum (SIGINT 130, SIGTERM 143), as shells report it


def exit_status_for_signal(signum):
    """Non-zero, so schedulers and torchrun do not record a stopped run as finished."""
    return SIGNAL_EXIT_BASE + int(signum)


def worker_init_fn(worker_id):  # noqa: ARG001 (DataLoader's signature)
    """DataLoader worker_init_fn: the worker ignores SIGINT, and SIGTERM from anyone but its parent.

    Plain SIG_IGN for SIGTERM would hang the exit: multiprocessing stops daemonic workers at exit with
    SIGTERM and then joins them without a timeout. So SIGTERM is blocked and consumed by a thread that
    exits the worker only when the parent sent it (what torch's own worker handler does, minus dying on
    signals from others). Without sigwaitinfo (macOS) the worker leaves the process group instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, 'sigwaitinfo'):
        os.setpgid(0, 0)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name='sigterm-from-parent',
                     daemon=True).start()


def _exit_on_sigterm_from(parent):
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class StopSignals:
    """`with StopSignals() as stop:` SIGINT/SIGTERM set `stop.signum` (the first one) instead of killing
    the process; the loop polls it once per iteration. The previous handlers come back on exit. Outside
    the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def _record(self, signum, _frame):
        if self.signum is None:
            self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
