"""The D2O training loop (d2o-method.md §4–§5), readable top to bottom in `run`.

One iteration: G main → D main → (every 16th) lazy R1, each stage accumulating over `rounds`
micro-batches, all-reducing its gradients once, checking them for non-finite values and stepping its
optimizer; then EMA. With `--loss=edm|vp|ve` the same loop trains a diffusion teacher (no D).
Everything needed to continue bit-exactly is in `training-state-*.pt`: G, EMA, D, both optimizers,
counters and every rank's RNG state; the data order is a pure function of (seed, position)."""
import copy
import dataclasses
import glob
import json
import os
import random
import re
import signal
import sys
import time

import numpy as np
import psutil
import torch
from tqdm import tqdm

import dnnlib
from pg_modules.discriminator import ProjectedDiscriminator, backbone_set
from torch_utils import distributed as dist
from training import checkpoint, freeze, loss as losses, networks, sampling
from training.dataset import ImageFolderDataset
from training.image_grid import save_image_grid

R1_INTERVAL = losses.R1_INTERVAL  # lazy R1 every 16 iterations, its loss multiplied by 16 (d2o-method.md §4)
PAPER_NUM_GPUS = 8  # default adv_scale = the paper's per-GPU batch (loss.py, d2o-method.md §6)
ADAM_BETAS = (0.0, 0.99)  # paper Table 10; 0.0 not 0 (int/float mix fails in torch's Adam, §12.10)

