"""Noisy forward batch: Triton kernel vs the C++/CUDA op vs the plain-PyTorch reference vs randn_like.

Writes R noisy rows (clean image replicated + sigma * keyed noise, cast) for CIFAR- and MNIST-sized
images. ``randn_like`` (x[rows] + sigma * torch.randn_like, unkeyed) is the plain loop's cost.
GB/s counts the bytes written.

    python bench/bench_noisy_batch.py [--quick] [--out bench/results/noisy_batch-<device>.json]
"""

from __future__ import annotations

import sys

import torch
from engine.kernels import noisy_batch as nb
from kernel_bench import bench_main, triton_ok

from engine import extension, noise


def cases(device, quick):
    gpu = device.type == "cuda"
    rows_cifar, rows_mnist = (65536, 65536) if gpu else (512, 2048)
    if quick:
        rows_cifar, rows_mnist = rows_cifar // 4, rows_mnist // 4
    for shape, rows in (((3, 32, 32), rows_cifar), ((1, 28, 28), rows_mnist)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.rand((4,) + shape, device=device)
            ids = torch.arange(4, device=device)
            ri = torch.arange(rows, device=device) // (rows // 4)
            rs = torch.arange(rows, device=device) % (rows // 4)
            kw = dict(seed=1, stream=1, sigma=0.25, dtype=dtype)
            nbytes = rows * x[0].numel() * torch.empty(0, dtype=dtype).element_size()
            cfg = f"{'x'.join(map(str, shape))} R={rows} {str(dtype)[6:]}"
            yield cfg, "torch_ref", lambda: noise.noisy_batch_ref(x, ri, rs, ids, **kw), rows, nbytes, ""
            has_cpp = extension.available() and (not gpu or extension.has_cuda_ops())
            yield cfg, "cpp", (lambda: noise.noisy_batch(x, ri, rs, ids, backend="cpp", **kw)) if has_cpp else None, rows, \
                nbytes, "" if has_cpp else "extension op not built for this device"
            if triton_ok(device):
                out = torch.empty((rows,) + shape, dtype=dtype, device=device)
                yield cfg, "triton", lambda: nb.noisy_batch(x, ri, rs, ids, out=out, **kw), rows, nbytes, ""
                flat = x.reshape(4, -1)
                yield cfg, "triton_packed", lambda: nb.launch_noisy_batch(
                    flat, ids, out.view(rows, -1), packed=(0, rows // 4, rows), seed=1, stream=1, sigma=0.25
                ), rows, nbytes, "no index tensors"
            else:
                yield cfg, "triton", None, rows, nbytes, "Triton needs CUDA"
            yield cfg, "randn_like", lambda: (x[ri] + 0.25 * torch.randn_like(x[ri])).to(dtype), rows, nbytes, "unkeyed"


if __name__ == "__main__":
    sys.exit(bench_main("noisy_batch", __doc__, cases))
