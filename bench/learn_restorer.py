"""Does the tiny restorer learn, and does the ConStyle prior help? Trains configs/tiny/restorer.yaml
for the same restorer budget (steps, batch) as
- `constyle_frozen`: ConStyle-NAFNet with the encoder pretrained by the constyle stage
  (configs/tiny/constyle.yaml, `--pretrain-steps`, before the restorer budget) and then frozen: the
  method as IRConStyle / ConStyle v2 run it;
- `constyle_joint`: ConStyle-NAFNet with the encoder trained jointly from random (IRConStyle v1);
- `nafnet_same_width`: the plain NAFNet of the same restorer width (does the prior help the same net?);
- `nafnet`: a plain NAFNet of about the same total size, encoder included;
then scores each on the held-out val shard: every crop degraded by each synthetic type alone,
`--seeds` seeded draws per type, so each type weighs alike in the mean.

    python bench/learn_restorer.py [--steps 3000] [--pretrain-steps 1000] [--jobs 2] [--models ...] [--set key=value ...]
                                   [--encoder-set key=value ...]

Prints mean PSNR per degradation type of the degraded input, of each restorer before training
(step 0: the nets start as the identity, so this equals the input) and after, and the mean over
types; then the gain over the input per type and over types and the ConStyle-vs-plain delta, as
Markdown for docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from lit_restore.weights import read_weights
from lit_restore.config import DegradeConfig, load_config
from lit_restore.data.datamodule import ShardDataModule
from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.types import DEGRADATION_TYPES, SYNTHETIC_TYPES
from lit_restore.fit import build_stage, fit
from lit_restore.metrics import psnr
from lit_restore.models.constyle import build_encoder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "restorer.yaml"
CONSTYLE_CONFIG = ROOT / "configs" / "tiny" / "constyle.yaml"
# Plain NAFNet sized to the ConStyle-NAFNet of the tiny config (encoder included): ~0.75 M parameters.
PLAIN = ["model.arch=nafnet", "model.width=26", "model.enc_blocks=[1,1,1]", "model.middle_blocks=1",
         "model.dec_blocks=[1,1,1]"]
MODELS = {"constyle_frozen": ["model.constyle_mode=frozen"], "constyle_joint": ["model.constyle_mode=joint"],
          # The same restorer as nafnet_same_width, modulated by the frozen pretrained code alone.
          "constyle_code_frozen": ["model.constyle_mode=frozen", "model.constyle_condition=code"],
          "nafnet_same_width": ["model.arch=nafnet"], "nafnet": PLAIN}
FROZEN = ("constyle_frozen", "constyle_code_frozen")  # the models that need the pretrained encoder


def pretrain_constyle(args: argparse.Namespace, out: Path) -> Path:
    """The constyle stage's encoder pretraining on the same shards; returns its last checkpoint."""
    torch.set_num_threads(args.threads)
    cfg = load_config(CONSTYLE_CONFIG, [
        f"out_dir={out / 'constyle'}", "logger=none", f"data.train={args.data}/train-{{000000..000003}}.tar",
        f"data.val={args.data}/val-000000.tar", f"data.crop={args.crop}", f"trainer.max_steps={args.pretrain_steps}",
        f"trainer.val_check_interval={args.pretrain_steps}", f"checkpoint.every_n_steps={args.pretrain_steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"seed={args.seed}",
        *(f"model.{kv}" for kv in args.encoder_set)])
    L.seed_everything(cfg.seed, verbose=False)
    fit(cfg)
    return out / "constyle" / "checkpoints" / "last.ckpt"


@torch.no_grad()
def encoder_accuracy(ckpt: Path, args: argparse.Namespace) -> dict[str, float]:
    """The pretrained encoder's degradation-type accuracy on each held-out set (its classifier head,
    ConStyle v2's pretext task): how well its code can tell the restorer what it faces."""
    cfg = load_config(CONFIG, [f"data.val={args.data}/val-000000.tar", "data.val_crop=128", f"seed={args.seed}"])
    encoder = build_encoder(load_config(CONSTYLE_CONFIG, [f"model.{kv}" for kv in args.encoder_set]).model).eval()
    prefix = "moco.encoder_q."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in read_weights(ckpt).items() if k.startswith(prefix)})
    _, sets = degraded_sets(cfg, args.seeds)
    return {name: (encoder(x).logits.argmax(1) == DEGRADATION_TYPES.index(name)).float().mean().item()
            for name, x in sets.items()}


