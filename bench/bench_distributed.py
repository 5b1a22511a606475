"""Certification throughput over torch.distributed ranks: the same torchrun certify command with 1 and 2 processes.

Protocol (fixed before running, written into the results JSON): LeNet (MNIST, the saved weights of --checkpoint or an
untrained one from seed 0: fixed sampling does the same work whatever the weights), the MNIST test images
0, 250, 500, ... (--images of them), n0 100, n 20,000, alpha 0.001, seed 0, fp32, gloo, one thread per process
(OMP_NUM_THREADS=1). Each world size runs once, one after the other, on an otherwise idle machine; the figure is the
wall time of the whole command (process start, certification, rank 0's merge), and the speed-up is the ratio of the
two. The logs of both runs must hold the same rows (checked). Target (issue 32): >= 1.8x with 2 processes. Beside
it, from the same runs: the slowest rank's certification time (the rows' seconds), i.e. without start-up and merge.

    python bench/bench_distributed.py [--images 40] [--out bench/results/distributed-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import models
from engine.results import read_log, run_trace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data-root", default=None, help="MNIST folder (default: the embedded subset)")
    p.add_argument("--out", type=Path, default=Path("bench/results/distributed-cpu.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    ckpt = args.checkpoint
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = work / "lenet.safetensors"
        models.save(models.lenet_mnist(), ckpt, sigma=0.25)
    skip = 250
    base = ["certify", "--checkpoint", str(ckpt), "--dataset", "mnist", "--n0", "100", "--n", str(args.n),
            "--alpha", "0.001", "--seed", "0", "--skip", str(skip), "--max", str(skip * args.images), "--quiet"]
    if args.data_root:
        base += ["--data-root", args.data_root]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = {}
    for procs in (1, 2):
        out = work / f"w{procs}.tsv"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "engine",
               "--", *base, "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-2000:]}")
        summary, rows = read_log(out)
        order = list(range(0, skip * args.images, skip))
        rank_seconds = [sum(rows[i][5] for i in order[r::procs]) for r in range(procs)]  # rank r had order[r::procs]
        runs[procs] = {"wall_seconds": wall, "images": len(rows), "images_per_second": len(rows) / wall,
                       "certify_seconds_in_log": summary["seconds_total"], "certify_seconds_by_rank": rank_seconds,
                       "images_per_second_certifying": len(rows) / max(rank_seconds),
                       "command": "torchrun --standalone --nproc-per-node=%d -m engine -- %s --out OUT" % (procs, " ".join(
                           str(a) for a in base)),
                       "rows": {i: r[:5] for i, r in rows.items()}}
        print(f"{procs} process(es): {wall:.1f} s for {len(rows)} images ({len(rows) / wall:.3f} images/s)", flush=True)
    same = runs[1].pop("rows") == runs[2].pop("rows")
    speedup = runs[1]["wall_seconds"] / runs[2]["wall_seconds"]
    # without start-up and merge: the slowest rank's certification time (rows' seconds), a secondary figure
    speedup_certifying = max(runs[1]["certify_seconds_by_rank"]) / max(runs[2]["certify_seconds_by_rank"])
    record = {
        "benchmark": "distributed certify", "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": "python bench/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "trace": run_trace(threads_per_process=1), "n": args.n, "runs": runs, "same_rows": same,
        "speedup_2_over_1": speedup, "speedup_2_over_1_certifying_only": speedup_certifying, "target": ">= 1.8",
        "met": bool(speedup >= 1.8 and same),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    existing.append(record)
    args.out.write_text(json.dumps(existing, indent=1) + "\n")
    print(f"speed-up {speedup:.2f}x (target >= 1.8; certifying only {speedup_certifying:.2f}x), same rows: {same}; "
          f"appended to {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
