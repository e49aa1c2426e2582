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


def test_restore_and_evaluate_take_the_same_settings_with_one_set_of_defaults():
    from lit_restore.cli import _settings_from, build_parser
    from lit_restore.settings import LoopSettings, RunSettings, SamplerSettings, TileSettings

    parser = build_parser()
    restore = parser.parse_args(["restore", "x.png", "--weights", "w", "--out", "o"])
    evaluate = parser.parse_args(["evaluate", "--weights", "w", "--data", "d", "--out", "o"])
    defaults = {"sampling": SamplerSettings(), "tiles": TileSettings(), "loop": LoopSettings(), "run_settings": RunSettings()}
    assert _settings_from(restore) == _settings_from(evaluate) == defaults
    flags = ["--steps", "7", "--strength", "0.5", "--tile", "64", "--overlap", "8", "--max-passes", "2",
             "--scm-every-pass", "--device", "cpu", "--seed", "3", "--guidance-text", "2"]
    for args in (["restore", "x.png", "--weights", "w", "--out", "o"], ["evaluate", "--weights", "w", "--data", "d", "--out", "o"]):
        got = _settings_from(parser.parse_args(args + flags))
        assert got["sampling"] == SamplerSettings(steps=7, strength=0.5, guidance_text=2.0)
        assert got["tiles"] == TileSettings(64, 8) and got["loop"] == LoopSettings(2, True)
        assert got["run_settings"] == RunSettings(device="cpu", seed=3)
