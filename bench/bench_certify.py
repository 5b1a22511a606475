"""Certification throughput: engine.certify against a plain loop as commonly written.

Providers:
- ``plain_loop``: Cohen et al.'s sampler: per batch, replicate the image, ``torch.randn_like`` noise,
  fp32 forward, argmax, counting on the host (one image at a time).
- ``engine``: ``engine.certify`` with its defaults (backend "auto", precision "auto": on CPU the
  C++ noise op + channels-last fp32; on CUDA the Triton backend in bf16).
- ``engine-torch``: backend "torch" (plain PyTorch, reference noise, fp32).
- ``engine-triton``: backend "triton" (fused kernels / CUDA graphs; CUDA only), default precision.
- ``engine-triton-fp32``, ``engine-bf16`` (auto backend in bf16; the CPU opt-in), ``engine-cpp``.

Reported: samples/s, seconds per image at the measured n, projected seconds per image at
n0 + n = 100,100, and the ratio of that to the device's FLOP floor: 2 * MACs * 100,100 divided by
a peak rate. Two peaks are given: the rate of a large matmul measured in the same run (fp32 and
bf16), and on GPUs the datasheet peak of the device's dense tensor cores (H100 SXM: 989 TFLOP/s
bf16, 67 TFLOP/s fp32 non-tensor; NVIDIA H100 datasheet), matched by name.

    python bench/bench_certify.py [--quick] [--out bench/results/certify-<device>.json]
    pytest bench/bench_certify.py --benchmark-only        (pytest-benchmark, LeNet only)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import engine
from engine import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, device_name, record, resolve_device, sync  # noqa: E402

N_FULL = 100_100  # n0 + n of the literature's certification


@dataclass(frozen=True)
class Config:
    arch: str
    shape: tuple[int, int, int]
    n: int  # estimation samples per image in this benchmark
    batch_size: int
    images: int = 2


@dataclass(frozen=True)
class Result:
    arch: str
    provider: str
    n0: int
    n: int
    batch_size: int
    images: int
    samples_per_s: float
    s_per_image: float
    projected_s_per_image_100k: float
    macs_per_sample: int
    precision: str = ""
    path: str = ""  # sampler kind the engine chose (loop / mlp / conv_pool / generic)
    floor_s_per_image_measured: float = 0.0  # 2 * MACs * 100,100 / measured matmul rate of that precision
    ratio_to_measured_floor: float = 0.0
    floor_s_per_image_datasheet: float = 0.0  # same with the datasheet peak (GPUs we know), else 0
    ratio_to_datasheet_floor: float = 0.0


# Dense peak FLOP/s from NVIDIA datasheets (no sparsity): name fragment -> {precision: FLOP/s}.
DATASHEET_PEAKS = {
    "H100 80GB HBM3": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},  # H100 SXM5
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 51.2e12, "tf32": 378e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},
}

PROVIDERS = {  # name -> (backend, precision); "-compile": ENGINE_TORCH_COMPILE=1 (experimental),
    # "-generic": ENGINE_FUSED=0 (CUDA graph of the model instead of the fused MLP / first-layer kernels;
    # on the CPU oneDNN's convolution, pool and ReLU instead of the fused engine::conv_pool_relu stages)
    "engine": ("auto", "auto"),
    "engine-generic": ("auto", "auto"),
    "engine-triton-compile": ("triton", "auto"),
    "engine-triton-generic": ("triton", "auto"),
    "engine-torch": ("torch", "fp32"),
    "engine-cpp": ("cpp", "fp32"),
    "engine-triton": ("triton", "auto"),
    "engine-triton-fp32": ("triton", "fp32"),
    "engine-bf16": ("auto", "bf16"),
}


def measured_peaks(device: torch.device) -> dict[str, float]:
    """FLOP/s of a large square matmul in fp32 and bf16 on ``device`` (median of a few runs)."""
    from common import time_call

    size = 8192 if device.type == "cuda" else 1536
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        if device.type == "cuda" and dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = False
        t = time_call(lambda: a @ b, device, repeats=5, warmup=2)
        peaks[name] = 2 * size**3 / t
    return peaks


def datasheet_peaks(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in DATASHEET_PEAKS.items():
        if fragment in name:
            return peaks
    return {}


def plain_loop_certify(model, x, sigma, n0, n, batch_size, num_classes=10):
    """Cohen et al.'s loop: randn_like noise per batch, fp32 forward, argmax, host-side counting."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            img = x[i : i + 1].to(device)
            all_counts = []
            for num in (n0, n):
                counts = np.zeros(num_classes, dtype=np.int64)
                remaining = num
                while remaining > 0:
                    b = min(batch_size, remaining)
                    remaining -= b
                    batch = img.repeat((b, 1, 1, 1))
                    noise = torch.randn_like(batch) * sigma
                    pred = model(batch + noise).argmax(1)
                    counts += np.bincount(pred.cpu().numpy(), minlength=num_classes)
                all_counts.append(counts)
            out.append(all_counts)
    return out


