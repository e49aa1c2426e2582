"""`lit-restore evaluate`: metrics on the GIR suite, acceptance/excellence lines, report.

The metric functions live in `lit_restore.metrics` (conventions in its docstring) and are
re-exported here, so `lit_restore.evaluate.psnr` / `ssim` are the public names.
"""

from __future__ import annotations

from lit_restore.metrics import psnr, ssim

__all__ = ["psnr", "ssim"]
