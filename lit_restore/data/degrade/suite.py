"""The GIR task suite: fixed degradation tasks (configs/gir_suite.yaml) and their test sets.

A task is one fixed parameter set for one or more ops plus its own seed. Every test image is
degraded with a generator seeded from (task seed, sample key), so a task set regenerates
bit-identically from the same clean shards on the same device, whatever the batch it is in.
Paired real test sets (shards with `lq.png` and a json "task") join as extra tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor

from lit_restore.config import ConfigError, DegradeConfig, check_degrade
from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.ops import CHAIN_ORDER, OPS
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.names import safe_name

DEFAULT_SUITE = Path(__file__).resolve().parents[3] / "configs" / "gir_suite.yaml"
SUITE_VERSION = 1
LEVELS = ("id", "ood")
KINDS = ("single", "combo", "real")
# Tasks apply their ops in the chain's order (`CHAIN_ORDER`), whatever order the YAML lists them in.


@dataclass
class Task:
    """One evaluation task: fixed op parameters (synthetic) or a paired real test set."""

    name: str
    types: tuple[str, ...]  # degradation types, in the order they are applied
    ops: dict[str, dict[str, Any]]  # op → every parameter, fixed (empty for real tasks)
    seed: int
    level: str  # "id" (inside the training ranges), "ood" (harder) or "real" (a paired real set)
    kind: str  # "single", "combo" or "real"
    source: str = ""  # real tasks: the paired shard URL pattern
    dataset: str = ""  # real tasks: the json "dataset" the samples carry

    def describe(self) -> str:
        """One line: name, types, parameters."""
        if self.kind == "real":
            params = f"real pairs of {self.dataset or 'any dataset'} in {self.source}"
        else:
            params = "; ".join(f"{op}(" + ", ".join(f"{k}={_fmt(v)}" for k, v in p.items()) + ")"
                               for op, p in self.ops.items())
        return f"{self.name}\t{'+'.join(self.types)}\t{self.level}\t{params}"


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range(value: Any, default: Any) -> Any:
    """A task's scalar → the op config's [v, v] range (or [name] list of modes)."""
    if isinstance(default, list) and not isinstance(value, list):
        return [value, value]
    return value


def task_config(task: Task) -> DegradeConfig:
    """The DegradeConfig that applies `task`'s ops (probability 1, fixed values) in chain order."""
    sections = {}
    for op, params in task.ops.items():
        default = OPS[op].config()
        values = {k: _range(v, getattr(default, k)) for k, v in params.items()}
        sections[op] = dataclasses.replace(default, prob=1.0, **values)
    return DegradeConfig(mode="task", task=task.name, types=list(task.types), **sections)


def _parse_task(i: int, raw: Any, defaults: dict[str, dict[str, Any]], where: str, ops_key: str = "") -> Task:
    """One task of a suite; errors name `where: tasks[i] (name).ops.<op>.<param>`, or
    `ops_key.<op>.<param>` when given (ops a user typed elsewhere, e.g. `degrade --ops`)."""
    key = f"{where}: tasks[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping with name, level, seed, ops")
    unknown = set(raw) - {"name", "level", "seed", "ops"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key; allowed here: level, name, ops, seed")
    name = str(raw.get("name", ""))
    if not name or any(c.isspace() or c in "/\\" for c in name):
        raise ConfigError(f"{key}.name: {name!r} must be a non-empty name without spaces or slashes")
    key = f"{where}: tasks[{i}] ({name})"
    if raw.get("level") not in LEVELS:
        raise ConfigError(f"{key}.level: {raw.get('level')!r} is not allowed; choose one of {', '.join(LEVELS)}")
    if not isinstance(raw.get("seed"), int):
        raise ConfigError(f"{key}.seed: {raw.get('seed')!r} must be an integer")
    ops = raw.get("ops")
    ops_key = ops_key or f"{key}.ops"
    if not isinstance(ops, dict) or not ops:
        raise ConfigError(f"{ops_key}: expected a mapping of op → parameters, e.g. {{noise: {{sigma: 25}}}}")
    merged: dict[str, dict[str, Any]] = {}
    for op in CHAIN_ORDER:
        if op not in ops:
            continue
        params = {**defaults.get(op, {}), **(ops[op] or {})}
        # Task parameters are the numbers and modes; on/off switches of an op's method (bool
        # fields such as rain.mioir_geometry) keep their defaults.
        default = OPS[op].config()
        allowed = [f.name for f in dataclasses.fields(default)
                   if f.name != "prob" and not isinstance(getattr(default, f.name), bool)]
        for p in params:
            if p not in allowed:
                raise ConfigError(f"{ops_key}.{op}.{p}: unknown key; allowed here: {', '.join(allowed)}")
        missing = [p for p in allowed if p not in params]
        if missing:
            raise ConfigError(f"{ops_key}.{op}.{missing[0]}: missing (not in the task nor in defaults)")
        merged[op] = {p: params[p] for p in allowed}
        for p, value in merged[op].items():
            _check_type(f"{ops_key}.{op}.{p}", value, getattr(default, p))
    extra = set(ops) - set(merged)
    if extra:
        raise ConfigError(f"{ops_key}.{sorted(extra)[0]}: unknown op; choose from {', '.join(CHAIN_ORDER)}")
    task = Task(name=name, types=tuple(merged), ops=merged, seed=raw["seed"], level=raw["level"],
                kind="single" if len(merged) == 1 else "combo")
    check_degrade(task_config(task), path=ops_key)
    return task


def _check_type(key: str, value: Any, default: Any) -> None:
    """A task value must be a number, or a string for string fields (a list only for lists of modes)."""
    kind = type(default[0]) if isinstance(default, list) else type(default)
    allowed = (str, list) if kind is str and isinstance(default, list) else (str,) if kind is str else (int, float)
    if not isinstance(value, allowed) or isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} must be {'a name' if kind is str else 'a number'}")


