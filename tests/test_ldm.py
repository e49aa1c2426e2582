import huggingface_hub.constants
import pytest
import torch

from _batches import device_batch, tiny_stage
from lit_restore.config import ConfigError, load_config
from lit_restore.models.ldm import (
    LatentDiffusion, ddpm_scheduler, load_unet, load_vae, min_snr_weight, predict_x0, widen_conv_in,
)


@pytest.fixture(scope="module")
def tiny():
    return load_config("configs/tiny/ldm.yaml").model


@pytest.fixture(scope="module")
def ldm(tiny):
    torch.manual_seed(0)
    vae = load_vae(tiny.pretrained, tiny.vae_cfg)
    return LatentDiffusion(widen_conv_in(load_unet(tiny.pretrained, tiny.unet_cfg), 2 * vae.config.latent_channels),
                           vae).eval()


def test_widen_conv_in_keeps_weights_bias_and_function():
    torch.manual_seed(0)
    plain = load_config("configs/foundations/ldm.yaml").model  # reads the tiny UNet foundation, as SD-1.5's
    unet = load_unet(plain.pretrained, plain.unet_cfg).eval()
    c = unet.config.in_channels
    assert c == load_vae(plain.pretrained, plain.vae_cfg).config.latent_channels
    with torch.no_grad():
        unet.conv_in.bias.normal_()  # a nonzero bias, whatever the foundation learnt
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    z, t, ctx = torch.randn(2, c, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(z, t, encoder_hidden_states=ctx).sample
    widen_conv_in(unet, 2 * c)
    assert unet.config.in_channels == 2 * c and unet.conv_in.in_channels == 2 * c
    assert torch.equal(unet.conv_in.weight[:, :c], old_w)
    assert torch.equal(unet.conv_in.bias, old_b)
    assert unet.conv_in.weight[:, c:].abs().sum() == 0
    with torch.no_grad():
        after = unet(torch.cat([z, torch.randn_like(z)], 1), t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(after, before)  # the zero channels ignore the new input
    assert widen_conv_in(unet, 2 * c) is unet and unet.conv_in.in_channels == 2 * c  # idempotent


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_forward_process(prediction_type):
    sched = ddpm_scheduler(prediction_type)
    z0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    z_t = sched.add_noise(z0, noise, t)
    out = noise if prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
    torch.testing.assert_close(predict_x0(sched, z_t, t, out), z0, atol=2e-3, rtol=1e-3)


def test_min_snr_weights():
    t = torch.tensor([0, 100, 500, 999])
    eps = min_snr_weight(ddpm_scheduler("epsilon"), t, 5.0)
    assert eps[0] < eps[1] < 1.0 and torch.allclose(eps[2:], torch.ones(2))  # only high-SNR steps are damped
    v = min_snr_weight(ddpm_scheduler("v_prediction"), t, 5.0)
    assert (v < eps).all() and (v > 0).all()


def test_sample_shapes_determinism_and_guidance(ldm):
    lq = torch.rand(2, 3, 36, 44)  # not a multiple of the latent grid
    ctx, null = torch.randn(2, 77, 32), torch.randn(1, 77, 32)

    def run(seed, sampler="euler_a", **kw):
        g = torch.Generator().manual_seed(seed)
        return ldm.sample(lq, ctx, null, steps=2, sampler=sampler, generator=g, **kw)

    a = run(0)
    assert a.shape == lq.shape and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(run(0), a)
    assert not torch.allclose(run(1), a)
    assert not torch.allclose(run(0, guidance_text=3.0, guidance_image=1.5), a)
    assert run(0, sampler="ddim").shape == lq.shape
    with pytest.raises(ValueError, match="unknown sampler"):
        run(0, sampler="heun")


def test_strength_starts_from_the_inputs_latent_and_runs_that_share_of_the_steps(ldm):
    """SDEdit: strength 0.3 of 10 steps is 3 UNet passes from the input's noised latent; a weak
    strength lands near the input's VAE reconstruction, pure noise (strength 1) far from it."""
    lq = torch.rand(1, 3, 32, 32)
    ctx, null = torch.zeros(1, 77, 32), torch.zeros(1, 77, 32)
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.unet(*args, **kwargs)

    counting = Counting(ldm.unet)
    with torch.no_grad():
        recon = ldm.decode(ldm.encode_condition(lq) * ldm.vae.config.scaling_factor)
    for sampler in ("euler_a", "ddim"):
        def run(strength):
            calls.clear()
            out = ldm.sample(lq, ctx, null, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(0),
                             unet=counting, strength=strength)
            return out, len(calls)

        (full, n_full), (_, n_part), (weak, _) = run(1.0), run(0.3), run(0.1)
        assert (n_full, n_part) == (10, 3), sampler
        assert (weak - recon).pow(2).mean() < 0.25 * (full - recon).pow(2).mean(), sampler
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            ldm.sample(lq, ctx, null, steps=2, strength=bad)


def test_latent_convention(ldm):
    x = torch.rand(2, 3, 32, 32)
    cond = ldm.encode_condition(x)
    with torch.no_grad():
        mode = ldm.vae.encode(x * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(cond, mode)  # condition: unscaled mode (IP2P / AutoDIR)
    z = ldm.encode_target(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample = ldm.vae.encode(x * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, sample * ldm.vae.config.scaling_factor)  # target: scaled sample
    y = torch.rand(2, 3, 32, 32)
    z_pair, cond_pair = ldm.encode_pair(x, y, torch.Generator().manual_seed(0))  # one VAE pass for both
    torch.testing.assert_close(z_pair, z)
    torch.testing.assert_close(cond_pair, ldm.encode_condition(y))
    assert ldm.decode(z).shape == x.shape


def test_offline_pretrained_gives_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"not in the local Hugging Face cache.*model.pretrained=/path/to/folder") as e:
        load_unet("runwayml/stable-diffusion-v1-5")
    assert "\n" not in str(e.value)
    (tmp_path / "sd").mkdir()
    with pytest.raises(OSError, match="has no diffusers vae/ folder") as e:
        load_vae(str(tmp_path / "sd"), key="model.ldm.pretrained")
    assert str(e.value).startswith("model.ldm.pretrained:")


# ----------------------------------------------------------------------------- LDM stage

TINY = "configs/tiny/ldm.yaml"


def make_stage(*overrides: str):
    return tiny_stage("ldm", "data.batch_size=4", *overrides, fit_setup=True)



def test_stage_trains_the_unet_only_and_keeps_an_ema():
    stage = make_stage()
    assert stage.manages_own_ema and stage.ema is not None
    vae_before = {k: v.clone() for k, v in stage.ldm.vae.state_dict().items()}
    bank = stage.context_bank.clone()
    assert bank.abs().sum() > 0  # filled from the text tower in setup
    unet_before = [p.detach().clone() for p in stage.ldm.unet.parameters()]
    trainable = {id(p) for p in stage.trainable_parameters()}
    assert trainable == {id(p) for p in stage.ldm.unet.parameters()}
    opt = torch.optim.AdamW(stage.trainable_parameters(), lr=1e-3)
    for step in range(2):
        batch = device_batch(stage, n=2, seed=step)
        loss = stage.training_step(batch, step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stage.ema.update_parameters(stage.ldm.unet)  # what on_train_batch_end does after the base's logging
    assert all(torch.equal(v, stage.ldm.vae.state_dict()[k]) for k, v in vae_before.items())
    assert torch.equal(bank, stage.context_bank)
    unet_after = list(stage.ldm.unet.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, unet_after))
    ema = list(stage.ema.module.parameters())
    # The EMA sits between the first step's weights and the current ones, and never trains.
    assert int(stage.ema.n_averaged) == 2 and not any(p.requires_grad for p in ema)
    assert any(not torch.equal(a, b) for a, b in zip(ema, unet_after))
    assert stage.export_modules()["unet"] is stage.ema.module


@pytest.mark.parametrize("drop, text_dropped, image_dropped", [
    ("model.drop_text=1", True, False), ("model.drop_both=1", True, True), ("model.drop_image=1", False, True)])
def test_classifier_free_dropout_bands(drop, text_dropped, image_dropped):
    from lit_restore.models.ldm import NULL_PROMPT

    zero = ["model.drop_text=0", "model.drop_both=0", "model.drop_image=0"]
    stage = make_stage(*zero, drop)
    batch = device_batch(stage)
    with torch.no_grad():
        latent = stage.ldm.encode_condition(batch["lq"])
        cond, context = stage.conditions(latent, batch["label"], drop=True)
        kept_cond, kept_context = stage.conditions(latent, batch["label"], drop=False)
    null = stage.context_bank[NULL_PROMPT].expand_as(context)
    assert torch.equal(context, null) == text_dropped
    assert torch.equal(kept_context, stage.context_bank[batch["label"]])
    assert (cond.abs().sum() == 0) == image_dropped and kept_cond.abs().sum() > 0


def test_v_prediction_min_snr_and_validation_outputs(tmp_path):
    stage = make_stage(f"out_dir={tmp_path}", "model.prediction_type=v_prediction", "model.snr_gamma=5",
                       "model.val_steps=2").eval()
    batch = device_batch(stage, size=40)  # not a multiple of the latent grid: padded and cropped
    assert torch.isfinite(stage.training_step(batch, 0))
    with torch.no_grad():
        stage.validation_step(batch, 0)
    assert stage.val_psnr.update_called
    assert len(list((tmp_path / "samples").glob("val_restored_*.png"))) == 1


def test_an_ldm_is_refused_under_another_prediction_type():
    """The tiny LDM foundation was trained for v-prediction (its scheduler config says so): an epsilon
    config would sample it into blotches without an error, so it is refused in one line. A plain
    denoiser (the UNet foundation, SD-1.5's UNet) may change objective while it learns the condition."""
    from lit_restore.stages.ldm import LDMStage

    with pytest.raises(ConfigError, match=r"^model.prediction_type: epsilon, but foundations/tiny/ldm is an LDM trained "
                                          r"for v_prediction; set model.prediction_type=v_prediction$"):
        LDMStage(load_config(TINY, ["model.prediction_type=epsilon"])).configure_model()
    for prediction in ("epsilon", "v_prediction"):
        LDMStage(load_config("configs/foundations/ldm.yaml", [f"model.prediction_type={prediction}"])).configure_model()


def test_cross_attention_width_must_match_the_text_tower():
    from lit_restore.stages.ldm import LDMStage

    with pytest.raises(Exception, match="cross_attention_dim 32 must equal the CLIP text width 16"):
        LDMStage(load_config(TINY, ["model.clip.model_cfg.text_cfg.width=16"])).configure_model()


def test_fit_tiny_config(sample_shards, tmp_path):
    import math

    from lit_restore.fit import fit

    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
                             f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.batch_size=2",
                             "data.crop=32", "model.val_steps=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                             "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"])
    trainer = fit(cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 2
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"]) and 0 < metrics["val/psnr"] < 60
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "context_bank" in ckpt["state_dict"] and any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    assert int(trainer.lightning_module.ema.n_averaged) == 2
