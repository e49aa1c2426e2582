"""A device batch for stage unit tests: random clean images through the stage's own
`on_after_batch_transfer` (so the Degrader fills lq, label and types)."""

import torch


def device_batch(stage, n: int = 4, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    host = {"gt": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "key": [f"k{seed}_{i}" for i in range(n)]}
    return stage.on_after_batch_transfer(host)
