"""Attacks on the run directory and on resume (issue 12 items 2, 4, 5, 6, 7), one test each: every test
asserts the one clear line the user gets and that nothing was lost, overwritten or executed."""
import dataclasses
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from training import run_dir as rd, state as ts
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_run_dir import save_state  # noqa: E402  (one helper for a minimal valid state)


def tree(folder):
    """{relative path: sha256} of every file under `folder`: equal before and after = nothing lost."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def python(script, *args, **kwargs):
    """A child python running `script` with the repository importable."""
    return subprocess.Popen([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(ROOT)!r})\n' +
                             textwrap.dedent(script), *map(str, args)], text=True, **kwargs)


# --- 12.2: --desc cannot escape --outdir ----------------------------------------------------------

def test_desc_cannot_escape_outdir(tmp_path):
    outdir = tmp_path / 'a' / 'b' / 'runs'
    outdir.mkdir(parents=True)
    (tmp_path / 'a' / 'keep.txt').write_text('data')
    before = tree(tmp_path)
    for desc in ('/../../x', '../../x', 'x/../../..', '..'):
        with pytest.raises(ValueError, match=r"^--desc='[^\n]*': expected a plain name .*no path separators, "
                                             r"no '\.\.'"):
            rd.make_run_dir(TrainConfig(outdir=str(outdir), desc=desc), 'data', 1, 8)
    assert tree(tmp_path) == before and not any(outdir.iterdir())


# --- 12.5: one run per directory ------------------------------------------------------------------

LOCK_HOLDER = '''
    from training.run_dir import RunDirLock
    lock = RunDirLock(sys.argv[1])
    lock.acquire()
    print('locked', flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
    lock.release()
'''


def hold_lock(run):
    child = python(LOCK_HOLDER, run, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline() == 'locked\n'
    return child


def test_second_run_on_a_locked_directory_is_refused(tmp_path):
    run = tmp_path / '00000-run'
    run.mkdir()
    (run / 'stats.jsonl').write_text('{"kimg": 1.0}\n')
    child = hold_lock(run)
    try:
        (run / 'training-state-000001.pt.tmp').write_text('the holder is writing this')
        before = tree(run)
        with pytest.raises(rd.RunDirLocked) as err:
            rd.RunDirLock(str(run)).acquire()
        assert str(err.value).startswith(f'{run}: run directory in use by another run (pid {child.pid} on '
                                         f'{socket.gethostname()}, started ')
        assert str(err.value).endswith('; wait for it to finish or stop it, or choose another --outdir')
        assert tree(run) == before  # the holder's lock, records and temporaries untouched
    finally:
        child.communicate('')
    assert child.returncode == 0 and not (run / rd.LOCK_NAME).exists()
    with rd.RunDirLock(str(run), log=lambda m: None):  # released: the next run gets it
        pass


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / 'run'
    child = hold_lock(run)
    child.kill()  # SIGKILL: no cleanup runs, run.lock stays behind
    child.communicate()
    assert (run / rd.LOCK_NAME).exists()
    notes = []
    with rd.RunDirLock(str(run), log=notes.append):
        assert f'"pid": {os.getpid()}' in (run / rd.LOCK_NAME).read_text()
    assert len(notes) == 1
    assert notes[0].startswith(f'WARNING: {run}: took over the stale lock of pid {child.pid} on {socket.gethostname()}')
    assert notes[0].endswith(', which is no longer running')


# --- 12.7: states that cannot be resumed ----------------------------------------------------------

def refused_load(path):
    """load_training_state's error line; the file must be left exactly as it was."""
    before = Path(path).read_bytes()
    with pytest.raises(ValueError) as err:
        ts.load_training_state(str(path))
    assert Path(path).read_bytes() == before
    message = str(err.value)
    assert '\n' not in message and message.startswith(f'--resume={path}: ')
    return message


def test_state_with_a_member_name_that_is_not_utf8_is_refused(tmp_path):
    """A central-directory name flagged UTF-8 that does not decode (found by the fuzzing harness)."""
    good = Path(save_state(tmp_path / 'training-state-000001.pt')).read_bytes()
    central = good.find(b'PK\x01\x02')
    data = bytearray(good)
    data[central + 8] |= 0x08  # general-purpose flags, bit 11 (0x800): the name is UTF-8
    data[central + 46] = 0xC1  # first byte of the name: never valid UTF-8
    bad = tmp_path / 'training-state-000002.pt'
    bad.write_bytes(bytes(data))
    assert refused_load(bad) == (f'--resume={bad}: corrupt or truncated training state (unreadable zip directory); '
                                 f'resume from an earlier training-state-*.pt of the same run')


