"""Training losses of the certified-robust procedures (the PACD lower-level problems).

- :func:`gaussian_augmentation` - Cohen et al. (2019): cross-entropy on Gaussian-noised inputs.
- :func:`macer` - Zhai et al. (ICLR 2020): soft smoothed classification loss plus a hinge on the
  soft certified radius.

Every loss takes pixels in [0, 1] (the model normalises), draws its noise from ``generator`` (on
x's device, fresh at every call) and is differentiable in the model's parameters and in ``x``.
SmoothAdv's attack lives in :mod:`engine.attacks`; its training loss is cross-entropy on noisy
copies of the attacked inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_augmentation", "macer", "PROB_CLAMP"]

# MACER: probabilities are clamped to [PROB_CLAMP, 1 - PROB_CLAMP] before Phi^-1, so that
# Phi^-1 stays within +-4.75 and neither the loss nor its gradient can be NaN or Inf.
PROB_CLAMP = 1e-6


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of shape (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}")


def _check_sigma(sigma, allow_zero: bool = True) -> float:
    sigma = float(sigma)
    if not (sigma >= 0.0 if allow_zero else sigma > 0.0) or sigma != sigma or sigma == float("inf"):
        raise ValueError(f"sigma must be a finite number {'>=' if allow_zero else '>'} 0, got {sigma}")
    return sigma


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_float(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _noisy_cross_entropy(model, x, y, sigma: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on m noisy copies of each input.

    x: (B, C, H, W); y: (B,); noise: (B, m, C, H, W) standard normal draws, or None (one clean copy).
    Returns per-copy losses (B * m,) and logits (B * m, classes), copies of one input adjacent.
    """
    if noise is None:
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="none"), logits
    b, m = noise.shape[:2]
    logits = model((x.unsqueeze(1) + sigma * noise).reshape((b * m,) + tuple(x.shape[1:])))
    return F.cross_entropy(logits, y.repeat_interleave(m), reduction="none"), logits


def _gaussian_augmentation(model, x, y, sigma: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy (B,) and logits (B, classes) on x + sigma * N(0, I)."""
    noise = None
    if sigma > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype).unsqueeze(1)
    return _noisy_cross_entropy(model, x, y, sigma, noise)


def gaussian_augmentation(model, x, y, *, sigma, generator=None, reduction="mean") -> torch.Tensor:
    """Cross-entropy of ``model`` on Gaussian-noised inputs (Cohen et al. 2019).

    x: (B, C, H, W) pixels in [0, 1]; y: (B,) int64 labels; sigma >= 0 (0 = standard training).
    Fresh noise e ~ N(0, sigma^2 I) of shape (B, C, H, W) is drawn from ``generator`` (on x's
    device) at every call. Returns the mean loss (scalar), or (B,) with ``reduction="none"``.
    """
    _check_xy(x, y)
    sigma = _check_sigma(sigma)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss, _ = _gaussian_augmentation(model, x, y, sigma, generator)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _check_macer(sigma, k, beta, gamma, lbd) -> tuple[float, int, float, float, float]:
    return (
        _check_sigma(sigma),
        _check_int("k", k, 1),
        _check_float("beta", beta, positive=True),
        _check_float("gamma", gamma, nonnegative=True),
        _check_float("lbd", lbd, nonnegative=True),
    )


def _macer(model, x, y, sigma, k, beta, gamma, lbd, generator):
    """MACER terms. Returns (loss scalar, classification (B,), robustness (B,), logits (B, k, classes))."""
    b = x.shape[0]
    logits = model(macer_inputs(x, sigma, k, generator))
    logits = logits.reshape(b, k, logits.shape[-1])
    if logits.shape[-1] < 2:
        raise ValueError(f"macer needs at least 2 classes, the model returns {logits.shape[-1]}")
    cls, rob = macer_terms(logits, y, sigma, beta, gamma)
    loss = (cls.sum() + lbd * rob.sum()) / b
    return loss, cls, rob, logits


def macer_inputs(x, sigma: float, k: int, generator, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The (B * k, C, H, W) noisy copies MACER's model sees: x[:, None] + sigma * noise, one noise draw of
    shape (B, k, C, H, W) from ``generator`` (copies of one input adjacent), or the ``noise`` given."""
    b = x.shape[0]
    if noise is None:
        noise = torch.randn((b, k) + tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    return (x.unsqueeze(1) + sigma * noise).reshape((b * k,) + tuple(x.shape[1:]))


def macer_terms(logits, y, sigma: float, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MACER's per-input terms from the logits (B, k, classes) of the noisy copies: classification (B,)
    and robustness (B,) (the loss is (cls.sum() + lbd * rob.sum()) / B). Written without data-dependent
    control flow, so torch.func can vmap and differentiate it (engine.hessian.expand_logit_loss)."""
    # classification: -log(mean_k softmax(logits)_y + 1e-10)
    p_soft = F.softmax(logits, dim=-1).mean(1)
    cls = -torch.log(p_soft.gather(1, y[:, None]).squeeze(1) + 1e-10)
    # robustness: hinge on the soft radius of the beta-sharpened smoothed classifier
    p_beta = F.softmax(beta * logits, dim=-1).mean(1)
    top2, top2_idx = p_beta.topk(2, dim=1)
    p1 = top2[:, 0].clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    p2 = top2[:, 1].clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    gap = torch.special.ndtri(p1) - torch.special.ndtri(p2)  # finite: |Phi^-1| <= 4.75 after the clamp
    mask = (top2_idx[:, 0] == y) & (gap.abs() <= gamma)
    rob = torch.where(mask, (sigma / 2) * (gamma - gap), torch.zeros_like(gap))
    return cls, rob


def macer(model, x, y, *, sigma, k=16, beta=16.0, gamma=8.0, lbd=12.0, generator=None) -> torch.Tensor:
    """MACER loss (Zhai et al. 2020): soft smoothed cross-entropy + lbd * hinge on the soft radius.

    Args:
        model: classifier, (N, C, H, W) pixels in [0, 1] -> (N, classes) logits, classes >= 2.
        x: (B, C, H, W) pixels in [0, 1]; y: (B,) int64 labels.
        sigma: noise level >= 0; k: noise draws per input (>= 1); beta: inverse temperature (> 0)
            of the soft smoothed classifier of the robustness term; gamma: hinge (>= 0);
            lbd: weight of the robustness term (>= 0).
        generator: noise source on x's device; the noise is one draw of shape (B, k, C, H, W)
            (standard normal, scaled by sigma), the model sees x[:, None] + noise flattened to
            (B * k, C, H, W).

    Returns a scalar: (sum_i cls_i + lbd * sum_i rob_i) / B with
    cls_i = -log(mean_k softmax(logits)_{y_i} + 1e-10) and, with p = mean_k softmax(beta * logits),
    p1 >= p2 its top two entries clamped to [PROB_CLAMP, 1 - PROB_CLAMP] and
    g = Phi^-1(p1) - Phi^-1(p2): rob_i = (sigma / 2) * (gamma - g) when argmax p = y_i and
    |g| <= gamma, else 0. The clamp keeps the loss and its gradients finite for any logits.
    """
    _check_xy(x, y)
    sigma, k, beta, gamma, lbd = _check_macer(sigma, k, beta, gamma, lbd)
    return _macer(model, x, y, sigma, k, beta, gamma, lbd, generator)[0]
