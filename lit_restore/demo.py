"""`make demo`: the whole pipeline on a CPU in minutes, everything under `demo_out/`.

Sample shards → train the tiny BIQA, ConStyle, restorer, LDM and SCM → export → restore a few
degraded images (automatic loop and --fast) → evaluate on one task per degradation type → report.
Every step is a real `lit-restore` command (run as `python -m lit_restore.cli`), so the demo
exercises what a user types; each command's output goes to `demo_out/logs/<step>.log`.

GIR lines for the report: the restorer's early checkpoint is the acceptance line and its final
weights the excellence line (both run feed-forward, `--fast`); the automatic loop is then
judged against them. The tiny models are random-initialised and trained for a few hundred CPU
steps: the numbers show the pipeline works end to end, not what the full-size models reach.

Run: `python -m lit_restore.demo [--out demo_out] [--scale 1.0]` (`--scale` multiplies every
training length; the README's timing is for 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
# One task per degradation type; the evaluation's subset of the suite.
EVAL_TASKS = ("noise_s25", "blur_s2", "jpeg_q50", "lowres_x4", "haze_b1.5", "rain_a75", "lowlight_g2")
# Degraded inputs written for the restore step (first val images, one task each).
RESTORE_TASKS = ("noise_s25", "blur_s2", "haze_b1.5")


@dataclass
class DemoPlan:
    """Training lengths and evaluation sizes, chosen for ~10 minutes of Python on 2 cores."""

    biqa_steps: int = 300
    constyle_steps: int = 100
    restorer_steps: int = 200  # checkpoints every quarter: the first is the acceptance line's weights
    # The tiny LDM/SCM cost seconds per CPU step (VAE + UNet): short runs, few sampling steps.
    ldm_steps: int = 60
    scm_steps: int = 40
    eval_images: int = 2  # per task
    diffusion_steps: int = 5
    max_passes: int = 2

    def scaled(self, factor: float) -> "DemoPlan":
        def s(n: float) -> int:
            return max(1, round(n * factor))

        return DemoPlan(s(self.biqa_steps), s(self.constyle_steps), 4 * s(self.restorer_steps / 4), s(self.ldm_steps),
                        s(self.scm_steps), self.eval_images, self.diffusion_steps, self.max_passes)

    @property
    def restorer_early_step(self) -> int:
        return self.restorer_steps // 4


class StepFailed(RuntimeError):
    pass


class Runner:
    """Runs `lit-restore` commands with a stage header and a spinner; output into log files."""

    def __init__(self, out: Path, total: int) -> None:
        from rich.console import Console

        self.out, self.total, self.index = out, total, 0
        self.console = Console()
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
        self.times: dict[str, float] = {}

    def stage(self, title: str) -> None:
        self.index += 1
        self.console.rule(f"[bold]{self.index}/{self.total}  {title}")

    def cli(self, name: str, *args: str, ok_codes: Sequence[int] = (0,)) -> str:
        """`python -m lit_restore.cli ARGS`; returns its stdout+stderr, raises StepFailed on a bad exit code."""
        cmd = [sys.executable, "-m", "lit_restore.cli", *args]
        log = self.logs / f"{name}.log"
        start = time.perf_counter()
        with self.console.status(f"lit-restore {' '.join(args[:2])} …  (log: {log})"):
            with open(log, "w") as f:
                f.write("$ lit-restore " + " ".join(args) + "\n")
                f.flush()
                code = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        self.times[name] = seconds
        text = log.read_text(errors="replace")
        if code not in ok_codes:
            tail = "\n".join(text.splitlines()[-15:])
            self.console.print(f"[red]{name} failed (exit code {code}); last lines of {log}:[/red]\n{tail}")
            raise StepFailed(name)
        self.console.print(f"  {name}: done in {seconds:.0f} s")
        return text


def fit_args(config: str, out_dir: Path, data: Path, steps: int, *overrides: str, every: int = 0) -> list[str]:
    """`fit` arguments for a tiny config on the demo shards: validation at the end, checkpoints
    every `every` steps (default: at the end)."""
    return ["fit", f"configs/tiny/{config}.yaml", f"out_dir={out_dir}", f"data.train={data}/train-{{000000..000003}}.tar",
            f"data.val={data}/val-000000.tar", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            f"checkpoint.every_n_steps={every or steps}", "logger=csv", "resume=never", *overrides]


def last_metric(run_dir: Path, name: str) -> Optional[float]:
    """The last logged value of `name` in a run's CSV logs."""
    import csv

    value = None
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(name):
                    value = float(row[name])
    return value


