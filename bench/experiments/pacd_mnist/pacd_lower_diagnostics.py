"""Diagnostics of PACD's lower level at the end of crafting, per procedure (why a poison does or does not work).

For each crafting checkpoint of ``bench/experiments/pacd_mnist/pacd_mnist_evidence.py`` (``<work>/poison_<method>.ckpt``):

- The crafting lower model against the victims trained from scratch on clean and on poisoned data
  (``<work>/main/<method>/{clean,poisoned}/victim.safetensors``): test accuracy, target-class accuracy
  under noise at the procedure's sigma, and the upper objective F (the soft certified radius of
  :func:`engine.pacd.soft_radius_objective`) on test images of the target class.
- One outer step's hypergradient at the checkpoint (a fresh minibatch of the paper's sizes, the poison
  batch taken from the checkpoint's u): the residual ||(H + s I) p - g|| / ||g|| of ApproxGrad's p
  (warm-started from the checkpoint's p and Adam state, as the next step would be) and of 30 conjugate-
  gradient steps from 0 (and of ApproxGrad from p = 0, also at the step sizes of ``--lr-p-grid``), the
  cosine between the two hypergradients, and the eigenvalue of H of largest magnitude (10 power
  iterations). MACER also splits the hypergradient into its classification and robustness parts
  and reports how many inputs of the batch have the robustness term active or their probabilities at
  the clamp.
- Look-ahead (``--lookahead-batches``): on fresh minibatches, the poison batch moved by a signed step of
  eps along each of several directions (the hypergradient with ApproxGrad's p warm-started as in
  crafting, and solved from p = 0; the first-order direction -mixed(grad_w F); a random direction; for
  MACER also the hypergradient of its classification term alone), the lower model retrained from the
  checkpoint for ``--lookahead-steps`` Adam steps with the procedure's loss, and F measured on 500
  validation images of the target class. The change of F against the unmoved batch, with the same noise
  everywhere (common random numbers): a direction that helps the attacker lowers F.

Writes JSON (``--out``). Read-only on the work folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from engine import bilevel, data, models  # noqa: E402
from engine.losses import PROB_CLAMP, macer_inputs  # noqa: E402
from engine.pacd import LowerLevel, OuterBatch, keyed_generator, read_checkpoint, soft_radius_objective  # noqa: E402


def model_metrics(model, test, target: int, sigma: float, n_target: int, seed: int) -> dict:
    images, labels = test
    x = images.float() / 255
    with torch.no_grad():
        acc = float(torch.cat([model(x[i : i + 2000]).argmax(1) for i in range(0, x.shape[0], 2000)]).eq(labels).float().mean())
        xt = x[labels == target]
        g = torch.Generator().manual_seed(seed)
        noisy = xt + sigma * torch.randn(xt.shape, generator=g)
        acc_noisy = float(model(noisy).argmax(1).eq(target).float().mean())
        xf = xt[torch.randperm(xt.shape[0], generator=g)[:n_target]]
        f, counted = soft_radius_objective(model, xf, target, sigma=sigma, k=20, generator=g)
    return {"test_accuracy": acc, "target_noisy_accuracy": acc_noisy, "upper_F_test": float(f), "counted": counted}


def cosine(a, b) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


@dataclass
class _Batch:
    """One outer step rebuilt at the checkpoint: minibatch, lower level, upper objective and products."""

    step: OuterBatch
    u_batch: torch.Tensor
    x0: torch.Tensor  # the clean originals of the poison batch
    lower: LowerLevel
    f: torch.Tensor
    counted: float
    g_w: torch.Tensor
    hvp: object
    mixed: object


def _outer_step(model, tensors, settings, train, xv_all, target: int, g: torch.Generator, seed: int) -> _Batch:
    """A fresh minibatch of the run's sizes drawn from ``g`` (clean, poison rows of the checkpoint's u,
    validation), its lower level at ``model`` and the upper objective's weight gradient, as a step computes them."""
    images, labels = train
    pool_p = (labels == target).nonzero().flatten()
    pool_c = (labels != target).nonzero().flatten()
    ci = pool_c[torch.randperm(pool_c.numel(), generator=g)[: settings["batch_clean"]]]
    pos = torch.randperm(pool_p.numel(), generator=g)[: settings["batch_poison"]]
    xv = xv_all[torch.randperm(xv_all.shape[0], generator=g)[: settings["batch_val"]]]
    step = OuterBatch(xc=images[ci].float() / 255, yc=labels[ci], pos=pos, yp=labels[pool_p[pos]], xv=xv, seed=seed)
    u_batch = tensors["u"][pos]
    lower = LowerLevel(settings["method"], model, step, settings["sigma"], settings["method_args"])
    lower.prepare(u_batch)
    f, counted = soft_radius_objective(lower.forward, xv, target, sigma=settings["sigma"], k=settings["k"], beta=settings["beta"],
                                       a=settings["a"], generator=keyed_generator("cpu", seed, 5))  # fmt: skip
    g_w = torch.cat([t.reshape(-1) for t in torch.autograd.grad(f, bilevel.flat_params(model))]).detach()
    hvp, mixed = lower.products(u_batch, 999)
    return _Batch(step, u_batch, images[pool_p[pos]].float() / 255, lower, f, counted, g_w, hvp, mixed)


