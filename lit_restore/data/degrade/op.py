"""What one synthetic degradation op declares (`Op`), and the per-sample draws ops take (`Draws`).

An op is a module of `lit_restore/data/degrade/ops/` that defines `OP`: its parameters (a config
dataclass and their bounds), how they are drawn per sample, how they are applied to a batch, how
severe the result is, its prompt word and its preview strengths. Drawing and applying are kept
apart (as kornia's augmentations do): `draw` consumes the generator, `apply` is a pure function
of the images and the drawn parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Op:
    """One synthetic degradation; see the module docstring."""

    name: str  # its type name, its config section `degrade.<name>` and its key in suite tasks
    config: type  # dataclass of its parameters: `prob`, then ranges ([low, high]) and switches
    bounds: Mapping[str, tuple[float, float]]  # allowed values of the config's numbers and ranges
    # (op config, draws) → parameters per sample. (B,) tensors are the drawn values the Degrader
    # reports; larger ones (noise fields, depth maps) are random inputs of `apply`.
    draw: Callable[[Any, "Draws"], Params]
    apply: Callable[[Tensor, Params, Any], Tensor]  # (images, parameters, op config) → degraded images
    # Parameters → (B,) severity, ≈1 at the top of MiOIR's in-distribution range; the Degrader's
    # label is the applied op with the highest.
    severity: Callable[[Params], Tensor]
    prompt_word: str  # AutoDIR's "A photo needs {word} artifact reduction"
    # Place in the default chain, ascending: the scene (haze, rain), exposure, optics, sampling,
    # the sensor, then compression.
    chain_rank: int
    grid: tuple[Mapping[str, Any], ...]  # strengths shown by `lit-restore degrade --grid`, low to high
    # Checks beyond `bounds`: (op config, key path) → raises ConfigError naming the key.
    check: Optional[Callable[[Any, str], None]] = None
    # `apply` keeps images in [0, 1] within [0, 1], up to float error that 8-bit rounding absorbs
    # (convex mixes, filters with non-negative weights, clipped outputs): the Degrader then rounds
    # its output without clamping first, one pass fewer (tests/test_degrade_ops.py checks it).
    in_range: bool = False


class Draws:
    """Per-sample random draws for a batch of images of `shape` (B, C, H, W), all from one
    generator on one device, plus the batch's depth maps for ops that need them (haze)."""

    def __init__(self, shape: torch.Size | tuple[int, ...], generator: Optional[torch.Generator],
                 device: torch.device, depth: Optional[Tensor] = None, has_depth: Optional[Tensor] = None) -> None:
        self.shape = tuple(shape)
        self.b = self.shape[0]
        self.generator, self.device = generator, device
        self.depth, self.has_depth = depth, has_depth

    def rand(self, *shape: int) -> Tensor:
        """(B, *shape) uniform [0, 1)."""
        return torch.rand((self.b, *shape), generator=self.generator, device=self.device)

    def normal(self) -> Tensor:
        """A standard normal value per pixel of the images, float32."""
        return torch.randn(self.shape, generator=self.generator, device=self.device)

    def uniform(self, bounds: list[float]) -> Tensor:
        lo, hi = float(bounds[0]), float(bounds[1])
        return lo + (hi - lo) * self.rand()

    def bernoulli(self, p: float) -> Tensor:
        return self.rand() < p

    def odd(self, bounds: list[int]) -> Tensor:
        """Odd integers spread evenly over [low, high] (both odd)."""
        lo, hi = int(bounds[0]), int(bounds[1])
        count = (hi - lo) // 2 + 1
        return lo + 2 * torch.floor(self.rand() * count).clamp(max=count - 1)

    def choice(self, count: int) -> Tensor:
        """Indices in [0, count), as floats."""
        return torch.floor(self.rand() * count).clamp(max=count - 1)


def per_image(t: Tensor) -> Tensor:
    """(B,) → (B, 1, 1, 1), to broadcast a per-sample value over images."""
    return t.view(-1, 1, 1, 1)


def quantize_(x: Tensor, clamp: bool = True) -> Tensor:
    """Round to 8 bits in place (what saving the image as PNG would do); `clamp=False` for
    values known to round into [0, 255] already."""
    return (x.clamp_(0, 1) if clamp else x).mul_(255).round_().div_(255)


def quantize(x: Tensor) -> Tensor:
    return quantize_(x.clone())
