"""BIQA stage: frozen text tower, losses, the GT term, label mapping, validation outputs, fit."""

import math
from pathlib import Path

import pytest
import torch

from _batches import device_batch, tiny_stage
from lit_restore.config import ConfigError, load_config
from lit_restore.data.degrade.types import DEGRADATION_TYPES, type_index

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "biqa.yaml")


def make_stage(*overrides: str):
    return tiny_stage("biqa", *overrides)



def test_classes_must_be_degradation_types():
    with pytest.raises(ConfigError, match="model.classes.*quote 'no'"):
        make_stage("model.classes=[false,noise]")  # what an unquoted YAML `no` becomes
    with pytest.raises(ConfigError, match="model.gt_as_no: needs 'no'"):
        make_stage("model.classes=[noise,blur]")


def test_training_moves_only_the_image_tower():
    stage = make_stage()
    clip = stage.clip
    text_before = [p.detach().clone() for p in clip.text_parameters()]
    visual_before = [p.detach().clone() for p in clip.model.visual.parameters()]
    trainable = {id(p) for p in stage.trainable_parameters()}
    assert not trainable & {id(p) for p in clip.text_parameters()}
    opt = torch.optim.AdamW(stage.trainable_parameters(), lr=1e-3)
    for step in range(3):
        loss = stage.training_step(device_batch(stage, n=6, size=64, seed=step), step)
        assert math.isfinite(float(loss))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in clip.text_parameters())
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(text_before, clip.text_parameters()))
    assert all(not m.training for m in clip.text_modules())
    assert any(not torch.equal(a, b) for a, b in zip(visual_before, clip.model.visual.parameters()))


def test_text_projection_and_temperature_train_as_in_autodir():
    """AutoDIR freezes only `text_model*`: CLIP's text projection and logit scale train."""
    stage = make_stage()
    model = stage.clip.model
    trainable = {id(p) for p in stage.trainable_parameters()}
    assert id(model.text_projection) in trainable and id(model.logit_scale) in trainable
    stage.training_step(device_batch(stage, n=6, size=64), 0).backward()
    assert model.text_projection.grad is not None and model.text_projection.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None
    frozen = make_stage("model.train_text_projection=false", "model.train_logit_scale=false")
    assert not frozen.clip.model.text_projection.requires_grad and not frozen.clip.model.logit_scale.requires_grad


@pytest.mark.parametrize("loss", ["fidelity", "ce"])
def test_gt_term_lowers_the_clean_image_probability_of_its_twin_label(loss):
    # A random CLIP: the term's pull, from a start where the twin label is not already unlikely.
    # Two twin types: random-pixel GTs look alike to it, so with every type among the twins the
    # term's optimum would be the uniform 1/8 it starts near.
    stage = make_stage(f"model.loss={loss}", "model.pretrained=''", "degrade.types=[noise,blur]")
    batch = device_batch(stage, n=8, size=64)
    images, targets, weight, twin, gt_mask = stage._scored_batch(batch)
    assert gt_mask.any()

    def twin_prob() -> torch.Tensor:
        with torch.no_grad():
            probs = stage.clip.logits(images)[twin.shape[0]:].softmax(-1)
        sel = gt_mask.bool()
        return probs[sel].gather(1, twin[sel][:, None]).mean()

    before = twin_prob()
    opt = torch.optim.SGD(stage.trainable_parameters(), lr=0.05)
    for _ in range(20):
        _, parts = stage._loss(stage.clip.logits(images), targets, weight, twin, gt_mask)
        opt.zero_grad()
        parts["gt"].backward()
        opt.step()
    assert twin_prob() < 0.8 * before


def test_labels_map_onto_the_model_classes():
    stage = make_stage("model.classes=[\"no\",blur,noise]", "model.gt_weight=0")
    n = 4
    labels = torch.tensor([type_index(t) for t in ("noise", "haze", "blur", "no")])
    batch = {"lq": torch.rand(n, 3, 64, 64), "gt": torch.rand(n, 3, 64, 64), "label": labels,
             "valid": torch.tensor([True, True, True, False])}
    images, targets, weight, twin, gt_mask = stage._scored_batch(batch)
    # haze is not scored and the last sample is padding: they stay in place with weight 0;
    # noise → 2, blur → 1, then their GTs as "no" at 1/(K-1) each.
    assert images.shape[0] == 8 and weight.tolist() == [1, 0, 1, 0, 0.5, 0, 0.5, 0]
    assert targets[weight > 0].tolist() == [2, 1, 0, 0]
    assert gt_mask.tolist() == [1, 0, 1, 0]
    assert len(DEGRADATION_TYPES) == stage.type_to_class.numel()


def test_validation_logs_confusion_matrix_image(tmp_path):
    stage = make_stage(f"out_dir={tmp_path}").eval()
    with torch.no_grad():
        for i in range(2):
            stage.validation_step(device_batch(stage, n=6, size=64, seed=10 + i), i)
    matrix = stage.val_confusion.compute()
    assert int(matrix.sum()) == 2 * 6 * 2  # degraded images and their GTs
    stage.on_validation_epoch_end()
    assert len(list((tmp_path / "samples").glob("val_confusion_*.png"))) == 1


def test_fit_tiny_config(sample_shards, tmp_path):
    from lit_restore.fit import fit

    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
                             f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.batch_size=4",
                             "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"])
    trainer = fit(cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 2
    assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    assert list((tmp_path / "run" / "samples").glob("val_confusion_*.png"))
    assert sorted(trainer.lightning_module.export_modules()) == ["clip"]
