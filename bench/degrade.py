"""Degradation engine throughput: the default mixed chain on a 16×3×256×256 batch.

Prints images/s of the batched Degrader, of the same ops run one sample at a time in a Python
loop (the ratio is what batching buys), and the time of each op on the whole batch. On a GPU it
also runs a batch under `torch.cuda.set_sync_debug_mode("error")`.

    python bench/degrade.py                 # CPU, 2 threads (the CI machine)
    OMP_WAIT_POLICY=PASSIVE python bench/degrade.py   # on a CPU shared with other jobs
    python bench/degrade.py --device cuda   # when a GPU is present
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lit_restore.config import DegradeConfig
from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.op import Draws


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (this process, all threads) of `fn()` over
    `repeats` runs after one warm-up run. On a shared machine the CPU time is the steadier
    figure: it does not count the time other processes held the cores."""
    fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    gt = torch.rand(a.batch, 3, a.size, a.size, generator=g, device=device)
    gt = gt.mul(255).round().div(255)
    degrader = Degrader(DegradeConfig(mode="mixed"))
    print(f"device {device}, threads {torch.get_num_threads()}, batch {a.batch}×3×{a.size}×{a.size}, "
          f"chain {'→'.join(degrader.chain)}, load average {os.getloadavg()[0]:.2f}")

    batched, cpu = timed(lambda: degrader(gt, generator=g), device, a.repeats)
    print(f"batched      {a.batch / batched:8.1f} images/s  ({batched * 1000:.0f} ms/batch wall, "
          f"{cpu * 1000:.0f} ms CPU time: {a.batch / cpu:.1f} images per CPU-second)")

    def loop():
        for i in range(a.batch):
            degrader(gt[i : i + 1], generator=g)

    looped, looped_cpu = timed(loop, device, max(1, a.repeats // 2))
    print(f"per-sample   {a.batch / looped:8.1f} images/s  (Python loop over the batch; batched is "
          f"{looped / batched:.1f}× faster in wall time, {looped_cpu / cpu:.1f}× in CPU time)")

    print("per op on the whole batch, ms (wall, CPU):")
    for name in degrader.chain:
        draws = Draws(gt.shape, g, device)
        seconds, op_cpu = timed(lambda name=name, draws=draws: degrader._op(name, gt, draws), device, a.repeats)
        print(f"  {name:9s} {seconds * 1000:7.1f} {op_cpu * 1000:7.1f}")

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            degrader(gt, generator=g)
            _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        print("a whole batch passed under torch.cuda.set_sync_debug_mode('error')")


if __name__ == "__main__":
    main()
