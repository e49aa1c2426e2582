"""One command that checks a GPU machine: the full configs training in bf16 with their step time,
throughput, peak memory and model FLOPs utilisation; the LDM step under FSDP and torch.compile;
the Degrader's throughput and a pass that may not sync; whether the loader keeps the restorer
stage busy; restore and evaluate end to end; and what 3 minutes of tiny-restorer training buy.

    python bench/gpu.py --out runs/bench_gpu                 # one GPU, about 10 minutes
    python bench/gpu.py --device cpu --out /tmp/bench_cpu    # tiny configs, a few steps (a test)

Every section runs in its own try: a failure is reported (and written) and the others go on.
Results are written to OUT/gpu.json and, as a Markdown table, to OUT/gpu.md after every section
(so a run cut short keeps what it measured), and the table is printed at the end. Sections that
would start after `--budget` seconds are skipped. On CUDA the full configs (configs/<stage>.yaml)
get random weights in the real layouts from bench/full_configs.py (an open_clip ViT-L/14 file, an
SD-1.5 diffusers folder, the constyle stage's export, the ldm stage's checkpoint); on the CPU the
tiny configs.

FLOPs are counted with torch.utils.flop_counter over one training step (forward and backward;
matmuls, convolutions and attention), MFU = FLOPs / step time / the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

# Before the imports that read them: nothing here downloads, and no logger talks to a server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import full_configs  # noqa: E402
from _tiny_weights import export_tiny  # noqa: E402
from learn_restorer import degraded_sets, score, type_means  # noqa: E402
from lit_restore.config import DegradeConfig, RunConfig, load_config  # noqa: E402
from lit_restore.data.degrade.composer import Degrader  # noqa: E402
from lit_restore.fit import build_stage, build_strategy, fit  # noqa: E402
from lit_restore.guards import NonFiniteGuard  # noqa: E402
from lit_restore.metrics import psnr  # noqa: E402

STAGES = ("biqa", "constyle", "restorer", "ldm", "scm")
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets, by device-name substring;
# the first match wins (PCIe before the SXM default).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops(name: str) -> Optional[float]:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------
# Training steps of a stage
# --------------------------------------------------------------------------------------


class RandomBatches(IterableDataset):
    """Host batches of random clean images, as the loader yields them (uint8, keys), made once."""

    def __init__(self, batch: int, size: int, count: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [{"gt": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
                         "key": [f"bench_{i}_{j}" for j in range(batch)]} for i in range(count)]

    def __iter__(self):
        while True:
            yield from self.batches


class StepTimer(L.Callback):
    """Wall time of the steps after `warmup`, with one device sync at each end (none in between,
    so the host keeps queueing work as in a real run)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: Optional[float] = None
        self.seconds_per_step: Optional[float] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step == trainer.max_steps and self.start is not None:
            sync(pl_module.device)
            self.seconds_per_step = (time.perf_counter() - self.start) / (trainer.max_steps - self.warmup)


