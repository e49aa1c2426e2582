"""`lit-restore fit`: setup → trainer (strategy, callbacks, logger, resume) → fit, for any stage.

Restarts: `resume: auto` starts from the newest of the run dir's hpc checkpoints and
`checkpoints/last.ckpt`, so a requeued SLURM job, a killed local run and a plain rerun of the same
command all continue where the run stopped. Everything a restart needs lives in `out_dir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, WeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lit_restore.checkpointing import (
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    RunState,
    RunTerminated,
    StepCheckpoint,
    prune_hpc,
    remove_stale_temporaries,
    resume_path,
)
from lit_restore.config import ConfigError, RunConfig, UserError, to_yaml
from lit_restore.guards import NonFiniteGuard, NonFiniteLossError
from lit_restore.rundir import RunDirLock, check_same_model
from lit_restore.stages.base import Stage, ema_multi_avg_fn


def build_stage(cfg: RunConfig) -> Stage:
    """The stage's LightningModule. An explicit chain: each stage is one file in lit_restore/stages."""
    if cfg.stage == "autoencoder":
        from lit_restore.stages.autoencoder import AutoencoderStage

        return AutoencoderStage(cfg)
    if cfg.stage == "biqa":
        from lit_restore.stages.biqa import BIQAStage

        return BIQAStage(cfg)
    if cfg.stage == "constyle":
        from lit_restore.stages.constyle import ConStyleStage

        return ConStyleStage(cfg)
    if cfg.stage == "restorer":
        from lit_restore.stages.restorer import RestorerStage

        return RestorerStage(cfg)
    if cfg.stage == "ldm":
        from lit_restore.stages.ldm import LDMStage

        return LDMStage(cfg)
    if cfg.stage == "scm":
        from lit_restore.stages.scm import SCMStage

        return SCMStage(cfg)
    raise ValueError(f"unknown stage {cfg.stage!r}")


def build_on_meta(cfg: RunConfig) -> Stage:
    """The stage with the networks it trains built on the meta device: shapes without memory.
    Pretrained sources are resolved to their architectures only (an open_clip tag, a diffusers
    folder's or model id's config.json); no weights are downloaded or read."""
    with torch.device("meta"):
        stage = build_stage(cfg)
        stage.configure_model()
    return stage


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(parameters, trainable parameters) of `module`."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_table(module: nn.Module, depth: int = 2) -> str:
    """Parameter counts of `module`'s submodules that hold parameters, down to `depth` levels, and the total."""
    counted = [("  " * name.count(".") + name, *parameter_counts(sub)) for name, sub in module.named_modules()
               if name and name.count(".") < depth]
    rows = [row for row in counted if row[1] > 0]
    rows.append(("total", *parameter_counts(module)))
    width = max(len(row[0]) for row in rows)
    lines = [f"{'module':<{width}}  {'parameters':>13}  {'trainable':>13}"]
    lines += [f"{name:<{width}}  {total:>13,}  {trainable:>13,}" for name, total, trainable in rows]
    return "\n".join(lines)


def wandb_run_id(out_dir: str | Path) -> str:
    """The run dir's W&B id, created on first use. Written before `fit`, so a requeued or resumed
    job (same out_dir) logs into the same W&B run. Only global rank 0 writes; W&B runs on it alone."""
    path = Path(out_dir) / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".wandb_id.{os.getpid()}")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id


def build_loggers(cfg: RunConfig) -> Union[list[Any], bool]:
    out = Path(cfg.out_dir)
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        from lit_restore.csvlog import RunCSVLogger

        return [RunCSVLogger(save_dir=out)]  # logs/version_0/metrics.csv, one history across restarts
    from lightning.pytorch.loggers import WandbLogger

    # Offline/disabled through WANDB_MODE; the API key stays wandb's business (env or netrc).
    w = cfg.wandb
    return [WandbLogger(project=w.project, entity=w.entity, tags=list(w.tags), name=w.name, save_dir=str(out),
                        id=wandb_run_id(out))]


def build_callbacks(cfg: RunConfig, stage: Stage) -> list[L.Callback]:
    c = cfg.checkpoint
    out = Path(cfg.out_dir)
    callbacks: list[L.Callback] = [
        RunState(),
        NonFiniteGuard(c.on_nan, c.max_skipped_in_row, out / "checkpoints"),
        PreemptionCheckpoint(out, keep_hpc=c.keep_hpc, requeue=SLURMEnvironment.detect(), poll_steps=c.preempt_poll_steps,
                             grace=c.signal_grace),
        StepCheckpoint(out / "checkpoints", every_n_steps=c.every_n_steps, keep=c.keep),
    ]
    if cfg.logger != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    callbacks.append(RunSummary(out))
    if cfg.optim.ema_decay > 0 and not stage.manages_own_ema:
        if trainer_strategy_name(cfg) in ("fsdp", "modelparallel"):
            raise ConfigError(f"optim.ema_decay: Lightning's EMA callback does not work with sharded models "
                              f"(trainer.strategy={trainer_strategy_name(cfg)}); use ddp or optim.ema_decay=0")
        # WeightAveraging updates after every optimizer step; our averaging function instead of
        # EMAWeightAveraging's, which averages integer buffers too (token ids).
        callbacks.append(WeightAveraging(multi_avg_fn=ema_multi_avg_fn(cfg.optim.ema_decay, cfg.optim.ema_warmup)))
    return callbacks


