"""checkpoint_tool.py and training/safetensors_snapshot.py: snapshots and training states converted to
safetensors load everywhere a pickle does, with bit-identical samples; tampered files give one line."""
import glob
import json
import os
import struct

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import checkpoint_tool
import generate
from dnnlib import EasyDict
from training import checkpoint, generator, safetensors_snapshot, training_loop
from training.analysis.__main__ import main as analysis_main
from test_fid_cli import run_validation
from test_training_loop import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TEACHER = os.path.join(ROOT, 'demo', 'teacher-mnist32.pkl')
FIXTURES = ('edm_vp_ddpmpp_cond16', 'edm_ve_ncsnpp_uncond16', 'edm_edm_ncsnpp_uncond32', 'edm_edm_adm_cond16',
            'edm_iddpm_adm_uncond16', 'd2o_ncsnpp_uncond16', 'd2o_adm_cond16')


def run(main, *args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def convert(source, dest):
    code, out = run(checkpoint_tool.main, 'convert', f'--source={source}', f'--dest={dest}')
    assert code == 0, out
    return dest


def error_line(code, out, status=1):
    """The output of a refused input: exactly one line `Error: ...` and exit status 1 (a bad file), or 2 (a bad
    option value: a usage error, dnnlib/cli.py)."""
    lines = [line for line in out.splitlines() if line.startswith('Error:') or 'Traceback' in line]
    assert code == status and len(lines) == 1 and lines[0].startswith('Error: '), (code, out)
    return lines[0]


def generated(network, outdir, *args):
    code, out = run(generate.main, f'--network={network}', f'--outdir={outdir}', '--device=cpu', *args)
    assert code == 0, out
    return {os.path.basename(p): np.asarray(PIL.Image.open(p)) for p in sorted(glob.glob(f'{outdir}/*.png'))}


def assert_same_networks(a, b):
    assert type(a) is type(b) and a._init_kwargs == b._init_kwargs
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope='module')
def demo_pair(tmp_path_factory):
    return DEMO_TEACHER, convert(DEMO_TEACHER, tmp_path_factory.mktemp('demo') / 'teacher-mnist32.safetensors')

#----------------------------------------------------------------------------
# Conversion and loading.

@pytest.mark.parametrize('name', FIXTURES)
def test_fixture_checkpoints_convert_losslessly(fixtures_dir, tmp_path, name):
    pkl = fixtures_dir / f'{name}.pkl'
    dest = convert(pkl, tmp_path / f'{name}.safetensors')
    original, converted = checkpoint.load_snapshot(pkl), checkpoint.load_snapshot(dest)
    keys = [k for k, v in original.items() if isinstance(v, torch.nn.Module)]
    assert keys == (['net', 'ema'] if name.startswith('d2o') else ['ema'])
    assert sorted(converted) == sorted(keys + ['dataset_kwargs'])
    assert converted['dataset_kwargs'] == original['dataset_kwargs']
    for key in keys:
        assert_same_networks(original[key], converted[key])
        assert not converted[key].training and not any(p.requires_grad for p in converted[key].parameters())
    # Plain safetensors reads every weight; the header is one JSON string beside safetensors' own 'format'.
    plain = safetensors.torch.load_file(dest)
    assert plain.keys() == {f'{k}.{n}' for k in keys for n in original[k].state_dict()}
    with safetensors.safe_open(dest, 'pt') as f:
        metadata = f.metadata()
    assert sorted(metadata) == ['d2o_snapshot', 'format'] and metadata['format'] == 'pt'
    record = json.loads(metadata['d2o_snapshot'])
    assert record['networks']['ema']['class_name'] == type(original['ema']).__name__
    if name == 'edm_iddpm_adm_uncond16':
        assert record['source'] == dict(file=f'{name}.pkl', kind='snapshot',
                                        left_out=dict(loss_fn='EDMLoss', augment_pipe=None))
    if name.startswith('d2o'):
        assert record['networks']['ema']['attributes']['eps'] == 0.002  # the D2O preconditioner's record


