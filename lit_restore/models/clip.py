"""CLIP for degradation assessment: an open_clip model, a frozen text tower and the prompt bank.

The text tower never trains: BIQA fine-tunes only the image tower, and the LDM reuses the same
text tower's per-token states as its cross-attention context, so freezing it keeps the two
stages in one conditioning space (AutoDIR). Images are preprocessed on the device.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from torch import Tensor, nn

from lit_restore.data.degrade.types import prompt_for

# Attributes of open_clip.CLIP that make up its text tower.
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _checkpoint_state_dict(path: str) -> dict[str, Tensor]:
    """The open_clip weights in a file: an open_clip checkpoint, or any state dict that holds a
    CLIP under a prefix (a BIQA Lightning checkpoint `clip.model.*`, an exported `clip.*`)."""
    # Lightning checkpoints hold plain-Python hyper-parameters: only our own .ckpt files are unpickled fully.
    state = load_state_dict(path, weights_only=not path.endswith(".ckpt"))
    prefix = next((k[: -len("logit_scale")] for k in state if k.endswith("logit_scale")), None)
    if prefix is None:
        raise ValueError(f"{path}: holds no CLIP weights (no 'logit_scale' key)")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def create_clip(
    arch: str, pretrained: str = "", model_cfg: Optional[dict[str, Any]] = None, key: str = "model.pretrained"
) -> open_clip.CLIP:
    """An open_clip CLIP from an architecture name (or a config dict for tiny test models) and
    `pretrained`: an open_clip tag, a local weights file, or "" for random init.

    Built under `torch.device("meta")` (`lit-restore fit --check`), it is the architecture only:
    `pretrained` is validated but no weights are downloaded or read. `key` names the config
    field in error messages.
    """
    device = torch.get_default_device()
    load = device.type != "meta"
    if model_cfg is not None:
        model = open_clip.CLIP(**copy.deepcopy(dict(model_cfg)))
        open_clip.set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(), {"size": model.visual.image_size}))
    else:
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        if pretrained and not tag_cfg and not Path(pretrained).is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ValueError(f"{key}: {pretrained!r} is neither a file nor an open_clip tag of {arch} (tags: {tags})")
        try:
            # OpenAI weights were trained with QuickGELU; the tag says so, the bare arch name does not.
            model = open_clip.create_model(
                arch, pretrained=pretrained if tag_cfg and load else None, device=device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            )
        except RuntimeError:
            if not tag_cfg:
                raise
            raise OSError(
                f"cannot load open_clip weights '{arch}/{pretrained}' (offline?): download them on a machine with "
                f"internet and set {key}=/path/to/open_clip_pytorch_model.bin"
            ) from None
        if tag_cfg:
            return model
    if pretrained and load:
        model.load_state_dict(_checkpoint_state_dict(pretrained), strict=True)
    return model


def tokenize(model: open_clip.CLIP, texts: Sequence[str]) -> Tensor:
    """(N, context_length) token ids, zero-padded (what open_clip's text pooling expects)."""
    return open_clip.tokenize(list(texts), context_length=model.context_length)


def pad_with_eot(tokens: Tensor) -> Tensor:
    """Replace the zero padding after each end-of-text token with end-of-text tokens.

    Stable Diffusion's tokenizer pads this way, so per-token states of padded positions match
    what SD's UNet was trained on; positions before the end token are unchanged (causal mask).
    """
    eot = tokens.max(dim=-1, keepdim=True).values  # open_clip's end-of-text id is the largest id
    after = torch.arange(tokens.shape[-1], device=tokens.device) > tokens.argmax(dim=-1, keepdim=True)
    return torch.where(after, eot, tokens)


class PromptCLIP(nn.Module):
    """An open_clip CLIP with a frozen, always-eval text tower and prompts for `class_names`.

    `logits(images)` scores images against the class prompts (exp(logit_scale) · cosine);
    `token_states(texts)` gives the text tower's last hidden states (N, context_length, width),
    the LDM's cross-attention context.
    """

    def __init__(self, model: open_clip.CLIP, class_names: Sequence[str], resize: bool = False,
                 train_logit_scale: bool = False) -> None:
        super().__init__()
        if not isinstance(model, open_clip.CLIP):
            raise TypeError(f"PromptCLIP needs an open_clip.CLIP with a built-in text tower, got {type(model).__name__}")
        self.model = model
        self.class_names = list(class_names)
        self.resize = resize
        for p in self.text_parameters():
            p.requires_grad_(False)
        model.logit_scale.requires_grad_(train_logit_scale)
        pp = model.visual.preprocess_cfg
        size = pp["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("prompt_tokens", tokenize(model, [prompt_for(c) for c in self.class_names]), persistent=False)
        # The text tower is frozen, so the prompt features are computed once per device and
        # forgotten when weights are loaded into it (a bound method: deepcopy rebinds it).
        self._prompt_cache: Tensor | None = None
        model.register_load_state_dict_post_hook(self._forget_prompt_features)

    def _forget_prompt_features(self, module: nn.Module, incompatible_keys: Any) -> None:
        self._prompt_cache = None

    def text_modules(self) -> list[nn.Module]:
        return [m for m in (getattr(self.model, n) for n in TEXT_PARTS) if isinstance(m, nn.Module)]

    def text_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for name in TEXT_PARTS:
            part = getattr(self.model, name)
            if isinstance(part, nn.Parameter):
                params.append(part)
            elif isinstance(part, nn.Module):
                params.extend(part.parameters())
        return params

    def train(self, mode: bool = True) -> "PromptCLIP":
        super().train(mode)
        for m in self.text_modules():
            m.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """[0,1] images (B,3,H,W) → the image tower's input: centre crop to image_size at native
        scale (degradation statistics kept, as AutoDIR), resizing the shorter side first when
        `resize` is set or the image is smaller than image_size; then CLIP mean/std."""
        h, w = images.shape[-2:]
        th, tw = self.image_size
        if self.resize or h < th or w < tw:
            scale = max(th / h, tw / w)
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
            h, w = size
        top, left = (h - th) // 2, (w - tw) // 2
        images = images[..., top : top + th, left : left + tw]
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @torch.no_grad()
    def prompt_features(self) -> Tensor:
        """(K, D) L2-normalised pooled text features of the class prompts, in fp32 (cached)."""
        cache = self._prompt_cache
        if cache is None or cache.device != self.prompt_tokens.device:
            with torch.autocast(device_type=self.prompt_tokens.device.type, enabled=False):
                cache = self.model.encode_text(self.prompt_tokens, normalize=True).float()
            self._prompt_cache = cache
        return cache

    @torch.no_grad()
    def token_states(self, texts: Sequence[str]) -> Tensor:
        """(N, context_length, width) last hidden states of the text tower (after the final norm)."""
        m = self.model
        tokens = pad_with_eot(tokenize(m, texts).to(self.prompt_tokens.device))
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x)

    def logits(self, images: Tensor) -> Tensor:
        """(B, K) class logits for [0,1] images; gradients reach the image tower only."""
        image = F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)
        text = self.prompt_features().to(image.dtype)
        return self.model.logit_scale.exp() * image @ text.t()
