"""Process-group handling for torchrun (RANK/WORLD_SIZE/LOCAL_RANK) and plain single-process runs.

Other modules ask this one for rank/world/device; none reads the environment themselves."""
import os

import torch
import torch.distributed as dist

_state = {'device': None}


def init(backend=None):
    """Initialise from torchrun's environment; without it, run as a single process.
    NCCL when CUDA is available, gloo otherwise. Returns the device this rank should use."""
    if _state['device'] is not None:
        return _state['device']
    use_cuda = torch.cuda.is_available()
    if 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1 and not dist.is_initialized():
        for key in ('RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            if key not in os.environ:
                raise RuntimeError(f'WORLD_SIZE is set but {key} is not: launch multi-process runs with torchrun')
        backend = backend or ('nccl' if use_cuda else 'gloo')
        if use_cuda:
            torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        dist.init_process_group(backend=backend)
    if use_cuda:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    else:
        device = torch.device('cpu')
    _state['device'] = device
    return device


def device():
    return _state['device'] or init()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def broadcast_object(obj, src=0):
    """`obj` (any picklable value) from rank `src` on every rank; itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_this_rank, _this_world_size = rank, world_size  # for functions whose arguments shadow the names


def barrier():
    if is_distributed():
        dist.barrier()


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs)


def all_reduce_sum(tensor):
    """In-place sum across ranks (no-op in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor, src=0):
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def shutdown():
    if is_distributed():
        dist.destroy_process_group()
    _state['device'] = None


def rank_batches(items, batch, rank=None, world_size=None):
    """This rank's share of `items` as batches, EDM's split used by sampling, FID and generate.py:
    ceil(n / (batch·world))·world near-equal chunks in order (the first n mod k one longer), rank r takes
    chunks r, r + world, …; empty chunks are dropped. rank/world_size default to this process's."""
    if batch < 1:
        raise ValueError(f'batch must be >= 1, got {batch}')
    rank = _this_rank() if rank is None else rank
    world_size = _this_world_size() if world_size is None else world_size
    items = list(items)
    num_chunks = max(-(-len(items) // (batch * world_size)), 1) * world_size
    size, extra = divmod(len(items), num_chunks)
    bounds = [i * size + min(i, extra) for i in range(num_chunks + 1)]
    chunks = [items[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    return [chunk for chunk in chunks[rank::world_size] if chunk]