def run(
    cfg: Config,
    provider: str,
    device: torch.device,
    sigma: float = 0.25,
    n0: int = 100,
    repeats: int = 1,
    peaks: dict | None = None,
    sheet: dict | None = None,
    timer=None,
) -> Result:
    """``timer(fn)``: seconds of the timed calls of ``fn`` (e.g. ``common.time_events``: CUDA events); default: the
    wall clock around ``repeats`` calls, the device synchronised."""
    torch.manual_seed(0)
    model = models.build(cfg.arch).to(device).eval()
    x = torch.rand((cfg.images,) + cfg.shape, device=device)
    macs = models.count_macs(model, cfg.shape)
    backend, precision = PROVIDERS.get(provider, ("", "fp32"))
    resolved = "fp32" if provider == "plain_loop" else engine.accel.resolve_precision(precision, device, backend)

    os.environ["ENGINE_TORCH_COMPILE"] = "1" if provider.endswith("-compile") else "0"
    os.environ["ENGINE_FUSED"] = "0" if provider.endswith("-generic") else "1"
    engine.accel.clear_cache()

    def once():
        if provider == "plain_loop":
            plain_loop_certify(model, x, sigma, n0, cfg.n, cfg.batch_size)
        else:
            engine.certify(model, x, sigma=sigma, n0=n0, n=cfg.n, batch_size=cfg.batch_size, seed=0, backend=backend,
                           precision=precision)

    # warm-up on a small run (allocator, kernels, thread pools; Triton compilation and CUDA graph
    # capture, which the engine caches for the same model)
    small = Config(cfg.arch, cfg.shape, min(cfg.n, 2 * cfg.batch_size), cfg.batch_size, 1)
    if provider == "plain_loop":
        plain_loop_certify(model, x[:1], sigma, n0, small.n, cfg.batch_size)
    else:
        engine.certify(model, x[:1], sigma=sigma, n0=n0, n=small.n, batch_size=cfg.batch_size, backend=backend,
                       precision=precision)
    if provider == "plain_loop":
        path = "plain"
    elif backend == "triton" or (backend == "auto" and device.type == "cuda"):
        path = engine.accel.cached_samplers()[-1].kind  # the sampler the warm-up built (and the timed run reuses)
    else:
        path = "loop"
    times = [] if timer is None else timer(once)
    for _ in range(repeats if timer is None else 0):
        sync(device)
        t0 = time.perf_counter()
        once()
        sync(device)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    samples = cfg.images * (n0 + cfg.n)
    rate = samples / t
    projected = N_FULL / rate
    flops = 2.0 * macs * N_FULL
    peak_key = "bf16" if resolved in ("bf16", "fp16") else "fp32"
    floor_m = flops / (peaks or {}).get(peak_key, float("inf"))
    floor_d = flops / (sheet or {}).get(peak_key, float("inf"))
    return Result(
        cfg.arch, provider, n0, cfg.n, cfg.batch_size, cfg.images, rate, t / cfg.images, projected, macs, resolved, path,
        floor_m, projected / floor_m if floor_m else 0.0, floor_d, projected / floor_d if floor_d else 0.0,
    )  # fmt: skip