def step_flops(stage, host: dict, device: torch.device, precision: str) -> int:
    """FLOPs of one training step (forward + backward) of `stage` on `host`'s batch."""
    batch = stage.on_after_batch_transfer({k: v.to(device) if torch.is_tensor(v) else v for k, v in host.items()})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with FlopCounterMode(display=False) as counter, autocast:
        stage.training_step(batch, 0).backward()
    stage.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class TimedLoader:
    """A loader whose `next()` is timed: the time the step waits for data."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.waits: list[float] = []

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def plain_loop_step_s(stage, host: dict, device: torch.device, precision: str, steps: int) -> float:
    """Seconds per step of the same stage in a plain PyTorch loop (batch hook, training step,
    backward, fused AdamW; no Lightning, no callbacks): the reference of the BIQA goal."""
    stage.to(device).train()
    optimizer = torch.optim.AdamW(stage.trainable_parameters(), lr=1e-6, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        batch = stage.on_after_batch_transfer(
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in host.items()})
        with autocast:
            loss = stage.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup = max(1, steps // 5)
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps - warmup):
        step()
    sync(device)
    return (time.perf_counter() - start) / (steps - warmup)


def train_stage(cfg: RunConfig, args, device: torch.device, strategy: Any = "auto",
                prepare: Optional[Callable] = None, count_flops: bool = True,
                loader: Optional[TimedLoader] = None) -> tuple[dict, Any]:
    """Train `cfg`'s stage for `args.steps` steps through Lightning (the stage's own hooks, the NaN
    guard) at the config's per-GPU batch and crop, on random images or `loader`'s batches;
    returns figures and the stage."""
    free(device)
    start = time.perf_counter()
    stage = build_stage(cfg)
    stage.configure_model()  # Lightning's setup then loads what the stage takes from files
    if prepare is not None:
        prepare(stage)
    build_s = time.perf_counter() - start
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    warmup = max(1, args.steps // 5)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=device.type, devices=1, strategy=strategy, precision=precision, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=max(1, args.steps // 2),
        callbacks=[NonFiniteGuard("skip", 100, Path(cfg.out_dir) / "checkpoints"), timer],
    )
    data = RandomBatches(cfg.data.batch_size, cfg.data.crop)
    batches = loader if loader is not None else DataLoader(data, batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(stage, train_dataloaders=batches)
    step_s = timer.seconds_per_step
    batch = cfg.data.batch_size
    result = {"stage": cfg.stage, "batch": batch, "crop": cfg.data.crop, "precision": precision,
              "strategy": strategy if isinstance(strategy, str) else type(strategy).__name__,
              "build_s": round(build_s, 1), "step_s": step_s, "samples_per_s": batch / step_s if step_s else None,
              "peak_memory_gb": peak_memory_gb(device),
              "params_trainable": sum(p.numel() for p in stage.trainable_parameters())}
    stage.trainer = None  # steps outside the loop: self.log becomes a no-op
    if count_flops:
        stage.to(device)
        result["tflop_per_step"] = step_flops(stage, data.batches[0], device, precision) / 1e12
    if cfg.stage == "biqa" and step_s:
        pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
        host = {k: pin(v) if torch.is_tensor(v) else v for k, v in data.batches[0].items()}
        result["plain_loop_step_s"] = plain_loop_step_s(stage, host, device, precision, args.steps)
        result["lightning_overhead"] = step_s / result["plain_loop_step_s"] - 1
    return result, stage


def stage_config(name: str, args, work: Path, *extra: str) -> RunConfig:
    """The full config (CUDA, weights from the files bench/full_configs.py writes) or the tiny one (CPU)."""
    common = [f"out_dir={work / 'runs' / name}", "logger=none", "trainer.devices=1", "trainer.num_nodes=1",
              "trainer.strategy=auto"]
    if args.device == "cpu":
        return load_config(ROOT / f"configs/tiny/{name}.yaml", [*common, "data.batch_size=2", "data.crop=32", *extra])
    return load_config(ROOT / f"configs/{name}.yaml", [*full_configs.overrides(name, work), *common, *extra])


def with_mfu(result: dict, device_name: str) -> dict:
    peak = peak_tflops(device_name)
    if peak and result.get("step_s") and result.get("tflop_per_step"):
        result["mfu"] = result["tflop_per_step"] / result["step_s"] / peak
    return result


def section_stages(args, device: torch.device, work: Path, device_name: str) -> dict:
    out = {}
    if args.device == "cuda":
        for step in ("write-clip", "write-sd15"):
            full_configs.write_weights(step, work)
    for name in STAGES:
        try:
            result, stage = train_stage(stage_config(name, args, work), args, device)
            out[name] = with_mfu(result, device_name)
            if args.device == "cuda" and name == "constyle":  # the restorer's frozen encoder
                stage.cpu()
                full_configs.save_checkpoint(stage, work / "constyle.ckpt")
                from lit_restore.export import export_command

                export_command(str(work / "constyle.ckpt"), str(full_configs.paths(work)["constyle"].parent),
                               ema=True, onnx=False)
            if args.device == "cuda" and name == "ldm":  # the SCM's frozen LDM
                full_configs.save_checkpoint(stage.cpu(), full_configs.paths(work)["ldm"])
            del stage
        except Exception as e:  # one stage failing leaves the others to run
            out[name] = {"error": error_line(e)}
        free(device)
    return out


def section_ldm_fsdp(args, device: torch.device, work: Path, device_name: str, eager: Optional[dict]) -> dict:
    """The LDM step under trainer.strategy=fsdp on one device; MFU from the eager step's FLOPs."""
    if device.type != "cuda":
        return {"error": "not run: Lightning's FSDP needs CUDA"}
    cfg = stage_config("ldm", args, work, "trainer.strategy=fsdp")
    result, _ = train_stage(cfg, args, device, strategy=build_strategy(cfg), count_flops=False)
    return with_eager_flops(result, eager, device_name)


