"""A tiny module and datamodule for the run machinery tests (resume, faults, strategies, SLURM).

Its inputs are drawn from a generator seeded by (seed, rank, samples seen so far), so the data a
step sees does not depend on the loader's position: an interrupted and resumed run must then end
with exactly the weights of an uninterrupted one if model, optimizer, scheduler, buffers, step
and RNG are all restored. Dropout draws from the global RNG, so a lost RNG state shows up.

Run as a script (`python tests/_probe.py key=value ...`) it trains through `lit_restore.fit.fit`,
which lets Lightning start extra ranks by re-running the script.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import partial

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lit_restore.config import RunConfig, load_config, to_dict


def probe_config(out_dir, *overrides: str) -> RunConfig:
    """A run config for the probe: csv logger, CPU, no validation."""
    base = [
        "stage=restorer", "model.constyle_mode=joint", f"out_dir={out_dir}", "logger=csv", "seed=7",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=12",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "checkpoint.every_n_steps=4",
    ]
    return load_config(None, base + list(overrides))


class Steps(IterableDataset):
    """Endless placeholder items; the probe makes its inputs itself."""

    def __iter__(self):
        while True:
            yield torch.zeros(1)


class ProbeData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.restarts: list[int] = []

    def set_restart(self, n: int) -> None:
        self.restarts.append(n)

    def train_dataloader(self):
        return DataLoader(Steps(), batch_size=None)


class Probe(L.LightningModule):
    manages_own_ema = False

    def __init__(self, cfg: RunConfig, nan_steps: tuple[int, ...] = (), sleep: float = 0.0,
                 signal_at: int | None = None, signum: int = signal.SIGUSR1, fused: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg)})
        self.nan_steps = set(nan_steps)
        self.sleep = sleep
        self.signal_at = signal_at  # send ourselves `signum` (SIGUSR1: a local "preemption") after this step
        self.signum = signum
        self.fused = fused  # fused AdamW: the NaN guard skips steps on the device
        self.net: nn.Module | None = None
        # A MoCo-like queue and pointer: buffers that must come back on resume.
        self.register_buffer("queue", torch.zeros(4, 8))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(self.cfg.seed)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.global_rank * 1009 + int(self.seen))
        x = torch.randn(16, 8, generator=g)
        return x, x.sum(dim=1, keepdim=True).sin()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.sleep:
            time.sleep(self.sleep)
        x, y = self.batch()
        loss = nn.functional.mse_loss(self.net(x) + 1e-3 * self.queue.mean(), y)
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        self.queue[int(self.seen) % 4] = x[0]
        self.seen += 1
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.signal_at is not None and self.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_decay, total=self.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _decay(step: int, total: int) -> float:
    return 1.0 - 0.9 * step / max(total, 1)


def main(argv: list[str]) -> int:
    """`python tests/_probe.py OUT_DIR [key=value ...] [--sleep S] [--nan 3,4]`."""
    from lit_restore.fit import fit

    torch.set_num_threads(1)
    sleep = float(os.environ.get("PROBE_SLEEP", "0"))
    nan = tuple(int(s) for s in os.environ.get("PROBE_NAN", "").split(",") if s)
    cfg = probe_config(argv[0], *argv[1:])
    trainer = fit(cfg, stage=Probe(cfg, nan_steps=nan, sleep=sleep), datamodule=ProbeData())
    print(f"PROBE_DONE step={trainer.global_step} rank={trainer.global_rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
