"""`model:`: each stage's model section (`MODEL_CONFIGS[stage]`), each with its own `check()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


from lit_restore.config.base import ConfigError, choice

@dataclass
class BIQAModelConfig:
    """CLIP image tower fine-tuned to name the degradation; the text tower stays frozen."""

    # open_clip architecture name. OpenAI weights were trained with QuickGELU: name the
    # `-quickgelu` variant, so a checkpoint or export of this run rebuilds the same activation.
    arch: str = "ViT-L-14-quickgelu"
    # open_clip tag, a local weights file (open_clip .bin/.pt/.safetensors, a biqa .ckpt or export),
    # or "" for random init.
    pretrained: str = "openai"
    # An open_clip CLIP config (embed_dim, vision_cfg, text_cfg) used instead of `arch`: tiny test models.
    model_cfg: Optional[dict[str, Any]] = None
    # DEGRADATION_TYPES names scored by the prompts "A photo needs {word} artifact reduction";
    # samples whose label is not listed are left out of the loss.
    classes: list[str] = field(default_factory=lambda: ["no", "noise", "blur", "jpeg", "lowres", "haze", "rain", "lowlight"])
    loss: str = choice("fidelity", ("fidelity", "ce"), "LIQE/AutoDIR fidelity or cross-entropy")
    gt_weight: float = 1.0  # lambda of the term that gives the clean GT low probability for its twin's label
    gt_as_no: bool = True  # also train every clean GT image as the "no" class
    # False: centre crop at native scale (AutoDIR; keeps the degradation's pixel statistics),
    # resizing only images smaller than the tower's input; True: resize the shorter side first.
    resize: bool = False
    # AutoDIR freezes the parameters named `text_model*` only, so CLIP's temperature and text
    # projection train with the image tower; the per-token states the LDM reads stay fixed either way.
    train_logit_scale: bool = True
    train_text_projection: bool = True
    # True trains the text tower too. Only for making a CLIP where no pretrained one exists (the
    # tiny foundation, configs/foundations/clip.yaml): AutoDIR fine-tunes a pretrained CLIP with
    # the text tower frozen, and the LDM's context comes from that same frozen tower.
    train_text: bool = False
    grad_checkpointing: bool = False  # activation checkpointing in the image tower

    def check(self, prefix: str = "model.") -> None:
        from lit_restore.data.degrade.types import DEGRADATION_TYPES

        unknown = [c for c in self.classes if c not in DEGRADATION_TYPES]
        if unknown or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ConfigError(f"{prefix}classes: {list(self.classes)} must be two or more distinct names of "
                              f"{', '.join(DEGRADATION_TYPES)} (quote 'no' in YAML)")
        if self.gt_as_no and "no" not in self.classes:
            raise ConfigError(f"{prefix}gt_as_no: needs 'no' in {prefix}classes")


@dataclass
class ConStyleNetConfig:
    """ConStyle encoder, its MoCo wrapper and losses (shared by the constyle and restorer stages)."""

    base_channels: int = 16  # encoder trunk width; f1/f2/f3 have 2x/4x/8x this many channels
    dim: int = 128  # latent code (z1, z2) size
    queue_size: int = 65536  # negatives; must divide by data.batch_size x devices
    momentum: float = 0.999  # key encoder: theta_k <- m theta_k + (1 - m) theta_q
    temperature: float = 0.07  # InfoNCE
    l2_normalize: bool = True  # normalise q, k and queue (MoCo) or compare raw codes (ConStyle code)
    enqueue: str = choice("query", ("query", "key"), "store degraded-image codes (ConStyle code) or clean keys (MoCo)")
    style_objective: str = choice("maximize", ("maximize", "minimize"), "sign of the Gram style term")
    contrastive_weight: float = 1.0
    content_weight: float = 1.0
    style_weight: float = 1.0  # 0 turns the style term off
    cls_weight: float = 0.0  # > 0 adds a degradation-type classifier head (predicts the Degrader's label)
    # SyncBatchNorm in the encoder when training on more than one GPU (the constyle stage, and the
    # restorer's joint mode: the encoders that train under the MoCo losses).
    sync_batchnorm: bool = True

    def check(self, prefix: str = "model.") -> None:
        positive = {"base_channels": self.base_channels, "dim": self.dim, "queue_size": self.queue_size,
                    "temperature": self.temperature}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{prefix}{key}: {value} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{prefix}momentum: {self.momentum} must be in [0, 1)")
        weights = {"contrastive_weight": self.contrastive_weight, "content_weight": self.content_weight,
                   "style_weight": self.style_weight, "cls_weight": self.cls_weight}
        for key, value in weights.items():
            if value < 0:
                raise ConfigError(f"{prefix}{key}: {value} must be >= 0")


@dataclass
class ConStyleModelConfig(ConStyleNetConfig):
    """MoCo-style degradation-aware encoder pretraining (ConStyle v2 stage 1)."""

    # Encoder to start from instead of random: a constyle or restorer .ckpt, exported folder or
    # model.safetensors (a restorer's ConStyle encoder); loaded into the query and key encoders.
    pretrained: str = ""


@dataclass
class RestorerModelConfig:
    """ConStyle-conditioned (or plain) restoration network."""

    arch: str = choice("constyle_nafnet", ("constyle_nafnet", "nafnet"), "ConStyle-NAFNet or the plain baseline")
    width: int = 48  # channels of the first level
    enc_blocks: list[int] = field(default_factory=lambda: [7, 8, 9])  # NAFBlocks per encoder level (3 for constyle_nafnet)
    middle_blocks: int = 9
    dec_blocks: list[int] = field(default_factory=lambda: [7, 8, 9])  # per decoder level, listed from the top level
    loss: str = choice("l1", ("l1", "psnr", "psnr_mse"), "L1 (ConStyle), PSNR loss (NAFNet), or PSNR + MSE (low-PSNR inputs pull harder)")
    constyle_mode: str = choice("frozen", ("frozen", "joint"), "pretrained encoder kept fixed, or trained with the restorer")
    # How the ConStyle encoder conditions the restorer: IRConStyle's projected feature maps after
    # each downsampling plus the code at the bottleneck (a 3-level U-Net of its own widths), or the
    # code alone as a per-level scale and shift (FiLM) of the plain NAFNet of `width`/`*_blocks`.
    constyle_condition: str = choice("features_and_code", ("features_and_code", "code"),
                                     "IRConStyle's feature maps and code, or the code alone on the plain NAFNet")
    # Pretrained encoder: a constyle-stage checkpoint (.ckpt), exported folder or model.safetensors.
    # Needed when constyle_mode=frozen.
    constyle_weights: str = ""
    # Restorer to start from instead of random: a restorer .ckpt, exported folder or
    # model.safetensors of the same arch and sizes. model.constyle_weights, when also given,
    # then replaces its encoder.
    pretrained: str = ""
    # joint: optimizer steps with the ConStyle losses on, after which the encoder is frozen (IRConStyle
    # v1: 250000); -1 keeps them on for the whole run.
    constyle_iters: int = -1
    # A frozen encoder's BatchNorm: "train" uses batch statistics (ConStyle v2 and IRConStyle only
    # stop its gradients), "eval" keeps the pretrained running statistics fixed.
    frozen_encoder_bn: str = choice("train", ("train", "eval"), "BatchNorm mode of the frozen ConStyle encoder")
    constyle: ConStyleNetConfig = field(default_factory=ConStyleNetConfig)

    def check(self, prefix: str = "model.") -> None:
        p = prefix
        if self.width <= 0 or self.middle_blocks < 0:
            raise ConfigError(f"{p}width/middle_blocks: {self.width}/{self.middle_blocks} must be > 0 / >= 0")
        if any(n < 0 for n in [*self.enc_blocks, *self.dec_blocks]):
            raise ConfigError(f"{p}enc_blocks/dec_blocks: {list(self.enc_blocks)}/{list(self.dec_blocks)} must be >= 0")
        if len(self.enc_blocks) != len(self.dec_blocks):
            raise ConfigError(f"{p}dec_blocks: {list(self.dec_blocks)} needs as many levels as {p}enc_blocks {list(self.enc_blocks)}")
        if self.arch == "constyle_nafnet" and self.constyle_condition == "features_and_code":
            if len(self.enc_blocks) != 3:
                raise ConfigError(f"{p}enc_blocks: {list(self.enc_blocks)}: constyle_nafnet has exactly 3 levels")
            if self.width % 4 != 0:
                raise ConfigError(f"{p}width: {self.width} must be divisible by 4 for constyle_nafnet")
        if self.constyle_iters < -1:
            raise ConfigError(f"{p}constyle_iters: {self.constyle_iters} must be >= -1")
        if self.arch == "constyle_nafnet" and self.constyle_mode == "frozen" and not self.constyle_weights:
            raise ConfigError(f"{p}constyle_weights: frozen mode needs pretrained ConStyle weights; give a path "
                              f"or set {p}constyle_mode=joint to train the encoder with the restorer")
        self.constyle.check(f"{p}constyle.")


@dataclass
class CLIPTextConfig:
    """The CLIP whose frozen text tower gives the LDM its context. BIQA trains only the image
    tower, so the pretrained CLIP and a biqa checkpoint give the same context."""

    arch: str = "ViT-L-14-quickgelu"  # open_clip architecture (ViT-L-14 `openai` is SD-1.5's text encoder)
    pretrained: str = "openai"  # open_clip tag, a local weights file, a biqa .ckpt/export, or "" (random)
    model_cfg: Optional[dict[str, Any]] = None  # an open_clip CLIP config dict (tiny test models)


@dataclass
class LDMModelConfig:
    """InstructPix2Pix-style Stable Diffusion UNet fine-tuning (degraded latent concatenated,
    degradation prompt as cross-attention context)."""

    # diffusers model id or local folder with unet/ and vae/ (an ldm export folder works too).
    pretrained: str = "runwayml/stable-diffusion-v1-5"
    # UNet2DConditionModel / AutoencoderKL kwargs: random init instead of `pretrained` (tiny models).
    # A 4-channel conv_in is widened to 8 (pretrained weights and bias kept, new channels zero).
    unet_cfg: Optional[dict[str, Any]] = None
    vae_cfg: Optional[dict[str, Any]] = None
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    prediction_type: str = choice("epsilon", ("epsilon", "v_prediction"), "what the UNet predicts")
    snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (5.0 is the usual value); 0 = plain MSE
    # Classifier-free guidance dropout per sample (InstructPix2Pix/AutoDIR: 5% each).
    drop_text: float = 0.05
    drop_both: float = 0.05
    drop_image: float = 0.05
    # False: a plain latent denoiser of clean images (no condition latent, conv_in not widened, the
    # empty prompt as context): the role of SD's text-to-image UNet before InstructPix2Pix's
    # fine-tuning, used only to make the tiny UNet foundation (configs/foundations/unet.yaml).
    image_condition: bool = True
    frozen_dtype: str = choice("bfloat16", ("float32", "bfloat16", "float16"), "dtype of the frozen VAE")
    # UNet activation checkpointing: less memory for one more UNet forward per step; opt-in.
    grad_checkpointing: bool = False
    val_steps: int = 20  # sampler steps for validation images and PSNR/SSIM
    val_sampler: str = choice("euler_a", ("euler_a", "ddim"), "validation sampler")

    def check(self, prefix: str = "model.") -> None:
        drops = {"drop_text": self.drop_text, "drop_both": self.drop_both, "drop_image": self.drop_image}
        for key, p in drops.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{prefix}{key}: {p} must be in [0, 1]")
        if sum(drops.values()) > 1.0:
            raise ConfigError(f"{prefix}drop_text + drop_both + drop_image: {sum(drops.values())} must be <= 1")
        if self.val_steps < 1:
            raise ConfigError(f"{prefix}val_steps: {self.val_steps} must be >= 1")


@dataclass
class SCMModelConfig:
    """Structure-correction NAFNet trained on the frozen LDM's output: out = ldm + w·N([lq, ldm])."""

    width: int = 64
    enc_blocks: list[int] = field(default_factory=lambda: [2, 2, 4, 8])
    middle_blocks: int = 12
    dec_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    w: float = 1.0  # residual scale (AutoDIR's w)
    # An SCM to fine-tune (an scm .ckpt, export folder or model.safetensors of the same sizes): the
    # tiny SCM foundation; empty: a fresh NAFNet (AutoDIR).
    pretrained: str = ""
    # AutoDIR's NAFNet sees and corrects [-1,1] images (the residual is in those units); false: [0,1].
    signed_range: bool = True
    # AutoDIR trains the SCM through the frozen LDM with stage 2's classifier-free dropout
    # (model.ldm.drop_*: text 10 %, image 10 %); one_step input only.
    cond_dropout: bool = True
    loss: str = choice("mse", ("mse", "l1", "psnr"), "pixel loss against the GT (AutoDIR: mse)")
    # The frozen LDM: architecture and source as in the ldm stage. Real use needs the trained LDM:
    # point ldm.pretrained at an ldm export folder, or set ldm_checkpoint.
    ldm: LDMModelConfig = field(default_factory=LDMModelConfig)
    ldm_checkpoint: str = ""  # an ldm stage .ckpt: its EMA UNet, VAE and prompt contexts replace the built ones
    # What the SCM corrects: "one_step" = the x0 estimate decoded from the GT latent noised to a
    # random t (AutoDIR's training); "sample" = a short sampler run from noise (what inference sees).
    ldm_input: str = choice("one_step", ("one_step", "sample"), "how the LDM output is made")
    t_max: int = 1000  # one_step: t = floor(t_max * u**t_power), u ~ U(0,1)
    t_power: float = 1.0  # > 1 biases t toward low noise
    sample_steps: int = 10  # sample: Euler-ancestral steps
    sample_strength: float = 1.0  # sample: restore's --strength (1: from pure noise)
    # Training only: the fraction of samples the LDM is prompted with another, uniformly
    # drawn class. The loop's prompt is BIQA's, which errs, and a second pass prompts an artifact
    # on an image the first pass restored: the SCM learns to fall back on its input there.
    prompt_error: float = 0.0

    def check(self, prefix: str = "model.") -> None:
        if not 1 <= self.t_max <= 1000:
            raise ConfigError(f"{prefix}t_max: {self.t_max} must be in [1, 1000]")
        if self.t_power <= 0:
            raise ConfigError(f"{prefix}t_power: {self.t_power} must be > 0")
        if self.sample_steps < 1:
            raise ConfigError(f"{prefix}sample_steps: {self.sample_steps} must be >= 1")
        if not 0.0 < self.sample_strength <= 1.0:
            raise ConfigError(f"{prefix}sample_strength: {self.sample_strength} must be in (0, 1]")
        if not 0.0 <= self.prompt_error < 1.0:
            raise ConfigError(f"{prefix}prompt_error: {self.prompt_error} must be in [0, 1)")
        self.ldm.check(f"{prefix}ldm.")


