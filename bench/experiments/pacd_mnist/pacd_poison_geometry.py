"""Where PACD poisons sit in their constraint set, and how much two poisons agree.

Each poison image u lives in the box ||u - x0||_inf <= eps intersected with [0, 1] around its clean original x0.
For every poison file this reports the fraction of pixels at the eps bound (|u - x0| = eps), at a [0, 1] bound only
(u = 0 or 1 with |u - x0| < eps) and strictly inside (free to move either way), with the mean |u - x0|; for every
pair of files, the sign agreement of the perturbations u - x0 over the pixels both move by more than
``--min-abs`` (all of them, and those whose original lies in [eps, 1 - eps], free to move by eps either way: at 0
or 1 only one sign is possible) and the cosine of the two perturbations. A poison with nearly every pixel at a
bound sits at a vertex of its feasible set: further crafting can only flip signs, not grow the perturbation.

    cd bench/experiments/pacd_mnist
    python pacd_poison_geometry.py results/pacd_mnist_poisons/smoothadv_vote3.sign.safetensors \
        results/pacd_mnist_poisons/mixed_vote3.sign.safetensors --data-root ../../../../shared/data/mnist --out g.json

The training split is the one the poisons were crafted on (``engine.data.split_validation(images, labels,
--val-size)``, as ``pacd_mnist_evidence.py`` builds it); ``PoisonSet.apply`` refuses any other. The computation
is ``engine.geometry``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/common.py
from common import device_name, git_commit  # noqa: E402

import engine  # noqa: E402
from engine import data, geometry  # noqa: E402
from engine.pacd import PoisonError  # noqa: E402


def report(paths: list[Path], train_data, min_abs: float = 0.01, tol: float = 1e-4) -> dict:
    """engine.geometry.report of the poison files (named by their stems), each row with its file."""
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"poison files share a name: {[str(p) for p in paths]}")
    poisons = {}
    for name, path in zip(names, paths):
        try:
            poisons[name] = engine.PoisonSet.load(path, train_data)  # compact files decode from the training split
        except PoisonError as exc:
            raise PoisonError(f"{path}: {exc}") from None
    rep = geometry.report(poisons, train_data, min_abs, tol)
    for name, path in zip(names, paths):
        rep["poisons"][name] = {"file": str(path), **rep["poisons"][name]}
    return rep


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
        words = ["python", "bench/experiments/pacd_mnist/pacd_poison_geometry.py", *(sys.argv[1:] if argv is None else argv)]
        rec = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(words), "device": device_name(torch.device("cpu")),
               "git_commit": git_commit(), "data_root": args.data_root, "val_size": args.val_size, **rep}
        out.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
