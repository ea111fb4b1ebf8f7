"""train.py as a hostile or careless user meets it (issue 12.6, 12.8, 12.12): every expected failure is one
line naming the option or file, exit status 1, no traceback (unless --debug); a resume applies and records
the options that change how training continues; the non-finite abort names only a state that exists."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from training import loss as losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--arch=ncsnpp', '--cbase=8', '--cres=1,2', '--backbone=3', '--d-pretrained=false', '--batch=4',
        '--workers=0', '--seed=1', '--grid-seeds=4', '--lr=1e-3', '--dlr=1e-3', '--r1-gamma=1', '--nosubdir',
        '--tick=0.004', '--snap=1', '--dump=1']


def cli(args, capsys):
    """train.py in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_one_line_error(code, err, *needles, usage=False):
    """Exit 1 and one `Error:` line; a usage error (click refused the value) exits 2 and adds click's usage
    lines above it (dnnlib/cli.py)."""
    assert code == (2 if usage else 1), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == (3 if usage else 1) and lines[-1].startswith('Error: ') and 'Traceback' not in err, err
    assert not usage or lines[0].startswith('Usage: train.py [OPTIONS]'), err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.mark.parametrize('extra, needles', [
    (['--seed=-5'], ['--seed=-5', '0..2147483647']),
    (['--middle-sigma=0'], ['--middle-sigma']),
    (['--device=gpu7'], ['--device=gpu7']),
    (['--metrics=fid10k', '--metric-ref=MISSING.npz'], ['--metric-ref=', 'MISSING.npz', 'no such file']),
    (['--metrics=fid10k'], ['--metrics needs --metric-ref']),
    (['--transfer=MISSING.pkl'], ['--transfer=MISSING.pkl']),
    (['--batch=6', '--batch-gpu=4'], ['--batch-gpu=4']),
    (['--no-such-option'], ['--no-such-option']),
])
def test_bad_options_fail_in_one_line_before_any_work(tmp_path, synth_zip, capsys, extra, needles):
    outdir = tmp_path / 'runs'
    code, _, err = cli([f'--outdir={outdir}', f'--data={synth_zip}'] + TINY + extra, capsys)
    assert_one_line_error(code, err, *needles, usage=extra[0] in ('--middle-sigma=0', '--no-such-option'))
    assert not outdir.exists()  # nothing was created: the checks ran before any work


def test_outdir_that_is_a_file_and_missing_data(tmp_path, synth_zip, capsys):
    (tmp_path / 'file').write_text('keep me')
    code, _, err = cli([f'--outdir={tmp_path / "file"}', f'--data={synth_zip}'] + TINY, capsys)
    assert_one_line_error(code, err, '--outdir=', 'is a file')
    assert (tmp_path / 'file').read_text() == 'keep me'
    code, _, err = cli([f'--outdir={tmp_path / "runs"}', f'--data={tmp_path / "none.zip"}'] + TINY, capsys)
    assert_one_line_error(code, err, '--data=', 'none.zip')


def test_real_process_exit_status_and_debug_traceback(tmp_path, synth_zip):
    args = [sys.executable, 'train.py', f'--outdir={tmp_path}', f'--data={synth_zip}', '--seed=-1']
    plain = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.strip().count('\n') == 0 and '--seed=-1' in plain.stderr
    debug = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, D2O_DEBUG='1'))
    assert debug.returncode == 1 and 'Traceback' in debug.stderr and '--seed=-1' in debug.stderr


def poison_generator_loss(monkeypatch, from_call):
    real, calls = losses.generator_loss, {'n': 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls['n'] += 1
        return (loss * float('nan') if calls['n'] >= from_call else loss), stats
    monkeypatch.setattr(losses, 'generator_loss', poisoned)


def test_nonfinite_abort_without_a_saved_state_points_nowhere(tmp_path, synth_zip, capsys, monkeypatch):
    poison_generator_loss(monkeypatch, from_call=1)
    run = tmp_path / 'run'
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.00004', '--max-nonfinite=2'] + TINY,
                       capsys)
    assert_one_line_error(code, err, '2 non-finite G steps in a row', 'no training state was saved')
    assert not glob.glob(str(run / 'training-state-*.pt'))
    assert 'no training state was saved' in (run / 'log.txt').read_text()  # the log says why the run ended