def write_degraded_inputs(data: Path, folder: Path) -> list[Path]:
    """One degraded val image per RESTORE_TASKS entry, as PNGs a user would hand to `restore`."""
    from lit_restore.data.degrade.suite import build_task_set, find_task, load_suite
    from lit_restore.data.images import write_png

    suite = load_suite()
    paths = []
    for i, name in enumerate(RESTORE_TASKS):
        task = find_task(suite, name)
        samples = list(build_task_set(task, str(data / "val-000000.tar"), max_images=i + 1))
        _, _, lq = samples[-1]  # a different val image per task
        path = folder / f"{name}.png"
        write_png(path, lq.permute(1, 2, 0).numpy())
        paths.append(path)
    return paths


def run_demo(out: Path, plan: DemoPlan) -> int:
    start = time.perf_counter()
    r = Runner(out, total=9)
    data, runs, weights, early = out / "data", out / "runs", out / "weights", out / "weights_early"
    try:
        r.stage("Sample shards from scikit-image's photos")
        r.cli("prep-sample", "prep-sample", "--out", str(data), "--crop", "128", "--train-crops", "32",
              "--val-crops", "4", "--overwrite")

        r.stage(f"Train BIQA (tiny CLIP image tower, {plan.biqa_steps} steps)")
        r.cli("fit-biqa", *fit_args("biqa", runs / "biqa", data, plan.biqa_steps))
        biqa_ckpt = runs / "biqa" / "checkpoints" / "last.ckpt"

        r.stage(f"Train ConStyle encoder ({plan.constyle_steps} steps)")
        r.cli("fit-constyle", *fit_args("constyle", runs / "constyle", data, plan.constyle_steps))

        r.stage(f"Train ConStyle-NAFNet restorer, frozen encoder ({plan.restorer_steps} steps)")
        r.cli("fit-restorer", *fit_args(
            "restorer", runs / "restorer", data, plan.restorer_steps, "model.constyle_mode=frozen",
            f"model.constyle_weights={runs / 'constyle' / 'checkpoints' / 'last.ckpt'}", every=plan.restorer_early_step))

        r.stage(f"Train LDM (tiny UNet/VAE, BIQA's text tower, {plan.ldm_steps} steps)")
        r.cli("fit-ldm", *fit_args("ldm", runs / "ldm", data, plan.ldm_steps, f"model.clip.pretrained={biqa_ckpt}"))

        r.stage(f"Train SCM on the frozen LDM ({plan.scm_steps} steps)")
        r.cli("fit-scm", *fit_args("scm", runs / "scm", data, plan.scm_steps,
                                   f"model.ldm_checkpoint={runs / 'ldm' / 'checkpoints' / 'last.ckpt'}",
                                   f"model.ldm.clip.pretrained={biqa_ckpt}"))

        r.stage("Export weights (safetensors, config, model card)")
        for stage in ("biqa", "constyle", "restorer", "ldm", "scm"):
            r.cli(f"export-{stage}", "export", str(runs / stage / "checkpoints" / "last.ckpt"), "--out", str(weights),
                  "--no-onnx")
        early_ckpt = runs / "restorer" / "checkpoints" / f"step{plan.restorer_early_step:07d}.ckpt"
        r.cli("export-restorer-early", "export", str(early_ckpt), "--out", str(early), "--no-onnx")

        r.stage("Restore degraded images (automatic loop and --fast)")
        write_degraded_inputs(data, out / "inputs")
        r.cli("restore-auto", "restore", str(out / "inputs"), "--weights", str(weights), "--out", str(out / "restored"),
              "--steps", str(plan.diffusion_steps), "--max-passes", str(plan.max_passes), "--device", "cpu")
        r.cli("restore-fast", "restore", str(out / "inputs"), "--weights", str(weights), "--out",
              str(out / "restored_fast"), "--fast", "--device", "cpu")

        r.stage(f"Evaluate on {len(EVAL_TASKS)} GIR tasks × {plan.eval_images} images")
        lines = out / "lines.csv"
        if lines.exists():
            lines.unlink()  # lines of an earlier demo run would be merged otherwise
        common = ["--suite", "gir", "--data", str(data / "val-000000.tar"), "--tasks", ",".join(EVAL_TASKS),
                  "--max-images", str(plan.eval_images), "--device", "cpu"]
        r.cli("evaluate-early", "evaluate", "--weights", str(early), "--out", str(out / "report_early"), "--fast",
              "--save-lines", str(lines), "--line-role", "acceptance", *common)
        r.cli("evaluate-fast", "evaluate", "--weights", str(weights), "--out", str(out / "report_fast"), "--fast",
              "--save-lines", str(lines), "--line-role", "excellence", *common)
        r.cli("evaluate-auto", "evaluate", "--weights", str(weights), "--out", str(out / "report"), "--lines",
              str(lines), "--steps", str(plan.diffusion_steps), "--max-passes", str(plan.max_passes), *common)
    except StepFailed:
        return 1
    summarize(r, out, runs, time.perf_counter() - start)
    return 0


