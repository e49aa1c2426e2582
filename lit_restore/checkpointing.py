"""Checkpoints that survive preemption and crashes: atomic writes, the resume choice, SLURM
preemption at a step boundary, and the run state Lightning does not keep (RNG, restart count).

Run dir layout (docs/architecture.md): `checkpoints/stepNNNNNNN.ckpt` and `checkpoints/last.ckpt`
from `StepCheckpoint`, `hpc_ckpt_N.ckpt` from `PreemptionCheckpoint`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_restore.config import ConfigError

HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside the target, then renames it over the target,
    so a write killed half-way leaves the previous checkpoint whole. Every full-state save goes
    through the strategy's checkpoint_io: ModelCheckpoint, `trainer.save_checkpoint` and the hpc path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def hpc_checkpoints(out_dir: str | Path) -> list[Path]:
    """`hpc_ckpt_N.ckpt` files in the run dir, oldest (lowest N) first."""
    found = []
    for p in Path(out_dir).glob("hpc_ckpt_*.ckpt"):
        m = HPC_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The newest of the run dir's hpc checkpoints and `checkpoints/last.ckpt` (by modification
    time; an hpc checkpoint wins a tie), or None. Lightning's ckpt_path="last" never looks at hpc
    checkpoints, and ckpt_path=None only at them, so the choice is made here."""
    candidates = [Path(out_dir) / "checkpoints" / "last.ckpt", *hpc_checkpoints(out_dir)]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        return None
    return max(existing, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("hpc_ckpt_")))


def resume_path(resume: str, out_dir: str | Path) -> Optional[Path]:
    """`resume` config value → the checkpoint to start from (None: a fresh run)."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_resume_checkpoint(out_dir)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"resume: {resume} does not exist; use auto, never or a checkpoint path")
    return path


def prune_hpc(out_dir: str | Path, keep: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete all but the `keep` newest hpc checkpoints (never `protect`); returns what was removed."""
    removed = []
    for p in hpc_checkpoints(out_dir)[:-keep] if keep > 0 else hpc_checkpoints(out_dir):
        if protect is not None and p.resolve() == protect.resolve():
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class StepCheckpoint(ModelCheckpoint):
    """`checkpoints/stepNNNNNNN.ckpt` every N optimizer steps plus `last.ckpt`, and once more
    when training ends so the final weights are always on disk."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep: int) -> None:
        # monitor="step" + mode="max" keeps the `keep` newest step checkpoints.
        super().__init__(
            dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False, monitor="step", mode="max",
            save_top_k=keep, save_last=True, every_n_train_steps=every_n_steps, save_on_train_epoch_end=False,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.should_stop and (trainer.max_steps < 0 or trainer.global_step < trainer.max_steps):
            return  # stopped early (preemption, non-finite loss): that path saved its own checkpoint
        if trainer.global_step > self._last_global_step_saved:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class PreemptionCheckpoint(L.Callback):
    """SLURM preemption: on SIGUSR1 (sent `--signal=SIGUSR1@90` before the time limit, or by
    `scancel --signal=USR1`) every rank saves `hpc_ckpt_N.ckpt` at the next step boundary, rank 0
    requeues the job with `scontrol requeue`, and training stops.

    Lightning's own SLURM handler saves inside the signal handler, which can run in the middle of
    a backward pass or an optimizer step (and, with collectives, deadlock). Here the handler only
    sets a flag; ranks agree on it after every `poll_steps`-th step (a single process after
    each), so they all save the same step."""

    def __init__(self, out_dir: str | Path, keep_hpc: int, requeue: bool = True, poll_steps: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self.keep_hpc = keep_hpc
        self.requeue = requeue
        self.poll_steps = poll_steps
        self._signalled = False
        self._previous_handler: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous_handler = signal.signal(signal.SIGUSR1, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Agreeing is a collective with a host read; every rank is at the same step, so all skip alike.
        if trainer.world_size > 1 and trainer.global_step % self.poll_steps != 0:
            return
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = trainer._checkpoint_connector.hpc_save_path(self.out_dir)
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        if isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO):
            trainer.strategy.checkpoint_io.teardown()  # the write must end before the requeue ends the job
        rank_zero_info(f"preemption: saved {path} at step {trainer.global_step}")
        if trainer.is_global_zero:
            prune_hpc(self.out_dir, self.keep_hpc)
            if self.requeue:
                requeue_slurm_job()
        trainer.should_stop = True
        self._signalled = False


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (it restarts with SLURM_RESTART_COUNT + 1)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn("preemption: not inside a SLURM job, nothing to requeue")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        rank_zero_warn(f"preemption: `scontrol requeue {job}` failed: {result.stderr.strip()}")
    else:
        rank_zero_info(f"preemption: requeued SLURM job {job}")


class RunState(L.Callback):
    """What a resumed run needs beyond Lightning's checkpoint: every rank's RNG states (restored
    just before the first resumed batch, so nothing between restore and training consumes them)
    and the restart count, which reseeds the training stream (`datamodule.set_restart`) so a
    restart does not replay the sample order the model has already seen."""

    def __init__(self) -> None:
        self.restarts = 0
        self._datamodule: Any = None
        self._pending_rng: Optional[dict[str, Any]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._datamodule = trainer.datamodule
        self._set_restart()

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": self.restarts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Loaded after `setup` and before the training loader is built.
        self.restarts = int(state_dict.get("restarts", 0)) + 1
        self._set_restart()

    def _set_restart(self) -> None:
        if self._datamodule is not None and hasattr(self._datamodule, "set_restart"):
            self._datamodule.set_restart(self.restarts)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = _plain_rng_states(_collect_rng_states())
        # Called on every rank (rank 0 writes): gather so each rank gets its own stream back.
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"resume: checkpoint has RNG states of {len(states)} ranks, this run has "
                           f"{trainer.world_size}; random streams start fresh")
            return
        self._pending_rng = states[trainer.global_rank]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_states(_numpy_rng_states(self._pending_rng))
            self._pending_rng = None


def _plain_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """RNG states as plain Python values: gatherable with all_gather_object (which fails on
    tensors inside objects) and loadable with torch.load(weights_only=True)."""
    out = dict(states)
    out["torch"] = states["torch"].tolist()
    if "torch.cuda" in states:
        out["torch.cuda"] = [s.tolist() for s in states["torch.cuda"]]
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        out["numpy"] = (kind, keys.tolist(), pos, has_gauss, gauss)
    return out


def _numpy_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_plain_rng_states`: what Lightning's `_set_rng_states` takes."""
    import numpy as np

    out = dict(states)
    out["torch"] = torch.tensor(states["torch"], dtype=torch.uint8)
    if "torch.cuda" in states:
        out["torch.cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in states["torch.cuda"]]
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        out["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
    return out
