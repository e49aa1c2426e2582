"""ConStyle-NAFNet restorer: network, weight loading, frozen/joint modes, the restorer stage."""

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from _batches import device_batch, tiny_stage
from _untrusted import code_running_checkpoint
from lit_restore.weights import WeightsError
from lit_restore.config import ConfigError, load_config
from lit_restore.models.constyle import ConStyleEncoder, ConStyleNAFNet
from lit_restore.models.nafnet import NAFBlock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "restorer.yaml")
TINY_CONSTYLE = str(ROOT / "configs" / "tiny" / "constyle.yaml")
SMALL = ["model.width=8", "model.constyle.base_channels=4", "model.constyle.dim=16", "model.constyle.queue_size=32",
         "data.batch_size=4"]


def tiny_net() -> ConStyleNAFNet:
    torch.manual_seed(0)
    return ConStyleNAFNet(ConStyleEncoder(base=4, dim=16), dim=8, enc_blocks=(1, 1, 1), middle_blocks=1,
                          dec_blocks=(1, 1, 1))


def make_stage(*overrides: str):
    return tiny_stage("restorer", *SMALL, *overrides)


# ----------------------------------------------------------------------------- network


def test_reference_size_and_any_input_size():
    # ConStyle-NAFNet at dim 48, blocks [7,8,9]/9/[7,8,9]: 12.74 M parameters with its encoder.
    full = ConStyleNAFNet(ConStyleEncoder())
    assert abs(sum(p.numel() for p in full.parameters()) - 12.74e6) < 0.01e6
    net = tiny_net().eval()
    for shape in [(2, 3, 32, 32), (1, 3, 19, 27)]:
        assert net(torch.rand(*shape)).shape == shape


def test_latent_code_and_feature_maps_change_the_output():
    net = tiny_net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NAFBlock):
                m.beta.normal_(0, 0.5)
                m.gamma.normal_(0, 0.5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        style = net.encoder(x)
        base = net.restore(x, style)
        torch.testing.assert_close(net(x), base)
        code_changed = net.restore(x, style._replace(z2=style.z2 + 1.0))
        feats_changed = net.restore(x, style._replace(feats=tuple(f + 1.0 for f in style.feats)))
    assert not torch.allclose(base, code_changed) and not torch.allclose(base, feats_changed)


def test_code_conditioning_is_the_plain_nafnet_plus_a_film_of_the_code():
    """`constyle_condition=code`: the plain NAFNet of the same width and blocks, modulated by the
    code alone; fresh (zero FiLM) it computes exactly the plain net, then the code changes it."""
    from lit_restore.models.constyle import CodeNAFNet
    from lit_restore.models.nafnet import NAFNet

    torch.manual_seed(0)
    net = CodeNAFNet(ConStyleEncoder(base=4, dim=16), width=8, enc_blocks=(1, 1), middle_blocks=1,
                     dec_blocks=(1, 1)).eval()
    plain = NAFNet(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1))
    plain.load_state_dict(net.net.state_dict())
    x = torch.rand(2, 3, 20, 28)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NAFBlock):
                m.beta.normal_(0, 0.5)
                m.gamma.normal_(0, 0.5)
        plain.load_state_dict(net.net.state_dict())
        torch.testing.assert_close(net(x), plain(x))
        for lin in net.film:
            lin.weight.normal_(0, 0.5)
        style = net.encoder(x)
        assert not torch.allclose(net.restore(x, style), net.restore(x, style._replace(z2=style.z2 + 1.0)))
    stage = make_stage("model.constyle_condition=code", "model.enc_blocks=[1,1]", "model.dec_blocks=[1,1]")
    assert isinstance(stage.net, CodeNAFNet) and stage.net.eval()(torch.rand(1, 3, 24, 24)).shape == (1, 3, 24, 24)


