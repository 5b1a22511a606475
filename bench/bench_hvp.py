"""Hessian-vector products and the mixed term: fused R-operator op against torch.func and double backward.

For each model and provider: milliseconds per H v (``engine.hvp``: loss, gradient and H v) and per
mixed term (``engine.mixed_vjp``), the speed-up over torch.func, and the peak memory of one call.
Models: LeNet (MNIST, batch 1000) and a sequential stand-in of ResNet-20 (19 3x3 convolutions with
ResNet-20's widths 16-32-64 and strides, each followed by BatchNorm in eval mode and ReLU, then average
pooling and a linear layer; ResNet itself is not sequential). float32.

Memory: on CUDA, torch.cuda.max_memory_allocated() during the call minus the memory allocated before it.
On CPU, the increase of the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs) over the resident size just before the call, measured after all timings with
glibc switched to mmap every block of 64 KiB or more (mallopt) and its free heap trimmed, so that the
resident size follows the live allocations; the fused op's scratch pool is released first, so its
buffers count. Timings are medians over interleaved repeats (providers take turns), after one
warm-up call each.

    python bench/bench_hvp.py [--quick] [--out bench/results/hvp-<device>.json]
    pytest bench/bench_hvp.py --benchmark-only        (pytest-benchmark, small LeNet batch)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import engine
from engine import extension, hessian, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, device_name, record, resolve_device, sync  # noqa: E402

PROVIDERS = ("fused", "torch_func", "double_backward")


@dataclass(frozen=True)
class Config:
    arch: str
    shape: tuple[int, int, int]
    batch: int
    repeats: int


@dataclass(frozen=True)
class Result:
    arch: str
    provider: str
    batch: int
    dtype: str
    ms_hv: float  # median ms per engine.hvp call (loss, gradient and H v)
    ms_mixed: float  # median ms per engine.mixed_vjp call
    speedup_hv: float  # torch_func ms / this provider's ms
    speedup_mixed: float
    peak_mb_hv: float
    peak_mb_mixed: float
    memory_metric: str
    repeats: int


def resnet20_sequential(num_classes: int = 10) -> nn.Sequential:
    """Sequential stand-in of ResNet-20 for (B, 3, 32, 32): 19 conv3x3-BN-ReLU, widths 16/32/64, strides 1/2/2."""
    layers: list[nn.Module] = [models.Normalize(models.CIFAR10_MEAN, models.CIFAR10_STD)]
    c_in = 3
    for c_out, n, stride in ((16, 7, 1), (32, 6, 2), (64, 6, 2)):
        for i in range(n):
            layers += [nn.Conv2d(c_in, c_out, 3, stride if i == 0 else 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
    layers += [nn.AvgPool2d(8), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build(arch: str) -> nn.Module:
    if arch == "lenet":
        return models.lenet_mnist()
    if arch == "resnet20seq":
        model = resnet20_sequential()
        for m in model.modules():  # running statistics of a trained-like network
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        return model
    raise ValueError(f"unknown arch {arch!r}")


# -- memory -----------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_libc = None


def _glibc_follow_live_memory():
    """glibc: mmap (and unmap on free) every block >= 64 KiB and return the free heap; None if not glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD (also stops its dynamic adjustment)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
    return _libc


def peak_memory_mb(fn, device: torch.device) -> tuple[float, str]:
    """Peak extra memory of one call of fn (MB) and what was measured. Call after the timings (CPU: changes malloc)."""
    hessian.release_workspace()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated - allocated before"
    if not _glibc_follow_live_memory():
        return float("nan"), "unavailable (not glibc)"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return float("nan"), "unavailable (cannot reset VmHWM)"
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024, "cpu peak RSS (VmHWM) - RSS before the call, glibc mmap threshold 64 KiB"


# -- run ----------------------------------------------------------------------------------------------------------