ARCHS = {  # d2o-method.md §2
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECONDS = {'d2o': networks.D2OPrecond, 'edm': networks.EDMPrecond, 'vp': networks.VPPrecond,
            've': networks.VEPrecond}
DIFFUSION_LOSSES = {'edm': losses.EDMLoss, 'vp': losses.VPLoss, 've': losses.VELoss}


# ----------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, position), so resuming needs only the position.

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless shuffled index stream; epoch e uses permutation rng([seed, e]); rank r takes every
    world-th element starting at r; `start` skips the first `start` indices of this rank."""

    def __init__(self, size, rank=0, world=1, seed=0, start=0):
        self.size, self.rank, self.world, self.seed, self.start = size, rank, world, seed, start

    def __iter__(self):
        pos, epoch, perm = self.start, None, None
        while True:
            g = pos * self.world + self.rank
            if g // self.size != epoch:
                epoch = g // self.size
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            yield int(perm[g % self.size])
            pos += 1


# ----------------------------------------------------------------------------------------------
# Generator construction.

def arch_kwargs(cfg):
    kw = copy.deepcopy(ARCHS[cfg.arch or 'ncsnpp'])
    if cfg.cbase is not None:
        kw['model_channels'] = cfg.cbase
    if cfg.cres is not None:
        kw['channel_mult'] = list(cfg.cres)
    return kw


def check_arch_matches(cfg, recorded):
    """--transfer fixes the architecture; explicit options that contradict it are an error."""
    if cfg.arch is None and cfg.cbase is None and cfg.cres is None:
        return
    wanted = arch_kwargs(cfg)
    if cfg.arch is None:  # only cbase/cres given: compare just those
        wanted = {k: v for k, v in wanted.items() if k in ('model_channels', 'channel_mult') and
                  ((k == 'model_channels' and cfg.cbase is not None) or (k == 'channel_mult' and cfg.cres is not None))}
    clashes = {k: (v, recorded.get(k, '(default)')) for k, v in wanted.items()
               if k in recorded and list(np.atleast_1d(recorded[k])) != list(np.atleast_1d(v))}
    if 'model_type' in wanted and recorded.get('model_type', 'DhariwalUNet') != wanted['model_type']:
        clashes['model_type'] = (wanted['model_type'], recorded.get('model_type', 'DhariwalUNet'))
    if clashes:
        lines = ', '.join(f'{k}: option {a} vs checkpoint {b}' for k, (a, b) in clashes.items())
        raise ValueError(f'--transfer={cfg.transfer}: architecture options contradict the checkpoint ({lines}); '
                         f'drop --arch/--cbase/--cres to use the checkpoint architecture')


def build_generator(cfg, dataset, log):
    """G from --transfer (teacher weights copied by name into the chosen preconditioner) or random init."""
    precond = cfg.precond if cfg.loss == 'd2o' or cfg.precond != 'd2o' else 'edm'
    cls = PRECONDS[precond]
    if cfg.transfer:
        log(f'Loading transfer source {cfg.transfer} ...')
        teacher = checkpoint.load_network(cfg.transfer, key='ema', allow_unsafe_pickle=cfg.allow_unsafe_pickle)
        if teacher.img_resolution != dataset.resolution or teacher.img_channels != dataset.num_channels:
            raise ValueError(f'--transfer={cfg.transfer}: network is {teacher.img_channels}x{teacher.img_resolution}^2 '
                             f'but --data={cfg.data} is {dataset.num_channels}x{dataset.resolution}^2')
        if teacher.label_dim != dataset.label_dim:
            raise ValueError(f'--transfer={cfg.transfer}: label_dim {teacher.label_dim} but the dataset gives '
                             f'{dataset.label_dim} (check --cond)')
        kwargs = checkpoint.generator_kwargs_from_teacher(teacher, dropout=cfg.dropout)
        check_arch_matches(cfg, kwargs)
        G = cls(**kwargs)
        report = checkpoint.transfer_weights(teacher, G)
        log(f'Transfer: {report}')
        return G
    kwargs = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim,
                  dropout=cfg.dropout, augment_dim=cfg.augment_dim if cfg.loss != 'd2o' else 0, **arch_kwargs(cfg))
    if cfg.loss == 'd2o':
        log('WARNING: no --transfer given: the generator starts from RANDOM weights (D2O expects a pretrained '
            'diffusion model; pass --transfer=PKL)')
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Small pieces of the loop.

def update_ema(ema, net, cur_nimg, batch, halflife_kimg, rampup_ratio):
    """p_ema ← p + β·(p_ema − p), β = 0.5^(batch / h), h = min(half-life, cur_nimg·ratio) (§4)."""
    h = halflife_kimg * 1000
    if rampup_ratio:
        h = min(h, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch / max(h, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - beta)
    return beta


def reduce_gradients(params, world):
    """Average the gradients of `params` over ranks with one flat all-reduce, once per stage after all
    accumulation rounds (what DDP's no_sync + final sync does, without DDP's limits on double backward
    for R1 and on toggling requires_grad between stages). Parameters without a gradient are ignored."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


class TickStats:
    """Per-tick means of detached scalars; synchronised with the host only at ticks."""

    def __init__(self):
        self.values = {}

    def add(self, stats):
        for k, v in stats.items():
            self.values.setdefault(k, []).append(v.detach().float().reshape(-1).mean() if torch.is_tensor(v)
                                                 else torch.tensor(float(v)))

    def collect(self, device):
        keys = sorted(self.values)
        if not keys:
            return {}
        means = torch.stack([torch.stack([x.to(device) for x in self.values[k]]).mean() for k in keys])
        dist.all_reduce_sum(means)
        means /= dist.world_size()
        self.values = {}
        return dict(zip(keys, means.tolist()))


def check_ranks_identical(tensors, log):
    """Every rank must hold the same weights (EDM checks this before each snapshot). D's BatchNorm running
    statistics are per-rank by design (per-GPU batch statistics, as the official) and are not compared."""
    mismatches = torch.zeros([])
    for tensor in tensors:
        other = dist.broadcast(tensor.detach().clone())
        mismatches += float(not torch.equal(other, tensor.detach()))
    mismatches = dist.all_reduce_sum(mismatches.to(dist.device()))
    if mismatches.item() > 0:
        raise RuntimeError(f'{int(mismatches.item())} tensors differ between ranks')
    log(f'Checked {dist.world_size()} ranks: ranks hold identical parameters')


def rng_state():
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=np.random.get_state()[1].tolist(), numpy_pos=int(np.random.get_state()[2]),
                python=list(random.getstate()[1]))


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])
    np.random.set_state(('MT19937', np.array(state['numpy'], dtype=np.uint32), state['numpy_pos'], 0, 0.0))
    random.setstate((3, tuple(state['python']), None))


def to_images(batch, device):
    """uint8 batch → float32 images in [-1, 1] and one-hot labels (None when unconditional)."""
    images, labels = batch
    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
    labels = labels.to(device, non_blocking=True).to(torch.float32) if labels.shape[1] else None
    return images, labels


