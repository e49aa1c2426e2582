"""Rain streaks: sparse seeds smeared by a rotated line kernel, added and clipped (MiOIR's recipe)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_restore.data.degrade.kernels import RADIANS_PER_DEGREE, line_kernels, odd_ceil
from lit_restore.data.degrade.op import Draws, Op, Params, per_image


@dataclass
class RainOpConfig:
    """Rain streaks: sparse seeds smeared by a rotated line kernel, added and clipped (MiOIR)."""

    prob: float = 0.3
    amount: list[float] = field(default_factory=lambda: [50.0, 99.0])  # MiOIR "value": seeds = amount/25600 of pixels
    length: list[float] = field(default_factory=lambda: [20.0, 40.0])  # streak length in pixels
    angle: list[float] = field(default_factory=lambda: [-45.0, 45.0])  # degrees from vertical
    width: list[float] = field(default_factory=lambda: [3.0, 11.0])  # Gaussian kernel size across the streak
    # MiOIR's add_rain geometry: a 3×3 smear of the seeds and a streak that is the length×length
    # window's diagonal scaled by 1 − length/100 and rotated (clipped by the window); false: a
    # plain line of `length` pixels.
    mioir_geometry: bool = True


def _fft_size(n: int) -> int:
    """Smallest 2^a·3^b·5^c ≥ n (sizes the FFT handles fastest)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_filter(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each sample with its own point-symmetric (k, k) kernel, zeros outside the image,
    through the FFT: its cost does not grow with k, unlike a direct convolution (a 43×43 rain
    streak costs ~1,800 multiply-adds per pixel directly)."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    fh, fw = _fft_size(h + k - 1), _fft_size(w + k - 1)  # no wrap-around into the kept window
    spectrum = torch.fft.rfft2(x, s=(fh, fw)) * torch.fft.rfft2(kernels, s=(fh, fw))[:, None]
    r = k // 2
    return torch.fft.irfft2(spectrum, s=(fh, fw))[..., r : r + h, r : r + w]


# MiOIR's 3×3 smear of the rain seeds before the streak kernel (cv2.filter2D in add_rain).
_RAIN_SEED_SMEAR = ((0.0, 0.1, 0.0), (0.1, 8.0, 0.1), (0.0, 0.1, 0.0))


def mioir_streak_length(length: Tensor, angle: Tensor) -> Tensor:
    """The streak MiOIR draws for `length`: the diagonal of a length×length window, scaled by
    1 − length/100 and rotated to `angle` (radians from the vertical), clipped by the window."""
    full = math.sqrt(2) * length * (1 - length / 100)
    window = length / torch.maximum(torch.cos(angle).abs(), torch.sin(angle).abs())
    return torch.minimum(full, window)


def rain(x: Tensor, seeds: Tensor, length: Tensor, angle: Tensor, width: Tensor, size: int,
         mioir_geometry: bool = True) -> Tensor:
    """Rain streaks, MiOIR's recipe on the device: from `seeds` (B, 1, H, W) bool, with
    `mioir_geometry` smeared by MiOIR's 3×3 filter and drawn at its rotated-diagonal length
    (`mioir_streak_length`), else a line of `length` pixels; at `angle` from the vertical, with a
    Gaussian cross-section of kernel size `width` (σ by OpenCV's rule), scaled so the brightest
    streak is 1, added to every channel and clipped. `size` is the odd kernel side, ≥ the longest
    streak."""
    seeds = seeds.float()
    if mioir_geometry:
        smear = torch.tensor(_RAIN_SEED_SMEAR, device=x.device, dtype=seeds.dtype).view(1, 1, 3, 3)
        seeds = F.conv2d(seeds, smear, padding=1)
        length = mioir_streak_length(length, angle)
    sigma = 0.3 * ((width - 1) / 2 - 1) + 0.8
    streaks = fft_filter(seeds, line_kernels(length, angle, sigma, size))
    streaks = streaks / streaks.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (x + streaks).clamp_(0, 1)


def draw(c: RainOpConfig, d: Draws) -> Params:
    amount, length = d.uniform(c.amount), d.uniform(c.length)
    angle, width = d.uniform(c.angle), d.uniform(c.width)
    return {"amount": amount, "length": length, "angle": angle, "width": width,
            "seeds": d.rand(1, *d.shape[-2:]) < per_image(amount) / 25600}


def apply(x: Tensor, p: Params, c: RainOpConfig) -> Tensor:
    # MiOIR's rotated diagonal can be up to √2 times `length`.
    size = odd_ceil(c.length[1] * (math.sqrt(2) if c.mioir_geometry else 1)) + 2
    return rain(x, p["seeds"], p["length"], p["angle"] * RADIANS_PER_DEGREE, p["width"], size, c.mioir_geometry)


def severity(p: Params) -> Tensor:
    return p["amount"] / 99


OP = Op(
    name="rain", config=RainOpConfig, draw=draw, apply=apply, severity=severity, prompt_word="rain", chain_rank=20,
    bounds={"amount": (0, 2000), "length": (1, 63), "angle": (-90, 90), "width": (1, 21)},
    grid=({"amount": 50}, {"amount": 75}, {"amount": 99}),
    in_range=True,
)
