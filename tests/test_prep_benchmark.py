"""`prep-benchmark`: stand-in trees laid out as the datasets' releases (and the methods' loaders)
lay them out, with the known traps, through `--check` and the shard writing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.benchmarks import PROTOCOLS, survey
from lit_restore.cli import main
from lit_restore.data.shards import iter_samples

RNG = np.random.default_rng(0)


def image(path: Path, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(path)


def aio3_tree(root: Path) -> None:
    """Each 3-task dataset in its release layout, a few images each, with the traps: BSD400's
    file list that names `a<id>.jpg` where the files are `<id>.jpg`, a rainy image without its
    clean partner, a hazy image whose clear image is missing."""
    for name in ("2092", "8049", "12003"):
        image(root / "BSD400" / f"{name}.jpg")
    (root / "BSD400" / "denoise.txt").write_text("a2092.jpg\na8049.jpg\na12003.jpg\n")
    for i in (1, 2, 3):
        image(root / "WED" / f"{i:05d}.bmp")
    for i in (1, 2, 3):
        image(root / "RainTrainL" / f"rain-{i}.png")
        image(root / "RainTrainL" / f"norain-{i}.png")
    image(root / "RainTrainL" / "rain-4.png")  # trap: no norain-4
    for part, scene in (("part1", "0025"), ("part2", "3068")):
        image(root / "OTS" / "clear" / f"{scene}.jpg")
        for a, b in (("0.8", "0.04"), ("1", "0.2")):
            image(root / "OTS" / part / f"{scene}_{a}_{b}.jpg")
    image(root / "OTS" / "part2" / "9999_0.9_0.1.jpg")  # trap: its clear image is missing
    for i in ("3096", "12084"):
        image(root / "CBSD68" / "original_png" / f"{i}.png")
    for i in (1, 2):
        image(root / "Rain100L" / f"rain-{i:03d}.png")
        image(root / "Rain100L" / f"norain-{i:03d}.png")
    for i, (a, b) in enumerate((("0.8", "0.2"), ("0.9", "0.08")), start=1):
        image(root / "SOTS" / "outdoor" / "hazy" / f"{i:04d}_{a}_{b}.jpg")
        image(root / "SOTS" / "outdoor" / "gt" / f"{i:04d}.png")


def aio5_extras(root: Path) -> None:
    """GoPro's scene folders (the methods' flattened test layout for the test split) and LOL-v1."""
    for scene in ("GOPR0372_07_00", "GOPR0374_11_01"):
        for i in (1, 2):
            image(root / "GOPRO_Large" / "train" / scene / "blur" / f"{i:06d}.png")
            image(root / "GOPRO_Large" / "train" / scene / "sharp" / f"{i:06d}.png")
    for i in (1, 2):
        image(root / "test" / "deblur" / "gopro" / "input" / f"GOPR0384_11_00_{i:06d}.png")
        image(root / "test" / "deblur" / "gopro" / "target" / f"GOPR0384_11_00_{i:06d}.png")
    for name in ("kodim01", "kodim02"):  # an optional extra noisy test set
        image(root / "Kodak24" / f"{name}.png")
    for split, names in (("our485", (2, 5)), ("eval15", (1, 22))):
        for n in names:
            image(root / "LOL" / split / "low" / f"{n}.png")
            image(root / "LOL" / split / "high" / f"{n}.png")


def test_check_reports_every_dataset_with_counts_and_the_traps_by_name(tmp_path, capsys):
    aio3_tree(tmp_path)
    assert main(["prep-benchmark", "aio3", "--root", str(tmp_path), "--check"]) == 0
    said = capsys.readouterr().out
    for line in ("bsd400          train      3 (expected 400) in BSD400", "wed             train      3 (expected 4744) in WED",
                 "rain100l_train  train      3 (expected 200) in RainTrainL",
                 "ots             train      4 (expected 72135) in OTS/part* + OTS/clear",
                 "cbsd68          test       2 (expected 68) in CBSD68/original_png",
                 "rain100l        test       2 (expected 100) in Rain100L",
                 "sots_outdoor    test       2 (expected 500) in SOTS/outdoor/hazy + SOTS/outdoor/gt"):
        assert line in said, (line, said)
    assert "denoise.txt: lists 3 file(s) that are not in" in said and "(e.g. a12003.jpg)" in said
    assert "rain-4.png: no clean partner (norain-4.*)" in said
    assert "9999_0.9_0.1.jpg: no clear partner (9999.*)" in said
    assert "urban100        test  not found (optional" in said
    found = survey(PROTOCOLS["aio3"], tmp_path)
    pairs = lambda name: sorted((q.name, g.name) for q, g in found[name].pairs)  # noqa: E731
    assert pairs("ots") == [("0025_0.8_0.04.jpg", "0025.jpg"), ("0025_1_0.2.jpg", "0025.jpg"),
                            ("3068_0.8_0.04.jpg", "3068.jpg"), ("3068_1_0.2.jpg", "3068.jpg")]
    assert pairs("rain100l_train") == [(f"rain-{i}.png", f"norain-{i}.png") for i in (1, 2, 3)]
    assert pairs("sots_outdoor") == [("0001_0.8_0.2.jpg", "0001.png"), ("0002_0.9_0.08.jpg", "0002.png")]
    assert not (tmp_path / "out").exists()


def test_a_missing_required_dataset_is_named_and_exits_2(tmp_path, capsys):
    aio3_tree(tmp_path)
    assert main(["prep-benchmark", "aio5", "--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    for name in ("gopro_train", "lol_train", "gopro ", "lol "):
        assert f"  {name}" in captured.out and "MISSING" in captured.out
    assert "4 required dataset(s) missing: gopro_train, lol_train, gopro, lol" in captured.err
    assert not (tmp_path / "out").exists()


def test_the_methods_loader_layouts_are_recognised_too(tmp_path):
    """PromptIR/AdaIR's data/ tree: BSD400 and WED together in Train/Denoise/, Rain100L test as
    input/target, SOTS as test/dehaze/input + target."""
    for name in ("2092.jpg", "00001.bmp", "00002.bmp"):
        image(tmp_path / "Train" / "Denoise" / name)
    image(tmp_path / "test" / "derain" / "Rain100L" / "input" / "1.png")
    image(tmp_path / "test" / "derain" / "Rain100L" / "target" / "1.png")
    image(tmp_path / "test" / "dehaze" / "input" / "0001_0.8_0.2.jpg")
    image(tmp_path / "test" / "dehaze" / "target" / "0001.png")
    found = survey(PROTOCOLS["aio3"], tmp_path)
    assert [p.name for p in found["bsd400"].clean] == ["2092.jpg"]
    assert [p.name for p in found["wed"].clean] == ["00001.bmp", "00002.bmp"]
    assert found["rain100l"].count == 1 and found["sots_outdoor"].count == 1 and not found["sots_outdoor"].problems


def test_prep_writes_train_and_test_shards_with_deterministic_noisy_sets(tmp_path, capsys):
    root = tmp_path / "root"
    aio3_tree(root)
    aio5_extras(root)
    out = tmp_path / "out"
    # Files were skipped (the unpaired traps): written, exit 1.
    assert main(["prep-benchmark", "aio5", "--root", str(root), "--out", str(out), "--workers", "1"]) == 1
    manifest = json.loads((out / "benchmark.json").read_text())
    assert sorted(manifest["sets"]) == sorted([
        "train/bsd400", "train/wed", "train/rain100l_train", "train/ots", "train/gopro_train", "train/lol_train",
        "test/cbsd68_s25", "test/rain100l", "test/sots_outdoor", "test/gopro", "test/lol", "test/kodak24_s25"])
    counts = {k: v["samples"] for k, v in manifest["sets"].items()}
    assert counts["train/ots"] == 4 and counts["train/gopro_train"] == 4 and counts["test/lol"] == 2
    samples = list(iter_samples(str(out / "test" / "cbsd68_s25" / "shard-*.tar")))
    assert len(samples) == 2 and all(s["label"] >= 0 and s["dataset"] == "cbsd68_s25" for s in samples)
    noise = [s["lq"].astype(int) - s["gt"].astype(int) for s in samples]
    assert 15 < np.std(np.concatenate([n.ravel() for n in noise])) < 30  # σ 25, clipped at 0/255
    clean = list(iter_samples(str(out / "train" / "wed" / "shard-*.tar")))
    assert len(clean) == 3 and all(s["lq"] is None for s in clean)
    # The noisy test set is the same on every run.
    again = tmp_path / "again"
    assert main(["prep-benchmark", "aio5", "--root", str(root), "--out", str(again), "--workers", "1"]) == 1
    first = {s["key"]: s["lq"] for s in samples}
    second = {s["key"]: s["lq"] for s in iter_samples(str(again / "test" / "cbsd68_s25" / "shard-*.tar"))}
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("protocol, sets", [("aio3", ["cbsd68_s15", "cbsd68_s25", "cbsd68_s50"])])
def test_aio3_makes_three_noisy_test_sets(tmp_path, protocol, sets):
    aio3_tree(tmp_path / "root")
    assert main(["prep-benchmark", protocol, "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
                 "--workers", "1"]) == 1
    for name in sets:
        assert len(list(iter_samples(str(tmp_path / "out" / "test" / name / "shard-*.tar")))) == 2


def test_protocol_test_sets_are_the_ones_evaluate_tabulates():
    from data_prep.benchmarks import DATASETS
    from data_prep.benchmarks import PROTOCOLS as PREP
    from lit_restore.protocols import PROTOCOLS as TABLES

    for name, protocol in PREP.items():
        written = {f"cbsd68_s{s}" for s in protocol.noise_sigmas}
        written |= {d for d in protocol.datasets if DATASETS[d].role == "test" and DATASETS[d].task != "noise"}
        assert written == {s.name for s in TABLES[name]}, name


# strategy=auto: the recipe's ddp would leave a process group listening in the test process.
TINY = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "logger=csv", "data.batch_size=2", "data.crop=32", "data.val_crop=32", "data.num_workers=0",
        "optim.warmup_steps=1", "model.width=8", "model.enc_blocks=[1,1,1]", "model.middle_blocks=1",
        "model.dec_blocks=[1,1,1]", "model.constyle.base_channels=4", "model.constyle.dim=16",
        "model.constyle.queue_size=32"]


@pytest.mark.parametrize("protocol", ["aio3", "aio5"])
def test_prep_fit_export_evaluate_gives_the_protocols_table(tmp_path, monkeypatch, capsys, protocol):
    """The README's commands on a stand-in tree: the benchmark config trains (a few steps, tiny
    widths), exports, and `evaluate --benchmark` prints and reports the table in the papers' format."""
    root = tmp_path / "datasets"
    aio3_tree(root)
    if protocol == "aio5":
        aio5_extras(root)
    monkeypatch.chdir(tmp_path)
    assert main(["prep-benchmark", protocol, "--root", str(root), "--out", f"benchmarks/{protocol}", "--workers", "1"]) == 1
    configs = Path(__file__).resolve().parents[1] / "configs" / "benchmarks" / protocol
    # The cluster job renders the recipe with the data merged in (nothing submitted here).
    assert main(["sbatch", str(configs / "restorer.yaml"), str(configs / "data.yaml"), "--devices-per-node", "4",
                 f"out_dir=jobs/{protocol}"]) == 0
    job = (tmp_path / "jobs" / protocol / "sbatch_config.yaml").read_text()
    assert f"benchmarks/{protocol}/train/ots/shard-*.tar" in job and "devices: 4" in job
    assert main(["fit", str(configs / "restorer.yaml"), str(configs / "data.yaml"), f"out_dir=runs/{protocol}", *TINY]) == 0
    assert main(["export", f"runs/{protocol}/checkpoints/last.ckpt", "--out", f"weights/{protocol}", "--no-onnx"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--benchmark", protocol, "--fast", "--weights", f"weights/{protocol}", "--data",
                 f"benchmarks/{protocol}", "--out", "report", "--device", "cpu", "--lpips-weights", "none.pth"]) == 0
    printed = capsys.readouterr().out
    from lit_restore.protocols import PROTOCOLS as TABLES, PUBLISHED

    columns = [s.column for s in TABLES[protocol]]
    header = "| " + " | ".join(["method", *columns, "average", "source"]) + " |"
    report = (tmp_path / "report" / "report.md").read_text()
    for text in (printed, report):
        assert header in text
        ours = next(line for line in text.splitlines() if line.startswith("| this model |"))
        cells = [c.strip() for c in ours.strip("|").split("|")]
        assert len(cells) == len(columns) + 3 and all(re.fullmatch(r"-?\d+\.\d\d / -?[01]\.\d{3}", c) for c in cells[1:-1])
        for published in PUBLISHED[protocol]:
            assert f"| {published.method} |" in text
    assert "centre-cropped to a multiple of 16" in report
    assert header in (tmp_path / "report" / "benchmark.md").read_text()
    scores = json.loads((tmp_path / "report" / "metrics.json").read_text())["benchmark"]["scores"]
    assert sorted(scores) == sorted(s.name for s in TABLES[protocol])


