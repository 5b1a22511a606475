"""First layer of a LeNet-like net computed from in-kernel noise: noise -> Normalize -> conv -> ReLU -> 2x2 maxpool.

For a net that starts ``Normalize, Conv2d (stride 1, no padding), ReLU, MaxPool2d(2)`` (as
``engine.models.lenet_mnist``), one kernel evaluates the keyed noise of the pixels each pooled
output needs, normalises them and computes the pooled, rectified convolution; the noisy input is
never written to memory. Output: (R, C_out, PH, PW) in channels-last memory (what cuDNN's next
convolution prefers), in float32, float16 or bfloat16.

Conv + pool as one GEMM per pool offset: pooled output (ph, pw) reads the (KH+1) x (KW+1) patch
at (2 ph, 2 pw) of every input channel; for each of the four pool offsets d = (dy, dx) an expanded
weight matrix ``W_d[(ci, u, v), co] = W[co, ci, u - dy, v - dx]`` (zero outside the kernel) gives
the convolution at (2 ph + dy, 2 pw + dx), so ``out = relu(max_d(patch @ W_d) + b)``. The patch is
evaluated once per pooled output (36 noise values for LeNet's 5x5 kernel instead of 4 x 25).

Rows are packed as in :mod:`engine.kernels.mlp_counts` (global row ``start + r``, image ``q // num``,
sample ``q % num``), so the noise is the engine's stream bit for bit. Reference:
:func:`noisy_conv_pool_ref` (``noisy_batch_ref`` + ``F.conv2d`` + ``relu`` + ``max_pool2d`` in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from engine import noise as _noise
from engine.models import Normalize

from ._launch import gpu_sizing, next_pow2, require_runnable
from .class_counts import PRECISIONS
from .philox_normal import EXACT, key_words, pixel_normal, round_to

__all__ = ["ConvPoolParams", "conv_pool_params", "noisy_conv_pool", "noisy_conv_pool_ref", "launch_noisy_conv_pool"]


@triton.jit(do_not_specialize=["batch_rows", "start", "num", "total", "k0", "k1", "stream"])
def _noisy_conv_pool_kernel(
    x_ptr,
    ids_ptr,
    mean_ptr,
    std_ptr,
    wd_ptr,
    bias_ptr,
    out_ptr,
    batch_rows,
    start,
    num,
    total,
    k0,
    k1,
    stream,
    sigma,
    C_IN,
    H,
    W,
    PH,
    PW,
    C_OUT,
    PATCH_H: tl.constexpr,
    PATCH_W: tl.constexpr,
    PATCH_P: tl.constexpr,
    CO_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    npos = PH * PW
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = m // npos
    pos = m - r * npos
    ph = pos // PW
    pw = pos - ph * PW
    q = start + r.to(tl.int64)
    ok = (r < batch_rows) & (q < total)
    slot = tl.where(ok, q // num, 0)
    sample = (q - slot * num).to(tl.uint32)
    image = tl.load(ids_ptr + slot, mask=ok, other=0).to(tl.uint32)

    j = tl.arange(0, PATCH_P)
    ci = j // (PATCH_H * PATCH_W)
    u = (j // PATCH_W) % PATCH_H
    v = j % PATCH_W
    j_ok = ci < C_IN
    iy = 2 * ph[:, None] + u[None, :]
    ix = 2 * pw[:, None] + v[None, :]
    pixel = ci[None, :] * (H * W) + iy * W + ix
    pixel = tl.where(j_ok[None, :], pixel, 0)
    m2 = ok[:, None] & j_ok[None, :]
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    tag = stream.to(tl.uint32, bitcast=True)
    z = pixel_normal(pixel.to(tl.uint32), sample[:, None], image[:, None], tag, key0, key1)
    clean = tl.load(x_ptr + slot.to(tl.int64)[:, None] * (C_IN * H * W) + pixel, mask=m2, other=0.0)
    noisy = clean + sigma * z  # the engine's noisy pixel, bit for bit
    mean = tl.load(mean_ptr + ci, mask=j_ok, other=0.0)
    std = tl.load(std_ptr + ci, mask=j_ok, other=1.0)
    patch = tl.where(m2, tl.div_rn(noisy - mean[None, :], std[None, :]), 0.0)
    dot_dtype = wd_ptr.dtype.element_ty
    patch = round_to(patch, dot_dtype)

    co = tl.arange(0, CO_P)
    best = tl.full((BLOCK_M, CO_P), float("-inf"), dtype=tl.float32)
    for d in tl.static_range(4):
        wd = tl.load(wd_ptr + d * (PATCH_P * CO_P) + j[:, None] * CO_P + co[None, :])
        best = tl.maximum(best, tl.dot(patch, wd, input_precision=INPUT_PRECISION))
    co_ok = co < C_OUT
    bias = tl.load(bias_ptr + co, mask=co_ok, other=0.0)
    y = tl.maximum(best + bias[None, :], 0.0)
    dst = out_ptr + r.to(tl.int64)[:, None] * (npos * C_OUT) + pos[:, None] * C_OUT + co[None, :]
    tl.store(dst, round_to(y, out_ptr.dtype.element_ty), mask=ok[:, None] & co_ok[None, :])


@dataclass
class ConvPoolParams:
    """The fused first layer's parameters in the kernel's layout."""

    mean: torch.Tensor  # (C_in,) float32
    std: torch.Tensor  # (C_in,) float32
    wd: torch.Tensor  # (4, PATCH_P, CO_P) expanded weights in the dot dtype
    bias: torch.Tensor  # (C_out,) float32
    input_shape: tuple[int, int, int]  # (C_in, H, W)
    kernel: tuple[int, int]  # (KH, KW)
    c_out: int
    input_precision: str

    @property
    def out_hw(self) -> tuple[int, int]:
        _, h, w = self.input_shape
        kh, kw = self.kernel
        return (h - kh + 1) // 2, (w - kw + 1) // 2


def expand_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> (4, C_in * (KH + 1) * (KW + 1), C_out): ``W_d`` of the module docstring."""
    c_out, c_in, kh, kw = weight.shape
    out = weight.new_zeros(4, c_in, kh + 1, kw + 1, c_out)
    w = weight.permute(1, 2, 3, 0)  # (C_in, KH, KW, C_out)
    for d, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[d, :, dy : dy + kh, dx : dx + kw, :] = w
    return out.reshape(4, c_in * (kh + 1) * (kw + 1), c_out)


