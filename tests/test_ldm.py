import huggingface_hub.constants
import pytest
import torch

from lit_restore.config import load_config
from lit_restore.models.ldm import (
    LatentDiffusion, ddpm_scheduler, load_unet, load_vae, min_snr_weight, predict_x0, widen_conv_in,
)


@pytest.fixture(scope="module")
def tiny():
    return load_config("configs/tiny/ldm.yaml").model


@pytest.fixture(scope="module")
def ldm(tiny):
    torch.manual_seed(0)
    return LatentDiffusion(widen_conv_in(load_unet("", tiny.unet_cfg)), load_vae("", tiny.vae_cfg)).eval()


def test_widen_conv_in_keeps_weights_bias_and_function(tiny):
    torch.manual_seed(0)
    unet = load_unet("", tiny.unet_cfg).eval()
    assert unet.config.in_channels == 4
    with torch.no_grad():
        unet.conv_in.bias.normal_()  # a nonzero bias, as in a pretrained UNet
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    z, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(z, t, encoder_hidden_states=ctx).sample
    widen_conv_in(unet, 8)
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], old_w)
    assert torch.equal(unet.conv_in.bias, old_b)
    assert unet.conv_in.weight[:, 4:].abs().sum() == 0
    with torch.no_grad():
        after = unet(torch.cat([z, torch.randn_like(z)], 1), t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(after, before)  # the zero channels ignore the new input
    assert widen_conv_in(unet, 8) is unet and unet.conv_in.in_channels == 8  # idempotent


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
        return ldm.sample(lq, ctx, null, steps=3, sampler=sampler, generator=g, **kw)

    a = run(0)
    assert a.shape == lq.shape and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(run(0), a)
    assert not torch.allclose(run(1), a)
    assert not torch.allclose(run(0, guidance_text=3.0, guidance_image=1.5), a)
    assert run(0, sampler="ddim").shape == lq.shape
    with pytest.raises(ValueError, match="unknown sampler"):
        run(0, sampler="heun")


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
    assert ldm.decode(z).shape == x.shape


def test_offline_pretrained_gives_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"\(offline\?\).*model.pretrained=/path/to/folder") as e:
        load_unet("runwayml/stable-diffusion-v1-5")
    assert "\n" not in str(e.value)
    (tmp_path / "sd").mkdir()
    with pytest.raises(OSError, match="has no diffusers vae/ folder") as e:
        load_vae(str(tmp_path / "sd"), key="model.ldm.pretrained")
    assert str(e.value).startswith("model.ldm.pretrained:")
