"""Adaptive sample sizes against Cohen et al.'s fixed n (issue 31, part 2), on LeNets trained on MNIST.

Protocol (fixed before running, written into the results JSON):
- victims: LeNet, Gaussian augmentation, sigma 0.25 and 0.5, ``engine.train`` defaults (10 epochs, SGD lr 0.01,
  cosine, batch 64), seed 0, on the 60,000 MNIST training images;
- images: the 500 test images 0, 20, 40, ..., 9980 (every 20th);
- fixed: n0 100, n 100,000, alpha 0.001, seed 0 (CERTIFY as published);
- decision mode: the same n0, n as the cap, alpha, seed; radii 0, 0.25, ..., 2.0;
- radius mode: the same, radius_tol 0.05 and 0.1;
- reported per configuration: mean samples per image, wall time, certified accuracy at each grid radius and ACR;
  the ratio of fixed samples to adaptive ones; the differences of certified accuracy with a 95% paired bootstrap
  interval over the images (sampling error). Every configuration run under this protocol is reported.
Runs are resumable (each configuration is a certify_dataset log under --work); wall times are those of the machine
recorded beside each configuration (compare times only between configurations run on the same CPU kind).

    python bench/bench_adaptive.py --data-root ../shared/data/mnist --threads 1 [--only 0.25] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import engine
from engine import data, metrics, models
from engine.results import run_trace

RADII = [0.25 * k for k in range(9)]
PROTOCOL = {
    "victims": {"arch": "lenet", "method": "gaussian", "sigmas": [0.25, 0.5], "epochs": 10, "seed": 0,
                "train_images": 60000, "other": "engine.train defaults (SGD lr 0.01 momentum 0.9, cosine, batch 64)"},
    "images": "MNIST test images 0, 20, ..., 9980 (500)",
    "certify": {"n0": 100, "n": 100_000, "alpha": 0.001, "seed": 0},
    "configurations": ["fixed", "decision radii 0:2.0:0.25", "radius tol 0.05", "radius tol 0.1"],
    "bootstrap": {"resamples": 2000, "seed": 0, "level": 0.95},
}
CONFIGS = [("fixed", {}), ("decision", {"sampling": "adaptive", "radii": RADII}),
           ("radius-0.05", {"sampling": "adaptive", "radius_tol": 0.05}),
           ("radius-0.1", {"sampling": "adaptive", "radius_tol": 0.1})]


def victim(sigma: float, train, work: Path) -> torch.nn.Module:
    path = work / f"lenet-gaussian-{sigma:g}.safetensors"
    if path.exists():
        return models.load(path)
    torch.manual_seed(0)
    model = models.build("lenet")
    t0 = time.perf_counter()
    engine.train(model, train, method="gaussian", sigma=sigma, epochs=10, seed=0, progress=False,
                 checkpoint=work / f"lenet-gaussian-{sigma:g}.ckpt", resume=True)
    models.save(model, path, sigma=sigma, method="gaussian", train_seconds=time.perf_counter() - t0)
    return model


def paired_interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> list[float]:
    """95% bootstrap interval of mean(a - b) over images (paired)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, help="canonical MNIST files")
    p.add_argument("--work", type=Path, default=Path("runs/bench_adaptive"), help="victims and certify logs")
    p.add_argument("--out", type=Path, default=Path("bench/results/adaptive-cpu.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="sigmas to run, e.g. 0.25")
    p.add_argument("--configs", default=None, help="configurations to run, e.g. fixed,decision")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train = data.load_mnist(args.data_root, "train")
    test = data.load_mnist(args.data_root, "test")
    indices = list(range(0, 10000, 20))
    labels = test[1][indices].numpy()
    sigmas = [float(s) for s in args.only.split(",")] if args.only else PROTOCOL["victims"]["sigmas"]
    chosen = set(args.configs.split(",")) if args.configs else None
    report = {"protocol": PROTOCOL, "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "trace": run_trace(threads=args.threads), "results": {}}
    if args.out.exists():
        report["results"] = json.loads(args.out.read_text()).get("results", {})
    for sigma in sigmas:
        model = victim(sigma, train, args.work)
        rows = report["results"].setdefault(f"sigma={sigma:g}", {})
        for name, kw in CONFIGS:
            if chosen and name not in chosen:
                continue
            log = args.work / f"sigma{sigma:g}-{name}.tsv"
            t0 = time.perf_counter()
            res = engine.certify_dataset(model, test, sigma=sigma, indices=indices, out=log, progress=True,
                                         **PROTOCOL["certify"], **kw)
            pred, rad = res.prediction.numpy(), res.radius.numpy()
            acc = {f"{r:g}": float(metrics.certified_accuracy(pred, rad, labels, [r])[0]) for r in RADII}
            rows[name] = {"images": len(res), "samples_per_image": float(res.samples.double().mean()),
                          "seconds_total": float(res.seconds.sum()), "wall_seconds_this_call": time.perf_counter() - t0,
                          "certified_accuracy": acc, "acr": float(metrics.summary(pred, rad, labels, RADII)["acr"]),
                          "cpu": run_trace()["cpu"], "threads": args.threads, "log": str(log),
                          "command": report["command"], "date": run_trace()["written"]}
            np.save(args.work / f"sigma{sigma:g}-{name}.npy", np.stack([pred, rad]))
        fixed_path = args.work / f"sigma{sigma:g}-fixed.npy"
        if fixed_path.exists():
            fp, fr = np.load(fixed_path)
            rng = np.random.default_rng(0)
            for name, row in rows.items():
                if name == "fixed" or not (args.work / f"sigma{sigma:g}-{name}.npy").exists():
                    continue
                ap, ar = np.load(args.work / f"sigma{sigma:g}-{name}.npy")
                row["samples_ratio_fixed_over_adaptive"] = rows["fixed"]["samples_per_image"] / row["samples_per_image"]
                row["certified_accuracy_minus_fixed"] = {}
                for r in RADII:
                    a = (ap == labels) & (ar >= r)
                    b = (fp == labels) & (fr >= r)
                    row["certified_accuracy_minus_fixed"][f"{r:g}"] = {
                        "diff": float(a.mean() - b.mean()), "ci95": paired_interval(a, b, rng)}
                row["acr_minus_fixed"] = {"diff": float(np.where(ap == labels, ar, 0).mean()
                                                        - np.where(fp == labels, fr, 0).mean()),
                                          "ci95": paired_interval(np.where(ap == labels, ar, 0),
                                                                  np.where(fp == labels, fr, 0), rng)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(json.dumps(rows, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
