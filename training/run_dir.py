"""Run-directory I/O for the training loop: naming, log.txt, JSONL records, best snapshot, resume lookup.

First step: the functions moved unchanged from training_loop.py so the loop can switch to them; the hardened
versions (issue 12: --desc sanitising, lock, resume checks, signals) follow in this module."""
import glob
import json
import os
import re
import shutil
import sys

import dnnlib


def make_run_dir(cfg, dataset_name, world, batch):
    """`<outdir>/<next id:05d>-<desc>` (EDM's naming), or --outdir itself with --nosubdir."""
    if cfg.nosubdir:
        return cfg.outdir
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in
                                     (os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else [])) if m]
    desc = (f'{dataset_name}-{"cond" if cfg.cond else "uncond"}-{cfg.arch or "transfer"}-{cfg.precond}-{cfg.loss}-'
            f'gpus{world}-batch{batch}-{cfg.precision}' + (f'-{cfg.desc}' if cfg.desc else ''))
    return os.path.join(cfg.outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def find_resume_state(resume, outdir):
    """--resume=PATH (a training-state file or a run dir) or auto (newest state under --outdir)."""
    if resume in (None, ''):
        return None
    if resume == 'auto':
        candidates = glob.glob(os.path.join(outdir, 'training-state-*.pt')) + \
            glob.glob(os.path.join(outdir, '*', 'training-state-*.pt'))
        if not candidates:
            return None
        return max(candidates, key=lambda p: (os.path.getmtime(p), p))
    if os.path.isdir(resume):
        states = sorted(glob.glob(os.path.join(resume, 'training-state-*.pt')))
        if not states:
            raise FileNotFoundError(f'--resume={resume}: no training-state-*.pt in this folder')
        return states[-1]
    if not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume={resume}: no such file (expected training-state-*.pt, a run dir, or auto)')
    return resume


class Logger:
    """Copies stdout/stderr into log.txt (EDM's log.txt), rank 0 only."""

    def __init__(self, path):
        self.file = open(path, 'a')
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
    """Append one JSON line (open 'a', one write, flush + fsync) instead of rewriting the whole file."""
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl_after(path, kimg):
    """Drop the records past `kimg` (a resume continues from there), rewriting the file atomically."""
    if not os.path.exists(path):
        return
    kept = [l for l in open(path).read().splitlines() if l.strip() and json.loads(l)['kimg'] <= kimg + 1e-9]
    with dnnlib.atomic_write(path, 'w') as f:
        f.write(''.join(l + '\n' for l in kept))


def record_metric(run_dir, name, record):
    """Append `record` (with 'fid' and 'snapshot') to metric-<name>.jsonl; a new best FID copies its
    snapshot to network-snapshot-best.pkl. Returns True for a new best."""
    path = os.path.join(run_dir, f'metric-{name}.jsonl')
    previous = open(path).read() if os.path.exists(path) else ''
    best = min([json.loads(l)['fid'] for l in previous.splitlines() if l.strip()], default=float('inf'))
    append_jsonl(path, record)
    if record['fid'] >= best:
        return False
    with open(os.path.join(run_dir, record['snapshot']), 'rb') as src, \
            dnnlib.atomic_write(os.path.join(run_dir, 'network-snapshot-best.pkl')) as dst:
        shutil.copyfileobj(src, dst)
    return True
