"""The one error policy of every command line (docs/design.md, "Errors"):

- a usage error (unknown option, a value click refuses) prints the usage line and one `Error: ...` line and
  exits 2, exactly as click (and argparse) do;
- an expected failure while running (a missing or broken file, bad data, a full disk, out of memory) prints
  one `Error: ...` line and exits 1;
- `--debug` anywhere on the command line, or D2O_DEBUG=1, lets the exception through with its traceback;
- anything else is a bug and keeps its traceback.

Under torchrun only rank 0 prints the line (every rank exits with the same status). Commands opt in with
`@click.command(cls=cli.Command)` / `@click.group(cls=cli.Group)`; nothing here imports torch."""
import contextlib
import os
import pickle
import re
import sys
import tarfile
import traceback
import zipfile

import click

from dnnlib.util import InputError, debug_enabled

# Failures a user can cause with a file, an option or the machine (not bugs): one line, exit status 1.
EXPECTED_ERRORS = (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                   tarfile.TarError, FloatingPointError, MemoryError, OverflowError, RecursionError, InputError)
# torch.load / torch.save failures are RuntimeErrors; only these messages are the file's fault, any other
# RuntimeError is a bug and keeps its traceback.
TORCH_IO_ERROR = re.compile(r'PytorchStream(Reader|Writer) failed|failed finding central directory|'
                            r'inline_container|file write failed|unexpected pos \d+|Invalid magic number')
DEBUG_HELP = 'Show the traceback of an expected failure (also D2O_DEBUG=1)'


@contextlib.contextmanager
def task(what):
    """Names what the command was doing when memory or the recursion limit ran out ("out of memory while
    loading --network=x.pkl"): a note on the exception, read by `describe`."""
    try:
        yield
    except (MemoryError, RecursionError, RuntimeError) as err:
        if not any(note.startswith('while ') for note in getattr(err, '__notes__', ())):
            err.add_note(f'while {what}')
        raise


def is_expected(err):
    return isinstance(err, EXPECTED_ERRORS) or (isinstance(err, RuntimeError) and
                                                TORCH_IO_ERROR.search(str(err)) is not None)


def describe(err, prog):
    """The one line for an expected failure: an OSError names its file, a KeyError loses repr's quotes,
    resource exhaustion says what was being done."""
    notes = [note for note in getattr(err, '__notes__', ()) if note.startswith('while ')]
    doing = notes[0] if notes else f'while running {prog}'
    if isinstance(err, MemoryError):
        message = f'out of memory {doing}' + (f' ({err})' if str(err) else '')
    elif isinstance(err, RecursionError):
        message = f'input nested too deeply {doing} (Python\'s recursion limit)'
    elif isinstance(err, OSError) and err.filename and err.strerror:
        message = f'{err.filename}: {err.strerror}'
    elif isinstance(err, KeyError) and err.args:
        message = str(err.args[0])
    elif isinstance(err, RuntimeError) and not isinstance(err, InputError):
        message = f'{err} ({doing[6:] if notes else "a torch file could not be read or written"})'
    else:
        message = str(err)
    return ' '.join((message or type(err).__name__).split())


def program_name():
    """`train.py`, or `python -m bench.gpu_check` for a module run with -m (what the user typed)."""
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    if spec is not None and spec.name:
        return 'python -m ' + spec.name.removesuffix('.__main__')
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'd2o'


def is_rank_0():
    """torchrun's RANK, read here rather than from torch_utils.distributed: a usage error comes before the
    process group exists, and this module does not import torch. The other ranks fail the same way, silently."""
    return int(os.environ.get('RANK', '0') or 0) == 0


def say(line):
    if is_rank_0():
        click.echo(line, err=True)


def run(command, args, prog_name, extra):
    """Parse and invoke `command` under the policy above; never returns (sys.exit with the status)."""
    args = list(sys.argv[1:] if args is None else args)
    prog_name = prog_name or program_name()
    debug = '--debug' in args
    args = [a for a in args if a != '--debug']
    try:
        debug = debug or debug_enabled()
    except ValueError as err:  # a usage error of the environment
        say(f'Error: {err}')
        sys.exit(2)
    ctx = None
    try:
        with command.make_context(prog_name, args, **extra) as ctx:
            result = command.invoke(ctx)
    except click.exceptions.Exit as err:  # --help, ctx.exit(n)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:  # click.confirm() answered with Ctrl-C
        sys.exit(130)
    except KeyboardInterrupt:
        say('Interrupted.')
        sys.exit(130)
    except click.ClickException as err:  # usage errors exit 2 (click's own format), others 1
        if debug:
            traceback.print_exception(err)
        if isinstance(err, click.UsageError) and err.ctx is None:
            err.ctx = ctx  # a value refused after parsing (e.g. --class for this network): usage line too
        if is_rank_0():
            err.message = ' '.join(err.message.split())
            err.show()
        sys.exit(err.exit_code)
    except Exception as err:  # noqa: BLE001 — sorted into expected failures and bugs
        if debug or not is_expected(err):
            raise
        say(f'Error: {describe(err, prog_name)}')
        sys.exit(1)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


class Command(click.Command):
    """A click command whose standalone `main` follows the policy; `standalone_mode=False` behaves as in
    click (exceptions propagate) for callers that want them."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        run(self, args, prog_name, extra)


class Group(Command, click.Group):
    """The same policy for a command with subcommands (`fid.py calc`, `dataset_tool.py convert`)."""


def debug_option(fn):
    """`--debug` for `--help` to list: the policy reads it from the command line before click does."""
    return click.option('--debug', is_flag=True, expose_value=False, help=DEBUG_HELP)(fn)
