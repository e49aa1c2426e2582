"""`lit-restore evaluate`: restore the GIR suite's test sets, measure, compare with the lines, report.

For each task (the suite's synthetic tasks and one real task per dataset and type of the paired
samples in `--data`, chosen by `--tasks`; see `select_tasks`), every test image is degraded
deterministically from its clean val image, or read from its pair (`build_task_set`), restored with the exported
weights (the automatic loop, or `--fast` the feed-forward restorer) and compared with its GT:
PSNR and SSIM (conventions in `lit_restore.metrics`, written into the report), LPIPS when its
backbone weights are available (otherwise the report says why it is missing), and the same for
the degraded input. BIQA, when exported, names the degraded image of every single-type and real
task (combination tasks have no one true class) and every clean GT ("no"): a confusion matrix.

`--lines CSV` adds AR/ER/RPR against per-task acceptance/excellence lines; `--save-lines CSV
--line-role acceptance|excellence` writes these weights' per-task scores as such a line.

The metric functions live in `lit_restore.metrics` and are re-exported here, so
`lit_restore.evaluate.psnr` / `ssim` are the public names.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_restore.config import ConfigError
from lit_restore.data.degrade.suite import Task, build_task_set, find_task, load_suite, survey_shards
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.data.images import write_bytes_atomic
from lit_restore.lines import Lines, LinesError, line_stats, read_lines, save_lines
from lit_restore.metrics import LPIPSWeightsError, load_lpips, psnr, quantize_8bit, ssim
from lit_restore.models.clip import PromptCLIP
from lit_restore.names import one_line
from lit_restore.protocols import CONVENTION, PROTOCOLS, BenchmarkTable, centre_crop, protocol_scores
from lit_restore.report import BIQAResult, Conventions, EvalResult, TaskResult, contact_sheet, write_report
from lit_restore.restore import check_out_dir, make_out_dir, progress_bar
from lit_restore.restorers import (AutoRestorer, FastRestorer, MissingWeightsError, Restorer, biqa_logits, build_restorer,
                                   has_stage, image_generator, load_biqa, pick_device)
from lit_restore.settings import LoopSettings, RunSettings, SamplerSettings, TileSettings, check_settings

__all__ = ["psnr", "ssim", "evaluate_command", "list_tasks_command", "select_tasks"]

GRID_IMAGES = 4  # contact-sheet rows per task in the report


TASK_GROUPS = {
    "real": lambda t: t.kind == "real",
    "synthetic": lambda t: t.kind != "real",
    "single": lambda t: t.kind == "single",
    "combo": lambda t: t.kind == "combo",
    "id": lambda t: t.level == "id",
    "ood": lambda t: t.level == "ood",
}


def select_tasks(suite: str, data: str, tasks: Optional[str]) -> list[Task]:
    """The tasks `evaluate` runs: the suite's synthetic tasks ('gir' = configs/gir_suite.yaml, or
    a suite YAML) and the real paired tasks found in `data`.

    `tasks` is comma-separated: task names, groups (`real`, `synthetic`, `single`, `combo`, `id`,
    `ood`), degradation types (every task that applies the type), or a count N (the first N
    synthetic tasks, plus the real ones). Without `tasks`: every task the data can make; a data
    folder of paired samples only gives its real tasks (synthetic tasks need clean images).
    Synthetic tasks are left out, with a note, when `data` holds no clean image."""
    synthetic = load_suite(None if suite == "gir" else suite)
    survey = survey_shards(data)
    if not tasks:
        chosen = synthetic + survey.real
    elif tasks.strip().isdigit():
        chosen = synthetic[: int(tasks)] + survey.real
    else:
        chosen = []
        for item in (name.strip() for name in tasks.split(",")):
            if item:
                chosen += [t for t in _match_tasks(synthetic + survey.real, item) if t not in chosen]
    made = [t for t in chosen if t.kind == "real" or survey.clean]
    if len(made) < len(chosen):
        real = ", ".join(t.name for t in survey.real) or "none"
        note = (f"--data holds no clean image, so its {len(chosen) - len(made)} synthetic task(s) cannot be made "
                f"(they degrade clean images: add clean shards to --data); its real tasks: {real}")
        if not made:
            raise ValueError(note)
        print(f"lit-restore evaluate: {note}", file=sys.stderr)
    return made


def _match_tasks(tasks: list[Task], item: str) -> list[Task]:
    """The tasks one `--tasks` item names: a task, a group or a degradation type."""
    if item in TASK_GROUPS:
        return [t for t in tasks if TASK_GROUPS[item](t)]
    if item in DEGRADATION_TYPES:
        return [t for t in tasks if item in t.types]
    try:
        return [find_task(tasks, item)]
    except ConfigError as e:
        raise ConfigError(f"--tasks: {e.args[0].split(': ', 1)[1]}; or a group ({', '.join(TASK_GROUPS)}), "
                          f"a type ({', '.join(t for t in DEGRADATION_TYPES if t != 'no')}) or a count; "
                          "evaluate --list-tasks --data ... lists them") from None


def list_tasks_command(suite: str, data: Optional[str]) -> int:
    """`evaluate --list-tasks`: every task name `--tasks` accepts, with the real tasks of `data`."""
    try:
        synthetic = load_suite(None if suite == "gir" else suite)
        survey = survey_shards(data) if data else None
    except (FileNotFoundError, ValueError) as e:
        return _error(str(e))
    print("name\ttypes\tlevel\tparameters")
    for task in synthetic + (survey.real if survey else []):
        print(task.describe())
    if survey is None:
        print("(real tasks: give --data with paired shards to list them)")
    else:
        print(f"--data: {survey.clean} clean image(s) for the synthetic tasks, {len(survey.real)} real task(s)")
    print(f"groups for --tasks: {', '.join(TASK_GROUPS)}, or a degradation type")
    return 0


def true_class(task: Task, classes: Sequence[str]) -> Optional[int]:
    """BIQA's expected answer on a task's degraded images: its one type; None for combinations
    (no single true class) and for types the BIQA does not score."""
    if task.kind == "combo" or task.types[0] not in classes:
        return None
    return list(classes).index(task.types[0])


@dataclass
class TaskScores:
    """Per-image values of one task, averaged into a TaskResult."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    input_psnr: list[float] = field(default_factory=list)
    input_ssim: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    compare_psnr: list[float] = field(default_factory=list)
    grid: list[list[tuple[Tensor, str]]] = field(default_factory=list)  # contact-sheet rows: (uint8 image, caption)
    protocol: list[tuple[float, float]] = field(default_factory=list)  # --benchmark: (PSNR, SSIM) per image

    def result(self, task: Task) -> TaskResult:
        def mean(v: list[float]) -> float:
            return sum(v) / len(v) if v else float("nan")

        return TaskResult(task=task.name, n_images=len(self.psnr), psnr=mean(self.psnr), ssim=mean(self.ssim),
                          input_psnr=mean(self.input_psnr), input_ssim=mean(self.input_ssim),
                          lpips=mean(self.lpips) if self.lpips else None,
                          kind="real" if task.kind == "real" else "synthetic", types=list(task.types),
                          level=task.level, compare_psnr=mean(self.compare_psnr) if self.compare_psnr else None)


