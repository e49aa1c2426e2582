"""The errors every config section raises and the `choice` field."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from lit_restore.errors import ConfigError, UserError

__all__ = ["ConfigError", "UserError", "choice"]


def choice(default: Any, choices: tuple, doc: str = "") -> Any:
    """A field whose value must be one of `choices` (checked after merging)."""
    return field(default=default, metadata={"choices": choices, "doc": doc})
