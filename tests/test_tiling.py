"""Tiled processing equals untiled processing for identity and local operators."""

import pytest
import torch
from torch import nn

from lit_restore.tiling import _ramp, restore_tiled, tile_starts


def test_tile_starts_cover_the_axis_with_overlap():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(53, 16, 6)
    assert starts[0] == 0 and starts[-1] == 53 - 16
    assert all(b - a <= 16 - 6 for a, b in zip(starts, starts[1:]))  # every pair overlaps by >= 6


@pytest.mark.parametrize("overlap", [1, 4, 7, 16])
def test_ramps_of_neighbours_cross_fade_to_one(overlap):
    r = _ramp(overlap, torch.float64)
    assert torch.allclose(r + r.flip(0), torch.ones(overlap, dtype=torch.float64))
    assert torch.all(r[1:] >= r[:-1])


def test_identity_is_reproduced_and_tiles_stay_small():
    image = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    seen = []

    def fn(t):
        seen.append(tuple(t.shape[-2:]))
        return t.clone()

    out = restore_tiled(fn, image, tile=16, overlap=6)
    torch.testing.assert_close(out, image)
    assert len(seen) > 1 and all(h <= 16 and w <= 16 for h, w in seen)


def test_local_conv_net_matches_untiled():
    torch.manual_seed(0)
    # Two 3×3 convs: receptive radius 2 = overlap // 4 → equal up to rounding.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    image = torch.rand(1, 3, 45, 70)
    with torch.no_grad():
        full = net(image)
        tiled = restore_tiled(net, image, tile=24, overlap=8)
        # A wider operator (radius 4 > 2) is no longer exact: the test above can fail.
        wide = nn.Conv2d(3, 3, 9, padding=4)
        wide_err = (restore_tiled(wide, image, tile=24, overlap=8) - wide(image)).abs().max()
    assert (tiled - full).abs().max() < 1e-5
    assert wide_err > 1e-4


def test_multiple_pads_what_fn_sees_and_crops_back():
    image = torch.rand(1, 3, 30, 45)

    def fn(t):
        assert t.shape[-2] % 8 == 0 and t.shape[-1] % 8 == 0
        return t.mean(dim=1, keepdim=True)  # a different channel count is allowed

    for img in (image, image[..., :13, :11]):
        out = restore_tiled(fn, img, tile=16, overlap=4, multiple=8)
        assert out.shape == (1, 1, *img.shape[-2:])
        torch.testing.assert_close(out, img.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("tile, overlap, multiple", [(16, 16, 1), (0, 0, 1), (16, -1, 1), (16, 4, 0)])
def test_bad_arguments_raise(tile, overlap, multiple):
    with pytest.raises(ValueError):
        restore_tiled(lambda t: t, torch.rand(1, 3, 40, 40), tile=tile, overlap=overlap, multiple=multiple)


def test_several_inputs_are_tiled_together_and_weights_stay_one_dimensional(monkeypatch):
    a, b = torch.rand(1, 3, 50, 61), torch.rand(1, 2, 50, 61)
    out = restore_tiled(lambda x, y: torch.cat([x, y], dim=1) * 2, (a, b), tile=16, overlap=6, multiple=4)
    torch.testing.assert_close(out, torch.cat([a, b], dim=1) * 2)
    # The only full-size buffer is the output: no (H, W) weight map, no concatenated input.
    sizes = []
    real_zeros = torch.zeros

    def zeros(*shape, **kw):
        t = real_zeros(*shape, **kw)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(torch, "zeros", zeros)
    restore_tiled(lambda x: x, a, tile=16, overlap=6)
    assert sorted(sizes)[-1] == a.numel() and sorted(sizes)[-2] <= 61
    with pytest.raises(ValueError, match="of one size"):
        restore_tiled(lambda x, y: x, (a, b[..., :40, :]), tile=16, overlap=6)
