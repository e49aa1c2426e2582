"""ConStyle pretraining: the encoder learns a degradation-aware code from (lq, gt) pairs.

MoCo-style: query = encoder_q(lq), positive key = encoder_k(gt) (pixel-aligned clean view),
negatives = a queue of past codes; plus ConStyle's content and style losses and an optional
degradation-type classifier. The queue is filled with codes all-gathered from every rank, so
every replica writes the same block at the same pointer and the queues stay identical.

Multi-device notes:
- `model.sync_batchnorm` converts the projection head's BatchNorm1d to SyncBatchNorm when the
  trainer has more than one GPU (so would `trainer.sync_batchnorm: true`, for every stage);
  per-device batches of 8-16 give noisy BN statistics and let the key encoder's BN leak batch
  identity. torch's DDP refuses SyncBatchNorm on CPU, so CPU runs keep per-rank statistics.
- DDP's default `broadcast_buffers=True` re-sends rank 0's queue (queue_size x dim floats) every
  step. The queues are identical anyway; a `DDPStrategy(broadcast_buffers=False)` saves that.
- The key encoder has requires_grad=False and is not in the optimizer; DDP ignores it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lit_restore.config import RunConfig
from lit_restore.losses import constyle_losses, constyle_total, info_nce
from lit_restore.models.constyle import MoCo, build_encoder, build_moco, check_queue_divisible, load_encoder_weights
from lit_restore.stages.base import Stage


class ConStyleStage(Stage):
    """MoCo pretraining of the ConStyle encoder on synthetic (lq, gt) pairs."""

    # The EMA (optim.ema_decay) covers encoder_q only: averaging the whole module would average
    # the queue and reset its integer pointer (Lightning's EMA callback averages every buffer).
    manages_own_ema = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.moco: MoCo | None = None

    def configure_model(self) -> None:
        if self.moco is not None:
            return
        m = self.cfg.model
        moco = build_moco(m, build_encoder(m))
        self.track_ema(moco.encoder_q)
        self.moco = self.sync_batchnorm(moco, m.sync_batchnorm)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        m = self.cfg.model
        check_queue_divisible(m.queue_size, self.cfg.data.batch_size, self.trainer.world_size)
        if m.pretrained:
            # Here, not in configure_model: a resumed run's checkpoint overwrites what is loaded here.
            self.configure_model()
            load_encoder_weights(self.moco.encoder_q, m.pretrained)
            self.moco.encoder_k.load_state_dict(self.moco.encoder_q.state_dict())
            if self.ema is not None:
                self.ema.module.load_state_dict(self.moco.encoder_q.state_dict())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        m = self.cfg.model
        q = self.moco.encoder_q(batch["lq"])
        losses, acc = constyle_losses(self.moco, q, batch["gt"], m, *self.ranks, gather=self.all_gather)
        if q.logits is not None:
            losses["cls"] = F.cross_entropy(q.logits, batch["label"])
            self.log("train/cls_acc", (q.logits.argmax(1) == batch["label"]).float().mean())
        loss = constyle_total(losses, m)
        self.log_train_loss(loss)
        self.log("train/contrastive_acc", acc)
        for name, value in losses.items():
            self.log(f"train/{name}", value)
        return loss

    def ema_source(self) -> nn.Module:
        return self.moco.encoder_q

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        valid = batch["valid"]  # padding rows of a short last batch are left out
        if not bool(valid.any()):
            return
        encoder = self.export_modules()["encoder"]
        q = encoder(batch["lq"][valid])
        k = self.moco.encoder_k(batch["gt"][valid])
        zq, zk = self.moco.code(q.z2), self.moco.code(k.z2)
        nce, acc = info_nce(zq, zk, self.moco.queue, self.cfg.model.temperature)
        n = int(valid.sum())
        self.log("val/contrastive", nce, sync_dist=True, batch_size=n)
        self.log("val/contrastive_acc", acc, sync_dist=True, batch_size=n)
        # How close the degraded image's code is to its clean image's code.
        self.log("val/pos_cosine", F.cosine_similarity(q.z2, k.z2).mean(), sync_dist=True, batch_size=n)
        if q.logits is not None:
            cls_acc = (q.logits.argmax(1) == batch["label"][valid]).float().mean()
            self.log("val/cls_acc", cls_acc, sync_dist=True, batch_size=n)
        if batch_idx == 0:
            self.log_image_grid("val/pairs", [batch["lq"], batch["gt"]])

    def export_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.averaged(self.moco.encoder_q)}