def _read_suite(path: Optional[str | Path]) -> tuple[dict[str, Any], str]:
    path = Path(path) if path else DEFAULT_SUITE
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict) or raw.get("version") != SUITE_VERSION:
        got = raw.get("version") if isinstance(raw, dict) else None
        raise ConfigError(f"{path.name}: version: expected {SUITE_VERSION}, got {got!r}")
    return raw, path.name


def load_suite(path: Optional[str | Path] = None) -> list[Task]:
    """The tasks of a suite YAML (default configs/gir_suite.yaml), validated; bad entries fail
    with one line naming the task and key."""
    raw, where = _read_suite(path)
    defaults = raw.get("defaults") or {}
    tasks = [_parse_task(i, t, defaults, where) for i, t in enumerate(raw.get("tasks") or [])]
    if not tasks:
        raise ConfigError(f"{where}: tasks: empty")
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t.name in seen:
            raise ConfigError(f"{where}: tasks[{i}].name: {t.name!r} repeats tasks[{seen[t.name]}]")
        seen[t.name] = i
    return tasks


def task_from_ops(ops: dict[str, dict[str, Any]], name: str = "custom", seed: int = 0, level: str = "id",
                  path: Optional[str | Path] = None, ops_key: str = "ops") -> Task:
    """A task from op parameters (e.g. {"noise": {"sigma": 25}}); the rest from the suite's
    defaults. Errors name `ops_key.<op>.<param>`."""
    raw, where = _read_suite(path)
    return _parse_task(0, {"name": name, "level": level, "seed": seed, "ops": ops}, raw.get("defaults") or {}, where,
                       ops_key=ops_key)


def degrader_for(cfg: DegradeConfig) -> Degrader:
    """The Degrader of a `degrade:` section; mode=task looks its task up in the suite."""
    if cfg.mode != "task":
        return Degrader(cfg)
    task = find_task(load_suite(cfg.suite or None), cfg.task)
    return Degrader(task_config(task), task=task)


def task_degrader(name: str, suite_path: Optional[str] = None) -> Degrader:
    """The Degrader applying the fixed parameters of suite task `name`."""
    return degrader_for(DegradeConfig(mode="task", task=name, suite=suite_path or ""))


def find_task(tasks: Sequence[Task], name: str) -> Task:
    for t in tasks:
        if t.name == name:
            return t
    close = [t.name for t in tasks if name.split("_")[0] in t.name][:5]
    hint = f"; similar: {', '.join(close)}" if close else ""
    raise ConfigError(f"degrade.task: {name!r} is not in the suite ({len(tasks)} tasks){hint}")


def sample_seed(task_seed: int, key: str) -> int:
    """Generator seed of one test image: stable across processes, machines and batchings."""
    digest = hashlib.sha256(f"{task_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def degrade_for_task(gt: Tensor, task: Task, sample_keys: Optional[Sequence[str]] = None, start_index: int = 0,
                     depth: Optional[Tensor] = None, has_depth: Optional[Tensor] = None) -> Tensor:
    """Degrade a (B, 3, H, W) float batch for `task`; sample i is seeded from its key (or from
    its index `start_index + i`), so its result does not depend on the rest of the batch.
    One image at a time: this is for building test sets, not for training."""
    if task.kind == "real":
        raise ValueError(f"task {task.name!r} is a real paired set; its lq images come from {task.source}")
    keys = list(sample_keys) if sample_keys is not None else [str(start_index + i) for i in range(gt.shape[0])]
    if len(keys) != gt.shape[0]:
        raise ValueError(f"{len(keys)} sample keys for a batch of {gt.shape[0]}")
    degrader = Degrader(task_config(task), task=task)
    out = []
    for i, key in enumerate(keys):
        g = torch.Generator(device=gt.device)
        g.manual_seed(sample_seed(task.seed, key))
        d = None if depth is None else depth[i : i + 1]
        hd = None if has_depth is None else has_depth[i : i + 1]
        out.append(degrader(gt[i : i + 1], generator=g, depth=d, has_depth=hd)[0])
    return torch.cat(out)


