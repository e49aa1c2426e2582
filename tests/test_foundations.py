"""The tiny foundations shipped in foundations/tiny/: files match their manifest, fit the size
budget, load as the classes they stand in for, their cards state how they were made and what they
reach (the VAE's PSNR is recomputed here), and each recipe still trains (its first steps)."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_restore.config import load_config
from lit_restore.export import export_command
from lit_restore.fit import fit
from lit_restore.foundations import FOUNDATIONS, verify_manifest, write_manifest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "foundations" / "tiny"
BUDGET_BYTES = 30 * 10**6


def test_shipped_files_match_the_manifest_and_the_budget():
    assert verify_manifest(SHIPPED) == []
    files = json.loads((SHIPPED / "MANIFEST.json").read_text())["files"]
    assert sum(f["bytes"] for f in files.values()) <= BUDGET_BYTES
    weights = [name for name in files if name.endswith(".safetensors")]
    # VAE, CLIP, UNet, LDM (its UNet and VAE), restorer, SCM: each foundation's weights in its folder
    assert all(any(w.startswith(f"{f.card_dir}/") for w in weights) for f in FOUNDATIONS.values())
    assert not [p for p in SHIPPED.rglob("*") if p.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl")]  # no pickle anywhere


def test_manifest_names_a_changed_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.safetensors").write_bytes(b"123")
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) == []
    (tmp_path / "a" / "w.safetensors").write_bytes(b"124")
    assert verify_manifest(tmp_path) == ["a/w.safetensors"]


def card_figure(name: str) -> float:
    card = (SHIPPED / FOUNDATIONS[name].card_dir / "README.md").read_text()
    assert card.startswith("---\n") and re.search(r"made by: `(make foundations|python -m lit_restore\.foundations --only [a-z ]+)`", card)
    assert re.search(r"training: \d+ steps, [\d.]+ min", card)
    return float(re.search(r"\*\*([-\d.]+)\*\*", card).group(1))


def test_cards_state_command_time_and_figure():
    for name in FOUNDATIONS:
        card_figure(name)


def test_vae_reconstructs_held_out_crops_as_its_card_says(tmp_path):
    """The VAE card's PSNR, recomputed: the recipe's whole 128-px val crops (`prep-sample --crop 128
    --val-crops 4`, seed 0), posterior mode, per-image PSNR averaged."""
    from diffusers import AutoencoderKL

    from data_prep.sample import prep_sample

    assert prep_sample(str(tmp_path), crop=128, train_crops=1, val_crops=4, seed=0, overwrite=False) == 0
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        images = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                  for m in tar.getmembers() if m.name.endswith("gt.png")]
    gts = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    vae = AutoencoderKL.from_pretrained(str(SHIPPED / "sd" / "vae")).eval()
    with torch.no_grad():
        recon = ((vae.decode(vae.encode(gts * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    psnr = float((10 * torch.log10(1 / (recon - gts).pow(2).mean(dim=(1, 2, 3)))).mean())
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2  # the downsampling factor the card states
    assert abs(psnr - card_figure("vae")) < 0.05, (psnr, card_figure("vae"))


def test_ldm_foundation_restores_from_pure_noise(tmp_path):
    """The LDM foundation follows its condition image: sampled from pure noise (10 Euler-ancestral
    steps, v-prediction, no SCM) with the noise prompt, its output beats the noisy held-out crops
    it was given by several dB, where an LDM that ignores its condition lands far below them."""
    from data_prep.sample import prep_sample
    from lit_restore.data.degrade.suite import degrade_for_task, find_task, load_suite
    from lit_restore.data.degrade.types import DEGRADATION_TYPES
    from lit_restore.metrics import psnr
    from lit_restore.models.ldm import build_latent_diffusion, prompt_bank

    assert prep_sample(str(tmp_path), crop=128, train_crops=1, val_crops=1, seed=0, overwrite=False) == 0
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        images = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))[32:96, 32:96]
                  for m in tar.getmembers() if m.name.endswith("gt.png")]
    gts = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    noisy = degrade_for_task(gts, find_task(load_suite(), "noise_s25"))
    cfg = load_config(REPO / "configs" / "tiny" / "ldm.yaml").model
    assert (SHIPPED / "ldm" / "scheduler" / "scheduler_config.json").read_text().count('"v_prediction"') == 1
    ldm = build_latent_diffusion(cfg).eval()
    bank = prompt_bank(cfg.clip)
    label = DEGRADATION_TYPES.index("noise")
    with torch.no_grad():
        out = ldm.sample(noisy, bank[label:label + 1].expand(len(gts), -1, -1), bank[-1:], steps=10,
                         generator=torch.Generator().manual_seed(0))
    gain = float(psnr(out, gts).mean() - psnr(noisy, gts).mean())
    assert gain > 3.0, gain


@pytest.mark.parametrize("recipe", ["autoencoder", "clip", "unet", "ldm", "restorer", "scm"])
def test_recipe_runs_its_first_steps_and_exports(recipe, sample_shards, tmp_path):
    cfg = load_config(REPO / "configs" / "foundations" / f"{recipe}.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
        f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.batch_size=2", "data.crop=32",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=1"])
    trainer = fit(cfg)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert export_command(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "weights"), onnx=False) == 0
    f = next(f for f in FOUNDATIONS.values() if f.recipe == recipe)
    for src in f.copies:
        assert (tmp_path / "weights" / f.stage / src).exists(), src


def test_only_remakes_the_named_foundations_and_keeps_the_others(tmp_path):
    """`--only vae restorer` retrains the VAE, and the restorer in the background beside it, into
    OUT; the CLIP and UNet files stay byte for byte, and the manifest covers every file with the
    new hashes."""
    from lit_restore.foundations import FoundationPlan, run_foundations

    out = tmp_path / "out"
    shutil.copytree(SHIPPED, out)
    before = json.loads((out / "MANIFEST.json").read_text())["files"]
    assert run_foundations(out, tmp_path / "work", FoundationPlan(0.001), only=["vae", "restorer"]) == 0
    after = json.loads((out / "MANIFEST.json").read_text())["files"]
    assert verify_manifest(out) == [] and after.keys() == before.keys()
    changed = {name for name in after if after[name]["sha256"] != before[name]["sha256"]}
    assert changed == {"sd/vae/diffusion_pytorch_model.safetensors", "sd/vae/config.json",
                       "restorer/model.safetensors"}, changed
    for card in ("sd/vae", "restorer"):
        assert "--only vae restorer --scale 0.001`" in (out / card / "README.md").read_text()
    assert (out / "clip" / "README.md").read_text() == (SHIPPED / "clip" / "README.md").read_text()