def match_prefix(model: nn.Module):
    """(Normalize, Conv2d) if ``model`` is a Sequential starting Normalize, Conv2d, ReLU, MaxPool2d(2)
    of the supported form (conv stride 1, no padding, dilation 1, groups 1; pool 2 x 2, stride 2); else None."""
    if not isinstance(model, nn.Sequential) or len(model) < 5:
        return None
    norm, conv, relu, pool = model[0], model[1], model[2], model[3]
    if not (isinstance(norm, Normalize) and isinstance(conv, nn.Conv2d) and isinstance(relu, nn.ReLU)):
        return None
    if not isinstance(pool, nn.MaxPool2d):
        return None

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if pair(conv.stride) != (1, 1) or pair(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str) or pair(conv.padding) != (0, 0):
        return None
    if pair(pool.kernel_size) != (2, 2) or pair(pool.stride or pool.kernel_size) != (2, 2):
        return None
    if pair(pool.padding) != (0, 0) or pair(pool.dilation) != (1, 1) or pool.ceil_mode or pool.return_indices:
        return None
    if norm.mean.numel() != conv.in_channels:
        return None
    return norm, conv


def conv_pool_params(model: nn.Module, input_shape, precision: str = "fp32", device=None) -> ConvPoolParams | None:
    """Kernel parameters of the first layer of ``model`` (see :func:`match_prefix`); None if unsupported."""
    found = match_prefix(model)
    if found is None or precision not in PRECISIONS or len(input_shape) != 3:
        return None
    norm, conv = found
    c_in, h, w = (int(s) for s in input_shape)
    kh, kw = conv.kernel_size
    if c_in != conv.in_channels or h < kh + 1 or w < kw + 1:
        return None
    dtype, input_precision = PRECISIONS[precision]
    device = conv.weight.device if device is None else torch.device(device)
    wd = expand_weights(conv.weight.detach().to(device=device, dtype=torch.float32))
    patch_p, co_p = max(16, next_pow2(wd.shape[1])), max(16, next_pow2(conv.out_channels))
    padded = torch.zeros(4, patch_p, co_p, device=device)
    padded[:, : wd.shape[1], : wd.shape[2]] = wd
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
    return ConvPoolParams(
        norm.mean.detach().to(device, torch.float32).flatten().contiguous(),
        norm.std.detach().to(device, torch.float32).flatten().contiguous(),
        padded.to(dtype).contiguous(), bias.to(device, torch.float32).contiguous(),
        (c_in, h, w), (kh, kw), conv.out_channels, input_precision,
    )  # fmt: skip


