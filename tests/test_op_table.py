"""The table of degradation ops: an op added in one file (plus its suite tasks) is drawn,
previewed, named and configurable, and checkpoints made before it was added still load."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _pythonpath import pythonpath
from lit_restore.config import load_config
from lit_restore.data.degrade.ops import CHAIN_ORDER, OPS
from lit_restore.data.degrade.types import (DEGRADATION_TYPES, FIRST_TYPES, SYNTHETIC_TYPES, TYPES_KEY,
                                            align_type_rows, recorded_types)

REPO = Path(__file__).resolve().parents[1]

VEIL_OP = '''
"""A grey veil: x → (1 − s)·x + s/2."""

from dataclasses import dataclass, field

import torch

from lit_restore.data.degrade.op import Op, per_image


@dataclass
class VeilOpConfig:
    prob: float = 0.5
    strength: list[float] = field(default_factory=lambda: [0.2, 0.6])


OP = Op(
    name="veil", config=VeilOpConfig, bounds={"strength": (0, 1)},
    draw=lambda c, d: {"strength": d.uniform(c.strength)},
    apply=lambda x, p, c: torch.lerp(x, torch.full_like(x, 0.5), per_image(p["strength"])),
    severity=lambda p: p["strength"] / 0.6, prompt_word="grey veil", chain_rank=15,
    grid=({"strength": 0.2}, {"strength": 0.4}, {"strength": 0.6}),
)
'''

VEIL_TASKS = '''
  - {name: veil_s0.4, level: id, seed: 9001, ops: {veil: {strength: 0.4}}}
  - {name: veil_s0.8, level: ood, seed: 9002, ops: {veil: {strength: 0.8}}}
'''


def test_the_table_derives_types_config_bounds_and_chain():
    assert set(SYNTHETIC_TYPES) == set(OPS) and DEGRADATION_TYPES == FIRST_TYPES
    assert list(CHAIN_ORDER) == ["haze", "rain", "lowlight", "blur", "lowres", "noise", "jpeg"]
    cfg = load_config(None, [])
    assert cfg.degrade.types == list(CHAIN_ORDER)
    for name, op in OPS.items():
        assert isinstance(getattr(cfg.degrade, name), op.config)
        assert set(op.bounds) <= {f for f in vars(op.config()) if f != "prob"}, name
        assert len(op.grid) == 3 and all(set(p) <= set(vars(op.config())) for p in op.grid), name


def test_rows_follow_the_types_by_name():
    saved = ("no", "blur", "noise")  # another order, and fewer types
    bank = torch.arange(4.0).view(4, 1)  # three types, then the empty prompt
    current = {"context_bank": torch.full((len(DEGRADATION_TYPES) + 1, 1), -1.0)}
    state = {"context_bank": bank, "other.weight": torch.zeros(3, 1)}
    assert align_type_rows(state, saved, current, "x") == ["context_bank"]
    got = state["context_bank"][:, 0].tolist()
    assert got[DEGRADATION_TYPES.index("no")] == 0 and got[DEGRADATION_TYPES.index("blur")] == 1
    assert got[DEGRADATION_TYPES.index("noise")] == 2 and got[-1] == 3
    assert got[DEGRADATION_TYPES.index("haze")] == -1  # not in the checkpoint: the model's own row
    assert recorded_types(None, "x") == FIRST_TYPES and recorded_types("no,blur", "x") == ("no", "blur")


def _fit(config: str, out: Path, shards: Path, *extra: str):
    from lit_restore.fit import fit

    return fit(load_config(REPO / "configs" / "tiny" / config, [
        f"out_dir={out}", f"data.train={shards}/train-{{000000..000003}}.tar", f"data.val={shards}/val-000000.tar",
        "data.num_workers=0", "data.crop=32", "trainer.enable_progress_bar=false", *extra]))


def test_an_op_added_in_one_file_is_drawn_previewed_named_and_old_checkpoints_load(sample_shards, tmp_path):
    # Checkpoints made before the op exists: the ConStyle classifier and the LDM prompt bank have
    # one row per type. The LDM's is made to look older still (no recorded types).
    constyle = _fit("constyle.yaml", tmp_path / "constyle", sample_shards, "trainer.max_steps=2",
                    "trainer.val_check_interval=2")
    ldm = _fit("ldm.yaml", tmp_path / "ldm", sample_shards, "data.batch_size=2", "model.val_steps=2",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1")
    ldm_ckpt = tmp_path / "ldm" / "checkpoints" / "last.ckpt"
    old = torch.load(ldm_ckpt, weights_only=False)
    assert old.pop(TYPES_KEY) == list(DEGRADATION_TYPES)
    torch.save(old, ldm_ckpt)
    classifier = constyle.lightning_module.moco.encoder_q.classifier[-1].weight.detach().clone()
    torch.save({"classifier": classifier, "bank": old["state_dict"]["context_bank"]},
               tmp_path / "before.pt")
    del constyle, ldm

    # The op is added: one Python file, and its tasks in the suite YAML.
    tree = tmp_path / "tree"
    for part in ("lit_restore", "configs", "data_prep"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "foundations").symlink_to(REPO / "foundations")
    (tree / "lit_restore/data/degrade/ops/veil.py").write_text(VEIL_OP)
    suite = tree / "configs/gir_suite.yaml"
    suite.write_text(suite.read_text().replace("tasks:\n", "  veil: {strength: 0.4}\ntasks:\n", 1) + VEIL_TASKS)

    script = textwrap.dedent(f'''
        import json, sys
        from pathlib import Path
        import torch
        from lit_restore.config import ConfigError, DegradeConfig, load_config
        from lit_restore.data.degrade.composer import Degrader
        from lit_restore.data.degrade.preview import degrade_command
        from lit_restore.data.degrade.suite import load_suite, task_degrader
        from lit_restore.data.degrade.types import DEGRADATION_TYPES, SYNTHETIC_TYPES, prompt_for, type_index
        from lit_restore.errors import WeightsError
        from lit_restore.export import export_command
        from lit_restore.exported import load_exported
        from lit_restore.fit import fit

        tmp, shards = Path({str(tmp_path)!r}), Path({str(sample_shards)!r})
        out = {{"types": list(DEGRADATION_TYPES), "synthetic": list(SYNTHETIC_TYPES), "prompt": prompt_for("veil"),
               "chain": DegradeConfig().types}}
        gt = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        lq, label, types, params = Degrader(DegradeConfig(mode="single", types=["veil"]))(gt)
        out["labels"] = label.tolist()
        out["strength"] = params["veil.strength"].tolist()
        out["veiled"] = bool(((lq - 0.5).abs() <= (gt - 0.5).abs() + 0.5 / 255).all())
        task = task_degrader("veil_s0.4")
        out["task_strength"] = task(gt)[3]["veil.strength"].tolist()
        out["suite"] = [t.name for t in load_suite() if "veil" in t.types]
        try:
            load_config(None, ["degrade.veil.strength=[0.2,3]"])
        except ConfigError as e:
            out["bounds"] = str(e)
        out["yaml"] = load_config(None, ["degrade.types=[veil,noise]", "degrade.veil.prob=1"]).degrade.veil.prob
        from PIL import Image
        Image.fromarray((gt[0].permute(1, 2, 0) * 255).byte().numpy()).save(tmp / "im.png")
        out["grid_rc"] = degrade_command(str(tmp / "im.png"), str(tmp / "grid.png"), "", True, False, None, 0)
        out["ops_rc"] = degrade_command(str(tmp / "im.png"), str(tmp / "veil.png"), "veil:strength=0.5", False, False,
                                        None, 0)

        # Old checkpoints: the LDM resumes (its bank gains the veil's prompt row) and exports;
        # the ConStyle classifier exports, and refuses to resume in one line.
        before = torch.load(tmp / "before.pt")
        trainer = fit(load_config(tmp / "ldm" / "config.yaml", ["trainer.max_steps=3"]))
        bank = trainer.lightning_module.context_bank
        out["ldm_step"] = trainer.global_step
        out["ldm_rows_kept"] = bool(torch.equal(bank[:10], before["bank"][:10]) and torch.equal(bank[-1], before["bank"][-1]))
        out["ldm_veil_row"] = float(bank[type_index("veil")].sub(bank[-1]).abs().max())
        out["ldm_export_rc"] = export_command(str(tmp / "ldm" / "checkpoints" / "last.ckpt"), str(tmp / "w"), onnx=False)
        out["constyle_export_rc"] = export_command(str(tmp / "constyle" / "checkpoints" / "last.ckpt"), str(tmp / "w"),
                                                  onnx=False)
        weight = load_exported(tmp / "w", "constyle").classifier[-1].weight
        out["classifier_rows"] = weight.shape[0]
        out["classifier_kept"] = bool(torch.equal(weight[:10], before["classifier"]))
        try:
            fit(load_config(tmp / "constyle" / "config.yaml", ["trainer.max_steps=4"]))
        except WeightsError as e:
            out["constyle_resume"] = str(e)
        print(json.dumps(out))
    ''')
    run = subprocess.run([sys.executable, "-c", script], cwd=tree, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": pythonpath(tree), "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled",
                              "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert out["types"] == [*DEGRADATION_TYPES, "veil"] and out["synthetic"][-1] == "veil"  # named, appended
    assert out["prompt"] == "A photo needs grey veil artifact reduction"
    assert out["chain"][:3] == ["haze", "veil", "rain"]  # its chain_rank places it
    assert out["labels"] == [len(DEGRADATION_TYPES)] * 4 and all(0.2 <= s <= 0.6 for s in out["strength"])  # drawn
    assert out["veiled"] and out["task_strength"] == pytest.approx([0.4] * 4)
    assert out["suite"] == ["veil_s0.4", "veil_s0.8"]
    assert "degrade.veil.strength" in out["bounds"] and "[0, 1]" in out["bounds"] and out["yaml"] == 1.0
    assert out["grid_rc"] == 0 and out["ops_rc"] == 0
    from PIL import Image
    with Image.open(tmp_path / "grid.png") as grid:  # previewed: a row per op, the veil's among them
        rows = grid.height / (32 + 16)
    assert rows == len(CHAIN_ORDER) + 1

    assert out["ldm_step"] == 3 and out["ldm_rows_kept"] and out["ldm_veil_row"] > 0
    assert out["ldm_export_rc"] == 0 and out["constyle_export_rc"] == 0
    assert out["classifier_rows"] == len(DEGRADATION_TYPES) + 1 and out["classifier_kept"]
    message = out["constyle_resume"]
    assert "adds veil" in message and "new run" in message and "\n" not in message
