"""What every benchmark shares: thread/device setup, synchronised timing, medians, load averages and peak
memory, and one JSON line per result on stdout (the suite in __main__ parses the last one)."""
import json
import os
import platform
import resource
import statistics
import time

import torch


def setup(threads, device):
    """Fixed intra-op threads (2 = the reference machine) and a torch.device; no TF32 (the loop turns it off)."""
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as the training loop on CUDA
        torch.cuda.reset_peak_memory_stats(device)
    return device


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of `fn()`, with the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values):
    return float(statistics.median(values)) if values else float('nan')


def loadavg():
    """1/5/15-minute load averages: tells a reader whether other processes shared the CPU."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_memory_mb(device):
    """CUDA: peak allocated by torch. CPU: this process's peak RSS (ru_maxrss, KiB on Linux), which is why every
    configuration runs in a fresh process."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine():
    cpu = platform.processor()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    info = dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version())
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


def emit(record):
    print(json.dumps(record), flush=True)
    return record
