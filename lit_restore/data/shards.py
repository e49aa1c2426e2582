"""WebDataset pieces: read shards, decode samples, crop them jointly and batch them as uint8.

Training (`TrainStream`)
    Every source of `data.train` is sampled with replacement: a shard is drawn uniformly from
    the source's URL list, read to its end, and the next one drawn. Each sample picks its source
    with probability proportional to the source weight, so weights set sample proportions
    whatever the shard sizes. With resampling, "split by node" and "split by worker" mean
    independent random streams: each (rank, worker) seeds its generator from
    `(seed, rank, worker, restart, loader epoch)`; `restart` changes after a resume so a requeued
    job never replays the stream it already trained on (a rebuilt loader also gets a new stream). A buffer of `shuffle_buffer` samples
    holds encoded bytes; decoding happens after the shuffle. Each sample gets a random
    `crop`×`crop` window and one of the 8 dihedral transforms, applied jointly to gt, lq and
    depth. Batches are built in the worker and are always full. Worker `w` of `W` yields
    `steps // W` batches plus one when `w < steps % W`, so every rank yields exactly `steps`
    batches per loader epoch whatever its data: the rule that keeps DDP collectives matched.

Validation (`ValStream`)
    The val shards are read in order and never resampled. Sample `i` (its position in the
    concatenated shard list) goes to the rank whose contiguous block holds it: rank `r` of `R`
    owns positions `[r*m, (r+1)*m)` with `m = ceil(N/R)`. Every rank yields `ceil(m/B)` full
    batches of `B` rows; rows past a rank's own samples are padding (a copy of a real row of
    the batch, or zeros) with `valid=False`, so every sample is evaluated exactly once across
    ranks when metrics skip invalid rows. A corrupt val sample also becomes an invalid row (and
    is counted), so ranks never fall out of step. Within a rank, worker `w` builds batches
    `w, w+W, ...`, which the loader's round-robin returns in order. Val crops are centred.

Samples smaller than the crop are reflect-padded (evenly on both sides) up to the crop size;
upscaling would invent detail that the restoration target should not have. An `lq.png` smaller
than `gt.png` by an integer factor (SR pairs) is resized to the gt size with bicubic before the
crop. `depth.npy` is divided by its maximum, resized to the image size if needed and stored as
uint8.

Only `gt.png` (or webdataset's `png`/`jpg`/`jpeg`/`webp` as the clean image), `lq.png`,
`depth.npy` and `json` members are read from a tar (`.tar.gz`/`.tgz` shards are decompressed on
the fly); everything else (`.pth`, `.pyd`, pickles, ...) is skipped by name before its bytes are
read, and `.npy` is loaded with `allow_pickle=False`, so sample data is never unpickled.

Shards come from strangers. Tar headers are checked (sizes in [0, MAX_MEMBER_BYTES], whole pax
records), so every header moves the stream forward and a damaged shard ends with an error
instead of a hang; it then counts the samples it lost (its `manifest.json` count minus those
read, when the manifest lists it). Images above `max_pixels` are refused from their header,
before decoding. Any exception while decoding a sample is that sample's corruption: skipped,
counted per worker and its reason logged (the first MAX_LOGGED). Each batch carries
`n_corrupt`, the count since that worker's previous batch, and a worker stops the run with
`CorruptDataError` once more than `max_corrupt_fraction` of at least `MIN_CHECKED` samples were
unreadable, or all of them (a stream that can never fill a batch would otherwise spin).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen
from torch.utils.data import IterableDataset, get_worker_info

from lit_restore.config import DataConfig, UserError
from lit_restore.config.data import NetworkConfig
from lit_restore.data.remote import is_http, open_http
from lit_restore.data.degrade.types import type_index

# The clean image: the project's `gt.png`, else the first of webdataset's usual image names.
GT_MEMBERS = ("gt.png", "png", "jpg", "jpeg", "webp")
# Tar members a sample may have; anything else is never read.
SAMPLE_FILES = frozenset({*GT_MEMBERS, "lq.png", "depth.npy", "json"})
GZIP_SUFFIXES = (".tar.gz", ".tgz")
# Samples a worker must have seen before the corrupt fraction can stop the run.
MIN_CHECKED = 100
# Unreadable samples a worker names in the log before it only counts them.
MAX_LOGGED = 20
# Shards in a row that gave no sample (unreachable, damaged at the start, empty) before a worker
# stops the run: no waiting for MIN_CHECKED samples when every server answers 404.
MAX_SHARDS_FAILED_IN_ROW = 10
DEFAULT_MAX_PIXELS = DataConfig.max_pixels
DEFAULT_NETWORK = NetworkConfig()

log = logging.getLogger(__name__)


class CorruptDataError(UserError, RuntimeError):
    """Too many unreadable samples, or shards that keep failing: the shards (or the path or the
    server they come from) are broken. One line: raised in a loader worker, the DataLoader
    re-raises it in the main process with the worker's traceback as its message, of which only
    the last line (this error's own message) is kept."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class CorruptSample(ValueError):
    """One sample cannot be used (bad image, bad json, missing member)."""


@dataclass
class CorruptCounter:
    """Counts unreadable samples in one worker and stops the run past `max_fraction`."""

    max_fraction: float
    min_checked: int = MIN_CHECKED
    seen: int = 0
    corrupt: int = 0
    since_batch: int = 0
    shards_failed_in_row: int = 0

    def ok(self) -> None:
        self.seen += 1
        self.shards_failed_in_row = 0

    def bad(self, where: str, reason: str, n: int = 1, shard_failed: bool = False) -> None:
        """`n` unreadable samples at `where` (a shard losing its tail counts every sample it lost);
        `shard_failed`: the whole shard gave no sample."""
        self.seen += n
        self.corrupt += n
        self.since_batch += n
        if self.corrupt - n < MAX_LOGGED:
            more = "; further ones are only counted" if self.corrupt >= MAX_LOGGED else ""
            if shard_failed:
                log.warning("shard %s gave no sample (counted as %d unreadable): %s%s", where, n, reason, more)
            else:
                log.warning("skipped %d unreadable sample(s) at %s: %s%s", n, where, reason, more)
        self.shards_failed_in_row = self.shards_failed_in_row + 1 if shard_failed else 0
        if self.shards_failed_in_row >= MAX_SHARDS_FAILED_IN_ROW:
            raise CorruptDataError(f"{self.shards_failed_in_row} shards in a row gave no sample; last: {where}: {reason}")
        if self.seen < self.min_checked:
            return
        fraction = self.corrupt / self.seen
        if fraction > self.max_fraction:
            why = f"{fraction:.1%} > data.max_corrupt_fraction={self.max_fraction:.1%}"
        elif self.corrupt == self.seen:  # no batch can ever be made: stop even when 100 % is allowed
            why = "none readable"
        else:
            return
        raise CorruptDataError(f"{self.corrupt} of {self.seen} samples unreadable ({why}); last: {where}: {reason}")

    def take(self) -> int:
        """Corrupt samples since the previous call (reported with each batch)."""
        n, self.since_batch = self.since_batch, 0
        return n


# --------------------------------------------------------------------------------------
# Reading shards
# --------------------------------------------------------------------------------------


class MissingShardsError(UserError, FileNotFoundError):
    """Local shard files a pattern names that do not exist."""


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand a shard URL pattern (`train-{000000..000099}.tar`); a local pattern may also
    be a glob (`shards/*.tar`), its matches taken in sorted order."""
    urls = []
    for url in wds.shardlists.expand_urls(pattern):
        urls += sorted(glob.glob(url)) if is_local(url) and any(c in url for c in "*?[") else [url]
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_local_shards(urls: list[str], what: str, key: str = "") -> None:
    """A one-line error for local shard files that do not exist (remote URLs are not checked);
    a folder given for its shards gets a glob to use instead, as `key=...` (default `what`)."""
    if not urls:
        raise MissingShardsError(f"{what}: the pattern matches no shard file")
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    folder = next((u for u in missing if os.path.isdir(u)), None)
    if folder is not None:
        raise MissingShardsError(f"{what}: {folder} is a folder; give its shard files, e.g. "
                                 f"{key or what}='{folder.rstrip('/')}/*.tar'")
    if missing:
        raise MissingShardsError(f"{what}: {len(missing)} of {len(urls)} shard files not found, e.g. {missing[0]}; "
                                 "fix the {first..last} range or use a glob such as dir/*.tar")


_BLOCK = 512
# Largest tar member the loader reads or skips: far above any image a shard holds, small enough
# that a damaged size field cannot send a reader gigabytes ahead or into memory.
MAX_MEMBER_BYTES = 1 << 30
# Largest pax / GNU long-name header; real ones hold a few short records.
MAX_META_BYTES = 1 << 20


class TarFormatError(ValueError):
    """A tar header that does not parse (truncated or damaged shard)."""


def _header_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80 positive, 0xff negative)."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field, "big", signed=True) if field[0] == 0xFF else int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if text and not all(48 <= c <= 55 for c in text):
        raise TarFormatError(f"bad numeric header field {field!r}")
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """The `LENGTH key=value\\n` records of a pax header; every record must be whole and advance."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise TarFormatError("bad pax record length")
        end = pos + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarFormatError("bad pax record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarFormatError("pax record without '='")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def _member_size(pending: dict[str, str], header: bytes, name: str, limit: int) -> int:
    text = pending.get("size")
    if text is not None and not text.isdigit():
        raise TarFormatError(f"{name}: bad pax size {text!r}")
    size = int(text) if text is not None else _header_number(header[124:136])
    if not 0 <= size <= limit:
        raise TarFormatError(f"{name}: member size {size} outside [0, {limit}]")
    return size


def tar_members(stream, wanted) -> Iterator[tuple[str, Optional[bytes]]]:
    """(name, bytes) of the regular files of a tar stream; bytes is None where `wanted(name)` is false.

    Python's tarfile spends about as long parsing the headers of a PNG shard (a pax header per
    member) as PIL spends decoding a small crop, so the loader reads the few header forms that
    shards use here: ustar/GNU headers, pax `path`/`size` records and GNU long names.
    Unwanted members are skipped without being read into memory. Headers come from strangers:
    sizes must lie in [0, MAX_MEMBER_BYTES] (meta headers MAX_META_BYTES) and pax records must be
    whole, so every header moves the stream forward and a damaged one raises `TarFormatError`.
    """
    seekable = stream.seekable() if hasattr(stream, "seekable") else False
    pending: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:  # a complete tar ends with zero blocks, not at a header boundary
            raise TarFormatError("truncated tar (no end-of-archive block)")
        if header.count(0) == _BLOCK:
            return
        checksum = _header_number(header[148:156])
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the field itself counts as spaces
            raise TarFormatError("bad tar header checksum")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\0" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        name = pending.get("path", name)
        meta = kind in (b"x", b"g", b"L", b"K")
        size = _member_size({} if meta else pending, header, name, MAX_META_BYTES if meta else MAX_MEMBER_BYTES)
        padded = size + (-size % _BLOCK)
        if meta or (kind in (b"0", b"\0", b"7") and wanted(name)):
            data = stream.read(padded)
            if len(data) < padded:
                raise TarFormatError(f"{name}: truncated member")
            data = data[:size]
        elif seekable:
            stream.seek(padded, os.SEEK_CUR)
            data = None
        else:
            while padded:
                chunk = stream.read(min(padded, 1 << 20))
                if not chunk:
                    raise TarFormatError(f"{name}: truncated member")
                padded -= len(chunk)
            data = None
        if kind == b"x":
            pending = _pax_records(data)
        elif kind == b"L":
            pending = {**pending, "path": data.split(b"\0", 1)[0].decode("utf-8", "replace")}
        elif kind in (b"g", b"K"):
            continue
        else:
            pending = {}
            if kind in (b"0", b"\0", b"7"):
                yield name, data


def split_name(name: str) -> tuple[str, str]:
    """Sample key and member suffix, as webdataset splits them: at the first dot of the file name."""
    head, sep, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return head + sep + stem, suffix.lower()


def _wanted_member(name: str) -> bool:
    return split_name(name)[1] in SAMPLE_FILES


@contextmanager
def open_shard(url: str, net: NetworkConfig = DEFAULT_NETWORK) -> Iterator[Any]:
    """A shard's tar byte stream; `.tar.gz`/`.tgz` shards are decompressed on the fly, as webdataset
    reads them. http(s) URLs are read with `net`'s timeouts and retries (`lit_restore.data.remote`)."""
    with (open_http(url, net) if is_http(url) else gopen(url, "rb")) as raw:
        if url.endswith(GZIP_SUFFIXES):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        else:
            yield raw


def read_shard(url: str, counter: CorruptCounter, expected: Optional[int] = None,
               net: NetworkConfig = DEFAULT_NETWORK) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in order: `__key__`, `__url__` and the bytes of the known members.

    A shard that cannot be opened, is damaged or truncated ends there (the sample being read is
    dropped) and counts the samples it lost: `expected` (its manifest count, when known) minus
    those read, else one. A shard that ends cleanly short of `expected` counts the missing
    samples, and a shard without samples counts one, which would otherwise make a resampled
    source spin forever.
    """
    sample: dict[str, Any] = {}
    read = 0
    try:
        with open_shard(url, net) as stream:
            for name, data in tar_members(stream, _wanted_member):
                if data is None:
                    continue
                key, suffix = split_name(name)
                if sample and sample["__key__"] != key:
                    read += 1
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[suffix] = data
    except Exception as e:  # any read or format error: the rest of this shard is lost
        lost = max(1, (expected or 0) - read)
        counter.bad(url, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", n=lost,
                    shard_failed=read == 0)
        return
    if sample:
        read += 1
        yield sample
    if expected is not None and read < expected:
        counter.bad(url, f"{expected - read} of the {expected} samples its manifest.json lists are missing",
                    n=expected - read)
    elif read == 0:
        counter.bad(url, "no samples", shard_failed=True)


@lru_cache(maxsize=256)
def _manifest_counts(manifest: Path, mtime_ns: int) -> dict[str, int]:
    try:
        entries = json.loads(manifest.read_text())["shards"]
        return {Path(e["file"]).name: int(e["count"]) for e in entries}
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e})") from None


def manifest_count(url: str) -> Optional[int]:
    """A local shard's sample count from the `manifest.json` beside it; None when it lists none."""
    if not is_local(url):
        return None
    manifest = Path(url).parent / "manifest.json"
    try:
        mtime_ns = manifest.stat().st_mtime_ns
    except OSError:
        return None
    return _manifest_counts(manifest, mtime_ns).get(Path(url).name)


def shard_count(url: str, net: NetworkConfig = DEFAULT_NETWORK) -> int:
    """Samples in a shard: from `manifest.json` beside a local shard when it lists it, else by reading."""
    count = manifest_count(url)
    if count is not None:
        return count
    counter = CorruptCounter(max_fraction=1.0)
    return sum(1 for _ in read_shard(url, counter, net=net))


# --------------------------------------------------------------------------------------
# Decoding and cropping
# --------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """A decoded sample at full size; crops are views, so only the batch copy touches pixels."""

    key: str
    dataset: str
    gt: np.ndarray  # uint8 (H, W, 3)
    lq: Optional[np.ndarray]  # uint8 (H, W, 3), at gt size
    depth: Optional[np.ndarray]  # uint8 (H, W)
    label: int  # index into DEGRADATION_TYPES, -1 for clean samples
    meta: dict[str, Any] = field(default_factory=dict)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\nIHDR"


def _header_pixels(data: bytes, name: str) -> int:
    """Width × height from the image's header, read before any pixel is decoded."""
    if len(data) >= 24 and data[:8] + data[12:16] == _PNG_SIGNATURE:
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    try:
        w, h = Image.open(io.BytesIO(data)).size  # PIL reads the header only until load()
    except Exception as e:
        raise CorruptSample(f"{name}: cannot decode ({type(e).__name__})") from None
    return w * h


def _is_plain_rgb8_png(data: bytes) -> bool:
    """8-bit RGB PNG within PIL's pixel limit: the one form OpenCV decodes to exactly PIL's pixels."""
    if len(data) < 26 or data[:8] + data[12:16] != _PNG_SIGNATURE or data[24:26] != b"\x08\x02":
        return False
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return Image.MAX_IMAGE_PIXELS is None or w * h <= Image.MAX_IMAGE_PIXELS


def _open_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Image bytes (PNG, or JPEG/WebP/... for webdataset's `jpg`/`webp` members) → (H, W, 3) uint8 RGB.

    The pixel count is checked from the header first, so a decompression bomb (a few hundred
    KB that decode to gigabytes) costs nothing. OpenCV's libpng decode is ~15% faster than
    PIL's, which is most of the loader's time; it takes the plain 8-bit RGB PNGs that shards
    hold. Every other form (16-bit, gray, palette, RGBA, other formats) and anything OpenCV
    rejects go through PIL, so conversions and what counts as corrupt stay PIL's (one exception:
    libpng accepts a bad checksum on an ancillary chunk, where PIL refuses the file; the pixels
    are intact either way).
    """
    pixels = _header_pixels(data, name)
    if pixels > max_pixels:
        raise CorruptSample(f"{name}: {pixels} pixels exceed data.max_pixels={max_pixels}")
    if _is_plain_rgb8_png(data):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        if img is not None:
            return img
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise CorruptSample(f"{name}: cannot decode ({type(e).__name__})") from None
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _depth_to_uint8(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    try:
        depth = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise CorruptSample(f"depth.npy: cannot load ({type(e).__name__})") from None
    if depth.ndim != 2 or depth.size == 0 or not np.issubdtype(depth.dtype, np.number):
        raise CorruptSample(f"depth.npy: expected a non-empty numeric (H, W) array, got {depth.dtype} {depth.shape}")
    if depth.size > max_pixels:  # before the float copy, which can be 4x an 8-bit map
        raise CorruptSample(f"depth.npy: {depth.size} pixels exceed data.max_pixels={max_pixels}")
    depth = np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(depth.max())
    depth = np.clip(depth / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(depth)
    if depth.shape != (size[1], size[0]):
        depth = np.asarray(Image.fromarray(depth, mode="F").resize(size, Image.BILINEAR))
    return np.rint(depth * 255.0).astype(np.uint8)


def decode_sample(raw: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Raw tar members → `Decoded`; `CorruptSample` names what is wrong.

    The clean image is `gt.png` or webdataset's `png`/`jpg`/`jpeg`/`webp`; `json` is optional for
    clean samples (a plain webdataset image set has none) and needed by paired ones (their task).
    """
    meta: Any = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise CorruptSample("json: cannot parse") from None
        if not isinstance(meta, dict):
            raise CorruptSample("json: not an object")
    gt_name = next((m for m in GT_MEMBERS if m in raw), None)
    if gt_name is None:
        raise CorruptSample(f"missing gt.png (or {', '.join(GT_MEMBERS[1:])})")
    gt = _open_image(raw[gt_name], gt_name, max_pixels)
    lq, label = None, -1
    if "lq.png" in raw:
        task = meta.get("task")
        if not task:
            raise CorruptSample("paired sample without a json task")
        try:
            label = type_index(str(task))
        except ValueError as e:
            raise CorruptSample(str(e)) from None
        lq = _open_image(raw["lq.png"], "lq.png", max_pixels)
        if lq.shape != gt.shape:
            size, lq_size = (gt.shape[1], gt.shape[0]), (lq.shape[1], lq.shape[0])  # PIL's (W, H)
            fx, fy = size[0] / lq_size[0], size[1] / lq_size[1]
            if fx != fy or fx != int(fx):
                raise CorruptSample(f"lq size {lq_size} is not gt size {size} divided by an integer")
            lq = np.asarray(Image.fromarray(lq).resize(size, Image.BICUBIC))
    depth = _depth_to_uint8(raw["depth.npy"], (gt.shape[1], gt.shape[0]), max_pixels) if "depth.npy" in raw else None
    return Decoded(raw["__key__"], str(meta.get("dataset", "")), gt, lq, depth, label, meta)


def decode_or_count(raw: dict[str, Any], counter: CorruptCounter, max_pixels: int) -> Optional[Decoded]:
    """`decode_sample`, any failure counted as this sample's corruption (None) and never the run's:
    the bytes come from strangers, so whatever a decoder raises on them is the sample's fault."""
    try:
        s = decode_sample(raw, max_pixels)
    except Exception as e:
        reason = str(e) if isinstance(e, CorruptSample) else f"{type(e).__name__}: {str(e)[:200]}"
        counter.bad(f"{raw.get('__url__')}/{raw.get('__key__')}", reason)
        return None
    counter.ok()
    return s


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad the first two axes evenly up to `size`."""
    ph, pw = max(size - a.shape[0], 0), max(size - a.shape[1], 0)
    if ph == 0 and pw == 0:
        return a
    pad = [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)] + [(0, 0)] * (a.ndim - 2)
    # numpy reflects repeatedly for pads larger than the image; a 1-pixel axis has nothing to
    # reflect, so it is repeated instead.
    mode = "reflect" if min(a.shape[:2]) > 1 else "edge"
    return np.pad(a, pad, mode=mode)


def crop_sample(s: Decoded, size: int, y: int, x: int) -> dict[str, Any]:
    """The `size`×`size` window at (y, x) of gt/lq/depth as HWC uint8 arrays (padded if small)."""
    h, w = s.gt.shape[:2]
    rows, cols = slice(y, y + min(size, h)), slice(x, x + min(size, w))
    return {
        "gt": _pad_to(s.gt[rows, cols], size),
        "lq": None if s.lq is None else _pad_to(s.lq[rows, cols], size),
        "depth": None if s.depth is None else _pad_to(s.depth[rows, cols], size),
        "label": s.label,
        "key": s.key,
        "dataset": s.dataset,
    }


def random_window(s: Decoded, size: int, rng: np.random.Generator) -> tuple[int, int]:
    h, w = s.gt.shape[:2]
    return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))


def center_window(s: Decoded, size: int) -> tuple[int, int]:
    h, w = s.gt.shape[:2]
    return max(h - size, 0) // 2, max(w - size, 0) // 2


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square (k in 0..7) on the first two axes, as a view."""
    a = np.rot90(a, k % 4, axes=(0, 1))
    return a[:, ::-1] if k >= 4 else a


def pack_rows(rows: list[dict[str, Any]], valid: list[bool], n_corrupt: int) -> dict[str, Any]:
    """Cropped rows → a packed batch: every image plane in ONE uint8 buffer, the rest plain lists.

    Each row is written once, straight into its CHW slot (the transpose and any dihedral view
    are resolved by that single copy). In a loader worker the planes leave as `bytes`: a tensor
    would go over as a shared-memory file descriptor, fetched from the worker in a round trip per
    batch that measured ~1 ms, more than copying a batch of crops through the pipe twice.
    `unpack_batch` builds the host batch in the training process.
    """
    b = len(rows)
    h, w = rows[0]["gt"].shape[:2]
    has_lq = [r["lq"] is not None for r in rows]
    has_depth = [r["depth"] is not None for r in rows]
    planes = {"gt": 3, "lq": 3 if any(has_lq) else 0, "depth": 1 if any(has_depth) else 0}
    pixels = torch.empty(b * sum(planes.values()) * h * w, dtype=torch.uint8)
    start = 0
    for name, c in planes.items():
        block = pixels[start : start + b * c * h * w].numpy().reshape(b, c, h, w)
        start += b * c * h * w
        for i, r in enumerate(rows):
            if c and r[name] is None:
                block[i] = 0
            elif c:
                block[i] = r[name].transpose(2, 0, 1) if c == 3 else r[name][None]
    return {
        "pixels": pixels if get_worker_info() is None else pixels.numpy().tobytes(),
        "size": (b, h, w), "planes": planes, "has_lq": has_lq, "has_depth": has_depth,
        "label": [r["label"] for r in rows], "valid": valid, "n_corrupt": n_corrupt,
        "key": [r["key"] for r in rows], "dataset": [r["dataset"] for r in rows],
    }


def unpack_batch(packed: dict[str, Any]) -> dict[str, Any]:
    """Packed batch → host batch (see docs/architecture.md "Host batch"); runs in the training process."""
    b, h, w = packed["size"]
    pixels = packed["pixels"]
    if isinstance(pixels, bytes):  # from a worker; bytearray gives a writable tensor
        pixels = torch.frombuffer(bytearray(pixels), dtype=torch.uint8)
    batch: dict[str, Any] = {
        "has_lq": torch.tensor(packed["has_lq"], dtype=torch.bool),
        "label": torch.tensor(packed["label"], dtype=torch.long),
        "key": packed["key"],
        "dataset": packed["dataset"],
        "valid": torch.tensor(packed["valid"], dtype=torch.bool),
        "n_corrupt": torch.tensor(packed["n_corrupt"], dtype=torch.long),
    }
    start = 0
    for name, c in packed["planes"].items():
        if c:
            batch[name] = pixels[start : start + b * c * h * w].view(b, c, h, w)
            start += b * c * h * w
    if "depth" in batch:
        batch["has_depth"] = torch.tensor(packed["has_depth"], dtype=torch.bool)
    return batch


def make_loader(dataset: IterableDataset, num_workers: int) -> wds.WebLoader:
    """The loader of a `TrainStream`/`ValStream`: batches are built in the workers, unpacked here."""
    return wds.WebLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, persistent_workers=num_workers > 0
    ).map(unpack_batch)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------


class TrainStream(IterableDataset):
    """Weighted, resampled, shuffled, cropped training batches; `steps` batches per rank and epoch.

    `sources` holds (expanded shard URLs, weight) pairs. `rank`, `restart` and `build` (how many
    loaders this process built before) are set by the data module before the workers start.
    """

    def __init__(
        self,
        sources: list[tuple[list[str], float]],
        batch_size: int,
        crop: int,
        steps: int,
        shuffle_buffer: int,
        max_corrupt_fraction: float,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        network: NetworkConfig = DEFAULT_NETWORK,
        seed: int = 0,
        rank: int = 0,
        restart: int = 0,
        build: int = 0,
    ) -> None:
        super().__init__()
        if not sources or any(not urls for urls, _ in sources):
            raise ValueError("TrainStream: every source needs at least one shard URL")
        self.sources = sources
        self.batch_size = batch_size
        self.crop = crop
        self.steps = steps
        self.shuffle_buffer = shuffle_buffer
        self.max_corrupt_fraction = max_corrupt_fraction
        self.max_pixels = max_pixels
        self.network = network
        self.seed = seed
        self.rank = rank
        self.restart = restart
        self.build = build
        self.epoch = 0  # loader epochs started in this process (persistent workers keep it)
        self.counter: Optional[CorruptCounter] = None  # lives for the worker's lifetime

    def _source(self, urls: list[str], rng: np.random.Generator, counter: CorruptCounter) -> Iterator[dict]:
        while True:
            url = urls[int(rng.integers(len(urls)))]
            yield from read_shard(url, counter, manifest_count(url), self.network)

    def _mixed(self, rng: np.random.Generator, counter: CorruptCounter) -> Iterator[dict]:
        streams = [self._source(urls, rng, counter) for urls, _ in self.sources]
        weights = np.array([w for _, w in self.sources], dtype=np.float64)
        cumulative = np.cumsum(weights / weights.sum())
        while True:
            i = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(streams) - 1)
            yield next(streams[i])

    def _cropped(self, raws: Iterator[dict], rng: np.random.Generator, counter: CorruptCounter) -> Iterator[dict]:
        for raw in raws:
            s = decode_or_count(raw, counter, self.max_pixels)
            if s is None:
                continue
            row = crop_sample(s, self.crop, *random_window(s, self.crop, rng))
            k = int(rng.integers(8))
            for name in ("gt", "lq", "depth"):
                if row[name] is not None:
                    row[name] = dihedral(row[name], k)
            yield row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        self.epoch += 1
        if self.counter is None:
            self.counter = CorruptCounter(self.max_corrupt_fraction)
        counter = self.counter
        entropy = [self.seed % 2**63, self.rank, worker, self.restart, self.build, self.epoch]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        shuffle_rng = random.Random(int(rng.integers(2**63)))
        share = self.steps // num_workers + (1 if worker < self.steps % num_workers else 0)

        samples = self._mixed(rng, counter)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, max(1, self.shuffle_buffer // 2), rng=shuffle_rng)(samples)
        rows = self._cropped(samples, rng, counter)
        batches = wds.batched(
            self.batch_size, collation_fn=lambda g: pack_rows(g, [True] * len(g), counter.take()), partial=False
        )(rows)
        yield from islice(batches, share)


# --------------------------------------------------------------------------------------
# Validation stream
# --------------------------------------------------------------------------------------


def rank_block(total: int, rank: int, world: int) -> range:
    """Positions of the val samples owned by `rank`: a contiguous block of ceil(total/world)."""
    per_rank = math.ceil(total / world)
    return range(min(rank * per_rank, total), min((rank + 1) * per_rank, total))


class ValStream(IterableDataset):
    """Ordered, centre-cropped val batches; each sample exactly once across ranks (see module doc).

    `shards` holds (URL, sample count) in reading order; `rank`/`world` are set by the data module.
    """

    def __init__(
        self,
        shards: list[tuple[str, int]],
        batch_size: int,
        crop: int,
        max_corrupt_fraction: float,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        network: NetworkConfig = DEFAULT_NETWORK,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.batch_size = batch_size
        self.crop = crop
        self.max_corrupt_fraction = max_corrupt_fraction
        self.max_pixels = max_pixels
        self.network = network
        self.rank = rank
        self.world = world

    @property
    def total(self) -> int:
        return sum(n for _, n in self.shards)

    def num_batches(self) -> int:
        """Batches every rank yields (the same on all ranks)."""
        return math.ceil(math.ceil(self.total / self.world) / self.batch_size)

    def rank_batches(self) -> list[list[Optional[int]]]:
        """Positions per batch of this rank; None marks a padding row."""
        block = list(rank_block(self.total, self.rank, self.world))
        b = self.batch_size
        slots = block + [None] * (self.num_batches() * b - len(block))
        return [slots[j * b : (j + 1) * b] for j in range(self.num_batches())]

    def _indexed(self, lo: int, hi: int, counter: CorruptCounter) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) for lo <= position < hi, opening only the shards that hold them."""
        start = 0
        for url, count in self.shards:
            end = start + count
            if start < hi and end > lo:
                position = start
                for raw in read_shard(url, counter, net=self.network):
                    if position >= end:
                        raise ValueError(f"{url}: holds more than the {count} samples its manifest.json lists")
                    if position >= hi:  # checked after the count check: a stale manifest fails loudly
                        return
                    if position >= lo:
                        yield position, raw
                    position += 1
            start = end

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        counter = CorruptCounter(self.max_corrupt_fraction)
        mine = self.rank_batches()[worker::num_workers]
        wanted = sorted(p for batch in mine for p in batch if p is not None)
        stream = self._indexed(wanted[0], wanted[-1] + 1, counter) if wanted else iter(())
        wanted_set = set(wanted)
        got: dict[int, Optional[dict[str, Any]]] = {}
        last = -1
        for batch in mine:
            need = max((p for p in batch if p is not None), default=-1)
            while last < need:
                try:
                    position, raw = next(stream)
                except StopIteration:  # a shard shorter than listed: its rows become invalid
                    last = math.inf
                    break
                last = position
                if position in wanted_set:
                    got[position] = self._decode(raw, counter)
            rows = []
            for p in batch:
                if p is not None and p not in got:
                    counter.bad(f"val position {p}", "missing from its shard")
                rows.append(got.pop(p, None) if p is not None else None)
            yield self._pack(rows, counter.take())
        for _ in stream:  # reads at most one sample more: a shard longer than listed raises here
            pass

    def _decode(self, raw: dict, counter: CorruptCounter) -> Optional[dict[str, Any]]:
        s = decode_or_count(raw, counter, self.max_pixels)
        return None if s is None else crop_sample(s, self.crop, *center_window(s, self.crop))

    def _pack(self, rows: list[Optional[dict[str, Any]]], n_corrupt: int) -> dict[str, Any]:
        real = next((r for r in rows if r is not None), None)
        if real is None:
            zeros = np.zeros((self.crop, self.crop, 3), np.uint8)
            real = {"gt": zeros, "lq": None, "depth": None, "label": -1, "key": "", "dataset": ""}
        pad = {**real, "key": "", "dataset": ""}
        return pack_rows([r if r is not None else pad for r in rows], [r is not None for r in rows], n_corrupt)


# --------------------------------------------------------------------------------------
# Ordered iteration (evaluation)
# --------------------------------------------------------------------------------------


def iter_samples(urls: str | list[str], max_corrupt_fraction: float = 0.05,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict[str, Any]]:
    """Samples of shards in order at full size: `key`, `dataset`, `gt` (H,W,3) uint8, `lq`
    (H,W,3) uint8 at gt size or None, `depth` (H,W) uint8 or None, `label`, `meta` (the json).

    Corrupt samples are skipped and counted; too many stop with `CorruptDataError`.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    counter = CorruptCounter(max_corrupt_fraction)
    for url in [u for p in patterns for u in expand_urls(p)]:
        for raw in read_shard(url, counter, manifest_count(url)):
            s = decode_or_count(raw, counter, max_pixels)
            if s is None:
                continue
            yield {
                "key": s.key,
                "dataset": s.dataset,
                "gt": s.gt,
                "lq": s.lq,
                "depth": s.depth,
                "label": s.label,
                "meta": s.meta,
            }
