"""Bilevel-optimisation pieces of PACD: inverse-Hessian-vector solvers and lower-level problems.

The hypergradient of an upper objective F(w*(u)) with w*(u) = argmin_w G(w, u) is

    dF/du = dF/du|_w - (d^2 G / du dw) p,   with   (H + s I) p = dF/dw,   H = d^2 G / dw^2,

where s is a small damping. The solvers below approximately solve for p from Hessian-vector
products alone; all vectors are flat (the model's trainable parameters concatenated in
``model.parameters()`` order).

- :func:`solve_approxgrad`: Adam steps on ||(H + s I) p - g||^2 (ApproxGrad, Mehra & Hamm).
- :func:`solve_cg`: conjugate gradient on (H + s I) p = g.
- :func:`solve_neumann`: Richardson iteration p <- p + lr (g - (H + s I) p), i.e. the truncated
  Neumann series lr * sum_j (I - lr (H + s I))^j g when started from p = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "AdamState",
    "adam_step",
    "solve_approxgrad",
    "solve_cg",
    "solve_neumann",
    "SOLVERS",
    "flat_params",
    "unflatten",
    "FuncLower",
]

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AdamState:
    """State of a hand-written Adam on one flat tensor (kept across calls; serialisable)."""

    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    t: int = 0
    betas: tuple[float, float] = field(default=(0.9, 0.999))
    eps: float = 1e-8

    def reset(self) -> None:
        self.m, self.v, self.t = None, None, 0


def adam_step(x: torch.Tensor, grad: torch.Tensor, state: AdamState, lr: float) -> torch.Tensor:
    """One Adam step on ``x`` (returns the new value; ``state`` is updated in place)."""
    b1, b2 = state.betas
    if state.m is None:
        state.m = torch.zeros_like(x)
        state.v = torch.zeros_like(x)
    state.t += 1
    state.m.mul_(b1).add_(grad, alpha=1 - b1)
    state.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = state.m / (1 - b1**state.t)
    v_hat = state.v / (1 - b2**state.t)
    return x - lr * m_hat / (v_hat.sqrt() + state.eps)


def _record(pending: list | None, residual: torch.Tensor, g: torch.Tensor) -> None:
    # kept as tensors until the solve ends (_flush): no device sync per iterate on CUDA
    if pending is not None:
        pending.append((residual.norm() / g.norm().clamp_min(1e-30)).detach())


def _flush(trace: list | None, pending: list | None) -> None:
    if trace is not None and pending:
        trace.extend(torch.stack(pending).tolist())


def solve_approxgrad(hvp: HVP, g: torch.Tensor, p: torch.Tensor, *, steps: int, lr: float, damping: float,
                     state: AdamState | None = None, trace: list | None = None) -> torch.Tensor:
    """``steps`` Adam steps on r(p) = ||(H + s I) p - g||^2 from the warm start ``p``.

    The gradient 2 (H + s I) ((H + s I) p - g) costs two Hessian-vector products (H symmetric).
    ``trace`` (a list) receives ||(H + s I) p - g|| / ||g|| at every iterate evaluated (the warm start
    first, not the returned p): above 1 the solve is worse than p = 0 (too large a step for H's curvature).
    """
    state = state if state is not None else AdamState()
    pending = [] if trace is not None else None
    for _ in range(steps):
        residual = hvp(p) + damping * p - g
        _record(pending, residual, g)
        grad = 2.0 * (hvp(residual) + damping * residual)
        p = adam_step(p, grad, state, lr)
    _flush(trace, pending)
    return p


def solve_cg(hvp: HVP, g: torch.Tensor, p: torch.Tensor, *, steps: int, damping: float, tol: float = 1e-12,
             trace: list | None = None, **_) -> torch.Tensor:
    """``steps`` iterations of conjugate gradient on (H + s I) p = g from the warm start ``p``
    (``trace``: relative residuals as in :func:`solve_approxgrad`, the returned p's last)."""
    pending = [] if trace is not None else None
    r = g - (hvp(p) + damping * p)
    _record(pending, r, g)
    d = r.clone()
    rr = torch.dot(r, r)
    for _ in range(steps):
        if float(rr) <= tol * tol:
            break
        ad = hvp(d) + damping * d
        curvature = torch.dot(d, ad)
        if float(curvature) <= 0:  # indefinite direction: stop rather than diverge
            break
        step = rr / curvature
        p = p + step * d
        r = r - step * ad
        _record(pending, r, g)
        rr_new = torch.dot(r, r)
        d = r + (rr_new / rr) * d
        rr = rr_new
    _flush(trace, pending)
    return p


def solve_neumann(hvp: HVP, g: torch.Tensor, p: torch.Tensor, *, steps: int, lr: float, damping: float,
                  trace: list | None = None, **_) -> torch.Tensor:
    """``steps`` Richardson iterations p <- p + lr (g - (H + s I) p) from ``p``.

    From p = 0 this is the Neumann-series approximation lr * sum_{j<steps} (I - lr (H + s I))^j g of
    (H + s I)^{-1} g; it converges when lr < 2 / lambda_max(H + s I) and H + s I is positive definite.
    ``trace``: relative residuals as in :func:`solve_approxgrad`.
    """
    pending = [] if trace is not None else None
    for _ in range(steps):
        r = g - (hvp(p) + damping * p)
        _record(pending, r, g)
        p = p + lr * r
    _flush(trace, pending)
    return p


SOLVERS = {"approxgrad": solve_approxgrad, "cg": solve_cg, "neumann": solve_neumann}


def flat_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters, in ``model.parameters()`` order (the layout of flat vectors)."""
    return [p for p in model.parameters() if p.requires_grad]


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    if i != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the parameters {i}")
    return out


class FuncLower:
    """A lower-level problem G(w, u) at fixed w given as a function, differentiated with torch.func.

    ``loss_fn(params, u) -> scalar`` where ``params`` is a dict name -> tensor (torch.func style) and
    ``u`` the poison batch. Any randomness inside ``loss_fn`` must be frozen (same noise every call).

    - :meth:`hvp(v)`: H v for a flat v (forward-over-reverse).
    - :meth:`mixed(p)`: d/du (grad_w G . p), shaped like ``u``.
    """

    def __init__(self, loss_fn, params: dict[str, torch.Tensor], u: torch.Tensor):
        self.loss_fn = loss_fn
        self.names = list(params)
        self.params = {k: v.detach() for k, v in params.items()}
        self.u = u.detach()
        self._like = [self.params[k] for k in self.names]

    def _dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, unflatten(flat, self._like)))

    def grad(self) -> torch.Tensor:
        g = torch.func.grad(self.loss_fn)(self.params, self.u)
        return torch.cat([g[k].reshape(-1) for k in self.names])

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        def grad_fn(params):
            return torch.func.grad(self.loss_fn)(params, self.u)

        _, hv = torch.func.jvp(grad_fn, (self.params,), (self._dict(v),))
        return torch.cat([hv[k].reshape(-1) for k in self.names])

    def mixed(self, p: torch.Tensor) -> torch.Tensor:
        pd = self._dict(p)

        def inner(u):
            g = torch.func.grad(self.loss_fn)(self.params, u)
            return sum((g[k] * pd[k]).sum() for k in self.names)

        return torch.func.grad(inner)(self.u)
