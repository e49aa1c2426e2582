"""Checkpoints that survive preemption and crashes: atomic writes, the resume choice, SLURM
preemption and SIGTERM at a step boundary, and the run state Lightning does not keep (RNG,
restart count). Checkpoints are read as data only, through `lit_restore.weights`.

Run dir layout (docs/architecture.md): `checkpoints/stepNNNNNNN.ckpt` and `checkpoints/last.ckpt`
from `StepCheckpoint`, `hpc_ckpt_N.ckpt` from `PreemptionCheckpoint`.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
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
from lit_restore.errors import DiskFullError, is_disk_full
from lit_restore.weights import WeightsError, load_checkpoint

# Checkpoint writes in progress in this process (the preemption watchdog waits for them).
_ACTIVE_WRITES = [0]
HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
STEP_PATTERN = re.compile(r"^step(\d+)\.ckpt$")


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
        _ACTIVE_WRITES[0] += 1
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e, path.parent):
                raise DiskFullError(f"no space left on {path.parent} writing {path.name}; the checkpoints already "
                                    "there are intact: free space and rerun the same command to resume") from None
            raise
        finally:
            _ACTIVE_WRITES[0] -= 1
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        """Resume reads the checkpoint as data only, whatever Lightning asks for (its default is
        weights_only=False); tensors land on the CPU and Lightning moves them."""
        return load_checkpoint(path)


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed (`.NAME.ckpt.tmpPID`
    beside the run dir's checkpoints); call before anything in this run writes one."""
    out = Path(out_dir)
    stale = [p for folder in (out, out / "checkpoints") for p in folder.glob(".*.ckpt.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def hpc_checkpoints(out_dir: str | Path) -> list[Path]:
    """`hpc_ckpt_N.ckpt` files in the run dir, oldest (lowest N) first."""
    found = []
    for p in Path(out_dir).glob("hpc_ckpt_*.ckpt"):
        m = HPC_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resume_candidates(out_dir: str | Path) -> list[Path]:
    """The run dir's hpc checkpoints, `checkpoints/last.ckpt` and step checkpoints, newest
    first (by modification time; at a tie hpc before last before step, higher step first).
    Lightning's ckpt_path="last" never looks at hpc checkpoints, and ckpt_path=None only at
    them, so the choice is made here."""
    ckpts = Path(out_dir) / "checkpoints"
    ranked = [(p, 2, 0) for p in hpc_checkpoints(out_dir)] + [(ckpts / "last.ckpt", 1, 0)]
    for p in ckpts.glob("step*.ckpt"):
        m = STEP_PATTERN.match(p.name)
        if m:
            ranked.append((p, 0, int(m.group(1))))
    existing = [(p.stat().st_mtime_ns, kind, step, p) for p, kind, step in ranked if p.is_file()]
    return [p for *_, p in sorted(existing, key=lambda r: r[:3], reverse=True)]


def find_resume_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The newest resume candidate that loads, or None. Candidates that do not load (truncated,
    empty, needing code) are named in one warning line and left on disk."""
    skipped = []
    for path in resume_candidates(out_dir):
        try:
            load_checkpoint(path, mmap=True)
        except WeightsError as e:
            skipped.append(str(e))
            continue
        if skipped:
            rank_zero_warn(f"resume: skipped {len(skipped)} unreadable checkpoint(s), resuming from {path}: "
                           + "; ".join(skipped))
        return path
    if skipped:
        rank_zero_warn(f"resume: no checkpoint loads, starting fresh; skipped {len(skipped)}: " + "; ".join(skipped))
    return None


def resume_path(resume: str, out_dir: str | Path) -> Optional[Path]:
    """`resume` config value → the checkpoint to start from (None: a fresh run). A given path
    must load as data (`load_checkpoint`); the check reads the very bytes the strategy will
    unpickle, which keeps FSDP's own full-pickle loader safe too."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_resume_checkpoint(out_dir)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"resume: {resume} does not exist; use auto, never or a checkpoint path")
    load_checkpoint(path, mmap=True)
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
        # monitor="step" + mode="max" keeps the `keep` newest step checkpoints. No version counter:
        # a `resume=never` run into an out_dir that holds an earlier run's files would otherwise
        # write last-v1.ckpt beside them, and `export .../last.ckpt` would read the old run.
        super().__init__(
            dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False, monitor="step", mode="max",
            save_top_k=keep, save_last=True, every_n_train_steps=every_n_steps, save_on_train_epoch_end=False,
            enable_version_counter=False,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # On an epoch's last batch Lightning defers a monitored save to the end of a validation it
        # expects there; validation here runs every N steps, so that save would never come.
        # "step" is never stale: save now (the deferred save then finds this step saved).
        if (self._every_n_train_steps > 0 and trainer.global_step % self._every_n_train_steps == 0
                and not self._should_skip_saving_checkpoint(trainer)):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.should_stop and (trainer.max_steps < 0 or trainer.global_step < trainer.max_steps):
            return  # stopped early (preemption, non-finite loss): that path saved its own checkpoint
        if trainer.global_step > self._last_global_step_saved:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class RunTerminated(Exception):
    """fit stopped on SIGTERM; the CLI exits with `EXIT_CODE` so `fit && export` does not go on."""

    EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class PreemptionCheckpoint(L.Callback):
    """SLURM preemption: on SIGUSR1 (sent `--signal=SIGUSR1@90` before the time limit, or by
    `scancel --signal=USR1`) every rank saves `hpc_ckpt_N.ckpt` at the next step boundary, rank 0
    requeues the job with `scontrol requeue`, and training stops. SIGTERM (`kill`, `scancel`, a
    scheduler's shutdown) does the same without the requeue and records `terminated`, which
    `fit` turns into `RunTerminated`.

    Lightning's own SLURM handler saves inside the signal handler, which can run in the middle of
    a backward pass or an optimizer step (and, with collectives, deadlock); its SIGTERM handler
    ends `fit` after the step without a checkpoint and with exit code 0. Here the handlers only
    set flags; ranks agree on them after every `poll_steps`-th step (a single process after each),
    so they all save the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, out_dir: str | Path, keep_hpc: int, requeue: bool = True, poll_steps: int = 1,
                 grace: float = 60.0) -> None:
        self.out_dir = Path(out_dir)
        self.keep_hpc = keep_hpc
        self.requeue = requeue
        self.terminated: Optional[str] = None  # what SIGTERM stopped: step and checkpoint
        self._received: set[int] = set()
        self._previous_handlers: dict[int, Any] = {}
        self.poll_steps = poll_steps
        self.grace = grace
        self._trainer: Optional[L.Trainer] = None
        # What the main thread is doing: "loader" (waiting for a training batch), "step" or
        # "validation". The watchdog acts only on a stuck loader.
        self._phase = "loader"
        self._watchdog: Optional[threading.Timer] = None
        self._lock = threading.Lock()  # the step boundary and the watchdog: one of them handles a signal
        self._handling = False
        self._idle_since = 0.0  # when the main thread last left a step or a validation

    def _handler(self, signum: int, frame: Any) -> None:
        self._received.add(signum)
        if self._watchdog is None:
            self._arm()

    def _arm(self) -> None:
        self._watchdog = threading.Timer(self.grace, self._overdue)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _overdue(self) -> None:
        """`grace` seconds after a signal no step boundary has taken it. While a step, a
        validation or a checkpoint write runs, wait again (they end); when the run waits for the
        training loader (a stalled shard server), nothing will reach a boundary: save the last
        completed step (one process; the weights are whole between steps) and end the process.
        Validation is waited for like a step (its EMA swap makes a save then wrong; its shards'
        reads time out by themselves). Whatever fails here, the process ends."""
        with self._lock:
            if not self._received or self._handling:
                self._watchdog = None
                return
            # The callbacks after this one (EMA update, step checkpoints) end within moments of the
            # boundary; a loader that has delivered nothing for a second since is the stuck one.
            if self._phase != "loader" or _ACTIVE_WRITES[0] > 0 or time.monotonic() - self._idle_since < 1.0:
                self._arm()
                return
            self._handling = True
        trainer, terminate = self._trainer, signal.SIGTERM in self._received
        why = "SIGTERM" if terminate else "preemption"
        try:
            saved = "no checkpoint saved (several ranks: the last periodic checkpoint stays)"
            if trainer is not None and trainer.world_size == 1 and trainer.global_step > 0:
                saved = f"saved {self._save_hpc(trainer)} at step {trainer.global_step}"
            if self.requeue and not terminate and (trainer is None or trainer.is_global_zero):
                requeue_slurm_job()
            rank_zero_info(f"{why}: the data loader delivered nothing for {self.grace:g} s after the signal "
                           f"(checkpoint.signal_grace); {saved}; ending the process")
        except BaseException as e:  # a failed save must not leave a stuck process behind
            rank_zero_warn(f"{why}: ending the process; the save failed: {type(e).__name__}: {e}")
        finally:
            for child in multiprocessing.active_children():  # loader workers stuck in a read
                child.kill()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(RunTerminated.EXIT_CODE if terminate else 0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer = trainer
            self._previous_handlers = {s: signal.getsignal(s) for s in self.SIGNALS}
            signal.signal(signal.SIGUSR1, self._handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its SIGTERM handler after `setup`: replace it here.
        signal.signal(signal.SIGTERM, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            self._previous_handlers = {}
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._trainer = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Data that cannot be read (`CorruptDataError`: too many bad samples, shards that keep
        failing) ends the run while the loader fetches, between steps: a single process saves
        the last completed step, so the rerun after fixing the data loses nothing."""
        from lit_restore.data.shards import CorruptDataError

        if isinstance(exception, CorruptDataError) and trainer.world_size == 1 and trainer.global_step > 0 \
                and self._phase == "loader" and not trainer.sanity_checking:
            rank_zero_info(f"unreadable data: saved {self._save_hpc(trainer)} at step {trainer.global_step}")

    def _save_hpc(self, trainer: L.Trainer) -> Path:
        """`hpc_ckpt_N.ckpt` of the current state, written to the end (every rank takes part; rank
        0 writes and prunes the older ones); returns its path."""
        path = trainer._checkpoint_connector.hpc_save_path(self.out_dir)
        trainer.save_checkpoint(path)
        if isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO):
            trainer.strategy.checkpoint_io.teardown()  # the write must end before a requeue or an exit ends the job
        if trainer.is_global_zero:
            prune_hpc(self.out_dir, self.keep_hpc)
        return path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._phase = "step"

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phase = "validation"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phase, self._idle_since = "loader", time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Callbacks after this one (the step checkpoints) still run in "step"; the next fetch is
        # the loader's. Set at the end of every path below.
        try:
            self._boundary(trainer)
        finally:
            if self._phase == "step":
                self._phase, self._idle_since = "loader", time.monotonic()

    def _boundary(self, trainer: L.Trainer) -> None:
        # Agreeing is a collective with a host read; every rank is at the same step, so all skip alike.
        if trainer.world_size > 1 and trainer.global_step % self.poll_steps != 0:
            return
        if not trainer.strategy.reduce_boolean_decision(bool(self._received), all=False):
            return
        with self._lock:  # from here the boundary handles the signal; the watchdog stands down
            if self._handling:
                return
            self._handling = True
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        terminate = trainer.strategy.reduce_boolean_decision(signal.SIGTERM in self._received, all=False)
        path = self._save_hpc(trainer)
        why = "SIGTERM" if terminate else "preemption"
        rank_zero_info(f"{why}: saved {path} at step {trainer.global_step}")
        if trainer.is_global_zero and self.requeue and not terminate:
            requeue_slurm_job()
        if terminate:
            self.terminated = f"stopped by SIGTERM at step {trainer.global_step}; saved {path}, the same command resumes"
        trainer.should_stop = True
        self._received.clear()
        self._handling = False


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
