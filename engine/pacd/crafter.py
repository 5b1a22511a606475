"""The PACD attack: :class:`Crafter` runs it one outer step at a time, :func:`poison` drives a Crafter to the end.

Per outer step, on a minibatch: ``niter1`` Adam steps on the lower model's weights w; approximately solve
(H + s I) p = dF/dw by ``niter2`` solver steps (p warm-started); step the poison u along -(d^2 G / du dw) p, then
project onto the eps box around the originals and onto [0, 1]. Every random draw is keyed by (seed, step, ...), so a
Crafter restored from its :meth:`Crafter.state_dict` continues bit for bit as an uninterrupted run would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .. import bilevel
from .. import checkpoint as _checkpoint
from ..bilevel import AdamState, flat_params
from ..fileio import ExclusiveLock, FileInUseError
from ..validate import InputError, InputTypeError, check_dataset, check_device, check_model_fits, check_progress, describe_module
from .config import PoisonConfig, _count
from .lower import LowerLevel, OuterBatch
from .objective import _generator, derive_seed, soft_radius_objective
from .poisonset import (
    PoisonError,
    PoisonSet,
    _hash_clean,
    _history_summary,
    _project,
    _save_checkpoint,
    init_record,
    read_checkpoint,
)

__all__ = ["Crafter", "poison"]

_PACKAGE = __name__.rpartition(".")[0]  # engine.pacd


def _stacklevel() -> int:
    """The ``stacklevel`` with which a warning issued by the calling function points at the first caller outside
    engine.pacd (the user's call of :func:`poison`, or of a :class:`Crafter` method)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_globals.get("__name__") or "").startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


class _PhaseClock:
    """Seconds of the phases of one outer step (the device is synchronised at each lap)."""

    def __init__(self, device: torch.device):
        self.device, self.laps = device, {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 6)
        self.last = now


class _RowAdam:
    """Adam on the rows of a tensor, each row with its own step count (only the batch rows move)."""

    def __init__(self, like: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(like.shape[0], dtype=torch.int64)
        self.betas, self.eps = betas, eps

    def step(self, x: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        b1, b2 = self.betas
        self.t[rows] += 1
        t = self.t[rows].to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        m = self.m[rows] * b1 + (1 - b1) * grad
        v = self.v[rows] * b2 + (1 - b2) * grad * grad
        self.m[rows], self.v[rows] = m, v
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        return x[rows] - lr * update


# ----------------------------------------------------------------------------------------------
# checks and messages
# ----------------------------------------------------------------------------------------------


def _all_reduce_grads(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' gradients of their parts of the loss (and the parts themselves: the global loss), in place."""
    import torch.distributed as dist

    params = [p for p in flat_params(model) if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    pos = 0
    for p in params:
        p.grad.copy_(flat[pos : pos + p.numel()].view_as(p.grad))
        pos += p.numel()
    return flat[-1]


def _summed(hvp):
    """H v of the global batch: the ranks' parts summed (every rank gets the same vector)."""
    import torch.distributed as dist

    def summed(v):
        out = hvp(v).contiguous()
        dist.all_reduce(out)
        return out

    return summed


def _gathered(mixed, count: int, rank: int, world: int):
    """The mixed term of the whole poison batch (``count`` rows, rank r holding rows r, r + world, ...) on every rank."""
    import torch.distributed as dist

    def gathered(p):
        mine = mixed(p)
        rows = -(-count // world)
        padded = mine.new_zeros((rows, *mine.shape[1:]))
        padded[: mine.shape[0]] = mine
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded.contiguous())
        out = mine.new_empty((count, *mine.shape[1:]))
        for r in range(world):
            n_r = len(range(r, count, world))
            out[r::world] = pieces[r][:n_r]
        return out

    return gathered


def _solve_advice(solver: str, lr_p: float, damping: float) -> str:
    """What to change when a solve ends above the residual of p = 0 (the warning of :meth:`Crafter.step`)."""
    if solver == "cg":  # no step size: CG stops at a non-positive curvature and its residual need not fall
        return (f"H + sI is not positive definite along the solve or CG's residual rose before it converged; "
                f"raise damping (now {damping:g}) or use approxgrad with a small lr_p")
    if solver == "neumann":
        return (f"the iteration diverges when lr_p >= 2 / lambda_max(H + sI) or H + sI has a negative eigenvalue; "
                f"lower lr_p (now {lr_p:g}) or raise damping (now {damping:g})")
    return f"ApproxGrad diverges on this lower level's Hessian; lower lr_p (now {lr_p:g})"


def _float_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{name} images must be a (N, C, H, W) tensor")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise ValueError(f"{name} images must be uint8 or float in [0, 1], got {images.dtype}")
    x = images.to(torch.float32)
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"{name} images must lie in [0, 1]")
    return x


def _check_model_fn(model_fn) -> None:
    if isinstance(model_fn, torch.nn.Module) or not callable(model_fn):
        what = f"a {describe_module(model_fn)} module" if isinstance(model_fn, torch.nn.Module) else type(model_fn).__name__
        raise InputTypeError(f"poison takes a model factory (e.g. lambda: engine.models.build('lenet')), got {what}")


def _check_target_class(target_class) -> int:
    if isinstance(target_class, bool) or not hasattr(type(target_class), "__index__"):
        raise InputTypeError(f"target_class must be an integer class index, got {type(target_class).__name__} {target_class!r}")
    target_class = int(target_class)
    if target_class < 0:
        raise InputError(f"target_class must be >= 0, got {target_class}")
    return target_class


def _settings_differ(stored: dict, settings: dict) -> list[str] | None:
    """The settings (sorted names) in which a stored run's differ from ``settings`` (None: the same)."""
    current = json.loads(json.dumps(settings))
    if stored == current:
        return None
    return sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))


# ----------------------------------------------------------------------------------------------
# the crafter
# ----------------------------------------------------------------------------------------------


class Crafter:
    """A PACD run, one outer step at a time: what :func:`poison` drives, for callers that want the steps in hand
    (their own loop, logging, stopping rule or checkpoint schedule).

    Args:
        model_fn, train_data, val_data, target_class, init, device: as for :func:`poison` (checked the same way;
            the first model is built and run on a training image here).
        config: the crafting settings, a :class:`PoisonConfig`.

    :meth:`step` does one outer step and returns its log entry; :meth:`result` is the poison as it stands (a
    :class:`PoisonSet` with the settings :func:`poison` records); :meth:`state_dict` / :meth:`load_state_dict`
    snapshot and restore everything a run continues from (what a poisoning checkpoint holds), so that a Crafter
    restored from the state of another after s steps continues bit for bit as that one would.
    ``config.outer_steps`` is the length of the run :func:`poison` makes (the steps ``steps_done`` counts toward);
    :meth:`step` itself may go on past it.
    """

    def __init__(self, model_fn: Callable[[], torch.nn.Module], train_data, val_data, target_class: int,
                 config: PoisonConfig, init: PoisonSet | None = None, device: str | torch.device = "cpu",
                 distributed: bool | None = None):
        from ..distributed import world

        _check_model_fn(model_fn)
        self._rank, self._world = world(distributed)
        target_class = _check_target_class(target_class)
        if not isinstance(config, PoisonConfig):
            raise InputTypeError(f"config must be a PoisonConfig, got {type(config).__name__}")
        cfg = self.config = config
        self.target_class = target_class
        self._model_fn = model_fn
        self._train_data = train_data
        self.device = device = torch.device(device)

        images, labels = check_dataset(train_data, "train_data")
        val_images, yv_all = check_dataset(val_data, "val_data")
        x_all = _float_images(images, "train_data")
        xv_all = _float_images(val_images, "val_data")

        # the first model (re-initialisation 0), run once on a training image before anything else
        first_model = self._build_model(0)
        model_name = f"model from model_fn ({describe_module(first_model)})"
        if self._world > 1:
            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in first_model.modules()):
                raise InputError(f"the {model_name} has BatchNorm layers, whose batch statistics would differ per rank: "
                                 "data-parallel crafting needs a model without them")
            if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in first_model.modules()):
                raise InputError(f"the {model_name} has Dropout, whose masks each rank would draw from its own random "
                                 "state: data-parallel crafting needs a model without it")
        classes = check_model_fits(first_model, images, name=model_name, labels=labels, labels_name="train_data labels")
        if tuple(val_images.shape[1:]) != tuple(images.shape[1:]):
            check_model_fits(first_model, val_images, name=model_name, num_classes=classes)
        if int(yv_all.max()) >= classes:
            raise InputError(f"val_data labels go up to {int(yv_all.max())} but the {model_name} has {classes} outputs "
                             f"(classes 0..{classes - 1})")
        if target_class >= classes:
            raise InputError(f"target_class {target_class} is not a class of the {model_name}: it has {classes} outputs "
                             f"(classes 0..{classes - 1})")
        pool_p = (labels == target_class).nonzero().flatten()
        pool_c = (labels != target_class).nonzero().flatten()
        val_t = xv_all[yv_all == target_class]
        if pool_p.numel() == 0 or val_t.shape[0] == 0 or pool_c.numel() == 0:
            raise InputError(
                f"target_class {target_class}: {pool_p.numel()} training, {val_t.shape[0]} validation images of "
                f"the class and {pool_c.numel()} other training images; all must be > 0"
            )
        if cfg.lower_subset is not None:  # the lower level trains on a random part of the other classes' images
            if cfg.lower_subset > pool_c.numel():
                raise InputError(f"lower_subset {cfg.lower_subset} is more than the {pool_c.numel()} training images "
                                 f"of the other classes")
            g_sub = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, 6))
            pool_c = pool_c[torch.randperm(pool_c.numel(), generator=g_sub)[: cfg.lower_subset].sort().values]
        if self._world > 1:  # every rank needs clean and validation rows in every step
            shares = {"batch_clean (or the clean images)": min(cfg.batch_clean, pool_c.numel()),
                      "batch_val (or the validation images of the class)": min(cfg.batch_val, val_t.shape[0])}
            for what, rows in shares.items():
                if rows < self._world:
                    raise InputError(f"{what}: {rows} rows per step for {self._world} processes; each needs one")
        clean_hash = _hash_clean(images[pool_p], labels[pool_p])
        x_all, val_t = x_all.to(device), val_t.to(device)
        x0 = x_all[pool_p].clone()
        n_poison = pool_p.numel()
        lower_images = x_all.shape[0] if cfg.lower_subset is None else cfg.lower_subset + n_poison
        steps_per_epoch = math.ceil(lower_images / (cfg.batch_clean + cfg.batch_poison))
        reset_period = cfg.reset_every * steps_per_epoch
        offset, init_info = 0, None
        if init is not None:
            if not isinstance(init, PoisonSet):
                raise TypeError(f"init must be a PoisonSet, got {type(init).__name__}")
            if init.target_class != int(target_class) or init.clean_sha256 != clean_hash or not torch.equal(
                init.indices.to(torch.int64), pool_p
            ):
                raise PoisonError(
                    f"init: a poison of class {init.target_class} ({len(init)} images, originals {init.clean_sha256[:12]}) "
                    f"is not one of this training set's {n_poison} images of class {target_class} "
                    f"(originals {clean_hash[:12]}): warm-start from a poison crafted on the same training split"
                )
            if tuple(init.images.shape[1:]) != tuple(x0.shape[1:]):
                raise PoisonError(f"init: poison images {tuple(init.images.shape[1:])} do not match {tuple(x0.shape[1:])}")
            init_info = init_record(init)
            offset = _count("init's total_outer_steps", init_info["total_outer_steps"], 0)

        outer_steps = cfg.outer_steps
        if reset_period and outer_steps > 0 and offset // reset_period == (offset + outer_steps - 1) // reset_period:
            warnings.warn(
                f"reset_every={cfg.reset_every} epochs is {reset_period} outer steps here, outer_steps={outer_steps}: "
                "the lower model is never re-initialised, so the poison is crafted against a single training run; lower "
                "reset_every to craft against training from scratch several times",
                stacklevel=_stacklevel(),
            )

        settings = {
            "target_class": int(target_class),
            "method": cfg.method,
            "sigma": cfg.sigma,
            "eps": cfg.eps,
            "solver": cfg.solver,
            "niter1": cfg.niter1,
            "niter2": cfg.niter2,
            "lr_u": cfg.lr_u,
            "lr_w": cfg.lr_w,
            "lr_p": cfg.lr_p,
            "damping": cfg.damping,
            "reset_every": cfg.reset_every,
            "batch_clean": cfg.batch_clean,
            "batch_poison": cfg.batch_poison,
            "batch_val": cfg.batch_val,
            "k": cfg.k,
            "beta": float(cfg.beta),
            "a": float(cfg.a),
            "u_update": cfg.u_update,
            "seed": int(cfg.seed),
            "method_args": cfg.method_args,
            "clean_sha256": clean_hash,
            "train_size": int(x_all.shape[0]),
            "steps_per_epoch": steps_per_epoch,
        }
        if init_info is not None:
            settings["init"] = init_info
        if cfg.lower_subset is not None:
            settings["lower_subset"] = cfg.lower_subset

        self._labels, self._labels_dev = labels, labels.to(device)
        self._x_all, self._val_t, self._x0 = x_all, val_t, x0
        self._pool_p, self._pool_c, self._n_poison = pool_p, pool_c, n_poison
        self._reset_period, self._poison_epoch = reset_period, math.ceil(n_poison / cfg.batch_poison)
        self.offset = offset  # the schedule's steps before this run's first (init's total_outer_steps)
        self._reset_index = offset // reset_period if reset_period else 0
        self._model, self._opt_w = self._fresh_model(self._reset_index, first_model if self._reset_index == 0 else None)
        first_model = None
        settings["param_shapes"] = [list(p.shape) for p in flat_params(self._model)]
        self.settings = settings  # what a checkpoint must match to be resumed (and the PoisonSet records)
        self._n_params = sum(p.numel() for p in flat_params(self._model))
        self._p_vec = torch.zeros(self._n_params, device=device)
        self._p_state = AdamState()
        self._u = x0.clone()
        if init is not None:
            self._u = _project(init.images.to(device, torch.float32), x0, cfg.eps)
        self._u_opt = _RowAdam(self._u)
        if self._world > 1:
            from ..distributed import check_same

            check_same("the crafting settings, data, target class and starting poison", {
                "settings": settings, "target_class": target_class, "device": device.type,
                "poison": hashlib.sha256(self._u.detach().cpu().numpy().tobytes()).hexdigest(),
                "weights": [hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                            for p in flat_params(self._model)]})
        self.history: list[dict] = []
        self._steps_done = 0
        self._warned_solve = False  # the unreliable-solve warning, once per Crafter
        self._t_start = time.perf_counter()  # the wall time result() records runs from here

    # -- the lower model ------------------------------------------------------------------------

    def _build_model(self, r: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, r, 1))
            m = self._model_fn()
        if not isinstance(m, torch.nn.Module):
            raise InputTypeError(f"model_fn must return a torch.nn.Module, got {type(m).__name__}")
        m = m.to(self.device)
        if self.device.type == "cpu" and any(isinstance(c, torch.nn.Conv2d) for c in m.modules()):
            m.to(memory_format=torch.channels_last)  # oneDNN's fast layout (as engine.train); checkpoints store it contiguous
        return m

    def _fresh_model(self, r: int, built: torch.nn.Module | None = None):
        m = self._build_model(r) if built is None else built
        return m, torch.optim.Adam(flat_params(m), lr=self.config.lr_w)

    # -- stepping -------------------------------------------------------------------------------

    @property
    def steps_done(self) -> int:
        """Outer steps done by this run (after :attr:`offset`, the steps of a warm start's ``init``)."""
        return self._steps_done

    @property
    def model(self) -> torch.nn.Module:
        """The lower model as it stands (replaced at every re-initialisation)."""
        return self._model

    def step(self) -> dict:
        """One outer step; returns its log entry (also appended to :attr:`history`): step (this run's count),
        upper, counted, lower_loss, linf, moved, solve_residual, seconds and phases (as :func:`poison`'s ``log``)."""
        cfg, device = self.config, self.device
        local = self._steps_done
        step = self.offset + local  # the schedule's step (after init's steps on a warm start)
        r = step // self._reset_period if self._reset_period else 0
        if r != self._reset_index:
            self._reset_index = r
            self._model, self._opt_w = self._fresh_model(r)
            self._p_vec = torch.zeros(self._n_params, device=device)
            self._p_state = AdamState()
        model, opt_w, u, u_opt, x0 = self._model, self._opt_w, self._u, self._u_opt, self._x0
        t0 = time.perf_counter()
        g_sel = _generator("cpu", cfg.seed, step, 2)
        ci = self._pool_c[torch.randperm(self._pool_c.numel(), generator=g_sel)[: cfg.batch_clean]]
        vi = torch.randperm(self._val_t.shape[0], generator=g_sel)[: cfg.batch_val]
        order = torch.randperm(self._n_poison, generator=_generator("cpu", cfg.seed, step // self._poison_epoch, 3))
        j = step % self._poison_epoch
        pos = order[j * cfg.batch_poison : (j + 1) * cfg.batch_poison]
        rank, W = self._rank, self._world
        rows, total, vi_all = None, None, vi
        if W > 1:  # this rank's share of the global batch: every W-th clean, poison and validation row
            sel_c, sel_p = torch.arange(ci.numel())[rank::W], torch.arange(pos.numel())[rank::W]
            rows, total = torch.cat([sel_c, ci.numel() + sel_p]), ci.numel() + pos.numel()
            ci, pos_all, pos, vi = ci[sel_c], pos, pos[sel_p], vi[rank::W]
        batch = OuterBatch(
            xc=self._x_all[ci.to(device)],
            yc=self._labels_dev[ci.to(device)],
            pos=pos,
            yp=self._labels_dev[self._pool_p[pos].to(device)],
            xv=self._val_t[vi.to(device)],
            seed=derive_seed(cfg.seed, step, 4),
            rows=rows,
            total=total,
        )
        lower = LowerLevel(cfg.method, model, batch, cfg.sigma, cfg.method_args)
        u_batch = u[pos.to(device)]
        clock = _PhaseClock(device)
        model.train()
        lower.prepare(u_batch)
        lower_loss = float("nan")
        for it in range(cfg.niter1):
            loss = lower.loss(lower.forward, u_batch, 100 + it)
            opt_w.zero_grad(set_to_none=True)
            loss.backward()
            if W > 1:
                loss = _all_reduce_grads(model, loss)
            opt_w.step()
            lower_loss = float(loss.detach())
        clock.lap("lower")
        model.eval()  # the smoothed classifier (upper level) and the second-order products use eval mode
        params = flat_params(model)
        if W == 1:
            f_val, counted = soft_radius_objective(
                lower.forward, batch.xv, self.target_class, sigma=cfg.sigma, k=cfg.k, beta=cfg.beta, a=cfg.a,
                generator=_generator(device, batch.seed, 5),
            )
        else:  # the global draw of noise at this rank's validation rows; F and the count summed over the ranks
            g5 = _generator(device, batch.seed, 5)
            shape = (cfg.k, vi_all.numel(), *self._val_t.shape[1:])
            noise = torch.randn(shape, generator=g5, device=device, dtype=self._val_t.dtype)[:, rank::W]
            f_val, counted = soft_radius_objective(
                lower.forward, batch.xv, self.target_class, sigma=cfg.sigma, k=cfg.k, beta=cfg.beta, a=cfg.a,
                noise=noise,
            )
            f_val = f_val * (batch.xv.shape[0] / vi_all.numel())
            counted = counted * batch.xv.shape[0] / vi_all.numel()
        grads = torch.autograd.grad(f_val, params, allow_unused=True)
        g_w = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1) for gr, p in zip(grads, params)])
        if W > 1:
            import torch.distributed as dist

            sums = torch.cat([g_w.detach(), f_val.detach().reshape(1), torch.tensor([counted], device=device,
                                                                                  dtype=g_w.dtype)])
            dist.all_reduce(sums)
            g_w, f_val, counted = sums[:-2], sums[-2], float(sums[-1])
        moved, solve_residual = 0.0, None
        clock.lap("upper")
        if float(g_w.abs().max()) > 0:
            hvp, mixed = lower.products(u_batch, 999, cfg.hvp_backend)
            if W > 1:
                hvp, mixed = _summed(hvp), _gathered(mixed, pos_all.numel(), rank, W)
                pos = pos_all
                u_batch = u[pos.to(device)]  # the whole poison batch: every rank makes the same poison step
            kwargs = {"state": self._p_state} if cfg.solver == "approxgrad" else {}
            trace: list[float] = []
            self._p_vec = bilevel.SOLVERS[cfg.solver](hvp, g_w.detach(), self._p_vec, steps=cfg.niter2, lr=cfg.lr_p,
                                                      damping=cfg.damping, trace=trace, **kwargs)  # fmt: skip
            if trace:
                solve_residual = [trace[0], trace[-1]]
                if trace[-1] > 1.0 and not self._warned_solve:
                    self._warned_solve = True
                    warnings.warn(
                        f"step {local + 1}: the {cfg.solver} solve ends with residual ||(H + sI) p - g|| / ||g|| = "
                        f"{trace[-1]:.3g} (from {trace[0]:.3g}), worse than p = 0, so the poison step follows an "
                        f"unreliable direction: {_solve_advice(cfg.solver, cfg.lr_p, cfg.damping)}",
                        stacklevel=_stacklevel(),
                    )
            clock.lap("solve")
            grad_u = -mixed(self._p_vec)
            if cfg.u_update == "adam":
                new = u_opt.step(u, pos.to(device), grad_u, cfg.lr_u)
            else:
                new = u_batch - cfg.lr_u * grad_u.sign()
            x0b = x0[pos.to(device)]
            new = _project(new, x0b, cfg.eps)
            moved = float((new - u_batch).abs().max())
            u[pos.to(device)] = new
            clock.lap("poison")
        for name in ("solve", "poison"):  # no hypergradient this step (no validation image counted)
            clock.laps.setdefault(name, 0.0)
        entry = {
            "step": local + 1,
            "upper": float(f_val.detach()),
            "counted": counted,
            "lower_loss": lower_loss,
            "linf": float((u - x0).abs().max()),
            "moved": moved,
            "solve_residual": solve_residual,
            "seconds": time.perf_counter() - t0,
            "phases": clock.laps,
        }
        self.history.append(entry)
        self._steps_done = local + 1
        return entry

    def result(self) -> PoisonSet:
        """The poison as it stands: a :class:`PoisonSet` (``config.encoding``) whose settings add to :attr:`settings`
        the steps done (``outer_steps``; ``total_outer_steps`` with a warm start's), ``lower_resets``, the wall
        seconds since the Crafter was made (or restored) and the summary of :attr:`history`."""
        final = dict(self.settings)
        final.update(
            {
                "outer_steps": self._steps_done,
                "total_outer_steps": self.offset + self._steps_done,
                "lower_resets": self._reset_index,  # the re-initialisation of the last step done (0: none)
                "seconds": time.perf_counter() - self._t_start,
                **_history_summary(self.history),
            }
        )
        crafted = PoisonSet(
            indices=self._pool_p.clone(),
            images=self._u.detach().to("cpu", torch.float32, copy=True),
            labels=self._labels[self._pool_p].clone(),
            clean_sha256=self.settings["clean_sha256"],
            eps=self.config.eps,
            sigma=self.config.sigma,
            method=self.config.method,
            target_class=self.target_class,
            settings=json.loads(json.dumps(final)),
        )
        encoding = self.config.encoding
        return crafted if encoding == "float32" else crafted.encode(self._train_data, encoding)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A snapshot (copies) of everything the run continues from: ``step`` (steps done), ``reset_index`` (the
        lower model's re-initialisation), ``settings``, the lower ``model``'s state_dict and its Adam
        ``optimizer``'s, the poison ``u`` and its per-image Adam state ``u_adam`` (m, v, t), the solver's warm start
        ``p`` and its Adam state ``p_adam`` (m, v: None before its first step; t) and the ``history``."""
        return {
            "step": self._steps_done,
            "reset_index": self._reset_index,
            "settings": copy.deepcopy(self.settings),
            "model": {k: v.detach().clone() for k, v in self._model.state_dict().items()},
            "optimizer": copy.deepcopy(self._opt_w.state_dict()),
            "u": self._u.detach().clone(),
            "u_adam": {"m": self._u_opt.m.clone(), "v": self._u_opt.v.clone(), "t": self._u_opt.t.clone()},
            "p": self._p_vec.detach().clone(),
            "p_adam": {
                "m": None if self._p_state.m is None else self._p_state.m.clone(),
                "v": None if self._p_state.v is None else self._p_state.v.clone(),
                "t": self._p_state.t,
            },
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`state_dict` of a Crafter of the same settings, data and model; the
        tensors are copied). A state of other settings is refused (PoisonError naming them)."""
        diff = _settings_differ(state["settings"], self.settings)
        if diff is not None:
            raise PoisonError(f"state of a run with other settings ({', '.join(diff)} differ)")
        device = self.device
        self._steps_done, self._reset_index = state["step"], state["reset_index"]
        self.history = copy.deepcopy(list(state["history"]))
        self._model, self._opt_w = self._fresh_model(self._reset_index)
        self._model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
        opt = state["optimizer"]
        self._opt_w.load_state_dict({
            "state": {i: {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in opt["state"].items()},
            "param_groups": _checkpoint.restore_tuples(copy.deepcopy(opt["param_groups"]), self._opt_w.param_groups),
        })
        self._u = state["u"].to(device, copy=True)
        self._p_vec = state["p"].to(device, copy=True)
        p_adam = state["p_adam"]
        self._p_state = AdamState(m=p_adam["m"], v=p_adam["v"], t=p_adam["t"])
        if self._p_state.m is not None:
            self._p_state.m, self._p_state.v = self._p_state.m.to(device, copy=True), self._p_state.v.to(device, copy=True)
        u_adam = state["u_adam"]
        self._u_opt.m, self._u_opt.v = u_adam["m"].to(device, copy=True), u_adam["v"].to(device, copy=True)
        self._u_opt.t = u_adam["t"].clone()
        self._t_start = time.perf_counter()


# ----------------------------------------------------------------------------------------------
# poisoning checkpoints: a Crafter's state as the file lays it out
# ----------------------------------------------------------------------------------------------


def _checkpoint_payload(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a poisoning checkpoint holding ``state`` (:meth:`Crafter.state_dict`): the weights as
    ``w.NAME``, the optimizer state as ``opt_w/I/KEY`` (its param_groups in ``opt_w_groups``), u, p, u_m, u_v, u_t,
    and p_m, p_v once the solver's Adam has stepped."""
    tensors = {f"w.{k}": v for k, v in state["model"].items()}
    opt_tensors, _, groups = _checkpoint.optimizer_to_tensors(state["optimizer"], "opt_w/", "/", scalars_as_tensors=True)
    tensors.update(opt_tensors)
    u_adam, p_adam = state["u_adam"], state["p_adam"]
    tensors.update({"u": state["u"], "p": state["p"], "u_m": u_adam["m"], "u_v": u_adam["v"], "u_t": u_adam["t"]})
    if p_adam["m"] is not None:
        tensors.update({"p_m": p_adam["m"], "p_v": p_adam["v"]})
    meta = {
        "step": state["step"],
        "reset_index": state["reset_index"],
        "p_t": p_adam["t"],
        "settings": state["settings"],
        "opt_w_groups": groups,
        "history": state["history"],
    }
    return tensors, json.loads(json.dumps(meta))


def _state_from_checkpoint(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The :meth:`Crafter.state_dict` a poisoning checkpoint (:func:`read_checkpoint`) holds."""
    return {
        "step": meta["step"],
        "reset_index": meta["reset_index"],
        "settings": meta["settings"],
        "model": {k[2:]: v for k, v in tensors.items() if k.startswith("w.")},
        "optimizer": _checkpoint.optimizer_from_tensors(tensors, meta["opt_w_groups"], "opt_w/", "/"),
        "u": tensors["u"],
        "u_adam": {"m": tensors["u_m"], "v": tensors["u_v"], "t": tensors["u_t"]},
        "p": tensors["p"],
        "p_adam": {"m": tensors.get("p_m"), "v": tensors.get("p_v"), "t": meta["p_t"]},
        "history": meta["history"],
    }


# ----------------------------------------------------------------------------------------------
# the attack
# ----------------------------------------------------------------------------------------------


def poison(
    model_fn: Callable[[], torch.nn.Module],
    train_data,
    val_data,
    *,
    target_class: int,
    method: str = "gaussian",
    sigma: float,
    eps: float,
    solver: str = "approxgrad",
    outer_steps: int,
    niter1: int = 10,
    niter2: int = 10,
    lr_u: float = 0.1,
    lr_w: float = 1e-3,
    lr_p: float = 1e-2,
    damping: float = 1e-3,
    reset_every: int = 10,
    batch_clean: int = 900,
    batch_poison: int = 100,
    batch_val: int = 100,
    k: int = 20,
    beta: float = 16.0,
    a: float = 0.001,
    u_update: str = "adam",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    checkpoint_seconds: float | None = 600.0,
    init: PoisonSet | None = None,
    method_args: dict | None = None,
    device: str | torch.device = "cpu",
    hvp_backend: str = "auto",
    encoding: str = "float32",
    progress: bool | None = None,
    log: Callable[[dict], None] | None = None,
    distributed: bool | None = None,
    lower_subset: int | None = None,
) -> PoisonSet:
    """Craft a PACD poison against ``method``'s training procedure (ApproxGrad bilevel optimisation).

    Args:
        model_fn: a factory building a fresh lower-level model (e.g. ``engine.models.lenet_mnist`` or
            ``lambda: engine.models.build("lenet")``, not a model); called at every re-initialisation
            under a seed derived from ``seed``. Its first model is run once on a training image before
            anything else: a model that does not take the images, or has no output for a label or for
            ``target_class``, is refused then.
        train_data: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,)); every image of
            ``target_class`` is poisoned, the others are the clean data of the lower level.
        val_data: (images, labels); its ``target_class`` images drive the upper objective.
        method: lower-level procedure "gaussian" | "macer" | "smoothadv" (``method_args``: macer k,
            beta, gamma, lbd; smoothadv eps, steps, m).
        sigma: smoothing noise of the procedure and of the upper objective. eps: L_inf radius.
        solver: "approxgrad" | "cg" | "neumann" for (H + damping I) p = dF/dw, ``niter2`` steps with
            step size ``lr_p`` (approxgrad, neumann).
        outer_steps: outer iterations; each runs ``niter1`` Adam(lr_w) steps on the lower model,
            one solve and one poison step (Adam with lr_u, or signed steps with u_update="sign").
        reset_every: re-initialise the lower model every this many epochs (epoch = N / (batch_clean
            + batch_poison) outer steps; 0 = never). A run too short for one re-initialisation warns;
            the PoisonSet's settings give the number done ("lower_resets").
        batch_clean, batch_poison, batch_val: minibatch sizes; k, beta, a: upper objective settings.
        checkpoint: path of a resumable state file written every ``checkpoint_every`` steps, also
            after any step that ends ``checkpoint_seconds`` (None: no time limit) after the last
            write, and at the end; an existing one with the same settings is resumed (``outer_steps``
            may grow).
        init: warm start from an earlier poison of the same training set and target class (e.g. to
            craft further from a finished run whose checkpoint is gone): the poisoned images start at
            ``init``'s, projected onto this run's eps box around the originals, and the step schedule
            (minibatches, noise keys, lower-model re-initialisations) continues after ``init``'s
            ``total_outer_steps`` (its ``outer_steps`` unless it was itself warm-started) instead of
            replaying it; the lower model, p and the optimiser states start afresh (a checkpoint
            resumes exactly, a warm start does not). ``outer_steps`` counts the steps of this run;
            the PoisonSet's ``settings["init"]`` names ``init`` (content sha256, outer steps) and
            ``settings["total_outer_steps"]`` adds them up.
        hvp_backend: second-order products of the solve ("auto": an :class:`engine.curvature.CurvatureOperator`
            per solve where the model is supported, its forward and gradient passes run once and each product
            its R-passes only, else :func:`engine.hvp`'s choice; "cached" that operator or an error; "fused",
            "torch_func", "double_backward": :func:`engine.hvp` with that backend, a full sweep per product);
            MACER's loss enters through its expansion at the logits, or, with "torch_func", as a whole through
            torch.func (see ``LowerLevel.products``).
            The Hessian and mixed products run with the model in eval mode (BatchNorm running statistics).
        encoding: "float32" (the crafted images as they are) or "int8": the crafted poison quantised at the end
            (:meth:`PoisonSet.encode`; ``settings["quantized"]`` records the float32 poison it came from), so the
            PoisonSet returned is the one its 4x smaller file holds. The checkpoint keeps the float32 poison (a
            resumed run quantises the same), and the encoding is no checkpoint setting.
        progress: a tqdm bar over the outer steps: None (default) only when stderr is a terminal (never
            under pytest or in a log file), True always, False never.
        distributed: None (default): data-parallel over the ranks of the default torch.distributed process group
            when one is initialised (e.g. under torchrun), else one process; False: one process; True: the group
            must be there. Each rank takes every W-th row of each outer step's clean, poison and validation batch
            (with the noise those rows have in one process); the lower model's gradients, the upper gradient, every
            H v and the poison batch's mixed term are summed or gathered over the ranks, so every rank holds the
            same weights and poison, equal to one process's on the same global batches up to the order of
            floating-point sums. Rank 0 alone writes the checkpoint and shows progress; every rank returns the
            poison. Models without BatchNorm or Dropout in training mode (their statistics or masks would be per
            rank); a SmoothAdv row whose attack gradient is exactly zero takes another random direction than in
            one process.
        lower_subset: craft against part of the clean data: the lower level trains on this many of the other
            classes' training images (a random choice from ``seed``) beside the poison, instead of all of them (the
            re-initialisation period counts epochs of that part); victims may then train on the whole set.

    Raises:
        :class:`engine.validate.InputError` (a ValueError) for bad arguments, data (as for
        :func:`engine.train`), a model instance passed as ``model_fn``, a model that does not fit the
        images or a ``target_class`` beyond its outputs.
        :class:`engine.fileio.FileInUseError` when another process writes ``checkpoint`` (data-parallel: on
        every rank, so that all of them may go on to other work together).

    Returns:
        :class:`PoisonSet` with ||images - originals||_inf <= eps, images in [0, 1], labels unchanged.
    """
    _check_model_fn(model_fn)
    target_class = _check_target_class(target_class)
    progress = check_progress(progress, allow_callable=False)
    config = PoisonConfig(
        method=method, sigma=sigma, eps=eps, solver=solver, outer_steps=outer_steps, niter1=niter1, niter2=niter2,
        lr_u=lr_u, lr_w=lr_w, lr_p=lr_p, damping=damping, reset_every=reset_every, batch_clean=batch_clean,
        batch_poison=batch_poison, batch_val=batch_val, k=k, beta=beta, a=a, u_update=u_update, seed=seed,
        method_args=method_args, hvp_backend=hvp_backend, checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds, encoding=encoding, lower_subset=lower_subset,
    )  # fmt: skip
    crafter = Crafter(model_fn, train_data, val_data, target_class, config, init=init, device=check_device(device),
                      distributed=distributed)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    writer = crafter._rank == 0  # data-parallel: every rank resumes from the checkpoint, rank 0 writes it
    # one writer per checkpoint, released (its lock file removed) however the run ends
    lock = busy = None
    if ckpt is not None and writer:
        try:
            lock = ExclusiveLock(ckpt).acquire()
        except FileInUseError as exc:
            busy = exc
    if crafter._world > 1:  # every rank learns whether rank 0 got the lock: all go on, or all raise
        from ..distributed import first_error

        refused = first_error(busy)
        if refused is not None and busy is None:
            raise FileInUseError(f"{ckpt}: the data-parallel run stops on every rank ({refused})")
    if busy is not None:
        raise busy
    try:
        _run_crafter(crafter, config, ckpt, method, progress and writer, log, write=writer)
    finally:
        if lock is not None:
            lock.release()
    return crafter.result()


def _run_crafter(crafter, config, ckpt, method, progress, log, write: bool = True) -> None:
    """Resume ``crafter`` from ``ckpt`` (when it exists) and step it to ``config.outer_steps``, checkpointing (when
    ``write``)."""
    if ckpt is not None and ckpt.exists():
        tensors, meta = read_checkpoint(ckpt)
        diff = _settings_differ(meta["settings"], crafter.settings)
        if diff is not None:
            raise PoisonError(f"{ckpt}: checkpoint of a run with other settings ({', '.join(diff)} differ)")
        crafter.load_state_dict(_state_from_checkpoint(tensors, meta))
    if crafter._world > 1:  # every rank resumes from the same checkpoint (a file system all of them see)
        from ..distributed import check_same

        check_same("the steps and poison resumed (is the checkpoint on a file system every rank sees?)",
                   {"steps": crafter.steps_done,
                    "poison": hashlib.sha256(crafter._u.detach().cpu().numpy().tobytes()).hexdigest()})
    start = crafter.steps_done

    def save_state():
        if ckpt is not None and write:
            _save_checkpoint(ckpt, *_checkpoint_payload(crafter.state_dict()))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.outer_steps, initial=min(start, config.outer_steps), desc=f"poison[{method}]", unit="step",
                   dynamic_ncols=True)  # fmt: skip
    crafter._t_start = last_save = time.perf_counter()
    try:
        for _ in range(start, config.outer_steps):
            entry = crafter.step()
            if log is not None:
                log(entry)
            if bar is not None:
                bar.set_postfix(upper=f"{entry['upper']:.4f}", linf=f"{entry['linf']:.3f}", lower=f"{entry['lower_loss']:.3f}")
                bar.update(1)
            overdue = config.checkpoint_seconds is not None and time.perf_counter() - last_save >= config.checkpoint_seconds
            if entry["step"] % config.checkpoint_every == 0 or overdue:
                save_state()
                last_save = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    save_state()
