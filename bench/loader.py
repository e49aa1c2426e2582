"""Loader throughput: one loader worker vs plain PIL decoding of the same PNGs.

Writes shards of random crops of scikit-image's sample photos (or reads `--shards`), then times

* loader: the training pipeline in ONE worker process (resampled shard reading, shuffle buffer
  of encoded bytes, PNG decode, random crop + dihedral transform, uint8 batch collation),
* raw: read each gt.png file, `PIL.Image.open`, `np.asarray`, in the main process,

and prints samples/s for both and their ratio (the floor is 0.90). Crop, batch size and shuffle
buffer default to the `DataConfig` defaults. Runs alternate and the medians are printed, because
on a shared machine a single run mostly measures the neighbours.

    python bench/loader.py [--count 400] [--size 256] [--crop 128] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from lit_restore.config import DataConfig
from lit_restore.data.shards import TrainStream, make_loader

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def write_bench_shards(out: Path, count: int, size: int, per_shard: int = 100) -> list[Path]:
    """Random size×size crops of the sample photos, as shards and as loose PNG files."""
    rng = np.random.default_rng(0)
    photos = [np.asarray(getattr(skdata, name)())[..., :3] for name in PHOTOS]
    photos = [p for p in photos if min(p.shape[:2]) >= size]
    files = []
    (out / "png").mkdir(parents=True, exist_ok=True)
    for start in range(0, count, per_shard):
        with wds.TarWriter(str(out / f"bench-{start // per_shard:06d}.tar")) as w:
            for i in range(start, min(start + per_shard, count)):
                photo = photos[i % len(photos)]
                y = int(rng.integers(0, photo.shape[0] - size + 1))
                x = int(rng.integers(0, photo.shape[1] - size + 1))
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(photo[y : y + size, x : x + size])).save(buf, format="PNG", compress_level=3)  # as data_prep writes
                files.append(out / "png" / f"{i:06d}.png")
                files[-1].write_bytes(buf.getvalue())
                w.write({"__key__": f"{i:06d}", "gt.png": buf.getvalue(), "json": json.dumps({"dataset": "bench"}).encode()})
    return files


def raw_rate(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        np.asarray(Image.open(io.BytesIO(f.read_bytes())))
    return len(files) / (time.perf_counter() - start)


def loader_rate(urls: list[str], samples: int, crop: int, batch: int, shuffle: int) -> float:
    # Shards are resampled, so the loader can run past the image count: the shuffle buffer fills
    # up to its size during the first `shuffle` samples, and steady state comes after that.
    warmup = shuffle // batch + 1
    stream = TrainStream([(urls, 1.0)], batch_size=batch, crop=crop, steps=warmup + samples // batch,
                         shuffle_buffer=shuffle, max_corrupt_fraction=0.0)
    it = iter(make_loader(stream, 1))
    for _ in range(warmup):  # worker start-up and the shuffle buffer's fill are not throughput
        next(it)
    start = time.perf_counter()
    n = sum(b["gt"].shape[0] for b in it)
    return n / (time.perf_counter() - start)


def main() -> None:
    defaults = DataConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=400, help="images to write")
    p.add_argument("--size", type=int, default=256, help="image size")
    p.add_argument("--crop", type=int, default=defaults.crop, help="training crop")
    p.add_argument("--batch", type=int, default=defaults.batch_size)
    p.add_argument("--shuffle", type=int, default=defaults.shuffle_buffer, help="shuffle buffer (samples)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each measurement; the median is printed")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_bench_shards(Path(tmp), a.count, a.size)
        urls = sorted(str(u) for u in Path(tmp).glob("bench-*.tar"))
        raw, loader = [], []
        for _ in range(a.repeats):  # interleaved, so load on a shared machine hits both alike
            raw.append(raw_rate(files))
            loader.append(loader_rate(urls, 2 * a.count, a.crop, a.batch, a.shuffle))
    r, l = statistics.median(raw), statistics.median(loader)
    print(f"images: {a.count} PNG {a.size}x{a.size}, crop {a.crop}, batch {a.batch}, shuffle buffer {a.shuffle}")
    print(f"loader (1 worker): {l:.0f} samples/s  raw PIL decode: {r:.0f} samples/s  ratio: {l / r:.2f}")


if __name__ == "__main__":
    main()
