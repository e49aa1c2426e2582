"""`degrade:`: the Degrader's mode and types, and one section per op (`degrade.<op>`), derived
from the table of ops (`lit_restore.data.degrade.ops.OPS`), with each op's bounds and checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lit_restore.config.base import ConfigError, choice
from lit_restore.data.degrade.ops import CHAIN_ORDER, OPS
from lit_restore.data.degrade.types import SYNTHETIC_TYPES


@dataclass
class DegradeSettings:
    """The Degrader's settings other than the ops' own parameters."""

    # single: one op per degraded sample (chosen with weights `<op>.prob`); mixed: the `types`
    # chain, each op included per sample with probability `<op>.prob` (a sample that draws none
    # gets one); task: the fixed task `task` of the suite.
    mode: str = choice("mixed", ("single", "mixed", "task"), "one type per sample, a chain, or a fixed task")
    # Ops in use, in the order the chain applies them (by default every op: haze and rain happen
    # in the scene, before the camera's exposure, optics, sampling, sensor noise and compression).
    types: list[str] = field(default_factory=lambda: list(CHAIN_ORDER))
    clean_fraction: float = 0.0  # fraction of samples left clean (label "no")
    task: str = ""  # task name from the suite when mode=task
    suite: str = ""  # suite YAML for mode=task; "" = configs/gir_suite.yaml
    quantize: bool = True  # round to 8 bits after each op, as MiOIR/BasicSR
    # torch.compile the Degrader in training (fewer kernel launches on a GPU; the first batches
    # pay the compile time). Off by default: the eager chain already reads nothing on the host.
    compile: bool = False


DegradeConfig = dataclasses.make_dataclass(
    "DegradeConfig",
    [(name, OPS[name].config, field(default_factory=OPS[name].config)) for name in SYNTHETIC_TYPES],
    bases=(DegradeSettings,),
    namespace={"__doc__": "On-device degradation synthesis (lit_restore/data/degrade, configs/degrade/): "
                          "the settings, then one section of parameters per op.",
               "__module__": __name__},
)


def check_degrade(cfg: DegradeConfig, path: str = "degrade") -> None:
    """Value checks of a DegradeConfig; raises ConfigError naming the key path."""
    if not cfg.types:
        raise ConfigError(f"{path}.types: empty; give at least one of {', '.join(SYNTHETIC_TYPES)}")
    for i, name in enumerate(cfg.types):
        if name not in OPS:
            raise ConfigError(f"{path}.types[{i}]: {name!r} is not a synthetic type; choose from {', '.join(SYNTHETIC_TYPES)}")
    if len(set(cfg.types)) != len(cfg.types):
        raise ConfigError(f"{path}.types: {list(cfg.types)} lists a type twice")
    if not 0.0 <= cfg.clean_fraction < 1.0:
        raise ConfigError(f"{path}.clean_fraction: {cfg.clean_fraction} must be in [0, 1)")
    if cfg.mode == "task" and not cfg.task:
        raise ConfigError(f"{path}.task: missing; mode=task needs a task name (lit-restore degrade --list-tasks)")
    if cfg.mode != "task" and all(getattr(cfg, name).prob == 0 for name in cfg.types):
        raise ConfigError(f"{path}: every op in types has prob 0; nothing could be synthesised")
    for name in SYNTHETIC_TYPES:
        op, op_cfg, key = OPS[name], getattr(cfg, name), f"{path}.{name}"
        if not 0.0 <= op_cfg.prob <= 1.0:
            raise ConfigError(f"{key}.prob: {op_cfg.prob} must be in [0, 1]")
        for param, (low, high) in op.bounds.items():
            value = getattr(op_cfg, param)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if isinstance(value, (list, tuple)) and (len(values) != 2 or values[0] > values[1]):
                raise ConfigError(f"{key}.{param}: {values} must be [low, high] with low <= high")
            if any(not low <= v <= high for v in values):
                raise ConfigError(f"{key}.{param}: {value} must lie in [{low}, {high}]")
        if op.check is not None:
            op.check(op_cfg, key)