def test_onnx_export_single_input_dynamic_hw(tmp_path):
    net = tiny_net().eval()
    path = tmp_path / "restorer.onnx"
    dims = {0: torch.export.Dim("b"), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(path), dynamo=True, dynamic_shapes={"x": dims},
                      input_names=["x"], output_names=["y"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 32, 32), (1, 3, 24, 40), (2, 3, 17, 29)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = net(x).numpy()
        (out,) = sess.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- weights


def _encoder_file(tmp_path: Path, kind: str) -> tuple[str, ConStyleEncoder]:
    torch.manual_seed(1)
    enc = ConStyleEncoder(base=4, dim=16, num_classes=10)  # a classifier head the restorer ignores
    sd = enc.state_dict()
    if kind == "ckpt":
        path = tmp_path / "constyle.ckpt"
        torch.save({"state_dict": {f"moco.encoder_q.{k}": v for k, v in sd.items()}}, path)
    else:
        (tmp_path / "constyle").mkdir()
        path = tmp_path / "constyle"
        save_file({f"encoder.{k}": v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return str(path), enc


@pytest.mark.parametrize("kind", ["ckpt", "export"])
def test_load_encoder_weights(tmp_path, kind):
    from lit_restore.models.constyle import load_encoder_weights

    path, ref = _encoder_file(tmp_path, kind)
    enc = ConStyleEncoder(base=4, dim=16)
    load_encoder_weights(enc, path)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


def test_load_encoder_weights_errors(tmp_path):
    from lit_restore.models.constyle import load_encoder_weights

    with pytest.raises(WeightsError, match="ConStyle weights: .*not found"):
        load_encoder_weights(ConStyleEncoder(base=4, dim=16), str(tmp_path / "missing.ckpt"))
    path, _ = _encoder_file(tmp_path, "ckpt")
    with pytest.raises(WeightsError, match="shapes differ"):
        load_encoder_weights(ConStyleEncoder(base=4, dim=32), path)
    # model.constyle_weights from a stranger: a pickle that would run code is refused unrun.
    marker = tmp_path / "ran"
    evil = code_running_checkpoint(tmp_path / "evil.ckpt", marker, ConStyleEncoder(base=4, dim=16).state_dict())
    with pytest.raises(WeightsError, match="refused"):
        load_encoder_weights(ConStyleEncoder(base=4, dim=16), str(evil))
    assert not marker.exists()
    truncated = tmp_path / "short.safetensors"
    save_file(ConStyleEncoder(base=4, dim=16).state_dict(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(WeightsError, match="not a readable safetensors file") as e:
        load_encoder_weights(ConStyleEncoder(base=4, dim=16), str(truncated))
    assert "\n" not in str(e.value)


def test_frozen_mode_needs_weights():
    from lit_restore.stages.restorer import RestorerStage

    with pytest.raises(ConfigError, match="model.constyle_weights: frozen mode needs pretrained ConStyle weights"):
        RestorerStage(load_config(TINY, [*SMALL, "model.constyle_mode=frozen"]))


# ----------------------------------------------------------------------------- stage


def test_joint_mode_trains_encoder_with_constyle_losses():
    stage = make_stage("model.constyle_mode=joint", "model.constyle_iters=-1")
    enc_params = list(stage.net.encoder.parameters())
    trainable = {id(p) for p in stage.trainable_parameters()}
    assert all(id(p) in trainable for p in enc_params)
    assert stage.moco.encoder_q is stage.net.encoder
    stage.training_step(device_batch(stage), 0).backward()
    assert all(p.grad is not None for p in enc_params)
    assert int(stage.moco.queue_ptr) == 4


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_joint_mode_freezes_encoder_after_constyle_iters(bn):
    stage = make_stage("model.constyle_mode=joint", "model.constyle_iters=0", f"model.frozen_encoder_bn={bn}")
    enc_params = list(stage.net.encoder.parameters())
    stage.training_step(device_batch(stage), 0).backward()
    # IRConStyle v1's switch: ConStyle losses off, encoder frozen from then on; its BatchNorm keeps
    # batch statistics (as IRConStyle/ConStyle v2) or, with bn=eval, its running statistics.
    assert stage.net.freeze_encoder and stage.net.encoder.training == (bn == "train")
    assert all(p.grad is None and not p.requires_grad for p in enc_params)
    assert int(stage.moco.queue_ptr) == 0
    stage.train()
    assert stage.net.encoder.training == (bn == "train")


def test_joint_mode_with_weights_starts_key_and_ema_encoders_from_them(tmp_path):
    from types import SimpleNamespace

    path, ref = _encoder_file(tmp_path, "export")
    stage = tiny_stage("restorer", *SMALL, "model.constyle_mode=joint", f"model.constyle_weights={path}",
                       "optim.ema_decay=0.5")
    stage._trainer = SimpleNamespace(world_size=1)  # setup reads only the world size
    stage.setup("fit")
    # The content and InfoNCE losses compare against the key encoder: it must hold the pretrained
    # weights too, not the random ones it was copied from in configure_model.
    for encoder in (stage.net.encoder, stage.moco.encoder_k, stage.ema.module.encoder):
        for k, v in encoder.state_dict().items():
            assert torch.equal(v, ref.state_dict()[k]), k


def _trained_restorer_export(tmp_path: Path) -> tuple[str, dict]:
    """An exported restorer folder (keys under `restorer.`) of the SMALL joint ConStyle-NAFNet, with
    weights unlike a fresh one's (a fresh restorer's output conv is zero)."""
    src = make_stage("model.constyle_mode=joint")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in src.net.parameters():
            p.normal_(0, 0.1)
    folder = tmp_path / "restorer"
    folder.mkdir()
    state = {k: v.clone() for k, v in src.net.state_dict().items()}
    save_file({f"restorer.{k}": v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return str(folder), state


def test_pretrained_restorer_is_loaded_into_the_net_its_ema_and_key_encoder(tmp_path):
    """model.pretrained starts the restorer from released weights; model.constyle_weights, when
    given too, then replaces the encoder (the demo: the foundation restorer + its own encoder)."""
    from types import SimpleNamespace

    path, ref = _trained_restorer_export(tmp_path)
    stage = tiny_stage("restorer", *SMALL, "model.constyle_mode=joint", f"model.pretrained={path}", "optim.ema_decay=0.5")
    stage._trainer = SimpleNamespace(world_size=1)
    stage.setup("fit")
    for net in (stage.net, stage.ema.module):
        for k, v in net.state_dict().items():
            assert torch.equal(v, ref[k]), k
    for k, v in stage.moco.encoder_k.state_dict().items():
        assert torch.equal(v, ref[f"encoder.{k}"]), k
    enc_path, enc = _encoder_file(tmp_path, "ckpt")
    stage = tiny_stage("restorer", *SMALL, "model.constyle_mode=frozen", f"model.pretrained={path}",
                       f"model.constyle_weights={enc_path}")
    stage._trainer = SimpleNamespace(world_size=1)
    stage.setup("fit")
    assert torch.equal(stage.net.ending.weight, ref["ending.weight"])
    for k, v in stage.net.encoder.state_dict().items():
        assert torch.equal(v, enc.state_dict()[k]), k


def test_pretrained_restorer_of_another_size_is_one_line(tmp_path):
    from types import SimpleNamespace

    path, _ = _trained_restorer_export(tmp_path)
    stage = tiny_stage("restorer", *SMALL, "model.width=12", "model.constyle_mode=joint", f"model.pretrained={path}")
    stage._trainer = SimpleNamespace(world_size=1)
    with pytest.raises(WeightsError, match="restorer shapes differ") as e:
        stage.setup("fit")
    assert "\n" not in str(e.value)
    stage = tiny_stage("restorer", *SMALL, "model.arch=nafnet", f"model.pretrained={path}")
    stage._trainer = SimpleNamespace(world_size=1)
    with pytest.raises(WeightsError, match="not a NAFNet of this config"):
        stage.setup("fit")


def test_constyle_stage_starts_from_a_restorers_encoder(tmp_path):
    """The constyle stage's model.pretrained accepts a restorer export: its encoder goes into the
    query, key and EMA encoders (the demo fine-tunes the foundation restorer's encoder)."""
    from types import SimpleNamespace

    path, ref = _trained_restorer_export(tmp_path)
    stage = tiny_stage("constyle", "model.base_channels=4", "model.dim=16", "model.queue_size=32", "data.batch_size=4",
                       f"model.pretrained={path}", "optim.ema_decay=0.5")
    stage._trainer = SimpleNamespace(world_size=1)
    stage.setup("fit")
    for encoder in (stage.moco.encoder_q, stage.moco.encoder_k, stage.ema.module):
        for k, v in encoder.state_dict().items():
            if not k.startswith("classifier."):  # the stage's own head: a restorer has none
                assert torch.equal(v, ref[f"encoder.{k}"]), k


def test_plain_nafnet_baseline_trains():
    stage = make_stage("model.arch=nafnet", "model.enc_blocks=[1,1]", "model.dec_blocks=[1,1]", "model.loss=psnr")
    assert stage.moco is None and not hasattr(stage.net, "encoder")
    loss = stage.training_step(device_batch(stage), 0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert stage.export_modules()["restorer"] is stage.net


def _fit_overrides(sample_shards, tmp_path, *extra):
    return [*SMALL, f"out_dir={tmp_path / 'run'}", f"data.train={sample_shards}/train-{{000000..000003}}.tar",
            f"data.val={sample_shards}/val-000000.tar", "data.num_workers=0", "data.crop=32",
            "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", *extra]


def test_fit_tiny_config_joint(sample_shards, tmp_path):
    from lit_restore.fit import fit

    cfg = load_config(TINY, _fit_overrides(sample_shards, tmp_path))
    trainer = fit(cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 3
    assert math.isfinite(metrics["train/loss"]) and 5 < metrics["val/psnr"] < 60
    assert list((tmp_path / "run" / "samples").glob("val_restored_*.png"))


def test_fit_frozen_encoder_stays_bit_identical(sample_shards, tmp_path):
    from lit_restore.fit import fit

    path, ref = _encoder_file(tmp_path, "export")
    cfg = load_config(TINY, _fit_overrides(sample_shards, tmp_path, "model.constyle_mode=frozen",
                                           f"model.constyle_weights={path}", "optim.ema_decay=0.5",
                                           "model.frozen_encoder_bn=eval"))
    trainer = fit(cfg)
    stage = trainer.lightning_module
    assert trainer.global_step == 3
    for net in (stage.net, stage.ema.module):
        for k, v in net.encoder.state_dict().items():  # weights and BN running statistics
            assert torch.equal(v, ref.state_dict()[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(stage.net.intro.parameters(), stage.ema.module.intro.parameters()))


@pytest.mark.parametrize("stage_name,overrides", [("restorer", ("model.constyle_mode=joint",)), ("constyle", ())])
def test_encoders_under_the_moco_losses_get_syncbatchnorm_on_several_gpus(stage_name, overrides):
    from types import SimpleNamespace

    from lit_restore.fit import build_stage

    def batchnorms(sync: bool, world: int, device: str) -> list[type]:
        key = "model.constyle" if stage_name == "restorer" else "model"
        stage = build_stage(load_config(ROOT / "configs" / "tiny" / f"{stage_name}.yaml",
                                        [*overrides, f"{key}.sync_batchnorm={sync}"]))
        stage._trainer = SimpleNamespace(world_size=world, global_rank=0,
                                         strategy=SimpleNamespace(root_device=torch.device(device)))
        stage.configure_model()
        encoder = stage.net.encoder if stage_name == "restorer" else stage.moco.encoder_q
        return [type(m) for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    assert set(batchnorms(True, 2, "cuda")) == {torch.nn.SyncBatchNorm}
    for sync, world, device in ((False, 2, "cuda"), (True, 1, "cuda"), (True, 2, "cpu")):
        kinds = batchnorms(sync, world, device)
        assert kinds and torch.nn.SyncBatchNorm not in kinds, (sync, world, device)
