"""Adaptive sample sizes for CERTIFY with the same guarantee (``certify(..., sampling="adaptive")``).

Cohen et al.'s CERTIFY draws a fixed n estimation samples per image. Most images are settled long before:
a grid radius is either certified or out of reach. Here the estimation samples are drawn in *looks* at a
schedule fixed before sampling, ``n_1 < n_2 < ... < n_L = n`` (:func:`look_schedule`), and an image stops
at the first look where its answer is settled.

Guarantee
---------
At look l, with N_A the top-class count among the first n_l estimation samples, the engine computes the
one-sided Clopper-Pearson lower bound LB_l = CP_lower(N_A, n_l, alpha / L). Each LB_l is a valid
(1 - alpha / L) lower confidence bound on p_A for its fixed n_l (the selected class c_A depends only on the
independent selection samples), so by the union bound the event E = {LB_l <= p_A for every look l} has
probability >= 1 - alpha, whatever happens at the looks. On E, any certificate read off any LB_l holds, so
it holds for *any* stopping rule, in particular for the data-dependent ones below. Hence, exactly as for
CERTIFY: for each image, with probability >= 1 - alpha over the sampling, if the prediction is c_A (not -1)
then the smoothed classifier predicts c_A within the returned radius. The price of the looks is alpha / L in
place of alpha in each bound (a slightly smaller radius at the same count).

Stopping rules (they decide only how many samples are drawn, never what is certified):

- **decision mode** (``radii=[r_1, ..., r_m]``): the answer is the largest grid radius certified,
  max{r_j : LB >= Phi(r_j / sigma)}. An image stops when the next grid radius above its certified one is
  out of reach: even if p_A were as large as its upper bound UB_l = CP_upper(N_A, n_l, alpha / L), a count of
  ceil(UB_l n) out of n would not certify it (radius 0, certification itself, counts as a grid step). The
  returned ``radius`` is the certified grid radius (0 when it is below the smallest grid radius but the image
  is certified).
- **radius mode** (``radii=None``): the answer is sigma Phi^-1(LB) as in CERTIFY. A certified image stops when
  the radius reachable at n (the same optimistic count) exceeds the current one by at most ``radius_tol``; an
  image not yet certified goes on while certification is reachable.

Both stop at the last look, n_L = n. The reachable radius is a heuristic, not a bound: the count at n is random
and may exceed ceil(UB_l n), so an early stop may, rarely, miss a grid step (or more than ``radius_tol``) that
sampling to n would have certified. It never affects soundness.

Noise: the selection samples are CERTIFY's (stream :data:`engine.noise.STREAM_SELECTION`); look l draws its
n_l - n_{l-1} new samples from stream ``STREAM_LOOK_BASE + l``, samples 0, 1, ..., keyed by (seed, image id,
sample) like every stream, so results do not depend on batch sizes or on which images are certified together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .stats import certified_radius, clopper_pearson_lower, clopper_pearson_upper

__all__ = ["STREAM_LOOK_BASE", "SAMPLING_MODES", "SamplingPlan", "look_schedule", "make_plan", "adaptive_counts"]

STREAM_LOOK_BASE = 1024  # look l draws from stream 1024 + l (streams 0-2 certify / predict, 16+ training)
SAMPLING_MODES = ("fixed", "adaptive")
FIRST_LOOK = 100
LOOK_FACTOR = math.sqrt(2)  # 20 looks for n = 100,000; chosen by simulation of binomial counts before any benchmark


def look_schedule(n: int, first: int = FIRST_LOOK, factor: float = LOOK_FACTOR) -> tuple[int, ...]:
    """The estimation sample sizes at which adaptive CERTIFY looks, increasing: ceil(n / factor^k) for k = 0, 1, ...
    while at least ``first`` (just n when n < factor * first), without repeats."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    looks = [n]
    k = 1
    while math.ceil(n / factor**k) >= first:
        value = math.ceil(n / factor**k)
        if value < looks[-1]:
            looks.append(value)
        k += 1
    return tuple(reversed(looks))


@dataclass(frozen=True)
class SamplingPlan:
    """How adaptive CERTIFY samples: its looks, the error budget of each, and the stopping rule."""

    looks: tuple[int, ...]
    alpha: float  # the whole budget; each look's bounds use alpha / len(looks)
    radii: tuple[float, ...] | None  # decision mode; None: radius mode
    radius_tol: float | None

    @property
    def mode(self) -> str:
        return "decision" if self.radii is not None else "radius"

    @property
    def alpha_look(self) -> float:
        return self.alpha / len(self.looks)

    def describe(self) -> dict:
        """JSON-ready description (recorded in a results log's settings)."""
        out = {"sampling": "adaptive", "mode": self.mode, "looks": list(self.looks)}
        if self.radii is not None:
            out["radii"] = list(self.radii)
        else:
            out["radius_tol"] = self.radius_tol
        return out


DEFAULT_RADIUS_TOL = 0.05


