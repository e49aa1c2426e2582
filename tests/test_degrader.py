"""The Degrader: modes, labels, determinism, no host syncs, config errors."""

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from lit_restore.config import ConfigError, DegradeConfig, load_config
from lit_restore.data.degrade.composer import Degrader
from lit_restore.data.degrade.suite import task_degrader
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.data.degrade.types import type_index

B, H = 12, 64


@pytest.fixture(scope="module")
def gt():
    g = torch.Generator().manual_seed(123)
    smooth = torch.nn.functional.interpolate(torch.rand(B, 3, 8, 8, generator=g), size=(H, H), mode="bicubic")
    return ops_quantize(smooth.clamp(0, 1))


def ops_quantize(x):
    return x.mul(255).round().div(255)


def run(cfg, gt, seed=0, **kw):
    return Degrader(cfg)(gt, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_shape_dtype_range_and_determinism(gt, mode):
    cfg = DegradeConfig(mode=mode)
    lq, label, types, params = run(cfg, gt)
    assert lq.shape == gt.shape and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-4)  # quantised to 8 bits
    assert label.dtype == torch.long and label.shape == (B,)
    assert types.dtype == torch.bool and types.shape == (B, len(DEGRADATION_TYPES))
    assert all(v.shape == (B,) for v in params.values())
    again = run(cfg, gt)
    assert torch.equal(lq, again[0]) and torch.equal(label, again[1]) and torch.equal(types, again[2])
    assert not torch.equal(lq, run(cfg, gt, seed=1)[0])
    half = run(cfg, gt.half())[0]  # the input dtype does not change the maths
    assert half.dtype == torch.float32


def test_single_mode_applies_exactly_one_type(gt):
    _, label, types, params = run(DegradeConfig(mode="single"), gt)
    assert (types.sum(dim=1) == 1).all()
    assert torch.equal(types.float().argmax(dim=1), label)


def test_labels_match_applied_ops(gt):
    cfg = DegradeConfig(mode="mixed", clean_fraction=0.3)
    cfg.rain.prob = 0.0
    cfg.noise.prob = 0.9
    seen = torch.zeros(len(DEGRADATION_TYPES), dtype=torch.bool)
    for seed in range(4):
        lq, label, types, params = run(cfg, gt, seed=seed)
        seen |= types.any(dim=0)
        assert not types[:, type_index("rain")].any()  # probability 0 never appears
        assert all(torch.isnan(v).all() for k, v in params.items() if k.startswith("rain."))
        clean = ~types.any(dim=1)
        assert (label[clean] == 0).all() and torch.equal(lq[clean], gt[clean])
        assert types[~clean].gather(1, label[~clean, None]).all()  # the label is an applied type
        for name in ("noise", "blur", "jpeg"):
            applied = types[:, type_index(name)]
            drawn = next(v for k, v in params.items() if k.startswith(name + "."))
            assert torch.equal(~torch.isnan(drawn), applied)
    assert seen[[type_index(t) for t in ("noise", "blur", "jpeg", "lowres", "haze", "lowlight")]].all()
    assert not seen[type_index("no")] and not seen[type_index("raindrop")]


def test_dominant_type_is_the_most_severe(gt):
    cfg = DegradeConfig(mode="mixed", types=["noise", "jpeg"])
    cfg.noise = dataclasses.replace(cfg.noise, prob=1.0, sigma=[50.0, 50.0], poisson_prob=0.0)
    cfg.jpeg = dataclasses.replace(cfg.jpeg, prob=1.0, quality=[90.0, 90.0])
    _, label, types, _ = run(cfg, gt)
    assert types[:, [type_index("noise"), type_index("jpeg")]].all()
    assert (label == type_index("noise")).all()
    cfg.noise.sigma = [2.0, 2.0]
    cfg.jpeg.quality = [10.0, 10.0]
    assert (run(cfg, gt)[1] == type_index("jpeg")).all()


