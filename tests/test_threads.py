"""CPU threads: a process takes its share of the cores, less its loader workers, unless told."""

import os

import torch

from lit_restore import threads
from lit_restore.config import load_config
from lit_restore.fit import local_processes


def test_threads_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert threads.cpu_threads() == 16
    assert threads.cpu_threads(local_processes=2, loader_workers=2) == 6
    assert threads.cpu_threads(local_processes=4, loader_workers=8) == 1  # never below one
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.cpu_threads(loader_workers=1) == 1  # the 2-core case measured in docs/benchmarks.md


def test_requested_then_environment_win(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.cpu_threads(loader_workers=1) == 3
    assert threads.cpu_threads(requested=5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert threads.cpu_threads(loader_workers=1) == 15


def test_use_cpu_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.use_cpu_threads(requested=1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_local_processes_follow_devices_unless_bound(monkeypatch):
    cfg = load_config(None, ["trainer.devices=2", "trainer.accelerator=cpu"])
    monkeypatch.setattr(threads, "available_cores", lambda: os.cpu_count())
    assert local_processes(cfg) == 2
    monkeypatch.setattr(threads, "available_cores", lambda: 1 if os.cpu_count() > 1 else 0)
    assert local_processes(cfg) == 1  # bound to its own cores already (SLURM --cpus-per-task)
