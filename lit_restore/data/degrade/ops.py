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


def quantize_(x: Tensor) -> Tensor:
    """Round to 8 bits in place (what saving the image as PNG would do)."""
    return x.clamp_(0, 1).mul_(255).round_().div_(255)


def quantize(x: Tensor) -> Tensor:
    return quantize_(x.clone())


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
    # Per-sample selection as lerp with 0/1 weights: exact, and faster than torch.where on a CPU.
    gray4 = _b(gray).float()
    n = torch.lerp(n, n[:, :1], gray4)
    level = torch.lerp(x, kornia.color.rgb_to_grayscale(x), gray4)
    # In place from here on: on a CPU, allocating a fresh image costs more than the arithmetic.
    std = level.clamp_(min=0).mul_(_b(poisson_scale**2 / 256)).add_(_b((sigma / 255) ** 2)).sqrt_()
    return std.mul_(n).add_(x)


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each sample with its own (k, k) kernel: one grouped convolution for the batch.
    Borders reflect, or repeat the edge on images too small to reflect a half kernel."""
    border = "reflect" if min(x.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(x, kernels, border_type=border)


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


# JFIF colour transform, scaled to 8-bit levels and centred (Y − 128), and its inverse on the
# centred chroma (R, G, B = Y + this · (Cb, Cr)).
_RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_CHROMA_TO_RGB = ((0.0, 1.402), (-0.344136, -0.714136), (1.772, 0.0))


def _dct_matrix(device: torch.device) -> Tensor:
    """8×8 orthonormal DCT-II matrix."""
    k = torch.arange(8, device=device, dtype=torch.float32)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)
    return d * torch.where(k == 0, math.sqrt(1 / 8), math.sqrt(2 / 8))[:, None]


# Constants copied to each device once: a host→device copy inside a batch would synchronise.
_DEVICE_CONSTANTS: dict[torch.device, dict[str, Tensor]] = {}


def _jpeg_constants(device: torch.device) -> dict[str, Tensor]:
    if device not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[device] = {
            "tables": torch.tensor([_LUMA_TABLE, _CHROMA_TABLE], dtype=torch.float32).to(device),
            "dct": _dct_matrix(device),
            "to_ycc": (torch.tensor(_RGB_TO_YCC) * 255).to(device),
            "to_ycc_bias": torch.tensor([-128.0, 0.0, 0.0]).view(3, 1).to(device),
            "to_rgb": (torch.tensor(_CHROMA_TO_RGB) / 255).to(device),
            "to_rgb_bias": torch.full((3, 1), 128 / 255).to(device),
        }
    return _DEVICE_CONSTANTS[device]


def jpeg_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 64) luma and chroma quantisation steps for integer qualities 1-100 (IJG scaling)."""
    tables = _jpeg_constants(quality.device)["tables"]
    q = quality.round().clamp(1, 100).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    steps = ((tables * scale + 50) / 100).floor().clamp(1, 255)
    return steps[:, 0], steps[:, 1]


