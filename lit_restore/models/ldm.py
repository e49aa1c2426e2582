"""Latent diffusion for restoration: a Stable Diffusion UNet conditioned InstructPix2Pix-style on
the degraded image's latent (channel concat) and on CLIP token states (cross-attention).

Built on diffusers: `UNet2DConditionModel`, `AutoencoderKL`, `DDPMScheduler` with SD's
scaled-linear betas (0.00085 → 0.012, 1000 steps). Images enter and leave in [0, 1].
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from torch import Tensor, nn

from lit_restore.config import CLIPTextConfig, ConfigError, LDMModelConfig
from lit_restore.data.degrade.types import DEGRADATION_TYPES, prompt_for
from lit_restore.models.clip import PromptCLIP, create_clip
from lit_restore.weights import WeightsError

SAMPLERS = ("euler_a", "ddim")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ddpm_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise schedule of Stable Diffusion 1.x."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False,
    )


def _from_pretrained(cls: Any, pretrained: str, subfolder: str, key: str, config_only: bool = False) -> Any:
    try:
        if config_only:
            return cls.load_config(pretrained, subfolder=subfolder)
        if torch.get_default_device().type == "meta":
            # Architecture only (`lit-restore fit --check`): config.json is read, the weights are not.
            return cls.from_config(cls.load_config(pretrained, subfolder=subfolder))
        return cls.from_pretrained(pretrained, subfolder=subfolder)
    except OSError:
        if Path(pretrained).is_dir():
            raise WeightsError(f"{key}: {pretrained} has no diffusers {subfolder}/ folder (config.json + weights)") from None
        import huggingface_hub.constants

        where = ("is not in the local Hugging Face cache (fit --check and HF_HUB_OFFLINE=1 download nothing)"
                 if huggingface_hub.constants.HF_HUB_OFFLINE else "cannot be loaded (offline?)")
        raise WeightsError(
            f"'{pretrained}' {subfolder} {where}: download the Stable Diffusion folder on a machine with internet "
            f"and set {key}=/path/to/folder (with unet/ and vae/ subfolders); HF_HUB_OFFLINE=1 skips the download "
            "retries"
        ) from None


def architecture_config(cls: Any, pretrained: str, subfolder: str, key: str = "model.pretrained") -> dict[str, Any]:
    """The constructor kwargs of `cls` in `pretrained`'s `subfolder`/config.json; no weights read.
    Its numbers and keys are checked (`lit_restore.weights_folder`): the folder may be a stranger's."""
    from lit_restore.weights_folder import check_constructor_keys, check_values

    config = _from_pretrained(cls, pretrained, subfolder, key, config_only=True)
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # diffusers' bookkeeping keys
    where = f"{pretrained}/{subfolder}/config.json"
    check_values(config, where)
    check_constructor_keys(cls, config, where)
    return config


def saved_prediction_type(pretrained: str) -> Optional[str]:
    """The prediction type a local diffusers folder's sampler was saved with
    (`scheduler/scheduler_config.json`); None for a model id or a folder without one."""
    path = Path(pretrained) / "scheduler" / "scheduler_config.json"
    if not pretrained or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("prediction_type")
    except (OSError, ValueError, AttributeError):
        raise WeightsError(f"{path}: not a readable scheduler config (JSON object)") from None
    return value if isinstance(value, str) else None


def load_unet(pretrained: str, config: Optional[dict[str, Any]] = None, key: str = "model.pretrained") -> UNet2DConditionModel:
    """The UNet from `pretrained` (model id or local folder, subfolder unet/), or random from `config`."""
    if config is not None:
        return UNet2DConditionModel(**copy.deepcopy(dict(config)))
    return _from_pretrained(UNet2DConditionModel, pretrained, "unet", key)


def load_vae(pretrained: str, config: Optional[dict[str, Any]] = None, key: str = "model.pretrained") -> AutoencoderKL:
    """The VAE from `pretrained` (subfolder vae/), or random from `config`."""
    if config is not None:
        return AutoencoderKL(**copy.deepcopy(dict(config)))
    return _from_pretrained(AutoencoderKL, pretrained, "vae", key)


@torch.no_grad()
def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = 8) -> UNet2DConditionModel:
    """Give the UNet `in_channels` inputs: the pretrained weights and bias stay on the first
    channels and the new channels start at zero, so the widened UNet computes exactly what the
    pretrained one did until training moves the new weights."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise ValueError(f"conv_in already has {old.in_channels} input channels, more than {in_channels}")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def alphas_cumprod(scheduler: DDPMScheduler, t: Tensor) -> Tensor:
    """ᾱ_t for a batch of integer timesteps, shaped (B,1,1,1)."""
    return scheduler.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)


def predict_x0(scheduler: DDPMScheduler, z_t: Tensor, t: Tensor, model_out: Tensor) -> Tensor:
    """One-step estimate of the clean latent from the UNet output at timestep t."""
    a = alphas_cumprod(scheduler, t)
    if scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * z_t - (1 - a).sqrt() * model_out
    return (z_t - (1 - a).sqrt() * model_out) / a.sqrt()


def min_snr_weight(scheduler: DDPMScheduler, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample, for ε- or v-prediction targets."""
    a = alphas_cumprod(scheduler, t).view(-1)
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def make_sampler(name: str, scheduler: DDPMScheduler):
    """An inference scheduler on the training schedule. The timestep spacing is passed explicitly:
    `from_config` drops config values that were left at their defaults, so the sampler would get
    its own class default while a saved config says otherwise. Euler ancestral: "linspace", as
    k-diffusion's `get_sigmas` (AutoDIR); DDIM: "leading", as Stable Diffusion's schedulers."""
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(scheduler.config, timestep_spacing="linspace")
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler.config, timestep_spacing="leading")
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


