"""Checkpoints and weights files read as data only.

Every checkpoint or weights file lit_restore reads goes through `load_checkpoint`, `read_weights`
or `load_sharded_checkpoint`: safetensors where the file is one, else `torch.load(weights_only=True)`,
which builds plain containers, numbers, strings and tensors and refuses anything that would need
code from the file. Lightning and lit_restore checkpoints of every stage need nothing more (the RNG
states are stored as plain lists for this), so there is no allow-list of extra types; only a
sharded folder's metadata pickle gets one (`_MetadataUnpickler`). Training and inference both read
through here; nothing in this module needs Lightning.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import AbstractSet, Any, Optional

import torch
from torch import nn

from lit_restore.errors import WeightsError


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _refusal(path: Path, e: Exception) -> Optional[WeightsError]:
    """The error for a file whose unpickling would import and call code, if `e` says so."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused is None:
        return None
    return WeightsError(f"{path}: refused: loading it would call {refused.group(1)}, code named by the file; "
                        "only tensors and plain values are read from checkpoints")


def _load_failure(path: Path, e: Exception) -> WeightsError:
    """One line saying why the file `path` did not load."""
    refused = _refusal(path, e)
    if refused is not None:
        return refused
    if path.stat().st_size == 0:
        return WeightsError(f"{path}: empty file, not a checkpoint")
    if not zipfile.is_zipfile(path):
        return WeightsError(f"{path}: not a checkpoint (no complete torch.save archive: truncated or another format)")
    return WeightsError(f"{path}: not a readable checkpoint (truncated or damaged?): {_first_line(e)}")


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A `torch.save`d checkpoint dict read as data only, tensors on the CPU. `mmap` maps tensor
    storage instead of reading it: a cheap check that the whole file parses. Any failure, a file
    that would need code to load included, is a `WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'a folder, not a checkpoint file' if path.is_dir() else 'checkpoint not found'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # whatever a stranger's bytes make torch.load raise is that file's error
        raise _load_failure(path, e) from None
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


class _MetadataUnpickler(pickle.Unpickler):
    """A sharded checkpoint's `.metadata` is a plain pickle (torch writes it so): rebuilt here from
    the checkpoint-metadata classes, torch.Size, dtypes, layouts and paths only; any other global
    the file names is refused instead of imported and called."""

    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.metadata as meta

        found = getattr(sys.modules.get(module), name, None)
        allowed = (
            (module == meta.__name__ and isinstance(found, type))
            or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                  ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
            or (module == "torch" and isinstance(found, torch.dtype))
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def load_sharded_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A sharded (torch.distributed.checkpoint) checkpoint folder consolidated in memory, read as
    data only: its metadata through `_MetadataUnpickler`, tensors and other values with
    weights_only loads, Lightning's `meta.pt` with `load_checkpoint`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)

    class Reader(FileSystemReader):
        # Some torch releases (2.11) catch what read_metadata raises, to look for per-rank
        # metadata, and then fail on "metadata is None": the real reason is kept here.
        failure: Optional[Exception] = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            try:
                with open(folder / ".metadata", "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as e:
                self.failure = e
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # The base planner unpickles these with weights_only=False: it gets a copy re-saved
            # from a data-only load.
            clean = io.BytesIO()
            torch.save(torch.load(value, weights_only=True), clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    checkpoint: dict[str, Any] = {}
    reader = Reader(folder)
    try:
        _load_state_dict(checkpoint, storage_reader=reader, planner=Planner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # the folder is a stranger's: any failure is that checkpoint's
        cause = reader.failure or e
        # CheckpointException carries the failing rank's traceback; its last line is the error.
        lines = str(cause).strip().splitlines()
        reason = lines[-1][:200] if lines else type(cause).__name__
        refused = _refusal(folder, cause)
        raise refused or WeightsError(f"{folder}: not a readable sharded checkpoint: {reason}") from None
    extra = folder / "meta.pt"  # what Lightning keeps beside the shards: step, hyper-parameters, ...
    if extra.is_file():
        checkpoint.update(load_checkpoint(extra))
    return checkpoint


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: a `.safetensors` file (an exported folder: its
    `model.safetensors`), or a checkpoint's `state_dict` (a bare state dict as is)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
            raise WeightsError(f"{path}: not a readable safetensors file: {_first_line(e)}") from None
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: its state_dict is a {type(state).__name__}, not a dict of tensors")
    return state


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
        raise WeightsError(f"{path}: not a readable safetensors file: {_first_line(e)}") from None


def tensors_under_prefix(state: dict[str, torch.Tensor], wanted: AbstractSet[str], prefixes: tuple[str, ...]
                         ) -> Optional[dict[str, torch.Tensor]]:
    """The `wanted` keys of `state` under the first of `prefixes` that holds all of them, with the
    prefix stripped (a module's weights inside a checkpoint, an export or a bare state dict); None
    when no prefix holds them all."""
    for prefix in prefixes:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if wanted <= found.keys():
            return {k: found[k] for k in wanted}
    return None


def load_module_weights(module: nn.Module, path: str, prefixes: tuple[str, ...], what: str) -> None:
    """Load a whole `module` (`what`, e.g. "restorer") from a file as `model.pretrained`: a stage
    .ckpt, an exported folder or a safetensors file, read as data. The file must hold every one of
    the module's tensors under one of `prefixes`, at the same shapes (the same arch and sizes)."""
    try:
        state = read_weights(path)
    except WeightsError as e:
        raise WeightsError(f"model.pretrained: {e} (give a {what} .ckpt, exported folder or model.safetensors)") from None
    sub = tensors_under_prefix(state, module.state_dict().keys(), prefixes)
    if sub is None:
        raise WeightsError(f"{path}: not a {type(module).__name__} of this config (looked for its keys under "
                           f"{', '.join(repr(p) for p in prefixes)})")
    try:
        module.load_state_dict(sub)
    except RuntimeError as e:
        raise WeightsError(f"{path}: {what} shapes differ from model (arch/width/blocks): "
                           f"{str(e).splitlines()[-1].strip()}") from None
