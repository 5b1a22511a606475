"""Side-by-side report of clean and poisoned victims evaluated with ``python -m engine evaluate`` (or
``engine.evaluate_poison``): for each pair of output directories, the ACRs from their ``summary.json``, the
relative ACR drop and its paired bootstrap interval over the certified images (their ``certify.tsv``;
``engine.evaluate.pair_evaluations``), written as one JSON with the commands that produced the directories.

    python bench/experiments/pacd_mnist/pacd_pair.py --pair damped=runs/clean,runs/poisoned --what "..." \
        --command "python -m engine evaluate ..." --threads-per-run 1 --out bench/experiments/pacd_mnist/results/x.json

The two directories of a pair must certify the same test images (the same --images and target class), or
the interval is refused with the files named.
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

from engine.evaluate import pair_evaluations  # noqa: E402


def _parse_pair(text: str) -> tuple[str, Path, Path]:
    label, sep, dirs = text.partition("=")
    parts = dirs.split(",")
    if not sep or not label or len(parts) != 2 or not all(parts):
        raise SystemExit(f"error: --pair takes LABEL=CLEAN_DIR,POISONED_DIR, got {text!r}")
    return label, Path(parts[0]), Path(parts[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", action="append", required=True, help="LABEL=CLEAN_DIR,POISONED_DIR (repeatable)")
    p.add_argument("--what", required=True, help="what was evaluated (poison, victims, certification)")
    p.add_argument("--command", action="append", default=[], help="a command that produced the directories")
    p.add_argument("--threads-per-run", type=int, default=None, help="torch threads each evaluation ran with")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    pairs = [_parse_pair(t) for t in args.pair]
    labels = [label for label, _, _ in pairs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"error: --pair labels repeat: {labels}")
    try:
        results = {label: pair_evaluations(c, b) for label, c, b in pairs}
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    device = device_name(torch.device("cpu")).rsplit(",", 1)[0]
    report = {"what": args.what, "commands": args.command, "date": time.strftime("%Y-%m-%d"), "device": device,
              "threads_per_run": args.threads_per_run, "git_commit": git_commit(), "torch": torch.__version__,
              "interval": "paired 95% bootstrap over the certified images (engine.evaluate.acr_drop_interval)",
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for label, r in results.items():
        lo, hi = r["acr_drop_interval_95"]
        print(f"| {label} | {r['acr_clean']:.4f} -> {r['acr_poisoned']:.4f} | {100 * r['acr_drop']:.1f}% "
              f"({100 * lo:.1f}-{100 * hi:.1f}) | {r['clean']['images']} images, n {r['clean']['n']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
