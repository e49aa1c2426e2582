"""The automatic loop's control flow, prompt mixing, input collection and output files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_weights import REPO, export_loop, export_tiny
from lit_restore.loop import automatic_loop, mix_prompts
from lit_restore.restore import collect_inputs, output_stem, save_result
from lit_restore.restorers import biqa_logits, crop_offsets
from lit_restore.settings import LoopSettings

CLASSES = ["no", "noise", "blur", "lowres"]


class Script:
    """BIQA logits from a fixed list, one per pass; records what the LDM and SCM were given."""

    def __init__(self, logits):
        self.logits = [torch.tensor([l], dtype=torch.float32) for l in logits]
        self.steps, self.corrections = [], []

    def classify(self, image):
        return self.logits[len(self.steps)]

    def step(self, image, weights):
        self.steps.append(weights.clone())
        return image + 1

    def correct(self, image, ldm_out):
        self.corrections.append((image.clone(), ldm_out.clone()))
        return ldm_out * 10


def test_loop_drops_handled_types_skips_scm_after_lowres_and_stops_on_no():
    s = Script([
        [0.0, 3.0, 2.0, 0.0],  # noise
        [0.0, 5.0, 2.0, 1.0],  # noise is out of play → blur
        [0.0, 9.0, 9.0, 1.0],  # → lowres
        [2.0, 9.0, 9.0, 9.0],  # only "no" left in play
    ])
    r = automatic_loop(torch.zeros(1, 3, 4, 4), s.classify, CLASSES, s.step, s.correct, max_passes=7)
    assert [p.detected for p in r.passes] == ["noise", "blur", "lowres", "no"]
    assert [p.scm for p in r.passes] == [True, True, False, False]
    assert r.stopped == "no artifact"
    # Pass 2's probabilities cover the classes in play only, renormalised.
    p2 = r.passes[1].probabilities
    assert set(p2) == {"no", "blur", "lowres"} and sum(p2.values()) == pytest.approx(1.0)
    assert p2["blur"] == pytest.approx(np.exp(2) / (np.exp(0) + np.exp(2) + np.exp(1)))
    # The mixture weights given to the LDM are zero for handled classes.
    assert s.steps[1][1] == 0 and s.steps[2][1] == 0 and s.steps[2][2] == 0
    assert torch.allclose(s.steps[0].sum(), torch.tensor(1.0))
    # Image flow: ((0+1)*10 + 1)*10 = 110, then the lowres pass adds 1 without SCM.
    assert torch.all(r.image == 111)
    assert len(s.corrections) == 2 and torch.all(s.corrections[1][0] == 10)


def test_loop_can_keep_the_scm_after_a_lowres_pass():
    s = Script([[0.0, 0.0, 0.0, 5.0], [9.0, 0.0, 0.0, 0.0]])
    r = automatic_loop(torch.zeros(1, 3, 4, 4), s.classify, CLASSES, s.step, s.correct, scm_every_pass=True)
    assert [(p.detected, p.scm) for p in r.passes] == [("lowres", True), ("no", False)]
    assert torch.all(r.image == 10) and len(s.corrections) == 1


def test_loop_stops_at_max_passes():
    s = Script([[0.0, 3.0, 2.0, 1.0]] * 3)
    r = automatic_loop(torch.zeros(1, 3, 4, 4), s.classify, CLASSES, s.step, None, max_passes=2)
    assert r.stopped == "max passes" and len(r.passes) == 2 and len(s.steps) == 2
    assert not any(p.scm for p in r.passes)  # no SCM given
    r0 = automatic_loop(torch.zeros(1, 3, 4, 4), s.classify, CLASSES, s.step, None, max_passes=0)
    assert r0.passes == [] and r0.stopped == "max passes"


def test_loop_needs_a_no_class():
    with pytest.raises(ValueError, match="'no'"):
        automatic_loop(torch.zeros(1, 3, 4, 4), lambda x: torch.zeros(1, 2), ["noise", "blur"], None, None)


class CropBIQA:
    """A BIQA stand-in whose two logits are each crop's mean brightness (and its negative)."""

    image_size, resize = (32, 32), False

    def __init__(self):
        self.batches = []

    def logits(self, x):
        self.batches.append(tuple(x.shape))
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)


