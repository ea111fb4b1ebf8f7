"""Training-step benchmark: seconds of D2O's three stages, run by the training loop's own code
(training/steps.py: requires_grad toggles, forward, backward, gradient reduction, the finiteness check — the
stage's one host sync — and the foreach-Adam step), plus peak memory. Median over `--iters` iterations after
`--warmup`.

Every measured iteration runs a plain iteration (G main, D main) and then the R1 part of an R1 iteration
(frozen real features with their graph, D main on those shared features, the penalty stage), so
    r1_s       = real-feature pass + penalty stage: the R1 stage on its own (the official's column);
    r1_extra_s = what an R1 iteration costs on top of a plain one in our loop (features + shared D main +
                 penalty − plain D main);
    iter_s     = G + D + r1_extra / 16 (lazy R1 every 16 iterations).

Toggles that undo one optimisation each (for BENCHMARKS.md): --d-grad-in-g, --no-adam-foreach,
--plain-grouped-convs, --no-fold-bn (the feature networks' eval-mode BatchNorm run as BatchNorm instead of
folded into their convs: pg_modules/frozen_layers.py fold_batchnorm_), --d-channels-last (a candidate, not
in the code), --compile (G under torch.compile).

    python -m bench.train_step --cbase=128 --cres=2,2,2 --freeze=1
"""
import copy

import click
import torch

import dnnlib
from dnnlib import cli
from bench import common
from pg_modules.discriminator import ProjectedDiscriminator
from pg_modules.frozen_layers import FrozenConv2d, FrozenGroupedConv2d, unfold_batchnorm_
from training import config, freeze, generator, networks, steps

def restore_aten_grouped_convs_(D):
    """Undo pg_modules' FrozenGroupedConv2d: plain FrozenConv2d (F.conv2d, TF-SAME padding, the same folded
    BatchNorm if any) on the same weights, whose double backward is ATen's per-group loop. For measuring what
    that replacement saves in R1."""
    for name, module in list(D.named_modules()):
        if isinstance(module, FrozenGroupedConv2d):
            D.set_submodule(name, FrozenConv2d(module))
    return D


def build(arch, cbase, cres, blocks, res, backbones, freeze_level, r1_gamma, device, adam_foreach=True,
          plain_grouped_convs=False, d_channels_last=False, fold_bn=True):
    """G (NCSN++/DDPM++ with the loop's arch_kwargs), its EMA, D, and both optimizers as the loop sets them up."""
    torch.manual_seed(0)
    kwargs = generator.arch_kwargs(dnnlib.EasyDict(arch=arch, cbase=cbase, cres=cres))
    G = networks.D2OPrecond(img_resolution=res, img_channels=3, label_dim=0, dropout=0.0, augment_dim=0,
                            num_blocks=blocks, **kwargs)
    G.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    g_params = [p for _, p in freeze.select_trainable(G, level=freeze_level)]
    opt_g = steps.make_adam(g_params, steps.g_adam_settings(1e-4), foreach=adam_foreach)
    D = ProjectedDiscriminator(backbones=backbones, c_dim=0, pretrained=False, seed=0, log=lambda *_: None)
    if not fold_bn:
        unfold_batchnorm_(D)
    if plain_grouped_convs:
        restore_aten_grouped_convs_(D)
    D.train().to(device)
    if d_channels_last:
        D.feature_networks.to(memory_format=torch.channels_last)
    opt_d = steps.make_adam(list(D.trainable_parameters()), steps.d_adam_settings(1e-4, r1_gamma), foreach=adam_foreach)
    return G, ema, opt_g, D, opt_d


class DGradInGStages(steps.GanStages):
    """The --d-grad-in-g ablation: G main leaves D's trainable weights requiring grad (as D main left them), so
    its backward also computes their gradients; the loop's stages switch them off."""

    def g_main(self, batches):
        self.D.requires_grad_ = lambda requires_grad=True: self.D  # the stage's one toggle becomes a no-op
        try:
            super().g_main(batches)
        finally:
            del self.D.requires_grad_


