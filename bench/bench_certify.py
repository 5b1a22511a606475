"""Certification throughput: engine.certify against a plain loop as commonly written.

The plain loop is Cohen et al.'s sampler: per batch, replicate the image, ``torch.randn_like`` noise,
fp32 forward, argmax, and counting on the host. Both providers use the same model, n and batch
size. Reported: samples/s, seconds per image at the measured n, and projected seconds per image at
n0 + n = 100,100.

    python bench/bench_certify.py [--quick] [--out bench/results/certify-<device>.json]
    pytest bench/bench_certify.py --benchmark-only        (pytest-benchmark, LeNet only)
"""

from __future__ import annotations

import argparse
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


def run(cfg: Config, provider: str, device: torch.device, sigma: float = 0.25, n0: int = 100, repeats: int = 1) -> Result:
    torch.manual_seed(0)
    model = models.build(cfg.arch).to(device).eval()
    x = torch.rand((cfg.images,) + cfg.shape)
    macs = models.count_macs(model, cfg.shape)

    def once():
        if provider == "plain_loop":
            plain_loop_certify(model, x, sigma, n0, cfg.n, cfg.batch_size)
        else:
            backend = provider.split("-", 1)[1] if "-" in provider else "auto"
            engine.certify(model, x, sigma=sigma, n0=n0, n=cfg.n, batch_size=cfg.batch_size, seed=0, backend=backend)

    # warm-up on a small run (allocator, kernels, thread pools)
    small = Config(cfg.arch, cfg.shape, min(cfg.n, 2 * cfg.batch_size), cfg.batch_size, 1)
    if provider == "plain_loop":
        plain_loop_certify(model, x[:1], sigma, n0, small.n, cfg.batch_size)
    else:
        engine.certify(model, x[:1], sigma=sigma, n0=n0, n=small.n, batch_size=cfg.batch_size)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        once()
        sync(device)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    samples = cfg.images * (n0 + cfg.n)
    rate = samples / t
    return Result(cfg.arch, provider, n0, cfg.n, cfg.batch_size, cfg.images, rate, t / cfg.images, N_FULL / rate, macs)


def configs(device: torch.device, quick: bool) -> list[Config]:
    if device.type == "cuda":
        return [
            Config("lenet", (1, 28, 28), 100_000, 20_000),
            Config("resnet20", (3, 32, 32), 100_000, 4_000),
            Config("resnet110", (3, 32, 32), 100_000, 1_000),
        ]
    scale = 0.25 if quick else 1.0
    return [
        Config("lenet", (1, 28, 28), int(20_000 * scale), 334),
        Config("resnet20", (3, 32, 32), int(2_000 * scale), 85),
        Config("resnet110", (3, 32, 32), int(400 * scale), 85, images=1),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller n (smoke test)")
    parser.add_argument("--providers", default="plain_loop,engine")
    parser.add_argument("--archs", default="lenet,resnet20,resnet110")
    parser.add_argument("--out", default=None, help="JSON file to append the results to")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    providers = args.providers.split(",")
    results = []
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    head = ("arch", "provider", "n", "batch", "samples/s", "s/image", "s/img@1e5", "speed-up")
    print("{:10s} {:14s} {:>7s} {:>6s} {:>11s} {:>9s} {:>10s} {:>9s}".format(*head))
    for cfg in configs(device, args.quick):
        if cfg.arch not in args.archs.split(","):
            continue
        base = None
        for provider in providers:
            r = run(cfg, provider, device)
            results.append(r)
            base = base or r.samples_per_s
            print(
                f"{r.arch:10s} {r.provider:14s} {r.n:7d} {r.batch_size:6d} {r.samples_per_s:11,.0f} {r.s_per_image:9.3f} "
                f"{r.projected_s_per_image_100k:10.2f} {r.samples_per_s / base:8.2f}x",
                flush=True,
            )
    rec = record("certify", device, [asdict(r) for r in results], argv)
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