def _error(message: str) -> int:
    print(f"lit-restore evaluate: {message}", file=sys.stderr)
    return 2


@dataclass
class Evaluation:
    """What `setup` gathers before any image is restored."""

    tasks: list[Task]
    reference: Lines
    device: torch.device
    restorer: Restorer
    biqa: Optional[PromptCLIP]
    fast_restorer: Optional[FastRestorer]  # --compare-fast: the feed-forward restorer on the same images
    lpips_model: Optional[torch.nn.Module]
    lpips_note: str
    benchmark: Optional[str] = None  # --benchmark: the protocol whose table is made


@dataclass
class Measured:
    """What `run` measured: per-task scores, BIQA's confusion matrix, images that failed."""

    scores: dict[str, TaskScores]
    classes: list[str]
    confusion: list[list[int]]
    failed: list[str]
    seconds: float


def evaluate_command(weights: str, suite: str, data: str, out: str, lines: Optional[str] = None,
                     save_lines_path: Optional[str] = None, line_role: str = "acceptance", tasks: Optional[str] = None,
                     max_images: int = 0, crop_border: int = 4, y_channel: bool = False,
                     lpips_weights: Optional[str] = None, fast: bool = False, compare_fast: bool = False,
                     sampling: Optional[SamplerSettings] = None, tiles: Optional[TileSettings] = None,
                     loop: Optional[LoopSettings] = None, run_settings: Optional[RunSettings] = None,
                     benchmark: Optional[str] = None) -> int:
    """Evaluate `weights` on the suite and write metrics.json + report.md/html into `out`.
    `benchmark` (aio3, aio5): the protocol's test sets only (`data` may be prep-benchmark's output
    folder), and its table (`lit_restore.protocols`) printed, in the report and in benchmark.md.
    Exit codes: 0 done; 1 done, but some images ran out of memory (listed in OUT/failed.txt, left
    out of the metrics); 2 nothing evaluated (missing weights or data, bad arguments, an output
    folder that holds an input)."""
    sampling, tiles = sampling or SamplerSettings(), tiles or TileSettings()
    loop, run_settings = loop or LoopSettings(), run_settings or RunSettings()
    try:
        if save_lines_path and Path(save_lines_path).exists():
            read_lines(save_lines_path)  # a malformed file is refused before the work, not after it
        if benchmark is not None:
            data, tasks = benchmark_data(benchmark, data, tasks)
        ev = setup(weights, suite, data, out, lines, tasks, crop_border, lpips_weights, fast, compare_fast, sampling,
                   tiles, loop, run_settings)
        if benchmark is not None:
            ev.tasks = benchmark_tasks(benchmark, ev.tasks)
            ev.benchmark = benchmark
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:  # ConfigError and LinesError are ValueErrors
        return _error(str(e))
    measured = run(ev, data, max_images, crop_border, y_channel, run_settings.seed)
    results = [measured.scores[t.name].result(t) for t in ev.tasks]
    evaluated = [r for r in results if r.n_images]  # tasks without an image stay out of the report
    empty = [r.task for r in results if not r.n_images]
    if not evaluated:
        return _error(f"no test image found in {data} for the selected tasks ({', '.join(empty[:3])}"
                      f"{', …' if len(empty) > 3 else ''})")
    if empty:
        print(f"lit-restore evaluate: {len(empty)} task(s) found no test image and are left out: "
              f"{', '.join(empty[:5])}{', …' if len(empty) > 5 else ''}", file=sys.stderr)
    if fast:
        method = "feed-forward ConStyle restorer (--fast)"
    else:
        scm = " → SCM" if ev.restorer.diffusion.scm is not None else ""
        start = f" from strength {sampling.strength:g}" if sampling.strength < 1 else ""
        method = (f"automatic loop (BIQA → LDM{scm}), {sampling.sampler} {sampling.steps} steps{start}, "
                  f"up to {loop.max_passes} passes")
    result = report(ev, measured, evaluated, weights, method, fast, crop_border, y_channel)
    if ev.benchmark is not None:
        result.benchmark = benchmark_table(ev, measured)
        table = result.benchmark.markdown()
        print(f"{ev.benchmark} benchmark ({CONVENTION}):\n{table}")
    paths = write_report(out, result)
    if ev.benchmark is not None:
        write_bytes_atomic(Path(out) / "benchmark.md", f"{ev.benchmark} benchmark\n\n{CONVENTION}.\n\n{table}\n".encode())
    if measured.failed:
        write_bytes_atomic(Path(out) / "failed.txt", "".join(one_line(f) + "\n" for f in measured.failed).encode("utf-8"))
    if save_lines_path:
        try:
            save_lines(save_lines_path, line_role, {r.task: {"psnr": r.psnr, "ssim": r.ssim} for r in evaluated})
        except (LinesError, ValueError) as e:
            return _error(str(e))
        print(f"{line_role} lines: {save_lines_path}")
    n = sum(r.n_images for r in evaluated)
    gain = sum(r.psnr - r.input_psnr for r in evaluated) / len(evaluated)
    print(f"evaluated {len(evaluated)} task(s), {n} image(s) in {measured.seconds:.0f} s; mean PSNR gain over the input "
          f"{gain:+.2f} dB")
    if result.biqa is not None and result.biqa.accuracy() is not None:
        print(f"BIQA accuracy {result.biqa.accuracy():.3f}")
    print(f"report: {paths['html']} (and {paths['markdown'].name}, {paths['metrics'].name})")
    if measured.failed:
        print(f"{len(measured.failed)} image(s) ran out of memory and are not in the metrics "
              f"(see {Path(out) / 'failed.txt'})")
    return 1 if measured.failed else 0


