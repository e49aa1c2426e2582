import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lit_restore.config import DataConfig, Source, UserError
from lit_restore.data.datamodule import ShardDataModule
from lit_restore.data.degrade.types import type_index
from lit_restore.data.shards import (
    SAMPLE_FILES,
    CorruptCounter,
    CorruptDataError,
    MissingShardsError,
    TrainStream,
    ValStream,
    check_local_shards,
    dihedral,
    expand_urls,
    iter_samples,
    make_loader,
    read_shard,
    tar_members,
)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def meta(dataset: str, task=None) -> bytes:
    return json.dumps({"dataset": dataset, "task": task}).encode()


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def clean_samples(prefix: str, n: int, size=(12, 12), dataset: str = "clean", seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"__key__": f"{prefix}{i:04d}", "gt.png": png(rng.integers(0, 256, (*size, 3), dtype=np.uint8)),
         "json": meta(dataset)}
        for i in range(n)
    ]


def cfg_for(train: list[tuple[str, float]], val: list[str] | None = None, **kw) -> DataConfig:
    kw = {"batch_size": 4, "crop": 8, "num_workers": 0, "steps_per_epoch": 5, "shuffle_buffer": 16, **kw}
    return DataConfig(train=[Source(u, w) for u, w in train], val=[Source(u) for u in (val or [train[0][0]])], **kw)


def batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_host_batch_contract(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    paired = {"__key__": "p0", "gt.png": png(gt), "lq.png": png(255 - gt), "json": meta("rain100", "rain"),
              "depth.npy": npy(rng.random((10, 10)).astype(np.float32))}
    mixed = write_shard(tmp_path / "m.tar", [paired] + clean_samples("c", 3))
    dm = ShardDataModule(cfg_for([(mixed, 1.0)], batch_size=16, steps_per_epoch=2), seed=0)
    got = batches(dm.train_dataloader())
    assert len(got) == 2
    b = got[0]
    assert b["gt"].dtype == torch.uint8 and b["gt"].shape == (16, 3, 8, 8)
    assert b["lq"].dtype == torch.uint8 and b["lq"].shape == (16, 3, 8, 8)
    assert b["depth"].dtype == torch.uint8 and b["depth"].shape == (16, 1, 8, 8)
    assert b["valid"].all() and b["n_corrupt"].dtype == torch.long and b["n_corrupt"].ndim == 0
    assert isinstance(b["key"], list) and len(b["key"]) == 16
    for i, key in enumerate(b["key"]):
        paired_row = key == "p0"
        assert bool(b["has_lq"][i]) == paired_row and bool(b["has_depth"][i]) == paired_row
        assert b["label"][i] == (type_index("rain") if paired_row else -1)
        assert b["dataset"][i] == ("rain100" if paired_row else "clean")
        if not paired_row:
            assert not b["lq"][i].any() and not b["depth"][i].any()  # clean rows are zeros
    assert any(k == "p0" for k in b["key"]) and any(k != "p0" for k in b["key"])


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 3.0)])
def test_weights_set_sample_proportions(tmp_path, weights):
    # Source a: many 2-sample shards; source b: one 40-sample shard. Weights must hold per
    # sample, whatever the shard sizes.
    a = [write_shard(tmp_path / f"a{i}.tar", clean_samples(f"a{i}_", 2, size=(8, 8), dataset="a")) for i in range(4)]
    write_shard(tmp_path / "b0.tar", clean_samples("b", 40, size=(8, 8), dataset="b"))
    cfg = cfg_for([(str(tmp_path / "a{0..3}.tar"), weights[0]), (str(tmp_path / "b0.tar"), weights[1])],
                  batch_size=20, steps_per_epoch=60, shuffle_buffer=50)
    assert len(a) == 4
    counts = Counter(d for b in batches(ShardDataModule(cfg, seed=3).train_dataloader()) for d in b["dataset"])
    fraction_a = counts["a"] / (counts["a"] + counts["b"])
    expected = weights[0] / sum(weights)
    assert abs(fraction_a - expected) < 0.05, (fraction_a, expected)


def _find_window(image: np.ndarray, crop: np.ndarray) -> set[int]:
    """Dihedral indices k for which `crop` is a transformed window of `image`."""
    size = crop.shape[0]
    found = set()
    for y in range(image.shape[0] - size + 1):
        for x in range(image.shape[1] - size + 1):
            window = image[y : y + size, x : x + size]
            found |= {k for k in range(8) if np.array_equal(dihedral(window, k), crop)}
    return found


