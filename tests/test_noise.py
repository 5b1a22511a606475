"""The keyed noise stream: Philox known answers, bit-exact backends, accuracy and quality."""

import math
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from engine import _ext, noise

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"engine._C not built: {_ext.load_error()}")

# Random123 known-answer vectors for philox4x32_10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = noise.philox4x32_ref(*[torch.tensor(c) for c in counter], key[0] | (key[1] << 32))
    assert tuple(int(o) for o in out) == expected


def _philox_python(c, k):
    """Philox4x32-10 with Python integers, written independently of the engine."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _noise_float64(image_id, sample, pixels, seed, stream):
    """The stream's definition evaluated in float64 with NumPy's math (independent reference)."""
    out = []
    for g in range((pixels + 3) // 4):
        w = _philox_python((g, sample, image_id, stream), (seed & 0xFFFFFFFF, seed >> 32))
        for wa, wb in ((w[0], w[1]), (w[2], w[3])):
            u1 = ((wa >> 8) + 1) * 2.0**-24
            theta = 2 * math.pi * (wb >> 8) * 2.0**-24
            r = math.sqrt(-2 * math.log(u1))
            out += [r * math.cos(theta), r * math.sin(theta)]
    return np.array(out[:pixels])


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**64 - 1])
def test_reference_matches_float64_definition(seed):
    ids = [0, 3, 2**32 - 1]
    samples = [0, 2**31 + 7, 12]
    z = noise.gaussian_noise(torch.tensor(ids), torch.tensor(samples), (3, 5, 7), seed=seed, stream=5, backend="torch")
    for r, (i, s) in enumerate(zip(ids, samples)):
        truth = _noise_float64(i, s, 105, seed, 5)
        np.testing.assert_allclose(z[r].flatten().numpy(), truth, atol=2e-6, rtol=0)


def test_polynomial_constants_reproduce():
    fitted = noise.fit_polynomials()
    for name, consts in (("log", noise.LOG_COEFFS), ("sin", noise.SIN_COEFFS), ("cos", noise.COS_COEFFS)):
        got = np.array(fitted[name], dtype=np.float32)
        want = np.array(consts, dtype=np.float32)
        # equal up to one float32 ulp (the float64 fit's last bits may vary with the LAPACK build)
        assert np.all(np.abs(got.view(np.int32) - want.view(np.int32)) <= 1), name


def test_box_muller_accuracy_over_all_inputs():
    # every 24-bit radius input and a dense set of angle inputs against float64 math
    a = torch.arange(0, 2**24, dtype=torch.int64) << 8
    b = torch.randint(0, 2**32, a.shape, dtype=torch.int64)
    zc, zs = noise._box_muller_ref(a, b)
    u1 = ((a >> 8) + 1).double() * 2.0**-24
    theta = 2 * math.pi * (b >> 8).double() * 2.0**-24
    r = torch.sqrt(-2 * torch.log(u1))
    assert float((zc.double() - r * torch.cos(theta)).abs().max()) < 2e-6
    assert float((zs.double() - r * torch.sin(theta)).abs().max()) < 2e-6
    assert float(zc.abs().max()) <= math.sqrt(48 * math.log(2)) + 1e-5


def _random_rows(gen, batch, rows):
    ri = torch.randint(0, batch, (rows,), generator=gen)
    rs = torch.randint(0, 2**32, (rows,), generator=gen)
    ids = torch.randint(0, 2**32, (batch,), generator=gen)
    return ri, rs, ids


@needs_ext
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 1, 1), (2, 3, 5), (1, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpp_op_bit_exact_with_reference(shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    x = torch.rand((4,) + shape, generator=gen)
    ri, rs, ids = _random_rows(gen, 4, 37)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 4 + 3
    for sigma in (0.12, 1.0):
        kw = dict(seed=seed, stream=7, sigma=sigma, dtype=dtype)
        ref = noise.noisy_batch_ref(x, ri, rs, ids, **kw)
        fast = noise.noisy_batch(x, ri, rs, ids, backend="cpp", **kw)
        assert fast.dtype == dtype and fast.shape == (37,) + shape
        assert torch.equal(ref, fast)


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda_ops()), reason="needs CUDA and engine._C built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_op_bit_exact_with_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.rand((5, 3, 17, 9), generator=gen)
    ri, rs, ids = _random_rows(gen, 5, 301)
    kw = dict(seed=2**63 + 12345, stream=1, sigma=0.5, dtype=dtype)
    ref = noise.noisy_batch_ref(x, ri, rs, ids, **kw)
    ref_gpu = noise.noisy_batch_ref(x.cuda(), ri.cuda(), rs.cuda(), ids.cuda(), **kw)
    fast = noise.noisy_batch(x.cuda(), ri.cuda(), rs.cuda(), ids.cuda(), backend="cpp", **kw)
    assert torch.equal(ref, ref_gpu.cpu()) and torch.equal(ref, fast.cpu())


@needs_ext
def test_cpp_op_opcheck():
    x = torch.rand(3, 1, 5, 6)
    ri = torch.tensor([0, 2, 1, 1])
    rs = torch.tensor([0, 1, 2, 3])
    ids = torch.tensor([10, 11, 12])
    torch.library.opcheck(torch.ops.engine.noisy_batch.default, (x, ri, rs, ids, 5, 1, 0.5, torch.float32))


@needs_ext
def test_cpp_op_rejects_bad_rows():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="row_image values"):
        noise.noisy_batch(
            x, torch.tensor([0, 2]), torch.tensor([0, 0]), torch.tensor([0, 1]), seed=0, stream=0, sigma=1.0, backend="cpp"
        )
    with pytest.raises(RuntimeError, match="row_sample values"):
        noise.noisy_batch(
            x, torch.tensor([0, 1]), torch.tensor([0, -1]), torch.tensor([0, 1]), seed=0, stream=0, sigma=1.0, backend="cpp"
        )


def test_argument_errors():
    x = torch.rand(2, 1, 4, 4)
    ri, rs, ids = torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="seed"):
        noise.noisy_batch_ref(x, ri, rs, ids, seed=-1, stream=0, sigma=1.0)
    with pytest.raises(ValueError, match="seed"):
        noise.noisy_batch_ref(x, ri, rs, ids, seed=2**64, stream=0, sigma=1.0)
    with pytest.raises(ValueError, match="stream"):
        noise.noisy_batch_ref(x, ri, rs, ids, seed=0, stream=2**32, sigma=1.0)
    with pytest.raises(ValueError, match="image_ids"):
        noise.noisy_batch_ref(x, ri, rs, torch.tensor([0]), seed=0, stream=0, sigma=1.0)
    with pytest.raises(ValueError, match="row_image"):
        noise.noisy_batch_ref(x, ri.int(), rs, ids, seed=0, stream=0, sigma=1.0)
    with pytest.raises(ValueError, match="backend"):
        noise.noisy_batch(x, ri, rs, ids, seed=0, stream=0, sigma=1.0, backend="gpu")


def test_keys_select_independent_streams():
    ids, samples = torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 0, 0])
    a = noise.gaussian_noise(ids, samples, (64,), seed=0, stream=0)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    b = noise.gaussian_noise(ids, samples, (64,), seed=0, stream=1)
    c = noise.gaussian_noise(ids, samples, (64,), seed=1, stream=0)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # a row depends on its key only, not on the other rows requested with it
    d = noise.gaussian_noise(ids[1:2], samples[1:2], (64,), seed=0, stream=0)
    assert torch.equal(d[0], a[1])
    # a prefix of pixels does not depend on the image size
    e = noise.gaussian_noise(ids, samples, (13,), seed=0, stream=0)
    assert torch.equal(e, a[:, :13])


def test_noise_quality_over_many_draws():
    # 4096 rows x 300 pixels = 1.23e6 draws; thresholds are ~6 standard errors (false alarm < 1e-8
    # each) or p-value 1e-6 for the KS test.
    rows, pixels = 4096, 300
    ids = torch.arange(rows) // 64
    samples = torch.arange(rows) % 64
    z = noise.gaussian_noise(ids, samples, (pixels,), seed=20261122, stream=3).double()
    flat = z.flatten().numpy()
    n = flat.size
    assert n >= 1_000_000
    assert abs(flat.mean()) < 6 / math.sqrt(n)
    assert abs(flat.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs(stats.skew(flat)) < 6 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(flat)) < 6 * math.sqrt(24 / n)
    assert stats.kstest(flat, "norm").pvalue > 1e-6
    tail = np.mean(np.abs(flat) > 3)
    p3 = 2 * stats.norm.sf(3)
    assert abs(tail - p3) < 6 * math.sqrt(p3 / n)

    def corr(a, b):
        a, b = a.flatten(), b.flatten()
        return float(np.corrcoef(a, b)[0, 1])

    zz = z.view(64, 64, pixels).numpy()  # (image, sample, pixel)
    bound = 6 / math.sqrt(64 * 63 * pixels)
    assert abs(corr(zz[:, :, :-1], zz[:, :, 1:])) < 6 / math.sqrt(64 * 64 * (pixels - 1))  # neighbouring pixels
    assert abs(corr(zz[:, :-1, :], zz[:, 1:, :])) < bound  # neighbouring samples
    assert abs(corr(zz[:-1, :, :], zz[1:, :, :])) < bound  # neighbouring images
    # the two normals of one Box-Muller pair and the two pairs of one Philox block
    assert abs(corr(zz[:, :, 0::4][..., :75], zz[:, :, 1::4][..., :75])) < 6 / math.sqrt(64 * 64 * 75)
    assert abs(corr(zz[:, :, 0::4][..., :75], zz[:, :, 2::4][..., :75])) < 6 / math.sqrt(64 * 64 * 75)
