"""training/analysis/frequency.py: D_FFT, radial averages, trajectory and block recording (paper §4.5, App. E)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from training.analysis import frequency as F
from training.networks import UNetBlock
from training.sampling import edm_sampler


def cosine(height, width, ky, kx):
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    return torch.cos(2 * math.pi * (ky * rows / height + kx * cols / width))


def test_sinusoid_lands_in_its_radial_bin():
    # cos(2π(3y+4x)/32) has two DFT peaks of |F| = 32·32/2 at (±3, ±4): radius 5, nothing elsewhere.
    x = cosine(32, 32, 3, 4)
    profile = F.radial_average(F.d_fft(x, torch.zeros_like(x)))
    _, counts = F.radial_bins(32, 32)
    expected = torch.zeros_like(profile)
    expected[5] = 2 * math.log(512 + 1) / counts[5]
    assert torch.allclose(profile, expected, atol=1e-9)
    assert int(profile.argmax()) == 5


@pytest.mark.parametrize('k', [1, 7, 16])
def test_axis_sinusoid_bin_is_its_frequency(k):
    x = cosine(32, 32, 0, k)
    assert int(F.radial_average(F.log_spectrum(x)).argmax()) == k


def test_identical_inputs_give_zero():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(F.d_fft(x, x), torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    assert torch.equal(F.block_difference(x, x), torch.zeros(12, dtype=torch.float64))


def test_dfft_matches_numpy():
    x1, x2 = torch.randn(3, 8, 12), torch.randn(3, 8, 12)
    spec = lambda a: np.log(np.abs(np.fft.fftshift(np.fft.fft2(a.double().numpy()), axes=(-2, -1))) + 1)  # noqa: E731
    assert np.allclose(F.d_fft(x1, x2).numpy(), spec(x1) - spec(x2), atol=1e-12)


@pytest.mark.parametrize('shape', [(16, 16), (15, 15), (16, 8), (9, 12)])
def test_radial_average_conserves_the_mean(shape):
    spectrum = torch.rand(2, 3, *shape, dtype=torch.float64)
    profile = F.radial_average(spectrum)
    _, counts = F.radial_bins(*shape)
    assert int(counts.sum()) == shape[0] * shape[1]
    weighted = (profile * counts).sum(-1) / counts.sum()
    assert torch.allclose(weighted, spectrum.mean(dim=(-2, -1)), atol=1e-12)


def test_radial_bins_centre_and_distances():
    index, counts = F.radial_bins(8, 8)
    assert index[4, 4] == 0 and counts[0] == 1  # fftshift puts DC at (H//2, W//2)
    assert index[0, 0] == round(math.hypot(4, 4)) and index[4, 7] == 3 and index[0, 4] == 4
    assert counts.tolist() == torch.bincount(index.flatten()).tolist()


def test_block_difference_across_resolutions_keeps_dc():
    # A constant feature map downsampled 2x (and with other channel counts) is the same content: DC difference 0.
    x_in = torch.full([1, 2, 8, 8], 0.7)
    x_out = torch.full([1, 5, 4, 4], 0.7)
    diff = F.block_difference(x_out, x_in)
    assert len(diff) == len(F.radial_bins(4, 4)[1])
    assert abs(float(diff[0])) < 1e-12 and torch.allclose(diff, torch.zeros_like(diff), atol=1e-12)


def test_block_difference_is_channel_mean_of_dfft_at_equal_shapes():
    x_out, x_in = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = F.radial_average(F.d_fft(x_out, x_in).mean(dim=(0, 1)))
    assert torch.allclose(F.block_difference(x_out, x_in), expected, atol=1e-12)


def test_step_call_indices():
    assert F.step_call_indices(4, heun=True) == [0, 2, 4, 6]
    assert F.step_call_indices(4, heun=False) == [0, 1, 2, 3]

#----------------------------------------------------------------------------
# On the real fixture networks (SongUNet and DhariwalUNet).


def load(fixtures_dir, name):
    from training.checkpoint import load_network
    return load_network(fixtures_dir / f'{name}.pkl')


@pytest.mark.parametrize('name', ['edm_ve_ncsnpp_uncond16', 'edm_edm_adm_cond16'])
def test_hooks_capture_every_block_once_per_forward(fixtures_dir, name):
    net = load(fixtures_dir, name)
    all_blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.eye(net.label_dim)[[1, 2]] if net.label_dim else None
    with F.BlockRecorder(net) as recorder:
        assert len(recorder.blocks) == len(all_blocks)
        assert {id(b) for _, b in recorder.blocks} == {id(b) for b in all_blocks}
        with torch.no_grad():
            net(x, torch.tensor([1.0, 1.0]), labels)
            counts = {name: len(r) for name, r in recorder.records.items()}
            net(x, torch.tensor([1.0, 1.0]), labels)
    assert set(counts.values()) == {1}
    assert {len(r) for r in recorder.records.values()} == {2}
    assert all(not block._forward_hooks for block in all_blocks)  # removed on exit
    first = recorder.blocks[0][0]
    assert first.startswith('enc.') and recorder.blocks[-1][0].startswith('dec.')
    assert recorder.records[first][0]['map'].shape == (recorder.records[first][0]['resolution'],) * 2


def test_trajectory_is_the_edm_sampler(fixtures_dir):
    net = load(fixtures_dir, 'edm_ve_ncsnpp_uncond16')
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    images, steps, calls = F.sample_trajectory(net, latents, num_steps=4, heun=True, sigma_max=50)
    assert calls == 2 * 4 - 1
    assert torch.equal(images, edm_sampler(net, latents, num_steps=4, sigma_max=50))
    # σ_t: EDM's ρ-schedule clamped to the VE net's [0.02, 50] here, written out independently.
    lo, hi = 0.02 ** (1 / 7), 50 ** (1 / 7)
    assert np.allclose([s for s, _, _ in steps], [(hi + i / 3 * (lo - hi)) ** 7 for i in range(4)], rtol=1e-6)
    sigma0, i0, o0 = steps[0]
    assert torch.equal(i0, latents * sigma0)  # I_0 = σmax·z
    with torch.no_grad():
        assert torch.allclose(o0, net(i0, torch.tensor(sigma0, dtype=torch.float64)).double(), atol=1e-6)
    profiles = F.trajectory_profiles(steps)
    assert profiles['out_prev_radial'].shape == (3, len(F.radial_bins(16, 16)[1]))
    spec = lambda a: np.log(np.abs(np.fft.fftshift(np.fft.fft2(a.double().numpy()), axes=(-2, -1))) + 1)  # noqa: E731
    o2, o1 = steps[2][2], steps[1][2]
    expected = F.radial_average(torch.from_numpy((spec(o2) - spec(o1)).mean(axis=(0, 1))))
    assert torch.allclose(profiles['out_prev_radial'][1], expected, atol=1e-10)
    assert profiles['out_in_radial'].shape == (4, len(F.radial_bins(16, 16)[1]))


def test_analyze_dhariwal_conditional_euler(fixtures_dir):
    net = load(fixtures_dir, 'edm_edm_adm_cond16')
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.eye(10)[[3, 4]]
    result = F.analyze(net, latents, labels, num_steps=3, heun=False)
    blocks = result['blocks']
    assert len(blocks) == sum(isinstance(m, UNetBlock) for m in net.modules())
    for name, data in blocks.items():
        bins = len(F.radial_bins(data['resolution'], data['resolution'])[1])
        assert data['maps'].shape == (3, data['resolution'], data['resolution'])
        assert data['radial'].shape[0] == 3 and data['radial'].shape[1] <= bins
        assert torch.isfinite(data['radial']).all()
    shallow, deep = F.default_blocks(blocks)
    assert blocks[shallow]['resolution'] == 16 and blocks[deep]['resolution'] == min(
        b['resolution'] for b in blocks.values())
    depth = F.depth_maps(blocks, step=2)
    assert list(depth) == sorted({b['resolution'] for n, b in blocks.items() if n.startswith('dec.')})

#----------------------------------------------------------------------------
# Command line.


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'training.analysis', *args], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_cli_writes_figures_and_the_numbers_behind_them(fixtures_dir, tmp_path):
    res = run_cli('frequency', f'--network={fixtures_dir / "edm_ve_ncsnpp_uncond16.pkl"}', f'--outdir={tmp_path}',
                  '--seeds=0-1', '--steps=3', '--columns=3', '--name=f')
    assert res.returncode == 0, res.stderr
    assert (tmp_path / 'f-trajectory.png').stat().st_size > 1000 and (tmp_path / 'f-blocks.png').stat().st_size > 1000
    record = json.loads((tmp_path / 'f.json').read_text())
    fig4, fig6 = record['fig4'], record['fig6']
    assert fig4['shown_steps'] == [0, 1, 2] and len(fig4['out_in_radial']) == 3 and len(fig4['out_prev_radial']) == 2
    assert fig6['shallow'] in fig6['all_blocks'] and fig6['deep'] in fig6['all_blocks']
    assert fig6['shallow_radial'] == fig6['all_blocks'][fig6['shallow']]['radial']
    # The numbers equal an in-process run of the same seeds (seeded_latents, Heun).
    from training.sampling import seeded_latents
    net = load(fixtures_dir, 'edm_ve_ncsnpp_uncond16')
    latents, _, rnd = seeded_latents([0, 1], [3, 16, 16], 'cpu')
    result = F.analyze(net, latents.double(), num_steps=3, randn_like=rnd.randn_like)
    assert np.allclose(fig4['out_in_radial'], result['trajectory']['out_in_radial'].numpy(), atol=1e-4)


def cli_error_line(tmp_path, capsys, command, args, defaults):
    """Run `python -m training.analysis COMMAND --outdir=TMP ARGS` (plus each of `defaults`, an option → value
    dict, that ARGS does not set) in-process; check the exit status (1 for a missing file, 2 for a usage error,
    which adds click's usage lines), one `Error:` line, nothing written."""
    from training.analysis.__main__ import main
    given = {a.split('=')[0] for a in args}
    extra = [f'{option}={value}' for option, value in defaults.items() if option not in given]
    with pytest.raises(SystemExit) as exit_info:
        main.main([command, f'--outdir={tmp_path}', *args, *extra])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    usage = exit_info.value.code == 2
    assert exit_info.value.code == (1 if 'no such file' in lines[-1] else 2), lines
    assert len(lines) == (3 if usage else 1) and lines[-1].startswith('Error:'), lines
    assert not list(tmp_path.iterdir())
    return lines[-1]


@pytest.mark.parametrize('args, message', [
    (['--network=missing.pkl'], 'missing.pkl: no such file'),
    (['--steps=1'], '--steps'),
    (['--seeds=3-1'], '--seeds'),
    (['--sigma-min=90'], '--sigma-min'),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    network = '../shared/fixtures/checkpoints/edm_ve_ncsnpp_uncond16.pkl'
    assert message in cli_error_line(tmp_path, capsys, 'frequency', args, {'--network': network})
