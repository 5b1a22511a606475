"""One GPU check in at most 8 minutes on one H100 (issue 33): build, GPU tests, the issue's timings, one folder.

Stages, each a subprocess with its own time limit (``LIMITS_S``, summing to at most ``BUDGET_S``), so that a slow
stage is killed and reported as ``timeout`` while the later ones still run:

- ``build``: ``pip install --no-build-isolation --no-deps -e .`` (engine._C with its CUDA sources; the caller sets
  ``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST=9.0``, defaults here: the CPU count and 9.0), then whether the
  extension loads and has its CUDA ops.
- ``gpu_tests``: ``TRITON_INTERPRET=0 pytest -k "gpu or cuda"``: the ``@gpu`` tests (compiled Triton kernels) and the
  CUDA tests of the noise op (bit-equality with the CPU reference) and of the fused HVP.
- ``certify_resnet110``: ``engine.certify`` of a ResNet-110 on 2 CIFAR-shaped images at n0 100, n 100,000 beside the
  plain loop (``torch.randn_like``, fp32, host counting; ``bench_certify.plain_loop_certify``) at n 10,000, both
  projected to n0 + n = 100,100 samples per image.
- ``lenet_fused``: LeNet certification with the fused Triton first layer against the engine's generic path
  (``ENGINE_FUSED=0``: a CUDA graph of the whole model), n 100,000, 2 images.
- ``hvp``: ``engine.hvp`` fused against torch.func (``bench_hvp``: LeNet batch 1000, the ResNet-20 stand-in, 200).
- ``pacd_step``: PACD outer steps at the paper's MNIST batch (900 + 100 / 100 x 20, niter 10 + 10, LeNet), the
  median after one warm-up step, projected to 2,750 steps.

Timings on CUDA: CUDA events around each call after warm-up (``common.time_once``), medians of several repeats; the
PACD step is the crafter's wall clock per step (each step ends in a host synchronisation). Each measured stage
records the issue's targets beside its numbers with ``met`` computed from the measurement (``None`` off CUDA or at
the dry run's tiny sizes, where the targets do not apply).

The output folder (``--out``, else ``$OUT``) receives at most ``MAX_FILES`` files: env.txt (written by
bench/gpu_check.sh, the extension's state appended here), build.log, tests-gpu.log, stages.log (the measured
stages' output) and timings.json (every stage: status ok / failed / timeout / skipped, reason, seconds, limit,
numbers, targets), rewritten after every stage.

``--dry-run`` (automatic without a CUDA device): the build, GPU tests, certify and LeNet stages are skipped with the
reason; ``hvp`` and ``pacd_step`` run at tiny sizes on the CPU. ``--smoke`` runs every measured stage at tiny sizes on
the current device (development check of the stage code on a CPU).

    bash bench/gpu_check.sh [DIR]                       (on the GPU machine: OUT=... or DIR)
    python bench/gpu_check.py --out DIR [--dry-run] [--stage-limit NAME=SECONDS ...] [--only a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

STAGES = ("build", "gpu_tests", "certify_resnet110", "lenet_fused", "hvp", "pacd_step")
LIMITS_S = {"build": 150, "gpu_tests": 90, "certify_resnet110": 75, "lenet_fused": 35, "hvp": 45, "pacd_step": 45}
BUDGET_S = 450  # 7.5 minutes of stage limits: the 8 minutes leave 30 s for env capture and start-up
CUDA_ONLY = ("build", "gpu_tests", "certify_resnet110", "lenet_fused")  # skipped by the dry run
LOGS = {"build": "build.log", "gpu_tests": "tests-gpu.log"}  # the other stages write to stages.log
FILES = ("env.txt", "build.log", "tests-gpu.log", "stages.log", "timings.json")
MAX_FILES = 8
MARK = "@@gpu_check "  # a stage's result line: MARK + JSON
GPU_TEST_SELECTION = "(gpu or cuda) and not gpu_check and not user_error"  # gpu marker + CUDA noise / HVP tests

N_FULL = 100_100  # n0 + n of the literature's certification
PACD_FULL_STEPS = 2750
TARGETS = {  # stage -> [(key, description, comparison, bound)] on the stage's numbers
    "certify_resnet110": [
        ("engine_s_per_image", "ResNet-110 certify, n0 100 + n 100,000: <= 0.19 s per image", "<=", 0.19),
        ("speedup_vs_plain", "ResNet-110 certify: >= 10x the plain loop (projected to the same n)", ">=", 10.0),
    ],
    "lenet_fused": [("speedup", "LeNet fused Triton: >= 3x the engine's generic path", ">=", 3.0)],
    "hvp": [
        ("lenet.speedup_hv", "fused H v, LeNet batch 1000: >= 2x torch.func", ">=", 2.0),
        ("resnet20seq.speedup_hv", "fused H v, ResNet-20 stand-in batch 200: >= 2x torch.func", ">=", 2.0),
    ],
    "pacd_step": [("projected_full_run_s", "PACD: 2,750 outer steps (MNIST batch) in <= 10 minutes", "<=", 600.0)],
}


def evaluate_targets(stage: str, numbers: dict, applies: bool) -> list[dict]:
    """The issue's targets of ``stage`` beside the measured numbers; ``met`` is None where they do not apply (not a
    full-size CUDA run) or the number is missing."""
    out = []
    for key, what, op, bound in TARGETS.get(stage, []):
        value = numbers
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        met = None
        if applies and isinstance(value, (int, float)) and value == value:  # not NaN
            met = bool(value <= bound) if op == "<=" else bool(value >= bound)
        out.append({"target": what, "number": key, "bound": f"{op} {bound:g}", "measured": value, "met": met})
    return out


# -- stages (each runs in its own subprocess: python bench/gpu_check.py --stage NAME) ---------------------------


def stage_build(device, tiny) -> dict:
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    print(f"MAX_JOBS={env['MAX_JOBS']} TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}", flush=True)
    t0 = time.perf_counter()
    from torch.utils.cpp_extension import is_ninja_available

    ninja = is_ninja_available()  # without ninja torch compiles the sources one after the other (MAX_JOBS unused)
    print(f"ninja available: {ninja}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        return {"pip_seconds": round(seconds, 1), "ninja": ninja, "_failed": f"pip install exited with {rc} (build.log)"}
    probe = "import engine._ext as e, json; print(json.dumps([e.available(), e.has_cuda_ops()]))"
    got = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    available, cuda_ops = json.loads(got.stdout.strip().splitlines()[-1]) if got.returncode == 0 else (False, False)
    return {"pip_seconds": round(seconds, 1), "ninja": ninja, "max_jobs": env["MAX_JOBS"],
            "arch_list": env["TORCH_CUDA_ARCH_LIST"], "extension_available": available, "extension_cuda_ops": cuda_ops}


def stage_gpu_tests(device, tiny) -> dict:
    import tempfile
    import xml.etree.ElementTree as ET

    env = dict(os.environ, TRITON_INTERPRET="0")  # compiled Triton kernels (tests/conftest.py: interpreter otherwise)
    with tempfile.TemporaryDirectory() as tmp:  # pytest's output goes straight to tests-gpu.log (kept on a timeout)
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-v", "-rs", "-p", "no:cacheprovider", "-k", GPU_TEST_SELECTION,
               f"--junitxml={junit}"]  # fmt: skip
        rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        counts = {}
        if junit.exists():
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            counts = {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}
    out = {"selection": GPU_TEST_SELECTION, "counts": counts, "none_skipped": counts.get("skipped") == 0}
    if rc not in (0, 5):  # 5: nothing selected
        out["_failed"] = f"pytest exited with {rc}: {counts} (tests-gpu.log)"
    return out


def stage_certify_resnet110(device, tiny) -> dict:
    import bench_certify as bc
    from common import time_events

    if tiny:
        n0, repeats = 4, 1
        engine_cfg = bc.Config("resnet110", (3, 32, 32), 8, 4, 1)
        plain_cfg = bc.Config("resnet110", (3, 32, 32), 4, 4, 1)
    else:
        n0, repeats = 100, 3
        engine_cfg = bc.Config("resnet110", (3, 32, 32), 100_000, 1_000, 2)
        plain_cfg = bc.Config("resnet110", (3, 32, 32), 10_000, 1_000, 2)

    def timer(fn):
        return time_events(fn, device, repeats=repeats, warmup=1)

    eng = bc.run(engine_cfg, "engine", device, n0=n0, timer=timer)
    plain = bc.run(plain_cfg, "plain_loop", device, n0=n0, timer=timer)
    return {
        "arch": "resnet110", "images": engine_cfg.images, "n0": n0, "repeats": repeats,
        "engine": {"n": eng.n, "batch_size": eng.batch_size, "precision": eng.precision, "path": eng.path,
                   "s_per_image": eng.s_per_image, "projected_s_per_image_100k": eng.projected_s_per_image_100k},
        "plain_loop": {"n": plain.n, "batch_size": plain.batch_size, "precision": "fp32",
                       "s_per_image": plain.s_per_image, "projected_s_per_image_100k": plain.projected_s_per_image_100k},
        "engine_s_per_image": eng.projected_s_per_image_100k if tiny else eng.s_per_image,
        "speedup_vs_plain": plain.projected_s_per_image_100k / eng.projected_s_per_image_100k,
    }  # fmt: skip


def stage_lenet_fused(device, tiny) -> dict:
    import bench_certify as bc
    from common import time_events

    if device.type == "cuda":  # the Triton backend: fused first layer vs a CUDA graph of the model (ENGINE_FUSED=0)
        providers = ("engine-triton", "engine-triton-generic")
    else:  # the CPU's fused engine::conv_pool_relu vs oneDNN (smoke test of the stage only)
        providers = ("engine", "engine-generic")
    cfg = bc.Config("lenet", (1, 28, 28), 200, 100, 1) if tiny else bc.Config("lenet", (1, 28, 28), 100_000, 20_000, 2)
    n0, repeats = (10, 1) if tiny else (100, 5)
    res = {}
    for name, provider in zip(("fused", "generic"), providers):
        r = bc.run(cfg, provider, device, n0=n0, timer=lambda fn: time_events(fn, device, repeats=repeats, warmup=1))
        res[name] = {"provider": provider, "precision": r.precision, "path": r.path, "s_per_image": r.s_per_image,
                     "projected_s_per_image_100k": r.projected_s_per_image_100k}
    return {"arch": "lenet", "images": cfg.images, "n0": n0, "n": cfg.n, "batch_size": cfg.batch_size,
            "repeats": repeats, **res, "speedup": res["generic"]["s_per_image"] / res["fused"]["s_per_image"]}


def stage_hvp(device, tiny) -> dict:
    import bench_hvp as bh
    from common import time_once

    if tiny:  # LeNet only: on a CPU the torch.func path costs ~0.5 s a call even at batch 8
        cfgs = [bh.Config("lenet", (1, 28, 28), 8, 1)]
    else:
        cfgs = bh.configs(device, quick=False)  # CUDA: LeNet batch 1000, ResNet-20 stand-in batch 200, 20 repeats
    out = {}
    for cfg in cfgs:
        rows = {r.provider: r for r in bh.run(cfg, device, ("fused", "torch_func"), time_one=lambda fn: time_once(fn, device))}
        fused, base = rows.get("fused"), rows["torch_func"]
        out[cfg.arch] = {
            "batch": cfg.batch, "repeats": cfg.repeats,
            "ms_hv": {p: r.ms_hv for p, r in rows.items()}, "ms_mixed": {p: r.ms_mixed for p, r in rows.items()},
            "peak_mb_hv": {p: r.peak_mb_hv for p, r in rows.items()},
            "speedup_hv": fused.speedup_hv if fused else None, "speedup_mixed": fused.speedup_mixed if fused else None,
            "fused": "ran" if fused else "unsupported here (see stages.log)", "memory_metric": base.memory_metric,
        }  # fmt: skip
    return out


def stage_pacd_step(device, tiny) -> dict:
    import bench_poison as bp

    train, val = bp.mnist_train_val()
    if tiny:
        cfg, steps = bp.Config("gaussian", "auto", batch_clean=18, batch_poison=2, batch_val=4, k=2, niter1=1, niter2=1), 1
    else:
        cfg, steps = bp.Config("gaussian", "auto"), 5
    entries = bp.step_entries(cfg, device, train, val, steps)
    seconds = [e["seconds"] for e in entries[1:]]  # the first step warms up
    median = statistics.median(seconds)
    phases = {k: statistics.median(e["phases"].get(k, 0.0) for e in entries[1:]) for k in entries[0]["phases"]}
    return {"method": cfg.method, "hvp_backend": cfg.hvp_backend, "arch": cfg.arch,
            "batch": f"{cfg.batch_clean}+{cfg.batch_poison}/{cfg.batch_val}x{cfg.k}", "niter": [cfg.niter1, cfg.niter2],
            "steps_timed": len(seconds), "step_seconds": seconds, "median_step_s": median, "phase_median_s": phases,
            "full_run_steps": PACD_FULL_STEPS, "projected_full_run_s": median * PACD_FULL_STEPS}


def stage_sleep(device, tiny) -> dict:  # test-only (--inject-sleep): a stage that overruns its limit
    time.sleep(float(os.environ.get("GPU_CHECK_SLEEP_S", "60")))
    return {"slept": True}


STAGE_FUNCS = {"build": stage_build, "gpu_tests": stage_gpu_tests, "certify_resnet110": stage_certify_resnet110,
               "lenet_fused": stage_lenet_fused, "hvp": stage_hvp, "pacd_step": stage_pacd_step, "sleep": stage_sleep}


def run_stage_here(name: str, device_name: str, tiny: bool) -> int:
    """Child side: run one stage, print its result line (MARK + JSON)."""
    import torch

    device = torch.device(device_name)
    t0 = time.perf_counter()
    numbers = STAGE_FUNCS[name](device, tiny)
    failed = numbers.pop("_failed", None)  # a stage with numbers that still failed (tests, build)
    applies = device.type == "cuda" and not tiny
    result = {"numbers": numbers, "targets": evaluate_targets(name, numbers, applies),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "inner_seconds": round(time.perf_counter() - t0, 2)}
    print(MARK + json.dumps(result, default=float), flush=True)
    if failed:
        print(f"stage {name} failed: {failed}", flush=True)
        return 1
    return 0


# -- driver -------------------------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(name: str, limit: float, out: Path, device: str, tiny: bool, env: dict) -> dict:
    """Parent side: the stage in a subprocess (its own process group, killed at ``limit`` seconds)."""
    log = out / LOGS.get(name, "stages.log")
    with open(log, "a") as fh:
        fh.write(f"\n===== stage {name} (limit {limit:g} s, device {device}{', tiny' if tiny else ''})\n")
        fh.flush()
        start = fh.tell()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--device", device] + (["--tiny"] * tiny)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
        seconds = time.perf_counter() - t0
    text = log.read_bytes()[start:].decode(errors="replace") if log.exists() else ""
    entry = {"name": name, "status": status, "reason": None, "seconds": round(seconds, 2), "limit_s": limit,
             "log": log.name, "numbers": None, "targets": []}
    lines = [ln for ln in text.splitlines() if ln.startswith(MARK)]
    if lines and status in ("ok", "failed"):
        entry.update(json.loads(lines[-1][len(MARK):]))
    if status == "timeout":
        entry["reason"] = f"exceeded its limit of {limit:g} s; killed (process group)"
    elif status == "failed":
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(no output)"]
        entry["reason"] = f"exit code {rc}: {tail[0][:300]}"
    elif not lines:
        entry["status"], entry["reason"] = "failed", "the stage printed no result line"
    if not entry["targets"]:
        entry["targets"] = evaluate_targets(name, {}, False)
    return entry


def parse_limits(pairs: list[str]) -> dict:
    limits = dict(LIMITS_S)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in STAGES + ("sleep",):
            raise SystemExit(f"--stage-limit wants NAME=SECONDS with NAME in {STAGES + ('sleep',)}, got {pair!r}")
        limits[name] = float(value)
    return limits


def _finite(obj):
    """``obj`` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")  # written whole, then renamed (a killed run leaves the last complete file)
    tmp.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="skip the CUDA stages (automatic without CUDA)")
    parser.add_argument("--smoke", action="store_true", help="every measured stage at tiny sizes on this device")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (the others: skipped)")
    parser.add_argument("--stage-limit", action="append", default=[], metavar="NAME=SECONDS")
    parser.add_argument("--inject-sleep", type=float, default=None, metavar="SECONDS",
                        help="test only: a first stage 'sleep' that sleeps this long (limit: --stage-limit sleep=S)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child: run one stage
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_stage_here(args.stage, args.device, args.tiny)
    if not args.out:
        parser.error("no output folder: give --out DIR or set OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import torch

    cuda = torch.cuda.is_available()
    dry = args.dry_run or not cuda
    dry_reason = "dry run (--dry-run)" if args.dry_run else "dry run: no CUDA device"
    device = "cpu" if dry else "cuda"
    limits = parse_limits(args.stage_limit)
    stages = list(STAGES)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if not dry:
        env["TRITON_INTERPRET"] = "0"
    if args.inject_sleep is not None:
        stages.insert(0, "sleep")
        limits.setdefault("sleep", args.inject_sleep + 30)
        env["GPU_CHECK_SLEEP_S"] = str(args.inject_sleep)
    only = set(args.only.split(",")) if args.only else None
    standard = {k: limits[k] for k in STAGES}
    doc = {
        "check": "bench/gpu_check.py (issue 33)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)",
        "torch": torch.__version__,
        "dry_run": dry,
        "dry_run_reason": dry_reason if dry else None,
        "stage_limits_s": standard,
        "stage_limits_sum_s": sum(standard.values()),
        "budget_s": BUDGET_S,
        "within_budget": sum(standard.values()) <= BUDGET_S,
        "stages": [],
    }
    timings = out / "timings.json"
    for name in stages:
        reason = None
        if dry and name in CUDA_ONLY and not (args.smoke and name not in LOGS):
            reason = f"{dry_reason}: this stage needs CUDA"
        elif name == "build" and args.skip_build:
            reason = "--skip-build: the extension already built is used"
        elif only is not None and name not in only and name != "sleep":
            reason = f"not selected (--only {args.only})"
        if reason is not None:
            entry = {"name": name, "status": "skipped", "reason": reason, "seconds": 0.0, "limit_s": limits[name],
                     "log": LOGS.get(name, "stages.log"), "numbers": None, "targets": evaluate_targets(name, {}, False)}
            if name in LOGS:
                with open(out / LOGS[name], "a") as fh:
                    fh.write(f"stage {name} skipped: {reason}\n")
        else:
            tiny = dry or args.smoke
            entry = run_stage(name, limits[name], out, device, tiny, env)
        doc["stages"].append(entry)
        met = [t["met"] for t in entry["targets"]]
        print(f"{name:18s} {entry['status']:8s} {entry['seconds']:7.1f} s / {limits[name]:g} s"
              + (f"  targets met: {met}" if any(m is not None for m in met) else "")
              + (f"  ({entry['reason']})" if entry["reason"] else ""), flush=True)
        doc["targets"] = [{"stage": st["name"], **t} for st in doc["stages"] for t in st["targets"]]
        doc["total_seconds"] = round(time.perf_counter() - t_start, 2)
        write_json(timings, doc)
    _append_env(out, env)
    files = sorted(p.name for p in out.iterdir())
    doc["files"] = files
    doc["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_json(timings, doc)
    if len(files) > MAX_FILES:
        print(f"more than {MAX_FILES} files in {out}: {files}", file=sys.stderr)
        return 1
    return 0


def _append_env(out: Path, env: dict) -> None:
    """The extension's state after the build (env.txt; bench/gpu_check.sh wrote the rest)."""
    probe = "import engine._ext as e; print('extension', e.available(), 'cuda ops', e.has_cuda_ops())"
    try:
        got = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=20)
        lines = (got.stdout.strip() or got.stderr.strip() or "?").splitlines()
        line = lines[-1]
    except subprocess.TimeoutExpired:
        line = "extension probe timed out"
    with open(out / "env.txt", "a") as fh:
        fh.write(f"after the stages: {line}\n")


if __name__ == "__main__":
    sys.exit(main())
