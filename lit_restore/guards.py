"""What a non-finite loss does: skip the optimizer step, or stop the run with a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (checkpoint.on_nan=stop)."""


def grads_finite(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One bool tensor: every gradient of `params` is finite (a NaN/Inf loss makes them NaN/Inf)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    # A single sum per step: finite exactly when every element is finite.
    total = torch.stack([g.detach().float().sum() for g in grads]).sum()
    return torch.isfinite(total)


class NonFiniteGuard(L.Callback):
    """Checks the gradients before each optimizer step. On NaN/Inf: `skip` drops the gradients,
    so the optimizer leaves the weights (and its moments) as they were, and counts the step in
    `train/skipped_steps`; `stop` does the same, then saves `checkpoints/nonfinite_stepN.ckpt`
    (the weights before the bad step) and ends training, after which `fit` raises
    NonFiniteLossError. After `max_in_row` skipped steps in a row, `skip` stops too.

    Ranks decide together: with sharded strategies each rank sees only its gradients."""

    def __init__(self, policy: str, max_in_row: int, checkpoint_dir: str | Path) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"on_nan: {policy!r} is not one of skip, stop")
        self.policy = policy
        self.max_in_row = max_in_row
        self.checkpoint_dir = Path(checkpoint_dir)
        self.skipped = 0
        self.in_row = 0
        self._bad_step = False
        self.stopped_message: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local_ok = bool(grads_finite(params))
        all_ok = trainer.strategy.reduce_boolean_decision(local_ok, all=True)
        self._bad_step = not all_ok
        if self._bad_step:
            # Without gradients torch optimizers leave a parameter and its state untouched.
            for p in params:
                p.grad = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._bad_step:
            self.in_row = 0
            pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
            return
        self._bad_step = False
        self.skipped += 1
        self.in_row += 1
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
        step = trainer.global_step
        if self.policy == "skip" and self.in_row < self.max_in_row:
            rank_zero_info(f"non-finite loss/gradients at step {step}: step skipped ({self.skipped} so far)")
            return
        path = self.checkpoint_dir / f"nonfinite_step{step:07d}.ckpt"
        trainer.save_checkpoint(path)
        why = "checkpoint.on_nan=stop" if self.policy == "stop" else f"{self.in_row} skipped steps in a row"
        self.stopped_message = (
            f"training stopped at step {step}: non-finite loss/gradients ({why}); weights before the bad step "
            f"saved to {path}; lower optim.lr, check the data, or resume with resume={path}"
        )
        trainer.should_stop = True