def degraded_sets(cfg, seeds: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The val shard's clean crops and, per synthetic type, every crop degraded by that type alone
    once per seed (seeded, so both models and every run see the same inputs)."""
    crops = torch.cat([b["gt"] for b in ShardDataModule(cfg.data, seed=cfg.seed).val_dataloader()]).float() / 255
    sets = {}
    for name in SYNTHETIC_TYPES:
        degrader = Degrader(DegradeConfig(mode="single", types=[name]))
        sets[name] = torch.cat([degrader(crops, generator=torch.Generator().manual_seed(1000 + s))[0]
                                for s in range(seeds)])
    return crops, sets


@torch.no_grad()
def score(stage, crops: Tensor, sets: dict[str, Tensor], batch: int = 8) -> dict[str, Tensor]:
    """Per type: PSNR (N,) of the restorer's 8-bit outputs against the clean crops."""
    net = stage.export_modules()["restorer"]
    was_training = stage.training
    stage.eval()
    out = {}
    for name, lq in sets.items():
        gt = crops.repeat(len(lq) // len(crops), 1, 1, 1)
        # 8-bit output, as the degraded input (the Degrader quantises) and as `evaluate` scores.
        pred = torch.cat([net(x).clamp(0, 1).mul(255).round().div(255) for x in lq.split(batch)])
        out[name] = psnr(pred, gt)
    stage.train(was_training)
    return out


def run(name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, [
        f"out_dir={out / name}", "logger=none", f"data.train={args.data}/train-{{000000..000003}}.tar",
        f"data.val={args.data}/val-000000.tar", f"data.crop={args.crop}", "data.val_crop=128",
        f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"seed={args.seed}",
        *overrides, *args.set, *(f"model.constyle.{kv}" for kv in args.encoder_set),
    ])
    L.seed_everything(cfg.seed, verbose=False)
    stage = build_stage(cfg)
    stage.configure_model()
    crops, sets = degraded_sets(cfg, args.seeds)
    at_init = score(stage, crops, sets)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    fit(cfg, stage=stage)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n_params = sum(p.numel() for p in stage.export_modules()["restorer"].parameters())
    return {"input": {t: psnr(x, crops.repeat(args.seeds, 1, 1, 1)) for t, x in sets.items()}, "init": at_init,
            "after": score(stage, crops, sets), "seconds": seconds, "cpu": cpu, "params": n_params}


def type_means(scores: dict[str, Tensor]) -> list[float]:
    """Mean PSNR per type, then their mean (each type weighs alike, whatever its input PSNR)."""
    means = [v.mean().item() for v in scores.values()]
    return means + [sum(means) / len(means)]


def row(label: str, scores: dict[str, Tensor], extra: str = " | ") -> str:
    return f"| {label} |{extra}| " + " | ".join(f"{v:.2f}" for v in type_means(scores)) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2, help="degradation draws per val crop and type")
    # One thread: on a loaded machine two OpenMP threads wait on each other (5-10x slower steps).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training process")
    p.add_argument("--jobs", type=int, default=1, help="models trained at the same time, one process each")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--pretrain-steps", type=int, default=1000, help="constyle stage steps before constyle_frozen")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    p.add_argument("--encoder-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ConStyle encoder settings (e.g. base_channels=16), for its pretraining and every restorer's encoder")
    p.add_argument("--data", default=str(ROOT / "data" / "sample"), help="`lit-restore prep-sample` output")
    args = p.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        from data_prep.sample import prep_sample

        prep_sample(args.data, crop=128, train_crops=64, val_crops=4, seed=0, overwrite=False)

    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        models = {name: list(MODELS[name]) for name in args.models}
        if any(name in models for name in FROZEN):
            t0 = time.perf_counter()
            encoder = pool.submit(pretrain_constyle, args, Path(tmp)).result()
            print(f"constyle pretraining: {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
            accuracy = encoder_accuracy(encoder, args)
            print("pretrained encoder, degradation-type accuracy on the held-out sets: "
                  + ", ".join(f"{t} {a:.2f}" for t, a in accuracy.items())
                  + f"; mean {sum(accuracy.values()) / len(accuracy):.2f}", flush=True)
            for name in FROZEN:
                if name in models:
                    models[name].append(f"model.constyle_weights={encoder}")
        futures = {pool.submit(run, name, overrides, args, Path(tmp)): name for name, overrides in models.items()}
        done = {}
        for future in as_completed(futures):
            # Each model's figure as it lands, so a long run that dies later keeps what it measured.
            name, r = futures[future], future.result()
            done[name] = r
            gain = type_means({t: r["after"][t] - r["input"][t] for t in r["input"]})[-1]
            print(f"{name}: {type_means(r['after'])[-1]:.2f} dB mean over types ({gain:+.2f} over the input), "
                  f"{r['seconds']:.0f} s", flush=True)
        results = {name: done[name] for name in models}

    inputs = next(iter(results.values()))["input"]
    n = len(next(iter(inputs.values())))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.steps} steps, batch {args.batch}, crop {args.crop}, {args.threads} torch thread(s) per model, "
          f"{args.jobs} model(s) at a time, {os.cpu_count()} CPU cores, load average at the end {load}; "
          f"overrides {args.set or 'none'}, encoder {args.encoder_set or 'as configured'}; held-out val shard: each 128 px crop degraded by each type alone, "
          f"{args.seeds} seeded draw(s), n = {n} per type\n")
    print("| model | params | train wall / CPU | " + " | ".join(inputs) + " | mean over types |")
    print("|---|---|---|" + "---|" * (len(inputs) + 1))
    print(row("degraded input", inputs))
    for name, r in results.items():
        print(row(f"{name}, step 0", r["init"]))
        print(row(f"{name}, step {args.steps}", r["after"],
                  f" {r['params'] / 1e6:.2f} M | {r['seconds']:.0f} s / {r['cpu']:.0f} s "))
    print()
    for name, r in results.items():
        gains = {t: r["after"][t] - inputs[t] for t in inputs}
        flat = torch.cat(list(gains.values()))
        print(f"{name}: gain over the input, mean over types {type_means(gains)[-1]:+.2f} dB ("
              + ", ".join(f"{t} {g.mean().item():+.2f}" for t, g in gains.items())
              + f"); median per image {flat.median().item():+.2f} dB, {(flat > 0).sum().item()}/{len(flat)} improved")
    means = {name: type_means(r["after"])[-1] for name, r in results.items()}
    for constyle in ("constyle_frozen", "constyle_code_frozen", "constyle_joint"):
        for plain, what in (("nafnet_same_width", "the same restorer width"), ("nafnet", "about equal total parameters")):
            if constyle in means and plain in means:
                print(f"{constyle} - {plain} = {means[constyle] - means[plain]:+.2f} dB (mean over types), "
                      f"{what}, equal restorer steps")


if __name__ == "__main__":
    main()