def setup(weights: str, suite: str, data: str, out: str, lines: Optional[str], tasks: Optional[str], crop_border: int,
          lpips_weights: Optional[str], fast: bool, compare_fast: bool, sampling: SamplerSettings, tiles: TileSettings,
          loop: LoopSettings, run_settings: RunSettings) -> Evaluation:
    """Check the arguments, select the tasks, load the networks; one-line errors (ValueError,
    FileNotFoundError, MissingWeightsError) before any image is restored."""
    from lit_restore.data.shards import check_local_shards, expand_urls, is_local

    check_settings(sampling, tiles, loop)
    if crop_border < 0:
        raise ValueError(f"--crop-border {crop_border} must be >= 0")
    shards = expand_urls(data)
    check_local_shards(shards, "--data")
    given = [weights, *(u for u in shards if is_local(u)), lines, suite if suite != "gir" else None]
    check_out_dir(Path(out), [Path(p) for p in given if p])
    make_out_dir(Path(out))
    selected = select_tasks(suite, data, tasks)
    if not selected:
        raise ValueError(f"--tasks {tasks!r} selects no task")
    reference = read_lines(lines) if lines else {}
    dev = pick_device(run_settings.device, run_settings.threads)
    restorer = build_restorer(weights, dev, None, fast, sampling, tiles, loop)
    biqa = restorer.biqa if isinstance(restorer, AutoRestorer) else (
        load_biqa(weights, dev) if has_stage(weights, "biqa") else None)
    fast_restorer = FastRestorer(weights, dev, tiles) if compare_fast and not fast else None
    try:
        lpips_model, lpips_note = load_lpips(lpips_weights, dev), "LPIPS AlexNet v0.1"
    except LPIPSWeightsError as e:
        lpips_model, lpips_note = None, f"not computed ({e})"
        print(f"lit-restore evaluate: LPIPS {lpips_note}", file=sys.stderr)
    return Evaluation(selected, reference, dev, restorer, biqa, fast_restorer, lpips_model, lpips_note)