class StepProgressBar(RichProgressBar):
    """Rich progress bar counting optimizer steps of `trainer.max_steps` across the streaming
    loader's virtual epochs (Lightning's counts batches of one epoch of `max_epochs - 1`, which
    reads "Epoch 0/-2" with max_epochs=-1)."""

    @property
    def total_train_batches(self) -> Union[int, float]:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_progress_bar_id is None:  # one bar for the whole run, not one per loader epoch
            super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: always 0 here, one history per run dir
        return metrics


class RunSummary(L.Callback):
    """What a researcher wants from a run's console: each validation's headline figure as it
    comes, and at the end one summary (steps, time, last and best validation figure, where the
    checkpoints, samples and log are). Global rank 0 only."""

    HEADLINE = ("val/psnr", "val/acc", "val/contrastive_acc", "val/loss")  # the first a stage logs
    HIGHER_IS_BETTER = {"val/psnr": True, "val/acc": True, "val/contrastive_acc": True, "val/loss": False}

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.history: list[tuple[int, str, float]] = []  # (step, metric, value)
        self.start_step, self.start_time = 0, 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_time = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step  # after a resume's checkpoint was loaded

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        key = next((k for k in self.HEADLINE if k in metrics), None)
        if key is not None:
            self.history.append((trainer.global_step, key, float(metrics[key])))
            rank_zero_info(f"step {trainer.global_step}: {key} {float(metrics[key]):.4g}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        steps = trainer.global_step - self.start_step
        seconds = time.perf_counter() - self.start_time
        lines = [f"trained {steps} step(s) ({self.start_step} → {trainer.global_step}) in {seconds:.0f} s"]
        if self.history:
            step, key, last = self.history[-1]
            pick = max if self.HIGHER_IS_BETTER[key] else min
            best_step, _, best = pick(self.history, key=lambda h: h[2])
            lines.append(f"{key}: last {last:.4g} (step {step}), best since this start {best:.4g} (step {best_step})")
        lines.append(f"checkpoints: {self.out_dir / 'checkpoints'} (last.ckpt resumes and exports)")
        if (self.out_dir / "samples").is_dir():
            lines.append(f"samples: {self.out_dir / 'samples'}")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                lines.append(f"log: {Path(logger.log_dir) / 'metrics.csv'}")
        rank_zero_info("\n".join(lines))


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines (litlogger, litmodels): the run's logger and checkpoints are chosen explicitly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


# Lightning warnings about this project's design, not the user's run: stages transfer batches in
# their own hooks on purpose, a resumed run dir holds checkpoints, and LeafSpec is Lightning's own
# use of a deprecated torch name.
EXPECTED_WARNINGS = (
    r"You have overridden `on_(before|after)_batch_transfer` in `LightningModule` but have passed in a",
    r"Checkpoint directory .* exists and is not empty",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def quiet_lightning_tips() -> None:
    """Silence Lightning's advice that does not apply to this run: the package tips and the
    EXPECTED_WARNINGS always, and the "srun is available but not used" hint outside a SLURM job
    (a login node or a workstation with SLURM's tools installed). Other warnings still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)  # where Lightning's rank_zero_info writes
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")


def trainer_strategy_name(cfg: RunConfig) -> str:
    strategy = cfg.trainer.get("strategy", "auto")
    return strategy if isinstance(strategy, str) else "auto"


def shard_trainable_children(module: nn.Module, mesh) -> list[str]:
    """FSDP2: `fully_shard` every direct child of `module` that has trainable parameters (frozen
    towers stay replicated). Returns the sharded children's names."""
    from torch.distributed.fsdp import fully_shard

    loose = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if loose:
        raise ValueError(f"modelparallel: trainable parameters directly on {type(module).__name__}: {loose}; "
                         "put them in a submodule")
    sharded = []
    for name, child in module.named_children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
            sharded.append(name)
    return sharded


class FSDP2Strategy(ModelParallelStrategy):
    """Data parallelism with FSDP2 (`fully_shard`) for any stage: after the stage's
    `configure_model`, each child holding trainable parameters is sharded over all ranks.
    Checkpoints are gathered to one full file, so they resume at any world size and load
    without FSDP. Runs on CPU with gloo."""

    def __init__(self, backend: Optional[str] = None) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=backend)

    def setup_environment(self) -> None:
        # Pure data parallelism: every process is one shard ("auto" would mean one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        names = shard_trainable_children(self.lightning_module, self.device_mesh["data_parallel"])
        rank_zero_info(f"FSDP2: sharded {', '.join(names)}")
        super().setup(trainer)


def on_cpu(cfg: RunConfig) -> bool:
    accelerator = cfg.trainer.get("accelerator", "auto")
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def local_processes(cfg: RunConfig) -> int:
    """Training processes sharing this machine's cores: one per device, unless the process is
    already bound to its own cores (SLURM --cpus-per-task with task affinity)."""
    from lit_restore.threads import available_cores

    if available_cores() < (os.cpu_count() or 1):
        return 1
    devices = cfg.trainer.get("devices", 1)
    if devices == "auto":
        return 1
    return len(devices) if isinstance(devices, (list, tuple)) else max(1, int(devices))


def build_strategy(cfg: RunConfig) -> Union[str, Strategy]:
    """`trainer.strategy`: Lightning's names pass through (auto = DDP when several devices);
    `fsdp` = FSDP for the LDM UNet, `modelparallel` = FSDP2 for any stage (CPU too)."""
    name = trainer_strategy_name(cfg)
    if name == "fsdp":
        if cfg.stage != "ldm":
            raise ConfigError(f"trainer.strategy: fsdp wraps diffusers UNet blocks, only for stage ldm "
                              f"(stage is {cfg.stage}); use ddp or modelparallel")
        from diffusers import AutoencoderKL
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        # The frozen VAE is a unit of its own: one flat parameter holds one dtype, and the VAE is
        # kept in model.frozen_dtype while the UNet trains in fp32.
        units = {BasicTransformerBlock, ResnetBlock2D, AutoencoderKL}
        # No activation checkpointing here: model.grad_checkpointing turns on the UNet's own
        # (opt-in, it costs one more UNet forward per step).
        # Full state dict: one checkpoint file, resumable at any world size and exportable as is.
        return FSDPStrategy(auto_wrap_policy=units, state_dict_type="full")
    if name == "modelparallel":
        return FSDP2Strategy(backend="gloo" if on_cpu(cfg) else None)
    if cfg.stage in QUEUE_STAGES and (name == "ddp" or (name == "auto" and is_multiprocess(cfg))):
        # The MoCo queue is identical on every rank by construction (gathered enqueue); DDP's
        # default re-broadcast of rank 0's buffers would resend the whole queue every step.
        return DDPStrategy(broadcast_buffers=False)
    return cfg.trainer.get("strategy", "auto")


# Stages whose modules hold a MoCo queue buffer.
QUEUE_STAGES = ("constyle", "restorer")


def is_multiprocess(cfg: RunConfig) -> bool:
    devices = cfg.trainer.get("devices", 1)
    if devices == "auto":
        devices = torch.cuda.device_count() if not on_cpu(cfg) else 1
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return count != 1 or int(cfg.trainer.get("num_nodes", 1)) > 1


def trainer_kwargs(cfg: RunConfig) -> dict[str, Any]:
    kwargs = dict(cfg.trainer)
    kwargs.pop("strategy", None)
    # Streaming loaders have virtual epochs: validation runs every N steps, not per epoch.
    if isinstance(kwargs.get("val_check_interval"), int):
        kwargs.setdefault("check_val_every_n_epoch", None)
        # A run shorter than the interval still validates once, at its end.
        if 0 < kwargs.get("max_steps", -1) < kwargs["val_check_interval"]:
            kwargs["val_check_interval"] = kwargs["max_steps"]
    kwargs.setdefault("max_epochs", -1)
    if kwargs.get("precision", "auto") == "auto":
        kwargs["precision"] = "32-true" if on_cpu(cfg) else "bf16-mixed"
    return kwargs


def build_plugins(cfg: RunConfig) -> list[Any]:
    plugins: list[Any] = [AsyncCheckpointIO(AtomicCheckpointIO()) if cfg.checkpoint.async_save else AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning's SLURM environment (ranks, master address from the node list), without its
        # in-signal-handler checkpoint: PreemptionCheckpoint saves at a step boundary instead.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def build_datamodule(cfg: RunConfig):
    from lit_restore.data.datamodule import ShardDataModule

    return ShardDataModule(cfg.data, seed=cfg.seed)


def write_run_config(cfg: RunConfig) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.yaml.{os.getpid()}"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out / "config.yaml")


def check_hardware(cfg: RunConfig) -> None:
    """A config asking for GPUs this machine does not have fails here, in one line that says what
    it needs and what runs instead, before Lightning's own (later, longer) error."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    devices = cfg.trainer.get("devices", "auto")
    if accelerator not in ("gpu", "cuda"):
        return
    if isinstance(devices, (list, tuple)):
        wanted = len(devices)
    elif isinstance(devices, int):
        wanted = max(devices, 1)  # -1: all of them, at least one
    else:
        return  # device strings such as "0,1": Lightning parses them
    have = torch.cuda.device_count()
    if wanted > have:
        raise UserError(f"trainer.accelerator={accelerator} trainer.devices={devices}: this config needs {wanted} CUDA "
                        f"GPU(s) per node, this machine has {have}; on a CPU try the tiny config: "
                        f"lit-restore fit configs/tiny/{cfg.stage}.yaml")


def fit(cfg: RunConfig, stage: Optional[L.LightningModule] = None, datamodule: Optional[L.LightningDataModule] = None
        ) -> L.Trainer:
    """Train `cfg`'s stage (or the given module and datamodule) into `cfg.out_dir`. What the user
    gave (hardware, shards, the resume checkpoint) is checked before any network is built. The
    run dir is locked for the run (`lit_restore.rundir`): a second fit on it is refused, and a
    rerun that would resume another model's checkpoint is refused before anything is written.
    Raises `RunTerminated` when SIGTERM stopped the run (after saving a checkpoint)."""
    check_hardware(cfg)
    if datamodule is None:
        datamodule = build_datamodule(cfg)
        datamodule.check_sources()
    # Global rank 0 holds the run dir for the whole run; the other ranks are its own processes.
    lock = RunDirLock(cfg.out_dir, cfg.checkpoint.requeue_lock_wait) if rank_zero_only.rank == 0 else None
    with lock if lock is not None else contextlib.nullcontext():
        return _fit_locked(cfg, stage, datamodule)


def _fit_locked(cfg: RunConfig, stage: Optional[L.LightningModule], datamodule: L.LightningDataModule) -> L.Trainer:
    if rank_zero_only.rank == 0:  # no live run writes here (the lock): what a killed write left goes
        for path in remove_stale_temporaries(cfg.out_dir):
            rank_zero_info(f"removed {path}, left by a killed checkpoint write")
    ckpt = resume_path(cfg.resume, cfg.out_dir)
    if ckpt is not None:
        check_same_model(cfg.out_dir, yaml.safe_load(to_yaml(cfg)), ckpt)
    quiet_lightning_tips()
    if on_cpu(cfg):
        from lit_restore.threads import use_cpu_threads

        n = use_cpu_threads(local_processes(cfg), cfg.data.num_workers, cfg.threads)
        rank_zero_info(f"CPU threads per process: {n} (threads=N to change)")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_run_config(cfg)
    stage = stage if stage is not None else build_stage(cfg)
    callbacks = build_callbacks(cfg, stage)
    trainer = L.Trainer(
        default_root_dir=cfg.out_dir,
        logger=build_loggers(cfg),
        callbacks=callbacks,
        strategy=build_strategy(cfg),
        plugins=build_plugins(cfg),
        **trainer_kwargs(cfg),
    )
    rank_zero_info(f"run dir: {cfg.out_dir} (config.yaml, checkpoints/, samples/, logs)")
    if ckpt is None:
        rank_zero_info("starting a new run" + (" (resume=never)" if cfg.resume == "never" else ""))
    else:
        rank_zero_info(f"resuming from {ckpt}")
        if trainer.is_global_zero:
            prune_hpc(cfg.out_dir, cfg.checkpoint.keep_hpc, protect=ckpt)
    try:
        trainer.fit(stage, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt is not None else None, weights_only=True)
    except SIGTERMException:  # Lightning's handler, before PreemptionCheckpoint took SIGTERM over
        raise RunTerminated("stopped by SIGTERM before training started; no checkpoint saved") from None
    guard = next(c for c in callbacks if isinstance(c, NonFiniteGuard))
    if guard.stopped_message is not None:
        raise NonFiniteLossError(guard.stopped_message)
    preemption = next(c for c in callbacks if isinstance(c, PreemptionCheckpoint))
    if preemption.terminated is not None:
        raise RunTerminated(preemption.terminated)
    if ckpt is not None and getattr(stage, "resumed_step", None) == trainer.global_step and trainer.max_steps > 0:
        rank_zero_info(f"nothing to train: {ckpt} is at step {trainer.global_step} of trainer.max_steps="
                       f"{trainer.max_steps}; raise it to train on (e.g. trainer.max_steps={2 * trainer.max_steps}; "
                       "the LR goes on from where it is, see the README)")
    return trainer
