"""Typed run configuration: dataclasses merged by OmegaConf from YAML plus `key=value` overrides.

Every stage config has the same top level (`RunConfig`); `model` is the stage's own dataclass,
chosen by `stage`. Unknown keys, wrong types and values outside a field's `choices` fail at
load time with one line naming the full key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

STAGES = ("biqa", "constyle", "restorer", "ldm", "scm")
SAMPLE_DIR = "data/sample"


class ConfigError(ValueError):
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
    batch_size: int = 8  # per device
    val_batch_size: int = 0  # 0 = same as batch_size
    num_workers: int = 2  # per device
    crop: int = 128  # square training crop, taken jointly from lq/gt
    val_crop: int = 0  # centre crop for validation; 0 = same as crop
    shuffle_buffer: int = 500  # samples held (as encoded bytes) for shuffling
    steps_per_epoch: int = 500  # a "virtual epoch": batches per rank between loader restarts
    max_corrupt_fraction: float = 0.05  # stop the run when more samples than this are unreadable


@dataclass
class DegradeConfig:
    """On-device degradation synthesis (see lit_restore/data/degrade)."""

    mode: str = choice("mixed", ("single", "mixed", "task"), "one type per sample, a chain, or a fixed task")
    types: list[str] = field(default_factory=lambda: ["noise", "blur", "jpeg", "lowres", "haze", "rain", "lowlight"])
    clean_fraction: float = 0.0  # fraction of samples left clean (label "no")
    task: str = ""  # task name from the suite when mode=task
    quantize: bool = True  # round to 8 bits after each op, as MiOIR/BasicSR
    ranges: dict[str, Any] = field(default_factory=dict)  # per-op parameter ranges overriding the defaults
    probabilities: dict[str, float] = field(default_factory=dict)  # per-op inclusion probability (mixed)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, stepped per optimizer step."""

    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # final lr = lr * min_lr_ratio
    ema_decay: float = 0.0  # 0 disables EMA; otherwise e.g. 0.999


@dataclass
class WandbConfig:
    """Weights & Biases settings, used when logger=wandb."""

    project: str = "lit_restore"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None


def _default_trainer() -> dict[str, Any]:
    return {
        "max_steps": 1000,
        "accelerator": "auto",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "32-true",
        "val_check_interval": 500,
        "log_every_n_steps": 10,
    }


# --------------------------------------------------------------------------------------
# Stage model sections
# --------------------------------------------------------------------------------------


@dataclass
class BIQAModelConfig:
    """CLIP image tower fine-tuned to name the degradation."""

    arch: str = "ViT-L-14"  # open_clip architecture name
    pretrained: str = "openai"  # open_clip tag, a local checkpoint file, or "" for random init
    model_cfg: Optional[dict[str, Any]] = None  # an open_clip model config (tiny test models)
    classes: list[str] = field(default_factory=lambda: ["no", "noise", "blur", "jpeg", "lowres", "haze", "rain", "lowlight"])
    loss: str = choice("fidelity", ("fidelity", "ce"), "LIQE/AutoDIR fidelity or cross-entropy")
    gt_weight: float = 1.0  # lambda of the term that gives the clean GT low probability for its twin's label
    image_size: int = 224


@dataclass
class ConStyleModelConfig:
    """MoCo-style degradation-aware encoder pretraining."""

    dim: int = 128
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.07


@dataclass
class RestorerModelConfig:
    """ConStyle-conditioned (or plain) restoration network."""

    arch: str = choice("constyle_nafnet", ("constyle_nafnet", "nafnet"), "ConStyle-NAFNet or the plain baseline")
    width: int = 48


@dataclass
class LDMModelConfig:
    """InstructPix2Pix-style Stable Diffusion UNet fine-tuning."""

    pretrained: str = "runwayml/stable-diffusion-v1-5"  # diffusers model id or local folder


@dataclass
class SCMModelConfig:
    """Structure-correction NAFNet trained on the frozen LDM's output."""

    width: int = 64


MODEL_CONFIGS: dict[str, type] = {
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
    logger: str = choice("csv", ("wandb", "csv", "none"), "where metrics go")
    wandb: WandbConfig = field(default_factory=WandbConfig)
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


def _check_choices(obj: Any, path: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
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
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: {value} must be > 0")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers: {data.num_workers} must be >= 0")
    if not 0.0 <= data.max_corrupt_fraction <= 1.0:
        raise ConfigError(f"data.max_corrupt_fraction: {data.max_corrupt_fraction} must be in [0, 1]")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: {cfg.optim.lr} must be > 0")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: {cfg.optim.ema_decay} must be in [0, 1)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: {list(cfg.optim.betas)} must hold two numbers")


def schema_for(stage: str) -> DictConfig:
    """The typed OmegaConf schema of a stage's RunConfig."""
    if stage not in MODEL_CONFIGS:
        raise ConfigError(f"stage: {stage!r} is not allowed; choose one of {', '.join(STAGES)}")
    schema = OmegaConf.structured(RunConfig(stage=stage))
    schema.model = OmegaConf.structured(MODEL_CONFIGS[stage])
    return schema


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + `key=value` overrides → validated RunConfig."""
    try:
        raw = OmegaConf.load(path) if path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}".splitlines()[0]) from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {str(e).splitlines()[0]}") from None
    stage = raw.get("stage", "biqa")
    _normalize_sources(raw)
    schema = schema_for(str(stage))
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as e:
        key = e.full_key or e.key or "?"
        allowed = _allowed_keys(schema, str(key))
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        raise ConfigError(f"{key}: unknown key{hint}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what `--print-config` prints and the run dir stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
