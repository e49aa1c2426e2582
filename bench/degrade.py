"""Degradation engine throughput: the default mixed chain on a 16×3×256×256 batch.

Prints images/s of the batched Degrader, of the same ops run one sample at a time in a Python
loop (the ratio is what batching buys), and the time of each op on the whole batch. On a GPU it
also runs a batch under `torch.cuda.set_sync_debug_mode("error")`.

    python bench/degrade.py                 # CPU, 2 threads (the CI machine)
    python bench/degrade.py --device cuda   # when a GPU is present
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lit_restore.config import DegradeConfig
from lit_restore.data.degrade import Degrader
from lit_restore.data.degrade.composer import _Draw


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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

    batched = timed(lambda: degrader(gt, generator=g), device, a.repeats)
    cpu_start = time.process_time()
    degrader(gt, generator=g)
    cpu = time.process_time() - cpu_start
    print(f"batched      {a.batch / batched:8.1f} images/s  ({batched * 1000:.0f} ms/batch, "
          f"{cpu * 1000:.0f} ms CPU time)")

    def loop():
        for i in range(a.batch):
            degrader(gt[i : i + 1], generator=g)

    looped = timed(loop, device, max(1, a.repeats // 2))
    print(f"per-sample   {a.batch / looped:8.1f} images/s  (Python loop over the batch; batched is "
          f"{looped / batched:.1f}× faster)")

    print("per op on the whole batch (ms):")
    for name in degrader.chain:
        draw = _Draw(a.batch, g, device)
        seconds = timed(lambda: degrader._op(name, gt, draw, None, None), device, a.repeats)
        print(f"  {name:9s} {seconds * 1000:7.1f}")

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
