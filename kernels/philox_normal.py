"""Triton device functions of the keyed noise stream (the Triton twin of ``csrc/philox_normal.h``).

The stream is defined in :mod:`engine.noise` (plain-PyTorch reference ``noisy_batch_ref``): pixel
``p`` of sample ``s`` of image ``i`` in stream ``t`` is lane ``p & 3`` of the Philox4x32-10 block
with counter ``(p >> 2, s, i, t)`` and key ``(seed lo, seed hi)``, turned into normals by a
Box-Muller made of IEEE-exact float32 operations only. These functions give the same bits as the
reference on every target, provided that:

- every kernel that calls them is launched with ``enable_fp_fusion=False`` (see :data:`EXACT`):
  Triton then asks LLVM not to contract ``a * b + c`` into a fused multiply-add and passes
  ``--fmad=false`` to ptxas, so each float32 ``*`` and ``+`` is one IEEE round-to-nearest
  ``mul.rn.f32`` / ``add.rn.f32``;
- integer work is done in uint32 (``umulhi`` for the high word of the Philox products; the low
  word wraps modulo 2^32), int -> float conversions only see integers below 2^25 (exact);
- the square root is ``tl.sqrt_rn`` (``sqrt.rn.f32``; plain ``tl.sqrt`` is approximate on GPUs)
  and any division is ``tl.div_rn``; no value on the way is subnormal, so flush-to-zero modes
  cannot change a result either.

Under ``TRITON_INTERPRET=1`` every operation is a NumPy float32 / uint32 operation, which is IEEE
too, so the CPU tests check bit equality with the reference; ``tests/test_noisy_batch.py`` checks
it again on CUDA.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["EXACT", "philox4x32", "box_muller", "normal_pair", "pixel_normal", "key_words", "round_to", "to_bfloat16_rne"]

# Launch options of every kernel that evaluates the stream (no multiply-add contraction).
EXACT = {"enable_fp_fusion": False}


def key_words(seed: int, stream: int) -> tuple[int, int, int]:
    """(k0, k1, stream) as signed int32 values with the same 32 bits (kernel arguments keep one type).

    ``seed`` in [0, 2^64) gives the Philox key (seed mod 2^32, seed >> 32); ``stream`` in [0, 2^32).
    Kernels bitcast them back to uint32.
    """

    def signed(word: int) -> int:
        word &= 0xFFFFFFFF
        return word - (1 << 32) if word >= (1 << 31) else word

    return signed(seed), signed(seed >> 32), signed(stream)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on uint32 tensors; same words as ``engine.noise.philox4x32_ref``."""
    # The low products and key increments wrap modulo 2^32 on purpose: sanitize_overflow=False keeps
    # Triton's debug-mode overflow checks (always on in the interpreter) away from them.
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _horner_log(f):
    a = f * -0.07434117794036865 + 0.12796849012374878
    a = a * f + -0.13268345594406128
    a = a * f + 0.1420142948627472
    a = a * f + -0.1660829782485962
    a = a * f + 0.200008362531662
    a = a * f + -0.2500157952308655
    a = a * f + 0.33333346247673035
    a = a * f + -0.49999988079071045
    a = a * f + 1.0
    return a


@triton.jit
def _horner_sin(s):
    a = s * 3.0897433589416323e-07 + -3.6572346289176494e-05
    a = a * s + 0.002490393118932843
    a = a * s + -0.08074551075696945
    a = a * s + 0.7853981852531433
    return a


@triton.jit
def _horner_cos(s):
    a = s * -2.4263625775233777e-08 + 3.590463165892288e-06
    a = a * s + -0.0003259916848037392
    a = a * s + 0.01585434377193451
    a = a * s + -0.3084251284599304
    a = a * s + 1.0
    return a


@triton.jit
def box_muller(wa, wb):
    """Two float32 standard normals (r cos theta, r sin theta) from two uint32 words.

    Operation for operation the reference ``engine.noise._box_muller_ref``; every constant is an
    exact float32 value, so Triton's float32 literals lose nothing.
    """
    a = (wa >> 8).to(tl.int32) + 1  # [1, 2^24]
    bits = a.to(tl.float32).to(tl.int32, bitcast=True)  # exact conversion
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m >= 1.4142135381698608
    m = tl.where(big, m * 0.5, m)
    e = e + big.to(tl.int32)
    f = m - 1.0
    ln_u1 = f * _horner_log(f) + (e - 24).to(tl.float32) * 0.6931471824645996
    arg = ln_u1 * -2.0
    r = tl.sqrt_rn(tl.maximum(arg, 0.0))

    b = (wb >> 8).to(tl.int32)  # [0, 2^24)
    k = (b + (1 << 21)) >> 22
    t = (b - (k << 22)).to(tl.float32) * 4.76837158203125e-07  # 2^-21, t in [-1, 1) exact
    s = t * t
    sn = t * _horner_sin(s)
    cs = _horner_cos(s)
    q = k & 3
    c = tl.where(q == 0, cs, tl.where(q == 1, -sn, tl.where(q == 2, -cs, sn)))
    d = tl.where(q == 0, sn, tl.where(q == 1, cs, tl.where(q == 2, -sn, -cs)))
    return r * c, r * d


@triton.jit
def normal_pair(group, sample, image, stream, k0, k1):
    """The four normals of Philox block ``group`` (pixels 4 group .. 4 group + 3), as a 4-tuple.

    ``group``, ``sample``, ``image`` are uint32 tensors (broadcastable); ``stream``, ``k0``,
    ``k1`` uint32 scalars.
    """
    zero = group * 0
    w0, w1, w2, w3 = philox4x32(group, sample + zero, image + zero, stream + zero, k0, k1)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def pixel_normal(pixel, sample, image, stream, k0, k1):
    """The normal of one pixel (uint32 tensor of pixel indices) of rows (sample, image): float32.

    Evaluates the pixel's Philox block and one Box-Muller pair; kernels that gather pixels in an
    arbitrary pattern (convolution windows) use it, contiguous writers use :func:`normal_pair`.
    """
    zero = pixel * 0
    w0, w1, w2, w3 = philox4x32(pixel >> 2, sample + zero, image + zero, stream + zero, k0, k1)
    lane = pixel & 3
    low = lane < 2
    zc, zs = box_muller(tl.where(low, w0, w2), tl.where(low, w1, w3))
    return tl.where((lane & 1) == 0, zc, zs)


@triton.jit
def to_bfloat16_rne(v):
    """float32 -> bfloat16, round to nearest even, with integer operations (finite inputs).

    Same bits as a correct ``cvt.rn.bf16.f32`` and as ``torch.Tensor.to(torch.bfloat16)``; written
    out because the Triton interpreter truncates in its own float32 -> bfloat16 cast.
    """
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """Cast float32 ``v`` to ``dtype`` (float32, float16 or bfloat16) rounding to nearest even."""
    if dtype == tl.bfloat16:
        return to_bfloat16_rne(v)
    else:
        return v.to(dtype)
