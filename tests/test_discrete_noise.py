"""Discrete (sound) noise: the table and its law, bit-exact backends, the grid, statistics, the radius."""

import itertools
import math
import zlib
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from kernel_testing import gpu
from scipy import stats

from engine import _ext, noise
from engine.validate import InputError

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"engine._C not built: {_ext.load_error()}")
BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.available() else [])
SIGMAS = [0.002, 0.12, 0.25, 1.0]


def _rows(gen, batch, rows):
    ri = torch.randint(0, batch, (rows,), generator=gen)
    rs = torch.randint(0, 2**32, (rows,), generator=gen)
    ids = torch.randint(0, 2**32, (batch,), generator=gen)
    return ri, rs, ids


def _grid_images(gen, shape):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# the table and the law it implements
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", SIGMAS)
def test_table_is_symmetric_monotone_and_close_to_phi(sigma):
    table = noise.discrete_table(sigma)
    t = table.thresholds
    k = table.half_width
    assert len(t) == 2 * k
    assert all(0 < a <= b < 2**64 for a, b in zip(t[:-1], t[1:]))
    assert all(a + b == 2**64 for a, b in zip(t, reversed(t)))  # T_{-k-1} = 2^64 - T_k
    counts = table.counts()
    assert sum(counts) == 2**64 and counts == counts[::-1] and min(counts) >= 0
    s = 255 * sigma
    cuts = (np.arange(-k, k) + 0.5) / s
    # float64 Phi (an independent evaluation) agrees to its own accuracy
    assert np.max(np.abs(np.array([v / 2**64 for v in t]) - stats.norm.cdf(cuts))) < 1e-15
    # K is where the Gaussian tail drops below 2^-65
    assert stats.norm.sf((k + 0.5) / s) < 2.0**-65 * 1.01
    if k:
        assert stats.norm.sf((k - 0.5) / s) > 2.0**-65 * 0.99
    assert table.tv_bound == (k + 2) * 2.0**-64


@pytest.mark.parametrize("sigma", [0.01, 0.25])
def test_tv_bound_holds_against_exact_rounded_gaussian(sigma):
    # total variation between the implemented law and r(k) = Phi((k+1/2)/s) - Phi((k-1/2)/s), in
    # 100-digit arithmetic, including r's mass beyond +-K
    mpmath.mp.dps = 100
    try:
        table = noise.discrete_table(sigma)
        s = mpmath.mpf(sigma) * 255
        k = table.half_width
        phi = [mpmath.ncdf((i + mpmath.mpf(1) / 2) / s) for i in range(-k - 1, k + 1)]  # Phi_{-K-1} .. Phi_K
        tv = 0
        for i, c in enumerate(table.counts()):  # k = -K + i
            r = phi[i + 1] - phi[i]
            tv += abs(mpmath.mpf(c) / 2**64 - r)
        tv += phi[0] + (1 - phi[-1])
        tv /= 2
    finally:
        mpmath.mp.dps = 15
    assert tv <= table.tv_bound
    assert tv > 0


def test_tiny_sigma_is_no_noise_and_pmf_api():
    table = noise.discrete_table(1e-4)
    assert table.half_width == 0 and table.counts() == (2**64,)
    ks, p = noise.discrete_pmf(0.25)
    assert ks[0] == -ks[-1] and len(ks) == len(p) and abs(p.sum() - 1) < 1e-12
    assert abs(float((ks * ks * p).sum()) - ((0.25 * 255) ** 2 + 1 / 12)) < 1e-6  # Sheppard's variance


# ---------------------------------------------------------------------------------------------
# bit equality across backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 5, 7), (1, 1, 1), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_backends_bit_exact(shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    x = _grid_images(gen, (3,) + shape)
    ri, rs, ids = _rows(gen, 3, 13)
    for seed, sigma in ((0, 0.12), (2**63 + 12345, 1.0), (2**64 - 1, 0.25), (7, 0.002)):
        kw = dict(seed=seed, stream=2**32 - 1, sigma=sigma, dtype=dtype, noise="discrete")
        ref = noise.noisy_batch_ref(x, ri, rs, ids, **kw)
        assert ref.dtype == dtype and ref.shape == (13,) + shape
        for backend in BACKENDS:
            out = noise.noisy_batch(x, ri, rs, ids, backend=backend, **kw)
            assert out.dtype == dtype and torch.equal(out, ref), backend
        # float images of the grid give the same bits as their uint8 originals
        assert torch.equal(noise.noisy_batch(x.float() / 255, ri, rs, ids, backend="auto", **kw), ref)