def test_generate_gives_bit_identical_images_from_pkl_and_safetensors(demo_pair, tmp_path):
    pkl, st = demo_pair
    args = ('--seeds=0-2', '--steps=4')
    a, b = generated(pkl, tmp_path / 'pkl', *args), generated(st, tmp_path / 'st', *args)
    assert list(a) == ['000000.png', '000001.png', '000002.png'] and list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_d2o_generator_net_and_ema_keys_are_bit_identical(fixtures_dir, tmp_path):
    pkl = fixtures_dir / 'd2o_adm_cond16.pkl'
    st = convert(pkl, tmp_path / 'd2o.safetensors')
    for key in ('ema', 'net'):
        args = ('--seeds=0-3', '--class=3', f'--key={key}')
        a, b = generated(pkl, tmp_path / f'pkl-{key}', *args), generated(st, tmp_path / f'st-{key}', *args)
        assert len(a) == 4 and all(np.array_equal(a[k], b[k]) for k in a)


def test_training_state_converts_to_the_runs_own_snapshot(tmp_path, synth_zip):
    cfg = tiny_config(tmp_path, synth_zip, loss='edm', precond='edm', duration=8 / 1e6, batch=8)
    run_dir = training_loop.run(cfg)
    state = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1]
    snap = state.replace('training-state-', 'network-snapshot-').replace('.pt', '.pkl')
    dest = convert(state, tmp_path / 'state.safetensors')
    original, converted = checkpoint.load_snapshot(snap), checkpoint.load_snapshot(dest)
    for key in ('ema', 'net'):
        assert_same_networks(original[key], converted[key])
    header, _, _ = safetensors_snapshot.read_metadata(dest)
    assert header['kimg'] == 0.008 and header['source']['kind'] == 'training state'
    assert header['training_config']['loss'] == 'edm'
    args = ('--seeds=0-1', '--steps=3')
    a, b = generated(snap, tmp_path / 'pkl', *args), generated(dest, tmp_path / 'st', *args)
    assert len(a) == 2 and all(np.array_equal(a[k], b[k]) for k in a)


def test_transfer_and_analysis_accept_safetensors(demo_pair, tmp_path):
    pkl, st = demo_pair
    data = EasyDict(resolution=32, num_channels=3, label_dim=0)
    teachers = [generator.load_teacher(EasyDict(transfer=str(p), allow_unsafe_pickle=False, data='d'), data)
                for p in (pkl, st)]
    assert_same_networks(*teachers)
    code, out = run(analysis_main, 'frequency', f'--network={st}', f'--outdir={tmp_path}', '--seeds=0', '--steps=2')
    assert code == 0, out


def test_validation_fid_names_safetensors_networks_like_pickles(tmp_path):
    (tmp_path / 'run').mkdir()
    net = tmp_path / 'run' / 'network-snapshot-000100.safetensors'
    net.write_bytes(b'')
    (tmp_path / 'ref.npz').write_bytes(b'')
    code, out, err = run_validation(tmp_path, dict(NUM='10', FAKE_FIDS='run-network-snapshot-000100=4.5'),
                                    net, tmp_path / 'ref.npz')
    assert code == 0, err
    assert f'{net} {tmp_path}/ref.npz seeds=0-9 fid 4.5' in out


def test_info_describes_the_header_without_building(demo_pair):
    code, out = run(checkpoint_tool.main, 'info', f'--source={demo_pair[1]}')
    assert code == 0, out
    assert out.splitlines()[0] == 'ema: EDMPrecond, 696,515 parameters and buffers in 431 tensors'
    assert 'source: {"file": "teacher-mnist32.pkl", "kind": "snapshot", "left_out": {}}' in out


