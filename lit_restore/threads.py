"""How many CPU threads a process gives torch.

torch starts one intra-op thread per core in every process. With several training processes on a
node, or loader workers decoding beside the trainer, those threads outnumber the cores and spin
against each other: on a 2-core machine 40 tiny `fit` steps took 239 s with the default threads
and one loader worker, 29.5 s with one thread (docs/benchmarks.md). So each process takes its share
of the cores it may run on, less one per loader worker.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: what SLURM's --cpus-per-task binds)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def cpu_threads(local_processes: int = 1, loader_workers: int = 0, requested: int = 0) -> int:
    """Threads for one process: `requested` when > 0, else OMP_NUM_THREADS when set, else
    cores / processes on this machine − loader workers per process, at least 1."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() // max(1, local_processes) - loader_workers)


def use_cpu_threads(local_processes: int = 1, loader_workers: int = 0, requested: int = 0) -> int:
    """Set torch's intra-op threads as `cpu_threads` says; returns the number set."""
    n = cpu_threads(local_processes, loader_workers, requested)
    torch.set_num_threads(n)
    return n
