"""Resume: which checkpoint `resume: auto` picks, hpc pruning, and that an interrupted run ends
with exactly the weights, optimizer state and buffers of an uninterrupted one."""

from __future__ import annotations

import csv
import os
import signal
import time
import warnings

import pytest
import torch

from _batches import ROOT
from _probe import Probe, ProbeData, probe_config
from _untrusted import code_running_checkpoint
from lit_restore.checkpointing import (AtomicCheckpointIO, RunTerminated, find_resume_checkpoint, prune_hpc,
                                      remove_stale_temporaries, resume_path)
from lit_restore.config import ConfigError, load_config
from lit_restore.fit import fit
from lit_restore.weights import WeightsError, load_checkpoint


def touch(path, mtime_ns: int, data: bytes | None = None) -> None:
    """A small loadable checkpoint (or `data` as the file's bytes) with the given mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        torch.save({"global_step": 1}, path)
    else:
        path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_auto_picks_newest_of_hpc_and_last(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    t = time.time_ns()
    last = tmp_path / "checkpoints" / "last.ckpt"
    touch(last, t)
    touch(tmp_path / "checkpoints" / "step0000100.ckpt", t - 10**9)
    assert find_resume_checkpoint(tmp_path) == last
    touch(tmp_path / "hpc_ckpt_1.ckpt", t - 10**9)
    touch(tmp_path / "hpc_ckpt_2.ckpt", t + 5 * 10**9)
    touch(tmp_path / "hpc_ckpt_10.ckpt", t + 2 * 10**9)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_2.ckpt"
    touch(last, t + 9 * 10**9)
    assert find_resume_checkpoint(tmp_path) == last
    touch(tmp_path / "hpc_ckpt_10.ckpt", t + 9 * 10**9)  # a tie goes to the hpc checkpoint
    assert find_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"
    assert resume_path("never", tmp_path) is None
    assert resume_path(str(last), tmp_path) == last
    with pytest.raises(ConfigError, match="resume: .*does not exist"):
        resume_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_unreadable_checkpoints_are_skipped_named_and_kept(tmp_path):
    """A zero-byte or truncated last.ckpt and hpc checkpoint beside good step checkpoints: resume
    takes the newest step checkpoint that loads, names the others in one line, deletes nothing."""
    t = time.time_ns()
    ckpts = tmp_path / "checkpoints"
    touch(ckpts / "step0000004.ckpt", t)
    touch(ckpts / "step0000008.ckpt", t)  # same mtime: the higher step wins
    good = (ckpts / "step0000008.ckpt").read_bytes()
    touch(ckpts / "last.ckpt", t + 10**9, data=b"")
    touch(tmp_path / "hpc_ckpt_1.ckpt", t + 2 * 10**9, data=good[: len(good) // 2])
    with pytest.warns(UserWarning) as warned:
        assert find_resume_checkpoint(tmp_path) == ckpts / "step0000008.ckpt"
    (line,) = [str(w.message) for w in warned]
    assert "\n" not in line and "skipped 2" in line and "last.ckpt: empty file" in line and "hpc_ckpt_1.ckpt" in line
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt")) == ["hpc_ckpt_1.ckpt", "last.ckpt", "step0000004.ckpt",
                                                                "step0000008.ckpt"]
    # A checkpoint whose pickle would run code is never loaded, only skipped.
    marker = tmp_path / "ran"
    code_running_checkpoint(ckpts / "step0000012.ckpt", marker)
    with pytest.warns(UserWarning, match="step0000012.ckpt: refused"):
        assert find_resume_checkpoint(tmp_path) == ckpts / "step0000008.ckpt"
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused"):
        resume_path(str(ckpts / "step0000012.ckpt"), tmp_path)
    with pytest.raises(WeightsError, match="refused"):  # what Lightning's resume reads through
        AtomicCheckpointIO().load_checkpoint(ckpts / "step0000012.ckpt", weights_only=False)
    assert not marker.exists()


def test_prune_hpc_keeps_newest_versions(tmp_path):
    for n in (1, 2, 3, 11):
        touch(tmp_path / f"hpc_ckpt_{n}.ckpt", time.time_ns())
    removed = prune_hpc(tmp_path, keep=2, protect=tmp_path / "hpc_ckpt_1.ckpt")
    assert sorted(p.name for p in removed) == ["hpc_ckpt_2.ckpt"]
    assert sorted(p.name for p in tmp_path.glob("hpc_*")) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_11.ckpt", "hpc_ckpt_3.ckpt"]


def logged_steps(out_dir) -> list[int]:
    """Steps with a train/loss row, over the CSV files of every (re)start in order."""
    steps = []
    for n in range(len(list((out_dir / "logs").glob("version_*")))):
        with open(out_dir / "logs" / f"version_{n}" / "metrics.csv") as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return steps


@pytest.mark.parametrize("async_save", [False, True])  # async: written from a thread, same bytes
def test_interrupted_run_equals_uninterrupted(tmp_path, async_save):
    torch.set_num_threads(1)
    cfg_a = probe_config(tmp_path / "a")
    fit(cfg_a, stage=Probe(cfg_a), datamodule=ProbeData())

    cfg_b = probe_config(tmp_path / "b", f"checkpoint.async_save={async_save}")
    data = ProbeData()
    trainer = fit(cfg_b, stage=Probe(cfg_b, signal_at=5), datamodule=data)
    # SIGUSR1 after step 5 → every rank saves at the next step boundary and stops.
    assert trainer.global_step == 6
    assert (tmp_path / "b" / "hpc_ckpt_1.ckpt").is_file()
    assert find_resume_checkpoint(tmp_path / "b") == tmp_path / "b" / "hpc_ckpt_1.ckpt"  # newer than last.ckpt (step 4)
    assert data.restarts == [0]

    data = ProbeData()
    trainer = fit(cfg_b, stage=Probe(cfg_b), datamodule=data)
    assert trainer.global_step == 12
    assert data.restarts[-1] == 1  # the data stream is reseeded on restart

    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k  # weights, queue, counter: bit-exact
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[i][k], opt_b[i][k])
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    # Every step logged once before and once after the restart: no gap, no repeat.
    assert logged_steps(tmp_path / "b") == list(range(12))


def test_sigterm_saves_at_step_boundary_and_fails(tmp_path):
    """SIGTERM: a checkpoint at the next step boundary, no requeue, and fit raises (the CLI exits
    143) instead of returning as if the run had finished."""
    cfg = probe_config(tmp_path)
    with pytest.raises(RunTerminated, match=r"stopped by SIGTERM at step 6; saved .*hpc_ckpt_1\.ckpt"):
        fit(cfg, stage=Probe(cfg, signal_at=5, signum=signal.SIGTERM), datamodule=ProbeData())
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers handed back


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    stale = [tmp_path / ".hpc_ckpt_2.ckpt.tmp999", tmp_path / "checkpoints" / ".last.ckpt.tmp12345"]
    for p in stale:
        touch(p, time.time_ns(), data=b"partial")
    touch(tmp_path / "checkpoints" / "last.ckpt", time.time_ns())
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["last.ckpt"]


def test_resume_never_starts_fresh(tmp_path):
    cfg = probe_config(tmp_path, "trainer.max_steps=4")
    fit(cfg, stage=Probe(cfg), datamodule=ProbeData())
    cfg = probe_config(tmp_path, "trainer.max_steps=4", "resume=never")
    assert fit(cfg, stage=Probe(cfg), datamodule=ProbeData()).global_step == 4


def test_resume_never_overwrites_last_ckpt_of_an_earlier_run(tmp_path):
    """A fresh run into an old run's out_dir: `checkpoints/last.ckpt` is this run's (no
    last-v1.ckpt beside a stale last.ckpt that `export .../last.ckpt` would then read)."""
    cfg = probe_config(tmp_path, "trainer.max_steps=8")
    fit(cfg, stage=Probe(cfg), datamodule=ProbeData())
    cfg = probe_config(tmp_path, "trainer.max_steps=4", "resume=never")
    fit(cfg, stage=Probe(cfg), datamodule=ProbeData())
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in names if "-v" in n], names
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_ranks_agree_on_preemption_every_n_steps(tmp_path):
    from types import SimpleNamespace

    from lit_restore.checkpointing import PreemptionCheckpoint

    polls = []
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: polls.append(decision) or False)
    callback = PreemptionCheckpoint(tmp_path, keep_hpc=1, requeue=False, poll_steps=5)
    for step in range(1, 21):
        trainer = SimpleNamespace(world_size=2, global_step=step, strategy=strategy)
        callback.on_train_batch_end(trainer, None, None, None, step)
    assert len(polls) == 4  # steps 5, 10, 15, 20: one collective each
    trainer.world_size = 1  # a single process reads its own flag after every step
    callback.on_train_batch_end(trainer, None, None, None, 21)
    assert len(polls) == 5


def test_step_checkpoints_land_on_epoch_boundaries_too(sample_shards, tmp_path):
    """Validation every N steps and a virtual epoch of 4 steps: Lightning defers a monitored save
    on an epoch's last batch to an epoch-end validation that never comes; each one still lands."""
    from pathlib import Path

    from lit_restore.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "restorer.yaml", [
        f"out_dir={tmp_path}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
        f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.batch_size=2", "data.crop=32",
        "data.steps_per_epoch=4", "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.limit_val_batches=1",
        "checkpoint.every_n_steps=4", "logger=none", "trainer.enable_progress_bar=false"])
    fit(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")) == ["step0000004.ckpt",
                                                                                    "step0000008.ckpt"]


