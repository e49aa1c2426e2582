"""`data:`: the shard sources, batch, crops and loader workers."""

from __future__ import annotations

from dataclasses import dataclass, field



SAMPLE_DIR = "data/sample"


@dataclass
class Source:
    """One shard source: a URL pattern (brace expansion allowed) and its sampling weight."""

    url: str = "???"
    weight: float = 1.0


@dataclass
class NetworkConfig:
    """Reading http(s):// shards. A shard that fails is counted like a damaged one
    (`max_corrupt_fraction`), and a run whose shards keep failing stops in one line."""

    connect_timeout: float = 30.0  # seconds to connect and get the response's headers
    stall_timeout: float = 60.0  # seconds without a byte before the shard is given up
    # More tries of a shard whose server refused, timed out before answering or answered 429/5xx
    # (1, 2, 4, ... s apart); other 4xx (404) fail at once. A shard lost mid-stream is not retried.
    retries: int = 3


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    # Training sources, sampled with replacement in proportion to `weight`. A plain string on
    # the command line (`data.train=shards/train-{000000..000099}.tar`) means one source.
    train: list[Source] = field(default_factory=lambda: [Source(f"{SAMPLE_DIR}/train-{{000000..000003}}.tar")])
    # Validation sources, read once each, in order, split across ranks.
    val: list[Source] = field(default_factory=lambda: [Source(f"{SAMPLE_DIR}/val-000000.tar")])
    batch_size: int = 8  # per device; training batches are always full
    val_batch_size: int = 0  # 0 = same as batch_size; short ranks pad with rows marked valid=False
    num_workers: int = 2  # loader processes per device (0: load in the training process)
    crop: int = 128  # square training crop, taken jointly from lq/gt/depth; smaller images are reflect-padded
    val_crop: int = 0  # centre crop for validation; 0 = same as crop
    shuffle_buffer: int = 500  # samples held (as encoded bytes) for shuffling; 0 or 1 = no shuffle
    # A "virtual epoch": exactly this many batches per rank between loader restarts, split over
    # the workers (the first `steps_per_epoch % num_workers` workers make one more).
    steps_per_epoch: int = 500
    max_corrupt_fraction: float = 0.05  # stop the run when more samples than this are unreadable (checked after 100)
    # Images (gt, lq) with more pixels than this are skipped as corrupt, checked from the file
    # header before decoding: a small PNG can decode to gigabytes in a loader worker. 40 MP is
    # 120 MB as 8-bit RGB, a few times that while decoding and resizing.
    max_pixels: int = 40_000_000
    network: NetworkConfig = field(default_factory=NetworkConfig)
