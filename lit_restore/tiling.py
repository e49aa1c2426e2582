"""Run an image-to-image function on overlapping tiles and blend them, so memory stays bounded.

Tiles are `tile`×`tile` squares placed every `tile - overlap` pixels, the last one flush with the
image edge. Each tile's output is weighted by a separable window that is 1 inside the tile and,
on every side that borders another tile, 0 for the outer `overlap // 4` pixels and then a linear
ramp up to 1 at `overlap - overlap // 4`. Two consequences:

- the tiles' weights cross-fade over the middle half of each overlap, so a generative model's
  tiles (the LDM) meet without a visible seam;
- no tile contributes its outer `overlap // 4` pixels, where its output depends on what lies past
  the tile edge; an operator whose receptive radius is at most `overlap // 4` therefore gives
  the untiled result up to float rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of length `size` (one tile when it fits)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(overlap: int, dtype: torch.dtype) -> Tensor:
    """Weights of the `overlap` pixels at a tile side that meets another tile, outermost first."""
    margin = overlap // 4
    j = torch.arange(overlap, dtype=dtype)
    return ((j + 0.5 - margin) / (overlap - 2 * margin)).clamp(0.0, 1.0)


def _window_1d(start: int, length: int, size: int, overlap: int, dtype: torch.dtype) -> Tensor:
    w = torch.ones(length, dtype=dtype)
    n = min(overlap, length)
    if n == 0:
        return w
    ramp = _ramp(overlap, dtype)[:n]
    if start > 0:  # a tile precedes this one
        w[:n] = torch.minimum(w[:n], ramp)
    if start + length < size:  # a tile follows
        w[-n:] = torch.minimum(w[-n:], ramp.flip(0))
    return w


def run_padded(fn: Callable[[Tensor], Tensor], x: Tensor, multiple: int) -> Tensor:
    """fn on `x` replicate-padded at the bottom/right to a multiple of `multiple`, cropped back."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return fn(x)[..., :h, :w]


def restore_tiled(
    fn: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 512,
    overlap: int = 64,
    multiple: int = 1,
) -> Tensor:
    """Apply `fn` ((N, C, h, w) → (N, C', h, w)) to `image` (N, C, H, W) tile by tile.

    Images no larger than `tile` go through `fn` in one call. `multiple` pads what `fn` sees to
    a multiple of it (networks with downsampling need 8 or 16). The output and the weight sum
    live on `image`'s device; `fn` gets tiles there and may move them (e.g. CPU image, GPU net).
    """
    if image.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) image, got shape {tuple(image.shape)}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if multiple <= 0:
        raise ValueError(f"multiple must be > 0, got {multiple}")
    h, w = image.shape[-2:]
    if h <= tile and w <= tile:
        return run_padded(fn, image, multiple).to(image.device)
    out = weight = None
    for y0 in tile_starts(h, tile, overlap):
        th = min(tile, h)
        wy = _window_1d(y0, th, h, overlap, torch.float32).to(image.device)
        for x0 in tile_starts(w, tile, overlap):
            tw = min(tile, w)
            wx = _window_1d(x0, tw, w, overlap, torch.float32).to(image.device)
            result = run_padded(fn, image[..., y0:y0 + th, x0:x0 + tw], multiple).to(image.device)
            if out is None:
                out = torch.zeros(*result.shape[:2], h, w, dtype=result.dtype, device=image.device)
                weight = torch.zeros(h, w, dtype=torch.float32, device=image.device)
            window = wy[:, None] * wx[None, :]
            out[..., y0:y0 + th, x0:x0 + tw] += result * window.to(result.dtype)
            weight[y0:y0 + th, x0:x0 + tw] += window
    return out / weight.to(out.dtype)
