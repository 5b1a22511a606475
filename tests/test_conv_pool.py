"""engine::conv_pool_relu (CPU certification's fused convolution stages) against plain PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from engine import _ext, models
from engine.smoothing import ConvPoolReLU, fast_forward_model

pytestmark = pytest.mark.skipif(not _ext.available(), reason="engine._C not built")


def _reference(x, weight, bias, mean, std, dtype=torch.float64):
    """Normalize -> conv -> ReLU -> 2x2 max pool, in ``dtype``."""
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    h = F.conv2d((x - mean) / std, weight, bias)
    return F.max_pool2d(F.relu(h), 2)


@pytest.mark.parametrize(
    "batch,in_ch,hw,out_ch,k,normalize",
    [
        (9, 1, (28, 28), 20, 5, True),  # LeNet's first stage
        (6, 20, (12, 12), 50, 5, False),  # LeNet's second stage
        (3, 1, (13, 16), 7, 3, True),
        (2, 3, (9, 11), 33, 4, True),
        (1, 1, (6, 7), 1, 1, False),
        (5, 2, (2, 2), 4, 1, False),
        (17, 5, (10, 8), 16, 2, True),
        (4, 7, (15, 9), 13, 5, False),  # odd sizes: a dropped last row / column, channel and column tails
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])  # every compiled variant (native: AVX-512 if present)
def test_matches_float64_reference(batch, in_ch, hw, out_ch, k, normalize, layout, isa, monkeypatch):
    if isa != "native":
        monkeypatch.setenv("ENGINE_CPU_ISA", isa)
    mean, std = (0.1307, 0.3081) if normalize else (0.0, 1.0)
    g = torch.Generator().manual_seed(hash((batch, in_ch, hw, out_ch, k, layout)) % 2**31)
    x = torch.rand((batch, in_ch) + hw, generator=g) + 0.3 * torch.randn((batch, in_ch) + hw, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_ch, in_ch, k, k, generator=g) / (k * in_ch**0.5)
    bias = 0.1 * torch.randn(out_ch, generator=g)
    out = torch.ops.engine.conv_pool_relu(x, weight, bias, mean, std)
    ref = _reference(x, weight, bias, mean, std)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the float32 unfused layers differ from it by rounding only
    torch.testing.assert_close(out, _reference(x, weight, bias, mean, std, torch.float32), rtol=1e-5, atol=1e-5)
    assert bool((out >= 0).all()) and bool((out == 0).any() or out.numel() < 50)


def test_errors_name_the_op():
    x = torch.rand(2, 1, 8, 8)
    w, b = torch.randn(3, 1, 3, 3), torch.randn(3)
    for args, match in [
        ((torch.rand(2, 8, 8), w, b), "x must have shape"),
        ((torch.rand(2, 2, 8, 8), w, b), r"weight must have shape \(O, 2, kh, kw\)"),
        ((x, torch.randn(3, 2, 3, 3), b), "weight must have shape"),
        ((x, w, torch.randn(4)), "bias must have shape"),
        ((x.double(), w, b), "x, weight and bias must be float32"),
        ((torch.rand(2, 1, 3, 3), w, b), "a 3x3 input is too small"),
        ((x, torch.randn(0, 1, 3, 3), torch.randn(0)), "empty channels or kernel"),
    ]:
        with pytest.raises(RuntimeError, match="conv_pool_relu: " + match):
            torch.ops.engine.conv_pool_relu(*args, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="std must be positive"):
        torch.ops.engine.conv_pool_relu(x, w, b, 0.0, 0.0)
    assert torch.ops.engine.conv_pool_relu(x[:0], w, b, 0.0, 1.0).shape == (0, 3, 3, 3)


def test_opcheck():
    x = torch.rand(3, 1, 12, 12)
    torch.library.opcheck(torch.ops.engine.conv_pool_relu.default, (x, torch.randn(4, 1, 5, 5), torch.randn(4), 0.5, 0.25))
    x = torch.rand(2, 3, 9, 10).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.engine.conv_pool_relu.default, (x, torch.randn(5, 3, 3, 3), torch.randn(5), 0.0, 1.0))


def test_certification_model_uses_it_for_lenet_and_matches():
    torch.manual_seed(3)
    model = models.lenet_mnist().eval()
    fast = fast_forward_model(model, torch.device("cpu"), "auto")
    fused = [m for m in fast.modules() if isinstance(m, ConvPoolReLU)]
    assert [(m.conv.in_channels, m.conv.out_channels, m.mean) for m in fused] == [
        (1, 20, pytest.approx(models.MNIST_MEAN[0])), (20, 50, 0.0)
    ]  # both stages: the first with the model's Normalize
    x = torch.rand(37, 1, 28, 28) + 0.25 * torch.randn(37, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(x).double(), model.double()(x.double()), rtol=1e-4, atol=1e-4)
    # autograd input: the original layers run (same values, gradients flow)
    xg = x[:3].clone().requires_grad_(True)
    fused[0](xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():  # the fused stage equals its own original layers
        h = torch.rand(5, 20, 12, 12)
        torch.testing.assert_close(fused[1](h), fused[1].layers(h), rtol=1e-5, atol=1e-5)
    # a first layer that does not match the pattern is left alone
    other = torch.nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), torch.nn.Conv2d(1, 4, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3))
    assert not any(isinstance(m, ConvPoolReLU) for m in fast_forward_model(other, torch.device("cpu"), "auto").modules())


def test_fusion_finds_stages_anywhere():
    """Conv, pool, ReLU runs are fused in nested Sequentials and after other layers; the rest stays."""
    torch.manual_seed(5)
    inner = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.ReLU(),  # padded: not fused
        inner, torch.nn.Flatten(), torch.nn.Linear(6 * 2 * 2, 3),
    ).eval()
    fast = fast_forward_model(model, torch.device("cpu"), "auto")
    fused = [m for m in fast.modules() if isinstance(m, ConvPoolReLU)]
    assert [(m.conv.in_channels, m.conv.out_channels) for m in fused] == [(4, 6)]
    x = torch.rand(7, 2, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_engine_fused_0_keeps_onednn_layers(monkeypatch):
    """ENGINE_FUSED=0 (benchmark comparisons): the channels-last model without the fused stages, same values."""
    model = models.lenet_mnist().eval()
    monkeypatch.setenv("ENGINE_FUSED", "0")
    plain = fast_forward_model(model, torch.device("cpu"), "auto")
    assert not any(isinstance(m, ConvPoolReLU) for m in plain.modules())
    monkeypatch.setenv("ENGINE_FUSED", "1")
    fused = fast_forward_model(model, torch.device("cpu"), "auto")
    x = torch.rand(11, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