def test_nonfinite_abort_names_the_newest_existing_state(tmp_path, synth_zip, capsys, monkeypatch):
    # Every iteration ends a tick; ticks 1, 2, ... dump a state. Iteration 3 is skipped (its tick still dumps
    # the unchanged weights at 12 images), iteration 4 aborts.
    poison_generator_loss(monkeypatch, from_call=3)
    run = tmp_path / 'run'
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.00004', '--max-nonfinite=2'] + TINY,
                       capsys)
    assert_one_line_error(code, err, '--resume=')
    named = err.split('--resume=')[1].rstrip(')\n')
    assert os.path.isfile(named) and named.endswith('training-state-000000.012.pt'), named


@pytest.fixture(scope='module')
def two_iterations(tmp_path_factory, synth_zip):
    """A finished run of 2 iterations (states at 4 and 8 images)."""
    run = tmp_path_factory.mktemp('base') / 'run'
    with pytest.raises(SystemExit) as exit_info:
        train.cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000008'] + TINY)
        raise SystemExit(0)
    assert exit_info.value.code == 0
    return run


def copy_run(src, tmp_path):
    dst = tmp_path / 'run'
    shutil.copytree(src, dst)
    return dst


def test_resume_applies_logs_and_records_a_new_learning_rate(tmp_path, synth_zip, capsys, two_iterations):
    run = copy_run(two_iterations, tmp_path)
    args = [f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000012', '--resume=auto'] + TINY
    args = [a for a in args if not a.startswith(('--lr=', '--r1-gamma='))] + ['--lr=5e-4', '--r1-gamma=0']
    code, out, err = cli(args, capsys)
    assert code == 0, err
    log = (run / 'log.txt').read_text()
    assert 'Resume: --lr changed from 0.001 to 0.0005' in log and 'Resume: --r1-gamma changed from 1.0 to 0.0' in log
    options = json.loads((run / 'training_options.json').read_text())
    assert options['lr'] == 5e-4 and options['r1_gamma'] == 0.0 and options['resumed_from'].endswith('008.pt')
    state = torch.load(run / 'training-state-000000.012.pt', weights_only=True)
    assert state['cur_nimg'] == 12 and state['opt_G']['param_groups'][0]['lr'] == 5e-4
    # Without R1 the lazy-R1 correction is gone: D's Adam uses the plain dlr and beta2.
    assert state['opt_D']['param_groups'][0]['lr'] == 1e-3
    assert list(state['opt_D']['param_groups'][0]['betas']) == [0.0, 0.99]


def test_resume_refuses_to_change_what_is_trained(tmp_path, synth_zip, capsys, two_iterations):
    run = copy_run(two_iterations, tmp_path)
    before = sorted(os.listdir(run))
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000012', f'--resume={run}',
                        '--freeze=2'] + TINY, capsys)
    assert_one_line_error(code, err, '--freeze')
    assert sorted(os.listdir(run)) == before  # nothing written


def test_sigterm_to_the_process_group_saves_the_state_and_exits_143(tmp_path, synth_zip):
    """What `docker stop`/Slurm do: SIGTERM to every process of the group, DataLoader worker included."""
    import signal
    import time
    run = tmp_path / 'run'
    args = [sys.executable, 'train.py', f'--outdir={run}', f'--data={synth_zip}', '--duration=1'] + \
        [a for a in TINY if a != '--workers=0'] + ['--workers=1']
    child = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 300
    while not (run / 'stats.jsonl').exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(child.pid, signal.SIGTERM)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    states = glob.glob(str(run / 'training-state-*.pt'))
    assert len(states) == 1 and 'continue with --resume=' in err
    assert torch.load(states[0], weights_only=True)['cur_nimg'] > 0


# --- nothing the project did not write is overwritten; broken states and failed saves are one line --------------

