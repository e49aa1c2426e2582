"""`lit-restore sbatch`: render a SLURM job script for a config from slurm/fit.sbatch.template and
optionally submit it.

The job runs `srun lit-restore fit <run dir>/sbatch_config.yaml`: the config resolved at render
time (overrides, node and device counts included), so a requeued job trains exactly what was
submitted even if the original YAML changes later.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Optional

from lit_restore.config import ConfigError, load_config, to_yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "fit.sbatch.template"
# SLURM jobs named like this are treated by Lightning as interactive shells (no SLURM environment).
INTERACTIVE_NAMES = ("bash", "interactive")
# What reaches an #SBATCH line unquoted (those lines are not shell, so quoting cannot help): a
# newline there would end the directive and start a line the job runs.
PARTITION = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")
# sbatch --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, and the unlimited keywords.
TIME = re.compile(r"[0-9]+(-[0-9]+)?(:[0-9]+){0,2}|(?i:unlimited|infinite)")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def lit_restore_command() -> list[str]:
    """How to start lit-restore on the compute nodes: this environment's entry point (a shared
    filesystem is assumed, as for the run dir), or the module when no script was installed."""
    script = Path(sys.executable).parent / "lit-restore"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lit_restore.cli"]


def render_sbatch(command: list[str], run_dir: Path, job_name: str, nodes: int, devices_per_node: int,
                  cpus_per_task: int, gpus: bool, partition: Optional[str] = None, time: Optional[str] = None,
                  script: Optional[Path] = None) -> str:
    """The job script text: `srun command` on `nodes` × `devices_per_node` tasks.

    Every value that reaches an #SBATCH line is checked against what SLURM accepts there (a
    newline or shell metacharacter is refused with a ConfigError); shell lines get quoted values.
    """
    if nodes < 1 or devices_per_node < 1 or cpus_per_task < 1:
        raise ConfigError(f"sbatch: --nodes ({nodes}), --devices-per-node ({devices_per_node}) and "
                          f"--cpus-per-task ({cpus_per_task}) must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", job_name) or job_name in INTERACTIVE_NAMES:
        raise ConfigError(f"sbatch: --job-name {job_name!r}: use letters, digits, '.', '_', '-' "
                          f"(and not {' or '.join(INTERACTIVE_NAMES)})")
    if not re.fullmatch(r"[A-Za-z0-9._/+-]+", str(run_dir)):
        # #SBATCH lines are not shell: a quoted or spaced --output path is not understood everywhere.
        raise ConfigError(f"out_dir: {str(run_dir)!r} must be a path of letters, digits and . _ / + - for a SLURM job")
    if partition is not None and not PARTITION.fullmatch(partition):
        raise ConfigError(f"sbatch: --partition {partition!r}: use partition names of letters, digits, '.', '_', '-', "
                          "separated by commas")
    if time is not None and not TIME.fullmatch(time):
        raise ConfigError(f"sbatch: --time {time!r}: use minutes, [D-]HH:MM:SS (or MM:SS, D-HH, D-HH:MM) or UNLIMITED")
    # Quoted below, but a script path with a newline or other control character is surely an accident.
    for what, value in (("--out", str(script or "")), ("the working directory", os.getcwd())):
        if CONTROL.search(value):
            raise ConfigError(f"sbatch: {what} {value!r} holds a newline or another control character")
    optional = []
    if gpus:
        optional.append(f"#SBATCH --gres=gpu:{devices_per_node}")
    if partition:
        optional.append(f"#SBATCH --partition={partition}")
    if time:
        optional.append(f"#SBATCH --time={time}")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job_name, nodes=nodes, devices_per_node=devices_per_node, cpus_per_task=cpus_per_task,
        optional_lines="".join(line + "\n" for line in optional), run_dir=str(run_dir),
        workdir=shlex.quote(os.getcwd()), command=shlex.join(command),
        script=shlex.quote(str(script or run_dir / "job.sbatch")),
    )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def sbatch_command(config: str, overrides: list[str], nodes: int, devices_per_node: int, partition: Optional[str],
                   time: Optional[str], cpus_per_task: int, gpus: bool, job_name: Optional[str], submit: bool,
                   out: Optional[str]) -> int:
    """Resolve the config for `nodes` × `devices_per_node`, write it and the job script into the run
    dir (or `out`), print the script path, and submit it with sbatch when asked."""
    placement = [f"trainer.num_nodes={nodes}", f"trainer.devices={devices_per_node}"]
    accelerator = load_config(config, list(overrides)).trainer.get("accelerator", "auto")
    if gpus and accelerator == "cpu":
        raise ConfigError(f"sbatch: the config trains on the CPU (trainer.accelerator=cpu) but the job asks for "
                          f"{devices_per_node} GPU(s) per node: add --no-gpus for a CPU job, or trainer.accelerator=gpu")
    if not gpus and accelerator not in ("cpu", "auto"):
        raise ConfigError(f"sbatch: --no-gpus asks for a CPU job but the config sets trainer.accelerator={accelerator}: "
                          "drop --no-gpus, or add trainer.accelerator=cpu")
    placement.append(f"trainer.accelerator={'gpu' if gpus else 'cpu'}")  # "auto" made explicit
    cfg = load_config(config, list(overrides) + placement)
    run_dir = Path(cfg.out_dir).absolute()
    cfg.out_dir = str(run_dir)
    job_config = run_dir / "sbatch_config.yaml"
    script = Path(out).absolute() if out else run_dir / "job.sbatch"
    name = job_name or run_dir.name
    # Rendered (and so every value checked) before anything is written.
    text = render_sbatch(
        [*lit_restore_command(), "fit", str(job_config)], run_dir=run_dir, job_name=name,
        nodes=nodes, devices_per_node=devices_per_node, cpus_per_task=cpus_per_task, gpus=gpus,
        partition=partition, time=time, script=script,
    )
    write_atomic(job_config, to_yaml(cfg))
    write_atomic(script, text, mode=0o755)
    print(f"wrote {script}")
    if not submit:
        print(f"submit with: sbatch {script}")
        return 0
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        print("lit-restore: sbatch not found; submit the script on a SLURM login node", file=sys.stderr)
        return 1
    if result.returncode != 0:
        print(f"lit-restore: sbatch failed: {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; log: {run_dir / f'slurm-{name}.out'}")
    return 0
