"""PACD's lower level: the training loss G(w, u) of one outer step and its second-order products.

:class:`LowerLevel` evaluates the procedure's training loss (Gaussian augmentation, MACER or SmoothAdv) on one
outer step's minibatch (:class:`OuterBatch`: clean non-target images plus a batch of the poison) with noise drawn
from fixed keys, and gives the Hessian-vector and mixed products that the hypergradient needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import bilevel
from ..smoothing import pool_first_view
from ..validate import InputError
from .objective import _generator

__all__ = ["HVP_BACKENDS", "METHODS", "LowerLevel", "OuterBatch", "resolve_method_args"]

METHODS = ("gaussian", "macer", "smoothadv")
# "cached": one engine.curvature.CurvatureOperator per solve (forward and gradient pass once, R-passes per product);
# the others: engine.hvp's backends, a full sweep per product. "auto": cached where the model is supported.
HVP_BACKENDS = ("auto", "cached", "fused", "torch_func", "double_backward")


class _Functional(torch.nn.Module):
    """``model`` evaluated with the given parameter dict (torch.func.functional_call)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.params = params

    def forward(self, x):
        return torch.func.functional_call(self.model, self.params, (x,))


@dataclass
class OuterBatch:
    """One outer step's minibatch and frozen randomness."""

    xc: torch.Tensor  # (Bc, C, H, W) clean non-target images
    yc: torch.Tensor
    pos: torch.Tensor  # (Bp,) positions of the poison batch in u
    yp: torch.Tensor
    xv: torch.Tensor  # (Bv, C, H, W) validation images of the target class
    seed: int  # key of this step's randomness
    rows: torch.Tensor | None = None  # data-parallel share: this rank's rows of the global [clean; poison] batch
    total: int | None = None  # rows of the global batch (None: this batch is the whole one)


def resolve_method_args(method: str, args: dict) -> dict:
    """The lower-level procedure's arguments: ``args`` over its defaults (macer k, beta, gamma, lbd; smoothadv eps,
    steps, m); ValueError for an argument the procedure does not take."""
    defaults = {
        "gaussian": {},
        "macer": {"k": 2, "beta": 16.0, "gamma": 8.0, "lbd": 1.0},
        "smoothadv": {"eps": 0.5, "steps": 10, "m": 1},
    }[method]
    unknown = set(args) - set(defaults)
    if unknown:
        raise InputError(f"unknown arguments for method {method!r}: {sorted(unknown)} (known: {sorted(defaults)})")
    return {**defaults, **args}


