"""`make demo`: the whole pipeline on a CPU in minutes, everything under `demo_out/`.

Sample shards → BIQA, ConStyle, restorer, LDM and SCM, each started the way the full configs start
→ export → restore a few degraded images (automatic loop and --fast) → evaluate on one task per
degradation type (two val crops of each of the 8 photos per task) → report. The loop runs as
AutoDIR runs it: BIQA names the degradation, the LDM samples from pure noise, the SCM corrects,
and BIQA looks again. Every step is a real `lit-restore` command (run as
`python -m lit_restore.cli`), so the demo exercises what a user types; each command's output goes
to `demo_out/logs/<step>.log`. ConStyle and the restorer, which need none of the other steps,
train in the background beside BIQA → LDM → SCM (`lit_restore.jobs.Beside`).

What each step starts from mirrors the full pipeline, in miniature: BIQA fine-tunes the image tower
of the tiny CLIP foundation (OpenAI's CLIP at full scale), the LDM fine-tunes the tiny LDM
foundation (released AutoDIR LDM weights: SD-1.5's UNet fine-tuned to restore, on SD-1.5's frozen
VAE), the ConStyle step fine-tunes the encoder of
the tiny restorer foundation (released ConStyle-NAFNet weights at full scale), the restorer
fine-tunes that foundation with the demo's encoder frozen, and the SCM fine-tunes the tiny SCM
foundation on the demo's frozen LDM. The foundations are shipped in `foundations/tiny/` (made by
`make foundations`). The figures come from minutes of CPU training of tiny models: they show that
the method works end to end, not what full-size models reach.

GIR lines for the report: the restorer's early checkpoint is the acceptance line and its final
weights the excellence line (both run feed-forward, `--fast`); the automatic loop is judged
against them, where the lines are meaningful (excellence above acceptance).

Run: `python -m lit_restore.demo [--out demo_out] [--scale 1.0]` (`--scale` multiplies every
training length; the README's timing is for 1.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_restore.jobs import REPO, Beside, Runner, StepFailed, loss_story

# One task per degradation type; the evaluation's subset of the suite.
EVAL_TASKS = ("noise_s25", "blur_s2", "jpeg_q50", "lowres_x4", "haze_b1.5", "rain_a75", "lowlight_g2")
# Degraded inputs written for the restore step (first val images, one task each).
RESTORE_TASKS = ("noise_s25", "blur_s2", "haze_b1.5")
# The ConStyle, restorer and SCM steps fine-tune a trained foundation: a quarter to a half of their
# tiny configs' lr from random (the BIQA fine-tune's lr), so the encoder the restorer was trained
# with moves little.
FINE_TUNE_LR = 5e-4
# A quarter of the restorer's samples stay clean with themselves as target: a blind restorer that
# never saw a clean image "restores" mild or dark ones too (brightening a dark photo as if it were
# low-light); docs/benchmarks.md, "Demo".
RESTORER_CLEAN_FRACTION = "degrade.clean_fraction=0.25"
# Crops of each photo in the val shard (prep-sample --val-crops): the evaluation's images.
VAL_CROPS = 2
# The training steps as the summary lists them.
STEP_ORDER = ("BIQA", "ConStyle", "restorer", "LDM", "SCM")
TINY_NOTE = "tiny models, minutes of CPU training: proof that the method runs end to end, not full-scale quality"


@dataclass
class DemoPlan:
    """Training lengths and evaluation sizes (docs/benchmarks.md, "Demo", for the time they take)."""

    biqa_steps: int = 300
    constyle_steps: int = 100
    restorer_steps: int = 200  # checkpoints every quarter: the first is the acceptance line's weights
    ldm_steps: int = 600  # 200 left the loop at +3.09 dB (blur −0.94, jpeg −2.44); 600: +3.44 (docs/benchmarks.md, "Demo")
    scm_steps: int = 450
    # Per task: the val shard holds VAL_CROPS crops of each of the 8 photos, so 16 images are two
    # crops of every photo.
    eval_images: int = 16
    diffusion_steps: int = 10
    # AutoDIR's loop: the sampler starts from pure noise (strength 1, the full pipeline's default);
    # `--strength` below 1 (SDEdit) stays an option of restore and evaluate.
    strength: float = 1.0
    # BIQA decides after each pass whether another is needed; the evaluation's tasks hold one
    # degradation each, so a second pass runs only where BIQA still sees one.
    max_passes: int = 2
    # The tiny SCM also gains after a low-resolution pass, where AutoDIR's evaluation skips it
    # (docs/benchmarks.md, "The automatic loop").
    scm_every_pass: bool = True

    def scaled(self, factor: float) -> "DemoPlan":
        def s(n: float) -> int:
            return max(1, round(n * factor))

        return DemoPlan(s(self.biqa_steps), s(self.constyle_steps), 4 * s(self.restorer_steps / 4), s(self.ldm_steps),
                        s(self.scm_steps), self.eval_images, self.diffusion_steps, self.strength, self.max_passes,
                        self.scm_every_pass)

    @property
    def restorer_early_step(self) -> int:
        return self.restorer_steps // 4


def loop_flags(plan: DemoPlan) -> list[str]:
    return ["--scm-every-pass"] if plan.scm_every_pass else []


def fit_args(config: str, out_dir: Path, data: Path, steps: int, *overrides: str, every: int = 0) -> list[str]:
    """`fit` arguments for a tiny config on the demo shards: validation at the end, checkpoints
    every `every` steps (default: at the end)."""
    return ["fit", f"configs/tiny/{config}.yaml", f"out_dir={out_dir}", f"data.train={data}/train-{{000000..000003}}.tar",
            f"data.val={data}/val-000000.tar", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            f"checkpoint.every_n_steps={every or steps}", "trainer.log_every_n_steps=5", "logger=csv", "resume=never",
            *overrides]


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
    r = Runner(out, total=8)
    data, runs, weights, early = out / "data", out / "runs", out / "weights", out / "weights_early"
    stories: dict[str, tuple[str, str]] = {}  # step → (starts from, loss)
    beside: Optional[Beside] = None

    def train(name: str, title: str, starts_from: str, config: str, steps: int, *overrides: str) -> None:
        r.stage(f"{title} ({steps} steps)")
        r.console.print(f"  starts from: {starts_from}")
        run = runs / config
        r.cli(f"fit-{config}", *fit_args(config, run, data, steps, *overrides), steps=steps, run_dir=run)
        tell(name, starts_from, config)

    def tell(name: str, starts_from: str, config: str) -> None:
        stories[name] = (starts_from, loss_story(runs / config))
        r.console.print(f"  {name}: {stories[name][1]}")

    try:
        r.stage("Sample shards from scikit-image's photos")
        r.cli("prep-sample", "prep-sample", "--out", str(data), "--crop", "128", "--train-crops", "32",
              "--val-crops", str(VAL_CROPS), "--overwrite")
        biqa_ckpt = runs / "biqa" / "checkpoints" / "last.ckpt"
        # ConStyle and the restorer need nothing of BIQA, the LDM or the SCM: they train on the
        # other core meanwhile (each fit takes one thread on a 2-core machine).
        restorer = REPO / "foundations" / "tiny" / "restorer" / "model.safetensors"
        constyle_from = "the tiny restorer foundation's encoder (foundations/tiny/restorer)"
        restorer_from = "the tiny restorer foundation + the ConStyle encoder above, frozen"
        r.stage(f"Fine-tune ConStyle ({plan.constyle_steps} steps), then the restorer ({plan.restorer_steps} steps), "
                "in the background")
        r.console.print(f"  ConStyle starts from: {constyle_from}\n  restorer starts from: {restorer_from}")
        beside = Beside(r, [
            ("fit-constyle", fit_args("constyle", runs / "constyle", data, plan.constyle_steps,
                                      f"model.pretrained={restorer}", f"optim.lr={FINE_TUNE_LR}")),
            ("fit-restorer", fit_args("restorer", runs / "restorer", data, plan.restorer_steps, f"model.pretrained={restorer}",
                                      "model.constyle_mode=frozen",
                                      f"model.constyle_weights={runs / 'constyle' / 'checkpoints' / 'last.ckpt'}",
                                      f"optim.lr={FINE_TUNE_LR}", RESTORER_CLEAN_FRACTION, every=plan.restorer_early_step)),
        ])
        train("BIQA", "Fine-tune BIQA's image tower", "the tiny CLIP foundation (foundations/tiny/clip), text tower frozen",
              "biqa", plan.biqa_steps)
        train("LDM", "Fine-tune the LDM (InstructPix2Pix-style)",
              "the tiny LDM foundation (foundations/tiny/ldm: UNet, frozen VAE, v-prediction), BIQA's frozen text tower",
              "ldm", plan.ldm_steps, f"model.clip.pretrained={biqa_ckpt}")
        # The SCM corrects what the loop's sampler makes at the demo's settings (`ldm_input=sample`),
        # not AutoDIR's one-step estimate from the GT latent: a few minutes of LDM training leave
        # those two far apart.
        scm = REPO / "foundations" / "tiny" / "scm" / "model.safetensors"
        train("SCM", "Fine-tune the structure corrector", "the tiny SCM foundation (foundations/tiny/scm), on the "
              "frozen LDM above", "scm", plan.scm_steps, f"model.pretrained={scm}",
              f"model.ldm_checkpoint={runs / 'ldm' / 'checkpoints' / 'last.ckpt'}", f"model.ldm.clip.pretrained={biqa_ckpt}",
              "model.ldm_input=sample", f"model.sample_steps={plan.diffusion_steps}",
              f"model.sample_strength={plan.strength}", f"optim.lr={FINE_TUNE_LR}")
        beside.join()
        tell("ConStyle", constyle_from, "constyle")
        tell("restorer", restorer_from, "restorer")

        r.stage("Export weights (safetensors, config, model card)")
        r.cli("export", "export", *(str(runs / s / "checkpoints" / "last.ckpt") for s in ("biqa", "constyle", "restorer", "ldm", "scm")),
              "--out", str(weights), "--no-onnx")
        early_ckpt = runs / "restorer" / "checkpoints" / f"step{plan.restorer_early_step:07d}.ckpt"
        r.cli("export-restorer-early", "export", str(early_ckpt), "--out", str(early), "--no-onnx")

        r.stage("Restore degraded images (automatic loop and --fast)")
        write_degraded_inputs(data, out / "inputs")
        r.cli("restore-auto", "restore", str(out / "inputs"), "--weights", str(weights), "--out", str(out / "restored"),
              "--steps", str(plan.diffusion_steps), "--strength", str(plan.strength), "--max-passes", str(plan.max_passes),
              *loop_flags(plan), "--device", "cpu")
        r.cli("restore-fast", "restore", str(out / "inputs"), "--weights", str(weights), "--out",
              str(out / "restored_fast"), "--fast", "--device", "cpu")

        r.stage(f"Evaluate on {len(EVAL_TASKS)} GIR-style tasks × {plan.eval_images} images")
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
              str(lines), "--steps", str(plan.diffusion_steps), "--strength", str(plan.strength), "--max-passes",
              str(plan.max_passes), *loop_flags(plan), "--compare-fast", *common)
    except StepFailed:
        return 1
    finally:
        if beside is not None:
            beside.stop()
    summarize(r, out, [(name, *stories[name]) for name in STEP_ORDER], time.perf_counter() - start)
    return 0


@dataclass
class Figures:
    """The mean figures of one evaluated method over the demo's tasks."""

    input_psnr: float
    psnr: float
    worst_task: str
    worst_gain: float
    worse: list[str]  # tasks whose output is worse than the input

    @property
    def gain(self) -> float:
        return self.psnr - self.input_psnr


