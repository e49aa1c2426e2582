"""Loading: YAML + overrides merged into the typed schema, and every check of a run config, in one place."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lit_restore.config.base import ConfigError
from lit_restore.config.degrade import check_degrade
from lit_restore.config.models import MODEL_CONFIGS
from lit_restore.config.run import STAGES, RunConfig


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
        "data.network.connect_timeout": data.network.connect_timeout,
        "data.network.stall_timeout": data.network.stall_timeout,
        "checkpoint.signal_grace": cfg.checkpoint.signal_grace,
    }
    for key, value in positive.items():
        if not value > 0:  # NaN too
            raise ConfigError(f"{key}: {value} must be > 0")
    non_negative = {
        "data.num_workers": data.num_workers,
        "data.val_batch_size": data.val_batch_size,
        "data.val_crop": data.val_crop,
        "data.shuffle_buffer": data.shuffle_buffer,
        "data.network.retries": data.network.retries,
        "checkpoint.requeue_lock_wait": cfg.checkpoint.requeue_lock_wait,
    }
    for key, value in non_negative.items():
        if value < 0 or value != value:
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


def _model_class(stage: str) -> type:
    """The model dataclass of `stage`; ConfigError for a stage that does not exist."""
    if stage not in MODEL_CONFIGS:
        raise ConfigError(f"stage: {stage!r} is not allowed; choose one of {', '.join(STAGES)}")
    return MODEL_CONFIGS[stage]


def schema_for(stage: str) -> DictConfig:
    """The typed OmegaConf schema of a stage's RunConfig."""
    model = _model_class(stage)
    schema = OmegaConf.structured(RunConfig(stage=stage))
    schema.model = OmegaConf.structured(model)
    return schema


# Configs, the exported ones included, are a few KB; a larger file is not a config (or a YAML bomb).
MAX_CONFIG_BYTES = 1 << 20


def _read_yaml(path: str | Path | None) -> DictConfig:
    """A YAML mapping from `path` (an empty one for None); ConfigError with one line otherwise."""
    import yaml

    if path is not None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the read
            raise ConfigError(f"{path}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size:,} bytes; a config is a few KB (at most "
                              f"{MAX_CONFIG_BYTES:,} bytes are read)")
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
    """YAML file (optional) + overrides → validated RunConfig. An override is `key=value`, or a
    further YAML file merged over what comes before it (`fit configs/ldm.yaml
    configs/benchmarks/aio3/data.yaml out_dir=...`: a stage's recipe with a protocol's data);
    the `key=value` items are applied last."""
    raw = _read_yaml(path)
    layers = [item for item in overrides if "=" not in item and item.endswith((".yaml", ".yml"))]
    for item in overrides:
        if "=" not in item and item not in layers:
            raise ConfigError(f"override {item!r}: expected key=value or a YAML file to merge")
    try:
        for layer in layers:
            raw = OmegaConf.merge(raw, _read_yaml(layer))
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([item for item in overrides if item not in layers]))
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
    model = raw.get("model")
    model = model if model is not None else OmegaConf.create({})
    if not isinstance(model, DictConfig):
        raise ConfigError(f"{path}: model: must be a mapping of the {stage} model's keys")
    _check_env_reads(OmegaConf.to_container(model, resolve=False), "model.")
    try:
        m = _merge(OmegaConf.structured(_model_class(stage)), model, "model.")
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
