"""`lit-restore fit`: setup → trainer → fit, for any stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint

from lit_restore.config import RunConfig, to_yaml
from lit_restore.stages.base import Stage


def build_stage(cfg: RunConfig) -> Stage:
    """The stage's LightningModule. An explicit chain: each stage is one file in lit_restore/stages."""
    if cfg.stage == "biqa":
        from lit_restore.stages.biqa import BIQAStage

        return BIQAStage(cfg)
    if cfg.stage == "constyle":
        from lit_restore.stages.constyle import ConStyleStage

        return ConStyleStage(cfg)
    if cfg.stage == "restorer":
        from lit_restore.stages.restorer import RestorerStage

        return RestorerStage(cfg)
    if cfg.stage == "ldm":
        from lit_restore.stages.ldm import LDMStage

        return LDMStage(cfg)
    if cfg.stage == "scm":
        from lit_restore.stages.scm import SCMStage

        return SCMStage(cfg)
    raise ValueError(f"unknown stage {cfg.stage!r}")


def build_loggers(cfg: RunConfig) -> list[Any] | bool:
    out = Path(cfg.out_dir)
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(save_dir=out, name="logs", version="")]
    from lightning.pytorch.loggers import WandbLogger

    w = cfg.wandb
    return [WandbLogger(project=w.project, entity=w.entity, tags=list(w.tags), name=w.name, save_dir=str(out))]


def build_callbacks(cfg: RunConfig, stage: Stage) -> list[L.Callback]:
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=Path(cfg.out_dir) / "checkpoints", save_last=True, save_top_k=-1,
                        every_n_train_steps=int(cfg.trainer.get("val_check_interval", 500)) or None,
                        filename="step{step:07d}", auto_insert_metric_name=False),
    ]
    if cfg.logger != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.optim.ema_decay > 0 and not stage.manages_own_ema:
        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    return callbacks


def trainer_kwargs(cfg: RunConfig) -> dict[str, Any]:
    kwargs = dict(cfg.trainer)
    # Streaming loaders have virtual epochs: validation runs every N steps, not per epoch.
    if isinstance(kwargs.get("val_check_interval"), int):
        kwargs.setdefault("check_val_every_n_epoch", None)
    kwargs.setdefault("max_epochs", -1)
    return kwargs


def build_datamodule(cfg: RunConfig):
    from lit_restore.data.datamodule import ShardDataModule

    return ShardDataModule(cfg.data, seed=cfg.seed)


def write_run_config(cfg: RunConfig) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.yaml.{os.getpid()}"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out / "config.yaml")


def fit(cfg: RunConfig) -> L.Trainer:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_run_config(cfg)
    stage = build_stage(cfg)
    trainer = L.Trainer(
        default_root_dir=cfg.out_dir,
        logger=build_loggers(cfg),
        callbacks=build_callbacks(cfg, stage),
        **trainer_kwargs(cfg),
    )
    trainer.fit(stage, datamodule=build_datamodule(cfg))
    return trainer
