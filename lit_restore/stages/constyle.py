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

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_restore.checkpointing import WeightsError, read_weights, tensors_under_prefix
from lit_restore.config import ConStyleNetConfig, RunConfig
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.models.constyle import (
    ConStyleEncoder,
    MoCo,
    Style,
    check_queue_divisible,
    content_loss,
    info_nce,
    style_loss,
)
from lit_restore.stages.base import Stage

# Where a ConStyle encoder's weights sit in the files we accept: the constyle stage's own EMA,
# its query encoder, an exported `encoder` module, a restorer's (EMA, checkpoint, export) encoder,
# or a bare encoder state dict.
_ENCODER_PREFIXES = ("ema.module.", "moco.encoder_q.", "encoder.", "ema.module.encoder.", "net.encoder.",
                     "restorer.encoder.", "")


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """Load a ConStyle encoder from `path` (a constyle or restorer .ckpt, exported folder or model.safetensors);
    the classifier head, if the file has one, is ignored."""
    try:
        state = read_weights(path)
    except WeightsError as e:
        raise WeightsError(f"ConStyle weights: {e} (give a constyle .ckpt, exported folder or model.safetensors)") from None
    wanted = {k for k in encoder.state_dict() if not k.startswith("classifier.")}
    sub = tensors_under_prefix(state, wanted, _ENCODER_PREFIXES)
    if sub is None:
        raise WeightsError(f"{path}: no ConStyle encoder weights found (looked for keys under {', '.join(repr(p) for p in _ENCODER_PREFIXES)})")
    try:
        encoder.load_state_dict(sub, strict=not any(k.startswith("classifier.") for k in encoder.state_dict()))
    except RuntimeError as e:
        raise WeightsError(f"{path}: ConStyle encoder shapes differ from model.constyle "
                           f"(base_channels/dim): {str(e).splitlines()[-1].strip()}") from None


def build_encoder(m: ConStyleNetConfig) -> ConStyleEncoder:
    num_classes = len(DEGRADATION_TYPES) if m.cls_weight > 0 else 0
    return ConStyleEncoder(base=m.base_channels, dim=m.dim, num_classes=num_classes)


def build_moco(m: ConStyleNetConfig, encoder: ConStyleEncoder) -> MoCo:
    return MoCo(encoder, queue_size=m.queue_size, momentum=m.momentum, normalize=m.l2_normalize)


def world_size(stage: L.LightningModule) -> int:
    return stage.trainer.world_size if stage._trainer is not None else 1


def constyle_losses(stage: L.LightningModule, moco: MoCo, q: Style, gt: Tensor, m: ConStyleNetConfig,
                    queue_key: str = "model.queue_size") -> tuple[dict[str, Tensor], Tensor]:
    """InfoNCE, content and style losses for a batch whose query `q` is already computed, then
    the enqueue. Returns (unweighted losses, contrastive top-1 accuracy)."""
    b = gt.shape[0]
    world = world_size(stage)
    check_queue_divisible(moco.queue.shape[0], b, world, queue_key)
    # Momentum update before the key forward (MoCo): the key encoder sees this step's weights.
    moco.momentum_update()
    with torch.no_grad():
        k = moco.encoder_k(gt)
    zq, zk = moco.code(q.z2), moco.code(k.z2)
    # Copies: the queue is overwritten below, before backward reads the logits' inputs.
    negatives = moco.queue.clone()
    # Style negatives: this rank's share of the block about to be overwritten (the oldest codes)
    # and of the block after it, so each rank's Gram matrix is B x B as in the single-GPU code.
    n_cur = moco.queue_rows(stage.global_rank * b, b)
    n_next = moco.queue_rows((world + stage.global_rank) * b, b)
    nce, acc = info_nce(zq, zk, negatives, m.temperature)
    style = style_loss(moco.code(q.z1), zq, n_cur, n_next)
    losses = {
        "contrastive": nce,
        "content": content_loss(zq, zk),
        "style": -style if m.style_objective == "maximize" else style,
    }
    stored = (zq if m.enqueue == "query" else zk).detach()
    if world > 1:
        # (world, B, dim) in rank order → one block, identical on every rank.
        stored = stage.all_gather(stored).reshape(-1, stored.shape[1])
    moco.enqueue(stored)
    return losses, acc


def weighted_total(losses: dict[str, Tensor], m: ConStyleNetConfig) -> Tensor:
    weights = {"contrastive": m.contrastive_weight, "content": m.content_weight, "style": m.style_weight,
               "cls": m.cls_weight}
    return sum(weights[name] * value for name, value in losses.items())


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
        if m.sync_batchnorm and world_size(self) > 1 and self.trainer.strategy.root_device.type == "cuda":
            moco = nn.SyncBatchNorm.convert_sync_batchnorm(moco)  # torch's DDP allows it on GPUs only
        self.moco = moco

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
        losses, acc = constyle_losses(self, self.moco, q, batch["gt"], m)
        if q.logits is not None:
            losses["cls"] = F.cross_entropy(q.logits, batch["label"])
            self.log("train/cls_acc", (q.logits.argmax(1) == batch["label"]).float().mean())
        loss = weighted_total(losses, m)
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
