"""Shared pieces of the benchmark scripts: device description, timing, JSON records."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["device_name", "resolve_device", "sync", "time_call", "time_once", "time_events", "record", "append_json"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_once(fn, device: torch.device) -> float:
    """Seconds of one ``fn()``: on CUDA between two CUDA events recorded around it (the device idle before the
    first, the second waited for), elsewhere the wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_events(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones (``time_once``: CUDA events)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [time_once(fn, device) for _ in range(repeats)]


def record(benchmark: str, device: torch.device, results: list[dict], argv=None) -> dict:
    """A JSON record: benchmark name, device, versions, UTC date, the command and the results."""
    import engine
    from engine import extension

    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "torch": torch.__version__,
        "engine": engine.__version__,
        "extension": extension.available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", Path(sys.argv[0]).as_posix()] + args),
        "git_commit": git_commit(),
        "results": results,
    }


def git_commit() -> str | None:
    """The commit of the checkout the benchmark runs from (with "+dirty" for local changes), or None."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def append_json(path: str | Path, rec: dict) -> Path:
    """Append ``rec`` to the JSON list in ``path`` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    existing.append(rec)
    path.write_text(json.dumps(existing, indent=1) + "\n")
    return path
