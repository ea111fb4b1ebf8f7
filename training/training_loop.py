"""The training loop (docs/method.md §4–§5), readable top to bottom in `run`.

`run` resolves the configuration, builds the networks (or restores them from a training state), then
repeats one iteration — training/steps.py's stages on `rounds` micro-batches, then the EMA — and at every
tick reports, snapshots and dumps through the run directory (training/run_dir.py). With `--loss=edm|vp|ve`
the same loop trains a diffusion teacher (no D). Everything a resume needs is one TrainingState, and its
file is found, checked and read by training/state.py; the data order is a pure function of (seed,
position), so resuming is bit-exact."""
import contextlib
import copy
import dataclasses
import json
import os
import random
import signal
import time

import numpy as np
import psutil
import torch
from tqdm import tqdm

import dnnlib
from pg_modules.discriminator import ProjectedDiscriminator
from torch_utils import distributed as dist
from training import (checkpoint, config, consistency, freeze, generator, loss as losses, run_dir as rundir, sampling,
                      state as training_state, steps)
from training.dataset import ImageFolderDataset
from training.image_grid import save_image_grid

DIFFUSION_LOSSES = {'edm': losses.EDMLoss, 'vp': losses.VPLoss, 've': losses.VELoss}


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the state and a snapshot were saved at the end of the iteration."""

    def __init__(self, signum, run_dir):
        super().__init__(f'interrupted by signal {signum}: state saved; continue with --resume={run_dir}')
        self.signum, self.run_dir = signum, run_dir


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


def micro_batches(dataset, cfg, plan, batch_idx, device):
    """Iterator of one iteration's `rounds` micro-batches [(images in [-1, 1], one-hot labels or None)] for
    this rank, starting at iteration `batch_idx`."""
    rank, world = dist.rank(), dist.world_size()
    sampler = InfiniteSampler(len(dataset), rank, world, cfg.seed, start=batch_idx * plan.rounds * cfg.batch_gpu)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_gpu, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == 'cuda', prefetch_factor=2 if cfg.workers else None,
                                         persistent_workers=cfg.workers > 0, worker_init_fn=rundir.worker_init_fn,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    data = iter(loader)
    while True:
        yield [to_images(next(data), device) for _ in range(plan.rounds)]


def to_images(batch, device):
    """uint8 batch → float32 images in [-1, 1] and one-hot labels (None when unconditional)."""
    images, labels = batch
    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
    labels = labels.to(device, non_blocking=True).to(torch.float32) if labels.shape[1] else None
    return images, labels


# ----------------------------------------------------------------------------------------------
# Set-up pieces.

def setup_device(name):
    """This process's device (joins the torchrun group first); TF32 off as in the official loop (docs/method.md §4)."""
    device = dist.init()
    if name:
        device = torch.device(name)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    return device


def seed_this_rank(seed):
    """Per-rank noise seeds (docs/method.md §4), set after the networks were built from the run seed."""
    rank, world = dist.rank(), dist.world_size()
    np.random.seed((seed * world + rank) % (1 << 31))
    random.seed(seed * world + rank)
    torch.manual_seed(np.random.randint(1 << 31))


def find_resume(cfg, log):
    """(path, saved state, notes) to continue from, or (None, None, []). Rank 0 looks the state up
    (--resume=auto takes only states of this configuration) and every rank reads the same file. Refuses a
    state of another run configuration or process count; the options that change only how training
    continues take effect, and `notes` says so for the log (docs/checkpoint-format.md §3)."""
    options = dataclasses.asdict(cfg)
    path = dist.broadcast_object(training_state.find_resume_state(cfg.resume, cfg.outdir, options, log)
                                 if dist.rank() == 0 else None)
    if path is None:
        return None, None, []
    saved = training_state.load_training_state(path)
    if len(saved['rng']) != dist.world_size():
        raise ValueError(f'--resume={path}: saved with {len(saved["rng"])} processes, now {dist.world_size()}; '
                         f'exact resume needs the same process count')
    changes = training_state.check_resume(training_state.saved_run_config(saved), options, path)
    return path, saved, [f'Resume: {option} changed from {old!r} to {new!r} (takes effect)'
                         for option, old, new in changes]


def check_resume_data(path, saved, dataset):
    """The dataset's shape must be the one the saved generator was built for."""
    shape = dict(zip(training_state.DATASET_KEYS, (dataset.resolution, dataset.num_channels, dataset.label_dim)))
    training_state.check_resume(training_state.saved_run_config(saved), shape, path)