def test_backends_agree_on_many_draws():
    # 64 rows x 301 pixels, every backend, int steps and pixel values
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 2**32, (64,), generator=gen)
    samples = torch.randint(0, 2**32, (64,), generator=gen)
    ref = noise.discrete_noise(ids, samples, (301,), seed=99, stream=1, sigma=0.5, backend="torch")
    for backend in BACKENDS:
        assert torch.equal(noise.discrete_noise(ids, samples, (301,), seed=99, stream=1, sigma=0.5, backend=backend), ref)


@needs_ext
def test_cpp_op_opcheck():
    grid = torch.randint(0, 256, (3, 1, 5, 6), dtype=torch.int32)
    ri, rs, ids = torch.tensor([0, 2, 1, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12])
    table = noise.discrete_table(0.1).as_tensor()
    for dtype in (torch.float32, torch.int32):
        torch.library.opcheck(torch.ops.engine.noisy_batch_discrete.default, (grid, ri, rs, ids, table, 5, 1, dtype))


def test_steps_follow_the_stream_definition():
    # pixel p of row (i, s): u = w0 2^32 + w1 (p even) or w2 2^32 + w3 (p odd) of Philox block
    # (p >> 1, s, i, t); k = #{T <= u} - K, computed here with Python integers
    seed, stream, sigma = 2**40 + 3, 5, 0.3
    table = noise.discrete_table(sigma)
    ids, samples = [4, 2**32 - 1], [2**31 + 1, 0]
    k = noise.discrete_noise(torch.tensor(ids), torch.tensor(samples), (7,), seed=seed, stream=stream, sigma=sigma,
                             backend="torch")
    import bisect

    for r, (i, s) in enumerate(zip(ids, samples)):
        for p in range(7):
            w = [int(v) for v in noise.philox4x32_ref(torch.tensor(p >> 1), torch.tensor(s), torch.tensor(i), stream, seed)]
            u = (w[0] << 32 | w[1]) if p % 2 == 0 else (w[2] << 32 | w[3])
            assert int(k[r, p]) == bisect.bisect_right(table.thresholds, u) - table.half_width


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_on_the_grid(backend):
    gen = torch.Generator().manual_seed(4)
    x = _grid_images(gen, (4, 2, 6, 6))
    x[0] = 0
    x[1] = 255  # extremes: the noise leaves [0, 1] on both sides
    ri, rs, ids = _rows(gen, 4, 40)
    sigma = 0.5
    kw = dict(seed=11, stream=3, sigma=sigma, noise="discrete", backend=backend)
    out = noise.noisy_batch(x, ri, rs, ids, **kw)
    j = noise.noisy_batch(x, ri, rs, ids, dtype=torch.int32, **kw)
    half = noise.discrete_table(sigma).half_width
    assert int(j.min()) >= -half and int(j.max()) <= 255 + half
    # the value is the correctly rounded float32 quotient j / 255 (NumPy's IEEE division)
    expect = (j.numpy().astype(np.float32) / np.float32(255)).astype(np.float32)
    assert np.array_equal(out.numpy(), expect)
    # and j - round(255 x) are the keyed steps of discrete_noise
    k = noise.discrete_noise(ids[ri], rs, x.shape[1:], seed=11, stream=3, sigma=sigma, backend=backend)
    assert torch.equal(j - x[ri].to(torch.int32), k)
    assert float((out.double() * 255 - j.double()).abs().max()) < 1e-4
    assert int((j < 0).sum()) > 0 and int((j > 255).sum()) > 0


def test_correct_rounding_of_every_grid_value():
    j = torch.arange(-5000, 5256)
    got = noise._grid_values_ref(j, torch.float32)
    exact = [Fraction(int(v), 255) for v in j]
    for v, e in zip(got.tolist(), exact):
        f = Fraction(v)
        lo = Fraction(float(np.nextafter(np.float32(v), np.float32(-np.inf))))
        hi = Fraction(float(np.nextafter(np.float32(v), np.float32(np.inf))))
        assert abs(f - e) <= min(abs(lo - e), abs(hi - e))


