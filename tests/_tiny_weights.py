"""Exported weights of randomly initialised tiny stages, as `lit-restore export` writes them
after training (restore/evaluate tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_restore.config import load_config, to_dict
from lit_restore.export import export_command
from lit_restore.fit import build_stage

REPO = Path(__file__).resolve().parent.parent


def export_tiny(stage_name: str, out: Path, tmp: Path, overrides=()) -> None:
    """Build configs/tiny/<stage>.yaml with random weights, save a checkpoint, export it into `out`."""
    torch.manual_seed(0)
    stage = build_stage(load_config(REPO / f"configs/tiny/{stage_name}.yaml", list(overrides)))
    stage.configure_model()
    if stage_name == "ldm":
        stage.setup("fit")  # the prompt contexts of its text tower, as training computes them
    ckpt = tmp / f"{stage_name}.ckpt"
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": {"config": to_dict(stage.cfg)}, "global_step": 1}, ckpt)
    assert export_command(str(ckpt), str(out), ema=True, onnx=False) == 0


def export_loop(out: Path, tmp: Path) -> None:
    """Every stage the automatic loop needs (BIQA, LDM, SCM) into `out`; the LDM's text tower is the
    BIQA checkpoint's, as in the demo."""
    export_tiny("biqa", out, tmp)
    export_tiny("ldm", out, tmp, [f"model.clip.pretrained={tmp / 'biqa.ckpt'}"])
    export_tiny("scm", out, tmp)