@contextlib.contextmanager
def open_run_dir(run_dir, log, fresh):
    """Rank 0 holds the run directory's lock and log.txt copies stdout/stderr while the block runs; an
    expected failure is written to log.txt as one line before it propagates. A `fresh` run (not a resume)
    refuses a folder that holds another run, before writing anything into it."""
    if dist.rank() != 0:
        yield
        return
    with rundir.RunDirLock(run_dir, log):
        if fresh:
            rundir.refuse_other_run(run_dir)
        logger = rundir.Logger(os.path.join(run_dir, 'log.txt'))
        try:
            yield
        except (ValueError, OSError, FloatingPointError) as err:
            logger.file.write(f'Error: {err}\n')
            raise
        finally:
            logger.close()


def write_json(path, data):
    with rundir.saving(path), dnnlib.atomic_write(path, 'w') as f:
        json.dump(data, f, indent=2)


def rebuild_generator(record, cfg, log):
    """G of a training state, its precision taken from the current --precision (docs/method.md §9): use_fp16 only
    selects the compute dtype, the saved weights are float32 either way."""
    use_fp16 = generator.use_fp16_for(cfg)
    kwargs = dict(record.get('init_kwargs', {}))
    if kwargs.get('use_fp16', False) != use_fp16:
        log(f'Resume: generator use_fp16 {kwargs.get("use_fp16", False)} -> {use_fp16} (--precision={cfg.precision})')
    return checkpoint.build_network(dict(record, init_kwargs=dict(kwargs, use_fp16=use_fp16)), "field 'G_record'")


def build_training(cfg, plan, dataset, saved, guard, device, log, resume_path=None):
    """G, EMA, D, both optimisers and the non-finite `guard` as one TrainingState (restored from `saved`, read
    from `resume_path`, when resuming), with the current options' learning rates applied (a resumed run takes
    the new --lr/--dlr/--r1-gamma)."""
    gan = cfg.loss == 'd2o'
    if saved:
        with training_state.restoring(resume_path, 'G_record'):
            G = rebuild_generator(saved['G_record'], cfg, log)
    else:
        G = generator.build_generator(cfg, dataset, log)
    G.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    trainable = freeze.select_trainable(G, level=cfg.freeze, train_groups=cfg.train_groups)
    log(freeze.freeze_table(G, [n for n, _ in trainable]))
    opt_g = steps.make_adam([p for _, p in trainable], steps.g_adam_settings(cfg.lr, gan))
    D = opt_d = None
    if gan and not cfg.cd_only:
        D = ProjectedDiscriminator(backbones=list(plan.backbones), c_dim=dataset.label_dim, pretrained=cfg.d_pretrained,
                                   weights=cfg.d_weights, interp224=cfg.interp224, diffaug=cfg.diffaug, seed=cfg.seed,
                                   embedding=cfg.d_embedding, bn_group=cfg.d_bn_group,
                                   img_resolution=dataset.resolution, log=log)
        D.train().to(device)
        opt_d = steps.make_adam(list(D.trainable_parameters()), steps.d_adam_settings(cfg.dlr, cfg.r1_gamma))
        log(f'Discriminator: backbones {list(plan.backbones)}, {sum(p.numel() for p in D.trainable_parameters()):,} '
            f'trainable parameters; feature weights: {D.weights_info}')
    state = training_state.TrainingState(G=G, G_ema=ema, opt_G=opt_g, guard=guard, D=D, opt_D=opt_d)
    if saved:
        state.load(saved, resume_path)
    steps.apply_settings(opt_g, steps.g_adam_settings(cfg.lr, gan))
    if opt_d is not None:
        steps.apply_settings(opt_d, steps.d_adam_settings(cfg.dlr, cfg.r1_gamma))
    return state


def build_cd_teacher(cfg, saved, dataset, device, log):
    """(teacher, lpips) of the consistency-distillation term (paper §4.4, docs/consistency.md), or (None, None):
    the frozen diffusion model of --transfer (on resume, the one the training state records) and, for
    --cd-distance=lpips, LPIPS built once from its weight files. Neither is part of the training state."""
    if not cfg.cd_weight:
        return None, None
    source = cfg.transfer or (saved['config'].get('transfer') if saved else None)
    if not source:
        raise ValueError('--cd-weight/--cd-only: the training state records no --transfer; pass the diffusion '
                         'teacher with --transfer=PKL')
    teacher = generator.load_teacher(dataclasses.replace(cfg, transfer=source), dataset)
    teacher.eval().requires_grad_(False).to(device)
    lpips = None
    if cfg.cd_distance == 'lpips':
        lpips = consistency.LPIPS(*consistency.lpips_weight_files(cfg.lpips_vgg, cfg.lpips_lin))
        lpips.eval().requires_grad_(False).to(device)
    log(f'Consistency distillation: weight {cfg.cd_weight}, distance {cfg.cd_distance}, N = {cfg.cd_scales}, '
        f'teacher {source}' + (' (no GAN term, no discriminator)' if cfg.cd_only else ''))
    return teacher, lpips