def test_truncated_state_is_refused(tmp_path):
    good = Path(save_state(tmp_path / 'training-state-000001.pt'))
    cut = tmp_path / 'training-state-000002.pt'
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    assert refused_load(cut) == (f'--resume={cut}: corrupt or truncated training state (unreadable zip directory); '
                                 f'resume from an earlier training-state-*.pt of the same run')


def test_corrupt_state_is_refused(tmp_path):
    path = Path(save_state(tmp_path / 'training-state-000001.pt'))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:  # overwrite the pickled dict, keep the zip directory intact
        info = archive.getinfo(next(n for n in archive.namelist() if n.endswith('/data.pkl')))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start:start + info.file_size] = b'\xff' * info.file_size
    path.write_bytes(bytes(data))
    assert refused_load(path) == (f'--resume={path}: corrupt training state (unreadable pickle); resume from an '
                                  f'earlier training-state-*.pt of the same run')


def test_network_snapshot_given_to_resume_is_refused(tmp_path):
    snapshot = tmp_path / 'network-snapshot-000001.pkl'
    snapshot.write_bytes(b'\x80\x04\x95' + b'\x00' * 20)
    assert refused_load(snapshot) == (f'--resume={snapshot}: this is a pickle (a network snapshot?), not a training '
                                      f'state; pass training-state-*.pt or its run directory; to start from a '
                                      f'snapshot use --transfer={snapshot}')


def test_pickled_module_state_is_refused_without_running_it(tmp_path):
    path = tmp_path / 'training-state-000001.pt'  # EDM's format: a pickled live network
    torch.save({'net': torch.nn.Linear(1, 1), 'optimizer_state': {}}, path)
    assert refused_load(path) == (f'--resume={path}: holds pickled objects (torch.nn.modules.linear.Linear), not plain '
                                  f'tensors (an EDM training state, '
                                  f'or not written by train.py); to start from an EDM run use '
                                  f'--transfer=network-snapshot-*.pkl')


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_torchscript_archive_is_refused_before_loading(tmp_path):
    path = tmp_path / 'training-state-000001.pt'
    torch.jit.script(torch.nn.Linear(1, 1)).save(str(path))
    assert refused_load(path) == (f'--resume={path}: a TorchScript archive, which would run code when loaded; refused; '
                                  f'pass a training-state-*.pt written by train.py')


def test_dataset_zip_and_text_are_refused(tmp_path):
    archive = tmp_path / 'data.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('dataset.json', '{}')
    assert 'a zip file without data.pkl (a dataset?)' in refused_load(archive)
    text = tmp_path / 'notes.pt'
    text.write_text('hello')
    assert refused_load(text) == (f'--resume={text}: not a training state (not a torch zip file); pass a '
                                  f'training-state-*.pt written by train.py')


def test_incomplete_state_is_refused(tmp_path):
    path = tmp_path / 'training-state-000001.pt'
    torch.save(dict(version=ts.STATE_VERSION, config={}, G={'w': torch.zeros(1)}), path)
    assert refused_load(path) == (f'--resume={path}: incomplete training state (missing G_record, G_ema, opt_G, D, '
                                  f'opt_D, cur_nimg, cur_tick, batch_idx, nonfinite_streak, rng); resume from an '
                                  f'earlier training-state-*.pt of the same run')
    torch.save({'w': torch.zeros(1)}, path)  # a bare state_dict
    assert 'incomplete training state (missing version, config, ' in refused_load(path)


def test_state_with_a_non_dict_config_is_refused(tmp_path):
    path = Path(save_state(tmp_path / 'training-state-000001.pt'))
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, config=['batch', 64]), path)
    assert 'incomplete training state (missing config (not a dict))' in refused_load(path)
    torch.save(dict(state, version=torch.tensor(1)), path)
    assert 'training-state version tensor(1), this code reads version 1' in refused_load(path)


def test_state_of_another_version_is_refused(tmp_path):
    path = tmp_path / 'training-state-000001.pt'
    torch.save(dict(version=2, payload={}), path)
    assert refused_load(path) == (f'--resume={path}: training-state version 2, this code reads version 1; resume it '
                                  f'with the d2o version that wrote it')


def forged_state(tmp_path, **fields):
    """A valid saved state with `fields` replaced (dotted rng fields: 'rng.0.torch')."""
    path = Path(save_state(tmp_path / 'training-state-000001.pt'))
    state = torch.load(path, weights_only=True)
    for key, value in fields.items():
        if key.startswith('rng.'):
            state['rng'][0][key.split('.')[2]] = value
        else:
            state[key] = value
    torch.save(state, path)
    return path


