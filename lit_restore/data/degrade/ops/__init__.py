"""The synthetic degradation ops, one module each (see `lit_restore.data.degrade.op.Op`).

`OPS` is the one table of them: every module of this package that defines `OP`, by name. The
types list, the `degrade:` config section, its bounds, the suite's tasks and the preview grid are
all derived from it, so adding an op is adding its module here (and its tasks, with the defaults
of its parameters, in configs/gir_suite.yaml).
"""

from __future__ import annotations

import importlib
import pkgutil

from lit_restore.data.degrade.op import Op


def _find_ops() -> dict[str, Op]:
    found: dict[str, Op] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        op = getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "OP", None)
        if isinstance(op, Op):
            if op.name in found:
                raise ValueError(f"degradation op {op.name!r} is defined twice (in {module_info.name}.py and before)")
            found[op.name] = op
    return found


OPS: dict[str, Op] = _find_ops()

# The order the default chain applies them in (Op.chain_rank).
CHAIN_ORDER: tuple[str, ...] = tuple(sorted(OPS, key=lambda name: OPS[name].chain_rank))
