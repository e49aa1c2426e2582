"""Typed run configuration: dataclasses merged by OmegaConf from YAML plus `key=value` overrides.

Every stage config has the same top level (`RunConfig`); `model` is the stage's own dataclass,
chosen by `stage`. Unknown keys, wrong types and values outside a field's `choices` fail at
load time with one line naming the full key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

STAGES = ("autoencoder", "biqa", "constyle", "restorer", "ldm", "scm")
SAMPLE_DIR = "data/sample"


class UserError(Exception):
    """A problem with what the user gave (config, data, weights, arguments), phrased as one line:
    the CLI prints it and exits 2, without a traceback unless `--debug`. Mixed into the concrete
    error types (ConfigError is a ValueError, missing shards a FileNotFoundError, ...)."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased as one line that names the key path."""


def choice(default: Any, choices: tuple, doc: str = "") -> Any:
    """A field whose value must be one of `choices` (checked after merging)."""
    return field(default=default, metadata={"choices": choices, "doc": doc})


# --------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------


@dataclass
class Source:
    """One shard source: a URL pattern (brace expansion allowed) and its sampling weight."""

    url: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    # Training sources, sampled with replacement in proportion to `weight`. A plain string on
    # the command line (`data.train=shards/train-{000000..000099}.tar`) means one source.
    train: list[Source] = field(default_factory=lambda: [Source(f"{SAMPLE_DIR}/train-{{000000..000003}}.tar")])
    # Validation sources, read once each, in order, split across ranks.
    val: list[Source] = field(default_factory=lambda: [Source(f"{SAMPLE_DIR}/val-000000.tar")])
    batch_size: int = 8  # per device; training batches are always full
    val_batch_size: int = 0  # 0 = same as batch_size; short ranks pad with rows marked valid=False
    num_workers: int = 2  # loader processes per device (0: load in the training process)
    crop: int = 128  # square training crop, taken jointly from lq/gt/depth; smaller images are reflect-padded
    val_crop: int = 0  # centre crop for validation; 0 = same as crop
    shuffle_buffer: int = 500  # samples held (as encoded bytes) for shuffling; 0 or 1 = no shuffle
    # A "virtual epoch": exactly this many batches per rank between loader restarts, split over
    # the workers (the first `steps_per_epoch % num_workers` workers make one more).
    steps_per_epoch: int = 500
    max_corrupt_fraction: float = 0.05  # stop the run when more samples than this are unreadable (checked after 100)
    # Images (gt, lq) with more pixels than this are skipped as corrupt, checked from the file
    # header before decoding: a small PNG can decode to gigabytes in a loader worker. 40 MP is
    # 120 MB as 8-bit RGB, a few times that while decoding and resizing.
    max_pixels: int = 40_000_000


@dataclass
class NoiseOpConfig:
    """Sensor noise: Gaussian (colour or gray) or Poisson, one normal draw per pixel."""

    prob: float = 0.3  # inclusion probability in mode=mixed; relative weight in mode=single
    sigma: list[float] = field(default_factory=lambda: [15.0, 50.0])  # Gaussian σ in 8-bit levels (MiOIR)
    gray_prob: float = 0.4  # same noise on every channel (Real-ESRGAN 0.4; MiOIR 0)
    poisson_prob: float = 0.3  # Poisson noise instead of Gaussian (Real-ESRGAN 0.5)
    poisson_scale: list[float] = field(default_factory=lambda: [0.05, 3.0])  # Real-ESRGAN


@dataclass
class BlurOpConfig:
    """Gaussian (isotropic or rotated anisotropic) or motion blur, one kernel per sample."""

    prob: float = 0.3
    kernel_size: list[int] = field(default_factory=lambda: [7, 21])  # odd support of Gaussian kernels (MiOIR)
    sigma: list[float] = field(default_factory=lambda: [1.0, 3.0])  # Gaussian σ in pixels (MiOIR)
    aniso_prob: float = 0.3  # σx, σy drawn separately, kernel rotated by `angle`
    angle: list[float] = field(default_factory=lambda: [0.0, 180.0])  # degrees
    motion_prob: float = 0.2  # a straight motion streak instead of a Gaussian
    motion_length: list[float] = field(default_factory=lambda: [5.0, 21.0])  # pixels


