"""`lit-restore restore`: the automatic BIQA → LDM → SCM loop, the --prompt and --fast modes.

The automatic loop (AutoDIR's inference): each pass
1. BIQA scores the image against the class prompts still in play (softmax over their logits);
2. if "no" artifact wins, stop;
3. the LDM samples with the probability-weighted mixture of the prompts' token embeddings as
   text context (each tile of a large image with the same context);
4. the SCM corrects the LDM output from [input, LDM output], except after a low-resolution pass,
   where the LDM output itself goes on (the SCM would pull the blurry input's structure back;
   AutoDIR's evaluation). `scm_every_pass` keeps the SCM there too: the tiny SCM, trained on
   samples of every type, gains after such passes (docs/benchmarks.md, "The automatic loop");
5. the detected class leaves the prompt set, so each degradation is handled at most once;
up to `max_passes` passes.

`--prompt TEXT` runs one pass with the text tower's states of the user's own instruction;
`--fast` runs the feed-forward ConStyle restorer alone. Images larger than `tile` go through
the LDM, SCM and restorer tile by tile (`lit_restore.tiling`), so the networks' memory is set
by the tile; BIQA scores a grid of native-scale crops (what it was trained on) and needs no
tiling. The image itself is held as float32 (12 bytes per pixel per copy: the input, each
pass's LDM output and corrected image) and converted from and to 8 bits band by band:
measured peak growth (bench/restore_memory.py, 5000² input) ≈ 28 bytes per pixel for --fast,
≈ 52 for the loop with two restoring passes.
Outputs are 8-bit PNGs (grayscale when the input was) plus a JSON log per image.
Exit codes: 0 every image restored; 1 some inputs failed (unreadable or out of memory, listed on
stderr and in OUT/failed.txt), the others were written; 2 nothing was done (missing weights, bad
arguments, no inputs, an output folder that holds an input).
"""

from __future__ import annotations

import glob
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lit_restore.data.degrade.types import prompt_for
from lit_restore.data.images import IMAGE_SUFFIXES, ImageReadError, is_image_file, read_image, write_bytes_atomic, write_png
from lit_restore.exported import exported_model_config, load_exported
from lit_restore.models.clip import PromptCLIP, TransformersTextTower
from lit_restore.models.ldm import LatentDiffusion, saved_prediction_type
from lit_restore.settings import LoopSettings, RunSettings, SamplerSettings, TileSettings, check_settings
from lit_restore.tiling import restore_tiled

# A pass that restored this class feeds its LDM output on without the SCM.
SKIP_SCM_AFTER = "lowres"


@dataclass
class PassLog:
    """What one pass of the automatic loop saw and did."""

    index: int
    probabilities: dict[str, float]  # over the classes still in play
    detected: str
    scm: bool = False  # whether the SCM corrected this pass's output


@dataclass
class LoopResult:
    image: Tensor
    passes: list[PassLog] = field(default_factory=list)
    stopped: str = ""  # "no artifact" or "max passes"


def automatic_loop(
    image: Tensor,
    classify: Callable[[Tensor], Tensor],
    classes: Sequence[str],
    step: Callable[[Tensor, Tensor], Tensor],
    correct: Optional[Callable[[Tensor, Tensor], Tensor]],
    max_passes: int = 7,
    scm_every_pass: bool = False,
) -> LoopResult:
    """Run the loop on one image (1, 3, H, W) in [0, 1].

    `classify(image)` gives (1, K) logits over `classes` (which must hold "no");
    `step(image, weights)` restores with the (K,) prompt mixture weights (zero for classes out of
    play) and returns the LDM output; `correct(image, ldm_out)` is the SCM (None: no SCM), skipped
    after a `SKIP_SCM_AFTER` pass unless `scm_every_pass`.
    """
    classes = list(classes)
    if "no" not in classes:
        raise ValueError(f"the BIQA classes must include 'no'; got {', '.join(classes)}")
    in_play = torch.ones(len(classes), dtype=torch.bool)
    result = LoopResult(image=image)
    for index in range(max_passes):
        logits = classify(result.image).reshape(-1).float().cpu()
        probs = logits.masked_fill(~in_play, float("-inf")).softmax(dim=0)
        detected = classes[int(probs.argmax())]
        log = PassLog(index, {c: float(p) for c, p, keep in zip(classes, probs, in_play) if keep}, detected)
        result.passes.append(log)
        if detected == "no":
            result.stopped = "no artifact"
            return result
        ldm_out = step(result.image, probs)
        if correct is not None and (scm_every_pass or detected != SKIP_SCM_AFTER):
            result.image = correct(result.image, ldm_out)
            log.scm = True
        else:
            result.image = ldm_out
        in_play[classes.index(detected)] = False
    result.stopped = "max passes"
    return result


