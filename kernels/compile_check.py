"""Compile every Triton kernel for a GPU target on a machine without a GPU (a build check).

The CPU interpreter runs the kernels' semantics but never their GPU compilation, where register,
shared-memory and lowering limits show. This check closes that gap ahead of time:

1. Record: a child process runs representative launches of every kernel through the public APIs
   (``engine.certify(backend="triton")`` for an MLP, LeNet and a small ResNet in fp32 / bf16 / fp16,
   and the explicit-row entry points) under ``TRITON_INTERPRET=1`` with the GPU's launch parameters
   (``ENGINE_TRITON_GPU_SIZING=1``: block sizes, warps, stages, operand types), recording each
   launch's kernel, argument types, constexpr values and options.
2. Compile: this process compiles each distinct launch with Triton's own compiler for
   ``GPUTarget("cuda", arch, 32)`` (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled
   ``ptxas``), and reads the resource usage of the cubin with the bundled ``cuobjdump``.

It fails (exit 1) when a kernel does not compile, when registers x threads exceed the 64 Ki
registers of an SM, when shared memory exceeds the target's per-block limit, or when a kernel the
package defines was never launched. Spills are reported.

    python -m engine.kernels.compile_check [--arch 90] [--out bench/results/triton_compile-sm90.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = (
    "engine.kernels.noisy_batch:_noisy_batch_kernel",
    "engine.kernels.discrete_noise:_noisy_discrete_kernel",
    "engine.kernels.class_counts:_class_counts_kernel",
    "engine.kernels.class_counts:_linear_counts_kernel",
    "engine.kernels.mlp_counts:_mlp_counts_kernel",
    "engine.kernels.noisy_conv_pool:_noisy_conv_pool_kernel",
)
# per-block shared memory (opt-in maximum) and registers per SM, by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
REGISTERS_PER_SM = 65536
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")

# ----------------------------------------------------------------------------------------------
# 1. recording (child process, interpreter)
# ----------------------------------------------------------------------------------------------


def _constexpr_value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    name = getattr(v, "name", None)  # a triton dtype
    if name is not None:
        return {"tl_dtype": str(name)}
    raise TypeError(f"constexpr value of unsupported type {type(v).__name__}: {v!r}")


def _record_launches(path: Path) -> None:
    import inspect

    import torch
    from triton.runtime import interpreter
    from triton.runtime.jit import mangle_type

    records: list[dict] = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        signature, constexprs = {}, {}
        for name in names:
            if name not in bound:
                raise TypeError(f"{self.fn.__name__}: argument {name} missing from the launch")
            if "constexpr" in str(params[name].annotation):
                signature[name] = "constexpr"
                constexprs[name] = _constexpr_value(bound[name])
            else:
                signature[name] = mangle_type(bound[name])
        options = {k: v for k, v in kwargs.items() if k not in params}
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"{self.fn.__name__}: unknown launch options {unknown}")
        records.append(
            {"kernel": f"{self.fn.__module__}:{self.fn.__name__}", "signature": signature, "constexprs": constexprs,
             "options": options}
        )  # fmt: skip
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        _representative_launches(torch)
    finally:
        interpreter.InterpretedFunction.run = original
    path.write_text(json.dumps(records))


def _representative_launches(torch) -> None:
    import warnings

    from engine.kernels import class_counts, discrete_noise, noisy_batch

    import engine
    from engine import models

    warnings.simplefilter("ignore")
    gen = torch.Generator().manual_seed(0)
    nets = {
        "mlp": (models.mlp_mnist(), (1, 28, 28)),
        "lenet": (models.lenet_mnist(), (1, 28, 28)),
        "resnet8": (models.resnet_cifar(8), (3, 32, 32)),
    }
    for name, (model, shape) in nets.items():
        x = torch.rand((2,) + shape, generator=gen)
        for precision in ("fp32", "bf16", "fp16"):
            try:  # interpreted bf16 dots may give garbage (and a NaN error): the launches are recorded first
                engine.certify(model.eval(), x, sigma=0.25, n0=3, n=5, backend="triton", precision=precision)
            except Exception as exc:  # noqa: BLE001 - report and continue with the other launches
                print(f"note: {name} {precision}: {type(exc).__name__}: {exc}", file=sys.stderr)
    x = torch.rand(3, 1, 5, 7, generator=gen)
    rows = torch.tensor([0, 2, 1, 2, 0])
    samples = torch.arange(5)
    ids = torch.arange(3)
    for dtype in noisy_batch.DTYPES:
        noisy_batch.noisy_batch(x, rows, samples, ids, seed=1, stream=2, sigma=0.5, dtype=dtype)
    grid_x = torch.randint(0, 256, (3, 1, 5, 7), generator=gen, dtype=torch.uint8)
    for dtype in discrete_noise.DTYPES:
        discrete_noise.noisy_batch_discrete(grid_x, rows, samples, ids, seed=1, stream=2, sigma=0.5, dtype=dtype)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(5, 10, generator=gen).to(dtype)
        class_counts.class_counts(logits, rows, 3)


# ----------------------------------------------------------------------------------------------
# 2. compiling (this process, no interpreter)
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _resource_usage(cubin: bytes) -> dict:
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True, timeout=60)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out.stdout)
    if not m:
        return {}
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups())))


def compile_record(rec: dict, arch: int) -> dict:
    """Compile one recorded launch for ``cuda:sm_<arch>``; returns the record with results."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = rec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    names = list(rec["signature"])
    constexprs = {}
    for k, v in rec["constexprs"].items():
        constexprs[(names.index(k),)] = getattr(tl, v["tl_dtype"]) if isinstance(v, dict) else v
    out = dict(rec)
    try:
        src = ASTSource(fn=fn, signature=rec["signature"], constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(rec["options"]))
    except Exception as exc:  # noqa: BLE001 - a compile failure is the result
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
        return out
    warps = int(getattr(compiled.metadata, "num_warps", rec["options"].get("num_warps", 4)))
    usage = _resource_usage(compiled.asm["cubin"])
    shared = int(getattr(compiled.metadata, "shared", 0))
    out.update(usage)
    out.update({"num_warps": warps, "shared": shared, "ptx_lines": compiled.asm["ptx"].count("\n")})
    problems = []
    if usage and usage["registers"] * 32 * warps > REGISTERS_PER_SM:
        problems.append(f"{usage['registers']} registers x {32 * warps} threads > {REGISTERS_PER_SM}")
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and shared + usage.get("static_shared", 0) > limit:
        problems.append(f"shared memory {shared} B > {limit} B")
    out["ok"] = not problems
    if problems:
        out["error"] = "; ".join(problems)
    return out


