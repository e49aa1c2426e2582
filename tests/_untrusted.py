"""Files a stranger could hand over: a checkpoint whose pickle runs code when it is loaded."""

from __future__ import annotations

from pathlib import Path

import torch


class RunsCode:
    """Unpickling this creates `marker`: stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_running_checkpoint(path: Path, marker: Path, state_dict: dict | None = None) -> Path:
    """A `.ckpt` that looks like a Lightning checkpoint and creates `marker` when unpickled."""
    torch.save({"state_dict": state_dict or {}, "hyper_parameters": {"config": RunsCode(marker)}}, path)
    return path
