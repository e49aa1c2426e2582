"""`lit-restore` command line: parses arguments and calls the function that does the work.

No logic lives here. Heavy imports happen inside each command so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _prep_shards(a: argparse.Namespace) -> int:
    from data_prep.shards import prep_shards

    return prep_shards(
        inputs=a.inputs, out=a.out, lq=a.lq, gt=a.gt, task=a.task, name=a.name, crop=a.crop,
        stride=a.stride, max_count=a.max_count, max_size=a.max_size, seed=a.seed,
        workers=a.workers, overwrite=a.overwrite, prefix=a.prefix,
    )


def _prep_benchmark(a: argparse.Namespace) -> int:
    from data_prep.benchmarks import prep_benchmark

    if not a.check and not a.out:
        print("lit-restore prep-benchmark: --out required (or --check to only report)", file=sys.stderr)
        return 2
    return prep_benchmark(a.protocol, a.root, a.out, check=a.check, overwrite=a.overwrite, workers=a.workers)


def _prep_sample(a: argparse.Namespace) -> int:
    from data_prep.sample import prep_sample

    return prep_sample(out=a.out, crop=a.crop, train_crops=a.train_crops, val_crops=a.val_crops,
                       seed=a.seed, overwrite=a.overwrite)


def _degrade(a: argparse.Namespace) -> int:
    from lit_restore.data.degrade.preview import degrade_command

    return degrade_command(image=a.image, out=a.out, ops=a.ops, grid=a.grid, list_tasks=a.list_tasks,
                           suite=a.suite, seed=a.seed, list_ops=a.list_ops)


def _fit(a: argparse.Namespace) -> int:
    if a.check:  # architectures only: from the local Hugging Face cache, never a download
        with _hub_offline():
            return _fit_check(a)
    from lit_restore.config import load_config, to_yaml

    cfg = load_config(a.config, a.overrides)
    if a.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from lit_restore.checkpointing import RunTerminated
    from lit_restore.data.shards import CorruptDataError
    from lit_restore.fit import fit
    from lit_restore.guards import NonFiniteLossError

    try:
        fit(cfg)
    except CorruptDataError as e:
        print(f"lit-restore: {e}", file=sys.stderr)
        return 4
    except NonFiniteLossError as e:
        print(f"lit-restore: {e}", file=sys.stderr)
        return 3
    except RunTerminated as e:
        print(f"lit-restore: {e}", file=sys.stderr)
        return RunTerminated.EXIT_CODE
    return 0


def _fit_check(a: argparse.Namespace) -> int:
    from lit_restore.config import load_config
    from lit_restore.fit import build_on_meta, parameter_table

    stage = build_on_meta(load_config(a.config, a.overrides))
    print(f"stage {stage.cfg.stage}: networks built on the meta device, no weights read")
    print(parameter_table(stage))
    return 0


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face Hub reads no network inside (its constant, read from HF_HUB_OFFLINE when it is
    first imported, is set for the duration)."""
    import huggingface_hub.constants

    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = before


def _export(a: argparse.Namespace) -> int:
    from lit_restore.export import export_command

    # Several checkpoints in one call share the start-up cost; each becomes OUT/<its stage>/.
    return max(export_command(ckpt=c, out=a.out, ema=not a.no_ema, onnx=not a.no_onnx) for c in a.ckpt)


def _restore(a: argparse.Namespace) -> int:
    from lit_restore.restore import restore_command

    return restore_command(weights=a.weights, inputs=a.inputs, out=a.out, prompt=a.prompt, fast=a.fast,
                           **_settings_from(a))


def _evaluate(a: argparse.Namespace) -> int:
    from lit_restore.evaluate import evaluate_command, list_tasks_command

    if a.list_tasks:
        return list_tasks_command(a.suite, a.data)
    missing = [flag for flag, value in (("--weights", a.weights), ("--data", a.data), ("--out", a.out)) if not value]
    if missing:
        print(f"lit-restore evaluate: {', '.join(missing)} required (all but --data can be left out with "
              "--list-tasks)", file=sys.stderr)
        return 2
    return evaluate_command(
        weights=a.weights, suite=a.suite, data=a.data, out=a.out, lines=a.lines, save_lines_path=a.save_lines,
        line_role=a.line_role, tasks=a.tasks, max_images=a.max_images, crop_border=a.crop_border,
        y_channel=a.y_channel, lpips_weights=a.lpips_weights, fast=a.fast, compare_fast=a.compare_fast,
        benchmark=a.benchmark, **_settings_from(a),
    )