def make_stages(cfg, state, guard, device, record, teacher=None, lpips=None):
    """The iteration's stages: GAN (G main [+ CD], D main, lazy R1), CD alone, or diffusion-teacher training."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == 'bf16')
    world = dist.world_size()
    if cfg.loss != 'd2o':
        return steps.DiffusionStage(state.G, state.opt_G, DIFFUSION_LOSSES[cfg.loss](), guard, world, autocast, record)
    settings = steps.GanSettings(adv_scale=cfg.adv_scale, loss_type=cfg.loss_type, r1_gamma=cfg.r1_gamma,
                                 num_steps=cfg.multi_step_g, middle_sigma=cfg.middle_sigma, cd_weight=cfg.cd_weight,
                                 cd_distance=cfg.cd_distance, cd_scales=cfg.cd_scales)
    if cfg.cd_only:
        return steps.ConsistencyStage(state.G, state.opt_G, teacher, settings, guard, world, autocast, record, lpips)
    return steps.GanStages(state.G, state.D, state.opt_G, state.opt_D, settings, guard, world, autocast, record,
                           teacher=teacher, lpips=lpips)


# ----------------------------------------------------------------------------------------------
# Ticks: statistics, signals, and what each tick writes.

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


def stop_agreed(stop, device):
    """Whether to stop after this iteration: a SIGINT/SIGTERM on any rank stops every rank."""
    if dist.world_size() > 1:
        flag = dist.all_reduce_sum(torch.tensor([1.0 if stop.signum else 0.0], device=device))
        stop.signum = stop.signum or (signal.SIGTERM if flag.item() > 0 else None)
    return stop.signum is not None


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


class RunOutputs:
    """What ticks write into the run directory: stats.jsonl lines, snapshots with sample grids, training
    states and metric records. Sampling for grids and FID goes through sampling.generate_images, exactly as
    generate.py samples (fp32, whatever --precision trains with)."""

    def __init__(self, cfg, plan, run_dir, dataset, state, device, log, last_state=None):
        self.cfg, self.plan, self.run_dir, self.dataset, self.state = cfg, plan, run_dir, dataset, state
        self.device, self.log, self.last_state = device, log, last_state
        self.sampler = sampling.training_sampler(cfg.loss == 'd2o', cfg.multi_step_g, cfg.middle_sigma)
        self.rank = dist.rank()

    def tag(self):
        # EDM names files by whole kimg; ticks under 1 kimg get three decimals so that none overwrite another.
        n = self.state.cur_nimg
        return f'{n // 1000:06d}' if self.cfg.tick >= 1 else f'{n / 1000:010.3f}'

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def stats(self, record):
        if self.rank == 0:
            with rundir.saving(self.path('stats.jsonl')):
                rundir.append_jsonl(self.path('stats.jsonl'), record)

    def sample(self, seeds, batch):
        """uint8 NHWC images of the EMA generator for `seeds` (grids and FID)."""
        return sampling.sample_uint8(self.state.G_ema, seeds, self.device, batch=batch, **self.sampler)

    def snapshot(self):
        s = self.state
        if dist.world_size() > 1:
            check_ranks_identical(list(s.G.state_dict().values()) + list(s.G_ema.state_dict().values()) +
                                  (list(s.D.parameters()) if s.D is not None else []), self.log)
        if self.rank == 0:
            snap = dict(ema=s.G_ema, net=s.G, augment_pipe=None,  # save_snapshot copies each to the CPU once
                        dataset_kwargs=self.dataset.dataset_kwargs())
            with rundir.saving(self.path(f'network-snapshot-{self.tag()}.pkl')) as path:
                checkpoint.save_snapshot(path, snap)
            images = self.sample(list(range(self.cfg.grid_seeds)), self.cfg.batch_gpu)
            with rundir.saving(self.path(f'fakes-{self.tag()}.png')) as path:
                save_image_grid(images.cpu().numpy(), path)
        dist.barrier()

    def dump(self, options):
        path = self.path(f'training-state-{self.tag()}.pt')
        with rundir.saving(path):
            self.state.save(path, options)
        dist.barrier()
        self.last_state = path

    def metrics(self):
        from metrics import evaluate_generator
        for name, num in self.plan.metric_images.items():
            result = evaluate_generator(self.state.G_ema, self.cfg.metric_ref, num_images=num, batch=64,
                                        device=self.device,
                                        sample_fn=lambda seeds: self.sample(seeds, len(seeds)).permute(0, 3, 1, 2))
            if self.rank == 0:
                record = dict(result, metric=name, kimg=self.state.cur_nimg / 1000,
                              snapshot=f'network-snapshot-{self.tag()}.pkl', timestamp=time.time())
                rundir.record_metric(self.run_dir, name, record, key='fid')
                self.log(f'{name}: {result["fid"]:.4f} at {self.state.cur_nimg / 1000:.3f} kimg')


class TickReporter:
    """Tick timing, the stats line (log and progress bar) and the stats.jsonl record."""

    def __init__(self, state, total_nimg, device, guard, disable):
        self.state, self.device, self.guard = state, device, guard
        self.stats = TickStats()
        self.start_time = self.tick_start_time = time.time()
        self.tick_start_nimg = state.cur_nimg
        self.bar = tqdm(total=total_nimg / 1000, initial=state.cur_nimg / 1000, unit='kimg', disable=disable,
                        bar_format='{l_bar}{bar}| {n:.3f}/{total:.3f} kimg [{elapsed}<{remaining}, {rate_fmt}]')

    def advance(self, nimg):
        self.bar.update(min(nimg / 1000, self.bar.total - self.bar.n))

    def due(self, tick_kimg):
        return self.state.cur_nimg >= self.tick_start_nimg + tick_kimg * 1000

    def report(self):
        """Closes the tick: returns its stats.jsonl record, writes its line, starts the next tick's clock."""
        now, s = time.time(), self.state
        tick_stats = self.stats.collect(self.device)
        kimg_done = (s.cur_nimg - self.tick_start_nimg) / 1000
        record = dict(tick=s.cur_tick, kimg=s.cur_nimg / 1000, sec_per_tick=now - self.tick_start_time,
                      sec_per_kimg=(now - self.tick_start_time) / max(kimg_done, 1e-9), total_sec=now - self.start_time,
                      cpu_mem_gb=psutil.Process().memory_info().rss / 2 ** 30,
                      gpu_mem_gb=torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                      if self.device.type == 'cuda' else 0.0, timestamp=now, **tick_stats,
                      **{f'Skipped/{stage}': n for stage, n in self.guard.take_skipped().items()})
        line = ' '.join([f'tick {s.cur_tick:<4d}', f'kimg {s.cur_nimg / 1000:<8.3f}',
                         f'sec/kimg {record["sec_per_kimg"]:<7.2f}', f'cpumem {record["cpu_mem_gb"]:.2f}'] +
                        [f'{k} {v:.4g}' for k, v in tick_stats.items()] +
                        [f'{k} {v}' for k, v in record.items() if k.startswith('Skipped/') and v])
        if dist.rank() == 0:
            self.bar.write(line)
        self.tick_start_nimg, self.tick_start_time = s.cur_nimg, time.time()
        return record


