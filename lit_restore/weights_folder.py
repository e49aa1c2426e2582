"""An exported weights folder checked before anything is built from it.

Weights folders come from strangers. Before a network is built: every entry must be a regular
file or folder (a FIFO would hang the first read), no pickle file may lie anywhere in it
(lit_restore writes and reads safetensors only; a stray `.bin` would otherwise reach a library
that offers to unpickle it), every number in its configs must be one an honest model has, and
the model a config describes, built on the meta device (shapes, no memory), may hold no more
values than its safetensors file (`check_fits_file`), so what is allocated is bounded by what is
on disk.
"""

from __future__ import annotations

import inspect
import json
import stat
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from lit_restore.errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# The most entries a folder may hold: an export has a few dozen.
MAX_ENTRIES = 10_000
# Any number in a config: SD's largest are vocab_size 49408 and a MoCo queue of 65536.
MAX_VALUE = 1 << 20
# Counts of layers, blocks and heads: SD-1.5's UNet has 2 per level, ViT-L/14 24 layers.
COUNT_WORDS = ("layers", "blocks", "depth", "heads", "num_")
MAX_COUNT = 1024
MAX_LIST = 1024
# A config describing more values than its file holds, beyond this slack (non-persistent
# buffers: position ids, a sampler's tables), is refused.
SLACK_VALUES = 1 << 22


def check_entries(folder: Path) -> None:
    """Every entry of `folder` (recursively) is a regular file or folder, and none is a pickle."""
    count = 0
    pending = [folder]
    while pending:
        for entry in sorted(pending.pop().iterdir()):
            count += 1
            if count > MAX_ENTRIES:
                raise WeightsError(f"{folder}: more than {MAX_ENTRIES} entries; not an exported weights folder")
            mode = entry.lstat().st_mode
            if stat.S_ISDIR(mode):
                pending.append(entry)
            elif not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
                raise WeightsError(f"{entry}: not a regular file (a FIFO, socket or device); remove it from the "
                                   "weights folder")
            elif entry.suffix.lower() in PICKLE_SUFFIXES:
                raise WeightsError(f"{entry}: a pickle-format file in the weights folder, refused (lit_restore "
                                   "reads safetensors only; `lit-restore export` writes no such file): remove it")


def _is_count(key: str) -> bool:
    return any(word in key.lower() for word in COUNT_WORDS) and "timesteps" not in key.lower()


def check_values(tree: Any, where: str, key: str = "") -> None:
    """Every number in a config (nested dicts and lists) within what an honest model uses:
    at most MAX_VALUE, counts (layers, blocks, heads) at most MAX_COUNT, lists at most MAX_LIST long."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_values(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, (list, tuple)):
        if len(tree) > MAX_LIST:
            raise WeightsError(f"{where}: {key} lists {len(tree)} values; refused")
        for v in tree:
            check_values(v, where, key)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        limit = MAX_COUNT if _is_count(key.rsplit(".", 1)[-1]) else MAX_VALUE
        if not -limit <= tree <= limit:
            shown = f"{tree:g}" if abs(tree) < 1e300 else repr(tree)[:40]
            raise WeightsError(f"{where}: {key} = {shown} is beyond what any model of this kind uses (at most "
                               f"{limit}); refused before building anything")


def read_json_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict, its numbers checked (`check_values`)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: not a JSON object")
    check_values(config, str(path))
    return config


def check_constructor_keys(cls: type, config: dict[str, Any], where: str) -> None:
    """Keys a class's constructor does not take are refused by name (instead of a TypeError)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in config if not k.startswith("_") and k not in params)
    if unknown:
        raise WeightsError(f"{where}: unknown key(s) {', '.join(unknown[:5])} for {cls.__name__}; refused")


def file_values(path: Path) -> int:
    """The number of values the tensors of a safetensors file hold, from its header."""
    from safetensors import safe_open

    total = 0
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    except Exception as e:  # a stranger's header: whatever the parser raises is the file's error
        raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    return total


def check_fits_file(modules: Iterable[nn.Module], files: Iterable[Path], where: str) -> None:
    """`modules`, built on the meta device, hold no more values (parameters and buffers) than
    `files` do, beyond SLACK_VALUES."""
    built = sum(t.numel() for m in modules for t in (*m.parameters(), *m.buffers()))
    stored = sum(file_values(f) for f in files)
    if built > 2 * stored + SLACK_VALUES:
        raise WeightsError(f"{where} describes a model of {built:,} values, its weights hold {stored:,}; refused "
                           "before building it")
