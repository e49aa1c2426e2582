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
from huggingface_hub import ModelCard
from safetensors import safe_open

from _untrusted import RunsCode, code_running_checkpoint
from lit_restore.config import load_config, to_dict
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.export import export_command
from lit_restore.exported import load_exported
from lit_restore.fit import build_stage
from lit_restore.weights import WeightsError

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
        assert f.metadata() == {"stage": "restorer", "step": "42", "ema": "true", "modules": "restorer",
                                "degradation_types": ",".join(DEGRADATION_TYPES)}
        keys = set(f.keys())
        assert all(k.startswith("restorer.") for k in keys)  # no optimizer state, no training-only parts
        ema_state = stage.ema.module.state_dict()
        for k in keys:
            assert torch.equal(f.get_tensor(k), ema_state[k.removeprefix("restorer.")]), k
    card = (folder / "README.md").read_text()
    assert "training step: 42" in card and "EMA" in card and "model.onnx: max abs difference" in card
    assert 'InferenceSession("restorer/model.onnx")' in card  # how to load it, in its own tool
    meta = ModelCard.load(folder / "README.md").data
    assert meta.library_name == "pytorch" and meta.pipeline_tag == "image-to-image"
    assert {"lit_restore", "image-restoration", "restorer", "onnx"} <= set(meta.tags)
    assert meta.metrics == ["psnr", "ssim"] and meta.datasets == [s.url for s in stage.cfg.data.train]
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
    assert spec["classes"] == list(cfg.model.classes)
    assert spec["prompts"][spec["classes"].index("noise")] == "A photo needs noise artifact reduction"
    # open_clip's own loader: weights, architecture and preprocessing from the folder alone.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    crop, normalize = preprocess.transforms[1], preprocess.transforms[-1]
    assert tuple(crop.size) == stage.clip.image_size
    assert torch.allclose(torch.tensor(normalize.mean), stage.clip.mean.flatten())
    model.eval()
    x = torch.rand(2, 3, *stage.clip.image_size)
    text = open_clip.get_tokenizer(f"local-dir:{folder}")(spec["prompts"][:1])
    with torch.no_grad():
        ref = stage.clip.model.eval()
        assert torch.allclose(model.encode_image(x), ref.encode_image(x))
        assert torch.allclose(model.encode_text(text), ref.encode_text(text))
        loaded = load_exported(tmp_path / "out", "biqa")
        assert torch.equal(loaded.encode_image(x), ref.encode_image(x))
    meta = ModelCard.load(folder / "README.md").data
    assert meta.library_name == "open_clip" and "clip" in meta.tags and meta.metrics == ["accuracy"]


def test_full_biqa_open_clip_config_loads_in_open_clip(tmp_path):
    """The full config's export (ViT-L/14 QuickGELU, OpenAI weights): open_clip rebuilds the same
    architecture from the written config alone (on the meta device: no weights, no download)."""
    import json

    import open_clip

    from lit_restore.export import base_model, open_clip_config
    from lit_restore.fit import build_on_meta

    cfg = load_config(REPO / "configs/biqa.yaml")
    stage = build_on_meta(cfg)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config(cfg, stage.clip.model)))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}", device="meta")
    ours = stage.clip.model
    assert type(model.transformer.resblocks[0].mlp.gelu) is type(ours.transformer.resblocks[0].mlp.gelu)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    # Through JSON, so the tuples of one and the lists of the other compare equal.
    assert json.loads(json.dumps(model.visual.preprocess_cfg)) == json.loads(json.dumps(ours.visual.preprocess_cfg))
    assert base_model(cfg) == "timm/vit_large_patch14_clip_224.openai"


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
        # The LDM's prompt contexts come from its CLIP in setup, as in training (export checks them).
        stage.setup("fit") if name == "ldm" else stage.configure_model()
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


def test_ldm_export_is_an_instruct_pix2pix_pipeline_that_reproduces_restore_prompt(tmp_path):
    """The stock diffusers pipeline loads the export (converted transformers text encoder and
    tokenizer, the Euler-ancestral scheduler restore samples with) and gives `restore --prompt`'s
    image for the same seed; restore reads nothing outside the weights folder."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    from _tiny_weights import export_tiny
    from lit_restore.export import read_checkpoint
    from lit_restore.models.ldm import ddpm_scheduler, make_sampler
    from lit_restore.restore import restore_command
    from lit_restore.settings import RunSettings, SamplerSettings

    weights = tmp_path / "weights"
    export_tiny("biqa", weights, tmp_path)
    export_tiny("ldm", weights, tmp_path, [f"model.clip.pretrained={tmp_path / 'biqa.ckpt'}"])
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(weights / "ldm"))
    pipe.set_progress_bar_config(disable=True)
    meta = ModelCard.load(weights / "ldm" / "README.md").data
    assert meta.library_name == "diffusers" and "instruct-pix2pix" in meta.tags
    # The exported scheduler is the sampler restore builds, timestep spacing included.
    ours = make_sampler("euler_a", ddpm_scheduler())
    for s in (ours, pipe.scheduler):
        s.set_timesteps(7)
    assert type(pipe.scheduler) is type(ours) and pipe.scheduler.config.timestep_spacing == "linspace"
    assert torch.equal(pipe.scheduler.timesteps, ours.timesteps)
    assert torch.equal(pipe.scheduler.sigmas, ours.sigmas)
    # The converted text encoder gives the prompt contexts the LDM trained with.
    bank = read_checkpoint(tmp_path / "ldm.ckpt")["state_dict"]["context_bank"]
    prompt = "A photo needs noise artifact reduction"
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids).last_hidden_state
    assert torch.allclose(states[0], bank[1], atol=1e-5)  # row 1: the "noise" prompt

    (tmp_path / "biqa.ckpt").unlink()  # the training config's text tower source is gone
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert restore_command(str(weights), [str(tmp_path / "in.png")], str(tmp_path / "out"), prompt=prompt,
                           sampling=SamplerSettings(steps=3), run_settings=RunSettings(device="cpu", seed=0)) == 0
    restored = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "in.png"))).permute(2, 0, 1)[None].float() / 255
    for text in ({"prompt": prompt}, {"prompt_embeds": bank[1:2]}):  # its text encoder, or our contexts
        out = pipe(**text, image=image, num_inference_steps=3, guidance_scale=1.0, image_guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        assert np.abs((out * 255).round().astype(np.int16) - restored).max() <= 1


def test_exported_ldm_loads_without_its_pretrained_source(tmp_path):
    """An LDM trained from a diffusers folder (model.pretrained) is rebuilt from the export alone."""
    import shutil

    tiny = load_config(REPO / "configs/tiny/ldm.yaml").model
    source = tmp_path / "sd"
    shutil.copytree(REPO / tiny.pretrained, source)  # the tiny foundation, as a user's SD folder
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/tiny/ldm.yaml", [f"model.pretrained={source}"])
    stage = build_stage(cfg)
    stage.setup("fit")  # the prompt contexts from its CLIP, as in training (export checks them)
    torch.save(fake_checkpoint(stage, 3), tmp_path / "ldm.ckpt")
    assert export_command(str(tmp_path / "ldm.ckpt"), str(tmp_path / "out"), ema=True, onnx=False) == 0
    shutil.rmtree(source)
    loaded = load_exported(tmp_path / "out", "ldm")
    ref = stage.inference_unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded["unet"].state_dict().items())