def test_joint_crop_and_dihedral_keep_pairs_aligned(tmp_path):
    rng = np.random.default_rng(1)
    samples, images = [], {}
    for i in range(6):
        gt = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
        gt[0, 0, 0] = 255  # depth max: depth row == gt red channel after normalisation
        images[f"s{i}"] = gt
        samples.append({"__key__": f"s{i}", "gt.png": png(gt), "lq.png": png(255 - gt), "json": meta("d", "noise"),
                        "depth.npy": npy(gt[..., 0].astype(np.float32))})
    shard = write_shard(tmp_path / "p.tar", samples)
    cfg = cfg_for([(shard, 1.0)], batch_size=8, steps_per_epoch=8)
    seen_k = set()
    for b in batches(ShardDataModule(cfg, seed=0).train_dataloader()):
        gt, lq, depth = b["gt"].numpy(), b["lq"].numpy(), b["depth"].numpy()
        np.testing.assert_array_equal(lq, 255 - gt)
        np.testing.assert_array_equal(depth[:, 0], gt[:, 0])
        for i, key in enumerate(b["key"]):
            ks = _find_window(images[key], gt[i].transpose(1, 2, 0))
            assert ks, "output is no dihedral transform of any window of its image"
            seen_k |= ks
    assert len(seen_k) >= 6  # the 8 transforms are all drawn (64 samples)


def test_small_images_are_reflect_padded_and_sr_lq_resized(tmp_path):
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    lq = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)  # SR pair, factor 2
    shard = write_shard(tmp_path / "sr.tar", [{"__key__": "x", "gt.png": png(gt), "lq.png": png(lq),
                                                "json": meta("div2k", "lowres")}])
    vs = ValStream([(shard, 1)], batch_size=1, crop=8, max_corrupt_fraction=0.0)
    (b,) = list(make_loader(vs, 0))
    window = gt[:, 1:9]  # centre 8 columns; rows padded 1 + 1 by reflection
    np.testing.assert_array_equal(b["gt"][0].numpy().transpose(1, 2, 0), np.pad(window, ((1, 1), (0, 0), (0, 0)), mode="reflect"))
    lq_up = np.asarray(Image.fromarray(lq).resize((10, 6), Image.BICUBIC))
    np.testing.assert_array_equal(b["lq"][0].numpy().transpose(1, 2, 0)[1:7], lq_up[:, 1:9])
    (s,) = list(iter_samples(shard))
    assert s["gt"].shape == s["lq"].shape == (6, 10, 3) and s["label"] == type_index("lowres")


def corrupt_samples() -> list[dict]:
    good = clean_samples("x", 1)[0]
    return [
        {"__key__": "bad_png", "gt.png": b"\x89PNG not really", "json": meta("d")},
        {"__key__": "bad_json", "gt.png": good["gt.png"], "json": b"{oops"},
        {"__key__": "no_gt", "json": meta("d")},
    ]


def test_corrupt_samples_skipped_and_counted(tmp_path):
    # Bad samples first in the shard: every pass over it reads all three before the good ones.
    shard = write_shard(tmp_path / "c.tar", corrupt_samples() + clean_samples("g", 10))
    cfg = cfg_for([(shard, 1.0)], batch_size=5, steps_per_epoch=20, shuffle_buffer=0, max_corrupt_fraction=0.5)
    got = batches(ShardDataModule(cfg, seed=0).train_dataloader())
    assert all(k.startswith("g") for b in got for k in b["key"])
    total = sum(int(b["n_corrupt"]) for b in got)
    # 100 good samples = 10 passes (30 bad); the batcher's one-sample lookahead may start pass 11.
    assert 30 <= total <= 33

    # Validation keeps its place: corrupt samples become invalid rows, counted exactly.
    vs = ValStream([(shard, 13)], batch_size=4, crop=8, max_corrupt_fraction=0.5)
    vb = list(make_loader(vs, 0))
    assert sum(int(b["n_corrupt"]) for b in vb) == 3
    assert sorted(k for b in vb for k, v in zip(b["key"], b["valid"]) if v) == [f"g{i:04d}" for i in range(10)]
    assert [s["key"] for s in iter_samples(shard, max_corrupt_fraction=0.5)] == [f"g{i:04d}" for i in range(10)]


