"""dnnlib/cli.py: the one error policy of every command line (docs/design.md, "Errors"): usage errors exit 2
with click's usage line and one `Error:` line, expected failures are one `Error:` line and exit 1, bugs keep
their traceback, --debug / D2O_DEBUG show it, only rank 0 prints."""
import errno
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import click
import pytest
import torch

from dnnlib import cli
from dnnlib.util import InputError, debug_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every entry point: (how a user runs it, module, the click command's name in it).
ENTRY_POINTS = [('train.py', 'train', 'main'), ('generate.py', 'generate', 'main'), ('fid.py', 'fid', 'main'),
                ('dataset_tool.py', 'dataset_tool', 'cli'),
                ('python -m training.analysis', 'training.analysis.__main__', 'main'),
                ('demo.py', 'demo', 'main'), ('python -m bench', 'bench.__main__', 'main'),
                ('python -m bench.gpu_check', 'bench.gpu_check', 'main'),
                ('python -m bench.train_step', 'bench.train_step', 'main'),
                ('python -m bench.sampling', 'bench.sampling', 'main'),
                ('python -m bench.fid_pipeline', 'bench.fid_pipeline', 'main'),
                ('python -m bench.profile_step', 'bench.profile_step', 'main'),
                ('docs/plot_convergence.py', 'docs/plot_convergence.py', 'main')]


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    monkeypatch.delenv('D2O_DEBUG', raising=False)
    monkeypatch.delenv('RANK', raising=False)


def command_of(module, name):
    if module.endswith('.py'):
        spec = importlib.util.spec_from_file_location('plot_convergence', os.path.join(ROOT, module))
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return getattr(loaded, name)
    return getattr(importlib.import_module(module), name)


def invoke(command, args, capsys, prog='toy'):
    """(exit status, stderr lines) of `command` run as a program."""
    with pytest.raises(SystemExit) as info:
        command.main(list(args), prog_name=prog)
    return info.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize('prog, module, name', ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_every_cli_answers_an_unknown_option_with_usage_and_exit_2(prog, module, name, capsys):
    code, lines = invoke(command_of(module, name), ['--no-such-option'], capsys, prog)
    group = prog in ('fid.py', 'dataset_tool.py', 'python -m training.analysis')
    assert code == 2 and lines[:3] == [f'Usage: {prog} [OPTIONS]' + (' COMMAND [ARGS]...' if group else ''),
                                       f"Try '{prog} --help' for help.", ''], lines
    assert len(lines) == 4 and lines[3].startswith("Error: No such option '--no-such-option'."), lines  # "Did you mean"


def test_a_real_process_gets_the_same_answer():
    res = subprocess.run([sys.executable, '-m', 'bench.gpu_check', '--no-such-option'], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        'Usage: python -m bench.gpu_check [OPTIONS]', "Try 'python -m bench.gpu_check --help' for help.", '',
        "Error: No such option '--no-such-option'."], res.stderr


@pytest.mark.parametrize('value, on', [('', False), ('0', False), ('false', False), ('No', False), ('OFF', False),
                                       ('n', False), ('F', False), ('1', True), ('true', True), ('Yes', True),
                                       ('on', True)])
def test_d2o_debug_spellings(monkeypatch, value, on):
    monkeypatch.setenv('D2O_DEBUG', value)
    assert debug_enabled() is on


def test_an_unknown_d2o_debug_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv('D2O_DEBUG', 'maybe')
    with pytest.raises(ValueError):
        debug_enabled()
    code, lines = invoke(toy(KeyError('x')), [], capsys)
    assert code == 2 and lines == ["Error: D2O_DEBUG='maybe': expected 1/true/yes/on or 0/false/no/off (or unset)"]


def toy(failure, task=None):
    """A command that raises `failure` (while `task`, when given)."""
    @click.command(cls=cli.Command)
    @cli.debug_option
    @click.option('--n', type=click.IntRange(min=0), default=0)
    def main(n):
        if task is None:
            raise failure
        with cli.task(task):
            raise failure
    return main


def truncated_torch_file_error(tmp_path):
    path = tmp_path / 'w.pt'
    torch.save({'w': torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    try:
        torch.load(path, weights_only=True)
    except RuntimeError as err:
        return err
    raise AssertionError('torch.load read a truncated file')


@pytest.mark.parametrize('failure, task, line', [
    (KeyError("snapshot has no 'net'"), None, "Error: snapshot has no 'net'"),  # no repr quotes around it
    (FileNotFoundError(errno.ENOENT, 'No such file or directory', 'x.pkl'), None,
     'Error: x.pkl: No such file or directory'),
    (ValueError('x.pkl: bad\n  second line'), None, 'Error: x.pkl: bad second line'),
    (EOFError(), None, 'Error: EOFError'),
    (pickle.UnpicklingError('x.pkl: the file ends early'), None, 'Error: x.pkl: the file ends early'),
    (zipfile.BadZipFile('File is not a zip file'), None, 'Error: File is not a zip file'),
    (tarfile.ReadError('not a gzip file'), None, 'Error: not a gzip file'),
    (FloatingPointError('2 non-finite G steps'), None, 'Error: 2 non-finite G steps'),
    (OverflowError('cannot convert float infinity to integer'), None,
     'Error: cannot convert float infinity to integer'),
    (MemoryError(), 'loading --network=x.pkl', 'Error: out of memory while loading --network=x.pkl'),
    (MemoryError('Unable to allocate 7.28 TiB'), None, 'Error: out of memory while running toy (Unable to '
                                                      'allocate 7.28 TiB)'),
    (RecursionError('maximum recursion depth exceeded'), 'reading x.pkl',
     "Error: input nested too deeply while reading x.pkl (Python's recursion limit)"),
    (InputError('No CLIP ViT-B/32 weights available; pass --clip-weights=PATH|URL'), None,
     'Error: No CLIP ViT-B/32 weights available; pass --clip-weights=PATH|URL'),
    (click.ClickException('--outdir=x: cannot write'), None, 'Error: --outdir=x: cannot write'),
])
def test_expected_failures_are_one_line_and_exit_1(failure, task, line, capsys):
    assert invoke(toy(failure, task), [], capsys) == (1, [line])


def test_a_torch_io_failure_is_expected_and_names_what_was_done(tmp_path, capsys):
    err = truncated_torch_file_error(tmp_path)
    assert 'PytorchStreamReader failed' in str(err)
    code, lines = invoke(toy(err, 'loading --network=w.pt'), [], capsys)
    assert code == 1 and len(lines) == 1 and lines[0].startswith('Error: PytorchStreamReader failed')
    assert lines[0].endswith(' (loading --network=w.pt)')


@pytest.mark.parametrize('bug', [RuntimeError('mat1 and mat2 shapes cannot be multiplied'), AttributeError('x'),
                                 TypeError('unsupported operand')])
def test_bugs_keep_their_traceback(bug, capsys):
    with pytest.raises(type(bug)):
        toy(bug).main([], prog_name='toy')
    assert capsys.readouterr().err == ''


def test_debug_lets_the_exception_through(monkeypatch):
    with pytest.raises(KeyError):
        toy(KeyError('x')).main(['--debug'], prog_name='toy')
    monkeypatch.setenv('D2O_DEBUG', 'yes')
    with pytest.raises(KeyError):
        toy(KeyError('x')).main([], prog_name='toy')


def test_usage_errors_exit_2_also_when_found_after_parsing(capsys):
    code, lines = invoke(toy(click.BadParameter('out of range: the network has 10 classes', param_hint='--class')),
                         [], capsys)
    assert code == 2 and lines == ['Usage: toy [OPTIONS]', "Try 'toy --help' for help.", '',
                                   "Error: Invalid value for --class: out of range: the network has 10 classes"]
    code, lines = invoke(toy(KeyError('x')), ['--n=-1'], capsys)
    assert code == 2 and lines[-1] == "Error: Invalid value for '--n': -1 is not in the range x>=0."


def test_only_rank_0_prints(monkeypatch, capsys):
    monkeypatch.setenv('RANK', '1')
    assert invoke(toy(ValueError('bad')), [], capsys) == (1, [])
    monkeypatch.setenv('RANK', '0')
    assert invoke(toy(ValueError('bad')), [], capsys) == (1, ['Error: bad'])


def test_ctrl_c_exits_130_and_a_returned_status_is_the_exit_status(capsys):
    assert invoke(toy(KeyboardInterrupt()), [], capsys) == (130, ['Interrupted.'])

    @click.command(cls=cli.Command)
    def failed_checks():
        return 1
    assert invoke(failed_checks, [], capsys) == (1, [])