@dataclass
class AutoencoderModelConfig:
    """A diffusers AutoencoderKL trained to reconstruct clean images: the role of Stable
    Diffusion's VAE, for models that cannot download it (the tiny foundation, new domains)."""

    vae_cfg: dict[str, Any] = field(default_factory=dict)  # AutoencoderKL kwargs
    # Reconstruction loss on [-1, 1] images. SD's VAE adds LPIPS and a patch GAN for sharper
    # textures; PSNR is what the restoration stages are scored by, so the default is plain L1.
    loss: str = choice("l1", ("l1", "mse"), "pixel loss against the input")
    kl_weight: float = 1.0e-6  # SD's autoencoder KL weight: a near-deterministic, well-scaled latent

    def check(self, prefix: str = "model.") -> None:
        if self.kl_weight < 0:
            raise ConfigError(f"{prefix}kl_weight: {self.kl_weight} must be >= 0")
        if not self.vae_cfg:
            raise ConfigError(f"{prefix}vae_cfg: empty; give the AutoencoderKL arguments (block_out_channels, ...)")


MODEL_CONFIGS: dict[str, type] = {
    "autoencoder": AutoencoderModelConfig,
    "biqa": BIQAModelConfig,
    "constyle": ConStyleModelConfig,
    "restorer": RestorerModelConfig,
    "ldm": LDMModelConfig,
    "scm": SCMModelConfig,
}