def test_task_mode_uses_fixed_parameters(gt):
    d = task_degrader("noise_s25")
    lq, label, types, params = d(gt, generator=torch.Generator().manual_seed(0))
    assert torch.equal(params["noise.sigma"], torch.full((B,), 25.0))
    assert (label == type_index("noise")).all() and (types.sum(dim=1) == 1).all()
    assert abs((lq - gt).std().item() * 255 - 25) < 2.5


def test_real_depth_where_given_and_prior_elsewhere(gt):
    cfg = DegradeConfig(mode="mixed", types=["haze"], quantize=False)
    cfg.haze = dataclasses.replace(cfg.haze, prob=1.0, beta=[2.0, 2.0])
    depth = torch.zeros(B, 1, H, H, dtype=torch.uint8)
    depth[1::2] = 255  # far everywhere: strong haze
    has_depth = torch.zeros(B, dtype=torch.bool)
    has_depth[:4] = True
    lq = run(cfg, gt, depth=depth, has_depth=has_depth)[0]
    change = (lq - gt).abs().mean(dim=(1, 2, 3))
    # depth 0 everywhere means no haze; /max normalisation keeps an all-zero map at 0
    assert change[0] < 1e-6 and change[2] < 1e-6
    assert change[1] > 0.1 and change[3] > 0.1
    assert (change[4:] > 1e-3).all()  # the synthetic prior hazes the rest


def test_no_host_syncs_in_forward(gt, monkeypatch):
    """Reading a tensor value on the host is what synchronises a GPU: forbid every way to do it."""
    deg = Degrader(DegradeConfig(mode="mixed", clean_fraction=0.2))
    depth = torch.randint(0, 256, (B, 1, H, H), dtype=torch.uint8)
    has_depth = torch.arange(B) % 2 == 0

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside Degrader.forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(1) > 0)
    out = deg(gt, generator=torch.Generator().manual_seed(0), depth=depth, has_depth=has_depth)
    monkeypatch.undo()
    assert out[0].shape == gt.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode exists only on CUDA")
def test_no_cuda_syncs():
    x = torch.rand(4, 3, 64, 64, device="cuda")
    deg = Degrader(DegradeConfig(mode="mixed"))
    g = torch.Generator(device="cuda").manual_seed(0)
    deg(x, generator=g)  # first call fills per-device constant caches
    torch.cuda.set_sync_debug_mode("error")
    try:
        lq, label, types, params = deg(x, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert lq.device.type == "cuda"


def test_bad_input_shape_is_refused(gt):
    with pytest.raises(ValueError, match="expects gt of shape"):
        Degrader(DegradeConfig())(gt[:, :1])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("degrade.noise.sigma=[50,15]", "degrade.noise.sigma: [50.0, 15.0] must be [low, high] with low <= high"),
        ("degrade.jpeg.quality=[0,50]", "degrade.jpeg.quality: [0.0, 50.0] must lie in [1, 100]"),
        ("degrade.blur.kernel_size=[8,21]", "degrade.blur.kernel_size: [8, 21] must be odd"),
        ("degrade.types=[noise,snow]", "degrade.types[1]: 'snow' is not a synthetic type"),
        ("degrade.lowres.modes=[lanczos]", "degrade.lowres.modes[0]: 'lanczos' is not allowed"),
        ("degrade.haze.prob=1.5", "degrade.haze.prob: 1.5 must be in [0, 1]"),
        ("degrade.clean_fraction=1", "degrade.clean_fraction: 1.0 must be in [0, 1)"),
        ("degrade.mode=task", "degrade.task: missing"),
        ("degrade.rain.lenght=[1,2]", "degrade.rain.lenght: unknown key"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="degrade.task: 'noise_s999' is not in the suite"):
        task_degrader("noise_s999")


@pytest.mark.parametrize("preset", ["mixed", "single", "ood"])
def test_presets_load_and_run(preset, gt):
    cfg = load_config(Path(__file__).parents[1] / "configs" / "degrade" / f"{preset}.yaml").degrade
    assert cfg.mode in ("mixed", "single")
    lq, label, types, _ = run(cfg, gt)
    assert lq.shape == gt.shape and types.any(dim=1).all()
    if preset == "mixed":
        assert cfg == DegradeConfig()  # the preset spells out the defaults


@pytest.mark.parametrize("size", [(37, 53), (8, 8), (300, 17)])
def test_any_image_size(size):
    x = torch.rand(4, 3, *size)
    for mode in ("single", "mixed"):
        lq = run(DegradeConfig(mode=mode), x)[0]
        assert lq.shape == x.shape and lq.min() >= 0 and lq.max() <= 1


def _shares(cfg, batches=300, b=16, size=8):
    """Share of samples that got each op of the chain, and of clean ones, over many batches."""
    deg = Degrader(cfg)
    gt = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0))
    got = torch.zeros(len(deg.chain))
    clean = 0
    for seed in range(batches):
        types = deg(gt, generator=torch.Generator().manual_seed(seed), counts_seed=seed)[2]
        got += types[:, [type_index(t) for t in deg.chain]].float().sum(dim=0)
        clean += int((~types.any(dim=1)).sum())
    return got / (batches * b), clean / (batches * b)