def make_run_dir(cfg, dataset, world, batch):
    if cfg.nosubdir:
        return cfg.outdir
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in
                                     (os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else [])) if m]
    desc = (f'{dataset.name}-{"cond" if cfg.cond else "uncond"}-{cfg.arch or "transfer"}-{cfg.precond}-{cfg.loss}-'
            f'gpus{world}-batch{batch}-{cfg.precision}' + (f'-{cfg.desc}' if cfg.desc else ''))
    return os.path.join(cfg.outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def metric_num_images(name):
    """'fid50k' → 50000, 'fid10k' → 10000, 'fid500' → 500 (FID over that many generated images)."""
    m = re.fullmatch(r'fid(\d+)(k?)', name)
    if not m or int(m.group(1)) < 2:
        raise ValueError(f'--metrics: unknown metric {name!r}; expected fid50k, fid10k or fid<N>[k]')
    return int(m.group(1)) * (1000 if m.group(2) else 1)


def find_resume_state(cfg):
    """--resume=PATH (a training-state file or a run dir) or auto (newest state under --outdir)."""
    if cfg.resume in (None, ''):
        return None
    if cfg.resume == 'auto':
        candidates = glob.glob(os.path.join(cfg.outdir, 'training-state-*.pt')) + \
            glob.glob(os.path.join(cfg.outdir, '*', 'training-state-*.pt'))
        if not candidates:
            return None
        return max(candidates, key=lambda p: (os.path.getmtime(p), p))
    if os.path.isdir(cfg.resume):
        states = sorted(glob.glob(os.path.join(cfg.resume, 'training-state-*.pt')))
        if not states:
            raise FileNotFoundError(f'--resume={cfg.resume}: no training-state-*.pt in this folder')
        return states[-1]
    if not os.path.isfile(cfg.resume):
        raise FileNotFoundError(f'--resume={cfg.resume}: no such file (expected training-state-*.pt, a run dir, or auto)')
    return cfg.resume


class Logger:
    """Copies stdout/stderr into log.txt (EDM's log.txt), rank 0 only."""

    def __init__(self, path):
        self.file = open(path, 'a')
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self, self

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        self.stdout.write(text)

    def flush(self):
        self.file.flush()
        self.stdout.flush()

    def isatty(self):
        return False

    def close(self):
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()


# ----------------------------------------------------------------------------------------------

def run(cfg):
    device = torch.device(cfg.device) if cfg.device else dist.init()
    if cfg.device:
        dist.init()
    rank, world = dist.rank(), dist.world_size()
    gan = cfg.loss == 'd2o'
    if cfg.batch % world:
        raise ValueError(f'--batch={cfg.batch} is not divisible by the number of processes ({world})')
    batch_gpu = cfg.batch_gpu or cfg.batch // world
    if (cfg.batch // world) % batch_gpu:
        raise ValueError(f'--batch-gpu={batch_gpu} must divide the per-process batch {cfg.batch // world}')
    rounds = cfg.batch // world // batch_gpu  # real gradient accumulation (the official code ignores it, §12.2)
    total_nimg = int(round(cfg.duration * 1e6))
    torch.backends.cuda.matmul.allow_tf32 = False  # §4: TF32 off, as the official loop
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = device.type == 'cuda'

    # Networks are built from the run seed alone, so G, D (incl. its random projections, §12.5) and EMA start
    # identical on every rank without any broadcast; the per-rank noise seeds are set after construction.
    torch.manual_seed(cfg.seed)

    resume_path = find_resume_state(cfg)
    resume = torch.load(resume_path, map_location='cpu', weights_only=True) if resume_path else None

    dataset = ImageFolderDataset(cfg.data, use_labels=cfg.cond, xflip=cfg.xflip, cache=cfg.cache)
    run_dir = os.path.dirname(os.path.abspath(resume_path)) if resume_path else make_run_dir(cfg, dataset, world,
                                                                                               cfg.batch)
    logger = None
    old_handlers = {}
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        logger = Logger(os.path.join(run_dir, 'log.txt'))
    log = dist.print0
    try:
        log(f'Run directory: {run_dir}')
        log(f'Dataset: {cfg.data}: {len(dataset)} images, {dataset.num_channels}x{dataset.resolution}^2, '
            f'label_dim {dataset.label_dim}')
        log(f'Processes: {world}, batch {cfg.batch} = {batch_gpu} per process x {rounds} rounds x {world}')

        # Generator and EMA.
        if resume is not None:
            G = checkpoint.build_network(resume['G_record'])
            G.load_state_dict(resume['G'])
        else:
            G = build_generator(cfg, dataset, log)
        G.train().requires_grad_(True).to(device)
        ema = copy.deepcopy(G).eval().requires_grad_(False)
        trainable = freeze.select_trainable(G, level=cfg.freeze, train_groups=cfg.train_groups)
        log(freeze.freeze_table(G, [n for n, _ in trainable]))
        g_params = [p for _, p in trainable]
        trainable_share = sum(p.numel() for p in g_params) / sum(p.numel() for p in G.parameters())
        opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=ADAM_BETAS if gan else (0.9, 0.999), eps=1e-8,
                                 foreach=True)

        # Discriminator (GAN only).
        D = opt_d = None
        if gan:
            backbones = backbone_set(cfg.backbone)
            D = ProjectedDiscriminator(backbones=backbones, c_dim=dataset.label_dim,
                                       pretrained=cfg.d_pretrained, weights=cfg.d_weights, interp224=cfg.interp224,
                                       diffaug=cfg.diffaug, seed=cfg.seed, embedding=cfg.d_embedding, log=log)
            D.train().to(device)
            d_params = list(D.trainable_parameters())
            lazy = R1_INTERVAL / (R1_INTERVAL + 1) if cfg.r1_gamma > 0 else 1.0  # lazy-R1 Adam correction (§4)
            opt_d = torch.optim.Adam(d_params, lr=cfg.dlr * lazy, betas=(ADAM_BETAS[0], ADAM_BETAS[1] ** lazy),
                                     eps=1e-8, foreach=True)
            log(f'Discriminator: backbones {backbones}, {sum(p.numel() for p in d_params):,} '
                f'trainable parameters; feature weights: {D.weights_info}')
        loss_fn = None if gan else DIFFUSION_LOSSES[cfg.loss]()
        adv_scale = cfg.adv_scale if cfg.adv_scale is not None else cfg.batch / PAPER_NUM_GPUS

        # Counters, possibly restored.
        cur_nimg = cur_tick = batch_idx = 0
        nonfinite_streak = {}  # per stage: consecutive non-finite steps
        if resume is not None:
            ema.load_state_dict(resume['G_ema'])
            opt_g.load_state_dict(resume['opt_G'])
            if gan:
                D.load_state_dict(resume['D'])
                opt_d.load_state_dict(resume['opt_D'])
            cur_nimg, cur_tick, batch_idx = resume['cur_nimg'], resume['cur_tick'], resume['batch_idx']
            nonfinite_streak = dict(resume['nonfinite_streak'])
            if len(resume['rng']) != world:
                raise ValueError(f'--resume={resume_path}: saved with {len(resume["rng"])} processes, now {world}; '
                                 f'exact resume needs the same process count')
            log(f'Resumed from {resume_path} at {cur_nimg / 1000:.3f} kimg')

        if rank == 0:
            with dnnlib.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
                json.dump(dict(dataclasses.asdict(cfg), run_dir=run_dir, world_size=world, batch_gpu=batch_gpu,
                               rounds=rounds, adv_scale_effective=adv_scale,
                               trainable_share=trainable_share,
                               d_weights_info=getattr(D, 'weights_info', None)), f, indent=2)

        sampler = InfiniteSampler(len(dataset), rank, world, cfg.seed, start=batch_idx * rounds * batch_gpu)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler,
                                             num_workers=cfg.workers, pin_memory=device.type == 'cuda',
                                             prefetch_factor=2 if cfg.workers else None,
                                             persistent_workers=cfg.workers > 0,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        data_iter = iter(loader)
        np.random.seed((cfg.seed * world + rank) % (1 << 31))
        random.seed(cfg.seed * world + rank)
        torch.manual_seed(np.random.randint(1 << 31))
        if resume is not None:
            set_rng_state(resume['rng'][rank])

        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == 'bf16')
        grid_seeds = list(range(cfg.grid_seeds))
        stats = TickStats()
        skipped = {}  # non-finite steps skipped in the current tick, per stage (rank-consistent: grads are reduced)
        stop = {'signal': None}

        def on_signal(signum, _frame):
            stop['signal'] = signum
        old_handlers.update({s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)})

        def step(opt, params, stage):
            """All-reduce, check, step (or skip and count). One host sync per stage decides the skip."""
            reduce_gradients(params, world)
            finite = bool(losses.grads_finite(params))
            if finite:
                opt.step()
                nonfinite_streak[stage] = 0
                return
            nonfinite_streak[stage] = nonfinite_streak.get(stage, 0) + 1
            skipped[stage] = skipped.get(stage, 0) + 1
            log(f'WARNING: non-finite {stage} loss/gradients at {cur_nimg / 1000:.3f} kimg: step skipped '
                f'({nonfinite_streak[stage]} in a row)')
            if nonfinite_streak[stage] >= cfg.max_nonfinite:
                raise FloatingPointError(f'{nonfinite_streak[stage]} non-finite {stage} steps in a row (--max-nonfinite='
                                         f'{cfg.max_nonfinite}); last in stage {stage}. Lower the learning rates or '
                                         f'check the data; the last good state is in {run_dir}')

        def snapshot_tag():
            # EDM names files by whole kimg; ticks under 1 kimg get three decimals so that none overwrite another.
            return f'{cur_nimg // 1000:06d}' if cfg.tick >= 1 else f'{cur_nimg / 1000:010.3f}'

        def save_outputs(snapshot, dump):
            kimg = snapshot_tag()
            if snapshot and world > 1:
                check_ranks_identical(list(G.state_dict().values()) + list(ema.state_dict().values()) +
                                      (list(D.parameters()) if gan else []), log)
            if snapshot and rank == 0:
                snap = dict(ema=copy.deepcopy(ema).cpu(), net=copy.deepcopy(G).eval().requires_grad_(False).cpu(),
                            augment_pipe=None, dataset_kwargs=dataset.dataset_kwargs())
                checkpoint.save_snapshot(os.path.join(run_dir, f'network-snapshot-{kimg}.pkl'), snap)
                save_grid(os.path.join(run_dir, f'fakes-{kimg}.png'))
            if dump:
                rngs = [None] * world
                state_rng = rng_state()
                if world > 1:
                    torch.distributed.all_gather_object(rngs, state_rng)
                else:
                    rngs = [state_rng]
                if rank == 0:
                    state = dict(version=1, config=dataclasses.asdict(cfg), G_record=checkpoint.network_constructor_record(G),
                                 G=G.state_dict(), G_ema=ema.state_dict(), opt_G=opt_g.state_dict(),
                                 D=D.state_dict() if gan else None, opt_D=opt_d.state_dict() if gan else None,
                                 cur_nimg=cur_nimg, cur_tick=cur_tick, batch_idx=batch_idx,
                                 nonfinite_streak=nonfinite_streak, rng=rngs)
                    with dnnlib.atomic_write(os.path.join(run_dir, f'training-state-{kimg}.pt')) as f:
                        torch.save(state, f)
            dist.barrier()

        def save_grid(path):
            with torch.no_grad(), autocast:
                images = []
                for i in range(0, len(grid_seeds), batch_gpu):
                    seeds = grid_seeds[i:i + batch_gpu]
                    z, c, _ = sampling.seeded_latents(seeds, [G.img_channels, G.img_resolution, G.img_resolution],
                                                      device=device, label_dim=G.label_dim)
                    if gan:
                        x = sampling.generator_sample(ema, z, c, num_steps=cfg.multi_step_g,
                                                      middle_sigma=cfg.middle_sigma)
                    else:
                        x = sampling.edm_sampler(ema, z, c, num_steps=18)
                    images.append(sampling.to_uint8(x).cpu())
            save_image_grid(torch.cat(images).numpy(), path)

        def evaluate_metrics():
            if not cfg.metrics:
                return
            from metrics import evaluate_generator
            for name in cfg.metrics:
                num = metric_num_images(name)
                sample_fn = lambda seeds: sample_uint8(seeds)  # noqa: E731
                result = evaluate_generator(ema, cfg.metric_ref, num_images=num, batch=64, device=device,
                                            sample_fn=sample_fn)
                if rank == 0:
                    record = dict(result, metric=name, kimg=cur_nimg / 1000,
                                  snapshot=f'network-snapshot-{snapshot_tag()}.pkl', timestamp=time.time())
                    path = os.path.join(run_dir, f'metric-{name}.jsonl')
                    previous = open(path).read() if os.path.exists(path) else ''
                    best = min([json.loads(l)['fid'] for l in previous.splitlines() if l.strip()], default=np.inf)
                    with dnnlib.atomic_write(path, 'w') as f:
                        f.write(previous + json.dumps(record) + '\n')
                    log(f'{name}: {result["fid"]:.4f} at {cur_nimg / 1000:.1f} kimg')
                    if result['fid'] < best:
                        src = os.path.join(run_dir, record['snapshot'])
                        with open(src, 'rb') as fin, dnnlib.atomic_write(
                                os.path.join(run_dir, 'network-snapshot-best.pkl')) as fout:
                            fout.write(fin.read())

        def sample_uint8(seeds):
            with torch.no_grad(), autocast:
                z, c, _ = sampling.seeded_latents(seeds, [G.img_channels, G.img_resolution, G.img_resolution],
                                                  device=device, label_dim=G.label_dim)
                x = sampling.generator_sample(ema, z, c, num_steps=cfg.multi_step_g, middle_sigma=cfg.middle_sigma) \
                    if gan else sampling.edm_sampler(ema, z, c, num_steps=18)
                return sampling.to_uint8(x).permute(0, 3, 1, 2)

        # Main loop -------------------------------------------------------------------------------
        log(f'Training for {total_nimg / 1000:g} kimg ({"D2O" if gan else cfg.loss.upper() + " diffusion"}) ...')
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        if rank == 0 and resume is not None and os.path.exists(stats_path):  # drop ticks past the resume point
            kept = [l for l in open(stats_path).read().splitlines() if l.strip() and
                    json.loads(l)['kimg'] <= cur_nimg / 1000 + 1e-9]
            with dnnlib.atomic_write(stats_path, 'w') as f:
                f.write(''.join(l + '\n' for l in kept))
        start_time = tick_start_time = time.time()
        tick_start_nimg = cur_nimg
        bar = tqdm(total=total_nimg / 1000, initial=cur_nimg / 1000, unit='kimg', disable=rank != 0,
                   bar_format='{l_bar}{bar}| {n:.3f}/{total:.3f} kimg [{elapsed}<{remaining}, {rate_fmt}]')
        done = cur_nimg >= total_nimg
        first = resume is None
        while not done:
            batches = [to_images(next(data_iter), device) for _ in range(rounds)]
            if cfg.lr_rampup > 0:
                for group in opt_g.param_groups:
                    group['lr'] = cfg.lr * min(cur_nimg / (cfg.lr_rampup * 1000), 1.0)

            if gan:
                # G main: D's trainable parameters need no gradients here (saves their weight gradients).
                D.requires_grad_(False)
                opt_g.zero_grad(set_to_none=True)
                for real, labels in batches:
                    with autocast:
                        loss, st = losses.generator_loss(G, D, torch.randn_like(real), labels, adv_scale, cfg.loss_type,
                                                         num_steps=cfg.multi_step_g, middle_sigma=cfg.middle_sigma)
                    (loss / rounds).backward()
                    stats.add(st)
                step(opt_g, g_params, 'G')

                # D main: fakes from fresh noise, generated without gradients. When R1 is due in this
                # iteration, the frozen feature pass over the reals is computed once and shared (exact: the
                # features do not depend on D's trainable weights, and R1 never augments).
                r1_due = cfg.r1_gamma > 0 and batch_idx % R1_INTERVAL == 0 and batch_idx != 0
                real_features = [losses.r1_features(D, real) if r1_due and not cfg.diffaug else None
                                 for real, _ in batches]
                for p in d_params:
                    p.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                for (real, labels), feats in zip(batches, real_features):
                    with torch.no_grad(), autocast:
                        fake = sampling.generator_sample(G, torch.randn_like(real), labels,
                                                         num_steps=cfg.multi_step_g, middle_sigma=cfg.middle_sigma)
                    loss, st = losses.discriminator_loss(D, real, fake, labels, adv_scale, cfg.loss_type,
                                                         real_features=feats)
                    (loss / rounds).backward()
                    stats.add(st)
                step(opt_d, d_params, 'D')

                # Lazy R1 on un-augmented reals, every 16th iteration with gain 16.
                if r1_due:
                    opt_d.zero_grad(set_to_none=True)
                    for (real, labels), feats in zip(batches, real_features):
                        loss, st = losses.r1_penalty(D, real, labels, cfg.r1_gamma, real_features=feats)
                        (loss * R1_INTERVAL / rounds).backward()
                        stats.add(st)
                    step(opt_d, d_params, 'R1')
            else:
                opt_g.zero_grad(set_to_none=True)
                for real, labels in batches:
                    with autocast:
                        loss = loss_fn(G, real, labels)
                    loss = loss.float().sum() / (batch_gpu * rounds)
                    loss.backward()
                    stats.add({'Loss/diffusion': loss.detach() * batch_gpu * rounds / real[0].numel() / len(real)})
                step(opt_g, g_params, 'G')

            batch_idx += 1
            update_ema(ema, G, cur_nimg, cfg.batch, cfg.ema * 1000, cfg.ema_warmup)
            cur_nimg += cfg.batch
            bar.update(min(cfg.batch / 1000, bar.total - bar.n))
            done = cur_nimg >= total_nimg
            if world > 1:  # every rank must agree to stop on a signal
                flag = dist.all_reduce_sum(torch.tensor([1.0 if stop['signal'] else 0.0], device=device))
                stop['signal'] = stop['signal'] or (signal.SIGTERM if flag.item() > 0 else None)
            interrupted = stop['signal'] is not None

            # Tick bookkeeping.
            if not (done or interrupted or first or cur_nimg >= tick_start_nimg + cfg.tick * 1000):
                continue
            first = False
            now = time.time()
            tick_stats = stats.collect(device)
            kimg_done = (cur_nimg - tick_start_nimg) / 1000
            record = dict(tick=cur_tick, kimg=cur_nimg / 1000, sec_per_tick=now - tick_start_time,
                          sec_per_kimg=(now - tick_start_time) / max(kimg_done, 1e-9), total_sec=now - start_time,
                          cpu_mem_gb=psutil.Process().memory_info().rss / 2 ** 30,
                          gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0,
                          timestamp=now, **tick_stats,
                          **{f'Skipped/{stage}': skipped.get(stage, 0) for stage in ('G', 'D', 'R1')})
            skipped.clear()
            line = ' '.join([f'tick {cur_tick:<4d}', f'kimg {cur_nimg / 1000:<8.3f}',
                             f'sec/kimg {record["sec_per_kimg"]:<7.2f}', f'cpumem {record["cpu_mem_gb"]:.2f}'] +
                            [f'{k} {v:.4g}' for k, v in tick_stats.items()] +
                            [f'{k} {v}' for k, v in record.items() if k.startswith('Skipped/') and v])
            if rank == 0:
                bar.write(line)
                previous = open(stats_path).read() if os.path.exists(stats_path) else ''
                with dnnlib.atomic_write(stats_path, 'w') as f:
                    f.write(previous + json.dumps(record) + '\n')
            snapshot = done or interrupted or cur_tick % cfg.snap == 0
            save_outputs(snapshot=snapshot, dump=done or interrupted or (cur_tick % cfg.dump == 0 and cur_tick != 0))
            if snapshot and not interrupted and (cur_tick != 0 or cfg.metrics_at_start):  # signals: no time for metrics
                evaluate_metrics()
            if interrupted:
                log(f'Interrupted by signal {stop["signal"]}: state saved at {cur_nimg / 1000:.3f} kimg; '
                    f'continue with --resume={run_dir}')
                break
            cur_tick += 1
            tick_start_nimg, tick_start_time = cur_nimg, time.time()
        bar.close()
        log('Exiting...')
        return run_dir
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        if logger is not None:
            logger.close()
