"""Jobs of `lit-restore` commands run one after another with a header, a spinner and a log file
each: what `make demo` and `make foundations` run. Also the CSV-log readers they summarise with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent


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

    def cli(self, name: str, *args: str, ok_codes: Sequence[int] = (0,), steps: int = 0, run_dir: Optional[Path] = None
            ) -> str:
        """`python -m lit_restore.cli ARGS`; returns its stdout+stderr, raises StepFailed on a bad exit
        code. A training command (`steps`, `run_dir`) shows its step and the time left."""
        cmd = [sys.executable, "-m", "lit_restore.cli", *args]
        log = self.logs / f"{name}.log"
        start = time.perf_counter()
        label = f"lit-restore {' '.join(args[:2])}"
        with self.console.status(f"{label} …  (log: {log})") as status:
            with open(log, "w") as f:
                f.write("$ lit-restore " + " ".join(args) + "\n")
                f.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
                while proc.poll() is None:
                    time.sleep(1.0)
                    if steps and run_dir is not None:
                        status.update(f"{label}: {progress_text(run_dir, steps, time.perf_counter() - start)}")
                code = proc.returncode
        seconds = time.perf_counter() - start
        self.times[name] = seconds
        text = log.read_text(errors="replace")
        if code not in ok_codes:
            tail = "\n".join(text.splitlines()[-15:])
            self.console.print(f"[red]{name} failed (exit code {code}); last lines of {log}:[/red]\n{tail}")
            raise StepFailed(name)
        self.console.print(f"  {name}: done in {seconds:.0f} s")
        return text


def progress_text(run_dir: Path, steps: int, elapsed: float) -> str:
    """'step N/M, ~S s left' from the run's CSV log (written every log_every_n_steps)."""
    done = last_metric(run_dir, "step")
    if not done:
        return f"starting ({elapsed:.0f} s)"
    done = int(done) + 1
    left = elapsed / done * max(steps - done, 0)
    return f"step {done}/{steps}, ~{left:.0f} s left"


def metric_values(run_dir: Path, name: str) -> list[float]:
    """Every logged value of `name` in the newest CSV log of a run dir, in order. Each demo and
    foundation step is one fresh run (`resume=never`); older logs there are an earlier run's."""
    import csv

    logs = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if not logs:
        return []
    with open(logs[-1], newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def last_metric(run_dir: Path, name: str) -> Optional[float]:
    """The last logged value of `name` in a run's CSV logs."""
    values = metric_values(run_dir, name)
    return values[-1] if values else None


def loss_story(run_dir: Path) -> str:
    """'train/loss a → b' over the run: the means of its first and last quarter of logged values
    (a diffusion loss depends on each batch's random timesteps, so a few values say little)."""
    losses = metric_values(run_dir, "train/loss")
    if not losses:
        return "no loss logged"
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return f"train/loss {first:.4f} → {last:.4f} ({'down' if last < first else 'NOT down'})"
