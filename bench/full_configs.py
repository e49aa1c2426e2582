"""Do the full (cluster) configs build and train when the weights are given? Random weights in the
real layouts stand in for the pretrained ones, in a temporary folder: an open_clip state dict of
the BIQA arch (ViT-L-14-quickgelu), a diffusers SD-1.5 folder (unet/, vae/, scheduler/), the
constyle stage's export and the ldm stage's checkpoint. Each configs/<stage>.yaml is built from
them through key=value overrides, as an offline user would, and runs one training step (forward
and backward) on CPU on random images.

    python bench/full_configs.py [--size 64] [--batch 2] [--work DIR]

Every step runs in its own process with one torch thread, so its peak RSS is its own. Prints a
Markdown table for docs/benchmarks.md. Needs ~13 GB of disk in the temporary folder and ~11 GB of
RAM (the SCM step holds the ldm checkpoint while it builds the frozen LDM). The optimizer update
is left out: AdamW's two moments of the SD-1.5 UNet would add 6.9 GB to the LDM step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the published SD-1.5 configs the tests use

from _sd15 import write_sd15  # noqa: E402
from lit_restore.config import load_config, to_dict  # noqa: E402
from lit_restore.export import export_command  # noqa: E402
from lit_restore.fit import build_stage, parameter_counts  # noqa: E402
from lit_restore.models.clip import create_clip  # noqa: E402

STEPS = ("write-clip", "write-sd15", "biqa", "constyle", "restorer", "ldm", "scm")


def paths(work: Path) -> dict[str, Path]:
    return {"clip": work / "open_clip_pytorch_model.bin", "sd15": work / "sd15", "constyle": work / "weights" / "constyle",
            "ldm": work / "ldm.ckpt"}


def overrides(stage: str, work: Path) -> list[str]:
    """Where each full config gets its weights from: the files written by the earlier steps."""
    p = paths(work)
    return {
        "biqa": [f"model.pretrained={p['clip']}"],
        "constyle": [],
        "restorer": [f"model.constyle_weights={p['constyle']}"],
        "ldm": [f"model.pretrained={p['sd15']}", f"model.clip.pretrained={p['clip']}"],
        "scm": [f"model.ldm.pretrained={p['sd15']}", f"model.ldm_checkpoint={p['ldm']}"],
    }[stage]


def same(module_tensor: torch.Tensor, file_tensor: torch.Tensor) -> bool:
    return torch.equal(module_tensor.detach(), file_tensor.to(module_tensor.dtype))


def weights_from_files(stage, work: Path) -> bool | None:
    """Whether a tensor of each given weight file sits unchanged in the built stage (None: the
    stage starts from scratch)."""
    p = paths(work)
    name = stage.cfg.stage
    if name == "biqa":
        state = torch.load(p["clip"], map_location="cpu", mmap=True, weights_only=True)
        return same(stage.clip.model.visual.conv1.weight, state["visual.conv1.weight"])
    if name == "restorer":
        state = load_file(str(p["constyle"] / "model.safetensors"))
        return same(stage.net.encoder.stage1[0][0].weight, state["encoder.stage1.0.0.weight"])
    if name == "ldm":
        with safe_open(str(p["sd15"] / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            unet_ok = same(stage.ldm.unet.conv_in.weight[:, :4], f.get_tensor("conv_in.weight"))
        with safe_open(str(p["sd15"] / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            return unet_ok and same(stage.ldm.vae.decoder.conv_out.weight, f.get_tensor("decoder.conv_out.weight"))
    if name == "scm":
        state = torch.load(p["ldm"], map_location="cpu", mmap=True, weights_only=False)["state_dict"]
        return same(stage.frozen.ldm.unet.conv_in.weight, state["ema.module.conv_in.weight"])
    return None


def save_checkpoint(stage, path: Path) -> None:
    """A checkpoint as the stage's run writes it (state dict and config; no optimizer state)."""
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": {"config": to_dict(stage.cfg)}, "global_step": 1}, path)


