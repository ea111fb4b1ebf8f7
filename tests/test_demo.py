"""demo.py's own pieces: disjoint real subsets, the matplotlib figures, the report, and its bad-input message.
The full pipeline is `make demo` (minutes of CPU), not a unit test."""
import json
import os

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
import demo
from training.dataset import ImageFolderDataset


def _digits(n, size=8):
    """n distinct RGB images: image i is filled with value i (so subsets can be identified by pixel value)."""
    return [np.full([size, size, 3], i, np.uint8) for i in range(n)]


def test_write_subset_takes_the_requested_disjoint_range(tmp_path):
    src = str(tmp_path / 'src.zip')
    dataset_tool.write_dataset(((img, i % 3) for i, img in enumerate(_digits(10))), src, force=False)
    ref, real = str(tmp_path / 'ref.zip'), str(tmp_path / 'real.zip')
    demo.write_subset(src, ref, 0, 4)
    demo.write_subset(src, real, 4, 4)
    assert [int(ImageFolderDataset(ref)[i][0][0, 0, 0]) for i in range(4)] == [0, 1, 2, 3]
    assert [int(ImageFolderDataset(real)[i][0][0, 0, 0]) for i in range(4)] == [4, 5, 6, 7]
    with pytest.raises(Exception, match='has 10 images; need 12'):
        demo.write_subset(src, str(tmp_path / 'too-many.zip'), 8, 4)


def test_load_images_reads_folders_and_datasets_in_order(tmp_path):
    folder = tmp_path / 'pngs'
    folder.mkdir()
    for i, img in enumerate(_digits(5)):
        PIL.Image.fromarray(img).save(folder / f'{i:06d}.png')
    images = demo.load_images(str(folder), 3)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2]
    zip_path = str(tmp_path / 'd.zip')
    dataset_tool.write_dataset(((img, None) for img in _digits(5)), zip_path, force=False)
    assert demo.load_images(zip_path, 4)[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


def test_figures_are_pngs_of_the_requested_size(tmp_path):
    grids = str(tmp_path / 'grids.png')
    demo.save_grids([('a', np.stack(_digits(64))), ('b', np.stack(_digits(64)))], grids)
    assert PIL.Image.open(grids).size == (580, 320)  # figsize (2.9 per panel, 3.2) inches at 100 dpi
    plot = str(tmp_path / 'fid.png')
    demo.save_fid_plot({'D2O': [(0, 300.0), (400, 120.0)]}, {'teacher 35 NFE': 50.0}, plot, 'title')
    assert PIL.Image.open(plot).size == (700, 420)
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]  # written atomically


def test_report_ratios_and_targets(tmp_path):
    cfg = dict(outdir=str(tmp_path), dataset='mnist', num_fid=300, kimg=1.6, batch=8, lr=1e-3, dlr=3e-4,
               d_bn_group=4, ema_images=100, adv_scale=32.0, seed=0, tick=0.4)
    runs = {'d2o-f': dict(fid=30.0, kimg=0.8, seconds=100.0, trainable_share=0.174),
            'd2o': dict(fid=40.0, kimg=0.8, seconds=110.0, trainable_share=1.0)}
    fids = dict(real=10.0, teacher_35nfe=25.0, teacher_1nfe=120.0)
    lines = demo.write_report(cfg, demo.DATASETS['mnist'], runs, fids, {'D2O-F (1 NFE)': [[0, 120.0], [800, 30.0]]},
                              {'dataset': 1.0}, 200.0)
    results = json.load(open(tmp_path / 'results.json'))
    assert results['dataset'] == 'mnist' and results['train_images'] == 800
    assert results['teacher_train_images'] == round(demo.teacher_training_kimg(demo.DATASETS['mnist']) * 1000)
    # 30/120 = 0.25 <= 1/3; 30/25 = 1.2 <= 1.5
    assert results['targets'] == {'d2o_f_fid <= teacher_1nfe_fid / 3': True,
                                  'd2o_f_fid <= 1.5 * teacher_35nfe_fid': True}
    text = open(tmp_path / 'report.md').read()
    assert '| D2O-F (freeze 1) | 1 | 30.00 |' in text and '= 0.250 (target <= 1/3: met)' in text
    assert '= 1.200 (target <= 1.5: met)' in text and lines[0].startswith('# d2o demo')


def test_missing_teacher_is_one_clear_line(tmp_path):
    missing = str(tmp_path / 'nope.pkl')
    result = CliRunner().invoke(demo.main, [f'--outdir={tmp_path}', '--dataset=synth', f'--teacher={missing}'])
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: --teacher={missing} does not exist; run `make teacher` to train it'
    assert os.listdir(tmp_path) == []  # nothing made before the check