def test_batch_layout_does_not_change_a_row():
    gen = torch.Generator().manual_seed(6)
    x = _grid_images(gen, (5, 1, 4, 5))
    ids = torch.tensor([3, 0, 2**32 - 1, 17, 8])
    ri = torch.tensor([0, 0, 1, 2, 3, 4, 4, 2])
    rs = torch.tensor([0, 1, 0, 5, 2**32 - 1, 0, 9, 6])
    kw = dict(seed=123, stream=1, sigma=0.25, noise="discrete")
    for backend in BACKENDS:
        full = noise.noisy_batch(x, ri, rs, ids, backend=backend, **kw)
        perm = torch.tensor([7, 3, 0, 5, 1, 6, 2, 4])
        assert torch.equal(noise.noisy_batch(x, ri[perm], rs[perm], ids, backend=backend, **kw), full[perm])
        # one image alone, as part of another batch
        sub = noise.noisy_batch(x[2:3], torch.tensor([0]), rs[3:4], ids[2:3], backend=backend, **kw)
        assert torch.equal(sub[0], full[3])
        # a prefix of pixels does not depend on the image size
        j_full = noise.discrete_noise(ids[ri], rs, (20,), seed=123, stream=1, sigma=0.25, backend=backend)
        j_part = noise.discrete_noise(ids[ri], rs, (7,), seed=123, stream=1, sigma=0.25, backend=backend)
        assert torch.equal(j_part, j_full[:, :7])


# ---------------------------------------------------------------------------------------------
# statistics (thresholds ~6 standard errors, or p-values 1e-6)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.25, 0.02])
def test_moments_ks_and_chi_square(sigma):
    rows, pixels = 2048, 512
    ids = torch.arange(rows) // 32
    samples = torch.arange(rows) % 32
    backend = "cpp" if _ext.available() else "torch"
    k = noise.discrete_noise(ids, samples, (pixels,), seed=20261206, stream=4, sigma=sigma, backend=backend)
    k = k.flatten().numpy().astype(np.int64)
    n = k.size
    table = noise.discrete_table(sigma)
    steps, pmf = table.steps(), table.pmf()
    mean, var = 0.0, float((steps**2 * pmf).sum())  # exact law: symmetric
    m4 = float((steps**4 * pmf).sum())
    assert abs(k.mean() - mean) < 6 * math.sqrt(var / n)
    assert abs((k.astype(np.float64) ** 2).mean() - var) < 6 * math.sqrt((m4 - var**2) / n)
    s = 255 * sigma
    assert abs(var - (s * s + 1 / 12)) < 1e-3 * var  # the rounded Gaussian's variance
    # KS against the discretised Gaussian CDF F(k) = Phi((k + 1/2) / s), at the support points
    # (for a discrete law the Kolmogorov p-value is conservative)
    values, counts = np.unique(k, return_counts=True)
    ecdf = np.cumsum(counts) / n
    cdf = stats.norm.cdf((values + 0.5) / s)
    cdf_left = stats.norm.cdf((values - 0.5) / s)
    d = max(np.max(np.abs(ecdf - cdf)), np.max(np.abs(np.concatenate(([0.0], ecdf[:-1])) - cdf_left)))
    assert stats.kstwobign.sf(math.sqrt(n) * d) > 1e-6
    # chi-square over cells with expected counts >= 50 (tails pooled)
    ideal = stats.norm.cdf((steps + 0.5) / s) - stats.norm.cdf((steps - 0.5) / s)
    observed = np.bincount(k - steps[0], minlength=len(steps)).astype(np.float64)
    expected = ideal * n
    keep = expected >= 50
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], n - expected[keep].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert stats.chi2.sf(chi2, len(obs) - 1) > 1e-6
    # neighbouring pixels (the two lanes of a Philox block) and samples are uncorrelated
    kk = k.reshape(rows, pixels).astype(np.float64)
    assert abs(np.corrcoef(kk[:, 0::2].ravel(), kk[:, 1::2].ravel())[0, 1]) < 6 / math.sqrt(n / 2)
    assert abs(np.corrcoef(kk[:-1].ravel(), kk[1:].ravel())[0, 1]) < 6 / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_bad_inputs():
    ri, rs, ids = torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1])
    kw = dict(seed=0, stream=0, sigma=0.25, noise="discrete")
    good = torch.randint(0, 256, (2, 1, 3, 3)).float() / 255
    for backend in BACKENDS:
        with pytest.raises(InputError, match="8-bit grid"):
            noise.noisy_batch(good + 0.4 / 255, ri, rs, ids, backend=backend, **kw)
        with pytest.raises(InputError, match="8-bit grid"):
            noise.noisy_batch(good + 1.0, ri, rs, ids, backend=backend, **kw)
    with pytest.raises(InputError, match="8-bit grid"):
        noise.noisy_batch_ref(torch.rand(2, 1, 3, 3), ri, rs, ids, **kw)
    with pytest.raises(InputError, match="NaN"):
        noise.noisy_batch_ref(torch.full((2, 1, 3, 3), math.nan), ri, rs, ids, **kw)
    with pytest.raises(InputError, match="uint8 or floating"):
        noise.noisy_batch_ref(torch.zeros(2, 1, 3, 3, dtype=torch.int64), ri, rs, ids, **kw)
    with pytest.raises(InputError, match="noise must be"):
        noise.noisy_batch(good, ri, rs, ids, seed=0, stream=0, sigma=0.25, noise="uniform")
    with pytest.raises(InputError, match="noise must be"):
        noise.noisy_batch_ref(good, ri, rs, ids, seed=0, stream=0, sigma=0.25, noise=None)
    for sigma in (0.0, -1.0, math.inf, 100.0, "a"):
        with pytest.raises(InputError, match="sigma"):
            noise.noisy_batch(good, ri, rs, ids, seed=0, stream=0, sigma=sigma, noise="discrete")
    with pytest.raises(InputError, match="dtype"):
        noise.noisy_batch(good, ri, rs, ids, dtype=torch.float64, **kw)
    with pytest.raises(ValueError, match="seed"):
        noise.noisy_batch(good, ri, rs, ids, seed=-1, stream=0, sigma=0.25, noise="discrete")
    # tolerated float rounding: float32 j / 255, even recomputed as j * (1/255)
    j = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16)
    assert torch.equal(noise.grid_indices(j * (1 / 255)), torch.arange(256, dtype=torch.int32)[None])
    # the Gaussian path is unchanged and does not check the grid
    noise.noisy_batch_ref(torch.rand(2, 1, 3, 3), ri, rs, ids, seed=0, stream=0, sigma=0.25)


