"""Degradation engine throughput: the mixed chain and single mode on a 16×3×256×256 batch.

Prints images/s of the Degrader in `mixed` (the default chain) and `single` mode and, when
BasicSR is installed, of BasicSR's Real-ESRGAN first-order chain (the anchor), timed in
interleaved rounds so a busy machine slows all of them alike; then the mixed chain run one sample
at a time in a Python loop (the ratio is what batching buys) and each op on the whole batch. On
a GPU it also runs a batch under `torch.cuda.set_sync_debug_mode("error")`.

    OMP_WAIT_POLICY=PASSIVE python bench/degrade.py   # CPU, 2 threads (the CI machine)
    python bench/degrade.py --device cuda              # when a GPU is present
    pip install --no-deps basicsr==1.4.2               # adds the anchor (its chain only is imported)
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lit_restore.config import DegradeConfig
from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.op import Draws


def cpu_model() -> str:
    """The CPU's model name (Linux), so a figure says which host gave it: the Degrader's ratio to
    BasicSR moved from ~4.9× to ~8× between two hosts with the same code (docs/benchmarks.md)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (this process, all threads) of each of `repeats` calls of
    `fn()` after one warm-up call. On a shared machine the CPU time is the steadier figure: it
    does not count the time other processes held the cores."""
    fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def basicsr_chain(device: torch.device) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """BasicSR's Real-ESRGAN first-order degradation (its options file's numbers: the dataset's
    per-sample random kernels with 10 % sinc, up/down/keep resize, Gaussian or Poisson noise,
    DiffJPEG q 30-95), built from BasicSR's own functions; None when BasicSR is not installed."""
    try:
        import basicsr  # noqa: F401  (only to find it; its __init__ imports its training code)
    except ImportError:
        pass
    found = [Path(p) / "basicsr" for p in sys.path if (Path(p) / "basicsr" / "data" / "degradations.py").is_file()]
    if not found:
        return None
    # Its chain's modules without basicsr/__init__ (which needs its training dependencies), and
    # the torchvision module it imports under the name torchvision used before 0.17.
    import torchvision.transforms._functional_tensor as functional_tensor

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)
    for name, folder in (("basicsr", found[0]), ("basicsr.utils", found[0] / "utils"), ("basicsr.data", found[0] / "data")):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module
    from basicsr.data.degradations import (circular_lowpass_kernel, random_add_gaussian_noise_pt,
                                           random_add_poisson_noise_pt, random_mixed_kernels)
    from basicsr.utils.diffjpeg import DiffJPEG
    from basicsr.utils.img_process_util import filter2D

    jpeger = DiffJPEG(differentiable=False).to(device)
    kinds = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    kind_probs = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]

    def kernel() -> torch.Tensor:
        size = random.choice(range(7, 22, 2))
        if np.random.uniform() < 0.1:
            k = circular_lowpass_kernel(np.random.uniform(np.pi / 3 if size < 13 else np.pi / 5, np.pi), size, pad_to=False)
        else:
            k = random_mixed_kernels(kinds, kind_probs, size, [0.2, 3], [0.2, 3], [-math.pi, math.pi], [0.5, 4], [1, 2],
                                     noise_range=None)
        pad = (21 - size) // 2
        return torch.from_numpy(np.pad(k, ((pad, pad), (pad, pad)))).float()

    def chain(gt: torch.Tensor) -> torch.Tensor:
        out = filter2D(gt, torch.stack([kernel() for _ in range(gt.shape[0])]).to(device))
        updown = random.choices(["up", "down", "keep"], [0.2, 0.7, 0.1])[0]
        scale = np.random.uniform(1, 1.5) if updown == "up" else np.random.uniform(0.15, 1) if updown == "down" else 1
        out = F.interpolate(out, scale_factor=scale, mode=random.choice(["area", "bilinear", "bicubic"]))
        if np.random.uniform() < 0.5:
            out = random_add_gaussian_noise_pt(out, sigma_range=[1, 30], clip=True, rounds=False, gray_prob=0.4)
        else:
            out = random_add_poisson_noise_pt(out, scale_range=[0.05, 3], gray_prob=0.4, clip=True, rounds=False)
        return jpeger(out.clamp(0, 1), quality=out.new_zeros(out.shape[0]).uniform_(30, 95))

    return chain


def interleaved(runs: dict[str, Callable[[], object]], device: torch.device, rounds: int, repeats: int
                ) -> dict[str, tuple[float, float]]:
    """Mean wall and CPU seconds per call of each run over `rounds` rounds that take each run in
    turn: throughput is images over total time, and a chain whose cost varies from call to call
    (BasicSR's, whose resize sometimes enlarges the image the later ops see) is not represented
    by its median call."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            w, c = timed(fn, device, repeats)
            wall[name] += w
            cpu[name] += c
    return {name: (statistics.fmean(wall[name]), statistics.fmean(cpu[name])) for name in runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=8, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the mode comparison")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # BasicSR's chain draws from the global generators: the same sequence of draws every run.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    gt = torch.rand(a.batch, 3, a.size, a.size, generator=g, device=device)
    gt = gt.mul(255).round().div(255)
    degrader = Degrader(DegradeConfig(mode="mixed"))
    single = Degrader(DegradeConfig(mode="single"))
    print(f"device {device} ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}), "
          f"threads {torch.get_num_threads()}, batch {a.batch}×3×{a.size}×{a.size}, "
          f"chain {'→'.join(degrader.chain)}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}")

    # A new sizing of the sub-batches each call, as in training.
    calls = iter(range(10**9))
    runs = {"mixed": lambda: degrader(gt, generator=g, counts_seed=next(calls)),
            "single": lambda: single(gt, generator=g, counts_seed=next(calls))}
    anchor = basicsr_chain(device)
    if anchor is not None:
        runs["BasicSR"] = lambda: anchor(gt)
    times = interleaved(runs, device, a.rounds, a.repeats)
    for name, (wall, cpu) in times.items():
        print(f"{name:12s} {a.batch / wall:8.1f} images/s  ({wall * 1000:.0f} ms/batch wall, "
              f"{cpu * 1000:.0f} ms CPU time: {a.batch / cpu:.1f} images per CPU-second)")
    if anchor is None:
        print("BasicSR's chain (the anchor) not measured: pip install --no-deps basicsr==1.4.2")
    else:
        for name in ("mixed", "single"):
            print(f"{name} / BasicSR: {times['BasicSR'][0] / times[name][0]:.2f}× in wall time, "
                  f"{times['BasicSR'][1] / times[name][1]:.2f}× in CPU time")
    batched, cpu = times["mixed"]

    def loop():
        for i in range(a.batch):
            degrader(gt[i : i + 1], generator=g)

    looped, looped_cpu = map(statistics.fmean, timed(loop, device, max(1, a.repeats // 2)))
    print(f"per-sample   {a.batch / looped:8.1f} images/s  (Python loop over the batch; batched is "
          f"{looped / batched:.1f}× faster in wall time, {looped_cpu / cpu:.1f}× in CPU time)")

    print("per op on the whole batch, ms (wall, CPU):")
    for name in degrader.chain:
        draws = Draws(gt.shape, g, device)
        seconds, op_cpu = map(statistics.median, timed(lambda name=name, draws=draws: degrader._op(name, gt, draws),
                                                      device, a.repeats))
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
