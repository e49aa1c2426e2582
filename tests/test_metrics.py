"""PSNR/SSIM against scikit-image and hand-computed BT.601 references; LPIPS loading."""

import math
import urllib.error

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lit_restore.evaluate import psnr, ssim
from lit_restore.metrics import ALEXNET_FILE, LPIPSWeightsError, load_lpips, per_class_accuracy, rgb_to_y


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """Two photo crops (N, H, W, 3) uint8 and noisy copies with a fixed seed."""
    rng = np.random.default_rng(7)
    clean = np.stack([skimage.data.astronaut()[60:132, 100:190], skimage.data.coffee()[150:222, 200:290]])
    noisy = np.clip(clean + rng.normal(0, 15, clean.shape), 0, 255).round().astype(np.uint8)
    return clean, noisy


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0


def skimage_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None) -> float:
    return structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=channel_axis)


@pytest.mark.parametrize("crop", [0, 4])
def test_rgb_matches_skimage(pairs, crop):
    clean, noisy = pairs
    got_psnr = psnr(to_tensor(noisy), to_tensor(clean), crop_border=crop)
    got_ssim = ssim(to_tensor(noisy), to_tensor(clean), crop_border=crop)
    assert got_psnr.shape == (2,) and got_psnr.dtype == torch.float64
    c = slice(crop, -crop) if crop else slice(None)
    for i in range(2):
        a, b = clean[i, c, c].astype(np.float64), noisy[i, c, c].astype(np.float64)
        assert abs(got_psnr[i].item() - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-3
        assert abs(got_ssim[i].item() - skimage_ssim(a, b, channel_axis=2)) < 1e-3
    assert got_psnr[0] != got_psnr[1]  # per image, not a batch mean


def bt601_y(a: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma on the 0–255 scale, from uint8 RGB."""
    rgb = a.astype(np.float64) / 255.0
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def test_y_channel_with_crop_matches_hand_computed_reference(pairs):
    clean, noisy = pairs
    crop = 3
    got_psnr = psnr(to_tensor(noisy), to_tensor(clean), crop_border=crop, y_channel=True)
    got_ssim = ssim(to_tensor(noisy), to_tensor(clean), crop_border=crop, y_channel=True)
    for i in range(2):
        ya = bt601_y(clean[i])[crop:-crop, crop:-crop]
        yb = bt601_y(noisy[i])[crop:-crop, crop:-crop]
        mse = np.mean((ya - yb) ** 2)
        assert abs(got_psnr[i].item() - 10 * np.log10(255.0**2 / mse)) < 1e-3
        assert abs(got_ssim[i].item() - skimage_ssim(ya, yb, channel_axis=None)) < 1e-3
    # Luma differs from RGB: the flag must change the numbers.
    assert not torch.allclose(got_psnr, psnr(to_tensor(noisy), to_tensor(clean), crop_border=crop))


def test_y_range_is_studio_swing():
    x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    y = rgb_to_y(x).flatten() * 255
    assert torch.allclose(y, torch.tensor([16.0, 235.0]), atol=1e-4)


def test_psnr_of_a_constant_offset():
    # MSE = (10/255)^2 on every pixel → PSNR = 20 log10(25.5).
    x = torch.full((1, 3, 16, 16), 0.5)
    y = x + 10 / 255
    assert abs(psnr(x, y).item() - 20 * math.log10(25.5)) < 1e-6
    assert psnr(x, x).item() == math.inf
    assert abs(ssim(x, x).item() - 1.0) < 1e-12


def test_bad_shapes_and_crops_raise():
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match="equal shape"):
        psnr(x, torch.rand(1, 3, 20, 21))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(x, x, crop_border=10)
    with pytest.raises(ValueError, match="11"):
        ssim(x, x, crop_border=5)


def test_per_class_accuracy():
    conf = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    acc = per_class_accuracy(conf)
    assert acc[:2].tolist() == [0.75, 0.5] and torch.isnan(acc[2])


def test_lpips_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(LPIPSWeightsError) as e:
        load_lpips()
    msg = str(e.value)
    assert "\n" not in msg and ALEXNET_FILE in msg and "--lpips-weights" in msg and str(tmp_path) in msg
    # The next run does not wait on the network again; it says why and how to supply the file.
    tries = []
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: tries.append(1))
    with pytest.raises(LPIPSWeightsError, match="last download try failed .Name or service not known") as e:
        load_lpips()
    assert not tries and "\n" not in str(e.value) and "--lpips-weights" in str(e.value)
    with pytest.raises(LPIPSWeightsError, match="not found"):
        load_lpips(tmp_path / "missing.pth")


def test_lpips_from_local_random_backbone(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = {k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path / ALEXNET_FILE
    torch.save(features, path)
    model = load_lpips(path)
    # The trunk holds the file's weights, not lpips' own random init.
    assert torch.equal(getattr(model.net.slice2, "3").weight, features["features.3.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, features["features.10.bias"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    with torch.no_grad():
        same = model(x, x, normalize=True).flatten()
        diff = model(x, y, normalize=True).flatten()
    assert torch.all(same.abs() < 1e-6) and torch.all(diff > 0)
    # A full LPIPS state dict loads as well and gives the same values.
    torch.save(model.state_dict(), tmp_path / "lpips_full.pth")
    with torch.no_grad():
        again = load_lpips(tmp_path / "lpips_full.pth")(x, y, normalize=True).flatten()
    assert torch.allclose(again, diff)


def test_training_validation_ssim_is_evaluates_ssim():
    """The stages' val/ssim is the mean of the per-image SSIM `evaluate` reports (64 px crops,
    where torchmetrics' padded-border SSIM differs by a few hundredths)."""
    from _batches import tiny_stage
    from lit_restore.metrics import ssim as eval_ssim

    stage = tiny_stage("restorer")
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(4, 3, 64, 64, generator=g)
    pred = (gt + 0.1 * torch.randn(4, 3, 64, 64, generator=g)).clamp(0, 1)
    stage.log_restoration_metrics(pred[:2], gt[:2])
    stage.log_restoration_metrics(pred[2:], gt[2:])
    assert abs(float(stage.val_ssim.compute()) - float(eval_ssim(pred, gt).mean())) < 1e-6


def test_ssim_matches_the_float64_two_dimensional_window():
    """The separable float32 filtering (3× faster on large images) against kornia's float64 2-D
    window, the MATLAB definition computed the slow way."""
    from kornia.metrics import ssim as kornia_ssim

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 70, 90, generator=g, dtype=torch.float64)
    for sigma in (0.005, 0.05, 0.3):
        noisy = (clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        ref = kornia_ssim(noisy, clean, window_size=11, max_val=1.0, eps=0.0, padding="valid").mean(dim=(1, 2, 3))
        assert (ssim(noisy, clean) - ref).abs().max() < 1e-5