def section_compiled(args, device: torch.device, work: Path, device_name: str, eager: Optional[dict]) -> dict:
    """torch.compile (inductor): the LDM step with its UNet compiled, and the Degrader with its ops
    compiled (degrade.compile). Last, because compiling takes minutes."""
    if device.type != "cuda":
        return {"error": "not run on the CPU (tracing alone takes longer than the CPU pass)"}
    out = {}
    try:
        compiled_at = {}

        def compile_unet(stage) -> None:
            stage.ldm.unet.compile()
            compiled_at["t"] = time.perf_counter()

        result, stage = train_stage(stage_config("ldm", args, work), args, device, prepare=compile_unet,
                                    count_flops=False)
        result["build_and_steps_s"] = round(time.perf_counter() - compiled_at["t"], 1)  # compile included
        out["ldm"] = with_eager_flops(result, eager, device_name)
        del stage
    except Exception as e:
        out["ldm"] = {"error": error_line(e)}
    free(device)
    try:
        start = time.perf_counter()
        compiled = Degrader(DegradeConfig())
        compiled.compile_ops()
        out["degrader 16x3x256x256"] = {"images_per_s": degrade_rate(compiled, 16, 256, device, 10),
                                        "with_compile_s": round(time.perf_counter() - start, 1)}
    except Exception as e:
        out["degrader 16x3x256x256"] = {"error": error_line(e)}
    return out


def with_eager_flops(result: dict, eager: Optional[dict], device_name: str) -> dict:
    """MFU of a variant of the LDM step (same model FLOPs as the eager step)."""
    if eager and "tflop_per_step" in eager:
        result = with_mfu({**result, "tflop_per_step": eager["tflop_per_step"]}, device_name)
    return result