def configs(device: torch.device, quick: bool) -> list[Config]:
    if device.type == "cuda":
        return [
            Config("lenet", (1, 28, 28), 100_000, 20_000),
            Config("mlp", (1, 28, 28), 100_000, 20_000),
            Config("resnet20", (3, 32, 32), 100_000, 4_000),
            Config("resnet110", (3, 32, 32), 100_000, 1_000),
        ]
    scale = 0.25 if quick else 1.0
    return [
        Config("lenet", (1, 28, 28), int(20_000 * scale), 334),
        Config("mlp", (1, 28, 28), int(20_000 * scale), 334),
        Config("resnet20", (3, 32, 32), int(2_000 * scale), 85),
        Config("resnet110", (3, 32, 32), int(400 * scale), 85, images=1),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller n (smoke test)")
    parser.add_argument("--providers", default=None, help="comma-separated (default: every provider the device runs)")
    parser.add_argument("--archs", default="lenet,mlp,resnet20,resnet110")
    parser.add_argument("--out", default=None, help="JSON file to append the results to")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per provider (median)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = resolve_device(args.device)
    if args.providers:
        providers = args.providers.split(",")
    elif device.type == "cuda":
        providers = ["plain_loop", "engine", "engine-torch", "engine-triton", "engine-triton-fp32", "engine-triton-generic",
                     "engine-triton-compile"]
    else:  # the Triton backend needs CUDA (the CPU interpreter is a test vehicle, not a provider)
        providers = ["plain_loop", "engine", "engine-torch", "engine-bf16"]
    peaks, sheet = measured_peaks(device), datasheet_peaks(device)
    results = []
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print("peak FLOP/s measured (matmul): " + ", ".join(f"{k} {v / 1e12:.3g} T" for k, v in peaks.items())
          + ("; datasheet: " + ", ".join(f"{k} {v / 1e12:.4g} T" for k, v in sheet.items()) if sheet else ""))
    head = ("arch", "provider", "prec", "path", "n", "batch", "samples/s", "s/image", "s/img@1e5", "xfloor", "speed-up")
    print("{:10s} {:19s} {:5s} {:9s} {:>7s} {:>6s} {:>11s} {:>9s} {:>10s} {:>8s} {:>9s}".format(*head))
    for cfg in configs(device, args.quick):
        if cfg.arch not in args.archs.split(","):
            continue
        base = None
        for provider in providers:
            try:
                r = run(cfg, provider, device, peaks=peaks, sheet=sheet, repeats=args.repeats)
            except Exception as exc:  # report and go on with the other providers
                print(f"{cfg.arch:10s} {provider:19s} FAILED: {type(exc).__name__}: {exc}", flush=True)
                results.append({"arch": cfg.arch, "provider": provider, "error": f"{type(exc).__name__}: {exc}"})
                continue
            results.append(r)
            base = base or r.samples_per_s
            print(
                f"{r.arch:10s} {r.provider:19s} {r.precision:5s} {r.path:9s} {r.n:7d} {r.batch_size:6d} "
                f"{r.samples_per_s:11,.0f} {r.s_per_image:9.3f} {r.projected_s_per_image_100k:10.3f} "
                f"{r.ratio_to_measured_floor:8.1f} {r.samples_per_s / base:8.2f}x",
                flush=True,
            )
    rec = record("certify", device, [r if isinstance(r, dict) else asdict(r) for r in results], argv)
    rec["peak_flops_measured"] = peaks
    rec["peak_flops_datasheet"] = sheet
    rec["repeats"] = args.repeats
    if load_before is not None:  # other work on the machine (1-, 5-, 15-minute load averages)
        rec["load_average_before_after"] = [load_before, os.getloadavg()]
    if args.out:
        print(f"appended to {append_json(args.out, rec)}")
    return 0


# -- pytest-benchmark ------------------------------------------------------------------------------


def _lenet_inputs():
    torch.manual_seed(0)
    return models.lenet_mnist().eval(), torch.rand(1, 1, 28, 28)


def test_bench_engine_certify_lenet(benchmark):
    model, x = _lenet_inputs()
    res = benchmark(lambda: engine.certify(model, x, sigma=0.25, n0=100, n=2000, batch_size=334))
    assert res.counts_estimation.sum() == 2000


def test_bench_plain_loop_lenet(benchmark):
    model, x = _lenet_inputs()
    out = benchmark(lambda: plain_loop_certify(model, x, 0.25, 100, 2000, 334))
    assert int(out[0][1].sum()) == 2000


if __name__ == "__main__":
    sys.exit(main())