def test_mixed_mode_reaches_each_op_as_independent_draws_would():
    """Stratified assignment keeps the per-op frequency of independent draws with the one-op
    fallback: p + Π(1−p)·p/Σp of the degraded samples."""
    cfg = DegradeConfig(mode="mixed", types=["blur", "noise", "jpeg"], clean_fraction=0.25)
    probs = [0.6, 0.3, 0.1]
    for name, p in zip(cfg.types, probs):
        getattr(cfg, name).prob = p
    shares, clean = _shares(cfg)
    none = math.prod(1 - p for p in probs)
    expected = torch.tensor([p + none * p / sum(probs) for p in probs]) * 0.75
    assert abs(clean - 0.25) < 0.01
    assert torch.allclose(shares, expected, atol=0.015), (shares, expected)


def test_single_mode_splits_the_batch_by_weight():
    cfg = DegradeConfig(mode="single", types=["blur", "noise", "jpeg"])
    for name, p in zip(cfg.types, [0.5, 0.3, 0.2]):
        getattr(cfg, name).prob = p
    shares, clean = _shares(cfg)
    assert clean == 0 and torch.allclose(shares, torch.tensor([0.5, 0.3, 0.2]), atol=0.01), shares


def test_sub_batch_sizes_are_the_expected_counts_rounded():
    deg = Degrader(DegradeConfig(mode="mixed", clean_fraction=0.1))
    seen = set()
    for seed in range(200):
        clean, primary, extra = deg.counts(16, random.Random(seed))
        assert clean in (1, 2) and sum(primary) == 16 - clean
        degraded = 16 - clean
        assert all(math.floor(degraded / 7) <= c <= math.ceil(degraded / 7) for c in primary)
        seen.add(tuple(primary))
        for c, e in zip(primary, extra):
            assert c + e <= degraded
    assert len(seen) > 5  # the rounding moves between ops from batch to batch


def test_each_op_runs_only_on_its_samples(monkeypatch):
    """The op's apply sees a sub-batch: in single mode the sizes add up to the batch."""
    sizes = []
    deg = Degrader(DegradeConfig(mode="single"))
    for name in deg.chain:
        apply = deg._op_apply[name]
        deg._op_apply[name] = lambda x, p, c, apply=apply: sizes.append(x.shape[0]) or apply(x, p, c)
    deg(torch.rand(32, 3, 16, 16), generator=torch.Generator().manual_seed(0), counts_seed=0)
    assert sum(sizes) == 32 and max(sizes) < 32
