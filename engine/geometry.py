"""Where PACD poisons sit in their constraint set, and how much two poisons agree.

Each poison image u lives in the box ||u - x0||_inf <= eps intersected with [0, 1] around its clean original x0.
:func:`geometry` gives the fraction of pixels at the eps bound (|u - x0| = eps), at a [0, 1] bound only (u = 0 or 1
with |u - x0| < eps) and strictly inside (free to move either way), with the mean |u - x0|. :func:`agreement` gives
the sign agreement of two perturbations over the pixels both move (all of them, and those whose original lets them
move by eps either way) and their cosine. A poison with nearly every pixel at a bound sits at a vertex of its
feasible set: further crafting can only flip signs, not grow the perturbation. :func:`report` does both for a set
of poisons of the same training images.
"""

from __future__ import annotations

import itertools

import torch

from .pacd import PoisonError, PoisonSet

__all__ = ["geometry", "agreement", "report"]


def geometry(u: torch.Tensor, x0: torch.Tensor, eps: float, tol: float = 1e-4) -> dict:
    """Fractions of pixels at the eps bound, at a [0, 1] bound only, and strictly inside; mean |u - x0| overall
    and over the inside pixels (None when there are none). ``tol``: how close to a bound counts as on it."""
    if u.shape != x0.shape:
        raise ValueError(f"poison images {tuple(u.shape)} and originals {tuple(x0.shape)} differ in shape")
    if u.numel() == 0:
        raise ValueError("no poison pixels")
    d = (u.to(torch.float64) - x0.to(torch.float64)).abs()
    at_eps = d >= eps - tol
    at_unit = ((u <= tol) | (u >= 1 - tol)) & ~at_eps
    inside = ~(at_eps | at_unit)
    return {
        "pixels": int(u.numel()),
        "at_eps_bound": float(at_eps.double().mean()),
        "at_unit_bound_only": float(at_unit.double().mean()),
        "inside": float(inside.double().mean()),
        "mean_abs": float(d.mean()),
        "mean_abs_inside": float(d[inside].mean()) if bool(inside.any()) else None,
        "max_abs": float(d.max()),
    }


def agreement(d_a: torch.Tensor, d_b: torch.Tensor, min_abs: float = 0.01, free: torch.Tensor | None = None) -> dict:
    """Sign agreement of two perturbations over the pixels both move by more than ``min_abs`` (None when there are
    none), that pixel fraction, and the cosine of the two perturbations (None when one is zero). ``free``: a mask of
    the pixels whose original lets them move by eps either way; the agreement over those alone is
    ``free_sign_agreement`` (on a pixel at 0 or 1 only one sign is possible, so every poison agrees there)."""
    if d_a.shape != d_b.shape:
        raise ValueError(f"perturbations of different shapes {tuple(d_a.shape)} and {tuple(d_b.shape)}")
    a, b = d_a.to(torch.float64).flatten(), d_b.to(torch.float64).flatten()
    both = (a.abs() > min_abs) & (b.abs() > min_abs)
    na, nb = float(a.norm()), float(b.norm())

    def signs(mask):
        return float((a[mask].sign() == b[mask].sign()).double().mean()) if bool(mask.any()) else None

    out = {"moved_by_both": float(both.double().mean()), "sign_agreement": signs(both),
           "cosine": float(a @ b) / (na * nb) if na > 0 and nb > 0 else None}
    if free is not None:
        if free.shape != d_a.shape:
            raise ValueError(f"free mask {tuple(free.shape)} does not match the perturbations {tuple(d_a.shape)}")
        out["free_sign_agreement"] = signs(both & free.flatten())
    return out


def report(poisons: dict[str, PoisonSet], train_data, min_abs: float = 0.01, tol: float = 1e-4) -> dict:
    """Geometry of each named poison (its originals checked in ``train_data`` as ``PoisonSet.apply`` does) and agreement of each
    pair of them; poisons of a pair must poison the same training images."""
    perturbations, rows = {}, {}
    for name, ps in poisons.items():
        try:
            x0 = ps._originals(train_data)  # checks that train_data holds this poison's originals
        except PoisonError as exc:
            raise PoisonError(f"{name}: {exc}") from None
        s = ps.settings
        rows[name] = {
            "method": ps.method,
            "eps": ps.eps,
            "total_outer_steps": s.get("total_outer_steps", s.get("outer_steps")),
            "solver": s.get("solver"),
            "images": len(ps),
            **geometry(ps.images, x0, ps.eps, tol),
        }
        perturbations[name] = (ps.indices, ps.images.to(torch.float64) - x0.to(torch.float64), x0, ps.eps)
    pairs = {}
    for a, b in itertools.combinations(poisons, 2):
        (ia, da, x0, eps_a), (ib, db, _, eps_b) = perturbations[a], perturbations[b]
        if not torch.equal(ia, ib):
            raise ValueError(f"{a} and {b} poison different training images: no pixel-wise comparison")
        eps = max(eps_a, eps_b)
        pairs[f"{a} / {b}"] = agreement(da, db, min_abs, free=(x0 >= eps) & (x0 <= 1 - eps))
    return {"poisons": rows, "pairs": pairs, "min_abs": min_abs, "tol": tol}