class LowerLevel:
    """G(w, u) of one outer step: the procedure's training loss on the clean batch plus the poison batch.

    ``loss(params, u, key)`` evaluates it with the noise drawn from ``key`` (same key, same noise), so
    the Hessian and mixed products see one fixed sample of the stochastic objective.
    """

    def __init__(self, method: str, model: torch.nn.Module, step: OuterBatch, sigma: float, margs: dict):
        self.method, self.model, self.step, self.sigma, self.margs = method, model, step, sigma, margs
        self.forward = pool_first_view(model)  # same layers and gradients, faster to train (smoothing.pool_first_view)
        self.y = torch.cat([step.yc, step.yp])
        self.delta = None
        # a data-parallel share (step.rows of step.total): the global batch's noise rows, its loss scale
        self.share = step.rows is not None
        self.scale = self.y.shape[0] / step.total if self.share else 1.0

    def _noise(self, shape_rest: tuple, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of this batch's rows (B, *shape_rest): with a share, the global batch's draw at its
        rows, so that every row sees the noise it has in one process."""
        if not self.share:
            return torch.randn((like.shape[0], *shape_rest), generator=g, device=like.device, dtype=like.dtype)
        full = torch.randn((self.step.total, *shape_rest), generator=g, device=like.device, dtype=like.dtype)
        return full[self.step.rows.to(like.device)]

    def prepare(self, u_batch: torch.Tensor) -> None:
        """SmoothAdv: attack points for the clean and poison batch at the current weights (outside the graph)."""
        if self.method != "smoothadv":
            return
        from ..attacks import smoothadv

        x = torch.cat([self.step.xc, u_batch.detach()])
        g = _generator(x.device, self.step.seed, 11)
        # a share: the attack's noise at its rows of the global draw (the attack is per row; only the random direction
        # that replaces an exactly zero gradient, drawn after the noise, differs from one process's)
        noise = self._noise((self.margs["m"], *x.shape[1:]), g, x) if self.share else None
        adv = smoothadv(
            self.forward,
            x,
            self.y,
            sigma=self.sigma,
            eps=self.margs["eps"],
            steps=self.margs["steps"],
            m=self.margs["m"],
            generator=g,
            noise=noise,
        )
        self.delta = (adv - x).detach()

    def noisy_inputs(self, u_batch: torch.Tensor, key: int) -> torch.Tensor:
        """Cross-entropy procedures: the batch [clean; poison] (+ SmoothAdv perturbation) + sigma * noise(key)."""
        x = torch.cat([self.step.xc, u_batch])
        if self.delta is not None:
            x = x + self.delta
        g = _generator(x.device, self.step.seed, key)
        return x + self.sigma * self._noise(tuple(x.shape[1:]), g, x)

    def _macer_inputs(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        from ..losses import macer_inputs

        k = self.margs["k"]
        return macer_inputs(x, self.sigma, k, g, noise=self._noise((k, *x.shape[1:]), g, x) if self.share else None)

    def loss(self, model: torch.nn.Module, u_batch: torch.Tensor, key: int) -> torch.Tensor:
        """G on this batch; with a share, its rows' part of the global batch's mean (the ranks' parts sum to G)."""
        if self.method == "macer":
            from ..losses import macer, macer_terms

            m = self.margs
            x = torch.cat([self.step.xc, u_batch])
            g = _generator(x.device, self.step.seed, key)
            if not self.share:
                return macer(model, x, self.y, sigma=self.sigma, k=m["k"], beta=m["beta"], gamma=m["gamma"],
                             lbd=m["lbd"], generator=g)
            logits = model(self._macer_inputs(x, g)).reshape(x.shape[0], m["k"], -1)
            cls, rob = macer_terms(logits, self.y, self.sigma, m["beta"], m["gamma"])
            return (cls.sum() + m["lbd"] * rob.sum()) / self.step.total
        if not self.share:
            return F.cross_entropy(model(self.noisy_inputs(u_batch, key)), self.y)
        return F.cross_entropy(model(self.noisy_inputs(u_batch, key)), self.y, reduction="sum") / self.step.total

    def products(self, u_batch: torch.Tensor, key: int, backend: str = "auto"):
        """(hvp, mixed) closures at the current weights for the noise sample ``key``; flat vectors in,
        flat H v and the poison-batch mixed term d/du (grad_w G . p) out.

        Cross-entropy procedures (Gaussian augmentation, SmoothAdv): with ``backend`` "auto" (where the model
        is supported) or "cached", one :class:`engine.curvature.CurvatureOperator` at these weights and inputs
        runs the forward and gradient passes once and each product its R-passes only; with "fused",
        "torch_func" or "double_backward", :func:`engine.hvp` / :func:`engine.mixed_vjp` with that backend
        (a full sweep per product; "auto" falls back to engine.hvp's choice). MACER's loss is not a
        cross-entropy: one forward pass gives the logits of its noisy copies, where the loss is expanded to
        second order (:func:`engine.hessian.expand_logit_loss`, exact first and second derivatives there),
        and the same products run on that expansion; the poison's mixed term sums those of its k copies.
        With ``backend="torch_func"`` MACER instead differentiates the whole loss with torch.func (the plain
        reference, about 2x slower).
        """
        u_batch = u_batch.detach()
        if self.method != "macer" or backend != "torch_func":
            from ..curvature import CurvatureOperator, curvature_support
            from ..hessian import expand_logit_loss, mixed_vjp
            from ..hessian import hvp as hvp_op

            n_clean = self.step.xc.shape[0]
            if self.method == "macer":
                from ..losses import macer_terms

                m = self.margs
                x = torch.cat([self.step.xc, u_batch])
                b, copies = (self.step.total if self.share else x.shape[0]), m["k"]
                inputs = self._macer_inputs(x, _generator(x.device, self.step.seed, key)).detach()
                with torch.no_grad():
                    logits = self.model(inputs)

                def group_loss(z, yi):  # one input's k copies: its share of the batch loss
                    cls, rob = macer_terms(z[None], yi[None], self.sigma, m["beta"], m["gamma"])
                    return (cls[0] + m["lbd"] * rob[0]) / b

                y, expansion = None, expand_logit_loss(group_loss, logits, self.y, group=copies)
            else:
                inputs, y, expansion, copies = self.noisy_inputs(u_batch, key).detach(), self.y, None, 1
            # a share's products are its rows' parts of the global batch's (cross-entropy: weights B_local / B_global)
            weights = (torch.full((inputs.shape[0],), self.scale, dtype=inputs.dtype, device=inputs.device)
                       if self.share and expansion is None else None)

            cached = backend == "cached"
            if backend in ("auto", "cached"):
                supported, reason = curvature_support(self.model, inputs)
                if cached and not supported:
                    raise InputError(f"hvp_backend='cached' cannot run this model: {reason}")
                cached = supported
            if cached:
                op = CurvatureOperator(self.model, inputs, y, weights=weights, expansion=expansion)
                hvp, mixed_of = op.hvp, op.mixed
            else:
                def hvp(v):
                    return hvp_op(self.model, inputs, y, v, weights=weights, backend=backend, expansion=expansion).hv_flat

                def mixed_of(p):
                    return mixed_vjp(self.model, inputs, y, p, weights=weights, backend=backend, expansion=expansion)

            def mixed(p):  # the input gradient of each copy, summed per image (one copy: unchanged)
                r = mixed_of(p)
                return r.reshape((-1, copies) + tuple(r.shape[1:])).sum(1)[n_clean:]

            return hvp, mixed
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

        def loss_fn(prm, u):
            return self.loss(_Functional(self.model, prm), u, key)

        fl = bilevel.FuncLower(loss_fn, params, u_batch)
        return fl.hvp, fl.mixed


# the former private names
_Step = OuterBatch
_Lower = LowerLevel
_method_args = resolve_method_args
