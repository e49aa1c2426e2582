"""`Degrader`: draws per-sample degradation parameters and applies the op chain to a batch.

Every op runs on the whole batch and a per-sample mask picks its output (`torch.where`), so no
decision reads tensor values on the host, and each forward consumes the generator identically
whatever was drawn: the same seed and input give the same output on the same device.

Dominance rule (`label`): each applied op gets a severity (its `Op.severity`), normalised so that ≈1 is the top of
MiOIR's in-distribution range (noise σ 50, blur σ 3, JPEG q 30, ×4 down-sampling, haze β 2.5,
rain value 99, γ 3); the label is the applied type with the highest severity (ties: the earlier
type in DEGRADATION_TYPES) and "no" (index 0) when nothing was applied.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from lit_restore.config import DegradeConfig, check_degrade
from lit_restore.data.degrade.op import Draws, quantize_
from lit_restore.data.degrade.ops import OPS
from lit_restore.data.degrade.types import DEGRADATION_TYPES, type_index

if TYPE_CHECKING:
    from lit_restore.data.degrade.suite import Task


class Degrader(nn.Module):
    """Synthesises degraded twins of clean batches on their device; see the module docstring.

    `forward(gt, generator=None, depth=None, has_depth=None) -> (lq, label, types, params)`:
    gt (B, 3, H, W) float in [0, 1]; depth (B, 1, H, W) float or uint8 (uint8 is /255; larger is
    farther; each map is divided by its maximum), used for haze where `has_depth` (B,) is true
    (all rows when it is None) and a smooth synthetic depth elsewhere. Returns lq float32
    (B, 3, H, W) in [0, 1], label long (B,) the dominant type, types bool (B, len(DEGRADATION_TYPES))
    every type applied, and params: "<op>.<name>" → (B,) float drawn values, NaN where the op
    was not applied.
    """

    def __init__(self, cfg: DegradeConfig, task: Optional["Task"] = None) -> None:
        super().__init__()
        check_degrade(cfg)
        if cfg.mode == "task" and (task is None or task.name != cfg.task):
            # The task's fixed parameters live in the suite: `suite.degrader_for` looks them up.
            raise ValueError(f"degrade.mode=task: build the Degrader of task {cfg.task!r} with "
                             "lit_restore.data.degrade.suite.degrader_for")
        self.cfg = cfg
        self.chain: tuple[str, ...] = tuple(cfg.types)

    def extra_repr(self) -> str:
        return f"mode={self.cfg.mode}, chain={'→'.join(self.chain)}"

    # ------------------------------------------------------------------ which ops run

    def _applied(self, draws: Draws) -> Tensor:
        """(B, len(chain)) bool: which op each sample gets."""
        n = len(self.chain)
        probs = [float(getattr(self.cfg, op).prob) for op in self.chain]
        u, pick_u, clean_u = draws.rand(n), draws.rand(n), draws.rand()
        if self.cfg.mode == "task":
            return torch.ones_like(u, dtype=torch.bool)
        # Weighted choice of one op per sample (Efraimidis-Spirakis keys u^(1/w)); weight 0 never
        # wins. Columns are built from Python floats: no host→device copy inside a batch.
        log_u = pick_u.clamp_min(1e-12).log()
        keys = torch.stack([log_u[:, j] / p if p > 0 else torch.full_like(log_u[:, j], -math.inf)
                            for j, p in enumerate(probs)], dim=1)
        one = keys.argmax(dim=1, keepdim=True) == torch.arange(n, device=keys.device)  # one_hot reads max on a CPU
        if self.cfg.mode == "single":
            applied = one
        else:  # mixed: each op with its probability; a sample that drew none gets one
            applied = torch.stack([u[:, j] < p for j, p in enumerate(probs)], dim=1)
            applied = torch.where(applied.any(dim=1, keepdim=True), applied, one)
        return applied & (clean_u >= self.cfg.clean_fraction)[:, None]

    def _op(self, name: str, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Op `name` on every sample: (output, drawn parameters, severity)."""
        op, op_cfg = OPS[name], getattr(self.cfg, name)
        params = op.draw(op_cfg, draws)
        return op.apply(x, params, op_cfg), params, op.severity(params)

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, gt: Tensor, generator: Optional[torch.Generator] = None, depth: Optional[Tensor] = None,
                has_depth: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        if gt.ndim != 4 or gt.shape[1] != 3:
            raise ValueError(f"Degrader expects gt of shape (B, 3, H, W), got {tuple(gt.shape)}")
        if generator is not None and generator.device.type != gt.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {gt.device}")
        device, b = gt.device, gt.shape[0]
        draws = Draws(gt.shape, generator, device, depth, has_depth)
        with torch.autocast(device_type=device.type, enabled=False):  # blur/JPEG drift in half precision
            x = gt.float().clone()  # updated in place below; the caller's batch is left alone
            applied = self._applied(draws)
            severity = torch.full((b, len(DEGRADATION_TYPES)), -1.0, device=device)
            types = torch.zeros(b, len(DEGRADATION_TYPES), dtype=torch.bool, device=device)
            params: dict[str, Tensor] = {}
            for j, name in enumerate(self.chain):
                on = applied[:, j]
                y, drawn, sev = self._op(name, x, draws)
                if self.cfg.quantize:
                    y = quantize_(y)
                # x ← y where the op applies. lerp with weights 0/1 is exact (x + 0·(y − x) and
                # y − (y − x)·0) and ~2.5× faster than torch.where on a CPU; the ops give finite values.
                x.lerp_(y, on.view(-1, 1, 1, 1).float())
                col = type_index(name)
                types[:, col] = on
                severity[:, col] = torch.where(on, sev, -1.0)
                for key, value in drawn.items():
                    if value.ndim == 1:  # the drawn values; noise fields and depth maps are not reported
                        params[f"{name}.{key}"] = torch.where(on, value.float(), math.nan)
            label = torch.where(types.any(dim=1), severity.argmax(dim=1), 0)
            return x.clamp_(0, 1), label, types, params

