"""`lit-restore restore`: the automatic BIQA → LDM → SCM loop, the --prompt and --fast modes.

The automatic loop (AutoDIR's inference): each pass
1. BIQA scores the image against the class prompts still in play (softmax over their logits);
2. if "no" artifact wins, stop;
3. the LDM samples with the probability-weighted mixture of the prompts' token embeddings as
   text context (each tile of a large image with the same context);
4. the SCM corrects the LDM output from [input, LDM output], except after a low-resolution pass,
   where the LDM output itself goes on (the SCM would pull the blurry input's structure back);
5. the detected class leaves the prompt set, so each degradation is handled at most once;
up to `max_passes` passes.
"""

from __future__ import annotations

import glob
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_restore.data.images import IMAGE_SUFFIXES, is_image_file, read_image, write_bytes_atomic, write_png

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
) -> LoopResult:
    """Run the loop on one image (1, 3, H, W) in [0, 1].

    `classify(image)` gives (1, K) logits over `classes` (which must hold "no");
    `step(image, weights)` restores with the (K,) prompt mixture weights (zero for classes out of
    play) and returns the LDM output; `correct(image, ldm_out)` is the SCM (None: no SCM).
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
        if correct is not None and detected != SKIP_SCM_AFTER:
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


def to_tensor(rgb: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) → float (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def to_uint8(image: Tensor) -> np.ndarray:
    """float (1, 3, H, W) in [0, 1] → uint8 (H, W, 3)."""
    return (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


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


def load_input(path: Path) -> tuple[Tensor, dict[str, Any]]:
    """Read any supported image as (1, 3, H, W) [0, 1]; `ImageReadError` (one line) when it cannot."""
    rgb, info = read_image(path)
    return to_tensor(rgb), info

