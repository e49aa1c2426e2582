"""GIR acceptance / excellence lines: the lines CSV and the AR, ER and RPR statistics.

A lines CSV has one row per task and the columns `task, acceptance_psnr, excellence_psnr`,
optionally `acceptance_ssim, excellence_ssim`; an empty cell means "no line for this task".
The acceptance line A_i is a weaker reference model's score on task i, the excellence line E_i a
stronger one's. `evaluate --save-lines lines.csv --line-role acceptance` writes (or updates, in
an existing file) the acceptance columns with the evaluated weights' per-task scores; a second
run with `--line-role excellence` on the stronger weights fills the other columns.

Statistics over the tasks i with a model score m_i and both lines (SEAL, ICLR'24, whose lines
GIR borrows; ER is the analogue for the excellence line):
  AR = mean 1[m_i ≥ A_i],  ER = mean 1[m_i ≥ E_i],  RPR_i = sigmoid((m_i − A_i) / (E_i − A_i)).
Tasks whose lines are closer than 0.1 dB (PSNR) or 0.01 (SSIM) are dropped first, as in SEAL
(here with a mask; SEAL's own script pops while iterating and skips neighbours). Reported: AR,
ER, mean RPR, the IQR of RPR (linear-interpolated quartiles), mean RPR over accepted tasks
(RPR_A) and over rejected ones (RPR_U; None when that set is empty).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from lit_restore.data.images import write_bytes_atomic

METRICS = ("psnr", "ssim")
ROLES = ("acceptance", "excellence")
COLUMNS = tuple(f"{role}_{metric}" for metric in METRICS for role in ROLES)
# Lines closer than this carry no usable scale for RPR (SEAL's thresholds).
MIN_GAP = {"psnr": 0.1, "ssim": 0.01}

Lines = dict[str, dict[str, float]]  # task → {column: value}


class LinesError(ValueError):
    """A malformed lines CSV; the message is one line naming the file and the problem."""


def read_lines(path: Union[str, Path]) -> Lines:
    """Read a lines CSV. Unknown columns, duplicate tasks and non-numbers are errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LinesError(f"{path}: cannot read lines CSV ({e.strerror or e})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "task" not in header:
        raise LinesError(f"{path}: no 'task' column; expected task,{','.join(COLUMNS)}")
    unknown = [c for c in header if c != "task" and c not in COLUMNS]
    if unknown:
        raise LinesError(f"{path}: unknown column(s) {', '.join(unknown)}; allowed: {', '.join(COLUMNS)}")
    lines: Lines = {}
    for row_no, row in enumerate(reader, start=2):
        task = (row.get("task") or "").strip()
        if not task:
            raise LinesError(f"{path}:{row_no}: empty task name")
        if task in lines:
            raise LinesError(f"{path}:{row_no}: task {task!r} listed twice")
        values: dict[str, float] = {}
        for col in header:
            cell = (row.get(col) or "").strip()
            if col == "task" or not cell:
                continue
            try:
                values[col] = float(cell)
            except ValueError:
                raise LinesError(f"{path}:{row_no}: {col} = {cell!r} is not a number") from None
            if not math.isfinite(values[col]):
                raise LinesError(f"{path}:{row_no}: {col} = {cell!r} is not a finite number")
        lines[task] = values
    return lines


def write_lines(path: Union[str, Path], lines: Lines) -> None:
    """Write a lines CSV atomically; columns in a fixed order, only those used by some task."""
    used = [c for c in COLUMNS if any(c in v for v in lines.values())]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["task", *used])
    for task, values in lines.items():
        writer.writerow([task, *(repr(values[c]) if c in values else "" for c in used)])
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def save_lines(path: Union[str, Path], role: str, scores: dict[str, dict[str, float]]) -> Lines:
    """Put per-task `scores` ({task: {"psnr": .., "ssim": ..}}) into the `role` columns of the
    lines CSV at `path`, keeping whatever else an existing file holds. Returns the merged lines."""
    if role not in ROLES:
        raise ValueError(f"line role {role!r} is not allowed; choose one of {', '.join(ROLES)}")
    path = Path(path)
    lines = read_lines(path) if path.exists() else {}
    for task, metrics in scores.items():
        row = lines.setdefault(task, {})
        for metric, value in metrics.items():
            if metric in METRICS and value is not None and math.isfinite(value):
                row[f"{role}_{metric}"] = float(value)
    write_lines(path, lines)
    return lines


@dataclass
class LineStats:
    """AR/ER/RPR of one metric over the tasks that have both lines."""

    metric: str
    n_cases: int  # tasks counted
    n_dropped: int  # tasks whose lines are closer than MIN_GAP or inverted (excellence below acceptance)
    n_without_lines: int  # scored tasks missing a line
    ar: float
    er: float
    rpr_mean: float
    rpr_iqr: float
    rpr_accepted: Optional[float]  # RPR_A
    rpr_rejected: Optional[float]  # RPR_U
    per_task: dict[str, dict[str, float | bool]] = field(default_factory=dict)  # task → rpr, accepted, excellent


def line_stats(scores: dict[str, float], lines: Lines, metric: str = "psnr") -> Optional[LineStats]:
    """AR, ER and RPR of per-task `scores` against `lines`; None when no task can be counted."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not allowed; choose one of {', '.join(METRICS)}")
    a_col, e_col = f"acceptance_{metric}", f"excellence_{metric}"
    tasks = [t for t in scores if a_col in lines.get(t, {}) and e_col in lines.get(t, {})]
    n_without = len(scores) - len(tasks)
    m = np.array([scores[t] for t in tasks], dtype=np.float64)
    a = np.array([lines[t][a_col] for t in tasks], dtype=np.float64)
    e = np.array([lines[t][e_col] for t in tasks], dtype=np.float64)
    keep = (e - a) >= MIN_GAP[metric]
    if not keep.any():
        return None
    kept = [t for t, k in zip(tasks, keep) if k]
    m, a, e = m[keep], a[keep], e[keep]
    rpr = 1.0 / (1.0 + np.exp(-(m - a) / (e - a)))
    accepted, excellent = m >= a, m >= e
    q1, q3 = np.percentile(rpr, [25, 75])
    return LineStats(
        metric=metric,
        n_cases=int(keep.sum()),
        n_dropped=int((~keep).sum()),
        n_without_lines=n_without,
        ar=float(accepted.mean()),
        er=float(excellent.mean()),
        rpr_mean=float(rpr.mean()),
        rpr_iqr=float(q3 - q1),
        rpr_accepted=float(rpr[accepted].mean()) if accepted.any() else None,
        rpr_rejected=float(rpr[~accepted].mean()) if (~accepted).any() else None,
        per_task={t: {"rpr": float(r), "accepted": bool(ac), "excellent": bool(ex)}
                  for t, r, ac, ex in zip(kept, rpr, accepted, excellent)},
    )
