"""Feed-forward restorer: ConStyle-NAFNet (or plain NAFNet) trained degraded → clean.

ConStyle modes (`model.constyle_mode`):
- frozen: the encoder comes from a constyle-stage checkpoint or exported weights
  (`model.constyle_weights`) and gets no gradients; its BatchNorm keeps training-mode batch
  statistics as in ConStyle v2 (`model.frozen_encoder_bn=eval` fixes them instead).
- joint: the encoder trains with the restorer under L1 + the ConStyle losses (MoCo queue and
  momentum key encoder as in the constyle stage) for `model.constyle_iters` steps, then is
  frozen (IRConStyle v1). On more than one device the freeze leaves encoder parameters without
  gradients, which DDP accepts only with `trainer.strategy: ddp_find_unused_parameters_true`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_restore.config import RunConfig
from lit_restore.losses import batch_loss, constyle_losses, constyle_total
from lit_restore.models.constyle import (ConStyleNAFNet, MoCo, build_moco, build_restorer, check_queue_divisible,
                                         load_encoder_weights)
from lit_restore.models.nafnet import pad_to_multiple
from lit_restore.stages.base import Stage
from lit_restore.weights import load_module_weights

# Where a whole restorer sits: a restorer checkpoint's EMA or network, an exported `restorer`, bare.
_RESTORER_PREFIXES = ("ema.module.", "net.", "restorer.", "")


def load_restorer_weights(net: nn.Module, path: str) -> None:
    """Load a whole restorer (a restorer .ckpt, exported folder or model.safetensors) into `net`."""
    load_module_weights(net, path, _RESTORER_PREFIXES, "restorer")


class RestorerStage(Stage):
    """Trains the restorer on (lq, gt) pairs; exports one module taking a (B,3,H,W) image."""

    # The EMA covers the restorer network only: in joint mode the module also holds the MoCo
    # queue, which must not be averaged (Lightning's EMA callback averages every buffer).
    manages_own_ema = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.net: nn.Module | None = None
        self.moco: MoCo | None = None

    @property
    def joint(self) -> bool:
        m = self.cfg.model
        return m.arch == "constyle_nafnet" and m.constyle_mode == "joint"

    def configure_model(self) -> None:
        if self.net is not None:
            return
        m = self.cfg.model
        net = build_restorer(m)
        if isinstance(net, ConStyleNAFNet) and m.constyle_mode == "frozen":
            net.set_encoder_frozen(True, eval_mode=m.frozen_encoder_bn == "eval")
        # Zero output conv: with the global residual the fresh restorer is the identity, so it
        # starts at the input's PSNR instead of adding noise it must first unlearn (short runs
        # otherwise lose dB on the mild types for hundreds of steps).
        nn.init.zeros_(net.ending.weight)
        nn.init.zeros_(net.ending.bias)
        self.track_ema(net)
        if self.joint:
            # The MoCo wrapper shares the restorer's encoder as its query encoder, so converting
            # the wrapper converts the restorer's encoder too.
            self.moco = self.sync_batchnorm(build_moco(m.constyle, net.encoder), m.constyle.sync_batchnorm)
        self.net = net

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        m = self.cfg.model
        if self.joint:
            check_queue_divisible(m.constyle.queue_size, self.cfg.data.batch_size, self.trainer.world_size,
                                  "model.constyle.queue_size")
        # Here rather than in configure_model: export rebuilds the stage without these files,
        # and a resumed run's checkpoint overwrites what is loaded here.
        if m.pretrained:
            self.configure_model()
            load_restorer_weights(self.net, m.pretrained)
            self._copy_to_ema_and_key_encoder()
        if m.arch == "constyle_nafnet" and m.constyle_weights:
            self.configure_model()
            self.load_pretrained_encoder(m.constyle_weights)

    def load_pretrained_encoder(self, path: str) -> None:
        """Load ConStyle weights into the encoder and every copy of it made in configure_model."""
        load_encoder_weights(self.net.encoder, path)
        self._copy_to_ema_and_key_encoder()

    def _copy_to_ema_and_key_encoder(self) -> None:
        """Loaded weights go to the EMA's copy of the net, and in joint mode the encoder's to MoCo's
        key encoder, which would otherwise stay random."""
        if self.ema is not None:
            self.ema.module.load_state_dict(self.net.state_dict())
        if self.moco is not None:
            self.moco.encoder_k.load_state_dict(self.net.encoder.state_dict())

    def _constyle_losses_on(self) -> bool:
        iters = self.cfg.model.constyle_iters
        return self.joint and (iters < 0 or self.global_step < iters)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        m = self.cfg.model
        lq, gt = batch["lq"], batch["gt"]
        losses: dict[str, Tensor] = {}
        if self._constyle_losses_on():
            # One encoder pass serves the restorer and the ConStyle losses.
            style = self.net.encoder(pad_to_multiple(lq, 8))
            pred = self.net.restore(lq, style)
            losses, acc = constyle_losses(self.moco, style, pad_to_multiple(gt, 8), m.constyle, *self.ranks,
                                          gather=self.all_gather, queue_key="model.constyle.queue_size")
            self.log("train/contrastive_acc", acc)
        else:
            if self.joint and not self.net.freeze_encoder:
                # IRConStyle v1's switch after constyle_iters
                self.net.set_encoder_frozen(True, eval_mode=m.frozen_encoder_bn == "eval")
            pred = self.net(lq)
        rec = batch_loss(m.loss, pred, gt)
        loss = rec + constyle_total(losses, m.constyle) if losses else rec
        self.log_train_loss(loss)
        self.log(f"train/{m.loss}", rec)
        for name, value in losses.items():
            self.log(f"train/{name}", value)
        return loss

    def ema_source(self) -> nn.Module:
        return self.net

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self.export_modules()["restorer"](batch["lq"])
        self.log_restoration_metrics(pred, batch["gt"], batch["valid"])
        if batch_idx == 0:
            self.log_image_grid("val/restored", [batch["lq"], pred, batch["gt"]])

    def export_modules(self) -> dict[str, nn.Module]:
        return {"restorer": self.averaged(self.net)}
