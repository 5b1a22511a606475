import numpy as np
import pytest
from scipy import stats

from engine.stats import binomial_two_sided_pvalue, certified_radius, clopper_pearson_lower

CASES = [
    (0, 1),
    (1, 1),
    (0, 100),
    (100, 100),
    (1, 100),
    (99, 100),
    (50, 100),
    (0, 100_000),
    (100_000, 100_000),
    (99_999, 100_000),
    (73_123, 100_000),
    (500, 1000),
    (1, 2),
    (7, 13),
]


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("k,n", CASES)
def test_clopper_pearson_matches_scipy(k, n, alpha):
    got = float(clopper_pearson_lower(k, n, alpha))
    # scipy's exact (Clopper-Pearson) interval at confidence 1 - 2 alpha: its lower end is the
    # one-sided (1 - alpha) bound (= statsmodels proportion_confint(k, n, 2 alpha, "beta")[0]).
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert got == pytest.approx(ci.low, abs=1e-12, rel=1e-12)
    if 0 < k:
        assert got == pytest.approx(stats.beta.ppf(alpha, k, n - k + 1), abs=1e-12, rel=1e-12)
    if k == 0:
        assert got == 0.0
    if k == n:
        assert got == pytest.approx(alpha ** (1.0 / n), abs=1e-12, rel=1e-12)


@pytest.mark.parametrize("k,n", [(c, m) for c, m in CASES if 0 < c])
def test_clopper_pearson_defining_property(k, n):
    # The lower bound p_L solves P[Binomial(n, p_L) >= k] = alpha.
    alpha = 0.001
    p_low = float(clopper_pearson_lower(k, n, alpha))
    assert stats.binom.sf(k - 1, n, p_low) == pytest.approx(alpha, rel=1e-9)


def test_clopper_pearson_vectorised_and_errors():
    k = np.array([0, 5, 10])
    out = clopper_pearson_lower(k, 10, 0.05)
    assert out.shape == (3,) and out[0] == 0 and np.all(np.diff(out) > 0)
    for bad in [(-1, 10, 0.1), (11, 10, 0.1), (1, 0, 0.1), (1, 10, 0.0), (1, 10, 1.0)]:
        with pytest.raises(ValueError):
            clopper_pearson_lower(*bad)


@pytest.mark.parametrize("p", [0.5, 0.5000001, 0.6, 0.9, 0.999, 0.99999])
@pytest.mark.parametrize("sigma", [0.12, 0.25, 1.0])
def test_radius_matches_norm_ppf(p, sigma):
    assert float(certified_radius(p, sigma)) == pytest.approx(sigma * stats.norm.ppf(p), abs=1e-12, rel=1e-12)


def test_binomial_pvalue():
    assert binomial_two_sided_pvalue(50, 100) == pytest.approx(1.0)
    assert binomial_two_sided_pvalue(100, 100) == pytest.approx(2 * 0.5**100, rel=1e-12)
    assert binomial_two_sided_pvalue(60, 100) == pytest.approx(stats.binomtest(60, 100, 0.5).pvalue, rel=1e-12)