def mix_prompts(weights: Tensor, prompt_states: Tensor) -> Tensor:
    """Σ_k w_k E_T(T_k): (K,) weights × (K, L, D) token states → (1, L, D) context."""
    return torch.einsum("k,kld->ld", weights.to(prompt_states), prompt_states)[None]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files from paths, folders (searched recursively) and glob patterns.

    Returns the files in a stable order without duplicates, and one error line per input that
    matched nothing.
    """
    files: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                errors.append(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file() and is_image_file(p))
            if not found:
                errors.append(f"{item}: no image matches this pattern")
        else:
            found = []
            errors.append(f"{item}: no such file or folder")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, errors


def output_stem(path: Path, taken: set[str]) -> str:
    """The input's file stem, suffixed with _2, _3, ... when an earlier input had the same stem."""
    stem, n = path.stem, 1
    while stem in taken:
        n += 1
        stem = f"{path.stem}_{n}"
    taken.add(stem)
    return stem


_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N")


# Rows converted at a time between uint8 HWC and float CHW: the temporaries stay this tall.
BAND = 256


def to_tensor(rgb: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) → float (1, 3, H, W) in [0, 1], with no full-size temporary."""
    h, w = rgb.shape[:2]
    out = torch.empty(1, 3, h, w, dtype=torch.float32)
    for y0 in range(0, h, BAND):
        out[0, :, y0:y0 + BAND] = torch.from_numpy(rgb[y0:y0 + BAND].transpose(2, 0, 1).astype(np.float32))
    return out.div_(255.0)


def to_uint8(image: Tensor) -> np.ndarray:
    """float (1, 3, H, W) in [0, 1] → uint8 (H, W, 3), band by band (no full-size temporary)."""
    h, w = image.shape[-2:]
    out = np.empty((h, w, 3), np.uint8)
    for y0 in range(0, h, BAND):
        band = image[0, :, y0:y0 + BAND].clamp(0, 1).mul_(255).round_()
        out[y0:y0 + BAND] = band.byte().permute(1, 2, 0).cpu().numpy()
    return out


def save_result(out_dir: Path, stem: str, image: Tensor, info: dict[str, Any], log: dict[str, Any]) -> Path:
    """Write the restored image (8-bit PNG; grayscale when the input was) and its JSON log."""
    rgb = to_uint8(image)
    path = out_dir / f"{stem}.png"
    if info.get("mode") in _GRAY_MODES:
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("L").save(buf, format="PNG")
        write_bytes_atomic(path, buf.getvalue())
    else:
        write_png(path, rgb)
    write_bytes_atomic(out_dir / f"{stem}.json", json.dumps(log, indent=2).encode("utf-8"))
    return path


def check_out_dir(out: Path, inputs: Sequence[Path], option: str = "--out") -> None:
    """ValueError (one line) when the output folder is, or holds, one of the inputs: its files
    would be overwritten by results, or read back as inputs by the next run."""
    root = out.resolve()
    for path in inputs:
        resolved = path.resolve()
        if resolved == root or root in resolved.parents:
            raise ValueError(f"{option} {out} holds the input {path}; choose an output folder outside the inputs")


def load_input(path: Path) -> tuple[Tensor, dict[str, Any]]:
    """Read any supported image as (1, 3, H, W) [0, 1]; `ImageReadError` (one line) when it cannot."""
    rgb, info = read_image(path)
    return to_tensor(rgb), info



# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class MissingWeightsError(FileNotFoundError):
    """An exported stage the chosen mode needs is not in the weights folder (one-line message)."""


def pick_device(device: str, threads: int = 0) -> torch.device:
    """'auto' → the first CUDA device when there is one, else the CPU. On the CPU, torch gets
    `threads` threads (0: as `lit_restore.threads.cpu_threads` chooses)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
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


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def restore_file(restorer: Restorer, path: Path, out_dir: Path, taken: set[str], seed: int, device: torch.device) -> None:
    """Read, restore and write one input (its stem joins `taken`); its buffers go when it returns."""
    image, info = load_input(path)
    start = time.perf_counter()
    restored, log = restorer.restore(image, image_generator(seed, device))
    del image  # the loop's input buffer, before the 8-bit copy of the result is made
    stem = output_stem(path, taken)
    log = {"input": str(path), "output": f"{stem}.png", "size": list(info["size"]), "input_mode": info["mode"],
           "bit_depth": info["bit_depth"], **log, "seconds": round(time.perf_counter() - start, 3)}
    save_result(out_dir, stem, restored, info, log)


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


