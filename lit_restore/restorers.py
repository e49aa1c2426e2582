"""The networks an export holds, loaded for inference, and the three ways `restore` and `evaluate`
use them: `AutoRestorer` (the automatic loop, `lit_restore.loop`), `PromptRestorer` (`--prompt`:
one LDM pass with the user's instruction, then the SCM) and `FastRestorer` (`--fast`: the
feed-forward ConStyle restorer). Each offers `restore(image, generator)` → (image, log entries).
Images larger than `tile` go through the LDM, SCM and restorer tile by tile (`lit_restore.tiling`),
so the networks' memory is set by the tile; BIQA scores a grid of native-scale crops (what it was
trained on) and needs no tiling.
"""

from __future__ import annotations

import os

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lit_restore.data.degrade.types import prompt_for
from lit_restore.exported import exported_model_config, load_exported
from lit_restore.loop import automatic_loop, mix_prompts
from lit_restore.models.clip import PromptCLIP, TransformersTextTower
from lit_restore.models.ldm import LatentDiffusion, saved_prediction_type
from lit_restore.settings import LoopSettings, SamplerSettings, TileSettings
from lit_restore.tiling import restore_tiled

class MissingWeightsError(FileNotFoundError):
    """An exported stage the chosen mode needs is not in the weights folder (one-line message)."""


def pick_device(device: str, threads: int = 0) -> torch.device:
    """'auto' → the first CUDA device when there is one, else the CPU. On the CPU, torch gets
    `threads` threads (0: as `lit_restore.threads.cpu_threads` chooses)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        have = torch.cuda.device_count()
        raise ValueError(f"--device {device}: this machine has {have or 'no'} CUDA GPU{'s' if have != 1 else ''}; "
                         "use --device cpu (or auto)")
    cores = os.cpu_count() or 1
    if not 0 <= threads <= cores:
        raise ValueError(f"--threads {threads}: this machine has {cores} cores; give 0 (one per core) up to {cores}")
    if dev.type == "cpu":
        from lit_restore.threads import use_cpu_threads

        use_cpu_threads(requested=threads)
    return dev


def has_stage(weights: str | Path, stage: str) -> bool:
    return (Path(weights) / stage / "model.safetensors").is_file()


def load_stage(weights: str | Path, stage: str, device: torch.device) -> nn.Module:
    """An exported stage's inference module on `device`; `MissingWeightsError` when it is absent."""
    if not Path(weights).is_dir():
        raise MissingWeightsError(f"weights folder not found: {weights} (an `lit-restore export --out` folder)")
    if (Path(weights) / "model.safetensors").is_file():  # a stage subfolder, not the export
        raise MissingWeightsError(f"{weights} is one stage of an export; --weights takes the folder that holds "
                                  f"it: --weights {Path(weights).parent}")
    if not has_stage(weights, stage):
        raise MissingWeightsError(f"no exported {stage} weights in {Path(weights) / stage} "
                                  f"(run `lit-restore export <{stage} run>/checkpoints/last.ckpt --out {weights}`)")
    return load_exported(weights, stage).to(device)


def load_biqa(weights: str | Path, device: torch.device) -> PromptCLIP:
    """The exported BIQA CLIP scoring the prompts of the classes it was trained on."""
    model = load_stage(weights, "biqa", device)
    m = exported_model_config(weights, "biqa")
    return PromptCLIP(model, m.classes, resize=m.resize).eval().to(device)


# BIQA scores up to this many native-scale crops per side of an image and averages their logits:
# one centre crop misses what the rest of the image shows (a flat or black centre looks clean).
# Demo weights, 56 degraded + 8 clean 128-px images: accuracy 0.39 with the centre crop, 0.58 with
# the 4x4 grid (docs/benchmarks.md, "Demo").
BIQA_CROPS_PER_SIDE = 4


