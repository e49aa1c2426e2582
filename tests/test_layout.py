"""The one-way imports docs/architecture.md draws: inference never reaches training code or
Lightning, and a stage imports no other stage (only stages/base.py)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_restore"
TRAINING = ("lightning", "pytorch_lightning", "torchmetrics", "lit_restore.fit", "lit_restore.stages",
            "lit_restore.checkpointing", "lit_restore.guards", "lit_restore.export", "lit_restore.data.datamodule",
            "lit_restore.demo", "lit_restore.foundations", "lit_restore.rundir")
INFERENCE = ["exported.py", "loop.py", "restorers.py", "restore.py", "evaluate.py", "settings.py", "metrics.py",
             "lines.py", "report.py", "tiling.py", "weights.py", "losses.py", "models/*.py", "data/images.py",
             "data/shards.py", "data/remote.py", "data/degrade/*.py", "names.py", "weights_folder.py", "protocols.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("pattern", INFERENCE)
def test_inference_modules_never_import_training_code(pattern):
    files = sorted(PACKAGE.glob(pattern))
    assert files, pattern
    for path in files:
        bad = sorted(m for m in imported_modules(path) if any(is_under(m, t) for t in TRAINING))
        assert not bad, f"{path.relative_to(PACKAGE)} imports training code: {bad}"


def test_a_stage_imports_no_other_stage():
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        others = sorted(m for m in imported_modules(path)
                        if is_under(m, "lit_restore.stages") and not is_under(m, "lit_restore.stages.base")
                        and m != "lit_restore.stages")
        assert not others, f"stages/{path.name} imports {others}"


def test_the_check_sees_a_violation(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from lit_restore.stages.ldm import LDMStage\n    import lightning as L\n")
    assert {"lit_restore.stages.ldm", "lightning"} <= imported_modules(probe)
