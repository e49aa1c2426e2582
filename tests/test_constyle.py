"""ConStyle encoder, MoCo wrapper, losses and the constyle stage."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _batches import device_batch, tiny_stage
from lit_restore.config import load_config
from lit_restore.losses import gram, info_nce, style_loss
from lit_restore.models.constyle import ConStyleEncoder, MoCo, check_queue_divisible

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "constyle.yaml")
SMALL = ["model.base_channels=4", "model.dim=16", "model.queue_size=32", "data.batch_size=4"]


def make_stage(*overrides: str):
    return tiny_stage("constyle", *SMALL, *overrides)


# ----------------------------------------------------------------------------- models


def test_encoder_shapes_and_reference_size():
    enc = ConStyleEncoder(base=16, dim=128)
    # ConStyle v1's encoder: ~1.19 M parameters.
    assert abs(sum(p.numel() for p in enc.parameters()) - 1.19e6) < 0.01e6
    out = enc(torch.rand(2, 3, 64, 48))
    assert out.z1.shape == out.z2.shape == (2, 128)
    assert [f.shape for f in out.feats] == [(2, 32, 32, 24), (2, 64, 16, 12), (2, 128, 8, 6)]
    assert out.logits is None
    assert ConStyleEncoder(base=4, dim=16, num_classes=10)(torch.rand(2, 3, 32, 32)).logits.shape == (2, 10)


def test_moco_key_encoder_is_frozen_copy_and_queue_is_a_buffer():
    moco = MoCo(ConStyleEncoder(base=4, dim=16), queue_size=32, momentum=0.9, normalize=True)
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())
    for pq, pk in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.equal(pq, pk) and pq.data_ptr() != pk.data_ptr()
    buffers = dict(moco.named_buffers())
    assert "queue" in buffers and "queue_ptr" in buffers
    torch.testing.assert_close(moco.queue.norm(dim=1), torch.ones(32))
    # Raw (un-normalised) mode keeps the randn init, as ConStyle's code.
    raw = MoCo(ConStyleEncoder(base=4, dim=16), queue_size=32, momentum=0.9, normalize=False)
    assert not torch.allclose(raw.queue.norm(dim=1), torch.ones(32))


def test_enqueue_writes_at_pointer_and_wraps():
    moco = MoCo(ConStyleEncoder(base=4, dim=4), queue_size=8, momentum=0.9, normalize=False)
    for step in range(3):
        moco.enqueue(torch.full((4, 4), float(step)))
    # Step 2 wrapped onto rows 0-3; step 1 is in rows 4-7.
    assert torch.equal(moco.queue[:4], torch.full((4, 4), 2.0))
    assert torch.equal(moco.queue[4:], torch.full((4, 4), 1.0))
    assert int(moco.queue_ptr) == 4
    rows = moco.queue_rows(0, 6)  # relative to the pointer, wrapping
    assert torch.equal(rows[:4], moco.queue[4:]) and torch.equal(rows[4:], moco.queue[:2])
    assert torch.equal(moco.queue_rows(4, 2), moco.queue[:2])


def test_queue_divisibility_message():
    check_queue_divisible(64, 8, 2)
    with pytest.raises(ValueError, match=r"model.queue_size=100 is not divisible by the global batch 16 "
                                         r"\(data.batch_size=8 x 2 devices\); use a multiple of 16"):
        check_queue_divisible(100, 8, 2)


def test_info_nce_prefers_the_positive():
    q = F.normalize(torch.randn(4, 8), dim=1)
    negatives = F.normalize(torch.randn(16, 8), dim=1)
    loss_pos, acc_pos = info_nce(q, q, negatives, 0.07)
    loss_neg, _ = info_nce(q, -q, negatives, 0.07)
    assert acc_pos == 1.0 and loss_pos < 0.1 < loss_neg
    # Uniform logits: log(1 + K).
    zero = torch.zeros(4, 8)
    loss, _ = info_nce(zero, zero, negatives, 0.07)
    assert math.isclose(float(loss), math.log(17), rel_tol=1e-6)


def test_gram_and_style_loss():
    x = torch.randn(4, 8)
    torch.testing.assert_close(gram(x), x @ x.t() / 32)
    assert float(style_loss(x, x, x, x)) == 0.0
    assert float(style_loss(x, x, 2 * x, x)) > 0


# ----------------------------------------------------------------------------- stage


def test_momentum_rule_is_exact_and_key_encoder_is_not_optimised():
    stage = make_stage("model.momentum=0.9")
    moco = stage.moco
    q_before = [p.detach().clone() for p in moco.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in moco.encoder_k.parameters()]
    loss = stage.training_step(device_batch(stage), 0)
    loss.backward()
    for q, k, k_new in zip(q_before, k_before, moco.encoder_k.parameters()):
        assert torch.equal(k_new, torch.add(k * 0.9, q, alpha=1 - 0.9))
    assert any(not torch.equal(q, k) for q, k in zip(q_before, moco.encoder_k.parameters()))
    trainable = {id(p) for p in stage.trainable_parameters()}
    assert not any(id(p) in trainable for p in moco.encoder_k.parameters())
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    assert all(id(p) in trainable for p in moco.encoder_q.parameters())


@pytest.mark.parametrize("enqueue", ["query", "key"])
def test_enqueued_codes(enqueue):
    stage = make_stage(f"model.enqueue={enqueue}")
    batch = device_batch(stage)
    moco = stage.moco
    with torch.no_grad():
        query = moco.code(moco.encoder_q(batch["lq"]).z2)
    stage.training_step(batch, 0)
    with torch.no_grad():  # after the step the key encoder holds the weights the step used
        key = moco.code(moco.encoder_k(batch["gt"]).z2)
    torch.testing.assert_close(moco.queue[:4], query if enqueue == "query" else key)
    assert int(moco.queue_ptr) == 4


@pytest.mark.parametrize("objective", ["maximize", "minimize"])
def test_style_sign_option(objective):
    stage = make_stage(f"model.style_objective={objective}", "model.l2_normalize=false")
    stage.log = lambda name, value, **kw: stage.__dict__.setdefault("logged", {}).__setitem__(name, value)
    stage.training_step(device_batch(stage), 0)
    style = float(stage.logged["train/style"].detach())
    assert style < 0 if objective == "maximize" else style > 0


def test_stage_state_dict_holds_queue_and_export_is_query_encoder():
    stage = make_stage("optim.ema_decay=0.0")
    stage.training_step(device_batch(stage), 0)
    sd = stage.state_dict()
    assert int(sd["moco.queue_ptr"]) == 4
    fresh = make_stage("optim.ema_decay=0.0")
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.moco.queue, stage.moco.queue) and int(fresh.moco.queue_ptr) == 4
    assert stage.export_modules()["encoder"] is stage.moco.encoder_q
    ema_stage = make_stage("optim.ema_decay=0.5")
    assert ema_stage.export_modules()["encoder"] is ema_stage.ema.module
    assert not any(p.requires_grad for p in ema_stage.ema.parameters())


def _fit_overrides(sample_shards, tmp_path, *extra):
    return [f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
            f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.crop=32",
            "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", *extra]


def test_fit_tiny_config_end_to_end(sample_shards, tmp_path):
    from lit_restore.fit import fit

    cfg = load_config(TINY, _fit_overrides(sample_shards, tmp_path))
    trainer = fit(cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 3
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/contrastive"])
    stage = trainer.lightning_module
    assert int(stage.moco.queue_ptr) == 3 * cfg.data.batch_size
    assert list((tmp_path / "run" / "samples").glob("val_pairs_*.png"))


def test_fit_rejects_queue_not_divisible_by_batch(sample_shards, tmp_path):
    from lit_restore.fit import fit

    cfg = load_config(TINY, _fit_overrides(sample_shards, tmp_path, "data.batch_size=6"))
    with pytest.raises(ValueError, match="model.queue_size=256 is not divisible by the global batch 6"):
        fit(cfg)


def test_ddp_two_ranks_keep_identical_queues(tmp_path):
    """A real 2-process gloo DDP run: both ranks end with the same queue and pointer, and the last
    written block holds rank 0's codes followed by rank 1's."""
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_constyle_worker.py"), TINY, str(tmp_path)],
                         cwd=ROOT, timeout=240, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["queue"], r1["queue"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == (3 * 2 * 4) % 32
    last = (int(r0["ptr"]) - 8 + torch.arange(8)) % 32
    block = r0["queue"][last]
    torch.testing.assert_close(block[:4], r0["code"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(block[4:], r1["code"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(r0["code"], r1["code"])
