"""Hessian-vector products and the mixed second derivative of the training loss (for ApproxGrad).

The loss of a classifier ``model`` on a batch is the weighted softmax cross-entropy, mean over the
batch::

    L(w, x) = (1/B) * sum_i weights[i] * CE(model(x; w)[i], y[i])        (weights None: all 1)

- :func:`hvp` returns L, its gradient in the trainable parameters w and the Hessian-vector product
  H v = (d^2 L / dw^2) v for a tangent v on w.
- :func:`mixed_vjp` returns the mixed term d/dx (grad_w L . v), the derivative in the input x of the
  directional derivative of the gradient (ApproxGrad's poison gradient, Mehra & Hamm); same shape as x.
- Other losses of the logits (MACER's, say) enter through ``expansion=``: a :class:`LogitExpansion`
  (from :func:`expand_logit_loss`) holds the loss's value, gradient and Hessian blocks at the logits
  model(x). Every backend then differentiates L(w, x) = l(model(x; w)) with l replaced by its
  second-order expansion, which has the same first and second derivatives at that point, so grad, H v
  and the mixed term are those of the true loss. One expansion serves every product at the same
  weights and inputs (the solver's iterations), and the fused sweep needs no loss code of its own.

Backends:

- ``"fused"``: the extension op ``engine::hvp_sequential`` (csrc/hvp_*.cpp, csrc/cuda/hvp_cuda.cu):
  Pearlmutter's R-operator, one forward + R-forward + backward + R-backward sweep sharing the
  activations, for sequential networks (nested ``nn.Sequential`` flattened) of Normalize, Linear,
  Conv2d (groups 1, zero padding), ReLU, MaxPool2d, AvgPool2d, Flatten, BatchNorm1d/2d in eval mode,
  Identity and eval-mode Dropout, ending in (B, classes) logits. float32 / float64, CPU or CUDA.
- ``"torch_func"``: ``torch.func.jvp`` over ``torch.func.grad`` (forward-over-reverse), any model.
- ``"double_backward"``: reverse-over-reverse with ``torch.autograd.grad(create_graph=True)``, any model.
- ``"auto"`` (default): ``"fused"`` when the extension is built and the model is supported, otherwise
  ``"torch_func"`` with a one-time warning that names the reason (e.g. the unsupported layer).

Conventions:

- Parameters are those of ``model.parameters()`` with ``requires_grad=True`` ("trainable"), in that
  order (shared parameters once). Frozen parameters (``requires_grad=False``) are constants: they take
  no tangent and have no entry in ``grad`` / ``hv``.
- ``v``: a sequence of tensors shaped like the trainable parameters, or one flat 1-D tensor of their
  total size (:func:`flatten` order). ``grad`` and ``hv`` are tuples of per-parameter tensors in the
  same order; :func:`flatten` (or ``HVPResult.grad_flat`` / ``hv_flat``) concatenates them.
- BatchNorm layers must be in eval mode (running statistics) in every backend: a BatchNorm in
  training mode raises ``ValueError`` (its Hessian would couple the samples through the batch
  statistics, and every call would update the running statistics).
- Inputs are not modified and no ``.grad`` is accumulated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext
from .models import Normalize

__all__ = [
    "hvp",
    "mixed_vjp",
    "HVPResult",
    "LogitExpansion",
    "expand_logit_loss",
    "BACKENDS",
    "trainable_parameters",
    "flatten",
    "unflatten",
    "fused_support",
    "hvp_fused",
    "mixed_vjp_fused",
    "hvp_torch_func",
    "mixed_vjp_torch_func",
    "hvp_double_backward",
    "mixed_vjp_double_backward",
    "relu_rop_ref",
    "softmax_xent_rop_ref",
    "release_workspace",
]

BACKENDS = ("auto", "fused", "torch_func", "double_backward")
_ALGOS = {"auto": 0, "aten": 1, "gemm": 2, "nhwc": 3}
# layer kinds of the op's int spec (csrc/hvp.h)
_NORMALIZE, _LINEAR, _CONV2D, _RELU, _MAXPOOL, _AVGPOOL, _FLATTEN, _BATCHNORM = range(1, 9)
_warned: set[str] = set()


@dataclass(frozen=True)
class HVPResult:
    """loss: 0-dim; grad, hv: per trainable parameter (``model.parameters()`` order); backend used."""

    loss: torch.Tensor
    grad: tuple[torch.Tensor, ...]
    hv: tuple[torch.Tensor, ...]
    backend: str

    @property
    def grad_flat(self) -> torch.Tensor:
        """The gradient as one 1-D tensor (:func:`flatten` order)."""
        return flatten(self.grad)

    @property
    def hv_flat(self) -> torch.Tensor:
        """H v as one 1-D tensor (:func:`flatten` order)."""
        return flatten(self.hv)


@dataclass(frozen=True)
class LogitExpansion:
    """A loss l(z) of the logits z (B, classes) by its value, gradient and Hessian at z = ``logits``.

    l must be a sum over groups of ``group`` consecutive rows (the noisy copies of one input, say), so its
    Hessian is block diagonal: ``hess`` (B / group, group * classes, group * classes), rows of a group
    flattened row-major. ``grad`` is (B, classes), ``value`` 0-dim. :func:`expand_logit_loss` builds one.
    """

    logits: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor

    @property
    def group(self) -> int:
        return self.hess.shape[1] // self.logits.shape[1]

    def surrogate(self, z: torch.Tensor) -> torch.Tensor:
        """The second-order expansion of l at ``logits``, evaluated at z (differentiable in z)."""
        n, width = self.hess.shape[0], self.hess.shape[1]
        d = (z - self.logits).reshape(n, width)
        return self.value + (self.grad.reshape(n, width) * d).sum() + 0.5 * torch.einsum("gi,gij,gj->", d, self.hess, d)


def expand_logit_loss(group_loss, logits: torch.Tensor, *args: torch.Tensor, group: int = 1) -> LogitExpansion:
    """Value, gradient and block Hessian of l(z) = sum_g group_loss(z_g, *args_g) at z = ``logits``.

    group_loss(z_g, *a_g) -> 0-dim: the loss of one group, z_g (group, classes); each tensor of ``args``
    has B / group rows, row g going to group g (labels, say). Evaluated with torch.func (vmap of grad and
    of jacrev of grad), so group_loss must be written in torch operations without data-dependent Python
    control flow. ``logits`` (B, classes) is detached.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (B, classes) tensor, got {getattr(logits, 'shape', type(logits))}")
    if not isinstance(group, int) or group < 1 or logits.shape[0] % group:
        raise ValueError(f"group must be a positive integer dividing B = {logits.shape[0]}, got {group!r}")
    n, classes = logits.shape[0] // group, logits.shape[1]
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or a.dim() < 1 or a.shape[0] != n:
            raise ValueError(f"args[{i}] must be a tensor with {n} rows (one per group), got "
                             f"{tuple(getattr(a, 'shape', ())) if isinstance(a, torch.Tensor) else type(a).__name__}")
    z = logits.detach().reshape(n, group, classes)

    def grad_with_aux(zg, *ag):  # the gradient, and (gradient, value) carried out of jacrev as its aux
        g, val = torch.func.grad_and_value(group_loss)(zg, *ag)
        return g, (g, val)

    hess, (grad, value) = torch.func.vmap(torch.func.jacrev(grad_with_aux, has_aux=True))(z, *args)
    width = group * classes
    return LogitExpansion(logits.detach(), value.sum().detach(), grad.reshape(n * group, classes).detach(),
                          hess.reshape(n, width, width).detach())


