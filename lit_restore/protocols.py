"""The all-in-one benchmark protocols' tables: their test sets and columns, their metric
convention, and the published rows `evaluate --benchmark` prints beside this model's.

Convention, as the protocols' published evaluation code computes it (PromptIR, AirNet and AdaIR,
`utils/val_utils.py` `compute_psnr_ssim` and `utils/image_utils.py` `crop_img`): the test pair is
centre-cropped to a multiple of 16 pixels on each side before the model sees it; the output is clipped to [0, 1] and kept
in floating point (no 8-bit rounding); PSNR and SSIM on RGB with data range 1 and no border
removed, SSIM being scikit-image's `structural_similarity` with its defaults (a uniform 7×7
window, sample covariance, per channel, averaged); each image scored alone and the scores
averaged per test set. MoCE-IR's SSIM uses a Gaussian window instead, so its SSIM column is not
computed the same way (PSNR is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

CROP_BASE = 16
CONVENTION = ("PSNR/SSIM as the protocols' published code (PromptIR/AirNet/AdaIR): RGB, data range 1, output "
              "clipped to [0, 1] without 8-bit rounding, the test pair centre-cropped to a multiple of 16 px "
              "before restoring, no border removed; SSIM = scikit-image structural_similarity defaults (uniform 7×7 window); the "
              "mean over each test set's images")


@dataclass(frozen=True)
class TestSet:
    name: str  # the shard set prep-benchmark writes (test/<name>/) and its samples' json `dataset`
    column: str
    task: str  # its degradation type


PROTOCOLS: dict[str, tuple[TestSet, ...]] = {
    "aio3": (TestSet("sots_outdoor", "SOTS", "haze"), TestSet("rain100l", "Rain100L", "rain"),
             TestSet("cbsd68_s15", "BSD68 σ15", "noise"), TestSet("cbsd68_s25", "BSD68 σ25", "noise"),
             TestSet("cbsd68_s50", "BSD68 σ50", "noise")),
    "aio5": (TestSet("sots_outdoor", "SOTS", "haze"), TestSet("rain100l", "Rain100L", "rain"),
             TestSet("cbsd68_s25", "BSD68 σ25", "noise"), TestSet("gopro", "GoPro", "blur"),
             TestSet("lol", "LOL", "lowlight")),
}


@dataclass(frozen=True)
class Published:
    method: str
    scores: tuple[tuple[float, Optional[float]], ...]  # (PSNR, SSIM or None) per column, in order
    average: tuple[float, Optional[float]]
    source: str


_MOCE = "eduardzamfir/MoCE-IR README (assets/results_aio_{}.png)"
_ADAIR = "c-yn/AdaIR README (figs/adair{}d.PNG)"
PUBLISHED: dict[str, tuple[Published, ...]] = {
    "aio3": (
        Published("AirNet", ((27.94, .962), (34.90, .967), (33.92, None), (31.26, None), (28.00, None)), (31.20, .910),
                  _MOCE.format(3)),
        Published("PromptIR", ((30.58, .974), (36.37, .972), (33.98, None), (31.31, None), (28.06, None)),
                  (32.06, .913), _MOCE.format(3)),
        Published("AdaIR", ((31.06, .980), (38.64, .983), (34.12, None), (31.45, None), (28.19, None)), (32.69, .918),
                  _ADAIR.format(3)),
        Published("MoCE-IR", ((31.34, .979), (38.57, .984), (34.11, None), (31.45, None), (28.18, None)),
                  (32.73, .917), _MOCE.format(3)),
    ),
    "aio5": (
        Published("AirNet", ((21.04, None), (32.98, None), (30.91, None), (24.35, None), (18.18, None)), (25.49, .847),
                  _MOCE.format(5)),
        Published("IDR", ((25.24, None), (35.63, None), (31.60, None), (27.87, None), (21.34, None)), (28.34, .893),
                  _MOCE.format(5)),
        Published("InstructIR-5D", ((27.10, None), (36.84, None), (31.40, None), (29.40, None), (23.00, None)),
                  (29.55, .908), _MOCE.format(5)),
        Published("AdaIR", ((30.53, None), (38.02, None), (31.35, None), (28.12, None), (23.00, None)), (30.20, .910),
                  _ADAIR.format(5)),
        Published("MoCE-IR", ((30.48, None), (38.04, None), (31.34, None), (30.05, None), (23.00, None)),
                  (30.58, .919), _MOCE.format(5)),
    ),
}


def centre_crop(image: Tensor, base: int = CROP_BASE) -> Tensor:
    """(..., H, W) cropped to the largest multiple of `base` on each side, centred (PromptIR's
    crop_img, which crops the test pair before the model sees it)."""
    h, w = image.shape[-2:]
    ch, cw = h - h % base, w - w % base
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[..., top:top + ch, left:left + cw]


def protocol_scores(restored: Tensor, gt: Tensor) -> tuple[float, float]:
    """(PSNR, SSIM) of one (1, 3, H, W) output against its ground truth, in the protocols' convention."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out = centre_crop(restored[0].clamp(0, 1)).permute(1, 2, 0).double().cpu().numpy()
    ref = centre_crop(gt[0].clamp(0, 1)).permute(1, 2, 0).double().cpu().numpy()
    return (float(peak_signal_noise_ratio(ref, out, data_range=1)),
            float(structural_similarity(ref, out, data_range=1, channel_axis=2)))


@dataclass
class BenchmarkTable:
    """This model's row of a protocol's table (None where a test set was not evaluated)."""

    protocol: str
    scores: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # set → (PSNR, SSIM, images)

    def row(self) -> tuple[list[Optional[tuple[float, float]]], Optional[tuple[float, float]]]:
        cells = [self.scores.get(s.name) for s in PROTOCOLS[self.protocol]]
        pairs = [(c[0], c[1]) if c else None for c in cells]
        done = [p for p in pairs if p is not None]
        average = (sum(p for p, _ in done) / len(done), sum(s for _, s in done) / len(done)) if len(done) == len(pairs) else None
        return pairs, average

    def table(self, name: str = "this model") -> tuple[list[str], list[list[str]]]:
        """Headers and rows: this model first, then the published methods with their sources."""
        def cell(v: Optional[tuple[float, Optional[float]]]) -> str:
            if v is None:
                return "—"
            return f"{v[0]:.2f}" + (f" / {v[1]:.3f}" if v[1] is not None else "")

        headers = ["method", *(s.column for s in PROTOCOLS[self.protocol]), "average", "source"]
        pairs, average = self.row()
        rows = [[name, *map(cell, pairs), cell(average) if average else "— (not every set)", "this evaluation"]]
        for p in PUBLISHED[self.protocol]:
            rows.append([p.method, *map(cell, p.scores), cell(p.average), p.source])
        return headers, rows

    def markdown(self, name: str = "this model") -> str:
        headers, rows = self.table(name)
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
