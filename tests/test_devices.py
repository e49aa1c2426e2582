"""Where tensors, generators and devices meet. CI has no GPU, so a strict guard stands in for
CUDA's checks: a random draw that names a device must get a generator made for that device
(CUDA refuses a CPU generator: "Expected a 'cuda' device type for generator"). Every command
path (restore automatic / --prompt / --fast, evaluate, tiling, each stage's steps) runs under it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from _batches import device_batch, tiny_stage
from _tiny_weights import export_tiny

RANDOM_FACTORIES = ("randn", "rand", "randint", "randperm", "normal")


class _Generator(torch.Generator):
    """torch.Generator that remembers whether it was made for a named device."""

    def __new__(cls, device=None):
        g = super().__new__(cls, device if device is not None else "cpu")
        g.declared = device is not None
        return g

    def __init__(self, device=None) -> None:
        pass


@contextmanager
def strict_generators(monkeypatch):
    """Raise where a generator made without a device, or for another device, meets `device=`."""
    monkeypatch.setattr(torch, "Generator", _Generator)
    for name in RANDOM_FACTORIES:
        real = getattr(torch, name)

        def checked(*args, _real=real, _name=name, **kwargs):
            g, device = kwargs.get("generator"), kwargs.get("device")
            if g is not None and device is not None:
                if not getattr(g, "declared", True):
                    raise RuntimeError(f"torch.{_name}: a generator made without a device meets device={device}")
                if g.device.type != torch.device(device).type:
                    raise RuntimeError(f"torch.{_name}: a {g.device} generator meets device={device}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, checked)
    yield


def test_the_guard_catches_a_device_less_generator(monkeypatch):
    with strict_generators(monkeypatch):
        torch.randn(2, generator=torch.Generator())  # no device named: a CPU draw, allowed
        torch.randn(2, generator=torch.Generator(device="cpu"), device="cpu")
        with pytest.raises(RuntimeError, match="without a device"):
            torch.randn(2, generator=torch.Generator(), device="cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_weights")
    out = tmp / "weights"
    export_tiny("biqa", out, tmp)
    export_tiny("ldm", out, tmp, [f"model.clip.pretrained={tmp / 'biqa.ckpt'}"])
    export_tiny("scm", out, tmp)
    export_tiny("restorer", out, tmp)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("device_inputs") / "wide.png"
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("mode", [[], ["--prompt", "A photo needs noise artifact reduction"], ["--fast"]])
def test_restore_paths_draw_on_the_models_device(monkeypatch, weights, image, tmp_path, mode):
    from lit_restore.cli import main

    # Tiles smaller than the image: the tiled LDM, SCM and restorer paths run too.
    args = ["restore", str(image), "--weights", str(weights), "--out", str(tmp_path), "--device", "cpu",
            "--steps", "2", "--max-passes", "2", "--tile", "32", "--overlap", "8", *mode]
    with strict_generators(monkeypatch):
        assert main(args) == 0
    assert (tmp_path / "wide.png").is_file()


def test_evaluate_draws_on_the_models_device(monkeypatch, weights, sample_shards, tmp_path):
    from lit_restore.cli import main

    args = ["evaluate", "--weights", str(weights), "--data", str(sample_shards / "val-000000.tar"),
            "--out", str(tmp_path), "--device", "cpu", "--tasks", "noise_s25", "--max-images", "1",
            "--steps", "2", "--max-passes", "2", "--lpips-weights", str(tmp_path / "no-lpips.pth")]
    with strict_generators(monkeypatch):
        assert main(args) == 0


@pytest.mark.parametrize("name", ["biqa", "constyle", "restorer", "ldm", "scm"])
def test_stage_steps_draw_on_the_batch_device(monkeypatch, name):
    stage = tiny_stage(name, fit_setup=name in ("ldm", "scm"))
    with strict_generators(monkeypatch):
        batch = device_batch(stage, n=2, size=32)
        stage.training_step(batch, 0).backward()
        stage.eval()
        stage.validation_step(device_batch(stage, n=2, size=32, seed=1), 0)