def crop_offsets(size: int, crop: int, count: int) -> list[int]:
    """`count` evenly spaced offsets of a `crop`-long window in `size`, first and last at the ends."""
    if count == 1:
        return [(size - crop) // 2]
    return [round(i * (size - crop) / (count - 1)) for i in range(count)]


def biqa_logits(biqa: PromptCLIP, image: Tensor, device: torch.device) -> Tensor:
    """(1, K) class logits of a CPU image (1, 3, H, W): the mean over a grid of native-scale crops
    (as many as fit without overlap, at most BIQA_CROPS_PER_SIDE per side); only those crops go
    to `device`. An image smaller than the crop, or a BIQA trained with `resize`, is scored whole."""
    h, w = image.shape[-2:]
    th, tw = biqa.image_size
    if not biqa.resize and h >= th and w >= tw:
        rows = crop_offsets(h, th, min(BIQA_CROPS_PER_SIDE, h // th))
        cols = crop_offsets(w, tw, min(BIQA_CROPS_PER_SIDE, w // tw))
        image = torch.cat([image[..., r:r + th, c:c + tw] for r in rows for c in cols])
    with torch.no_grad():
        return biqa.logits(image.to(device)).float().mean(dim=0, keepdim=True).cpu()


class TiledDiffusion:
    """The LDM with its text tower (+ the SCM), sampled and corrected tile by tile; gives the text
    contexts of prompts."""

    def __init__(self, ldm: LatentDiffusion, text: PromptCLIP | TransformersTextTower, scm: Optional[nn.Module],
                 device: torch.device, sampling: SamplerSettings, tiles: TileSettings) -> None:
        self.ldm, self.text, self.scm, self.device = ldm, text, scm, device
        self.sampling, self.tiles = sampling, tiles
        # The unconditional context of the three-way guidance: the empty prompt's states.
        self.null_context = self.contexts([""])

    def contexts(self, texts: Sequence[str]) -> Tensor:
        """(N, L, D) token states of `texts` from the text tower the LDM was trained with."""
        return self.text.token_states(texts).float()

    @torch.no_grad()
    def sample(self, image: Tensor, context: Tensor, generator: torch.Generator) -> Tensor:
        """LDM output for a CPU image (1, 3, H, W), tile by tile with one context (1, L, D)."""
        s = self.sampling

        def run(tile: Tensor) -> Tensor:
            return self.ldm.sample(tile.to(self.device), context, self.null_context, steps=s.steps, sampler=s.sampler,
                                   guidance_text=s.guidance_text, guidance_image=s.guidance_image,
                                   generator=generator, strength=s.strength).cpu()

        return restore_tiled(run, image, self.tiles.tile, self.tiles.overlap)

    @torch.no_grad()
    def correct(self, image: Tensor, ldm_out: Tensor) -> Tensor:
        """The SCM's corrected image from the pass input and the LDM output, tile by tile."""
        def run(lq: Tensor, out: Tensor) -> Tensor:
            return self.scm(lq.to(self.device), out.to(self.device)).clamp(0, 1).cpu()

        return restore_tiled(run, (image, ldm_out), self.tiles.tile, self.tiles.overlap)


def load_text_tower(weights: str | Path, device: torch.device) -> TransformersTextTower:
    """The text tower the exported LDM was trained with: its text_encoder/ and tokenizer/ (the
    export converted them from the training config's open_clip tower; nothing outside the
    weights folder is read)."""
    folder = Path(weights) / "ldm"
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise MissingWeightsError(
            f"{folder}: no text_encoder/ and tokenizer/; export the LDM from a run trained with a pretrained text "
            "tower (model.clip.pretrained=<CLIP weights or a biqa checkpoint>)")
    return TransformersTextTower.from_folder(folder).to(device)


def load_diffusion(weights: str | Path, device: torch.device, sampling: SamplerSettings,
                   tiles: TileSettings) -> TiledDiffusion:
    """The exported LDM with its text tower, and the SCM when one is exported."""
    modules = load_stage(weights, "ldm", device)
    text = load_text_tower(weights, device)
    prediction = exported_model_config(weights, "ldm").prediction_type
    saved = saved_prediction_type(str(Path(weights) / "ldm"))
    if saved is not None and saved != prediction:
        raise MissingWeightsError(f"{Path(weights) / 'ldm'}: config.yaml says prediction_type {prediction}, "
                                  f"scheduler/scheduler_config.json {saved}; export the LDM again")
    ldm = LatentDiffusion(modules["unet"], modules["vae"], prediction)
    scm = load_stage(weights, "scm", device) if has_stage(weights, "scm") else None
    return TiledDiffusion(ldm.eval().to(device), text, scm, device, sampling, tiles)


class FastRestorer:
    """`--fast`: the exported feed-forward ConStyle restorer alone."""

    mode = "fast"

    def __init__(self, weights: str | Path, device: torch.device, tiles: TileSettings) -> None:
        self.net = load_stage(weights, "restorer", device)
        self.device, self.tiles = device, tiles

    @torch.no_grad()
    def restore(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        out = restore_tiled(lambda x: self.net(x.to(self.device)).float().cpu(), image, self.tiles.tile,
                            self.tiles.overlap)
        return out.clamp_(0, 1), {"mode": self.mode}


class PromptRestorer:
    """`--prompt TEXT`: one LDM pass with the user's instruction as context, then the SCM."""

    mode = "prompt"

    def __init__(self, diffusion: TiledDiffusion, prompt: str) -> None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; give an instruction such as 'A photo needs noise artifact reduction'")
        self.diffusion, self.prompt = diffusion, prompt
        self.context = diffusion.contexts([prompt])

    def restore(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        out = self.diffusion.sample(image, self.context, generator)
        scm = self.diffusion.scm is not None
        if scm:
            out = self.diffusion.correct(image, out)
        return out, {"mode": self.mode, "prompt": self.prompt, "scm": scm}


class AutoRestorer:
    """The automatic loop: BIQA → prompt mixture → LDM → SCM, until "no" artifact is detected."""

    mode = "auto"

    def __init__(self, biqa: PromptCLIP, diffusion: TiledDiffusion, device: torch.device,
                 loop: Optional[LoopSettings] = None) -> None:
        self.biqa, self.diffusion, self.device, self.loop = biqa, diffusion, device, loop or LoopSettings()
        self.classes = list(biqa.class_names)
        self.prompt_states = diffusion.contexts([prompt_for(c) for c in self.classes])

    def restore(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        d = self.diffusion
        result = automatic_loop(
            image,
            classify=lambda x: biqa_logits(self.biqa, x, self.device),
            classes=self.classes,
            step=lambda x, w: d.sample(x, mix_prompts(w, self.prompt_states), generator),
            correct=d.correct if d.scm is not None else None,
            max_passes=self.loop.max_passes,
            scm_every_pass=self.loop.scm_every_pass,
        )
        return result.image, {
            "mode": self.mode,
            "detected": [p.detected for p in result.passes if p.detected != "no"],
            "stopped": result.stopped,
            "passes": [asdict(p) for p in result.passes],
        }


# What every mode offers: `restore(image, generator)` → (restored image, JSON log entries).
Restorer = Union[FastRestorer, PromptRestorer, AutoRestorer]


def build_restorer(weights: str, device: torch.device, prompt: Optional[str], fast: bool, sampling: SamplerSettings,
                   tiles: TileSettings, loop: LoopSettings) -> Restorer:
    """The restorer of the chosen mode from the exported weights (MissingWeightsError when a needed
    stage is not there)."""
    if fast:
        return FastRestorer(weights, device, tiles)
    if prompt is not None:
        return PromptRestorer(load_diffusion(weights, device, sampling, tiles), prompt)
    biqa = load_biqa(weights, device)
    return AutoRestorer(biqa, load_diffusion(weights, device, sampling, tiles), device, loop)


def image_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator per image, on the device the models run on (CUDA's random functions
    refuse a CPU generator): an image's result does not depend on the images before it."""
    return torch.Generator(device=device).manual_seed(seed)
