"""BIQA: fine-tune a CLIP image tower so that the prompt "A photo needs {d} artifact reduction"
of the image's degradation d scores highest (AutoDIR stage 1). The text tower stays frozen.

Every batch scores the degraded images against their labels and, with `gt_as_no`, the clean GT
images against "no". The GT term (weight `gt_weight`) pushes down the probability that a clean
GT gets its degraded twin's label: the same content must get different answers, so the image
features follow the degradation rather than the scene.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from lit_restore.config import RunConfig
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.models.clip import PromptCLIP, create_clip
from lit_restore.stages.base import Stage


def fidelity_loss(probs: Tensor, target: Tensor) -> Tensor:
    """Per-sample multi-class fidelity loss (LIQE/AutoDIR) with one-hot targets: 1 − √p_target."""
    return 1.0 - (probs.gather(1, target[:, None]).squeeze(1) + 1e-8).sqrt()


def gt_term(probs: Tensor, twin_label: Tensor, loss: str) -> Tensor:
    """Per-sample penalty on the clean GT's probability of its degraded twin's label; lowest
    when that probability is 0. Fidelity form: √p; cross-entropy form: −log(1 − p)."""
    p = probs.gather(1, twin_label[:, None]).squeeze(1)
    return (p + 1e-8).sqrt() if loss == "fidelity" else -torch.log1p(-p.clamp(max=1 - 1e-6))


def render_confusion(matrix: Tensor, names: list[str]) -> Tensor:
    """A row-normalised confusion matrix as a (1,3,H,W) image in [0,1]."""
    m = matrix.float().cpu()
    rates = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    k = len(names)
    # The object API renders without pyplot's global state or a display backend.
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=100)
    ax = fig.subplots()
    ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if m[i, j] > 0:
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    image = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(image).permute(2, 0, 1)[None]


class BIQAStage(Stage):
    """Trains the image tower of an open_clip CLIP against frozen degradation prompts."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.classes = list(m.classes)
        self.no_class = self.classes.index("no") if "no" in self.classes else -1
        # DEGRADATION_TYPES index → position in `classes`, -1 for types the model does not score.
        lookup = torch.full((len(DEGRADATION_TYPES),), -1, dtype=torch.long)
        for i, name in enumerate(self.classes):
            lookup[DEGRADATION_TYPES.index(name)] = i
        self.register_buffer("type_to_class", lookup, persistent=False)
        self.val_confusion = MulticlassConfusionMatrix(num_classes=len(self.classes))
        self.clip: PromptCLIP | None = None

    def configure_model(self) -> None:
        if self.clip is not None:
            return
        m = self.cfg.model
        model = create_clip(m.arch, m.pretrained, m.model_cfg)
        if m.grad_checkpointing:
            model.visual.set_grad_checkpointing(True)
        self.clip = PromptCLIP(model, self.classes, resize=m.resize, train_logit_scale=m.train_logit_scale,
                               train_text_projection=m.train_text_projection, train_text=m.train_text)

    def logits(self, images: Tensor) -> Tensor:
        """(N, K) class logits of [0,1] images."""
        return self.clip.logits(images)

    def _scored_batch(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Images to score (the degraded images, then the clean GTs when the GT term or `gt_as_no`
        needs them), their class targets, each row's weight in the main loss, each sample's twin
        class, and which samples' GTs the GT term sees. Samples left out (padding, labels the
        model does not score) stay in place with weight 0: picking rows out would read the mask
        on the host (a device sync per step)."""
        m = self.cfg.model
        y = self.type_to_class[batch["label"]]
        keep = (batch["valid"] & (y >= 0)).float()
        twin = y.clamp(min=0)
        images, targets, weight = batch["lq"], twin, keep
        if m.gt_as_no or m.gt_weight > 0:
            images = torch.cat([images, batch["gt"]])
            targets = torch.cat([twin, torch.full_like(twin, self.no_class)])
            # Every sample brings one GT, so GT rows weigh 1/(K-1) each: "no" counts like one
            # degradation class instead of half the batch (which makes "no for everything" a
            # stable optimum). Without gt_as_no the GT rows feed only the GT term.
            gt_rows = keep / (len(self.classes) - 1) if m.gt_as_no else torch.zeros_like(keep)
            weight = torch.cat([keep, gt_rows])
        gt_mask = keep * (twin != self.no_class)
        return images, targets, weight, twin, gt_mask

    @staticmethod
    def _scored_rows(weight: Tensor, twin: Tensor, images: Tensor) -> Tensor:
        """Rows of `images` that belong to kept samples (bool), GT rows included."""
        n = twin.shape[0]
        return (weight[:n] > 0).repeat(images.shape[0] // n)

    def _loss(self, logits: Tensor, targets: Tensor, weight: Tensor, twin: Tensor,
              gt_mask: Tensor) -> tuple[Tensor, dict]:
        m = self.cfg.model
        if m.loss == "fidelity":
            per_row = fidelity_loss(logits.softmax(-1), targets)
        else:
            per_row = F.cross_entropy(logits, targets, reduction="none")
        main = (weight * per_row).sum() / weight.sum().clamp(min=1e-8)
        parts = {"main": main}
        loss = main
        if m.gt_weight > 0:
            n = twin.shape[0]
            term = gt_term(logits[n:].softmax(-1), twin, m.loss)
            parts["gt"] = (gt_mask * term).sum() / gt_mask.sum().clamp(min=1)  # 0 when no GT has a degraded twin
            loss = loss + m.gt_weight * parts["gt"]
        return loss, parts

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, targets, weight, twin, gt_mask = self._scored_batch(batch)
        logits = self.logits(images)
        loss, parts = self._loss(logits, targets, weight, twin, gt_mask)
        self.log_train_loss(loss)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value)
        scored = self._scored_rows(weight, twin, images).float()
        hits = (logits.argmax(-1) == targets).float()
        self.log("train/acc", (hits * scored).sum() / scored.sum().clamp(min=1))
        self.log("train/logit_scale", self.clip.model.logit_scale.exp().detach())
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, targets, weight, twin, gt_mask = self._scored_batch(batch)
        # Validation reads the mask on the host (once per batch, outside the training hot path).
        scored = self._scored_rows(weight, twin, images)
        count = int(scored.sum())
        if count == 0:
            return
        logits = self.logits(images)
        loss, _ = self._loss(logits, targets, weight, twin, gt_mask)
        self.log("val/loss", loss, batch_size=count, sync_dist=True)
        self.val_confusion.update(logits.argmax(-1)[scored], targets[scored])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.val_confusion.update_called:
            return
        matrix = self.val_confusion.compute()
        self.val_confusion.reset()
        self.log("val/acc", matrix.diag().sum() / matrix.sum().clamp(min=1), prog_bar=True)
        support = matrix.sum(1)
        for i, name in enumerate(self.classes):
            if support[i] > 0:  # a class missing from the val set has no accuracy
                self.log(f"val/acc_{name}", matrix[i, i] / support[i])
        self.log_image_grid("val/confusion", [render_confusion(matrix, self.classes)], max_images=1)

    def export_modules(self) -> dict[str, nn.Module]:
        return {"clip": self.clip.model}
