"""The run: `RunConfig`'s top level (stage, out_dir, logger, ...) and its optim, wandb and checkpoint sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


from lit_restore.config.base import choice
from lit_restore.config.data import DataConfig
from lit_restore.config.degrade import DegradeConfig

STAGES = ("autoencoder", "biqa", "constyle", "restorer", "ldm", "scm")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, an optional constant stretch, then cosine decay, stepped per optimizer step."""

    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    hold_steps: int = 0  # steps at the full lr after warmup before the cosine starts
    min_lr_ratio: float = 0.01  # final lr = lr * min_lr_ratio
    ema_decay: float = 0.0  # 0 disables EMA; otherwise e.g. 0.999
    # Decay min(ema_decay, (1+n)/(10+n)) after n updates, as InstructPix2Pix's EMA; BasicSR's
    # (IRConStyle/ConStyle) uses the fixed decay from step 0 (false).
    ema_warmup: bool = True


@dataclass
class WandbConfig:
    """Weights & Biases settings, used when logger=wandb."""

    project: str = "lit_restore"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None


@dataclass
class CheckpointConfig:
    """Step checkpoints, SLURM preemption checkpoints and what a non-finite loss does."""

    every_n_steps: int = 500  # checkpoints/stepNNNNNNN.ckpt and checkpoints/last.ckpt every N optimizer steps
    keep: int = -1  # step checkpoints kept, newest first (-1: all)
    keep_hpc: int = 1  # SLURM preemption checkpoints (hpc_ckpt_N.ckpt) kept, newest first
    # A step whose gradients are NaN/Inf: "skip" leaves the weights unchanged (counted in
    # train/skipped_steps); "stop" saves a checkpoint of the weights before it and ends the run.
    on_nan: str = choice("skip", ("skip", "stop"), "what a non-finite loss or gradient does")
    max_skipped_in_row: int = 100  # on_nan=skip: stop as on_nan=stop after this many skipped steps in a row
    # With several ranks, they agree on a SLURM preemption signal every this many steps (one
    # collective each time); the checkpoint is then up to N steps after the signal.
    preempt_poll_steps: int = 10
    # Write checkpoints from a background thread (Lightning's AsyncCheckpointIO): training goes on
    # during the write; the state is first copied on the device (memory of one more checkpoint).
    async_save: bool = False
    # A requeued SLURM job finding its run dir still held by its own earlier instance (ending on
    # another node) waits this many seconds for it; any other holder is refused at once.
    requeue_lock_wait: int = 300
    # A SIGTERM or SIGUSR1 is handled at the next step boundary. When the training loader has
    # delivered nothing for this many seconds after the signal (a shard server that stalls), the
    # run ends anyway: a single-process run first saves the last completed step as an hpc
    # checkpoint. Below SLURM's default KillWait (30 s), the time between its SIGTERM and SIGKILL.
    signal_grace: int = 20


def _default_trainer() -> dict[str, Any]:
    return {
        "max_steps": 1000,
        "accelerator": "auto",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "auto",  # fit: bf16-mixed on GPU, 32-true on CPU
        "val_check_interval": 500,
        "log_every_n_steps": 10,
    }




@dataclass
class RunConfig:
    """One training run of one stage."""

    stage: str = choice("biqa", STAGES, "which stage this config trains")
    seed: int = 0
    out_dir: str = "runs/default"  # run dir: checkpoints/, config.yaml, logs; stable across requeues
    resume: str = "auto"  # auto (newest hpc or last checkpoint in out_dir), never, or a checkpoint path
    # CPU training: torch threads per process; 0 = the cores this process may use / processes on the
    # node − loader workers (OMP_NUM_THREADS, when set, wins over 0). GPU runs leave torch's default.
    threads: int = 0
    logger: str = choice("csv", ("wandb", "csv", "none"), "where metrics go")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=_default_trainer)  # passed to lightning.Trainer
    model: Any = None  # the stage's model dataclass (MODEL_CONFIGS[stage])
