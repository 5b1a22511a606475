"""Repeated second-order products at fixed weights and inputs: one forward and backward pass, then R-passes only.

An iterative solve of (H + s I) p = g (ApproxGrad, CG, Neumann) multiplies the same Hessian by a new vector
at every iteration, and the poison's mixed term follows at the same weights and inputs. Each call of
:func:`engine.hvp` repeats the forward pass and the gradient pass although neither depends on the vector.
:class:`CurvatureOperator` runs them once, keeps the activations, ReLU masks, pooling indices and the
backward signals dL/dz of every layer, and each product then runs Pearlmutter's R-forward and R-backward
passes only::

    R-forward    R{z} = f(R{a}; W) + f(a; V)                 (a, W fixed; R{a} = 0 at the input)
    R-backward   R{g_a} = J_a^T R{g_z} + (dJ_a^T/dW [V]) g_z,   R{g_W} = R{g_z} (x) a + g_z (x) R{a}

For a convolution or linear layer that is two products in the R-forward and four in the R-backward,
against three and six more (the forward, the gradient pass and their halves of the pair products) in a
full sweep. The loss is that of :func:`engine.hessian.hvp`: the weighted softmax cross-entropy, or any loss of
the logits given by a :class:`engine.hessian.LogitExpansion` (MACER's).

Layers: the sequential networks of the fused path (nested ``nn.Sequential`` of Normalize, Linear,
Conv2d (groups 1, zero padding), ReLU, MaxPool2d, AvgPool2d, Flatten, eval-mode BatchNorm1d/2d,
Identity, eval-mode Dropout). Plain PyTorch operations on any device and floating dtype; on the CPU
convolutions run channels-last (oneDNN's faster layout here) and a ReLU before a MaxPool2d runs after
it (the same values and derivatives, :func:`engine.smoothing.pool_first_view`), so that its mask covers
a quarter of the values. The references are :func:`engine.hessian.hvp_torch_func` and
:func:`engine.hessian.mixed_vjp_torch_func` (tests/test_curvature.py compares them in float64).

The operator holds the activations of the whole batch (about the memory of one training step's autograd
graph). It does not see later changes to the weights or inputs: build a new one after an update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hessian import (
    LogitExpansion,
    _flat_layers,
    _loss,
    _pair,
    _plan,
    _Unsupported,
    _validate,
    flatten,
    trainable_parameters,
    unflatten,
)
from .models import Normalize
from .smoothing import _commutes

__all__ = ["CurvatureOperator", "curvature_support"]

_conv_backward = torch.ops.aten.convolution_backward
_COLS_MAX_K = 64  # a first convolution with C * kh * kw <= this runs its products as GEMMs on cached columns (CPU)
_COLS_MAX_BYTES = 1 << 30
_FIXED = ("normalize", "relu", "maxpool", "avgpool", "flatten")  # no parameters; backward linear at these inputs


@dataclass
class _Layer:
    kind: str  # normalize, linear, conv, relu, maxpool, avgpool, flatten, batchnorm
    module: nn.Module
    a: torch.Tensor | None = None  # primal input (what the R-passes need of it)
    aux: dict = field(default_factory=dict)
    g: torch.Tensor | None = None  # dL/d(output), parametrised layers only
    pidx: tuple = ()  # positions of (weight, bias) among the trainable parameters (None: frozen or absent)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The flattened layers of ``model`` without Identity / eval Dropout, each ReLU before a MaxPool2d after it."""
    mods = [m for _, m in _flat_layers(model)
            if not (isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training))]
    out, i = [], 0
    while i < len(mods):
        if i + 1 < len(mods) and _commutes(mods[i], mods[i + 1]):
            out += [mods[i + 1], mods[i]]
            i += 2
        else:
            out.append(mods[i])
            i += 1
    return out


def curvature_support(model: nn.Module, x: torch.Tensor) -> tuple[bool, str | None]:
    """(True, None) when :class:`CurvatureOperator` handles ``model`` on inputs like ``x``, else (False, reason)."""
    try:
        _plan(model, x)
    except _Unsupported as exc:
        return False, str(exc)
    return True, None


