"""`lit-restore prep-benchmark aio3|aio5`: the all-in-one protocols' datasets → shards.

The 3-task protocol (AirNet, PromptIR) trains on BSD400 + WED (noise added on the fly), Rain100L's
200 training pairs and RESIDE OTS, and tests on CBSD68 at σ 15/25/50, Rain100L's 100 test pairs
and SOTS outdoor's 500; the 5-task protocol (IDR, InstructIR, AdaIR, MoCE-IR) adds GoPro and
LOL-v1 and tests noise at σ 25 only.

Each dataset is recognised under `--root` in the layouts its release and the methods' loaders
use (`DATASETS`: the folder names and file-name patterns, e.g. OTS's `NNNN_A_B.jpg` hazy images
paired to the clear `NNNN.jpg`, GoPro's scene folders with `blur/` and `sharp/`, LOL's `low/` and
`high/`). Before anything is written every dataset is reported: where it was found, its count
against the count the protocol expects, and every unpaired file by name. A required dataset that
is missing stops the command (exit 2) with that list; `--check` only reports.

Written under `--out`: `train/<dataset>/` (clean shards for the noise sets, whose noise the
Degrader adds while training; paired shards for the others) and `test/<set>/` (paired shards, one
folder per test set), with `benchmark.json` listing them. The noisy test sets are made once,
deterministically: image `i` of CBSD68 (and of Urban100 and Kodak24, optional extras written when
found, outside the protocol's table) sorted by name at σ gets the Gaussian field of
`numpy.random.default_rng([σ, i])` (NOISE_SEED_NOTE), added to the clean image and cut to uint8 as
PromptIR's and AirNet's test code does (`clip(x + σ·n, 0, 255).astype(uint8)`: truncation).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from data_prep.shards import UsageError, WorkItem, list_images, prepare_out, write_items
from lit_restore.data.images import write_bytes_atomic

NOISE_SEED_NOTE = "numpy.random.default_rng([sigma, index]).standard_normal(image shape), index in name order"


@dataclass
class Found:
    """A dataset as found under the root: clean images, or (lq, gt) pairs; what could not be used."""

    where: str = ""  # the folder it was found in, relative to the root
    clean: list[Path] = field(default_factory=list)
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unpaired files, by name (not written)
    notes: list[str] = field(default_factory=list)  # what the user should know, nothing left out

    @property
    def count(self) -> int:
        return len(self.clean) + len(self.pairs)


def _pair_files(lqs: list[Path], lq_base: Path, gt_dir: Path, gt_name: Callable[[Path], Optional[str]], what: str,
                every_gt_once: bool = True) -> Found:
    """(lq, gt) pairs: each lq file's partner is `gt_name(its path under lq_base)`, a stem matched
    whatever its image suffix, in `gt_dir`. Files without a partner are named: lq files always,
    gt files when each should have one lq (`every_gt_once`; not for OTS, whose clear images
    serve many hazy ones)."""
    gts: dict[str, Path] = {}
    for p in list_images(gt_dir):
        gts.setdefault(p.relative_to(gt_dir).with_suffix("").as_posix(), p)
    found, used = Found(), set()
    for lq in lqs:
        stem = gt_name(lq.relative_to(lq_base))
        gt = gts.get(stem) if stem is not None else None
        if gt is None:
            found.problems.append(f"{lq}: no {what} partner" + (f" ({stem}.*)" if stem else " (name not understood)"))
        else:
            found.pairs.append((lq, gt))
            used.add(stem)
    if every_gt_once:
        found.problems += [f"{p}: no degraded partner" for s, p in sorted(gts.items()) if s not in used]
    return found


def _pair_by_name(lq_dir: Path, gt_dir: Path, gt_name: Callable[[Path], Optional[str]], what: str) -> Found:
    return _pair_files(list_images(lq_dir), lq_dir, gt_dir, gt_name, what)


def _pair_rain_flat(folder: Path) -> Found:
    """Rain100L as released: `rain-N.png` and `norain-N.png` side by side (this folder only, not
    its subfolders: a `train/` beside the test pairs is another set)."""
    images = [p for p in list_images(folder) if p.parent == folder]
    rainy = [p for p in images if p.stem.startswith("rain-")]
    found = Found()
    clean = {p.stem: p for p in images if p.stem.startswith("norain-")}
    used = set()
    for q in rainy:
        partner = clean.get("no" + q.stem)
        if partner is None:
            found.problems.append(f"{q}: no clean partner (no{q.stem}.*)")
        else:
            found.pairs.append((q, partner))
            used.add(partner.stem)
    found.problems += [f"{p}: no rainy partner" for stem, p in sorted(clean.items()) if stem not in used]
    return found


def _same_name(rel: Path) -> Optional[str]:
    return rel.with_suffix("").as_posix()


def _hazy_to_clear(rel: Path) -> Optional[str]:
    """RESIDE's `NNNN_A_B.jpg` (scene, atmospheric light, β) → the clear image `NNNN`."""
    m = re.fullmatch(r"(\d+)_[\d.]+_[\d.]+", rel.stem)
    return m.group(1) if m else None