def launch_noisy_conv_pool(params: ConvPoolParams, x_flat, ids, out, *, start, rows, num, total, seed, stream, sigma):
    """Fill ``out`` (rows, C_out, PH, PW) channels-last with rows ``start ..`` of the packed layout; no checks."""
    if rows <= 0:
        return out
    c_in, h, w = params.input_shape
    kh, kw = params.kernel
    ph, pw = params.out_hw
    block_m = 64 if gpu_sizing() else 4096
    k0, k1, tag = key_words(seed, stream)
    grid = (triton.cdiv(rows * ph * pw, block_m),)
    _noisy_conv_pool_kernel[grid](
        x_flat, ids, params.mean, params.std, params.wd, params.bias, out, rows, start, num, total, k0, k1, tag,
        float(sigma), c_in, h, w, ph, pw, params.c_out,
        PATCH_H=kh + 1, PATCH_W=kw + 1, PATCH_P=params.wd.shape[1], CO_P=params.wd.shape[2], BLOCK_M=block_m,
        INPUT_PRECISION=params.input_precision, num_warps=4, **EXACT,
    )  # fmt: skip
    return out


def empty_output(params: ConvPoolParams, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, C_out, PH, PW) tensor in channels-last memory for :func:`launch_noisy_conv_pool`."""
    ph, pw = params.out_hw
    return torch.empty((rows, ph, pw, params.c_out), dtype=dtype, device=device).permute(0, 3, 1, 2)


def noisy_conv_pool(model, x, image_ids, num, *, seed, stream, sigma, precision="fp32", dtype=torch.float32, start=0, rows=None):
    """``maxpool2(relu(conv(normalize(x + sigma z))))`` for packed rows, the noise made in-kernel.

    Args:
        model: a Sequential starting Normalize, Conv2d, ReLU, MaxPool2d(2) (``engine.models.lenet_mnist``).
        x: (B, C, H, W) clean pixels; image_ids: (B,) int64; num: samples per image.
        seed, stream, sigma: the noise key and scale; precision: dot operands ("fp32" = IEEE).
        dtype: output dtype; start, rows: the slice of the B * num image-major rows to compute.

    Returns:
        (rows, C_out, PH, PW) tensor of ``dtype`` (channels-last memory).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    ids = torch.as_tensor(image_ids, dtype=torch.int64)
    if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"image_ids must be 1-D with one id per image ({x.shape[0]}), got {tuple(ids.shape)}")
    _noise._check_key(seed, stream)
    require_runnable(x.device, "engine.kernels.noisy_conv_pool")
    params = conv_pool_params(model, tuple(x.shape[1:]), precision, device=x.device)
    if params is None:
        raise ValueError("noisy_conv_pool: model must start Normalize, Conv2d(stride 1, no padding), ReLU, MaxPool2d(2)")
    total = x.shape[0] * num
    rows = total - start if rows is None else rows
    out = empty_output(params, rows, dtype, x.device)
    x_flat = x.detach().to(torch.float32).reshape(x.shape[0], -1).contiguous()
    return launch_noisy_conv_pool(params, x_flat, ids.to(x.device), out, start=start, rows=rows, num=num, total=total,
                                  seed=seed, stream=stream, sigma=sigma)


def noisy_conv_pool_ref(model, x, image_ids, num, *, seed, stream, sigma, start=0, rows=None) -> torch.Tensor:
    """Plain-PyTorch float32 reference of :func:`noisy_conv_pool` (the model's first four layers)."""
    ids = torch.as_tensor(image_ids, dtype=torch.int64).to(x.device)
    total = x.shape[0] * num
    rows = total - start if rows is None else rows
    q = torch.arange(start, start + rows, dtype=torch.int64, device=x.device)
    row_image = q // num
    noisy = _noise.noisy_batch_ref(x, row_image, q - row_image * num, ids, seed=seed, stream=stream, sigma=sigma)
    norm, conv = match_prefix(model)
    with torch.no_grad():
        return F.max_pool2d(F.relu(F.conv2d(norm(noisy), conv.weight, conv.bias)), 2)