# ---------------------------------------------------------------------------------------------
# the certified radius
# ---------------------------------------------------------------------------------------------


def test_radius_basic_properties():
    p = np.linspace(0.0, 1.0, 2001)
    for sigma, d in ((0.12, 784), (0.25, 3072), (1.0, 150528)):
        r = noise.discrete_certified_radius(p, sigma, d)
        assert r.dtype == np.float64 and r.shape == p.shape
        assert np.all(np.diff(r) >= 0) and np.all(r[p <= 0.5] == 0) and np.all(np.isfinite(r))
        assert noise.discrete_certified_radius(0.5, sigma, d) == 0.0
        inner = (p > 0.5) & (p < 1)
        cohen = sigma * stats.norm.ppf(p[inner])
        assert np.all(r[inner] <= cohen)  # never more than the idealised certificate
        assert np.max(cohen - r[inner]) < 1e-7  # eta = D (K + 2) 2^-64 < 2e-11 is negligible here
        assert 0 < r[-1] < 10 * sigma  # p = 1 still gives a finite radius (p - eta < 1)
    # tensors and the largest p a 100,000-sample Clopper-Pearson bound gives
    p_cp = 0.001 ** (1 / 100_000)
    r = noise.discrete_certified_radius(torch.tensor([p_cp], dtype=torch.float64), 0.25, 784)
    assert abs(r[0] - 0.25 * stats.norm.ppf(p_cp)) < 1e-9
    with pytest.raises(InputError):
        noise.discrete_certified_radius(1.5, 0.25, 784)
    with pytest.raises(InputError):
        noise.discrete_certified_radius(0.9, 0.25, 0)