def _rain_to_norain(rel: Path) -> Optional[str]:
    """PromptIR's list layout: `rainy/rain-N.png` → `gt/norain-N`."""
    m = re.fullmatch(r"rain-(\d+)", rel.stem)
    return f"norain-{m.group(1)}" if m else None


# ------------------------------------------------------------------------------- the datasets


def _first(root: Path, *candidates: str) -> Optional[Path]:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return None


def _clean(root: Path, candidates: tuple[str, ...], keep: Callable[[Path], bool] = lambda p: True) -> Optional[Found]:
    folder = _first(root, *candidates)
    if folder is None:
        return None
    return Found(str(folder.relative_to(root)), clean=[p for p in list_images(folder) if keep(p)])


def _paired(root: Path, layouts: tuple[tuple[str, str], ...], gt_name: Callable[[Path], Optional[str]],
            what: str) -> Optional[Found]:
    for lq, gt in layouts:
        if (root / lq).is_dir() and (root / gt).is_dir():
            found = _pair_by_name(root / lq, root / gt, gt_name, what)
            found.where = f"{lq} + {gt}"
            return found
    return None


def _wed_name(p: Path) -> bool:
    return re.fullmatch(r"\d{5}", p.stem) is not None and p.suffix.lower() == ".bmp"


def find_bsd400(root: Path) -> Optional[Found]:
    # PromptIR/AdaIR keep BSD400 and WED together in Train/Denoise/.
    found = _clean(root, ("BSD400", "bsd400", "denoising/BSD400", "Train/Denoise", "data/Train/Denoise"),
                   keep=lambda p: not _wed_name(p))
    if found is not None:
        found.notes += _list_mismatch(root / found.where, [p.name for p in found.clean])
    return found


def _list_mismatch(folder: Path, names: list[str]) -> list[str]:
    """A file list beside the images (PromptIR's denoise.txt) that names files which are not
    there: BSD400's list spells its ids `a<id>.jpg`, the release `<id>.jpg`. The files are used."""
    problems = []
    for listing in sorted(folder.glob("*.txt")) + sorted(folder.parent.glob("denoise*.txt")):
        listed = {Path(line.strip()).name for line in listing.read_text(errors="replace").splitlines() if line.strip()}
        missing = sorted(listed - set(names) - {p.name for p in folder.iterdir()})
        if missing:
            problems.append(f"{listing}: lists {len(missing)} file(s) that are not in {folder} (e.g. {missing[0]}); "
                            "the files there are used, the list is ignored")
    return problems


def find_wed(root: Path) -> Optional[Found]:
    return _clean(root, ("WED", "WED4744", "exploration_database_and_code/pristine_images", "pristine_images",
                         "denoising/WaterlooED", "Train/Denoise", "data/Train/Denoise"), keep=_wed_name)


def find_cbsd68(root: Path) -> Optional[Found]:
    return _clean(root, ("CBSD68/original_png", "CBSD68/original", "CBSD68", "test/denoise/bsd68",
                         "denoising/cBSD68/original_png", "bsd68"),
                  keep=lambda p: not any(part.startswith("noisy") for part in p.parts))


