"""One run per run dir: the lock `fit` holds, the requeue that waits for its own old instance,
and a rerun that would resume another model's checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from _probe import Probe, ProbeData, probe_config
from lit_restore.config import UserError
from lit_restore.fit import fit
from lit_restore.rundir import LOCK_NAME, STALE_S, RunDirBusy, RunDirLock, model_changes

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def hold(run_dir, seconds: float, job: str = "") -> subprocess.Popen:
    """Another process holding `run_dir` for `seconds` (returns once it holds it)."""
    code = textwrap.dedent(f"""
        import time
        from lit_restore.rundir import RunDirLock
        lock = RunDirLock({str(run_dir)!r}).acquire()
        print("held", flush=True)
        time.sleep({seconds})
        lock.release()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**env, "SLURM_JOB_ID": job} if job else env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_fit_on_a_held_run_dir_exits_2_naming_the_holder_and_touches_nothing(sample_shards, tmp_path):
    run = tmp_path / "run"
    holder = hold(run, 120, job="4242")
    try:
        (run / "checkpoints").mkdir()
        partial = run / "checkpoints" / ".last.ckpt.tmp999999"  # the live holder's write in progress
        partial.write_bytes(b"half")
        (run / "config.yaml").write_text("stage: restorer\n")
        out = subprocess.run([sys.executable, "-m", "lit_restore.cli", "fit", str(REPO / "configs/tiny/restorer.yaml"),
                              f"out_dir={run}", f"data.train={sample_shards}/train-*.tar",
                              f"data.val={sample_shards}/val-000000.tar"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another fit" in lines[0], out.stderr
        assert f"host {socket.gethostname()}, pid {holder.pid}, SLURM job 4242" in lines[0]
        assert partial.read_bytes() == b"half" and (run / "config.yaml").read_text() == "stage: restorer\n"
    finally:
        holder.kill()
        holder.wait()


def test_a_requeued_job_waits_for_its_old_instance_and_another_job_does_not(tmp_path, monkeypatch):
    holder = hold(tmp_path, 3, job="77")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with pytest.raises(RunDirBusy, match="SLURM job 77"):
        RunDirLock(tmp_path, wait_same_job=30).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    start = time.monotonic()
    with RunDirLock(tmp_path, wait_same_job=30) as lock:
        waited = time.monotonic() - start
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["job"] == "77" and lock.me["job"] == "77"
    assert 0.5 < waited < 25
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: no holder recorded
    holder.wait(timeout=30)
    # A requeue waits a bounded time, then gives up in one line.
    holder = hold(tmp_path, 60, job="77")
    try:
        with pytest.raises(RunDirBusy, match="waited 3 s"):
            RunDirLock(tmp_path, wait_same_job=3).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_on_a_filesystem_whose_locks_stay_on_one_node_is_still_seen(tmp_path):
    """No lock held here, but the record was refreshed by another host moments ago: refused;
    once the record is stale (its holder gone without releasing) the dir is free."""
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(json.dumps({"host": "node-b", "pid": 123, "job": "", "started": time.time()}))
    with pytest.raises(RunDirBusy, match="host node-b, pid 123"):
        RunDirLock(tmp_path).acquire()
    old = time.time() - STALE_S - 5
    os.utime(lock_file, (old, old))
    RunDirLock(tmp_path).acquire().release()


def test_rerun_with_another_model_refuses_before_writing_and_training_knobs_may_change(tmp_path):
    cfg = probe_config(tmp_path, "trainer.max_steps=4")
    fit(cfg, stage=Probe(cfg), datamodule=ProbeData())
    saved = (tmp_path / "config.yaml").read_bytes()
    changed = probe_config(tmp_path, "trainer.max_steps=8", "model.width=16", "model.middle_blocks=2")
    with pytest.raises(UserError, match=r"another model \(model.middle_blocks 9 → 2, model.width 48 → 16\).*"
                                        r"resume=never or a new out_dir"):
        fit(changed, stage=Probe(changed), datamodule=ProbeData())
    assert (tmp_path / "config.yaml").read_bytes() == saved
    assert model_changes({"stage": "restorer", "model": {"width": 8}}, {"stage": "scm", "model": {"width": 8}}) == [
        ("stage", "restorer", "scm")]
    # A training knob (the loss) and a longer schedule: resumes.
    knob = probe_config(tmp_path, "trainer.max_steps=8", "model.loss=psnr")
    assert fit(knob, stage=Probe(knob), datamodule=ProbeData()).global_step == 8
    # resume=never starts over in the same dir.
    fresh = probe_config(tmp_path, "trainer.max_steps=2", "model.width=16", "resume=never")
    assert fit(fresh, stage=Probe(fresh), datamodule=ProbeData()).global_step == 2


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = probe_config(tmp_path / "file")
    with pytest.raises(UserError, match="cannot make the run dir there"):
        fit(cfg, stage=Probe(cfg), datamodule=ProbeData())


def test_a_filesystem_without_locks_falls_back_on_the_holder_record(tmp_path, monkeypatch):
    """ENOLCK (an NFS mount without a lock manager): a warning, and a live holder on this host is
    still seen through its record (its process exists), a dead one's record is not."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.warns(UserWarning, match="refuses file locks"):
        first = RunDirLock(tmp_path).acquire()
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
        with pytest.warns(UserWarning):
            RunDirLock(tmp_path).acquire()
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "started": time.time()}))
    with pytest.warns(UserWarning):
        RunDirLock(tmp_path).acquire().release()
