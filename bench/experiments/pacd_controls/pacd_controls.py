"""PACD against its random controls on MNIST (target class 8): a protocol fixed before it runs, every run reported.

Stages (each resumable; run them again after a crash, or in several processes with different --only):

    protocol   write results/protocol.json: every setting, row and seed, and the CPU-hour estimate. Written once;
               every later stage refuses to run if the driver's protocol differs from the file's.
    estimate   time one outer step per procedure and one victim epoch and certification per procedure on this CPU,
               and record the CPU-hour estimate (in results/estimate.json, referenced by the protocol).
    craft      the crafted poisons (poison --preset paper-mnist, outer steps of the protocol), resumable checkpoints.
    controls   the random controls of every crafted poison (engine.pacd.random_poison; twin, vertex, sign, uniform,
               shift).
    victims    train and certify every (row, victim seed) of the protocol (engine.evaluate.evaluate_poison), resumable.
    summary    results/summary.json (schema below), results/results.md and results/drop_vs_accuracy.png from every
               finished victim; rows with missing victims are reported as missing, never dropped.

    python bench/experiments/pacd_controls/pacd_controls.py --stage protocol --data-root ../shared/data/mnist
    python bench/experiments/pacd_controls/pacd_controls.py --stage all --data-root ../shared/data/mnist --threads 1

summary.json: {"protocol": {...}, "rows": [{"victim", "poison", "kind", "eps", "outer_steps", "seeds", "acr_clean",
"acr_poisoned", "acr_drop", "acr_drop_ci95", "drop_minus_twin", "drop_minus_twin_ci95", "smoothed_acc",
"radius_given_correct", "clean_acc_target", "clean_acc_other", "images", "n", "cpu", "threads", "missing_seeds"}]}.
Intervals resample victim seeds (paired: the clean, poisoned and twin victims of one seed together), then test images
within each (paired across victims), 10,000 times.

--dry-run runs the whole pipeline at toy sizes (1,000 embedded MNIST images, 2 outer steps, 3 epochs, 4 images, n 100) into
--work and --results given; the test suite runs it that way.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import data, models
from engine.evaluate import evaluate_poison, target_test_indices
from engine.pacd import PoisonSet, poison, preset, random_poison
from engine.results import read_log, run_trace

TARGET = 8
PROCEDURES = ("gaussian", "macer", "smoothadv")
CONTROL_KINDS = ("twin", "vertex", "sign", "uniform", "shift")
MAIN_KINDS = ("crafted", "twin", "vertex")  # 3 victim seeds; the other controls 1
LOW_EPS = (0.03, 0.05)  # Gaussian augmentation only: crafted, twin, vertex, shift
# victims: LeNet from scratch with the settings of the committed MNIST study (bench/experiments/pacd_mnist:
# victim_args, issue-3 settings), SGD lr 0.01 cosine, batch 64; sigma = the procedure's crafting sigma
VICTIM_EPOCHS = {"gaussian": 10, "macer": 3, "smoothadv": 3}
VICTIM_ARGS = {
    "gaussian": {},
    "macer": {"k": 16, "lbd": 1.0, "lbd_warmup": 2, "gamma": 8.0, "beta": 16.0},
    "smoothadv": {"eps": 1.0, "steps": 10, "m": 1, "warmup": 2},
}
OUTER_STEPS = {"gaussian": 2750, "macer": 1100, "smoothadv": 2200}  # >= 2 re-initialisations each
HERE = Path(__file__).resolve().parent


def build_protocol(args) -> dict:
    dry = args.dry_run
    seeds_main = [0] if dry else [0, 1, 2]
    rows = []
    for proc in PROCEDURES:
        rows.append({"victim": proc, "poison": "clean", "kind": "clean", "eps": None, "seeds": seeds_main})
        for kind in ("crafted", *CONTROL_KINDS):
            rows.append({"victim": proc, "poison": f"{proc}-eps0.1-{kind}", "kind": kind, "eps": 0.1,
                         "seeds": seeds_main if kind in MAIN_KINDS else [0]})
    if not dry:
        for eps in LOW_EPS:
            for kind in ("crafted", "twin", "vertex", "shift"):
                rows.append({"victim": "gaussian", "poison": f"gaussian-eps{eps:g}-{kind}", "kind": kind, "eps": eps,
                             "seeds": seeds_main if kind in MAIN_KINDS else [0]})
    crafting = {}
    for proc in PROCEDURES:
        settings = preset("paper-mnist", proc)
        settings["outer_steps"] = 2 if dry else OUTER_STEPS[proc]
        if dry:
            settings.update(batch_clean=16, batch_poison=4, batch_val=4, k=2, niter1=1, niter2=1)
        crafting[proc] = settings
    return {
        "name": "pacd_controls",
        "target_class": TARGET,
        "data": {"dataset": "mnist", "data_root": "embedded" if dry else str(args.data_root), "val_size": 100 if dry
                 else 5000, "split_seed": 0, "train_images": 1000 if dry else "all"},
        "crafting": {"preset": "paper-mnist", "seed": 0, "settings": crafting,
                     "eps": {proc: [0.1, *([] if proc != "gaussian" or dry else LOW_EPS)] for proc in PROCEDURES}},
        "controls": {"seed": 0, "kinds": list(CONTROL_KINDS)},
        "victims": {"arch": "lenet", "epochs": {p: 3 for p in PROCEDURES} if dry else VICTIM_EPOCHS,
                    "method_args": VICTIM_ARGS, "sigma": {p: crafting[p]["sigma"] for p in PROCEDURES},
                    "optimizer": "sgd", "lr": 0.05 if dry else 0.01, "schedule": "cosine", "batch_size": 64},
        "certification": {"images": 4 if dry else 200, "image_seed": 0, "n0": 10 if dry else 100,
                          "n": 100 if dry else 100_000, "alpha": 0.001},
        "intervals": {"level": 0.95, "reps": 10_000, "resample": "victim seeds, then test images (paired)"},
        "rows": rows,
        "rules": ["every run made under this protocol is reported in summary.json (no selection among screens)",
                  "victims compared in a row are trained on the same CPU kind with the same thread count; the summary "
                  "flags a row whose victims differ",
                  "the crafted poisons are the preset's, not post-processed (no vote, no snap)"],
    }


def _stable(protocol: dict) -> str:
    return json.dumps(protocol, sort_keys=True)


def check_protocol(args, protocol: dict) -> None:
    path = args.results / "protocol.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run --stage protocol first (the protocol is fixed before any run)")
    stored = json.loads(path.read_text())
    recorded = {k: v for k, v in stored.items() if k not in ("written", "machine", "git_commit", "estimate")}
    if _stable(recorded) != _stable(protocol):
        raise SystemExit(f"{path} differs from this driver's protocol: the protocol is fixed; start a new results "
                         "folder for another one")


def write_protocol(args, protocol: dict) -> None:
    path = args.results / "protocol.json"
    if path.exists():
        check_protocol(args, protocol)
        print(f"{path} exists and matches")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**protocol, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": run_trace(),
              "estimate": "estimate.json (stage estimate)"}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def load_data(args, protocol):
    root = data.embedded_mnist_root() if args.dry_run else args.data_root
    images, labels = data.load_mnist(root, "train")
    train, val = data.split_validation(images, labels, protocol["data"]["val_size"])
    if protocol["data"]["train_images"] != "all":  # a dry run: crafting and victims on the first images of the split
        keep = protocol["data"]["train_images"]
        train = (train[0][:keep], train[1][:keep])
    return train, val, data.load_mnist(root, "test")


def poison_path(args, proc: str, eps: float, kind: str) -> Path:
    return args.work / "poisons" / f"{proc}-eps{eps:g}-{kind}.safetensors"


def stage_craft(args, protocol, train, val, only=None) -> None:
    for proc in PROCEDURES:
        if only and proc not in only:
            continue
        for eps in protocol["crafting"]["eps"][proc]:
            out = poison_path(args, proc, eps, "crafted")
            if out.exists():
                print(f"== {out.name}: done")
                continue
            settings = {**protocol["crafting"]["settings"][proc], "eps": eps}
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"== crafting {out.name} ({settings['outer_steps']} outer steps)", flush=True)
            ps = poison(lambda: models.build("lenet"), train, val, target_class=TARGET, method=proc,
                        seed=protocol["crafting"]["seed"], checkpoint=out.with_name(out.name + ".ckpt"),
                        checkpoint_every=10, device="cpu", progress=not args.quiet, encoding="int8", **settings)
            ps.settings.update({"preset": "paper-mnist", "dataset": "mnist",
                                "val_size": protocol["data"]["val_size"]})
            ps.save(out)


def stage_controls(args, protocol, train) -> None:
    for proc in PROCEDURES:
        for eps in protocol["crafting"]["eps"][proc]:
            crafted = poison_path(args, proc, eps, "crafted")
            if not crafted.exists():
                print(f"== controls of {crafted.name}: waiting for the crafted poison")
                continue
            like = PoisonSet.load(crafted, train)
            for kind in sorted({r["kind"] for r in protocol["rows"]} & set(CONTROL_KINDS)):
                if not any(r["poison"] == f"{proc}-eps{eps:g}-{kind}" for r in protocol["rows"]):
                    continue
                out = poison_path(args, proc, eps, kind)
                if out.exists():
                    continue
                ps = random_poison(train, target_class=TARGET, eps=eps, kind=kind, seed=protocol["controls"]["seed"],
                                   like=like)
                ps.encode(train, "sign" if kind in ("vertex", "sign", "shift") else "int8").save(out)
                print(f"== wrote {out.name}")


def victim_dir(args, row: dict, seed: int) -> Path:
    return args.work / "victims" / row["victim"] / row["poison"] / f"seed{seed}"


def stage_victims(args, protocol, train, test, only=None) -> None:
    v, c = protocol["victims"], protocol["certification"]
    for row in protocol["rows"]:
        if only and row["victim"] not in only:
            continue
        ps = None
        if row["kind"] != "clean":
            path = poison_path(args, row["victim"], row["eps"], row["kind"])
            if not path.exists():
                print(f"== {row['poison']}: waiting for {path.name}")
                continue
            ps = PoisonSet.load(path, train)
        for seed in row["seeds"]:
            out = victim_dir(args, row, seed)
            if (out / "summary.json").exists():
                continue
            print(f"== victim {row['victim']} / {row['poison']} / seed {seed}", flush=True)
            proc = row["victim"]
            evaluate_poison(ps, train, test, victim_method=proc, arch=v["arch"], sigma=v["sigma"][proc],
                            target_class=TARGET, epochs=v["epochs"][proc], batch_size=v["batch_size"], lr=v["lr"],
                            optimizer=v["optimizer"], schedule=v["schedule"], seed=seed,
                            method_args=v["method_args"][proc], n_images=c["images"], n0=c["n0"], n=c["n"],
                            alpha=c["alpha"], out_dir=out, device="cpu", dataset="mnist", progress=not args.quiet)


def _radii(directory: Path) -> dict[int, float]:
    return {k: r[3] * r[4] for k, r in read_log(directory / "certify.tsv")[1].items()}


def _bootstrap(triples, reps: int, level: float, rng) -> tuple[list[float], list[float]]:
    """Intervals of (drop, drop minus twin) resampling seeds, then images within each; ``triples`` per seed:
    (clean radii, poisoned radii, twin radii or None) as arrays over the same images."""
    drops, diffs = [], []
    for _ in range(reps):
        picked = [triples[i] for i in rng.integers(0, len(triples), len(triples))]
        sc = sp = st = 0.0
        for c, p, t in picked:
            idx = rng.integers(0, len(c), len(c))
            sc, sp = sc + c[idx].sum(), sp + p[idx].sum()
            st = st + (t[idx].sum() if t is not None else np.nan)
        drops.append(1 - sp / sc if sc > 0 else np.nan)
        diffs.append((st - sp) / sc if sc > 0 else np.nan)
    q = [50 * (1 - level), 50 * (1 + level)]
    lo_hi = [float(x) for x in np.nanpercentile(drops, q)] if not np.all(np.isnan(drops)) else [None, None]
    lo_hi_t = [float(x) for x in np.nanpercentile(diffs, q)] if not np.all(np.isnan(diffs)) else [None, None]
    return lo_hi, lo_hi_t


def stage_summary(args, protocol) -> dict:
    rows_out = []
    rng = np.random.default_rng(0)
    reps = 200 if args.dry_run else protocol["intervals"]["reps"]
    level = protocol["intervals"]["level"]
    clean_rows = {r["victim"]: r for r in protocol["rows"] if r["kind"] == "clean"}
    for row in protocol["rows"]:
        done = [s for s in row["seeds"] if (victim_dir(args, row, s) / "summary.json").exists()]
        summaries = {s: json.loads((victim_dir(args, row, s) / "summary.json").read_text()) for s in done}
        clean_row = clean_rows[row["victim"]]
        twin_row = None if row["kind"] in ("clean", "twin") else next(
            (r for r in protocol["rows"] if r["victim"] == row["victim"] and r["eps"] == row["eps"]
             and r["kind"] == "twin"), None)
        paired = [s for s in done if (victim_dir(args, clean_row, s) / "summary.json").exists()]
        clean = {s: json.loads((victim_dir(args, clean_row, s) / "summary.json").read_text()) for s in paired}
        out = {"victim": row["victim"], "poison": row["poison"], "kind": row["kind"] if row["kind"] in ("clean", "crafted")
               else "control", "control": row["kind"] if row["kind"] not in ("clean", "crafted") else None,
               "eps": row["eps"], "seeds": done, "missing_seeds": [s for s in row["seeds"] if s not in done],
               "images": protocol["certification"]["images"], "n": protocol["certification"]["n"]}
        out["outer_steps"] = protocol["crafting"]["settings"][row["victim"]]["outer_steps"] if row["kind"] == "crafted" \
            else None
        out["acr_poisoned"] = [summaries[s]["acr"] for s in done]
        out["acr_clean"] = [clean[s]["acr"] for s in paired]
        out["smoothed_acc"] = [summaries[s]["certified_accuracy"].get("0") for s in done]
        out["radius_given_correct"] = [
            (summaries[s]["acr"] / summaries[s]["certified_accuracy"]["0"]) if summaries[s]["certified_accuracy"].get("0")
            else None for s in done]
        out["clean_acc_target"] = [summaries[s]["clean_accuracy_target"] for s in done]
        out["clean_acc_other"] = [summaries[s]["clean_accuracy_other_classes"] for s in done]
        machines = {(summaries[s]["trace"].get("cpu"), summaries[s]["trace"].get("threads")) for s in done}
        machines |= {(clean[s]["trace"].get("cpu"), clean[s]["trace"].get("threads")) for s in paired}
        out["cpu"] = sorted({m[0] for m in machines if m[0]})
        out["threads"] = sorted({m[1] for m in machines if m[1]})
        out["same_machine_kind"] = len(machines) <= 1
        out.update(acr_drop=None, acr_drop_ci95=[None, None], drop_minus_twin=None, drop_minus_twin_ci95=[None, None])
        if row["kind"] != "clean" and paired:
            triples = []
            for s in paired:
                rc, rp = _radii(victim_dir(args, clean_row, s)), _radii(victim_dir(args, row, s))
                keys = sorted(rc)
                twin_dir = victim_dir(args, twin_row, s) if twin_row is not None else None
                rt = _radii(twin_dir) if twin_dir is not None and (twin_dir / "certify.tsv").exists() else None
                triples.append((np.array([rc[k] for k in keys]), np.array([rp[k] for k in keys]),
                                None if rt is None else np.array([rt[k] for k in keys])))
            sc, sp = sum(t[0].sum() for t in triples), sum(t[1].sum() for t in triples)
            out["acr_drop"] = float(1 - sp / sc) if sc > 0 else None
            if all(t[2] is not None for t in triples):
                out["drop_minus_twin"] = float((sum(t[2].sum() for t in triples) - sp) / sc) if sc > 0 else None
            ci, ci_t = _bootstrap(triples, reps, level, rng)
            out["acr_drop_ci95"] = ci
            if out["drop_minus_twin"] is not None:
                out["drop_minus_twin_ci95"] = ci_t
        rows_out.append(out)
    summary = {"protocol": json.loads((args.results / "protocol.json").read_text()), "rows": rows_out,
               "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(args, summary)
    plot_frontier(args, summary)
    print(f"wrote {args.results / 'summary.json'}, results.md, drop_vs_accuracy.png")
    return summary


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def write_markdown(args, summary) -> None:
    lines = ["# PACD against random controls (MNIST, class 8)", "",
             "Protocol: `protocol.json` (fixed before the runs). Every row of the protocol is listed; missing seeds are "
             "victims not yet run.", "",
             "| victim | poison | eps | seeds | ACR clean | ACR poisoned | ACR drop [95%] | drop minus twin [95%] "
             "| smoothed acc | clean acc target / other | missing |", "|" + "---|" * 11]
    def mean(xs):
        return "-" if not xs or any(x is None for x in xs) else f"{np.mean(xs):.4f}"

    for r in summary["rows"]:
        ci = r["acr_drop_ci95"]
        cit = r["drop_minus_twin_ci95"]
        lines.append(
            f"| {r['victim']} | {r['poison']} | {r['eps'] if r['eps'] is not None else '-'} | {len(r['seeds'])} | "
            f"{mean(r['acr_clean'])} | {mean(r['acr_poisoned'])} | {_pct(r['acr_drop'])} [{_pct(ci[0])}, {_pct(ci[1])}] | "
            f"{_pct(r['drop_minus_twin'])} [{_pct(cit[0])}, {_pct(cit[1])}] | {mean(r['smoothed_acc'])} | "
            f"{mean(r['clean_acc_target'])} / {mean(r['clean_acc_other'])} | {r['missing_seeds'] or '-'} |")
    (args.results / "results.md").write_text("\n".join(lines) + "\n")


def plot_frontier(args, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in summary["rows"]:
        if r["acr_drop"] is None or not r["clean_acc_target"]:
            continue
        marker = "*" if r["kind"] == "crafted" else "o"
        ax.scatter(np.mean(r["clean_acc_target"]), 100 * r["acr_drop"], marker=marker, s=60 if marker == "*" else 25)
        ax.annotate(r["poison"].split("-", 1)[1], (np.mean(r["clean_acc_target"]), 100 * r["acr_drop"]), fontsize=6)
    ax.set_xlabel("base classifier's clean accuracy on the target class")
    ax.set_ylabel("ACR drop (%)")
    ax.set_title("ACR drop against the price in clean accuracy (stars: crafted)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.results / "drop_vs_accuracy.png")
    plt.close(fig)


def stage_estimate(args, protocol, train, val, test) -> None:
    """Seconds of one outer step per procedure, one victim epoch and one certified image, then the CPU hours."""
    est = {"machine": run_trace(), "threads": torch.get_num_threads(), "seconds": {}}
    for proc in PROCEDURES:
        # a step whose upper objective counts no validation image skips the solve: time steps until one solves
        from engine.pacd import Crafter, PoisonConfig

        settings = {**protocol["crafting"]["settings"][proc], "outer_steps": 12}
        crafter = Crafter(lambda: models.build("lenet"), train, val, TARGET, PoisonConfig(**settings, method=proc, seed=0))
        step, seen = None, []
        for _ in range(settings["outer_steps"]):
            entry = crafter.step()
            seen.append(entry["seconds"])
            if entry["phases"].get("solve", 0.0) > 0:
                step = entry["seconds"]
                break
        step = max(seen) if step is None else step
        v = protocol["victims"]
        sub = 2000 if not args.dry_run else 64
        t = time.perf_counter()
        from engine import train as train_fn

        model = models.build("lenet")
        train_fn(model, (train[0][:sub], train[1][:sub]), method=proc, sigma=v["sigma"][proc], epochs=1,
                 batch_size=v["batch_size"], lr=v["lr"], progress=False,
                 **{**v["method_args"][proc], **({"lbd_warmup": 0} if proc == "macer" else {}),
                    **({"warmup": 1} if proc == "smoothadv" else {})})
        epoch = (time.perf_counter() - t) * train[0].shape[0] / sub
        est["seconds"][proc] = {"outer_step": step, "victim_epoch": epoch}
    c = protocol["certification"]
    from engine.smoothing import certify

    model = models.build("lenet").eval()
    ids = torch.tensor(target_test_indices(test[1], TARGET, 2))
    t = time.perf_counter()
    certify(model, data.to_float(test[0][ids]), sigma=0.5, n0=c["n0"], n=c["n"], alpha=c["alpha"], image_ids=ids,
            progress=False)
    per_image = (time.perf_counter() - t) / len(ids)
    est["seconds"]["certify_image"] = per_image
    hours = {"craft": 0.0, "victims": 0.0}
    for proc in PROCEDURES:
        s = est["seconds"][proc]
        hours["craft"] += s["outer_step"] * protocol["crafting"]["settings"][proc]["outer_steps"] * len(
            protocol["crafting"]["eps"][proc]) / 3600
    for row in protocol["rows"]:
        s = est["seconds"][row["victim"]]
        victim = s["victim_epoch"] * protocol["victims"]["epochs"][row["victim"]] + per_image * c["images"]
        hours["victims"] += victim * len(row["seeds"]) / 3600
    hours["total"] = hours["craft"] + hours["victims"]
    est["cpu_hours"] = {k: round(v, 2) for k, v in hours.items()}
    (args.results / "estimate.json").write_text(json.dumps(est, indent=1) + "\n")
    print(json.dumps(est["cpu_hours"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("protocol", "estimate", "craft", "controls", "victims", "summary", "all"),
                   default="all")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--work", type=Path, default=Path("runs/pacd_controls"), help="poisons, checkpoints and victims")
    p.add_argument("--results", type=Path, default=HERE / "results", help="protocol, estimate and summaries")
    p.add_argument("--only", default=None, help="procedures this process works on (craft, victims), e.g. gaussian")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the embedded MNIST subset")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    protocol = build_protocol(args)
    if args.stage == "protocol":
        write_protocol(args, protocol)
        return 0
    if args.stage == "all" and not (args.results / "protocol.json").exists():
        write_protocol(args, protocol)
    check_protocol(args, protocol)
    train, val, test = load_data(args, protocol)
    if args.stage == "estimate":
        stage_estimate(args, protocol, train, val, test)
    if args.stage in ("craft", "all"):
        stage_craft(args, protocol, train, val, only)
    if args.stage in ("controls", "all"):
        stage_controls(args, protocol, train)
    if args.stage in ("victims", "all"):
        stage_victims(args, protocol, train, test, only)
    if args.stage in ("summary", "all"):
        stage_summary(args, protocol)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
