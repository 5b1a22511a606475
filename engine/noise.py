"""Counter-based Gaussian noise keyed by (seed, image, sample).

Every backend of the engine (this plain-PyTorch reference, the C++ CPU op in ``engine._C`` and the
Triton kernels in ``kernels/``) produces the *same bits* for the same key, so a given seed gives the
same noise, and hence the same counts, for every batch size, every sharding and every backend.

Definition of the stream
------------------------
For an image with D pixels (C*H*W, row-major), pixel ``p`` of noisy sample ``s`` of image ``i`` in
stream ``t`` comes from one Philox4x32-10 block (Salmon et al. 2011, as in Random123 and Triton):

    key     = (seed mod 2^32, seed >> 32)
    counter = (p >> 2, s, i, t)            -> four uint32 words (w0, w1, w2, w3)
    pixel p uses lane p & 3: lanes 0, 1 come from the Box-Muller pair (w0, w1), lanes 2, 3 from
    (w2, w3): lane 0/2 is r cos(theta), lane 1/3 is r sin(theta).

Box-Muller uses only operations that IEEE-754 rounds exactly (integer ops, int->float conversion
of integers below 2^25, float32 +, -, *, sqrt) so every backend agrees to the bit:

    u1    = ((w_a >> 8) + 1) * 2^-24       in (0, 1]   (min 2^-24: |z| <= 5.77, like torch/Triton)
    ln u1 = ln(m) + (e - 24) ln 2           a = 2^e m exactly, m in [sqrt(1/2), sqrt(2)), with
            ln(m) = f * P(f), f = m - 1      P a degree-9 polynomial (float32 Horner)
    r     = sqrt(-2 ln u1)
    theta = 2 pi (w_b >> 8) 2^-24 = k pi/2 + (pi/4) t, k in {0..3}, t in [-1, 1) exact
            sin((pi/4) t) = t S(t^2), cos((pi/4) t) = C(t^2)   (degrees 4 and 5)

The polynomial coefficients are float32 values of a relative least-squares fit on Chebyshev nodes
(see :func:`fit_polynomials`); each approximation is within about 1e-7 relative of the float64
function. Noisy inputs are ``float32(x + float32(sigma * z))`` (no fused multiply-add), then cast
to the model's input dtype.

Stream tags: :data:`STREAM_SELECTION` (0), :data:`STREAM_ESTIMATION` (1), :data:`STREAM_PREDICT`
(2); training and attacks use tags from 16 on.

Discrete (sound) noise: ``noise="discrete"``
-------------------------------------------
Voracek and Hein (ICLR 2023, arXiv 2207.07209) show that rounding ``x + sigma * z`` to floats lets
a base classifier earn certificates that are wrong. With ``noise="discrete"`` every noisy pixel is a
point of the 8-bit grid, drawn from the keyed integer stream by exact integer comparisons, so no
floating-point rounding enters the noise (docs/sound_noise.md has the derivation):

    s       = 255 sigma                      (the standard deviation in grid steps)
    table   = T_{-K} <= ... <= T_{K-1}      uint64, T_k = round(2^64 Phi((k + 1/2) / s)) for k >= 0,
              T_{-k-1} = 2^64 - T_k (exactly symmetric), K = the least k >= 0 with T_k = 2^64
              (Phi evaluated with mpmath at 160 bits; :func:`discrete_table`)
    counter = (p >> 1, sample, image, tag), key as above -> words (w0, w1, w2, w3); pixel p takes
              u = w0 2^32 + w1 (p even) or w2 2^32 + w3 (p odd)       (64 uniform bits)
    k       = #{T <= u in the table} - K     in [-K, K], P(k) = (T_k - T_{k-1}) / 2^64 exactly
    j       = round(255 x) + k               (x must be on the grid, :func:`grid_indices`)
    noisy   = float32(j / 255)               (correctly rounded quotient), then cast to dtype

The implemented law q of k is within total variation ``tv_bound = (K + 2) 2^-64`` of the rounded
Gaussian r(k) = Phi((k + 1/2)/s) - Phi((k - 1/2)/s). Guarantee (:func:`discrete_certified_radius`):
if P(f(noisy) = A) >= p at x, then for every grid point x' = x + delta / 255 (delta integer) with
||x' - x||_2 < R = sigma (Phi^-1(p - eta) - Phi^-1(1/2 + eta)), eta = D tv_bound (D pixels),
P(f(noisy') = A) > 1/2, for any base classifier f that is a deterministic function of its input.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .validate import InputError

__all__ = [
    "STREAM_SELECTION",
    "STREAM_ESTIMATION",
    "STREAM_PREDICT",
    "philox4x32_ref",
    "gaussian_noise",
    "noisy_batch",
    "noisy_batch_ref",
    "fit_polynomials",
    "NOISE_KINDS",
    "DiscreteTable",
    "discrete_table",
    "discrete_pmf",
    "discrete_noise",
    "discrete_certified_radius",
    "grid_indices",
]

NOISE_KINDS = ("gaussian", "discrete")

STREAM_SELECTION = 0
STREAM_ESTIMATION = 1
STREAM_PREDICT = 2

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# float32 coefficients, lowest degree first (exact float32 values written as Python floats).
LOG_COEFFS = (
    1.0,
    -0.49999988079071045,
    0.33333346247673035,
    -0.2500157952308655,
    0.200008362531662,
    -0.1660829782485962,
    0.1420142948627472,
    -0.13268345594406128,
    0.12796849012374878,
    -0.07434117794036865,
)
SIN_COEFFS = (
    0.7853981852531433,
    -0.08074551075696945,
    0.002490393118932843,
    -3.6572346289176494e-05,
    3.0897433589416323e-07,
)
COS_COEFFS = (
    1.0,
    -0.3084251284599304,
    0.01585434377193451,
    -0.0003259916848037392,
    3.590463165892288e-06,
    -2.4263625775233777e-08,
)
LN2_F32 = 0.6931471824645996  # float32(ln 2)
SQRT2_F32 = 1.4142135381698608  # float32(sqrt 2)
MAX_SEED = 2**64 - 1
MAX_INDEX = 2**32 - 1


def fit_polynomials(n_nodes: int = 20000) -> dict[str, tuple[float, ...]]:
    """Re-derive the Box-Muller polynomial coefficients (float64 fit rounded to float32).

    Relative least squares on Chebyshev nodes of: ln(1 + f) / f on [sqrt(1/2) - 1, sqrt(2) - 1]
    (degree 9), sin(pi/4 sqrt(s)) / sqrt(s) on [0, 1] (degree 4), cos(pi/4 sqrt(s)) on [0, 1]
    (degree 5). The module constants are this function's output.
    """
    import numpy as np

    def fit(fn, lo, hi, deg):
        k = np.arange(n_nodes)
        x = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / n_nodes)
        y = fn(x)
        w = 1.0 / np.abs(y)
        vander = np.vander(x, deg + 1, increasing=True)
        c, *_ = np.linalg.lstsq(vander * w[:, None], y * w, rcond=None)
        return tuple(float(np.float32(ci)) for ci in c)

    def log_ratio(f):
        safe = np.where(f == 0, 1.0, f)
        return np.where(f == 0, 1.0, np.log1p(f) / safe)

    def sin_ratio(s):
        root = np.sqrt(s)
        safe = np.where(s == 0, 1.0, root)
        return np.where(s == 0, np.pi / 4, np.sin(np.pi / 4 * root) / safe)

    return {
        "log": fit(log_ratio, math.sqrt(0.5) - 1, math.sqrt(2) - 1, 9),
        "sin": fit(sin_ratio, 0.0, 1.0, 4),
        "cos": fit(lambda s: np.cos(np.pi / 4 * np.sqrt(s)), 0.0, 1.0, 5),
    }


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch reference (int64 tensors holding uint32 values)
# ----------------------------------------------------------------------------------------------


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of the constant ``a`` and uint32 ``b``.

    Splits ``a`` into 16-bit halves so that no intermediate leaves int64's range.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = a_hi * b  # < 2^48
    p_lo = a_lo * b  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32_ref(c0, c1, c2, c3, seed: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on broadcastable int64 tensors of uint32 counter words; key from ``seed``.

    Returns four int64 tensors of uint32 values. Matches Random123's philox4x32_10 and Triton's
    ``tl.philox`` word for word.
    """
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _horner(coeffs, x: torch.Tensor) -> torch.Tensor:
    acc = _f32(coeffs[-1], x).expand_as(x)
    for c in coeffs[-2::-1]:
        acc = acc * x
        acc = acc + _f32(c, x)
    return acc


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root of non-negative float32 ``x``.

    ``torch.sqrt`` on CPU is not correctly rounded (SIMD approximations), so round a float64 root
    and fix it: the midpoints between float32 neighbours have 25 significant bits, so their squares
    are exact in float64 and decide the rounding exactly.
    """
    x64 = x.to(torch.float64)
    y = torch.sqrt(x64).to(torch.float32)
    y64 = y.to(torch.float64)
    up = torch.nextafter(y, torch.full_like(y, math.inf))
    mid_up = y64 + (up.to(torch.float64) - y64) * 0.5
    y = torch.where(mid_up * mid_up < x64, up, y)
    y64 = y.to(torch.float64)
    down = torch.nextafter(y, torch.zeros_like(y))
    mid_down = y64 - (y64 - down.to(torch.float64)) * 0.5
    return torch.where(mid_down * mid_down > x64, down, y)


def _box_muller_ref(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 normals from two uint32 words, bit-exact with every other backend."""
    a = (wa >> 8) + 1  # [1, 2^24]
    af = a.to(torch.float32)  # exact
    bits = af.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)  # [1, 2)
    big = m >= _f32(SQRT2_F32, m)
    m = torch.where(big, m * _f32(0.5, m), m)
    e = e + big.to(torch.int64)
    f = m - _f32(1.0, m)
    ln_u1 = f * _horner(LOG_COEFFS, f) + (e - 24).to(torch.float32) * _f32(LN2_F32, f)
    r = _sqrt_rn(torch.clamp_min(ln_u1 * _f32(-2.0, f), 0.0))

    b = wb >> 8  # [0, 2^24)
    k = (b + (1 << 21)) >> 22
    t = (b - (k << 22)).to(torch.float32) * _f32(2.0**-21, f)  # [-1, 1), exact
    s = t * t
    sin_t = t * _horner(SIN_COEFFS, s)
    cos_t = _horner(COS_COEFFS, s)
    k = k & 3
    cos_th = torch.where(k == 0, cos_t, torch.where(k == 1, -sin_t, torch.where(k == 2, -cos_t, sin_t)))
    sin_th = torch.where(k == 0, sin_t, torch.where(k == 1, cos_t, torch.where(k == 2, -sin_t, -cos_t)))
    return r * cos_th, r * sin_th


