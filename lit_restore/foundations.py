"""`make foundations`: the tiny stand-ins for the pretrained models the full configs download.

At full scale every stage starts from a pretrained foundation: OpenAI's CLIP ViT-L/14 (BIQA, and
the LDM's text context), Stable Diffusion 1.5's VAE and UNet (LDM), or released weights of the
stage itself to fine-tune (AutoDIR's LDM and SCM, a ConStyle-NAFNet). The tiny pipeline
(`configs/tiny/`, `make demo`) starts from these instead, each made by this project's own stages
from the scikit-image sample photos, each in the order of the table (a foundation is trained on
the ones above it; the restorer, which needs none of them, trains in the background beside them):

| foundation | stands in for | recipe | made by stage |
|---|---|---|---|
| `sd/vae/` | SD-1.5's VAE | configs/foundations/autoencoder.yaml | autoencoder |
| `clip/` | OpenAI CLIP | configs/foundations/clip.yaml | biqa (text tower trained too) |
| `sd/unet/` | SD-1.5's UNet | configs/foundations/unet.yaml | ldm (plain denoiser, on the VAE above) |
| `ldm/` | released AutoDIR LDM weights | configs/foundations/ldm.yaml | ldm (the UNet above, v-prediction, every type) |
| `restorer/` | released ConStyle-NAFNet weights | configs/foundations/restorer.yaml | restorer (encoder jointly) |
| `scm/` | released SCM weights | configs/foundations/scm.yaml | scm (on the LDM foundation's samples) |

Each step is a real `lit-restore fit` + `lit-restore export`; the exported files are copied into
`--out` (default `foundations/tiny/`) with a model card each and `MANIFEST.json` (sha256, bytes).
The weights are shipped in the repository, so users and tests never run this; it is how they
were made, and `--scale 0.01` is the test that the recipe still runs.

Run: `python -m lit_restore.foundations [--out foundations/tiny] [--scale 1.0]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from data_prep.shards import file_sha256
from lit_restore.jobs import REPO, Beside, Runner, StepFailed, last_metric

@dataclass(frozen=True)
class Foundation:
    """One foundation: how it is made, what it stands in for, where its files go, what its card reports."""

    recipe: str  # configs/foundations/<recipe>.yaml
    stage: str  # the stage that recipe trains (its export folder's name)
    stands_in: str
    copies: dict[str, str]  # file or folder of the export → path under OUT
    card_dir: str  # under OUT, where the model card goes
    metric: str  # the held-out figure in the run's CSV log
    meaning: str  # how that figure reads
    # The foundation folder under OUT the recipe's LDM is read from ("sd": VAE and UNet, "ldm": the
    # LDM foundation), and the recipe's key prefix for it; "" for recipes without an LDM.
    ldm_source: str = ""
    ldm_key: str = "model."
    starts_from: str = "random initialisation"
    # Needs none of the other foundations and none of them needs it: made in the background.
    independent: bool = False


FOUNDATIONS: dict[str, Foundation] = {
    "vae": Foundation("autoencoder", "autoencoder", "Stable Diffusion 1.5's VAE (AutoencoderKL)", {"vae": "sd/vae"},
                      "sd/vae", "val/psnr", "reconstruction PSNR (dB) on the 128-px val crops (the demo's image size)"),
    "clip": Foundation("clip", "biqa", "OpenAI CLIP (open_clip)",
                       {"open_clip_model.safetensors": "clip/open_clip_model.safetensors",
                        "open_clip_config.json": "clip/open_clip_config.json"},
                       "clip", "val/acc", "degradation-prompt accuracy (8 classes, val crops, one synthetic type each)"),
    "unet": Foundation("unet", "ldm", "Stable Diffusion 1.5's UNet (UNet2DConditionModel)", {"unet": "sd/unet"},
                       "sd/unet", "val/loss", "denoising loss (ε-MSE at random timesteps) on the val crops",
                       ldm_source="sd"),
    "ldm": Foundation("ldm", "ldm", "released AutoDIR LDM weights (SD's UNet fine-tuned to restore)",
                      {"unet": "ldm/unet", "vae": "ldm/vae", "scheduler": "ldm/scheduler"}, "ldm", "val/psnr",
                      "restored PSNR (dB) sampled from pure noise (10 Euler-ancestral steps, v-prediction, no SCM) "
                      "on the 128-px val crops, one synthetic degradation each", ldm_source="sd",
                      starts_from="the UNet foundation (sd/unet, conv_in widened to take the condition latent)"),
    "restorer": Foundation("restorer", "restorer", "a released restorer (ConStyle-NAFNet) to fine-tune",
                           {"model.safetensors": "restorer/model.safetensors"}, "restorer", "val/psnr",
                           "restored PSNR (dB) on the 128-px val crops, one synthetic degradation each",
                           independent=True),
    "scm": Foundation("scm", "scm", "a released structure corrector (AutoDIR's SCM) to fine-tune",
                      {"model.safetensors": "scm/model.safetensors"}, "scm", "val/psnr",
                      "corrected PSNR (dB) of the LDM foundation's samples (from pure noise, 10 steps), 32-px val crops",
                      ldm_source="ldm", ldm_key="model.ldm."),
}
DEFAULT_OUT = REPO / "foundations" / "tiny"


@dataclass
class FoundationPlan:
    """Training lengths of the recipes (their configs' max_steps at scale 1)."""

    scale: float = 1.0

    def steps(self, recipe: str) -> Optional[int]:
        if self.scale == 1.0:
            return None  # the recipe's own max_steps
        from lit_restore.config import load_config

        full = load_config(REPO / "configs" / "foundations" / f"{recipe}.yaml").trainer["max_steps"]
        return max(2, round(full * self.scale))


def write_manifest(out: Path) -> dict[str, dict]:
    """MANIFEST.json: sha256 and size of every weights and config file under `out`."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json") and path.name != "MANIFEST.json":
            files[str(path.relative_to(out))] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    (out / "MANIFEST.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
    return files


def verify_manifest(out: Path) -> list[str]:
    """Files under `out` whose sha256 differs from MANIFEST.json (or that are missing)."""
    listed = json.loads((out / "MANIFEST.json").read_text())["files"]
    return [name for name, entry in listed.items()
            if not (out / name).is_file() or file_sha256(out / name) != entry["sha256"]]


def model_card(name: str, command: str, fit: str, seconds: float, steps: int, figure: Optional[float],
               machine: str = "a 2-core CPU") -> str:
    f = FOUNDATIONS[name]
    recipe, stands_in, metric, meaning, start = f.recipe, f.stands_in, f.metric, f.meaning, f.starts_from
    value = "–" if figure is None else f"{figure:.4g}"
    return "\n".join([
        "---",
        "library_name: lit_restore",
        "tags: [lit_restore, tiny, foundation, image-restoration]",
        "datasets: [scikit-image sample photos]",
        "---",
        f"# Tiny {name} foundation",
        "",
        f"Stands in for {stands_in} in the tiny pipeline (`configs/tiny/`, `make demo`). Trained from",
        f"{start} by this project's own recipe `configs/foundations/{recipe}.yaml` on the",
        "`lit-restore prep-sample` crops of the scikit-image photos, for minutes to an hour of CPU time:",
        "a miniature of the real foundation's role, not of its quality.",
        "",
        f"- made by: `{command}`, which runs",
        f"  `{fit}` on `lit-restore prep-sample --crop 128 --train-crops 64 --val-crops 4` shards, then exports it",
        f"- training: {steps} steps, {seconds / 60:.1f} min on {machine}",
        f"- held-out figure: {meaning}: **{value}** (`{metric}`)",
        "- files and sha256: `foundations/tiny/MANIFEST.json`",
        "",
    ])


def run_foundations(out: Path, work: Path, plan: FoundationPlan, only: Optional[list[str]] = None) -> int:
    """Makes the foundations named in `only` (all by default, in FOUNDATIONS order) into `out`; the
    others' files and cards stay as they are, and the manifest covers every file."""
    start = time.perf_counter()
    chosen = {name: f for name, f in FOUNDATIONS.items() if not only or name in only}
    r = Runner(work, total=1 + len(chosen))
    data, runs, exports = work / "data", work / "runs", work / "weights"
    cards, fits = {}, {}
    beside: Optional[Beside] = None

    def fit_args(name: str, f: Foundation) -> list[str]:
        steps = plan.steps(f.recipe)
        args = ["fit", f"configs/foundations/{f.recipe}.yaml", f"out_dir={runs / name}",
                f"data.train={data}/train-{{000000..000003}}.tar", f"data.val={data}/val-000000.tar",
                "resume=never", "logger=csv"]
        if out != DEFAULT_OUT and f.ldm_source:  # the recipes read their LDM and CLIP from foundations/tiny/
            args += [f"{f.ldm_key}pretrained={out / f.ldm_source}",
                     f"{f.ldm_key}clip.pretrained={out / 'clip' / 'open_clip_model.safetensors'}"]
        if steps is not None:
            args += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                     f"checkpoint.every_n_steps={steps}", "optim.warmup_steps=1"]
        fits[name] = "lit-restore " + " ".join(a for a in args if not a.startswith(("out_dir=", "data.", "model.")))
        return args

    def export_args(name: str) -> list[str]:
        return ["export", str(runs / name / "checkpoints" / "last.ckpt"), "--out", str(exports / name), "--no-onnx"]

    def collect(name: str, f: Foundation) -> None:
        """Copy an exported foundation into `out` and note its card's figures."""
        for src, dst in f.copies.items():
            source, target = exports / name / f.stage / src, out / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)
        steps = plan.steps(f.recipe)
        done = steps if steps is not None else int(last_metric(runs / name, "step") or 0) + 1
        cards[name] = (r.times[f"fit-{name}"], done, last_metric(runs / name, f.metric))
        r.console.print(f"  {name}: {f.metric} = {cards[name][2]}")

    try:
        r.stage("Sample shards from scikit-image's photos")
        r.cli("prep-sample", "prep-sample", "--out", str(data), "--crop", "128", "--train-crops", "64",
              "--val-crops", "4", "--overwrite")
        # A foundation that needs none of the others, and none of them it, trains on the other core
        # meanwhile (each fit takes one thread on a 2-core machine: lit_restore.jobs.Beside).
        background = [n for n, f in chosen.items() if f.independent] if len(chosen) > 1 else []
        if background:
            r.stage(f"Foundation {', '.join(background)}, in the background")
            beside = Beside(r, [step for n in background for step in
                                ((f"fit-{n}", fit_args(n, chosen[n])), (f"export-{n}", export_args(n)))])
        for name, f in chosen.items():
            if name in background:
                continue
            r.stage(f"Foundation {name}: {f.stands_in} ({f.recipe} recipe)")
            r.cli(f"fit-{name}", *fit_args(name, f))
            r.cli(f"export-{name}", *export_args(name))
            collect(name, f)
        if beside is not None:
            beside.join()
            for name in background:
                collect(name, chosen[name])
    except StepFailed:
        return 1
    finally:
        if beside is not None:
            beside.stop()
    command = "make foundations" if plan.scale == 1.0 else f"python -m lit_restore.foundations --scale {plan.scale}"
    if only:
        command = f"python -m lit_restore.foundations --only {' '.join(chosen)}" + (f" --scale {plan.scale}" if plan.scale != 1.0 else "")
    for name, (seconds, steps, figure) in cards.items():
        (out / FOUNDATIONS[name].card_dir / "README.md").write_text(model_card(name, command, fits[name], seconds, steps, figure))
    files = write_manifest(out)
    total = sum(f["bytes"] for f in files.values())
    r.console.print(f"foundations in {out}: {len(files)} files, {total / 1e6:.1f} MB, "
                    f"{(time.perf_counter() - start) / 60:.1f} min")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lit_restore.foundations", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the foundation files go")
    p.add_argument("--work", default="runs/foundations", help="training runs, exports and data")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training length (0.01: a smoke run)")
    p.add_argument("--only", nargs="+", choices=list(FOUNDATIONS), default=None,
                   help="remake only these (the unet is trained on the shipped vae and clip, the ldm on the unet, "
                        "the scm on the ldm: remake what depends on a remade one too)")
    a = p.parse_args(argv)
    if a.scale <= 0:
        p.error("--scale must be > 0")
    return run_foundations(Path(a.out).resolve(), Path(a.work).resolve(), FoundationPlan(a.scale), a.only)


if __name__ == "__main__":
    sys.exit(main())
