"""`Degrader`: picks which ops each sample gets, draws their parameters and applies the chain.

Each op runs only on the samples that get it (a sub-batch gathered by index), so a batch costs
what it applies: in `single` mode one op per sample, in the default `mixed` chain ~2.2 of 7. The
size of every sub-batch is fixed on the host before anything runs on the device, and which
samples fill it is drawn on the device (stratified assignment), so nothing reads the device:

- `clean_fraction` of the batch is left clean; the rest is split into one block per op, sized by
  the ops' weights (`<op>.prob`): each degraded sample gets exactly one "primary" op.
- `mixed` then adds each op to more samples, drawn among those whose primary it is not, so that
  each op reaches the same share of samples as independent draws would give (included with
  probability p, and a sample that drew none given one op with probability ∝ p: p + Π(1−p)·p/Σp,
  never below the primary share since Σp + Π(1−p) ≥ 1).
- Fractional counts are rounded at random on the host (systematic rounding for the blocks, so
  they sum to the batch), from `counts_seed`.

Compared with independent per-sample draws, the per-op frequencies are the same in expectation,
but a batch holds (up to rounding) exactly its expected count of each op instead of a binomial
count, and which ops share a sample differs slightly (one primary plus extras placed among the
other samples). `task` mode applies every op of the task to every sample and draws its numbers
exactly as the suite's test sets were made (suite version 1).

The same seed, input and `counts_seed` give the same output on the same device. Dominance rule
(`label`): each applied op gets a severity (its `Op.severity`), normalised so that ≈1 is the top
of MiOIR's in-distribution range (noise σ 50, blur σ 3, JPEG q 30, ×4 down-sampling, haze β 2.5,
rain value 99, γ 3); the label is the applied type with the highest severity (ties: the earlier
type in DEGRADATION_TYPES) and "no" (index 0) when nothing was applied.
"""

from __future__ import annotations

import math
import random
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
        self._op_apply = {name: OPS[name].apply for name in self.chain}

    def compile_ops(self) -> None:
        """torch.compile each op's `apply` (a GPU launches fewer kernels; the first batches pay
        the compile time). Batch dimension dynamic: sub-batch sizes change from batch to batch."""
        self._op_apply = {name: torch.compile(OPS[name].apply, dynamic=True) for name in self.chain}

    def extra_repr(self) -> str:
        return f"mode={self.cfg.mode}, chain={'→'.join(self.chain)}"

    # ------------------------------------------------------------------ which samples get which op

    def counts(self, b: int, rng: random.Random) -> tuple[int, list[int], list[int]]:
        """Host-side sizes for a batch of `b`: (clean samples, primary samples per op, extra
        samples per op), ops in chain order; see the module docstring."""
        probs = [float(getattr(self.cfg, op).prob) for op in self.chain]
        clean = _round(b * self.cfg.clean_fraction, rng)
        degraded, total = b - clean, sum(probs)
        # Systematic rounding: one uniform offset, so the blocks always sum to `degraded`.
        offset, cumulative, primary = rng.random(), 0.0, []
        for p in probs:
            start = math.floor(cumulative + offset)
            cumulative += degraded * p / total
            primary.append(math.floor(cumulative + offset) - start)
        primary[-1] += degraded - sum(primary)  # float rounding of the last edge
        extra = [0] * len(probs)
        if self.cfg.mode == "mixed":
            none = math.prod(1 - p for p in probs)
            for j, p in enumerate(probs):
                extra[j] = min(_round(degraded * p / total * (total + none - 1), rng), degraded - primary[j])
        return clean, primary, extra

    def assign(self, b: int, draws: Draws, counts_seed: int) -> list[Optional[Tensor]]:
        """Per op of the chain, the indices of the samples that get it (None: every sample)."""
        if self.cfg.mode == "task":
            n = len(self.chain)
            draws.rand(n), draws.rand(n), draws.rand()  # what the suite's version-1 test images consumed
            return [None] * n
        clean, primary, extra = self.counts(b, random.Random(counts_seed))
        order = draws.rand().argsort()  # a random permutation: clean block, then one block per op
        picked: list[Optional[Tensor]] = []
        start = clean
        for j, (own, more) in enumerate(zip(primary, extra)):
            block = order[start : start + own]
            start += own
            if more:
                # The extras: the `more` lowest keys among the degraded samples whose primary is not this op.
                key = draws.rand().index_fill_(0, order[:clean], 2.0).index_fill_(0, block, 2.0)
                block = torch.cat([block, key.topk(more, largest=False).indices])
            picked.append(None if block.numel() == b else block)
        return picked

    def _op(self, name: str, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Op `name` on every sample of `x`: (output, drawn parameters, severity)."""
        op, op_cfg = OPS[name], getattr(self.cfg, name)
        params = op.draw(op_cfg, draws)
        return self._op_apply[name](x, params, op_cfg), params, op.severity(params)

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, gt: Tensor, generator: Optional[torch.Generator] = None, depth: Optional[Tensor] = None,
                has_depth: Optional[Tensor] = None, counts_seed: Optional[int] = None
                ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        if gt.ndim != 4 or gt.shape[1] != 3:
            raise ValueError(f"Degrader expects gt of shape (B, 3, H, W), got {tuple(gt.shape)}")
        if generator is not None and generator.device.type != gt.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {gt.device}")
        if counts_seed is None:  # a host value: the generator's seed, else Python's own generator
            counts_seed = generator.initial_seed() if generator is not None else random.getrandbits(63)
        device, b = gt.device, gt.shape[0]
        with torch.autocast(device_type=device.type, enabled=False):  # blur/JPEG drift in half precision
            x = gt.float().clone()  # updated in place below; the caller's batch is left alone
            picked = self.assign(b, Draws(gt.shape, generator, device), counts_seed)
            severity = torch.full((b, len(DEGRADATION_TYPES)), -1.0, device=device)
            types = torch.zeros(b, len(DEGRADATION_TYPES), dtype=torch.bool, device=device)
            params: dict[str, Tensor] = {}
            for name, index in zip(self.chain, picked):
                if index is not None and index.numel() == 0:
                    continue
                sub = x if index is None else x[index]  # advanced indexing: ~1.6× faster than index_select here
                draws = Draws(sub.shape, generator, device, _rows(depth, index), _rows(has_depth, index))
                y, drawn, sev = self._op(name, sub, draws)
                if self.cfg.quantize:
                    y = quantize_(y, clamp=not OPS[name].in_range)
                col = type_index(name)
                if index is None:
                    x, types[:, col], severity[:, col] = y, True, sev
                else:
                    x.index_copy_(0, index, y)
                    types[:, col].index_fill_(0, index, True)
                    severity[:, col].index_copy_(0, index, sev.float())
                for key, value in drawn.items():
                    if value.ndim == 1:  # the drawn values; noise fields and depth maps are not reported
                        params[f"{name}.{key}"] = value.float() if index is None else torch.full(
                            (b,), math.nan, device=device).index_copy_(0, index, value.float())
            label = torch.where(types.any(dim=1), severity.argmax(dim=1), 0)
            # Quantized op outputs are in [0, 1] already, and so are the untouched samples.
            return x if self.cfg.quantize else x.clamp_(0, 1), label, types, params


def _round(value: float, rng: random.Random) -> int:
    """`value` rounded down or up at random, up with probability its fractional part."""
    return math.floor(value + rng.random())


def _rows(t: Optional[Tensor], index: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or index is None else t[index]