def test_corrupt_fraction_stops_the_run_from_a_worker(tmp_path):
    shard = write_shard(tmp_path / "broken.tar", corrupt_samples() + clean_samples("g", 3))
    cfg = cfg_for([(shard, 1.0)], num_workers=1, steps_per_epoch=50, max_corrupt_fraction=0.2)
    with pytest.raises(CorruptDataError, match=r"unreadable \(5\d\.\d% > data\.max_corrupt_fraction=20\.0%\); last: .*broken\.tar"):
        batches(ShardDataModule(cfg, seed=0).train_dataloader())
    # One bad sample early does not stop a run whose overall fraction stays under the limit.
    ok = write_shard(tmp_path / "ok.tar", corrupt_samples()[:1] + clean_samples("g", 60))
    cfg = cfg_for([(ok, 1.0)], num_workers=1, steps_per_epoch=40, max_corrupt_fraction=0.05)
    assert len(batches(ShardDataModule(cfg, seed=0).train_dataloader())) == 40


def test_corrupt_error_names_shard_and_fraction():
    counter = CorruptCounter(max_fraction=0.1, min_checked=10)
    for _ in range(8):
        counter.ok()
    counter.bad("s/a.tar/k1", "gt.png: cannot decode")  # 1 of 9: below the minimum count
    with pytest.raises(CorruptDataError, match=r"2 of 10 samples unreadable \(20\.0% > .*s/a\.tar/k2: missing gt"):
        counter.bad("s/a.tar/k2", "missing gt.png")


class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_members_are_never_read(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(marker))
    samples = clean_samples("k", 4)
    for s in samples:
        s.update({"pyd": payload, "pth": payload, "pickle": payload})
    shard = write_shard(tmp_path / "p.tar", samples)
    raws = list(read_shard(shard, CorruptCounter(0.0)))
    assert len(raws) == 4 and all(set(r) - {"__key__", "__url__"} <= SAMPLE_FILES for r in raws)
    cfg = cfg_for([(shard, 1.0)], max_corrupt_fraction=0.0)
    dm = ShardDataModule(cfg, seed=0)
    assert len(batches(dm.train_dataloader())) == 5 and len(batches(dm.val_dataloader())) == 1
    assert len(list(iter_samples(shard, max_corrupt_fraction=0.0))) == 4
    assert not marker.exists()


def test_seed_restart_and_rank_give_distinct_reproducible_streams(tmp_path):
    shard = write_shard(tmp_path / "s.tar", clean_samples("k", 50))

    def keys(**kw):
        stream = TrainStream([([shard], 1.0)], batch_size=4, crop=8, steps=6, shuffle_buffer=20,
                             max_corrupt_fraction=0.0, **kw)
        return [k for b in make_loader(stream, 0) for k in b["key"]]

    base = keys(seed=1, rank=0, restart=0)
    assert base == keys(seed=1, rank=0, restart=0)
    assert base != keys(seed=1, rank=0, restart=1000)
    assert base != keys(seed=1, rank=1, restart=0)
    assert base != keys(seed=2, rank=0, restart=0)
    # set_restart reaches the stream the data module builds.
    dm = ShardDataModule(cfg_for([(shard, 1.0)]), seed=1)
    dm.set_restart(7)
    assert dm.train_stream().restart == 7


def test_epoch_length_exact_with_workers_not_dividing_steps(tmp_path):
    shard = write_shard(tmp_path / "s.tar", clean_samples("k", 9))
    dm = ShardDataModule(cfg_for([(shard, 1.0)], num_workers=2, steps_per_epoch=5), seed=0)
    loader = dm.train_dataloader()
    assert loader.pipeline[0].persistent_workers  # WebLoader wraps a DataLoader
    epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
    assert [len(e) for e in epochs] == [20, 20]
    assert epochs[0] != epochs[1]  # a new loader epoch draws new samples


