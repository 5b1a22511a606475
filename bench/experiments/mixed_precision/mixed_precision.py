"""Does mixed precision change certified decisions beyond sampling error? (measured, paired design)

Trains LeNet with Gaussian augmentation on real MNIST, then certifies test images twice from the
*same* keyed noise: the engine's CPU path in fp32 (channels-last copy, C++ noise op) and the same
path under bf16 autocast (``engine.certify(..., precision="bf16")``). Every noisy sample is
classified by both precisions, so the study counts exactly the samples on which they disagree.

Why this decides the question: CERTIFY is sound for *any* deterministic base classifier, so the
bf16 certificate is a valid certificate of the bf16 model's smoothed classifier; what can change is
only which statement is certified. With the same noise, ``nA_bf16 - nA_fp32`` is bounded by the
number D of samples whose prediction differs, whereas a fresh draw of the noise moves ``nA`` by
about ``sqrt(n p (1 - p))``. If D is far below that, bf16 moves p_A's lower bound, the radius and the
abstain decision by far less than sampling error does. The script reports D, the disagreement rate
with a Clopper-Pearson upper bound, the changes of counts, predictions and radii, and the ratio of
each radius change to the radius' sampling standard deviation (delta method).

    python bench/experiments/mixed_precision/mixed_precision.py [--images 300] [--n 10000]
        [--out-md bench/experiments/mixed_precision/results/mixed_precision-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import engine
from engine import data, models, noise
from engine.accel import numerics
from engine.smoothing import fast_forward_model
from engine.stats import certified_radius, clopper_pearson_lower

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/common.py
from common import record, resolve_device  # noqa: E402

SHARED_MNIST = Path("/work/shared/data/mnist")


def train_lenet(root, epochs, sigma, seed, checkpoint: Path, device):
    if checkpoint.exists():
        return models.load(checkpoint, device=device), models.read_meta(checkpoint)["meta"]
    train_x, train_y = data.load_mnist(root, "train")
    torch.manual_seed(seed)
    model = models.lenet_mnist().to(device)
    t0 = time.perf_counter()
    _, history = engine.train(model, (train_x, train_y), method="gaussian", sigma=sigma, epochs=epochs, batch_size=64,
                              lr=0.05, seed=seed, log=lambda e: print(f"epoch {e['epoch']}: loss {e['loss']:.4f}", flush=True))
    meta = dict(method="gaussian", sigma=sigma, epochs=epochs, data_root=str(root), train_images=int(train_x.shape[0]),
                train_seconds=time.perf_counter() - t0, history=history)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    models.save(model, checkpoint, **meta)
    return model, meta


def paired_counts(runner, x, image_id, num, stream, sigma, seed, batch):
    """(fp32 counts, bf16 counts, disagreements) over ``num`` keyed noisy samples of one image."""
    device = x.device
    c32 = torch.zeros(10, dtype=torch.int64, device=device)
    c16 = torch.zeros(10, dtype=torch.int64, device=device)
    diff = torch.zeros((), dtype=torch.int64, device=device)
    ids = torch.tensor([image_id], device=device)
    for start in range(0, num, batch):
        rows = torch.arange(start, min(num, start + batch), device=device)
        noisy = noise.noisy_batch(x, torch.zeros_like(rows), rows, ids, seed=seed, stream=stream, sigma=sigma)
        with numerics(device, "fp32"):
            p32 = runner(noisy).argmax(1)
        with numerics(device, "bf16"):
            p16 = runner(noisy).argmax(1)
        c32 += torch.bincount(p32, minlength=10)
        c16 += torch.bincount(p16, minlength=10)
        diff += (p32 != p16).sum()
    return c32.cpu(), c16.cpu(), int(diff)


def decide(c0, c, n, alpha, sigma):
    c_a = int(np.argmax(c0))
    n_a = int(c[c_a])
    p_low = float(clopper_pearson_lower(np.array([n_a]), n, alpha)[0])
    if p_low < 0.5:
        return -1, 0.0, n_a, p_low
    return c_a, float(certified_radius(np.array([p_low]), sigma)[0]), n_a, p_low


def radius_sd(n_a, n, sigma):
    """Delta-method sampling sd of sigma * Phi^-1(p_hat) at p_hat = n_a / n (nan at p_hat in {0, 1})."""
    p = n_a / n
    if p <= 0 or p >= 1:
        return float("nan")
    return sigma * math.sqrt(p * (1 - p) / n) / stats.norm.pdf(stats.norm.ppf(p))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(SHARED_MNIST) if SHARED_MNIST.exists() else None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--checkpoint", default="runs/mixed_precision/lenet_gaussian.safetensors")
    parser.add_argument("--device", default="cpu", help="cpu (the study committed) or cuda (autocast on the GPU)")
    parser.add_argument("--out-json", default=None, help="default results/mixed_precision-<device>.json beside this script")
    parser.add_argument("--out-md", default=None, help="default results/mixed_precision-<device>.md beside this script")
    parser.add_argument("--compare-seed", type=int, default=1, help="fp32 run with this seed: the sampling yardstick")
    parser.add_argument("--reuse-rows", default=None, help="JSON of an earlier run with the same settings: skip the paired pass")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    results = Path(__file__).resolve().parent / "results"
    args.out_json = args.out_json or str(results / f"mixed_precision-{device.type}.json")
    args.out_md = args.out_md or str(results / f"mixed_precision-{device.type}.md")
    root = Path(args.data_root) if args.data_root else data.embedded_mnist_root()
    args.data_root = str(root)
    model, meta = train_lenet(root, args.epochs, args.sigma, args.seed, Path(args.checkpoint), device)
    model.eval()
    test_x, test_y = data.load_mnist(root, "test")
    step = max(1, test_x.shape[0] // args.images)
    idx = list(range(0, step * args.images, step))[: args.images]
    if device.type == "cpu":
        runner = fast_forward_model(model, device, "auto")  # the engine's CPU path (channels-last copy)
    else:
        runner = model.to(memory_format=torch.channels_last)
    rows = []
    t0 = time.perf_counter()
    reused = _reuse(args)
    with torch.inference_mode():
        clean_acc = float((model(data.to_float(test_x[idx]).to(device)).argmax(1).cpu() == test_y[idx]).float().mean())
        for k, i in enumerate([] if reused else idx):
            x = data.to_float(test_x[i : i + 1]).to(device)
            s0 = paired_counts(runner, x, i, args.n0, noise.STREAM_SELECTION, args.sigma, args.seed, args.batch)
            s1 = paired_counts(runner, x, i, args.n, noise.STREAM_ESTIMATION, args.sigma, args.seed, args.batch)
            d32 = decide(s0[0].numpy(), s1[0].numpy(), args.n, args.alpha, args.sigma)
            d16 = decide(s0[1].numpy(), s1[1].numpy(), args.n, args.alpha, args.sigma)
            rows.append(dict(
                index=i, label=int(test_y[i]), pred_fp32=d32[0], pred_bf16=d16[0], radius_fp32=d32[1], radius_bf16=d16[1],
                nA_fp32=d32[2], nA_bf16=d16[2], disagree_selection=s0[2], disagree_estimation=s1[2],
                counts_fp32=s1[0].tolist(), counts_bf16=s1[1].tolist(), radius_sd=radius_sd(d32[2], args.n, args.sigma),
            ))  # fmt: skip
            if (k + 1) % 25 == 0:
                print(f"{k + 1}/{len(idx)} images, {time.perf_counter() - t0:.0f}s", flush=True)
    paired_seconds = time.perf_counter() - t0
    paired_command, paired_date = None, None
    if reused:
        rows, paired_seconds = reused["results"], reused["summary"]["seconds"]
        paired_command, paired_date = reused.get("paired_command", reused["command"]), reused.get("paired_date", reused["date"])
        assert [r["index"] for r in rows] == idx, "reused rows are for other images"
    # the sampling yardstick: the same fp32 path with fresh noise (another seed)
    t1 = time.perf_counter()
    xs_all = data.to_float(test_x[idx]).to(device)
    other = engine.certify(model, xs_all, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.compare_seed,
                           image_ids=torch.tensor(idx), batch_size=args.batch, precision="fp32")
    for k, r in enumerate(rows):
        c_a = int(other.counts_selection[k].argmax())
        r.update(pred_seed=int(other.prediction[k]), radius_seed=float(other.radius[k]),
                 nA_seed=int(other.counts_estimation[k, c_a]))
    seed_seconds = time.perf_counter() - t1
    # the study's counts are the engine's: check a few images against engine.certify in both precisions
    # (CPU: the same path, equal counts expected; CUDA: the engine's Triton path also folds batch norm
    # and fuses the last layer, so it may differ from the plain autocast model by a few samples)
    check = idx[:3]
    xs = data.to_float(test_x[check]).to(device)
    ids = torch.tensor(check)
    max_diff = 0
    for prec, key in (("fp32", "counts_fp32"), ("bf16", "counts_bf16")):
        res = engine.certify(model, xs, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed,
                             image_ids=ids, batch_size=args.batch, precision=prec)
        want = torch.tensor([r[key] for r in rows[:3]])
        max_diff = max(max_diff, int((res.counts_estimation - want).abs().max()))
    summary = summarize(rows, args)
    summary.update(clean_accuracy=clean_acc, engine_consistent=max_diff == 0, engine_max_count_diff=max_diff,
                   seconds=paired_seconds, seed_seconds=seed_seconds, step=step, reused_rows=bool(reused))
    rec = record("mixed_precision", device, rows, argv)
    rec.update(summary=summary, settings=vars(args), training=meta if isinstance(meta, dict) else {},
               paired_command=paired_command or rec["command"], paired_date=paired_date or rec["date"])
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(rec, indent=1) + "\n")
    md = markdown(summary, rec, args)
    Path(args.out_md).write_text(md)
    print(md)
    return 0


def _reuse(args):
    """An earlier run's record with the same settings (rows of the paired pass), or None."""
    if not args.reuse_rows:
        return None
    rec = json.loads(Path(args.reuse_rows).read_text())
    rec = rec[-1] if isinstance(rec, list) else rec
    keys = ("sigma", "n0", "n", "alpha", "seed", "images", "epochs", "checkpoint", "batch")
    old = rec["settings"]
    if any(old.get(k) != getattr(args, k) for k in keys):
        raise SystemExit(f"--reuse-rows {args.reuse_rows}: settings differ ({ {k: old.get(k) for k in keys} })")
    return rec


