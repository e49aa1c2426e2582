"""`lit-restore evaluate` end to end on tiny exported weights and the sample shards: metrics.json,
report files with the tables and images, lines written and read back, LPIPS missing offline."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from _tiny_weights import export_tiny
from lit_restore.cli import main
from lit_restore.data.degrade.suite import build_task_set, load_suite
from lit_restore.evaluate import select_tasks
from lit_restore.exported import load_exported
from lit_restore.lines import read_lines
from lit_restore.metrics import psnr, quantize_8bit

TASKS = "noise_s25,blur_s2,jpeg_q50"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_weights")
    for stage in ("biqa", "restorer"):
        export_tiny(stage, tmp / "weights", tmp)
    return tmp / "weights"


def evaluate(weights, data, out, *extra):
    return main(["evaluate", "--weights", str(weights), "--data", data, "--out", str(out), "--fast", "--device", "cpu",
                 "--tasks", TASKS, "--max-images", "2", "--lpips-weights", str(out / "no-lpips.pth"), *map(str, extra)])


def test_evaluate_writes_metrics_report_and_lines(weights, sample_shards, tmp_path, capsys):
    data = str(sample_shards / "val-000000.tar")
    out = tmp_path / "report"
    lines_csv = tmp_path / "lines.csv"
    assert evaluate(weights, data, out, "--save-lines", lines_csv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [t["task"] for t in metrics["tasks"]] == TASKS.split(",")
    assert all(t["n_images"] == 2 and t["lpips"] is None for t in metrics["tasks"])
    assert metrics["conventions"]["crop_border"] == 4 and "not computed" in metrics["conventions"]["lpips"]

    # The reported PSNR of a task is the mean over its images of the restorer's 8-bit output.
    task = next(t for t in load_suite() if t.name == "noise_s25")
    net = load_exported(weights, "restorer")
    values = []
    for _, gt, lq in build_task_set(task, data, max_images=2):
        with torch.no_grad():
            restored = quantize_8bit(net(lq[None].float() / 255))
        values.append(float(psnr(restored, gt[None].float() / 255, crop_border=4)))
    assert metrics["tasks"][0]["psnr"] == pytest.approx(sum(values) / 2, abs=1e-6)

    # BIQA: 2 images per single-type task plus the 2 clean GTs as "no".
    confusion = metrics["biqa"]["confusion"]
    classes = metrics["biqa"]["classes"]
    assert sum(map(sum, confusion)) == 3 * 2 + 2
    assert sum(confusion[classes.index("no")]) == 2 and sum(confusion[classes.index("blur")]) == 2

    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for text in ("noise_s25", "jpeg_q50", "input PSNR", "LPIPS: not computed", "4 pixel(s) from every border", "feed-forward"):
        assert text in md and text in html, text
    assert (out / "grids" / "blur_s2.png").is_file() and "grids/blur_s2.png" in md
    assert (out / "plots" / "confusion.png").is_file() and html.count("data:image/png;base64") >= 5

    # The saved lines hold these scores as the acceptance line; excellence lines 1 dB above give
    # AR = 1 (every task is at its acceptance line) and ER = 0.
    lines = read_lines(lines_csv)
    assert lines["blur_s2"]["acceptance_psnr"] == pytest.approx(metrics["tasks"][1]["psnr"])
    for row in lines.values():
        row["excellence_psnr"] = row["acceptance_psnr"] + 1.0
    with open(lines_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "acceptance_psnr", "excellence_psnr"])
        for name, row in lines.items():
            w.writerow([name, repr(row["acceptance_psnr"]), repr(row["excellence_psnr"])])
    out2 = tmp_path / "report2"
    capsys.readouterr()
    assert evaluate(weights, data, out2, "--lines", lines_csv) == 0
    stats = json.loads((out2 / "metrics.json").read_text())["line_stats"]["psnr"]
    assert stats["n_cases"] == 3 and stats["ar"] == 1.0 and stats["er"] == 0.0
    assert stats["rpr_mean"] == pytest.approx(0.5)
    assert "AR" in (out2 / "report.md").read_text()
    assert "mean PSNR gain" in capsys.readouterr().out


def test_task_selection_and_errors(weights, sample_shards, tmp_path, capsys):
    data = str(sample_shards / "val-000000.tar")
    assert [t.name for t in select_tasks("gir", data, "2")] == [t.name for t in load_suite()[:2]]
    assert main(["evaluate", "--weights", str(weights), "--data", data, "--out", str(tmp_path / "r"),
                 "--tasks", "noise_s999"]) == 2
    assert "noise_s999" in capsys.readouterr().err
    assert main(["evaluate", "--weights", str(weights), "--data", str(tmp_path / "none-{0..1}.tar"),
                 "--out", str(tmp_path / "r"), "--fast"]) == 2
    assert "shard files not found" in capsys.readouterr().err
    assert main(["evaluate", "--weights", str(tmp_path / "nothing"), "--data", data, "--out", str(tmp_path / "r"),
                 "--fast"]) == 2
    assert "weights folder not found" in capsys.readouterr().err


def test_output_folder_holding_an_input_is_refused_and_out_of_memory_images_are_listed(
        weights, sample_shards, tmp_path, capsys, monkeypatch):
    data = str(sample_shards / "val-000000.tar")
    for out in (weights, sample_shards, weights.parent):
        assert evaluate(weights, data, out) == 2
        err = capsys.readouterr().err.strip()
        assert "holds the input" in err and len(err.splitlines()) == 1, err
    assert not (weights / "metrics.json").exists() and not (sample_shards / "metrics.json").exists()

    from lit_restore.restorers import FastRestorer

    real, calls = FastRestorer.restore, []

    def restore(self, image, generator):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, image, generator)

    monkeypatch.setattr(FastRestorer, "restore", restore)
    out = tmp_path / "report"
    assert evaluate(weights, data, out) == 1
    (line,) = (out / "failed.txt").read_text().splitlines()
    assert line.startswith("noise_s25/") and line.endswith("out of memory (OutOfMemoryError)")
    metrics = json.loads((out / "metrics.json").read_text())
    n_images = {t["task"]: t["n_images"] for t in metrics["tasks"]}
    assert n_images["noise_s25"] == 1 and n_images["blur_s2"] == 2


@pytest.fixture(scope="module")
def own_pairs(tmp_path_factory):
    """A user's own noisy/clean pairs (two 96×80 photos' worth), through `prep-shards --lq --gt`."""
    import numpy as np
    from PIL import Image

    tmp = tmp_path_factory.mktemp("own_pairs")
    rng = np.random.default_rng(0)
    for folder in ("noisy", "clean"):
        (tmp / folder).mkdir()
    for i in range(2):
        gt = np.clip(rng.normal(128, 40, (80, 96, 3)), 0, 255).astype(np.uint8)
        lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
        Image.fromarray(gt).save(tmp / "clean" / f"im{i}.png")
        Image.fromarray(lq).save(tmp / "noisy" / f"im{i}.png")
    assert main(["prep-shards", "--lq", str(tmp / "noisy"), "--gt", str(tmp / "clean"), "--task", "noise",
                 "--name", "mine", "--out", str(tmp / "shards"), "--workers", "1"]) == 0
    return tmp / "shards"


def test_own_paired_set_is_evaluated_alone_and_reported_as_real(weights, sample_shards, own_pairs, tmp_path, capsys):
    pairs = str(own_pairs / "*.tar")
    assert main(["evaluate", "--list-tasks", "--data", pairs]) == 0
    listed = capsys.readouterr().out
    assert "real_mine_noise\tnoise\treal" in listed and "0 clean image(s)" in listed

    # Paired shards alone: their real task only, no empty synthetic tasks, and a note saying why.
    out = tmp_path / "own"
    assert main(["evaluate", "--weights", str(weights), "--data", pairs, "--out", str(out), "--fast",
                 "--device", "cpu", "--lpips-weights", str(tmp_path / "none.pth")]) == 0
    assert "add clean shards to --data" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(t["task"], t["n_images"], t["level"]) for t in metrics["tasks"]] == [("real_mine_noise", 2, "real")]
    md = (out / "report.md").read_text()
    assert "| real pairs | 1 |" in md and "out-of-distribution" not in md and "| type haze" not in md

    # Groups and types select across synthetic and real tasks; a synthetic task without clean images is refused.
    both = f"{sample_shards / 'val-000000.tar'}::{pairs}"
    assert [t.name for t in select_tasks("gir", both, "real")] == ["real_mine_noise"]
    noise = select_tasks("gir", both, "noise")
    assert "real_mine_noise" in [t.name for t in noise] and all("noise" in t.types for t in noise)
    assert len([t for t in noise if t.kind != "real"]) > 1
    assert main(["evaluate", "--weights", str(weights), "--data", pairs, "--out", str(tmp_path / "r"),
                 "--tasks", "noise_s25"]) == 2
    assert "no clean image" in capsys.readouterr().err
    assert main(["evaluate", "--weights", str(weights), "--data", pairs, "--out", str(tmp_path / "r"),
                 "--tasks", "real_mine_nosie"]) == 2
    err = capsys.readouterr().err
    assert "similar: real_mine_noise" in err and "--list-tasks" in err and len(err.strip().splitlines()) == 1