def run(ev: Evaluation, data: str, max_images: int, crop_border: int, y_channel: bool, seed: int) -> Measured:
    """Degrade, restore and measure every test image of every task; BIQA names each degraded
    image of a one-type task and each clean GT once."""
    biqa, dev = ev.biqa, ev.device
    classes = list(biqa.class_names) if biqa is not None else []
    confusion = [[0] * len(classes) for _ in classes]
    gt_seen: set[str] = set()
    scores: dict[str, TaskScores] = {}
    failed: list[str] = []
    start = time.perf_counter()
    with progress_bar("evaluate") as bar:
        job = bar.add_task("", total=len(ev.tasks))
        for task in ev.tasks:
            bar.update(job, description=task.name)
            s = scores[task.name] = TaskScores()
            target = true_class(task, classes) if biqa is not None else None
            for i, (key, gt8, lq8) in enumerate(build_task_set(task, data, max_images=max_images)):
                bar.update(job, description=f"{task.name} · image {i + 1}" + (f" of {max_images}" if max_images else ""))
                if ev.benchmark is not None:  # the protocol crops the pair before the model sees it
                    gt8, lq8 = centre_crop(gt8), centre_crop(lq8)
                gt, lq = gt8[None].float() / 255, lq8[None].float() / 255
                try:
                    restored, log = ev.restorer.restore(lq, image_generator(seed, dev))
                except (torch.OutOfMemoryError, MemoryError) as e:  # one image too large; the next may fit
                    failed.append(f"{task.name}/{key}: out of memory ({type(e).__name__})")
                    bar.console.print(f"[red]skipped[/red] {failed[-1]}")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if ev.benchmark is not None:  # the protocol's convention scores the unrounded output
                    s.protocol.append(protocol_scores(restored, gt))
                restored = quantize_8bit(restored)
                s.psnr.append(float(psnr(restored, gt, crop_border, y_channel)))
                if ev.fast_restorer is not None:
                    fast_out = quantize_8bit(ev.fast_restorer.restore(lq, image_generator(seed, dev))[0])
                    s.compare_psnr.append(float(psnr(fast_out, gt, crop_border, y_channel)))
                s.ssim.append(float(ssim(restored, gt, crop_border, y_channel)))
                s.input_psnr.append(float(psnr(lq, gt, crop_border, y_channel)))
                s.input_ssim.append(float(ssim(lq, gt, crop_border, y_channel)))
                if ev.lpips_model is not None:
                    with torch.no_grad():
                        s.lpips.append(float(ev.lpips_model(restored.to(dev), gt.to(dev), normalize=True).mean()))
                if len(s.grid) < GRID_IMAGES:  # kept as uint8: a 4K image is 25 MB so, not 100
                    compare = [(_uint8(fast_out), f"{s.compare_psnr[-1]:.2f} dB")] if ev.fast_restorer is not None else []
                    s.grid.append([(lq8, f"{s.input_psnr[-1]:.2f} dB"), (_uint8(restored), f"{s.psnr[-1]:.2f} dB"),
                                   *compare, (gt8, "clean")])
                if biqa is not None:
                    if target is not None:
                        first = log.get("passes")
                        # The loop's first pass already scored the degraded input.
                        predicted = (classes.index(first[0]["detected"]) if first else
                                     int(biqa_logits(biqa, lq, dev).argmax()))
                        confusion[target][predicted] += 1
                    if key not in gt_seen and "no" in classes:
                        gt_seen.add(key)
                        confusion[classes.index("no")][int(biqa_logits(biqa, gt, dev).argmax())] += 1
            bar.advance(job)
    return Measured(scores, classes, confusion, failed, time.perf_counter() - start)


