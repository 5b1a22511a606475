"""Data-parallel PACD crafting: seconds per outer step with 1 and 2 processes (torchrun, gloo, one thread each).

Protocol (fixed before running, written into the results JSON): LeNet, MNIST (--data-root; a tenth of the training
set, at most 5,000 images, held out for validation as bench_poison does), target class 8, Gaussian augmentation,
sigma 0.5, eps 0.1, the paper's batch (900 clean + 100 poison, 100 validation images x k 20), niter1 = niter2 = 10,
ApproxGrad, seed 0, hvp_backend auto (the cached curvature operator). One run of 1 + --steps outer steps per world
size, one after the other on an otherwise idle machine; the figure is the median wall time of the timed steps (the
first step warms up), and the speed-up their ratio. The two runs' poisons must agree up to summation order (the
largest pixel difference is recorded).

    python bench/bench_distributed_poison.py --data-root ../shared/data/mnist [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from engine.results import run_trace

WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from bench_poison import mnist_train_val
from engine import models
from engine.pacd import poison
dist.init_process_group("gloo")
train, val = mnist_train_val(sys.argv[1])
log = []
ps = poison(lambda: models.build("lenet"), train, val, target_class=8, method="gaussian", sigma=0.5, eps=0.1,
            outer_steps=int(sys.argv[2]) + 1, batch_clean=900, batch_poison=100, batch_val=100, k=20, niter1=10,
            niter2=10, seed=0, log=log.append)
if dist.get_rank() == 0:
    torch.save({"images": ps.images, "seconds": [e["seconds"] for e in log], "phases": [e["phases"] for e in log]},
               sys.argv[4])
dist.destroy_process_group()
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--steps", type=int, default=3, help="outer steps timed (after one warm-up step)")
    p.add_argument("--out", type=Path, default=Path("bench/results/distributed-cpu.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_poison-"))
    worker = work / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs, images = {}, {}
    for procs in (1, 2):
        res = work / f"w{procs}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", str(worker),
               str(args.data_root), str(args.steps), str(Path(__file__).resolve().parent), str(res)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-2000:]}")
        got = torch.load(res)
        timed = got["seconds"][1:]
        images[procs] = got["images"]
        runs[procs] = {"seconds_per_step": statistics.median(timed), "steps_timed": timed,
                       "phases_last_step": got["phases"][-1]}
        print(f"{procs} process(es): {statistics.median(timed):.2f} s per outer step", flush=True)
    speedup = runs[1]["seconds_per_step"] / runs[2]["seconds_per_step"]
    diff = (images[1] - images[2]).abs()
    record = {
        "benchmark": "distributed poison", "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": "python bench/bench_distributed_poison.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "trace": run_trace(threads_per_process=1), "runs": runs, "speedup_2_over_1": speedup,
        "max_pixel_difference_2_vs_1": float(diff.max()), "mean_pixel_difference_2_vs_1": float(diff.mean()),
        "fraction_of_pixels_differing_by_more_than": {f"{t:g}": float((diff > t).double().mean())
                                                       for t in (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)},
    }
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    existing.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(existing, indent=1) + "\n")
    print(f"speed-up {speedup:.2f}x; poisons differ by at most {record['max_pixel_difference_2_vs_1']:.2g}; "
          f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
