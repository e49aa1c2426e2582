"""Pictures of the degradations for people: one degraded image, a labelled grid, the task list."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from lit_restore.data import images
from lit_restore.data.degrade.ops import CHAIN_ORDER, OPS
from lit_restore.data.degrade.suite import degrade_for_task, load_suite, task_from_ops

THUMB = 256  # longest side of each grid tile
LABEL_H = 14


def parse_ops(spec: str) -> dict[str, dict[str, Any]]:
    """"noise:sigma=25,gray_prob=1,blur:sigma=2" → {"noise": {...}, "blur": {...}}: a token with
    a colon starts an op, the tokens after it are its parameters."""
    ops: dict[str, dict[str, Any]] = {}
    current: Optional[str] = None
    for token in [t.strip() for t in spec.split(",") if t.strip()]:
        if ":" in token:
            current, _, token = token.partition(":")
            current = current.strip()
            if current in ops:
                raise ValueError(f"--ops: {current!r} given twice")
            ops[current] = {}
            if not token.strip():
                continue
        if current is None or "=" not in token:
            raise ValueError(f"--ops: expected op:name=value[,name=value...], got {token!r}")
        key, _, value = token.partition("=")
        ops[current][key.strip()] = _number(value.strip())
    if not ops:
        raise ValueError('--ops: empty; e.g. --ops "noise:sigma=25,blur:sigma=2"')
    return ops


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_image(path: str | Path) -> Tensor:
    """(1, 3, H, W) float in [0, 1] from any image `lit_restore.data.images` reads (ImageReadError,
    a ValueError, for anything else: a decompression bomb too)."""
    rgb, _ = images.read_image(path)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255


def to_pil(x: Tensor) -> Image.Image:
    return Image.fromarray(x.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def save_atomic(image: Image.Image, out: str | Path) -> None:
    """Write `image` to `out` (format from its suffix, PNG otherwise) through a temporary beside
    it; ValueError, one line, for an `out` that is a folder or cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file, e.g. {out / 'degraded.png'}")
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"))
    try:
        images.write_bytes_atomic(out, buf.getvalue())
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write ({e.strerror or e})") from None


def labelled_grid(rows: list[list[tuple[str, Tensor]]]) -> Image.Image:
    """One picture of (label, (3, H, W) image) tiles, a row per list, each tile captioned."""
    h = max(t.shape[-2] for row in rows for _, t in row)
    w = max(t.shape[-1] for row in rows for _, t in row)
    ncols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (ncols * (w + 2), len(rows) * (h + LABEL_H + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (label, tile) in enumerate(row):
            x0, y0 = c * (w + 2), r * (h + LABEL_H + 2)
            draw.text((x0 + 2, y0 + 1), label, fill="black")
            canvas.paste(to_pil(tile), (x0, y0 + LABEL_H))
    return canvas


def _thumbnail(x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    scale = THUMB / max(h, w)
    if scale >= 1:
        return x
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(x, size=size, mode="area")


def grid_of_ops(x: Tensor, seed: int = 0, suite: Optional[str] = None) -> Image.Image:
    """Every op at its preview strengths (`Op.grid`) on image `x` (1, 3, H, W), labelled."""
    x = _thumbnail(x)
    rows = []
    for op in CHAIN_ORDER:
        row = [("clean", x[0])]
        for params in OPS[op].grid:
            task = task_from_ops({op: params}, name=op, seed=seed, path=suite, ops_key=f"{op} (grid)")
            label = f"{op} " + " ".join(f"{k}={v}" for k, v in params.items())
            row.append((label, degrade_for_task(x, task, ["preview"])[0]))
        rows.append(row)
    return labelled_grid(rows)


def pair_grid(lq: Tensor, gt: Tensor, max_images: int = 8) -> Tensor:
    """(3, H', W') picture of degraded/clean pairs side by side, a pair per row, for loggers."""
    n = min(max_images, lq.shape[0])
    pairs = torch.stack([lq[:n].float(), gt[:n].float()], dim=1).clamp(0, 1)  # (n, 2, 3, H, W)
    pairs = torch.nn.functional.pad(pairs, (1, 1, 1, 1), value=1.0)
    n, _, c, h, w = pairs.shape
    return pairs.permute(2, 0, 3, 1, 4).reshape(c, n * h, 2 * w)


def describe_ops() -> list[str]:
    """One line per op, in chain order: its parameters with their allowed ranges and the
    training defaults (`degrade.<op>`), and its prompt word."""
    lines = []
    for name in CHAIN_ORDER:
        op, default = OPS[name], OPS[name].config()
        params = []
        for field in dataclasses.fields(default):
            value = getattr(default, field.name)
            bounds = op.bounds.get(field.name)
            allowed = f" in [{bounds[0]:g}, {bounds[1]:g}]" if bounds else ""
            params.append(f"{field.name}={_show(value)}{allowed}")
        lines.append(f"{name}\t{', '.join(params)}\t(prompt: {op.prompt_word})")
    return lines


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def degrade_command(image: Optional[str], out: Optional[str], ops: str, grid: bool, list_tasks: bool,
                    suite: Optional[str], seed: int, list_ops: bool = False) -> int:
    """`lit-restore degrade`: list the ops or the suite, or write one degraded image or the grid."""
    try:
        if list_ops:
            print("op\tparameters (training defaults, allowed values)\tprompt")
            for line in describe_ops():
                print(line)
            print("Give a task's values with --ops op:name=value (ranges become one value), e.g. --ops noise:sigma=25")
            return 0
        if list_tasks:
            for task in load_suite(suite):
                print(task.describe())
            return 0
        if not image or not out:
            raise ValueError("give IMAGE and --out (with --ops or --grid), or --list-tasks")
        if grid == bool(ops):
            raise ValueError("give exactly one of --ops and --grid")
        x = read_image(image)
        if grid:
            picture = grid_of_ops(x, seed=seed, suite=suite)
        else:
            unknown = [op for op in parse_ops(ops) if op not in CHAIN_ORDER]
            if unknown:
                raise ValueError(f"--ops: unknown op {unknown[0]!r}; choose from {', '.join(CHAIN_ORDER)}")
            task = task_from_ops(parse_ops(ops), name="preview", seed=seed, path=suite, ops_key="--ops")
            picture = to_pil(degrade_for_task(x, task, [Path(image).name])[0])
        save_atomic(picture, out)
        print(f"wrote {out}")
        return 0
    except ValueError as e:  # ConfigError included
        print(f"lit-restore degrade: {e}", file=sys.stderr)
        return 2