def _mean_gain(metrics: dict) -> float:
    tasks = metrics["tasks"]
    return sum(t["psnr"] - t["input_psnr"] for t in tasks) / len(tasks)


def summarize(r: Runner, out: Path, runs: Path, seconds: float) -> None:
    from rich.table import Table

    auto = json.loads((out / "report" / "metrics.json").read_text())
    fast = json.loads((out / "report_fast" / "metrics.json").read_text())
    table = Table(title="Headline figures (tiny models, CPU)", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    biqa_acc = last_metric(runs / "biqa", "val/acc")
    table.add_row("BIQA val accuracy (8 classes, training val set)", "–" if biqa_acc is None else f"{biqa_acc:.3f}")
    if auto.get("biqa"):
        conf = auto["biqa"]["confusion"]
        total = sum(map(sum, conf))
        table.add_row("BIQA accuracy on the evaluated tasks + clean GTs", f"{sum(conf[i][i] for i in range(len(conf))) / total:.3f}")
    val_psnr = last_metric(runs / "restorer", "val/psnr")
    table.add_row("restorer val PSNR (dB)", "–" if val_psnr is None else f"{val_psnr:.2f}")
    table.add_row("restorer (--fast) mean PSNR gain over the input (dB)", f"{_mean_gain(fast):+.2f}")
    table.add_row("automatic loop mean PSNR gain over the input (dB)", f"{_mean_gain(auto):+.2f}")
    stats = auto.get("line_stats", {}).get("psnr")
    if stats:
        table.add_row("automatic loop AR / ER (lines: early / final restorer)", f"{stats['ar']:.2f} / {stats['er']:.2f}")
    table.add_row("demo wall time (Python part)", f"{seconds / 60:.1f} min")
    r.console.rule("[bold]Done")
    r.console.print(table)
    r.console.print(f"Report:            {(out / 'report' / 'report.html').resolve()}  (also report.md, metrics.json)")
    r.console.print(f"Feed-forward report: {(out / 'report_fast' / 'report.html').resolve()}")
    r.console.print(f"Restored images:   {(out / 'restored').resolve()}/ (automatic loop, with a JSON log each), "
                    f"{(out / 'restored_fast').resolve()}/ (--fast); inputs in {(out / 'inputs').resolve()}/")
    r.console.print(f"Logs of every step: {(out / 'logs').resolve()}/")
    timings = {name: round(s, 1) for name, s in r.times.items()}
    (out / "timings.json").write_text(json.dumps({"total_seconds": round(seconds, 1), "steps": timings}, indent=2))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lit_restore.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="everything the demo writes goes here")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training length (e.g. 0.1 for a smoke run)")
    a = p.parse_args(argv)
    if a.scale <= 0:
        p.error("--scale must be > 0")
    return run_demo(Path(a.out).resolve(), DemoPlan().scaled(a.scale))


if __name__ == "__main__":
    sys.exit(main())
