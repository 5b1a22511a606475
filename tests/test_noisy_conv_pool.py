"""First conv layer from in-kernel noise (noise -> Normalize -> conv -> ReLU -> maxpool) against its reference."""

import pytest
import torch
from engine.kernels import noisy_conv_pool as ncp
from kernel_testing import gpu
from torch import nn

from engine import models


def _odd_net():
    torch.manual_seed(5)
    return nn.Sequential(
        models.Normalize((0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), nn.Conv2d(3, 7, (3, 4)), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(7 * 4 * 3, 5),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("net,shape,num,start,rows", [("lenet", (1, 28, 28), 50, 17, 40), ("odd", (3, 11, 10), 7, 0, None)])
def test_equals_reference(net, shape, num, start, rows):
    torch.manual_seed(0)
    model = models.lenet_mnist().eval() if net == "lenet" else _odd_net()
    x = torch.rand((2,) + shape)
    ids = torch.tensor([5, 2**32 - 1])
    key = dict(seed=2**40 + 3, stream=1, sigma=0.5)
    want = ncp.noisy_conv_pool_ref(model, x, ids, num, start=start, rows=rows, **key)
    got = ncp.noisy_conv_pool(model, x, ids, num, start=start, rows=rows, **key).cpu()
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    # same noisy pixels (bit-exact stream), float32 conv summed in another order: ~1e-7 relative
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 2e-6 * scale
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 8e-3)):
        low = ncp.noisy_conv_pool(model, x, ids, num, start=start, rows=rows, dtype=dtype, **key)
        assert low.dtype == dtype
        assert float((low.float().cpu() - want).abs().max()) <= tol * scale


def test_expanded_weights_reproduce_conv_then_pool():
    # the GEMM form of the module docstring, in float64, against F.conv2d + max_pool2d
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 2, 3, 2, generator=gen, dtype=torch.float64)
    img = torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(img, w)  # (1, 6, 7, 7)
    wd = ncp.expand_weights(w)  # (4, 2*4*3, 6)
    for ph in range(3):
        for pw in range(3):
            patch = img[0, :, 2 * ph : 2 * ph + 4, 2 * pw : 2 * pw + 3].reshape(-1)
            for d, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                torch.testing.assert_close(patch @ wd[d], conv[0, :, 2 * ph + dy, 2 * pw + dx], rtol=1e-12, atol=1e-12)


def test_supported_prefixes():
    assert ncp.match_prefix(models.lenet_mnist()) is not None
    assert ncp.match_prefix(models.mlp_mnist()) is None
    assert ncp.match_prefix(models.resnet_cifar(20)) is None
    padded = models.lenet_mnist()
    padded[1] = nn.Conv2d(1, 20, 5, padding=1)
    assert ncp.match_prefix(padded) is None
    pool3 = models.lenet_mnist()
    pool3[3] = nn.MaxPool2d(3)
    assert ncp.match_prefix(pool3) is None
    with pytest.raises(ValueError, match="must start"):
        ncp.noisy_conv_pool(models.mlp_mnist(), torch.rand(1, 1, 28, 28), torch.tensor([0]), 2, seed=0, stream=0, sigma=0.1)


@gpu
def test_cuda_lenet_first_layer():
    model = models.lenet_mnist().eval()
    x = torch.rand(3, 1, 28, 28)
    ids = torch.tensor([1, 2, 3])
    key = dict(seed=123, stream=0, sigma=0.25)
    want = ncp.noisy_conv_pool_ref(model, x, ids, 2000, **key)
    got = ncp.noisy_conv_pool(model.cuda(), x.cuda(), ids, 2000, **key).cpu()
    assert float((got - want).abs().max()) <= 2e-6 * float(want.abs().max())
    bf16 = ncp.noisy_conv_pool(model.cuda(), x.cuda(), ids, 2000, precision="bf16", dtype=torch.bfloat16, **key).cpu()
    assert float((bf16.float() - want).abs().max()) <= 3e-2 * float(want.abs().max())