def _check_expansion(expansion, x):
    if not isinstance(expansion, LogitExpansion):
        raise TypeError(f"expansion must be a LogitExpansion (engine.hessian.expand_logit_loss), got "
                        f"{type(expansion).__name__}")
    z = expansion.logits
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"expansion is for {z.shape[0]} rows of logits, x has {x.shape[0]}")
    for name in ("logits", "value", "grad", "hess"):
        t = getattr(expansion, name)
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"expansion.{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")


# -- parameters and tangents ---------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> tuple[tuple[str, torch.Tensor], ...]:
    """(name, parameter) of ``model``'s parameters with requires_grad, in ``model.parameters()`` order."""
    return tuple((n, p) for n, p in model.named_parameters() if p.requires_grad)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter tensors into one 1-D tensor."""
    if len(tensors) == 0:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: nn.Module | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Split a 1-D tensor into tensors shaped like ``like`` (a model's trainable parameters or tensors)."""
    shapes = [p.shape for _, p in trainable_parameters(like)] if isinstance(like, nn.Module) else [t.shape for t in like]
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"expected a 1-D tensor of {total} elements, got {getattr(flat, 'shape', type(flat))}")
    out, pos = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(flat[pos : pos + n].view(s))
        pos += n
    return tuple(out)


# -- validation ------------------------------------------------------------------------------------------