def tree(folder):
    """{name: bytes} of a run folder: equal before and after = nothing written, nothing lost."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_fresh_run_refuses_a_folder_that_holds_another_run(tmp_path, synth_zip, capsys, two_iterations):
    run = copy_run(two_iterations, tmp_path)
    before = tree(run)
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000004'] + TINY, capsys)
    assert_one_line_error(code, err)
    assert err.strip() == (f'Error: {run}: already holds another run (network-snapshot-000000.004.pkl, '
                           f'network-snapshot-000000.008.pkl, stats.jsonl and 2 more); continue it with '
                           f'--resume={run}, or choose another --outdir')
    assert tree(run) == before  # no snapshot, options, stats line or log line of the refused run


def test_fresh_run_into_a_folder_without_a_state_says_there_is_nothing_to_resume(tmp_path, synth_zip, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'stats.jsonl').write_text('{"kimg": 0.004}\n')
    (run / 'thesis.tmp').write_text('mine')
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000004'] + TINY, capsys)
    assert_one_line_error(code, err, f'{run}: already holds another run (stats.jsonl); it has no training state to '
                                     f'resume, or choose another --outdir')
    assert tree(run) == {'stats.jsonl': b'{"kimg": 0.004}\n', 'thesis.tmp': b'mine'}


def forge_newest_state(run, **fields):
    path = sorted(glob.glob(str(run / 'training-state-*.pt')))[-1]
    state = torch.load(path, weights_only=True)
    state.update(fields)
    torch.save(state, path)
    return path


def test_resume_from_a_state_with_negative_cur_nimg_is_refused(tmp_path, synth_zip, capsys, two_iterations):
    run = copy_run(two_iterations, tmp_path)
    path = forge_newest_state(run, cur_nimg=-10 ** 18)
    before = tree(run)
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000012', f'--resume={run}'] + TINY,
                       capsys)
    assert_one_line_error(code, err)
    assert err.strip() == (f"Error: --resume={path}: field 'cur_nimg' is -1000000000000000000, expected an "
                           f"integer from 0 to 1000000000000; resume from an earlier training-state-*.pt of the same "
                           f"run")
    assert tree(run) == before


def test_resume_from_weights_that_do_not_fit_the_network_is_one_line(tmp_path, synth_zip, capsys, two_iterations):
    run = copy_run(two_iterations, tmp_path)
    state = torch.load(sorted(glob.glob(str(run / 'training-state-*.pt')))[-1], weights_only=True)
    dropped = sorted(state['G'])[0]
    path = forge_newest_state(run, G={k: v for k, v in state['G'].items() if k != dropped})
    code, _, err = cli([f'--outdir={run}', f'--data={synth_zip}', '--duration=0.000012', f'--resume={run}'] + TINY,
                       capsys)
    assert_one_line_error(code, err, f"--resume={path}: field 'G' does not fit this run (Error(s) in loading "
                                     f"state_dict for D2OPrecond: Missing key(s) in state_dict: \"{dropped}\"")
    assert err.strip().endswith('; resume from an earlier training-state-*.pt of the same run')


def test_a_save_over_the_file_size_limit_is_one_line_and_keeps_the_previous_state(tmp_path, synth_zip,
                                                                                  two_iterations):
    """RLIMIT_FSIZE (ulimit -f, some batch schedulers): the 1 MB snapshot fits, the 139 MB state does not."""
    import resource
    run = copy_run(two_iterations, tmp_path)
    previous = tree(run)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
    result = subprocess.run([sys.executable, 'train.py', f'--outdir={run}', f'--data={synth_zip}',
                             '--duration=0.000012', f'--resume={run}'] + TINY, cwd=ROOT, capture_output=True,
                            text=True, preexec_fn=limit_file_size, env=dict(os.environ, OMP_NUM_THREADS='1'))
    state = run / 'training-state-000000.012.pt'
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (f'Error: {state}: could not be written (File too '
                                                      f'large); the files saved before it are intact')
    assert 'Traceback' not in result.stderr
    after = tree(run)
    assert not state.exists() and not [n for n in after if n.endswith('.tmp')]
    assert after['training-state-000000.008.pt'] == previous['training-state-000000.008.pt']
    assert 'network-snapshot-000000.012.pkl' in after  # written before the state, complete
    assert f'Error: {state}: could not be written' in (run / 'log.txt').read_text()


def test_train_sh_runs_the_train_py_beside_itself_not_the_current_folders(tmp_path):
    (tmp_path / 'train.py').write_text('open("pwned", "w")\n')  # a train.py in the folder the user happens to be in
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'torchrun').write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # stands in for torchrun: prints its args
    (bin_dir / 'torchrun').chmod(0o755)
    (tmp_path / 'link.sh').symlink_to(os.path.join(ROOT, 'train.sh'))  # also when called through a link
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', NGPUS='1')
    for script in (os.path.join(ROOT, 'train.sh'), 'link.sh'):
        result = subprocess.run(['bash', script, 'cifar10-uncond-d2o', '--workers=0'], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[:3] == ['--standalone', '--nproc_per_node=1', os.path.join(ROOT, 'train.py')]
    assert not (tmp_path / 'pwned').exists()
