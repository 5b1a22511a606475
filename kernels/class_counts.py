"""Class counting on the device: logits -> argmax -> per-image class histogram (atomics).

Two ops, each with its plain-PyTorch reference:

- :func:`class_counts` (ref :func:`class_counts_ref`): (R, K) logits of rows belonging to images
  ``row_image`` -> (B, K) int64 top-1 counts. Ties go to the lowest class index, as in
  ``torch.argmax``.
- :func:`linear_counts` (ref :func:`linear_counts_ref`): the last linear layer fused with the
  counting, ``counts += onehot(argmax(h @ W.T + b))``, so the logits never reach memory.

A program takes BLOCK_R rows. When all its rows belong to one image (the usual case: the engine
lays rows out image-major) it adds a per-program histogram with at most K atomics, otherwise one
atomic per row. Rows with a NaN or infinite logit are counted in a separate flag so that the caller
can refuse them (the engine raises ``ValueError`` as its plain path does).

The engine calls the launchers :func:`launch_class_counts` / :func:`launch_linear_counts` with a
*packed* row layout instead of an index tensor: row r of a forward batch is global row
``q = start + r`` of the image-major layout, i.e. image ``q // num``, valid while ``q < total``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import as_index, gpu_sizing, next_pow2, require_runnable
from .packed_rows import rows_of

__all__ = [
    "class_counts",
    "class_counts_ref",
    "linear_counts",
    "linear_counts_ref",
    "launch_class_counts",
    "launch_linear_counts",
    "PRECISIONS",
]

# dot precision of the fused kernels: name -> (operand dtype, Triton input_precision for float32)
PRECISIONS = {
    "fp32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "bf16": (torch.bfloat16, "ieee"),
    "fp16": (torch.float16, "ieee"),
}


@triton.jit
def count_logits(logits, cls, slot, ok, counts_ptr, bad_ptr, num_classes, BLOCK_C: tl.constexpr):
    """Add the argmax of each valid row of float32 ``logits`` (R, BLOCK_C) to ``counts[slot, :]``.

    Columns ``cls >= num_classes`` must hold -inf. Rows with a non-finite logit go to ``bad``.
    """
    col_ok = cls < num_classes
    nonfinite = ((logits != logits) | (tl.abs(logits) == float("inf"))) & col_ok[None, :]
    bad_rows = tl.sum(nonfinite.to(tl.int32), axis=1) > 0
    n_bad = tl.sum((bad_rows & ok).to(tl.int32), axis=0)
    if n_bad > 0:
        tl.atomic_add(bad_ptr, n_bad)
    pred = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int64)
    lo = tl.min(tl.where(ok, slot, 2**62), axis=0)
    hi = tl.max(tl.where(ok, slot, -1), axis=0)
    if lo == hi:  # one image in this program: histogram, then at most BLOCK_C atomics
        onehot = (pred[:, None] == cls[None, :]) & ok[:, None]
        hist = tl.sum(onehot.to(tl.int64), axis=0)
        tl.atomic_add(counts_ptr + lo * num_classes + cls, hist, mask=col_ok & (hist > 0))
    else:
        ones = tl.full(pred.shape, 1, tl.int64)
        tl.atomic_add(counts_ptr + slot * num_classes + pred, ones, mask=ok)


@triton.jit(do_not_specialize=["batch_rows", "start", "num", "total"])
def _class_counts_kernel(
    logits_ptr,
    stride_r,
    row_image_ptr,
    counts_ptr,
    bad_ptr,
    batch_rows,
    num_classes,
    start,
    num,
    total,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PACKED: tl.constexpr,
):
    r, slot, _, ok = rows_of(tl.program_id(0), row_image_ptr, row_image_ptr, start, num, total, batch_rows, BLOCK_R,
                             PACKED)
    cls = tl.arange(0, BLOCK_C)
    ptrs = logits_ptr + r.to(tl.int64)[:, None] * stride_r + cls[None, :]
    mask = ok[:, None] & (cls < num_classes)[None, :]
    logits = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    count_logits(logits, cls, slot, ok, counts_ptr, bad_ptr, num_classes, BLOCK_C)


@triton.jit
def linear_logits(h_ptr, stride_h, r, ok, w_ptr, b_ptr, in_features, num_classes, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """float32 logits (BLOCK_R, BLOCK_C) = h[r] @ W.T + b, -inf in the padding columns."""
    cls = tl.arange(0, BLOCK_C)
    col_ok = cls < num_classes
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < in_features
        a = tl.load(h_ptr + r.to(tl.int64)[:, None] * stride_h + kk[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cls[None, :] * in_features + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
    bias = tl.load(b_ptr + cls, mask=col_ok, other=0.0)
    return tl.where(col_ok[None, :], acc + bias[None, :], float("-inf"))


@triton.jit(do_not_specialize=["batch_rows", "start", "num", "total"])
def _linear_counts_kernel(
    h_ptr,
    stride_h,
    w_ptr,
    b_ptr,
    row_image_ptr,
    counts_ptr,
    bad_ptr,
    batch_rows,
    in_features,
    num_classes,
    start,
    num,
    total,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr,
):
    r, slot, _, ok = rows_of(tl.program_id(0), row_image_ptr, row_image_ptr, start, num, total, batch_rows, BLOCK_R,
                             PACKED)
    logits = linear_logits(h_ptr, stride_h, r, ok, w_ptr, b_ptr, in_features, num_classes, BLOCK_R, BLOCK_K,
                           BLOCK_C, INPUT_PRECISION)
    count_logits(logits, tl.arange(0, BLOCK_C), slot, ok, counts_ptr, bad_ptr, num_classes, BLOCK_C)


# ----------------------------------------------------------------------------------------------
# launchers (engine) and public ops
# ----------------------------------------------------------------------------------------------


def _block_r() -> int:
    return 64 if gpu_sizing() else 256


def _block_c(num_classes: int) -> int:
    return max(16, next_pow2(num_classes))


def _row_args(row_image, packed, rows, counts):
    """(index tensor, start, num, total, PACKED) kernel arguments; ``counts`` stands in for the
    unused index pointer of the packed layout."""
    if packed is None:
        return row_image, 0, 1, rows, False
    start, num, total = packed
    return counts, start, num, total, True


def launch_class_counts(logits, counts, bad, *, row_image=None, packed=None) -> None:
    """Add the top-1 counts of ``logits`` (R, K) to the flat int64 ``counts`` (B * K); no checks.

    Rows: ``row_image`` (R,) int64 slots, or ``packed = (start, num, total)``. ``bad`` is an int32
    (1,) tensor that receives the number of rows with non-finite logits.
    """
    rows, num_classes = logits.shape
    if rows == 0:
        return
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    index, start, num, total, is_packed = _row_args(row_image, packed, rows, counts)
    block_r = _block_r()
    _class_counts_kernel[(triton.cdiv(rows, block_r),)](
        logits, logits.stride(0), index, counts, bad, rows, num_classes, start, num, total,
        BLOCK_R=block_r, BLOCK_C=_block_c(num_classes), PACKED=is_packed, num_warps=4,
    )  # fmt: skip


def launch_linear_counts(h, weight, bias, counts, bad, *, input_precision="ieee", row_image=None, packed=None) -> None:
    """Fused ``argmax(h @ weight.T + bias)`` counting into ``counts`` (see :func:`launch_class_counts`).

    ``weight`` (K, F) is already in the dot's operand dtype (``h`` is cast to it in the kernel),
    ``bias`` (K,) float32.
    """
    rows, in_features = h.shape
    if rows == 0:
        return
    if h.stride(1) != 1:
        h = h.contiguous()
    num_classes = weight.shape[0]
    index, start, num, total, is_packed = _row_args(row_image, packed, rows, counts)
    block_r = _block_r()
    block_k = min(64, max(16, next_pow2(in_features)))
    _linear_counts_kernel[(triton.cdiv(rows, block_r),)](
        h, h.stride(0), weight, bias, index, counts, bad, rows, in_features, num_classes, start, num, total,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_C=_block_c(num_classes), INPUT_PRECISION=input_precision,
        PACKED=is_packed, num_warps=4,
    )  # fmt: skip


def _check_counts_args(logits_or_h, row_image, num_images, name):
    if not isinstance(logits_or_h, torch.Tensor) or logits_or_h.dim() != 2 or not logits_or_h.is_floating_point():
        got = getattr(logits_or_h, "shape", type(logits_or_h))
        raise ValueError(f"{name} must be a floating (R, features) tensor, got {got}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
    row_image = as_index("row_image", row_image, logits_or_h.device)
    if row_image.shape[0] != logits_or_h.shape[0]:
        raise ValueError(f"row_image has {row_image.shape[0]} entries, {name} has {logits_or_h.shape[0]} rows")
    if row_image.numel() and (int(row_image.min()) < 0 or int(row_image.max()) >= num_images):
        raise ValueError(f"row_image values must lie in [0, {num_images})")
    return row_image


def _finish(counts, bad, num_images, num_classes):
    if int(bad.item()):
        raise ValueError(f"model output contains NaN or infinite logits ({int(bad.item())} rows)")
    return counts.view(num_images, num_classes)


def class_counts_ref(logits: torch.Tensor, row_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """Plain-PyTorch reference: (B, K) int64 counts of ``logits.argmax(1)`` per image ``row_image``."""
    row_image = _check_counts_args(logits, row_image, num_images, "logits")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("model output contains NaN or infinite logits")
    num_classes = logits.shape[1]
    counts = torch.zeros(num_images * num_classes, dtype=torch.int64, device=logits.device)
    pred = logits.argmax(dim=1)
    counts.index_add_(0, row_image * num_classes + pred, torch.ones_like(pred))
    return counts.view(num_images, num_classes)


def class_counts(logits: torch.Tensor, row_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """Top-1 class counts per image on the device (Triton).

    Args:
        logits: (R, K) float32 / float16 / bfloat16 logits.
        row_image: (R,) int64, the image (in [0, num_images)) of each row.
        num_images: B.

    Returns:
        (B, K) int64 counts, equal to :func:`class_counts_ref` (ties -> lowest class index).

    Raises:
        ValueError: on NaN or infinite logits.
    """
    row_image = _check_counts_args(logits, row_image, num_images, "logits")
    require_runnable(logits.device, "engine.kernels.class_counts")
    num_classes = logits.shape[1]
    counts = torch.zeros(num_images * num_classes, dtype=torch.int64, device=logits.device)
    bad = torch.zeros(1, dtype=torch.int32, device=logits.device)
    launch_class_counts(logits, counts, bad, row_image=row_image)
    return _finish(counts, bad, num_images, num_classes)


def linear_counts_ref(h, weight, bias, row_image, num_images) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`linear_counts` (float32 ``F.linear``, argmax, index_add)."""
    logits = torch.nn.functional.linear(h.float(), weight.float(), None if bias is None else bias.float())
    return class_counts_ref(logits, row_image, num_images)