def _check_batchnorm_eval(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"{type(m).__name__} {name or '(model)'} is in training mode; Hessian-vector products need BatchNorm in "
                "eval mode (running statistics): call model.eval() (or .eval() on the BatchNorm layers) first"
            )


def _validate(model, x, y, v, weights, backend, expansion=None):
    """Checked (params, names, x, y, tangents, weights); raises ValueError / TypeError naming the input.

    With an ``expansion`` y is not used (None allowed: zeros stand in) and weights must be None."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a floating tensor of shape (B, C, H, W) (or (B, ...)) with B >= 1, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    B = x.shape[0]
    if expansion is not None:
        _check_expansion(expansion, x)
        if weights is not None:
            raise ValueError("weights do not apply to a loss given by an expansion (weight its group_loss instead)")
        if y is None:
            y = torch.zeros(B, dtype=torch.int64, device=x.device)
    named = trainable_parameters(model)
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    for n, p in named:
        if p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"parameter {n} is {p.dtype} on {p.device}, but x is {x.dtype} on {x.device}; "
                             "move the model or x so that they match")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != B:
        raise ValueError(f"y must be an int64 tensor of shape ({B},), got {getattr(y, 'dtype', type(y))} "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device}, x on {x.device}")
    if bool((y < 0).any()):
        raise ValueError(f"y must hold class indices >= 0, got min {int(y.min())}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.shape[0] != B:
            raise ValueError(f"weights must be a tensor of shape ({B},), got {tuple(getattr(weights, 'shape', ()))}")
        if weights.device != x.device:
            raise ValueError(f"weights is on {weights.device}, x on {x.device}")
        weights = weights.to(x.dtype)
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite")
    params = tuple(p for _, p in named)
    if isinstance(v, torch.Tensor):
        total = sum(p.numel() for p in params)
        if v.dim() != 1 or v.numel() != total:
            raise ValueError(f"v as one tensor must be 1-D with {total} elements (the trainable parameters), got shape "
                             f"{tuple(v.shape)}; or pass a sequence of per-parameter tensors")
        v = unflatten(v, params)
    elif isinstance(v, (list, tuple)):
        if len(v) != len(params):
            raise ValueError(f"v must have one tensor per trainable parameter ({len(params)}), got {len(v)}")
    else:
        raise TypeError(f"v must be a sequence of tensors or a flat 1-D tensor, got {type(v).__name__}")
    for (n, p), t in zip(named, v):
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            raise ValueError(f"v entry for parameter {n} must have shape {tuple(p.shape)}, got "
                             f"{tuple(getattr(t, 'shape', ())) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(f"v entry for parameter {n} is {t.dtype} on {t.device}; expected {p.dtype} on {p.device}")
    _check_batchnorm_eval(model)
    return params, tuple(n for n, _ in named), x, y, tuple(v), weights


def _loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, expansion=None) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"the model must return (B, classes) logits with B = {y.shape[0]}, got {tuple(logits.shape)}")
    if expansion is not None:
        if logits.shape != expansion.logits.shape:
            raise ValueError(f"the model returns logits {tuple(logits.shape)}, the expansion is for "
                             f"{tuple(expansion.logits.shape)}")
        return expansion.surrogate(logits)
    if int(y.max()) >= logits.shape[1]:
        raise ValueError(f"y holds class {int(y.max())}, but the model has {logits.shape[1]} classes")
    if weights is None:
        return F.cross_entropy(logits, y)
    return (F.cross_entropy(logits, y, reduction="none") * weights).sum() / y.shape[0]


# -- fused plan ----------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """The model (or input) is outside what the fused op handles; the message names the layer."""


def _flat_layers(model: nn.Module, prefix: str = "model"):
    if isinstance(model, nn.Sequential):
        for name, child in model._modules.items():  # as Sequential.forward (named_children drops repeats)
            yield from _flat_layers(child, f"{prefix}[{name}]" if name.isdigit() else f"{prefix}.{name}")
    else:
        yield prefix, model


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(frozen=True)
class _Plan:
    spec: tuple[int, ...]
    params: tuple[torch.Tensor, ...]  # per layer parameter, in sweep order (may repeat shared ones)
    index: tuple[int | None, ...]  # its position among the trainable parameters (None: frozen)
    buffers: tuple[torch.Tensor, ...]


def _plan(model: nn.Module, x: torch.Tensor) -> _Plan:
    if not isinstance(model, nn.Sequential):
        raise _Unsupported(f"the model is a {type(model).__name__}, not an nn.Sequential")
    trainable = {id(p): i for i, (_, p) in enumerate(trainable_parameters(model))}
    spec: list[int] = []
    params: list[torch.Tensor] = []
    buffers: list[torch.Tensor] = []
    ndim = x.dim()
    covered: set[int] = set()

    def need(dims: int, where: str, what: str):
        if ndim != dims:
            raise _Unsupported(f"{where} ({what}) gets a {ndim}-D input; the fused path needs {dims}-D there")

    for where, m in _flat_layers(model):
        what = type(m).__name__
        if isinstance(m, Normalize):
            need(4, where, what)
            spec += [_NORMALIZE]
            buffers += [m.mean.reshape(-1).to(x.dtype), m.std.reshape(-1).to(x.dtype)]
        elif isinstance(m, nn.Linear):
            need(2, where, what)
            spec += [_LINEAR, int(m.bias is not None)]
            params += [m.weight] + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, nn.Conv2d):
            need(4, where, what)
            if m.groups != 1 or m.padding_mode != "zeros" or type(m) is not nn.Conv2d:
                raise _Unsupported(f"{where} ({what}) has groups={m.groups}, padding_mode={m.padding_mode!r}; "
                                   "the fused path needs groups=1 and zero padding")
            kh, kw = m.kernel_size
            dh, dw = m.dilation
            if isinstance(m.padding, str):
                if m.padding == "valid":
                    ph = pw = 0
                elif (dh * (kh - 1)) % 2 == 0 and (dw * (kw - 1)) % 2 == 0:  # symmetric 'same'
                    ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
                else:
                    raise _Unsupported(f"{where} ({what}) has asymmetric padding='same'")
            else:
                ph, pw = m.padding
            spec += [_CONV2D, int(m.bias is not None), *m.stride, ph, pw, dh, dw]
            params += [m.weight] + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, nn.ReLU):
            spec += [_RELU]
        elif isinstance(m, nn.MaxPool2d):
            need(4, where, what)
            if m.return_indices:
                raise _Unsupported(f"{where} ({what}) returns indices")
            stride = m.stride if m.stride is not None else m.kernel_size
            spec += [_MAXPOOL, *_pair(m.kernel_size), *_pair(stride), *_pair(m.padding), *_pair(m.dilation),
                     int(m.ceil_mode)]
        elif isinstance(m, nn.AvgPool2d):
            need(4, where, what)
            stride = m.stride if m.stride is not None else m.kernel_size
            div = m.divisor_override
            spec += [_AVGPOOL, *_pair(m.kernel_size), *_pair(stride), *_pair(m.padding), int(m.ceil_mode),
                     int(m.count_include_pad), int(div) if div else 0]
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise _Unsupported(f"{where} ({what}) has start_dim={m.start_dim}, end_dim={m.end_dim}; needs 1, -1")
            spec += [_FLATTEN]
            ndim = 2
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            need(2 if isinstance(m, nn.BatchNorm1d) else 4, where, what)
            if m.training:
                raise ValueError(f"{where} ({what}) is in training mode; call model.eval() first")
            if m.running_mean is None or m.running_var is None:
                raise _Unsupported(f"{where} ({what}) has no running statistics (track_running_stats=False)")
            spec += [_BATCHNORM, int(m.affine)]
            buffers += [m.running_mean.to(x.dtype), 1.0 / torch.sqrt(m.running_var.to(x.dtype) + m.eps)]
            if m.affine:
                params += [m.weight, m.bias]
        elif isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training):
            continue
        else:
            mode = " in training mode" if isinstance(m, nn.Dropout) else ""
            raise _Unsupported(f"{where} ({what}{mode}) is not supported by the fused path")
        covered.update(id(p) for p in m.parameters(recurse=False))
    if ndim != 2:
        raise _Unsupported(f"the model output is {ndim}-D; the fused path needs (B, classes) logits")
    for n, p in trainable_parameters(model):
        if id(p) not in covered:
            raise _Unsupported(f"parameter {n} belongs to no supported layer")
    return _Plan(tuple(spec), tuple(params), tuple(trainable.get(id(p)) for p in params), tuple(buffers))


def _fused_unavailable(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the fused path cannot run this model on x (None when it can); the model is checked first."""
    try:
        _plan(model, x)
    except _Unsupported as exc:
        return str(exc)
    if not _ext.available():
        return f"the extension engine._C is unavailable ({_ext.load_error()})"
    if x.dtype not in (torch.float32, torch.float64):
        return f"x is {x.dtype}; the fused path handles float32 and float64"
    if x.device.type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("engine::hvp_sequential", "CUDA"):
            return "engine._C was built without its CUDA sources"
    elif x.device.type != "cpu":
        return f"the fused path runs on CPU and CUDA, not {x.device.type}"
    return None