def _key(rec: dict) -> str:
    return json.dumps([rec["kernel"], rec["signature"], rec["constexprs"], rec["options"]], sort_keys=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--out", default=None, help="JSON report")
    p.add_argument("--record-only", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--records", default=None, help="compile these recorded launches (JSON) instead of recording")
    args = p.parse_args(argv)
    if args.record_only:
        _record_launches(Path(args.record_only))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: run without TRITON_INTERPRET (this process compiles for the GPU)", file=sys.stderr)
        return 2
    if args.records:
        records = json.loads(Path(args.records).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "launches.json"
            # few forward rows: the interpreter is slow, and the compiled code does not depend on the row count
            env = {**os.environ, "TRITON_INTERPRET": "1", "ENGINE_TRITON_GPU_SIZING": "1", "ENGINE_FORWARD_ROWS": "16"}
            import engine

            root = str(Path(engine.__file__).resolve().parent.parent)  # where this process found the engine package
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
            child = subprocess.run([sys.executable, "-m", "engine.kernels.compile_check", "--record-only", str(path)],
                                   env=env, capture_output=True, text=True)  # fmt: skip
            if child.returncode != 0:
                print(child.stdout + child.stderr, file=sys.stderr)
                print("error: recording the launches failed", file=sys.stderr)
                return 1
            records = json.loads(path.read_text())
    unique = list({_key(r): r for r in records}.values())
    results = [compile_record(r, args.arch) for r in unique]
    failed = [r for r in results if not r["ok"]]
    launched = {r["kernel"] for r in results}
    missing = [k for k in KERNELS if k not in launched] if not args.records else []
    print(f"{len(records)} launches recorded, {len(unique)} distinct; compiled for sm_{args.arch}:")
    print(f"{'kernel':48s} {'pointers':14s} {'warps':>5s} {'regs':>5s} {'spill':>6s} {'shared':>7s}  constexprs")
    for r in results:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        ptrs = "/".join(sorted({t[1:] for t in r["signature"].values() if t.startswith("*")}))
        if r["ok"]:
            print(f"{r['kernel']:48s} {ptrs:14s} {r['num_warps']:5d} {r.get('registers', -1):5d} {r.get('local', -1):6d} "
                  f"{r['shared']:7d}  {cx}")  # fmt: skip
        else:
            error = " | ".join(line.strip() for line in r["error"].splitlines() if line.strip())
            print(f"{r['kernel']:48s} FAILED ({cx}): {error[:400]}")
    for k in missing:
        print(f"{k:48s} FAILED: never launched by the representative calls")
    if args.out:
        import triton

        report = {
            "check": "triton_compile",
            "target": f"cuda:sm_{args.arch}",
            "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m engine.kernels.compile_check", *(argv if argv is not None else sys.argv[1:])]),
            "note": "compiled ahead of time on a machine without a GPU; resource usage from cuobjdump; not run",
            "results": results,
            "missing": missing,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