def find_urban100(root: Path) -> Optional[Found]:
    return _clean(root, ("Urban100/HR", "Urban100", "urban100", "test/denoise/urban100", "denoising/Urban100"),
                  keep=lambda p: not any(part.startswith(("LR", "image_SRF")) for part in p.parts))


def find_kodak24(root: Path) -> Optional[Found]:
    return _clean(root, ("Kodak24", "kodak24", "test/denoise/kodak24", "denoising/Kodak24"))


def find_rain100l_train(root: Path) -> Optional[Found]:
    flat = _first(root, "RainTrainL", "Rain100L/train", "rain_data_train_Light")
    if flat is not None:
        found = _pair_rain_flat(flat)
        found.where = str(flat.relative_to(root))
        return found
    return _paired(root, (("Train/Derain/rainy", "Train/Derain/gt"), ("deraining/RainTrainL/rainy", "deraining/RainTrainL/gt")),
                   lambda rel: _rain_to_norain(rel) or _same_name(rel), "clean")


def find_rain100l_test(root: Path) -> Optional[Found]:
    flat = _first(root, "Rain100L/test", "Rain100L")
    if flat is not None and any(flat.glob("rain-*")):
        found = _pair_rain_flat(flat)
        found.where = str(flat.relative_to(root))
        return found
    return _paired(root, (("test/derain/Rain100L/input", "test/derain/Rain100L/target"),
                          ("Rain100L/input", "Rain100L/target"), ("deraining/Rain100L/rainy", "deraining/Rain100L/gt")),
                   _same_name, "target")


def find_ots(root: Path) -> Optional[Found]:
    """RESIDE OTS: hazy `part1..4/NNNN_A_B.jpg` (or one hazy folder) and `clear/NNNN.jpg`."""
    for base, hazy, clear in (("OTS", "part*", "clear"), ("RESIDE/OTS", "part*", "clear"),
                              ("dehazing/RESIDE", "part*", "clear"), ("Train/Dehaze", "synthetic", "original"),
                              ("OTS", "hazy", "clear")):
        b = root / base
        folders = sorted(p for p in b.glob(hazy) if p.is_dir()) if b.is_dir() else []
        if (b / clear).is_dir() and folders:
            hazy_files = [q for folder in folders for q in list_images(folder)]
            found = _pair_files(hazy_files, b, b / clear, lambda rel: _hazy_to_clear(rel), "clear", every_gt_once=False)
            found.where = f"{base}/{hazy} + {base}/{clear}"
            return found
    return None


def find_sots_outdoor(root: Path) -> Optional[Found]:
    return _paired(root, (("SOTS/outdoor/hazy", "SOTS/outdoor/gt"), ("SOTS/outdoor/hazy", "SOTS/outdoor/clear"),
                          ("dehazing/SOTS/outdoor/hazy", "dehazing/SOTS/outdoor/gt"),
                          ("test/dehaze/input", "test/dehaze/target")), _hazy_to_clear, "clear (NNNN.*)")


def _gopro(root: Path, split: str) -> Optional[Found]:
    base = _first(root, f"GOPRO_Large/{split}", f"GoPro/{split}")
    if base is not None:
        found = Found(str(base.relative_to(root)))
        for scene in sorted(p for p in base.iterdir() if p.is_dir()):
            part = _pair_by_name(scene / "blur", scene / "sharp", _same_name, "sharp")
            found.pairs += part.pairs
            found.problems += part.problems
        return found
    flat = {"train": (("Train/Deblur/blur", "Train/Deblur/sharp"),),
            "test": (("test/deblur/gopro/input", "test/deblur/gopro/target"), ("deblurring/GoPro/test/input",
                                                                                "deblurring/GoPro/test/target"))}[split]
    return _paired(root, flat, _same_name, "sharp")


def _lol(root: Path, split: str) -> Optional[Found]:
    official = {"train": "our485", "test": "eval15"}[split]
    flat = {"train": (("Train/Enhance/low", "Train/Enhance/gt"),),
            "test": (("test/enhance/lol/input", "test/enhance/lol/target"),)}[split]
    return _paired(root, ((f"LOL/{official}/low", f"LOL/{official}/high"), (f"{official}/low", f"{official}/high"),
                          *flat), _same_name, "high")


