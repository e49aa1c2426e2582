"""What a clumsy user or a stranger hands the commands: each is one line and exit 2 before the
work starts, or, for a disk that fills up, one line with nothing half-written and nothing lost."""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_weights import export_tiny
from lit_restore.cli import main
from lit_restore.names import one_line, safe_name


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    export_tiny("restorer", tmp / "weights", tmp)
    return tmp / "weights"


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(d / f"{name}.png")
    return d


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_restore_arguments_are_refused_before_any_work(weights, photos, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--out", a_file], "is a file; give a folder"),
        (["--out", tmp_path / "o", "--device", "bogus"], "--device bogus: not a device"),
        (["--out", tmp_path / "o", "--device", "cuda:99"], "CUDA GPU"),
        (["--out", tmp_path / "o", "--threads", "100000"], "--threads 100000: this machine has"),
        (["--out", tmp_path / "o", "--threads", "-1"], "--threads -1"),
    ]
    for extra, said in cases:
        code = main(["restore", str(photos / "a.png"), "--weights", str(weights), "--fast", *map(str, extra)])
        line = one_line_error(capsys)
        assert code == 2 and said in line, (extra, line)
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def test_a_disk_that_fills_up_stops_restore_with_whole_pairs_and_a_summary(weights, photos, tmp_path, capsys,
                                                                          monkeypatch):
    """Room for one result (its PNG and JSON): the second image's pair is not half-written, the
    loop stops there instead of failing every remaining image, and the summary says so."""
    from lit_restore.data import images

    writes = []

    def small_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).parent == tmp_path / "out":
            writes.append(Path(path).name)
            if len(writes) > 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(images, "open", small_disk, raising=False)
    code = main(["restore", str(photos), "--weights", str(weights), "--fast", "--device", "cpu", "--out",
                 str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["a.json", "a.png"], left  # b's pair neither half-written nor a temporary; failed.txt had no room
    assert "restored 1 of 4 image(s)" in captured.out and "stopped: no space left on" in captured.out
    assert "2 image(s) not tried" in captured.out and "failed.txt not written either" in captured.out


def test_failed_txt_keeps_one_line_per_file_whatever_its_name(weights, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "bad\nname.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "ok.png")
    assert main(["restore", str(d), "--weights", str(weights), "--fast", "--device", "cpu", "--out",
                 str(tmp_path / "out")]) == 1
    lines = (tmp_path / "out" / "failed.txt").read_text().splitlines()
    assert len(lines) == 1 and "bad\\nname.png" in lines[0]
    assert one_line("a\nb\rc\td") == "a\\nb\\rc\td"


def test_degrade_refuses_a_bomb_and_a_folder_as_out(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS
    try:
        Image.new("1", (20000, 12000)).save(bomb)  # 240 MP, 30 KB on disk
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert main(["degrade", str(bomb), "--out", str(tmp_path / "x.png"), "--ops", "noise:sigma=25"]) == 2
    assert "DecompressionBomb" in one_line_error(capsys)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small)
    folder = tmp_path / "existing"
    folder.mkdir()
    assert main(["degrade", str(small), "--out", str(folder), "--ops", "noise:sigma=25"]) == 2
    assert "is a folder; give an image file" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png", "existing", "small.png"]  # no temporary left


def test_evaluate_checks_the_save_lines_file_and_lines_values_before_the_work(weights, sample_shards, tmp_path, capsys):
    data = str(sample_shards / "val-000000.tar")
    bad = tmp_path / "bad.csv"
    bad.write_text("task,bogus\nx,1\n")
    base = ["evaluate", "--weights", str(weights), "--data", data, "--fast", "--device", "cpu", "--tasks", "noise_s15"]
    assert main([*base, "--out", str(tmp_path / "r1"), "--save-lines", str(bad)]) == 2
    assert "unknown column" in one_line_error(capsys) and not (tmp_path / "r1").exists()
    inf = tmp_path / "inf.csv"
    inf.write_text("task,acceptance_psnr,excellence_psnr\nnoise_s15,-inf,30\n")
    assert main([*base, "--out", str(tmp_path / "r2"), "--lines", str(inf)]) == 2
    assert "acceptance_psnr = '-inf' is not a finite number" in one_line_error(capsys)


def test_names_from_shards_are_bounded_file_names(weights, tmp_path, capsys):
    """A paired set whose json `dataset` is 300 characters (and holds a slash): evaluated and
    reported, its task and grid names bounded."""
    rng = np.random.default_rng(0)
    for folder in ("lq", "gt"):
        (tmp_path / folder).mkdir()
    for i in range(2):
        gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(gt).save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray(np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)).save(tmp_path / "lq" / f"{i}.png")
    name = "x/" + "long" * 75
    assert main(["prep-shards", "--lq", str(tmp_path / "lq"), "--gt", str(tmp_path / "gt"), "--task", "noise",
                 "--name", name, "--out", str(tmp_path / "shards")]) == 0
    out = tmp_path / "report"
    assert main(["evaluate", "--weights", str(weights), "--data", str(tmp_path / "shards" / "*.tar"), "--fast",
                 "--device", "cpu", "--out", str(out), "--lpips-weights", str(tmp_path / "none.pth")]) == 0
    (task,) = json.loads((out / "metrics.json").read_text())["tasks"]
    assert task["task"].startswith("real_x-longlong") and len(task["task"]) <= 60
    assert [len(p.name) <= 84 for p in (out / "grids").iterdir()] == [True]
    assert len(safe_name("é" * 300)) == 80 and safe_name("../../etc") == "_.._etc"


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    from lit_restore.checkpointing import AtomicCheckpointIO
    from lit_restore.errors import DiskFullError

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path} writing last.ckpt; the checkpoints"):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_export_on_a_full_disk_keeps_the_previous_export_and_cleans_what_killed_ones_left(weights, tmp_path, capsys,
                                                                                         monkeypatch):
    import lit_restore.export as export

    ckpt = next(Path(weights).parent.glob("restorer.ckpt"))
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--no-onnx"]) == 0
    before = (out / "restorer" / "model.safetensors").read_bytes()
    # What a killed export leaves: a work folder named for its host and a pid that has ended.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = out / f".restorer.{os.uname().nodename}.{int(dead.stdout)}.abc123"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    live = out / f".restorer.{os.uname().nodename}.{os.getpid()}.def456"  # a live export's: kept
    live.mkdir()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    assert main(["export", str(ckpt), "--out", str(out), "--no-onnx"]) == 2
    captured = capsys.readouterr()
    assert f"removed {left}, left by a killed export" in captured.out
    assert captured.err.strip() == (f"lit-restore: no space left on {out} writing the restorer export; the previous "
                                    f"{out / 'restorer'} is intact")
    assert (out / "restorer" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == sorted(["restorer", live.name])


def test_an_unfinished_shard_set_is_named_by_prep_shards_and_by_fit(tmp_path, capsys):
    from lit_restore.data.datamodule import incomplete_shard_sets

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(src / f"{i}.png")
    out = tmp_path / "shards"
    assert main(["prep-shards", str(src), "--out", str(out), "--max-count", "1"]) == 0
    assert incomplete_shard_sets([str(p) for p in out.glob("*.tar")]) == []
    (out / "shard-000002.tar").unlink()
    assert incomplete_shard_sets([str(p) for p in out.glob("*.tar")]) == [
        f"{out}: 1 of the 3 shards its manifest.json lists are missing (e.g. shard-000002.tar)"]
    (out / "manifest.json").unlink()  # as a killed prep-shards leaves it
    assert "has no manifest.json: if prep-shards wrote it, it did not finish" in incomplete_shard_sets(
        [str(p) for p in out.glob("*.tar")])[0]
    capsys.readouterr()
    assert main(["prep-shards", str(src), "--out", str(out)]) == 2
    assert "but no manifest.json: an earlier prep-shards stopped before it finished" in capsys.readouterr().err


@pytest.fixture(scope="module")
def loop_weights(tmp_path_factory):
    from _tiny_weights import export_loop

    tmp = tmp_path_factory.mktemp("loop_weights")
    export_loop(tmp / "weights", tmp)
    return tmp / "weights"


def tampered(weights, tmp_path, change) -> Path:
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(weights, copy)
    change(copy)
    return copy


def edit_json(path: Path, **values) -> None:
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


def edit_model(path: Path, key: str, value) -> None:
    import yaml

    config = yaml.safe_load(path.read_text())
    config["model"][key] = value
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("change, said", [
    (lambda w: (w / "ldm" / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle"),
     "pytorch_model.bin: a pickle-format file in the weights folder, refused"),
    (lambda w: edit_json(w / "ldm" / "unet" / "config.json", bogus_key=1),
     "unknown key(s) bogus_key for UNet2DConditionModel"),
    (lambda w: edit_json(w / "ldm" / "text_encoder" / "config.json", vocab_size=10**9),
     "vocab_size = 1e+09 is beyond what any model of this kind uses"),
    (lambda w: edit_json(w / "ldm" / "text_encoder" / "config.json", hidden_size=4096, intermediate_size=16384),
     "text_encoder/config.json describes a model of"),
    (lambda w: edit_model(w / "restorer" / "config.yaml", "width", 4096), "restorer/config.yaml describes a model of"),
    (lambda w: edit_model(w / "restorer" / "config.yaml", "middle_blocks", 10**9), "middle_blocks = 1e+09 is beyond"),
    (lambda w: edit_model(w / "restorer" / "config.yaml", "constyle", {"queue_size": 10**11}),
     "queue_size = 1e+11 is beyond"),
    (lambda w: ((w / "restorer" / "config.yaml").unlink(), os.mkfifo(w / "restorer" / "config.yaml")),
     "config.yaml: not a regular file (a FIFO"),
])
def test_hostile_weights_folders_are_refused_in_one_line_before_anything_is_built(request, tmp_path, capsys,
                                                                                   change, said):
    restorer = any(w in said for w in ("restorer", "FIFO", "middle_blocks", "queue_size"))  # the --fast export
    weights = tampered(request.getfixturevalue("weights" if restorer else "loop_weights"), tmp_path, change)
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photo)
    fast = ["--fast"] if restorer else []
    capsys.readouterr()  # what building the fixture's weights printed
    code = main(["restore", str(photo), "--weights", str(weights), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--steps", "2", *fast])
    line = one_line_error(capsys)
    assert code == 2 and said in line, line


def test_a_config_that_is_a_fifo_or_huge_is_one_line(tmp_path, capsys):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert main(["fit", str(fifo)]) == 2  # before: blocked on the read for good
    assert one_line_error(capsys) == f"lit-restore: config error: {fifo}: not a regular file"
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * (2 << 20))
    assert main(["fit", str(big)]) == 2
    assert "a config is a few KB" in one_line_error(capsys)