def test_biqa_averages_its_logits_over_a_grid_of_native_scale_crops():
    image = torch.zeros(1, 3, 128, 128)
    image[..., 96:, :32] = 1.0  # only the bottom-left crop is bright; the centre crop would miss it
    biqa = CropBIQA()
    torch.testing.assert_close(biqa_logits(biqa, image, torch.device("cpu")), torch.tensor([[1 / 16, -1 / 16]]))
    assert biqa.batches == [(16, 3, 32, 32)]  # a 4x4 grid, one batch
    biqa_logits(biqa, torch.rand(1, 3, 5000, 40), torch.device("cpu"))
    assert biqa.batches[-1] == (4, 3, 32, 32)  # at most 4 per side, only as many as fit
    biqa_logits(biqa, torch.rand(1, 3, 20, 40), torch.device("cpu"))
    assert biqa.batches[-1] == (1, 3, 20, 40)  # smaller than a crop: scored whole (PromptCLIP resizes it)
    assert crop_offsets(128, 32, 4) == [0, 32, 64, 96] and crop_offsets(100, 32, 3) == [0, 34, 68]
    assert crop_offsets(40, 32, 1) == [4] and crop_offsets(5000, 224, 4)[-1] == 5000 - 224


def test_mix_prompts_is_the_weighted_sum_of_token_states():
    states = torch.randn(3, 5, 4)
    w = torch.tensor([0.2, 0.0, 0.8])
    mixed = mix_prompts(w, states)
    assert mixed.shape == (1, 5, 4)
    torch.testing.assert_close(mixed[0], 0.2 * states[0] + 0.8 * states[2])
    torch.testing.assert_close(mix_prompts(torch.tensor([0.0, 1.0, 0.0]), states)[0], states[1])


