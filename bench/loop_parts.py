"""Where does the automatic loop gain or lose? For exported weights and the demo's evaluation tasks,
prints per task the mean PSNR (dB, as `evaluate` computes it) of
- `input`: the degraded image;
- `vae`: its round trip through the LDM's VAE (what the LDM's decoder can give back of it);
- `ldm`: the LDM's sample with the task's own prompt (BIQA taken out of the question), no SCM;
- `ldm+scm`: that sample corrected by the SCM (when the folder has one);
- `loop`: the whole automatic loop (BIQA → LDM → SCM, up to `--max-passes` passes, the SCM after
  a low-resolution pass too unless `--no-scm-every-pass`), as `evaluate` runs it;
for each `--strength` given, as a Markdown table for docs/benchmarks.md, with the mean over the
tasks and how many tasks each column beats the input on.

`--bands SIGMA` adds a second table: each column split into its low frequencies (a Gaussian blur
of σ SIGMA px) and the rest, the PSNR of each part against the same part of the ground truth
(MSE pooled over the task's images), plus `vae(gt)`, the VAE's round trip of the clean image: the
part of an LDM sample's error its decoder makes on its own.

`--per-image` adds a table of every image's PSNR in each column: which crops a task's mean gains
or loses on.

    python bench/loop_parts.py --weights demo_out/weights --data demo_out/data/val-000000.tar [--strength 1 0.3] [--bands 4] [--per-image]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from lit_restore.data.degrade.suite import build_task_set
from lit_restore.data.degrade.types import prompt_for
from lit_restore.demo import EVAL_TASKS, DemoPlan
from lit_restore.evaluate import select_tasks, true_class
from lit_restore.metrics import psnr, quantize_8bit
from lit_restore.restorers import AutoRestorer, image_generator, load_biqa, load_diffusion, pick_device
from lit_restore.settings import LoopSettings, SamplerSettings, TileSettings

COLUMNS = ("input", "vae", "ldm", "ldm+scm", "loop")
BAND_COLUMNS = ("input", "vae(gt)", "ldm", "ldm+scm", "loop")
BORDER = 4  # as the PSNR of `evaluate`


def round_trip(ldm, images: Tensor) -> Tensor:
    """[0,1] images through the LDM's VAE and back (the condition latent's posterior mode)."""
    h, w = images.shape[-2:]
    return ldm.decode(ldm.encode_condition(ldm.pad(images)) * ldm.vae.config.scaling_factor)[..., :h, :w]


def split_bands(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """(low, rest) of (N,C,H,W) images: a Gaussian blur of σ `sigma` px (reflected borders) and
    what it leaves out; low + rest == x."""
    low = gaussian_blur(x, [2 * round(3 * sigma) + 1] * 2, [sigma, sigma])
    return low, x - low


def band_errors(x: Tensor, gt_bands: tuple[Tensor, Tensor], sigma: float) -> tuple[float, float]:
    """Summed squared error of the low and the rest band of `x` against the ground truth's
    (`split_bands(gt, sigma)`, split once per image), inside the border."""
    inner = (..., slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    return tuple(float((a - b)[inner].double().pow(2).sum()) for a, b in zip(split_bands(x, sigma), gt_bands))


def band_psnr(errors: list[tuple[float, float]], values: int) -> tuple[float, float]:
    """PSNR (dB) of each band from summed squared errors over `values` pixel values in all."""
    return tuple(10 * math.log10(values / e) if e > 0 else math.inf for e in map(sum, zip(*errors)))


def table_row(*cells: str) -> str:
    """One line of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def table_header(*names: str) -> str:
    """A Markdown table's header and separator lines."""
    return table_row(*names) + "\n|" + "---|" * len(names)


