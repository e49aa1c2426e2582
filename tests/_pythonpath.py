"""PYTHONPATH for the subprocesses of tests."""

from __future__ import annotations

import os
from pathlib import Path


def pythonpath(*first: str | Path) -> str:
    """`first`, then the caller's PYTHONPATH: packages installed into a folder on it (the GPU
    machine's missing ones, `make test-device-env`) stay importable in the subprocess."""
    caller = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*map(str, first), *([caller] if caller else [])])
