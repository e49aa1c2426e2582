"""Batched degradation ops on (B, 3, H, W) float images in [0, 1], on any device.

Each op takes one (B,) tensor per parameter, so every sample has its own strength, and random
draws come from the `generator` given (on the images' device). None reads tensor values on the
host (.item(), .tolist(), boolean indexing, Python loops over the batch), so a batch on a GPU
runs without synchronising. Units follow the papers the ranges come from: noise σ in 8-bit
levels, blur σ in pixels, JPEG quality 1-100, angles in radians.
"""

from __future__ import annotations

import math
from typing import Optional

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_restore.data.degrade.kernels import line_kernels, resample_matrices


def _b(t: Tensor) -> Tensor:
    """(B,) → (B, 1, 1, 1) for broadcasting over images."""
    return t.view(-1, 1, 1, 1)


def quantize(x: Tensor) -> Tensor:
    """Round to 8 bits (what saving the image as PNG would do)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def noise(x: Tensor, sigma: Tensor, poisson_scale: Tensor, gray: Tensor,
          generator: Optional[torch.Generator] = None) -> Tensor:
    """Gaussian noise of σ `sigma` (8-bit levels) plus Poisson noise of `poisson_scale`, from one
    normal draw; `gray` samples get the same noise on every channel.

    Poisson counts are taken at 256 levels per unit intensity, as BasicSR does for 8-bit images
    (its `2**ceil(log2(unique values))`), and drawn with the normal approximation N(λ, λ): exact
    enough from about 10 counts up, and `torch.poisson` costs as much as the rest of the chain on
    a CPU. Gray Poisson noise follows the luma, like BasicSR's gray branch.
    """
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    gray4 = _b(gray)
    n = torch.where(gray4, n[:, :1].expand_as(n), n)
    luma = kornia.color.rgb_to_grayscale(x)
    level = torch.where(gray4, luma.expand_as(x), x).clamp_min(0)
    var = (_b(sigma) / 255.0) ** 2 + _b(poisson_scale) ** 2 * level / 256.0
    return x + n * var.sqrt()


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each sample with its own (k, k) kernel: one grouped convolution for the batch."""
    return kornia.filters.filter2d(x, kernels, border_type="reflect")


# Standard JPEG quantisation tables (ITU-T T.81, Annex K), row-major over the 8×8 DCT block.
_LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
) + (99,) * 32


def _dct_basis(device: torch.device) -> Tensor:
    """64×64 orthonormal 2-D DCT-II of a row-major 8×8 block (Kronecker product of the 1-D one)."""
    k = torch.arange(8, device=device, dtype=torch.float32)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)
    d = d * torch.where(k == 0, math.sqrt(1 / 8), math.sqrt(2 / 8))[:, None]
    return torch.kron(d, d)


# Constants copied to each device once: a host→device copy inside a batch would synchronise.
_DEVICE_CONSTANTS: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _jpeg_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """The two standard tables (2, 64) and the DCT basis (64, 64) on `device`."""
    if device not in _DEVICE_CONSTANTS:
        tables = torch.tensor([_LUMA_TABLE, _CHROMA_TABLE], dtype=torch.float32)
        _DEVICE_CONSTANTS[device] = (tables.to(device), _dct_basis(device))
    return _DEVICE_CONSTANTS[device]


def jpeg_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 64) luma and chroma quantisation steps for integer qualities 1-100 (IJG scaling)."""
    tables, _ = _jpeg_constants(quality.device)
    q = quality.round().clamp(1, 100).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    steps = ((tables * scale + 50) / 100).floor().clamp(1, 255)
    return steps[:, 0], steps[:, 1]


def _code_plane(plane: Tensor, steps: Tensor, basis: Tensor) -> Tensor:
    """DCT, quantise with per-sample `steps` (B, 64), dequantise and invert one (B, C, h, w) plane
    whose sides are multiples of 8."""
    b, c, h, w = plane.shape
    blocks = plane.view(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, -1, 64)
    coef = blocks @ basis.T
    step = steps[:, None, :]
    coef = (coef / step).round() * step
    blocks = coef @ basis
    return blocks.view(b, c, h // 8, w // 8, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG encode + decode with per-sample `quality`: YCbCr, 4:2:0 chroma (2×2 average, bilinear
    back, like libjpeg's "fancy" upsampling), 8×8 DCT quantised with the IJG-scaled standard tables.

    The codec is written out here rather than calling kornia's `jpeg_codec_differentiable`: that
    function reads the quality range back with `.item()` (two host syncs per call) and its
    antialiased chroma resize is a Gaussian convolution that makes it ~6× slower on a CPU; the
    degradation needs no gradient, so plain rounding replaces its polynomial approximation.
    """
    b, _, h, w = x.shape
    ph, pw = (-h) % 16, (-w) % 16  # whole 16×16 macroblocks, padded like an encoder does
    ycc = kornia.color.rgb_to_ycbcr(F.pad(x, (0, pw, 0, ph), mode="replicate")) * 255 - 128
    _, basis = _jpeg_constants(x.device)
    luma_steps, chroma_steps = jpeg_tables(quality)
    y = _code_plane(ycc[:, :1], luma_steps, basis)
    c = _code_plane(F.avg_pool2d(ycc[:, 1:], 2), chroma_steps, basis)
    c = F.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = kornia.color.ycbcr_to_rgb((torch.cat([y, c], dim=1) + 128) / 255)
    return rgb[..., :h, :w].clamp(0, 1)


