"""ConStyle (IRConStyle, Fan et al. 2024): a degradation-aware encoder trained MoCo-style, and the
ConStyle-NAFNet restorer it conditions.

- `ConStyleEncoder`: plain conv trunk (no normalisation) → feature maps f1, f2, f3 at 1/2, 1/4, 1/8
  and a pooled vector → two-layer projection head (z1, z2; z2 is the latent code), plus an
  optional degradation-type classifier on the pooled vector.
- `MoCo`: query encoder, momentum key encoder and a queue of past codes (buffers, checkpointed).
- Pure loss functions: InfoNCE, content and style (Gram over the batch axis) losses.
- `ConStyleNAFNet`: a 3-level NAFBlock U-Net whose encoder path concatenates projected f1..f3
  after each downsampling and whose bottleneck is modulated by the latent code.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_restore.config import ConStyleNetConfig, RestorerModelConfig
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.models.nafnet import NAFBlock, NAFNet, pad_to_multiple
from lit_restore.weights import WeightsError, read_weights, tensors_under_prefix


class Style(NamedTuple):
    """What the ConStyle encoder gives for a batch of images."""

    z1: Tensor  # (B, dim) first projection layer
    z2: Tensor  # (B, dim) latent code
    feats: tuple[Tensor, Tensor, Tensor]  # f1, f2, f3 at 1/2, 1/4, 1/8 resolution
    logits: Optional[Tensor]  # (B, num_classes) degradation-type logits, or None without a classifier


def _conv_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.LeakyReLU(0.1, inplace=True))


class ConStyleEncoder(nn.Module):
    """Conv trunk + projection head. With base=16, dim=128 it has ConStyle v1's shapes
    (f1/f2/f3 with 32/64/128 channels, 256-d pooled vector, ~1.19 M parameters)."""

    def __init__(self, base: int = 16, dim: int = 128, num_classes: int = 0) -> None:
        super().__init__()
        b = base
        self.stage1 = nn.Sequential(_conv_act(3, b), _conv_act(b, b), _conv_act(b, 2 * b, 2))
        self.stage2 = nn.Sequential(_conv_act(2 * b, 2 * b), _conv_act(2 * b, 4 * b, 2))
        self.stage3 = nn.Sequential(_conv_act(4 * b, 8 * b), _conv_act(8 * b, 8 * b, 2))
        self.stage4 = nn.Sequential(_conv_act(8 * b, 16 * b), _conv_act(16 * b, 16 * b, 2))
        self.mlp1 = nn.Sequential(nn.Linear(16 * b, dim), nn.BatchNorm1d(dim), nn.GELU())
        self.mlp2 = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.GELU())
        self.classifier = (
            nn.Sequential(nn.Linear(16 * b, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, num_classes))
            if num_classes > 0
            else None
        )
        self.feat_channels = (2 * b, 4 * b, 8 * b)
        self.dim = dim
        # He initialisation for the trunk's LeakyReLU: under PyTorch's default conv init (IRConStyle's)
        # each of the 8 unnormalised convs shrinks the signal ~4x, so at init the pooled vector is
        # ~1e-5 and its differences between images ~5e-6: the classifier on it cannot learn, and the
        # feature maps the restorer concatenates carry almost nothing (docs/benchmarks.md, "Does the
        # ConStyle prior help the same net?").
        for m in (self.stage1, self.stage2, self.stage3, self.stage4):
            for conv in m.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, a=0.1, nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Style:
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        pooled = self.stage4(f3).mean(dim=(2, 3))
        z1 = self.mlp1(pooled)
        z2 = self.mlp2(z1)
        logits = self.classifier(pooled) if self.classifier is not None else None
        return Style(z1, z2, (f1, f2, f3), logits)


# --------------------------------------------------------------------------------------
# MoCo
# --------------------------------------------------------------------------------------


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of `queue_size` past codes.

    The queue and its pointer are buffers, so checkpoints hold them. Writers must give every
    rank the same block (all-gathered codes) so the replicas stay identical.
    """

    def __init__(self, encoder: ConStyleEncoder, queue_size: int, momentum: float, normalize: bool) -> None:
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        self.encoder_k.requires_grad_(False)
        self.momentum = momentum
        self.normalize = normalize
        # Its own fixed generator: every rank starts from the same queue without a broadcast.
        queue = torch.randn(queue_size, encoder.dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("queue", F.normalize(queue, dim=1) if normalize else queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q (parameters only; the key encoder keeps its own BN statistics)."""
        q = list(self.encoder_q.parameters())
        k = list(self.encoder_k.parameters())
        torch._foreach_mul_(k, self.momentum)
        torch._foreach_add_(k, q, alpha=1.0 - self.momentum)

    def code(self, z: Tensor) -> Tensor:
        """The vector compared in the losses and stored in the queue."""
        return F.normalize(z, dim=1) if self.normalize else z

    def queue_rows(self, start: int, count: int) -> Tensor:
        """A detached copy of `count` queue rows from pointer + start (wrapping), without a host sync."""
        idx = (self.queue_ptr + start + torch.arange(count, device=self.queue.device)) % self.queue.shape[0]
        return self.queue[idx]

    @torch.no_grad()
    def enqueue(self, block: Tensor) -> None:
        """Write `block` (N, dim) at the pointer and advance it by N. Same block on every rank."""
        n = block.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % self.queue.shape[0]
        self.queue[idx] = block.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue.shape[0])


def check_queue_divisible(queue_size: int, batch_size: int, world_size: int, key: str = "model.queue_size") -> None:
    """The queue is written in whole global batches; a remainder would make blocks straddle the end."""
    global_batch = batch_size * world_size
    if queue_size % global_batch != 0:
        raise ValueError(
            f"{key}={queue_size} is not divisible by the global batch {global_batch} "
            f"(data.batch_size={batch_size} x {world_size} devices); use a multiple of {global_batch}"
        )


# --------------------------------------------------------------------------------------
# ConStyle-NAFNet restorer
# --------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Conv3×3 to C/4 channels then PixelUnshuffle(2): C channels at half resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 4, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Conv3×3 to 4·C then PixelShuffle(2), concat the skip, 1×1 conv to `out_channels`."""

    def __init__(self, channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.fuse = nn.Conv2d(channels + skip_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


def _project(cin: int, cout: int) -> nn.Sequential:
    # ConStyle's "affine transform" of an encoder feature map before it joins the U-Net.
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.LeakyReLU(0.1, inplace=True))


class EncoderConditioned(nn.Module):
    """A restorer conditioned by a ConStyle `encoder` run on its own input; the encoder can be
    frozen. Subclasses implement `restore(x, style)`."""

    def __init__(self, encoder: ConStyleEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = False
        self.freeze_encoder_eval = False

    def set_encoder_frozen(self, frozen: bool, eval_mode: bool = False) -> None:
        """A frozen encoder gets no gradients. Its BatchNorm stays in train mode (batch statistics,
        as ConStyle v2 and IRConStyle, which only stop gradients) unless `eval_mode`, which keeps
        it in eval mode with its running statistics fixed."""
        self.freeze_encoder = frozen
        self.freeze_encoder_eval = frozen and eval_mode
        self.encoder.requires_grad_(not frozen)
        if self.freeze_encoder_eval:
            self.encoder.eval()

    def train(self, mode: bool = True) -> "EncoderConditioned":
        super().train(mode)
        if self.freeze_encoder_eval:
            self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.restore(x, None)

    def restore(self, x: Tensor, style: Optional[Style]) -> Tensor:
        raise NotImplementedError


class CodeNAFNet(EncoderConditioned):
    """A plain NAFNet modulated by the ConStyle latent code alone: after every level (encoder,
    middle, decoder) a linear map of the code gives a per-channel scale and shift (FiLM),
    zero-initialised so the fresh net is the plain NAFNet. The encoder's feature maps are not used,
    so the restorer has the plain NAFNet's widths and blocks plus one small linear map per level:
    the same restorer with and without the prior (`model.constyle_condition=code`)."""

    def __init__(self, encoder: ConStyleEncoder, width: int, enc_blocks: Sequence[int], middle_blocks: int,
                 dec_blocks: Sequence[int]) -> None:
        super().__init__(encoder)
        self.net = NAFNet(width=width, enc_blocks=enc_blocks, middle_blocks=middle_blocks, dec_blocks=dec_blocks)
        self.film = nn.ModuleList(nn.Linear(encoder.dim, 2 * c) for c in self.net.level_widths)
        for lin in self.film:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def ending(self) -> nn.Conv2d:
        return self.net.ending

    def restore(self, x: Tensor, style: Optional[Style]) -> Tensor:
        """Restore `x`; `style` is the encoder's output on the input padded to a multiple of 8
        when the caller already has it (the encoder pools globally, so the padding barely matters)."""
        if style is None:
            style = self.encoder(pad_to_multiple(x, 8))
        film = [lin(style.z2).chunk(2, dim=1) for lin in self.film]
        return self.net.modulated(x, film)


class ConStyleNAFNet(EncoderConditioned):
    """3-level NAFBlock U-Net conditioned by a ConStyle encoder run on its own input.

    Widths grow linearly: levels at dim, 2·dim, 3·dim; each downsampling keeps the channels and
    concatenates the projected ConStyle map (dim channels), so the bottleneck has 4·dim. There
    the latent code q' = Linear(z2) modulates channel-wise: concat[x, x⊙q'] → 1×1 conv to 3·dim.
    Decoder levels are 4·dim, 3·dim, 2·dim wide. Output: conv to 3 channels plus the input.
    Takes one (B,3,H,W) tensor, pads to a multiple of 8 and crops back.
    """

    def __init__(
        self,
        encoder: ConStyleEncoder,
        dim: int = 48,
        enc_blocks: Sequence[int] = (7, 8, 9),
        middle_blocks: int = 9,
        dec_blocks: Sequence[int] = (7, 8, 9),
    ) -> None:
        super().__init__(encoder)
        if len(enc_blocks) != 3 or len(dec_blocks) != 3:
            raise ValueError(f"ConStyle-NAFNet has 3 levels: enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)} need 3 entries")
        if dim % 4 != 0:
            raise ValueError(f"ConStyle-NAFNet width {dim} must be divisible by 4 (downsampling convs use width/4)")
        self.intro = nn.Conv2d(3, dim, 3, padding=1)
        enc_widths = (dim, 2 * dim, 3 * dim)
        self.enc_levels = nn.ModuleList(nn.Sequential(*[NAFBlock(c) for _ in range(n)]) for c, n in zip(enc_widths, enc_blocks))
        self.downs = nn.ModuleList(Downsample(c) for c in enc_widths)
        self.projections = nn.ModuleList(_project(c, dim) for c in encoder.feat_channels)
        self.middle = nn.Sequential(*[NAFBlock(4 * dim) for _ in range(middle_blocks)])
        self.code_proj = nn.Linear(encoder.dim, 4 * dim)
        self.local_fusion = nn.Conv2d(8 * dim, 3 * dim, 1, bias=False)
        # Decoder, deepest level first: (input width, skip width, level width).
        dec_specs = ((3 * dim, 3 * dim, 4 * dim), (4 * dim, 2 * dim, 3 * dim), (3 * dim, dim, 2 * dim))
        self.ups = nn.ModuleList(Upsample(cin, cskip, cout) for cin, cskip, cout in dec_specs)
        self.dec_levels = nn.ModuleList(
            nn.Sequential(*[NAFBlock(cout) for _ in range(n)]) for (_, _, cout), n in zip(dec_specs, reversed(dec_blocks))
        )
        self.ending = nn.Conv2d(2 * dim, 3, 3, padding=1)

    def restore(self, x: Tensor, style: Optional[Style]) -> Tensor:
        """Restore `x`; `style` is the encoder's output on the padded input when the caller already has it."""
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, 8)
        if style is None:
            style = self.encoder(inp)
        y = self.intro(inp)
        skips = []
        for level, down, proj, feat in zip(self.enc_levels, self.downs, self.projections, style.feats):
            y = level(y)
            skips.append(y)
            y = torch.cat([down(y), proj(feat)], dim=1)
        y = self.middle(y)
        code = self.code_proj(style.z2)[:, :, None, None]
        y = self.local_fusion(torch.cat([y, y * code], dim=1))
        for up, level, skip in zip(self.ups, self.dec_levels, reversed(skips)):
            y = level(up(y, skip))
        y = self.ending(y) + inp
        return y[..., :h, :w]


def build_encoder(m: ConStyleNetConfig) -> ConStyleEncoder:
    """The ConStyle encoder of `m` (random weights), with a type classifier head when `cls_weight` > 0."""
    num_classes = len(DEGRADATION_TYPES) if m.cls_weight > 0 else 0
    return ConStyleEncoder(base=m.base_channels, dim=m.dim, num_classes=num_classes)


def build_restorer(m: RestorerModelConfig) -> nn.Module:
    """The restorer network of `model:` (random weights): the plain NAFNet, or one conditioned by
    a ConStyle encoder through its feature maps and code, or through the code alone."""
    if m.arch == "nafnet":
        return NAFNet(width=m.width, enc_blocks=m.enc_blocks, middle_blocks=m.middle_blocks, dec_blocks=m.dec_blocks)
    if m.constyle_condition == "code":
        return CodeNAFNet(build_encoder(m.constyle), width=m.width, enc_blocks=m.enc_blocks,
                          middle_blocks=m.middle_blocks, dec_blocks=m.dec_blocks)
    return ConStyleNAFNet(build_encoder(m.constyle), dim=m.width, enc_blocks=m.enc_blocks,
                          middle_blocks=m.middle_blocks, dec_blocks=m.dec_blocks)


def build_moco(m: ConStyleNetConfig, encoder: ConStyleEncoder) -> MoCo:
    """MoCo around `encoder` (the query encoder; the key encoder is its copy) as `m` configures it."""
    return MoCo(encoder, queue_size=m.queue_size, momentum=m.momentum, normalize=m.l2_normalize)


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
