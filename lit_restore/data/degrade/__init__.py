"""Degradation synthesis on the device: ops, the `Degrader` that composes them, the GIR suite."""

from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.types import DEGRADATION_TYPES, SYNTHETIC_TYPES

__all__ = ["DEGRADATION_TYPES", "SYNTHETIC_TYPES", "Degrader"]