def fused_support(model: nn.Module, x: torch.Tensor) -> tuple[bool, str | None]:
    """(True, None) when ``backend="fused"`` can run ``model`` on inputs like ``x``, else (False, reason)."""
    reason = _fused_unavailable(model, x)
    return reason is None, reason


def _run_fused(model, x, y, v, weights, want_params, want_mixed, algo, expansion=None):
    if algo not in _ALGOS:
        raise ValueError(f"algo must be one of {tuple(_ALGOS)}, got {algo!r}")
    reason = _fused_unavailable(model, x)
    if reason is not None:
        raise ValueError(f"backend='fused' cannot run this model: {reason}")
    plan = _plan(model, x)
    n_train = len(v)
    tangents = [v[i] if i is not None else torch.zeros_like(p) for p, i in zip(plan.params, plan.index)]
    try:
        with torch.no_grad():
            loss, grads, hvs, mixed = torch.ops.engine.hvp_sequential(
                x.detach(), y, weights, [p.detach() for p in plan.params], [t.detach() for t in tangents],
                list(plan.buffers), list(plan.spec), want_params, want_mixed, _ALGOS[algo],
                None if expansion is None else expansion.grad, None if expansion is None else expansion.hess)
        if expansion is not None:
            loss = expansion.value
    except RuntimeError as exc:
        if "softmax_xent_rop: label" in str(exc):  # y beyond the model's classes: a bad input like the others
            raise ValueError(str(exc).split("\n")[0]) from None
        raise
    if not want_params:
        return loss, None, None, mixed
    grad: list[torch.Tensor | None] = [None] * n_train
    hv: list[torch.Tensor | None] = [None] * n_train
    for i, g, h in zip(plan.index, grads, hvs):
        if i is None:
            continue
        grad[i] = g if grad[i] is None else grad[i] + g  # a parameter used by several layers sums their terms
        hv[i] = h if hv[i] is None else hv[i] + h
    return loss, tuple(grad), tuple(hv), mixed