def _noise_rows_ref(ids: torch.Tensor, samples: torch.Tensor, num_pixels: int, seed: int, stream: int) -> torch.Tensor:
    """(R, num_pixels) float32 noise for rows (image id, sample index), plain PyTorch."""
    device = ids.device
    groups = (num_pixels + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    w0, w1, w2, w3 = philox4x32_ref(g, samples[:, None], ids[:, None], stream, seed)
    z0, z1 = _box_muller_ref(w0, w1)
    z2, z3 = _box_muller_ref(w2, w3)
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(ids.shape[0], groups * 4)
    return z[:, :num_pixels]


# ----------------------------------------------------------------------------------------------
# Discrete (sound) noise: the threshold table, its exact law, the grid check and the reference
# ----------------------------------------------------------------------------------------------

DISCRETE_BITS = 64  # uniform bits per pixel (two Philox words)
DISCRETE_MAX_SIGMA = 16.0  # the table has about 2 * 9.16 * 255 sigma entries (74,708 at 16)
GRID_TOL = 1e-3  # |255 x - round(255 x)| allowed, in grid steps (float32 j/255 is within 2e-5)
_TWO64 = 1 << 64


@dataclass(frozen=True)
class DiscreteTable:
    """The threshold table of the discrete noise of one sigma and the exact law it implements.

    Attributes:
        sigma: noise standard deviation in pixel units (the float64 value given).
        half_width: K; the steps k lie in [-K, K].
        thresholds: (T_{-K}, ..., T_{K-1}) as Python integers in (0, 2^64), non-decreasing; a
            64-bit uniform ``u`` gives ``k = #{T <= u} - K``.
        tv_bound: an upper bound on the total variation distance between the implemented law of k
            and the rounded Gaussian r(k) = Phi((k + 1/2) / s) - Phi((k - 1/2) / s), s = 255 sigma.
    """

    sigma: float
    half_width: int
    thresholds: tuple[int, ...]
    tv_bound: float

    def counts(self) -> tuple[int, ...]:
        """Exact law: the numerators c_k (k = -K..K) of P(k) = c_k / 2^64 (they sum to 2^64)."""
        cuts = (0,) + self.thresholds + (_TWO64,)
        return tuple(b - a for a, b in zip(cuts[:-1], cuts[1:]))

    def pmf(self) -> np.ndarray:
        """The implemented law P(k), k = -K..K, as float64 (rounded from the exact :meth:`counts`)."""
        return np.array([c / _TWO64 for c in self.counts()], dtype=np.float64)

    def steps(self) -> np.ndarray:
        """The support -K..K (int64) that :meth:`pmf` and :meth:`counts` index."""
        return np.arange(-self.half_width, self.half_width + 1, dtype=np.int64)

    def as_tensor(self, device=None) -> torch.Tensor:
        """The thresholds as an int64 tensor holding their uint64 bit patterns (C++ / Triton ops)."""
        return _table_tensor(self.sigma, str(torch.device(device or "cpu")))


def _check_sigma_discrete(sigma) -> float:
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"sigma must be a positive number, got {sigma!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= DISCRETE_MAX_SIGMA):
        raise InputError(f"sigma must lie in (0, {DISCRETE_MAX_SIGMA:g}] for noise='discrete', got {sigma!r}")
    return value


@functools.lru_cache(maxsize=32)
def _discrete_table_cached(sigma: float) -> DiscreteTable:
    import mpmath  # declared in pyproject.toml (and a dependency of torch through sympy)

    ctx = mpmath.MPContext()
    ctx.prec = 160
    scale = ctx.mpf(sigma) * 255 * ctx.sqrt(2)  # s sqrt(2), s = 255 sigma exactly (float64 sigma)
    tails = []  # R_k = round(2^63 erfc((k + 1/2) / (s sqrt 2))) = round(2^64 (1 - Phi((k + 1/2) / s)))
    k = 0
    while True:
        tail = int(ctx.floor(ctx.erfc((k + ctx.mpf(0.5)) / scale) * 2**63 + ctx.mpf(0.5)))
        if tail == 0:
            break
        tails.append(tail)
        k += 1
    half = len(tails)  # K: T_K = 2^64 - R_K = 2^64
    thresholds = tuple(tails[::-1]) + tuple(_TWO64 - t for t in tails)  # T_{-K..-1} = R_{K-1..0}, T_{0..K-1}
    # |T_k 2^-64 - Phi_k| <= 2^-65 for every integer k (rounding; beyond the table both sides are
    # within 2^-65 of 0 or 1), so sum_k |q(k) - r(k)| <= (2K + 1) 2^-64 + (r's mass beyond +-K <
    # 2^-64): TV <= (K + 1) 2^-64. One more 2^-64 covers mpmath's error at 160 bits.
    return DiscreteTable(sigma=sigma, half_width=half, thresholds=thresholds, tv_bound=(half + 2) * 2.0**-64)


def discrete_table(sigma) -> DiscreteTable:
    """The threshold table of ``noise="discrete"`` for ``sigma`` (pixel units; cached).

    T_k = round(2^64 Phi((k + 1/2) / s)) for k >= 0 and T_{-k-1} = 2^64 - T_k, s = 255 sigma, over
    k = -K..K-1 where K is the least k >= 0 with T_k = 2^64; Phi is evaluated with mpmath at 160
    bits. The law it implements is :meth:`DiscreteTable.counts` / 2^64, exactly symmetric.
    """
    return _discrete_table_cached(_check_sigma_discrete(sigma))


def discrete_pmf(sigma) -> tuple[np.ndarray, np.ndarray]:
    """(steps k = -K..K as int64, their exact implemented probabilities as float64)."""
    table = discrete_table(sigma)
    return table.steps(), table.pmf()


@functools.lru_cache(maxsize=64)
def _table_tensor(sigma: float, device: str) -> torch.Tensor:
    table = _discrete_table_cached(sigma)
    bits = [t - _TWO64 if t >= 1 << 63 else t for t in table.thresholds]
    return torch.tensor(bits, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _table_flipped(sigma: float, device: str) -> torch.Tensor:
    """The thresholds minus 2^63 as int64: signed order = unsigned order of the thresholds."""
    table = _discrete_table_cached(sigma)
    return torch.tensor([t - (1 << 63) for t in table.thresholds], dtype=torch.int64, device=device)


def discrete_certified_radius(p_lower, sigma, num_pixels):
    """Sound L2 radius (pixel units) of ``noise="discrete"`` from a lower bound on p_A.

    Args:
        p_lower: lower confidence bound(s) on P(f(noisy x) = A) under the implemented noise
            (float, array or tensor).
        sigma: the noise level the samples were drawn with (pixel units).
        num_pixels: D, the number of pixels (C * H * W) of an image.

    Returns:
        float64 radius (a float for a scalar input, else a NumPy array of the same shape)

            R = sigma * (Phi^-1(p - eta) - Phi^-1(1/2 + eta)),   eta = D * tv_bound(sigma),

        and 0 where that is not positive (p <= 1/2 + 2 eta; p <= 1/2 means abstain).

    Guarantee (docs/sound_noise.md): if P(f(x + k/255) = A) >= p for the implemented law of k, then
    P(f(x' + k/255) = A) > 1/2 for every grid point x' = x + delta/255 (delta in Z^D) with
    ||x' - x||_2 < R, for any base classifier f that is a deterministic function of its (grid)
    input. Proof: x + round(255 eps)/255 = round_grid(x + eps) for x on the grid and eps ~
    N(0, sigma^2 I), so the rounded Gaussian r is Cohen et al.'s smoothing of f o round_grid
    (Theorem 1 holds for it); the implemented law is within eta of r^D in total variation, once at
    x and once at x'. Phi^-1 is evaluated one ulp conservatively and R shrunk by 2^-40 relative.
    """
    from scipy.special import ndtri

    sigma = _check_sigma_discrete(sigma)
    if isinstance(num_pixels, bool) or not isinstance(num_pixels, (int, np.integer)) or num_pixels < 1:
        raise InputError(f"num_pixels must be a positive integer, got {num_pixels!r}")
    scalar = np.ndim(p_lower) == 0
    if isinstance(p_lower, torch.Tensor):
        p_lower = p_lower.detach().cpu().numpy()
    p = np.asarray(p_lower, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise InputError("p_lower must lie in [0, 1]")
    eta = int(num_pixels) * discrete_table(sigma).tv_bound
    lo = np.nextafter(p - eta, -np.inf)  # at most p - eta
    hi = np.nextafter(0.5 + eta, np.inf)  # at least 1/2 + eta
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = ndtri(np.clip(lo, 0.0, 1.0)) - ndtri(hi)
    radius = sigma * gap * (1.0 - 2.0**-40)
    radius = np.where((lo > hi) & np.isfinite(radius), radius, 0.0)
    return float(radius) if scalar else radius


def grid_indices(x, name: str = "x") -> torch.Tensor:
    """round(255 x) of images on the 8-bit grid, as (B, D) int32; raises :class:`InputError` otherwise.

    ``x`` is uint8 (0..255, taken as is) or floating with every pixel within ``GRID_TOL`` grid
    steps of a multiple of 1/255 in [0, 1] (255 x evaluated in float64). ``data.to_float`` of uint8
    images passes; float16 / bfloat16 images of the grid do not (they are not on it).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise InputError(f"{name} must be a tensor of shape (B, ...) holding the clean images")
    flat = x.detach().flatten(1) if x.dim() > 1 else x.detach()[:, None]
    if flat.dtype == torch.uint8:
        return flat.to(torch.int32)
    if not flat.is_floating_point():
        raise InputError(f"{name} must be uint8 or floating for noise='discrete', got {x.dtype}")
    if flat.numel() == 0:
        return torch.zeros(flat.shape, dtype=torch.int32, device=flat.device)
    scaled = flat.to(torch.float64) * 255.0
    if not bool(torch.isfinite(scaled).all()):
        raise InputError(f"{name} holds NaN or infinite pixels")
    j = torch.round(scaled)
    off = (scaled - j).abs()
    worst = float(off.max())
    lo, hi = (float(v) for v in torch.aminmax(j))
    if worst > GRID_TOL or lo < 0 or hi > 255:
        raise InputError(
            f"{name}: noise='discrete' needs pixels on the 8-bit grid (multiples of 1/255 in [0, 1], within "
            f"{GRID_TOL:g} of a step); got 255*x up to {worst:.3g} steps off the grid and round(255*x) in "
            f"[{lo:.0f}, {hi:.0f}] (quantise with torch.round(x * 255) / 255, or pass uint8)"
        )
    return j.to(torch.int32)


def _discrete_steps_ref(ids: torch.Tensor, samples: torch.Tensor, num_pixels: int, seed: int, stream: int,
                        sigma: float) -> torch.Tensor:
    """(R, num_pixels) int64 steps k for rows (image id, sample index), plain PyTorch."""
    table = _discrete_table_cached(sigma)
    device = ids.device
    rows = ids.shape[0]
    if table.half_width == 0:
        return torch.zeros((rows, num_pixels), dtype=torch.int64, device=device)
    pairs = (num_pixels + 1) // 2
    g = torch.arange(pairs, dtype=torch.int64, device=device)[None, :]
    w0, w1, w2, w3 = philox4x32_ref(g, samples[:, None], ids[:, None], stream, seed)
    hi = torch.stack((w0, w2), dim=-1).reshape(rows, 2 * pairs)[:, :num_pixels]
    lo = torch.stack((w1, w3), dim=-1).reshape(rows, 2 * pairs)[:, :num_pixels]
    u_flipped = (hi - (1 << 31)) * (1 << 32) + lo  # u - 2^63, no overflow
    count = torch.searchsorted(_table_flipped(sigma, str(device)), u_flipped.contiguous(), right=True)
    return count - table.half_width


def _grid_values_ref(j: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dtype(float32(j / 255)) of int64 grid indices (|j| < 2^24), or j itself for dtype int32.

    float32(float64(j) / 255) is the correctly rounded quotient: j / 255 has a period-8 binary
    expansion, so its float64 rounding never lands on a float32 rounding boundary.
    """
    if dtype == torch.int32:
        return j.to(torch.int32)
    return (j.to(torch.float64) / 255.0).to(torch.float32).to(dtype)


def _check_noise(noise) -> str:
    if noise not in NOISE_KINDS:
        raise InputError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    return noise


DISCRETE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)


def _check_discrete_dtype(dtype) -> None:
    if dtype not in DISCRETE_DTYPES:
        raise InputError(f"dtype must be one of {DISCRETE_DTYPES} for noise='discrete', got {dtype}")


def _noisy_discrete_ref(x, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype):
    sigma = _check_sigma_discrete(sigma)
    _check_discrete_dtype(dtype)
    grid = grid_indices(x).to(torch.int64)
    k = _discrete_steps_ref(image_ids[row_image], row_sample, grid.shape[1], seed, stream, sigma)
    out = _grid_values_ref(grid[row_image] + k, dtype)
    return out.reshape((row_image.shape[0],) + tuple(x.shape[1:]))


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _check_key(seed: int, stream: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream <= MAX_INDEX:
        raise ValueError(f"stream must be an integer in [0, 2^32), got {stream!r}")


def _check_rows(x: torch.Tensor, row_image: torch.Tensor, row_sample: torch.Tensor, image_ids: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (B, ...) holding the clean images")
    for name, t in (("row_image", row_image), ("row_sample", row_sample), ("image_ids", image_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {getattr(t, 'shape', type(t))}")
    if row_image.shape != row_sample.shape:
        raise ValueError(f"row_image {tuple(row_image.shape)} and row_sample {tuple(row_sample.shape)} differ in shape")
    if image_ids.shape[0] != x.shape[0]:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries, x has {x.shape[0]} images")


def noisy_batch_ref(x, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype=torch.float32, noise="gaussian"):
    """Plain-PyTorch reference of :func:`noisy_batch` (same arguments, same bits)."""
    _check_noise(noise)
    _check_rows(x, row_image, row_sample, image_ids)
    _check_key(seed, stream)
    if noise == "discrete":
        return _noisy_discrete_ref(x, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma, dtype=dtype)
    flat = x.reshape(x.shape[0], -1).to(torch.float32)
    z = _noise_rows_ref(image_ids[row_image], row_sample, flat.shape[1], seed, stream)
    out = flat[row_image] + z * _f32(float(sigma), z)
    return out.to(dtype).reshape((row_image.shape[0],) + tuple(x.shape[1:]))


def noisy_batch(x, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype=torch.float32, backend="auto",
                noise="gaussian"):
    """Noisy copies of clean images, written straight into a forward batch.

    Args:
        x: (B, C, H, W) float clean images (any trailing shape works); for ``noise="discrete"``
            uint8 or floating images on the 8-bit grid (:func:`grid_indices`).
        row_image: (R,) int64, row r copies image ``x[row_image[r]]``.
        row_sample: (R,) int64 sample index of row r, in [0, 2^32).
        image_ids: (B,) int64 global id of each image in [0, 2^32) (its index in the data set).
        seed, stream: the key of the noise stream (see module docstring).
        sigma: noise standard deviation in pixel units.
        dtype: output dtype (float32, float16 or bfloat16; with ``noise="discrete"`` also int32,
            which returns the grid indices j = round(255 x) + k instead of pixel values).
        backend: "auto" (the extension's op on CPU, or on CUDA when built with CUDA; else the
            reference), "torch", "cpp" or "triton" (``kernels.noisy_batch`` /
            ``kernels.discrete_noise``; CUDA or the interpreter).
        noise: "gaussian" (the float stream) or "discrete" (sound noise on the 8-bit grid; see
            the module docstring and :func:`discrete_certified_radius` for its guarantee).

    Returns:
        (R, C, H, W) tensor: gaussian ``dtype(float32(x + float32(sigma * z)))``, ``z`` the keyed
        noise; discrete ``dtype(float32((round(255 x) + k) / 255))``, ``k`` the keyed integer steps.
    """
    from . import _ext

    _check_noise(noise)
    if backend not in ("auto", "torch", "cpp", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch', 'cpp' or 'triton', got {backend!r}")
    if noise == "discrete":
        return _noisy_batch_discrete(x, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma,
                                     dtype=dtype, backend=backend)
    if backend == "triton":
        from engine.kernels.noisy_batch import noisy_batch as noisy_batch_triton

        return noisy_batch_triton(x, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma, dtype=dtype)
    if backend == "auto":
        on_cpu = x.device.type == "cpu"
        use_cpp = _ext.available() and (on_cpu or (x.device.type == "cuda" and _ext.has_cuda_ops()))
    else:
        use_cpp = backend == "cpp"
    if not use_cpp:
        return noisy_batch_ref(x, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma, dtype=dtype)
    _check_rows(x, row_image, row_sample, image_ids)
    _check_key(seed, stream)
    _ext.require("noisy_batch backend 'cpp'")
    seed_signed = seed - 2**64 if seed >= 2**63 else seed  # schema ints are int64; same 64 bits
    return torch.ops.engine.noisy_batch(
        x.to(torch.float32).contiguous(),
        row_image.contiguous(),
        row_sample.contiguous(),
        image_ids.contiguous(),
        seed_signed,
        stream,
        float(sigma),
        dtype,
    )


def gaussian_noise(image_ids, samples, shape, *, seed, stream, backend="auto"):
    """Standard normal noise of shape (R, *shape) for rows (image_ids[r], samples[r]).

    ``image_ids`` and ``samples`` are (R,) int64. Equal to :func:`noisy_batch` of a zero image with
    sigma 1, so it is the exact noise the certification paths add (before the sigma scaling).
    """
    image_ids = torch.as_tensor(image_ids, dtype=torch.int64)
    samples = torch.as_tensor(samples, dtype=torch.int64, device=image_ids.device)
    zeros = torch.zeros((image_ids.shape[0],) + tuple(shape), dtype=torch.float32, device=image_ids.device)
    rows = torch.arange(image_ids.shape[0], dtype=torch.int64, device=image_ids.device)
    return noisy_batch(zeros, rows, samples, image_ids, seed=seed, stream=stream, sigma=1.0, backend=backend)


def _noisy_batch_discrete(x, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype, backend):
    from . import _ext

    _check_rows(x, row_image, row_sample, image_ids)
    _check_key(seed, stream)
    sigma = _check_sigma_discrete(sigma)
    _check_discrete_dtype(dtype)
    if backend == "triton":
        from engine.kernels.discrete_noise import noisy_batch_discrete as noisy_batch_discrete_triton

        return noisy_batch_discrete_triton(x, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma,
                                           dtype=dtype)
    if backend == "auto":
        use_cpp = _ext.available() and (x.device.type == "cpu" or (x.device.type == "cuda" and _ext.has_cuda_ops()))
    else:
        use_cpp = backend == "cpp"
    if not use_cpp:
        return _noisy_discrete_ref(x, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma, dtype=dtype)
    _ext.require("noisy_batch backend 'cpp'")
    grid = grid_indices(x).reshape(x.shape)
    return _discrete_op(grid, row_image, row_sample, image_ids, seed=seed, stream=stream, sigma=sigma, dtype=dtype)


def _discrete_op(grid, row_image, row_sample, image_ids, *, seed, stream, sigma, dtype):
    """torch.ops.engine.noisy_batch_discrete on int32 grid indices (checked by the caller)."""
    seed_signed = seed - 2**64 if seed >= 2**63 else seed
    return torch.ops.engine.noisy_batch_discrete(
        grid.contiguous(),
        row_image.contiguous(),
        row_sample.contiguous(),
        image_ids.contiguous(),
        _table_tensor(sigma, str(grid.device)),
        seed_signed,
        stream,
        dtype,
    )


def discrete_noise(image_ids, samples, shape, *, seed, stream, sigma, backend="auto"):
    """Integer grid steps k of ``noise="discrete"``, shape (R, *shape) int32, rows (image_ids[r], samples[r]).

    ``image_ids`` and ``samples`` are (R,) int64. These are the exact steps that
    :func:`noisy_batch` with ``noise="discrete"`` adds to round(255 x) (its int32 output of a zero
    image), on every backend.
    """
    image_ids = torch.as_tensor(image_ids, dtype=torch.int64)
    samples = torch.as_tensor(samples, dtype=torch.int64, device=image_ids.device)
    zeros = torch.zeros((image_ids.shape[0],) + tuple(shape), dtype=torch.uint8, device=image_ids.device)
    rows = torch.arange(image_ids.shape[0], dtype=torch.int64, device=image_ids.device)
    return noisy_batch(zeros, rows, samples, image_ids, seed=seed, stream=stream, sigma=sigma, dtype=torch.int32,
                       backend=backend, noise="discrete")