# ----------------------------------------------------------------------------------------------

def record_options(cfg, plan, state, outputs, resume_path):
    """training_options.json (rank 0) with the trainable share; a resumed run drops stats.jsonl lines past its
    state. Returns the record (states carry it too)."""
    trainable = sum(p.numel() for p in steps.optimizer_params(state.opt_G))
    options = config.options_record(cfg, plan, run_dir=outputs.run_dir, resumed_from=resume_path,
                                    trainable_share=trainable / sum(p.numel() for p in state.G.parameters()),
                                    d_weights_info=getattr(state.D, 'weights_info', None))
    if dist.rank() == 0:
        write_json(outputs.path('training_options.json'), options)
        if resume_path:
            rundir.truncate_jsonl_after(outputs.path('stats.jsonl'), state.cur_nimg / 1000)
    return options


def objective_name(cfg):
    if cfg.loss != 'd2o':
        return cfg.loss.upper() + ' diffusion'
    return 'CD' if cfg.cd_only else 'D2O + CD' if cfg.cd_weight else 'D2O'


def end_tick(cfg, state, outputs, reporter, options, done, interrupted, signum):
    """The end of a tick: report, snapshot, dump, evaluate; when the ranks agreed to stop (`interrupted`; this
    rank's own `signum` may be None), save and raise Interrupted (no time for metrics)."""
    outputs.stats(reporter.report())
    snapshot = done or interrupted or state.cur_tick % cfg.snap == 0
    if snapshot:
        outputs.snapshot()
    if done or interrupted or (state.cur_tick % cfg.dump == 0 and state.cur_tick != 0):
        outputs.dump(options)
    if snapshot and not interrupted and (state.cur_tick != 0 or cfg.metrics_at_start):
        outputs.metrics()
    if interrupted:
        outputs.log(f'Interrupted by signal {signum}: state saved at {state.cur_nimg / 1000:.3f} kimg; '
                    f'continue with --resume={outputs.run_dir}')
        raise Interrupted(signum, outputs.run_dir)
    state.cur_tick += 1


