"""What a non-finite loss does: skip the optimizer step, or stop the run with a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (checkpoint.on_nan=stop)."""


def grads_finite(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One bool tensor: every gradient of `params` is finite (a NaN/Inf loss makes them NaN/Inf).
    The total norm is a few multi-tensor kernels (one per device and dtype), not one per tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # FSDP2 DTensor gradients: a norm over every rank's shards
        total = total.full_tensor()
    return torch.isfinite(total)


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether this training step's logged values reach the loggers (Lightning's own cadence,
    `trainer.log_every_n_steps`): values read on the host are read only then."""
    return trainer._logger_connector.should_update_logs


def gates_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers whose step reads a `found_inf` tensor and skips the update on the device when
    it is 1 (fused Adam/AdamW, what GradScaler uses): no host read needed to skip a step."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class NonFiniteGuard(L.Callback):
    """Checks the gradients before each optimizer step. On NaN/Inf: `skip` leaves the weights
    (and the optimizer's moments and step count) as they were and counts the step in
    `train/skipped_steps`; `stop` does the same, then saves `checkpoints/nonfinite_stepN.ckpt`
    (the weights before the bad step) and ends training, after which `fit` raises
    NonFiniteLossError. After `max_in_row` skipped steps in a row, `skip` stops too.

    With a fused optimizer (the stages' AdamW) `skip` reads nothing on the host between logging
    steps: the verdict goes to the optimizer as `found_inf` (its kernel skips the update), the
    counters stay on the device and are read on logging steps, where a run of `max_in_row` bad
    steps is noticed (up to `log_every_n_steps` late). `stop` reads the verdict every step, to
    save the weights right before the bad one. Other optimizers read it every step and drop the
    gradients.

    Ranks decide together: with sharded strategies each rank sees only its gradients."""

    def __init__(self, policy: str, max_in_row: int, checkpoint_dir: str | Path) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"on_nan: {policy!r} is not one of skip, stop")
        self.policy = policy
        self.max_in_row = max_in_row
        self.checkpoint_dir = Path(checkpoint_dir)
        self.skipped = 0  # as of the last read of the device counters
        self._bad: Optional[torch.Tensor] = None  # this step's verdict, 1.0 = skipped
        self._total_t: Optional[torch.Tensor] = None  # skipped steps, on the device
        self._in_row_t: Optional[torch.Tensor] = None
        self._longest_t: Optional[torch.Tensor] = None  # longest run of bad steps since the last read
        self.stopped_message: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": int(self._total_t) if self._total_t is not None else self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self._total_t = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        bad = (~grads_finite(params)).to(pl_module.device, torch.float32)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")  # a collective, no host read
        if gates_on_device(optimizer):
            optimizer.found_inf = bad  # read by the fused kernel; GradScaler (16-mixed) sets its own
        elif bool(bad):
            # Without gradients torch optimizers leave a parameter and its state untouched.
            for p in params:
                p.grad = None
        if self._total_t is None:
            self._total_t = torch.full_like(bad, float(self.skipped))
            self._in_row_t, self._longest_t = torch.zeros_like(bad), torch.zeros_like(bad)
        self._total_t += bad
        self._in_row_t = (self._in_row_t + 1) * bad
        self._longest_t = torch.maximum(self._longest_t, self._in_row_t)
        self._bad = bad

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bad, self._bad = self._bad, None
        if bad is None:  # no optimizer step in this batch (gradient accumulation)
            return
        step = trainer.global_step
        if self.policy == "stop" and bool(bad):
            self.skipped = int(self._total_t)
            self._stop(trainer, pl_module, step, "checkpoint.on_nan=stop", "the weights before the bad step")
            return
        if trainer.log_every_n_steps > 0 and not is_logging_step(trainer):
            return  # (with logging off, log_every_n_steps=0, the counters are read every step)
        skipped, longest = (int(v) for v in torch.stack([self._total_t, self._longest_t]).tolist())
        self.skipped = skipped
        self._longest_t.copy_(self._in_row_t)
        pl_module.log("train/skipped_steps", self._total_t, rank_zero_only=True)
        if longest >= self.max_in_row:
            self._stop(trainer, pl_module, step, f"{self.max_in_row} skipped steps in a row",
                       "the weights (the skipped steps left them unchanged)")
        elif longest:
            rank_zero_info(f"non-finite loss/gradients by step {step}: {skipped} step(s) skipped so far")

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, why: str, what: str) -> None:
        pl_module.log("train/skipped_steps", self._total_t, rank_zero_only=True)
        path = self.checkpoint_dir / f"nonfinite_step{step:07d}.ckpt"
        trainer.save_checkpoint(path)
        self.stopped_message = (
            f"training stopped at step {step}: non-finite loss/gradients ({why}); {what} saved to {path}; "
            f"lower optim.lr, check the data, or resume with resume={path}"
        )
        trainer.should_stop = True
