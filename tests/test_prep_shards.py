"""prep-shards / prep-sample: folders → shards, read back with plain tarfile + PIL."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.sample import fit_for_crops, load_photos, prep_sample, val_strip_height
from data_prep.shards import TASK_ALIASES, prep_shards, tile_starts
from lit_restore.data.degrade.types import DEGRADATION_TYPES

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def run(inputs=(), out="out", **kw) -> int:
    args = dict(lq=None, gt=None, task=None, name=None, crop=0, stride=0, max_count=1000, max_size=1e9,
                seed=0, workers=1, overwrite=False, prefix="shard")
    args.update(kw)
    return prep_shards(inputs=[str(i) for i in inputs], out=str(out), **args)


def read_shards(out: Path, prefix: str = "shard") -> list[dict]:
    """Every sample in file order: {"key", "json", and each image as a uint8 array}."""
    samples = []
    for tar in sorted(out.glob(f"{prefix}-*.tar")):
        by_key: dict[str, dict] = {}
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                data = tf.extractfile(member).read()
                sample = by_key.setdefault(key, {"key": key, "shard": tar.name})
                if ext == "json":
                    sample["json"] = json.loads(data)
                else:
                    im = Image.open(io.BytesIO(data))
                    assert im.format == "PNG" and im.mode == "RGB"
                    sample[ext] = np.asarray(im)
        samples += by_key.values()
    return samples


def rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def put(path: Path, arr: np.ndarray, **kw) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return arr


def test_round_trip_is_pixel_exact_and_metadata_complete(tmp_path):
    src = tmp_path / "photos"
    images = {
        "a.png": put(src / "a.png", rgb(20, 30)),
        "sub/b.PNG": put(src / "sub" / "b.PNG", rgb(31, 17)),
        "sub/deeper/c.bmp": put(src / "sub" / "deeper" / "c.bmp", rgb(8, 9)),
        "d.tiff": put(src / "d.tiff", rgb(12, 12)),
    }
    (src / "notes.txt").write_text("not an image")
    assert run([src], tmp_path / "out", workers=2) == 0
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 4 and len({s["key"] for s in samples}) == 4
    for s in samples:
        meta = s["json"]
        np.testing.assert_array_equal(s["gt.png"], images[meta["source"]])
        assert meta == {"source": meta["source"], "size": list(images[meta["source"]].shape[:2]),
                        "dataset": "photos", "task": None, "scale": 1, "crop": None, "bit_depth": 8, "mode": "RGB"}
    assert not (tmp_path / "out" / "skipped.txt").exists()


def test_other_modes_become_8bit_rgb(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    gray = RNG.integers(0, 256, (10, 11), dtype=np.uint8)
    put(src / "gray.png", gray)
    g16 = RNG.integers(0, 65536, (10, 11), dtype=np.uint16)
    Image.fromarray(g16).save(src / "g16.png")
    rgba = np.dstack([rgb(10, 11), np.full((10, 11), 255, np.uint8)])
    put(src / "rgba.png", rgba)
    pal = Image.fromarray(rgb(10, 11)).quantize(colors=8)
    pal.save(src / "pal.png")
    tif = put(src / "t.tif", rgb(10, 11))
    assert run([src], tmp_path / "out", name="mix") == 0
    got = {s["json"]["source"]: s for s in read_shards(tmp_path / "out")}
    np.testing.assert_array_equal(got["gray.png"]["gt.png"], np.repeat(gray[..., None], 3, axis=2))
    expected16 = np.round(g16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(got["g16.png"]["gt.png"], np.repeat(expected16[..., None], 3, axis=2))
    assert got["g16.png"]["json"]["bit_depth"] == 16 and got["g16.png"]["json"]["mode"].startswith("I")
    np.testing.assert_array_equal(got["rgba.png"]["gt.png"], rgba[..., :3])
    np.testing.assert_array_equal(got["pal.png"]["gt.png"], np.asarray(pal.convert("RGB")))
    assert got["pal.png"]["json"]["mode"] == "P"
    np.testing.assert_array_equal(got["t.tif"]["gt.png"], tif)
    assert {s["json"]["dataset"] for s in got.values()} == {"mix"}


def test_paired_matching_by_stem_and_mismatch_report(tmp_path, capsys):
    lq, gt = tmp_path / "Rain" / "input", tmp_path / "Rain" / "target"
    a_lq, a_gt = put(lq / "a.png", rgb(10, 12)), put(gt / "a.tif", rgb(10, 12))
    b_lq, b_gt = put(lq / "sub" / "b.bmp", rgb(9, 9)), put(gt / "sub" / "b.png", rgb(9, 9))
    put(lq / "c.png", rgb(10, 12))
    put(gt / "c.png", rgb(10, 13))  # size mismatch
    put(lq / "d.png", rgb(5, 5))  # no gt
    put(gt / "e.png", rgb(5, 5))  # no lq
    put(gt / "b.png", rgb(9, 9))  # same stem in another folder: not b's partner, and has no lq
    code = run(out=tmp_path / "out", lq=lq, gt=gt, task="derain")
    assert code == 1
    samples = {s["json"]["source"]: s for s in read_shards(tmp_path / "out")}
    assert set(samples) == {"a.tif", "sub/b.png"}
    np.testing.assert_array_equal(samples["a.tif"]["lq.png"], a_lq)
    np.testing.assert_array_equal(samples["a.tif"]["gt.png"], a_gt)
    np.testing.assert_array_equal(samples["sub/b.png"]["lq.png"], b_lq)
    np.testing.assert_array_equal(samples["sub/b.png"]["gt.png"], b_gt)
    assert {s["json"]["task"] for s in samples.values()} == {"rain"}
    assert {s["json"]["dataset"] for s in samples.values()} == {"Rain"}  # the folder holding input/ and target/
    report = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert len(report) == 4
    assert any("c.png" in line and "size mismatch" in line for line in report)
    assert any(line.startswith(str(lq / "d.png")) and "no --gt" in line for line in report)
    assert any(line.startswith(str(gt / "e.png")) and "no --lq" in line for line in report)
    assert any(line.startswith(str(gt / "b.png")) and "no --lq" in line for line in report)
    assert "written 2 samples in 1 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["mode"] == "paired" and manifest["task"] == "rain" and manifest["skipped"] == 4


def test_sr_pairs_accept_integer_scale_and_crop_jointly(tmp_path):
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    small, big = put(lq / "x.png", rgb(10, 12)), put(gt / "x.png", rgb(40, 48))
    put(lq / "y.png", rgb(10, 12))
    put(gt / "y.png", rgb(30, 40))  # 3x tall, 3.33x wide: not an integer scale
    assert run(out=tmp_path / "whole", lq=lq, gt=gt, task="sr") == 1
    (whole,) = read_shards(tmp_path / "whole")
    assert whole["json"]["scale"] == 4 and whole["json"]["task"] == "lowres"
    np.testing.assert_array_equal(whole["lq.png"], small)

    assert run(out=tmp_path / "tiles", lq=lq, gt=gt, task="superres", crop=16, stride=12) == 1
    tiles = read_shards(tmp_path / "tiles")
    corners = sorted(tuple(t["json"]["crop"]) for t in tiles)
    ys, xs = tile_starts(40, 16, 12, 4), tile_starts(48, 16, 12, 4)
    assert ys == [0, 12, 24] and xs == [0, 12, 24, 32]
    assert corners == [(y, x) for y in ys for x in xs]
    for t in tiles:
        y, x = t["json"]["crop"]
        np.testing.assert_array_equal(t["gt.png"], big[y : y + 16, x : x + 16])
        np.testing.assert_array_equal(t["lq.png"], small[y // 4 : y // 4 + 4, x // 4 : x // 4 + 4])

    # Same sizes with a non-SR task are a mismatch, not a scale.
    assert run(out=tmp_path / "rain", lq=lq, gt=gt, task="rain") == 1
    assert read_shards(tmp_path / "rain") == []


def test_task_names_map_onto_degradation_types(tmp_path, capsys):
    assert set(TASK_ALIASES.values()) <= set(DEGRADATION_TYPES) - {"no"}
    assert TASK_ALIASES["dark"] == "lowlight" and TASK_ALIASES["low-light"] == "lowlight"
    assert TASK_ALIASES["motionblur"] == "blur" and TASK_ALIASES["dehaze"] == "haze"
    (tmp_path / "lq").mkdir()
    (tmp_path / "gt").mkdir()
    code = run(out=tmp_path / "out", lq=tmp_path / "lq", gt=tmp_path / "gt", task="sharpen")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "'sharpen'" in err and "derain" in err and "sr" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,fragment", [
    ({"inputs": []}, "give one or more image folders"),
    ({"inputs": ["missing"]}, "is not a folder"),
    ({"inputs": ["src"], "task": "rain"}, "--task labels paired data"),
    ({"inputs": ["src"], "max_count": 0}, "--max-count"),
    ({"inputs": ["src"], "stride": 4}, "--stride needs --crop"),
    ({"inputs": [], "lq": "src"}, "needs --lq, --gt and --task"),
])
def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch, kw, fragment):
    monkeypatch.chdir(tmp_path)
    put(tmp_path / "src" / "a.png", rgb(4, 4))
    inputs = kw.pop("inputs")
    assert run(inputs, "out", **kw) == 2
    assert fragment in capsys.readouterr().err


def test_corrupt_files_are_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    good = put(src / "good.png", rgb(16, 16))
    put(src / "good2.jpg", rgb(16, 16), quality=95)
    (src / "zero.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(jpeg, "JPEG")
    (src / "cut.jpg").write_bytes(jpeg.getvalue()[:700])
    (src / "cut.png").write_bytes((src / "good.png").read_bytes()[:300])
    (src / "random.png").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
    code = run([src], tmp_path / "out", workers=2)
    out = capsys.readouterr().out
    assert code == 1
    assert "written 2 samples in 1 shards" in out and "skipped 4" in out
    report = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert sorted(Path(line.split(": ", 1)[0]).name for line in report) == ["cut.jpg", "cut.png", "random.png", "zero.png"]
    samples = {s["json"]["source"]: s for s in read_shards(tmp_path / "out")}
    assert set(samples) == {"good.png", "good2.jpg"}
    np.testing.assert_array_equal(samples["good.png"]["gt.png"], good)


def test_max_count_and_max_size_split_shards_and_manifest_matches(tmp_path):
    src = tmp_path / "src"
    for i in range(7):
        put(src / f"{i}.png", rgb(8, 8))
    assert run([src], tmp_path / "out", max_count=3, prefix="train") == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1] and manifest["total"] == 7
    for entry in manifest["shards"]:
        data = (out / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    counts = {}
    for s in read_shards(out, "train"):
        counts[s["shard"]] = counts.get(s["shard"], 0) + 1
    assert [counts[e["file"]] for e in manifest["shards"]] == [3, 3, 1]
    assert sorted(p.name for p in out.iterdir()) == sorted([e["file"] for e in manifest["shards"]] + ["manifest.json"])

    big = tmp_path / "big"
    for i in range(7):
        put(big / f"{i}.png", rgb(40, 40))  # ~5 KB of incompressible PNG each
    assert run([big], tmp_path / "small", max_size=25_000) == 0
    shards = json.loads((tmp_path / "small" / "manifest.json").read_text())["shards"]
    assert len(shards) > 1 and sum(s["count"] for s in shards) == 7
    assert all((tmp_path / "small" / s["file"]).stat().st_size <= 25_000 for s in shards)


def test_write_order_is_a_seeded_shuffle(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        put(src / f"{i:02d}.png", rgb(4, 4))

    def order(seed: int, out: str) -> list[str]:
        assert run([src], tmp_path / out, seed=seed, max_count=5) == 0
        return [s["json"]["source"] for s in read_shards(tmp_path / out)]

    first, again, other = order(1, "a"), order(1, "b"), order(2, "c")
    assert sorted(first) == [f"{i:02d}.png" for i in range(12)]
    assert first == again and first != other and first != sorted(first)
    sums = [json.loads((tmp_path / d / "manifest.json").read_text())["shards"] for d in "ab"]
    assert [s["sha256"] for s in sums[0]] == [s["sha256"] for s in sums[1]]  # byte-identical reruns


def test_refuses_to_overwrite_and_overwrite_clears_old_shards(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        put(src / f"{i}.png", rgb(4, 4))
    out = tmp_path / "out"
    assert run([src], out, max_count=1) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run([src], out) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "\n" not in err.strip()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run([src], out, overwrite=True) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert len(read_shards(out)) == 3


def test_precrop_tiles_cover_the_image_including_edges(tmp_path):
    src = tmp_path / "src"
    big = put(src / "big.png", rgb(100, 70))
    small = put(src / "small.png", rgb(20, 20))
    assert run([src], tmp_path / "out", crop=32, stride=24) == 0
    samples = read_shards(tmp_path / "out")
    tiles = [s for s in samples if s["json"]["source"] == "big.png"]
    # y: 0, 24, 48 then 68 flush with the bottom; x: 0, 24 then 38 flush with the right edge.
    assert len(tiles) == 4 * 3
    covered = np.zeros((100, 70), bool)
    for t in tiles:
        y, x = t["json"]["crop"]
        assert t["json"]["size"] == [32, 32]
        np.testing.assert_array_equal(t["gt.png"], big[y : y + 32, x : x + 32])
        covered[y : y + 32, x : x + 32] = True
    assert covered.all()
    assert {tuple(t["json"]["crop"]) for t in tiles} >= {(68, 38), (0, 38), (68, 0)}
    (kept,) = [s for s in samples if s["json"]["source"] == "small.png"]
    assert kept["json"]["crop"] is None
    np.testing.assert_array_equal(kept["gt.png"], small)


def test_prep_sample_cli_builds_4_train_shards_and_1_val_shard(tmp_path):
    out = tmp_path / "sample"
    cmd = [sys.executable, "-m", "lit_restore.cli", "prep-sample", "--out", str(out), "--crop", "64",
           "--train-crops", "3", "--val-crops", "2", "--seed", "5"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    photos = load_photos()
    n = len(photos)
    assert n >= 4
    manifest = json.loads((out / "manifest.json").read_text())
    files = [s["file"] for s in manifest["shards"]]
    assert files == [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar"]
    train, val = read_shards(out, "train"), read_shards(out, "val")
    assert len(train) == 3 * n and len(val) == 2 * n and manifest["total"] == 5 * n
    sizes = [s["count"] for s in manifest["shards"][:4]]
    assert sum(sizes) == 3 * n and max(sizes) - min(sizes) <= 1
    # No pixel overlap: train crops end above each photo's val strip, val crops start inside it.
    heights = {f"skimage.data.{name}": fit_for_crops(img, 64).shape[0] for name, (img, _) in photos.items()}
    for split, samples in (("train", train), ("val", val)):
        for s in samples:
            assert s["gt.png"].shape == (64, 64, 3)
            h = heights[s["json"]["source"]]
            y = s["json"]["crop"][0]
            if split == "train":
                assert y + 64 <= h - val_strip_height(h, 64)
            else:
                assert y >= h - val_strip_height(h, 64)
    # Same seed, same shards; the command refuses to overwrite without --overwrite.
    assert prep_sample(str(tmp_path / "again"), 64, 3, 2, seed=5, overwrite=False) == 0
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert prep_sample(str(out), 64, 3, 2, seed=5, overwrite=False) == 2
