"""SCM: a NAFNet that corrects the frozen LDM's output, out = ldm + w·N([lq ‖ ldm]) (AutoDIR stage 3).

The LDM (UNet, VAE, prompt contexts) is frozen and kept out of this stage's checkpoint and
optimizer: it is rebuilt in `setup` from `model.ldm` and `model.ldm_checkpoint`. What the SCM
corrects is, by default, AutoDIR's cheap stand-in for a sampler run: the x0 estimate decoded
from the GT latent noised to a random timestep. `t_power` > 1 biases that timestep low;
`ldm_input=sample` runs the short sampler `restore` runs instead (`sample_steps`,
`sample_strength`: what inference really produces). Real use needs the trained LDM
(`model.ldm_checkpoint`); without one the tiny config corrects the untuned tiny foundations.
`model.pretrained` fine-tunes an SCM (the tiny SCM foundation) instead of a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio

from lit_restore.config import RunConfig
from lit_restore.data.degrade.types import DEGRADATION_TYPES, TYPES_KEY, align_type_rows, recorded_types
from lit_restore.losses import image_loss, masked_mean
from lit_restore.models.ldm import (DTYPES, NULL_PROMPT, LatentDiffusion, build_latent_diffusion, check_prediction_type,
                                   condition_dropout, predict_x0, prompt_bank)
from lit_restore.models.scm import StructureCorrection, build_scm
from lit_restore.stages.base import Stage
from lit_restore.weights import WeightsError, load_checkpoint, load_module_weights


# Where a whole StructureCorrection sits: an scm checkpoint's or export's `scm`, or bare.
_SCM_PREFIXES = ("scm.", "")


@dataclass
class FrozenLDM:
    """The LDM the SCM corrects. Not an nn.Module, so it stays out of the SCM's state dict."""

    ldm: LatentDiffusion
    context_bank: Tensor


def wrong_labels(labels: Tensor, fraction: float, classes: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """`labels` with each replaced, with probability `fraction`, by one of the other `classes`
    drawn uniformly."""
    u = torch.rand(labels.shape, device=labels.device, generator=generator)
    other = torch.randint(1, classes, labels.shape, device=labels.device, generator=generator)
    return torch.where(u < fraction, (labels + other) % classes, labels)


def load_ldm_checkpoint(ldm: LatentDiffusion, path: str) -> Tensor:
    """Load an ldm stage checkpoint's UNet (its EMA when it has one) and VAE; return its prompt
    contexts, one row per degradation type of this install (a type the LDM was not trained with
    gets the empty prompt's context), then the empty prompt's. The checkpoint's prediction type
    must be the one `ldm` samples with."""
    try:
        ckpt = load_checkpoint(path)
    except WeightsError as e:
        raise WeightsError(f"model.ldm_checkpoint: {e} (give an ldm stage .ckpt)") from None
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or "context_bank" not in state:
        raise WeightsError(f"model.ldm_checkpoint: {path} is not an ldm stage checkpoint (no context_bank)")
    trained: object = ckpt
    for key in ("hyper_parameters", "config", "model", "prediction_type"):  # what the run was configured with
        trained = trained.get(key) if isinstance(trained, dict) else None
    check_prediction_type(ldm.scheduler.config.prediction_type, trained if isinstance(trained, str) else None,
                          path, "model.ldm")
    unet_prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "ldm.unet."
    for module, prefix in ((ldm.unet, unet_prefix), (ldm.vae, "ldm.vae.")):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub)
        except RuntimeError as e:
            raise WeightsError(f"model.ldm_checkpoint: {path} does not match model.ldm "
                             f"({str(e).splitlines()[0]})") from None
    bank = {"context_bank": state["context_bank"].float()}
    empty = bank["context_bank"][-1:]
    align_type_rows(bank, recorded_types(ckpt.get(TYPES_KEY), path),
                    {"context_bank": empty.expand(len(DEGRADATION_TYPES) + 1, *empty.shape[1:])}, path)
    return bank["context_bank"]