def _code_plane(plane: Tensor, steps: Tensor, dct: Tensor) -> Tensor:
    """8×8 block DCT, quantise with per-sample `steps` (B, 64), dequantise and invert a
    (B, C, H, W) plane with sides multiple of 8. The two 1-D transforms are matmuls on views
    (rows of 8 along W, then groups of 8 rows along H), so no block is ever copied out."""
    b, c, h, w = plane.shape
    coef = dct @ (plane.reshape(b, c, h, w // 8, 8) @ dct.T).view(b, c, h // 8, 8, w)
    step = steps.view(b, 1, 1, 8, 1, 8)
    coef = coef.view(b, c, h // 8, 8, w // 8, 8).div(step).round_().mul_(step)
    pixels = (dct.T @ coef.view(b, c, h // 8, 8, w)).view(b, c, h, w // 8, 8) @ dct
    return pixels.view(b, c, h, w)


def jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG encode + decode with per-sample `quality`: JFIF YCbCr, 4:2:0 chroma (2×2 average,
    bilinear back like libjpeg's "fancy" upsampling), 8×8 DCT quantised with the IJG-scaled
    standard tables.

    Written out rather than calling kornia's `jpeg_codec_differentiable`, which reads the quality
    range back with `.item()` (two host syncs per call) and whose antialiased chroma resize (a
    Gaussian convolution) and soft rounding make it several times slower; a degradation needs no
    gradient, so plain rounding does.
    """
    b, _, h, w = x.shape
    ph, pw = (-h) % 16, (-w) % 16  # whole 16×16 macroblocks, edge-replicated like an encoder
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    k = _jpeg_constants(x.device)
    luma_steps, chroma_steps = jpeg_tables(quality)
    hp, wp = x.shape[-2:]
    # Colour transforms as (3, C) matmuls over the flattened pixels (a 1×1 convolution with
    # 3 channels is far slower on a CPU).
    ycc = torch.bmm(k["to_ycc"].expand(b, 3, 3), x.reshape(b, 3, -1)).add_(k["to_ycc_bias"]).view(b, 3, hp, wp)
    y = _code_plane(ycc[:, :1], luma_steps, k["dct"])
    c = ycc[:, 1:]
    chroma = (c[..., 0::2, 0::2] + c[..., 0::2, 1::2]).add_(c[..., 1::2, 0::2]).add_(c[..., 1::2, 1::2]).div_(4)
    chroma = _code_plane(chroma, chroma_steps, k["dct"])
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = torch.bmm(k["to_rgb"].expand(b, 3, 2), chroma.view(b, 2, -1)).add_(k["to_rgb_bias"])
    rgb = rgb.view(b, 3, hp, wp).add_(y, alpha=1 / 255)
    return rgb[..., :h, :w].clamp_(0, 1)


def lowres(x: Tensor, scale: Tensor, mode: Tensor, modes: tuple[str, ...], up_mode: str, min_scale: float) -> Tensor:
    """Down-sample each sample by its own `scale` (≥ `min_scale`) with filter `modes[mode]`, then
    back to H×W with `up_mode`, exactly as two `F.interpolate(size=...)` calls per sample would.

    Each resize is a per-sample matrix on each axis, so one batched matmul pair handles scales
    and filters that differ across the batch (`F.interpolate` takes one size for all).
    """
    b, _, h, w = x.shape
    scale = scale.clamp_min(min_scale)
    downs, ups = [], []
    for size in (h, w):
        small = torch.floor(size / scale).clamp(1, size)
        small_max = max(1, math.floor(size / min_scale))
        full = torch.full_like(small, size)
        down = torch.zeros(b, small_max, size, device=x.device)
        for k, name in enumerate(modes):
            m = resample_matrices(full, small, size, small_max, name)
            down = torch.where((mode == k).view(-1, 1, 1), m, down)
        downs.append(down)
        ups.append(resample_matrices(small, full, small_max, size, up_mode))
    # Separate down and up products (cheaper than one H×H matrix per axis when the low-res side
    # is ≤ H/2). Column products fold the channels into rows and row products repeat the small
    # matrices per channel, so no image-sized operand is ever copied by broadcasting.
    c = x.shape[1]
    small = torch.bmm(x.reshape(b, c * h, w), downs[1].transpose(1, 2))  # (B, C·H, w')
    small = torch.bmm(downs[0].repeat_interleave(c, dim=0), small.view(b * c, h, -1))  # (B·C, h', w')
    big = torch.bmm(ups[0].repeat_interleave(c, dim=0), small)  # (B·C, H, w')
    return torch.bmm(big.view(b, c * h, -1), ups[1].transpose(1, 2)).view(b, c, h, w)


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
    ramp = yy + _b(r[:, 0] - 0.5) * 0.6 * xx  # tilted horizon
    d = _b(0.5 + 0.4 * r[:, 1]) * ramp + _b(0.2 + 0.4 * r[:, 2]) * field
    lo = d.amin(dim=(2, 3), keepdim=True)
    hi = d.amax(dim=(2, 3), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-6)


def haze(x: Tensor, depth: Tensor, beta: Tensor, airlight: Tensor) -> Tensor:
    """Atmospheric scattering I = J·t + A·(1 − t), t = exp(−β·depth), depth (B, 1, H, W) in [0, 1]."""
    t = torch.exp(-_b(beta) * depth)
    a = _b(airlight)
    return (x - a).mul_(t).add_(a)  # J·t + A(1 − t), in two passes over the image


# MiOIR's 3×3 smear of the rain seeds before the streak kernel (cv2.filter2D in add_rain).
_RAIN_SEED_SMEAR = ((0.0, 0.1, 0.0), (0.1, 8.0, 0.1), (0.0, 0.1, 0.0))


def mioir_streak_length(length: Tensor, angle: Tensor) -> Tensor:
    """The streak MiOIR draws for `length`: the diagonal of a length×length window, scaled by
    1 − length/100 and rotated to `angle` (radians from the vertical), clipped by the window."""
    full = math.sqrt(2) * length * (1 - length / 100)
    window = length / torch.maximum(torch.cos(angle).abs(), torch.sin(angle).abs())
    return torch.minimum(full, window)


def rain(x: Tensor, amount: Tensor, length: Tensor, angle: Tensor, width: Tensor, size: int,
         generator: Optional[torch.Generator] = None, mioir_geometry: bool = True) -> Tensor:
    """Rain streaks, MiOIR's recipe on the device: seeds at `amount`/25600 of the pixels (its
    "value" threshold on U(0, 256)), with `mioir_geometry` smeared by MiOIR's 3×3 filter and
    drawn at its rotated-diagonal length (`mioir_streak_length`), else a line of `length`
    pixels; at `angle` from the vertical, with a Gaussian cross-section of kernel size `width`
    (σ by OpenCV's rule), scaled so the brightest streak is 1, added to every channel and
    clipped. `size` is the odd kernel side, ≥ the longest streak."""
    b, _, h, w = x.shape
    seeds = (torch.rand(b, 1, h, w, generator=generator, device=x.device) < _b(amount) / 25600).float()
    if mioir_geometry:
        smear = torch.tensor(_RAIN_SEED_SMEAR, device=x.device, dtype=seeds.dtype).view(1, 1, 3, 3)
        seeds = F.conv2d(seeds, smear, padding=1)
        length = mioir_streak_length(length, angle)
    sigma = 0.3 * ((width - 1) / 2 - 1) + 0.8
    streaks = fft_filter(seeds, line_kernels(length, angle, sigma, size))
    streaks = streaks / streaks.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (x + streaks).clamp_(0, 1)


def low_light(x: Tensor, gamma: Tensor, gain: Tensor, noise_sigma: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Under-exposure gain·x^γ (MiOIR's "dark" is gain 1; PromptGIP dims linearly). With
    `noise_sigma` (8-bit levels), read noise is added in linear light (display value^2.2), so it
    comes out strongest in the shadows, as in a real dark photo."""
    y = _pow_(x.clone(), _b(gamma)).mul_(_b(gain))
    if noise_sigma is None:
        return y
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _pow_(_pow_(y, 2.2).add_(n.mul_(_b(noise_sigma) / 255)), 1 / 2.2)


def _pow_(x: Tensor, exponent: Tensor | float) -> Tensor:
    """max(x, 0)^exponent (exponent > 0) in place, as exp(exponent·log x): a vectorised
    transcendental pair ~4× faster on a CPU than `pow` with a per-sample exponent."""
    return x.clamp_(min=0).log_().mul_(exponent).exp_()
