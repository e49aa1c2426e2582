"""The one ordered tuple of degradation types; labels everywhere are indices into it.

BIQA prompts, the LDM's text context, the Degrader's labels and the evaluation suite all read
this tuple. Its first ten names are fixed (`FIRST_TYPES`); the type of an op added to
`lit_restore/data/degrade/ops/` is appended after them. Checkpoints record the tuple they were
trained with (`TYPES_KEY`), and `align_type_rows` moves the rows of type-indexed weights to
this tuple's order when they are loaded.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from lit_restore.data.degrade.ops import OPS
from lit_restore.errors import WeightsError

# The types of the first release, in their label order: every checkpoint that records no types
# was trained with these.
FIRST_TYPES: tuple[str, ...] = (
    "no", "noise", "blur", "jpeg", "lowres", "haze", "rain", "lowlight",
    "raindrop", "snow",  # real paired data only: no synthetic op makes these
)

DEGRADATION_TYPES: tuple[str, ...] = FIRST_TYPES + tuple(name for name in OPS if name not in FIRST_TYPES)

# Types the Degrader can synthesise, in label order.
SYNTHETIC_TYPES: tuple[str, ...] = tuple(t for t in DEGRADATION_TYPES if t in OPS)

# Words used in the prompt "A photo needs {word} artifact reduction" (AutoDIR's wording).
PROMPT_WORDS: dict[str, str] = {
    "no": "no",
    "raindrop": "raindrop",
    "snow": "snow",
    **{name: op.prompt_word for name, op in OPS.items()},
}

PROMPT_TEMPLATE = "A photo needs {} artifact reduction"


def type_index(name: str) -> int:
    """Index of a degradation type; a clear error for unknown names."""
    try:
        return DEGRADATION_TYPES.index(name)
    except ValueError:
        raise ValueError(f"unknown degradation type {name!r}; known: {', '.join(DEGRADATION_TYPES)}") from None


def prompt_for(name: str) -> str:
    return PROMPT_TEMPLATE.format(PROMPT_WORDS[name])


# Where checkpoints (a top-level key, a list) and exports (model.safetensors metadata, names
# joined by commas) record the types their type-indexed rows follow.
TYPES_KEY = "degradation_types"

# Weights whose rows are the types, by the end of their state-dict key, with how many rows follow
# the types: the LDM's prompt contexts (then the empty prompt's) and the ConStyle classifier's
# output layer.
TYPE_ROWS: dict[str, int] = {"context_bank": 1, "classifier.2.weight": 0, "classifier.2.bias": 0}


def recorded_types(value: object, where: str) -> tuple[str, ...]:
    """The types a checkpoint or export records (`value`: a list of names or names joined by
    commas); `FIRST_TYPES` when it records none (it was made before types were recorded)."""
    if value is None:
        return FIRST_TYPES
    names = value.split(",") if isinstance(value, str) else value
    if (not isinstance(names, (list, tuple)) or not names or len(set(names)) != len(names)
            or not all(isinstance(n, str) and n for n in names)):
        raise WeightsError(f"{where}: {TYPES_KEY} must list distinct type names, got {str(value)[:80]!r}")
    return tuple(names)


def align_type_rows(state: dict[str, Tensor], saved: Sequence[str], current: Mapping[str, Tensor],
                    where: str) -> list[str]:
    """Move the rows of `state`'s type-indexed weights (`TYPE_ROWS`) from the order of the
    `saved` types to DEGRADATION_TYPES', in place: rows of types `saved` lacks are taken from
    `current` (the model's own state: its prompt contexts, its initial classifier rows), rows of
    types this install lacks are dropped. Returns the keys changed."""
    if tuple(saved) == DEGRADATION_TYPES:
        return []
    changed = []
    for key, rows in list(state.items()):
        extra = next((n for suffix, n in TYPE_ROWS.items() if key == suffix or key.endswith("." + suffix)), None)
        if extra is None or key not in current or current[key].shape[1:] != rows.shape[1:]:
            continue  # not type-indexed, or a shape load_state_dict will report
        if rows.shape[0] != len(saved) + extra:
            raise WeightsError(f"{where}: {key} has {rows.shape[0]} rows, but the {len(saved)} degradation types "
                             f"it records need {len(saved) + extra}")
        source = [saved.index(t) if t in saved else -1 for t in DEGRADATION_TYPES]
        source += range(len(saved), len(saved) + extra)
        aligned = current[key].detach().to(dtype=rows.dtype, device=rows.device, copy=True)
        for i, j in enumerate(source):
            if j >= 0:
                aligned[i] = rows[j]
        state[key] = aligned
        changed.append(key)
    return changed