def _settings_classes() -> dict[str, type]:
    """The keyword each inference settings dataclass is passed as, to restore and evaluate."""
    from lit_restore.settings import LoopSettings, RunSettings, SamplerSettings, TileSettings

    return {"sampling": SamplerSettings, "tiles": TileSettings, "loop": LoopSettings, "run_settings": RunSettings}


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the inference settings, with the field's default and help."""
    import dataclasses

    for cls in _settings_classes().values():
        for f in dataclasses.fields(cls):
            flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
            if f.default is False:
                parser.add_argument(flag, action="store_true", help=help_text)
            else:
                parser.add_argument(flag, type=type(f.default), default=f.default, help=f"{help_text} (default: {f.default})")


def _settings_from(a: argparse.Namespace) -> dict[str, object]:
    import dataclasses

    return {key: cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)})
            for key, cls in _settings_classes().items()}


def _sbatch(a: argparse.Namespace) -> int:
    from lit_restore.slurm import sbatch_command

    return sbatch_command(
        config=a.config, overrides=a.overrides, nodes=a.nodes, devices_per_node=a.devices_per_node,
        partition=a.partition, time=a.time, cpus_per_task=a.cpus_per_task, gpus=not a.no_gpus,
        job_name=a.job_name, submit=a.submit, out=a.out,
    )


