import numpy as np
import onnxruntime as ort
import pytest
import torch

from lit_restore.models.nafnet import LayerNorm2d, NAFBlock, NAFNet


def tiny_net(**kw) -> NAFNet:
    torch.manual_seed(0)
    args = dict(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1))
    args.update(kw)
    return NAFNet(**args).eval()


def test_layernorm2d_matches_layernorm_over_channels():
    x = torch.randn(2, 5, 4, 3)
    ln = LayerNorm2d(5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, eps=ln.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_nafblock_starts_as_identity():
    # β/γ zero-init ("skip-init"): a fresh block passes its input through unchanged.
    block = NAFBlock(8)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), x)


def test_default_is_nafnet_width32_size():
    # NAFNet-width32 (GoPro recipe) has about 17.1 M parameters.
    n = sum(p.numel() for p in NAFNet().parameters())
    assert 16.5e6 < n < 17.5e6, n


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (5, 9)])
def test_odd_sizes_are_padded_and_cropped_back(size):
    net = tiny_net()
    x = torch.rand(2, 3, *size)
    y = net(x)
    assert y.shape == x.shape
    # The net pads with zeros internally: same result as running on an explicitly padded input.
    h, w = size
    xp = torch.nn.functional.pad(x, (0, (-w) % 4, 0, (-h) % 4))
    torch.testing.assert_close(net(xp)[..., :h, :w], y)


def test_global_residual_only_when_channels_match():
    assert tiny_net().residual
    assert not tiny_net(global_residual=False).residual
    net = tiny_net(in_channels=6, out_channels=3)
    assert not net.residual
    assert net(torch.rand(1, 6, 8, 8)).shape == (1, 3, 8, 8)


def test_mismatched_levels_raise():
    with pytest.raises(ValueError, match="same length"):
        NAFNet(enc_blocks=(1, 1), dec_blocks=(1,))


def test_gradients_reach_every_parameter():
    net = tiny_net().train()
    # Make β/γ non-zero so the block branches get gradients as well.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NAFBlock):
                m.beta.fill_(0.1)
                m.gamma.fill_(0.1)
    net(torch.rand(2, 3, 12, 12)).abs().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_onnx_export_dynamic_hw(tmp_path):
    net = tiny_net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NAFBlock):
                m.beta.normal_(0, 0.5)
                m.gamma.normal_(0, 0.5)
    path = tmp_path / "nafnet.onnx"
    example = torch.rand(2, 3, 32, 32)
    dims = {0: torch.export.Dim("b"), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.onnx.export(net, (example,), str(path), dynamo=True, dynamic_shapes={"x": dims},
                      input_names=["x"], output_names=["y"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 32, 32), (1, 3, 21, 37), (3, 3, 8, 13)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = net(x).numpy()
        (out,) = sess.run(None, {"x": x.numpy()})
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
