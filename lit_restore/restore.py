"""`lit-restore restore`: images, folders and globs in, restored PNGs and JSON logs out.

setup (arguments, inputs, the restorer of the chosen mode: `lit_restore.restorers`) → restore
each file → one summary line. The automatic loop is `lit_restore.loop`. The image itself is held
as float32 (12 bytes per pixel per copy: the input, each pass's LDM output and corrected image)
and converted from and to 8 bits band by band:
measured peak growth (bench/restore_memory.py, 5000² input) ≈ 28 bytes per pixel for --fast,
≈ 52 for the loop with two restoring passes.
Outputs are 8-bit PNGs (grayscale when the input was) plus a JSON log per image.
Exit codes: 0 every image restored; 1 some inputs failed (unreadable or out of memory, listed on
stderr and in OUT/failed.txt), the others were written; 2 nothing was done (missing weights, bad
arguments, no inputs, an output folder that holds an input).
"""

from __future__ import annotations

import errno
import glob
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_restore.data.images import (IMAGE_SUFFIXES, ImageReadError, encode_png, is_image_file, read_image, write_bytes_atomic,
                                     write_files_atomic)
from lit_restore.names import one_line
from lit_restore.restorers import MissingWeightsError, Restorer, build_restorer, image_generator, pick_device
from lit_restore.settings import LoopSettings, RunSettings, SamplerSettings, TileSettings, check_settings

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
    """Write the restored image (8-bit PNG; grayscale when the input was) and its JSON log as a
    pair: both or, when the disk fails, neither."""
    rgb = to_uint8(image)
    path = out_dir / f"{stem}.png"
    if info.get("mode") in _GRAY_MODES:
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("L").save(buf, format="PNG")
        png = buf.getvalue()
    else:
        png = encode_png(rgb)
    write_files_atomic([(path, png), (out_dir / f"{stem}.json", json.dumps(log, indent=2).encode("utf-8"))])
    return path


def check_out_dir(out: Path, inputs: Sequence[Path], option: str = "--out") -> None:
    """ValueError (one line) when the output folder is, or holds, one of the inputs: its files
    would be overwritten by results, or read back as inputs by the next run."""
    root = out.resolve()
    for path in inputs:
        resolved = path.resolve()
        if resolved == root or root in resolved.parents:
            raise ValueError(f"{option} {out} holds the input {path}; choose an output folder outside the inputs")


def make_out_dir(out: Path, option: str = "--out") -> None:
    """Create the output folder before the first image, so a file in its place or a read-only
    parent is one line (ValueError)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {out}: cannot make this folder ({e.strerror or e})") from None


def load_input(path: Path) -> tuple[Tensor, dict[str, Any]]:
    """Read any supported image as (1, 3, H, W) [0, 1]; `ImageReadError` (one line) when it cannot."""
    rgb, info = read_image(path)
    return to_tensor(rgb), info


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
    loop, run_settings = loop or LoopSettings(), run_settings or RunSettings()
    try:
        dev = pick_device(run_settings.device, run_settings.threads)
        files, missing, out_dir = setup_inputs(inputs, out, prompt, fast, sampling, tiles, loop)
        restorer = build_restorer(weights, dev, prompt, fast, sampling, tiles, loop)
        make_out_dir(out_dir)
    except (MissingWeightsError, ValueError) as e:
        _error(str(e))
        return 2
    failed, untried = restore_files(restorer, files, out_dir, run_settings.seed, dev)
    note = ""
    if failed:
        try:
            write_bytes_atomic(out_dir / "failed.txt", "".join(one_line(f) + "\n" for f in failed).encode("utf-8"))
            note = f"; {len(failed)} failed (see {out_dir / 'failed.txt'})"
        except OSError as e:
            note = f"; {len(failed)} failed (failed.txt not written either: {e.strerror or e})"
    if untried:
        note += f"; stopped: no space left on {out_dir}, {untried} image(s) not tried"
    print(f"restored {len(files) - len(failed) - untried} of {len(files)} image(s) into {out_dir}{note}")
    return 1 if failed or missing or untried else 0


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
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    return files, missing, out_dir


def restore_files(restorer: Restorer, files: Sequence[Path], out_dir: Path, seed: int, device: torch.device
                  ) -> tuple[list[str], int]:
    """Restore each file into `out_dir`; returns one line per file that failed (unreadable, out of
    memory, not writable), the others are written, and how many were not tried because the disk
    filled up (the loop stops there: every further image would fail the same way)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    failed: list[str] = []
    # Progress and skip notes on stderr: stdout keeps the one summary line.
    with progress_bar("restore") as bar:
        job = bar.add_task("", total=len(files))
        for i, path in enumerate(files):
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
            except OSError as e:  # writing the result
                reason = f"{path}: not written ({e.strerror or e})"
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    failed.append(reason)
                    bar.console.print(f"[red]stopped[/red] {reason}: no space left on {out_dir}")
                    return failed, len(files) - i - 1
            if reason is not None:
                failed.append(reason)
                bar.console.print(f"[red]skipped[/red] {one_line(reason)}")
            bar.advance(job)
    return failed, 0