def _error(message: str) -> None:
    print(f"lit-restore restore: {message}", file=sys.stderr)


def progress_bar(label: str):
    """A rich progress bar on stderr: label, bar, done/total, elapsed, current item."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=Console(stderr=True))


def restore_command(weights: str, inputs: Sequence[str], out: str, prompt: Optional[str] = None, fast: bool = False,
                    sampling: Optional[SamplerSettings] = None, tiles: Optional[TileSettings] = None,
                    loop: Optional[LoopSettings] = None, run_settings: Optional[RunSettings] = None) -> int:
    """Restore every image of `inputs` into `out`; exit code as in the module docstring."""
    sampling, tiles = sampling or SamplerSettings(), tiles or TileSettings()
    loop, run = loop or LoopSettings(), run_settings or RunSettings()
    try:
        files, missing, out_dir = setup_inputs(inputs, out, prompt, fast, sampling, tiles, loop)
        dev = pick_device(run.device, run.threads)
        restorer = build_restorer(weights, dev, prompt, fast, sampling, tiles, loop)
    except (MissingWeightsError, ValueError) as e:
        _error(str(e))
        return 2
    failed = restore_files(restorer, files, out_dir, run.seed, dev)
    if failed:
        write_bytes_atomic(out_dir / "failed.txt", ("\n".join(failed) + "\n").encode("utf-8"))
    note = f"; {len(failed)} failed (see {out_dir / 'failed.txt'})" if failed else ""
    print(f"restored {len(files) - len(failed)} of {len(files)} image(s) into {out_dir}{note}")
    return 1 if failed or missing else 0


def setup_inputs(inputs: Sequence[str], out: str, prompt: Optional[str], fast: bool, sampling: SamplerSettings,
                 tiles: TileSettings, loop: LoopSettings) -> tuple[list[Path], list[str], Path]:
    """The argument checks and the input files: (files, one error line per input that matched
    nothing, printed here, the output folder); ValueError with one line when nothing can be done."""
    if fast and prompt is not None:
        raise ValueError("--fast and --prompt exclude each other (--fast runs the restorer alone, without the LDM)")
    check_settings(sampling, tiles, loop)
    files, missing = collect_inputs(inputs)
    for line in missing:
        _error(line)
    if not files:
        raise ValueError("no input images")
    out_dir = Path(out)
    check_out_dir(out_dir, files)
    return files, missing, out_dir


def restore_files(restorer: Restorer, files: Sequence[Path], out_dir: Path, seed: int, device: torch.device) -> list[str]:
    """Restore each file into `out_dir`; returns one line per file that failed (unreadable, out of
    memory), the others are written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    failed: list[str] = []
    # Progress and skip notes on stderr: stdout keeps the one summary line.
    with progress_bar("restore") as bar:
        job = bar.add_task("", total=len(files))
        for path in files:
            bar.update(job, description=path.name)
            reason = None
            try:
                restore_file(restorer, path, out_dir, taken, seed, device)
            except ImageReadError as e:
                reason = str(e)
            except (torch.OutOfMemoryError, MemoryError) as e:
                # One image too large for this machine; the next one may fit.
                reason = f"{path}: out of memory ({type(e).__name__}); try a smaller --tile or a larger machine"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if reason is not None:
                failed.append(reason)
                bar.console.print(f"[red]skipped[/red] {reason}")
            bar.advance(job)
    return failed
