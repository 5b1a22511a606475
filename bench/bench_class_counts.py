"""Class counting: logits -> argmax -> per-image histogram, and the last linear layer fused with it.

Providers: ``torch_ref`` (argmax + index_add_ on the device, as engine.smoothing.sample_counts),
``host`` (argmax, copy to the host, bincount: the plain loop), ``triton`` (kernels/class_counts).
``linear``: F.linear + argmax + index_add_ against the fused ``linear_counts`` kernel (logits never
written).

    python bench/bench_class_counts.py [--quick] [--out bench/results/class_counts-<device>.json]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from engine.kernels import class_counts as cc
from kernel_bench import bench_main, triton_ok


def cases(device, quick):
    rows = (262144 if device.type == "cuda" else 65536) // (4 if quick else 1)
    images = 8
    ri = (torch.arange(rows, device=device) * images) // rows
    for classes in (10, 100):
        logits = torch.randn(rows, classes, device=device)
        cfg = f"counts R={rows} K={classes}"
        yield cfg, "torch_ref", lambda: cc.class_counts_ref(logits, ri, images), rows, logits.numel() * 4, ""
        yield cfg, "host", lambda: np.bincount(logits.argmax(1).cpu().numpy(), minlength=classes), rows, 0, "plain loop"
        ok = triton_ok(device)
        yield cfg, "triton", (lambda: cc.class_counts(logits, ri, images)) if ok else None, rows, logits.numel() * 4, \
            "" if ok else "Triton needs CUDA"
    for features in (64, 500):
        h = torch.randn(rows, features, device=device)
        w, b = torch.randn(10, features, device=device), torch.randn(10, device=device)
        cfg = f"linear R={rows} F={features}"
        yield cfg, "torch_ref", lambda: cc.linear_counts_ref(h, w, b, ri, images), rows, h.numel() * 4, ""
        ok = triton_ok(device)
        for prec in ("fp32", "bf16"):
            fn = (lambda p=prec: cc.linear_counts(h, w, b, ri, images, precision=p)) if ok else None
            yield cfg, f"triton-{prec}", fn, rows, h.numel() * 4, "" if ok else "Triton needs CUDA"


if __name__ == "__main__":
    sys.exit(bench_main("class_counts", __doc__, cases))