def test_chunk_ends_cover_the_run_once():
    assert demo.chunk_ends(0.8, 0.4) == [0.4, 0.8]
    assert demo.chunk_ends(1.0, 0.4) == [0.4, 0.8, 1.0]
    assert demo.chunk_ends(3, 1) == [1, 2, 3]
    assert demo.chunk_ends(0.3, 1) == [0.3]


def test_gan_runs_resume_and_share_the_demo_settings():
    cfg = dict(outdir='out', num_fid=300, kimg=0.8, batch=8, lr=1e-3, dlr=3e-4, d_bn_group=4, ema_images=100,
               adv_scale=32.0, seed=0, tick=0.4)
    args = {name: demo.gan_args(cfg, name, freeze, 'd.zip', 't.pkl', 'ref.npz', 0.4) for name, freeze in demo.GAN_RUNS}
    assert '--freeze=1' in args['d2o-f'] and '--freeze=0' in args['d2o']
    assert '--lr=0.001' in args['d2o'] and '--dlr=0.0003' in args['d2o'] and '--d-bn-group=4' in args['d2o']
    assert '--ema=0.0001' in args['d2o'] and '--ema-warmup=0' in args['d2o']
    assert '--resume=auto' in args['d2o'] and '--duration=0.0004' in args['d2o'] and '--metrics=fid300' in args['d2o']
    differ = set(args['d2o-f']) ^ set(args['d2o'])
    assert differ == {'--freeze=1', '--freeze=0', '--outdir=out/runs/d2o-f', '--outdir=out/runs/d2o'}


def test_reference_and_teacher_overlap_heun_with_the_chain_and_resume(tmp_path, monkeypatch):
    """Stages 2-3: the 35-NFE generation runs beside ref -> floor -> 1-NFE; every FID is computed after ref.npz
    exists; a --resume pass keeps every result without running anything."""
    import threading
    import time
    calls, lock = [], threading.Lock()

    def fake_run(stage, args, log, logfile=None):
        t0 = time.time()
        opt = dict(a.split('=', 1) for a in args if a.startswith('--') and '=' in a)
        if args[0] == 'fid.py' and args[1] == 'ref':
            time.sleep(0.3)
            open(opt['--dest'], 'w').close()
        elif args[0] == 'fid.py':
            assert os.path.exists(os.path.join(tmp_path, 'ref.npz'))  # an FID never starts before the reference
            value = {'real': 27.0, 'teacher-1nfe': 350.0, 'teacher-35nfe': 260.0}[os.path.basename(
                opt['--images']).replace('.zip', '')]
            with open(opt['--json'], 'w') as f:
                json.dump(dict(fid=value), f)
        else:
            time.sleep(1.0 if '--sampler=heun' in args else 0.1)
            os.makedirs(opt['--outdir'])
        with lock:
            calls.append((stage, t0, time.time(), logfile))
        return time.time() - t0

    monkeypatch.setattr(demo, 'run', fake_run)
    fid = demo.FidStages(str(tmp_path), 300, False, lambda msg: None)
    fids, seconds = demo.reference_and_teacher(fid, 'ref.zip', str(tmp_path / 'real.zip'), 't.pkl')
    assert fids == {'real': 27.0, 'teacher_1nfe': 350.0, 'teacher_35nfe': 260.0}
    spans = {stage: (t0, t1, logfile) for stage, t0, t1, logfile in calls}
    heun = spans['generate teacher-35nfe']
    assert heun[2] == os.path.join(str(tmp_path), 'images', 'teacher-35nfe.log')  # its output goes to a file
    assert heun[0] < spans['ref'][1] and spans['generate teacher-1nfe'][0] < heun[1]  # the chain ran beside it
    assert spans['fid teacher-35nfe'][0] >= heun[1]
    assert set(seconds) == {'fid_ref', 'fid_real', 'teacher_1nfe', 'teacher_35nfe'}

    calls.clear()
    fid = demo.FidStages(str(tmp_path), 300, True, lambda msg: None)
    assert demo.reference_and_teacher(fid, 'ref.zip', str(tmp_path / 'real.zip'), 't.pkl')[0] == fids
    assert calls == []


def test_seeds_name_the_runs_and_keep_the_one_seed_layout():
    cfg = dict(seed=5, seeds=3)
    assert demo.fine_tuning_runs(cfg) == [('d2o-f', 'd2o-f', 1, 5), ('d2o', 'd2o', 0, 5),
                                          ('d2o-f-seed6', 'd2o-f', 1, 6), ('d2o-seed6', 'd2o', 0, 6),
                                          ('d2o-f-seed7', 'd2o-f', 1, 7), ('d2o-seed7', 'd2o', 0, 7)]
    assert demo.fine_tuning_runs(dict(seed=0)) == [('d2o-f', 'd2o-f', 1, 0), ('d2o', 'd2o', 0, 0)]
    args = demo.gan_args(dict(outdir='o', num_fid=300, batch=8, lr=1e-3, dlr=3e-4, d_bn_group=4, ema_images=100,
                              adv_scale=32.0, seed=5, tick=0.4), 'd2o-seed6', 0, 'd.zip', 't.pkl', 'r.npz', 0.4, 6)
    assert '--seed=6' in args and '--outdir=o/runs/d2o-seed6' in args


