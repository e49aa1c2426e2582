"""Per-sample filter kernels and resampling matrices, built as batched tensors on the device.

Every function takes (B,) parameter tensors and returns one kernel (or matrix) per sample, so a
whole batch is filtered by one grouped call whatever parameters each sample drew.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _grid(size: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(1, size, size) x and y offsets from the kernel centre."""
    r = torch.arange(size, device=like.device, dtype=torch.float32) - (size - 1) / 2
    return r.view(1, 1, size), r.view(1, size, 1)


def _normalise(k: Tensor) -> Tensor:
    # Gaussian tails reach subnormal floats (< 1e-38), which make a CPU convolution ~8× slower;
    # weights under 1e-10 change no 8-bit pixel, so they become exact zeros.
    k = torch.where(k > 1e-10, k, 0.0)
    return k / k.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def gaussian_kernels(sigma_x: Tensor, sigma_y: Tensor, angle: Tensor, ksize: Tensor, size: int) -> Tensor:
    """(B, size, size) rotated anisotropic Gaussians (isotropic when σx = σy), each cut to its own
    odd support `ksize` ≤ `size` (zeros outside, as a smaller kernel zero-padded) and summing to 1.
    `angle` is in radians."""
    x, y = _grid(size, sigma_x)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    u = c * x + s * y
    v = -s * x + c * y
    k = torch.exp(-0.5 * ((u / sigma_x.view(-1, 1, 1)) ** 2 + (v / sigma_y.view(-1, 1, 1)) ** 2))
    half = ((ksize - 1) / 2).view(-1, 1, 1)
    k = k * ((x.abs() <= half) & (y.abs() <= half))
    return _normalise(k)


def line_kernels(length: Tensor, angle: Tensor, width: Tensor, size: int) -> Tensor:
    """(B, size, size) straight streaks summing to 1: a segment of `length` pixels through the
    centre at `angle` radians from the vertical, with a Gaussian cross-section of σ = `width`
    pixels and soft (one-pixel) ends. Motion blur (thin) and rain streaks (wide) use it."""
    x, y = _grid(size, length)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    along = s * x + c * y  # direction (sin, cos): angle 0 is a vertical streak
    across = c * x - s * y
    half = (length / 2).view(-1, 1, 1)
    ends = (half + 0.5 - along.abs()).clamp(0, 1)
    k = torch.exp(-0.5 * (across / width.view(-1, 1, 1)) ** 2) * ends
    return _normalise(k)


def _cubic(t: Tensor, a: float = -0.75) -> Tensor:
    """Keys cubic convolution weight (a = −0.75 as PyTorch and OpenCV bicubic)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


RESIZE_MODES = ("nearest", "area", "bilinear", "bicubic")


def resample_matrices(src: Tensor, dst: Tensor, src_max: int, dst_max: int, mode: str) -> Tensor:
    """(B, dst_max, src_max) matrices resizing a 1-D signal of per-sample length `src` to `dst`
    with PyTorch's `F.interpolate(size=dst, align_corners=False, antialias=False)` weights
    ("area" = exact box overlap, which equals adaptive average pooling at integer factors).
    Rows ≥ dst are zero and no weight falls on columns ≥ src (edge pixels are repeated instead),
    so signals of different lengths share one padded tensor.
    """
    srcf, dstf = src.float().view(-1, 1, 1), dst.float().view(-1, 1, 1)
    ratio = srcf / dstf
    j = torch.arange(dst_max, device=src.device, dtype=torch.float32).view(1, -1, 1)
    i = torch.arange(src_max, device=src.device, dtype=torch.float32).view(1, 1, -1)
    if mode == "area":
        lo, hi = j * ratio, (j + 1) * ratio
        m = ((i + 1).minimum(hi) - i.maximum(lo)).clamp_min(0) / ratio
    else:
        if mode == "nearest":
            centre = (j * ratio).floor()
            taps, offsets = centre, torch.zeros(1, 1, 1, device=src.device)
            weights = torch.ones_like(centre)
        else:
            centre = (j + 0.5) * ratio - 0.5
            if mode == "bilinear":
                centre = centre.clamp_min(0)  # PyTorch's linear modes clamp negative coordinates
                offsets = torch.arange(0, 2, device=src.device, dtype=torch.float32).view(1, 1, -1)
            elif mode == "bicubic":
                offsets = torch.arange(-1, 3, device=src.device, dtype=torch.float32).view(1, 1, -1)
            else:
                raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
            base = centre.floor()
            taps = base + offsets
            t = centre - taps
            weights = (1 - t.abs()).clamp_min(0) if mode == "bilinear" else _cubic(t)
        index = torch.minimum(taps.clamp_min(0), srcf - 1).long().expand(-1, dst_max, -1)
        m = torch.zeros(src.shape[0], dst_max, src_max, device=src.device)
        m.scatter_add_(2, index, weights.expand(src.shape[0], -1, -1).contiguous())
    return m * (j < dstf)


RADIANS_PER_DEGREE = math.pi / 180.0


def odd_ceil(v: float) -> int:
    """The smallest odd integer ≥ v."""
    return 2 * math.ceil((v - 1) / 2) + 1
