"""bench/loop_parts.py's frequency split (`--bands`): where an error lands and what PSNR it gives."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("loop_parts", Path(__file__).resolve().parents[1] / "bench" / "loop_parts.py")
loop_parts = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(loop_parts)


def test_the_bands_add_up_and_a_flat_image_is_all_low():
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    low, rest = loop_parts.split_bands(x, 4.0)
    torch.testing.assert_close(low + rest, x)
    assert rest.abs().mean() > 0.1  # uniform noise is mostly high frequencies
    flat_low, flat_rest = loop_parts.split_bands(torch.full((1, 3, 40, 40), 0.3), 4.0)
    torch.testing.assert_close(flat_low, torch.full_like(flat_low, 0.3))
    assert flat_rest.abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["offset", "checkerboard"])
def test_an_error_lands_in_its_band(kind):
    gt = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    if kind == "offset":  # a colour shift: all low frequencies
        error = torch.full_like(gt, 0.05)
    else:  # a one-pixel checkerboard: nothing a σ 4 px Gaussian keeps
        yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
        error = ((yy + xx) % 2 * 2 - 1).to(gt.dtype).expand_as(gt) * 0.05
    low, rest = loop_parts.band_errors(gt + error, loop_parts.split_bands(gt, 4.0), 4.0)
    total = float(error[..., 4:-4, 4:-4].double().pow(2).sum())
    big, small = (low, rest) if kind == "offset" else (rest, low)
    assert big == pytest.approx(total, rel=0.01)
    assert small < 1e-3 * total


def test_band_psnr_pools_the_squared_errors_over_all_values():
    # Two images of 100 values each: summed errors 0.01 and 0.03 in the low band → MSE 2e-4.
    low, rest = loop_parts.band_psnr([(0.01, 0.0), (0.03, 0.2)], 200)
    assert low == pytest.approx(10 * math.log10(1 / 2e-4))
    assert rest == pytest.approx(30.0)  # 0.2 over 200 values


def test_tables_are_markdown_with_one_separator_per_column():
    assert loop_parts.table_header("task", "image", "input") == "| task | image | input |\n|---|---|---|"
    assert loop_parts.table_row("mean", "1", "–", "3/7") == "| mean | 1 | – | 3/7 |"