def write_weights(step: str, work: Path) -> dict:
    p = paths(work)
    if step == "write-clip":
        arch = load_config(ROOT / "configs/biqa.yaml").model.arch
        torch.save(create_clip(arch, "").state_dict(), p["clip"])
        return {"files": f"{p['clip'].stat().st_size / 1e9:.2f} GB"}
    write_sd15(p["sd15"], weights=True)
    size = sum(f.stat().st_size for f in p["sd15"].rglob("*") if f.is_file())
    return {"files": f"{size / 1e9:.2f} GB"}


def train_step(name: str, work: Path, size: int, batch: int) -> dict:
    cfg = load_config(ROOT / f"configs/{name}.yaml", overrides(name, work))
    start = time.perf_counter()
    stage = build_stage(cfg)
    stage.configure_model()
    if name != "constyle":  # constyle's setup only checks its queue against the trainer's world size
        stage.setup("fit")  # loads the weights the stage takes from files (restorer, ldm, scm)
    build_s = time.perf_counter() - start
    stage.train()
    g = torch.Generator().manual_seed(0)
    host = {"gt": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
            "key": [f"bench_{i}" for i in range(batch)]}
    start = time.perf_counter()
    loss = stage.training_step(stage.on_after_batch_transfer(host), 0)
    loss.backward()
    step_s = time.perf_counter() - start
    trainable = stage.trainable_parameters()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in trainable)
    stage.zero_grad(set_to_none=True)
    total, n_trainable = parameter_counts(stage)
    result = {"params": total, "trainable": n_trainable, "build_s": build_s, "step_s": step_s, "loss": loss.item(),
              "grads_ok": grads_ok, "weights_ok": weights_from_files(stage, work)}
    if name == "scm":
        result["frozen_ldm"] = parameter_counts(stage.frozen.ldm)[0]
    p = paths(work)
    if name == "constyle":
        save_checkpoint(stage, work / "constyle.ckpt")
        assert export_command(str(work / "constyle.ckpt"), str(p["constyle"].parent), ema=True, onnx=False) == 0
    if name == "ldm":
        save_checkpoint(stage, p["ldm"])
    return result


def child(args) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.step.startswith("write-"):
        result = write_weights(args.step, Path(args.work))
    else:
        result = train_step(args.step, Path(args.work), args.size, args.batch)
    result.update(step=args.step, wall_s=time.perf_counter() - start,
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
    print(json.dumps(result))


def row(r: dict) -> str:
    if "files" in r:
        return f"| {r['step']} | | | | | {r['wall_s']:.0f} | {r['peak_rss_gb']:.1f} | | {r['files']} written |"
    params = f"{r['params'] / 1e6:.2f} M" + (f" (+ frozen LDM {r['frozen_ldm'] / 1e6:.2f} M)" if "frozen_ldm" in r else "")
    loaded = {True: "yes", False: "NO", None: "none given"}[r["weights_ok"]]
    checks = f"grads finite: {'yes' if r['grads_ok'] else 'NO'}; weights from files: {loaded}"
    return (f"| {r['step']} | {params} | {r['trainable'] / 1e6:.2f} M | {r['build_s']:.1f} | {r['step_s']:.1f} | "
            f"{r['wall_s']:.0f} | {r['peak_rss_gb']:.1f} | {r['loss']:.4f} | {checks} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="side of the random training images")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the weight files (default: a temporary one, removed after)")
    ap.add_argument("--step", choices=STEPS, default=None, help=argparse.SUPPRESS)  # one step, in a child process
    args = ap.parse_args()
    if args.step is not None:
        child(args)
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="full_configs_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    start = time.perf_counter()
    try:
        for step in STEPS:
            cmd = [sys.executable, __file__, "--step", step, "--work", str(work), "--size", str(args.size),
                   "--batch", str(args.batch)]
            out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"{step}: {result}", file=sys.stderr)
            rows.append(row(result))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.batch} random {args.size} px images per step, CPU, 1 torch thread; total {time.perf_counter() - start:.0f} s\n")
    print("| step | params | trainable | build + load s | forward + backward s | process wall s | peak RSS GB | loss | checks |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
