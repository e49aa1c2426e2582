"""Is this environment the GPU image plus the carried wheels, with all that lit_restore needs?

    python bench/device/check.py                 # versions and requirements
    python bench/device/check.py --device cuda   # and a CUDA device torch can use
    python bench/device/check.py --stand-in      # only: nothing here that the image lacks

Prints the version of every package named in image.txt and wheels.txt beside the one expected,
then walks lit_restore's requirements (pyproject.toml) and theirs. A requirement of lit_restore,
of a carried wheel or of an installed not-carried package that is missing or at the wrong version
fails the check, as does a carried wheel shadowed by another version; the not-carried packages
themselves are only named. An image package at another version than image.txt says, or missing
one of its own requirements, is a note: the bench still runs, and gpu.json records torch's
version. Ends with one line and exit status 1 on failure.

`--stand-in` checks the environment `make device-env` builds for the image on the CPU: had it a
package that image-packages.txt lacks, a wheel the GPU machine needs could go unnoticed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def pins(path: Path) -> dict[str, str | None]:
    """name -> pinned version (None when unpinned) of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = next(iter(req.specifier), None)
            out[canonicalize_name(req.name)] = spec.version if spec and spec.operator == "==" else None
    return out


def installed(name: str) -> str | None:
    try:
        return distribution(name).version
    except PackageNotFoundError:
        return None


def unmet(carried: set[str], not_carried: set[str]) -> tuple[list[str], list[str]]:
    """(fatal, notes): requirements in lit_restore's tree that this environment does not meet."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [(Requirement(r), "lit_restore") for r in project["dependencies"]]
    seen: set[str] = set()
    fatal, notes = [], []
    while todo:
        req, by = todo.pop()
        name, needer = canonicalize_name(req.name), canonicalize_name(by)
        version = installed(req.name)
        if version is None or not req.specifier.contains(version, prereleases=True):
            what = f"{req} (needed by {by}; {'missing' if version is None else version + ' here'})"
            if name in not_carried and (needer == "lit-restore" or needer in carried):
                notes.append(f"not carried: {what}")
            elif needer == "lit-restore" or needer in carried | not_carried:
                fatal.append(what)
            else:  # the image's own business: it may hold what this stand-in does not
                notes.append(f"image: {what}")
        if version is None or name in seen:
            continue
        seen.add(name)
        dist = distribution(req.name)
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append((sub, dist.metadata["Name"]))
    return fatal, notes


def not_in_image() -> list[str]:
    """The distributions here that the GPU image does not hold."""
    lines = (HERE / "image-packages.txt").read_text().splitlines()
    image = {canonicalize_name(line) for line in lines if line and not line.startswith("#")}
    return sorted({f"{d.metadata['Name']} {d.version}" for d in distributions()
                   if canonicalize_name(d.metadata["Name"]) not in image})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--stand-in", action="store_true", help="only check that the image holds every package here")
    args = p.parse_args()
    if args.stand_in:
        extra = not_in_image()
        if extra:
            print(f"bench/device/check.py: the GPU image lacks what the stand-in holds: {', '.join(extra)}",
                  file=sys.stderr)
            return 1
        print(f"bench/device/check.py: {sys.prefix} holds only packages of the GPU image")
        return 0
    image, carried = pins(HERE / "image.txt"), pins(HERE / "wheels.txt")
    not_carried = set(pins(HERE / "not-carried.txt"))
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    fatal = []
    for source, table in (("image", image), ("wheel", carried)):
        for name, want in table.items():
            have = installed(name)
            mark = "" if have == want or (want is None and have) else " <--"
            print(f"  {source:5} {name:24} {have or 'MISSING':14} {'expected ' + want if want else ''}{mark}")
            if source == "wheel" and have != want:
                fatal.append(f"{name}=={want} (carried; {have or 'missing'} here)")
    more, notes = unmet(set(carried), not_carried)
    fatal += more
    for note in notes:
        print(f"  note: {note}")
    if args.device == "cuda" and not fatal:
        import torch

        if not torch.cuda.is_available():
            fatal.append(f"a CUDA device (torch {torch.__version__} sees none)")
        else:
            props = torch.cuda.get_device_properties(0)
            print(f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                  f"capability {props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    if fatal:
        print(f"bench/device/check.py: not ready: {'; '.join(fatal)}", file=sys.stderr)
        return 1
    print("bench/device/check.py: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