@pytest.mark.parametrize('fields, line', [
    (dict(cur_nimg=-10 ** 18), "field 'cur_nimg' is -1000000000000000000, expected an integer from 0 to 1000000000000"),
    (dict(cur_nimg=10 ** 13), "field 'cur_nimg' is 10000000000000, expected an integer from 0 to 1000000000000"),
    (dict(cur_nimg=1.5), "field 'cur_nimg' is 1.5, expected an integer from 0 to 1000000000000"),
    (dict(batch_idx=True), "field 'batch_idx' is True, expected an integer from 0 to 1000000000000"),
    (dict(cur_tick=torch.tensor(3)), "field 'cur_tick' is a int64 tensor of shape [], expected an integer from 0 to "),
    (dict(G_record='D2OPrecond'), "field 'G_record' is 'D2OPrecond', expected a dict of class_name (a string), "
                                  "init_args (a list), init_kwargs (a dict)"),
    (dict(G_record=dict(class_name='D2OPrecond', init_kwargs=[1])), "field 'G_record' is a dict of 2 items"),
    (dict(G=[1, 2]), "field 'G' is a list of 2 items, expected a state dict"),
    (dict(opt_D=7), "field 'opt_D' is 7, expected a state dict or None"),
    (dict(nonfinite_streak=[3]), "field 'nonfinite_streak' is a list of 1 items, expected a dict of stage name"),
    (dict(nonfinite_streak={'G': -1}), "field \"nonfinite_streak['G']\" is -1, expected an integer from 0 to "),
    (dict(rng=[]), "field 'rng' is a list of 0 items, expected a non-empty list (one RNG state per process)"),
    (dict(rng='seed'), "field 'rng' is 'seed', expected a non-empty list"),
    (dict(rng=[{'torch': 1}]), "field 'rng[0]' is a dict of 1 items, expected a dict of torch, cuda, numpy, "
                               "numpy_pos, python"),
    ({'rng.0.torch': torch.zeros(12, dtype=torch.uint8)}, "field 'rng[0].torch' is a uint8 tensor of shape [12], "
                                                          "expected a uint8 tensor of shape [5056]"),
    ({'rng.0.torch': torch.zeros(5056)}, "field 'rng[0].torch' is a float32 tensor of shape [5056], expected a uint8"),
    ({'rng.0.cuda': [torch.zeros(8, dtype=torch.uint8)]}, "field 'rng[0].cuda' is a list of 1 items, expected a "
                                                          "list of uint8 tensors of shape [16]"),
    ({'rng.0.numpy': [0] * 623 + [2 ** 32]}, "field 'rng[0].numpy' is a list of 624 items, expected a list of 624 "
                                             "integers from 0 to 2**32-1"),
    ({'rng.0.numpy_pos': 625}, "field 'rng[0].numpy_pos' is 625, expected an integer from 0 to 624"),
    ({'rng.0.python': [1] * 624 + [625]}, "field 'rng[0].python' is a list of 625 items, expected a list of 624 "
                                          "integers"),
    ({'rng.0.python': (1,) * 625}, "field 'rng[0].python' is a tuple of 625 items"),
])
def test_state_fields_of_the_wrong_type_or_range_are_refused_naming_the_field(tmp_path, fields, line):
    path = forged_state(tmp_path, **fields)
    message = refused_load(path)
    assert message.startswith(f'--resume={path}: {line}'), message
    assert message.endswith('; resume from an earlier training-state-*.pt of the same run')


def test_a_valid_state_passes_the_field_checks(tmp_path):
    path = forged_state(tmp_path, cur_nimg=10 ** 12, nonfinite_streak={'G': 2, 'D': 0})
    assert ts.load_training_state(str(path))['cur_nimg'] == 10 ** 12


# --- 12.6: resume checks what it resumes ----------------------------------------------------------

def test_changed_what_option_is_refused_with_saved_and_new_values(tmp_path):
    path = save_state(tmp_path / 'training-state-000001.pt', batch=64, loss='d2o')
    before = tree(tmp_path)
    saved = ts.saved_run_config(ts.load_training_state(path))
    new = dict(dataclasses.asdict(TrainConfig(batch=32, lr=2e-4)), resolution=32, channels=3, label_dim=10)
    with pytest.raises(ValueError) as err:
        ts.check_resume(saved, new, path=path)
    assert str(err.value) == (f'--resume={path}: cannot change what is trained: --batch saved 64, now 32; use the '
                              f'saved values or start a new run without --resume')
    assert ts.check_resume(saved, dict(new, batch=64)) == [('--lr', 1e-4, 2e-4)]  # HOW: takes effect, logged
    assert tree(tmp_path) == before