def decision_flip_expectation(rows, args) -> float:
    """Expected number of abstain/certify decisions that differ between two independent fp32 runs,
    sum over images of 2 q (1 - q), q = P[Clopper-Pearson lower bound of Bin(n, nA/n) >= 1/2]."""
    ks = np.arange(args.n + 1)
    lower = clopper_pearson_lower(ks, args.n, args.alpha)
    k_star = int(ks[np.argmax(lower >= 0.5)])
    q = np.array([stats.binom.sf(k_star - 1, args.n, r["nA_fp32"] / args.n) for r in rows])
    return float(np.sum(2 * q * (1 - q)))


def summarize(rows, args) -> dict:
    samples = len(rows) * (args.n0 + args.n)
    dis = sum(r["disagree_selection"] + r["disagree_estimation"] for r in rows)
    upper = float(stats.beta.ppf(1 - 0.001, dis + 1, samples - dis)) if dis < samples else 1.0
    d_na = np.array([abs(r["nA_bf16"] - r["nA_fp32"]) for r in rows])
    d_r = np.array([abs(r["radius_bf16"] - r["radius_fp32"]) for r in rows])
    sd = np.array([r["radius_sd"] for r in rows])
    ok = np.isfinite(sd) & (sd > 0)
    pred_changed = sum(r["pred_fp32"] != r["pred_bf16"] for r in rows)
    labels = np.array([r["label"] for r in rows])

    def cert_acc(key_p, key_r, radius):
        return float(np.mean([(r[key_p] == r["label"]) and r[key_r] >= radius for r in rows]))

    def acr(key_p, key_r):
        return float(np.mean([r[key_r] if r[key_p] == r["label"] else 0.0 for r in rows]))

    na_sd = np.array([math.sqrt(args.n * (r["nA_fp32"] / args.n) * (1 - r["nA_fp32"] / args.n)) for r in rows])
    s_na = np.array([abs(r["nA_seed"] - r["nA_fp32"]) for r in rows])
    s_r = np.array([abs(r["radius_seed"] - r["radius_fp32"]) for r in rows])
    seed = dict(
        predictions_changed=int(sum(r["pred_fp32"] != r["pred_seed"] for r in rows)),
        abstain=int(sum(r["pred_seed"] == -1 for r in rows)),
        max_abs_delta_nA=int(s_na.max()), mean_abs_delta_nA=float(s_na.mean()),
        max_abs_delta_radius=float(s_r.max()), mean_abs_delta_radius=float(s_r.mean()),
        max_delta_over_sd=float((s_r[ok] / sd[ok]).max()) if ok.any() else float("nan"),
        acr=acr("pred_seed", "radius_seed"),
        certified_accuracy={str(rad): cert_acc("pred_seed", "radius_seed", rad) for rad in (0.0, 0.25, 0.5, 0.75, 1.0)},
        expected_decision_flips=decision_flip_expectation(rows, args),
    )  # fmt: skip
    return dict(
        seed_comparison=seed,
        images=len(rows), samples=samples, disagreeing_samples=dis, disagreement_rate=dis / samples,
        disagreement_rate_upper_99_9=upper, images_with_any_disagreement=int(sum(
            (r["disagree_selection"] + r["disagree_estimation"]) > 0 for r in rows)),
        max_abs_delta_nA=int(d_na.max()), mean_abs_delta_nA=float(d_na.mean()),
        median_sampling_sd_nA=float(np.median(na_sd)), predictions_changed=int(pred_changed),
        abstain_fp32=int(sum(r["pred_fp32"] == -1 for r in rows)), abstain_bf16=int(sum(r["pred_bf16"] == -1 for r in rows)),
        max_abs_delta_radius=float(d_r.max()), mean_abs_delta_radius=float(d_r.mean()),
        median_radius_sd=float(np.median(sd[ok])) if ok.any() else float("nan"),
        max_delta_over_sd=float((d_r[ok] / sd[ok]).max()) if ok.any() else float("nan"),
        acr_fp32=acr("pred_fp32", "radius_fp32"), acr_bf16=acr("pred_bf16", "radius_bf16"),
        certified_accuracy={str(rad): [cert_acc("pred_fp32", "radius_fp32", rad), cert_acc("pred_bf16", "radius_bf16", rad)]
                            for rad in (0.0, 0.25, 0.5, 0.75, 1.0)},
        labels_seen=int(len(set(labels.tolist()))),
    )  # fmt: skip


