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
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from lit_restore.config import ConfigError
from lit_restore.data.degrade.types import prompt_for
from lit_restore.weights import WeightsError, read_weights

# Attributes of open_clip.CLIP that make up its text tower (the per-token states the LDM reads
# come out of ln_final; text_projection only maps the pooled state into the joint space).
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _checkpoint_state_dict(path: str) -> dict[str, Tensor]:
    """The open_clip weights in a file: an open_clip checkpoint, or any state dict that holds a
    CLIP under a prefix (a BIQA Lightning checkpoint `clip.model.*`, an exported `clip.*`)."""
    state = read_weights(path)
    prefix = next((k[: -len("logit_scale")] for k in state if k.endswith("logit_scale")), None)
    if prefix is None:
        raise WeightsError(f"{path}: holds no CLIP weights (no 'logit_scale' key)")
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
            raise ConfigError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        if pretrained and not tag_cfg and not Path(pretrained).is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise WeightsError(f"{key}: {pretrained!r} is neither a file nor an open_clip tag of {arch} (tags: {tags})")
        try:
            # OpenAI weights were trained with QuickGELU; the tag says so, the bare arch name does not.
            model = open_clip.create_model(
                arch, pretrained=pretrained if tag_cfg and load else None, device=device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            )
        except RuntimeError:
            if not tag_cfg:
                raise
            raise WeightsError(
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
                 train_logit_scale: bool = False, train_text_projection: bool = False, train_text: bool = False) -> None:
        super().__init__()
        if not isinstance(model, open_clip.CLIP):
            raise TypeError(f"PromptCLIP needs an open_clip.CLIP with a built-in text tower, got {type(model).__name__}")
        self.model = model
        self.class_names = list(class_names)
        self.resize = resize
        self.train_text = train_text
        # Frozen: the text tower, less text_projection when it trains (AutoDIR); nothing when the
        # whole tower trains (making a CLIP foundation).
        self.frozen_parts = () if train_text else tuple(
            n for n in TEXT_PARTS if n != "text_projection" or not train_text_projection)
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
        """The frozen text tower's parameters (text_projection among them unless it trains)."""
        params: list[nn.Parameter] = []
        for name in self.frozen_parts:
            part = getattr(self.model, name)
            if isinstance(part, nn.Parameter):
                params.append(part)
            elif isinstance(part, nn.Module):
                params.extend(part.parameters())
        return params

    def train(self, mode: bool = True) -> "PromptCLIP":
        super().train(mode)
        if not self.train_text:
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

    def prompt_features(self) -> Tensor:
        """(K, D) L2-normalised pooled text features of the class prompts, in fp32. The frozen
        tower's pooled states are computed once and cached (forgotten on weight loads); a trainable
        text_projection (AutoDIR) is applied on every call, so it gets gradients. Nothing is cached
        while the whole tower trains (making a CLIP foundation)."""
        m = self.model
        pooled = self._prompt_cache
        if self.train_text or pooled is None or pooled.device != self.prompt_tokens.device:
            with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()), \
                    torch.autocast(device_type=self.prompt_tokens.device.type, enabled=False):
                pooled = text_global_pool(self._hidden_states(self.prompt_tokens), self.prompt_tokens, m.text_pool_type,
                                          eos_token_id=getattr(m, "text_eos_id", None)).float()
            if not self.train_text:
                self._prompt_cache = pooled
        proj = m.text_projection
        if isinstance(proj, nn.Linear):
            pooled = proj(pooled.to(proj.weight.dtype))
        elif proj is not None:
            pooled = pooled.to(proj.dtype) @ proj
        return F.normalize(pooled.float(), dim=-1)

    def _hidden_states(self, tokens: Tensor) -> Tensor:
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x)

    @torch.no_grad()
    def token_states(self, texts: Sequence[str]) -> Tensor:
        """(N, context_length, width) last hidden states of the text tower (after the final norm)."""
        return self._hidden_states(pad_with_eot(tokenize(self.model, texts).to(self.prompt_tokens.device)))

    def logits(self, images: Tensor) -> Tensor:
        """(B, K) class logits for [0,1] images; gradients reach the image tower (and the text
        tower when it trains)."""
        image = F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)
        text = self.prompt_features().to(image.dtype)
        return self.model.logit_scale.exp() * image @ text.t()


