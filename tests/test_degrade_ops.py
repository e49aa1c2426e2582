"""Batched degradation ops: statistics, not only shapes."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from lit_restore.data.degrade.kernels import gaussian_kernels, line_kernels, resample_matrices
from lit_restore.data.degrade.op import Draws, quantize, quantize_
from lit_restore.data.degrade.ops import OPS
from lit_restore.data.degrade.ops.blur import blur
from lit_restore.data.degrade.ops.haze import depth_prior, haze
from lit_restore.data.degrade.ops.jpeg import jpeg
from lit_restore.data.degrade.ops.lowlight import low_light
from lit_restore.data.degrade.ops.lowres import lowres
from lit_restore.data.degrade.ops.noise import noise
from lit_restore.data.degrade.ops.rain import mioir_streak_length, rain


@pytest.fixture(scope="module")
def photo():
    """A natural 96×96 crop, (1, 3, H, W) in [0, 1] on the 8-bit grid."""
    rgb = data.astronaut()[40:136, 180:276]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255


def _high_freq(x):
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(x, lap, groups=3)[..., 8:-8, 8:-8].pow(2).mean(dim=(1, 2, 3))


def test_noise_sigma_per_sample_matches_estimate():
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([3.0, 8.0, 15.0, 25.0, 40.0, 10.0])
    gray = torch.tensor([False, True, False, True, False, False])
    x = torch.full((6, 3, 96, 96), 0.5)
    y = noise(x, sigma, torch.zeros(6), gray, torch.randn(x.shape, generator=g))
    est = (y - x).std(dim=(1, 2, 3)) * 255
    assert torch.allclose(est, sigma, rtol=0.1), (est, sigma)
    diff = y - x  # gray noise is identical on the three channels, colour noise is not
    same = (diff[:, 0] - diff[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert same.tolist() == gray.tolist()


def test_poisson_noise_grows_with_intensity_and_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.full((2, 3, 64, 64), 0.1), torch.full((2, 3, 64, 64), 0.8)])
    scale = torch.tensor([1.0, 3.0, 1.0, 3.0])
    y = noise(x, torch.zeros(4), scale, torch.zeros(4, dtype=torch.bool), torch.randn(x.shape, generator=g))
    est = (y - x).std(dim=(1, 2, 3))
    expected = scale * torch.sqrt(x[:, 0, 0, 0] / 256)
    assert torch.allclose(est, expected, rtol=0.1)


def test_blur_lowers_high_frequencies_monotonically(photo):
    x = photo.repeat(5, 1, 1, 1)
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.5])
    k = gaussian_kernels(sigma, sigma, torch.zeros(5), torch.full((5,), 21.0), 21)
    assert torch.allclose(k.sum(dim=(1, 2)), torch.ones(5))
    energy = _high_freq(blur(x, k))
    assert (energy[1:] < energy[:-1]).all(), energy
    assert energy[0] < _high_freq(photo)[0]


def test_kernel_support_and_anisotropy():
    s = torch.tensor([3.0])
    small = gaussian_kernels(s, s, torch.zeros(1), torch.tensor([7.0]), 21)[0]
    assert small[:7].abs().sum() == 0 and small[14:].abs().sum() == 0 and small[7:14, 7:14].sum() > 0.99
    wide_x = gaussian_kernels(torch.tensor([4.0]), torch.tensor([0.8]), torch.zeros(1), torch.tensor([21.0]), 21)[0]
    turned = gaussian_kernels(torch.tensor([4.0]), torch.tensor([0.8]), torch.tensor([math.pi / 2]), torch.tensor([21.0]), 21)[0]
    assert wide_x[10].sum() > 4 * wide_x[:, 10].sum()  # spread along x (σx/σy = 5)
    assert torch.allclose(turned, wide_x.T, atol=1e-6)  # a quarter turn swaps the axes
    streak = line_kernels(torch.tensor([15.0]), torch.tensor([0.0]), torch.tensor([0.5]), 21)[0]
    assert torch.isclose(streak.sum(), torch.tensor(1.0))
    assert streak[:, 10].sum() > 0.7 and streak[10].sum() < 0.1  # angle 0 is vertical
    assert (streak[:, 10] > 0).sum() == 15


def test_jpeg_error_larger_at_low_quality_and_close_to_libjpeg(photo):
    x = photo.repeat(3, 1, 1, 1)
    y = quantize(jpeg(x, torch.tensor([10.0, 50.0, 90.0])))
    err = (y - x).pow(2).mean(dim=(1, 2, 3))
    assert err[0] > err[1] > err[2] > 0
    buf = io.BytesIO()
    Image.fromarray((photo[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, "JPEG", quality=50)
    pil = torch.from_numpy(np.asarray(Image.open(buf)).copy()).permute(2, 0, 1).float() / 255
    psnr_vs_pil = -10 * torch.log10((y[1] - pil).pow(2).mean())
    assert psnr_vs_pil > 33  # the same codec up to rounding details
    odd = jpeg(photo[..., :50, :70], torch.tensor([30.0]))  # not a multiple of 16
    assert odd.shape == (1, 3, 50, 70)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic", "area"])
def test_resample_matrices_match_interpolate(mode):
    x = torch.rand(1, 3, 48, 48)
    m = resample_matrices(torch.tensor([48]), torch.tensor([16]), 48, 20, mode)
    kwargs = {} if mode in ("nearest", "area") else {"align_corners": False}
    ref = F.interpolate(x, size=(16, 16), mode=mode, **kwargs)
    out = m[:, None] @ x @ m[:, None].transpose(-1, -2)
    assert torch.allclose(out[..., :16, :16], ref, atol=1e-5)
    assert out[..., 16:, :].abs().max() == 0


def test_lowres_per_sample_scales_and_modes_in_one_batch():
    x = torch.rand(3, 3, 64, 64)
    scale = torch.tensor([2.0, 4.0, 3.0])
    mode = torch.tensor([1.0, 0.0, 1.0])
    y = lowres(x, scale, mode, ("bilinear", "bicubic"), "bicubic", 2.0)
    for i, (s, m) in enumerate([(2, "bicubic"), (4, "bilinear"), (3, "bicubic")]):
        small = F.interpolate(x[i : i + 1], size=(64 // s, 64 // s), mode=m, align_corners=False)
        ref = F.interpolate(small, size=(64, 64), mode="bicubic", align_corners=False)
        assert torch.allclose(y[i : i + 1], ref, atol=1e-5), i


def test_haze_lowers_contrast_with_beta(photo):
    x = photo.repeat(4, 1, 1, 1)
    depth = depth_prior(4, 96, 96, torch.Generator().manual_seed(0))
    depth = depth[:1].expand(4, -1, -1, -1)
    assert depth.min() >= 0 and depth.max() <= 1
    y = haze(x, depth, torch.tensor([0.0, 0.5, 1.5, 3.0]), torch.full((4,), 0.9))
    contrast = y.std(dim=(1, 2, 3))
    assert torch.allclose(y[0], x[0])
    assert (contrast[1:] < contrast[:-1]).all(), contrast


def test_low_light_lowers_brightness_with_gamma(photo):
    x = photo.repeat(4, 1, 1, 1)
    y = low_light(x, torch.tensor([1.0, 1.5, 2.5, 4.0]), torch.ones(4))
    mean = y.mean(dim=(1, 2, 3))
    assert torch.allclose(y[0], x[0])
    assert (mean[1:] < mean[:-1]).all(), mean
    dim = low_light(photo, torch.tensor([1.0]), torch.tensor([0.35]))
    assert torch.allclose(dim, photo * 0.35)
    g = torch.Generator().manual_seed(0)
    noisy = low_light(photo, torch.tensor([2.0]), torch.ones(1), torch.tensor([10.0]), torch.randn(photo.shape, generator=g))
    assert (noisy - low_light(photo, torch.tensor([2.0]), torch.ones(1))).abs().mean() > 1e-3


def test_rain_adds_bright_streaks_growing_with_amount(photo):
    g = torch.Generator().manual_seed(0)
    x = photo.repeat(3, 1, 1, 1)
    seeds = torch.rand(3, 1, 96, 96, generator=g) < torch.tensor([0.0, 60.0, 300.0]).view(-1, 1, 1, 1) / 25600
    y = rain(x, seeds, torch.full((3,), 20.0), torch.full((3,), 0.3), torch.full((3,), 5.0), 23)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(y[0], x[0])
    gain = (y - x).mean(dim=(1, 2, 3))
    assert 0 < gain[1] < gain[2]
    assert ((y - x) >= -1e-6).all()  # streaks only brighten


def test_rain_streak_length_follows_mioirs_rotated_diagonal():
    """MiOIR: diag(ones(L)) in an L×L window, scaled by 1 − L/100 and rotated, clipped by the window."""
    length = torch.tensor([40.0, 20.0, 20.0])
    angle = torch.tensor([0.0, 0.0, math.pi / 4])
    got = mioir_streak_length(length, angle)
    assert torch.allclose(got, torch.tensor([40 * 0.6 * math.sqrt(2), 20.0, 20 * 0.8 * math.sqrt(2)]))
    x = torch.zeros(1, 3, 96, 96)
    seeds = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(0)) < 60 / 25600
    args = (x, seeds, torch.tensor([40.0]), torch.zeros(1), torch.tensor([3.0]), 59)
    mioir = rain(*args)
    line = rain(*args, mioir_geometry=False)
    # Vertical streaks: MiOIR's are ~34 px long instead of 40, so they cover fewer pixels.
    assert 0 < (mioir[0, 0] > 0.05).sum() < (line[0, 0] > 0.05).sum()


def test_quantize_lands_on_the_8bit_grid():
    x = torch.rand(2, 3, 8, 8) * 1.4 - 0.2
    q = quantize(x)
    assert q.min() >= 0 and q.max() <= 1
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-4)


@pytest.mark.parametrize("name", [name for name, op in OPS.items() if op.in_range])
def test_in_range_ops_need_no_clamp_before_rounding(name):
    """An op marked `in_range` is rounded without a clamp: on flat black and white images, hard
    edges and noise, at the extremes of its bounds and at random draws, clamping first changes
    no 8-bit value. The ops not marked go beyond [0, 1] (noise, bicubic overshoot, read noise)."""
    op, g = OPS[name], torch.Generator().manual_seed(0)
    edges = (torch.arange(64) // 4 % 2).float().expand(3, 64, 64)
    images = torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64), edges, edges.transpose(1, 2),
                          torch.rand(3, 64, 64, generator=g)]).repeat(4, 1, 1, 1)
    for extreme in ("low", "high", None):
        cfg = op.config()
        if extreme is not None:
            for key, (lo, hi) in op.bounds.items():
                value = getattr(cfg, key, None)
                if isinstance(value, list):
                    setattr(cfg, key, [lo if extreme == "low" else hi] * 2)
        if op.check is not None:
            try:
                op.check(cfg, name)
            except Exception:
                continue  # an extreme the op refuses is never applied
        params = op.draw(cfg, Draws(images.shape, g, images.device))
        y = op.apply(images.clone(), params, cfg)
        assert torch.equal(quantize_(y.clone(), clamp=False), quantize_(y.clone())), (name, extreme)
    noisy = OPS["noise"].apply(torch.ones(1, 3, 8, 8), OPS["noise"].draw(
        OPS["noise"].config(sigma=[50.0, 50.0]), Draws((1, 3, 8, 8), g, torch.device("cpu"))), None)
    assert noisy.max() > 1 and not OPS["noise"].in_range
