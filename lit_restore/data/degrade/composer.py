"""`Degrader`: draws per-sample degradation parameters and applies the op chain to a batch.

Every op runs on the whole batch and a per-sample mask picks its output (`torch.where`), so no
decision reads tensor values on the host, and each forward consumes the generator identically
whatever was drawn: the same seed and input give the same output on the same device.

Dominance rule (`label`): each applied op gets a severity, normalised so that ≈1 is the top of
MiOIR's in-distribution range (noise σ 50, blur σ 3, JPEG q 30, ×4 down-sampling, haze β 2.5,
rain value 99, γ 3); the label is the applied type with the highest severity (ties: the earlier
type in DEGRADATION_TYPES) and "no" (index 0) when nothing was applied.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from lit_restore.config import DegradeConfig, check_degrade
from lit_restore.data.degrade import ops
from lit_restore.data.degrade.kernels import RADIANS_PER_DEGREE, gaussian_kernels, line_kernels
from lit_restore.data.degrade.suite import Task, find_task, load_suite, task_config
from lit_restore.data.degrade.types import DEGRADATION_TYPES, type_index


def _odd_ceil(v: float) -> int:
    return 2 * math.ceil((v - 1) / 2) + 1


class _Draw:
    """Uniform and Bernoulli draws of (B,) tensors on one device from one generator."""

    def __init__(self, b: int, generator: Optional[torch.Generator], device: torch.device) -> None:
        self.b, self.generator, self.device = b, generator, device

    def rand(self, *shape: int) -> Tensor:
        return torch.rand((self.b, *shape), generator=self.generator, device=self.device)

    def uniform(self, bounds: list[float]) -> Tensor:
        lo, hi = float(bounds[0]), float(bounds[1])
        return lo + (hi - lo) * self.rand()

    def bernoulli(self, p: float) -> Tensor:
        return self.rand() < p

    def odd(self, bounds: list[int]) -> Tensor:
        """Odd integers spread evenly over [low, high] (both odd)."""
        lo, hi = int(bounds[0]), int(bounds[1])
        count = (hi - lo) // 2 + 1
        return lo + 2 * torch.floor(self.rand() * count).clamp(max=count - 1)

    def choice(self, count: int) -> Tensor:
        return torch.floor(self.rand() * count).clamp(max=count - 1)


class Degrader(nn.Module):
    """Synthesises degraded twins of clean batches on their device; see the module docstring.

    `forward(gt, generator=None, depth=None, has_depth=None) -> (lq, label, types, params)`:
    gt (B, 3, H, W) float in [0, 1]; depth (B, 1, H, W) float or uint8 (uint8 is /255; larger is
    farther; each map is divided by its maximum), used for haze where `has_depth` (B,) is true
    (all rows when it is None) and a smooth synthetic depth elsewhere. Returns lq float32
    (B, 3, H, W) in [0, 1], label long (B,) the dominant type, types bool (B, len(DEGRADATION_TYPES))
    every type applied, and params: "<op>.<name>" → (B,) float drawn values, NaN where the op
    was not applied.
    """

    def __init__(self, cfg: DegradeConfig, task: Optional[Task] = None) -> None:
        super().__init__()
        check_degrade(cfg)
        if cfg.mode == "task":  # `task` given: that Task; otherwise `cfg.task` looked up in the suite
            task = task if task is not None else find_task(load_suite(cfg.suite or None), cfg.task)
            cfg = task_config(task)
        self.cfg = cfg
        self.chain: tuple[str, ...] = tuple(cfg.types)

    @classmethod
    def for_task(cls, name: str, suite_path: Optional[str] = None) -> "Degrader":
        """A task-mode Degrader applying the fixed parameters of suite task `name`."""
        return cls(DegradeConfig(mode="task", task=name, suite=suite_path or ""))

    def extra_repr(self) -> str:
        return f"mode={self.cfg.mode}, chain={'→'.join(self.chain)}"

    # ------------------------------------------------------------------ which ops run

    def _applied(self, draw: _Draw) -> Tensor:
        """(B, len(chain)) bool: which op each sample gets."""
        n = len(self.chain)
        probs = [float(getattr(self.cfg, op).prob) for op in self.chain]
        u, pick_u, clean_u = draw.rand(n), draw.rand(n), draw.rand()
        if self.cfg.mode == "task":
            return torch.ones_like(u, dtype=torch.bool)
        # Weighted choice of one op per sample (Efraimidis-Spirakis keys u^(1/w)); weight 0 never
        # wins. Columns are built from Python floats: no host→device copy inside a batch.
        log_u = pick_u.clamp_min(1e-12).log()
        keys = torch.stack([log_u[:, j] / p if p > 0 else torch.full_like(log_u[:, j], -math.inf)
                            for j, p in enumerate(probs)], dim=1)
        one = keys.argmax(dim=1, keepdim=True) == torch.arange(n, device=keys.device)  # one_hot reads max on a CPU
        if self.cfg.mode == "single":
            applied = one
        else:  # mixed: each op with its probability; a sample that drew none gets one
            applied = torch.stack([u[:, j] < p for j, p in enumerate(probs)], dim=1)
            applied = torch.where(applied.any(dim=1, keepdim=True), applied, one)
        return applied & (clean_u >= self.cfg.clean_fraction)[:, None]

    # ------------------------------------------------------------------ the ops

    def _depth(self, x: Tensor, draw: _Draw, depth: Optional[Tensor], has_depth: Optional[Tensor]) -> Tensor:
        b, _, h, w = x.shape
        prior = ops.depth_prior(b, h, w, draw.generator, x.device)
        if depth is None:
            return prior
        real = depth.float() / 255 if depth.dtype == torch.uint8 else depth.float()
        real = real / real.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        if has_depth is None:
            return real
        return torch.where(has_depth.to(torch.bool).view(-1, 1, 1, 1), real, prior)

    def _op(self, name: str, x: Tensor, draw: _Draw, depth: Optional[Tensor],
            has_depth: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Apply op `name` to every sample: (output, drawn params, severity), each per sample."""
        c = self.cfg
        if name == "noise":
            sigma, scale = draw.uniform(c.noise.sigma), draw.uniform(c.noise.poisson_scale)
            poisson, gray = draw.bernoulli(c.noise.poisson_prob), draw.bernoulli(c.noise.gray_prob)
            sigma, scale = torch.where(poisson, 0.0, sigma), torch.where(poisson, scale, 0.0)
            y = ops.noise(x, sigma, scale, gray, draw.generator)
            # σ in levels a Poisson scale gives at mid-grey: 255·scale·sqrt(0.5/256).
            severity = torch.sqrt(sigma**2 + (scale * 255 * math.sqrt(0.5 / 256)) ** 2) / 50
            return y, {"sigma": sigma, "poisson_scale": scale, "gray": gray.float()}, severity
        if name == "blur":
            b = c.blur
            ksize = draw.odd(b.kernel_size)
            sigma_x = draw.uniform(b.sigma)
            sigma_y = torch.where(draw.bernoulli(b.aniso_prob), draw.uniform(b.sigma), sigma_x)
            angle = draw.uniform(b.angle)
            motion, length = draw.bernoulli(b.motion_prob), draw.uniform(b.motion_length)
            size = int(b.kernel_size[1])
            if b.motion_prob > 0:
                size = max(size, _odd_ceil(b.motion_length[1]))
            kernels = gaussian_kernels(sigma_x, sigma_y, angle * RADIANS_PER_DEGREE, ksize, size)
            if b.motion_prob > 0:
                streak = line_kernels(length, angle * RADIANS_PER_DEGREE, torch.full_like(length, 0.5), size)
                kernels = torch.where(motion.view(-1, 1, 1), streak, kernels)
            # A streak of length L has the spread of a Gaussian of σ = L/√12 along it.
            severity = torch.where(motion, length / math.sqrt(12), torch.sqrt(sigma_x * sigma_y)) / 3
            params = {"sigma_x": sigma_x, "sigma_y": sigma_y, "angle": angle, "kernel_size": ksize,
                      "motion": motion.float(), "motion_length": torch.where(motion, length, math.nan)}
            return ops.blur(x, kernels), params, severity
        if name == "jpeg":
            quality = draw.uniform(c.jpeg.quality).round()
            return ops.jpeg(x, quality), {"quality": quality}, (100 - quality) / 70
        if name == "lowres":
            r = c.lowres
            scale, mode = draw.uniform(r.scale), draw.choice(len(r.modes))
            y = ops.lowres(x, scale, mode, tuple(r.modes), r.up_mode, float(r.scale[0]))
            return y, {"scale": scale, "mode": mode}, torch.log2(scale) / 2
        if name == "haze":
            beta, airlight = draw.uniform(c.haze.beta), draw.uniform(c.haze.airlight)
            y = ops.haze(x, self._depth(x, draw, depth, has_depth), beta, airlight)
            return y, {"beta": beta, "airlight": airlight}, beta / 2.5
        if name == "rain":
            r = c.rain
            amount, length = draw.uniform(r.amount), draw.uniform(r.length)
            angle, width = draw.uniform(r.angle), draw.uniform(r.width)
            # MiOIR's rotated diagonal can be up to √2 times `length`.
            size = _odd_ceil(r.length[1] * (math.sqrt(2) if r.mioir_geometry else 1)) + 2
            y = ops.rain(x, amount, length, angle * RADIANS_PER_DEGREE, width, size, draw.generator, r.mioir_geometry)
            return y, {"amount": amount, "length": length, "angle": angle, "width": width}, amount / 99
        if name == "lowlight":
            l = c.lowlight
            gamma, gain, sigma = draw.uniform(l.gamma), draw.uniform(l.gain), draw.uniform(l.noise_sigma)
            y = ops.low_light(x, gamma, gain, sigma if l.noise_sigma[1] > 0 else None, draw.generator)
            # How much mid-grey darkens, ≈1 at γ 3 (0.5 → 0.125).
            severity = (1 - gain * 0.5 ** (gamma - 1)) / 0.75
            return y, {"gamma": gamma, "gain": gain, "noise_sigma": sigma}, severity
        raise ValueError(f"unknown degradation op {name!r}")

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, gt: Tensor, generator: Optional[torch.Generator] = None, depth: Optional[Tensor] = None,
                has_depth: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        if gt.ndim != 4 or gt.shape[1] != 3:
            raise ValueError(f"Degrader expects gt of shape (B, 3, H, W), got {tuple(gt.shape)}")
        if generator is not None and generator.device.type != gt.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {gt.device}")
        device, b = gt.device, gt.shape[0]
        draw = _Draw(b, generator, device)
        with torch.autocast(device_type=device.type, enabled=False):  # blur/JPEG drift in half precision
            x = gt.float().clone()  # updated in place below; the caller's batch is left alone
            applied = self._applied(draw)
            severity = torch.full((b, len(DEGRADATION_TYPES)), -1.0, device=device)
            types = torch.zeros(b, len(DEGRADATION_TYPES), dtype=torch.bool, device=device)
            params: dict[str, Tensor] = {}
            for j, name in enumerate(self.chain):
                on = applied[:, j]
                y, drawn, sev = self._op(name, x, draw, depth, has_depth)
                if self.cfg.quantize:
                    y = ops.quantize_(y)
                # x ← y where the op applies. lerp with weights 0/1 is exact (x + 0·(y − x) and
                # y − (y − x)·0) and ~2.5× faster than torch.where on a CPU; the ops give finite values.
                x.lerp_(y, on.view(-1, 1, 1, 1).float())
                col = type_index(name)
                types[:, col] = on
                severity[:, col] = torch.where(on, sev, -1.0)
                for key, value in drawn.items():
                    params[f"{name}.{key}"] = torch.where(on, value.float(), math.nan)
            label = torch.where(types.any(dim=1), severity.argmax(dim=1), 0)
            return x.clamp_(0, 1), label, types, params