@dataclass
class JpegOpConfig:
    """JPEG compression (IJG quality scaling of the standard tables, 4:2:0 chroma)."""

    prob: float = 0.3
    quality: list[float] = field(default_factory=lambda: [30.0, 70.0])  # MiOIR in-distribution


@dataclass
class LowresOpConfig:
    """Down by `scale`, then back up to the input size (scale-1 restoration, as MiOIR)."""

    prob: float = 0.3
    scale: list[float] = field(default_factory=lambda: [2.0, 4.0])  # MiOIR: fixed 4
    # Down-sampling filters, one drawn per sample (Real-ESRGAN draws from area/bilinear/bicubic).
    modes: list[str] = field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    up_mode: str = choice("bicubic", ("nearest", "area", "bilinear", "bicubic"), "filter back to the input size")


@dataclass
class HazeOpConfig:
    """Atmospheric scattering I = J·t + A(1−t), t = exp(−β·depth), depth in [0, 1]."""

    prob: float = 0.3
    beta: list[float] = field(default_factory=lambda: [0.5, 2.5])  # MiOIR in-distribution
    airlight: list[float] = field(default_factory=lambda: [0.8, 1.0])  # A (MiOIR)


@dataclass
class RainOpConfig:
    """Rain streaks: sparse seeds smeared by a rotated line kernel, added and clipped (MiOIR)."""

    prob: float = 0.3
    amount: list[float] = field(default_factory=lambda: [50.0, 99.0])  # MiOIR "value": seeds = amount/25600 of pixels
    length: list[float] = field(default_factory=lambda: [20.0, 40.0])  # streak length in pixels
    angle: list[float] = field(default_factory=lambda: [-45.0, 45.0])  # degrees from vertical
    width: list[float] = field(default_factory=lambda: [3.0, 11.0])  # Gaussian kernel size across the streak
    # MiOIR's add_rain geometry: a 3×3 smear of the seeds and a streak that is the length×length
    # window's diagonal scaled by 1 − length/100 and rotated (clipped by the window); false: a
    # plain line of `length` pixels.
    mioir_geometry: bool = True


@dataclass
class LowlightOpConfig:
    """Under-exposure: gain·x^γ, with optional read noise added in linear light."""

    prob: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [1.0, 3.0])  # MiOIR "dark"
    gain: list[float] = field(default_factory=lambda: [1.0, 1.0])  # linear dimming (PromptGIP 0.3-0.4)
    noise_sigma: list[float] = field(default_factory=lambda: [0.0, 0.0])  # linear-light σ in 8-bit levels


@dataclass
class DegradeConfig:
    """On-device degradation synthesis (see lit_restore/data/degrade and configs/degrade/)."""

    # single: one op per degraded sample (chosen with weights `<op>.prob`); mixed: the `types`
    # chain, each op included per sample with probability `<op>.prob` (a sample that draws none
    # gets one); task: the fixed task `task` of the suite.
    mode: str = choice("mixed", ("single", "mixed", "task"), "one type per sample, a chain, or a fixed task")
    # Ops in use, in the order the chain applies them (haze and rain happen in the scene, before
    # the camera's exposure, optics, sampling, sensor noise and compression).
    types: list[str] = field(default_factory=lambda: ["haze", "rain", "lowlight", "blur", "lowres", "noise", "jpeg"])
    clean_fraction: float = 0.0  # fraction of samples left clean (label "no")
    task: str = ""  # task name from the suite when mode=task
    suite: str = ""  # suite YAML for mode=task; "" = configs/gir_suite.yaml
    quantize: bool = True  # round to 8 bits after each op, as MiOIR/BasicSR
    # torch.compile the Degrader in training (fewer kernel launches on a GPU; the first batches
    # pay the compile time). Off by default: the eager chain already reads nothing on the host.
    compile: bool = False
    noise: NoiseOpConfig = field(default_factory=NoiseOpConfig)
    blur: BlurOpConfig = field(default_factory=BlurOpConfig)
    jpeg: JpegOpConfig = field(default_factory=JpegOpConfig)
    lowres: LowresOpConfig = field(default_factory=LowresOpConfig)
    haze: HazeOpConfig = field(default_factory=HazeOpConfig)
    rain: RainOpConfig = field(default_factory=RainOpConfig)
    lowlight: LowlightOpConfig = field(default_factory=LowlightOpConfig)


