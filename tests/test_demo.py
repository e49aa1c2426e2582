"""The demo's pieces that run without training: the plan, the fit arguments (valid configs),
the degraded inputs, reading run metrics and the chain of steps run beside the others. The whole demo is `make demo` (minutes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_restore.config import load_config
from lit_restore.demo import RESTORE_TASKS, DemoPlan, fit_args, write_degraded_inputs
from lit_restore.jobs import Beside, Job, Runner, StepFailed, last_metric

REPO = Path(__file__).resolve().parent.parent


def test_scaled_plan_keeps_an_early_restorer_checkpoint():
    for factor in (0.01, 0.1, 0.37, 1.0, 2.5):
        plan = DemoPlan().scaled(factor)
        assert plan.restorer_steps % 4 == 0 and plan.restorer_early_step >= 1
        assert plan.restorer_steps % plan.restorer_early_step == 0
    assert DemoPlan().scaled(1.0) == DemoPlan()


def test_fit_arguments_make_valid_configs(tmp_path):
    for stage in ("biqa", "constyle", "restorer", "ldm"):
        args = fit_args(stage, tmp_path / stage, tmp_path / "data", 40, every=10)
        cfg = load_config(REPO / args[1], args[2:])
        assert cfg.stage == stage and cfg.trainer["max_steps"] == 40 and cfg.checkpoint.every_n_steps == 10
        assert cfg.data.val[0].url == f"{tmp_path}/data/val-000000.tar" and cfg.resume == "never"


def test_degraded_inputs_are_distinct_pngs(sample_shards, tmp_path):
    paths = write_degraded_inputs(sample_shards, tmp_path)
    assert [p.stem for p in paths] == list(RESTORE_TASKS)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])


def test_last_metric_reads_the_newest_logged_value(tmp_path):
    log = tmp_path / "logs" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text("step,val/acc,train/loss\n10,,0.5\n20,0.25,\n30,0.5,\n40,,0.1\n")
    assert last_metric(tmp_path, "val/acc") == 0.5
    assert last_metric(tmp_path, "val/psnr") is None


def test_loss_story_and_progress_read_the_run_log(tmp_path):
    from lit_restore.jobs import loss_story, progress_text

    log = tmp_path / "logs" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},{v}\n" for s, v in
                                     [(4, 1.0), (9, 0.9), (14, 0.8), (19, 0.5), (24, 0.3), (29, 0.2), (34, 0.1), (39, 0.1)]))
    assert loss_story(tmp_path) == "train/loss 0.9500 → 0.1000 (down)"
    assert progress_text(tmp_path, steps=80, elapsed=40.0) == "step 40/80, ~40 s left"
    assert loss_story(tmp_path / "none") == "no loss logged"
    # A later fresh run into the same dir (the demo run again): its story is its own, not a mix
    # with the earlier run's first losses (version_10 sorts after version_9).
    for v, losses in ((9, [3.0, 3.0]), (10, [2.0, 1.0])):
        (tmp_path / "logs" / f"version_{v}").mkdir()
        (tmp_path / "logs" / f"version_{v}" / "metrics.csv").write_text(
            "step,train/loss\n" + "".join(f"{i},{x}\n" for i, x in enumerate(losses)))
    assert loss_story(tmp_path) == "train/loss 2.0000 → 1.0000 (down)"


def test_figures_name_the_tasks_worse_than_their_input():
    from lit_restore.demo import biqa_accuracy, figures

    metrics = {"tasks": [{"task": "a", "psnr": 30.0, "input_psnr": 25.0}, {"task": "b", "psnr": 19.0, "input_psnr": 20.0}],
               "biqa": {"confusion": [[3, 1], [0, 4]]}}
    f = figures(metrics)
    assert f.gain == 2.0 and f.worst_task == "b" and f.worst_gain == -1.0 and f.worse == ["b"]
    assert biqa_accuracy(metrics) == 7 / 8


class PythonRunner(Runner):
    """Runs Python snippets (`python -c ARG`) instead of lit-restore commands: the Beside tests."""

    def start(self, name, args):
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", *args], stdout=f, stderr=subprocess.STDOUT)
        return Job(name, proc, log, time.perf_counter())


def test_beside_runs_its_chain_in_order_and_times_each_step(tmp_path):
    r = PythonRunner(tmp_path, total=1)
    marker = tmp_path / "order.txt"
    chain = Beside(r, [(f"step{i}", [f"import time; time.sleep(0.3); open({str(marker)!r}, 'a').write('{i}')"])
                       for i in range(2)])
    assert chain.thread.is_alive()  # the caller goes on meanwhile
    chain.join()
    assert marker.read_text() == "01"
    assert all(0.3 <= r.times[f"step{i}"] < 30 for i in range(2))


def test_beside_stops_at_a_failed_step_and_names_it(tmp_path):
    r = PythonRunner(tmp_path, total=1)
    marker = tmp_path / "ran.txt"
    chain = Beside(r, [("bad", ["print('the reason'); raise SystemExit(3)"]),
                       ("after", [f"open({str(marker)!r}, 'w').write('x')"])])
    with pytest.raises(StepFailed, match="bad"):
        chain.join()
    assert not marker.exists()  # nothing after the failed step runs
    assert "the reason" in (tmp_path / "logs" / "bad.log").read_text()


def test_beside_stop_ends_the_running_step_and_starts_no_more(tmp_path):
    r = PythonRunner(tmp_path, total=1)
    marker = tmp_path / "ran.txt"
    chain = Beside(r, [("long", ["import time; time.sleep(60)"]), ("after", [f"open({str(marker)!r}, 'w').write('x')"])])
    while not chain.jobs:
        time.sleep(0.05)
    start = time.perf_counter()
    chain.stop()
    assert time.perf_counter() - start < 30 and not chain.thread.is_alive()
    assert chain.jobs[0].proc.returncode != 0 and not marker.exists()
