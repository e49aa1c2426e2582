"""How `restore` and `evaluate` run the trained networks: each setting's default lives here, once.

The commands' flags are built from these dataclasses (`--steps` from `SamplerSettings.steps`, its
default and help text included), and the commands take them whole. Plain dataclasses, no torch:
`lit-restore --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SAMPLERS = ("euler_a", "ddim")


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SamplerSettings:
    """How the LDM samples. AutoDIR: Euler ancestral, 100 steps, from pure noise; guidance scales
    of 1 are the plain conditional prediction (one UNet pass per step)."""

    steps: int = _setting(100, "diffusion sampling steps (AutoDIR's number)")
    sampler: str = _setting("euler_a", "diffusion sampler: euler_a (Euler ancestral) or ddim")
    strength: float = _setting(1.0, "1: sample from pure noise (AutoDIR); below 1: start from the input's latent "
                                    "noised to this fraction of the schedule and run that fraction of --steps (SDEdit)")
    guidance_text: float = _setting(1.0, "text guidance scale (1: plain conditional)")
    guidance_image: float = _setting(1.0, "image guidance scale (1: plain conditional)")


@dataclass
class TileSettings:
    """Tiles for images larger than `tile` pixels on a side (LDM, SCM and restorer)."""

    tile: int = _setting(512, "images larger than this go through the nets tile by tile")
    overlap: int = _setting(64, "tile overlap in pixels")


@dataclass
class LoopSettings:
    """The automatic loop's limits."""

    max_passes: int = _setting(7, "automatic loop: passes at most")
    scm_every_pass: bool = _setting(False, "automatic loop: run the SCM after a low-resolution pass too "
                                           "(AutoDIR skips it there)")


@dataclass
class RunSettings:
    """Where the networks run, and the seed each image starts from."""

    device: str = _setting("auto", "auto (CUDA when available), cpu, cuda, cuda:1, ...")
    threads: int = _setting(0, "CPU threads; 0: one per core this process may use")
    seed: int = _setting(0, "sampling seed (each image starts from it)")


def check_settings(sampling: SamplerSettings, tiles: TileSettings, loop: LoopSettings) -> None:
    """The values a command line may get wrong; ValueError with one line naming the flag."""
    if sampling.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampling.sampler!r} is not allowed; choose one of {', '.join(SAMPLERS)}")
    if sampling.steps <= 0:
        raise ValueError(f"--steps {sampling.steps} must be > 0")
    if not 0.0 < sampling.strength <= 1.0:
        raise ValueError(f"--strength {sampling.strength} must be in (0, 1]")
    if tiles.tile <= 0 or not 0 <= tiles.overlap < tiles.tile:
        raise ValueError(f"--tile {tiles.tile} / --overlap {tiles.overlap}: need tile > 0 and 0 <= overlap < tile")
    if loop.max_passes < 1:
        raise ValueError(f"--max-passes {loop.max_passes} must be >= 1")