def run(cfg):
    """Train as `cfg` says; returns the run directory. Raises Interrupted after saving on SIGINT/SIGTERM."""
    device = setup_device(cfg.device)
    rank, world = dist.rank(), dist.world_size()
    cfg, plan = config.resolve(cfg, world)  # every option conflict surfaces here, before any file is read
    log = dist.print0
    resume_path, saved, resume_notes = find_resume(cfg, log)
    torch.manual_seed(cfg.seed)  # networks (and D's random projections) from the run seed: identical on every rank
    dataset = ImageFolderDataset(cfg.data, use_labels=cfg.cond, xflip=cfg.xflip, cache=cfg.cache)
    if saved:
        check_resume_data(resume_path, saved, dataset)
    run_dir = dist.broadcast_object(os.path.dirname(os.path.abspath(resume_path)) if resume_path else
                                    rundir.make_run_dir(cfg, dataset.name, world, cfg.batch) if rank == 0 else None)
    with open_run_dir(run_dir, log, fresh=saved is None), rundir.StopSignals() as stop:
        log('\n'.join([f'Run directory: {run_dir}'] + resume_notes))
        log(f'Dataset: {cfg.data}: {len(dataset)} images, {dataset.num_channels}x{dataset.resolution}^2, '
            f'label_dim {dataset.label_dim}')
        log(f'Processes: {world}, batch {cfg.batch} = {cfg.batch_gpu} per process x {plan.rounds} rounds x {world}')
        # Its messages read `state` and `outputs` (bound below) only when a step is skipped.
        guard = steps.NonFiniteGuard(cfg.max_nonfinite, log, where=lambda: f'{state.cur_nimg / 1000:.3f} kimg',
                                     last_state=lambda: outputs.last_state)
        state = build_training(cfg, plan, dataset, saved, guard, device, log, resume_path)
        teacher, lpips = build_cd_teacher(cfg, saved, dataset, device, log)
        if saved:
            log(f'Resumed from {resume_path} at {state.cur_nimg / 1000:.3f} kimg')
        outputs = RunOutputs(cfg, plan, run_dir, dataset, state, device, log, last_state=resume_path)
        options = record_options(cfg, plan, state, outputs, resume_path)
        data = micro_batches(dataset, cfg, plan, state.batch_idx, device)
        seed_this_rank(cfg.seed)
        if saved:
            state.load_rng(saved, rank)
        reporter = TickReporter(state, plan.total_nimg, device, guard, disable=rank != 0)
        stages = make_stages(cfg, state, guard, device, reporter.stats.add, teacher, lpips)

        log(f'Training for {plan.total_nimg / 1000:g} kimg ({objective_name(cfg)}) ...')
        done = state.cur_nimg >= plan.total_nimg
        first_tick = saved is None
        while not done:
            batches = next(data)
            if cfg.lr_rampup > 0:
                steps.apply_settings(state.opt_G, dict(lr=steps.rampup_lr(cfg.lr, cfg.lr_rampup, state.cur_nimg)))
            stages.iteration(batches, state.batch_idx)
            state.batch_idx += 1
            steps.update_ema(state.G_ema, state.G, state.cur_nimg, cfg.batch, cfg.ema * 1000, cfg.ema_warmup)
            state.cur_nimg += cfg.batch
            reporter.advance(cfg.batch)
            done = state.cur_nimg >= plan.total_nimg
            interrupted = stop_agreed(stop, device)
            if not (done or interrupted or first_tick or reporter.due(cfg.tick)):
                continue

            first_tick = False
            end_tick(cfg, state, outputs, reporter, options, done, interrupted, stop.signum)
        reporter.bar.close()
        log('Exiting...')
        return run_dir
