"""Poison crafted on part of the training set, victims trained on all of it (MNIST, class 8, Gaussian augmentation).

Mehra et al. leave open whether a poison crafted against part of a large training set works on all of it. Two GA
poisons with the same settings (the paper-mnist preset, fewer outer steps; seed 0, eps 0.1) differ only in the clean
data their lower level trains on: all 49,612 other-class training images ("full") or a random 5,000 of them
("subset", ``engine.poison(lower_subset=5000)``). Victims are trained on the whole training set either way, beside
the clean victim, each poison's twin (same per-pixel magnitudes, random signs) and the vertex control. Neither
poison re-initialises its lower model (the preset's 10 epochs would be 110 outer steps of the subset, 550 of the
whole set).

Stages (resumable; several processes split the work with --part K/N):

    protocol   write results/protocol.json (every setting, row and seed) once; later stages refuse another protocol
    craft      the crafted poisons (--only full or subset), checkpointed every 10 outer steps, then their controls
               (each twin after its poison; the vertex control with the full poison)
    victims    every (row, victim seed) of the protocol whose poison is written (--part K/N: every N-th)
    summary    results/summary.json and results/results.md from every finished victim (missing seeds reported)

    python bench/experiments/lower_subset/lower_subset.py --stage protocol --data-root ../shared/data/mnist
    python bench/experiments/lower_subset/lower_subset.py --stage craft --only subset --threads 1
    python bench/experiments/lower_subset/lower_subset.py --stage victims --part 0/2 --threads 1

--dry-run runs every stage at toy sizes on the embedded MNIST subset (the test suite runs it that way).
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
from engine.evaluate import evaluate_poison
from engine.pacd import PoisonSet, poison, preset, random_poison
from engine.results import run_trace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "pacd_controls"))
from pacd_controls import _bootstrap, _pct, _radii, check_protocol  # noqa: E402

TARGET = 8
EPS = 0.1
SUBSET = 5000  # of the 49,612 other-class images of the split
OUTER_STEPS = 120  # the preset's 2,750 cost 9 CPU hours per poison; 120 is what this study's budget allows
POISONS = ("full", "subset")


def build_protocol(args) -> dict:
    dry = args.dry_run
    craft = preset("paper-mnist", "gaussian")
    # reset_every counts epochs of the lower level's own data: 10 epochs are 550 outer steps of the full set but 110
    # of the subset (5,000 + 5,388 poisoned images), so the preset would restart only the subset poison's lower
    # model within 120 steps; neither restarts here
    craft.update(outer_steps=2 if dry else OUTER_STEPS, eps=EPS, reset_every=0)
    seeds2, seeds1 = ([0], [0]) if dry else ([0, 1], [0])  # 2 victim seeds per row, 1 for the vertex control
    rows = [{"poison": "clean", "kind": "clean", "seeds": seeds2},
            {"poison": "full-crafted", "kind": "crafted", "seeds": seeds2},
            {"poison": "subset-crafted", "kind": "crafted", "seeds": seeds2},
            {"poison": "full-twin", "kind": "twin", "seeds": seeds2},
            {"poison": "subset-twin", "kind": "twin", "seeds": seeds2},
            {"poison": "vertex", "kind": "vertex", "seeds": seeds1}]
    return {
        "question": "does a GA poison crafted against a subset of the clean training data lower the ACR of victims "
                    "trained on the whole set as much as one crafted against the whole set, and more than its twin?",
        "target_class": TARGET,
        "data": {"dataset": "mnist", "data_root": "embedded" if dry else str(args.data_root),
                 "val_size": 100 if dry else 5000, "split_seed": 0},
        "crafting": {"preset": "paper-mnist", "procedure": "gaussian", "seed": 0, "settings": craft,
                     "lower_subset": {"full": None, "subset": 50 if dry else SUBSET},
                     "deviations": [f"outer_steps {craft['outer_steps']} instead of the preset's 2,750 (CPU budget)",
                                    "reset_every 0 (the lower model is never re-initialised) instead of 10 epochs, "
                                    "which would restart the subset poison's lower model at step 110 and never the "
                                    "full poison's"]},
        "controls": {"seed": 0, "twin": "of each crafted poison", "vertex": "one (it does not depend on a poison)",
                     "made": "by the craft stage, after the poison they need"},
        "victims": {"procedure": "gaussian", "arch": "lenet", "sigma": craft["sigma"], "epochs": 2 if dry else 10,
                    "optimizer": "sgd", "lr": 0.01, "schedule": "cosine", "batch_size": 64,
                    "train_data": "the whole training split (55,000 images), the target class's images poisoned"},
        "certification": {"images": 4 if dry else 200, "image_seed": 0, "n0": 10 if dry else 100,
                          "n": 100 if dry else 10_000, "alpha": 0.001},
        "intervals": {"level": 0.95, "reps": 10_000, "resample": "victim seeds, then test images (paired)"},
        "rows": rows,
        "rules": ["every run made under this protocol is reported (no selection among screens)",
                  "all victims on one CPU kind with one thread each (the summary lists the CPUs seen)"],
    }


def write_protocol(args, protocol: dict) -> None:
    path = args.results / "protocol.json"
    if path.exists():
        check_protocol(args, protocol)
        print(f"{path} exists and matches")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**protocol, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": run_trace()},
                               indent=1) + "\n")
    print(f"wrote {path}")


def load_data(args, protocol):
    root = data.embedded_mnist_root() if args.dry_run else args.data_root
    train, val = data.split_validation(*data.load_mnist(root, "train"), protocol["data"]["val_size"])
    return train, val, data.load_mnist(root, "test")


def poison_path(args, name: str) -> Path:
    return args.work / "poisons" / f"{name}.safetensors"


def stage_craft(args, protocol, train, val) -> None:
    c = protocol["crafting"]
    for which in POISONS:
        if args.only and which not in args.only:
            continue
        out = poison_path(args, f"{which}-crafted")
        if out.exists():
            print(f"== {out.name}: done")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"== crafting {out.name} ({c['settings']['outer_steps']} outer steps, lower_subset "
              f"{c['lower_subset'][which]})", flush=True)
        ps = poison(lambda: models.build("lenet"), train, val, target_class=TARGET, method="gaussian", seed=c["seed"],
                    lower_subset=c["lower_subset"][which], checkpoint=out.with_name(out.name + ".ckpt"),
                    checkpoint_every=10, device="cpu", progress=not args.quiet, encoding="int8", **c["settings"])
        ps.settings.update({"preset": "paper-mnist", "dataset": "mnist", "val_size": protocol["data"]["val_size"]})
        ps.save(out)
    for row in protocol["rows"]:  # the controls: each twin after its poison, the vertex control with the full poison
        needs = row["poison"].split("-")[0] if row["kind"] == "twin" else "full" if row["kind"] == "vertex" else None
        if needs is None or (args.only and needs not in args.only) or poison_path(args, row["poison"]).exists():
            continue
        like = None
        if row["kind"] == "twin":
            crafted = poison_path(args, f"{needs}-crafted")
            if not crafted.exists():
                continue
            like = PoisonSet.load(crafted, train)
        ps = random_poison(train, target_class=TARGET, eps=EPS, kind=row["kind"], seed=protocol["controls"]["seed"],
                           like=like)
        ps.encode(train, "sign" if row["kind"] == "vertex" else "int8").save(poison_path(args, row["poison"]))
        print(f"== wrote {row['poison']}.safetensors", flush=True)


def _poison_of(args, row, train) -> PoisonSet | None:
    """The row's poison (None for the clean row or while the craft stage has not written it)."""
    path = poison_path(args, row["poison"])
    return PoisonSet.load(path, train) if row["kind"] != "clean" and path.exists() else None


