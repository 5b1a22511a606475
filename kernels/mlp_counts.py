"""Fully fused MLP certification sampler: keyed noise -> Normalize -> 3 linear layers -> counts.

For an MLP of the ``engine.models.mlp_mnist`` form (``Normalize, Flatten, Linear, ReLU, Linear,
ReLU, Linear``, any sizes) one kernel generates the noisy input inside the first layer's K loop
(the noisy batch is never written to memory), keeps the first hidden layer in registers, runs
the second layer in column chunks, each immediately multiplied into the last layer, and counts
the argmax of the logits with atomics (the logits never reach memory either).

Rows are packed: the program's rows are global rows ``q = start + r`` of the image-major layout,
image ``q // num``, sample ``q % num``, valid while ``q < total`` -- exactly the rows of
``engine.smoothing.sample_counts``, so the noise is the keyed stream of :mod:`engine.noise`, bit
for bit (the Normalize division is ``tl.div_rn`` as in PyTorch, launched without FMA contraction).

Reference: :func:`mlp_counts_ref` (``engine.noise.noisy_batch_ref`` + the float32 PyTorch model +
argmax + ``index_add_``). With precision "fp32" (IEEE float32 dots) the counts equal the
reference's except for rows whose two top logits lie within float32 rounding of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from engine import noise as _noise
from engine.models import Normalize

from ._launch import gpu_sizing, next_pow2, require_runnable
from .class_counts import PRECISIONS, count_logits
from .philox_normal import EXACT, key_words, normal_pair, round_to

__all__ = ["MlpParams", "mlp_params", "mlp_counts", "mlp_counts_ref", "launch_mlp_counts"]


@triton.jit(do_not_specialize=["batch_rows", "start", "num", "total", "k0", "k1", "stream"])
def _mlp_counts_kernel(
    x_ptr,
    ids_ptr,
    mean_ptr,
    std_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    counts_ptr,
    bad_ptr,
    batch_rows,
    start,
    num,
    total,
    k0,
    k1,
    stream,
    sigma,
    D,
    H1,
    H2,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H1P: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q = start + r.to(tl.int64)
    ok = (r < batch_rows) & (q < total)
    slot = tl.where(ok, q // num, 0)
    sample = (q - slot * num).to(tl.uint32)
    image = tl.load(ids_ptr + slot, mask=ok, other=0).to(tl.uint32)
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    tag = stream.to(tl.uint32, bitcast=True)
    dot_dtype = w1_ptr.dtype.element_ty

    # layer 1: noise generated per K chunk, one Philox block per 4 pixels
    h1i = tl.arange(0, H1P)
    h1_ok = h1i < H1
    acc1 = tl.zeros((BLOCK_R, H1P), dtype=tl.float32)
    for kb in range(0, D, BLOCK_K):
        g = (kb // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
        z0, z1, z2, z3 = normal_pair(g[None, :], sample[:, None], image[:, None], tag, key0, key1)
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BLOCK_R, BLOCK_K))
        p = kb + tl.arange(0, BLOCK_K)
        p_ok = p < D
        m2 = ok[:, None] & p_ok[None, :]
        clean = tl.load(x_ptr + slot.to(tl.int64)[:, None] * D + p[None, :], mask=m2, other=0.0)
        noisy = clean + sigma * z  # the engine's noisy pixel, bit for bit
        mean = tl.load(mean_ptr + p, mask=p_ok, other=0.0)
        std = tl.load(std_ptr + p, mask=p_ok, other=1.0)
        xn = tl.where(p_ok[None, :], tl.div_rn(noisy - mean[None, :], std[None, :]), 0.0)
        w1 = tl.load(w1_ptr + h1i[None, :] * D + p[:, None], mask=h1_ok[None, :] & p_ok[:, None], other=0.0)
        acc1 = tl.dot(round_to(xn, dot_dtype), w1, acc1, input_precision=INPUT_PRECISION)
    b1 = tl.load(b1_ptr + h1i, mask=h1_ok, other=0.0)
    h1 = round_to(tl.maximum(acc1 + b1[None, :], 0.0), dot_dtype)

    # layers 2 and 3: column chunks of layer 2 go straight into the logits
    cls = tl.arange(0, BLOCK_C)
    c_ok = cls < C
    logits = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for nb in range(0, H2, BLOCK_N2):
        n2 = nb + tl.arange(0, BLOCK_N2)
        n2_ok = n2 < H2
        w2 = tl.load(w2_ptr + n2[None, :] * H1 + h1i[:, None], mask=n2_ok[None, :] & h1_ok[:, None], other=0.0)
        acc2 = tl.dot(h1, w2, input_precision=INPUT_PRECISION)
        b2 = tl.load(b2_ptr + n2, mask=n2_ok, other=0.0)
        h2 = round_to(tl.maximum(acc2 + b2[None, :], 0.0), dot_dtype)
        w3 = tl.load(w3_ptr + cls[None, :] * H2 + n2[:, None], mask=c_ok[None, :] & n2_ok[:, None], other=0.0)
        logits = tl.dot(h2, w3, logits, input_precision=INPUT_PRECISION)
    b3 = tl.load(b3_ptr + cls, mask=c_ok, other=0.0)
    logits = tl.where(c_ok[None, :], logits + b3[None, :], float("-inf"))
    count_logits(logits, cls, slot, ok, counts_ptr, bad_ptr, C, BLOCK_C)


@dataclass
class MlpParams:
    """Device copies of an MLP's parameters in the kernel's layout (weights in the dot dtype)."""

    mean: torch.Tensor  # (D,) float32, per pixel
    std: torch.Tensor  # (D,) float32, per pixel
    w1: torch.Tensor  # (H1, D)
    b1: torch.Tensor  # (H1,) float32
    w2: torch.Tensor  # (H2, H1)
    b2: torch.Tensor
    w3: torch.Tensor  # (C, H2)
    b3: torch.Tensor
    input_precision: str
    input_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return int(self.w3.shape[0])


def _layers(model: nn.Module):
    if not isinstance(model, nn.Sequential):
        return None
    mods = list(model)
    kinds = (Normalize, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear)
    if len(mods) != len(kinds) or not all(isinstance(m, k) for m, k in zip(mods, kinds)):
        return None
    if mods[1].start_dim != 1 or mods[1].end_dim != -1:
        return None
    return mods


def mlp_params(model: nn.Module, input_shape, precision: str = "fp32", device=None) -> MlpParams | None:
    """Kernel parameters of ``model`` if it is ``Normalize, Flatten, Linear, ReLU, Linear, ReLU, Linear``
    on inputs of ``input_shape`` (C, H, W); None for any other model."""
    mods = _layers(model)
    if mods is None or precision not in PRECISIONS:
        return None
    norm, _, l1, _, l2, _, l3 = mods
    channels = int(norm.mean.numel())
    pixels = 1
    for s in input_shape:
        pixels *= int(s)
    if len(input_shape) != 3 or int(input_shape[0]) != channels or l1.in_features != pixels:
        return None
    if l2.in_features != l1.out_features or l3.in_features != l2.out_features:
        return None
    dtype, input_precision = PRECISIONS[precision]
    device = l1.weight.device if device is None else torch.device(device)
    per_channel = pixels // channels

    def vec(t):
        return t.detach().to(device=device, dtype=torch.float32).flatten().repeat_interleave(per_channel).contiguous()

    def weight(layer):
        return layer.weight.detach().to(device=device, dtype=dtype).contiguous()

    def bias(layer):
        if layer.bias is None:
            return torch.zeros(layer.out_features, device=device)
        return layer.bias.detach().to(device=device, dtype=torch.float32).contiguous()

    return MlpParams(
        vec(norm.mean), vec(norm.std), weight(l1), bias(l1), weight(l2), bias(l2), weight(l3), bias(l3),
        input_precision, tuple(int(s) for s in input_shape),
    )  # fmt: skip


def _blocks(h1p: int, elem_bytes: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_N2, num_warps, num_stages).

    GPU: 16 rows per program keep the (16, H1) float32 accumulator at 64 registers per thread
    (8 warps) for H1 = 1024; the streamed weight tiles (BLOCK_K x H1 and H1 x BLOCK_N2) stay at
    64 KiB each, double-buffered, within an SM's shared memory for 2- and 4-byte operands.
    """
    if not gpu_sizing():
        return 256, 256, 64, 4, 1
    k = max(16, min(128, (32 * 1024 // h1p) * 2 // elem_bytes))
    return (16 if h1p >= 512 else 32), k, k, 8, 2


def launch_mlp_counts(params: MlpParams, x_flat, ids, counts, bad, *, start, rows, num, total, seed, stream, sigma) -> None:
    """Count rows ``start .. start + rows - 1`` of the packed layout into flat ``counts`` (B * C); no checks."""
    if rows <= 0:
        return
    h1, d = params.w1.shape
    h2 = params.w2.shape[0]
    c = params.num_classes
    h1p = max(16, next_pow2(h1))
    block_r, block_k, block_n2, warps, stages = _blocks(h1p, params.w1.element_size())
    k0, k1, tag = key_words(seed, stream)
    _mlp_counts_kernel[(triton.cdiv(rows, block_r),)](
        x_flat, ids, params.mean, params.std, params.w1, params.b1, params.w2, params.b2, params.w3, params.b3,
        counts, bad, rows, start, num, total, k0, k1, tag, float(sigma), d, h1, h2, c,
        BLOCK_R=block_r, BLOCK_K=block_k, H1P=h1p, BLOCK_N2=block_n2, BLOCK_C=max(16, next_pow2(c)),
        INPUT_PRECISION=params.input_precision, num_warps=warps, num_stages=stages, **EXACT,
    )  # fmt: skip


def _check(x, image_ids, num, seed, stream):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    ids = torch.as_tensor(image_ids, dtype=torch.int64)
    if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"image_ids must be a 1-D tensor with one id per image ({x.shape[0]}), got {tuple(ids.shape)}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    _noise._check_key(seed, stream)
    return ids


def mlp_counts(model, x, image_ids, num, *, seed, stream, sigma, precision="fp32") -> torch.Tensor:
    """Top-1 counts of an MLP over ``num`` keyed noisy samples of each image, in one fused kernel.

    Args:
        model: ``Normalize, Flatten, Linear, ReLU, Linear, ReLU, Linear`` (``engine.models.mlp_mnist``).
        x: (B, C, H, W) clean pixels; image_ids: (B,) int64 keys; num: samples per image.
        seed, stream, sigma: the noise key and scale (engine.noise).
        precision: "fp32" (IEEE), "tf32", "bf16" or "fp16" dot operands (float32 accumulation).

    Returns:
        (B, num_classes) int64 counts on x's device.
    """
    ids = _check(x, image_ids, num, seed, stream)
    require_runnable(x.device, "engine.kernels.mlp_counts")
    params = mlp_params(model, tuple(x.shape[1:]), precision, device=x.device)
    if params is None:
        raise ValueError("mlp_counts: model must be Sequential(Normalize, Flatten, Linear, ReLU, Linear, ReLU, Linear) "
                         f"matching inputs {tuple(x.shape[1:])} (and precision one of {tuple(PRECISIONS)})")
    batch = x.shape[0]
    counts = torch.zeros(batch * params.num_classes, dtype=torch.int64, device=x.device)
    bad = torch.zeros(1, dtype=torch.int32, device=x.device)
    x_flat = x.detach().to(torch.float32).reshape(batch, -1).contiguous()
    total = batch * num
    launch_mlp_counts(params, x_flat, ids.to(x.device), counts, bad, start=0, rows=total, num=num, total=total,
                      seed=seed, stream=stream, sigma=sigma)
    if int(bad.item()):
        raise ValueError("model output contains NaN or infinite logits")
    return counts.view(batch, params.num_classes)


def mlp_counts_ref(model, x, image_ids, num, *, seed, stream, sigma) -> torch.Tensor:
    """Plain-PyTorch reference: ``noisy_batch_ref`` rows, float32 model, argmax, index_add."""
    from .class_counts import class_counts_ref

    ids = _check(x, image_ids, num, seed, stream)
    batch = x.shape[0]
    rows = torch.arange(batch * num, dtype=torch.int64, device=x.device)
    row_image = rows // num
    noisy = _noise.noisy_batch_ref(x, row_image, rows - row_image * num, ids.to(x.device), seed=seed, stream=stream,
                                   sigma=sigma)
    with torch.no_grad():
        logits = model(noisy)
    return class_counts_ref(logits, row_image, batch)