def measure(arch='ncsnpp', cbase=128, cres=(2, 2, 2), blocks=4, res=32, batch=8, backbones=('tf_efficientnet_lite0',),
            freeze_level=0, precision='fp32', r1_gamma=1e-4, iters=5, warmup=2, threads=2, device='cpu',
            d_grad_in_g=False, adam_foreach=True, plain_grouped_convs=False, d_channels_last=False, compile=False,
            fold_bn=True):
    config_record = dict(arch=arch, cbase=cbase, cres=list(cres), blocks=blocks, res=res, batch=batch,
                         backbones=list(backbones), freeze=freeze_level, precision=precision, r1_gamma=r1_gamma,
                         iters=iters, warmup=warmup, threads=threads, device=str(device), d_grad_in_g=d_grad_in_g,
                         adam_foreach=adam_foreach, plain_grouped_convs=plain_grouped_convs,
                         d_channels_last=d_channels_last, compile=compile, fold_bn=fold_bn)
    device = common.setup(threads, device)
    load_before = common.loadavg()
    G, ema, opt_g, D, opt_d = build(arch, cbase, cres, blocks, res, list(backbones), freeze_level, r1_gamma, device,
                                    adam_foreach, plain_grouped_convs, d_channels_last, fold_bn)
    G_call = torch.compile(G) if compile else G  # same parameters; only the forward is compiled
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')
    settings = steps.GanSettings(adv_scale=batch / config.PAPER_NUM_GPUS, r1_gamma=r1_gamma)
    stages = (DGradInGStages if d_grad_in_g else steps.GanStages)(
        G_call, D, opt_g, opt_d, settings, steps.NonFiniteGuard(max_nonfinite=1 << 30), autocast=autocast)
    real = torch.rand([batch, 3, res, res], generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    batches = [(real, None)]  # one round, unconditional

    def r1_iteration_part():  # real features once, shared by D main and the penalty stage (the loop's R1 iteration)
        t_features, feats = common.timed(lambda: stages.real_features(batches), device)
        t_shared = common.timed(lambda: stages.d_main(batches, feats), device)[0]
        return t_features, t_shared, common.timed(lambda: stages.r1(batches, feats), device)[0]

    times = {}  # per stage and derived column: one value per measured iteration
    warmup_s = 0.0  # includes torch.compile's compilation with --compile
    for i in range(warmup + iters):
        t = {'g': common.timed(lambda: stages.g_main(batches), device)[0],
             'd': common.timed(lambda: stages.d_main(batches), device)[0]}
        t['r1_features'], t['d_shared'], t['r1_penalty'] = r1_iteration_part()
        t['ema'] = common.timed(lambda: steps.update_ema(ema, G, 10 ** 6, batch, 500, 0.05), device)[0]
        t['r1'] = t['r1_features'] + t['r1_penalty']
        t['r1_extra'] = t['r1_features'] + t['d_shared'] + t['r1_penalty'] - t['d']
        t['iter'] = t['g'] + t['d'] + t['r1_extra'] / steps.R1_INTERVAL
        if i >= warmup:
            for key, seconds in t.items():
                times.setdefault(key, []).append(seconds)
        else:
            warmup_s += t['g'] + t['d'] + t['r1_features'] + t['d_shared'] + t['r1_penalty'] + t['ema']
    medians = {f'{key}_s': common.median(values) for key, values in times.items()}
    g_trainable = steps.optimizer_params(opt_g)
    return dict(bench='train_step', config=config_record, **medians, warmup_s=warmup_s,
                peak_mb=common.peak_memory_mb(device), g_params=sum(p.numel() for p in G.parameters()),
                g_trainable=sum(p.numel() for p in g_trainable), d_trainable=sum(p.numel() for p in stages.d_params),
                samples=times, load_before=load_before, load_after=common.loadavg(), machine=common.machine())


def table(r):
    c = r['config']
    return (f'{c["arch"]} cbase {c["cbase"]} cres {c["cres"]} x{c["blocks"]} {c["res"]}² batch {c["batch"]} '
            f'freeze {c["freeze"]} {c["precision"]}: G {r["g_s"]:.3f} s | D {r["d_s"]:.3f} s | R1 {r["r1_s"]:.3f} s '
            f'(extra {r["r1_extra_s"]:.3f} s) | {r["iter_s"]:.3f} s/iter | peak {r["peak_mb"]:.0f} MB | '
            f'load {r["load_before"][0]}→{r["load_after"][0]}')


@click.command(cls=cli.Command)
@cli.debug_option
@click.option('--arch', type=click.Choice(['ncsnpp', 'ddpmpp']), default='ncsnpp', show_default=True)
@click.option('--cbase', type=int, default=128, show_default=True, help='Channel base (model_channels)')
@click.option('--cres', type=str, default='2,2,2', show_default=True, help='Channel multipliers per resolution')
@click.option('--blocks', type=int, default=4, show_default=True, help='Residual blocks per resolution')
@click.option('--res', type=int, default=32, show_default=True, help='Image resolution')
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--backbones', type=str, default='tf_efficientnet_lite0', show_default=True, help='Comma list')
@click.option('--freeze', 'freeze_level', type=int, default=0, show_default=True, help='0 = D2O, 1 = D2O-F')
@click.option('--precision', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--r1-gamma', type=float, default=1e-4, show_default=True)
@click.option('--iters', type=int, default=5, show_default=True, help='Measured iterations (median)')
@click.option('--warmup', type=int, default=2, show_default=True)
@click.option('--threads', type=int, default=2, show_default=True)
@click.option('--device', type=str, default='cpu', show_default=True)
@click.option('--d-grad-in-g', is_flag=True, help="Ablation: leave D's params requiring grad in G main")
@click.option('--adam-foreach/--no-adam-foreach', default=True, show_default=True)
@click.option('--plain-grouped-convs', is_flag=True, help='Ablation: ATen grouped convs in D (slow R1)')
@click.option('--fold-bn/--no-fold-bn', default=True, show_default=True,
              help="Fold D's frozen eval-mode BatchNorm into its convs (--no-fold-bn: run it as BatchNorm)")
@click.option('--d-channels-last', is_flag=True, help="Candidate: D's feature nets in channels_last")
@click.option('--compile', is_flag=True, help='torch.compile the generator forward')
def main(cres, backbones, **kwargs):
    """Seconds per D2O training stage and peak memory; one JSON line on stdout."""
    r = measure(cres=dnnlib.parse_int_list(cres), backbones=backbones.split(','), **kwargs)
    print(table(r))
    common.emit(r)


if __name__ == '__main__':
    main()
