"""Does the tiny BIQA learn to name the degradation? Trains configs/tiny/biqa.yaml (the tiny CLIP
foundation's image tower fine-tuned, prompt scoring, fidelity loss + GT term), the same from a
random CLIP (`--random` adds it: what the foundation is worth), and a plain classifier of the same image tower
(linear head, cross-entropy, GTs as "no", no GT term) for the same steps on the same data, then
scores both on the held-out val shard: every val crop degraded with each synthetic type in turn
(single-type mode, several seeds) plus the clean crop as "no", so the classes are balanced.

    python bench/learn_biqa.py [--steps 3000] [--random] [--data data/sample] [--set key=value ...]

Needs `lit-restore prep-sample` shards in --data. Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from lit_restore.config import DegradeConfig, load_config
from lit_restore.data.datamodule import ShardDataModule
from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.types import SYNTHETIC_TYPES
from lit_restore.fit import fit
from lit_restore.stages.biqa import BIQAStage

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "biqa.yaml"


class PlainClassifier(BIQAStage):
    """The same image tower with a linear head instead of the prompt scores (the text tower is unused)."""

    def configure_model(self) -> None:
        if self.clip is not None:
            return
        super().configure_model()
        self.head = nn.Linear(self.clip.model.visual.output_dim, len(self.classes))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.clip.model.encode_image(self.clip.preprocess(images)))


@torch.no_grad()
def evaluate(stage: BIQAStage, cfg, seeds: int) -> dict[str, float]:
    """Accuracy per class and overall on the val shard, each crop once per type and seed, plus clean."""
    stage.eval()
    crops = torch.cat([b["gt"] for b in ShardDataModule(cfg.data, seed=cfg.seed).val_dataloader()]).float() / 255
    correct: dict[str, list[bool]] = {c: [] for c in stage.classes}
    for name in stage.classes:
        for seed in range(seeds if name != "no" else 1):
            if name == "no":
                images = crops
            else:
                degrader = Degrader(DegradeConfig(mode="single", types=[name]))
                images = degrader(crops, generator=torch.Generator().manual_seed(1000 + seed))[0]
            pred = stage.logits(images).argmax(-1)
            correct[name] += (pred == stage.classes.index(name)).tolist()
    acc = {c: sum(v) / len(v) for c, v in correct.items()}
    acc["mean"] = sum(acc[c] for c in stage.classes) / len(stage.classes)
    return acc


def run(stage_cls, overrides: list[str], args, out: Path) -> dict:
    cfg = load_config(CONFIG, [
        f"out_dir={out}", "logger=none", f"data.train={args.data}/train-{{000000..000003}}.tar",
        f"data.val={args.data}/val-000000.tar", "data.val_crop=64", "data.num_workers=1",
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"seed={args.seed}",
        *args.set, *overrides,  # a model's own overrides last: --set cannot give the plain head a GT term
    ])
    L.seed_everything(cfg.seed, verbose=False)
    stage = stage_cls(cfg)
    stage.configure_model()
    init = evaluate(stage, cfg, args.seeds)
    t0 = time.perf_counter()
    fit(cfg, stage=stage)
    seconds = time.perf_counter() - t0
    return {"init": init, "after": evaluate(stage, cfg, args.seeds), "seconds": seconds,
            "params": sum(p.numel() for p in stage.clip.model.visual.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--data", default="data/sample")
    p.add_argument("--seeds", type=int, default=2, help="degradation draws per val crop and type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for both runs")
    p.add_argument("--random", action="store_true", help="also train the prompt model from a random CLIP")
    args = p.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        raise SystemExit(f"no sample shards in {args.data}: run `lit-restore prep-sample --out {args.data}` first")
    torch.set_num_threads(1)  # on a shared 2-core machine two threads wait on each other
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "CLIP prompts (fidelity + GT term)": run(BIQAStage, [], args, Path(tmp) / "clip"),
            "plain classifier (linear head, CE)": run(PlainClassifier, ["model.loss=ce", "model.gt_weight=0"],
                                                      args, Path(tmp) / "plain"),
        }
        if args.random:  # the settings the random tiny BIQA was tuned with (docs/benchmarks.md)
            runs["CLIP prompts, random CLIP"] = run(BIQAStage, ["model.pretrained=''", "optim.lr=1e-3"], args,
                                                    Path(tmp) / "random")
    classes = list(next(iter(runs.values()))["after"])
    print(f"Held-out accuracy, {args.steps} steps, {len(SYNTHETIC_TYPES)} synthetic types + clean, "
          f"{args.seeds} draws per val crop and type:\n")
    print("| model | image tower params | train time | " + " | ".join(classes) + " |")
    print("|---|---|---|" + "---|" * len(classes))
    for name, r in runs.items():
        cells = " | ".join(f"{r['init'][c]:.2f} → **{r['after'][c]:.2f}**" if c == "mean" else f"{r['after'][c]:.2f}"
                           for c in classes)
        print(f"| {name} | {r['params'] / 1e3:.0f} k | {r['seconds'] / 60:.1f} min | {cells} |")


if __name__ == "__main__":
    main()
