"""Does the tiny restorer learn? Trains configs/tiny/restorer.yaml for a few CPU minutes twice —
ConStyle-NAFNet (joint ConStyle training) and a plain NAFNet of about the same size, same steps —
then scores both on the held-out val shard with its deterministic validation degradations.

    python bench/learn_restorer.py [--steps 1000] [--jobs 2] [--crop 48] [--data data/sample] [--set key=value ...]

Prints PSNR of the degraded input, of each restorer before training (step 0: the nets start as
the identity, so this equals the input) and after, overall and per degradation type, the gain
over the input and the ConStyle-vs-plain delta, as Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import torch

from lit_restore.config import load_config
from lit_restore.data.datamodule import ShardDataModule
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.fit import build_stage, fit
from lit_restore.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "restorer.yaml"
# Plain NAFNet sized to the ConStyle-NAFNet of the tiny config (encoder included): ~0.75 M parameters.
PLAIN = ["model.arch=nafnet", "model.width=26", "model.enc_blocks=[1,1,1]", "model.middle_blocks=1",
         "model.dec_blocks=[1,1,1]"]
MODELS = {"constyle_nafnet": [], "nafnet": PLAIN}


@torch.no_grad()
def score(cfg, stage) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-type PSNR lists of the degraded inputs and of the restored outputs on the val shard."""
    net = stage.export_modules()["restorer"]
    was_training = stage.training
    stage.eval()
    loader = ShardDataModule(cfg.data, seed=cfg.seed).val_dataloader()
    before, after = defaultdict(list), defaultdict(list)
    for host in loader:
        batch = stage.on_after_batch_transfer(host)
        keep = batch["valid"]
        lq, gt, label = batch["lq"][keep], batch["gt"][keep], batch["label"][keep]
        # 8-bit output, as the degraded input (the Degrader quantises) and as `evaluate` scores.
        pred = net(lq).clamp(0, 1).mul(255).round().div(255)
        for bucket, values in ((before, psnr(lq, gt)), (after, psnr(pred, gt))):
            for t, v in zip(label.tolist(), values.tolist()):
                bucket[DEGRADATION_TYPES[t]].append(v)
                bucket["all"].append(v)
    stage.train(was_training)
    return before, after


def run(name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, [
        f"out_dir={out / name}", "logger=none", f"data.train={args.data}/train-{{000000..000003}}.tar",
        f"data.val={args.data}/val-000000.tar", f"data.crop={args.crop}", "data.val_crop=128",
        f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"seed={args.seed}",
        *overrides, *args.set,
    ])
    L.seed_everything(cfg.seed, verbose=False)
    stage = build_stage(cfg)
    stage.configure_model()
    _, at_init = score(cfg, stage)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    fit(cfg, stage=stage)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    before, after = score(cfg, stage)
    n_params = sum(p.numel() for p in stage.export_modules()["restorer"].parameters())
    return {"before": before, "init": at_init, "after": after, "seconds": seconds, "cpu": cpu, "params": n_params}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    # One thread: on a loaded machine two OpenMP threads wait on each other (5-10x slower steps).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training process")
    p.add_argument("--jobs", type=int, default=1, help="models trained at the same time, one process each")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    p.add_argument("--data", default=str(ROOT / "data" / "sample"), help="`lit-restore prep-sample` output")
    args = p.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        from data_prep.sample import prep_sample

        prep_sample(args.data, crop=128, train_crops=64, val_crops=4, seed=0, overwrite=False)

    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(run, name, MODELS[name], args, Path(tmp)) for name in args.models}
        results = {name: f.result() for name, f in futures.items()}

    before = next(iter(results.values()))["before"]
    types = ["all"] + [t for t in DEGRADATION_TYPES if t in before]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.steps} steps, batch {args.batch}, crop {args.crop}, {args.threads} torch thread(s) per model, "
          f"{args.jobs} model(s) at a time, "
          f"{os.cpu_count()} CPU cores, load average at the end {load}; overrides {args.set or 'none'}; "
          f"held-out val shard ({len(before['all'])} images, 128 px, deterministic degradations)\n")
    print("| model | params | train wall / CPU | " + " | ".join(f"{t} (n={len(before[t])})" for t in types) + " |")
    print("|---|---|---|" + "---|" * len(types))
    print("| degraded input | | | " + " | ".join(f"{mean(before[t]):.2f}" for t in types) + " |")
    for name, r in results.items():
        print(f"| {name}, step 0 | | | " + " | ".join(f"{mean(r['init'][t]):.2f}" for t in types) + " |")
        print(f"| {name}, step {args.steps} | {r['params'] / 1e6:.2f} M | {r['seconds']:.0f} s / {r['cpu']:.0f} s | "
              + " | ".join(f"{mean(r['after'][t]):.2f}" for t in types) + " |")
    print()
    for name, r in results.items():
        gains = [a - b for a, b in zip(r["after"]["all"], before["all"])]
        print(f"{name}: mean PSNR gain over the input {mean(gains):+.2f} dB (median per image "
              f"{statistics.median(gains):+.2f} dB, {sum(g > 0 for g in gains)}/{len(gains)} images improved)")
    if len(results) == 2:
        a, b = (mean(r["after"]["all"]) for r in results.values())
        print(f"ConStyle-NAFNet - NAFNet = {a - b:+.2f} dB at equal parameters and steps")


if __name__ == "__main__":
    main()
