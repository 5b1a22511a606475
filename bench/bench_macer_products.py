"""PACD's MACER lower level: second-order products on the loss's expansion at the logits (fused sweep)
against torch.func on the whole MACER loss.

Per outer step, ApproxGrad needs 2 * niter2 Hessian-vector products and one mixed term of the MACER
training loss at fixed weights and noise. Provider "auto": one forward pass gives the logits of the k
noisy copies, the loss is expanded there (engine.hessian.expand_logit_loss) and every product runs on
the fused R-operator sweep; "torch_func": forward-over-reverse through the whole loss (the reference).
Paper's MNIST batch: 900 clean + 100 poison images, k = 2 copies each, LeNet, float32. Medians over
interleaved repeats (providers take turns) after one warm-up each; "setup" is the per-step cost of
building the products (the forward pass and the expansion for "auto").

    python bench/bench_macer_products.py [--repeats 3] [--threads 1] [--out bench/results/macer_products-cpu.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import models
from engine.pacd import LowerLevel, OuterBatch, resolve_method_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, device_name, record, resolve_device, sync  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-clean", type=int, default=900)
    p.add_argument("--batch-poison", type=int, default=100)
    p.add_argument("--k", type=int, default=2, help="MACER noise copies per image")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = models.lenet_mnist().to(device).eval()
    bc, bp = args.batch_clean, args.batch_poison
    step = OuterBatch(xc=torch.rand(bc, 1, 28, 28, device=device), yc=torch.randint(0, 10, (bc,), device=device),
                 pos=torch.arange(bp), yp=torch.full((bp,), 8, device=device), xv=torch.rand(1, 1, 28, 28, device=device),
                 seed=5)  # fmt: skip
    u = torch.rand(bp, 1, 28, 28, device=device)
    lower = LowerLevel("macer", model, step, 0.75, resolve_method_args("macer", {"k": args.k}))
    v = torch.randn(sum(q.numel() for q in model.parameters()), device=device)
    providers = ("torch_func", "auto")
    times = {b: {"setup": [], "hv": [], "mixed": []} for b in providers}
    outs = {}
    for rep in range(args.repeats + 1):
        for b in providers:
            sync(device)
            t0 = time.perf_counter()
            hvp, mixed = lower.products(u, 999, b)
            sync(device)
            t1 = time.perf_counter()
            hv = hvp(v)
            sync(device)
            t2 = time.perf_counter()
            mx = mixed(v)
            sync(device)
            t3 = time.perf_counter()
            if rep > 0:  # the first round warms up
                for key, dt in (("setup", t1 - t0), ("hv", t2 - t1), ("mixed", t3 - t2)):
                    times[b][key].append(dt)
            outs[b] = (hv, mx)
    ref_hv, ref_mx = outs["torch_func"]
    results = []
    for b in providers:
        med = {key: float(np.median(val)) for key, val in times[b].items()}
        per_step = med["setup"] + 20 * med["hv"] + med["mixed"]  # niter2 = 10 ApproxGrad steps, 2 products each
        results.append({
            "provider": b, "batch": f"{bc}+{bp} x k {args.k}", "seconds_setup": med["setup"], "seconds_hv": med["hv"],
            "seconds_mixed": med["mixed"], "seconds_products_per_outer_step": per_step,
            "rel_diff_hv": float((outs[b][0] - ref_hv).norm() / ref_hv.norm()),
            "rel_diff_mixed": float((outs[b][1] - ref_mx).norm() / ref_mx.norm()), "repeats": args.repeats,
        })  # fmt: skip
    base = results[0]["seconds_products_per_outer_step"]
    print(f"device: {device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"{'provider':12s} {'setup s':>8s} {'H v s':>8s} {'mixed s':>8s} {'per step s':>11s} {'speed-up':>9s} {'rel diff':>9s}")
    for r in results:
        r["speedup_products"] = base / r["seconds_products_per_outer_step"]
        print(f"{r['provider']:12s} {r['seconds_setup']:8.2f} {r['seconds_hv']:8.2f} {r['seconds_mixed']:8.2f} "
              f"{r['seconds_products_per_outer_step']:11.1f} {r['speedup_products']:8.2f}x {r['rel_diff_hv']:9.1e}")
    if args.out:
        print(f"appended to {append_json(args.out, record('macer_products', device, results, argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