def test_convert_refuses_bad_destinations_and_keeps_existing_files(demo_pair, tmp_path):
    existing = tmp_path / 'x.safetensors'
    existing.write_bytes(b'mine')
    line = error_line(*run(checkpoint_tool.main, 'convert', f'--source={DEMO_TEACHER}', f'--dest={existing}'), 2)
    assert line == f'Error: Invalid value for --dest: {existing} exists; pass --force to replace it'
    assert existing.read_bytes() == b'mine'
    line = error_line(*run(checkpoint_tool.main, 'convert', f'--source={DEMO_TEACHER}', f'--dest={tmp_path}/x.pkl'), 2)
    assert line.endswith('x.pkl: expected a file name ending in .safetensors')
    line = error_line(*run(checkpoint_tool.main, 'convert', f'--source={tmp_path}/none.pkl',
                           f'--dest={tmp_path}/y.safetensors'))
    assert line == f'Error: {tmp_path}/none.pkl: no such file' and not (tmp_path / 'y.safetensors').exists()

#----------------------------------------------------------------------------
# Tampered files: one line from generate.py (and from checkpoint_tool.py info), exit status 1.

def rewrite(src, dest, edit_meta=None, edit_tensors=None):
    tensors = safetensors.torch.load_file(src)
    with safetensors.safe_open(src, 'pt') as f:
        metadata = f.metadata()
    record = json.loads(metadata['d2o_snapshot'])
    if edit_meta:
        edit_meta(record)
    if edit_tensors:
        edit_tensors(tensors)
    metadata['d2o_snapshot'] = json.dumps(record) if not isinstance(record, str) else record
    safetensors.torch.save_file(tensors, dest, metadata=metadata)
    return dest


def _set(path, value):
    def edit(record):
        *parents, last = path
        for key in parents:
            record = record[key]
        record[last] = value
    return edit


def _raw_header(src, dest, header_bytes):
    data = open(src, 'rb').read()
    length = struct.unpack('<Q', data[:8])[0]
    open(dest, 'wb').write(struct.pack('<Q', len(header_bytes)) + header_bytes + data[8 + length:])
    return dest


CONV = 'ema.model.enc.32x32_conv.weight'
TAMPERED = {
    'unknown class': (dict(edit_meta=_set(['networks', 'ema', 'class_name'], 'os.system')),
                      "network 'ema': unknown network class 'os.system'; expected one of"),
    'huge num_blocks': (dict(edit_meta=_set(['networks', 'ema', 'init_kwargs', 'num_blocks'], 4000)),
                        "network 'ema': constructor record of EDMPrecond: num_blocks=4000 is out of bounds (expected 0..16)"),
    'huge list': (dict(edit_meta=_set(['networks', 'ema', 'init_kwargs', 'channel_mult'], [1] * 1000)),
                  'constructor record of EDMPrecond: channel_mult=[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...] has 1000 entries (at most 8)'),
    'bad argument': (dict(edit_meta=_set(['networks', 'ema', 'init_kwargs', 'model_type'], 'Nope')),
                     "cannot rebuild EDMPrecond from its constructor record: model_type='Nope' is not one of"),
    'changed attribute': (dict(edit_meta=_set(['networks', 'ema', 'attributes', 'sigma_data'], 0.25)),
                          'attribute sigma_data is 0.25 in the file but 0.5 when rebuilt'),
    'wrong version': (dict(edit_meta=_set(['format_version'], 2)), 'd2o_snapshot format version 2; this code reads 1'),
    'wrong shape': (dict(edit_tensors=lambda t: t.update({CONV: torch.zeros(16, 3, 3, 4)})),
                    f'wrong dtype or shape: {CONV} F32[16, 3, 3, 4] (expected F32[16, 3, 3, 3])'),
    'wrong dtype': (dict(edit_tensors=lambda t: t.update({CONV: t[CONV].double()})),
                    f'wrong dtype or shape: {CONV} F64[16, 3, 3, 3] (expected F32[16, 3, 3, 3])'),
    'missing tensor': (dict(edit_tensors=lambda t: t.pop(CONV)), f'tensors do not match the architecture in the '
                                                                  f'header; missing: {CONV}'),
    'extra tensor': (dict(edit_tensors=lambda t: t.update({'ema.evil': torch.zeros(1)})), 'unexpected: ema.evil'),
}
HEADER_CASES = ('unknown class', 'huge num_blocks', 'huge list', 'bad argument', 'wrong version')