def victim_dir(args, row: dict, seed: int) -> Path:
    return args.work / "victims" / row["poison"] / f"seed{seed}"


def stage_victims(args, protocol, train, test) -> None:
    v, c = protocol["victims"], protocol["certification"]
    jobs = [(row, s) for row in protocol["rows"] for s in row["seeds"]]
    k, parts = args.part
    for i, (row, seed) in enumerate(jobs):
        if i % parts != k:
            continue
        out = victim_dir(args, row, seed)
        if (out / "summary.json").exists():
            continue
        ps = _poison_of(args, row, train)
        if ps is None and row["kind"] != "clean":
            print(f"== {row['poison']} / seed {seed}: waiting for its poison")
            continue
        print(f"== victim {row['poison']} / seed {seed}", flush=True)
        evaluate_poison(ps, train, test, victim_method=v["procedure"], arch=v["arch"], sigma=v["sigma"],
                        target_class=TARGET, epochs=v["epochs"], batch_size=v["batch_size"], lr=v["lr"],
                        optimizer=v["optimizer"], schedule=v["schedule"], seed=seed, n_images=c["images"], n0=c["n0"],
                        n=c["n"], alpha=c["alpha"], out_dir=out, device="cpu", dataset="mnist",
                        progress=not args.quiet)


def stage_summary(args, protocol) -> dict:
    reps = 200 if args.dry_run else protocol["intervals"]["reps"]
    level = protocol["intervals"]["level"]
    rows = {r["poison"]: r for r in protocol["rows"]}
    out_rows = []
    for i, row in enumerate(protocol["rows"]):
        rng = np.random.default_rng(i)  # a row's interval does not depend on which other rows are done
        done = [s for s in row["seeds"] if (victim_dir(args, row, s) / "summary.json").exists()]
        summ = {s: json.loads((victim_dir(args, row, s) / "summary.json").read_text()) for s in done}
        twin = rows.get(row["poison"].replace("-crafted", "-twin")) if row["kind"] == "crafted" else None
        paired = [s for s in done if (victim_dir(args, rows["clean"], s) / "summary.json").exists()]
        out = {"poison": row["poison"], "kind": row["kind"], "seeds": done,
               "missing_seeds": [s for s in row["seeds"] if s not in done],
               "acr": [summ[s]["acr"] for s in done],
               "smoothed_acc": [summ[s]["certified_accuracy"].get("0") for s in done],
               "clean_acc_target": [summ[s]["clean_accuracy_target"] for s in done],
               "clean_acc_other": [summ[s]["clean_accuracy_other_classes"] for s in done],
               "cpu": sorted({summ[s]["trace"].get("cpu") for s in done if summ[s]["trace"].get("cpu")}),
               "threads": sorted({summ[s]["trace"].get("threads") for s in done if summ[s]["trace"].get("threads")}),
               "acr_drop": None, "acr_drop_ci95": [None, None], "drop_minus_twin": None,
               "drop_minus_twin_ci95": [None, None], "twin_seeds": []}
        if row["kind"] != "clean" and paired:
            triples = []
            for s in paired:
                rc, rp = _radii(victim_dir(args, rows["clean"], s)), _radii(victim_dir(args, row, s))
                keys = sorted(rc)
                tdir = victim_dir(args, twin, s) if twin is not None else None
                rt = _radii(tdir) if tdir is not None and (tdir / "summary.json").exists() else None
                if rt is not None:
                    out["twin_seeds"].append(s)
                triples.append((np.array([rc[k] for k in keys]), np.array([rp[k] for k in keys]),
                                None if rt is None else np.array([rt[k] for k in keys])))
            sc, sp = sum(t[0].sum() for t in triples), sum(t[1].sum() for t in triples)
            out["acr_drop"] = float(1 - sp / sc) if sc > 0 else None
            out["acr_drop_ci95"] = _bootstrap([(c, p, None) for c, p, _ in triples], reps, level, rng)[0]
            with_twin = [t for t in triples if t[2] is not None]  # the seeds whose twin victim is done too
            tc, tp = sum(t[0].sum() for t in with_twin), sum(t[1].sum() for t in with_twin)
            if with_twin and tc > 0:
                out["drop_minus_twin"] = float((sum(t[2].sum() for t in with_twin) - tp) / tc)
                out["drop_minus_twin_ci95"] = _bootstrap(with_twin, reps, level, rng)[1]
        out_rows.append(out)
    summary = {"protocol": json.loads((args.results / "protocol.json").read_text()), "rows": out_rows,
               "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(args, summary)
    print(f"wrote {args.results / 'summary.json'} and results.md")
    return summary


def write_markdown(args, summary) -> None:
    p = summary["protocol"]

    def mean(xs):
        return "-" if not xs or any(x is None for x in xs) else f"{np.mean(xs):.4f}"

    lines = ["# Poison crafted on a subset, victims on the whole set (MNIST, class 8, GA)", "",
             f"Protocol: `protocol.json` (fixed before the runs: {p['crafting']['settings']['outer_steps']} outer steps, "
             f"lower_subset {p['crafting']['lower_subset']['subset']}, victims GA LeNet sigma {p['victims']['sigma']}, "
             f"{p['certification']['images']} class-{TARGET} test images, n {p['certification']['n']:,}). "
             "Every row of the protocol is listed; the ACR drop is against the clean victims of the same seeds, "
             "the interval resamples seeds, then images.", "",
             "| poison | seeds | ACR | ACR drop [95%] | drop minus twin [95%] | smoothed acc | clean acc target / other "
             "| missing |", "|" + "---|" * 8]
    for r in summary["rows"]:
        ci, cit = r["acr_drop_ci95"], r["drop_minus_twin_ci95"]
        lines.append(f"| {r['poison']} | {len(r['seeds'])} | {mean(r['acr'])} | {_pct(r['acr_drop'])} "
                     f"[{_pct(ci[0])}, {_pct(ci[1])}] | {_pct(r['drop_minus_twin'])} [{_pct(cit[0])}, {_pct(cit[1])}] "
                     f"| {mean(r['smoothed_acc'])} | {mean(r['clean_acc_target'])} / {mean(r['clean_acc_other'])} "
                     f"| {r['missing_seeds'] or '-'} |")
    cpus = sorted({c for r in summary["rows"] for c in r["cpu"]})
    lines += ["", f"CPUs of the victims: {', '.join(cpus) or '-'}; threads: "
              f"{sorted({t for r in summary['rows'] for t in r['threads']})}."]
    (args.results / "results.md").write_text("\n".join(lines) + "\n")


def _part(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be K/N with 0 <= K < N, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"must be K/N with 0 <= K < N, got {text!r}")
    return k, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("protocol", "craft", "victims", "summary", "all"), default="all")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--work", type=Path, default=Path("runs/lower_subset"), help="poisons, checkpoints and victims")
    p.add_argument("--results", type=Path, default=HERE / "results", help="protocol and summaries")
    p.add_argument("--only", default=None, help="craft: full, subset or full,subset")
    p.add_argument("--part", type=_part, default=(0, 1), help="victims: this process's share K/N of the victims")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the embedded MNIST subset")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.only = set(args.only.split(",")) if args.only else None
    if args.only and not args.only <= set(POISONS):
        p.error(f"--only takes {', '.join(POISONS)}, got {sorted(args.only)}")
    protocol = build_protocol(args)
    if args.stage == "protocol":
        write_protocol(args, protocol)
        return 0
    if args.stage == "all" and not (args.results / "protocol.json").exists():
        write_protocol(args, protocol)
    check_protocol(args, protocol)
    train, val, test = load_data(args, protocol)
    if args.stage in ("craft", "all"):
        stage_craft(args, protocol, train, val)
    if args.stage in ("victims", "all"):
        stage_victims(args, protocol, train, test)
    if args.stage in ("summary", "all"):
        stage_summary(args, protocol)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
