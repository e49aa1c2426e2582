"""Gaussian (isotropic or rotated anisotropic) or motion blur, one kernel per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import kornia
import torch
from torch import Tensor

from lit_restore.data.degrade.kernels import RADIANS_PER_DEGREE, gaussian_kernels, line_kernels, odd_ceil
from lit_restore.data.degrade.op import Draws, Op, Params
from lit_restore.errors import ConfigError


@dataclass
class BlurOpConfig:
    """Gaussian (isotropic or rotated anisotropic) or motion blur, one kernel per sample."""

    prob: float = 0.3
    kernel_size: list[int] = field(default_factory=lambda: [7, 21])  # odd support of Gaussian kernels (MiOIR)
    sigma: list[float] = field(default_factory=lambda: [1.0, 3.0])  # Gaussian σ in pixels (MiOIR)
    aniso_prob: float = 0.3  # σx, σy drawn separately, kernel rotated by `angle`
    angle: list[float] = field(default_factory=lambda: [0.0, 180.0])  # degrees
    motion_prob: float = 0.2  # a straight motion streak instead of a Gaussian
    motion_length: list[float] = field(default_factory=lambda: [5.0, 21.0])  # pixels


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each sample with its own (k, k) kernel: one grouped convolution for the batch.
    Borders reflect, or repeat the edge on images too small to reflect a half kernel."""
    border = "reflect" if min(x.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(x, kernels, border_type=border)


def draw(c: BlurOpConfig, d: Draws) -> Params:
    ksize = d.odd(c.kernel_size)
    sigma_x = d.uniform(c.sigma)
    sigma_y = torch.where(d.bernoulli(c.aniso_prob), d.uniform(c.sigma), sigma_x)
    angle = d.uniform(c.angle)
    motion, length = d.bernoulli(c.motion_prob), d.uniform(c.motion_length)
    return {"sigma_x": sigma_x, "sigma_y": sigma_y, "angle": angle, "kernel_size": ksize,
            "motion": motion.float(), "motion_length": torch.where(motion, length, math.nan)}


def apply(x: Tensor, p: Params, c: BlurOpConfig) -> Tensor:
    size = int(c.kernel_size[1])  # one kernel side for the batch, that of the largest kernel drawable
    if c.motion_prob > 0:
        size = max(size, odd_ceil(c.motion_length[1]))
    angle = p["angle"] * RADIANS_PER_DEGREE
    kernels = gaussian_kernels(p["sigma_x"], p["sigma_y"], angle, p["kernel_size"], size)
    if c.motion_prob > 0:
        # NaN lengths (no motion) give all-zero streaks, which the selection drops.
        streak = line_kernels(p["motion_length"], angle, torch.full_like(angle, 0.5), size)
        kernels = torch.where(p["motion"].bool().view(-1, 1, 1), streak, kernels)
    return blur(x, kernels)


def severity(p: Params) -> Tensor:
    # A streak of length L has the spread of a Gaussian of σ = L/√12 along it.
    return torch.where(p["motion"].bool(), p["motion_length"] / math.sqrt(12),
                       torch.sqrt(p["sigma_x"] * p["sigma_y"])) / 3


def check(c: BlurOpConfig, key: str) -> None:
    if any(k % 2 == 0 for k in c.kernel_size):
        raise ConfigError(f"{key}.kernel_size: {list(c.kernel_size)} must be odd")


OP = Op(
    name="blur", config=BlurOpConfig, draw=draw, apply=apply, severity=severity, prompt_word="blur", chain_rank=40,
    bounds={"kernel_size": (3, 63), "sigma": (0.1, 20), "aniso_prob": (0, 1), "angle": (-360, 360),
            "motion_prob": (0, 1), "motion_length": (1, 63)},
    grid=({"sigma": 1}, {"sigma": 2}, {"sigma": 3}), check=check,
    in_range=True,
)
