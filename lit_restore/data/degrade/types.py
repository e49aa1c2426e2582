"""The one ordered tuple of degradation types; labels everywhere are indices into it.

BIQA prompts, the LDM's text context, the Degrader's labels and the evaluation suite all
read this tuple, so its order is part of every checkpoint: append, never reorder.
"""

DEGRADATION_TYPES: tuple[str, ...] = (
    "no",
    "noise",
    "blur",
    "jpeg",
    "lowres",
    "haze",
    "rain",
    "lowlight",
    # Real paired data only (no synthetic op makes these).
    "raindrop",
    "snow",
)

# Types the GPU Degrader can synthesise (everything but "no" and the real-only ones).
SYNTHETIC_TYPES: tuple[str, ...] = ("noise", "blur", "jpeg", "lowres", "haze", "rain", "lowlight")

# Words used in the prompt "A photo needs {word} artifact reduction" (AutoDIR's wording).
PROMPT_WORDS: dict[str, str] = {
    "no": "no",
    "noise": "noise",
    "blur": "blur",
    "jpeg": "jpeg compression",
    "lowres": "low resolution",
    "haze": "haze",
    "rain": "rain",
    "lowlight": "underexposure",
    "raindrop": "raindrop",
    "snow": "snow",
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