@pytest.mark.parametrize("world", [2, 3])
def test_val_each_sample_once_across_ranks(tmp_path, world):
    s0 = write_shard(tmp_path / "v0.tar", clean_samples("a", 7))
    s1 = write_shard(tmp_path / "v1.tar", clean_samples("b", 4))
    expected = sorted([f"a{i:04d}" for i in range(7)] + [f"b{i:04d}" for i in range(4)])
    keys, counts = [], []
    for rank in range(world):
        vs = ValStream([(s0, 7), (s1, 4)], batch_size=2, crop=8, max_corrupt_fraction=0.0, rank=rank, world=world)
        loader = make_loader(vs, 2)
        got = list(loader)
        counts.append(len(got))
        assert all(b["gt"].shape == (2, 3, 8, 8) for b in got)
        rank_keys = [k for b in got for k, v in zip(b["key"], b["valid"]) if v]
        assert rank_keys == sorted(rank_keys)  # read in order
        keys += rank_keys
    assert len(set(counts)) == 1
    assert sorted(keys) == expected


def test_val_counts_come_from_manifest_when_present(tmp_path):
    shard = write_shard(tmp_path / "v.tar", clean_samples("a", 5))
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"file": "v.tar", "count": 3}], "total": 3}))
    dm = ShardDataModule(cfg_for([(shard, 1.0)], val_batch_size=1), seed=0)
    with pytest.raises(ValueError, match="holds more than the 3 samples"):
        list(dm.val_dataloader())


def test_missing_shards_give_a_clear_error(tmp_path):
    dm = ShardDataModule(cfg_for([(str(tmp_path / "nope-{000..002}.tar"), 1.0)]), seed=0)
    with pytest.raises(MissingShardsError, match=r"data\.train\[0\]\.url=.*3 of 3 shard files not found"):
        dm.train_dataloader()
    # A range naming more shards than exist, caught by the check fit runs before building anything.
    for i in range(2):
        write_shard(tmp_path / f"s-{i:03d}.tar", clean_samples(f"k{i}", 2))
    dm = ShardDataModule(cfg_for([(str(tmp_path / "s-{000..003}.tar"), 1.0)]), seed=0)
    with pytest.raises(MissingShardsError, match=r"2 of 4 shard files not found.*use a glob") as e:
        dm.check_sources()
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_local_glob_patterns(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"s-{i:03d}.tar", clean_samples(f"k{i}", 2))
    assert expand_urls(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    dm = ShardDataModule(cfg_for([(str(tmp_path / "*.tar"), 1.0)], val_batch_size=1), seed=0)
    dm.check_sources()
    assert sum(int(b["valid"].sum()) for b in dm.val_dataloader()) == 6
    with pytest.raises(MissingShardsError, match="matches no shard file"):
        check_local_shards(expand_urls(str(tmp_path / "none-*.tar")), "data.val[0].url")


def test_resumed_fit_reseeds_from_the_restored_step(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w * batch["gt"].float().mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    shard = write_shard(tmp_path / "s.tar", clean_samples("k", 20))
    restarts = []

    class Recording(ShardDataModule):
        def train_stream(self):
            stream = super().train_stream()
            restarts.append(stream.restart)
            return stream

    def run(max_steps, ckpt_path=None):
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(Tiny(), datamodule=Recording(cfg_for([(shard, 1.0)], steps_per_epoch=3), seed=0), ckpt_path=ckpt_path)
        return trainer

    first = run(4)
    ckpt = tmp_path / "step4.ckpt"
    first.save_checkpoint(ckpt)
    run(6, ckpt_path=ckpt)
    assert restarts == [0, 4]  # the resumed loader is seeded from the restored global step


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    long_dir = "d" * 60 + "/" + "e" * 60 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    path = tmp_path / "t.tar"
    members = {f"{long_dir}/k{i}.{suffix}": bytes([i]) * (100 * i + 7) for i in range(3) for suffix in ("gt.png", "json", "txt")}
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes pax headers
            tf.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        got = list(tar_members(f, lambda n: not n.endswith(".txt")))
    assert [n for n, _ in got] == list(members)
    assert all(d == members[n] if not n.endswith(".txt") else d is None for n, d in got)


def test_truncated_shard_keeps_what_was_read_and_counts_one(tmp_path):
    shard = write_shard(tmp_path / "t.tar", clean_samples("k", 6))
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: len(data) // 2])
    counter = CorruptCounter(max_fraction=1.0)
    keys = [r["__key__"] for r in read_shard(shard, counter)]
    assert 0 < len(keys) < 6 and keys == [f"k{i:04d}" for i in range(len(keys))]
    assert counter.corrupt == 1