def run(cfg: Config, device: torch.device, providers=PROVIDERS, time_one=None) -> list[Result]:
    """``time_one(fn)``: seconds of one call (e.g. ``common.time_once``: CUDA events); default: the wall clock, the
    device synchronised."""
    torch.manual_seed(0)
    model = build(cfg.arch).to(device).eval()
    x = torch.rand((cfg.batch,) + cfg.shape, device=device)
    y = torch.randint(0, 10, (cfg.batch,), device=device)
    v = [torch.randn_like(p) for p in model.parameters()]
    calls = {}
    for p in providers:
        if p == "fused" and not hessian.fused_support(model, x)[0]:
            print(f"  skipping fused: {hessian.fused_support(model, x)[1]}")
            continue
        calls[(p, "hv")] = lambda p=p: engine.hvp(model, x, y, v, backend=p)
        calls[(p, "mixed")] = lambda p=p: engine.mixed_vjp(model, x, y, v, backend=p)
    for fn in calls.values():  # warm-up (allocator, thread pools, oneDNN primitives)
        fn()
    times = {k: [] for k in calls}
    for _ in range(cfg.repeats):  # interleaved, so that a noisy machine affects every provider alike
        for k, fn in calls.items():
            if time_one is not None:
                times[k].append(time_one(fn))
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * float(np.median(t)) for k, t in times.items()}
    mem = {k: peak_memory_mb(fn, device) for k, fn in calls.items()}
    base_hv, base_mixed = ms.get(("torch_func", "hv"), float("nan")), ms.get(("torch_func", "mixed"), float("nan"))
    out = []
    for p in providers:
        if (p, "hv") not in calls:
            continue
        out.append(Result(cfg.arch, p, cfg.batch, "float32", ms[(p, "hv")], ms[(p, "mixed")], base_hv / ms[(p, "hv")],
                          base_mixed / ms[(p, "mixed")], mem[(p, "hv")][0], mem[(p, "mixed")][0], mem[(p, "hv")][1],
                          cfg.repeats))
    return out


def configs(device: torch.device, quick: bool) -> list[Config]:
    if device.type == "cuda":
        return [Config("lenet", (1, 28, 28), 1000, 20), Config("resnet20seq", (3, 32, 32), 200, 20)]
    if quick:
        return [Config("lenet", (1, 28, 28), 250, 2), Config("resnet20seq", (3, 32, 32), 32, 2)]
    return [Config("lenet", (1, 28, 28), 1000, 5), Config("resnet20seq", (3, 32, 32), 200, 3)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small batches (smoke test)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--archs", default="lenet,resnet20seq")
    parser.add_argument("--out", default=None, help="JSON file to append the results to")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    providers = tuple(args.providers.split(","))
    print(f"device: {device_name(device)}; torch {torch.__version__}; extension {extension.available()}")
    head = ("arch", "provider", "batch", "ms/hv", "ms/mixed", "x hv", "x mixed", "MB hv", "MB mixed")
    print("{:12s} {:16s} {:>6s} {:>9s} {:>9s} {:>7s} {:>8s} {:>8s} {:>8s}".format(*head))
    results = []
    for cfg in configs(device, args.quick):
        if cfg.arch not in args.archs.split(","):
            continue
        for r in run(cfg, device, providers):
            results.append(r)
            print(f"{r.arch:12s} {r.provider:16s} {r.batch:6d} {r.ms_hv:9.1f} {r.ms_mixed:9.1f} {r.speedup_hv:6.2f}x "
                  f"{r.speedup_mixed:7.2f}x {r.peak_mb_hv:8.1f} {r.peak_mb_mixed:8.1f}", flush=True)
    if results:
        print(f"speed-up: torch.func time / provider time; memory: {results[0].memory_metric}")
    rec = record("hvp", device, [asdict(r) for r in results], argv)
    if args.out:
        print(f"appended to {append_json(args.out, rec)}")
    return 0


# -- pytest-benchmark ------------------------------------------------------------------------------------------


def _lenet_case(batch: int = 100):
    torch.manual_seed(0)
    model = models.lenet_mnist().eval()
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    return model, x, y, [torch.randn_like(p) for p in model.parameters()]


def test_bench_hvp_fused_lenet(benchmark):
    model, x, y, v = _lenet_case()
    res = benchmark(lambda: engine.hvp(model, x, y, v))
    assert len(res.hv) == len(v)


def test_bench_hvp_torch_func_lenet(benchmark):
    model, x, y, v = _lenet_case()
    res = benchmark(lambda: engine.hvp(model, x, y, v, backend="torch_func"))
    assert len(res.hv) == len(v)


if __name__ == "__main__":
    sys.exit(main())
