"""How to spend two cores on the study's crafting: two poisons side by side (one process each) or one poison
data-parallel (torchrun, two processes). Measured on the real crafting runs, whose steps count toward the poisons.

Protocol (fixed before running; written into the output with the results): the blocks of --schedule run one after
the other, each --block seconds, on an otherwise idle machine (nothing else started meanwhile). A block starts its
processes (``pair:A+B``: ``pacd_controls.py --stage craft --only A`` and ``--only B``, one thread each; ``dp:A``:
the same under ``torchrun --nproc-per-node=2``, one thread per rank), and when its time is up stops each process
right after its next checkpoint (written every 10 outer steps), so that no step is lost. A process's step times are
read from its progress bar (1 s resolution); its first step (start-up, warm-up) is left out. The figure of a
procedure in a mode is its cost in core-seconds per outer step: the mean seconds per step times the cores the
process holds (1 for a process of a pair, 2 for a data-parallel run), averaged over the blocks that ran it. The mode
with the lower cost per procedure crafts the rest. Every block run is reported.

    python bench/experiments/pacd_controls/crafting_modes.py --schedule dp:smoothadv,pair:gaussian+smoothadv,dp:gaussian
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pacd_controls import checkpoint_path, poison_path  # the driver beside this script

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "pacd_controls.py"
BAR = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def step_times(log: Path) -> list[tuple[int, float]]:
    """(step, elapsed seconds) at which the progress bar first showed each step count."""
    seen: dict[int, float] = {}
    for m in BAR.finditer(log.read_text(errors="replace")):
        step = int(m.group(1))
        elapsed = int(m.group(3) or 0) * 3600 + int(m.group(4)) * 60 + int(m.group(5))
        seen.setdefault(step, float(elapsed))
    return sorted(seen.items())


def current_poison(work: Path, proc: str, protocol: dict) -> Path | None:
    """The checkpoint ``--only proc`` resumes: its first eps without a finished poison."""
    for eps in protocol["crafting"]["eps"][proc]:
        out = poison_path(argparse.Namespace(work=work), proc, eps, "crafted")
        if not out.exists():
            return checkpoint_path(out)
    return None


def parse_mode(mode: str, protocol: dict) -> tuple[str, list[str]]:
    """("pair" or "dp", its procedures) of one --schedule entry; SystemExit naming a bad one."""
    kind, _, procs = mode.partition(":")
    procs = procs.split("+")
    if kind not in ("pair", "dp") or (kind == "pair") != (len(procs) == 2) or any(p not in protocol["crafting"]["eps"]
                                                                                  for p in procs):
        raise SystemExit(f"--schedule: {mode!r} is not pair:A+B or dp:A (A, B among {list(protocol['crafting']['eps'])})")
    return kind, procs


def run_block(index: int, mode: str, seconds: float, args, protocol: dict) -> dict:
    kind, procs = parse_mode(mode, protocol)
    common = ["--stage", "craft", "--data-root", str(args.data_root), "--work", str(args.work), "--threads", "1"]
    logs_dir = args.work / "modes"
    logs_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for proc in procs:
        ckpt = current_poison(args.work, proc, protocol)
        if ckpt is None:
            raise SystemExit(f"{proc}: every poison is crafted")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
                    if kind == "dp" else [sys.executable])
        log = logs_dir / f"{index:02d}-{mode.replace(':', '-').replace('+', '-')}-{proc}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as fh:
            p = subprocess.Popen([*launcher, str(DRIVER), *common, "--only", proc], stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        running.append({"proc": proc, "popen": p, "log": log, "ckpt": ckpt,
                        "cores": 2 if kind == "dp" else 1})
    start = time.time()
    print(f"block {index} {mode}: started {time.strftime('%H:%M:%S', time.gmtime(start))} UTC", flush=True)
    time.sleep(seconds)
    marks = {r["proc"]: r["ckpt"].stat().st_mtime if r["ckpt"].exists() else 0.0 for r in running}
    deadline = time.time() + 600
    pending = list(running)
    while pending:  # stop each right after its next checkpoint
        for r in list(pending):
            now = r["ckpt"].stat().st_mtime if r["ckpt"].exists() else 0.0
            if now != marks[r["proc"]] or r["popen"].poll() is not None or time.time() > deadline:
                time.sleep(1.0)  # the checkpoint's rename is done; the step after it has barely begun
                if r["popen"].poll() is None:
                    os.killpg(r["popen"].pid, signal.SIGTERM)
                r["popen"].wait()
                pending.remove(r)
        time.sleep(0.2)
    out = {"block": index, "mode": mode, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(start)),
           "processes": []}
    for r in running:
        times = step_times(r["log"])
        durations = [b[1] - a[1] for a, b in zip(times, times[1:]) if b[0] == a[0] + 1][1:]  # first step left out
        mean = sum(durations) / len(durations) if durations else None
        out["processes"].append({
            "procedure": r["proc"], "poison": r["ckpt"].name.removesuffix(".ckpt"), "cores": r["cores"],
            "steps": [times[0][0], times[-1][0]] if times else None, "steps_timed": len(durations),
            "seconds_per_step": mean, "core_seconds_per_step": None if mean is None else mean * r["cores"],
            "log": str(r["log"])})
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedule", required=True, help="comma-separated blocks: pair:A+B or dp:A")
    p.add_argument("--block", type=float, default=480.0, help="seconds per block (then until the next checkpoint)")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--work", type=Path, default=Path("runs/pacd_controls"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "crafting_modes.json")
    args = p.parse_args(argv)
    protocol = json.loads((HERE / "results" / "protocol.json").read_text())
    for mode in args.schedule.split(","):  # every block checked before the protocol is written
        parse_mode(mode, protocol)
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists (the blocks of an earlier run): pass another --out")
    from engine.results import run_trace

    record = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "),
              "command": "python bench/experiments/pacd_controls/crafting_modes.py " + " ".join(argv or sys.argv[1:]),
              "schedule": args.schedule.split(","), "block_seconds": args.block, "trace": run_trace(), "blocks": []}
    args.out.write_text(json.dumps(record, indent=1) + "\n")  # the protocol, before any block runs
    for i, mode in enumerate(record["schedule"]):
        record["blocks"].append(run_block(i, mode, args.block, args, protocol))
        costs: dict = {}
        for block in record["blocks"]:
            kind = block["mode"].split(":")[0]
            for proc in block["processes"]:
                if proc["core_seconds_per_step"] is not None:
                    costs.setdefault(proc["procedure"], {}).setdefault(kind, []).append(proc["core_seconds_per_step"])
        record["cost_core_seconds_per_step"] = {proc: {k: sum(v) / len(v) for k, v in by.items()}
                                                for proc, by in costs.items()}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["cost_core_seconds_per_step"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