class SCMStage(Stage):
    """Trains the structure-correction NAFNet on the frozen LDM's output."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.scm: StructureCorrection | None = None
        self.frozen: FrozenLDM | None = None
        self.val_psnr_ldm = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))

    def configure_model(self) -> None:
        if self.scm is not None:
            return
        m = self.cfg.model
        scm = build_scm(m)
        # A zero last conv: a fresh SCM passes the LDM output through and learns its correction from
        # there; a random one adds a random image of its inputs that 150 tiny-demo steps did not undo
        # (val PSNR 19.4 dB against the LDM output's own 20.5; docs/benchmarks.md, "LDM / SCM learning").
        nn.init.zeros_(scm.net.ending.weight)
        nn.init.zeros_(scm.net.ending.bias)
        self.scm = scm

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.configure_model()
            if self.cfg.model.pretrained:
                load_module_weights(self.scm, self.cfg.model.pretrained, _SCM_PREFIXES, "scm")
            self.build_frozen_ldm()

    def build_frozen_ldm(self) -> FrozenLDM:
        m = self.cfg.model
        ldm = build_latent_diffusion(m.ldm, key="model.ldm")
        if m.ldm_checkpoint:
            bank = load_ldm_checkpoint(ldm, m.ldm_checkpoint)
        else:
            bank = prompt_bank(m.ldm.clip, key="model.ldm.clip.pretrained")
        ldm.requires_grad_(False).eval()
        if ldm.unet.dtype != DTYPES[m.ldm.frozen_dtype]:
            ldm.unet.to(DTYPES[m.ldm.frozen_dtype])
        self.frozen = FrozenLDM(ldm, bank)
        return self.frozen

    def frozen_ldm(self) -> FrozenLDM:
        """The frozen LDM on this stage's device (Lightning moves only registered modules)."""
        f = self.frozen if self.frozen is not None else self.build_frozen_ldm()
        if f.context_bank.device != self.device:
            f.ldm.to(self.device)
            f.context_bank = f.context_bank.to(self.device)
        return f

    @torch.no_grad()
    def ldm_output(self, batch: dict, generator: Optional[torch.Generator] = None, drop: bool = False) -> Tensor:
        """What the frozen LDM makes of the batch, [0,1] (B,3,H,W). `drop` applies the LDM's
        classifier-free dropout to its conditions (one_step), as AutoDIR's SCM training does."""
        m = self.cfg.model
        f = self.frozen_ldm()
        ldm, bank = f.ldm, f.context_bank
        lq, gt = batch["lq"], batch["gt"]
        h, w = lq.shape[-2:]
        labels = batch["label"]
        if self.training and m.prompt_error > 0:
            labels = wrong_labels(labels, m.prompt_error, NULL_PROMPT, generator)
        context = bank[labels]
        if m.ldm_input == "sample":
            return ldm.sample(lq, context, bank[NULL_PROMPT:], steps=m.sample_steps, sampler="euler_a",
                              generator=generator, strength=m.sample_strength)
        z0, cond = ldm.encode_pair(ldm.pad(gt), ldm.pad(lq), generator)
        if drop:
            d = m.ldm
            cond, context = condition_dropout(cond, context, bank[NULL_PROMPT], d.drop_text, d.drop_both, d.drop_image,
                                        generator)
        u = torch.rand(z0.shape[0], device=z0.device, generator=generator)
        t = (m.t_max * u.pow(m.t_power)).long().clamp(max=ldm.scheduler.config.num_train_timesteps - 1)
        noise = torch.randn(z0.shape, device=z0.device, generator=generator)
        z_t = ldm.scheduler.add_noise(z0, noise, t)
        x0 = predict_x0(ldm.scheduler, z_t, t, ldm.denoise(ldm.unet, z_t, t, cond, context))
        return ldm.decode(x0)[..., :h, :w]

    def _loss(self, out: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
        return masked_mean(image_loss(self.cfg.model.loss, out, gt), valid)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ldm_out = self.ldm_output(batch, drop=self.cfg.model.cond_dropout)
        out = self.scm(batch["lq"], ldm_out)
        loss = self._loss(out, batch["gt"], batch["valid"])
        self.log_train_loss(loss)
        self.log("train/loss_ldm", self._loss(ldm_out, batch["gt"], batch["valid"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + batch_idx)
        ldm_out = self.ldm_output(batch, g)
        out = self.scm(batch["lq"], ldm_out)
        self.log_restoration_metrics(out, batch["gt"], batch["valid"])
        valid = batch["valid"]
        if bool(valid.any()):
            self.val_psnr_ldm.update(ldm_out[valid], batch["gt"][valid])
        if batch_idx == 0:
            self.log_image_grid("val/corrected", [batch["lq"], ldm_out, out, batch["gt"]])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_psnr_ldm.update_called:
            self.log("val/psnr_ldm", self.val_psnr_ldm.compute())
        self.val_psnr_ldm.reset()

    def export_modules(self) -> dict[str, nn.Module]:
        return {"scm": self.scm}