def _run(method, seed, points, share=0.2):
    records = [dict(kimg=k, fid=f, snapshot=f'network-snapshot-{int(k * 1000):06d}.pkl') for k, f in points]
    return dict(method=method, seed=seed, run_dir=f'runs/{method}-{seed}', records=records, fid=records[-1]['fid'],
                kimg=records[-1]['kimg'], seconds=10.0, snapshot=records[-1]['snapshot'], trainable_share=share)


def test_across_seeds_gives_mean_min_max_at_points_all_seeds_reached():
    runs = {'a': _run('d2o-f', 0, [(0.4, 100.0), (0.8, 90.0)]), 'b': _run('d2o', 0, [(0.4, 80.0), (0.8, 70.0)]),
            'c': _run('d2o-f', 1, [(0.4, 120.0), (0.8, 60.0)]), 'd': _run('d2o', 1, [(0.4, 82.0)])}
    summary = demo.across_seeds(runs)
    assert summary['d2o-f']['band'] == {0.4: (110.0, 100.0, 120.0), 0.8: (75.0, 60.0, 90.0)}
    assert summary['d2o-f']['fid'] == 75.0 and summary['d2o-f']['fids'] == [90.0, 60.0]
    assert summary['d2o-f']['seeds'] == [0, 1] and summary['d2o-f']['seconds'] == 20.0
    assert summary['d2o']['band'] == {0.4: (81.0, 80.0, 82.0)}  # 0.8 only reached by one seed: no band point
    assert summary['d2o']['kimg'] == 0.4 and summary['d2o']['fid'] == 76.0  # finals 70 (0.8) and 82 (0.4)
    one = demo.across_seeds({'a': runs['a'], 'b': runs['b']})
    assert one['d2o-f']['fid'] == 90.0 and one['d2o-f']['band'] == {0.4: (100.0, 100.0, 100.0), 0.8: (90.0, 90.0, 90.0)}


def test_report_with_seeds_states_mean_spread_and_targets_per_seed(tmp_path):
    cfg = dict(outdir=str(tmp_path), dataset='mnist', num_fid=300, kimg=0.8, batch=8, lr=1e-3, dlr=3e-4,
               d_bn_group=4, ema_images=100, adv_scale=32.0, seed=0, tick=0.4)
    runs = demo.across_seeds({'a': _run('d2o-f', 0, [(0.8, 30.0)]), 'b': _run('d2o', 0, [(0.8, 40.0)], 1.0),
                              'c': _run('d2o-f', 1, [(0.8, 39.0)]), 'd': _run('d2o', 1, [(0.8, 44.0)], 1.0),
                              'e': _run('d2o-f', 2, [(0.8, 36.0)]), 'f': _run('d2o', 2, [(0.8, 42.0)], 1.0)})
    fids = dict(real=10.0, teacher_35nfe=25.0, teacher_1nfe=120.0)
    demo.write_report(cfg, demo.DATASETS['mnist'], runs, fids, {}, {'dataset': 1.0}, 200.0)
    results = json.load(open(tmp_path / 'results.json'))
    assert results['d2o_f_fid'] == 35.0 and results['seeds']['d2o-f']['final_fids'] == [30.0, 39.0, 36.0]
    # mean 35: 35/120 = 0.292 <= 1/3 (met), 35/25 = 1.4 <= 1.5 (met); per seed 3 of 3 (all <= 40) and 2 of 3 (39 > 37.5)
    assert results['targets'] == {'d2o_f_fid <= teacher_1nfe_fid / 3': True,
                                  'd2o_f_fid <= 1.5 * teacher_35nfe_fid': True}
    assert results['targets_met_by_seeds'] == {'d2o_f_fid <= teacher_1nfe_fid / 3': '3 of 3',
                                               'd2o_f_fid <= 1.5 * teacher_35nfe_fid': '2 of 3'}
    text = open(tmp_path / 'report.md').read()
    assert '| D2O-F (freeze 1) | 1 | 35.00 (mean of 3 seeds; min 30.00, max 39.00) |' in text
    assert 'Per seed, the 1/3 target is met by 3 of 3, the 1.5 target by 2 of 3.' in text
