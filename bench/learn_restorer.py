"""Does the tiny restorer learn? Trains configs/tiny/restorer.yaml for a few CPU minutes twice —
ConStyle-NAFNet (joint ConStyle training) and a plain NAFNet of about the same size, same steps —
then scores both on the held-out val shard with its deterministic validation degradations.

    python bench/learn_restorer.py [--steps 200] [--crop 48] [--data data/sample]

Prints PSNR of the degraded input and of each restorer (overall and per degradation type), the
gain over the input and the ConStyle-vs-plain delta, as Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from lit_restore.config import load_config
from lit_restore.data.datamodule import ShardDataModule
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.fit import fit
from lit_restore.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "restorer.yaml"
# Plain NAFNet sized to the ConStyle-NAFNet of the tiny config (encoder included): ~0.75 M parameters.
PLAIN = ["model.arch=nafnet", "model.width=26", "model.enc_blocks=[1,1,1]", "model.middle_blocks=1",
         "model.dec_blocks=[1,1,1]"]


def train(name: str, overrides: list[str], args: argparse.Namespace, out: Path):
    cfg = load_config(CONFIG, [
        f"out_dir={out / name}", "logger=none", f"data.train={args.data}/train-{{000000..000003}}.tar",
        f"data.val={args.data}/val-000000.tar", f"data.crop={args.crop}", "data.val_crop=128",
        f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"seed={args.seed}", *overrides,
    ])
    t0 = time.perf_counter()
    trainer = fit(cfg)
    seconds = time.perf_counter() - t0
    stage = trainer.lightning_module
    n_params = sum(p.numel() for p in stage.export_modules()["restorer"].parameters())
    return cfg, stage, seconds, n_params


@torch.no_grad()
def score(cfg, stage) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-type PSNR lists of the degraded inputs and of the restored outputs on the val shard."""
    net = stage.export_modules()["restorer"].eval()
    stage.eval()
    loader = ShardDataModule(cfg.data, seed=cfg.seed).val_dataloader()
    before, after = defaultdict(list), defaultdict(list)
    for host in loader:
        batch = stage.on_after_batch_transfer(host)
        keep = batch["valid"]
        lq, gt, label = batch["lq"][keep], batch["gt"][keep], batch["label"][keep]
        pred = net(lq).clamp(0, 1)
        for name, values in (("before", psnr(lq, gt)), ("after", psnr(pred, gt))):
            bucket = before if name == "before" else after
            for t, v in zip(label.tolist(), values.tolist()):
                bucket[DEGRADATION_TYPES[t]].append(v)
                bucket["all"].append(v)
    return before, after


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(ROOT / "data" / "sample"), help="`lit-restore prep-sample` output")
    args = p.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        from data_prep.sample import prep_sample

        prep_sample(args.data, crop=128, train_crops=64, val_crops=4, seed=0, overwrite=False)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("constyle_nafnet", []), ("nafnet", PLAIN)):
            cfg, stage, seconds, n_params = train(name, overrides, args, Path(tmp))
            before, after = score(cfg, stage)
            results[name] = (before, after, seconds, n_params)

    before = results["constyle_nafnet"][0]
    types = ["all"] + [t for t in DEGRADATION_TYPES if t in before]
    print(f"\n{args.steps} steps, batch {args.batch}, crop {args.crop}, {torch.get_num_threads()} CPU threads; "
          f"held-out val shard ({len(before['all'])} images, 128 px, deterministic degradations)\n")
    print("| model | params | train time | " + " | ".join(f"{t} (n={len(before[t])})" for t in types) + " |")
    print("|---|---|---|" + "---|" * len(types))
    print("| degraded input | | | " + " | ".join(f"{mean(before[t]):.2f}" for t in types) + " |")
    for name, (_, after, seconds, n_params) in results.items():
        print(f"| {name} | {n_params / 1e6:.2f} M | {seconds:.0f} s | "
              + " | ".join(f"{mean(after[t]):.2f}" for t in types) + " |")
    gains = {name: mean(r[1]["all"]) - mean(before["all"]) for name, r in results.items()}
    print(f"\nPSNR gain over the input: ConStyle-NAFNet {gains['constyle_nafnet']:+.2f} dB, "
          f"NAFNet {gains['nafnet']:+.2f} dB; ConStyle-NAFNet - NAFNet = "
          f"{gains['constyle_nafnet'] - gains['nafnet']:+.2f} dB")


if __name__ == "__main__":
    main()
