"""Autoencoder: a diffusers AutoencoderKL trained to reconstruct clean photos (Stable Diffusion's VAE).

At full scale the LDM starts from SD-1.5's VAE. Where that cannot be downloaded, or for the tiny
pipeline that stands in for the full one on a CPU, this stage makes the VAE with the same recipe
in miniature: reconstruction loss plus a small KL term toward N(0, 1) (SD's weight 1e-6, so the
latent is near-deterministic), on clean crops only. Validation measures the reconstruction PSNR
(posterior mode, as the LDM's condition latent uses it) and the latents' standard deviation; the
export writes `1 / std` as the VAE's `scaling_factor`, the same rule SD used for 0.18215, so the
LDM's diffusion latents have unit variance whatever the autoencoder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from lit_restore.config import RunConfig
from lit_restore.losses import image_loss, masked_mean
from lit_restore.stages.base import Stage


def kl_per_pixel(posterior, pixels: int) -> Tensor:
    """Per-sample KL(q(z|x) ‖ N(0, 1)) summed over the latent and divided by the image's values,
    so `kl_weight` weighs it against a per-pixel mean loss as SD's summed losses do."""
    return posterior.kl() / pixels


class AutoencoderStage(Stage):
    """Trains an AutoencoderKL on clean images."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.vae: AutoencoderKL | None = None
        # Latent statistics of the last validation, for the exported scaling_factor.
        self.register_buffer("latent_std", torch.ones(()))
        self._val_sum = self._val_sq = self._val_n = 0.0

    def configure_model(self) -> None:
        if self.vae is None:
            self.vae = AutoencoderKL(**dict(self.cfg.model.vae_cfg))

    @property
    def factor(self) -> int:
        """Downsampling factor from image to latent."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        # Clean photos only: SD's autoencoder never sees the restoration degradations either.
        gt, keys, valid = self.clean_batch(batch)
        return {"gt": gt, "key": keys, "valid": valid}

    def losses(self, gt: Tensor, sample: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reconstruction [0,1], per-sample reconstruction loss, per-sample KL term, latents)."""
        x = gt * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        rec = image_loss(self.cfg.model.loss, recon.float(), x.float())
        kl = kl_per_pixel(posterior, x[0].numel())
        return ((recon.float() + 1) / 2).clamp(0, 1), rec, kl, z

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        _, rec, kl, _ = self.losses(batch["gt"], sample=True)
        loss = rec.mean() + self.cfg.model.kl_weight * kl.mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/kl", kl.mean())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = self._val_sq = self._val_n = 0.0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        valid = batch["valid"]
        recon, rec, kl, z = self.losses(batch["gt"], sample=False)
        w = valid.to(rec.dtype)
        self.log("val/loss", masked_mean(rec, valid), batch_size=int(valid.shape[0]))
        self.log_restoration_metrics(recon, batch["gt"], valid)
        zv = z.float() * w[:, None, None, None]
        self._val_sum += float(zv.sum())
        self._val_sq += float(zv.pow(2).sum())
        self._val_n += float(w.sum()) * z[0].numel()
        if batch_idx == 0:
            self.log_image_grid("val/reconstructed", [batch["gt"], recon])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._val_n > 0:
            mean = self._val_sum / self._val_n
            std = max(self._val_sq / self._val_n - mean**2, 1e-12) ** 0.5
            self.latent_std.fill_(std)
            self.log("val/latent_std", std)

    def prepare_export(self) -> None:
        self.vae.register_to_config(scaling_factor=float(1.0 / self.latent_std))

    def export_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

