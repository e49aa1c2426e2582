"""Where tensors, generators and devices meet. CI has no GPU, so a strict guard stands in for
CUDA's checks: a random draw that names a device must get a generator made for that device
(CUDA refuses a CPU generator: "Expected a 'cuda' device type for generator"). Every command
path (restore automatic / --prompt / --fast, evaluate, tiling, each stage's steps) runs under it."""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch

from _batches import device_batch, tiny_stage
from _tiny_weights import export_loop, export_tiny
from lit_restore.data.degrade.ops import OPS

ROOT = Path(__file__).resolve().parents[1]
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
    export_loop(out, tmp)
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


# --------------------------------------------------------------------------------------
# Host syncs in the training hot path
# --------------------------------------------------------------------------------------

LIT_RESTORE = str(ROOT / "lit_restore")


class SyncCounter:
    """Counts host reads of tensor values (`item`, `bool`, `int`, `float`, `tolist`, `nonzero`,
    boolean-mask indexing) made from lit_restore code while `counting` is on. On a GPU each one
    waits for the queued work. Host-side hooks (`on_before_batch_transfer`, the loader) are left
    out: they read host batches."""

    READS = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")

    def __init__(self, monkeypatch) -> None:
        self.counting = False
        self.seen: list[str] = []
        self.lightning: list[str] = []  # Lightning's own reads, for the record
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        real_getitem = torch.Tensor.__getitem__

        def getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self._record("boolean-mask indexing")
            return real_getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)

    def _wrap(self, real, name):
        def read(t, *args, **kwargs):
            self._record(name)
            return real(t, *args, **kwargs)

        return read

    def _record(self, what: str) -> None:
        if not self.counting:
            return
        frames = traceback.extract_stack()[:-2]
        if any(f.name == "on_before_batch_transfer" for f in frames):
            return
        ours = [f for f in frames if f.filename.startswith(LIT_RESTORE)]
        # The innermost lit_restore frame made the read (fit.py's `fit` frame holds all of Lightning's).
        if ours and ours[-1].name != "fit" and "/data/shards.py" not in ours[-1].filename:
            self.seen.append(f"{what} at {Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})")
        elif ours:
            self.lightning.append(" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-6:]))


class CountSteps(L.Callback):
    """Counts over two whole training steps, from one step end to the step end two steps later
    (after the first EMA update, whose one read per (re)start is allowed)."""

    def __init__(self, counter: SyncCounter, start: int = 2, steps: int = 2) -> None:
        self.counter, self.start, self.stop = counter, start, start + steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            self.counter.counting = True
        elif trainer.global_step == self.stop:
            self.counter.counting = False


EXTRA = {"restorer": ["optim.ema_decay=0.99"]}  # the tiny restorer keeps no EMA by default


@pytest.mark.parametrize("name", ["biqa", "restorer", "ldm"])  # masks; MoCo queue and EMA; VAE pair
def test_training_steps_read_nothing_on_the_host(monkeypatch, sample_shards, tmp_path, name):
    import lit_restore.fit as fit_module
    from lit_restore.config import load_config

    counter = SyncCounter(monkeypatch)
    build = fit_module.build_callbacks
    monkeypatch.setattr(fit_module, "build_callbacks", lambda cfg, stage: [*build(cfg, stage), CountSteps(counter)])
    cfg = load_config(ROOT / f"configs/tiny/{name}.yaml", [
        f"out_dir={tmp_path}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
        f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0",
        "data.batch_size=2", "data.crop=32", "trainer.max_steps=4", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=50", "logger=none", *EXTRA.get(name, [])])
    trainer = fit_module.fit(cfg)
    assert trainer.global_step == 4
    assert counter.seen == []
    assert counter.lightning == []  # with no progress-bar value outside logging steps, Lightning reads none either


def test_ema_matches_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from lit_restore.stages.base import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = EMA(net, 0.9)
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        net(torch.randn(2, 3, 8, 8))  # moves the BN statistics
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        reference.update_parameters(net)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    # Integer counters follow the model (torch blends them with the decay and truncates).
    assert int(ours.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 3
    assert int(ours.n_averaged) == int(reference.n_averaged) == 3
    assert not any(p.requires_grad for p in ours.parameters())


def test_degrade_compile_compiles_each_op_once_with_a_dynamic_batch(monkeypatch):
    compiled = []

    def fake_compile(fn, **kwargs):  # records the call; the real compile takes minutes on a CPU
        compiled.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    stage = tiny_stage("restorer", "degrade.compile=true")
    a, b = device_batch(stage, n=2), device_batch(stage, n=2, seed=1)
    assert [fn for fn, _ in compiled] == [OPS[name].apply for name in stage.degrader.chain]
    assert all(kwargs == {"dynamic": True} for _, kwargs in compiled)
    assert not any(k.startswith("_") for k in stage.state_dict())
    plain = tiny_stage("restorer")
    assert torch.equal(device_batch(plain, n=2)["lq"], a["lq"]) and not torch.equal(a["lq"], b["lq"])
