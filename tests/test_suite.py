"""The GIR task suite: size, validation, bit-identical regeneration, real paired tasks, CLI."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lit_restore.config import ConfigError
from lit_restore.data.degrade.preview import degrade_command, pair_grid, parse_ops
from lit_restore.data.degrade.suite import (build_task_set, degrade_for_task, find_task, load_suite,
                                            ShardSurvey, survey_shards, task_from_ops)
from lit_restore.data.degrade.types import SYNTHETIC_TYPES


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A clean val shard (3 images of different sizes, one with depth) and a paired shard."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    clean = root / "val-000000.tar"
    with wds.TarWriter(str(clean)) as w:
        for i, (h, wd) in enumerate([(48, 64), (40, 40), (56, 72)]):
            base = rng.integers(0, 256, (h // 8, wd // 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize((wd, h), Image.BICUBIC))
            sample = {"__key__": f"img{i}", "gt.png": _png(img), "json": json.dumps({"dataset": "toy"}).encode()}
            if i == 1:
                buf = io.BytesIO()
                np.save(buf, np.linspace(0, 5, h * wd, dtype=np.float32).reshape(h, wd))
                sample["depth.npy"] = buf.getvalue()
            w.write(sample)
    paired = root / "paired-000000.tar"
    with wds.TarWriter(str(paired)) as w:
        for i, task in enumerate(["rain", "rain", "haze"]):
            gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            lq = np.clip(gt.astype(int) + 20, 0, 255).astype(np.uint8)
            w.write({"__key__": f"p{i}", "gt.png": _png(gt), "lq.png": _png(lq),
                     "json": json.dumps({"dataset": "toyreal", "task": task}).encode()})
    return clean, paired


def test_suite_has_over_100_distinct_tasks():
    tasks = load_suite()
    assert len(tasks) >= 100
    assert len({t.name for t in tasks}) == len(tasks)
    assert len({t.seed for t in tasks}) == len(tasks)
    assert len({json.dumps(t.ops, sort_keys=True) for t in tasks}) == len(tasks)  # no two tasks alike
    for kind, size in (("single", 1), ("combo", 2), ("combo", 3)):
        assert any(t.kind == kind and len(t.types) == size for t in tasks)
    for level in ("id", "ood"):
        covered = {t.types[0] for t in tasks if t.level == level and t.kind == "single"}
        assert covered == set(SYNTHETIC_TYPES), level


def test_bad_suite_entries_fail_with_the_task_and_key(tmp_path):
    good = "version: 1\ndefaults:\n  noise: {sigma: 0, gray_prob: 0, poisson_prob: 0, poisson_scale: 0}\ntasks:\n"
    cases = {
        "  - {name: a, level: id, seed: 1, ops: {noise: {sigmaa: 5}}}": "tasks[0] (a).ops.noise.sigmaa: unknown key",
        "  - {name: a, level: id, seed: 1, ops: {noise: {sigma: 500}}}": "tasks[0] (a).ops.noise.sigma: [500, 500] must lie in [0, 255]",
        "  - {name: a, level: easy, seed: 1, ops: {noise: {sigma: 5}}}": "tasks[0] (a).level: 'easy' is not allowed",
        "  - {name: a, level: id, seed: 1, ops: {blur: {sigma: 5}}}": "tasks[0] (a).ops.blur.kernel_size: missing",
        "  - {name: a, level: id, seed: 1, ops: {snow: {}}}": "tasks[0] (a).ops.snow: unknown op",
        "  - {name: a, level: id, seed: 1, ops: {noise: {sigma: high}}}": "tasks[0] (a).ops.noise.sigma: 'high' must be a number",
    }
    for line, expected in cases.items():
        path = tmp_path / "suite.yaml"
        path.write_text(good + line + "\n")
        with pytest.raises(ConfigError) as info:
            load_suite(path)
        assert expected in str(info.value), str(info.value)
    path.write_text(good + "  - {name: a, level: id, seed: 1, ops: {noise: {sigma: 5}}}\n" * 2)
    with pytest.raises(ConfigError, match="repeats tasks"):
        load_suite(path)
    path.write_text("version: 2\ntasks: []\n")
    with pytest.raises(ConfigError, match="version: expected 1"):
        load_suite(path)


def test_degrade_for_task_is_independent_of_the_batch():
    task = find_task(load_suite(), "rain_a75+blur_s2+noise_s25")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 40, 40, generator=g)
    together = degrade_for_task(x, task, ["a", "b", "c"])
    alone = degrade_for_task(x[1:2], task, ["b"])
    assert torch.equal(together[1:2], alone)
    assert not torch.equal(degrade_for_task(x[1:2], task, ["a"]), alone)  # the key seeds the image
    by_index = degrade_for_task(x[1:], task, start_index=1)
    assert torch.equal(by_index[0], degrade_for_task(x[1:2], task, ["1"])[0])


def test_task_set_regenerates_bit_identically(shards):
    clean, paired = shards
    task = find_task(load_suite(), "haze_b1.5+noise_s25+jpeg_q50")
    first = list(build_task_set(task, str(clean)))
    second = list(build_task_set(task, [str(clean), str(paired)]))  # paired samples are not clean images
    assert [k for k, _, _ in first] == ["img0", "img1", "img2"] == [k for k, _, _ in second]
    for (k, gt, lq), (_, gt2, lq2) in zip(first, second):
        assert gt.dtype == lq.dtype == torch.uint8 and gt.shape == lq.shape
        assert torch.equal(gt, gt2) and torch.equal(lq, lq2)
        assert (lq.float() - gt.float()).abs().mean() > 1
    assert len(list(build_task_set(task, str(clean), max_images=2))) == 2


def test_real_tasks_from_paired_shards(shards):
    clean, paired = shards
    survey = survey_shards(str(paired))
    tasks = survey.real
    assert [(t.name, t.types, t.kind, t.level) for t in tasks] == [
        ("real_toyreal_haze", ("haze",), "real", "real"), ("real_toyreal_rain", ("rain",), "real", "real")]
    assert survey.clean == 0
    pairs = list(build_task_set(tasks[1], "unused"))
    assert [k for k, _, _ in pairs] == ["p0", "p1"]
    key, gt, lq = pairs[0]
    assert torch.equal(lq, (gt.int() + 20).clamp(max=255).to(torch.uint8))
    assert survey_shards(str(clean)) == ShardSurvey(real=[], clean=3)


def test_list_tasks_cli_prints_one_task_a_line():
    out = subprocess.run([sys.executable, "-m", "lit_restore.cli", "degrade", "--list-tasks"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == len(load_suite()) >= 100
    name, types, level, params = out[0].split("\t")
    assert name == load_suite()[0].name and level in ("id", "ood") and "=" in params


def test_preview_image_and_grid(tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    assert degrade_command(str(src), str(out), "noise:sigma=25,blur:sigma=2", False, False, None, 0) == 0
    assert Image.open(out).size == (48, 40)
    grid = tmp_path / "grid.png"
    assert degrade_command(str(src), str(grid), "", True, False, None, 0) == 0
    w, h = Image.open(grid).size
    assert w >= 4 * 48 and h >= len(SYNTHETIC_TYPES) * 40  # clean + 3 strengths, a row per op
    assert degrade_command(None, str(out), "noise:sigma=3", False, False, None, 0) == 2


def test_degrade_errors_name_the_users_own_flag(tmp_path, capsys):
    """A bad --ops value is the user's flag's error, not the suite file's."""
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src)
    for ops, expected in (("haze:strength=2", "--ops.haze.strength: unknown key; allowed here: beta, airlight"),
                          ("haze:beta=20", "--ops.haze.beta: [20, 20] must lie in [0, 10]"),
                          ("noise:sigmaa=3", "--ops.noise.sigmaa: unknown key")):
        assert degrade_command(str(src), str(tmp_path / "out.png"), ops, False, False, None, 0) == 2
        err = capsys.readouterr().err
        assert expected in err and "gir_suite" not in err, err


