"""Export: checkpoint → weights folder (safetensors with metadata, config, card, ONNX checked by
onnxruntime, open_clip state dict), EMA vs raw selection, sharded checkpoints, load_exported."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from _untrusted import RunsCode, code_running_checkpoint
from lit_restore.checkpointing import WeightsError
from lit_restore.config import load_config, to_dict
from lit_restore.export import export_command, load_exported
from lit_restore.fit import build_stage

REPO = Path(__file__).resolve().parent.parent


def fake_checkpoint(stage, step: int) -> dict:
    """What Lightning writes, minus the loops: enough for export (optimizer state included, to
    check that it is left out)."""
    return {"state_dict": stage.state_dict(), "hyper_parameters": {"config": to_dict(stage.cfg)},
            "global_step": step, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}


@pytest.fixture(scope="module")
def restorer_ckpt(tmp_path_factory):
    """A tiny restorer with an EMA copy whose weights differ from the raw network's."""
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/tiny/restorer.yaml", ["optim.ema_decay=0.9", "model.arch=nafnet"])
    stage = build_stage(cfg)
    stage.configure_model()
    with torch.no_grad():
        for p in stage.net.parameters():
            p.normal_(0, 0.1)
        for p in stage.ema.module.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save(fake_checkpoint(stage, 42), path)
    return path, stage


def test_restorer_export_ema_safetensors_card_onnx(restorer_ckpt, tmp_path, capsys):
    path, stage = restorer_ckpt
    assert export_command(str(path), str(tmp_path), ema=True, onnx=True) == 0
    folder = tmp_path / "restorer"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.yaml", "README.md", "model.onnx"}
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"stage": "restorer", "step": "42", "ema": "true", "modules": "restorer"}
        keys = set(f.keys())
        assert all(k.startswith("restorer.") for k in keys)  # no optimizer state, no training-only parts
        ema_state = stage.ema.module.state_dict()
        for k in keys:
            assert torch.equal(f.get_tensor(k), ema_state[k.removeprefix("restorer.")]), k
    card = (folder / "README.md").read_text()
    assert "training step: 42" in card and "EMA" in card and "model.onnx: max abs difference" in card
    assert load_config(folder / "config.yaml").optim.ema_decay == 0.9
    diff = float(capsys.readouterr().out.split("max abs difference to PyTorch (onnxruntime) ")[1].split()[0])
    assert diff < 1e-4

    # The ONNX file runs at a size it was not exported at and matches the loaded module.
    net = load_exported(tmp_path, "restorer")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 40, 27)
    with torch.no_grad():
        ref = stage.ema.module.eval()(x)
        assert torch.equal(net(x), ref)
    (out,) = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=0)


def test_raw_weights_and_sharded_checkpoint(restorer_ckpt, tmp_path):
    import torch.distributed.checkpoint as dcp

    path, stage = restorer_ckpt
    ckpt = torch.load(path, weights_only=False)
    sharded = tmp_path / "sharded.ckpt"
    # A DCP folder as FSDP writes it with state_dict_type="sharded" (here from one process).
    dcp.save({"model": ckpt["state_dict"], "hyper_parameters": ckpt["hyper_parameters"], "global_step": 7},
             checkpoint_id=str(sharded))
    assert sharded.is_dir()
    assert export_command(str(sharded), str(tmp_path / "out"), ema=False, onnx=False) == 0
    folder = tmp_path / "out" / "restorer"
    assert not (folder / "model.onnx").exists()
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata()["ema"] == "false" and f.metadata()["step"] == "7"
        raw = stage.net.state_dict()
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), raw[k.removeprefix("restorer.")]), k
    assert "raw (no EMA)" in (folder / "README.md").read_text()


def test_biqa_export_loads_in_open_clip(tmp_path):
    import json

    import open_clip
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/tiny/biqa.yaml")
    stage = build_stage(cfg)
    stage.configure_model()
    ckpt = tmp_path / "biqa.ckpt"
    torch.save(fake_checkpoint(stage, 5), ckpt)
    assert export_command(str(ckpt), str(tmp_path / "out"), ema=True, onnx=True) == 0
    folder = tmp_path / "out" / "biqa"
    assert not list(folder.glob("*.onnx"))  # BIQA is not an ONNX stage
    spec = json.loads((folder / "open_clip_config.json").read_text())
    model = open_clip.CLIP(**spec["model_cfg"])
    model.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    model.eval()
    x = torch.rand(2, 3, *stage.clip.image_size)
    text = open_clip.tokenize(["A photo needs noise artifact reduction"])
    with torch.no_grad():
        ref = stage.clip.model.eval()
        assert torch.allclose(model.encode_image(x), ref.encode_image(x))
        assert torch.allclose(model.encode_text(text), ref.encode_text(text))
        loaded = load_exported(tmp_path / "out", "biqa")
        assert torch.equal(loaded.encode_image(x), ref.encode_image(x))