def hvp_fused(model, x, y, v, *, weights=None, algo: str = "auto", expansion=None) -> HVPResult:
    """:func:`hvp` on the fused op; ``algo``: "auto", "aten", "gemm" or "nhwc" (csrc/hvp.h)."""
    params, _, x, y, v, weights = _validate(model, x, y, v, weights, "fused", expansion)
    loss, grad, hv, _ = _run_fused(model, x, y, v, weights, True, False, algo, expansion)
    return HVPResult(loss, grad, hv, "fused")


def mixed_vjp_fused(model, x, y, v, *, weights=None, algo: str = "auto", expansion=None) -> torch.Tensor:
    """:func:`mixed_vjp` on the fused op (``algo`` as in :func:`hvp_fused`)."""
    _, _, x, y, v, weights = _validate(model, x, y, v, weights, "fused", expansion)
    return _run_fused(model, x, y, v, weights, False, True, algo, expansion)[3]


def release_workspace() -> int:
    """Free the calling thread's pool of CPU scratch buffers kept by the fused op; returns the bytes freed.

    The CPU sweep keeps its large intermediates between calls (first-touch page faults of fresh
    allocations cost more than the arithmetic on them); the pool holds at most the working set of the
    last call. Returns 0 when the extension is unavailable.
    """
    if not _ext.available():
        return 0
    return int(torch.ops.engine.hvp_release_workspace())