def linear_counts(h, weight, bias, row_image, num_images, *, precision: str = "fp32") -> torch.Tensor:
    """Last linear layer fused with the class counting: the (R, K) logits never reach memory.

    Args:
        h: (R, F) features (input of the last ``nn.Linear``), any float dtype.
        weight: (K, F), bias: (K,) or None, the layer's parameters.
        row_image: (R,) int64 image of each row; num_images: B.
        precision: dot precision, one of :data:`PRECISIONS` ("fp32" is IEEE float32 products with
            float32 accumulation; "tf32", "bf16", "fp16" round the operands first).

    Returns:
        (B, K) int64 counts. With "fp32" they equal :func:`linear_counts_ref` except where two
        logits of a row lie within float32 rounding of each other (different summation order).
    """
    row_image = _check_counts_args(h, row_image, num_images, "h")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be (K, {h.shape[1]}), got {getattr(weight, 'shape', type(weight))}")
    require_runnable(h.device, "engine.kernels.linear_counts")
    dtype, input_precision = PRECISIONS[precision]
    num_classes = weight.shape[0]
    w = weight.detach().to(device=h.device, dtype=dtype).contiguous()
    b = torch.zeros(num_classes, device=h.device) if bias is None else bias.detach().to(h.device, torch.float32).contiguous()
    counts = torch.zeros(num_images * num_classes, dtype=torch.int64, device=h.device)
    bad = torch.zeros(1, dtype=torch.int32, device=h.device)
    launch_linear_counts(h.detach(), w, b, counts, bad, input_precision=input_precision, row_image=row_image)
    return _finish(counts, bad, num_images, num_classes)