def _target_images(val, target: int) -> torch.Tensor:
    return val[0][val[1] == target].float() / 255


def step_diagnostics(model, tensors, meta, train, val, target: int, seed: int, cg_steps: int, lr_p_grid=()) -> dict:
    settings = meta["settings"]
    method, sigma, margs = settings["method"], settings["sigma"], settings["method_args"]
    bt = _outer_step(model, tensors, settings, train, _target_images(val, target), target,
                     torch.Generator().manual_seed(seed), seed)  # fmt: skip
    step, u_batch, lower, f, counted, g_w, hvp, mixed = bt.step, bt.u_batch, bt.lower, bt.f, bt.counted, bt.g_w, bt.hvp, bt.mixed
    s = settings["damping"]

    def residual(p):
        return float((hvp(p) + s * p - g_w).norm() / g_w.norm())

    p_warm = tensors["p"]
    state = _adam_state(tensors, meta)
    t0 = time.perf_counter()
    p_ag = bilevel.solve_approxgrad(hvp, g_w, p_warm.clone(), steps=settings["niter2"], lr=settings["lr_p"], damping=s,
                                    state=state)  # fmt: skip
    p_zero = bilevel.solve_approxgrad(hvp, g_w, torch.zeros_like(g_w), steps=settings["niter2"], lr=settings["lr_p"],
                                      damping=s)  # fmt: skip
    p_cg = bilevel.solve_cg(hvp, g_w, torch.zeros_like(g_w), steps=cg_steps, damping=s)
    h_ag, h_cg = -mixed(p_ag), -mixed(p_cg)
    lr_grid = {}
    for lr in lr_p_grid:
        q = bilevel.solve_approxgrad(hvp, g_w, torch.zeros_like(g_w), steps=settings["niter2"], lr=lr, damping=s)
        lr_grid[str(lr)] = {"residual_from_zero": residual(q), "cosine_with_crafting_hypergradient": cosine(-mixed(q), h_ag)}
    v = torch.randn(g_w.shape, generator=torch.Generator().manual_seed(seed + 1))
    for _ in range(10):
        hv = hvp(v / v.norm())
        lam, v = float((hv * v / v.norm()).sum()), hv
    out = {
        "upper_F_batch": float(f.detach()),
        "counted": counted,
        "grad_w_norm": float(g_w.norm()),
        "residual_p0": 1.0,
        "residual_warm_start": residual(p_warm),
        "residual_approxgrad": residual(p_ag),
        "residual_approxgrad_from_zero": residual(p_zero),
        "cosine_hypergradient_warm_zero": cosine(h_ag, -mixed(p_zero)),
        f"residual_cg{cg_steps}": residual(p_cg),
        "cosine_hypergradient_approxgrad_cg": cosine(h_ag, h_cg),
        "hypergradient_norm_approxgrad": float(h_ag.norm()),
        f"hypergradient_norm_cg{cg_steps}": float(h_cg.norm()),
        "dominant_eigenvalue_H": lam,
        "approxgrad_lr_grid": lr_grid,
    }
    if method == "macer":
        parts = {}
        for name, lbd in (("classification", 0.0),):
            part = LowerLevel(method, model, step, sigma, {**margs, "lbd": lbd})
            _, mixed_part = part.products(u_batch, 999)
            parts[name] = -mixed_part(p_ag)
        parts["robustness"] = h_ag - parts["classification"]
        out["hypergradient_norm_classification_part"] = float(parts["classification"].norm())
        out["hypergradient_norm_robustness_part"] = float(parts["robustness"].norm())
        out["cosine_classification_part_total"] = cosine(parts["classification"], h_ag)
        x = torch.cat([step.xc, u_batch])
        with torch.no_grad():
            g_noise = keyed_generator("cpu", step.seed, 999)
            z = model(macer_inputs(x, sigma, margs["k"], g_noise)).reshape(x.shape[0], margs["k"], -1)
        pb = torch.softmax(margs["beta"] * z, -1).mean(1)
        top2, idx = pb.topk(2, 1)
        gap = torch.special.ndtri(top2[:, 0].clamp(PROB_CLAMP, 1 - PROB_CLAMP)) - torch.special.ndtri(
            top2[:, 1].clamp(PROB_CLAMP, 1 - PROB_CLAMP))
        y = lower.y
        active = (idx[:, 0] == y) & (gap.abs() <= margs["gamma"])
        clamped = (top2[:, 0] > 1 - PROB_CLAMP) | (top2[:, 1] < PROB_CLAMP)
        n_clean = step.xc.shape[0]
        out["robustness_active_fraction"] = {"clean": float(active[:n_clean].float().mean()),
                                             "poison": float(active[n_clean:].float().mean())}
        out["clamped_fraction"] = {"clean": float(clamped[:n_clean].float().mean()),
                                   "poison": float(clamped[n_clean:].float().mean())}
        out["active_and_clamped_fraction"] = float((active & clamped).float().mean())
    out["seconds"] = time.perf_counter() - t0
    return out


