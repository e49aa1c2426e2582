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

from typing import Callable, Sequence, Union

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


def run_padded(fn: Callable[..., Tensor], x: Union[Tensor, Sequence[Tensor]], multiple: int) -> Tensor:
    """fn on `x` (one image or several of one size, given as arguments) replicate-padded at the
    bottom/right to a multiple of `multiple`, cropped back."""
    xs = [x] if isinstance(x, Tensor) else list(x)
    h, w = xs[0].shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        xs = [F.pad(t, (0, pw, 0, ph), mode="replicate") for t in xs]
    return fn(*xs)[..., :h, :w]


def _weight_sum(size: int, tile: int, overlap: int, dtype: torch.dtype) -> Tensor:
    """Σ of the 1-D windows of every tile along one axis of length `size`."""
    total = torch.zeros(size, dtype=dtype)
    length = min(tile, size)
    for start in tile_starts(size, tile, overlap):
        total[start:start + length] += _window_1d(start, length, size, overlap, dtype)
    return total


def restore_tiled(
    fn: Callable[..., Tensor],
    image: Union[Tensor, Sequence[Tensor]],
    tile: int = 512,
    overlap: int = 64,
    multiple: int = 1,
) -> Tensor:
    """Apply `fn` ((N, C, h, w) → (N, C', h, w)) to `image` (N, C, H, W) tile by tile.

    `image` may be a sequence of same-sized images; `fn` then gets their tiles as arguments
    (the SCM's input and LDM output), so they never need to be concatenated at full size.
    Images no larger than `tile` go through `fn` in one call. `multiple` pads what `fn` sees to
    a multiple of it (networks with downsampling need 8 or 16). The output lives on the image's
    device; `fn` gets tiles there and may move them (e.g. CPU image, GPU net).

    Memory beyond the inputs: the output (N·C' values per pixel) and one tile's work. The weight
    sum of a grid of separable windows is separable too, so it is kept as two 1-D sums and the
    output is normalised in place, band by band.
    """
    images = (image,) if isinstance(image, Tensor) else tuple(image)
    if any(x.ndim != 4 or x.shape[-2:] != images[0].shape[-2:] for x in images):
        raise ValueError(f"expected (N, C, H, W) images of one size, got shapes {[tuple(x.shape) for x in images]}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if multiple <= 0:
        raise ValueError(f"multiple must be > 0, got {multiple}")
    device = images[0].device
    h, w = images[0].shape[-2:]

    def run(y0: int, x0: int, th: int, tw: int) -> Tensor:
        return run_padded(fn, [x[..., y0:y0 + th, x0:x0 + tw] for x in images], multiple).to(device)

    if h <= tile and w <= tile:
        return run(0, 0, h, w)
    th, tw = min(tile, h), min(tile, w)
    out = None
    for y0 in tile_starts(h, tile, overlap):
        wy = _window_1d(y0, th, h, overlap, torch.float32).to(device)
        for x0 in tile_starts(w, tile, overlap):
            wx = _window_1d(x0, tw, w, overlap, torch.float32).to(device)
            result = run(y0, x0, th, tw)
            if out is None:
                out = torch.zeros(*result.shape[:2], h, w, dtype=result.dtype, device=device)
            out[..., y0:y0 + th, x0:x0 + tw] += result * (wy[:, None] * wx[None, :]).to(result.dtype)
    sum_y = _weight_sum(h, tile, overlap, torch.float32).to(device)
    sum_x = _weight_sum(w, tile, overlap, torch.float32).to(device)
    for y0 in range(0, h, th):
        band = out[..., y0:y0 + th, :]
        band /= (sum_y[y0:y0 + th, None] * sum_x[None, :]).to(out.dtype)
    return out
