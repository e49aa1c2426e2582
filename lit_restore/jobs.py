"""Jobs of `lit-restore` commands run one after another with a header, a spinner and a log file
each, and a chain of them beside (`Beside`): what `make demo` and `make foundations` run. Also the CSV-log readers they summarise with."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
        label = f"lit-restore {' '.join(args[:2])}"
        with self.console.status(f"{label} …  (log: {self.logs / f'{name}.log'})") as status:
            job = self.start(name, args)
            while job.proc.poll() is None:
                time.sleep(1.0)
                if steps and run_dir is not None:
                    status.update(f"{label}: {progress_text(run_dir, steps, time.perf_counter() - job.started)}")
        text = self.finish(job, ok_codes)
        self.console.print(f"  {name}: done in {self.times[name]:.0f} s")
        return text

    def start(self, name: str, args: Sequence[str]) -> "Job":
        """Launch `python -m lit_restore.cli ARGS` with its output going to logs/NAME.log."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ lit-restore " + " ".join(args) + "\n")
            f.flush()
            proc = subprocess.Popen([sys.executable, "-m", "lit_restore.cli", *args], cwd=REPO, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT)
        return Job(name, proc, log, time.perf_counter())

    def finish(self, job: "Job", ok_codes: Sequence[int] = (0,)) -> str:
        """Wait for a job; its output, or StepFailed (with the log's last lines shown) on a bad exit code."""
        code = job.proc.wait()
        job.ended = job.ended or time.perf_counter()
        self.times[job.name] = job.ended - job.started
        text = job.log.read_text(errors="replace")
        if code not in ok_codes:
            tail = "\n".join(text.splitlines()[-15:])
            self.console.print(f"[red]{job.name} failed (exit code {code}); last lines of {job.log}:[/red]\n{tail}")
            raise StepFailed(job.name)
        return text


@dataclass
class Job:
    name: str
    proc: subprocess.Popen
    log: Path
    started: float
    ended: Optional[float] = None  # set by whoever saw it end first


class Beside:
    """Commands run one after another in a thread while the Runner's own steps go on. A tiny `fit`
    gives torch one thread per core it leaves free (lit_restore.threads), one on a 2-core machine,
    and a second thread would not pay: the tiny SCM's step took 50 s for 60 steps at two threads
    against 37 s at one. So a second chain of independent steps uses the other core at little
    cost to the first (docs/benchmarks.md, "Demo")."""

    def __init__(self, runner: Runner, steps: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.runner, self.steps = runner, list(steps)
        self.jobs: list[Job] = []
        self.error: Optional[Exception] = None
        self.stopped = False
        self.lock = threading.Lock()  # a job is started and recorded, or the chain is stopped: not both at once
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for name, args in self.steps:
            with self.lock:
                if self.stopped:
                    return
                try:
                    job = self.runner.start(name, args)
                except OSError as e:
                    self.error = e
                    return
                self.jobs.append(job)
            code = job.proc.wait()
            job.ended = time.perf_counter()
            if code != 0:
                return

    def join(self) -> None:
        """Wait for the chain; print each step's time, or raise StepFailed for the first that failed."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        for job in self.jobs:
            self.runner.finish(job)
            self.runner.console.print(f"  {job.name}: done in {self.runner.times[job.name]:.0f} s (in the background)")

    def stop(self) -> None:
        """End the chain early (the main steps failed): the running command is terminated."""
        with self.lock:
            self.stopped = True
            for job in self.jobs:
                if job.proc.poll() is None:
                    job.proc.terminate()
        self.thread.join()


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
