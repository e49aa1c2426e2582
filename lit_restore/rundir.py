"""One run per run dir: the lock `fit` holds on its `out_dir`, and the check that a rerun into a
run dir trains the same model before it resumes.

The lock is a POSIX record lock (`fcntl.lockf`) on `out_dir/fit.lock`. Of the locks Python has,
it is the one network filesystems carry to the server: NFSv3 through its lock manager, NFSv4,
Lustre (mounted with `flock`) and GPFS grant it across nodes, and the kernel drops it when its
holder dies, SIGKILL and a lost node (after the server's lease) included, so a killed job never
leaves a lock that must be removed by hand. Because some filesystems keep such locks node-local
(Lustre `localflock`, BeeGFS by default), the holder also writes who it is into the file and
refreshes its time every `HEARTBEAT_S`: a lock granted over a record that another host refreshed
moments ago is refused too. A filesystem that refuses locks gets a warning and that record alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from lit_restore.errors import UserError

LOCK_NAME = "fit.lock"
HEARTBEAT_S = 30.0
# A record not refreshed for this long belongs to a holder that is gone.
STALE_S = 3 * HEARTBEAT_S
POLL_S = 2.0


class RunDirBusy(UserError):
    """Another `fit` holds the run dir."""


def slurm_job() -> str:
    """This process's SLURM job as `scontrol` names it ("123", "45_6" in an array), or ""."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "")


def process_alive(pid: Any) -> bool:
    """Whether `pid` (a value read from a file) names a running process on this host; another
    user's process counts as running."""
    try:
        pid = int(pid)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except (ProcessLookupError, TypeError, ValueError, OverflowError):
        return False
    except PermissionError:
        pass
    return True


def describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if "started" in holder else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, since {since}"


class RunDirLock:
    """`fit`'s exclusive hold on a run dir, from `acquire` to `release` (or the process's end).

    A second holder is refused with `RunDirBusy` naming the first, except a process of the same
    SLURM job (a requeued job whose old instance is still ending), which waits up to
    `wait_same_job` seconds for it."""

    def __init__(self, out_dir: str | Path, wait_same_job: float = 300.0) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.wait_same_job = wait_same_job
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": slurm_job()}
        self._fd: Optional[int] = None
        self._no_locks = False  # the filesystem refuses record locks: the holder record alone guards
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _holder(self) -> dict[str, Any]:
        try:
            record = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _age(self) -> float:
        return time.time() - os.fstat(self._fd).st_mtime

    def _try_lock(self) -> bool:
        """True: locked (or the filesystem has no locks, warned); False: another process holds it."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                if not self._no_locks:
                    import warnings

                    warnings.warn(f"{self.path.parent}: this filesystem refuses file locks "
                                  f"({errno.errorcode[e.errno]}); only the holder record in fit.lock guards against "
                                  "a second fit", stacklevel=3)
                self._no_locks = True
                return True
            raise

    def _live_foreign_record(self) -> Optional[dict[str, Any]]:
        """A record refreshed lately by a holder the lock did not see: on another host (locks that
        stay on one node), or, where the filesystem has no locks, a live process on this host. On
        this host a granted lock is the truth (a record left by a killed process is just stale)."""
        holder = self._holder()
        if not holder or self._age() >= STALE_S:
            return None
        if holder.get("host") != self.me["host"]:
            return holder
        if not self._no_locks:
            return None
        return holder if process_alive(holder.get("pid")) else None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"out_dir={self.path.parent}: cannot make the run dir there ({e.strerror})") from None
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise UserError(f"{self.path} is not a regular file; remove it (fit keeps its lock there)")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UserError(f"out_dir={self.path.parent}: cannot write there ({e.strerror})") from None
        deadline = None
        while True:
            locked = self._try_lock()
            holder = self._live_foreign_record() if locked else self._holder()
            if locked and holder is None:
                break
            if locked and not self._no_locks:  # granted, but another node's holder refreshed the record
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            same_job = bool(self.me["job"]) and holder.get("job") == self.me["job"]
            if same_job and deadline is None:
                deadline = time.monotonic() + self.wait_same_job
            if not same_job or time.monotonic() >= deadline:
                self.close()
                waited = f" (waited {self.wait_same_job:.0f} s for it: checkpoint.requeue_lock_wait)" if same_job else ""
                raise RunDirBusy(f"run dir {self.path.parent} is in use by another fit ({describe(holder)}){waited}; "
                                 "wait for it to end, or give this run another out_dir (if that holder is gone for "
                                 f"good, a lost node, remove {self.path})")
            time.sleep(POLL_S)
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({**self.me, "started": time.time()}).encode(), 0)
            os.fsync(self._fd)
        except OSError as e:
            self.close()
            raise UserError(f"{self.path}: cannot write the run dir's lock record ({e.strerror}); "
                            "is the disk full or the filesystem gone?") from None
        self._beat = threading.Thread(target=self._heartbeat, name="fit.lock heartbeat", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)
            except OSError:
                pass  # a full or vanished filesystem: the lock itself still holds

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            os.ftruncate(self._fd, 0)  # no record: nobody waits for a holder that has gone
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# Keys under `model:` (at any depth) that decide what the model is: its architecture, its
# tensors' shapes, what its outputs mean. Other keys (loss weights, dropout, frozen parts' modes,
# where pretrained weights were read from: the checkpoint holds the weights) may change on resume.
ARCHITECTURE_KEYS = frozenset({
    "arch", "width", "enc_blocks", "middle_blocks", "dec_blocks", "base_channels", "dim", "queue_size", "classes",
    "model_cfg", "unet_cfg", "vae_cfg", "prediction_type", "image_condition", "constyle_condition",
    "signed_range", "w",
})


def _leaves(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


def _model_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"stage": cfg.get("stage"), **_leaves(cfg.get("model"), "model")}


def model_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of `stage` and the `model.*` keys of ARCHITECTURE_KEYS that
    differ between two configs (as plain dicts); keys only one side has are not compared (a config
    written by another version of lit_restore). A key inside `model_cfg`/`unet_cfg`/`vae_cfg`
    counts as that section."""
    before, after = _model_keys(saved), _model_keys(new)

    def decides(key: str) -> bool:
        return key == "stage" or any(part in ARCHITECTURE_KEYS for part in key.split(".")[1:])

    return [(k, before[k], after[k]) for k in sorted(before.keys() & after.keys(), key=lambda k: (k != "stage", k))
            if before[k] != after[k] and decides(k)]


def check_same_model(out_dir: str | Path, new: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume `ckpt` when the run dir's saved config.yaml describes another model or
    stage than `new`, in one line that names the keys. Nothing is written before this check."""
    saved_path = Path(out_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # not a config this project wrote: nothing to compare with
    if not isinstance(saved, dict):
        return
    changed = model_changes(saved, new)
    if changed:
        shown = ", ".join(f"{k} {a!r} → {b!r}" for k, a, b in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(f"{out_dir} holds a run of another model ({shown}{more}): {ckpt.name} cannot resume "
                        "into this config; start over with resume=never or a new out_dir")
