"""SCM stage: the frozen LDM stays frozen and out of the checkpoint, the correction trains."""

import math
from pathlib import Path

import pytest
import torch

from _batches import device_batch, tiny_stage
from _untrusted import code_running_checkpoint
from lit_restore.weights import WeightsError
from lit_restore.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "scm.yaml")


def make_stage(*overrides: str):
    return tiny_stage("scm", "data.batch_size=4", *overrides, fit_setup=True)



def test_only_the_correction_trains_and_the_ldm_stays_frozen():
    stage = make_stage()
    ldm = stage.frozen.ldm
    ldm_before = {k: v.clone() for k, v in ldm.state_dict().items()}
    assert not any(k.startswith(("frozen", "ldm")) for k in stage.state_dict())  # not in the checkpoint
    assert {id(p) for p in stage.trainable_parameters()} == {id(p) for p in stage.scm.parameters()}
    scm_before = [p.detach().clone() for p in stage.scm.parameters()]
    opt = torch.optim.AdamW(stage.trainable_parameters(), lr=1e-3)
    for step in range(2):
        loss = stage.training_step(device_batch(stage, n=2, seed=step), step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, ldm.state_dict()[k]) for k, v in ldm_before.items())
    assert all(p.grad is None for p in ldm.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(scm_before, stage.scm.parameters()))


@pytest.mark.parametrize("signed", [True, False])
def test_correction_is_a_scaled_residual_on_the_ldm_output(signed):
    stage = make_stage("model.w=0.5", f"model.signed_range={signed}").eval()
    lq, ldm_out = torch.rand(2, 3, 24, 20), torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        for p in stage.scm.net.ending.parameters():  # a trained SCM's last conv, not the fresh zero one
            p.normal_(0, 0.1)
        if signed:  # AutoDIR: the NAFNet sees and corrects [-1,1] images
            expected = ldm_out + 0.25 * stage.scm.net(torch.cat([lq * 2 - 1, ldm_out * 2 - 1], 1))
        else:
            expected = ldm_out + 0.5 * stage.scm.net(torch.cat([lq, ldm_out], 1))
        torch.testing.assert_close(stage.export_modules()["scm"](lq, ldm_out), expected)


def test_a_fresh_correction_passes_the_ldm_output_through():
    stage = make_stage().eval()
    lq, ldm_out = torch.rand(2, 3, 24, 20), torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(stage.scm(lq, ldm_out), ldm_out)


def test_psnr_loss_is_the_negative_mean_psnr_of_the_valid_images():
    stage = make_stage("model.loss=psnr")
    gt = torch.rand(3, 3, 8, 8)
    out = gt + torch.tensor([0.1, 0.01, 0.5]).view(3, 1, 1, 1)  # MSE 1e-2, 1e-4 (20 and 40 dB), 0.25
    loss = stage._loss(out, gt, torch.tensor([True, True, False]))
    torch.testing.assert_close(loss, torch.tensor(-30.0), atol=1e-3, rtol=0)  # 1e-8 keeps log finite


def test_pretrained_loads_a_whole_scm_and_refuses_bad_files(tmp_path):
    from safetensors.torch import save_file

    source = make_stage()
    with torch.no_grad():
        for p in source.scm.parameters():
            p.normal_()
    ckpt = tmp_path / "scm.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    exported = tmp_path / "model.safetensors"  # an export's layout: the StructureCorrection under "scm."
    save_file({f"scm.{k}": v.contiguous() for k, v in source.scm.state_dict().items()}, exported)
    for path in (ckpt, exported):
        loaded = make_stage(f"model.pretrained={path}")
        for k, v in source.scm.state_dict().items():
            assert torch.equal(loaded.scm.state_dict()[k], v), (path.name, k)
    with pytest.raises(WeightsError, match="scm shapes differ"):
        make_stage("model.width=8", f"model.pretrained={ckpt}")
    with pytest.raises(WeightsError, match="model.pretrained: .*not found"):
        make_stage(f"model.pretrained={tmp_path / 'missing.ckpt'}")
    marker = tmp_path / "ran"
    evil = code_running_checkpoint(tmp_path / "evil.ckpt", marker, source.state_dict())
    with pytest.raises(WeightsError, match="refused"):
        make_stage(f"model.pretrained={evil}")
    assert not marker.exists()


def test_training_applies_the_ldms_classifier_free_dropout():
    """With every sample's text and image dropped, the LDM output depends on neither the degraded
    image nor its label; without dropout it does."""
    stage = make_stage("model.ldm.drop_text=0", "model.ldm.drop_both=1", "model.ldm.drop_image=0")
    batch = device_batch(stage, size=36)
    other = {**batch, "lq": batch["lq"].flip(0), "label": (batch["label"] + 1) % 8}

    def run(b, drop):
        return stage.ldm_output(b, torch.Generator().manual_seed(0), drop=drop)

    torch.testing.assert_close(run(batch, True), run(other, True))
    assert not torch.allclose(run(batch, False), run(other, False))