def _to_uint8(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def build_task_set(task: Task, val_urls: str | list[str], max_images: int = 0,
                   device: str | torch.device = "cpu") -> Iterator[tuple[str, Tensor, Tensor]]:
    """(key, gt, lq) uint8 (3, H, W) of a task, in shard order, at full image size.

    Synthetic tasks degrade the clean samples of `val_urls` (paired samples are skipped); real
    tasks read their own paired shards (`task.source`). `max_images` > 0 stops early.
    """
    from lit_restore.data.shards import iter_samples

    urls = task.source if task.kind == "real" else val_urls
    count = 0
    for s in iter_samples(urls):
        if max_images and count >= max_images:
            return
        real = s["lq"] is not None
        if task.kind == "real":
            if not real or (task.dataset and s["dataset"] != task.dataset) or DEGRADATION_TYPES[s["label"]] != task.types[0]:
                continue
            lq = torch.from_numpy(s["lq"].copy()).permute(2, 0, 1)
        elif real:
            continue
        gt = torch.from_numpy(s["gt"].copy()).permute(2, 0, 1)
        if task.kind != "real":
            depth = None if s["depth"] is None else torch.from_numpy(s["depth"].copy())[None, None].to(device)
            gt_f = gt[None].to(device).float() / 255
            lq = _to_uint8(degrade_for_task(gt_f, task, [s["key"]], depth=depth)[0]).cpu()
        count += 1
        yield s["key"], gt, lq


def _shard_samples(url: str) -> Iterator[tuple[bool, Optional[dict[str, Any]]]]:
    """(paired, json) of every sample of a shard that has a clean image, without reading images;
    json is None when missing or unreadable.

    A damaged shard or json ends or skips quietly here: the loader counts those samples as
    corrupt when it reads them.
    """
    from lit_restore.data.shards import GT_MEMBERS, open_shard, split_name, tar_members

    metas: dict[str, Any] = {}
    suffixes: dict[str, set[str]] = {}
    try:
        with open_shard(url) as stream:
            for name, data in tar_members(stream, lambda n: split_name(n)[1] == "json"):
                key, suffix = split_name(name)
                suffixes.setdefault(key, set()).add(suffix)
                if suffix == "json":
                    try:
                        metas[key] = json.loads(data)
                    except (ValueError, RecursionError):
                        pass
    except Exception:  # the shard's bytes come from strangers; see the docstring
        pass
    for key, found in suffixes.items():
        if found & set(GT_MEMBERS):
            meta = metas.get(key)
            yield "lq.png" in found, meta if isinstance(meta, dict) else None


@dataclass
class ShardSurvey:
    """What a test-data pattern holds: its real tasks and how many clean samples it has."""

    real: list[Task]
    clean: int


def survey_shards(urls: str | list[str]) -> ShardSurvey:
    """One real task per (dataset, task type) found among the paired samples of `urls`, and the
    number of clean samples (those the synthetic tasks degrade)."""
    from lit_restore.data.shards import expand_urls

    patterns = [urls] if isinstance(urls, str) else list(urls)
    found: dict[tuple[str, str], str] = {}
    clean = 0
    for pattern in patterns:
        for url in expand_urls(pattern):
            for paired, meta in _shard_samples(url):
                if not paired:
                    clean += 1
                    continue
                kind = str(meta.get("task", "")) if meta else ""
                if kind not in DEGRADATION_TYPES:
                    continue  # decode_sample rejects (and counts) these samples too
                found.setdefault((str(meta.get("dataset", "")), kind), pattern)
    tasks = []
    for (dataset, kind), pattern in sorted(found.items()):
        name = f"real_{safe_name(dataset.replace(' ', '-').replace('/', '-'), 40) if dataset else 'paired'}_{kind}"
        tasks.append(Task(name=name, types=(kind,), ops={}, seed=0, level="real", kind="real",
                          source=pattern, dataset=dataset))
    return ShardSurvey(tasks, clean)


__all__ = ["ShardSurvey", "Task", "build_task_set", "degrade_for_task", "degrader_for", "find_task", "load_suite", "sample_seed",
           "survey_shards", "task_config", "task_degrader", "task_from_ops"]
