"""What every stage shares: device-side degradation, the optimizer schedule, validation metrics,
image grids and throughput logging. Each stage file adds its networks, steps and exports."""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio
from torchvision.utils import make_grid, save_image

from lit_restore.config import RunConfig, to_dict
from lit_restore.data.degrade.suite import degrader_for
from lit_restore.data.degrade.types import DEGRADATION_TYPES, TYPES_KEY, align_type_rows, recorded_types
from lit_restore.guards import is_logging_step
from lit_restore.weights import WeightsError
from lit_restore.metrics import ssim


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, hold_steps: int = 0) -> float:
    """LR multiplier: linear warmup from 0, `hold_steps` at 1, then cosine from 1 down to
    `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = warmup_steps + hold_steps
    if step < start or total_steps <= start:
        return 1.0
    progress = min(1.0, (step - start) / (total_steps - start))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LRSchedule:
    """The LR multiplier of a step: `warmup_cosine`, as an object whose fields LambdaLR saves in
    checkpoints. A run resumed with another length (`trainer.max_steps` raised) goes on from the
    multiplier it had reached: from `from_step` on, a cosine from `from_factor` down to
    `min_lr_ratio` at the new `total_steps`, so the LR never jumps."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    hold_steps: int = 0
    from_step: int = -1  # ≥ 0 once the run was extended at that step
    from_factor: float = 1.0

    def __call__(self, step: int) -> float:
        if 0 <= self.from_step <= step:
            span = max(1, self.total_steps - self.from_step)
            progress = min(1.0, (step - self.from_step) / span)
            return self.min_lr_ratio + (self.from_factor - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.hold_steps)

    def extended(self, step: int, total_steps: int) -> "LRSchedule":
        """This schedule continued from `step` to a new `total_steps`."""
        return dataclasses.replace(self, total_steps=total_steps, from_step=step, from_factor=self(step))


