"""`degrade:`: the Degrader's mode, types and each op's parameter ranges, with their bounds."""

from __future__ import annotations

from dataclasses import dataclass, field


from lit_restore.config.base import ConfigError, choice

@dataclass
class NoiseOpConfig:
    """Sensor noise: Gaussian (colour or gray) or Poisson, one normal draw per pixel."""

    prob: float = 0.3  # inclusion probability in mode=mixed; relative weight in mode=single
    sigma: list[float] = field(default_factory=lambda: [15.0, 50.0])  # Gaussian σ in 8-bit levels (MiOIR)
    gray_prob: float = 0.4  # same noise on every channel (Real-ESRGAN 0.4; MiOIR 0)
    poisson_prob: float = 0.3  # Poisson noise instead of Gaussian (Real-ESRGAN 0.5)
    poisson_scale: list[float] = field(default_factory=lambda: [0.05, 3.0])  # Real-ESRGAN


@dataclass
class BlurOpConfig:
    """Gaussian (isotropic or rotated anisotropic) or motion blur, one kernel per sample."""

    prob: float = 0.3
    kernel_size: list[int] = field(default_factory=lambda: [7, 21])  # odd support of Gaussian kernels (MiOIR)
    sigma: list[float] = field(default_factory=lambda: [1.0, 3.0])  # Gaussian σ in pixels (MiOIR)
    aniso_prob: float = 0.3  # σx, σy drawn separately, kernel rotated by `angle`
    angle: list[float] = field(default_factory=lambda: [0.0, 180.0])  # degrees
    motion_prob: float = 0.2  # a straight motion streak instead of a Gaussian
    motion_length: list[float] = field(default_factory=lambda: [5.0, 21.0])  # pixels


@dataclass
class JpegOpConfig:
    """JPEG compression (IJG quality scaling of the standard tables, 4:2:0 chroma)."""

    prob: float = 0.3
    quality: list[float] = field(default_factory=lambda: [30.0, 70.0])  # MiOIR in-distribution


@dataclass
class LowresOpConfig:
    """Down by `scale`, then back up to the input size (scale-1 restoration, as MiOIR)."""

    prob: float = 0.3
    scale: list[float] = field(default_factory=lambda: [2.0, 4.0])  # MiOIR: fixed 4
    # Down-sampling filters, one drawn per sample (Real-ESRGAN draws from area/bilinear/bicubic).
    modes: list[str] = field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    up_mode: str = choice("bicubic", ("nearest", "area", "bilinear", "bicubic"), "filter back to the input size")


@dataclass
class HazeOpConfig:
    """Atmospheric scattering I = J·t + A(1−t), t = exp(−β·depth), depth in [0, 1]."""

    prob: float = 0.3
    beta: list[float] = field(default_factory=lambda: [0.5, 2.5])  # MiOIR in-distribution
    airlight: list[float] = field(default_factory=lambda: [0.8, 1.0])  # A (MiOIR)


@dataclass
class RainOpConfig:
    """Rain streaks: sparse seeds smeared by a rotated line kernel, added and clipped (MiOIR)."""

    prob: float = 0.3
    amount: list[float] = field(default_factory=lambda: [50.0, 99.0])  # MiOIR "value": seeds = amount/25600 of pixels
    length: list[float] = field(default_factory=lambda: [20.0, 40.0])  # streak length in pixels
    angle: list[float] = field(default_factory=lambda: [-45.0, 45.0])  # degrees from vertical
    width: list[float] = field(default_factory=lambda: [3.0, 11.0])  # Gaussian kernel size across the streak
    # MiOIR's add_rain geometry: a 3×3 smear of the seeds and a streak that is the length×length
    # window's diagonal scaled by 1 − length/100 and rotated (clipped by the window); false: a
    # plain line of `length` pixels.
    mioir_geometry: bool = True


@dataclass
class LowlightOpConfig:
    """Under-exposure: gain·x^γ, with optional read noise added in linear light."""

    prob: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [1.0, 3.0])  # MiOIR "dark"
    gain: list[float] = field(default_factory=lambda: [1.0, 1.0])  # linear dimming (PromptGIP 0.3-0.4)
    noise_sigma: list[float] = field(default_factory=lambda: [0.0, 0.0])  # linear-light σ in 8-bit levels