@dataclass(frozen=True)
class Dataset:
    name: str
    role: str  # "train" or "test"
    task: str  # the degradation type
    expected: int  # images (or pairs) in the release the protocol uses
    find: Callable[[Path], Optional[Found]]
    source: str  # where a user gets it
    required: bool = True  # False: extra noisy test sets, written when found, outside the protocol's table


DATASETS = {d.name: d for d in (
    Dataset("bsd400", "train", "noise", 400, find_bsd400, "BSD400 (the methods' README links; files <id>.jpg)"),
    Dataset("wed", "train", "noise", 4744, find_wed, "Waterloo Exploration Database, pristine_images/00001.bmp …"),
    Dataset("rain100l_train", "train", "rain", 200, find_rain100l_train, "RainTrainL: rain-N.png + norain-N.png"),
    Dataset("ots", "train", "haze", 72135, find_ots, "RESIDE OTS: part1-4/NNNN_A_B.jpg + clear/NNNN.jpg "
            "(72,135 hazy images in the protocol's list)"),
    Dataset("gopro_train", "train", "blur", 2103, lambda r: _gopro(r, "train"), "GOPRO_Large/train/<scene>/{blur,sharp}"),
    Dataset("lol_train", "train", "lowlight", 485, lambda r: _lol(r, "train"), "LOL-v1 our485/{low,high}"),
    Dataset("cbsd68", "test", "noise", 68, find_cbsd68, "CBSD68 original_png/ (or original/)"),
    Dataset("urban100", "test", "noise", 100, find_urban100, "Urban100 (HR images, img_001.png …)", required=False),
    Dataset("kodak24", "test", "noise", 24, find_kodak24, "Kodak24 (kodim01.png …)", required=False),
    Dataset("rain100l", "test", "rain", 100, find_rain100l_test, "Rain100L test: rain-NNN.png + norain-NNN.png"),
    Dataset("sots_outdoor", "test", "haze", 500, find_sots_outdoor, "SOTS outdoor: hazy/NNNN_A_B.jpg + gt/NNNN.png"),
    Dataset("gopro", "test", "blur", 1111, lambda r: _gopro(r, "test"), "GOPRO_Large/test/<scene>/{blur,sharp}"),
    Dataset("lol", "test", "lowlight", 15, lambda r: _lol(r, "test"), "LOL-v1 eval15/{low,high}"),
)}


@dataclass(frozen=True)
class Protocol:
    name: str
    datasets: tuple[str, ...]
    noise_sigmas: tuple[int, ...]  # the noisy test sets made from CBSD68


PROTOCOLS = {
    "aio3": Protocol("aio3", ("bsd400", "wed", "rain100l_train", "ots", "cbsd68", "rain100l", "sots_outdoor",
                              "urban100", "kodak24"), (15, 25, 50)),
    "aio5": Protocol("aio5", ("bsd400", "wed", "rain100l_train", "ots", "gopro_train", "lol_train", "cbsd68",
                              "rain100l", "sots_outdoor", "gopro", "lol", "urban100", "kodak24"), (25,)),
}


def survey(protocol: Protocol, root: Path) -> dict[str, Optional[Found]]:
    return {name: DATASETS[name].find(root) for name in protocol.datasets}


def report(protocol: Protocol, root: Path, found: dict[str, Optional[Found]]) -> list[str]:
    """Print one line per dataset (and its problems); returns the required datasets that are missing."""
    out, missing = sys.stdout, []
    print(f"{protocol.name} under {root}:", file=out)
    for name, f in found.items():
        d = DATASETS[name]
        if (f is None or f.count == 0) and not d.required:
            print(f"  {name:15s} {d.role:5s} not found (optional: an extra noisy test set); {d.source}", file=out)
        elif f is None or f.count == 0:
            missing.append(name)
            where = "not found" if f is None else f"nothing usable in {f.where}"
            print(f"  {name:15s} {d.role:5s} MISSING ({where}); expected: {d.source}", file=out)
        else:
            note = "" if f.count == d.expected else f" (expected {d.expected})"
            print(f"  {name:15s} {d.role:5s} {f.count:6d}{note} in {f.where}", file=out)
        for note in f.notes if f is not None else []:
            print(f"      note: {note}", file=out)
        for problem in (f.problems if f is not None else [])[:20]:
            print(f"      {problem}", file=out)
        if f is not None and len(f.problems) > 20:
            print(f"      … and {len(f.problems) - 20} more", file=out)
    return missing