def test_radius_against_independent_high_precision_formula():
    mpmath.mp.dps = 50
    try:
        for sigma, d in ((0.25, 784), (0.004, 10**9), (1.0, 3072)):
            table = noise.discrete_table(sigma)
            eta = mpmath.mpf(d) * (table.half_width + 2) / mpmath.mpf(2) ** 64
            for p in (0.5 + 1e-12, 0.6, 0.9, 0.999, 1 - 1e-7):
                lo, hi = mpmath.mpf(p) - eta, mpmath.mpf(0.5) + eta
                bound = sigma * (mpmath.sqrt(2) * (mpmath.erfinv(2 * lo - 1) - mpmath.erfinv(2 * hi - 1))) if lo > hi else 0
                r = noise.discrete_certified_radius(p, sigma, d)
                assert bound * (1 - 1e-9) - 1e-10 < r <= bound, (sigma, d, p)
    finally:
        mpmath.mp.dps = 15


def _worst_case_probability(q, delta, p):
    """min Q(A) over (randomised) A with P(A) >= p, P = q^d, Q = q^d shifted by delta (Neyman-Pearson)."""
    support = [i for i, c in enumerate(q) if c]
    d = len(delta)
    points = []
    for z in itertools.product(support, repeat=d):
        pz = math.prod(q[i] for i in z)
        qz = math.prod(q[i - dl] if 0 <= i - dl < len(q) else 0 for i, dl in zip(z, delta))
        points.append((Fraction(qz, pz), pz, qz))
    points.sort(key=lambda t: t[0])
    total = sum(t[1] for t in points)
    need, got = Fraction(p) * total, Fraction(0)
    for _, pz, qz in points:
        if need <= 0:
            break
        take = min(Fraction(1), need / pz)
        got += take * qz
        need -= take * pz
    return got / total


@pytest.mark.parametrize("dims", [1, 2])
def test_radius_is_sound_by_brute_force(dims):
    # a small sigma (1.5 grid steps) so that the law is far from Gaussian; the exact implemented law
    # (2^64 denominators), every grid perturbation inside the radius, Neyman-Pearson's worst case
    sigma = 1.5 / 255
    q = list(noise.discrete_table(sigma).counts())
    checked = 0
    for p in (0.7, 0.9, 0.99, 0.9999):
        steps = 255 * noise.discrete_certified_radius(p, sigma, dims)  # radius in grid steps
        reach = int(math.ceil(steps))
        for delta in itertools.product(range(-reach, reach + 1), repeat=dims):
            norm = math.sqrt(sum(v * v for v in delta))
            if 0 < norm < steps and all(v >= 0 for v in delta):  # the law is symmetric per pixel
                assert _worst_case_probability(q, delta, p) > Fraction(1, 2), (p, delta)
                checked += 1
    assert checked >= 6
    # and the radius is not vacuous: just beyond Cohen's radius the worst case fails
    p = 0.9
    first_out = int(math.floor(255 * sigma * stats.norm.ppf(p))) + 1
    assert _worst_case_probability(q, (first_out + 1,) + (0,) * (dims - 1), p) < Fraction(1, 2)


# ---------------------------------------------------------------------------------------------
# on a GPU (skipped here): the CUDA op and the compiled Triton kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda_ops()), reason="needs CUDA and engine._C built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_cuda_op_bit_exact(dtype):
    gen = torch.Generator().manual_seed(21)
    x = _grid_images(gen, (5, 3, 17, 9))
    ri, rs, ids = _rows(gen, 5, 301)
    kw = dict(seed=2**63 + 12345, stream=1, sigma=0.5, dtype=dtype, noise="discrete")
    ref = noise.noisy_batch_ref(x, ri, rs, ids, **kw)
    fast = noise.noisy_batch(x.cuda(), ri.cuda(), rs.cuda(), ids.cuda(), backend="cpp", **kw)
    ref_gpu = noise.noisy_batch_ref(x.cuda(), ri.cuda(), rs.cuda(), ids.cuda(), **kw)
    assert torch.equal(ref, fast.cpu()) and torch.equal(ref, ref_gpu.cpu())


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_triton_cuda_bit_exact(dtype):
    gen = torch.Generator().manual_seed(22)
    x = _grid_images(gen, (7, 3, 32, 32))
    ri, rs, ids = _rows(gen, 7, 2000)
    kw = dict(seed=2**64 - 3, stream=2**32 - 1, sigma=1.0, dtype=dtype, noise="discrete")
    ref = noise.noisy_batch_ref(x, ri, rs, ids, **kw)
    out = noise.noisy_batch(x.cuda(), ri.cuda(), rs.cuda(), ids.cuda(), backend="triton", **kw)
    assert torch.equal(out.cpu(), ref)