@dataclass
class DegradeConfig:
    """On-device degradation synthesis (see lit_restore/data/degrade and configs/degrade/)."""

    # single: one op per degraded sample (chosen with weights `<op>.prob`); mixed: the `types`
    # chain, each op included per sample with probability `<op>.prob` (a sample that draws none
    # gets one); task: the fixed task `task` of the suite.
    mode: str = choice("mixed", ("single", "mixed", "task"), "one type per sample, a chain, or a fixed task")
    # Ops in use, in the order the chain applies them (haze and rain happen in the scene, before
    # the camera's exposure, optics, sampling, sensor noise and compression).
    types: list[str] = field(default_factory=lambda: ["haze", "rain", "lowlight", "blur", "lowres", "noise", "jpeg"])
    clean_fraction: float = 0.0  # fraction of samples left clean (label "no")
    task: str = ""  # task name from the suite when mode=task
    suite: str = ""  # suite YAML for mode=task; "" = configs/gir_suite.yaml
    quantize: bool = True  # round to 8 bits after each op, as MiOIR/BasicSR
    # torch.compile the Degrader in training (fewer kernel launches on a GPU; the first batches
    # pay the compile time). Off by default: the eager chain already reads nothing on the host.
    compile: bool = False
    noise: NoiseOpConfig = field(default_factory=NoiseOpConfig)
    blur: BlurOpConfig = field(default_factory=BlurOpConfig)
    jpeg: JpegOpConfig = field(default_factory=JpegOpConfig)
    lowres: LowresOpConfig = field(default_factory=LowresOpConfig)
    haze: HazeOpConfig = field(default_factory=HazeOpConfig)
    rain: RainOpConfig = field(default_factory=RainOpConfig)
    lowlight: LowlightOpConfig = field(default_factory=LowlightOpConfig)


# Allowed values of the degradation parameters: (low, high) bounds of every range or number.
DEGRADE_BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "noise": {"sigma": (0, 255), "gray_prob": (0, 1), "poisson_prob": (0, 1), "poisson_scale": (0, 10)},
    "blur": {"kernel_size": (3, 63), "sigma": (0.1, 20), "aniso_prob": (0, 1), "angle": (-360, 360),
             "motion_prob": (0, 1), "motion_length": (1, 63)},
    "jpeg": {"quality": (1, 100)},
    "lowres": {"scale": (1, 16)},
    "haze": {"beta": (0, 10), "airlight": (0, 1)},
    "rain": {"amount": (0, 2000), "length": (1, 63), "angle": (-90, 90), "width": (1, 21)},
    "lowlight": {"gamma": (0.1, 10), "gain": (0, 1), "noise_sigma": (0, 255)},
}
RESIZE_MODES = ("nearest", "area", "bilinear", "bicubic")


def check_degrade(cfg: DegradeConfig, path: str = "degrade") -> None:
    """Value checks of a DegradeConfig; raises ConfigError naming the key path."""
    from lit_restore.data.degrade.types import SYNTHETIC_TYPES

    if not cfg.types:
        raise ConfigError(f"{path}.types: empty; give at least one of {', '.join(SYNTHETIC_TYPES)}")
    for i, name in enumerate(cfg.types):
        if name not in SYNTHETIC_TYPES:
            raise ConfigError(f"{path}.types[{i}]: {name!r} is not a synthetic type; choose from {', '.join(SYNTHETIC_TYPES)}")
    if len(set(cfg.types)) != len(cfg.types):
        raise ConfigError(f"{path}.types: {list(cfg.types)} lists a type twice")
    if not 0.0 <= cfg.clean_fraction < 1.0:
        raise ConfigError(f"{path}.clean_fraction: {cfg.clean_fraction} must be in [0, 1)")
    if cfg.mode == "task" and not cfg.task:
        raise ConfigError(f"{path}.task: missing; mode=task needs a task name (lit-restore degrade --list-tasks)")
    if cfg.mode != "task" and all(getattr(cfg, name).prob == 0 for name in cfg.types):
        raise ConfigError(f"{path}: every op in types has prob 0; nothing could be synthesised")
    for op, bounds in DEGRADE_BOUNDS.items():
        op_cfg = getattr(cfg, op)
        key = f"{path}.{op}"
        if not 0.0 <= op_cfg.prob <= 1.0:
            raise ConfigError(f"{key}.prob: {op_cfg.prob} must be in [0, 1]")
        for name, (low, high) in bounds.items():
            value = getattr(op_cfg, name)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if isinstance(value, (list, tuple)) and (len(values) != 2 or values[0] > values[1]):
                raise ConfigError(f"{key}.{name}: {values} must be [low, high] with low <= high")
            if any(not low <= v <= high for v in values):
                raise ConfigError(f"{key}.{name}: {value} must lie in [{low}, {high}]")
    if any(k % 2 == 0 for k in cfg.blur.kernel_size):
        raise ConfigError(f"{path}.blur.kernel_size: {list(cfg.blur.kernel_size)} must be odd")
    for i, mode in enumerate(cfg.lowres.modes):
        if mode not in RESIZE_MODES:
            raise ConfigError(f"{path}.lowres.modes[{i}]: {mode!r} is not allowed; choose one of {', '.join(RESIZE_MODES)}")
    if cfg.lowres.up_mode not in RESIZE_MODES:
        raise ConfigError(f"{path}.lowres.up_mode: {cfg.lowres.up_mode!r} is not allowed; choose one of {', '.join(RESIZE_MODES)}")
    if not cfg.lowres.modes:
        raise ConfigError(f"{path}.lowres.modes: empty; give at least one of {', '.join(RESIZE_MODES)}")
