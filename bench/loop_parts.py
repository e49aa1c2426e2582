"""Where does one pass of the automatic loop gain or lose? For exported weights and the demo's
evaluation tasks, prints per task the mean PSNR (dB, as `evaluate` computes it) of
- `input`: the degraded image;
- `vae`: its round trip through the LDM's VAE (the ceiling of anything the LDM outputs);
- `ldm`: the LDM's sample with the task's own prompt (BIQA taken out of the question);
- `ldm+scm`: that sample corrected by the SCM (when the folder has one);
for each `--strength` given, as a Markdown table for docs/benchmarks.md.

    python bench/loop_parts.py --weights demo_out/weights --data demo_out/data/val-000000.tar [--strength 1 0.3]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from lit_restore.data.degrade.suite import build_task_set
from lit_restore.data.degrade.types import prompt_for
from lit_restore.demo import EVAL_TASKS
from lit_restore.evaluate import select_tasks, true_class
from lit_restore.metrics import psnr, quantize_8bit
from lit_restore.restore import (SamplerSettings, TileSettings, image_generator, load_biqa, load_diffusion,
                                 pick_device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="exported weights folder (biqa/, ldm/, scm/)")
    p.add_argument("--data", required=True, help="clean val shard")
    p.add_argument("--strength", type=float, nargs="+", default=[1.0, 0.3])
    p.add_argument("--steps", type=int, default=10, help="sampler steps at strength 1")
    p.add_argument("--images", type=int, default=8, help="per task")
    a = p.parse_args()
    device = pick_device("cpu")  # threads from the cores this process may use, as `evaluate`
    classes = load_biqa(a.weights, device).class_names
    tasks = select_tasks("gir", a.data, ",".join(EVAL_TASKS))
    print("| task | strength | input | vae | ldm | ldm+scm |\n|---|---|---|---|---|---|")
    for strength in a.strength:
        diffusion = load_diffusion(a.weights, device, SamplerSettings(steps=a.steps, strength=strength), TileSettings())
        ldm = diffusion.ldm
        for task in tasks:
            context = diffusion.contexts([prompt_for(classes[true_class(task, classes)])])
            scores: dict[str, list[float]] = defaultdict(list)
            for _, gt8, lq8 in build_task_set(task, a.data, max_images=a.images):
                gt, lq = gt8[None].float() / 255, lq8[None].float() / 255
                h, w = lq.shape[-2:]
                with torch.no_grad():
                    vae = ldm.decode(ldm.encode_condition(ldm.pad(lq)) * ldm.vae.config.scaling_factor)[..., :h, :w]
                    out = diffusion.sample(lq, context, image_generator(0, device))
                    parts = {"input": lq, "vae": vae, "ldm": out}
                    if diffusion.scm is not None:
                        parts["ldm+scm"] = diffusion.correct(lq, out)
                for name, image in parts.items():
                    scores[name].append(float(psnr(quantize_8bit(image), gt, 4, False)))
            cells = [f"{sum(scores[n]) / len(scores[n]):.2f}" if scores[n] else "–" for n in ("input", "vae", "ldm", "ldm+scm")]
            print(f"| {task.name} | {strength:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
