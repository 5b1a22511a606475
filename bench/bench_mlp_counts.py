"""Fully fused MLP sampler (noise + 3 layers + counting in one kernel) against the unfused path.

Model: engine.models.mlp_mnist (784-1024-1024-10). ``torch`` = extension noise op + PyTorch model
+ argmax + index_add_ (fp32, or bf16 autocast); ``triton-*`` = kernels/mlp_counts. Items: noisy
samples counted per call.

    python bench/bench_mlp_counts.py [--quick] [--out bench/results/mlp_counts-<device>.json]
"""

from __future__ import annotations

import sys

import torch
from engine.kernels import class_counts as cc
from engine.kernels import mlp_counts as mc
from kernel_bench import bench_main, triton_ok

from engine import models, noise
from engine.accel import numerics


def cases(device, quick):
    torch.manual_seed(0)
    model = models.mlp_mnist().to(device).eval()
    num = (32768 if device.type == "cuda" else 2048) // (4 if quick else 1)
    images = 2
    x = torch.rand(images, 1, 28, 28, device=device)
    ids = torch.arange(images, device=device)
    rows = torch.arange(images * num, device=device)
    ri, rs = rows // num, rows % num
    key = dict(seed=3, stream=1, sigma=0.25)
    cfg = f"mlp_mnist R={images * num}"

    def unfused(precision):
        def fn():
            with torch.inference_mode(), numerics(device, precision):
                batch = noise.noisy_batch(x, ri, rs, ids, **key)
                return cc.class_counts_ref(model(batch).float(), ri, images)

        return fn

    yield cfg, "torch-fp32", unfused("fp32"), images * num, 0, "noise op + model + index_add"
    yield cfg, "torch-bf16", unfused("bf16"), images * num, 0, "autocast"
    for prec in ("fp32", "tf32", "bf16"):
        if triton_ok(device):
            params = mc.mlp_params(model, (1, 28, 28), prec, device)
            flat = x.reshape(images, -1).contiguous()

            def fused(p=params):
                counts = torch.zeros(images * 10, dtype=torch.int64, device=device)
                bad = torch.zeros(1, dtype=torch.int32, device=device)
                mc.launch_mlp_counts(p, flat, ids, counts, bad, start=0, rows=images * num, num=num, total=images * num,
                                     **key)
                return counts

            yield cfg, f"triton-{prec}", fused, images * num, 0, "one kernel"
        else:
            yield cfg, f"triton-{prec}", None, images * num, 0, "Triton needs CUDA"


if __name__ == "__main__":
    sys.exit(bench_main("mlp_counts", __doc__, cases))