# -- plain-PyTorch references ------------------------------------------------------------------------------


def relu_rop_ref(pair: torch.Tensor) -> torch.Tensor:
    """Reference of ``engine::relu_rop_`` (out of place): pair (2B, ...) = [z; R{z}] -> [relu(z); (z > 0) R{z}]."""
    z, rz = pair.chunk(2)
    return torch.cat([torch.relu(z), torch.where(z > 0, rz, torch.zeros_like(rz))])


def softmax_xent_rop_ref(logits_pair: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None):
    """Reference of ``engine::softmax_xent_rop``: (loss, [dL/dz; R{dL/dz}]) by torch.func (jvp of grad).

    logits_pair: (2B, classes) = [z; R{z}]; L = (1/B) sum_i weights[i] CE(z_i, y_i).
    """
    z, rz = logits_pair.chunk(2)
    (g, loss), (rg, _) = torch.func.jvp(torch.func.grad_and_value(lambda t: _loss(t, y, weights)), (z,), (rz,))
    return loss, torch.cat([g, rg])


def _functional_loss(model, names, x, y, weights, expansion=None):
    def loss(ps, xx):
        return _loss(torch.func.functional_call(model, dict(zip(names, ps)), (xx,)), y, weights, expansion)

    return loss


def hvp_torch_func(model, x, y, v, *, weights=None, expansion=None) -> HVPResult:
    """Reference :func:`hvp`: ``torch.func.jvp`` of ``torch.func.grad_and_value`` (forward-over-reverse)."""
    params, names, x, y, v, weights = _validate(model, x, y, v, weights, "torch_func", expansion)
    loss = _functional_loss(model, names, x, y, weights, expansion)
    primals = tuple(p.detach() for p in params)
    (grad, value), (hv, _) = torch.func.jvp(lambda *ps: torch.func.grad_and_value(lambda q: loss(q, x))(ps),
                                            primals, tuple(t.detach() for t in v))
    return HVPResult(value.detach(), tuple(grad), tuple(hv), "torch_func")


def mixed_vjp_torch_func(model, x, y, v, *, weights=None, expansion=None) -> torch.Tensor:
    """Reference :func:`mixed_vjp`: ``torch.func.jvp`` in w of ``torch.func.grad`` in x."""
    params, names, x, y, v, weights = _validate(model, x, y, v, weights, "torch_func", expansion)
    loss = _functional_loss(model, names, x, y, weights, expansion)
    xd = x.detach()
    _, mixed = torch.func.jvp(lambda *ps: torch.func.grad(lambda xx: loss(ps, xx))(xd), tuple(p.detach() for p in params),
                              tuple(t.detach() for t in v))
    return mixed


