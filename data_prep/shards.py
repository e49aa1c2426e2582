"""`lit-restore prep-shards`: image folders → WebDataset tar shards.

Each sample holds `gt.png` (lossless 8-bit RGB), `lq.png` for paired data, and a `json` record
(docs/architecture.md, "Shard sample"); `size` is the (H, W) of the stored `gt.png` and `crop` its
top-left corner in the source image (null when the sample is the whole image).

Work items (one per source image or lq/gt pair) are shuffled with `--seed`, decoded and encoded
in worker processes, and pass through a bounded shuffle buffer so the sub-images of one
pre-cropped photo do not sit next to each other in one shard. The same inputs and seed give
byte-identical shards.

Exit codes: 0 everything written; 1 written, but some inputs were skipped (unreadable, size
mismatch, no partner; listed in `skipped.txt`); 2 usage error, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.data.images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    encode_png,
    is_image_file,
    read_image,
    write_bytes_atomic,
)
from lit_restore.names import one_line

# Paired-data task names as datasets spell them → DEGRADATION_TYPES.
TASK_ALIASES: dict[str, str] = {
    **{t: t for t in DEGRADATION_TYPES if t != "no"},
    "sr": "lowres", "superres": "lowres",
    "dark": "lowlight", "low-light": "lowlight", "underexposure": "lowlight",
    "derain": "rain",
    "dehaze": "haze",
    "denoise": "noise",
    "deblur": "blur", "motionblur": "blur",
    "dejpeg": "jpeg",
    "desnow": "snow",
}

MANIFEST = "manifest.json"
SKIPPED = "skipped.txt"
# Encoded samples held for the write-time shuffle; bounded in bytes because one sample may be a
# whole uncropped 50-megapixel PNG.
SHUFFLE_BUFFER_BYTES = 256 * 2**20
# zlib level for the stored PNGs: on photos, level 3 encodes ~3x faster than the default 6 for
# ~14% more bytes; decoding speed is the same.
PNG_LEVEL = 3
# Fixed tar member mtime so reruns give byte-identical shards (and sha256 sums).
TAR_MTIME = 0.0
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile's stream record size
_SUFFIXES = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)


class UsageError(ValueError):
    """Bad arguments or inputs; reported as one line with exit code 2."""


def task_type(name: str) -> str:
    """Map a paired-data task name (`sr`, `derain`, `low-light`, ...) onto DEGRADATION_TYPES."""
    key = name.strip().lower()
    if key not in TASK_ALIASES:
        raise UsageError(f"unknown --task {name!r}; accepted: {', '.join(sorted(TASK_ALIASES))}")
    return TASK_ALIASES[key]


# --------------------------------------------------------------------------------------
# Planning: which files become which samples
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One source image (or lq/gt pair) and how to cut it into samples."""

    index: int  # position in the sorted listing; keeps sample keys unique
    gt: str  # path of the clean image
    source: str  # gt path relative to its input folder (posix)
    dataset: str
    lq: Optional[str] = None  # paired mode: path of the degraded image
    task: Optional[str] = None  # paired mode: DEGRADATION_TYPES name
    crop: int = 0  # pre-crop tile size (0: whole image)
    stride: int = 0
    # A test set's noisy twin made here instead of read (prep-benchmark): lq = gt + σ·N(0, 1) from
    # numpy's default_rng(noise_seed), cut to uint8 as PromptIR's test code does (truncation).
    noise_sigma: float = 0.0
    noise_seed: tuple[int, ...] = ()


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.is_file() and is_image_file(p)),
                  key=lambda p: p.relative_to(folder).as_posix())


