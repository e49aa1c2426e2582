"""`lit-restore prep-sample`: quickstart shards from the photos shipped with scikit-image.

Random square crops of a handful of real photos, written in the shard format of
`prep-shards` (`gt.png` + `json`). Train and val never share a pixel: val crops come from a
bottom strip of each photo (a quarter of its height, at least one crop tall), train crops from
the rest. Photos too small for both regions are first enlarged (bicubic). The train crops are
shuffled and split evenly over exactly `TRAIN_SHARDS` shards, so 2 ranks × 2 loader workers each
get a shard; the defaults match `config.py` (`data/sample/train-{000000..000003}.tar`,
`data/sample/val-000000.tar`). The output depends only on the arguments.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep.shards import PNG_LEVEL, ShardSink, UsageError, prepare_out, write_manifest
from lit_restore.data.images import encode_png

# Real photographs in skimage.data (`cat` is left out: it is the same picture as `chelsea`).
PHOTOS: tuple[str, ...] = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
)
TRAIN_SHARDS = 4
DATASET = "skimage"


def load_photos() -> dict[str, tuple[np.ndarray, str]]:
    """The available photos as uint8 RGB with their original PIL-style mode ("RGB" or "L")."""
    import skimage.data

    photos = {}
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception as e:  # a photo this scikit-image version lacks or cannot fetch offline
            print(f"prep-sample: leaving out {name} ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        mode = "L" if img.ndim == 2 else "RGB"
        photos[name] = (np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3], mode)
    return photos


def fit_for_crops(img: np.ndarray, crop: int) -> np.ndarray:
    """Enlarge a photo until a crop fits in both the train region and the val strip."""
    h, w = img.shape[:2]
    factor = max(2 * crop / h, crop / w, 1.0)
    if factor == 1.0:
        return img
    size = (math.ceil(w * factor), math.ceil(h * factor))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))


def val_strip_height(h: int, crop: int) -> int:
    return max(math.ceil(h / 4), crop)


def random_crops(img: np.ndarray, crop: int, count: int, y_range: tuple[int, int],
                 rng: np.random.Generator) -> list[tuple[int, int]]:
    """`count` top-left corners with y in [y_range[0], y_range[1]] and the crop inside the image."""
    w = img.shape[1]
    ys = rng.integers(y_range[0], y_range[1] + 1, size=count)
    xs = rng.integers(0, w - crop + 1, size=count)
    return [(int(y), int(x)) for y, x in zip(ys, xs)]


def make_samples(photos: dict[str, tuple[np.ndarray, str]], crop: int, per_photo: int, split: str,
                 seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    samples = []
    for name, (photo, mode) in photos.items():
        img = fit_for_crops(photo, crop)
        h = img.shape[0]
        strip = val_strip_height(h, crop)
        y_range = (0, h - strip - crop) if split == "train" else (h - strip, h - crop)
        for i, (y, x) in enumerate(random_crops(img, crop, per_photo, y_range, rng)):
            meta = {"source": f"skimage.data.{name}", "size": [crop, crop], "dataset": DATASET, "task": None,
                    "scale": 1, "crop": [y, x], "bit_depth": 8, "mode": mode}
            samples.append({
                "__key__": f"{name}_{split}_{i:04d}",
                "gt.png": encode_png(img[y : y + crop, x : x + crop], PNG_LEVEL),
                "json": json.dumps(meta, sort_keys=True).encode(),
            })
    return samples


def prep_sample(out: str, crop: int, train_crops: int, val_crops: int, seed: int, overwrite: bool) -> int:
    """Write train/val sample shards and manifest.json into `out`; returns the exit code."""
    out_dir = Path(out)
    try:
        if crop < 8 or train_crops < 1 or val_crops < 1:
            raise UsageError("--crop must be >= 8 and --train-crops/--val-crops >= 1")
        prepare_out(out_dir, ["train", "val"], overwrite)
    except UsageError as e:
        print(f"lit-restore prep-sample: error: {e}", file=sys.stderr)
        return 2
    photos = load_photos()
    if not photos:
        print("lit-restore prep-sample: error: none of the scikit-image sample photos could be loaded", file=sys.stderr)
        return 2

    train = make_samples(photos, crop, train_crops, "train", seed)
    np.random.default_rng([seed, 2]).shuffle(train)
    val = make_samples(photos, crop, val_crops, "val", seed)

    sink = ShardSink(out_dir, "train", max_count=len(train), max_size=2**62)
    for part in np.array_split(np.arange(len(train)), min(TRAIN_SHARDS, len(train))):
        for i in part:
            sink.write(train[i])
        sink.finish_shard()
    train_shards = sink.shards
    sink = ShardSink(out_dir, "val", max_count=len(val), max_size=2**62)
    for sample in val:
        sink.write(sample)
    sink.finish_shard()
    val_shards = sink.shards

    last = len(train_shards) - 1
    write_manifest(
        out_dir, train_shards + val_shards, dataset=DATASET, task=None, mode="clean",
        splits={"train": {"url": f"train-{{000000..{last:06d}}}.tar", "count": len(train)},
                "val": {"url": "val-000000.tar", "count": len(val)}},
        photos=list(photos), args={"crop": crop, "train_crops": train_crops, "val_crops": val_crops, "seed": seed},
    )
    print(f"written {len(train)} train crops in {len(train_shards)} shards and {len(val)} val crops "
          f"of {len(photos)} photos to {out_dir}")
    return 0
