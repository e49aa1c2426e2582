"""Full-reference image metrics with the BasicSR / MATLAB conventions, and LPIPS loading.

Conventions (what `evaluate` writes into its report):

- Inputs are RGB float tensors (N, 3, H, W) in [0, 1]; every function returns one value per
  image, shape (N,), in float64. Evaluation quantises images to 8 bits before calling them, as
  BasicSR does when it compares saved uint8 images.
- `crop_border` pixels are removed from every side before anything else (BasicSR crops before
  the Y conversion; for pointwise conversions the order does not change the result).
- `y_channel=True` compares the BT.601 luma of MATLAB's `rgb2ycbcr`:
  Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1], i.e. Y in [16, 235] on the
  0–255 scale. Here it is kept on the [0, 1] scale (divided by 255): PSNR and SSIM are
  scale-invariant once the peak / data range scales with it.
- PSNR = 10 log10(peak² / MSE) over all kept pixels and channels, peak 1 (≡ 255 on 0–255), in
  float64; identical images give +inf.
- SSIM: 11×11 Gaussian window with σ = 1.5, "valid" filtering (the 5-pixel border where the window
  does not fit is dropped), K1 = 0.01, K2 = 0.03, L = 1 (≡ 255), the map averaged over pixels and
  channels. This is MATLAB's `ssim`, BasicSR's `calculate_ssim` and scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""

from __future__ import annotations

import time
import urllib.error
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# MATLAB rgb2ycbcr luma row for [0, 1] RGB, result on the 0–255 scale.
_BT601_Y = (65.481, 128.553, 24.966)
_BT601_Y_OFFSET = 16.0

# torchvision's AlexNet ImageNet weights: the LPIPS "alex" trunk. The linear calibration layers
# on top ship inside the lpips package itself.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


class LPIPSWeightsError(RuntimeError):
    """The LPIPS backbone weights are not available; the message says where to put them."""


def rgb_to_y(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] → (N, 1, H, W) BT.601 studio-range luma in [16/255, 235/255]."""
    w = torch.tensor(_BT601_Y, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(dim=1, keepdim=True) + _BT601_Y_OFFSET) / 255.0


def _prepare(x: Tensor, y: Tensor, crop_border: int, y_channel: bool) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected two (N, 3, H, W) tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if min(x.shape[-2:]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {tuple(x.shape[-2:])} image")
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    # float64 throughout: PSNR above ~50 dB and SSIM near 1 lose digits in float32.
    x, y = x.double(), y.double()
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y


def psnr(x: Tensor, y: Tensor, crop_border: int = 0, y_channel: bool = False) -> Tensor:
    """Per-image PSNR in dB, (N,) float64; conventions in the module docstring."""
    x, y = _prepare(x, y, crop_border, y_channel)
    # Written out rather than torchmetrics': its log-base constant is float32 (~1e-6 dB off).
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)


SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def ssim(x: Tensor, y: Tensor, crop_border: int = 0, y_channel: bool = False) -> Tensor:
    """Per-image SSIM, (N,) float64; conventions in the module docstring.

    The MATLAB definition: local statistics under an 11×11 Gaussian window (σ 1.5) over the
    "valid" region only, C1 = (0.01·L)², C2 = (0.03·L)², the map averaged. The window is
    separable: the five local statistics are filtered as one depthwise pass along rows and one
    along columns, in float32, and combined in float64. On one 3840×2160 image the float64
    2-D window (kornia's) took 17.1 s and made `evaluate` spend more on SSIM than on restoring;
    this takes 5.1 s and moves SSIM by ~1e-6 (measured on noisy photos at SSIM 0.6-0.99; reports
    print 4 digits). torchmetrics' SSIM is not used: it reflect-pads and averages the padded
    border into the mean, which moves the value away from MATLAB/BasicSR/scikit-image on small
    images.
    """
    x, y = _prepare(x, y, crop_border, y_channel)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least 11×11 pixels after cropping, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    half = SSIM_WINDOW // 2
    taps = torch.exp(-((torch.arange(SSIM_WINDOW, dtype=torch.float64) - half) ** 2) / (2 * SSIM_SIGMA**2))
    taps = (taps / taps.sum()).to(x.device, torch.float32)
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1).float()  # (N, 5C, H, W)
    rows = taps.view(1, 1, 1, -1).expand(5 * c, 1, 1, SSIM_WINDOW)
    stats = F.conv2d(F.conv2d(stats, rows, groups=5 * c), rows.transpose(-1, -2), groups=5 * c).double()
    mu_x, mu_y, xx, yy, xy = stats.split(c, dim=1)
    c1, c2 = 0.01**2, 0.03**2
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def quantize_8bit(x: Tensor) -> Tensor:
    """Round [0, 1] images to the 256 levels a saved 8-bit file holds."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


RETRY_SECONDS = 24 * 3600  # how long a failed AlexNet download is not tried again


def _hub_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _alexnet_state(weights: Optional[Union[str, Path]]) -> dict[str, Tensor]:
    """The AlexNet trunk's state dict: from `weights`, the torch hub cache, or a download."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise LPIPSWeightsError(f"LPIPS weights file not found: {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    from torchvision.models import AlexNet_Weights

    how = f"copy {ALEXNET_FILE} into {_hub_checkpoint().parent} or pass --lpips-weights PATH"
    marker = _hub_checkpoint().with_name(ALEXNET_FILE + ".unreachable")
    if not _hub_checkpoint().is_file() and marker.is_file() and time.time() - marker.stat().st_mtime < RETRY_SECONDS:
        # An offline machine is not asked again on every evaluation (each try waits on the network).
        raise LPIPSWeightsError(f"LPIPS needs the AlexNet backbone weights; the last download try failed "
                                f"({marker.read_text().strip()[:200]}) and is retried after a day or when {marker} is "
                                f"removed; {how}")
    try:
        # Loads from the hub cache when the file is there, downloads into it otherwise.
        return AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = str(getattr(e, "reason", e)).splitlines()[0] if str(e) else type(e).__name__
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(reason + "\n")
        except OSError:
            pass  # a read-only cache: the next run tries again
        raise LPIPSWeightsError(f"LPIPS needs the AlexNet backbone weights and could not download them ({reason}); "
                                f"{how}") from None


def load_lpips(weights: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """LPIPS (AlexNet, v0.1) with its calibrated linear layers, in eval mode on `device`.

    `weights` is a local file holding either torchvision's AlexNet state dict (`features.*` keys,
    e.g. alexnet-owt-7be5be79.pth) or a full LPIPS state dict (`net.slice*` and `lin*` keys).
    Without it the AlexNet weights come from the torch hub cache ($TORCH_HOME/hub/checkpoints),
    downloaded there when a network is reachable. Missing weights raise `LPIPSWeightsError`.
    Call the model as `model(x, y, normalize=True)` with [0, 1] images.
    """
    import lpips

    state = _alexnet_state(weights)
    # pnet_rand=True keeps lpips from asking torchvision for weights itself; the trunk is filled below.
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if any(k.startswith("net.slice") for k in state):
        model.load_state_dict(state)
    else:
        # lpips splits torchvision's `features` Sequential into slices that keep the original
        # child indices as names ("net.slice2.3" is "features.3").
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        if not features:
            raise LPIPSWeightsError(f"{weights}: neither an AlexNet nor an LPIPS state dict")
        slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
        trunk = {f"slice{i + 1}.{k}": v for i, s in enumerate(slices) for k, v in features.items()
                 if k.split(".")[0] in dict(s.named_children())}
        model.net.load_state_dict(trunk)
    return model.eval().to(device)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of each class from a (K, K) confusion matrix (rows: true class); NaN for absent classes."""
    confusion = confusion.double()
    return confusion.diagonal() / confusion.sum(dim=1)