def lookahead(base, tensors, meta, train, val, target: int, batches: int, steps: int, seed: int) -> dict:
    settings = meta["settings"]
    method, sigma, margs, eps = settings["method"], settings["sigma"], settings["method_args"], settings["eps"]
    xv_all = _target_images(val, target)
    variants = ["warm", "zero", "first_order", "random"] + (["classification_only"] if method == "macer" else [])
    deltas = {v: [] for v in variants}
    for b in range(batches):
        g = torch.Generator().manual_seed(seed + 1000 + b)
        model = copy.deepcopy(base).eval()
        bt = _outer_step(model, tensors, settings, train, xv_all, target, g, seed + b)
        xv_eval = xv_all[torch.randperm(xv_all.shape[0], generator=g)[:500]]
        step, u_batch, x0, lower, g_w, hvp, mixed = bt.step, bt.u_batch, bt.x0, bt.lower, bt.g_w, bt.hvp, bt.mixed
        solve = {"steps": settings["niter2"], "lr": settings["lr_p"], "damping": settings["damping"]}
        dirs = {
            "warm": -mixed(bilevel.solve_approxgrad(hvp, g_w, tensors["p"].clone(), state=_adam_state(tensors, meta), **solve)),
            "zero": -mixed(bilevel.solve_approxgrad(hvp, g_w, torch.zeros_like(g_w), **solve)),
            "first_order": -mixed(g_w),
            "random": torch.randn(u_batch.shape, generator=g),
        }
        if method == "macer":
            hvp_c, mixed_c = LowerLevel(method, model, step, sigma, {**margs, "lbd": 0.0}).products(u_batch, 999)
            dirs["classification_only"] = -mixed_c(bilevel.solve_approxgrad(hvp_c, g_w, torch.zeros_like(g_w), **solve))
        noise = torch.randn((20,) + tuple(xv_eval.shape), generator=torch.Generator().manual_seed(seed + 2000 + b))

        def retrained_f(ux):
            m = copy.deepcopy(base)
            opt = torch.optim.Adam(m.parameters(), lr=settings["lr_w"])
            lo = LowerLevel(method, m, step, sigma, margs)
            lo.delta = lower.delta  # SmoothAdv: the same attack points for every direction
            m.train()
            for it in range(steps):
                loss = lo.loss(m, ux, 100 + it)
                opt.zero_grad()
                loss.backward()
                opt.step()
            m.eval()
            with torch.no_grad():
                return float(soft_radius_objective(m, xv_eval, target, sigma=sigma, k=20, beta=settings["beta"],
                                                   a=settings["a"], noise=noise)[0])  # fmt: skip

        f0 = retrained_f(u_batch)
        for v in variants:
            moved = torch.minimum(torch.maximum(u_batch - eps * dirs[v].sign(), x0 - eps), x0 + eps).clamp(0, 1)
            deltas[v].append(retrained_f(moved) - f0)
        print(f"   look-ahead batch {b}: " + ", ".join(f"{v} {deltas[v][-1]:+.4f}" for v in variants), flush=True)
    return {"batches": batches, "retrain_steps": steps, "delta_F": deltas,
            "delta_F_mean": {v: sum(d) / len(d) for v, d in deltas.items()}}


