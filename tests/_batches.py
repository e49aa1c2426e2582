"""Stage unit-test helpers: a tiny stage with its networks built, and a device batch of random
clean images through the stage's own `on_after_batch_transfer` (so the Degrader fills lq, label
and types)."""

from pathlib import Path

import torch

from lit_restore.config import load_config
from lit_restore.fit import build_stage

ROOT = Path(__file__).resolve().parents[1]


def tiny_stage(name: str, *overrides: str, fit_setup: bool = False):
    """The stage of configs/tiny/<name>.yaml with `overrides`, seeded, networks built, in train mode.
    `fit_setup` builds them through `setup("fit")`, for stages that load frozen parts there."""
    torch.manual_seed(0)
    stage = build_stage(load_config(ROOT / "configs" / "tiny" / f"{name}.yaml", list(overrides)))
    if fit_setup:
        stage.setup("fit")
    else:
        stage.configure_model()
    return stage.train()


def device_batch(stage, n: int = 4, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    host = {"gt": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "key": [f"k{seed}_{i}" for i in range(n)]}
    return stage.on_after_batch_transfer(host)
