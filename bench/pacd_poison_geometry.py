"""Where PACD poisons sit in their constraint set, and how much two poisons agree.

Each poison image u lives in the box ||u - x0||_inf <= eps intersected with [0, 1] around its clean original x0.
For every poison file this reports the fraction of pixels at the eps bound (|u - x0| = eps), at a [0, 1] bound only
(u = 0 or 1 with |u - x0| < eps) and strictly inside (free to move either way), with the mean |u - x0|; for every
pair of files, the sign agreement of the perturbations u - x0 over the pixels both move by more than
``--min-abs`` (all of them, and those whose original lies in [eps, 1 - eps], free to move by eps either way: at 0
or 1 only one sign is possible) and the cosine of the two perturbations. A poison with nearly every pixel at a
bound sits at a vertex of its feasible set: further crafting can only flip signs, not grow the perturbation.

    python bench/pacd_poison_geometry.py bench/results/pacd_mnist_poisons/smoothadv_540.safetensors \
        bench/results/pacd_mnist_poisons/smoothadv_700.safetensors --data-root ../shared/data/mnist \
        --out bench/results/pacd_mnist_poison_geometry.json

The training split is the one the poisons were crafted on (``engine.data.split_validation(images, labels,
--val-size)``, as ``bench/pacd_mnist_evidence.py`` builds it); ``PoisonSet.apply`` refuses any other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_commit  # noqa: E402

import engine  # noqa: E402
from engine import data  # noqa: E402
from engine.pacd import PoisonError  # noqa: E402


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


def report(paths: list[Path], train_data, min_abs: float = 0.01, tol: float = 1e-4) -> dict:
    """Geometry of each poison file (checked against ``train_data`` by ``PoisonSet.apply``) and agreement of each
    pair of them; poisons of a pair must poison the same training images."""
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"poison files share a name: {[str(p) for p in paths]}")
    perturbations, poisons = {}, {}
    for name, path in zip(names, paths):
        ps = engine.PoisonSet.load(path, train_data)  # compact files decode from the training split
        try:
            ps.apply(train_data)
        except PoisonError as exc:
            raise PoisonError(f"{path}: {exc}") from None
        x0 = data.to_float(train_data[0][ps.indices])
        s = ps.settings
        poisons[name] = {
            "file": str(path),
            "method": ps.method,
            "eps": ps.eps,
            "total_outer_steps": s.get("total_outer_steps", s.get("outer_steps")),
            "solver": s.get("solver"),
            "images": len(ps),
            **geometry(ps.images, x0, ps.eps, tol),
        }
        perturbations[name] = (ps.indices, ps.images.to(torch.float64) - x0.to(torch.float64), x0, ps.eps)
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        (ia, da, x0, eps_a), (ib, db, _, eps_b) = perturbations[a], perturbations[b]
        if not torch.equal(ia, ib):
            raise ValueError(f"{a} and {b} poison different training images: no pixel-wise comparison")
        eps = max(eps_a, eps_b)
        pairs[f"{a} / {b}"] = agreement(da, db, min_abs, free=(x0 >= eps) & (x0 <= 1 - eps))
    return {"poisons": poisons, "pairs": pairs, "min_abs": min_abs, "tol": tol}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("poisons", nargs="+", type=Path, help="poison .safetensors files")
    p.add_argument("--data-root", default=None, help="MNIST root (default: the embedded subset)")
    p.add_argument("--val-size", type=int, default=5000, help="validation images held out before crafting")
    p.add_argument("--min-abs", type=float, default=0.01, help="pixels moved by more than this count for sign agreement")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.min_abs < 0:
        raise SystemExit(f"error: --min-abs must be >= 0, got {args.min_abs}")
    images, labels = data.load_mnist(args.data_root or data.embedded_mnist_root(), "train")
    train, _ = data.split_validation(images, labels, args.val_size)
    try:
        rep = report(list(args.poisons), train, args.min_abs)
    except ValueError as exc:  # PoisonError included
        raise SystemExit(f"error: {exc}") from None
    print("| poison | method | steps | at eps bound | at [0,1] bound only | inside | mean abs |")
    print("|---|---|---|---|---|---|---|")
    for name, g in rep["poisons"].items():
        print(f"| {name} | {g['method']} | {g['total_outer_steps']} | {_pct(g['at_eps_bound'])} | "
              f"{_pct(g['at_unit_bound_only'])} | {_pct(g['inside'])} | {g['mean_abs']:.4f} |")
    print("\n| pair | sign agreement | on pixels free both ways | cosine |\n|---|---|---|---|")
    for name, a in rep["pairs"].items():
        cosine = "-" if a["cosine"] is None else f"{a['cosine']:.3f}"
        print(f"| {name} | {_pct(a['sign_agreement'])} | {_pct(a['free_sign_agreement'])} | {cosine} |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        words = ["python", "bench/pacd_poison_geometry.py", *(sys.argv[1:] if argv is None else argv)]
        rec = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(words), "device": device_name(torch.device("cpu")),
               "git_commit": git_commit(), "data_root": args.data_root, "val_size": args.val_size, **rep}
        out.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