def figures(metrics: dict) -> Figures:
    tasks = metrics["tasks"]
    gains = {t["task"]: t["psnr"] - t["input_psnr"] for t in tasks}
    worst = min(gains, key=gains.get)
    return Figures(sum(t["input_psnr"] for t in tasks) / len(tasks), sum(t["psnr"] for t in tasks) / len(tasks),
                   worst, gains[worst], [t for t, g in gains.items() if g < 0])


def biqa_accuracy(metrics: dict) -> Optional[float]:
    biqa = metrics.get("biqa")
    if not biqa:
        return None
    conf = biqa["confusion"]
    total = sum(map(sum, conf))
    return sum(conf[i][i] for i in range(len(conf))) / total if total else None


def summarize(r: Runner, out: Path, stories: list[tuple[str, str, str]], seconds: float) -> None:
    from rich.table import Table

    auto_metrics = json.loads((out / "report" / "metrics.json").read_text())
    auto, fast = figures(auto_metrics), figures(json.loads((out / "report_fast" / "metrics.json").read_text()))
    steps = Table(title="What each step started from", show_header=True)
    for col in ("step", "starts from", "loss over the run"):
        steps.add_column(col)
    for row in stories:
        steps.add_row(*row)

    table = Table(title=f"Headline figures ({TINY_NOTE})", show_header=True)
    for col, justify in (("figure", "left"), ("input", "right"), ("output", "right"), ("gain", "right"),
                         ("worst task (gain)", "left")):
        table.add_column(col, justify=justify)
    acc = biqa_accuracy(auto_metrics)
    table.add_row("BIQA accuracy, evaluated tasks + clean GTs", "", "–" if acc is None else f"{acc:.3f}", "", "")
    for label, f in (("restorer (--fast) mean PSNR (dB)", fast), ("automatic loop mean PSNR (dB)", auto)):
        table.add_row(label, f"{f.input_psnr:.2f}", f"{f.psnr:.2f}", f"{f.gain:+.2f}", f"{f.worst_task} ({f.worst_gain:+.2f})")
    stats = auto_metrics.get("line_stats", {}).get("psnr")
    n_lines = len(auto_metrics.get("lines", {}))
    if stats:
        dropped = f", {stats['n_dropped']} of {n_lines} task(s) left out: lines inverted or too close" if stats["n_dropped"] else ""
        table.add_row(f"automatic loop AR / ER (lines: early / final restorer{dropped})", "",
                      f"{stats['ar']:.2f} / {stats['er']:.2f}", "", "")
    else:
        table.add_row("automatic loop AR / ER", "", "no meaningful lines (inverted or too close)", "", "")
    table.add_row("demo wall time (Python part)", "", f"{seconds / 60:.1f} min", "", "")
    r.console.rule("[bold]Done")
    r.console.print(steps)
    r.console.print(table)
    for label, f in (("The --fast restorer", fast), ("The automatic loop", auto)):
        if f.gain < 0:
            r.console.print(f"[bold red]{label}'s output is WORSE than its input on average ({f.gain:+.2f} dB).[/bold red]")
        if f.worse:
            r.console.print(f"[yellow]{label}'s output is worse than its input on {len(f.worse)} of "
                            f"{len(auto_metrics['tasks'])} tasks: {', '.join(f.worse)}.[/yellow]")
    r.console.print(f"Report:            {(out / 'report' / 'report.html').resolve()}  (also report.md, metrics.json; "
                    "contact sheets input | automatic | --fast | clean)")
    r.console.print(f"Feed-forward report: {(out / 'report_fast' / 'report.html').resolve()}")
    r.console.print(f"Restored images:   {(out / 'restored').resolve()}/ (automatic loop, with a JSON log each), "
                    f"{(out / 'restored_fast').resolve()}/ (--fast); inputs in {(out / 'inputs').resolve()}/")
    r.console.print(f"Logs of every step: {(out / 'logs').resolve()}/")
    timings = {name: round(s, 1) for name, s in r.times.items()}
    summary = {"total_seconds": round(seconds, 1), "steps": timings, "biqa_accuracy": acc,
               "fast": dataclasses.asdict(fast), "auto": dataclasses.asdict(auto), "starts": stories}
    (out / "timings.json").write_text(json.dumps(summary, indent=2))


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
