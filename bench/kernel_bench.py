"""Skeleton shared by the kernel benchmarks (bench_noisy_batch, bench_class_counts, bench_mlp_counts,
bench_noisy_conv_pool): provider timing, a printed table with a speed-up column, JSON records.

GPU timings use ``triton.testing.do_bench`` (median over repeats after warm-up, L2 flushed); CPU
timings the median of ``common.time_call``. Triton providers need CUDA: on a CPU they are listed
as skipped (the interpreter is a test vehicle, not something to time).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, device_name, record, resolve_device, time_call  # noqa: E402

__all__ = ["Row", "bench_main", "median_ms"]


@dataclass
class Row:
    config: str
    provider: str
    ms: float
    items: int  # samples (rows) processed per call
    items_per_s: float
    gbytes_per_s: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def median_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    return 1e3 * time_call(fn, device, repeats=5, warmup=1)


def bench_main(name: str, doc: str, cases: Callable, argv=None) -> int:
    """Parse ``--device --quick --out``; ``cases(device, quick)`` yields (config, provider, fn, items, bytes, note)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file to append the results to")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    print(f"{name} on {device_name(device)}; torch {torch.__version__}")
    print(f"{'config':34s} {'provider':18s} {'ms':>10s} {'items/s':>14s} {'GB/s':>8s} {'speed-up':>9s}  note")
    rows: list[Row] = []
    base: dict[str, float] = {}
    for config, provider, fn, items, nbytes, note in cases(device, args.quick):
        if fn is None:
            print(f"{config:34s} {provider:18s} {'-':>10s} {'-':>14s} {'-':>8s} {'-':>9s}  skipped: {note}")
            rows.append(Row(config, provider, float("nan"), items, float("nan"), note=f"skipped: {note}"))
            continue
        ms = median_ms(fn, device)
        row = Row(config, provider, ms, items, items / (ms / 1e3), nbytes / (ms / 1e6) / 1e9 if nbytes else 0.0, note)
        rows.append(row)
        base.setdefault(config, ms)
        print(f"{config:34s} {provider:18s} {ms:10.3f} {row.items_per_s:14,.0f} {row.gbytes_per_s:8.1f} "
              f"{base[config] / ms:8.2f}x  {note}", flush=True)
    rec = record(name, device, [asdict(r) for r in rows], argv)
    if args.out:
        print(f"appended to {append_json(args.out, rec)}")
    return 0


def triton_ok(device: torch.device) -> bool:
    return device.type == "cuda"
