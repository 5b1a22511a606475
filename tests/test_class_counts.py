"""Device class counting: argmax + histogram kernels and the last-linear fusion against their references."""

import pytest
import torch
from engine.kernels import class_counts as cc
from engine.kernels.packed_rows import packed_rows_ref
from kernel_testing import MIN_GAP, gpu, top2_gap


@pytest.mark.parametrize("rows,classes,images", [(1000, 10, 3), (7, 3, 2), (513, 100, 5), (300, 1, 1), (600, 17, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_class_counts_equal_reference(rows, classes, images, dtype):
    gen = torch.Generator().manual_seed(rows * 131 + classes)
    logits = torch.randn(rows, classes, generator=gen).to(dtype)
    logits[::5, -1] = logits[::5].max(1).values  # exact ties: the lowest index must win
    logits[1::7] = 0.0  # all-equal rows -> class 0
    sorted_rows = torch.sort(torch.randint(0, images, (rows,), generator=gen)).values  # image-major (one-image programs)
    shuffled = torch.randint(0, images, (rows,), generator=gen)  # mixed programs (per-row atomics)
    for row_image in (sorted_rows, shuffled):
        got = cc.class_counts(logits, row_image, images).cpu()
        want = cc.class_counts_ref(logits, row_image, images)
        assert got.dtype == torch.int64 and got.shape == (images, classes)
        assert torch.equal(got, want)
        assert int(got.sum()) == rows


def test_class_counts_strided_logits_and_packed_rows():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(700, 24, generator=gen)
    logits = wide[:, 3:13]  # row stride 24
    counts = torch.zeros(4 * 10, dtype=torch.int64)
    bad = torch.zeros(1, dtype=torch.int32)
    start, num, total = 150, 200, 800  # image-major rows 150..849 of 4 images x 200, last 50 are padding
    cc.launch_class_counts(logits, counts, bad, packed=(start, num, total))
    ri, _, valid = packed_rows_ref(start, 700, num, total)
    want = cc.class_counts_ref(logits[valid], ri[valid], 4)
    assert torch.equal(counts.view(4, 10), want) and int(bad) == 0


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise(bad_value):
    logits = torch.randn(50, 4)
    logits[17, 2] = bad_value
    with pytest.raises(ValueError, match="NaN or infinite"):
        cc.class_counts(logits, torch.zeros(50, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cc.class_counts_ref(logits, torch.zeros(50, dtype=torch.int64), 1)


def test_padding_rows_with_garbage_are_ignored():
    logits = torch.randn(64, 5)
    logits[40:] = float("nan")  # padding rows of a fixed-shape batch may hold anything
    counts = torch.zeros(2 * 5, dtype=torch.int64)
    bad = torch.zeros(1, dtype=torch.int32)
    cc.launch_class_counts(logits, counts, bad, packed=(0, 20, 40))
    assert int(bad) == 0 and int(counts.sum()) == 40


@pytest.mark.parametrize("rows,features,classes", [(300, 37, 10), (129, 64, 3), (64, 500, 10), (5, 16, 33)])
def test_linear_counts_equal_reference(rows, features, classes):
    # fp32: float32 products, float32 sums in another order than F.linear; the fixed data have
    # top-2 gaps >= MIN_GAP (checked in float64), so equal counts are required.
    gen = torch.Generator().manual_seed(rows + features)
    h = torch.randn(rows, features, generator=gen)
    w = torch.randn(classes, features, generator=gen)
    b = torch.randn(classes, generator=gen)
    row_image = torch.randint(0, 3, (rows,), generator=gen)
    if classes > 1:
        assert top2_gap(h.double() @ w.double().T + b.double()) > MIN_GAP
    got = cc.linear_counts(h, w, b, row_image, 3).cpu()
    assert torch.equal(got, cc.linear_counts_ref(h, w, b, row_image, 3))
    # reduced precision: counts move only by the rows whose argmax the rounding changes
    half = cc.linear_counts(h, w, b, row_image, 3, precision="fp16")
    assert int(half.sum()) == rows
    assert int((half.cpu() - got.cpu()).abs().sum()) <= max(2, rows // 20)


def test_linear_counts_without_bias_and_errors():
    h, w = torch.randn(40, 8), torch.randn(4, 8)
    ri = torch.zeros(40, dtype=torch.int64)
    assert torch.equal(cc.linear_counts(h, w, None, ri, 1), cc.linear_counts_ref(h, w, None, ri, 1))
    with pytest.raises(ValueError, match="weight"):
        cc.linear_counts(h, torch.randn(4, 9), None, ri, 1)
    with pytest.raises(ValueError, match="precision"):
        cc.linear_counts(h, w, None, ri, 1, precision="int8")
    with pytest.raises(ValueError, match="row_image values"):
        cc.class_counts(torch.randn(40, 4), ri + 1, 1)
    with pytest.raises(ValueError, match="row_image has"):
        cc.class_counts(torch.randn(41, 4), ri, 1)


@gpu
def test_cuda_bf16_linear_counts_close_to_fp32():
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(20000, 64, generator=gen).cuda()
    w, b = torch.randn(10, 64, generator=gen).cuda(), torch.randn(10, generator=gen).cuda()
    ri = (torch.arange(20000) // 5000).cuda()
    fp32 = cc.linear_counts(h, w, b, ri, 4)
    assert torch.equal(fp32.cpu(), cc.linear_counts_ref(h, w, b, ri, 4).cpu()) or top2_gap(
        h.double() @ w.double().T + b.double()
    ) < MIN_GAP
    bf16 = cc.linear_counts(h, w, b, ri, 4, precision="bf16")
    # bf16 operands move logits by ~1e-2 relative: a few percent of near-tied rows at most
    assert int((bf16 - fp32).abs().sum()) < 0.05 * 20000
