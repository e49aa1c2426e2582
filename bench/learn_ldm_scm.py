"""Do the tiny LDM and SCM learn? Trains configs/tiny/ldm.yaml, then configs/tiny/scm.yaml on that
LDM's checkpoint, for a few CPU minutes each on the `lit-restore prep-sample` shards.

    python bench/learn_ldm_scm.py [--ldm-steps 600] [--scm-steps 300] [--data data/sample]

Prints, as Markdown for docs/benchmarks.md: the LDM's training loss, mean of the first vs the last
20 % of steps; the SCM's held-out PSNR against the PSNR of the LDM output it corrects (the same
one-step LDM outputs, deterministic per val batch) and of the degraded input. The tiny VAE is
random, not trained, so the LDM output is poor: the SCM figure shows the correction learning,
not the tiny LDM's quality.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lit_restore.config import load_config
from lit_restore.data.datamodule import ShardDataModule
from lit_restore.fit import build_stage, fit
from lit_restore.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]


def common(args, out: Path, steps: int) -> list[str]:
    return [f"out_dir={out}", "logger=csv", "trainer.log_every_n_steps=1", f"data.train={args.data}/train-{{000000..000003}}.tar",
            f"data.val={args.data}/val-000000.tar", "data.val_crop=64", "data.num_workers=1",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"seed={args.seed}"]


def train(config: str, overrides: list[str]) -> tuple[object, list[float], float]:
    """The trained stage, its per-step training losses (from the CSV log) and the wall time."""
    cfg = load_config(ROOT / "configs" / "tiny" / config, overrides)
    L.seed_everything(cfg.seed, verbose=False)
    stage = build_stage(cfg)
    t0 = time.perf_counter()
    fit(cfg, stage=stage)
    seconds = time.perf_counter() - t0
    with open(next((Path(cfg.out_dir) / "logs").glob("version_*/metrics.csv"))) as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    return stage, losses, seconds


@torch.no_grad()
def score_scm(stage) -> dict[str, float]:
    """Mean per-image PSNR over the val shard of the input, the LDM output and the SCM output."""
    stage.eval()
    values: dict[str, list[float]] = {"input": [], "ldm": [], "scm": []}
    for i, host in enumerate(ShardDataModule(stage.cfg.data, seed=stage.cfg.seed).val_dataloader()):
        batch = stage.on_after_batch_transfer(host)
        # Padding samples and the few draws that leave a crop unchanged (infinite input PSNR) are left out.
        keep = batch["valid"] & (batch["lq"] != batch["gt"]).flatten(1).any(1)
        ldm_out = stage.ldm_output(batch, torch.Generator().manual_seed(i))
        out = stage.scm(batch["lq"], ldm_out).clamp(0, 1)
        for name, x in (("input", batch["lq"]), ("ldm", ldm_out), ("scm", out)):
            values[name] += psnr(x[keep], batch["gt"][keep]).tolist()
    return {k: statistics.mean(v) for k, v in values.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ldm-steps", type=int, default=600)
    p.add_argument("--scm-steps", type=int, default=300)
    p.add_argument("--data", default="data/sample")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        raise SystemExit(f"no sample shards in {args.data}: run `lit-restore prep-sample --out {args.data}` first")
    torch.set_num_threads(1)  # on a shared 2-core machine two threads wait on each other
    with tempfile.TemporaryDirectory() as tmp:
        ldm_dir = Path(tmp) / "ldm"
        _, ldm_losses, ldm_s = train("ldm.yaml", common(args, ldm_dir, args.ldm_steps))
        ckpt = ldm_dir / "checkpoints" / "last.ckpt"
        scm, scm_losses, scm_s = train("scm.yaml", [*common(args, Path(tmp) / "scm", args.scm_steps),
                                                   f"model.ldm_checkpoint={ckpt}"])
        scores = score_scm(scm)
    n = max(1, len(ldm_losses) // 5)
    first, last = statistics.mean(ldm_losses[:n]), statistics.mean(ldm_losses[-n:])
    m = max(1, len(scm_losses) // 5)
    print(f"LDM: {args.ldm_steps} steps in {ldm_s / 60:.1f} min; SCM: {args.scm_steps} steps in {scm_s / 60:.1f} min\n")
    print("| figure | first 20 % of steps | last 20 % of steps |")
    print("|---|---|---|")
    print(f"| LDM training loss (ε-MSE) | {first:.4f} | **{last:.4f}** |")
    print(f"| SCM training loss (MSE) | {statistics.mean(scm_losses[:m]):.4f} | "
          f"**{statistics.mean(scm_losses[-m:]):.4f}** |\n")
    print("| held-out PSNR (dB) | degraded input | LDM output (one-step x0) | SCM-corrected |")
    print("|---|---|---|---|")
    print(f"| val shard | {scores['input']:.2f} | {scores['ldm']:.2f} | **{scores['scm']:.2f}** |")


if __name__ == "__main__":
    main()
