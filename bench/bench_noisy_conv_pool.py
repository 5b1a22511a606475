"""LeNet's first layer from in-kernel noise (noise -> Normalize -> conv 5x5 -> ReLU -> maxpool 2)
against the unfused path (noise op writes the batch; PyTorch conv, ReLU, pool).

Items: noisy samples per call. The fused kernel never writes the noisy input.

    python bench/bench_noisy_conv_pool.py [--quick] [--out bench/results/noisy_conv_pool-<device>.json]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from engine.kernels import noisy_conv_pool as ncp
from kernel_bench import bench_main, triton_ok

from engine import models, noise
from engine.accel import numerics


def cases(device, quick):
    torch.manual_seed(0)
    model = models.lenet_mnist().to(device).eval()
    norm, conv = model[0], model[1]
    rows = (65536 if device.type == "cuda" else 2048) // (4 if quick else 1)
    images, num = 2, rows // 2
    x = torch.rand(images, 1, 28, 28, device=device)
    ids = torch.arange(images, device=device)
    q = torch.arange(rows, device=device)
    ri, rs = q // num, q % num
    key = dict(seed=3, stream=1, sigma=0.25)
    cfg = f"lenet conv1+relu+pool R={rows}"
    if device.type == "cuda":
        conv_cl = torch.nn.Conv2d(1, 20, 5).to(device).to(memory_format=torch.channels_last)
        conv_cl.load_state_dict(conv.state_dict())
    else:
        conv_cl = conv

    def unfused(precision):
        def fn():
            with torch.inference_mode(), numerics(device, precision):
                batch = noise.noisy_batch(x, ri, rs, ids, **key)
                return F.max_pool2d(F.relu(conv_cl(norm(batch))), 2)

        return fn

    yield cfg, "torch-fp32", unfused("fp32"), rows, 0, "noise op + conv/relu/pool"
    yield cfg, "torch-bf16", unfused("bf16"), rows, 0, "autocast"
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if triton_ok(device):
            params = ncp.conv_pool_params(model, (1, 28, 28), prec, device)
            out = ncp.empty_output(params, rows, dtype, device)
            flat = x.reshape(images, -1).contiguous()

            def fused(p=params, o=out):
                return ncp.launch_noisy_conv_pool(p, flat, ids, o, start=0, rows=rows, num=num, total=rows, **key)

            yield cfg, f"triton-{prec}", fused, rows, 0, "noise in-kernel"
        else:
            yield cfg, f"triton-{prec}", None, rows, 0, "Triton needs CUDA"


if __name__ == "__main__":
    sys.exit(bench_main("noisy_conv_pool", __doc__, cases))