def benchmark_data(protocol: str, data: str, tasks: Optional[str]) -> tuple[str, str]:
    """--benchmark: `data` as a shard pattern (prep-benchmark's output folder becomes its test
    shards) and the tasks to select (its real tasks; `tasks` may narrow them)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--benchmark {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    folder = Path(data)
    if folder.is_dir():
        if not (folder / "benchmark.json").is_file():
            raise ValueError(f"--data {data}: no benchmark.json; give `lit-restore prep-benchmark {protocol} --out` "
                             "'s folder, or its test shards as a pattern")
        data = str(folder / "test" / "*" / "shard-*.tar")
    return data, tasks or "real"


def benchmark_tasks(protocol: str, tasks: list[Task]) -> list[Task]:
    """The selected tasks that are the protocol's test sets, in its column order; a set that is
    missing is named on stderr (its column stays empty), none at all is an error."""
    by_set = {t.dataset: t for t in tasks if t.kind == "real"}
    sets = PROTOCOLS[protocol]
    chosen = [by_set[s.name] for s in sets if s.name in by_set]
    if not chosen:
        raise ValueError(f"--data holds none of the {protocol} test sets ({', '.join(s.name for s in sets)}); "
                         f"`lit-restore prep-benchmark {protocol}` writes them")
    absent = [s.name for s in sets if s.name not in by_set]
    if absent:
        print(f"lit-restore evaluate: --data lacks the {protocol} test set(s) {', '.join(absent)}; their columns "
              "stay empty", file=sys.stderr)
    return chosen


def benchmark_table(ev: Evaluation, measured: Measured) -> BenchmarkTable:
    table = BenchmarkTable(ev.benchmark)
    for task in ev.tasks:
        scores = measured.scores[task.name].protocol
        if scores:
            table.scores[task.dataset] = (sum(p for p, _ in scores) / len(scores),
                                          sum(s for _, s in scores) / len(scores), len(scores))
    return table


def _uint8(image: Tensor) -> Tensor:
    return (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def report(ev: Evaluation, measured: Measured, results: list[TaskResult], weights: str, method: str, fast: bool,
           crop_border: int, y_channel: bool) -> EvalResult:
    """The report's content: per-task results (tasks that found images), the lines' statistics,
    BIQA's confusion matrix, the contact sheets."""
    stats = {}
    for metric in ("psnr", "ssim"):
        st = line_stats({r.task: getattr(r, metric) for r in results}, ev.reference, metric)
        if st is not None:
            stats[metric] = st
    columns = ["input", "--fast" if fast else "automatic", *(["--fast"] if ev.fast_restorer else []), "clean"]
    confusion = measured.confusion
    return EvalResult(
        weights=str(weights), method=method,
        conventions=Conventions(crop_border=crop_border, y_channel=y_channel, lpips=ev.lpips_note),
        tasks=results, lines=ev.reference, line_stats=stats,
        biqa=BIQAResult(measured.classes, confusion) if ev.biqa is not None and any(map(any, confusion)) else None,
        grids={r.task: contact_sheet(columns, measured.scores[r.task].grid) for r in results
               if measured.scores[r.task].grid},
        compare_method="--fast restorer" if ev.fast_restorer is not None else "",
    )