@pytest.mark.parametrize("mode", ["one_step", "sample"])
def test_ldm_output_modes_are_deterministic_under_a_generator(mode):
    stage = make_stage(f"model.ldm_input={mode}", "model.sample_steps=2", "model.t_power=3")
    batch = device_batch(stage, size=36)

    def run(seed):
        return stage.ldm_output(batch, torch.Generator().manual_seed(seed))

    out = run(0)
    assert out.shape == batch["gt"].shape and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(run(0), out)
    assert not torch.allclose(run(1), out)


def test_loads_the_ldm_from_an_ldm_checkpoint(tmp_path):
    from lit_restore.stages.ldm import LDMStage

    torch.manual_seed(3)
    ldm_stage = LDMStage(load_config(str(ROOT / "configs" / "tiny" / "ldm.yaml")))
    ldm_stage.setup("fit")
    with torch.no_grad():
        for p in ldm_stage.ema.module.parameters():
            p.add_(0.01)  # the EMA differs from the raw UNet: the SCM must take the EMA
        ldm_stage.context_bank.add_(1.0)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": ldm_stage.state_dict(), "hyper_parameters": {"config": to_dict(ldm_stage.cfg)}}, path)
    stage = make_stage(f"model.ldm_checkpoint={path}")
    for k, v in ldm_stage.ema.module.state_dict().items():
        assert torch.equal(stage.frozen.ldm.unet.state_dict()[k], v), k
    for k, v in ldm_stage.ldm.vae.state_dict().items():
        assert torch.equal(stage.frozen.ldm.vae.state_dict()[k], v), k
    assert torch.equal(stage.frozen.context_bank, ldm_stage.context_bank)
    with pytest.raises(WeightsError, match="model.ldm_checkpoint: .*not found"):
        make_stage(f"model.ldm_checkpoint={tmp_path / 'missing.ckpt'}")
    epsilon = tmp_path / "epsilon.ckpt"  # an ldm run trained for the other objective: refused, not misread
    config = to_dict(ldm_stage.cfg)
    config["model"]["prediction_type"] = "epsilon"
    torch.save({"state_dict": ldm_stage.state_dict(), "hyper_parameters": {"config": config}}, epsilon)
    with pytest.raises(ConfigError, match=r"^model.ldm.prediction_type: v_prediction, but .*epsilon.ckpt is an LDM "
                                          r"trained for epsilon; set model.ldm.prediction_type=epsilon$"):
        make_stage(f"model.ldm_checkpoint={epsilon}")
    marker = tmp_path / "ran"  # an ldm checkpoint from a stranger whose pickle would run code
    evil = code_running_checkpoint(tmp_path / "evil.ckpt", marker, ldm_stage.state_dict())
    with pytest.raises(WeightsError, match="model.ldm_checkpoint: .*refused"):
        make_stage(f"model.ldm_checkpoint={evil}")
    assert not marker.exists()


def test_bad_timestep_settings():
    with pytest.raises(ConfigError, match="model.t_max"):
        make_stage("model.t_max=0")
    with pytest.raises(ConfigError, match="model.sample_strength"):
        make_stage("model.sample_strength=0")
    with pytest.raises(ConfigError, match="model.prompt_error"):
        make_stage("model.prompt_error=1")


def test_wrong_labels_swap_the_given_fraction_for_other_classes():
    from lit_restore.stages.scm import wrong_labels

    labels = torch.arange(8).repeat(2000)
    out = wrong_labels(labels, 0.3, 8, torch.Generator().manual_seed(0))
    changed = out != labels
    assert 0.28 < changed.float().mean() < 0.32 and 0 <= int(out.min()) and int(out.max()) < 8
    # A swapped label is any other class alike: its offset from the true one is uniform over 1..7.
    offsets = torch.bincount((out - labels)[changed] % 8, minlength=8)
    assert offsets[0] == 0 and offsets[1:].min() > 0.8 * offsets[1:].max()
    assert torch.equal(wrong_labels(labels, 0.0, 8), labels)


def test_fit_tiny_config(sample_shards, tmp_path):
    from lit_restore.fit import fit

    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
                             f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.batch_size=2",
                             "data.crop=32", "trainer.max_steps=2", "trainer.val_check_interval=2",
                             "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"])
    trainer = fit(cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 2
    assert math.isfinite(metrics["train/loss"]) and 0 < metrics["val/psnr"] < 60 and 0 < metrics["val/psnr_ldm"] < 60
    assert list((tmp_path / "run" / "samples").glob("val_corrected_*.png"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith(("scm.", "degrader.")) or "." not in k for k in ckpt["state_dict"]), list(ckpt["state_dict"])[:5]


def test_the_tiny_config_fine_tunes_the_shipped_scm_foundation():
    """The demo's SCM step: configs/tiny/scm.yaml with model.pretrained at the shipped foundation
    (the same sizes, every tensor loaded)."""
    from safetensors.torch import load_file

    path = ROOT / "foundations" / "tiny" / "scm" / "model.safetensors"
    state = load_file(str(path))
    stage = make_stage(f"model.pretrained={path}")
    for k, v in stage.scm.state_dict().items():
        assert torch.equal(state[f"scm.{k}"], v), k
