"""The losses more than one stage trains with.

Pixel losses, chosen by name (`model.loss`) by the restorer, SCM and autoencoder: each is first a
per-image value (B,), so a stage can weight or mask images (`masked_mean`: the padding samples of
a last val batch carry no weight). `batch_loss` is the restorer's scalar: the batch mean reduced
as the restorer has always reduced it, so its trained weights reproduce bit for bit.

ConStyle's objectives (InfoNCE, content, style) for the constyle stage and the restorer's joint
mode. BIQA's fidelity loss and the diffusion loss stay in their stages: no other stage uses them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_restore.config import ConStyleNetConfig
from lit_restore.models.constyle import MoCo, Style, check_queue_divisible

# psnr_mse: the PSNR at which an image's MSE term pulls as hard as its PSNR term. Above it
# (noise, blur, jpeg, lowres inputs) the PSNR loss's 1/MSE weight keeps mild inputs intact; below
# it (haze, rain, dark lowlight) the MSE term takes over, so images far from their GT pull in
# proportion to their error instead of barely at all.
PSNR_MSE_CROSSOVER_DB = 20.0
PSNR_MSE_WEIGHT = (10.0 / math.log(10.0)) * 10.0 ** (PSNR_MSE_CROSSOVER_DB / 10.0)


def image_l1(pred: Tensor, gt: Tensor) -> Tensor:
    """(B,) mean absolute error per image."""
    return (pred - gt).abs().mean(dim=(1, 2, 3))


def image_mse(pred: Tensor, gt: Tensor) -> Tensor:
    """(B,) mean squared error per image."""
    return (pred - gt).pow(2).mean(dim=(1, 2, 3))


def image_psnr_loss(pred: Tensor, gt: Tensor) -> Tensor:
    """(B,) negative PSNR per image, for [0,1] images (the 1e-8 keeps a perfect image finite): a
    dB on a good image weighs what it does on a bad one (NAFNet's PSNRLoss)."""
    return (10.0 / math.log(10.0)) * torch.log(image_mse(pred, gt) + 1e-8)


def image_psnr_mse_loss(pred: Tensor, gt: Tensor) -> Tensor:
    """(B,) PSNR loss plus MSE weighted so that d/d(mse) of both terms match at PSNR_MSE_CROSSOVER_DB."""
    return image_psnr_loss(pred, gt) + PSNR_MSE_WEIGHT * image_mse(pred, gt)


IMAGE_LOSSES = {"l1": image_l1, "mse": image_mse, "psnr": image_psnr_loss, "psnr_mse": image_psnr_mse_loss}


def image_loss(name: str, pred: Tensor, gt: Tensor) -> Tensor:
    """(B,) the loss named `name` (a key of IMAGE_LOSSES) per image."""
    return IMAGE_LOSSES[name](pred, gt)


def batch_loss(name: str, pred: Tensor, gt: Tensor) -> Tensor:
    """The batch mean of `image_loss(name, ...)`, reduced as the restorer trains with it: L1 over
    all values at once, psnr_mse as the sum of its two terms' batch means."""
    if name == "l1":
        return F.l1_loss(pred, gt)
    if name == "psnr_mse":
        return image_psnr_loss(pred, gt).mean() + PSNR_MSE_WEIGHT * image_mse(pred, gt).mean()
    return image_loss(name, pred, gt).mean()


def masked_mean(per_sample: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid samples (padding samples of the last val batch carry no weight)."""
    w = valid.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=1)


# --------------------------------------------------------------------------------------
# ConStyle
# --------------------------------------------------------------------------------------


def info_nce(q: Tensor, k: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE with the positive at index 0. Returns (loss, top-1 accuracy of the positive)."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ negatives.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    acc = (logits.argmax(dim=1) == 0).float().mean()
    return F.cross_entropy(logits, target), acc


def content_loss(q: Tensor, k: Tensor) -> Tensor:
    """Pulls the degraded image's code onto the clean image's key code."""
    return F.mse_loss(q, k)


def gram(x: Tensor) -> Tensor:
    """(B, D) → (B, B) Gram matrix over the batch axis, normalised by B·D."""
    return x @ x.t() / x.numel()


def style_loss(z1: Tensor, z2: Tensor, n_cur: Tensor, n_next: Tensor) -> Tensor:
    """Gram-matrix distance between current codes and two blocks of queued codes (ConStyle v1
    pairs z1 with the next block and z2 with the current one). The caller chooses the sign."""
    return F.mse_loss(gram(z1), gram(n_next)) + F.mse_loss(gram(z2), gram(n_cur))


def constyle_losses(moco: MoCo, q: Style, gt: Tensor, m: ConStyleNetConfig, rank: int = 0, world: int = 1,
                    gather: Optional[Callable[[Tensor], Tensor]] = None,
                    queue_key: str = "model.queue_size") -> tuple[dict[str, Tensor], Tensor]:
    """InfoNCE, content and style losses for a batch whose query `q` is already computed, then
    the enqueue: process `rank` of `world`, whose `gather` collects a tensor from every process
    as (world, ...) (a LightningModule's `all_gather`). Returns (unweighted losses, contrastive
    top-1 accuracy)."""
    b = gt.shape[0]
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
    n_cur = moco.queue_rows(rank * b, b)
    n_next = moco.queue_rows((world + rank) * b, b)
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
        stored = gather(stored).reshape(-1, stored.shape[1])
    moco.enqueue(stored)
    return losses, acc


def constyle_total(losses: dict[str, Tensor], m: ConStyleNetConfig) -> Tensor:
    """The ConStyle losses weighted as `m` says."""
    weights = {"contrastive": m.contrastive_weight, "content": m.content_weight, "style": m.style_weight,
               "cls": m.cls_weight}
    return sum(weights[name] * value for name, value in losses.items())