def ema_decay_at(decay: float, warmup: bool, n: int) -> float:
    """The decay of the update after `n` updates: with `warmup`, min(decay, (1 + n)/(10 + n)),
    InstructPix2Pix's (CompVis LitEma) ramp, so early averages are not dominated by the initial weights."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


@torch.no_grad()
def ema_step(averaged: list[Tensor], current: list[Tensor], decay: float) -> None:
    """One EMA update: floating-point tensors move toward `current`; integer buffers (token ids,
    counters, BN's num_batches_tracked) are copied, since averaging and truncating them back
    corrupts them."""
    floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point() or a.is_complex()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - decay)
    for a, c in zip(averaged, current):
        if not (a.is_floating_point() or a.is_complex()):
            a.copy_(c)


def ema_multi_avg_fn(decay: float, warmup: bool) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """`AveragedModel(multi_avg_fn=...)` for Lightning's WeightAveraging callback: `ema_step`."""

    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        n = int(n_averaged) if warmup else 0  # AveragedModel has already synced on it (its n_averaged == 0 test)
        ema_step(averaged, current, ema_decay_at(decay, warmup, n))

    return update


class EMA(AveragedModel):
    """EMA of one sub-network, buffers included (BN running statistics follow the weights).

    The same state as torch's AveragedModel (`module.*`, `n_averaged`), but an update reads
    nothing on the host: AveragedModel checks `n_averaged` twice per update (two device syncs).
    The update count is read once per (re)start and then kept on the host."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False) -> None:
        super().__init__(module, use_buffers=True)
        self.decay, self.warmup = decay, warmup
        self._count: int | None = None
        self.requires_grad_(False)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self._count is None:
            self._count = int(self.n_averaged)
        if self._count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            ema_step(averaged, current, ema_decay_at(self.decay, self.warmup, self._count))
        self._count += 1
        self.n_averaged += 1


def make_ema(module: nn.Module, decay: float, warmup: bool = False) -> EMA:
    """An EMA copy of `module` (see `EMA`)."""
    return EMA(module, decay, warmup)


class Stage(L.LightningModule):
    """Base of every stage. Subclasses build networks in `configure_model` (idempotent, so FSDP
    can wrap them), implement `training_step` / `validation_step` and `export_modules`."""

    # A stage that keeps its own EMA of one sub-network sets this (so fit adds no EMA callback),
    # returns that sub-network from `ema_source` and calls `track_ema` in configure_model.
    manages_own_ema = False

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg)})
        self.degrader = degrader_for(cfg.degrade)
        self._degrader_compiled = False  # degrade.compile: its ops are compiled on the first batch
        self.resumed_step: int | None = None  # the step of the checkpoint a resume loaded
        # Per-image PSNR averaged over images (dim=(1,2,3)), the convention of restoration papers.
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        # Mean of per-image SSIM from lit_restore.metrics: the values `evaluate` reports (MATLAB's
        # definition; torchmetrics' SSIM averages a padded border in and differs on small crops).
        self.val_ssim = MeanMetric()
        self._train_generator: torch.Generator | None = None
        self._last_log_time: float | None = None
        self._images_since_log = 0
        self._corrupt_seen = 0
        self.ema: EMA | None = None

    # ------------------------------------------------------------------ batches

    def _is_training(self) -> bool:
        # Without a trainer (unit tests, notebooks) the module's train/eval mode decides.
        return self.trainer.training if self._trainer is not None else self.training

    def _step_seed(self) -> int:
        """A training seed of this run, rank and step."""
        return self.cfg.seed * 1_000_003 + self.global_rank * 7_919 + self.global_step

    def _degrade_generator(self, device: torch.device, keys: list[str]) -> torch.Generator:
        if self._is_training():
            if self._train_generator is None or self._train_generator.device != device:
                # Reseeded from the step a (re)start begins at, so a resumed run draws new degradations.
                self._train_generator = torch.Generator(device=device)
                self._train_generator.manual_seed(self._step_seed() % 2**63)
            return self._train_generator
        # Validation: the same degradation for the same samples on every run and rank.
        g = torch.Generator(device=device)
        g.manual_seed(self.cfg.seed + zlib.crc32(keys[0].encode()))
        return g

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        # Counted on the host batch: after the transfer, reading it would wait for the device.
        if "n_corrupt" in batch and self._is_training():
            self._corrupt_seen += int(batch["n_corrupt"].sum())
        return batch

    def degrade(self, gt: torch.Tensor, **kwargs) -> tuple:
        """The Degrader, its ops compiled when `degrade.compile` is set."""
        if self.cfg.degrade.compile and not self._degrader_compiled:
            self.degrader.compile_ops()
            self._degrader_compiled = True
        return self.degrader(gt, **kwargs)

    def _counts_seed(self, keys: list[str]) -> int:
        """The host seed of the Degrader's per-op sample counts: from the batch's keys (and the
        step, in training), so validation batches are sized the same on every run."""
        keyed = zlib.crc32("\n".join(keys).encode())
        if self._is_training():
            return (self._step_seed() << 32) + keyed
        return self.cfg.seed + keyed

    def clean_batch(self, batch: dict) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(gt in [0,1], keys, valid) of a transferred batch."""
        gt = batch["gt"].float().div_(255.0)
        valid = batch.get("valid")
        if valid is None:
            valid = torch.ones(gt.shape[0], dtype=torch.bool, device=gt.device)
        return gt, list(batch["key"]), valid.to(torch.bool)

    @torch.no_grad()
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        gt, keys, valid = self.clean_batch(batch)
        generator = self._degrade_generator(gt.device, keys)
        # Degradations in fp32 whatever the training precision (half-precision blur/JPEG drift).
        with torch.autocast(device_type=gt.device.type, enabled=False):
            lq, label, types, params = self.degrade(
                gt, generator=generator, depth=batch.get("depth"), has_depth=batch.get("has_depth"),
                counts_seed=self._counts_seed(keys),
            )
        if "lq" in batch:  # paired real samples keep their own lq and task label
            real = batch["has_lq"].to(torch.bool)
            lq = torch.where(real[:, None, None, None], batch["lq"].float().div_(255.0), lq)
            real_label = batch["label"].clamp(min=0)
            label = torch.where(real, real_label, label)
            real_types = F.one_hot(real_label, len(DEGRADATION_TYPES)).to(torch.bool)
            types = torch.where(real[:, None], real_types, types)
        return {
            "gt": gt,
            "lq": lq.contiguous(),
            "label": label,
            "types": types,
            "params": params,
            "key": keys,
            "valid": valid,
        }

    # ------------------------------------------------------------------ EMA of one sub-network

    def ema_source(self) -> nn.Module | None:
        """The sub-network a `manages_own_ema` stage averages."""
        return None

    def track_ema(self, module: nn.Module) -> None:
        """Start an EMA copy of `module` when optim.ema_decay > 0."""
        if self.cfg.optim.ema_decay > 0:
            self.ema = make_ema(module, self.cfg.optim.ema_decay, self.cfg.optim.ema_warmup)

    def averaged(self, module: nn.Module) -> nn.Module:
        """The EMA copy of `module` when there is one, else `module` itself."""
        return self.ema.module if self.ema is not None else module

    # ------------------------------------------------------------------ optimisation

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lr_schedule(self) -> LRSchedule:
        o = self.cfg.optim
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        return LRSchedule(warmup_steps=o.warmup_steps, total_steps=total, min_lr_ratio=o.min_lr_ratio,
                          hold_steps=o.hold_steps)

    def configure_optimizers(self):
        o = self.cfg.optim
        # Fused: one kernel for the whole update, and it takes the NaN guard's verdict on the
        # device (NonFiniteGuard), so a skipped step needs no host read.
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay,
            fused=True,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _extend_schedule(self, checkpoint: dict) -> None:
        """A checkpoint resumed with another run length: its saved schedule goes on from the
        multiplier it had reached (LRSchedule) instead of jumping to the new length's curve."""
        if self._trainer is None or self.trainer.max_steps <= 0:  # epoch-based lengths: left as Lightning restores them
            return
        step = int(checkpoint.get("global_step", 0))
        current = self.lr_schedule()
        trained = (checkpoint.get("hyper_parameters") or {}).get("config", {}).get("trainer", {}).get("max_steps")
        for scheduler in checkpoint.get("lr_schedulers") or []:
            lambdas = scheduler.get("lr_lambdas") if isinstance(scheduler, dict) else None
            for saved in lambdas or []:
                if not isinstance(saved, dict):
                    continue
                # Checkpoints from before LRSchedule saved no fields: their length is the run's max_steps.
                fields = saved if "total_steps" in saved else {"total_steps": trained} if isinstance(trained, int) else {}
                old = dataclasses.replace(current, **{k: v for k, v in fields.items() if k in vars(current)})
                if old.total_steps != current.total_steps and old.total_steps > 0:
                    saved.clear()
                    saved.update(vars(old.extended(step, current.total_steps)))
                    rank_zero_info(f"LR schedule: trained for {old.total_steps} steps, now {current.total_steps}; "
                                   f"from step {step} the cosine goes on from ×{old(step):.3g} of optim.lr")

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TYPES_KEY] = list(DEGRADATION_TYPES)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume with a longer run extends the LR schedule (`_extend_schedule`). Rows indexed by
        degradation type follow this install's types (a checkpoint made before an op was added
        still resumes); a trained type classifier cannot, as its optimizer state has the old rows:
        that stops the run in one line."""
        self.resumed_step = int(checkpoint.get("global_step", 0))
        self._extend_schedule(checkpoint)
        saved = recorded_types(checkpoint.get(TYPES_KEY), "checkpoint")
        if saved == DEGRADATION_TYPES:
            return
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise WeightsError(f"checkpoint: trained with degradation types {', '.join(saved)}; a sharded "
                               "checkpoint cannot be resumed with other types")
        changed = align_type_rows(state, saved, self.state_dict(), "checkpoint")
        trained = set(changed) & {name for name, p in self.named_parameters() if p.requires_grad}
        if trained and checkpoint.get("optimizer_states"):
            added = [t for t in DEGRADATION_TYPES if t not in saved]
            change = f"adds {', '.join(added)}" if added else "orders them otherwise"
            raise WeightsError(f"checkpoint: {sorted(trained)[0]} was trained for the degradation types "
                               f"{', '.join(saved)}; this install {change}, and its optimizer state cannot follow: "
                               "resume with those types, or train a new run")

    # ------------------------------------------------------------------ logging

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._images_since_log += batch["gt"].shape[0] * self.trainer.world_size
        # Host values are logged only on logging steps: logging a Python number copies it to the
        # device, which waits for the queued work.
        if is_logging_step(self.trainer):
            # Images over the time since the previous logging step: includes data wait, so it is
            # the real throughput.
            now = time.perf_counter()
            if self._last_log_time is not None:
                rate = self._images_since_log / max(now - self._last_log_time, 1e-9)
                self.log("train/images_per_sec", float(rate), rank_zero_only=True)
            self._last_log_time, self._images_since_log = now, 0
            self.log("data/corrupt_samples", float(self._corrupt_seen), rank_zero_only=True)
        if self.ema is not None:
            self.ema.update_parameters(self.ema_source())

    def sync_batchnorm(self, module: nn.Module, wanted: bool) -> nn.Module:
        """`module` with SyncBatchNorm layers when `wanted` and the run has more than one GPU
        process (per-device batches of 8-16 give noisy BatchNorm statistics and let a MoCo key
        encoder's BN leak batch identity); torch's DDP refuses SyncBatchNorm on CPU."""
        if wanted and self.ranks[1] > 1 and self.trainer.strategy.root_device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module

    @property
    def ranks(self) -> tuple[int, int]:
        """(this process's rank, the number of processes); (0, 1) outside a Trainer."""
        return (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """`train/loss` every step (a device tensor: no host read), and `loss` in the progress bar
        on logging steps only: Lightning reads progress-bar values on the host after every step."""
        self.log("train/loss", loss)
        if self._trainer is not None and is_logging_step(self.trainer):
            self.log("loss", loss, prog_bar=True, logger=False)

    def on_train_epoch_start(self) -> None:
        self._last_log_time, self._images_since_log = None, 0

    def log_restoration_metrics(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Accumulate val PSNR/SSIM over the valid samples (padding samples are ignored)."""
        pred = pred.detach().float().clamp(0, 1)
        gt = gt.float()
        if valid is not None and not bool(valid.all()):
            pred, gt = pred[valid], gt[valid]
        if pred.shape[0] == 0:
            return
        self.val_psnr.update(pred, gt)
        self.val_ssim.update(ssim(pred, gt).float())

    def on_validation_epoch_end(self) -> None:
        if self.val_psnr.update_called:
            self.log("val/psnr", self.val_psnr.compute(), sync_dist=False, prog_bar=True)  # the latest on the bar
            self.log("val/ssim", self.val_ssim.compute(), sync_dist=False)
        self.val_psnr.reset()
        self.val_ssim.reset()

    def log_image_grid(self, name: str, rows: list[torch.Tensor], max_images: int = 4) -> Path | None:
        """One picture: each tensor of `rows` is a row of images. Written to out_dir/samples and the logger."""
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        images = [r[:max_images].detach().float().clamp(0, 1).cpu() for r in rows]
        size = images[0].shape[-2:]
        images = [F.interpolate(x, size=size, mode="nearest") if x.shape[-2:] != size else x for x in images]
        images = [x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in images]
        grid = make_grid(torch.cat(images), nrow=images[0].shape[0], padding=2, pad_value=1.0)
        step = self.logged_step()
        path = Path(self.cfg.out_dir) / "samples" / f"{name.replace('/', '_')}_step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        save_image(grid, tmp)
        os.replace(tmp, path)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=name, images=[grid], step=step)
        return path

    def logged_step(self) -> int:
        """The step Lightning's loggers put on what is logged now: a validation after N optimizer
        steps logs its metrics at step N − 1, so its samples carry the same number as its CSV row
        and W&B point. `global_step` outside a fit."""
        if self._trainer is None:
            return self.global_step
        loop = getattr(self.trainer.fit_loop, "epoch_loop", None)
        return int(getattr(loop, "_batches_that_stepped", self.global_step))

    # ------------------------------------------------------------------ export

    def prepare_export(self) -> None:
        """Called by export after the checkpoint's weights are loaded, before files are written."""

    def export_modules(self) -> dict[str, nn.Module]:
        """Inference modules to export, by name."""
        raise NotImplementedError(f"{type(self).__name__} does not define export_modules()")