def make_plan(n: int, alpha: float, radii=None, radius_tol=None) -> SamplingPlan:
    """Validate the adaptive settings (InputError naming the bad one) and fix the looks."""
    from .validate import InputError

    if radii is not None:
        if radius_tol is not None:
            raise InputError("give radii (decision mode) or radius_tol (radius mode), not both")
        try:
            values = [float(r) for r in radii]
        except (TypeError, ValueError):
            raise InputError(f"radii must be a list of numbers, got {radii!r}") from None
        if not values:
            raise InputError("radii is empty: give at least one grid radius (e.g. 0, 0.25, 0.5)")
        if any(not math.isfinite(r) or r < 0 for r in values):
            raise InputError(f"radii must be finite and >= 0, got {values}")
        if len(set(values)) != len(values):
            raise InputError(f"radii must not repeat a value, got {values}")
        return SamplingPlan(look_schedule(n), alpha, tuple(sorted(values)), None)
    tol = DEFAULT_RADIUS_TOL if radius_tol is None else radius_tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise InputError(f"radius_tol must be a number > 0, got {radius_tol!r}")
    return SamplingPlan(look_schedule(n), alpha, None, float(tol))


def _radius(p: np.ndarray, sigma: float, radius_of=None) -> np.ndarray:
    """radius_of(p) (default sigma Phi^-1(p)) where p >= 1/2, -inf below (not certified)."""
    with np.errstate(divide="ignore"):
        q = np.clip(p, 0.5, 1.0)
        r = certified_radius(q, sigma) if radius_of is None else radius_of(q)
        return np.where(p >= 0.5, r, -np.inf)


def _grid_floor(r: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Largest grid radius <= r (0 where r >= 0 lies below the grid); -inf where r = -inf."""
    idx = np.searchsorted(grid, r, side="right") - 1
    out = np.where(idx >= 0, grid[np.clip(idx, 0, None)], 0.0)
    return np.where(np.isfinite(r), out, -np.inf)


def _settled(plan: SamplingPlan, r_cur: np.ndarray, r_reach: np.ndarray) -> np.ndarray:
    """Which images stop: their next answer is out of reach. Certification itself (radius 0: a prediction instead
    of an abstention) is always a step worth sampling for while it is reachable."""
    if plan.radii is not None:
        grid = np.union1d([0.0], np.asarray(plan.radii))  # 0 too: certified below the grid is not abstaining
        nxt_idx = np.searchsorted(grid, r_cur, side="right")  # first grid radius above the certified one
        nxt = np.where(nxt_idx < grid.size, grid[np.clip(nxt_idx, 0, grid.size - 1)], np.inf)
        return ~(nxt <= r_reach)
    uncertified = ~np.isfinite(r_cur)
    return np.where(uncertified, ~np.isfinite(r_reach), ~(r_reach > r_cur + plan.radius_tol))


def adaptive_counts(sampler, x, ids, c_a, plan: SamplingPlan, *, sigma: float, seed: int, progress=None, radius_of=None):
    """Run the looks of ``plan`` for the images ``x`` whose selected classes are ``c_a``.

    ``sampler(x, ids, num, stream, sigma=, seed=, progress=)`` returns (B, K) top-1 counts (see
    :mod:`engine.accel`). Returns (counts (B, K) int64 over the estimation samples drawn, used (B,) int64
    estimation samples drawn, p_lower (B,) float64 at alpha / L, radius (B,) float64 with -inf where not
    certified; in decision mode the certified grid radius), all on the CPU. ``radius_of``: p_lower -> radius of the
    noise drawn (default Cohen et al.'s sigma Phi^-1(p)).
    """
    batch = x.shape[0]
    c_a = c_a.cpu()
    counts = None
    used = np.zeros(batch, dtype=np.int64)
    p_lower = np.zeros(batch, dtype=np.float64)
    radius = np.full(batch, -np.inf)
    active = np.arange(batch)
    n_final = plan.looks[-1]
    previous = 0
    for look, n_l in enumerate(plan.looks):
        if active.size == 0:
            break
        sel = torch.from_numpy(active)
        new = sampler(x[sel.to(x.device)], ids[sel], n_l - previous, STREAM_LOOK_BASE + look, sigma=sigma, seed=seed,
                      progress=progress).cpu()
        if counts is None:
            counts = torch.zeros((batch, new.shape[1]), dtype=torch.int64)
        counts[sel] += new
        previous = n_l
        used[active] = n_l
        n_a = counts[sel].gather(1, c_a[sel][:, None])[:, 0].numpy()
        lb = clopper_pearson_lower(n_a, n_l, plan.alpha_look)
        r_cur = _radius(lb, sigma, radius_of)
        if plan.radii is not None:
            r_cur = _grid_floor(r_cur, np.asarray(plan.radii))
        if n_l == n_final:
            stop = np.ones(active.size, dtype=bool)
        else:
            ub = clopper_pearson_upper(n_a, n_l, plan.alpha_look)
            k_reach = np.minimum(n_final, np.ceil(ub * n_final))
            r_reach = _radius(clopper_pearson_lower(k_reach, n_final, plan.alpha_look), sigma, radius_of)
            stop = _settled(plan, r_cur, r_reach)
        done = active[stop]
        p_lower[done] = lb[stop]
        radius[done] = r_cur[stop]
        active = active[~stop]
    if counts is None:
        counts = torch.zeros((batch, 0), dtype=torch.int64)
    return counts, torch.from_numpy(used), torch.from_numpy(p_lower), torch.from_numpy(radius)