def markdown(s, rec, args) -> str:
    y = s["seed_comparison"]
    lines = [
        f"# Mixed precision and certified decisions ({rec['device']}: bf16 autocast vs fp32)",
        "",
        f"Device: {rec['device']}; torch {rec['torch']}; date {rec['date']}.  ",
        f"Command: `{rec['command']}`  ",
        f"Model: LeNet, Gaussian augmentation sigma={args.sigma}, {args.epochs} epochs on MNIST ({args.data_root}); "
        f"clean accuracy on the certified images {s['clean_accuracy']:.3f}.  ",
        f"Certify: {s['images']} test images (every {s['step']}-th), n0={args.n0}, n={args.n}, alpha={args.alpha}. "
        f"Paired pass: fp32 and bf16 classify the same keyed noisy samples (seed {args.seed}; "
        f"{s['seconds']:.0f} s for both; command `{rec['paired_command']}`, {rec['paired_date']}). "
        f"Yardstick: the fp32 path again with fresh noise (seed {args.compare_seed}; {s['seed_seconds']:.0f} s).  ",
        f"The paired pass's fp32 / bf16 counts equal engine.certify(precision=...) on the first images: "
        f"{s['engine_consistent']} (largest count difference {s['engine_max_count_diff']}).",
        "",
        f"Per-sample disagreement of bf16 and fp32: {s['disagreeing_samples']:,} of {s['samples']:,} samples "
        f"(rate {s['disagreement_rate']:.2e}, 99.9% upper bound {s['disagreement_rate_upper_99_9']:.2e}), on "
        f"{s['images_with_any_disagreement']} of {s['images']} images. Median sampling sd of n_A, sqrt(n p(1-p)): "
        f"{s['median_sampling_sd_nA']:.2f}; median sampling sd of the radius (delta method): {s['median_radius_sd']:.2e}.",
        "",
        f"| change against fp32, seed {args.seed} | bf16, same noise | fp32, seed {args.compare_seed} (sampling) |",
        "| --- | --- | --- |",
        f"| predictions changed (class or abstain) | {s['predictions_changed']} | {y['predictions_changed']} "
        f"(expected abstain/certify flips alone: {y['expected_decision_flips']:.1f}) |",
        f"| abstentions (fp32 seed {args.seed}: {s['abstain_fp32']}) | {s['abstain_bf16']} | {y['abstain']} |",
        f"| max / mean abs change of n_A | {s['max_abs_delta_nA']} / {s['mean_abs_delta_nA']:.2f} | "
        f"{y['max_abs_delta_nA']} / {y['mean_abs_delta_nA']:.2f} |",
        f"| max / mean abs radius change | {s['max_abs_delta_radius']:.2e} / {s['mean_abs_delta_radius']:.2e} | "
        f"{y['max_abs_delta_radius']:.2e} / {y['mean_abs_delta_radius']:.2e} |",
        f"| max radius change / its sampling sd | {s['max_delta_over_sd']:.2f} | {y['max_delta_over_sd']:.2f} |",
        f"| ACR (fp32 seed {args.seed}: {s['acr_fp32']:.4f}) | {s['acr_bf16']:.4f} | {y['acr']:.4f} |",
    ]
    for rad, (a, b) in s["certified_accuracy"].items():
        lines.append(f"| certified accuracy at r={rad} (fp32 seed {args.seed}: {a:.3f}) | {b:.3f} | "
                     f"{y['certified_accuracy'][rad]:.3f} |")
    lines += [
        "",
        "Reading: CERTIFY is sound for any deterministic base classifier, so a bf16 certificate is a valid",
        "certificate of the bf16 model; the question is only how far the certified statements move. With",
        "the same noise, n_A moves by at most the number of disagreeing samples of that image. The right",
        "column is what a fresh draw of the noise does to the very same fp32 computation: if bf16 moves",
        "predictions, counts and radii by less than that, its effect is within sampling error.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
