"""engine::conv_pool_relu (CPU certification's fused convolution stages) against plain PyTorch references."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_no_near_ties

import engine
from engine import _ext, models, noise
from engine.smoothing import ConvPoolReLU, fast_forward_model

pytestmark = pytest.mark.skipif(not _ext.available(), reason="engine._C not built")


# what each variant needs beyond the one below it (csrc/conv_pool_cpu.cpp, supported_level)
_FEATURES = {"avx512": "AVX-512 F/DQ/VL", "avx2": "AVX2 and FMA", "generic": None}


def use_isa(isa, monkeypatch):
    """Select ``isa``'s variant with ENGINE_CPU_ISA, skip when this CPU cannot run it, and check that it is the one
    that runs (the op lowers a request above what the CPU supports)."""
    best = _ext.cpu_isa(supported=True)
    if _ext.CPU_ISAS.index(isa) < _ext.CPU_ISAS.index(best):
        pytest.skip(f"this CPU lacks {_FEATURES[isa]}: the {isa} variant cannot run (best here: {best})")
    monkeypatch.setenv("ENGINE_CPU_ISA", isa)
    assert _ext.cpu_isa() == isa


def test_isa_selection(monkeypatch):
    """The variant in effect: the best this CPU supports unless ENGINE_CPU_ISA lowers it; requests above it are
    lowered to it; a misspelt request is an error, not a silent fallback."""
    best = _ext.cpu_isa(supported=True)
    assert best in _ext.CPU_ISAS
    for value in (None, "", "native"):
        if value is None:
            monkeypatch.delenv("ENGINE_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ENGINE_CPU_ISA", value)
        assert _ext.cpu_isa() == best and torch.ops.engine.cpu_isa() == best
    for i, isa in enumerate(_ext.CPU_ISAS):
        monkeypatch.setenv("ENGINE_CPU_ISA", isa)
        assert _ext.cpu_isa() == _ext.CPU_ISAS[max(i, _ext.CPU_ISAS.index(best))]
        assert _ext.cpu_isa(supported=True) == best
    x, w, b = torch.rand(2, 1, 8, 8), torch.randn(3, 1, 3, 3), torch.randn(3)
    for bad in ("AVX2", "sse"):
        monkeypatch.setenv("ENGINE_CPU_ISA", bad)
        with pytest.raises(RuntimeError, match=f"ENGINE_CPU_ISA must be one of native, avx512, avx2, generic; got '{bad}'"):
            torch.ops.engine.conv_pool_relu(x, w, b, 0.0, 1.0)
        with pytest.raises(RuntimeError, match="ENGINE_CPU_ISA must be one of"):
            _ext.cpu_isa()


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
@pytest.mark.parametrize("isa", _ext.CPU_ISAS)  # every compiled variant this CPU can run (the others skip)
def test_matches_float64_reference(batch, in_ch, hw, out_ch, k, normalize, layout, isa, monkeypatch):
    use_isa(isa, monkeypatch)
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


@pytest.mark.parametrize("isa", _ext.CPU_ISAS)
def test_certification_model_uses_it_for_lenet_and_matches(isa, monkeypatch):
    use_isa(isa, monkeypatch)
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


@pytest.mark.parametrize("isa", _ext.CPU_ISAS)
def test_certify_counts_equal_the_plain_model_with_every_variant(isa, monkeypatch):
    """engine.certify's CPU path (the fused stages, in each variant) counts as the plain model does: its sums run in
    another order, so the fixed data are first checked to hold no near-tie (float64)."""
    use_isa(isa, monkeypatch)
    torch.manual_seed(4)
    model = models.lenet_mnist().eval()
    with torch.no_grad():
        model[-1].weight.mul_(20)  # several classes occur under noise
    x = torch.rand(3, 1, 28, 28)
    kw = dict(sigma=0.5, n0=20, n=200, seed=6)
    assert_no_near_ties(model, x, torch.arange(3), {noise.STREAM_SELECTION: 20, noise.STREAM_ESTIMATION: 200},
                        seed=6, sigma=0.5)  # fmt: skip
    fast = engine.certify(model, x, backend="auto", **kw)
    plain = engine.certify(model, x, backend="torch", **kw)
    assert torch.equal(fast.counts_selection, plain.counts_selection)
    assert torch.equal(fast.counts_estimation, plain.counts_estimation)
    assert int((plain.counts_estimation > 0).sum(1).max()) >= 2, "model too confident for a meaningful test"


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