def test_rerun_extends_the_schedule_keeps_one_csv_history_and_says_when_nothing_is_left(sample_shards, tmp_path,
                                                                                           caplog):
    """max_steps 6 → the same again (nothing to do, said so) → 10: the LR goes on without a jump
    and logs/version_0/metrics.csv holds every step once."""
    def run(steps: int):
        cfg = load_config(ROOT / "configs" / "tiny" / "restorer.yaml", [
            f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
            f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.crop=32", "data.batch_size=2",
            "model.constyle_mode=joint", "optim.warmup_steps=1", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=100", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "model.width=8", "model.constyle.base_channels=4",
            "model.constyle.dim=16", "model.constyle.queue_size=32"])
        return fit(cfg)

    with caplog.at_level("INFO"):
        run(6)
    # The run says where it writes, validates at its end although shorter than the interval, and sums up.
    said = caplog.text
    assert f"run dir: {tmp_path / 'run'}" in said and "starting a new run" in said
    assert "step 6: val/psnr" in said and "trained 6 step(s) (0 → 6)" in said and "val/psnr: last" in said
    assert f"checkpoints: {tmp_path / 'run' / 'checkpoints'}" in said
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/psnr")]
    # A sample carries the step of its validation's CSV row.
    samples = {p.name for p in (tmp_path / "run" / "samples").iterdir()}
    assert val_steps == [5] and "val_restored_step0000005.png" in samples and "val_restored_step0000006.png" not in samples
    caplog.clear()
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(6).global_step == 6
    assert "nothing to train" in caplog.text and "trainer.max_steps=12" in caplog.text
    assert "resuming from" in caplog.text
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # expected on a resume: not shown
    assert run(10).global_step == 10
    assert sorted((tmp_path / "run" / "logs").iterdir()) == [tmp_path / "run" / "logs" / "version_0"]
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW")]
    steps = [int(r["step"]) for r in rows]
    lrs = [float(r["lr-AdamW"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 9
    assert all(b <= a * (1 + 1e-6) for a, b in zip(lrs[1:], lrs[2:]))  # after warmup, never up
