"""Down-sampling by a per-sample scale, then back up to the input size (scale-1 restoration, as MiOIR)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_restore.data.degrade.kernels import RESIZE_MODES, resample_matrices
from lit_restore.data.degrade.op import Draws, Op, Params
from lit_restore.errors import ConfigError


@dataclass
class LowresOpConfig:
    """Down by `scale`, then back up to the input size (scale-1 restoration, as MiOIR)."""

    prob: float = 0.3
    scale: list[float] = field(default_factory=lambda: [2.0, 4.0])  # MiOIR: fixed 4
    # Down-sampling filters, one drawn per sample (Real-ESRGAN draws from area/bilinear/bicubic).
    modes: list[str] = field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    up_mode: str = "bicubic"  # filter back to the input size: nearest, area, bilinear or bicubic


def lowres(x: Tensor, scale: Tensor, mode: Tensor, modes: tuple[str, ...], up_mode: str, min_scale: float) -> Tensor:
    """Down-sample each sample by its own `scale` (≥ `min_scale`) with filter `modes[mode]`, then
    back to H×W with `up_mode`, exactly as two `F.interpolate(size=...)` calls per sample would.

    Each resize is a per-sample matrix on each axis, so one batched matmul pair handles scales
    and filters that differ across the batch (`F.interpolate` takes one size for all).
    """
    b, _, h, w = x.shape
    scale = scale.clamp_min(min_scale)
    matrices = {}  # side → (down, up); a square image builds them once (~half the op's time)
    for size in {h, w}:
        small = torch.floor(size / scale).clamp(1, size)
        small_max = max(1, math.floor(size / min_scale))
        full = torch.full_like(small, size)
        down = torch.zeros(b, small_max, size, device=x.device)
        for k, name in enumerate(modes):
            m = resample_matrices(full, small, size, small_max, name)
            down = torch.where((mode == k).view(-1, 1, 1), m, down)
        matrices[size] = down, resample_matrices(small, full, small_max, size, up_mode)
    downs, ups = zip(matrices[h], matrices[w])
    # Separate down and up products (cheaper than one H×H matrix per axis when the low-res side
    # is ≤ H/2). Column products fold the channels into rows and row products repeat the small
    # matrices per channel, so no image-sized operand is ever copied by broadcasting.
    c = x.shape[1]
    small = torch.bmm(x.reshape(b, c * h, w), downs[1].transpose(1, 2))  # (B, C·H, w')
    small = torch.bmm(downs[0].repeat_interleave(c, dim=0), small.view(b * c, h, -1))  # (B·C, h', w')
    big = torch.bmm(ups[0].repeat_interleave(c, dim=0), small)  # (B·C, H, w')
    return torch.bmm(big.view(b, c * h, -1), ups[1].transpose(1, 2)).view(b, c, h, w)


def draw(c: LowresOpConfig, d: Draws) -> Params:
    return {"scale": d.uniform(c.scale), "mode": d.choice(len(c.modes))}


def apply(x: Tensor, p: Params, c: LowresOpConfig) -> Tensor:
    return lowres(x, p["scale"], p["mode"], tuple(c.modes), c.up_mode, float(c.scale[0]))


def severity(p: Params) -> Tensor:
    return torch.log2(p["scale"]) / 2


def check(c: LowresOpConfig, key: str) -> None:
    if not c.modes:
        raise ConfigError(f"{key}.modes: empty; give at least one of {', '.join(RESIZE_MODES)}")
    for i, mode in enumerate(c.modes):
        if mode not in RESIZE_MODES:
            raise ConfigError(f"{key}.modes[{i}]: {mode!r} is not allowed; choose one of {', '.join(RESIZE_MODES)}")
    if c.up_mode not in RESIZE_MODES:
        raise ConfigError(f"{key}.up_mode: {c.up_mode!r} is not allowed; choose one of {', '.join(RESIZE_MODES)}")


OP = Op(
    name="lowres", config=LowresOpConfig, draw=draw, apply=apply, severity=severity, prompt_word="low resolution",
    chain_rank=50, bounds={"scale": (1, 16)}, grid=({"scale": 2}, {"scale": 3}, {"scale": 4}), check=check,
)
