"""Teacher–student FID (paper §2.3, Fig. 2): how far multi-step "teachers" are from a one-step student.

The paper trains K-step GAN generators ("teachers", K = 2, 4, 6, 8, 10) and a one-step student from the same
EDM model and compares image sets by FID, using the student's generated images as the reference (blue in
Fig. 2) and the training set (gray). A K-step teacher is
H = F(…F(F(x_{t_K}, t_K, t_{K−1}), t_{K−1}, t_{K−2})…, t_1, t_0) on the paper's schedule t_i = T(i, K)
(Appendix C):
    T(i, N) = (σmax^{1/ρ} + (1 − i/N)(σmin^{1/ρ} − σmax^{1/ρ}))^ρ,  σmin 0.002, σmax 80, ρ 7,
so T(N, N) = σmax and T(0, N) = σmin; Fig. 2B fixes K = 2 and sweeps the middle σ = t_1. One step of F is
training.sampling.generator_sample's: x₀ estimate d = F(v, σ_c), then v ← v + (d − v)(σ_c − σ_n)/σ_c; the
last d is the image. The same seeds feed every set, as in the paper (seeds 0..N−1).

A teacher can be a separately trained K-step generator per K, or one network sampled with K steps (an EDM
denoiser then gives the Euler chain on T(i, K)). The FIDs use the FID Inception network of metrics/."""
import numpy as np
import torch

from metrics.feature_stats import compute_feature_stats, rank_chunks
from metrics.scores import frechet_distance
from training.sampling import RHO, SIGMA_MAX, SIGMA_MIN, cut_sigma, generate_images, generator_sigmas


def paper_schedule(i, num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """T(i, N) of Appendix C (training.sampling.cut_sigma at r = i/N)."""
    return float(cut_sigma(i / num_steps, sigma_min, sigma_max, rho))


def teacher_sigmas(num_steps, middle_sigma=None):
    """Noise levels t_K > … > t_0 a K-step teacher visits: T(i, K) for i = K..0; with K = 2 the middle level
    can be replaced (Fig. 2B sweep)."""
    sigmas = [paper_schedule(i, num_steps) for i in range(num_steps, -1, -1)]
    if num_steps == 2 and middle_sigma is not None:
        sigmas[1] = float(middle_sigma)
    return sigmas


class AnyDenoiser(torch.nn.Module):
    """Lets generator_sample's multi-step calls (which pass `sigma_next`) drive any preconditioned network:
    the keyword is dropped (D2OPrecond ignores it too), so an EDM denoiser works as the x₀ predictor F."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        for name in ('img_channels', 'img_resolution', 'label_dim'):
            setattr(self, name, getattr(net, name))

    def forward(self, x, sigma, class_labels=None, force_fp32=False, sigma_next=None, **kwargs):
        return self.net(x, sigma, class_labels=class_labels, force_fp32=force_fp32, **kwargs)


def sample_set(net, seeds, num_steps=1, middle_sigma=None, batch=64, device='cpu'):
    """Iterator of (seeds, uint8 [B, C, H, W]) from `net` run as a `num_steps` teacher (K = 1: the student's
    exact one-step call, generator_sample in float64 with force_fp32, as generate.py)."""
    sigmas = teacher_sigmas(num_steps, middle_sigma)
    options = dict(sampler='onestep' if num_steps == 1 else 'multistep', num_steps=num_steps)
    if num_steps == 2:
        options['middle_sigma'] = sigmas[1]
    # generate_images follows generator_sigmas; it must visit exactly T(i, K) (guards against drift there).
    if not np.allclose(generator_sigmas(num_steps, sigmas[1]), sigmas, rtol=1e-12, atol=0):
        raise RuntimeError(f'generator_sigmas({num_steps}) = {generator_sigmas(num_steps, sigmas[1])} is not the '
                           f'paper schedule {sigmas}')
    net = net if num_steps == 1 else AnyDenoiser(net)
    for batch_seeds, images in generate_images(net, seeds, batch=batch, device=device, **options):
        yield batch_seeds, images.permute(0, 3, 1, 2)


def set_statistics(net, num_images, detector, num_steps=1, middle_sigma=None, batch=64, device='cpu'):
    """Feature mean/covariance of `num_images` images (seeds 0..N−1) of `net` as a `num_steps` teacher."""
    def batches():
        for chunk in rank_chunks(num_images, batch):
            seeds = list(chunk)
            for _, images in sample_set(net, seeds, num_steps, middle_sigma, batch=len(seeds), device=device):
                yield seeds, images
    return compute_feature_stats(batches(), detector, num_images)


def fid(stats, ref):
    """FID between two statistics (EasyDict or dict with mu/sigma)."""
    return frechet_distance(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'])


def teacher_student_table(student, teachers, steps, middle_sigmas, num_images, detector, data_stats=None,
                          batch=64, device='cpu', log=print):
    """Rows of Fig. 2: for each K in `steps` (A) and each middle σ of a 2-step teacher (B), the FID against the
    student's images (and against `data_stats`, the dataset's reference, when given). `teachers`: a network
    for every K, or a dict {K: network} (missing K fall back to `student`). Returns (student FID vs data,
    rows)."""
    def teacher(k):
        return teachers.get(k, student) if isinstance(teachers, dict) else teachers

    student_stats = set_statistics(student, num_images, detector, 1, batch=batch, device=device)
    rows = []
    jobs = [('steps', k, None) for k in steps] + [('middle_sigma', 2, s) for s in middle_sigmas]
    for kind, k, middle in jobs:
        stats = set_statistics(teacher(k), num_images, detector, k, middle, batch=batch, device=device)
        row = dict(kind=kind, steps=k, sigmas=teacher_sigmas(k, middle), fid_vs_student=fid(stats, student_stats),
                   fid_vs_data=None if data_stats is None else fid(stats, data_stats))
        log(f'{kind}: K={k} sigmas={np.round(row["sigmas"], 4).tolist()} FID vs student {row["fid_vs_student"]:.3f}'
            + ('' if data_stats is None else f', vs data {row["fid_vs_data"]:.3f}'))
        rows.append(row)
    student_vs_data = None if data_stats is None else fid(student_stats, data_stats)
    return student_vs_data, rows


def markdown_table(rows, student_vs_data=None):
    """The table of `teacher_student_table` rows as markdown."""
    lines = ['| experiment | K | σ schedule | FID vs student | FID vs data |', '|---|---|---|---|---|']
    if student_vs_data is not None:
        lines.append(f'| student (1 step) | 1 | 80 → 0.002 | 0 | {student_vs_data:.3f} |')
    for row in rows:
        label = 'Fig. 2A (steps)' if row['kind'] == 'steps' else 'Fig. 2B (middle σ)'
        sigmas = ', '.join(f'{s:.4g}' for s in row['sigmas'])
        vs_data = '–' if row['fid_vs_data'] is None else f'{row["fid_vs_data"]:.3f}'
        lines.append(f'| {label} | {row["steps"]} | {sigmas} | {row["fid_vs_student"]:.3f} | {vs_data} |')
    return '\n'.join(lines) + '\n'
