"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022) and its blocks.

The blocks here are shared with the ConStyle-NAFNet restorer (`lit_restore.models.constyle`).
LayerNorm2d is written with plain tensor ops (no custom autograd.Function) so the nets export
to ONNX with dynamic height and width.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B,C,H,W) tensor, per pixel."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (NAFNet's activation)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Depthwise-conv + simplified channel attention branch, then a gated FFN branch.

    Both branches are added back scaled by β/γ, zero-initialised ("skip-init"), so a fresh
    block is the identity and deep stacks start stable.
    """

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        dw = channels * dw_expand
        ffn = channels * ffn_expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.gate = SimpleGate()
        # Simplified channel attention: global average pool → 1×1 conv → channel scale.
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.gate(self.conv2(self.conv1(self.norm1(x))))
        y = self.conv3(y * self.sca(y))
        x = x + y * self.beta
        y = self.conv5(self.gate(self.conv4(self.norm2(x))))
        return x + y * self.gamma


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad H and W at the bottom/right up to a multiple (as NAFNet's check_image_size)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))


class NAFNet(nn.Module):
    """U-Net of NAFBlocks: each level halves the resolution and doubles the channels.

    Defaults are NAFNet-width32 of the GoPro recipe (enc [1,1,1,28], mid 1, dec [1,1,1,1]).
    Inputs of any size are padded to a multiple of 2**len(enc_blocks) and cropped back.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 32,
        enc_blocks: Sequence[int] = (1, 1, 1, 28),
        middle_blocks: int = 1,
        dec_blocks: Sequence[int] = (1, 1, 1, 1),
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)} must have the same length")
        self.residual = global_residual and in_channels == out_channels
        self.multiple = 2 ** len(enc_blocks)
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        # Channels after each encoder level, the middle and each decoder level, in forward order.
        self.level_widths: list[int] = []
        ch = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(ch) for _ in range(n)]))
            self.level_widths.append(ch)
            self.downs.append(nn.Conv2d(ch, 2 * ch, 2, stride=2))
            ch *= 2
        self.middle = nn.Sequential(*[NAFBlock(ch) for _ in range(middle_blocks)])
        self.level_widths.append(ch)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(ch, 2 * ch, 1, bias=False), nn.PixelShuffle(2)))
            ch //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(ch) for _ in range(n)]))
            self.level_widths.append(ch)
        self.ending = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # One image argument: the ONNX export names a module's inputs after forward's parameters.
        return self.modulated(x, None)

    def modulated(self, x: Tensor, film: Optional[Sequence[tuple[Tensor, Tensor]]]) -> Tensor:
        """Restore `x`; `film` gives a (scale, shift) pair of (B, C) per level (`level_widths`),
        applied as y·(1 + scale) + shift after that level's blocks (a conditioning code's FiLM)."""
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, self.multiple)
        mods = iter(film) if film is not None else None

        def modulate(y: Tensor) -> Tensor:
            if mods is None:
                return y
            scale, shift = next(mods)
            return y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

        y = self.intro(inp)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            y = modulate(enc(y))
            skips.append(y)
            y = down(y)
        y = modulate(self.middle(y))
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            y = modulate(dec(up(y) + skip))
        y = self.ending(y)
        if self.residual:
            y = y + inp
        return y[..., :h, :w]
