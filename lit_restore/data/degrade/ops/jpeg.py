"""JPEG compression (IJG quality scaling of the standard tables, 4:2:0 chroma), on the device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_restore.data.degrade.op import Draws, Op, Params


@dataclass
class JpegOpConfig:
    """JPEG compression (IJG quality scaling of the standard tables, 4:2:0 chroma)."""

    prob: float = 0.3
    quality: list[float] = field(default_factory=lambda: [30.0, 70.0])  # MiOIR in-distribution


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


def draw(c: JpegOpConfig, d: Draws) -> Params:
    return {"quality": d.uniform(c.quality).round()}


def apply(x: Tensor, p: Params, c: JpegOpConfig) -> Tensor:
    return jpeg(x, p["quality"])


def severity(p: Params) -> Tensor:
    return (100 - p["quality"]) / 70


OP = Op(
    name="jpeg", config=JpegOpConfig, draw=draw, apply=apply, severity=severity, prompt_word="jpeg compression",
    chain_rank=70, bounds={"quality": (1, 100)}, grid=({"quality": 70}, {"quality": 40}, {"quality": 10}),
    in_range=True,
)
