"""The command line's own behaviour: --version, `python -m lit_restore`, and the trainer's output
(steps of max_steps, no tips that do not apply)."""

import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L

import lit_restore
from lit_restore.fit import StepProgressBar, quiet_lightning_tips

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_lit_restore_version():
    out = subprocess.run([sys.executable, "-m", "lit_restore", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"lit-restore {lit_restore.__version__}"


def test_progress_bar_counts_steps_of_max_steps():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=250)
    assert bar.total_train_batches == 250
    assert "Epoch" not in bar._get_train_description(0)


def test_lightning_tips_are_silenced(caplog, monkeypatch):
    from lightning.fabric.plugins.environments import slurm

    quiet_lightning_tips()
    with caplog.at_level(logging.INFO):
        L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    assert "litlogger" not in caplog.text and "litmodels" not in caplog.text
    # srun on the PATH of a machine that is not running a SLURM job: the hint does not apply.
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning_tips()
        slurm.SLURMEnvironment._validate_srun_used()
    assert not [w for w in caught if "srun" in str(w.message)]
