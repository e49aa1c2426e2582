"""Shards from strangers: damaged tar headers, hostile samples, truncation, bombs, and a fuzz run.

Every stream runs in a subprocess (`_stream_shards.py`) with a timeout, so a loader that hangs
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_restore.data.shards import (CorruptCounter, CorruptDataError, TarFormatError, decode_sample, iter_samples,
                                     read_shard, tar_members)

STREAM = Path(__file__).resolve().parent / "_stream_shards.py"


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def members(n: int, seed: int = 0, size: int = 12, replace: dict[int, dict[str, bytes]] | None = None,
            folder: str = "") -> dict[str, bytes]:
    """Tar members of `n` clean samples under `folder`; `replace[i]` overrides or adds members of sample i."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        sample = {"gt.png": png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                  "json": json.dumps({"dataset": "d", "task": None}).encode(),
                  "txt": b"skipped by name",  # a member the loader skips without reading
                  **(replace or {}).get(i, {})}
        out.update({f"{folder}k{i:03d}.{suffix}": data for suffix, data in sample.items()})
    return out


def write_tar(path: Path, files: dict[str, bytes], fmt=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime gives every member a pax header
            tf.addfile(info, io.BytesIO(data))
    return path


def header_offsets(data: bytes) -> list[int]:
    """Offsets of every header block (pax headers included) of an intact tar."""
    offsets, pos = [], 0
    while pos + 512 <= len(data) and data[pos:pos + 512].count(0) != 512:
        offsets.append(pos)
        size = int(data[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + size + (-size % 512)
    return offsets


def set_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()


def edit_header(data: bytes, offset: int, field: slice, value: bytes, checksum: bool = True) -> bytes:
    out = bytearray(data)
    block = out[offset:offset + 512]
    block[field] = value.ljust(field.stop - field.start, b"\0")[: field.stop - field.start]
    if checksum:
        set_checksum(block)
    out[offset:offset + 512] = block
    return bytes(out)


def stream(paths: list[Path], timeout: float = 120) -> list[dict]:
    proc = subprocess.run([sys.executable, str(STREAM), *map(str, paths)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


SIZE = slice(124, 136)
NEGATIVE_SIZE = (-4096).to_bytes(12, "big", signed=True)  # GNU base-256, first byte 0xff


def hanging_shards(folder: Path, size_field: bytes = b"-0001000") -> tuple[Path, Path]:
    """The report's two hangs: a negative size (signed octal) on a member the loader skips, and a
    pax header whose first record has length zero."""
    folder.mkdir()
    data = write_tar(folder / "good.tar", members(4)).read_bytes()
    offsets = header_offsets(data)
    txt = next(o for o in offsets if data[o:o + 100].startswith(b"k000.txt"))
    negative = folder / "negative.tar"
    negative.write_bytes(edit_header(data, txt, SIZE, size_field))
    zero = bytearray(data)
    zero[offsets[0] + 512:offsets[0] + 514] = b"0 "
    zero_pax = folder / "zero_pax.tar"
    zero_pax.write_bytes(bytes(zero))
    return negative, zero_pax


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> dict[str, dict]:
    """The hanging shards and the fuzz variants, streamed in ONE subprocess (one interpreter
    start); outcomes by path relative to the fixture's folder."""
    tmp = tmp_path_factory.mktemp("streamed")
    (tmp / "fuzz").mkdir()
    shards = [*hanging_shards(tmp / "hang"), *fuzz_variants(tmp / "fuzz")]
    results = stream(shards, timeout=90)
    assert [r["shard"] for r in results] == [str(p) for p in shards]
    return {Path(r["shard"]).relative_to(tmp).as_posix(): r for r in results}


def test_negative_size_and_empty_pax_record_end_the_shard_instead_of_hanging(streamed, tmp_path):
    for name in ("hang/negative.tar", "hang/zero_pax.tar"):
        assert streamed[name]["train"] == "corrupt" and streamed[name]["ordered"] == "ok", streamed[name]
    negative, zero_pax = hanging_shards(tmp_path / "octal")
    with pytest.raises(TarFormatError, match=r"bad numeric header field b'-0001000"):
        list(tar_members(io.BytesIO(negative.read_bytes()), lambda n: False))
    base256, _ = hanging_shards(tmp_path / "base256", NEGATIVE_SIZE)
    with pytest.raises(TarFormatError, match=r"size -4096 outside"):
        list(tar_members(io.BytesIO(base256.read_bytes()), lambda n: False))
    with pytest.raises(TarFormatError, match="pax record"):
        list(tar_members(io.BytesIO(zero_pax.read_bytes()), lambda n: True))


def test_only_unreadable_shards_stop_even_when_every_sample_may_be_corrupt(tmp_path):
    import threading

    from lit_restore.data.shards import TrainStream, make_loader

    shard = tmp_path / "empty.tar"
    shard.write_bytes(b"\0" * 1024)  # a valid tar without members: nothing can ever be read
    stream = TrainStream([([str(shard)], 1.0)], batch_size=2, crop=8, steps=1, shuffle_buffer=0, max_corrupt_fraction=1.0)
    errors = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(CorruptDataError, list, make_loader(stream, 0))),
                              daemon=True)
    reader.start()
    reader.join(timeout=30)  # before: spins forever, re-reading the empty shard
    assert not reader.is_alive() and len(errors) == 1
    # Stopped after MAX_SHARDS_FAILED_IN_ROW empty reads, without waiting for MIN_CHECKED samples.
    assert "10 shards in a row gave no sample; last: " in str(errors[0].value) and "no samples" in str(errors[0].value)


def test_hostile_samples_are_skipped_counted_and_logged_not_fatal(tmp_path, caplog, monkeypatch):
    empty = io.BytesIO()
    np.save(empty, np.zeros((0, 0), np.float32))
    files = members(6, replace={
        1: {"json": b"[" * 100_000 + b"]" * 100_000},  # RecursionError in json
        2: {"depth.npy": empty.getvalue()},  # an empty depth map
        3: {"depth.npy": b""},  # not an npy at all
    })
    shard = write_tar(tmp_path / "hostile.tar", files)
    with caplog.at_level(logging.WARNING, logger="lit_restore.data.shards"):
        got = [s["key"] for s in iter_samples(str(shard), max_corrupt_fraction=1.0)]
    assert got == ["k000", "k004", "k005"]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3
    assert "k001: json: cannot parse" in logged[0] and "k002: depth.npy: expected a non-empty" in logged[1]
    assert "k003: depth.npy: cannot load" in logged[2]

    # Whatever a decoder raises is the sample's fault, not the run's.
    from lit_restore.data import shards

    def boom(*args):
        raise ZeroDivisionError("a decoder bug or a hostile file")

    monkeypatch.setattr(shards, "_depth_to_uint8", boom)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_restore.data.shards"):
        got = [s["key"] for s in iter_samples(str(shard), max_corrupt_fraction=1.0)]
    assert got == ["k000", "k004", "k005"] and "ZeroDivisionError: a decoder bug" in caplog.records[1].getMessage()


def test_truncated_shards_count_what_the_manifest_says_they_lost(tmp_path):
    # Every shard cut at half its length: half the samples are gone, and the stop sees it.
    urls = []
    for i in range(4):
        data = write_tar(tmp_path / f"s{i}.tar", members(40, seed=i)).read_bytes()
        (tmp_path / f"s{i}.tar").write_bytes(data[: len(data) // 2])
        urls.append(str(tmp_path / f"s{i}.tar"))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"shards": [{"file": f"s{i}.tar", "count": 40} for i in range(4)], "total": 160}))
    counter = CorruptCounter(max_fraction=1.0)
    read = sum(1 for _ in read_shard(urls[0], counter, expected=40))
    assert 0 < read < 40 and counter.corrupt == 40 - read and counter.seen == 40 - read
    with pytest.raises(CorruptDataError, match=r"unreadable \((4|5)\d\.\d% > "):
        list(iter_samples(urls, max_corrupt_fraction=0.05))
    # A shard that ends cleanly but short of its manifest count counts the missing ones too.
    write_tar(tmp_path / "s0.tar", members(30))
    counter = CorruptCounter(max_fraction=1.0)
    assert sum(1 for _ in read_shard(urls[0], counter, expected=40)) == 30 and counter.corrupt == 10


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 8-bit RGB PNG of width × height that compresses to a few hundred KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_refuses_a_png_bomb_from_its_header(tmp_path):
    bomb = png_bomb(4000, 4000)  # 48 MB of pixels from ~50 KB
    assert len(bomb) < 100_000
    raw = {"__key__": "bomb", "gt.png": bomb, "json": b"{}"}
    with pytest.raises(ValueError, match=r"gt.png: 16000000 pixels exceed data.max_pixels=1000000"):
        decode_sample(raw, max_pixels=1_000_000)
    assert decode_sample(raw, max_pixels=16_000_000).gt.shape == (4000, 4000, 3)  # the limit is the only reason
    depth = io.BytesIO()
    np.save(depth, np.ones((40, 50), np.uint8))
    small = {"__key__": "d", "gt.png": png(np.zeros((8, 10, 3), np.uint8)), "depth.npy": depth.getvalue()}
    with pytest.raises(ValueError, match=r"depth.npy: 2000 pixels exceed data.max_pixels=1000"):
        decode_sample(small, max_pixels=1000)
    from lit_restore.config import DataConfig

    assert DataConfig().max_pixels < 12000 * 12000  # the 12000² bomb of the report is refused by default


def test_tar_gz_shards_and_webdataset_member_names(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"w{i}": rng.integers(0, 256, (10, 10, 3), dtype=np.uint8) for i in range(3)}
    files = {}
    for (key, a), fmt in zip(images.items(), ("PNG", "JPEG", "WEBP")):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        files[f"{key}.{ {'PNG': 'png', 'JPEG': 'jpg', 'WEBP': 'webp'}[fmt] }"] = buf.getvalue()
    files["w0.cls"] = b"3"  # webdataset's label member: not ours, skipped
    plain = write_tar(tmp_path / "wds.tar", files)
    packed = tmp_path / "wds.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for url in (plain, packed):
        got = {s["key"]: s["gt"] for s in iter_samples(str(url), max_corrupt_fraction=0.0)}
        assert list(got) == ["w0", "w1", "w2"]
        np.testing.assert_array_equal(got["w0"], images["w0"])  # PNG and lossless WebP are exact
        np.testing.assert_array_equal(got["w2"], images["w2"])
        np.testing.assert_array_equal(got["w1"], np.asarray(Image.open(io.BytesIO(files["w1.jpg"])).convert("RGB")))
    # A damaged .tar.gz is that shard's corruption, not the run's.
    (tmp_path / "bad.tar.gz").write_bytes(packed.read_bytes()[:40])
    counter = CorruptCounter(max_fraction=1.0)
    assert list(read_shard(str(tmp_path / "bad.tar.gz"), counter)) == [] and counter.corrupt == 1


def fuzz_variants(tmp_path: Path, seed: int = 0) -> list[Path]:
    """Damaged copies of small shards: byte flips, truncations and header edits, plain and gzipped."""
    rng = np.random.default_rng(seed)
    bases = [write_tar(tmp_path / "pax.tar", members(6)), write_tar(tmp_path / "gnu.tar", members(6, 1, folder="d" * 120 + "/"), tarfile.GNU_FORMAT)]  # GNU long names
    out: list[Path] = []

    def save(data: bytes, manifest: bool, gz: bool) -> None:
        folder = tmp_path / f"v{len(out):03d}"
        folder.mkdir()
        name = "s.tar.gz" if gz else "s.tar"
        (folder / name).write_bytes(gzip.compress(data) if gz else data)
        if manifest:
            (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": name, "count": 6}], "total": 6}))
        out.append(folder / name)

    fields = [slice(0, 100), SIZE, slice(148, 156), slice(156, 157), slice(345, 500)]
    values = [NEGATIVE_SIZE, b"-0001000", b"77777777777", b"\x80" + b"\xff" * 11, b"9z", b"", b"x", b"L", b"0 ", b"\xff" * 12]
    for i in range(48):
        data = bases[(i // 4) % 2].read_bytes()  # every kind of damage on both bases
        offsets = header_offsets(data)
        kind = i % 4
        if kind == 0:  # byte flips anywhere
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf), int(rng.integers(1, 30))):
                buf[pos] ^= int(rng.integers(1, 256))
            data = bytes(buf)
        elif kind == 1:  # truncation
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # a header field set to a hostile value, with a valid checksum (or not)
            o = int(offsets[int(rng.integers(len(offsets)))])
            data = edit_header(data, o, fields[int(rng.integers(len(fields)))], values[int(rng.integers(len(values)))],
                               checksum=bool(rng.random() < 0.8))
        else:  # the data of a pax / long-name header mangled
            metas = [o for o in offsets if data[o + 156:o + 157] in (b"x", b"L")]
            o = int(metas[int(rng.integers(len(metas)))]) + 512
            buf = bytearray(data)
            buf[o:o + 8] = [b"0 ", b"9999999 ", b"5 a=b\n", b"-3 ", b"30 path"][int(rng.integers(5))].ljust(8, b" ")
            data = bytes(buf)
        save(data, manifest=bool(i % 3), gz=i % 8 == 7)
    return out


def test_fuzzed_shards_yield_batches_or_stop_with_the_corrupt_data_message(streamed):
    fuzzed = [r for name, r in streamed.items() if name.startswith("fuzz/")]
    assert len(fuzzed) == 48
    for r in fuzzed:
        assert r["train"] in ("ok", "corrupt") and r["ordered"] in ("ok", "corrupt"), r
    assert {r["train"] for r in fuzzed} == {"ok", "corrupt"}  # both outcomes are exercised