def test_collect_inputs_from_files_folders_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.JPG", "sub/c.txt", "d.tif"):
        (tmp_path / name).write_bytes(b"x")
    files, errors = collect_inputs([str(tmp_path / "a.png"), str(tmp_path), str(tmp_path / "*.tif"),
                                    str(tmp_path / "missing.png"), str(tmp_path / "*.webp")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.png", "d.tif", "sub/b.JPG"]
    assert len(errors) == 2 and "missing.png: no such file" in errors[0] and "no image matches" in errors[1]


def test_output_stems_are_unique():
    taken = set()
    assert [output_stem(Path(p), taken) for p in ("x/a.png", "y/a.jpg", "a.tif", "b.png")] == ["a", "a_2", "a_3", "b"]


def test_save_result_keeps_gray_inputs_gray(tmp_path):
    img = torch.rand(1, 3, 6, 7)
    log = {"passes": [], "stopped": "no artifact"}
    gray = save_result(tmp_path, "g", img, {"mode": "I;16"}, log)
    color = save_result(tmp_path, "c", img, {"mode": "RGBA"}, log)
    assert Image.open(gray).mode == "L" and Image.open(color).mode == "RGB"
    assert np.array_equal(np.asarray(Image.open(color)), (img[0] * 255).round().byte().permute(1, 2, 0).numpy())
    assert json.loads((tmp_path / "g.json").read_text()) == log


# --------------------------------------------------------------------------------------
# End to end on tiny exported weights
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """biqa + restorer only: enough for --fast; the loop's absence of an LDM is an error case."""
    tmp = tmp_path_factory.mktemp("tiny_weights")
    out = tmp / "weights"
    for stage in ("biqa", "restorer"):
        export_tiny(stage, out, tmp)
    return out


@pytest.fixture(scope="module")
def full_weights(tmp_path_factory):
    """Every stage the loop needs."""
    tmp = tmp_path_factory.mktemp("full_weights")
    out = tmp / "weights"
    export_loop(out, tmp)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of awkward inputs: RGB, gray, RGBA, 16-bit gray, 16-bit RGB, a larger-than-tile
    image, and one corrupt file."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (33, 45), dtype=np.uint8)).save(d / "gray.png")
    Image.fromarray(rng.integers(0, 256, (36, 30, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 65536, (30, 41), dtype=np.uint16)).save(d / "gray16.png")
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(d / "large.jpg", quality=90)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def run_restore(args):
    from lit_restore.cli import main

    return main(["restore", *map(str, args)])


def test_fast_restores_every_mode_and_counts_the_unreadable_file(weights, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_restore([inputs, "--weights", weights, "--out", out, "--fast", "--tile", 32, "--overlap", 8,
                        "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1  # one input failed; the others were written
    assert "broken.png" in captured.err and "restored 5 of 6 image(s)" in captured.out
    assert "broken.png" in (out / "failed.txt").read_text()
    for name, mode, size in [("rgb", "RGB", (52, 40)), ("gray", "L", (45, 33)), ("alpha", "RGB", (30, 36)),
                             ("gray16", "L", (41, 30)), ("large", "RGB", (90, 70))]:
        im = Image.open(out / f"{name}.png")
        assert (im.mode, im.size) == (mode, size), name
        log = json.loads((out / f"{name}.json").read_text())
        assert log["mode"] == "fast" and log["size"] == [size[1], size[0]]
    assert json.loads((out / "gray16.json").read_text())["bit_depth"] == 16
    assert not (out / "broken.png").exists()


def test_fast_output_is_the_restorer_output(weights, inputs, tmp_path):
    from lit_restore.exported import load_exported

    out = tmp_path / "out"
    assert run_restore([inputs / "rgb.png", "--weights", weights, "--out", out, "--fast", "--device", "cpu"]) == 0
    net = load_exported(weights, "restorer")
    x = torch.from_numpy(np.array(Image.open(inputs / "rgb.png"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = (net(x)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(out / "rgb.png")), expected)


def test_missing_weights_and_bad_arguments_fail_in_one_line(weights, inputs, tmp_path, capsys):
    code = run_restore([inputs / "rgb.png", "--weights", tmp_path / "nowhere", "--out", tmp_path / "o", "--fast"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "weights folder not found" in err
    # A stage's own folder: the export folder above it is named, not a command that writes into the stage.
    code = run_restore([inputs / "rgb.png", "--weights", Path(weights) / "restorer", "--out", tmp_path / "o", "--fast"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"--weights takes the folder that holds it: --weights {weights}" in err
    # The automatic loop needs the LDM, which this folder lacks.
    code = run_restore([inputs / "rgb.png", "--weights", weights, "--out", tmp_path / "o"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no exported ldm weights" in err
    code = run_restore([inputs / "rgb.png", "--weights", weights, "--out", tmp_path / "o", "--sampler", "heun"])
    assert code == 2 and "--sampler 'heun'" in capsys.readouterr().err
    code = run_restore([inputs / "rgb.png", "--weights", weights, "--out", tmp_path / "o", "--strength", "0"])
    assert code == 2 and "--strength 0.0 must be in (0, 1]" in capsys.readouterr().err
    code = run_restore([tmp_path / "none.png", "--weights", weights, "--out", tmp_path / "o", "--fast"])
    err = capsys.readouterr().err
    assert code == 2 and "none.png: no such file" in err and "no input images" in err
    assert not (tmp_path / "o").exists()


def test_an_output_folder_holding_an_input_is_refused(weights, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    for out in (folder, tmp_path):  # the input folder itself, and a folder above it
        code = run_restore([folder, "--weights", weights, "--out", out, "--fast", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "holds the input" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"] and (folder / "a.png").read_bytes() == before


def test_an_image_that_runs_out_of_memory_is_listed_and_the_rest_continue(weights, inputs, tmp_path, capsys,
                                                                           monkeypatch):
    from lit_restore.restorers import FastRestorer

    real = FastRestorer.restore

    def restore(self, image, generator):
        if image.shape[-1] == 90:  # large.jpg
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        if image.shape[-1] == 30:  # alpha.png
            raise MemoryError()
        return real(self, image, generator)

    monkeypatch.setattr(FastRestorer, "restore", restore)
    out = tmp_path / "out"
    code = run_restore([inputs, "--weights", weights, "--out", out, "--fast", "--device", "cpu"])
    assert code == 1 and "restored 3 of 6 image(s)" in capsys.readouterr().out
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 3 and [l for l in failed if "out of memory" in l] == [
        f"{inputs / 'alpha.png'}: out of memory (MemoryError); try a smaller --tile or a larger machine",
        f"{inputs / 'large.jpg'}: out of memory (OutOfMemoryError); try a smaller --tile or a larger machine"]
    assert sorted(p.name for p in out.glob("*.png")) == ["gray.png", "gray16.png", "rgb.png"]


# --------------------------------------------------------------------------------------
# The automatic loop and --prompt on tiny diffusion models (built directly, not exported)
# --------------------------------------------------------------------------------------


class HalfwaySCM(torch.nn.Module):
    """Stands in for the SCM: the mean of the pass input and the LDM output."""

    def forward(self, lq, ldm_out):
        return (lq + ldm_out) / 2


@pytest.fixture(scope="module")
def diffusion():
    from lit_restore.config import load_config
    from lit_restore.models.clip import PromptCLIP, create_clip
    from lit_restore.models.ldm import LatentDiffusion, load_unet, load_vae, widen_conv_in
    from lit_restore.restorers import TiledDiffusion
    from lit_restore.settings import SamplerSettings, TileSettings

    torch.manual_seed(0)
    ldm_cfg = load_config(REPO / "configs/tiny/ldm.yaml").model
    biqa_cfg = load_config(REPO / "configs/tiny/biqa.yaml").model
    vae = load_vae(ldm_cfg.pretrained, ldm_cfg.vae_cfg)
    ldm = LatentDiffusion(widen_conv_in(load_unet(ldm_cfg.pretrained, ldm_cfg.unet_cfg), 2 * vae.config.latent_channels),
                          vae).eval()
    biqa = PromptCLIP(create_clip("tiny", "", biqa_cfg.model_cfg), biqa_cfg.classes).eval()
    return TiledDiffusion(ldm, biqa, HalfwaySCM(), torch.device("cpu"), SamplerSettings(steps=2), TileSettings(48, 16)), biqa


def test_automatic_loop_on_tiny_models_logs_every_pass(diffusion):
    from lit_restore.restorers import AutoRestorer, image_generator

    d, biqa = diffusion
    auto = AutoRestorer(biqa, d, torch.device("cpu"), LoopSettings(max_passes=3))
    image = torch.rand(1, 3, 40, 70)  # wider than a tile: the LDM and SCM run tile by tile
    out, log = auto.restore(image, image_generator(0, d.device))
    assert out.shape == image.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert log["mode"] == "auto" and 1 <= len(log["passes"]) <= 3
    for i, p in enumerate(log["passes"]):
        assert p["index"] == i and sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert len(p["probabilities"]) == len(biqa.class_names) - i  # handled classes leave the set
    handled = [p["detected"] for p in log["passes"] if p["detected"] != "no"]
    assert log["detected"] == handled and len(set(handled)) == len(handled)
    # Same seed, same result: the sampling noise comes from the per-image generator.
    again, _ = auto.restore(image, image_generator(0, d.device))
    assert torch.equal(out, again)


def test_prompt_mode_uses_the_users_text(diffusion):
    from lit_restore.restorers import PromptRestorer, image_generator

    d, _ = diffusion
    image = torch.rand(1, 3, 32, 32)
    a, log = PromptRestorer(d, "A photo needs noise artifact reduction").restore(image, image_generator(1, d.device))
    b, _ = PromptRestorer(d, "A photo needs haze artifact reduction").restore(image, image_generator(1, d.device))
    assert log == {"mode": "prompt", "prompt": "A photo needs noise artifact reduction", "scm": True}
    assert a.shape == image.shape and not torch.equal(a, b)  # the text reaches the UNet
    with pytest.raises(ValueError, match="empty"):
        PromptRestorer(d, "  ")


def test_automatic_loop_and_prompt_on_exported_weights(full_weights, inputs, tmp_path, capsys):
    out = tmp_path / "auto"
    args = ["--weights", full_weights, "--steps", 2, "--max-passes", 2, "--tile", 48, "--overlap", 16, "--device", "cpu"]
    assert run_restore([inputs / "rgb.png", inputs / "gray16.png", inputs / "large.jpg", "--out", out, *args]) == 0
    for name in ("rgb", "gray16", "large"):
        log = json.loads((out / f"{name}.json").read_text())
        assert log["mode"] == "auto" and 1 <= len(log["passes"]) <= 2 and log["stopped"] in ("no artifact", "max passes")
        assert all(sum(p["probabilities"].values()) == pytest.approx(1.0) for p in log["passes"])
        assert all(p["scm"] == (p["detected"] not in ("no", "lowres")) for p in log["passes"])
    assert Image.open(out / "large.png").size == (90, 70) and Image.open(out / "gray16.png").mode == "L"
    assert "restored 3 of 3" in capsys.readouterr().out
    every = tmp_path / "every"
    assert run_restore([inputs / "rgb.png", "--out", every, "--scm-every-pass", *args]) == 0
    log = json.loads((every / "rgb.json").read_text())
    assert all(p["scm"] == (p["detected"] != "no") for p in log["passes"])

    out = tmp_path / "prompt"
    assert run_restore([inputs / "rgb.png", "--out", out, "--prompt", "A photo needs haze artifact reduction", *args]) == 0
    log = json.loads((out / "rgb.json").read_text())
    assert log["mode"] == "prompt" and log["prompt"].endswith("haze artifact reduction") and log["scm"] is True


def test_ldm_without_its_text_encoder_is_refused(full_weights, tmp_path, inputs, capsys):
    import shutil

    broken = tmp_path / "weights"
    shutil.copytree(full_weights, broken)
    shutil.rmtree(broken / "ldm" / "text_encoder")  # what an LDM trained with a random text tower exports
    code = run_restore([inputs / "rgb.png", "--weights", broken, "--out", tmp_path / "o", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no text_encoder/" in err


def test_an_ldm_whose_config_and_scheduler_disagree_on_the_prediction_type_is_refused(full_weights, tmp_path, inputs,
                                                                                      capsys):
    import shutil

    broken = tmp_path / "weights"
    shutil.copytree(full_weights, broken)
    path = broken / "ldm" / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(path.read_text())
    scheduler["prediction_type"] = "epsilon" if scheduler["prediction_type"] == "v_prediction" else "v_prediction"
    path.write_text(json.dumps(scheduler))
    code = run_restore([inputs / "rgb.png", "--weights", broken, "--out", tmp_path / "o", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "prediction_type" in err and "export the LDM again" in err


def test_restore_runs_without_training_code_and_ignores_the_exports_trainer_section(full_weights, inputs, tmp_path):
    """Inference builds its networks from the exports' `model:` sections: a fresh interpreter that
    runs --fast and the automatic loop never imports Lightning, `fit` or a stage, and a `trainer:`
    key the installed Lightning does not know (weights made under another version) changes nothing."""
    import shutil
    import subprocess
    import sys

    import yaml

    weights = tmp_path / "weights"
    shutil.copytree(full_weights, weights)
    export_tiny("restorer", weights, tmp_path)
    for config in weights.glob("*/config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        cfg["trainer"]["an_argument_of_a_future_lightning"] = 1
        config.write_text(yaml.safe_dump(cfg))
    script = f"""
import sys
from lit_restore.cli import main
common = [{str(inputs / 'rgb.png')!r}, "--weights", {str(weights)!r}, "--device", "cpu"]
fast = main(["restore", *common, "--out", {str(tmp_path / 'fast')!r}, "--fast"])
auto = main(["restore", *common, "--out", {str(tmp_path / 'auto')!r}, "--steps", "2", "--max-passes", "2"])
training = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")
                  or m.startswith(("lit_restore.fit", "lit_restore.stages", "lit_restore.checkpointing")))
print("RESULT", fast, auto, training)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RESULT 0 0 []" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "fast" / "rgb.png").is_file() and (tmp_path / "auto" / "rgb.png").is_file()
