"""The cluster configs (configs/<stage>.yaml) build the published architectures.

Every stage is built as `lit-restore fit --check` builds it: on the meta device (shapes, no
memory), with its pretrained sources resolved to architectures only. The open_clip `openai` tag
needs no file; Stable Diffusion 1.5 is a local diffusers folder holding its published configs and
no weights, given as an offline user gives a local copy (`model.pretrained=<folder>`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from _sd15 import SCHEDULER, write_sd15
from lit_restore.cli import main
from lit_restore.config import RunConfig, load_config
from lit_restore.data.degrade.types import DEGRADATION_TYPES
from lit_restore.fit import build_on_meta
from lit_restore.models.clip import TEXT_PARTS, create_clip
from lit_restore.models.constyle import check_queue_divisible
from lit_restore.models.nafnet import NAFNet
from lit_restore.models.ldm import build_latent_diffusion, prompt_bank, text_shape

REPO = Path(__file__).resolve().parent.parent

# Published sizes. open_clip ViT-L-14 (openai): image tower 303.97 M, text tower 123.65 M (plus
# logit_scale). SD-1.5: UNet 859.52 M (AutoDIR logs 859.53 M with the 8-channel conv_in), VAE 83.65 M.
CLIP_L14_IMAGE = 303_966_208
CLIP_L14_TEXT = 123_650_304
SD15_UNET = 859_520_964
SD15_VAE = 83_653_863
CONV_IN_EXTRA = 320 * 4 * 3 * 3  # the 4 condition-latent input channels of the 3x3 conv_in


def full(stage: str, *overrides: str) -> RunConfig:
    return load_config(REPO / f"configs/{stage}.yaml", list(overrides))


def count(params) -> int:
    params = params.parameters() if isinstance(params, nn.Module) else params
    return sum(p.numel() for p in params)


def trainable(module: nn.Module) -> int:
    return count(p for p in module.parameters() if p.requires_grad)


def shapes(module: nn.Module, skip: str = "~") -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items() if not k.startswith(skip)}


def assert_on_meta(module: nn.Module) -> None:
    assert {p.device.type for p in module.parameters()} == {"meta"}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    return write_sd15(tmp_path_factory.mktemp("sd15"))


def test_biqa_builds_openai_vit_l14_with_a_frozen_text_transformer():
    cfg = full("biqa")
    assert (cfg.model.arch, cfg.model.pretrained) == ("ViT-L-14-quickgelu", "openai")
    stage = build_on_meta(cfg)
    assert_on_meta(stage)
    clip = stage.clip
    model = clip.model
    assert count(model.visual) == CLIP_L14_IMAGE
    # AutoDIR freezes `text_model*`: the text projection (768 x 768) and logit scale train too.
    projection = model.text_projection.numel()
    assert projection == 768 * 768
    assert count(clip.text_parameters()) == CLIP_L14_TEXT - projection
    assert trainable(stage) == CLIP_L14_IMAGE + projection + 1
    assert count(model) == CLIP_L14_IMAGE + CLIP_L14_TEXT + 1  # + logit_scale
    assert model.visual.conv1.kernel_size == (14, 14) and model.visual.conv1.out_channels == 1024
    assert len(model.visual.transformer.resblocks) == 24 and len(model.transformer.resblocks) == 12
    assert clip.image_size == (224, 224) and cfg.data.crop >= 224  # scored at native scale, no upsampling
    assert (model.context_length, model.transformer.width, model.vocab_size) == (77, 768, 49408)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)  # what the OpenAI weights were trained with
    assert clip.prompt_tokens.shape == (len(cfg.model.classes), 77)


def test_ldm_builds_sd15_with_an_8_channel_conv_in(sd15):
    cfg = full("ldm", f"model.pretrained={sd15}")
    stage = build_on_meta(cfg)
    assert_on_meta(stage)
    unet, vae = stage.ldm.unet, stage.ldm.vae
    assert unet.conv_in.in_channels == unet.config.in_channels == 2 * vae.config.latent_channels == 8
    assert unet.conv_out.out_channels == 4
    assert count(unet) == SD15_UNET + CONV_IN_EXTRA
    assert count(vae) == SD15_VAE
    assert trainable(stage) == count(unet)  # the VAE is frozen, the EMA copy takes no gradients
    assert vae.dtype == torch.bfloat16 and unet.dtype == torch.float32
    assert count(stage.ema.module) == count(unet) and not unet.is_gradient_checkpointing  # opt-in: model.grad_checkpointing
    assert unet.config.cross_attention_dim == text_shape(cfg.model.clip)[1] == 768
    assert stage.context_bank.shape == (len(DEGRADATION_TYPES) + 1, 77, 768)
    assert stage.ldm.size_multiple == 64 and cfg.data.crop % 64 == 0
    # The training noise schedule is SD-1.5's.
    ours = stage.ldm.scheduler.config
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample"):
        assert ours[key] == SCHEDULER[key], key


def test_ldm_context_comes_from_the_biqa_text_tower(sd15):
    biqa, ldm = full("biqa").model, full("ldm", f"model.pretrained={sd15}").model
    assert (ldm.clip.arch, ldm.clip.pretrained) == (biqa.arch, biqa.pretrained)
    biqa_clip = build_on_meta(full("biqa")).clip
    unet = build_on_meta(full("ldm", f"model.pretrained={sd15}")).ldm.unet
    with torch.device("meta"):
        bank = prompt_bank(ldm.clip)  # what the ldm stage computes in setup
        context_clip = create_clip(ldm.clip.arch, ldm.clip.pretrained, ldm.clip.model_cfg)
    assert bank.shape == (len(DEGRADATION_TYPES) + 1, biqa_clip.model.context_length, unet.config.cross_attention_dim)
    # A biqa checkpoint can stand in for model.clip.pretrained: its text tower has the same tensors.
    text = {k: v for k, v in shapes(biqa_clip.model).items() if k.startswith(TEXT_PARTS)}
    assert text == {k: v for k, v in shapes(context_clip).items() if k.startswith(TEXT_PARTS)}
    # The frozen part is everything up to ln_final, whose per-token states are the LDM's context.
    assert count(biqa_clip.text_parameters()) == CLIP_L14_TEXT - biqa_clip.model.text_projection.numel()


def test_scm_builds_autodir_nafnet_and_the_ldm_it_corrects(sd15):
    cfg = full("scm", f"model.ldm.pretrained={sd15}")
    stage = build_on_meta(cfg)
    assert_on_meta(stage)
    net = stage.scm.net
    assert net.intro.in_channels == 6 and net.intro.out_channels == 64  # [lq, ldm output], width 64
    assert [len(e) for e in net.encoders] == [2, 2, 4, 8] and len(net.middle) == 12
    assert [len(d) for d in net.decoders] == [2, 2, 2, 2]
    assert net.downs[-1].out_channels == 64 * 16 and net.ending.out_channels == 3
    assert trainable(stage) == count(stage)  # the frozen LDM stays outside the stage
    # The frozen LDM built from model.ldm has the ldm stage's tensors, so ldm_checkpoint loads into it.
    with torch.device("meta"):
        frozen = build_latent_diffusion(cfg.model.ldm, key="model.ldm")
    trained = build_on_meta(full("ldm", f"model.pretrained={sd15}")).ldm
    assert shapes(frozen) == shapes(trained) and count(frozen.unet) == SD15_UNET + CONV_IN_EXTRA


@pytest.mark.parametrize("width, blocks, published_m", [
    (32, ([1, 1, 1, 28], 1, [1, 1, 1, 1]), 17.11),  # NAFNet-width32, GoPro
    (64, ([1, 1, 1, 28], 1, [1, 1, 1, 1]), 67.89),  # NAFNet-width64, GoPro
    (64, ([5, 6, 7, 7], 7, [5, 6, 7, 7]), 87.40),  # IRConStyle's NAFNet baseline
])
def test_nafnet_blocks_match_published_sizes(width, blocks, published_m):
    enc, mid, dec = blocks
    with torch.device("meta"):
        net = NAFNet(width=width, enc_blocks=enc, middle_blocks=mid, dec_blocks=dec)
    assert round(count(net) / 1e6, 2) == published_m


def test_restorer_builds_constyle_nafnet_around_the_constyle_encoder():
    cfg = full("restorer")
    stage = build_on_meta(cfg)
    assert_on_meta(stage)
    net = stage.net
    assert round(count(net) / 1e6, 2) == 12.74  # IRConStyle's ConStyle-NAFNet
    assert round(count(net.encoder) / 1e6, 2) == 1.19
    assert trainable(stage) == count(net) - count(net.encoder)  # constyle_mode frozen
    assert net.intro.out_channels == 48
    assert [len(level) for level in net.enc_levels] == [7, 8, 9] and len(net.middle) == 9
    assert [len(level) for level in net.dec_levels] == [9, 8, 7]  # deepest first
    # The constyle run's encoder (classifier head aside) has exactly the tensors the restorer loads.
    constyle = build_on_meta(full("constyle")).moco.encoder_q
    assert shapes(constyle, skip="classifier.") == shapes(net.encoder)


def test_constyle_builds_the_encoder_its_queue_and_classifier():
    cfg = full("constyle")
    stage = build_on_meta(cfg)
    assert_on_meta(stage)
    encoder = stage.moco.encoder_q
    assert encoder.feat_channels == (32, 64, 128) and encoder.dim == 128
    head = count(encoder.classifier)
    assert round((count(encoder) - head) / 1e6, 2) == 1.19  # ConStyle v1/v2 trunk + projection
    assert encoder.classifier[-1].out_features == len(DEGRADATION_TYPES)  # cls_weight > 0
    assert stage.moco.queue.shape == (65536, 128)
    assert trainable(stage) == count(encoder)  # the key encoder and the EMA follow without gradients
    world = cfg.trainer["devices"] * cfg.trainer["num_nodes"]
    check_queue_divisible(cfg.model.queue_size, cfg.data.batch_size, world)


def test_check_prints_parameter_counts_without_weights(sd15, capsys):
    assert main(["fit", str(REPO / "configs/ldm.yaml"), "--check", f"model.pretrained={sd15}"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["ldm.unet"] == [f"{SD15_UNET + CONV_IN_EXTRA:,}"] * 2
    assert rows["ldm.vae"] == [f"{SD15_VAE:,}", "0"]


def test_check_offline_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    """`fit configs/ldm.yaml --check` without the SD folder: --check itself keeps the Hub offline
    (no download retries), and says so."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert main(["fit", str(REPO / "configs/ldm.yaml"), "--check"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "not in the local Hugging Face cache" in err
    assert "model.pretrained=/path/to/folder" in err
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # left as it was


def test_check_names_the_key_of_a_folder_without_a_vae(sd15, tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_bytes((sd15 / "unet" / "config.json").read_bytes())
    with pytest.raises(OSError, match=r"model\.pretrained: .* has no diffusers vae/ folder"):
        build_on_meta(full("ldm", f"model.pretrained={tmp_path}"))