class LatentDiffusion(nn.Module):
    """UNet + VAE + the DDPM schedule, and the few operations the stages and restore share.

    Latent convention (InstructPix2Pix and AutoDIR): the condition latent is the VAE posterior
    mode WITHOUT the scaling factor, the target latent is a posterior sample WITH it. Pretrained
    IP2P/AutoDIR UNets were trained this way, so changing it would break their weights.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.scheduler = ddpm_scheduler(prediction_type)

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.vae.eval()  # the VAE never trains here
        return self

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE and UNet downsampling)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def pad(self, images: Tensor) -> Tensor:
        """Pad H and W (bottom/right, edge values) to multiples of `size_multiple`; crop results back."""
        m = self.size_multiple
        h, w = images.shape[-2:]
        return F.pad(images, (0, (-w) % m, 0, (-h) % m), mode="replicate")

    def _vae_in(self, images: Tensor) -> Tensor:
        return (images * 2 - 1).to(self.vae.dtype)

    def encode_condition(self, images: Tensor) -> Tensor:
        """Unscaled posterior mode of [0,1] images."""
        return self.vae.encode(self._vae_in(images)).latent_dist.mode().float()

    def encode_target(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Scaled posterior sample of [0,1] images: the diffusion's clean latent z_0."""
        z = self.vae.encode(self._vae_in(images)).latent_dist.sample(generator)
        return z.float() * self.vae.config.scaling_factor

    def encode_pair(self, gt: Tensor, lq: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """`encode_target(gt)` and `encode_condition(lq)` from one VAE pass over both batches
        (the same noise draw as encode_target): one launch sequence at twice the batch instead of two."""
        dist = self.vae.encode(self._vae_in(torch.cat([gt, lq]))).latent_dist
        b = gt.shape[0]
        mean, std = dist.mean[:b], dist.std[:b]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z0 = (mean + std * noise).float() * self.vae.config.scaling_factor
        return z0, dist.mode()[b:].float()

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents → [0,1] images."""
        x = self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def denoise(self, unet: nn.Module, z_t: Tensor, t: Tensor, cond_latent: Optional[Tensor], context: Tensor) -> Tensor:
        """UNet output for noisy latents with the condition latent concatenated on channels (none
        for a plain denoiser)."""
        dtype = next(unet.parameters()).dtype
        x = (z_t if cond_latent is None else torch.cat([z_t, cond_latent], dim=1)).to(dtype)
        return unet(x, t, encoder_hidden_states=context.to(dtype)).sample.float()

    @torch.no_grad()
    def sample(
        self,
        lq: Tensor,
        context: Tensor,
        null_context: Tensor,
        steps: int = 20,
        sampler: str = "euler_a",
        guidance_text: float = 1.0,
        guidance_image: float = 1.0,
        generator: Optional[torch.Generator] = None,
        unet: Optional[nn.Module] = None,
        strength: float = 1.0,
    ) -> Tensor:
        """Restore [0,1] images `lq` (B,3,H,W) given text context (B,L,D); [0,1] output of the same size.

        Three-way InstructPix2Pix guidance: ε = ε_u + s_T(ε_c − ε_img) + s_I(ε_img − ε_u), where
        ε_img drops the text (null_context, (1,L,D)) and ε_u also zeroes the image latent. With
        s_T = s_I = 1 this is ε_c, computed in one UNet pass. `unet` overrides self.unet (EMA).
        `strength` < 1 starts from the input's own latent noised to that fraction of the schedule
        and runs only the remaining steps (SDEdit); 1 starts from pure noise (AutoDIR).
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength {strength} must be in (0, 1]")
        unet = self.unet if unet is None else unet
        h, w = lq.shape[-2:]
        cond = self.encode_condition(self.pad(lq))
        sched = make_sampler(sampler, self.scheduler)
        sched.set_timesteps(steps, device=lq.device)
        noise = torch.randn(cond.shape, generator=generator, device=lq.device)
        timesteps = sched.timesteps
        if strength < 1.0:
            skip = (steps - max(1, round(steps * strength))) * sched.order
            timesteps = timesteps[skip:]
            if hasattr(sched, "set_begin_index"):  # Euler counts its steps from here; DDIM needs no index
                sched.set_begin_index(skip)
            z = sched.add_noise(cond * self.vae.config.scaling_factor, noise, timesteps[:1])
        else:
            z = noise * sched.init_noise_sigma
        guided = guidance_text != 1.0 or guidance_image != 1.0
        b = lq.shape[0]
        null = null_context.expand(b, -1, -1)
        for t in timesteps:
            x = sched.scale_model_input(z, t)
            if guided:
                out = self.denoise(unet, torch.cat([x, x, x]), t, torch.cat([cond, cond, torch.zeros_like(cond)]),
                                   torch.cat([context, null, null]))
                e_c, e_img, e_u = out.chunk(3)
                eps = e_u + guidance_text * (e_c - e_img) + guidance_image * (e_img - e_u)
            else:
                eps = self.denoise(unet, x, t, cond, context)
            z = sched.step(eps, t, z, generator=generator).prev_sample
        return self.decode(z)[..., :h, :w]


def text_shape(c: CLIPTextConfig) -> tuple[int, int]:
    """(context length, width) of the text tower's token states, read from its config only."""
    model_cfg = c.model_cfg if c.model_cfg is not None else open_clip.get_model_config(c.arch)
    if model_cfg is None:
        raise ConfigError(f"model.clip.arch: unknown open_clip architecture {c.arch!r}")
    text = model_cfg["text_cfg"]
    return int(text.get("context_length", 77)), int(text.get("width", 512))


def check_prediction_type(configured: str, trained: Optional[str], source: str, key: str) -> None:
    """An image-conditioned UNet sampled or fine-tuned with another objective than it was trained
    for gives noise-coloured blotches, not an error: refuse it in one line. (A plain denoiser,
    e.g. SD-1.5's UNet, may change objective on purpose while it learns the condition.)"""
    if trained is not None and trained != configured:
        raise ConfigError(f"{key}.prediction_type: {configured}, but {source} is an LDM trained for {trained}; "
                          f"set {key}.prediction_type={trained}")


def build_latent_diffusion(m: LDMModelConfig, key: str = "model") -> LatentDiffusion:
    """UNet (conv_in widened for the condition latent) + frozen VAE as configured."""
    unet = load_unet(m.pretrained, m.unet_cfg, key=f"{key}.pretrained")
    vae = load_vae(m.pretrained, m.vae_cfg, key=f"{key}.pretrained")
    latent = vae.config.latent_channels
    if unet.config.out_channels != latent:
        raise ConfigError(f"{key}.unet_cfg: out_channels {unet.config.out_channels} must equal the VAE's "
                          f"latent_channels {latent}")
    if m.unet_cfg is None and unet.config.in_channels == 2 * latent:
        check_prediction_type(m.prediction_type, saved_prediction_type(m.pretrained), m.pretrained, key)
    if m.image_condition:
        widen_conv_in(unet, 2 * latent)
    width = text_shape(m.clip)[1]
    if unet.config.cross_attention_dim != width:
        raise ConfigError(f"{key}.unet_cfg: cross_attention_dim {unet.config.cross_attention_dim} must equal "
                          f"the CLIP text width {width}")
    vae.requires_grad_(False)
    if vae.dtype != DTYPES[m.frozen_dtype]:
        vae.to(DTYPES[m.frozen_dtype])
    return LatentDiffusion(unet, vae, m.prediction_type).train()


# The prompt bank: the text contexts an LDM trains with, one row per degradation type, then the
# empty prompt (row NULL_PROMPT) that classifier-free guidance and condition dropout use.
NULL_PROMPT = len(DEGRADATION_TYPES)


def bank_prompts() -> list[str]:
    """The prompts of `prompt_bank`'s rows: each type's prompt, then the empty prompt."""
    return [prompt_for(t) for t in DEGRADATION_TYPES] + [""]


@torch.no_grad()
def prompt_bank(c: CLIPTextConfig, key: str = "model.clip.pretrained") -> Tensor:
    """(len(DEGRADATION_TYPES) + 1, L, D) token states of `bank_prompts()`."""
    clip = PromptCLIP(create_clip(c.arch, c.pretrained, c.model_cfg, key=key), DEGRADATION_TYPES).eval()
    return clip.token_states(bank_prompts()).float()


def condition_dropout(cond: Tensor, context: Tensor, null_context: Tensor, drop_text: float, drop_both: float,
                      drop_image: float, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Classifier-free dropout per sample: the text context → the empty prompt's (`null_context`,
    (L, D)), the condition latent → zeros, in bands of u ~ U(0,1) as InstructPix2Pix/AutoDIR:
    [text][text+image][image]."""
    u = torch.rand(cond.shape[0], device=cond.device, generator=generator)
    no_text = u < drop_text + drop_both
    no_image = (u >= drop_text) & (u < drop_text + drop_both + drop_image)
    context = torch.where(no_text[:, None, None], null_context, context)
    return cond * (~no_image).to(cond.dtype)[:, None, None, None], context
