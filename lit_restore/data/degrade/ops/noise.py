"""Sensor noise: Gaussian (colour or gray) or Poisson, from one normal draw per pixel."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import kornia
import torch
from torch import Tensor

from lit_restore.data.degrade.op import Draws, Op, Params, per_image


@dataclass
class NoiseOpConfig:
    """Sensor noise: Gaussian (colour or gray) or Poisson, one normal draw per pixel."""

    prob: float = 0.3  # inclusion probability in mode=mixed; relative weight in mode=single
    sigma: list[float] = field(default_factory=lambda: [15.0, 50.0])  # Gaussian σ in 8-bit levels (MiOIR)
    gray_prob: float = 0.4  # same noise on every channel (Real-ESRGAN 0.4; MiOIR 0)
    poisson_prob: float = 0.3  # Poisson noise instead of Gaussian (Real-ESRGAN 0.5)
    poisson_scale: list[float] = field(default_factory=lambda: [0.05, 3.0])  # Real-ESRGAN


def noise(x: Tensor, sigma: Tensor, poisson_scale: Tensor, gray: Tensor, normal: Tensor) -> Tensor:
    """Gaussian noise of σ `sigma` (8-bit levels) plus Poisson noise of `poisson_scale`, from one
    standard normal draw per pixel (`normal`, shaped like `x`; its first channel is used for
    every channel of the `gray` samples).

    Poisson counts are taken at 256 levels per unit intensity, as BasicSR does for 8-bit images
    (its `2**ceil(log2(unique values))`), and drawn with the normal approximation N(λ, λ): exact
    enough from about 10 counts up, and `torch.poisson` costs as much as the rest of the chain on
    a CPU. Gray Poisson noise follows the luma, like BasicSR's gray branch.
    """
    # Per-sample selection as lerp with 0/1 weights: exact, and faster than torch.where on a CPU.
    gray4 = per_image(gray).float()
    n = torch.lerp(normal, normal[:, :1], gray4)
    level = torch.lerp(x, kornia.color.rgb_to_grayscale(x), gray4)
    # In place from here on: on a CPU, allocating a fresh image costs more than the arithmetic.
    std = level.clamp_(min=0).mul_(per_image(poisson_scale**2 / 256)).add_(per_image((sigma / 255) ** 2)).sqrt_()
    return std.mul_(n).add_(x)


def draw(c: NoiseOpConfig, d: Draws) -> Params:
    sigma, scale = d.uniform(c.sigma), d.uniform(c.poisson_scale)
    poisson, gray = d.bernoulli(c.poisson_prob), d.bernoulli(c.gray_prob)
    return {"sigma": torch.where(poisson, 0.0, sigma), "poisson_scale": torch.where(poisson, scale, 0.0),
            "gray": gray.float(), "normal": d.normal()}


def apply(x: Tensor, p: Params, c: Any) -> Tensor:
    return noise(x, p["sigma"], p["poisson_scale"], p["gray"], p["normal"])


def severity(p: Params) -> Tensor:
    # σ in levels a Poisson scale gives at mid-grey: 255·scale·sqrt(0.5/256).
    return torch.sqrt(p["sigma"] ** 2 + (p["poisson_scale"] * 255 * math.sqrt(0.5 / 256)) ** 2) / 50


OP = Op(
    name="noise", config=NoiseOpConfig, draw=draw, apply=apply, severity=severity, prompt_word="noise", chain_rank=60,
    bounds={"sigma": (0, 255), "gray_prob": (0, 1), "poisson_prob": (0, 1), "poisson_scale": (0, 10)},
    grid=({"sigma": 15}, {"sigma": 30}, {"sigma": 50}),
)
