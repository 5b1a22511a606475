"""Confidence bounds used by certification (float64, SciPy special functions)."""

from __future__ import annotations

import numpy as np
from scipy import special, stats

__all__ = ["clopper_pearson_lower", "clopper_pearson_upper", "certified_radius", "binomial_two_sided_pvalue"]


def clopper_pearson_lower(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    Equals the alpha quantile of Beta(k, n - k + 1) (0 when k = 0; alpha^(1/n) when k = n), i.e.
    statsmodels' ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``. Vectorised over
    ``k`` and ``n`` (arrays or tensors of integers); returns float64 numpy.
    """
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n) or np.any(n < 1):
        raise ValueError("clopper_pearson_lower needs 0 <= k <= n and n >= 1")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    k_safe = np.where(k > 0, k, 1.0)
    out = special.betaincinv(k_safe, n - k_safe + 1.0, float(alpha))
    return np.where(k > 0, out, 0.0)


def certified_radius(p_lower, sigma):
    """sigma * Phi^-1(p_lower) (float64); callers abstain when p_lower < 0.5."""
    return float(sigma) * special.ndtri(np.asarray(p_lower, dtype=np.float64))


def binomial_two_sided_pvalue(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test p-value (scipy.stats.binomtest)."""
    return float(stats.binomtest(int(k), int(n), p).pvalue)


def clopper_pearson_upper(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p from k successes in n trials.

    The 1 - alpha quantile of Beta(k + 1, n - k) (1 when k = n); equals ``1 - clopper_pearson_lower(n - k, n,
    alpha)``. Vectorised like :func:`clopper_pearson_lower`; returns float64 numpy.
    """
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n) or np.any(n < 1):
        raise ValueError("clopper_pearson_upper needs 0 <= k <= n and n >= 1")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    k_safe = np.where(k < n, k, n - 1.0)
    out = special.betaincinv(k_safe + 1.0, n - k_safe, 1.0 - float(alpha))
    return np.where(k < n, out, 1.0)
