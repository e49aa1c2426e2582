"""CPU threads before/after: the same short `lit-restore fit` with torch's default threads (one
per core, plus the loader worker) and with the threads `lit_restore.threads` chooses, in both
orders (A B B A) so a change in the machine's load shows as a difference between the repeats.

    python bench/threads.py [--steps 40] [--config configs/tiny/restorer.yaml]

Prints the wall time of each run and the ratio, as Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_restore.threads import cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def timed_fit(config: str, steps: int, threads: int, data: Path, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "lit_restore.cli", "fit", config, f"out_dir={out}", "resume=never", "logger=none",
           f"data.train={data}/train-{{000000..000003}}.tar", f"data.val={data}/val-000000.tar",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", f"threads={threads}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--config", default="configs/tiny/restorer.yaml")
    args = p.parse_args()
    default = torch.get_num_threads()  # what torch starts with in a fresh process
    chosen = cpu_threads(1, loader_workers=1)  # the tiny configs' one loader worker
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        from data_prep.sample import prep_sample

        prep_sample(str(data), crop=128, train_crops=32, val_crops=4, seed=0, overwrite=False)
        times: dict[str, list[float]] = {"default": [], "chosen": []}
        for i, name in enumerate(("default", "chosen", "chosen", "default")):
            n = default if name == "default" else chosen
            times[name].append(timed_fit(args.config, args.steps, n, data, Path(tmp) / f"run{i}"))
    cores = len(os.sched_getaffinity(0))
    print(f"`fit {args.config}`, {args.steps} steps, {cores} cores, 1 loader worker, runs in the order A B B A:\n")
    print("| threads | run 1 | run 2 |")
    print("|---|---|---|")
    for name, label in (("default", f"torch default ({default})"), ("chosen", f"lit_restore ({chosen})")):
        print(f"| {label} | " + " | ".join(f"{t:.1f} s" for t in times[name]) + " |")
    ratio = sum(times["default"]) / sum(times["chosen"])
    print(f"\ndefault / chosen = {ratio:.2f}x (whole command: start-up, loader, 1 validation batch included)")


if __name__ == "__main__":
    main()