@pytest.mark.parametrize('case', sorted(TAMPERED))
def test_tampered_header_or_tensors_give_one_line(demo_pair, tmp_path, case):
    edits, expected = TAMPERED[case]
    bad = rewrite(demo_pair[1], tmp_path / 'bad.safetensors', **edits)
    line = error_line(*run(generate.main, f'--network={bad}', f'--outdir={tmp_path}/out', '--device=cpu'))
    assert line.startswith(f'Error: --network: {bad}: ') and expected in line, line
    assert not (tmp_path / 'out').exists()
    code, out = run(checkpoint_tool.main, 'info', f'--source={bad}')  # reads the header only: builds nothing
    if case in HEADER_CASES:
        assert error_line(code, out).startswith(f'Error: {bad}: ') and expected in out
    else:
        assert code == 0, out


def _raw_metadata_string(path, text):
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={'format': 'pt', 'd2o_snapshot': text})
    return path


BROKEN_FILES = {
    'non-JSON metadata': (lambda src, dest: _raw_metadata_string(rewrite(src, dest), '{"networks": [1, '),
                          "the 'd2o_snapshot' metadata is not valid JSON (JSONDecodeError)"),
    'deeply nested metadata': (lambda src, dest: _raw_metadata_string(rewrite(src, dest), '[' * 100_000),
                               "the 'd2o_snapshot' metadata is not valid JSON (RecursionError)"),
    'no metadata': (lambda src, dest: safetensors.torch.save_file(safetensors.torch.load_file(src), dest) or dest,
                    "a safetensors file without the 'd2o_snapshot' metadata string"),
    'non-JSON header': (lambda src, dest: _raw_header(src, dest, b'{"ema.x": nope}'),
                        'the safetensors header is not valid JSON (JSONDecodeError)'),
    'truncated': (lambda src, dest: dest.write_bytes(open(src, 'rb').read()[:-100]) and dest,
                  'truncated or padded safetensors file: the header describes 2831476 bytes, the file has 2831376'),
    'truncated header': (lambda src, dest: dest.write_bytes(open(src, 'rb').read()[:1000]) and dest,
                         'truncated or not a safetensors file (header of'),
    'overlapping offsets': (lambda src, dest: _raw_header(src, dest, _overlapping_header(src)),
                            'corrupt safetensors file'),
}


def _overlapping_header(src):
    data = open(src, 'rb').read()
    header = json.loads(data[8:8 + struct.unpack('<Q', data[:8])[0]])
    header[CONV]['data_offsets'] = [0, header[CONV]['data_offsets'][1] - header[CONV]['data_offsets'][0]]
    return json.dumps(header).encode()


@pytest.mark.parametrize('case', sorted(BROKEN_FILES))
def test_broken_files_give_one_line(demo_pair, tmp_path, case):
    make, expected = BROKEN_FILES[case]
    bad = make(demo_pair[1], tmp_path / 'bad.safetensors')
    line = error_line(*run(generate.main, f'--network={bad}', f'--outdir={tmp_path}/out', '--device=cpu'))
    assert line.startswith(f'Error: --network: {bad}: ') and expected in line, line
    line = error_line(*run(checkpoint_tool.main, 'convert', f'--source={bad}', f'--dest={tmp_path}/again.safetensors'))
    assert line.startswith(f'Error: {bad}: ') and expected in line, line
    assert not (tmp_path / 'again.safetensors').exists()