# ------------------------------------------------------------------ transformers format


def _open_clip_merges() -> list[str]:
    """The BPE merges of open_clip's tokenizer (the same file OpenAI's CLIP ships)."""
    import gzip

    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer uses


def transformers_tokenizer(folder: Path, context_length: int = 77):
    """A transformers CLIPTokenizer with open_clip's vocabulary, written into `folder` (vocab.json,
    merges.txt, then save_pretrained): the ids match `tokenize`, padded with end-of-text tokens
    as Stable Diffusion's tokenizer (and `pad_with_eot`) pad."""
    import json

    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    merges = _open_clip_merges()
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=context_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def transformers_text_model(model: open_clip.CLIP):
    """The text tower of an open_clip CLIP as a transformers `CLIPTextModel` with the same weights:
    its `last_hidden_state` equals `PromptCLIP.token_states` (the mapping Stable Diffusion's
    text_encoder/ follows for OpenAI ViT-L/14; any open_clip CLIP with a built-in text tower)."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = model.transformer.resblocks
    first = blocks[0]
    if not isinstance(first.ls_1, nn.Identity):
        raise ValueError("open_clip text towers with layer scale have no CLIPTextModel equivalent")
    width = model.transformer.width
    config = CLIPTextConfig(
        vocab_size=model.vocab_size, hidden_size=width, intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks), num_attention_heads=first.attn.num_heads,
        max_position_embeddings=model.context_length, layer_norm_eps=model.ln_final.eps,
        hidden_act="quick_gelu" if isinstance(first.mlp.gelu, QuickGELU) else "gelu",
        # open_clip's tokenizer: start 49406, end 49407, padded with the end token
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    state = {"embeddings.token_embedding.weight": model.token_embedding.weight,
             "embeddings.position_embedding.weight": model.positional_embedding,
             "final_layer_norm.weight": model.ln_final.weight, "final_layer_norm.bias": model.ln_final.bias}
    for i, block in enumerate(blocks):
        p = f"encoder.layers.{i}."
        for name, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            state[f"{p}self_attn.{name}_proj.weight"], state[f"{p}self_attn.{name}_proj.bias"] = w, b
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[f"{p}{name}.weight"], state[f"{p}{name}.bias"] = module.weight, module.bias
    text = CLIPTextModel(config)
    # The keys sit under `text_model.` in some transformers versions and at the top in others.
    prefix = next(k for k in text.state_dict() if k.endswith("embeddings.token_embedding.weight"))
    prefix = prefix[: -len("embeddings.token_embedding.weight")]
    text.load_state_dict({prefix + k: v.detach().float().clone() for k, v in state.items()}, strict=True)
    return text.eval()


class TransformersTextTower(nn.Module):
    """A transformers CLIPTextModel + CLIPTokenizer (an LDM export's text_encoder/ and tokenizer/)
    giving the same `token_states(texts)` as `PromptCLIP`."""

    def __init__(self, encoder: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: Path) -> "TransformersTextTower":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        from lit_restore.weights_folder import check_entries, check_fits_file, read_json_config

        transformers_logging.disable_progress_bar()  # restore draws its own progress bar
        encoder = folder / "text_encoder"
        check_entries(folder)
        config = CLIPTextConfig.from_dict(read_json_config(encoder / "config.json"))
        with torch.device("meta"):
            check_fits_file([CLIPTextModel(config)], sorted(encoder.glob("*.safetensors")), f"{encoder}/config.json")
        return cls(CLIPTextModel.from_pretrained(str(encoder), use_safetensors=True),
                   CLIPTokenizer.from_pretrained(str(folder / "tokenizer")))

    @torch.no_grad()
    def token_states(self, texts: Sequence[str]) -> Tensor:
        """(N, model_max_length, width) last hidden states."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.encoder.parameters()).device
        return self.encoder(ids.to(device)).last_hidden_state
