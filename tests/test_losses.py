"""The pixel losses the restorer, SCM and autoencoder choose from (lit_restore.losses)."""

import dataclasses
import math

import pytest
import torch

from lit_restore.config import AutoencoderModelConfig, RestorerModelConfig, SCMModelConfig
from lit_restore.losses import IMAGE_LOSSES, PSNR_MSE_CROSSOVER_DB, batch_loss, image_loss, masked_mean


@pytest.mark.parametrize("config", [RestorerModelConfig, SCMModelConfig, AutoencoderModelConfig])
def test_every_loss_a_config_allows_is_in_the_losses_module(config):
    choices = next(f for f in dataclasses.fields(config) if f.name == "loss").metadata["choices"]
    assert set(choices) <= IMAGE_LOSSES.keys()


@pytest.mark.parametrize("name", sorted(IMAGE_LOSSES))
def test_batch_loss_is_the_mean_of_the_per_image_losses(name):
    gen = torch.Generator().manual_seed(0)
    gt, pred = torch.rand(4, 3, 8, 8, generator=gen), torch.rand(4, 3, 8, 8, generator=gen)
    per_image = image_loss(name, pred, gt)
    assert per_image.shape == (4,) and not torch.allclose(per_image, per_image[:1].expand(4))
    torch.testing.assert_close(batch_loss(name, pred, gt), per_image.mean())


def test_psnr_loss_is_negative_psnr():
    gt = torch.zeros(2, 3, 8, 8)
    pred = torch.full_like(gt, 0.1)  # mse 0.01 → 20 dB
    assert math.isclose(float(batch_loss("psnr", pred, gt)), -20.0, rel_tol=1e-5)


@pytest.mark.parametrize("db", [10.0, 20.0, 35.0])
def test_psnr_mse_loss_weighs_low_psnr_images_up(db):
    gt = torch.zeros(1, 3, 8, 8)
    grads = []
    for name in ("psnr", "psnr_mse"):
        pred = torch.full_like(gt, 10.0 ** (-db / 20.0)).requires_grad_()  # PSNR = db
        batch_loss(name, pred, gt).backward()
        grads.append(pred.grad.abs().sum().item())
    # Extra pull over the PSNR loss: 1 + mse / crossover mse (x2 at the crossover, ~x1 far above).
    expected = 1.0 + 10.0 ** ((PSNR_MSE_CROSSOVER_DB - db) / 10.0)
    assert math.isclose(grads[1] / grads[0], expected, rel_tol=1e-3)


def test_masked_mean_leaves_out_padding_samples():
    values = torch.tensor([1.0, 3.0, 100.0])
    assert float(masked_mean(values, torch.tensor([True, True, False]))) == 2.0
    assert float(masked_mean(values, torch.tensor([False, False, False]))) == 0.0