class CurvatureOperator:
    """Hessian-vector products and mixed terms of the loss at fixed weights and inputs (module docstring).

    ``CurvatureOperator(model, x, y, weights=None, expansion=None)`` checks its arguments as
    :func:`engine.hessian.hvp` does (ValueError / TypeError naming the input), raises ValueError for a model
    outside the supported layers, runs the forward and gradient passes and keeps what the products need.

    - ``loss`` (0-dim) and ``grad`` (per trainable parameter) at those weights and inputs;
    - :meth:`hvp` (v) -> H v, flat when v is flat, else per parameter;
    - :meth:`mixed` (v) -> d/dx (grad_w L . v), shaped like x;
    - :meth:`products` (v) -> (H v, mixed) from one R-pass.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, *,
                 weights: torch.Tensor | None = None, expansion: LogitExpansion | None = None):
        named = trainable_parameters(model)
        zero = [torch.zeros_like(p) for _, p in named]
        params, _, x, y, _, weights = _validate(model, x, y, zero, weights, "auto", expansion)
        ok, reason = curvature_support(model, x)
        if not ok:
            raise ValueError(f"CurvatureOperator cannot run this model: {reason}")
        self.model, self.expansion = model, expansion
        self._params = params
        self._shapes = [p.shape for p in params]
        self._x_shape = x.shape
        self._cl = x.device.type == "cpu"  # channels-last convolutions (oneDNN) on the CPU
        index = {id(p): i for i, p in enumerate(params)}
        self._layers: list[_Layer] = []
        for m in _layers(model):
            lay = _Layer(self._kind(m), m)
            if lay.kind in ("linear", "conv", "batchnorm"):
                w = getattr(m, "weight", None)
                b = getattr(m, "bias", None)
                lay.pidx = (index.get(id(w)) if w is not None else None, index.get(id(b)) if b is not None else None)
            self._layers.append(lay)
        self._lowest = next((i for i, lay in enumerate(self._layers) if any(j is not None for j in lay.pidx)),
                            len(self._layers))
        self._cols_bytes = 0
        with torch.no_grad():
            logits = self._forward(x.detach())
            if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"the model must return (B, classes) logits with B = {x.shape[0]}, got "
                                 f"{tuple(logits.shape)}")
            self.loss = _loss(logits, y, weights, expansion).detach()
            if expansion is not None:
                g = expansion.grad
            else:
                self._p = torch.softmax(logits, 1)
                scale = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
                if weights is not None:
                    scale = scale * weights
                self._scale = scale[:, None]
                g = self._p.clone()
                g[torch.arange(x.shape[0], device=x.device), y] -= 1.0
                g.mul_(self._scale)
            self.grad = self._backward(g)

    # -- layers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _kind(m: nn.Module) -> str:
        kinds = ((Normalize, "normalize"), (nn.Linear, "linear"), (nn.Conv2d, "conv"), (nn.ReLU, "relu"),
                 (nn.MaxPool2d, "maxpool"), (nn.AvgPool2d, "avgpool"), (nn.Flatten, "flatten"))
        return next((name for cls, name in kinds if isinstance(m, cls)), "batchnorm")  # (the supported layers: _plan)

    def _cl4(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self._cl and t.dim() == 4 else t

    @staticmethod
    def _conv_args(m: nn.Conv2d):
        pad = m.padding
        if isinstance(pad, str):
            kh, kw = m.kernel_size
            dh, dw = m.dilation
            pad = (0, 0) if pad == "valid" else (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        return list(m.stride), list(pad), list(m.dilation)

    @staticmethod
    def _bn(m):
        inv = torch.rsqrt(m.running_var + m.eps)
        shape = (1, -1, 1, 1) if isinstance(m, nn.BatchNorm2d) else (1, -1)
        return m.running_mean.reshape(shape), inv.reshape(shape), shape

    def _forward(self, a: torch.Tensor) -> torch.Tensor:
        for li, lay in enumerate(self._layers):
            m, k = lay.module, lay.kind
            if k == "normalize":
                a = m(a)
            elif k == "linear":
                lay.a = a
                a = F.linear(a, m.weight, m.bias)
            elif k == "conv":
                a = self._cl4(a)
                lay.a = a
                lay.aux["w"] = self._cl4(m.weight.detach())
                lay.aux["args"] = self._conv_args(m)
                st, pd, dl = lay.aux["args"]
                a = self._cl4(F.conv2d(a, lay.aux["w"], m.bias, st, pd, dl))  # (one input channel: not always so)
                k_cols = m.weight[0].numel()
                cols_bytes = a.shape[0] * a.shape[2] * a.shape[3] * (k_cols + 1) * a.element_size()
                if (self._cl and li <= self._lowest and k_cols <= _COLS_MAX_K
                        and self._cols_bytes + cols_bytes <= _COLS_MAX_BYTES):
                    # no tangent reaches this input: its products are GEMMs with the im2col of a, made once
                    # (oneDNN is slow for so few input channels)
                    # (B*Ho*Wo, K + 1): the im2col rows and a column of ones, so that one GEMM carries the bias and
                    # one GEMM gives the weight and bias parts of the gradient
                    cols = torch.ones(a.shape[0] * a.shape[2] * a.shape[3], k_cols + 1, dtype=a.dtype, device=a.device)
                    cols[:, :k_cols].view(a.shape[0], -1, k_cols).copy_(
                        F.unfold(lay.a, m.kernel_size, dl, pd, st).transpose(1, 2))
                    lay.aux["cols"], lay.aux["ho"] = cols, a.shape[2]
                    self._cols_bytes += cols_bytes
            elif k == "relu":
                mask = a > 0
                lay.aux["mask"] = mask.to(a.dtype)
                a = a * lay.aux["mask"]
            elif k == "maxpool":
                kh, kw = _pair(m.kernel_size)
                args = ([kh, kw], list(_pair(m.stride if m.stride is not None else m.kernel_size)), list(_pair(m.padding)),
                        list(_pair(m.dilation)), bool(m.ceil_mode))
                out, idx = F.max_pool2d_with_indices(a, *args)
                lay.a, lay.aux["idx"], lay.aux["args"] = a, idx, args
                if self._cl and idx.is_contiguous(memory_format=torch.channels_last):  # gathers on (B, H*W, C) rows
                    lay.aux["idx_nhwc"] = idx.permute(0, 2, 3, 1).reshape(idx.shape[0], -1, idx.shape[1])
                a = out
            elif k == "avgpool":
                args = (list(_pair(m.kernel_size)), list(_pair(m.stride if m.stride is not None else m.kernel_size)),
                        list(_pair(m.padding)), bool(m.ceil_mode), bool(m.count_include_pad), m.divisor_override)
                lay.a, lay.aux["args"] = a, args
                a = F.avg_pool2d(a, *args)
            elif k == "flatten":
                lay.aux["shape"] = a.shape
                a = a.flatten(1)
            else:  # eval-mode batchnorm
                mean, inv, shape = self._bn(m)
                ahat = (a - mean) * inv
                lay.a, lay.aux["inv"], lay.aux["shape"] = ahat, inv, shape
                a = ahat * m.weight.reshape(shape) + m.bias.reshape(shape) if m.affine else ahat
        return a

    def _backward(self, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradient pass: dL/d(output) kept at every parametrised layer, the parameter gradient returned."""
        grads: list[torch.Tensor | None] = [None] * len(self._params)

        def put(i, t):
            if i is not None:
                grads[i] = t if grads[i] is None else grads[i] + t

        for li in range(len(self._layers) - 1, self._lowest - 1, -1):
            lay = self._layers[li]
            m, k = lay.module, lay.kind
            need_input = li > self._lowest
            if k in ("linear", "conv", "batchnorm"):
                lay.g = g
            if k in _FIXED:
                g = self._back_fixed(lay, g)
            elif k == "linear":
                put(lay.pidx[0], g.t() @ lay.a)
                put(lay.pidx[1], g.sum(0))
                g = g @ m.weight if need_input else None
            elif k == "conv":
                st, pd, dl = lay.aux["args"]
                g = self._cl4(g)
                lay.g = g
                gi, gw, gb = _conv_backward(g, lay.a, lay.aux["w"], [m.out_channels] if m.bias is not None else None,
                                            st, pd, dl, False, [0, 0], 1, [need_input, True, m.bias is not None])
                put(lay.pidx[0], gw)
                put(lay.pidx[1], gb)
                g = gi
            else:
                shape, inv = lay.aux["shape"], lay.aux["inv"]
                dims = [0, 2, 3] if len(shape) == 4 else [0]
                if m.affine:
                    put(lay.pidx[0], (g * lay.a).sum(dims))
                    put(lay.pidx[1], g.sum(dims))
                    g = g * (inv * m.weight.reshape(shape))
                else:
                    g = g * inv
        return tuple(torch.zeros_like(p) if t is None else t.reshape(p.shape) for t, p in zip(grads, self._params))

    def _back_fixed(self, lay: _Layer, g: torch.Tensor) -> torch.Tensor:
        """Backward through a layer without parameters, linear in its input at these inputs (Normalize, the ReLU
        mask, pooling, Flatten): the same map carries a gradient and its R-tangent."""
        k = lay.kind
        if k == "normalize":
            return g / lay.module.std
        if k == "relu":
            return g * lay.aux["mask"]
        if k == "maxpool":
            return self._pool_back(lay, g)
        if k == "avgpool":
            return torch.ops.aten.avg_pool2d_backward(g, lay.a, *lay.aux["args"])
        return g.reshape(lay.aux["shape"])  # flatten

    @staticmethod
    def _pool_back(lay: _Layer, g: torch.Tensor) -> torch.Tensor:
        cl = lay.a.dim() == 4 and lay.a.is_contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        return torch.ops.aten.max_pool2d_with_indices_backward(g, lay.a, *lay.aux["args"], lay.aux["idx"])

    # -- products --------------------------------------------------------------------------------------------

    def _tangents(self, v) -> tuple[list[torch.Tensor], bool]:
        flat = isinstance(v, torch.Tensor)
        if flat:
            total = sum(int(torch.Size(s).numel()) for s in self._shapes)
            if v.dim() != 1 or v.numel() != total:
                raise ValueError(f"v as one tensor must be 1-D with {total} elements (the trainable parameters), got "
                                 f"shape {tuple(v.shape)}")
            parts = list(unflatten(v, self._params))
        elif isinstance(v, (list, tuple)) and len(v) == len(self._params):
            parts = list(v)
        else:
            raise ValueError(f"v must be a flat tensor or a sequence of {len(self._params)} per-parameter tensors")
        for t, p in zip(parts, self._params):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"v entry for a parameter of shape {tuple(p.shape)} ({p.dtype}, {p.device}) is "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        return [t.detach() for t in parts], flat

    def _sweep(self, v: list[torch.Tensor], want_hv: bool, want_mixed: bool):
        def tan(i):
            return v[i] if i is not None else None

        # R-forward
        ra: torch.Tensor | None = None
        rin: list[torch.Tensor | None] = [None] * len(self._layers)
        for li, lay in enumerate(self._layers):
            m, k = lay.module, lay.kind
            rin[li] = ra
            if k == "normalize":
                ra = None if ra is None else ra / m.std
            elif k == "linear":
                vw, vb = tan(lay.pidx[0]), tan(lay.pidx[1])
                out = F.linear(lay.a, vw, vb) if vw is not None else None
                if ra is not None:
                    t = F.linear(ra, m.weight)
                    out = t if out is None else out.add_(t)
                if vw is None and vb is not None:
                    out = vb.expand(lay.a.shape[0], -1).clone() if out is None else out + vb
                ra = out
            elif k == "conv":
                st, pd, dl = lay.aux["args"]
                vw, vb = tan(lay.pidx[0]), tan(lay.pidx[1])
                cols = lay.aux.get("cols")
                if vw is not None and cols is not None:  # (B*Ho*Wo, K+1) @ (K+1, O): NHWC rows of a channels-last result
                    b_, o_ = lay.a.shape[0], vw.shape[0]
                    vm = torch.cat([vw.reshape(o_, -1), (vb if vb is not None else vw.new_zeros(o_))[:, None]], 1)
                    rows = torch.mm(cols, vm.t())
                    ho = lay.aux["ho"]
                    out = rows.view(b_, ho, rows.shape[0] // (b_ * ho), o_).permute(0, 3, 1, 2)
                else:
                    out = F.conv2d(lay.a, self._cl4(vw), vb, st, pd, dl) if vw is not None else None
                if ra is not None:
                    ra = self._cl4(ra)
                    rin[li] = ra
                    t = F.conv2d(ra, lay.aux["w"], None, st, pd, dl)
                    out = t if out is None else out.add_(t)
                if vw is None and vb is not None:
                    out = out + vb.reshape(1, -1, 1, 1) if out is not None else self._cl4(
                        F.conv2d(lay.a, torch.zeros_like(lay.aux["w"]), vb, st, pd, dl))
                ra = out
            elif ra is None:  # no tangent yet: only a batchnorm's own parameters start one
                if k == "batchnorm" and lay.module.affine:
                    vg, vb = tan(lay.pidx[0]), tan(lay.pidx[1])
                    shape = lay.aux["shape"]
                    if vg is not None or vb is not None:
                        ra = torch.zeros_like(lay.a)
                        if vg is not None:
                            ra = ra + lay.a * vg.reshape(shape)
                        if vb is not None:
                            ra = ra + vb.reshape(shape)
            elif k == "relu":
                ra = ra * lay.aux["mask"]
            elif k == "maxpool":
                idx = lay.aux["idx"]
                rows = lay.aux.get("idx_nhwc")
                if rows is not None and ra.is_contiguous(memory_format=torch.channels_last):
                    b_, c_, ho, wo = idx.shape
                    ra = ra.permute(0, 2, 3, 1).reshape(b_, -1, c_).gather(1, rows).view(b_, ho, wo, c_).permute(0, 3, 1, 2)
                else:
                    ra = ra.contiguous().flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            elif k == "avgpool":
                ra = F.avg_pool2d(ra, *lay.aux["args"])
            elif k == "flatten":
                ra = ra.flatten(1)
            else:  # batchnorm with a tangent input
                shape, inv = lay.aux["shape"], lay.aux["inv"]
                if m.affine:
                    vg, vb = tan(lay.pidx[0]), tan(lay.pidx[1])
                    out = ra * (inv * m.weight.reshape(shape))
                    if vg is not None:
                        out = out + lay.a * vg.reshape(shape)
                    if vb is not None:
                        out = out + vb.reshape(shape)
                    ra = out
                else:
                    ra = ra * inv
        rz = ra
        assert rz is not None, "a trainable parameter starts a tangent"  # _validate: the model has one
        # R{dL/dz} at the logits
        if self.expansion is not None:
            e = self.expansion
            n, width = e.hess.shape[0], e.hess.shape[1]
            rg = torch.bmm(e.hess, rz.reshape(n, width, 1)).reshape(rz.shape)
        else:
            p = self._p
            rg = (p * rz - p * (p * rz).sum(1, keepdim=True)) * self._scale
        # R-backward
        hv: list[torch.Tensor | None] = [None] * len(self._params)

        def put(i, t):
            if i is not None and want_hv:
                hv[i] = t if hv[i] is None else hv[i] + t

        stop = 0 if want_mixed else self._lowest
        for li in range(len(self._layers) - 1, stop - 1, -1):
            lay = self._layers[li]
            m, k = lay.module, lay.kind
            ra_in = rin[li]
            need_input = want_mixed or li > self._lowest
            if k in _FIXED:
                rg = self._back_fixed(lay, rg)
            elif k == "linear":
                vw = tan(lay.pidx[0])
                if want_hv and lay.pidx[0] is not None:
                    gw = rg.t() @ lay.a
                    if ra_in is not None:
                        gw.addmm_(lay.g.t(), ra_in)
                    put(lay.pidx[0], gw)
                if want_hv and lay.pidx[1] is not None:
                    put(lay.pidx[1], rg.sum(0))
                if need_input:
                    t = rg @ m.weight
                    if vw is not None:
                        t.addmm_(lay.g, vw)
                    rg = t
            elif k == "conv":
                st, pd, dl = lay.aux["args"]
                vw = tan(lay.pidx[0])
                rg = self._cl4(rg)
                want_w, want_b = want_hv and lay.pidx[0] is not None, want_hv and lay.pidx[1] is not None
                cols = lay.aux.get("cols")
                if cols is not None and want_w:  # weight and bias parts as one GEMM on the cached columns
                    rows = rg.permute(0, 2, 3, 1).reshape(-1, rg.shape[1])
                    gwb = torch.mm(rows.t(), cols)
                    gw, gb = gwb[:, :-1].reshape(m.weight.shape), gwb[:, -1]
                    gi = (_conv_backward(rg, lay.a, lay.aux["w"], None, st, pd, dl, False, [0, 0], 1,
                                         [True, False, False])[0] if need_input else None)
                else:
                    gi, gw, gb = _conv_backward(rg, lay.a, lay.aux["w"], [m.out_channels] if want_b else None, st, pd,
                                                dl, False, [0, 0], 1, [need_input, want_w, want_b])
                if want_w:
                    if ra_in is not None:
                        gw = gw + _conv_backward(lay.g, ra_in, lay.aux["w"], None, st, pd, dl, False, [0, 0], 1,
                                                 [False, True, False])[1]
                    put(lay.pidx[0], gw)
                if want_b:
                    put(lay.pidx[1], gb)
                if need_input:
                    if vw is not None:
                        gi = gi.add_(_conv_backward(lay.g, lay.a, self._cl4(vw), None, st, pd, dl, False, [0, 0], 1,
                                                    [True, False, False])[0])
                    rg = gi
            else:
                shape, inv = lay.aux["shape"], lay.aux["inv"]
                dims = [0, 2, 3] if len(shape) == 4 else [0]
                if m.affine:
                    vg = tan(lay.pidx[0])
                    if want_hv:
                        rgg = (rg * lay.a).sum(dims)
                        if ra_in is not None:
                            rgg = rgg + (lay.g * ra_in).sum(dims) * inv.reshape(-1)
                        put(lay.pidx[0], rgg)
                        put(lay.pidx[1], rg.sum(dims))
                    if need_input:
                        t = rg * (inv * m.weight.reshape(shape))
                        if vg is not None:
                            t = t + lay.g * (inv * vg.reshape(shape))
                        rg = t
                elif need_input:
                    rg = rg * inv
        hv_t = None
        if want_hv:
            hv_t = tuple(torch.zeros_like(p) if t is None else t.reshape(p.shape) for t, p in zip(hv, self._params))
        mixed = rg.contiguous().reshape(self._x_shape) if want_mixed else None
        return hv_t, mixed

    def hvp(self, v):
        """H v: flat when ``v`` is one flat tensor (:func:`engine.hessian.flatten` order), else per parameter."""
        parts, flat = self._tangents(v)
        with torch.no_grad():
            hv, _ = self._sweep(parts, True, False)
        return flatten(hv) if flat else hv

    def mixed(self, v) -> torch.Tensor:
        """d/dx (grad_w L . v), shaped like x (as :func:`engine.hessian.mixed_vjp`)."""
        parts, _ = self._tangents(v)
        with torch.no_grad():
            return self._sweep(parts, False, True)[1]

    def products(self, v):
        """(H v, mixed) from one R-pass (H v flat when ``v`` is flat)."""
        parts, flat = self._tangents(v)
        with torch.no_grad():
            hv, mixed = self._sweep(parts, True, True)
        return (flatten(hv) if flat else hv), mixed