def test_list_ops_shows_every_op_with_its_parameters_and_ranges(capsys):
    assert degrade_command(None, None, "", False, False, None, 0, list_ops=True) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("\t")[0]: line for line in lines[1:-1]}
    assert set(rows) == set(SYNTHETIC_TYPES)
    assert "sigma=[15,50] in [0, 255]" in rows["noise"] and "quality=[30,70] in [1, 100]" in rows["jpeg"]


def test_parse_ops_and_custom_tasks():
    assert parse_ops("noise:sigma=25,gray_prob=1,blur:sigma=2.5") == {"noise": {"sigma": 25, "gray_prob": 1},
                                                                    "blur": {"sigma": 2.5}}
    with pytest.raises(ValueError):
        parse_ops("sigma=25")
    task = task_from_ops({"jpeg": {"quality": 20}, "noise": {"sigma": 10}})
    assert task.types == ("noise", "jpeg") and task.ops["jpeg"]["quality"] == 20


def test_pair_grid_layout():
    lq, gt = torch.zeros(3, 3, 8, 10), torch.ones(3, 3, 8, 10)
    grid = pair_grid(lq, gt, max_images=2)
    assert grid.shape == (3, 2 * 10, 2 * 12)
    assert grid[:, 1:9, 1:11].max() == 0 and grid[:, 1:9, 13:23].min() == 1
