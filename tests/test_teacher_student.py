"""training/analysis/teacher_student.py: the paper's T(i, N), K-step teachers and FID between generated sets
(paper §2.3, Fig. 2; Appendix C)."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import ROOT
from test_frequency import cli_error_line
from training.analysis import teacher_student as TS
from training.sampling import generator_sample, generator_sigmas, seeded_latents, to_uint8


def closed_form(i, n):
    # Appendix C, written out independently: σmin 0.002, σmax 80, ρ 7.
    return (80 ** (1 / 7) + (1 - i / n) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7


@pytest.mark.parametrize('n', [1, 2, 3, 10, 18])
def test_paper_schedule_endpoints_monotonicity_closed_form(n):
    values = [TS.paper_schedule(i, n) for i in range(n + 1)]
    assert values[-1] == pytest.approx(80, rel=1e-12) and values[0] == pytest.approx(0.002, rel=1e-9)
    assert all(a < b for a, b in zip(values, values[1:]))
    assert np.allclose(values, [closed_form(i, n) for i in range(n + 1)], rtol=1e-12)


def test_teacher_sigmas():
    assert TS.teacher_sigmas(2) == pytest.approx([80, closed_form(1, 2), 0.002], rel=1e-12)
    assert TS.teacher_sigmas(2)[1] == pytest.approx(2.5152, abs=1e-4)  # T(1, 2): the paper's 2-step teacher
    assert TS.teacher_sigmas(2, middle_sigma=0.8) == pytest.approx([80, 0.8, 0.002])
    for k in (3, 4, 6, 10):
        # The training code's K-step generator (generator_sigmas) visits exactly T(i, K), i = K..0.
        assert np.allclose(generator_sigmas(k), TS.teacher_sigmas(k), rtol=1e-12)
        assert TS.teacher_sigmas(k, middle_sigma=0.5) == TS.teacher_sigmas(k)  # the sweep is for K = 2 only


def load(fixtures_dir, name):
    from training.checkpoint import load_network
    return load_network(fixtures_dir / f'{name}.pkl')


def images_of(net, seeds, k, middle=None):
    return torch.cat([x for _, x in TS.sample_set(net, seeds, k, middle, batch=2)])


def test_one_step_path_is_generator_sample(fixtures_dir):
    net = load(fixtures_dir, 'd2o_ncsnpp_uncond16')
    seeds = [0, 1, 2]
    latents, _, _ = seeded_latents(seeds, [3, 16, 16], 'cpu')
    with torch.no_grad():
        expected = to_uint8(generator_sample(net, latents.double(), num_steps=1, force_fp32=True)).permute(0, 3, 1, 2)
    assert torch.equal(images_of(net, seeds, 1), expected)


@pytest.mark.parametrize('k, middle', [(3, None), (2, 5.0)])
def test_k_step_teacher_is_the_euler_chain_on_the_schedule(fixtures_dir, k, middle):
    # An EDM denoiser as F: v ← v + (F(v, σ_c) − v)(σ_c − σ_n)/σ_c on T(i, K); the image is the last F output.
    net = load(fixtures_dir, 'edm_edm_ncsnpp_uncond32')
    seeds = [5, 6]
    latents, _, _ = seeded_latents(seeds, [3, 32, 32], 'cpu')
    sigmas = [closed_form(i, k) for i in range(k, -1, -1)]
    if middle is not None:
        sigmas[1] = middle
    v = latents.double() * sigmas[0]
    with torch.no_grad():
        for i in range(k):
            d = net(v, torch.full([2, 1, 1, 1], sigmas[i], dtype=torch.float64), force_fp32=True).double()
            v = v + (d - v) * (sigmas[i] - sigmas[i + 1]) / sigmas[i]
    expected = to_uint8(d.float()).permute(0, 3, 1, 2)
    got = images_of(net, seeds, k, middle)
    assert (got.int() - expected.int()).abs().max() <= 1  # float64 vs float32 rounding at the uint8 edge only
    assert (got != expected).float().mean() < 0.01


class PixelFeatures(torch.nn.Module):
    """A stand-in FID feature network: a fixed random projection of 4×4-pooled pixels to 6 features."""
    num_features = 6

    def __init__(self, channels=3):
        super().__init__()
        self.register_buffer('proj', torch.randn(channels * 16, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4)
        return pooled.flatten(1) @ self.proj


def numpy_fid(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_of_a_set_against_itself_is_zero_and_matches_numpy(fixtures_dir):
    net = load(fixtures_dir, 'd2o_ncsnpp_uncond16')
    detector = PixelFeatures()
    student = TS.set_statistics(net, 12, detector, num_steps=1, batch=5)
    again = TS.set_statistics(net, 12, detector, num_steps=1, batch=4)
    assert abs(TS.fid(student, again)) < 1e-8
    teacher = TS.set_statistics(net, 12, detector, num_steps=3, batch=12)
    f_student = detector(images_of(net, list(range(12)), 1)).double().numpy()
    f_teacher = detector(images_of(net, list(range(12)), 3)).double().numpy()
    assert np.allclose(student['mu'], f_student.mean(0), atol=1e-6)
    assert TS.fid(teacher, student) == pytest.approx(numpy_fid(f_teacher, f_student), rel=1e-5, abs=1e-8)
    assert TS.fid(teacher, student) > 0


def test_table_markdown_and_figure(fixtures_dir, tmp_path):
    from training.analysis import plots
    net = load(fixtures_dir, 'd2o_ncsnpp_uncond16')
    detector = PixelFeatures()
    data = TS.set_statistics(net, 6, detector, num_steps=4, batch=6)
    logged = []
    vs_data, rows = TS.teacher_student_table(net, {2: net}, [2, 3], [0.5], 6, detector, data, batch=6,
                                             log=logged.append)
    assert [(r['kind'], r['steps']) for r in rows] == [('steps', 2), ('steps', 3), ('middle_sigma', 2)]
    assert rows[2]['sigmas'] == pytest.approx([80, 0.5, 0.002]) and len(logged) == 3
    student = TS.set_statistics(net, 6, detector, 1, batch=6)
    three = TS.set_statistics(net, 6, detector, 3, batch=6)
    assert rows[1]['fid_vs_student'] == pytest.approx(TS.fid(three, student), rel=1e-9)
    assert vs_data == pytest.approx(TS.fid(student, data), rel=1e-9)
    table = TS.markdown_table(rows, vs_data)
    assert table.count('\n') == 6 and '| Fig. 2B (middle σ) | 2 | 80, 0.5, 0.002 |' in table
    plots.plot_teacher_student(rows, tmp_path / 'f.png', vs_data)
    assert (tmp_path / 'f.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    record = plots.plain(dict(rows=rows))
    assert json.loads(json.dumps(record))['rows'][1]['fid_vs_student'] == pytest.approx(rows[1]['fid_vs_student'])


@pytest.mark.parametrize('args, message', [
    (['--student=missing.pkl'], 'missing.pkl: no such file'),
    (['--steps=1,2'], '--steps'),
    (['--sigmas=0.5,100'], '--sigmas'),
    (['--sigmas=x'], '--sigmas'),
    (['--teacher-at=two:x.pkl'], '--teacher-at'),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    student = str(ROOT / 'demo' / 'teacher-mnist32.pkl')  # committed, so the test needs no ../shared fixture
    assert message in cli_error_line(tmp_path, capsys, 'teacher-student', args, {'--student': student})


@pytest.mark.slow
def test_cli_end_to_end_with_inception(fixtures_dir, tmp_path, capsys):
    from training.analysis.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main.main(['teacher-student', f'--student={fixtures_dir / "d2o_ncsnpp_uncond16.pkl"}', f'--outdir={tmp_path}',
                   '--steps=2', '--sigmas=5', '--num=4', '--name=ts'])
    assert exit_info.value.code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / 'ts.json').read_text())
    assert [r['steps'] for r in record['rows']] == [2, 2] and record['student_vs_data'] is None
    assert all(r['fid_vs_student'] > 0 for r in record['rows'])
    assert (tmp_path / 'ts.png').stat().st_size > 1000 and '| Fig. 2A' in (tmp_path / 'ts.md').read_text()
