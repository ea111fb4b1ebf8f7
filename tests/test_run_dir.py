"""Unit tests of training/run_dir.py: naming, lock, JSONL records, best snapshot, resume lookup and
checks, signal helpers. Attacks on the same functions are in test_hostile_rundir.py."""
import dataclasses
import errno
import json
import os
import signal
import subprocess

import pytest
import torch

from training import run_dir as rd, state as ts
from training.config import TrainConfig


def save_state(path, mtime=None, **config):
    """A minimal but complete training state (the loop's key set) with the given config values."""
    from training.state import rng_state
    cfg = dict(dataclasses.asdict(TrainConfig()), **config)
    state = dict(version=ts.STATE_VERSION, config=cfg, cur_nimg=0, cur_tick=0, batch_idx=0, nonfinite_streak={},
                 rng=[rng_state()], G_record=dict(class_name='D2OPrecond', init_args=[],
                                                  init_kwargs=dict(img_resolution=32, img_channels=3, label_dim=10)),
                 G={'w': torch.arange(4.0)}, G_ema={}, opt_G={}, D=None, opt_D=None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


# --- naming ---------------------------------------------------------------------------------------

def test_run_dir_takes_the_next_id_and_edm_style_description(tmp_path):
    for name in ('00000-a', '00007-b', 'notes', '12-c'):
        (tmp_path / name).mkdir()
    cfg = TrainConfig(outdir=str(tmp_path), desc='lr2e-4', arch='ncsnpp')
    path = rd.make_run_dir(cfg, 'cifar10-32x32', world=2, batch=64)
    assert path == str(tmp_path / '00013-cifar10-32x32-uncond-ncsnpp-d2o-d2o-gpus2-batch64-fp32-lr2e-4')
    assert not os.path.exists(path)  # naming only: the folder is created with its lock
    assert rd.make_run_dir(TrainConfig(outdir=str(tmp_path / 'new')), 'd', 1, 8).endswith('/00000-d-uncond-transfer-'
                                                                                         'd2o-d2o-gpus1-batch8-fp32')
    assert rd.make_run_dir(TrainConfig(outdir=str(tmp_path), nosubdir=True), 'd', 1, 8) == str(tmp_path)


def test_dataset_name_becomes_one_plain_component(tmp_path):
    path = rd.make_run_dir(TrainConfig(outdir=str(tmp_path)), '..my data\n', 1, 8)
    assert os.path.basename(path) == '00000-my_data_-uncond-transfer-d2o-d2o-gpus1-batch8-fp32'


@pytest.mark.parametrize('desc', ['ok', 'a.b_c-d+e=f,g@h', '9' * 100])
def test_plain_desc_is_accepted(desc):
    assert rd.check_desc(desc) == desc


@pytest.mark.parametrize('desc', ['a/b', '..', 'a..b', '.hidden', '-x', 'a b', 'tab\t', 'nl\n', 'é', 'x' * 101,
                                  'a\\b'])
def test_other_desc_is_refused_naming_the_option(desc):
    with pytest.raises(ValueError, match=r"^--desc=.*expected a plain name"):
        rd.check_desc(desc)


# --- lock -----------------------------------------------------------------------------------------

def test_lock_records_holder_excludes_a_second_holder_and_is_released(tmp_path):
    run = tmp_path / 'run'
    with rd.RunDirLock(str(run), log=lambda m: None):
        holder = json.loads((run / rd.LOCK_NAME).read_text())
        assert holder['pid'] == os.getpid() and holder['host'] == os.uname().nodename
        # flock belongs to the open file, so a second lock in the same process is refused too.
        with pytest.raises(rd.RunDirLocked, match=f'^{run}: run directory in use by another run \\(pid {os.getpid()}'):
            rd.RunDirLock(str(run)).acquire()
    assert not (run / rd.LOCK_NAME).exists()
    notes = []
    with rd.RunDirLock(str(run), log=notes.append):  # free again, and not reported as stale
        pass
    assert notes == []


def test_lock_removes_stale_temporaries_of_our_own_writers_only(tmp_path):
    ours = ['.training-state-000010.pt.k3j2ab_9.tmp', '.network-snapshot-000000.012.pkl.abcdefgh.tmp',
            '.network-snapshot-best.pkl.0123456z.tmp', '.fakes-000004.png.zzzzzzzz.tmp', '.stats.jsonl.a1b2c3d4.tmp',
            '.training_options.json.qwertyui.tmp']
    others = ['stats.jsonl.tmp', 'stats.jsonl', 'training-state-000005.pt', '.stats.jsonl.k3j2.tmp',
              '.notes.txt.abcdefgh.tmp', '.stats.jsonl.ABCDEFGH.tmp', 'x.training-state-000001.pt.abcdefgh.tmp']
    for name in ours + others:
        (tmp_path / name).write_text(name)
    notes = []
    with rd.RunDirLock(str(tmp_path), log=notes.append):
        assert sorted(os.listdir(tmp_path)) == sorted(others + [rd.LOCK_NAME])
    assert all((tmp_path / name).read_text() == name for name in others)
    assert notes == [f'Removed stale temporary file {tmp_path / name}' for name in sorted(ours)]


def test_own_temporary_matches_the_names_atomic_write_makes(tmp_path):
    import dnnlib
    for name in ('training-state-000123.pt', 'network-snapshot-000000.004.pkl', 'stats.jsonl', 'fakes-000002.png'):
        with pytest.raises(KeyboardInterrupt), dnnlib.atomic_write(tmp_path / name):  # a writer that dies
            [tmp] = [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]
            assert rd.OWN_TEMPORARY.fullmatch(tmp), tmp
            raise KeyboardInterrupt
        assert os.listdir(tmp_path) == []  # atomic_write cleaned up after itself



def test_lock_without_flock_falls_back_to_the_recorded_holder(tmp_path, monkeypatch):
    def no_flock(fd, op):  # some network file systems
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(rd.fcntl, 'flock', no_flock)
    host, lock = os.uname().nodename, tmp_path / rd.LOCK_NAME
    lock.write_text(json.dumps(dict(pid=os.getppid(), host=host, start_utc='then')))  # a live process
    with pytest.raises(rd.RunDirLocked, match=f'in use by another run \\(pid {os.getppid()} on {host}, started then'):
        rd.RunDirLock(str(tmp_path)).acquire()
    assert json.loads(lock.read_text())['pid'] == os.getppid()  # untouched
    gone = subprocess.Popen(['true'])
    gone.wait()
    lock.write_text(json.dumps(dict(pid=gone.pid, host=host, start_utc='then')))  # a dead process
    notes = []
    with rd.RunDirLock(str(tmp_path), log=notes.append):
        assert json.loads(lock.read_text())['pid'] == os.getpid()
    assert notes == [f'WARNING: {tmp_path}: took over the stale lock of pid {gone.pid} on {host}, started then, which '
                     f'is no longer running']

# --- records --------------------------------------------------------------------------------------

def test_append_jsonl_appends_lines_and_closes_a_cut_line(tmp_path):
    path = tmp_path / 'stats.jsonl'
    rd.append_jsonl(path, dict(kimg=1))
    rd.append_jsonl(path, dict(kimg=2, x=0.5))
    assert path.read_text() == '{"kimg": 1}\n{"kimg": 2, "x": 0.5}\n'
    with open(path, 'a') as f:
        f.write('{"kimg": 3, "x"')  # a crash mid-line
    rd.append_jsonl(path, dict(kimg=3))
    assert path.read_text().splitlines()[-2:] == ['{"kimg": 3, "x"', '{"kimg": 3}']
    assert rd.read_jsonl(path) == [dict(kimg=1), dict(kimg=2, x=0.5), dict(kimg=3)]
    assert rd.read_jsonl(tmp_path / 'absent.jsonl') == []


def test_truncate_jsonl_after_keeps_records_up_to_the_resume_point(tmp_path):
    path = tmp_path / 'stats.jsonl'
    for kimg in (0.0, 0.4, 0.8, 1.2):
        rd.append_jsonl(path, dict(kimg=kimg))
    assert rd.truncate_jsonl_after(path, 0.8) == 1
    assert rd.read_jsonl(path) == [dict(kimg=0.0), dict(kimg=0.4), dict(kimg=0.8)]
    assert rd.truncate_jsonl_after(tmp_path / 'absent.jsonl', 0.0) == 0
    assert sorted(os.listdir(tmp_path)) == ['stats.jsonl']  # no temporary left


def test_record_metric_copies_each_new_best_snapshot(tmp_path):
    for kimg in (1, 2, 3):
        (tmp_path / f'network-snapshot-{kimg:06d}.pkl').write_bytes(bytes([kimg]) * 10)
    results = [rd.record_metric(str(tmp_path), 'fid10k', dict(fid=fid, kimg=kimg,
                                                               snapshot=f'network-snapshot-{kimg:06d}.pkl'))
               for kimg, fid in ((1, 30.0), (2, 12.5), (3, 12.5))]
    assert results == [True, True, False]  # a tie is not a new best
    assert (tmp_path / 'network-snapshot-best.pkl').read_bytes() == bytes([2]) * 10
    assert [r['fid'] for r in rd.read_jsonl(tmp_path / 'metric-fid10k.jsonl')] == [30.0, 12.5, 12.5]


def test_logger_tees_into_log_txt_and_restores_streams(tmp_path, capsys):
    import sys
    stdout = sys.stdout
    logger = rd.Logger(tmp_path / 'log.txt')
    print('hello')
    logger.close()
    assert sys.stdout is stdout
    assert (tmp_path / 'log.txt').read_text() == 'hello\n' and capsys.readouterr().out == 'hello\n'


# --- resume ---------------------------------------------------------------------------------------

def test_option_lists_partition_the_config_fields():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    listed = [k for k in ts.WHAT_OPTIONS + ts.HOW_OPTIONS + ts.IGNORED_OPTIONS if k not in ts.DATASET_KEYS]
    assert len(listed) == len(set(listed)), 'an option is in two lists'
    assert sorted(listed) == sorted(fields), 'classify every TrainConfig field in training/state.py'


def test_find_resume_state_file_dir_and_none(tmp_path):
    run = tmp_path / '00000-x'
    paths = [save_state(run / f'training-state-{tag}.pt') for tag in ('000000.400', '000002', '000001')]
    (run / 'training-state-000009.pt.tmp').write_text('partial')
    assert ts.find_resume_state(str(run), str(tmp_path)) == paths[1]  # the largest kimg, not the name order
    assert ts.find_resume_state(paths[0], str(tmp_path)) == paths[0]
    assert ts.find_resume_state(None, str(tmp_path)) is None and ts.find_resume_state('', str(tmp_path)) is None
    assert ts.find_resume_state('auto', str(tmp_path / 'empty')) is None


def test_find_resume_state_auto_takes_the_newest_state_of_this_configuration(tmp_path):
    newest_other = save_state(tmp_path / '00001-b' / 'training-state-000003.pt', mtime=3000, batch=32)
    mine = save_state(tmp_path / '00000-a' / 'training-state-000002.pt', mtime=2000, batch=64)
    save_state(tmp_path / '00000-a' / 'training-state-000001.pt', mtime=1000, batch=64)
    notes = []
    config = dict(dataclasses.asdict(TrainConfig(batch=64, lr=5e-4)), resolution=32)
    assert ts.find_resume_state('auto', str(tmp_path), config, log=notes.append) == mine
    assert notes == [f'--resume=auto: skipping {newest_other}: another configuration (--batch saved 32, now 64)']
    assert ts.find_resume_state('auto', str(tmp_path), log=notes.append) == newest_other  # no config: newest
    assert ts.find_resume_state('auto', str(tmp_path), dict(config, resolution=64), log=notes.append) is None


def test_load_training_state_round_trip(tmp_path):
    path = save_state(tmp_path / 'training-state-000001.pt', lr=3e-4)
    for mmap in (False, True):
        state = ts.load_training_state(path, mmap=mmap)
        assert state['config']['lr'] == 3e-4 and torch.equal(state['G']['w'], torch.arange(4.0))
    config = ts.saved_run_config(state)
    assert (config['resolution'], config['channels'], config['label_dim'], config['lr']) == (32, 3, 10, 3e-4)


def test_check_resume_returns_changed_how_options_and_refuses_what():
    saved = dict(dataclasses.asdict(TrainConfig(cres=[1, 2], freeze=0)), resolution=32)
    same = dict(dataclasses.asdict(TrainConfig(cres=(1, 2), freeze=0, outdir='elsewhere', device='cpu')), resolution=32)
    assert ts.check_resume(saved, same) == []  # list/tuple alike; IGNORED options do not count
    new = dict(same, lr=2e-4, tick=1.0, future_option=1)
    saved['future_option'] = 0
    assert ts.check_resume(saved, new) == [('--lr', 1e-4, 2e-4), ('--tick', 25.0, 1.0), ('--future-option', 0, 1)]
    with pytest.raises(ValueError) as err:
        ts.check_resume(saved, dict(new, freeze=1, resolution=64), path='run/training-state-000001.pt')
    assert str(err.value) == ("--resume=run/training-state-000001.pt: cannot change what is trained: --freeze saved 0, "
                              "now 1; --data resolution saved 32, now 64; use the saved values or start a new run "
                              "without --resume")


# --- signals --------------------------------------------------------------------------------------

def test_exit_status_for_signal_follows_the_shell_convention():
    assert rd.exit_status_for_signal(signal.SIGINT) == 130
    assert rd.exit_status_for_signal(signal.SIGTERM) == 143


def test_stop_signals_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with rd.StopSignals() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
