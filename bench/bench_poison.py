"""Seconds per PACD outer step (paper's MNIST batch) and the projected time of a full poisoning run.

One outer step = niter1 lower Adam steps on (batch_clean + batch_poison) images, the upper objective
on batch_val validation images x k noise draws, niter2 solver steps (2 Hessian-vector products each
for ApproxGrad) and one mixed second-derivative product. Paper settings for MNIST: 900 clean + 100
poison, 100 validation, k 20, niter1 = niter2 = 10, LeNet; Gaussian augmentation needs about 2,750
outer steps.

    python bench/bench_poison.py [--steps 3] [--out bench/results/poison-cpu.json]

Beside each configuration, in the same run: the seconds of one plain gradient of the lower model's loss and of one
engine.hvp at the step's batch (medians of 5; backend cached: one product of an engine.curvature.CurvatureOperator
already built, as the solve's products after its first), and the step in gradient-times.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import data, models
from engine.pacd import poison

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, device_name, record, resolve_device  # noqa: E402

FULL_STEPS = {"gaussian": 2750, "macer": 2750, "smoothadv": 2750}


@dataclass(frozen=True)
class Config:
    method: str
    hvp_backend: str
    batch_clean: int = 900
    batch_poison: int = 100
    batch_val: int = 100
    k: int = 20
    niter1: int = 10
    niter2: int = 10
    arch: str = "lenet"


@dataclass(frozen=True)
class Result:
    method: str
    hvp_backend: str
    arch: str
    batch: str
    seconds_per_step: float
    projected_full_run_s: float
    full_run_steps: int
    steps_timed: int
    phase_seconds: dict  # mean seconds per timed step of each phase: lower (niter1 steps), upper, solve, poison
    gradient_seconds: float  # one plain gradient of the lower model's loss at the step's batch, same run (median)
    hvp_seconds: float  # one engine.hvp (this backend; cached: one product of a built CurvatureOperator), median
    step_in_gradients: float  # seconds_per_step / gradient_seconds (the target: <= 20 for GA)


def _median_seconds(fn, reps: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gradient_and_hvp_seconds(cfg: Config, device: torch.device, train) -> tuple[float, float]:
    """Seconds of one plain gradient (cross-entropy, as the lower level's Gaussian-augmentation loss, through the
    same pool-first view the crafter trains with) and of one engine.hvp with this backend, at the step's batch."""
    from engine.hessian import hvp
    from engine.smoothing import pool_first_view

    torch.manual_seed(0)
    model = models.build(cfg.arch).to(device)
    b = cfg.batch_clean + cfg.batch_poison
    x = data.to_float(train[0][:b]).to(device)
    y = train[1][:b].to(device)
    forward = pool_first_view(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        loss = torch.nn.functional.cross_entropy(forward(x + 0.5 * torch.randn_like(x)), y)
        torch.autograd.grad(loss, params)
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.eval()
    v = torch.randn(sum(p.numel() for p in params), device=device)
    noisy = x + 0.5 * torch.randn_like(x)

    if cfg.hvp_backend in ("cached", "auto"):  # the operator is built once per solve; one product after that
        from engine.curvature import CurvatureOperator

        op = CurvatureOperator(model, noisy, y)

        def product():
            op.hvp(v)
            if device.type == "cuda":
                torch.cuda.synchronize()
    else:
        def product():
            hvp(model, noisy, y, v, backend="auto" if cfg.hvp_backend == "fused" else cfg.hvp_backend)
            if device.type == "cuda":
                torch.cuda.synchronize()

    model.train()
    g = _median_seconds(gradient)
    model.eval()
    return g, _median_seconds(product)


def step_entries(cfg: Config, device: torch.device, train, val, steps: int) -> list[dict]:
    """The log entries of ``steps + 1`` outer steps of ``poison`` (the first warms up; each has ``seconds``, the step's
    wall time, which ends in a host synchronisation, and ``phases``)."""
    kwargs = {"hvp_backend": cfg.hvp_backend}
    sigma = 0.5 if cfg.method == "gaussian" else 0.75
    entries = []
    poison(
        lambda: models.build(cfg.arch),
        train,
        val,
        target_class=8,
        method=cfg.method,
        sigma=sigma,
        eps=0.1,
        outer_steps=steps + 1,
        batch_clean=cfg.batch_clean,
        batch_poison=cfg.batch_poison,
        batch_val=cfg.batch_val,
        k=cfg.k,
        niter1=cfg.niter1,
        niter2=cfg.niter2,
        device=device,
        log=entries.append,
        **kwargs,
    )
    return entries


def run(cfg: Config, device: torch.device, train, val, steps: int) -> Result:
    entries = step_entries(cfg, device, train, val, steps)
    timed = entries[1:]  # the first step warms up
    per_step = sum(e["seconds"] for e in timed) / max(1, len(timed))
    phases = {k: round(sum(e["phases"].get(k, 0.0) for e in timed) / max(1, len(timed)), 4) for k in entries[0]["phases"]}
    full = FULL_STEPS[cfg.method]
    grad_s, hvp_s = gradient_and_hvp_seconds(cfg, device, train)
    return Result(
        cfg.method,
        cfg.hvp_backend,
        cfg.arch,
        f"{cfg.batch_clean}+{cfg.batch_poison}/{cfg.batch_val}x{cfg.k}",
        per_step,
        per_step * full,
        full,
        len(timed),
        phases,
        grad_s,
        hvp_s,
        per_step / grad_s,
    )


def mnist_train_val(data_root: str | Path = "/work/shared/data/mnist"):
    """(train, val) MNIST of the benchmark: the folder ``data_root`` (the embedded subset if it is missing), a tenth
    (at most 5,000 images) held out for validation."""
    root = Path(data_root)
    images, labels = data.load_mnist(root if root.is_dir() else data.embedded_mnist_root(), "train")
    return data.split_validation(images, labels, min(5000, images.shape[0] // 10))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="outer steps timed (after one warm-up step)")
    parser.add_argument("--methods", default="gaussian")
    parser.add_argument("--backends", default="fused,cached",
                        help="hvp_backend of the crafter (fused, cached, torch_func, ...), the first is the baseline")
    parser.add_argument("--data-root", default="/work/shared/data/mnist", help="MNIST folder (embedded subset if missing)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train, val = mnist_train_val(args.data_root)
    print(f"device: {device_name(device)}; torch {torch.__version__}; train {train[0].shape[0]} images")
    head = ("method", "hvp backend", "batch", "s/step", "projected s", "steps", "speed-up", "grad s", "H v s",
            "step/grad", "  seconds per phase")
    print("{:10s} {:14s} {:16s} {:>8s} {:>12s} {:>6s} {:>9s} {:>7s} {:>6s} {:>9s} {}".format(*head))
    results = []
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        base = None
        for backend in args.backends.split(","):
            r = run(Config(method, backend), device, train, val, args.steps)
            results.append(r)
            base = base or r.seconds_per_step
            print(
                f"{r.method:10s} {r.hvp_backend:14s} {r.batch:16s} {r.seconds_per_step:8.2f} {r.projected_full_run_s:12.0f} "
                f"{r.full_run_steps:6d} {base / r.seconds_per_step:8.2f}x {r.gradient_seconds:7.3f} {r.hvp_seconds:6.3f} "
                f"{r.step_in_gradients:9.1f}   "
                + " ".join(f"{k} {v:.2f}" for k, v in r.phase_seconds.items()),
                flush=True,
            )
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        print(f"appended to {append_json(args.out, record('poison', device, [asdict(r) for r in results], argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
