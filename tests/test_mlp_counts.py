"""Fully fused MLP sampler (noise -> 3 layers -> counts in one kernel) against its reference.

Equal counts are demanded in fp32: the fused kernel sums in another order than PyTorch, so a row's
argmax could differ only if its two top logits were within ~1e-6 of each other; every test first
checks in float64 that the fixed test rows have top-2 gaps >= MIN_GAP (see tests/fp_margins.py).
"""

import pytest
import torch
from engine.kernels import mlp_counts as mc
from kernel_testing import MIN_GAP, float64_logits, gpu, packed_noisy_rows, top2_gap
from torch import nn

from engine import models


def _mlp(seed, hidden=48, shape=(1, 28, 28), classes=10, mean=(0.1307,), std=(0.3081,)):
    torch.manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    model = nn.Sequential(
        models.Normalize(mean, std), nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden + 5),
        nn.ReLU(), nn.Linear(hidden + 5, classes),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[-1].weight.mul_(20)  # spread the logits: several classes occur under noise
    return model


CASES = [
    ("mnist", dict(hidden=48), (1, 28, 28), 3, 120),
    ("odd", dict(hidden=20, shape=(3, 5, 7), classes=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7)), (3, 5, 7), 2, 150),
]


@pytest.mark.parametrize("name,kwargs,shape,images,num", CASES, ids=[c[0] for c in CASES])
def test_fused_mlp_counts_equal_reference(name, kwargs, shape, images, num):
    model = _mlp(1, **kwargs)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand((images,) + shape, generator=gen)
    ids = torch.tensor([3, 2**32 - 1, 70][:images])
    key = dict(seed=2**40 + 3, stream=1, sigma=0.5)
    batch, _ = packed_noisy_rows(x, ids, num, **key)
    assert top2_gap(float64_logits(model, batch)) > MIN_GAP
    want = mc.mlp_counts_ref(model, x, ids, num, **key)
    got = mc.mlp_counts(model, x, ids, num, **key).cpu()
    assert torch.equal(got, want)
    assert int((want > 0).sum(1).min()) >= 2, "model too confident for a meaningful test"
    half = mc.mlp_counts(model, x, ids, num, precision="fp16", **key).cpu()
    assert int(half.sum()) == images * num
    assert int((half - want).abs().sum()) <= max(4, images * num // 50)


def test_the_standard_architecture_is_recognised():
    model = models.mlp_mnist(hidden=32)
    params = mc.mlp_params(model, (1, 28, 28))
    assert params is not None and params.w1.shape == (32, 784) and params.num_classes == 10
    assert mc.mlp_params(model, (1, 28, 27)) is None  # wrong input size
    assert mc.mlp_params(models.lenet_mnist(), (1, 28, 28)) is None
    assert mc.mlp_params(nn.Sequential(*list(model)[:-1]), (1, 28, 28)) is None


def test_errors():
    model = models.lenet_mnist()
    with pytest.raises(ValueError, match="Sequential"):
        mc.mlp_counts(model, torch.rand(1, 1, 28, 28), torch.tensor([0]), 10, seed=0, stream=0, sigma=0.5)
    with pytest.raises(ValueError, match="image_ids"):
        mc.mlp_counts(models.mlp_mnist(hidden=16), torch.rand(2, 1, 28, 28), torch.tensor([0]), 10, seed=0, stream=0,
                      sigma=0.5)


@gpu
def test_cuda_full_size_mlp():
    # the real mlp_mnist (hidden 1024): fp32 (IEEE dots) equal to the reference given the margin
    # check, bf16 within a small number of flipped rows
    model = _mlp(2, hidden=1024).cuda()
    x = torch.rand(2, 1, 28, 28)
    ids = torch.tensor([5, 6])
    key = dict(seed=77, stream=1, sigma=0.25)
    want = mc.mlp_counts_ref(model.cpu(), x, ids, 3000, **key)
    batch, _ = packed_noisy_rows(x, ids, 3000, **key)
    got = mc.mlp_counts(model.cuda(), x.cuda(), ids, 3000, **key).cpu()
    if top2_gap(float64_logits(model.cpu(), batch)) > MIN_GAP:
        assert torch.equal(got, want)
    bf16 = mc.mlp_counts(model.cuda(), x.cuda(), ids, 3000, precision="bf16", **key).cpu()
    assert int((bf16 - want).abs().sum()) < 0.05 * 6000  # a broken path would move most samples
