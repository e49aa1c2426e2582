import huggingface_hub.constants
import open_clip
import pytest
import torch

from _untrusted import code_running_checkpoint
from lit_restore.weights import WeightsError
from lit_restore.config import load_config
from lit_restore.data.degrade.types import DEGRADATION_TYPES, prompt_for
from lit_restore.models.clip import PromptCLIP, create_clip, pad_with_eot, tokenize


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("configs/tiny/biqa.yaml").model.model_cfg


def _clip(tiny_cfg, classes=DEGRADATION_TYPES[:8], **kw):
    torch.manual_seed(0)
    return PromptCLIP(create_clip("", "", tiny_cfg), classes, **kw)


def test_text_tower_frozen_and_gets_no_gradient(tiny_cfg):
    clip = _clip(tiny_cfg)
    clip.train()
    assert all(not m.training for m in clip.text_modules())
    assert clip.model.visual.training
    clip.logits(torch.rand(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in clip.text_parameters())
    assert clip.model.logit_scale.grad is None  # frozen unless train_logit_scale
    visual = [p.grad for p in clip.model.visual.parameters()]
    assert all(g is not None for g in visual) and any(g.abs().sum() > 0 for g in visual)


def test_logits_match_open_clip_scoring(tiny_cfg):
    clip = _clip(tiny_cfg).eval()
    images = torch.rand(3, 3, 64, 64)
    expected, _ = clip.model.get_logits(clip.preprocess(images), clip.prompt_tokens)
    torch.testing.assert_close(clip.logits(images), expected)


def test_prompt_features_are_encoded_once_until_new_weights_load(tiny_cfg):
    import copy

    clip = _clip(tiny_cfg).eval()
    first = clip.prompt_features()

    def not_again(*args, **kwargs):
        raise AssertionError("the frozen text tower ran again")

    clip.model.transformer.forward = not_again  # the cached pooled states are reused
    torch.testing.assert_close(clip.prompt_features(), first)
    del clip.model.transformer.forward
    other = create_clip("", "", tiny_cfg)  # different random weights
    clip.model.load_state_dict(other.state_dict())
    torch.testing.assert_close(clip.prompt_features(), other.encode_text(clip.prompt_tokens, normalize=True))
    twin = copy.deepcopy(clip)  # an EMA copy forgets on its own loads, not on the original's
    twin.model.load_state_dict(_clip(tiny_cfg).model.state_dict())
    torch.testing.assert_close(clip.prompt_features(), other.encode_text(clip.prompt_tokens, normalize=True))
    assert not torch.allclose(twin.prompt_features(), clip.prompt_features())


def test_preprocess_crops_resizes_and_normalises(tiny_cfg):
    clip = _clip(tiny_cfg)
    mean = clip.mean.view(1, 3, 1, 1).expand(2, 3, 90, 70)
    assert clip.preprocess(mean.clone()).abs().max() < 1e-5
    big = torch.rand(2, 3, 90, 70)
    th, tw = clip.image_size
    # Native-scale centre crop: the tower sees the central pixels unchanged.
    top, left = (90 - th) // 2, (70 - tw) // 2
    expected = (big[..., top : top + th, left : left + tw] - clip.mean) / clip.std
    torch.testing.assert_close(clip.preprocess(big), expected)
    small = torch.rand(1, 3, th - 10, tw - 5)
    assert clip.preprocess(small).shape == (1, 3, th, tw)  # small images are resized up
    resized = _clip(tiny_cfg, resize=True).preprocess(big)
    assert resized.shape == (2, 3, th, tw) and not torch.allclose(resized, expected)


def test_token_states_use_eot_padding_like_stable_diffusion(tiny_cfg):
    clip = _clip(tiny_cfg)
    texts = ["", prompt_for("no"), prompt_for("lowres")]
    states = clip.token_states(texts)
    assert states.shape == (3, 77, 32)
    tokens = tokenize(clip.model, texts)
    padded = pad_with_eot(tokens)
    eot = tokens.argmax(-1)
    for i in range(3):
        assert (padded[i, : eot[i] + 1] == tokens[i, : eot[i] + 1]).all()
        assert (padded[i, eot[i]:] == tokens.max()).all()
    # Causal attention: states up to the end token do not depend on the padding, the rest do.
    m = clip.model
    with torch.no_grad():
        x = m.token_embedding(tokens) + m.positional_embedding
        zero_padded = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    n = int(eot[1]) + 1
    torch.testing.assert_close(states[1, :n], zero_padded[1, :n])
    assert not torch.allclose(states[1, n:], zero_padded[1, n:])


def test_weights_from_a_prefixed_lightning_checkpoint(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    source = create_clip("", "", tiny_cfg)
    path = tmp_path / "biqa.ckpt"
    torch.save({"state_dict": {f"clip.model.{k}": v for k, v in source.state_dict().items()}, "epoch": 0}, path)
    loaded = create_clip("", str(path), tiny_cfg)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # The same reached from a stranger's file (model.pretrained, an LDM export's clip.pretrained):
    # a pickle that would run code is refused unrun.
    marker = tmp_path / "ran"
    evil = code_running_checkpoint(tmp_path / "evil.ckpt", marker, {f"clip.model.{k}": v for k, v in source.state_dict().items()})
    with pytest.raises(WeightsError, match="refused"):
        create_clip("", str(evil), tiny_cfg)
    assert not marker.exists()


def test_unknown_tag_and_offline_weights_give_one_line_errors(monkeypatch, tmp_path):
    with pytest.raises(WeightsError, match="neither a file nor an open_clip tag") as e:
        create_clip("ViT-B-32", "no-such-tag")
    assert "\n" not in str(e.value)
    # No network and an empty cache: what a compute node without the weights sees.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"cannot load open_clip weights 'ViT-B-32/openai' \(offline\?\)") as e:
        create_clip("ViT-B-32", "openai")
    assert "\n" not in str(e.value) and "model.pretrained=/path/to/" in str(e.value)


def test_rejects_models_without_a_builtin_text_tower(tiny_cfg):
    with pytest.raises(TypeError, match="open_clip.CLIP"):
        PromptCLIP(open_clip.CLIP(**tiny_cfg).visual, ["no"])
