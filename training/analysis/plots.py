"""Figures of the analyses (paper Fig. 2, Fig. 4, Fig. 6), each drawn only from a plain dict that is also
written as JSON: the numbers in the JSON are exactly the numbers in the figure."""
import io

import matplotlib
import numpy as np

from dnnlib.util import atomic_write
from training.analysis.frequency import depth_maps

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

DECIMALS = 4  # JSON precision: enough for the plots, keeps the files small


def plain(value):
    """Tensors/arrays → nested lists rounded to DECIMALS; dicts and lists recursively."""
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return np.round(value.astype(np.float64), DECIMALS).tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return round(value, DECIMALS + 3)
    return value


def spread(count, columns):
    """Up to `columns` indices spread evenly over 0..count−1, first and last included."""
    return sorted(set(np.linspace(0, count - 1, min(columns, count)).round().astype(int).tolist()))

#----------------------------------------------------------------------------
# Figure data (plain dicts).


def trajectory_data(result, columns=6, sample=0):
    """Fig. 4 numbers: for `columns` steps spread over the trajectory, one sample's I_t, O_t, O_t − O_{t−1},
    O_t − I_t (CHW) and the batch-averaged D_FFT maps; the radial profiles of every step."""
    steps, traj = result['steps'], result['trajectory']
    shown = spread(len(steps), columns)
    image = lambda t, k: steps[t][k][sample]  # noqa: E731  (k = 1: input, 2: output)
    return dict(sigmas=traj['sigmas'], shown_steps=shown,
                inputs=[image(t, 1) for t in shown], outputs=[image(t, 2) for t in shown],
                out_prev=[image(t, 2) - image(t - 1, 2) if t else None for t in shown],
                out_in=[image(t, 2) - image(t, 1) for t in shown],
                out_prev_fft=[traj['out_prev_maps'][t - 1] if t else None for t in shown],
                out_in_fft=[traj['out_in_maps'][t] for t in shown],
                out_prev_radial=traj['out_prev_radial'], out_in_radial=traj['out_in_radial'])


def blocks_data(result, shallow, deep, map_step):
    """Fig. 6 numbers: decoder depth maps at `map_step` (A), D_t^b of the shallow (B) and deep (C) block, and
    D_t^b of every block (for other plots)."""
    blocks = result['blocks']
    for name in (shallow, deep):
        if name not in blocks:
            raise ValueError(f'no U-Net block {name!r}; blocks are {", ".join(blocks)}')
    maps = depth_maps(blocks, map_step)
    return dict(sigmas=result['trajectory']['sigmas'], map_step=map_step,
                depth_resolutions=list(maps), depth_maps=list(maps.values()),
                shallow=shallow, deep=deep, shallow_radial=blocks[shallow]['radial'],
                deep_radial=blocks[deep]['radial'],
                all_blocks={name: dict(resolution=b['resolution'], radial=b['radial']) for name, b in blocks.items()})

#----------------------------------------------------------------------------
# Drawing.


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def show_image(ax, chw, enhance=False):
    """CHW in [−1, 1] (or a difference, rescaled to its own max when `enhance`) as an RGB/grey panel."""
    x = np.asarray(chw, dtype=np.float64)
    if enhance:
        x = x / max(np.abs(x).max(), 1e-12)
    x = np.clip((x + 1) / 2, 0, 1).transpose(1, 2, 0)
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap='gray' if x.shape[-1] == 1 else None,
              interpolation='nearest')


def show_map(ax, hw, limit):
    ax.imshow(np.asarray(hw), cmap='RdBu_r', vmin=-limit, vmax=limit, interpolation='nearest')


def radial_lines(ax, profiles, labels, title, cmap='viridis'):
    """One line per time step (colour = step, early dark → late bright), radius on x."""
    profiles = np.asarray(profiles)
    colours = plt.get_cmap(cmap)(np.linspace(0, 1, max(len(profiles), 1)))
    for profile, colour, label in zip(profiles, colours, labels):
        ax.plot(np.arange(len(profile)), profile, color=colour, label=label, lw=1.2)
    ax.axhline(0, color='k', lw=0.5)
    ax.set_xlabel('radius (cycles per image)')
    ax.set_ylabel('radial mean of D_FFT')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, title='σ_t', title_fontsize=6)


def finite_limit(maps):
    values = [np.abs(np.asarray(m)).max() for m in maps if m is not None]
    return max(max(values, default=1.0), 1e-12)


