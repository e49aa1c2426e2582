"""The evaluation report: metrics.json, report.md, report.html and the images they show.

`write_report(out_dir, result)` writes
- `metrics.json`: every number of `EvalResult` (non-finite floats as null);
- `plots/psnr_lines.png`: per-task PSNR (and input PSNR) against the acceptance/excellence lines;
- `plots/confusion.png`: the BIQA confusion matrix, when BIQA was evaluated;
- `grids/<task>.png`: before / after / ground-truth rows per task, at most SHEET_MAX_SIDE px
  (large images are centre-cropped at 1:1);
- `report.md` (images linked by relative path) and `report.html` (images embedded up to
  HTML_EMBED_BYTES, so the one file opens anywhere; the rest linked).
Both documents are rendered from one list of blocks, so they always hold the same content.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lit_restore.data.images import encode_png, write_bytes_atomic
from lit_restore.lines import LineStats, Lines
from lit_restore.names import safe_name
from lit_restore.protocols import CONVENTION, BenchmarkTable

# --------------------------------------------------------------------------------------
# What the report holds
# --------------------------------------------------------------------------------------


@dataclass
class Conventions:
    """How the numbers were computed; written at the top of the report."""

    crop_border: int = 4
    y_channel: bool = False
    lpips: str = "LPIPS AlexNet v0.1"  # or why it was not computed

    def text(self) -> str:
        space = ("the BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B (MATLAB rgb2ycbcr, [16, 235])"
                 if self.y_channel else "RGB, all three channels")
        return (
            f"PSNR and SSIM are computed on {space}, on the 0–255 scale of 8-bit images (outputs are "
            f"rounded to 8 bits first), after removing {self.crop_border} pixel(s) from every border. "
            "PSNR uses peak 255 in float64. SSIM uses an 11×11 Gaussian window (σ = 1.5), valid filtering, "
            "K1 = 0.01, K2 = 0.03, L = 255, averaged over pixels and channels (MATLAB ssim / BasicSR "
            f"calculate_ssim / scikit-image structural_similarity). LPIPS: {self.lpips}; lower is better. "
            "Values are means over the images of a task."
        )


@dataclass
class TaskResult:
    """Mean metrics of one task."""

    task: str
    n_images: int
    psnr: float
    ssim: float
    input_psnr: float  # the degraded input against GT: the no-op baseline
    input_ssim: float
    lpips: Optional[float] = None
    kind: str = "synthetic"  # "synthetic" (GIR suite) or "real" (paired shards)
    types: list[str] = field(default_factory=list)
    level: str = "id"  # "id" (inside the training ranges) or "ood" (harder; real sets count as ood)
    compare_psnr: Optional[float] = None  # a second method on the same images (evaluate --compare-fast)

    @property
    def gain(self) -> float:
        """PSNR gain over the degraded input (dB): negative means the output is worse than its input."""
        return self.psnr - self.input_psnr


@dataclass
class BIQAResult:
    """BIQA classification over the evaluated images."""

    classes: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def per_class_accuracy(self) -> list[Optional[float]]:
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.confusion)]

    def accuracy(self) -> Optional[float]:
        total = sum(map(sum, self.confusion))
        return sum(self.confusion[i][i] for i in range(len(self.classes))) / total if total else None


@dataclass
class EvalResult:
    """Everything `evaluate` measured; `write_report` turns it into files."""

    weights: str
    method: str  # e.g. "automatic loop (BIQA → LDM → SCM), 20 steps" or "feed-forward restorer"
    conventions: Conventions
    tasks: list[TaskResult]
    lines: Lines = field(default_factory=dict)
    line_stats: dict[str, LineStats] = field(default_factory=dict)  # "psnr"/"ssim" → stats
    biqa: Optional[BIQAResult] = None
    grids: dict[str, Tensor] = field(default_factory=dict)  # task → contact sheet (3, H, W) in [0, 1]
    compare_method: str = ""  # what TaskResult.compare_psnr measured, e.g. "--fast restorer"
    benchmark: Optional[BenchmarkTable] = None  # evaluate --benchmark: the protocol's table


SHEET_MIN_SIDE = 192  # contact-sheet cells are enlarged (nearest) to at least this, so pixels can be judged
SHEET_MAX_SIDE = 1600  # a sheet's longest side: it opens in any viewer and its 16 px labels stay legible
SHEET_FONT = 16


def contact_sheet(columns: list[str], rows: list[list[tuple[Tensor, str]]], min_side: int = SHEET_MIN_SIDE,
                  max_side: int = SHEET_MAX_SIDE) -> Tensor:
    """A labelled contact sheet: a header of column names, then a row per image of (image, caption)
    cells, each (1|3, H, W) float in [0, 1] or uint8, with its caption (e.g. its PSNR) underneath.

    What is shown is the pixels that were scored: small images are enlarged by an integer factor
    (nearest-neighbour); images too large for a cell of a sheet at most `max_side` on its long
    side are centre-cropped at 1:1, and the sheet's top line says so."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=SHEET_FONT)
    cells = [[(_sheet_pixels(x), caption) for x, caption in row] for row in rows]
    full_h = max(rgb.shape[0] for row in cells for rgb, _ in row)
    full_w = max(rgb.shape[1] for row in cells for rgb, _ in row)
    line, pad = SHEET_FONT + 8, 4
    top = line  # the column names
    budget_w = (max_side - pad) // len(columns) - pad
    budget_h = (max_side - 2 * line - pad) // len(rows) - line - pad  # room for a crop note
    cropped = full_w > budget_w or full_h > budget_h
    if cropped:
        top += line
    h, w = min(full_h, budget_h), min(full_w, budget_w)
    factor = max(1, min(-(-min_side // max(h, w)), budget_w // w, budget_h // h))
    h, w = h * factor, w * factor
    canvas = Image.new("RGB", (len(columns) * (w + pad) + pad, top + len(rows) * (h + line + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if cropped:
        draw.text((pad + 2, 2), f"centre crops at 1:1 of images up to {full_w}x{full_h}", fill="black", font=font)
    for c, name in enumerate(columns):
        draw.text((pad + c * (w + pad) + 2, top - line + 2), name, fill="black", font=font)
    for r, row in enumerate(cells):
        y0 = top + r * (h + line + pad) + pad
        for c, (rgb, caption) in enumerate(row):
            ch, cw = min(rgb.shape[0], h // factor), min(rgb.shape[1], w // factor)
            y, x = (rgb.shape[0] - ch) // 2, (rgb.shape[1] - cw) // 2
            tile = Image.fromarray(np.ascontiguousarray(rgb[y:y + ch, x:x + cw]))
            x0 = pad + c * (w + pad)
            canvas.paste(tile.resize((cw * factor, ch * factor), Image.Resampling.NEAREST), (x0, y0))
            draw.text((x0 + 2, y0 + h + 2), caption, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def _sheet_pixels(image: Tensor) -> np.ndarray:
    """(H, W, 3) uint8 of a (1|3, H, W) or (1, 1|3, H, W) image, float in [0, 1] or uint8."""
    image = (image[0] if image.dim() == 4 else image).cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().byte()
    return image.expand(3, -1, -1).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------
# Blocks rendered to Markdown and HTML
# --------------------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    caption: str
    path: str  # relative to the report folder


Block = Union[Heading, Paragraph, Table, Figure]


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Paragraph):
            out.append(f"{b.text}\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.headers)) + " |")
            out.append("|" + "---|" * len(b.headers))
            out.extend("| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows)
            out.append("")
        else:
            out.append(f"![{b.caption}]({b.path})\n")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
    "figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}"
)


HTML_EMBED_BYTES = 8 << 20  # images embedded in report.html at most; later ones are linked beside it


def render_html(blocks: list[Block], root: Path, title: str, embed_bytes: int = HTML_EMBED_BYTES) -> str:
    """One HTML file: images embedded as base64 PNG data URIs while they fit `embed_bytes`
    (a file that mails and opens anywhere), the rest linked to their files in the report folder."""
    e = html.escape
    embedded = 0
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            raw = (root / b.path).read_bytes()
            if embedded + len(raw) <= embed_bytes:
                embedded += len(raw)
                src, note = "data:image/png;base64," + base64.b64encode(raw).decode("ascii"), ""
            else:
                src, note = b.path, f" (file {b.path} beside this report)"
            out.append(f"<figure><img alt='{e(b.caption)}' data-src='{e(b.path)}' src='{e(src)}'>"
                       f"<figcaption>{e(b.caption + note)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _save_figure(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def plot_psnr_lines(tasks: list[TaskResult], lines: Lines, path: Path) -> None:
    """Per-task PSNR of the model and of the input, with the acceptance/excellence lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.task for t in tasks]
    x = np.arange(len(tasks))
    finite = [v for t in tasks for v in (t.psnr, t.input_psnr) if math.isfinite(v)] or [0.0]
    low, high = max(0.0, min(finite) - 3), max(finite) + 3
    # An exact reconstruction has infinite PSNR: drawn up to the top of the axis.
    model = np.clip([t.psnr for t in tasks], None, high)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(tasks) + 2), 4.0))
    ax.bar(x, model, color="#4c72b0", label="model")
    ax.scatter(x, np.clip([t.input_psnr for t in tasks], None, high), marker="x", color="#555", zorder=3, label="input")
    for col, color, label in (("acceptance_psnr", "#dd8452", "acceptance line"), ("excellence_psnr", "#55a868", "excellence line")):
        ys = [lines.get(n, {}).get(col, np.nan) for n in names]
        if not all(np.isnan(ys)):
            ax.scatter(x, ys, marker="_", s=400, linewidths=2.5, color=color, zorder=4, label=label)
    ax.set_ylim(low, high)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)


def plot_confusion(biqa: BIQAResult, path: Path) -> None:
    """Row-normalised confusion matrix with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(biqa.confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(biqa.classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), biqa.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), biqa.classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _fmt(v: Optional[float], digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def _yes_no(v: Optional[bool]) -> str:
    return "–" if v is None else ("yes" if v else "no")


def _jsonable(obj: Any) -> Any:
    """dataclasses → dicts, non-finite floats → None (JSON has no inf/nan), tensors dropped."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "grids"}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _verdicts(result: EvalResult, task: str) -> tuple[str, str]:
    """(accepted, excellent) cells: yes/no where the task's PSNR lines are meaningful, "lines
    inverted" where the excellence line lies below the acceptance line (left out of AR/ER)."""
    line = result.lines.get(task, {})
    a, e = line.get("acceptance_psnr"), line.get("excellence_psnr")
    if a is not None and e is not None and e < a:
        return "lines inverted", "lines inverted"
    stats = result.line_stats.get("psnr")
    judged = stats.per_task.get(task) if stats else None
    return _yes_no(judged["accepted"] if judged else None), _yes_no(judged["excellent"] if judged else None)


def _task_table(result: EvalResult) -> Table:
    compare = [f"{result.compare_method} PSNR"] if result.compare_method else []
    headers = ["task", "kind", "level", "images", "input PSNR", "PSNR", "gain (dB)", *compare, "SSIM", "input SSIM",
               "LPIPS", "acceptance", "excellence", "accepted", "excellent"]
    rows = []
    for t in result.tasks:
        line = result.lines.get(t.task, {})
        rows.append([
            t.task, t.kind, t.level, str(t.n_images), _fmt(t.input_psnr, 2), _fmt(t.psnr, 2), _signed(t.gain),
            *([_fmt(t.compare_psnr, 2)] if compare else []), _fmt(t.ssim, 4), _fmt(t.input_ssim, 4),
            _fmt(t.lpips, 4), _fmt(line.get("acceptance_psnr"), 2), _fmt(line.get("excellence_psnr"), 2),
            *_verdicts(result, t.task),
        ])
    ts = result.tasks
    rows.append(["mean", "", "", str(sum(t.n_images for t in ts)), _fmt(_mean([t.input_psnr for t in ts]), 2),
                 _fmt(_mean([t.psnr for t in ts]), 2), _signed(_mean([t.gain for t in ts])),
                 *([_fmt(_mean([t.compare_psnr for t in ts]), 2)] if compare else []),
                 _fmt(_mean([t.ssim for t in ts]), 4), _fmt(_mean([t.input_ssim for t in ts]), 4),
                 _fmt(_mean([t.lpips for t in ts]), 4), "", "", "", ""])
    return Table(headers, rows)


def _signed(v: Optional[float]) -> str:
    if v is None or not math.isfinite(v):
        return _fmt(v, 2)
    return f"{v:+.2f}"


def summary_rows(tasks: list[TaskResult]) -> list[tuple[str, list[TaskResult]]]:
    """Groups for the summary table: each degradation type's single-type tasks, then the
    in-distribution, out-of-distribution and combination tasks, then all."""
    groups: list[tuple[str, list[TaskResult]]] = []
    singles = [t for t in tasks if len(t.types) == 1 and t.kind != "real"]
    for name in dict.fromkeys(t.types[0] for t in singles):
        groups.append((f"type {name}", [t for t in singles if t.types[0] == name]))
    for label, level in (("in-distribution", "id"), ("out-of-distribution", "ood")):
        groups.append((label, [t for t in tasks if t.level == level]))
    groups.append(("combinations", [t for t in tasks if len(t.types) > 1]))
    groups.append(("real pairs", [t for t in tasks if t.kind == "real"]))
    groups.append(("all", list(tasks)))
    return [(label, ts) for label, ts in groups if ts]


def _summary_table(result: EvalResult) -> Table:
    rows = []
    for label, ts in summary_rows(result.tasks):
        gains = [t.gain for t in ts if math.isfinite(t.gain)]
        worse = sum(g < 0 for g in gains)
        rows.append([label, str(len(ts)), _fmt(_mean([t.input_psnr for t in ts]), 2), _fmt(_mean([t.psnr for t in ts]), 2),
                     _signed(_mean(gains)), _signed(min(gains) if gains else None), f"{worse} of {len(gains)}"])
    return Table(["tasks", "count", "input PSNR", "PSNR", "mean gain (dB)", "worst gain (dB)", "worse than input"], rows)


def _lines_table(stats: dict[str, LineStats]) -> Table:
    rows = [[s.metric.upper(), str(s.n_cases), str(s.n_dropped), _fmt(s.ar, 3), _fmt(s.er, 3),
             _fmt(s.rpr_mean, 3), _fmt(s.rpr_iqr, 3), _fmt(s.rpr_accepted, 3), _fmt(s.rpr_rejected, 3)]
            for s in stats.values()]
    return Table(["metric", "tasks", "dropped", "AR", "ER", "mean RPR", "IQR RPR", "RPR_A", "RPR_U"], rows)


def _biqa_table(biqa: BIQAResult) -> Table:
    acc = biqa.per_class_accuracy()
    rows = [[c, str(sum(biqa.confusion[i])), _fmt(acc[i], 3)] for i, c in enumerate(biqa.classes)]
    rows.append(["all", str(sum(map(sum, biqa.confusion))), _fmt(biqa.accuracy(), 3)])
    return Table(["class", "images", "accuracy"], rows)


def _benchmark_blocks(result: EvalResult) -> list[Block]:
    """The protocol's table, this model's row above the published ones (PSNR / SSIM)."""
    if result.benchmark is None:
        return []
    headers, rows = result.benchmark.table()
    n = {s: c[2] for s, c in result.benchmark.scores.items()}
    return [Heading(f"{result.benchmark.protocol} benchmark"),
            Paragraph(f"{CONVENTION}. Images per set: " + ", ".join(f"{s} {k}" for s, k in n.items())
                      + ". Published rows as their sources give them (PSNR / SSIM; — where a source gives no SSIM)."),
            Table(headers, rows)]


def write_report(out_dir: Union[str, Path], result: EvalResult) -> dict[str, Path]:
    """Write metrics.json, plots, grids, report.md and report.html into `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    blocks: list[Block] = [
        Heading("Evaluation report", 1),
        Paragraph(f"Weights: {result.weights}. Method: {result.method}."),
        Heading("Conventions"),
        Paragraph(result.conventions.text()),
        *_benchmark_blocks(result),
        Heading("Summary"),
        Paragraph("Gain = output PSNR − input PSNR: what the restoration adds to the degraded image it was "
                  "given. A negative gain means the output is worse than its input."),
        _summary_table(result),
        Heading("Per-task results"),
        _task_table(result),
    ]
    if result.tasks:
        paths["psnr_plot"] = out / "plots" / "psnr_lines.png"
        plot_psnr_lines(result.tasks, result.lines, paths["psnr_plot"])
        blocks.append(Figure("Per-task PSNR against the acceptance and excellence lines", "plots/psnr_lines.png"))
    blocks.append(Heading("Acceptance and excellence lines"))
    inverted = [t for t, v in result.lines.items() if v.get("excellence_psnr", math.inf) < v.get("acceptance_psnr", -math.inf)]
    if result.line_stats:
        blocks += [
            Paragraph("AR = share of tasks at or above the acceptance line, ER = share at or above the "
                      "excellence line, RPR = sigmoid((m − A) / (E − A)); tasks whose lines are closer than "
                      "0.1 dB (PSNR) or 0.01 (SSIM), or inverted (excellence below acceptance), are dropped. "
                      "RPR_A / RPR_U: mean RPR of accepted / rejected tasks."),
            _lines_table(result.line_stats),
        ]
    if inverted:
        blocks.append(Paragraph(f"Lines inverted (the excellence line lies below the acceptance line, so they say "
                                f"nothing about this model) on {len(inverted)} task(s), left out of AR/ER: "
                                f"{', '.join(inverted)}."))
    if not result.lines:
        blocks.append(Paragraph("No lines given (evaluate --lines CSV); AR/ER/RPR not computed."))
    elif not result.line_stats:
        blocks.append(Paragraph("On every task the lines are closer than 0.1 dB (PSNR) or 0.01 (SSIM), or "
                                "inverted; AR/ER/RPR not computed."))
    if result.biqa is not None:
        paths["confusion_plot"] = out / "plots" / "confusion.png"
        plot_confusion(result.biqa, paths["confusion_plot"])
        blocks += [Heading("BIQA"), _biqa_table(result.biqa),
                   Figure("BIQA confusion matrix (rows: true, columns: predicted)", "plots/confusion.png")]
    if result.grids:
        blocks.append(Heading("Contact sheets"))
        blocks.append(Paragraph("Per task: the degraded input, the restored output(s) and the ground truth, each "
                                "with its PSNR against the ground truth; small images are enlarged by whole pixels."))
        for task, grid in result.grids.items():
            rel = f"grids/{safe_name(task)}.png"
            rgb = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            write_bytes_atomic(out / rel, encode_png(rgb))
            paths[f"grid:{task}"] = out / rel
            blocks.append(Figure(task, rel))
    paths["metrics"] = out / "metrics.json"
    write_bytes_atomic(paths["metrics"], json.dumps(_jsonable(result), indent=2, allow_nan=False).encode("utf-8"))
    paths["markdown"] = out / "report.md"
    write_bytes_atomic(paths["markdown"], render_markdown(blocks).encode("utf-8"))
    paths["html"] = out / "report.html"
    write_bytes_atomic(paths["html"], render_html(blocks, out, "lit-restore evaluation").encode("utf-8"))
    return paths