def match_pairs(lq_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pair files by relative path without suffix (`a/001.jpg` ↔ `a/001.png`).

    Returns `(stem, lq, gt)` pairs and one `path: reason` line per file that has no partner.
    """
    def by_stem(folder: Path) -> dict[str, list[Path]]:
        index: dict[str, list[Path]] = {}
        for p in list_images(folder):
            index.setdefault(p.relative_to(folder).with_suffix("").as_posix(), []).append(p)
        return index

    lqs, gts = by_stem(lq_dir), by_stem(gt_dir)
    pairs, problems = [], []
    for stem in sorted(lqs.keys() | gts.keys()):
        lq, gt = lqs.get(stem, []), gts.get(stem, [])
        if len(lq) > 1 or len(gt) > 1:
            names = ", ".join(str(p) for p in lq + gt)
            problems.append(f"{names}: several files share the name {stem!r}; cannot tell which pair")
        elif not gt:
            problems.append(f"{lq[0]}: no --gt image with the same name")
        elif not lq:
            problems.append(f"{gt[0]}: no --lq image with the same name")
        else:
            pairs.append((stem, lq[0], gt[0]))
    return pairs, problems


def plan(inputs: list[str], lq: Optional[str], gt: Optional[str], task: Optional[str], name: Optional[str],
         crop: int, stride: int) -> tuple[list[WorkItem], list[str], str, Optional[str]]:
    """Check the arguments and list the work: (items, skipped lines, dataset name, task type)."""
    if crop < 0 or stride < 0:
        raise UsageError("--crop and --stride must be >= 0")
    if stride and not crop:
        raise UsageError("--stride needs --crop")
    stride = stride or crop
    paired = lq is not None or gt is not None
    if paired:
        if inputs:
            raise UsageError("give either clean folders or --lq/--gt, not both")
        if lq is None or gt is None or task is None:
            raise UsageError("paired mode needs --lq, --gt and --task")
        task_name = task_type(task)
        lq_dir, gt_dir = Path(lq), Path(gt)
        for flag, d in (("--lq", lq_dir), ("--gt", gt_dir)):
            if not d.is_dir():
                raise UsageError(f"{flag} {d} is not a folder")
        common = Path(os.path.commonpath([lq_dir.resolve(), gt_dir.resolve()])).name
        dataset = name or common or gt_dir.resolve().name
        pairs, skipped = match_pairs(lq_dir, gt_dir)
        items = [WorkItem(i, str(g), g.relative_to(gt_dir).as_posix(), dataset, str(q), task_name, crop, stride)
                 for i, (_, q, g) in enumerate(pairs)]
        if not items and not skipped:
            raise UsageError(f"no images ({_SUFFIXES}) under {lq_dir} and {gt_dir}")
        return items, skipped, dataset, task_name
    if task is not None:
        raise UsageError("--task labels paired data; use it with --lq and --gt")
    if not inputs:
        raise UsageError("give one or more image folders, or --lq/--gt/--task for paired data")
    items: list[WorkItem] = []
    names = []
    for folder in map(Path, inputs):
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder")
        dataset = name or folder.resolve().name
        names.append(dataset)
        for p in list_images(folder):
            items.append(WorkItem(len(items), str(p), p.relative_to(folder).as_posix(), dataset, crop=crop, stride=stride))
    if not items:
        raise UsageError(f"no images ({_SUFFIXES}) under {', '.join(inputs)}")
    return items, [], ",".join(dict.fromkeys(names)), None


# --------------------------------------------------------------------------------------
# Workers: decode, check, cut, encode
# --------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of `tile`-long windows every `stride` along `length`, the last flush with the end.

    Starts are rounded down to multiples of `align` (the SR scale, so lq windows land on whole
    pixels); `length` and `tile` are multiples of `align` whenever it matters.
    """
    if length <= tile:
        return [0]
    starts = {s - s % align for s in range(0, length - tile + 1, stride)}
    starts.add(length - tile)
    return sorted(starts)


def pair_scale(lq_hw: tuple[int, int], gt_hw: tuple[int, int], task: Optional[str]) -> int:
    """1 for same-size pairs, s for `lowres` pairs with gt = s × lq; ValueError otherwise."""
    if lq_hw == gt_hw:
        return 1
    (lh, lw), (gh, gw) = lq_hw, gt_hw
    if task == "lowres" and gh % lh == 0 and gw % lw == 0 and gh // lh == gw // lw > 1:
        return gh // lh
    hint = "" if task == "lowres" else " (only --task sr/lowres pairs may differ, by an integer factor)"
    raise ValueError(f"size mismatch: lq {lh}x{lw}, gt {gh}x{gw}{hint}")


def sample_key(index: int, source: str) -> str:
    """A tar-safe unique key: no dots (webdataset splits the extension at the first one), short
    enough for a plain ustar member name."""
    slug = re.sub(r"[^0-9A-Za-z_-]+", "_", source.rsplit(".", 1)[0])[-48:]
    return f"{index:08d}_{slug}"


def encode_item(item: WorkItem) -> tuple[list[dict[str, Any]], Optional[str]]:
    """Decode one work item into its encoded samples, or return why it was skipped."""
    try:
        gt, info = read_image(item.gt)
        lq, scale = None, 1
        if item.lq is not None:
            lq, _ = read_image(item.lq)
            scale = pair_scale(lq.shape[:2], gt.shape[:2], item.task)
        elif item.noise_sigma > 0:
            noise = np.random.default_rng(list(item.noise_seed)).standard_normal(gt.shape) * item.noise_sigma
            lq = np.clip(gt + noise, 0, 255).astype(np.uint8)
    except ImageReadError as e:
        return [], str(e)
    except ValueError as e:
        return [], f"{item.lq} + {item.gt}: {e}"
    h, w = gt.shape[:2]
    if item.crop and item.crop % scale and item.crop < max(h, w):
        return [], f"{item.lq} + {item.gt}: --crop {item.crop} is not a multiple of the SR scale {scale}"
    key = sample_key(item.index, item.source)
    tile_h, tile_w = (min(item.crop, h), min(item.crop, w)) if item.crop else (h, w)
    samples = []
    for y in tile_starts(h, tile_h, item.stride, scale):
        for x in tile_starts(w, tile_w, item.stride, scale):
            whole = (tile_h, tile_w) == (h, w)
            meta = {
                "source": item.source,
                "size": [tile_h, tile_w],
                "dataset": item.dataset,
                "task": item.task,
                "scale": scale,
                "crop": None if whole else [y, x],
                "bit_depth": info["bit_depth"],
                "mode": info["mode"],
            }
            sample = {
                "__key__": key if whole else f"{key}_y{y}_x{x}",
                "gt.png": encode_png(gt[y : y + tile_h, x : x + tile_w], PNG_LEVEL),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
            if lq is not None:
                ly, lx, lh, lw = y // scale, x // scale, tile_h // scale, tile_w // scale
                sample["lq.png"] = encode_png(lq[ly : ly + lh, lx : lx + lw], PNG_LEVEL)
            samples.append(sample)
    return samples, None


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in the tar: a header block per member plus data padded to blocks."""
    sizes = [len(v) for k, v in sample.items() if not k.startswith("__")]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in sizes)


def _tar_file_size(member_bytes: int) -> int:
    """Size of a finished tar: the members, two zero end blocks, padded to 20-block records."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def shuffle_buffer(samples: Iterable[dict[str, Any]], rng: random.Random,
                   max_bytes: int = SHUFFLE_BUFFER_BYTES) -> Iterator[dict[str, Any]]:
    """Yield samples in a seeded random order, holding at most about `max_bytes` of them."""
    buf: list[dict[str, Any]] = []
    held = 0
    for sample in samples:
        buf.append(sample)
        held += _tar_bytes(sample)
        while held > max_bytes:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out = buf.pop()
            held -= _tar_bytes(out)
            yield out
    rng.shuffle(buf)
    yield from buf


class ShardSink:
    """Writes samples into `{prefix}-NNNNNN.tar`, rolling over at `max_count` samples or before
    the file would pass `max_size` bytes (a single larger sample gets a shard of its own). Each shard is written under a hidden temporary name and renamed when
    complete, so a `*.tar` in the folder is always a finished shard."""

    def __init__(self, out: Path, prefix: str, max_count: int, max_size: int):
        import webdataset as wds

        self._tar_writer = wds.TarWriter
        self.out, self.prefix, self.max_count, self.max_size = out, prefix, max_count, max_size
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._file = None
        self._tmp: Optional[Path] = None
        self._count = 0
        self._bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        size = _tar_bytes(sample)
        if self._writer is not None and (self._count >= self.max_count
                                        or _tar_file_size(self._bytes + size) > self.max_size):
            self.finish_shard()
        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tmp = self.out / f".{name}.tmp"
            self._file = open(self._tmp, "wb")
            self._writer = self._tar_writer(self._file, mtime=TAR_MTIME)
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def finish_shard(self) -> None:
        """Close the open shard (if any); the next `write` starts a new one."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        final = self.out / f"{self.prefix}-{len(self.shards):06d}.tar"
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "count": self._count, "bytes": final.stat().st_size,
                            "sha256": file_sha256(final)})
        self._writer = self._file = self._tmp = None
        self._count = self._bytes = 0

    def abort(self) -> None:
        """Drop the unfinished shard after an error."""
        if self._writer is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = self._file = self._tmp = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def existing_outputs(out: Path, prefixes: Iterable[str]) -> list[Path]:
    """Files a previous run left in `out` that a new run would replace."""
    found = [out / MANIFEST, out / SKIPPED]
    for prefix in prefixes:
        pattern = re.compile(rf"\.?{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
        found += [p for p in out.iterdir() if pattern.match(p.name)] if out.is_dir() else []
    return sorted(p for p in found if p.exists())


def prepare_out(out: Path, prefixes: Iterable[str], overwrite: bool) -> None:
    """Create `out`, or refuse / clear it when it already holds shards."""
    old = existing_outputs(out, prefixes)
    if old and not overwrite:
        if not (out / MANIFEST).exists():  # the manifest is written last
            raise UsageError(f"{out} holds {len(old)} shard file(s) but no {MANIFEST}: an earlier prep-shards stopped "
                             "before it finished; pass --overwrite to write the set again")
        raise UsageError(f"{out} already holds shards or a manifest ({old[0].name}, ...); pass --overwrite to replace them")
    for p in old:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_manifest(out: Path, shards: list[dict[str, Any]], **fields: Any) -> None:
    manifest = {"shards": shards, "total": sum(s["count"] for s in shards), **fields,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_bytes_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def prep_shards(inputs: list[str], out: str, lq: Optional[str], gt: Optional[str], task: Optional[str],
                name: Optional[str], crop: int, stride: int, max_count: int, max_size: float, seed: int,
                workers: int, overwrite: bool, prefix: str) -> int:
    """Write image folders as shards; returns the exit code (0 ok, 1 some skipped, 2 usage error)."""
    out_dir = Path(out)
    try:
        if max_count < 1 or max_size <= 0:
            raise UsageError("--max-count and --max-size must be positive")
        if workers < 0:
            raise UsageError("--workers must be >= 0")
        if not re.fullmatch(r"[0-9A-Za-z_-]+", prefix):
            raise UsageError(f"--prefix {prefix!r}: use letters, digits, '_' and '-' only")
        items, skipped, dataset, task_name = plan(list(inputs or []), lq, gt, task, name, crop, stride)
        prepare_out(out_dir, [prefix], overwrite)
    except UsageError as e:
        print(f"lit-restore prep-shards: error: {e}", file=sys.stderr)
        return 2
    args = {"inputs": [str(i) for i in inputs or []], "lq": lq and str(lq), "gt": gt and str(gt), "task": task, "name": name, "crop": crop,
            "stride": stride, "max_count": max_count, "max_size": max_size, "seed": seed, "prefix": prefix}
    _, skipped = write_items(items, out_dir, skipped, dataset, task_name, args, max_count, max_size, seed, workers,
                             prefix)
    return 1 if skipped else 0


def write_items(items: list[WorkItem], out_dir: Path, skipped: list[str], dataset: str, task_name: Optional[str],
                args: dict[str, Any], max_count: int, max_size: float, seed: int, workers: int, prefix: str
                ) -> tuple[int, list[str]]:
    """Encode `items` into shards in `out_dir` (prepared), then `skipped.txt` and `manifest.json`;
    returns the samples written and every skipped line (`skipped` and the items that failed)."""
    rng = random.Random(seed)
    rng.shuffle(items)
    processes = min(workers or os.cpu_count() or 1, max(len(items), 1))
    pool = multiprocessing.Pool(processes) if processes > 1 else None
    # The pool forks before the sink imports webdataset (and with it torch).
    sink = ShardSink(out_dir, prefix, max_count, int(max_size))
    try:
        results = pool.imap(encode_item, items) if pool else map(encode_item, items)
        with progress_bar() as progress:
            bar = progress.add_task("encoding", total=len(items))

            def samples() -> Iterator[dict[str, Any]]:
                for item_samples, error in results:
                    progress.advance(bar)
                    if error is not None:
                        skipped.append(error)
                    yield from item_samples

            for sample in shuffle_buffer(samples(), rng):
                sink.write(sample)
        sink.finish_shard()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    if skipped:
        write_bytes_atomic(out_dir / SKIPPED, "".join(one_line(line) + "\n" for line in skipped).encode())
    write_manifest(out_dir, sink.shards, dataset=dataset, task=task_name,
                   mode="paired" if task_name else "clean", skipped=len(skipped), args=args)
    total = sum(s["count"] for s in sink.shards)
    note = f" (see {out_dir / SKIPPED})" if skipped else ""
    print(f"written {total} samples in {len(sink.shards)} shards to {out_dir}, skipped {len(skipped)}{note}")
    return total, skipped