def plot_trajectory(data, path, title=''):
    """Fig. 4: A (six rows × shown steps), B radial D_FFT(O_t, O_{t−1}), C radial D_FFT(O_t, I_t)."""
    shown, sigmas = data['shown_steps'], data['sigmas']
    rows = [('I_t', data['inputs'], 'image'), ('O_t', data['outputs'], 'image'),
            ('O_t − O_{t−1}', data['out_prev'], 'diff'), ('D_FFT(O_t, O_{t−1})', data['out_prev_fft'], 'fft'),
            ('O_t − I_t', data['out_in'], 'diff'), ('D_FFT(O_t, I_t)', data['out_in_fft'], 'fft')]
    fig = plt.figure(figsize=(1.6 * len(shown) + 1, 1.6 * len(rows) + 7))
    grid = fig.add_gridspec(len(rows) + 4, len(shown), height_ratios=[1] * len(rows) + [0.25, 2.2, 0.45, 2.2],
                            hspace=0.15)
    for r, (name, panels, kind) in enumerate(rows):
        limit = finite_limit(panels) if kind == 'fft' else None
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f't={shown[c]}\nσ={sigmas[shown[c]]:.3g}', fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if panel is None:
                ax.axis('off')
            elif kind == 'fft':
                show_map(ax, panel, limit)
            else:
                show_image(ax, panel, enhance=(kind == 'diff'))
    labels = [f'{s:.3g}' for s in sigmas]
    radial_lines(fig.add_subplot(grid[len(rows) + 1, :]), data['out_prev_radial'], labels[1:],
                 'B. radial D_FFT(O_t, O_{t−1}) (small radius = low frequency)')
    radial_lines(fig.add_subplot(grid[len(rows) + 3, :]), data['out_in_radial'], labels,
                 'C. radial D_FFT(O_t, I_t)')
    fig.suptitle(f'A. {title}', fontsize=9, y=0.925)
    save_figure(fig, path)


def plot_blocks(data, path, title=''):
    """Fig. 6: A decoder average feature maps per depth, B/C D_t^b of a shallow and a deep block over time."""
    maps = data['depth_maps']
    fig = plt.figure(figsize=(10, 8))
    grid = fig.add_gridspec(2, max(len(maps), 2), height_ratios=[1, 1.6])
    for c, (res, fmap) in enumerate(zip(data['depth_resolutions'], maps)):
        ax = fig.add_subplot(grid[0, c])
        ax.imshow(np.asarray(fmap), cmap='magma', interpolation='nearest')
        ax.set_title(f'decoder {res}×{res}', fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    labels = [f'{s:.3g}' for s in data['sigmas']]
    half = grid[1, :].subgridspec(1, 2)
    radial_lines(fig.add_subplot(half[0, 0]), data['shallow_radial'], labels, f'B. shallow block {data["shallow"]}')
    radial_lines(fig.add_subplot(half[0, 1]), data['deep_radial'], labels, f'C. deep block {data["deep"]}')
    fig.suptitle(f'A. average feature maps per depth (step t={data["map_step"]}). {title}', fontsize=9)
    save_figure(fig, path)


def plot_teacher_student(rows, path, student_vs_data=None, title=''):
    """Fig. 2: A FID vs teacher steps K, B FID vs the middle σ of a 2-step teacher; blue = against the student's
    images, gray = against the data reference (when given)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [('steps', 'steps', 'teacher steps K', 'A. FID of K-step teachers'),
              ('middle_sigma', None, 'intermediate σ (K = 2)', 'B. 2-step teacher, middle σ swept')]
    for ax, (kind, key, xlabel, name) in zip(axes, panels):
        chosen = [r for r in rows if r['kind'] == kind]
        if not chosen:
            ax.axis('off')
            continue
        xs = [r[key] if key else r['sigmas'][1] for r in chosen]
        ax.plot(xs, [r['fid_vs_student'] for r in chosen], 'o-', color='tab:blue', label='vs one-step student')
        if chosen[0]['fid_vs_data'] is not None:
            ax.plot(xs, [r['fid_vs_data'] for r in chosen], 's-', color='gray', label='vs data')
        if kind == 'middle_sigma':
            ax.set_xscale('log')
        ax.set_xlabel(xlabel)
        ax.set_ylabel('FID')
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    suffix = '' if student_vs_data is None else f' (student vs data: {student_vs_data:.2f})'
    fig.suptitle(title + suffix, fontsize=9)
    save_figure(fig, path)
