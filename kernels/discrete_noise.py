"""Fused discrete (sound) noisy batch: replicate grid images, add keyed integer steps, write, one pass.

``noisy_batch_discrete(x, row_image, row_sample, image_ids, seed=, stream=, sigma=, dtype=)`` writes
row r as ``dtype(float32((round(255 x[row_image[r]]) + k) / 255))`` (or the int32 grid index for
``dtype=torch.int32``), ``k`` the keyed integer steps of ``noise="discrete"`` in :mod:`engine.noise`:
pixel p takes the 64-bit uniform ``u`` from Philox block ``(p >> 1, sample, image, stream)`` (words
(w0, w1) for even p, (w2, w3) for odd p) and ``k = #{T <= u} - K`` for the uint64 threshold table T
of :func:`engine.noise.discrete_table`. Only integer operations (uint32 Philox, uint64 comparisons
in a binary search over the table) decide ``k``; the one float operation is the correctly rounded
division ``tl.div_rn(float32(j), 255)``. Bit-equal to the plain-PyTorch reference
(``engine.noise.noisy_batch_ref(..., noise="discrete")``), the C++ CPU op and the CUDA op.

One program covers a tile of BLOCK_R rows x BLOCK_G Philox blocks (2 pixels each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import noise as _noise

from ._launch import as_index, gpu_sizing, next_pow2, require_runnable
from .philox_normal import EXACT, key_words, philox4x32, round_to

__all__ = ["noisy_batch_discrete", "launch_noisy_batch_discrete", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)


@triton.jit
def count_le(table_ptr, length, top, u):
    """Number of entries of the non-decreasing uint64 table ``table_ptr[0..length)`` that are <= ``u``.

    Binary lifting with steps top, top/2, ..., 1 (``top`` the largest power of two <= length): the
    first ``pos`` entries stay <= u throughout, so the count is exact whatever the order of steps.
    """
    pos = (u * 0).to(tl.int32)
    step = top
    while step > 0:
        idx = pos + step
        ok = idx <= length
        t = tl.load(table_ptr + tl.where(ok, idx - 1, 0), mask=ok, other=0).to(tl.uint64, bitcast=True)
        pos = tl.where(ok & (t <= u), idx, pos)
        step = step // 2
    return pos


@triton.jit(do_not_specialize=["rows", "k0", "k1", "stream"])
def _noisy_discrete_kernel(
    grid_ptr,
    out_ptr,
    row_image_ptr,
    row_sample_ptr,
    image_ids_ptr,
    table_ptr,
    rows,
    num_pixels,
    length,
    top,
    k0,
    k1,
    stream,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INT_OUT: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    slot = tl.load(row_image_ptr + r, mask=r_ok, other=0)
    sample = tl.load(row_sample_ptr + r, mask=r_ok, other=0).to(tl.uint32)
    image = tl.load(image_ids_ptr + slot, mask=r_ok, other=0).to(tl.uint32)
    g = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.uint32)
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    tag = stream.to(tl.uint32, bitcast=True)
    zero = g[None, :] * 0 + sample[:, None] * 0
    w0, w1, w2, w3 = philox4x32(g[None, :] + zero, sample[:, None] + zero, image[:, None] + zero, tag + zero, key0, key1)
    u_even = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
    u_odd = (w2.to(tl.uint64) << 32) | w3.to(tl.uint64)
    # (R, G, 2) -> (R, 2G): element [r, g, l] is pixel 2g + l.
    u = tl.reshape(tl.join(u_even, u_odd), (BLOCK_R, 2 * BLOCK_G))
    k = count_le(table_ptr, length, top, u) - length // 2
    p = tl.program_id(1) * (2 * BLOCK_G) + tl.arange(0, 2 * BLOCK_G)
    mask = r_ok[:, None] & (p < num_pixels)[None, :]
    clean = tl.load(grid_ptr + slot.to(tl.int64)[:, None] * num_pixels + p[None, :], mask=mask, other=0)
    j = clean + k
    dst = out_ptr + r.to(tl.int64)[:, None] * num_pixels + p[None, :]
    if INT_OUT:
        tl.store(dst, j, mask=mask)
    else:
        value = tl.div_rn(j.to(tl.float32), 255.0)  # correctly rounded float32(j / 255)
        tl.store(dst, round_to(value, out_ptr.dtype.element_ty), mask=mask)


def _blocks(pairs: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, num_warps): 1024 Philox blocks per GPU program, 8,192 when interpreting."""
    budget = 1024 if gpu_sizing() else 8192
    block_g = min(next_pow2(pairs), 256)
    return max(1, budget // block_g), block_g, 4


def noisy_batch_discrete(x, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype=torch.float32, out=None):
    """Discrete-noise copies of grid images written straight into a forward batch (Triton).

    Args:
        x: (B, ...) uint8 images or floating images on the 8-bit grid (``engine.noise.grid_indices``).
        row_image, row_sample, image_ids, seed, stream: as :func:`engine.kernels.noisy_batch.noisy_batch`.
        sigma: noise standard deviation in pixel units (selects the threshold table).
        dtype: float32, float16, bfloat16 (pixel values) or int32 (grid indices j).
        out: optional preallocated contiguous (R, *x.shape[1:]) tensor of ``dtype`` on x's device.

    Returns:
        (R, *x.shape[1:]) tensor, bit-equal to ``engine.noise.noisy_batch_ref(..., noise="discrete")``.
    """
    _noise._check_rows(x, row_image, row_sample, image_ids)
    _noise._check_key(seed, stream)
    sigma = _noise._check_sigma_discrete(sigma)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    device = x.device
    require_runnable(device, "engine.kernels.discrete_noise")
    row_image = as_index("row_image", row_image, device)
    row_sample = as_index("row_sample", row_sample, device)
    image_ids = as_index("image_ids", image_ids, device)
    rows = row_image.shape[0]
    shape = (rows,) + tuple(x.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {dtype} tensor on {device}, got {tuple(out.shape)} {out.dtype}")
    grid = _noise.grid_indices(x).contiguous()
    if rows == 0 or grid.shape[1] == 0:
        return out
    launch_noisy_batch_discrete(grid, row_image, row_sample, image_ids, out, seed=seed, stream=stream, sigma=sigma)
    return out


def launch_noisy_batch_discrete(grid, row_image, row_sample, image_ids, out, *, seed, stream, sigma):
    """Fill ``out`` (rows, pixels...) from int32 contiguous ``grid`` (B, pixels); no checks."""
    rows = out.shape[0]
    num_pixels = grid.shape[1]
    table = _noise.discrete_table(sigma).as_tensor(grid.device)
    length = table.shape[0]
    top = 1 << (length.bit_length() - 1) if length else 0
    pairs = (num_pixels + 1) // 2
    block_r, block_g, warps = _blocks(pairs)
    k0, k1, tag = key_words(seed, stream)
    launch_grid = (triton.cdiv(rows, block_r), triton.cdiv(pairs, block_g))
    _noisy_discrete_kernel[launch_grid](
        grid, out, row_image, row_sample, image_ids, table, rows, num_pixels, length, top, k0, k1, tag,
        BLOCK_R=block_r, BLOCK_G=block_g, INT_OUT=out.dtype == torch.int32, num_warps=warps, **EXACT,
    )  # fmt: skip
    return out