def lowres(x: Tensor, scale: Tensor, mode: Tensor, modes: tuple[str, ...], up_mode: str, min_scale: float) -> Tensor:
    """Down-sample each sample by its own `scale` (≥ `min_scale`) with filter `modes[mode]`, then
    back to H×W with `up_mode`, exactly as two `F.interpolate(size=...)` calls per sample would.

    Each resize is a per-sample matrix on each axis, so one batched matmul pair handles scales
    and filters that differ across the batch (`F.interpolate` takes one size for all).
    """
    b, _, h, w = x.shape
    scale = scale.clamp_min(min_scale)
    out = []
    for size in (h, w):
        small = torch.floor(size / scale).clamp(1, size)
        small_max = max(1, math.floor(size / min_scale))
        full = torch.full_like(small, size)
        down = torch.zeros(b, small_max, size, device=x.device)
        for k, name in enumerate(modes):
            m = resample_matrices(full, small, size, small_max, name)
            down = torch.where((mode == k).view(-1, 1, 1), m, down)
        up = resample_matrices(small, full, small_max, size, up_mode)
        out.append(up @ down)
    rows, cols = out
    return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)


def depth_prior(b: int, h: int, w: int, generator: Optional[torch.Generator] = None,
                device: torch.device | str = "cpu") -> Tensor:
    """(B, 1, H, W) smooth synthetic depth in [0, 1] (1 = far) for images without a depth map:
    farther towards the top (a horizon at a random height and tilt) plus a smooth random field."""
    r = torch.rand(b, 4, generator=generator, device=device)
    field = torch.rand(b, 1, 4, 4, generator=generator, device=device)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)
    yy = torch.linspace(1, 0, h, device=device).view(1, 1, h, 1)
    xx = torch.linspace(-0.5, 0.5, w, device=device).view(1, 1, 1, w)
    ramp = yy + _b(r[:, 0] - 0.5) * 0.6 * xx  # tilted horizon
    d = _b(0.5 + 0.4 * r[:, 1]) * ramp + _b(0.2 + 0.4 * r[:, 2]) * field
    lo = d.amin(dim=(2, 3), keepdim=True)
    hi = d.amax(dim=(2, 3), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-6)


def haze(x: Tensor, depth: Tensor, beta: Tensor, airlight: Tensor) -> Tensor:
    """Atmospheric scattering I = J·t + A·(1 − t), t = exp(−β·depth), depth (B, 1, H, W) in [0, 1]."""
    t = torch.exp(-_b(beta) * depth)
    return x * t + _b(airlight) * (1 - t)


def rain(x: Tensor, amount: Tensor, length: Tensor, angle: Tensor, width: Tensor, size: int,
         generator: Optional[torch.Generator] = None) -> Tensor:
    """Rain streaks, MiOIR's recipe on the device: seeds at `amount`/25600 of the pixels (its
    "value" threshold on U(0, 256)), smeared by a line of `length` pixels at `angle` from the
    vertical whose Gaussian cross-section has kernel size `width` (σ by OpenCV's rule), scaled
    so the brightest streak is 1, added to every channel and clipped. `size` is the odd kernel
    side, ≥ the longest length."""
    b, _, h, w = x.shape
    seeds = (torch.rand(b, 1, h, w, generator=generator, device=x.device) < _b(amount) / 25600).float()
    sigma = 0.3 * ((width - 1) / 2 - 1) + 0.8
    streaks = kornia.filters.filter2d(seeds, line_kernels(length, angle, sigma, size), border_type="constant")
    streaks = streaks / streaks.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (x + streaks).clamp(0, 1)


def low_light(x: Tensor, gamma: Tensor, gain: Tensor, noise_sigma: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Under-exposure gain·x^γ (MiOIR's "dark" is gain 1; PromptGIP dims linearly). With
    `noise_sigma` (8-bit levels), read noise is added in linear light (display value^2.2), so it
    comes out strongest in the shadows, as in a real dark photo."""
    y = _b(gain) * x.clamp_min(0) ** _b(gamma)
    if noise_sigma is None:
        return y
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    linear = y ** 2.2 + n * _b(noise_sigma) / 255.0
    return linear.clamp_min(0) ** (1 / 2.2)