def test_load_exported_missing_folder_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="lit-restore export"):
        load_exported(tmp_path, "restorer")


def test_untrusted_checkpoints_and_weights_are_refused_in_one_line(restorer_ckpt, tmp_path):
    path, stage = restorer_ckpt
    marker = tmp_path / "ran"
    evil = code_running_checkpoint(tmp_path / "evil.ckpt", marker, stage.state_dict())
    with pytest.raises(WeightsError, match=r"evil\.ckpt: refused: loading it would call .*open") as e:
        export_command(str(evil), str(tmp_path / "out"), onnx=False)
    assert not marker.exists() and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "restorer").exists()
    for name, data in [("empty.ckpt", b""), ("half.ckpt", path.read_bytes()[: path.stat().st_size // 2])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=rf"{name}: (empty file|not a checkpoint)"):
            export_command(str(tmp_path / name), str(tmp_path / "out"), onnx=False)
    # A truncated model.safetensors in a weights folder restore would read.
    assert export_command(str(path), str(tmp_path / "w"), onnx=False) == 0
    weights = tmp_path / "w" / "restorer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="model.safetensors: not a readable safetensors file") as e:
        load_exported(tmp_path / "w", "restorer")
    assert "\n" not in str(e.value)


def test_sharded_checkpoint_that_would_run_code_is_refused(restorer_ckpt, tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    path, stage = restorer_ckpt
    marker = tmp_path / "ran"
    # A non-tensor value of a DCP folder is stored as a torch.save pickle of its own.
    folder = tmp_path / "values.ckpt"
    dcp.save({"model": stage.state_dict(), "hyper_parameters": {"config": RunsCode(marker)}}, checkpoint_id=str(folder))
    with pytest.raises(WeightsError, match=r"values\.ckpt: refused: loading it would call .*open"):
        export_command(str(folder), str(tmp_path / "out"), onnx=False)
    # The folder's .metadata is a plain pickle.
    folder = tmp_path / "metadata.ckpt"
    dcp.save({"model": stage.state_dict()}, checkpoint_id=str(folder))
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(WeightsError, match=r"metadata\.ckpt: refused: loading it would call .*open"):
        export_command(str(folder), str(tmp_path / "out"), onnx=False)
    assert not marker.exists()


def test_export_follows_the_umask(restorer_ckpt, tmp_path):
    """A shared filesystem: with umask 022 colleagues can read the export (it was 0700/0600)."""
    path, _ = restorer_ckpt
    old = os.umask(0o022)
    try:
        assert export_command(str(path), str(tmp_path), onnx=False) == 0
    finally:
        os.umask(old)
    folder = tmp_path / "restorer"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_ldm_export_loads_in_diffusers_and_scm_exports_onnx(tmp_path):
    """The LDM's UNet folder loads with diffusers' own from_pretrained (8 input channels); the SCM,
    which takes (degraded, LDM output), exports to ONNX with both inputs dynamic."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    repo = Path(__file__).resolve().parent.parent
    for name in ("ldm", "scm"):
        torch.manual_seed(0)
        stage = build_stage(load_config(repo / f"configs/tiny/{name}.yaml", [f"out_dir={tmp_path / name}"]))
        stage.configure_model()
        ckpt = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": stage.state_dict(), "hyper_parameters": {"config": to_dict(stage.cfg)},
                    "global_step": 3}, ckpt)
        assert export_command(str(ckpt), str(tmp_path / "weights"), ema=True, onnx=True) == 0
        if name == "ldm":
            unet = UNet2DConditionModel.from_pretrained(tmp_path / "weights" / "ldm" / "unet")
            assert unet.config.in_channels == 2 * stage.ldm.vae.config.latent_channels  # conv_in widened
            ref = stage.inference_unet.state_dict()
            assert all(torch.equal(v, ref[k]) for k, v in unet.state_dict().items())
            AutoencoderKL.from_pretrained(tmp_path / "weights" / "ldm" / "vae")
    session = ort.InferenceSession(str(tmp_path / "weights" / "scm" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["lq", "ldm_out"]
    lq, out = torch.rand(1, 3, 40, 24), torch.rand(1, 3, 40, 24)
    with torch.no_grad():
        ref = stage.export_modules()["scm"].eval()(lq, out).numpy()
    (got,) = session.run(None, {"lq": lq.numpy(), "ldm_out": out.numpy()})
    assert abs(got - ref).max() < 1e-4
