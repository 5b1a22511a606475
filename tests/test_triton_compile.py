"""Every Triton kernel compiles for the H100 / H200 (sm_90) with Triton's own compiler, without a GPU.

The interpreter tests check what the kernels compute; this checks that the launches the engine makes
also lower to a cubin within an SM's register and shared-memory limits (kernels/compile_check.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine.kernels import compile_check

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(compile_check._tool("ptxas") is None, reason="Triton's bundled ptxas is missing")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "engine.kernels.compile_check", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    proc = _run("--arch", "90", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    assert {r["kernel"] for r in results} == set(compile_check.KERNELS) and not report["missing"]
    assert all(r["ok"] for r in results)
    # the mixed-precision variants were launched too: bf16 and fp16 operands in the fused kernels
    for kernel in ("engine.kernels.mlp_counts:_mlp_counts_kernel", "engine.kernels.class_counts:_linear_counts_kernel"):
        types = {t for r in results if r["kernel"] == kernel for t in r["signature"].values()}
        assert {"*bf16", "*fp16"} <= types, (kernel, types)
    for r in results:
        assert 0 < r["registers"] <= 255 and r["registers"] * 32 * r["num_warps"] <= 65536
        assert r["shared"] <= compile_check.SHARED_LIMIT[90]


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    good = {
        "kernel": "engine.kernels.class_counts:_class_counts_kernel",
        "signature": {"logits_ptr": "*fp32", "stride_r": "i32", "row_image_ptr": "*i64", "counts_ptr": "*i64",
                      "bad_ptr": "*i32", "batch_rows": "i32", "num_classes": "i32", "start": "i32", "num": "i32",
                      "total": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "PACKED": "constexpr"},
        "constexprs": {"BLOCK_R": 64, "BLOCK_C": 16, "PACKED": False},
        "options": {},
    }  # fmt: skip
    import inspect

    from engine.kernels.class_counts import _class_counts_kernel

    names = list(inspect.signature(getattr(_class_counts_kernel, "fn", _class_counts_kernel)).parameters)
    assert names == list(good["signature"]), names  # the hand-written launch matches the kernel
    bad = json.loads(json.dumps(good))
    bad["constexprs"]["BLOCK_C"] = 12  # tl.arange needs a power of two
    path = tmp_path / "launches.json"
    path.write_text(json.dumps([good, bad]))
    proc = _run("--arch", "90", "--records", str(path))
    assert proc.returncode == 1
    lines = [x for x in proc.stdout.splitlines() if x.startswith("engine.kernels.class_counts")]
    assert len(lines) == 2 and "FAILED" not in lines[0] and "FAILED" in lines[1] and "BLOCK_C=12" in lines[1], proc.stdout