@pytest.mark.parametrize("stage", ["biqa", "ldm", "scm"])
def test_the_autodir_stages_train_on_a_protocols_data(tmp_path, monkeypatch, stage):
    """data.yaml merged over a stage's recipe (the tiny ones here): a few steps on the shards."""
    aio3_tree(tmp_path / "datasets")
    monkeypatch.chdir(tmp_path)
    assert main(["prep-benchmark", "aio3", "--root", "datasets", "--out", "benchmarks/aio3", "--workers", "1"]) == 1
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "foundations").symlink_to(repo / "foundations")  # the tiny configs name them relative to the repo
    assert main(["fit", str(repo / "configs" / "tiny" / f"{stage}.yaml"), str(repo / "configs/benchmarks/aio3/data.yaml"),
                 f"out_dir=runs/{stage}", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                 "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=csv",
                 "data.batch_size=2", "data.num_workers=0"]) == 0
    import torch

    assert torch.load(tmp_path / "runs" / stage / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_release_folders_beside_a_set_are_not_mixed_into_it(tmp_path):
    """Rain100L's test pairs with its `train/` folder inside, and CBSD68 with its pre-noised
    `noisy25/` copies beside the originals: each set holds only its own files."""
    for i in (1, 2):
        image(tmp_path / "Rain100L" / f"rain-{i:03d}.png")
        image(tmp_path / "Rain100L" / f"norain-{i:03d}.png")
        image(tmp_path / "Rain100L" / "train" / f"rain-{i}.png")
        image(tmp_path / "Rain100L" / "train" / f"norain-{i}.png")
        image(tmp_path / "CBSD68" / f"{i:04d}.png")
        image(tmp_path / "CBSD68" / "noisy25" / f"{i:04d}.png")
    found = survey(PROTOCOLS["aio3"], tmp_path)
    assert sorted((q.name, g.name) for q, g in found["rain100l"].pairs) == [
        ("rain-001.png", "norain-001.png"), ("rain-002.png", "norain-002.png")]
    assert sorted((q.name, g.parent.name) for q, g in found["rain100l_train"].pairs) == [
        ("rain-1.png", "train"), ("rain-2.png", "train")]
    assert [p.relative_to(tmp_path).as_posix() for p in found["cbsd68"].clean] == ["CBSD68/0001.png", "CBSD68/0002.png"]
