"""LDM: InstructPix2Pix-style fine-tuning of a Stable Diffusion UNet for restoration (AutoDIR stage 2).

The UNet sees [noisy GT latent ‖ degraded-image latent] and, through cross-attention, the CLIP
token states of the prompt of the sample's true degradation. Per sample the text, the image or
both are dropped (5/5/5 %) so classifier-free guidance works at inference. The VAE and the text
tower are frozen; the text tower's states for every prompt are computed once into
`context_bank` (saved with the checkpoint). The stage keeps its own EMA of the UNet, which
validation samples with and export writes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lit_restore.config import RunConfig
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.losses import masked_mean
from lit_restore.models.ldm import (NULL_PROMPT, LatentDiffusion, build_latent_diffusion, condition_dropout, min_snr_weight,
                                   prompt_bank, text_shape)
from lit_restore.stages.base import Stage

class LDMStage(Stage):
    """Trains the UNet of a latent diffusion model to restore, conditioned on the degraded latent
    and the degradation prompt."""

    manages_own_ema = True  # an EMA of the UNet only; the frozen VAE needs none

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.ldm: LatentDiffusion | None = None
        self.register_buffer("context_bank", None)

    def configure_model(self) -> None:
        if self.ldm is not None:
            return
        m = self.cfg.model
        ldm = build_latent_diffusion(m)
        if m.grad_checkpointing:
            ldm.unet.enable_gradient_checkpointing()
        length, width = text_shape(m.clip)
        self.context_bank = torch.zeros(len(DEGRADATION_TYPES) + 1, length, width)
        self.track_ema(ldm.unet)
        self.ldm = ldm

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # Here rather than in configure_model: export rebuilds the stage without the CLIP weights,
        # and a resumed run's checkpoint brings the same bank back.
        self.configure_model()
        self.context_bank.copy_(prompt_bank(self.cfg.model.clip))

    @property
    def inference_unet(self) -> nn.Module:
        return self.averaged(self.ldm.unet)

    def conditions(self, cond: Tensor, label: Tensor, drop: bool,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(condition latent, text context) per sample from the degraded images' latents and
        labels, with classifier-free dropout when `drop`."""
        context = self.context_bank[label]
        if drop:
            m = self.cfg.model
            cond, context = condition_dropout(cond, context, self.context_bank[NULL_PROMPT], m.drop_text, m.drop_both,
                                        m.drop_image, generator)
        return cond, context

    def diffusion_loss(self, unet: nn.Module, batch: dict, drop: bool,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample denoising loss (ε or v target, optional Min-SNR weights) at random timesteps."""
        sched = self.ldm.scheduler
        with torch.no_grad():
            if self.cfg.model.image_condition:
                z0, cond = self.ldm.encode_pair(self.ldm.pad(batch["gt"]), self.ldm.pad(batch["lq"]), generator)
                cond, context = self.conditions(cond, batch["label"], drop, generator)
            else:  # a plain denoiser: no condition latent, the empty prompt
                z0 = self.ldm.encode_target(self.ldm.pad(batch["gt"]), generator)
                cond, context = None, self.context_bank[NULL_PROMPT].expand(z0.shape[0], -1, -1)
        noise = torch.randn(z0.shape, device=z0.device, generator=generator)
        t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],), device=z0.device, generator=generator)
        z_t = sched.add_noise(z0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
        per_sample = (self.ldm.denoise(unet, z_t, t, cond, context) - target).pow(2).mean(dim=(1, 2, 3))
        if self.cfg.model.snr_gamma > 0:
            per_sample = per_sample * min_snr_weight(sched, t, self.cfg.model.snr_gamma)
        return per_sample

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = masked_mean(self.diffusion_loss(self.ldm.unet, batch, drop=True), batch["valid"])
        self.log_train_loss(loss)
        return loss

    def ema_source(self) -> nn.Module:
        return self.ldm.unet

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        m = self.cfg.model
        # The same noise and timesteps for the same batch on every validation run.
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + batch_idx)
        unet = self.inference_unet
        loss = masked_mean(self.diffusion_loss(unet, batch, drop=False, generator=g), batch["valid"])
        self.log("val/loss", loss, batch_size=batch["gt"].shape[0], sync_dist=True)
        if not m.image_condition:
            return  # a plain denoiser has nothing to restore from
        context = self.context_bank[batch["label"]]
        pred = self.ldm.sample(batch["lq"], context, self.context_bank[NULL_PROMPT:], steps=m.val_steps,
                               sampler=m.val_sampler, generator=g, unet=unet)
        self.log_restoration_metrics(pred, batch["gt"], batch["valid"])
        if batch_idx == 0:
            self.log_image_grid("val/restored", [batch["lq"], pred, batch["gt"]])

    def export_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.inference_unet, "vae": self.ldm.vae}