# Allowed values of the degradation parameters: (low, high) bounds of every range or number.
DEGRADE_BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "noise": {"sigma": (0, 255), "gray_prob": (0, 1), "poisson_prob": (0, 1), "poisson_scale": (0, 10)},
    "blur": {"kernel_size": (3, 63), "sigma": (0.1, 20), "aniso_prob": (0, 1), "angle": (-360, 360),
             "motion_prob": (0, 1), "motion_length": (1, 63)},
    "jpeg": {"quality": (1, 100)},
    "lowres": {"scale": (1, 16)},
    "haze": {"beta": (0, 10), "airlight": (0, 1)},
    "rain": {"amount": (0, 2000), "length": (1, 63), "angle": (-90, 90), "width": (1, 21)},
    "lowlight": {"gamma": (0.1, 10), "gain": (0, 1), "noise_sigma": (0, 255)},
}
RESIZE_MODES = ("nearest", "area", "bilinear", "bicubic")


def check_degrade(cfg: DegradeConfig, path: str = "degrade") -> None:
    """Value checks of a DegradeConfig; raises ConfigError naming the key path."""
    from lit_restore.data.degrade.types import SYNTHETIC_TYPES

    if not cfg.types:
        raise ConfigError(f"{path}.types: empty; give at least one of {', '.join(SYNTHETIC_TYPES)}")
    for i, name in enumerate(cfg.types):
        if name not in SYNTHETIC_TYPES:
            raise ConfigError(f"{path}.types[{i}]: {name!r} is not a synthetic type; choose from {', '.join(SYNTHETIC_TYPES)}")
    if len(set(cfg.types)) != len(cfg.types):
        raise ConfigError(f"{path}.types: {list(cfg.types)} lists a type twice")
    if not 0.0 <= cfg.clean_fraction < 1.0:
        raise ConfigError(f"{path}.clean_fraction: {cfg.clean_fraction} must be in [0, 1)")
    if cfg.mode == "task" and not cfg.task:
        raise ConfigError(f"{path}.task: missing; mode=task needs a task name (lit-restore degrade --list-tasks)")
    if cfg.mode != "task" and all(getattr(cfg, name).prob == 0 for name in cfg.types):
        raise ConfigError(f"{path}: every op in types has prob 0; nothing could be synthesised")
    for op, bounds in DEGRADE_BOUNDS.items():
        op_cfg = getattr(cfg, op)
        key = f"{path}.{op}"
        if not 0.0 <= op_cfg.prob <= 1.0:
            raise ConfigError(f"{key}.prob: {op_cfg.prob} must be in [0, 1]")
        for name, (low, high) in bounds.items():
            value = getattr(op_cfg, name)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if isinstance(value, (list, tuple)) and (len(values) != 2 or values[0] > values[1]):
                raise ConfigError(f"{key}.{name}: {values} must be [low, high] with low <= high")
            if any(not low <= v <= high for v in values):
                raise ConfigError(f"{key}.{name}: {value} must lie in [{low}, {high}]")
    if any(k % 2 == 0 for k in cfg.blur.kernel_size):
        raise ConfigError(f"{path}.blur.kernel_size: {list(cfg.blur.kernel_size)} must be odd")
    for i, mode in enumerate(cfg.lowres.modes):
        if mode not in RESIZE_MODES:
            raise ConfigError(f"{path}.lowres.modes[{i}]: {mode!r} is not allowed; choose one of {', '.join(RESIZE_MODES)}")
    if cfg.lowres.up_mode not in RESIZE_MODES:
        raise ConfigError(f"{path}.lowres.up_mode: {cfg.lowres.up_mode!r} is not allowed; choose one of {', '.join(RESIZE_MODES)}")
    if not cfg.lowres.modes:
        raise ConfigError(f"{path}.lowres.modes: empty; give at least one of {', '.join(RESIZE_MODES)}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, an optional constant stretch, then cosine decay, stepped per optimizer step."""

    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    hold_steps: int = 0  # steps at the full lr after warmup before the cosine starts
    min_lr_ratio: float = 0.01  # final lr = lr * min_lr_ratio
    ema_decay: float = 0.0  # 0 disables EMA; otherwise e.g. 0.999
    # Decay min(ema_decay, (1+n)/(10+n)) after n updates, as InstructPix2Pix's EMA; BasicSR's
    # (IRConStyle/ConStyle) uses the fixed decay from step 0 (false).
    ema_warmup: bool = True


@dataclass
class WandbConfig:
    """Weights & Biases settings, used when logger=wandb."""

    project: str = "lit_restore"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None


@dataclass
class CheckpointConfig:
    """Step checkpoints, SLURM preemption checkpoints and what a non-finite loss does."""

    every_n_steps: int = 500  # checkpoints/stepNNNNNNN.ckpt and checkpoints/last.ckpt every N optimizer steps
    keep: int = -1  # step checkpoints kept, newest first (-1: all)
    keep_hpc: int = 1  # SLURM preemption checkpoints (hpc_ckpt_N.ckpt) kept, newest first
    # A step whose gradients are NaN/Inf: "skip" leaves the weights unchanged (counted in
    # train/skipped_steps); "stop" saves a checkpoint of the weights before it and ends the run.
    on_nan: str = choice("skip", ("skip", "stop"), "what a non-finite loss or gradient does")
    max_skipped_in_row: int = 100  # on_nan=skip: stop as on_nan=stop after this many skipped steps in a row
    # With several ranks, they agree on a SLURM preemption signal every this many steps (one
    # collective each time); the checkpoint is then up to N steps after the signal.
    preempt_poll_steps: int = 10
    # Write checkpoints from a background thread (Lightning's AsyncCheckpointIO): training goes on
    # during the write; the state is first copied on the device (memory of one more checkpoint).
    async_save: bool = False


def _default_trainer() -> dict[str, Any]:
    return {
        "max_steps": 1000,
        "accelerator": "auto",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "auto",  # fit: bf16-mixed on GPU, 32-true on CPU
        "val_check_interval": 500,
        "log_every_n_steps": 10,
    }


# --------------------------------------------------------------------------------------
# Stage model sections
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """One training run of one stage."""

    stage: str = choice("biqa", STAGES, "which stage this config trains")
    seed: int = 0
    out_dir: str = "runs/default"  # run dir: checkpoints/, config.yaml, logs; stable across requeues
    resume: str = "auto"  # auto (newest hpc or last checkpoint in out_dir), never, or a checkpoint path
    # CPU training: torch threads per process; 0 = the cores this process may use / processes on the
    # node − loader workers (OMP_NUM_THREADS, when set, wins over 0). GPU runs leave torch's default.
    threads: int = 0
    logger: str = choice("csv", ("wandb", "csv", "none"), "where metrics go")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=_default_trainer)  # passed to lightning.Trainer
    model: Any = None  # the stage's model dataclass (MODEL_CONFIGS[stage])


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _allowed_keys(schema: DictConfig, path: str) -> list[str]:
    node: Any = schema
    for part in [p for p in path.split(".") if p][:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _normalize_sources(raw: DictConfig) -> None:
    """Accept a plain string (or list of strings) for data.train / data.val."""
    data = raw.get("data")
    if not isinstance(data, DictConfig):
        return
    for split in ("train", "val"):
        value = data.get(split)
        if isinstance(value, str):
            data[split] = [{"url": value, "weight": 1.0}]
        elif isinstance(value, ListConfig):
            data[split] = [{"url": v, "weight": 1.0} if isinstance(v, str) else v for v in value]


# Environment variables a config may read with ${oc.env:NAME}: the resolved config is written to
# the run dir, checkpoints, W&B and exports, so a secret read this way would leak.
ENV_ALLOWED = ("HOME", "USER", "TMPDIR", "SCRATCH", "WORK", "PWD")
ENV_ALLOWED_PREFIXES = ("SLURM_", "LIT_RESTORE_")
_ENV_READ = re.compile(r"\$\{\s*oc\.env\s*:\s*([^,}]*)")


def _check_env_reads(node: Any, path: str = "") -> None:
    """Refuse `${oc.env:NAME}` outside ENV_ALLOWED / ENV_ALLOWED_PREFIXES (checked unresolved)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_env_reads(v, f"{path}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_env_reads(v, f"{path[:-1]}[{i}].")
    elif isinstance(node, str):
        for name in _ENV_READ.findall(node):
            name = name.strip()
            if name not in ENV_ALLOWED and not name.startswith(ENV_ALLOWED_PREFIXES):
                raise ConfigError(
                    f"{path[:-1]}: ${{oc.env:{name}}} is not allowed: the resolved config is written to the run dir, "
                    f"checkpoints, W&B and exports; oc.env may read {', '.join(ENV_ALLOWED)} and "
                    f"{'/'.join(p + '*' for p in ENV_ALLOWED_PREFIXES)} (secrets such as W&B keys stay in the environment)")


def _check_choices(obj: Any, path: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            doc = f" ({f.metadata['doc']})" if f.metadata.get("doc") else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}{doc}")
        _check_choices(value, key + ".")


def _check_values(cfg: RunConfig) -> None:
    data = cfg.data
    for split in ("train", "val"):
        sources = getattr(data, split)
        for i, src in enumerate(sources):
            if src.url in ("", "???"):
                raise ConfigError(f"data.{split}[{i}].url: missing; give a shard URL pattern")
            if src.weight <= 0:
                raise ConfigError(f"data.{split}[{i}].weight: {src.weight} must be > 0")
    positive = {
        "data.batch_size": data.batch_size,
        "data.crop": data.crop,
        "data.steps_per_epoch": data.steps_per_epoch,
        "data.max_pixels": data.max_pixels,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    non_negative = {
        "data.num_workers": data.num_workers,
        "data.val_batch_size": data.val_batch_size,
        "data.val_crop": data.val_crop,
        "data.shuffle_buffer": data.shuffle_buffer,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: {value} must be >= 0")
    if not 0.0 <= data.max_corrupt_fraction <= 1.0:
        raise ConfigError(f"data.max_corrupt_fraction: {data.max_corrupt_fraction} must be in [0, 1]")
    if cfg.threads < 0:
        raise ConfigError(f"threads: {cfg.threads} must be >= 0 (0 = from the cores)")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: {cfg.optim.lr} must be > 0")
    if cfg.optim.warmup_steps < 0 or cfg.optim.hold_steps < 0:
        raise ConfigError(f"optim.warmup_steps/hold_steps: {cfg.optim.warmup_steps}/{cfg.optim.hold_steps} must be >= 0")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: {cfg.optim.ema_decay} must be in [0, 1)")
    if cfg.checkpoint.every_n_steps <= 0:
        raise ConfigError(f"checkpoint.every_n_steps: {cfg.checkpoint.every_n_steps} must be > 0")
    if cfg.checkpoint.keep == 0 or cfg.checkpoint.keep < -1:
        raise ConfigError(f"checkpoint.keep: {cfg.checkpoint.keep} must be -1 (all) or > 0")
    if cfg.checkpoint.preempt_poll_steps < 1:
        raise ConfigError(f"checkpoint.preempt_poll_steps: {cfg.checkpoint.preempt_poll_steps} must be >= 1")
    if cfg.checkpoint.keep_hpc < 1:
        raise ConfigError(f"checkpoint.keep_hpc: {cfg.checkpoint.keep_hpc} must be >= 1")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: {list(cfg.optim.betas)} must hold two numbers")
    check_degrade(cfg.degrade)
    check_trainer(cfg.trainer)
    cfg.model.check("model.")


# Trainer arguments `fit` sets itself, and the config key that controls each.
TRAINER_RESERVED = {"default_root_dir": "out_dir", "logger": "logger", "callbacks": "checkpoint.*",
                    "plugins": "checkpoint.*"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value can be an argument annotated `hint`. Types a config cannot hold
    (a Strategy, a Logger) never match; hints this does not understand let the value through."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_trainer(trainer: dict[str, Any]) -> None:
    """`trainer.*` keys and value types against `lightning.Trainer`'s signature."""
    import lightning as L

    hints = typing.get_type_hints(L.Trainer.__init__)
    params = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key, value in trainer.items():
        if key in TRAINER_RESERVED:
            raise ConfigError(f"trainer.{key}: set by lit_restore fit; use {TRAINER_RESERVED[key]} instead")
        if key not in params:
            close = difflib.get_close_matches(key, [p for p in params if p not in TRAINER_RESERVED], n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see lightning.Trainer's arguments"
            raise ConfigError(f"trainer.{key}: not an argument of lightning.Trainer{hint}")
        if key == "precision" and value == "auto":
            continue  # lit_restore's own value: fit picks bf16-mixed on GPU, 32-true on CPU
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"trainer.{key}: {value!r} is not a valid value (lightning.Trainer expects "
                              f"one of: {_hint_text(hints[key])})")


def _hint_text(hint: Any) -> str:
    """`Union[Literal[16, 32], int, NoneType]` → `16, 32, int, None`."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return ", ".join(_hint_text(h) for h in typing.get_args(hint))
    if origin is Literal:
        return ", ".join(repr(v) for v in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return re.sub(r"\b(typing|lightning\.\w+(\.\w+)*|datetime|pathlib)\.", "", str(hint))


def schema_for(stage: str) -> DictConfig:
    """The typed OmegaConf schema of a stage's RunConfig."""
    if stage not in MODEL_CONFIGS:
        raise ConfigError(f"stage: {stage!r} is not allowed; choose one of {', '.join(STAGES)}")
    schema = OmegaConf.structured(RunConfig(stage=stage))
    schema.model = OmegaConf.structured(MODEL_CONFIGS[stage])
    return schema


def _read_yaml(path: str | Path | None) -> DictConfig:
    """A YAML mapping from `path` (an empty one for None); ConfigError with one line otherwise."""
    import yaml

    try:
        raw = OmegaConf.load(path) if path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: cannot parse YAML: {' '.join(filter(None, (e.context, e.problem)))}") from None
    except Exception as e:  # other YAML and OmegaConf errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}".splitlines()[0]) from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def _merge(schema: DictConfig, raw: DictConfig, prefix: str = "") -> Any:
    """`raw` merged into the typed `schema` → its dataclass; ConfigError naming the key path."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except ConfigKeyError as e:
        key = prefix + str(e.full_key or e.key or "?")
        allowed = _allowed_keys(schema, key[len(prefix):])
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        raise ConfigError(f"{key}: unknown key{hint}") from None
    except OmegaConfBaseException as e:
        key = prefix + str(getattr(e, "full_key", None) or "?")
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + `key=value` overrides → validated RunConfig."""
    raw = _read_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {str(e).splitlines()[0]}") from None
    _check_env_reads(OmegaConf.to_container(raw, resolve=False))
    stage = raw.get("stage", "biqa")
    _normalize_sources(raw)
    cfg: RunConfig = _merge(schema_for(str(stage)), raw)
    if not isinstance(cfg.model, MODEL_CONFIGS[cfg.stage]):
        raise ConfigError(f"model: {cfg.model!r} is not allowed; give the {cfg.stage} model's keys, or leave model "
                          "out for its defaults")
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def load_model_config(path: str | Path) -> tuple[str, Any]:
    """The `stage` and typed `model:` section of a run's or an export's config.yaml, for building
    its networks. The other sections (data, optim, trainer, ...) are training's and are not read:
    weights stay loadable after the installed Lightning changes what `trainer:` may hold."""
    raw = _read_yaml(path)
    stage = str(raw.get("stage", "biqa"))
    if stage not in MODEL_CONFIGS:
        raise ConfigError(f"{path}: stage: {stage!r} is not allowed; choose one of {', '.join(STAGES)}")
    model = raw.get("model")
    model = model if model is not None else OmegaConf.create({})
    if not isinstance(model, DictConfig):
        raise ConfigError(f"{path}: model: must be a mapping of the {stage} model's keys")
    _check_env_reads(OmegaConf.to_container(model, resolve=False), "model.")
    try:
        m = _merge(OmegaConf.structured(MODEL_CONFIGS[stage]), model, "model.")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_choices(m, "model.")
    m.check("model.")
    return stage, m


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what `--print-config` prints and the run dir stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