def noisy_items(found: Found, name: str, sigma: int) -> list[WorkItem]:
    """A clean test set's noisy twin at `sigma`: image i (in name order) gets default_rng([σ, i])'s field."""
    return [WorkItem(i, str(p), p.name, f"{name}_s{sigma}", task="noise", noise_sigma=float(sigma),
                     noise_seed=(sigma, i)) for i, p in enumerate(sorted(found.clean, key=lambda p: p.name))]


def prep_benchmark(protocol: str, root: str, out: str, check: bool = False, overwrite: bool = False,
                   workers: int = 0, seed: int = 0) -> int:
    """Report the protocol's datasets under `root` and, unless `check`, write their shards into
    `out`; returns the exit code (0 written / all found, 2 a required dataset missing or bad usage)."""
    if protocol not in PROTOCOLS:
        print(f"lit-restore prep-benchmark: unknown protocol {protocol!r}; choose {', '.join(PROTOCOLS)}", file=sys.stderr)
        return 2
    p, root_dir = PROTOCOLS[protocol], Path(root)
    if not root_dir.is_dir():
        print(f"lit-restore prep-benchmark: --root {root} is not a folder", file=sys.stderr)
        return 2
    found = survey(p, root_dir)
    missing = report(p, root_dir, found)
    if missing:
        print(f"lit-restore prep-benchmark: {len(missing)} required dataset(s) missing: {', '.join(missing)}; "
              "put them under --root in one of the layouts above", file=sys.stderr)
        return 2
    if check:
        return 0
    out_dir = Path(out)
    sets: dict[str, dict] = {}
    # (folder, dataset name, items, task, problems: its unpaired files, into the set's skipped.txt)
    jobs: list[tuple[str, str, list[WorkItem], Optional[str], list[str]]] = []
    for name, f in found.items():
        d = DATASETS[name]
        if f is None or f.count == 0:
            continue  # an optional set that is not there
        if d.role == "test" and d.task == "noise":
            for sigma in p.noise_sigmas:
                jobs.append((f"test/{name}_s{sigma}", f"{name}_s{sigma}", noisy_items(f, name, sigma), "noise",
                             list(f.problems)))
        elif f.clean:
            items = [WorkItem(i, str(q), q.relative_to(root_dir).as_posix(), name) for i, q in enumerate(f.clean)]
            jobs.append((f"{d.role}/{name}", name, items, None, list(f.problems)))
        else:
            items = [WorkItem(i, str(g), g.relative_to(root_dir).as_posix(), name, lq=str(q), task=d.task)
                     for i, (q, g) in enumerate(f.pairs)]
            jobs.append((f"{d.role}/{name}", name, items, d.task, list(f.problems)))
    try:
        for folder, *_ in jobs:
            prepare_out(out_dir / folder, ["shard"], overwrite)
    except UsageError as e:
        print(f"lit-restore prep-benchmark: error: {e}", file=sys.stderr)
        return 2
    skipped_total = 0
    for folder, name, items, task, problems in jobs:
        total, skipped = write_items(items, out_dir / folder, problems, name, task, {"protocol": protocol, "root": str(root)},
                                     max_count=1000, max_size=1e9, seed=seed, workers=workers, prefix="shard")
        skipped_total += len(skipped)
        sets[folder] = {"dataset": name, "task": task, "samples": total, "skipped": len(skipped),
                        "pattern": f"{folder}/shard-*.tar"}
    manifest = {"protocol": protocol, "sets": sets, "noise": {"sigmas": list(p.noise_sigmas), "seed": NOISE_SEED_NOTE,
                                                               "to_uint8": "truncation, as PromptIR's test code"}}
    write_bytes_atomic(out_dir / "benchmark.json", (json.dumps(manifest, indent=2) + "\n").encode())
    print(f"wrote {len(sets)} shard sets to {out_dir} (benchmark.json lists them)")
    return 1 if skipped_total else 0