def build_parser() -> argparse.ArgumentParser:
    from lit_restore import __version__

    p = argparse.ArgumentParser(prog="lit-restore", description="All-in-one image restoration training on Lightning.",
                                epilog="A problem with what was given (config, data, weights, arguments) is one line "
                                       "on stderr and exit code 2; --debug adds its traceback.")
    p.add_argument("--version", action="version", version=f"lit-restore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prep-shards", help="image folders → WebDataset tar shards",
                       description="Write clean image folders (or paired --lq/--gt folders) as tar shards.",
                       epilog="exit codes: 0 every input written; 1 shards written but some inputs skipped "
                              "(unreadable, size mismatch, no partner; listed in OUT/skipped.txt); "
                              "2 usage error, nothing written")
    s.add_argument("inputs", nargs="*", help="clean image folders (searched recursively)")
    s.add_argument("--out", required=True, help="output folder for shards, manifest.json and the skip report")
    s.add_argument("--lq", help="paired mode: folder of degraded images")
    s.add_argument("--gt", help="paired mode: folder of clean images (matched to --lq by file stem)")
    s.add_argument("--task", help="paired mode: degradation type of the --lq images (e.g. rain, haze, sr)")
    s.add_argument("--name", help="dataset name stored in each sample's metadata (default: folder name)")
    s.add_argument("--crop", type=int, default=0, help="pre-crop large images into sub-images of this size, the last flush with the "
                   "right/bottom edge; sides shorter than it are kept whole (0: off)")
    s.add_argument("--stride", type=int, default=0, help="stride between sub-images (default: crop, no overlap)")
    s.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    s.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most (a larger single sample gets its own shard)")
    s.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle")
    s.add_argument("--workers", type=int, default=0, help="encoding processes (0: all cores)")
    s.add_argument("--prefix", default="shard", help="shard file name prefix")
    s.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    s.set_defaults(func=_prep_shards)

    s = sub.add_parser("prep-benchmark", help="the all-in-one protocols' datasets (aio3, aio5) → shards",
                       description="Find the 3-task (aio3) or 5-task (aio5) protocol's datasets under --root in their "
                                   "release layouts, report each (found, counts, unpaired files), and write train and "
                                   "test shards.",
                       epilog="exit codes: 0 written (or, with --check, every dataset found); 1 written, but some "
                              "files were skipped (listed in each set's skipped.txt); 2 a required dataset missing "
                              "(the report names it) or a usage error, nothing written")
    s.add_argument("protocol", choices=("aio3", "aio5"), help="aio3: noise, rain, haze; aio5: adds GoPro and LOL-v1")
    s.add_argument("--root", required=True, help="folder holding the datasets as downloaded")
    s.add_argument("--out", help="output folder: train/<dataset>/, test/<set>/, benchmark.json")
    s.add_argument("--check", action="store_true", help="only report what is found; write nothing")
    s.add_argument("--workers", type=int, default=0, help="encoding processes (0: all cores)")
    s.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    s.set_defaults(func=_prep_benchmark)

    s = sub.add_parser("prep-sample", help="build the quickstart shards from scikit-image's sample photos",
                       description="Random crops of the photos shipped with scikit-image → train and val shards.")
    s.add_argument("--out", default="data/sample", help="output folder")
    s.add_argument("--crop", type=int, default=128, help="crop size")
    s.add_argument("--train-crops", type=int, default=64, help="random crops per photo for training")
    s.add_argument("--val-crops", type=int, default=4, help="random crops per photo for validation (from a held-out bottom strip)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_prep_sample)

    s = sub.add_parser("degrade", help="preview degradations on an image, or list the ops or the GIR tasks",
                       description="Write a degraded image, a grid of every op at three strengths, or list the ops "
                                   "(--list-ops) or the suite (--list-tasks).")
    s.add_argument("image", nargs="?", help="input image")
    s.add_argument("--out", help="output image path")
    s.add_argument("--ops", default="", help='ops with parameters, e.g. "noise:sigma=25,blur:sigma=2" (--list-ops '
                                             'lists every op and parameter)')
    s.add_argument("--grid", action="store_true", help="every op at three strengths, labelled")
    s.add_argument("--list-ops", action="store_true", help="print every op: its parameters, their defaults and ranges")
    s.add_argument("--list-tasks", action="store_true", help="print the GIR suite: name, types, parameters")
    s.add_argument("--suite", default=None, help="suite YAML (default: configs/gir_suite.yaml)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_degrade)

    s = sub.add_parser("fit", help="train a stage from a config",
                       description="Train one stage. Overrides are key=value pairs, e.g. data.batch_size=16.",
                       epilog="exit codes: 0 finished, 2 config error, missing data or weights, the run dir held by "
                              "another fit (nothing was built), or no space left for a checkpoint (the earlier "
                              "ones are intact), "
                              "3 stopped on a non-finite loss (checkpoint.on_nan=stop; a checkpoint was saved), "
                              "4 stopped because the data could not be read (too many unreadable samples or shards "
                              "that keep failing; a single-process run saved its last step), "
                              "143 stopped by SIGTERM (a checkpoint was saved at the step boundary; the same "
                              "command resumes)")
    s.add_argument("config", help="stage YAML, e.g. configs/tiny/biqa.yaml")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    s.add_argument("--check", action="store_true",
                   help="build the stage's networks on the meta device (architectures only: no weights downloaded "
                        "or read, no memory taken), print parameter counts per sub-network and exit")
    s.set_defaults(func=_fit)

    s = sub.add_parser("export", help="checkpoint → weights folder (safetensors, config, model card, ONNX)",
                       description="Export a trained checkpoint for restore/evaluate and for other tools.")
    s.add_argument("ckpt", nargs="+", help="Lightning checkpoint file(s) or sharded checkpoint folder(s)")
    s.add_argument("--out", required=True, help="exported weights folder (a stage subfolder is written inside)")
    s.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    s.add_argument("--no-onnx", action="store_true", help="skip the ONNX export of conv nets")
    s.set_defaults(func=_export)

    s = sub.add_parser("restore", help="restore images with exported weights (automatic loop)",
                       description="BIQA → LDM → SCM, repeated until no artifact is left; or --fast / --prompt.",
                       epilog="exit codes: 0 every image restored; 1 some inputs failed (unreadable; listed in "
                              "OUT/failed.txt), the others were written; 2 nothing done (missing weights, bad arguments)")
    s.add_argument("inputs", nargs="+", help="images, folders or globs")
    s.add_argument("--weights", required=True, help="exported weights folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--prompt", default=None, help="one pass with this instruction instead of the automatic loop")
    s.add_argument("--fast", action="store_true", help="feed-forward ConStyle restorer only")
    _add_settings(s)
    s.set_defaults(func=_restore)

    s = sub.add_parser("evaluate", help="evaluate weights on the GIR suite and write a report",
                       description="Run the synthetic GIR tasks (and paired real tasks) and write metrics and a report.",
                       epilog="exit codes: 0 report written; 2 nothing evaluated (missing weights or data, bad arguments)")
    s.add_argument("--weights", help="exported weights folder")
    s.add_argument("--suite", default="gir", help="'gir' or a suite YAML")
    s.add_argument("--data", help="test shard URL pattern: clean images (the synthetic tasks degrade them) and/or "
                                  "paired shards (one real task per dataset and type)")
    s.add_argument("--out", help="report folder")
    s.add_argument("--list-tasks", action="store_true",
                   help="print every task --tasks accepts (the real ones of --data too) and exit")
    s.add_argument("--lines", default=None, help="CSV with per-task acceptance/excellence lines")
    s.add_argument("--save-lines", default=None, help="write these weights' per-task PSNR/SSIM into this lines CSV "
                   "(as the --line-role columns; other columns of an existing file are kept)")
    s.add_argument("--line-role", default="acceptance", choices=("acceptance", "excellence"),
                   help="which line --save-lines writes")
    s.add_argument("--tasks", default=None,
                   help="comma-separated task names, groups (real, synthetic, single, combo, id, ood) or degradation "
                        "types; or a count N (the first N suite tasks); default: every task --data can make")
    s.add_argument("--max-images", type=int, default=0, help="images per task (0: all)")
    s.add_argument("--crop-border", type=int, default=4, help="pixels removed from every border before PSNR/SSIM")
    s.add_argument("--y-channel", action="store_true", help="PSNR/SSIM on the Y channel (BT.601)")
    s.add_argument("--lpips-weights", default=None, help="local LPIPS backbone weights (offline)")
    s.add_argument("--fast", action="store_true", help="evaluate the feed-forward restorer instead of the loop")
    s.add_argument("--benchmark", choices=("aio3", "aio5"), default=None,
                   help="the all-in-one protocol's table (its test sets, its metric convention, the published rows); "
                        "--data: `prep-benchmark`'s --out folder")
    s.add_argument("--compare-fast", action="store_true",
                   help="also run the feed-forward restorer on the same images: a column in the table and contact sheets")
    _add_settings(s)
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("sbatch", help="render (and submit) a SLURM job for a config",
                       description="Render an sbatch script that runs `srun lit-restore fit` with requeue on preemption.")
    s.add_argument("config", help="stage YAML")
    s.add_argument("overrides", nargs="*", help="key=value overrides passed to fit")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--devices-per-node", type=int, default=1)
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="e.g. 24:00:00")
    s.add_argument("--cpus-per-task", type=int, default=8)
    s.add_argument("--no-gpus", action="store_true", help="CPU job: no --gres, gloo backend")
    s.add_argument("--job-name", default=None, help="default: from out_dir")
    s.add_argument("--out", default=None, help="where to write the script (default: <out_dir>/job.sbatch)")
    s.add_argument("--submit", action="store_true", help="submit with sbatch after rendering")
    s.set_defaults(func=_sbatch)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that wait for work sleep instead of spinning, unless the user chose: beside one
    # busy process, evaluate took 15.6 s spinning and 11.2 s passive, restore 8.5 / 7.4 s; alone,
    # passive is as fast (docs/benchmarks.md, "CPU threads"). Read when torch's OpenMP starts, so
    # before any command imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    # Overrides may follow options (`fit CONFIG --print-config seed=1`), which argparse's
    # positional matching alone does not accept.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from lit_restore.config import ConfigError, UserError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
        return code
    except UserError as e:
        if args.debug:
            raise
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"lit-restore: {kind}{e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; stdout is pointed at devnull so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports


if __name__ == "__main__":
    sys.exit(main())