def main() -> None:
    plan = DemoPlan()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="exported weights folder (biqa/, ldm/, scm/)")
    p.add_argument("--data", required=True, help="clean val shard")
    p.add_argument("--strength", type=float, nargs="+", default=[plan.strength])
    p.add_argument("--steps", type=int, default=plan.diffusion_steps, help="sampler steps at strength 1")
    p.add_argument("--max-passes", type=int, default=plan.max_passes, help="of the whole loop")
    p.add_argument("--images", type=int, default=plan.eval_images, help="per task")
    p.add_argument("--bands", type=float, metavar="SIGMA", help="also split each column at a Gaussian of σ SIGMA px")
    p.add_argument("--per-image", action="store_true", help="also a table of every image's PSNR per column")
    p.add_argument("--scm-every-pass", action=argparse.BooleanOptionalAction, default=plan.scm_every_pass,
                   help="the loop's SCM also after a low-resolution pass (the demo's setting)")
    a = p.parse_args()
    device = pick_device("cpu")  # threads from the cores this process may use, as `evaluate`
    biqa = load_biqa(a.weights, device)
    classes = biqa.class_names
    tasks = select_tasks("gir", a.data, ",".join(EVAL_TASKS))
    print(table_header("task", "strength", *COLUMNS))
    for strength in a.strength:
        diffusion = load_diffusion(a.weights, device, SamplerSettings(steps=a.steps, strength=strength), TileSettings())
        loop = AutoRestorer(biqa, diffusion, device, LoopSettings(a.max_passes, a.scm_every_pass))
        ldm = diffusion.ldm
        means: dict[str, list[float]] = defaultdict(list)
        band_rows: list[str] = []
        image_rows: list[str] = []
        for task in tasks:
            context = diffusion.contexts([prompt_for(classes[true_class(task, classes)])])
            scores: dict[str, list[float]] = defaultdict(list)
            bands: dict[str, list[tuple[float, float]]] = defaultdict(list)
            values = 0
            for key, gt8, lq8 in build_task_set(task, a.data, max_images=a.images):
                gt, lq = gt8[None].float() / 255, lq8[None].float() / 255
                with torch.no_grad():
                    vae = round_trip(ldm, lq)
                    out = diffusion.sample(lq, context, image_generator(0, device))
                    parts = {"input": lq, "vae": vae, "ldm": out,
                             "loop": loop.restore(lq, image_generator(0, device))[0]}
                    if diffusion.scm is not None:
                        parts["ldm+scm"] = diffusion.correct(lq, out)
                    if a.bands:
                        parts["vae(gt)"] = round_trip(ldm, gt)
                gt_bands = split_bands(gt, a.bands) if a.bands else None
                for name, image in parts.items():
                    image = quantize_8bit(image)
                    scores[name].append(float(psnr(image, gt, BORDER, False)))
                    if a.bands:
                        bands[name].append(band_errors(image, gt_bands, a.bands))
                values += gt[..., BORDER:-BORDER, BORDER:-BORDER].numel()
                if a.per_image:
                    cells = [f"{scores[n][-1]:.2f}" if scores[n] else "–" for n in COLUMNS]
                    image_rows.append(table_row(task.name, str(key), *cells))
            row = {n: sum(scores[n]) / len(scores[n]) for n in COLUMNS if scores[n]}
            for n, v in row.items():
                means[n].append(v)
            cells = [f"{row[n]:.2f}" if n in row else "–" for n in COLUMNS]
            print(table_row(task.name, f"{strength:g}", *cells), flush=True)
            if a.bands:
                cells = ["%.2f / %.2f" % band_psnr(bands[n], values) if bands[n] else "–"
                         for n in BAND_COLUMNS]
                band_rows.append(table_row(task.name, f"{strength:g}", *cells))
        mean = {n: sum(v) / len(v) for n, v in means.items()}
        cells = [f"**{mean[n]:.2f}**" if n in mean else "–" for n in COLUMNS]
        print(table_row("mean", f"{strength:g}", *cells))
        beats = [f"{sum(v > i for v, i in zip(means[n], means['input']))}/{len(tasks)}" if n in means else "–"
                 for n in COLUMNS[1:]]
        print(table_row("tasks above the input", f"{strength:g}", "–", *beats), flush=True)
        if a.bands:
            print(f"\nPSNR (dB) of the low frequencies (Gaussian σ {a.bands:g} px) / of the rest, MSE pooled over each task's images:\n")
            print(table_header("task", "strength", *BAND_COLUMNS))
            print("\n".join(band_rows), flush=True)
        if a.per_image:
            print(f"\nPSNR (dB) per image, strength {strength:g}:\n")
            print(table_header("task", "image", *COLUMNS))
            print("\n".join(image_rows), flush=True)


if __name__ == "__main__":
    main()
