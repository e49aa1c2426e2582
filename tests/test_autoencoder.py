"""The autoencoder stage (the tiny VAE foundation's recipe): losses, a few learning steps, the
latent scale it measures and the diffusers folder its export writes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from lit_restore.config import ConfigError, load_config, to_dict
from lit_restore.export import export_command
from lit_restore.fit import build_stage
from lit_restore.losses import image_loss
from lit_restore.stages.autoencoder import kl_per_pixel

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "foundations" / "autoencoder.yaml"


def stage(*overrides: str):
    torch.manual_seed(0)
    s = build_stage(load_config(RECIPE, list(overrides)))
    s.configure_model()
    return s.train()


def test_losses_are_per_sample_and_weighted_like_sd():
    target = torch.zeros(2, 3, 4, 4)
    recon = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5)])
    assert image_loss("l1", recon, target).tolist() == [0.0, 0.5]
    assert image_loss("mse", recon, target).tolist() == [0.0, 0.25]

    class Posterior:  # KL summed over the latent, as diffusers' DiagonalGaussianDistribution.kl()
        def kl(self):
            return torch.tensor([48.0, 96.0])

    assert kl_per_pixel(Posterior(), 48).tolist() == [1.0, 2.0]


def test_recipe_config_is_checked():
    with pytest.raises(ConfigError, match="model.kl_weight"):
        build_stage(load_config(RECIPE, ["model.kl_weight=-1"]))
    with pytest.raises(ConfigError, match="model.loss"):
        load_config(RECIPE, ["model.loss=gan"])


def test_a_few_steps_lower_the_reconstruction_loss_of_a_batch():
    s = stage()
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=32, mode="bilinear")
    batch = s.on_after_batch_transfer({"gt": (smooth * 255).round().to(torch.uint8), "key": [f"k{i}" for i in range(4)]})
    assert set(batch) == {"gt", "key", "valid"}  # clean images only: no degradation
    opt = torch.optim.Adam(s.vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        _, rec, kl, _ = s.losses(batch["gt"], sample=True)
        loss = rec.mean() + s.cfg.model.kl_weight * kl.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(rec.mean().detach()))
    assert losses[-1] < 0.6 * losses[0]
    assert s.factor == 2  # the recipe's two levels


def test_export_writes_a_diffusers_vae_whose_scaling_factor_is_one_over_the_latent_std(tmp_path):
    s = stage()
    s.latent_std.fill_(4.0)  # what the last validation measured
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": s.state_dict(), "hyper_parameters": {"config": to_dict(s.cfg)}, "global_step": 7}, ckpt)
    assert export_command(str(ckpt), str(tmp_path / "weights"), onnx=False) == 0
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "weights" / "autoencoder" / "vae"))
    assert math.isclose(vae.config.scaling_factor, 0.25)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.encode(x).latent_dist.mode(), s.vae.eval().encode(x).latent_dist.mode(), atol=1e-6)


def test_validation_measures_the_latent_std():
    s = stage().eval()
    gt = torch.rand(2, 3, 32, 32)
    s.on_validation_epoch_start()
    with torch.no_grad():
        z = s.vae.encode(gt * 2 - 1).latent_dist.mode()
        s._val_sum, s._val_sq, s._val_n = float(z.sum()), float(z.pow(2).sum()), float(z.numel())
    s.on_validation_epoch_end()
    assert math.isclose(float(s.latent_std), float(z.std(unbiased=False)), rel_tol=1e-4)
