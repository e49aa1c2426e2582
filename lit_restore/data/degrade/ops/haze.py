"""Haze: atmospheric scattering over a depth map (the sample's own, or a smooth synthetic one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lit_restore.data.degrade.kernels import resample_matrices
from lit_restore.data.degrade.op import Draws, Op, Params, per_image


@dataclass
class HazeOpConfig:
    """Atmospheric scattering I = J·t + A(1−t), t = exp(−β·depth), depth in [0, 1]."""

    prob: float = 0.3
    beta: list[float] = field(default_factory=lambda: [0.5, 2.5])  # MiOIR in-distribution
    airlight: list[float] = field(default_factory=lambda: [0.8, 1.0])  # A (MiOIR)


def depth_prior(b: int, h: int, w: int, generator: Optional[torch.Generator] = None,
                device: torch.device | str = "cpu") -> Tensor:
    """(B, 1, H, W) smooth synthetic depth in [0, 1] (1 = far) for images without a depth map:
    farther towards the top (a horizon at a random height and tilt) plus a smooth random field."""
    r = torch.rand(b, 4, generator=generator, device=device)
    field = torch.rand(b, 1, 4, 4, generator=generator, device=device)
    # Bicubic 4×4 → H×W as two small matmuls (`F.interpolate` costs more on a CPU).
    four = torch.full((b,), 4.0, device=device)
    rows = resample_matrices(four, torch.full_like(four, h), 4, h, "bicubic")
    cols = resample_matrices(four, torch.full_like(four, w), 4, w, "bicubic")
    field = rows[:, None] @ field @ cols[:, None].transpose(-1, -2)
    yy = torch.linspace(1, 0, h, device=device).view(1, 1, h, 1)
    xx = torch.linspace(-0.5, 0.5, w, device=device).view(1, 1, 1, w)
    ramp = yy + per_image(r[:, 0] - 0.5) * 0.6 * xx  # tilted horizon
    # In place from here on (an image-sized temporary costs more than its arithmetic on a CPU).
    d = ramp.mul_(per_image(0.5 + 0.4 * r[:, 1])).add_(field.mul_(per_image(0.2 + 0.4 * r[:, 2])))
    lo, hi = (per_image(v) for v in torch.aminmax(d.view(b, -1), dim=1))
    return d.sub_(lo).div_((hi - lo).clamp_min(1e-6))


def haze(x: Tensor, depth: Tensor, beta: Tensor, airlight: Tensor) -> Tensor:
    """Atmospheric scattering I = J·t + A·(1 − t), t = exp(−β·depth), depth (B, 1, H, W) in [0, 1]."""
    t = torch.exp(-per_image(beta) * depth)
    a = per_image(airlight)
    return (x - a).mul_(t).add_(a)  # J·t + A(1 − t), in two passes over the image


def scene_depth(d: Draws, h: int, w: int) -> Tensor:
    """(B, 1, H, W) depth in [0, 1] per sample: the batch's own depth map (uint8 is /255; larger is
    farther; each map divided by its maximum) where `d.has_depth` (every row when it is None),
    the synthetic `depth_prior` elsewhere. The prior is drawn in every case, so the generator
    advances the same whatever depth maps the batch brings."""
    prior = depth_prior(d.b, h, w, d.generator, d.device)
    if d.depth is None:
        return prior
    real = d.depth.float() / 255 if d.depth.dtype == torch.uint8 else d.depth.float()
    real = real / real.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    if d.has_depth is None:
        return real
    return torch.where(d.has_depth.to(torch.bool).view(-1, 1, 1, 1), real, prior)


def draw(c: HazeOpConfig, d: Draws) -> Params:
    beta, airlight = d.uniform(c.beta), d.uniform(c.airlight)
    return {"beta": beta, "airlight": airlight, "depth": scene_depth(d, *d.shape[-2:])}


def apply(x: Tensor, p: Params, c: HazeOpConfig) -> Tensor:
    return haze(x, p["depth"], p["beta"], p["airlight"])


def severity(p: Params) -> Tensor:
    return p["beta"] / 2.5


OP = Op(
    name="haze", config=HazeOpConfig, draw=draw, apply=apply, severity=severity, prompt_word="haze", chain_rank=10,
    bounds={"beta": (0, 10), "airlight": (0, 1)}, grid=({"beta": 0.5}, {"beta": 1.5}, {"beta": 2.5}),
    in_range=True,
)
