"""Faults: a killed run resumes, a checkpoint write killed half-way leaves the previous one
loadable, a non-finite loss is skipped (counted) or stops the run with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from _probe import Probe, ProbeData, probe_config
from lit_restore.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from lit_restore.fit import fit
from lit_restore.guards import NonFiniteLossError

PROBE = Path(__file__).resolve().parent / "_probe.py"
REPO = Path(__file__).resolve().parent.parent


def test_kill9_then_resume_auto_continues(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, str(PROBE), str(run), "trainer.max_steps=40", "checkpoint.every_n_steps=5"]
    proc = subprocess.Popen(args, env={**os.environ, "PROBE_SLEEP": "0.1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step0000010.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no handler, no final checkpoint
    proc.wait()
    # The newest checkpoint that loads: last.ckpt, or the step file written just before it when
    # the kill landed between the two writes.
    resume_from = find_resume_checkpoint(run)
    killed_at = torch.load(resume_from, weights_only=True)["global_step"]
    assert 10 <= killed_at < 40

    out = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {resume_from}" in out.stderr + out.stdout
    assert "PROBE_DONE step=40" in out.stdout
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 40
    assert final["callbacks"]["RunState"]["restarts"] == 1
    # The counter of samples trained on continues from the checkpoint: no step was trained twice
    # into the final weights and none was lost.
    assert int(final["state_dict"]["seen"]) == 40


def test_sigterm_during_cli_fit_exits_143_with_a_checkpoint(sample_shards, tmp_path):
    """`fit && export` must not export a run SIGTERM stopped half-way (it exited 0)."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "lit_restore.cli", "fit", str(REPO / "configs/tiny/restorer.yaml"), f"out_dir={run}",
            f"data.train={sample_shards}/train-*.tar", f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0",
            "data.batch_size=2", "trainer.max_steps=100000", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=2",
            "trainer.enable_progress_bar=false"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step0000002.ckpt").exists():  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    last = proc.stderr.read().strip().splitlines()[-1]
    assert last.startswith("lit-restore: stopped by SIGTERM at step ") and "hpc_ckpt_1.ckpt" in last
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] >= 2


def test_checkpoint_write_killed_halfway_keeps_previous(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    # A child process starts overwriting it with a large checkpoint and is SIGKILLed mid-write.
    code = textwrap.dedent(f"""
        import os, signal, torch
        from lit_restore.checkpointing import AtomicCheckpointIO
        real_save = torch.save
        def save_then_die(obj, f, *a, **k):
            f.write(b"partial checkpoint bytes" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        AtomicCheckpointIO().save_checkpoint({{"global_step": 2, "w": torch.zeros(10**6)}}, {str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    # Only the dead writer's temporary file is left beside it; resume never looks at it.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.tmp")


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith("net.")}


class Snapshots(Probe):
    """Records the weights after every optimizer step."""

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.snaps = getattr(self, "snaps", {})
        self.snaps[self.global_step] = weights(self)


def optimizer_state(trainer) -> list[torch.Tensor]:
    state = trainer.optimizers[0].state
    return [t.clone() for s in state.values() for t in (s["step"], s["exp_avg"], s["exp_avg_sq"])]


class StateSnapshots(Snapshots):
    """Also records the optimizer's moments and step counts after every step."""

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.opt_snaps = getattr(self, "opt_snaps", {})
        self.opt_snaps[self.global_step] = optimizer_state(self.trainer)


@pytest.mark.parametrize("fused", [False, True])  # fused: the verdict reaches the optimizer on the device
def test_nan_loss_skipped_and_counted(tmp_path, fused):
    cfg = probe_config(tmp_path, "trainer.max_steps=8", "checkpoint.on_nan=skip", "trainer.log_every_n_steps=3")
    stage = StateSnapshots(cfg, nan_steps=(3, 4), fused=fused)
    trainer = fit(cfg, stage=stage, datamodule=ProbeData())
    assert trainer.global_step == 8
    for k, v in stage.snaps[5].items():  # steps 3 and 4 (global_step 3→4→5) changed nothing
        assert torch.equal(v, stage.snaps[3][k]), k
    # Moments and step counts too: the fused kernel skips on the verdict, the other path has no gradients.
    assert all(torch.equal(a, b) for a, b in zip(stage.opt_snaps[5], stage.opt_snaps[3]))
    assert not all(torch.equal(v, stage.snaps[6][k]) for k, v in stage.snaps[5].items())
    assert all(torch.isfinite(v).all() for v in stage.snaps[8].values())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["callbacks"]["NonFiniteGuard"]["skipped"] == 2


@pytest.mark.parametrize("fused", [False, True])
def test_nan_loss_stops_with_checkpoint(tmp_path, fused):
    cfg = probe_config(tmp_path, "trainer.max_steps=8", "checkpoint.on_nan=stop")
    stage = Snapshots(cfg, nan_steps=(5,), fused=fused)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 6: non-finite.*nonfinite_step0000006\.ckpt"):
        fit(cfg, stage=stage, datamodule=ProbeData())
    ckpt = torch.load(tmp_path / "checkpoints" / "nonfinite_step0000006.ckpt", weights_only=True)
    for k, v in stage.snaps[5].items():  # the weights before the bad step, finite
        assert torch.equal(ckpt["state_dict"][k], v) and torch.isfinite(v).all()


@pytest.mark.parametrize("fused", [False, True])
def test_too_many_skips_in_a_row_stop(tmp_path, fused):
    # Noticed on the logging step after the run (step 4 of every 4), whatever happened in between.
    cfg = probe_config(tmp_path, "trainer.max_steps=8", "checkpoint.max_skipped_in_row=2", "trainer.log_every_n_steps=4")
    with pytest.raises(NonFiniteLossError, match="stopped at step 4: .*2 skipped steps in a row"):
        fit(cfg, stage=Probe(cfg, nan_steps=(1, 2), fused=fused), datamodule=ProbeData())
