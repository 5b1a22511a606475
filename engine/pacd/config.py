"""The crafting settings of a PACD run: :class:`PoisonConfig`, validated when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import bilevel
from ..validate import InputError
from .lower import HVP_BACKENDS, METHODS, resolve_method_args

__all__ = ["PoisonConfig"]


def _positive(name: str, value, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def _count(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class PoisonConfig:
    """Every crafting setting of :func:`engine.pacd.poison` (the same names, defaults and meaning; see its docstring),
    checked when the config is made, with the errors ``poison`` raises for them.

    Values are kept normalised: numbers as float or int, ``method_args`` with the procedure's defaults filled in
    (:func:`engine.pacd.resolve_method_args`); ``beta``, ``a`` and ``seed`` as given. The data, model, target
    class, warm start and device are the :class:`engine.pacd.Crafter`'s; the checkpoint path, progress bar and log
    are :func:`engine.pacd.poison`'s. ``dataclasses.replace(config, ...)`` makes a checked variant.
    """

    method: str = "gaussian"
    sigma: float
    eps: float
    solver: str = "approxgrad"
    outer_steps: int
    niter1: int = 10
    niter2: int = 10
    lr_u: float = 0.1
    lr_w: float = 1e-3
    lr_p: float = 1e-2
    damping: float = 1e-3
    reset_every: int = 10
    batch_clean: int = 900
    batch_poison: int = 100
    batch_val: int = 100
    k: int = 20
    beta: float = 16.0
    a: float = 0.001
    u_update: str = "adam"
    seed: int = 0
    method_args: dict | None = None
    hvp_backend: str = "auto"
    checkpoint_every: int = 50
    checkpoint_seconds: float | None = 600.0
    encoding: str = "float32"
    lower_subset: int | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.solver not in bilevel.SOLVERS:
            raise InputError(f"solver must be one of {tuple(bilevel.SOLVERS)}, got {self.solver!r}")
        if self.hvp_backend not in HVP_BACKENDS:
            raise InputError(f"hvp_backend must be one of {HVP_BACKENDS}, got {self.hvp_backend!r}")
        if self.u_update not in ("adam", "sign"):
            raise InputError(f"u_update must be 'adam' or 'sign', got {self.u_update!r}")
        if self.encoding not in ("float32", "int8"):
            raise InputError(f"encoding must be 'float32' or 'int8' for a crafted poison, got {self.encoding!r} (sign "
                             "stores vertex poisons: PoisonSet.encode(train_data, 'sign', snap=True) or combine_poisons)")
        put("sigma", _positive("sigma", self.sigma))
        put("eps", _positive("eps", self.eps))
        if self.eps > 1:
            raise InputError(f"eps must lie in (0, 1] (pixels are in [0, 1]), got {self.eps}")
        for name in ("lr_u", "lr_w", "lr_p"):
            put(name, _positive(name, getattr(self, name)))
        put("damping", _positive("damping", self.damping, allow_zero=True))
        for name, lo in (("outer_steps", 0), ("niter1", 0), ("niter2", 1), ("reset_every", 0), ("checkpoint_every", 1)):
            put(name, _count(name, getattr(self, name), lo))
        if self.checkpoint_seconds is not None:
            put("checkpoint_seconds", _positive("checkpoint_seconds", self.checkpoint_seconds, allow_zero=True))
        for name in ("batch_clean", "batch_poison", "batch_val", "k"):
            put(name, _count(name, getattr(self, name), 1))
        if self.lower_subset is not None:
            put("lower_subset", _count("lower_subset", self.lower_subset, 1))
        if not 0 <= float(self.a) < 0.5:
            raise InputError(f"a must lie in [0, 0.5), got {self.a}")
        put("method_args", resolve_method_args(self.method, dict(self.method_args or {})))