def _double_backward(model, x, y, v, weights, wrt_input, expansion=None):
    params, _, x, y, v, weights = _validate(model, x, y, v, weights, "double_backward", expansion)
    with torch.enable_grad():
        xx = x.detach().requires_grad_(wrt_input)
        loss = _loss(model(xx), y, weights, expansion)
        grad = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        grad = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grad, params))
        dot = sum((g * t).sum() for g, t in zip(grad, v))
        targets = (xx,) if wrt_input else params
        if not dot.requires_grad:  # the gradient does not depend on the targets
            second = tuple(torch.zeros_like(t) for t in targets)
        else:
            second = torch.autograd.grad(dot, targets, allow_unused=True)
            second = tuple(torch.zeros_like(t) if s is None else s for s, t in zip(second, targets))
    return loss.detach(), tuple(g.detach() for g in grad), second


def hvp_double_backward(model, x, y, v, *, weights=None, expansion=None) -> HVPResult:
    """Reference :func:`hvp`: ``torch.autograd.grad`` twice (reverse-over-reverse)."""
    loss, grad, hv = _double_backward(model, x, y, v, weights, False, expansion)
    return HVPResult(loss, grad, hv, "double_backward")


def mixed_vjp_double_backward(model, x, y, v, *, weights=None, expansion=None) -> torch.Tensor:
    """Reference :func:`mixed_vjp`: gradient in x of grad_w L . v (reverse-over-reverse)."""
    return _double_backward(model, x, y, v, weights, True, expansion)[2][0]


# -- public API ----------------------------------------------------------------------------------------------


def _choose(model, x, backend) -> str:
    if backend != "auto":
        return backend
    reason = _fused_unavailable(model, x)
    if reason is None:
        return "fused"
    msg = f"engine.hvp / mixed_vjp: the fused path is not used because {reason}; falling back to torch.func"
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return "torch_func"


def hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, v, *, weights: torch.Tensor | None = None,
        backend: str = "auto", expansion: LogitExpansion | None = None) -> HVPResult:
    """Loss, gradient and Hessian-vector product of the weighted cross-entropy in the trainable parameters.

    model: classifier returning (B, classes) logits; x: (B, C, H, W) floating, on the model's device and
    dtype; y: (B,) int64 labels; v: tangent on the trainable parameters (per-parameter sequence or flat
    1-D tensor); weights: optional (B,) per-sample weights (L = (1/B) sum_i weights[i] CE_i).
    Returns :class:`HVPResult` (loss 0-dim; grad and hv per trainable parameter, ``model.parameters()``
    order). All backends compute the same quantities (up to rounding).
    expansion: another loss of the logits instead of the cross-entropy (module docstring), expanded at
    model(x) at the current weights; y may then be None and weights must be None.
    """
    _validate(model, x, y, v, weights, backend, expansion)
    chosen = _choose(model, x, backend)
    if chosen == "fused":
        return hvp_fused(model, x, y, v, weights=weights, expansion=expansion)
    if chosen == "torch_func":
        return hvp_torch_func(model, x, y, v, weights=weights, expansion=expansion)
    return hvp_double_backward(model, x, y, v, weights=weights, expansion=expansion)


def mixed_vjp(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, v, *, weights: torch.Tensor | None = None,
              backend: str = "auto", expansion: LogitExpansion | None = None) -> torch.Tensor:
    """The mixed second derivative d/dx (grad_w L . v), shape of x (B, C, H, W).

    Arguments as in :func:`hvp`. This is R_v{grad_x L}: the derivative of the input gradient along the
    parameter tangent v, ApproxGrad's correction term (d/du grad_w G)^T p with p = v.
    """
    _validate(model, x, y, v, weights, backend, expansion)
    chosen = _choose(model, x, backend)
    if chosen == "fused":
        return mixed_vjp_fused(model, x, y, v, weights=weights, expansion=expansion)
    if chosen == "torch_func":
        return mixed_vjp_torch_func(model, x, y, v, weights=weights, expansion=expansion)
    return mixed_vjp_double_backward(model, x, y, v, weights=weights, expansion=expansion)