def test_auto_resume_ignores_and_the_lock_removes_our_stale_temporaries(tmp_path):
    run = tmp_path / '00000-run'
    good = save_state(run / 'training-state-000001.pt', mtime=1000)
    for name in ('.training-state-000002.pt.x8k1_q7z.tmp', 'training-state-000003.pt.tmp'):  # newer, half-written
        (run / name).write_bytes(b'PK\x03\x04 cut')
    assert ts.find_resume_state('auto', str(tmp_path), dataclasses.asdict(TrainConfig())) == good
    notes = []
    with rd.RunDirLock(str(run), log=notes.append):  # atomic_write's name is ours; the other is not
        assert sorted(os.listdir(run)) == [rd.LOCK_NAME, 'training-state-000001.pt', 'training-state-000003.pt.tmp']
    assert notes == [f'Removed stale temporary file {run}/.training-state-000002.pt.x8k1_q7z.tmp']


def test_the_lock_keeps_the_users_tmp_files_in_a_nosubdir_folder(tmp_path):
    """--nosubdir/--resume=FILE make the user's own folder the run folder: `thesis.tmp` was deleted."""
    mine = {'thesis.tmp': 'chapter 1', '.thesis.tmp': 'autosave', 'notes.pt.tmp': 'draft',
            '.stats.jsonl.tmp': 'not ours either'}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    before = tree(tmp_path)
    notes = []
    with rd.RunDirLock(str(tmp_path), log=notes.append):
        pass
    assert tree(tmp_path) == before and notes == []


def test_auto_resume_skips_an_unreadable_state_with_a_warning(tmp_path):
    good = save_state(tmp_path / 'training-state-000001.pt', mtime=1000)
    bad = tmp_path / 'training-state-000002.pt'
    bad.write_bytes(b'PK\x03\x04 cut short')
    notes = []
    assert ts.find_resume_state('auto', str(tmp_path), log=notes.append) == good
    assert notes == [f'--resume=auto: skipping {bad}: WARNING: unreadable (--resume={bad}: corrupt or truncated '
                     f'training state (unreadable zip directory); resume from an earlier training-state-*.pt of '
                     f'the same run)']
    assert bad.read_bytes() == b'PK\x03\x04 cut short'  # skipped, not deleted


# --- 12.4: a signal to the whole process group ----------------------------------------------------

LOADER_RUN = '''
    import os, time
    import torch
    from training import run_dir as rd

    class WorkerPids(torch.utils.data.Dataset):
        def __len__(self):
            return 1 << 20

        def __getitem__(self, i):
            return os.getpid()

    init = rd.worker_init_fn if sys.argv[1] == 'fixed' else None
    loader = torch.utils.data.DataLoader(WorkerPids(), batch_size=1, num_workers=1, persistent_workers=True,
                                         worker_init_fn=init)
    with rd.StopSignals() as stop:
        batches = iter(loader)
        worker = int(next(batches))
        print('ready', flush=True)
        while stop.signum is None:
            next(batches)
            time.sleep(0.01)
        time.sleep(0.5)  # the rest of the iteration: time for a killed worker to be noticed
        after = int(next(batches))  # the loop still needs data to finish, then saves its state
        os.kill(worker, 0)  # raises if the worker is gone
        print(f'stopped by {stop.signum}; worker {worker} alive: {after == worker}', flush=True)
    sys.exit(rd.exit_status_for_signal(stop.signum))
'''


def signal_process_group(variant, signum):
    child = python(LOADER_RUN, variant, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout.readline() == 'ready\n'
        os.killpg(child.pid, signum)  # what docker stop / Kubernetes / Slurm do
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    return child.returncode, out, err


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_dataloader_worker_survives_a_group_signal_and_the_run_exits_128_plus_signum(signum):
    status, out, err = signal_process_group('fixed', signum)
    assert re.fullmatch(rf'stopped by {int(signum)}; worker \d+ alive: True\n', out), (out, err)
    assert status == 128 + signum, err


def test_without_worker_init_fn_the_group_signal_kills_the_worker():
    # The failure mode the fix removes: torch's own worker SIGTERM handler dies on a signal not sent by its parent.
    status, out, err = signal_process_group('unfixed', signal.SIGTERM)
    assert (status, out) == (1, ''), err  # the main process crashed on the lost worker: no state saved
    assert 'Traceback' in err and ('ConnectionResetError' in err or 'DataLoader worker' in err)