def _adam_state(tensors, meta) -> bilevel.AdamState:
    m_, v_ = tensors.get("p_m"), tensors.get("p_v")
    return bilevel.AdamState(m=None if m_ is None else m_.clone(), v=None if v_ is None else v_.clone(), t=meta["p_t"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/pacd")
    p.add_argument("--methods", default="gaussian,macer,smoothadv")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[4] / "shared/data/mnist"))
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--target", type=int, default=8)
    p.add_argument("--cg-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--lr-p-grid", default="1e-3,1e-4", help="ApproxGrad step sizes to try from p = 0 (residual)")
    p.add_argument("--lookahead-batches", type=int, default=4)
    p.add_argument("--lookahead-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    images, labels = data.load_mnist(args.data_root, "train")
    train, val = data.split_validation(images, labels, args.val_size)
    test = data.load_mnist(args.data_root, "test")
    results = {}
    for m in args.methods.split(","):
        ckpt = work / f"poison_{m}.ckpt"
        tensors, meta = read_checkpoint(ckpt)
        settings = meta["settings"]
        model = models.lenet_mnist()
        model.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
        model.eval()
        sigma = settings["sigma"]
        row = {"checkpoint": str(ckpt), "outer_steps_done": meta["step"], "reset_index": meta["reset_index"],
               "crafting_model": model_metrics(model, test, args.target, sigma, 100, args.seed)}
        for kind in ("clean", "poisoned"):
            path = work / f"main/{m}/{kind}/victim.safetensors"
            if path.exists():
                row[f"victim_{kind}"] = model_metrics(models.load(path).eval(), test, args.target, sigma, 100, args.seed)
        print(f"== {m}: models done, step diagnostics ...", flush=True)
        row["step"] = step_diagnostics(model, tensors, meta, train, val, args.target, args.seed, args.cg_steps,
                                       [float(v) for v in args.lr_p_grid.split(",") if v])
        if args.lookahead_batches:
            row["lookahead"] = lookahead(model, tensors, meta, train, val, args.target, args.lookahead_batches,
                                         args.lookahead_steps, args.seed)
        results[m] = row
        print(json.dumps({m: row}, indent=1), flush=True)
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "device": platform.processor() or platform.machine(), "threads": args.threads, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