def degrade_rate(fn: Callable, n: int, size: int, device: torch.device, reps: int) -> float:
    """Images per second of the Degrader call `fn` on (n, 3, size, size) batches, after one warm-up call."""
    gt = torch.rand(n, 3, size, size, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    fn(gt, generator=g)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn(gt, generator=g)
    sync(device)
    return n * reps / (time.perf_counter() - start)


def section_degrader(args, device: torch.device) -> dict:
    """The full random chain (mixed mode, all 7 ops): images/s per shape, the same on the CPU for
    the ratio, and one pass under CUDA's sync debug mode set to error."""
    shapes = [(16, 256), (64, 512)] if device.type == "cuda" else [(2, 64)]
    degrader = Degrader(DegradeConfig())
    out = {}

    reps = 10 if device.type == "cuda" else 2
    for n, size in shapes:
        key = f"{n}x3x{size}x{size}"
        out[key] = {"images_per_s": degrade_rate(degrader, n, size, device, reps)}
        free(device)
    if device.type == "cuda":
        n, size = shapes[0]
        out[f"{n}x3x{size}x{size}"]["cpu_images_per_s"] = degrade_rate(degrader, n, size, torch.device("cpu"), 2)
        gt = torch.rand(n, 3, size, size, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        degrader(gt, generator=g)
        sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            degrader(gt, generator=g)
            sync_free = "yes"
        except RuntimeError as e:
            sync_free = f"NO: {error_line(e)}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out["sync_free"] = sync_free
    return out


# --------------------------------------------------------------------------------------
# Loader, commands, the tiny restorer
# --------------------------------------------------------------------------------------


def sample_shards(work: Path, device: torch.device) -> Path:
    """`prep-sample` shards of 128 px crops (made once): the loader, evaluate and tiny-restorer data."""
    from data_prep.sample import prep_sample

    out = work / "sample"
    if not (out / "manifest.json").is_file():
        train_crops = 64 if device.type == "cuda" else 8
        assert prep_sample(str(out), crop=128, train_crops=train_crops, val_crops=4, seed=0, overwrite=False) == 0
    return out


def section_loader(args, device: torch.device, work: Path) -> dict:
    """The restorer stage fed by its real loader (its config's workers, as many as this machine
    has): the time the steps wait for data against the time they take."""
    from lit_restore.data.datamodule import ShardDataModule

    data = sample_shards(work, device)
    workers = min(stage_config("restorer", args, work).data.num_workers, os.cpu_count() or 1)
    cfg = stage_config("restorer", args, work, f"data.train={data}/train-{{000000..000003}}.tar",
                       f"data.val={data}/val-000000.tar", f"data.num_workers={workers}")
    loader = TimedLoader(ShardDataModule(cfg.data, seed=0).train_dataloader())
    steps = max(args.steps, 5)
    result, _ = train_stage(cfg, argparse.Namespace(**{**vars(args), "steps": steps}), device, count_flops=False,
                            loader=loader)
    warmup = max(1, steps // 5)  # the StepTimer's: waits of the timed steps only (workers started)
    wait = sum(loader.waits[warmup + 1: steps])
    total = result["step_s"] * (steps - warmup)
    return {"batch": cfg.data.batch_size, "crop": cfg.data.crop, "workers": workers, "timed_steps": steps - warmup,
            "step_s": result["step_s"], "loader_wait_s_per_step": wait / (steps - warmup),
            "busy_fraction": 1 - wait / total}


def section_commands(args, device: torch.device, work: Path) -> dict:
    """restore (automatic loop and --fast) and evaluate on `device`, end to end, on tiny exported weights."""
    from PIL import Image

    from lit_restore.evaluate import evaluate_command
    from lit_restore.restore import restore_command
    from lit_restore.settings import LoopSettings, RunSettings, SamplerSettings, TileSettings

    tmp = work / "tiny_exports"
    tmp.mkdir(parents=True, exist_ok=True)
    weights = tmp / "weights"
    export_tiny("biqa", weights, tmp)
    export_tiny("ldm", weights, tmp, [f"model.clip.pretrained={tmp / 'biqa.ckpt'}"])
    export_tiny("scm", weights, tmp)
    export_tiny("restorer", weights, tmp)
    image = work / "inputs" / "photo.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    size = (96, 128) if cuda else (40, 56)  # larger than a tile: the tiled paths run
    Image.fromarray(torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()).save(image)
    data = sample_shards(work, device)
    out = {}
    for mode, extra in (("restore automatic", {}), ("restore --fast", {"fast": True})):
        start = time.perf_counter()
        code = restore_command(str(weights), [str(image)], str(work / "restored" / mode.split()[-1]),
                               sampling=SamplerSettings(steps=4 if cuda else 2),
                               tiles=TileSettings(tile=64 if cuda else 32, overlap=16 if cuda else 8),
                               loop=LoopSettings(max_passes=7 if cuda else 2), run_settings=RunSettings(device=device.type),
                               **extra)
        out[mode] = {"exit": code, "seconds": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    code = evaluate_command(str(weights), str(ROOT / "configs/gir_suite.yaml"), f"{data}/val-000000.tar",
                            str(work / "evaluate"), tasks="noise_s25,blur_s2" if cuda else "noise_s25",
                            max_images=2 if cuda else 1, lpips_weights=str(work / "no-lpips.pth"),
                            sampling=SamplerSettings(steps=4 if cuda else 2), loop=LoopSettings(max_passes=2),
                            run_settings=RunSettings(device=device.type))
    out["evaluate"] = {"exit": code, "seconds": round(time.perf_counter() - start, 2)}
    return out


def section_tiny_restorer(args, device: torch.device, work: Path, seconds: float) -> dict:
    """configs/tiny/restorer.yaml at crop 128 and width 32, trained for `seconds` on `device`:
    PSNR gain over the degraded input on the held-out val crops (learn_restorer's protocol)."""
    data = sample_shards(work, device)
    crop = 128 if device.type == "cuda" else 48
    cfg = load_config(ROOT / "configs/tiny/restorer.yaml", [
        f"out_dir={work / 'runs' / 'tiny_restorer'}", "logger=none", f"data.train={data}/train-{{000000..000003}}.tar",
        f"data.val={data}/val-000000.tar", f"data.crop={crop}", "data.val_crop=128", "model.width=32",
        f"data.batch_size={16 if device.type == 'cuda' else 4}", f"data.num_workers={min(8, os.cpu_count() or 1)}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.max_steps=1000000",
        f"trainer.max_time={{seconds: {seconds}}}", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "checkpoint.every_n_steps=100000",
    ])
    stage = build_stage(cfg)
    stage.configure_model()
    crops, sets = degraded_sets(cfg, seeds=2)
    if device.type != "cuda":  # a few crops, one draw: the CPU pass checks the path, not the figure
        crops, sets = crops[:2], {t: x[:2] for t, x in sets.items()}
    crops, sets = crops.to(device), {t: x.to(device) for t, x in sets.items()}
    start = time.perf_counter()
    trainer = fit(cfg, stage=stage)
    train_s = time.perf_counter() - start
    stage.to(device)
    inputs = {t: psnr(x, crops.repeat(len(x) // len(crops), 1, 1, 1)) for t, x in sets.items()}
    after = score(stage, crops, sets)
    gains = {t: after[t] - inputs[t] for t in inputs}
    return {"crop": crop, "width": 32, "batch": cfg.data.batch_size, "steps": trainer.global_step,
            "train_s": round(train_s, 1), "val_images": sum(len(x) for x in sets.values()), "input_psnr": type_means(inputs)[-1],
            "restored_psnr": type_means(after)[-1], "gain_db": type_means(gains)[-1],
            "gain_per_type": {t: float(g.mean()) for t, g in gains.items()}}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(results: dict) -> str:
    lines = [f"device: {results['device']}; peak bf16 {fmt(results.get('peak_bf16_tflops'))} TFLOP/s "
             f"(table: {', '.join(f'{k} {v:.0f}' for k, v in PEAK_BF16_TFLOPS)}); torch {results['torch']}", "",
             "| section | item | figures |", "|---|---|---|"]
    for section, body in results["sections"].items():
        if not isinstance(body, dict) or "error" in body:
            lines.append(f"| {section} | | {body.get('error') if isinstance(body, dict) else body} |")
            continue
        if not any(isinstance(v, dict) for v in body.values()):
            lines.append(f"| {section} | | {'; '.join(f'{k} {fmt(v)}' for k, v in body.items())} |")
            continue
        for item, figures in body.items():
            if isinstance(figures, dict):
                text = "; ".join(f"{k} {fmt(v)}" if not isinstance(v, dict) else
                                 f"{k} ({', '.join(f'{a} {fmt(b)}' for a, b in v.items())})" for k, v in figures.items())
            else:
                text = fmt(figures)
            lines.append(f"| {section} | {item} | {text} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", required=True, help="folder for gpu.json")
    p.add_argument("--steps", type=int, default=None, help="training steps per stage (default 20 on CUDA, 2 on the CPU)")
    p.add_argument("--train-seconds", type=float, default=None, help="tiny restorer training (default 180 / 2)")
    p.add_argument("--budget", type=float, default=None, help="start no section after this many seconds (default 540 / 600)")
    p.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    p.add_argument("--work", default=None, help="folder for weight files and shards (default: a temporary one)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run with --device cpu for the tiny CPU pass")
    args.steps = args.steps or (20 if cuda else 2)
    train_seconds = args.train_seconds or (180.0 if cuda else 2.0)
    budget = args.budget or (540.0 if cuda else 600.0)
    device = torch.device("cuda:0" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    results: dict[str, Any] = {"device": device_name, "peak_bf16_tflops": peak_tflops(device_name),
                               "torch": torch.__version__, "sections": {}}
    start = time.perf_counter()

    def eager_ldm() -> Optional[dict]:
        return results["sections"].get("stages", {}).get("ldm")

    sections: list[tuple[str, Callable[[], dict]]] = [
        ("stages", lambda: section_stages(args, device, work, device_name)),
        ("degrader", lambda: section_degrader(args, device)),
        ("loader", lambda: section_loader(args, device, work)),
        ("commands", lambda: section_commands(args, device, work)),
        ("tiny_restorer", lambda: section_tiny_restorer(
            args, device, work, min(train_seconds, max(30.0, budget - (time.perf_counter() - start) - 120))
            if cuda else train_seconds)),
        ("ldm_fsdp", lambda: section_ldm_fsdp(args, device, work, device_name, eager_ldm())),
        ("compiled", lambda: section_compiled(args, device, work, device_name, eager_ldm())),
    ]
    for name, run in sections:
        elapsed = time.perf_counter() - start
        if name in args.skip:
            results["sections"][name] = {"error": "skipped (--skip)"}
        elif elapsed > budget:
            results["sections"][name] = {"error": f"skipped: {elapsed:.0f} s used of the {budget:.0f} s budget"}
        else:
            t0 = time.perf_counter()
            try:
                results["sections"][name] = run()
            except Exception as e:
                traceback.print_exc()
                results["sections"][name] = {"error": error_line(e)}
            print(f"bench/gpu.py: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            free(device)
        results["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"\ntotal {results['seconds']} s; written {out / 'gpu.json'} and {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
