"""`ShardDataModule`: the training and validation loaders of every stage, DDP-safe.

Every rank yields exactly `data.steps_per_epoch` training batches per loader epoch and the same
number of validation batches (see `lit_restore/data/shards.py` for how), so collectives never
fall out of step. Training length is step-based (`trainer.max_steps`); a loader epoch is a
"virtual epoch" and the loader has no `__len__`.

Resuming: the training stream is seeded from `(seed, rank, worker, restart, loader epoch)`.
`fit` calls `set_restart(n)` before `trainer.fit` with a number that differs between
(re)starts of the same run; the resumed global step is the natural choice. Without a call, the
loader uses the trainer's `global_step` when it builds the loader (Lightning restores the step
before it asks for loaders), so a requeued job draws a fresh stream instead of replaying the
samples it trained on before the preemption.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import lightning as L
import torch.distributed as dist
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn

from lit_restore.config import DataConfig, Source
from lit_restore.data.shards import (CorruptDataError, TrainStream, ValStream, check_local_shards, expand_urls, is_local,
                                     make_loader, shard_count)


def _expand(sources: list[Source], split: str) -> list[tuple[list[str], float]]:
    out = []
    for i, src in enumerate(sources):
        urls = expand_urls(src.url)
        check_local_shards(urls, f"data.{split}[{i}].url={src.url}", f"data.{split}" if len(sources) == 1 else
                           f"data.{split}[{i}].url")
        out.append((urls, float(src.weight)))
    return out


def incomplete_shard_sets(urls: list[str]) -> list[str]:
    """One line per local shard folder that looks unfinished: no `manifest.json` (prep-shards
    writes it last, so a killed run leaves none), or a manifest listing shards that are not there."""
    notes = []
    for folder in sorted({os.path.dirname(u) or "." for u in urls if is_local(u)}):
        manifest = os.path.join(folder, "manifest.json")
        if not os.path.isfile(manifest):
            notes.append(f"{folder} has no manifest.json: if prep-shards wrote it, it did not finish (rerun it "
                         "with --overwrite)")
            continue
        try:
            listed = [e["file"] for e in json.loads(open(manifest, "rb").read())["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # the loader reports an unreadable manifest itself
        missing = [f for f in listed if not os.path.isfile(os.path.join(folder, os.path.basename(str(f))))]
        if missing:
            notes.append(f"{folder}: {len(missing)} of the {len(listed)} shards its manifest.json lists are missing "
                         f"(e.g. {missing[0]})")
    return notes


class ShardDataModule(L.LightningDataModule):
    """Loaders over the shards of `cfg.train` (resampled, weighted) and `cfg.val` (in order, once)."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.restart: Optional[int] = None
        self._train_builds = 0  # a rebuilt loader (reload_dataloaders_every_n_epochs) must not replay
        self._val_shards: Optional[list[tuple[str, int]]] = None

    def check_sources(self) -> None:
        """Every local shard the train and val patterns name exists (one-line error otherwise):
        checked before the networks are built, not when the first loader starts. A local shard
        folder that looks unfinished (`incomplete_shard_sets`) gets a warning."""
        for split in ("train", "val"):
            for note in incomplete_shard_sets([u for urls, _ in _expand(getattr(self.cfg, split), split) for u in urls]):
                rank_zero_warn(f"data.{split}: {note}")

    def set_restart(self, n: int) -> None:
        """Reseed the training stream for the n-th (re)start; call before the loaders are built."""
        self.restart = int(n)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_stream(self) -> TrainStream:
        rank, _ = self._rank_world()
        restart = self.restart
        if restart is None:
            restart = self.trainer.global_step if self.trainer is not None else 0
        c = self.cfg
        self._train_builds += 1
        return TrainStream(
            _expand(c.train, "train"), batch_size=c.batch_size, crop=c.crop, steps=c.steps_per_epoch,
            shuffle_buffer=c.shuffle_buffer, max_corrupt_fraction=c.max_corrupt_fraction, max_pixels=c.max_pixels,
            network=c.network, seed=self.seed, rank=rank, restart=restart, build=self._train_builds,
        )

    def val_stream(self) -> ValStream:
        if self._val_shards is None:  # counted once: the val shards do not change during a run
            urls = [u for urls, _ in _expand(self.cfg.val, "val") for u in urls]
            self._val_shards = [(u, shard_count(u, self.cfg.network)) for u in urls]
            if sum(n for _, n in self._val_shards) == 0:
                raise CorruptDataError(f"data.val: the shards hold no samples ({urls[0]} ...)")
        rank, world = self._rank_world()
        c = self.cfg
        return ValStream(
            self._val_shards, batch_size=c.val_batch_size or c.batch_size, crop=c.val_crop or c.crop,
            max_corrupt_fraction=c.max_corrupt_fraction, max_pixels=c.max_pixels, network=c.network,
            rank=rank, world=world,
        )

    def train_dataloader(self) -> wds.WebLoader:
        return make_loader(self.train_stream(), self.cfg.num_workers)

    def val_dataloader(self) -> wds.WebLoader:
        return make_loader(self.val_stream(), self.cfg.num_workers)
