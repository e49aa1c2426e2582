"""The errors every config section raises and the `choice` field."""

from __future__ import annotations

from dataclasses import field
from typing import Any



class UserError(Exception):
    """A problem with what the user gave (config, data, weights, arguments), phrased as one line:
    the CLI prints it and exits 2, without a traceback unless `--debug`. Mixed into the concrete
    error types (ConfigError is a ValueError, missing shards a FileNotFoundError, ...)."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased as one line that names the key path."""


def choice(default: Any, choices: tuple, doc: str = "") -> Any:
    """A field whose value must be one of `choices` (checked after merging)."""
    return field(default=default, metadata={"choices": choices, "doc": doc})
