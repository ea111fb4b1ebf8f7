"""The bounded fuzz run of `make test` (docs/fuzzing.md): a fixed set of cases per loader (seed 0), run by one
worker subprocess under the harness's memory bound and a per-case deadline. Every case must end in a documented
one-line error naming the file, or in a sound loaded object. The long run is `make fuzz`."""
import ctypes
import hashlib
import os
import subprocess
import sys

import pytest

from tests import fuzz_loaders

CASES_PER_LOADER = 40
SEED = 0
DEADLINE = 5.0  # seconds per case; every loader answers a case of this size in well under one
# Loaders the current code fails, with the first failure the bounded run finds (flip to passing when fixed).
KNOWN_FAILURES = {}


def _crash_on_x(path):  # defined before the loaders are listed: the worker imports this module for it
    with open(path, 'rb') as f:
        if f.read() == b'x':
            ctypes.string_at(0)  # reads address 0: SIGSEGV, as the memory-corruption attacks end
    raise ValueError(f'{os.path.basename(path)}: not a valid case')


CRASH_LOADER = fuzz_loaders.Loader('crash', '.bin', _crash_on_x, (ValueError,), None)


@pytest.fixture(scope='module')
def outcomes():
    """{loader: [(kind, detail)]} of the bounded run, all loaders in one worker stream."""
    fuzz_loaders._register_all()
    cases = [fuzz_loaders.Case(name, data, origin) for name, loader in fuzz_loaders.LOADERS.items()
             for data, origin in fuzz_loaders.draw_cases(loader, CASES_PER_LOADER, SEED) + attacks(loader)]
    results = {name: [] for name in fuzz_loaders.LOADERS}
    for case, kind, detail, _ in fuzz_loaders.run_cases(cases, deadline=DEADLINE, stop_on_failure=True):
        results[case.loader].append((kind, detail))
    return results


def attacks(loader):
    """The known attack streams for a pickle loader, plain and (if it reads torch zips) as data.pkl."""
    if loader.allowed is None:
        return []
    streams = [(data, {'attack': name}) for name, data in fuzz_loaders.known_attacks().items()]
    return streams + [(fuzz_loaders.torch_zip(data), dict(origin, zip=True)) for data, origin in streams
                      if loader.zip_pickle]


def _loader_params():
    fuzz_loaders._register_all()
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
            if name in KNOWN_FAILURES else name for name in fuzz_loaders.LOADERS]


@pytest.mark.parametrize('name', _loader_params())
def test_loader_survives_bounded_fuzzing(outcomes, name):
    failures = [f'{kind}: {detail}' for kind, detail in outcomes[name] if kind != 'ok']
    assert not failures, f'failing case: {failures[0]}'
    assert len(outcomes[name]) == CASES_PER_LOADER + len(attacks(fuzz_loaders.LOADERS[name]))


def _digest(names, count):
    fuzz_loaders._register_all()
    cases = b''.join(data for name in names for data, _ in fuzz_loaders.draw_cases(fuzz_loaders.LOADERS[name], count,
                                                                                   SEED))
    return hashlib.sha256(cases).hexdigest()


def test_cases_are_the_same_in_every_process():
    """Seeds and drawn cases do not depend on the process (storage addresses) or the clock (zip timestamps)."""
    names = ['snapshot', 'detector', 'npz', 'dataset-zip']
    child = subprocess.run([sys.executable, '-c', f'from tests.test_fuzz_loaders import _digest; '
                            f'print(_digest({names!r}, 5))'], cwd=fuzz_loaders.ROOT, capture_output=True, text=True)
    assert child.stdout.strip() == _digest(names, 5)


def test_runner_pins_and_saves_a_crash_for_replay(tmp_path, monkeypatch):
    """A case that kills its worker by a signal is pinned (not its neighbours), saved, and replays."""
    fuzz_loaders._register_all()
    monkeypatch.setitem(fuzz_loaders.LOADERS, 'crash', CRASH_LOADER)
    monkeypatch.setenv('FUZZ_EXTRA_LOADER', 'tests.test_fuzz_loaders:CRASH_LOADER')
    cases = [fuzz_loaders.Case('crash', data, {}) for data in (b'ok', b'x', b'ok')]
    results = fuzz_loaders.run_cases(cases, findings=tmp_path, log=lambda line: None, deadline=DEADLINE)
    assert [kind for _, kind, _, _ in results] == ['ok', 'signal', 'ok']
    (finding,) = tmp_path.iterdir()
    assert finding.name.startswith('crash-signal-') and (finding / 'case-000.bin').read_bytes() == b'x'
    assert fuzz_loaders.replay(finding) == [('signal', 'worker killed by signal 11', 0.0)]

