"""Stream shards the way training and evaluation do and print one JSON outcome per shard.

`python tests/_stream_shards.py SHARD...`: for each shard, the training stream (3 batches of 2)
and what evaluate reads (its real tasks, then `iter_samples`) give "ok" (3 full batches; the reader reached the end), "corrupt" (the corrupt-data stop) or
"error: <type>: <message>" for anything else. Run in a subprocess with a timeout, so a hang
fails the caller instead of blocking it.
"""

from __future__ import annotations

import json
import logging
import sys

from lit_restore.data.degrade.suite import survey_shards
from lit_restore.data.shards import CorruptDataError, TrainStream, iter_samples, make_loader

logging.disable(logging.WARNING)  # the skip notes of thousands of corrupt samples


def outcome(run) -> str:
    try:
        run()
    except CorruptDataError:
        return "corrupt"
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    return "ok"


def train(shard: str) -> None:
    stream = TrainStream([([shard], 1.0)], batch_size=2, crop=8, steps=3, shuffle_buffer=0, max_corrupt_fraction=0.5)
    got = list(make_loader(stream, 0))
    assert len(got) == 3 and all(b["gt"].shape == (2, 3, 8, 8) for b in got), "short or malformed batches"


def ordered(shard: str) -> None:
    """What `evaluate` reads: the real tasks of the shard, then its samples in order."""
    survey_shards(shard)
    for s in iter_samples(shard, max_corrupt_fraction=0.5):
        assert s["gt"].ndim == 3 and s["gt"].shape[2] == 3, "malformed sample"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps({"shard": path, "train": outcome(lambda: train(path)), "ordered": outcome(lambda: ordered(path))}),
              flush=True)
