"""Adversarial attacks on smoothed classifiers.

- :func:`smoothadv` - Salman et al. (NeurIPS 2019): L2 PGD against the soft smoothed classifier,
  the attack SmoothAdv trains on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import _check_float, _check_int, _check_sigma, _check_xy

__all__ = ["smoothadv", "smoothed_soft_loss"]


def smoothed_soft_loss(model, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-example loss of the soft smoothed classifier that SmoothAdv maximises.

    x: (B, C, H, W); y: (B,) int64; noise: (B, m, C, H, W) standard normal draws.
    Returns (B,): -log(mean_j softmax(model(x + sigma * noise_j))_y), probabilities clamped at 1e-20.
    """
    b, m = noise.shape[:2]
    logits = model((x.unsqueeze(1) + sigma * noise).reshape((b * m,) + tuple(x.shape[1:])))
    p = F.softmax(logits, dim=-1).reshape(b, m, -1).mean(1)
    return -torch.log(p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-20))


def smoothadv(model, x, y, *, sigma, eps, steps=10, m=1, generator=None, noise=None) -> torch.Tensor:
    """SmoothAdv's L2 attack (Salman et al. 2019, PGD variant) on the soft smoothed classifier.

    Finds, per input, delta with ||delta||_2 <= eps and x + delta in [0, 1] that increases
    -log(mean_j softmax(model(x + delta + sigma * e_j))_y) over m noise draws e_j (the same draws at
    every step), by ``steps`` steps of size 2 * eps / steps along the per-example L2-normalised
    gradient, each followed by clamping x + delta to [0, 1] and projecting delta onto the eps ball
    (in this order, so both constraints hold). A zero gradient is replaced by a random direction
    (as in the reference code). The model runs in eval mode during the attack and is returned to
    the mode it came in; its parameter gradients are left untouched.

    Args:
        model: classifier, (N, C, H, W) pixels in [0, 1] -> (N, classes) logits.
        x: (B, C, H, W) pixels in [0, 1]; y: (B,) int64 labels.
        sigma: noise level >= 0; eps: L2 radius >= 0 (0 returns x); steps, m: integers >= 1.
        generator: source of the noise draws (and of the rare random directions), on x's device.
        noise: optional (B, m, C, H, W) standard normal draws to use instead of drawing them, so
            that training can reuse the attack's noise (Salman et al.).

    Returns:
        (B, C, H, W) detached tensor x + delta, with ||delta_i||_2 <= eps (up to float rounding of
        the projection) and every pixel in [0, 1].
    """
    _check_xy(x, y)
    sigma = _check_sigma(sigma)
    eps = _check_float("eps", eps, nonnegative=True)
    steps = _check_int("steps", steps, 1)
    m = _check_int("m", m, 1)
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"x must hold pixels in [0, 1], got values in [{float(x.min())}, {float(x.max())}]")
    x = x.detach()
    if noise is None:
        noise = torch.randn((x.shape[0], m) + tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    elif tuple(noise.shape) != (x.shape[0], m) + tuple(x.shape[1:]):
        raise ValueError(f"noise must have shape {(x.shape[0], m) + tuple(x.shape[1:])}, got {tuple(noise.shape)}")
    if eps == 0:
        return x.clone()
    noise = noise.detach().to(dtype=x.dtype)
    b = x.shape[0]
    step_size = 2 * eps / steps
    delta = torch.zeros_like(x)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = smoothed_soft_loss(model, x + delta, y, noise, sigma).sum()
                (grad,) = torch.autograd.grad(loss, [delta])
                delta = delta.detach()
                norms = grad.reshape(b, -1).norm(dim=1)
                zero = norms == 0
                if bool(zero.any()):
                    rand = torch.randn(grad.shape, generator=generator, device=x.device, dtype=x.dtype)
                    grad = torch.where(zero.view(-1, 1, 1, 1), rand, grad)
                    norms = grad.reshape(b, -1).norm(dim=1)
                delta = delta + step_size * grad / norms.view(-1, 1, 1, 1)
                delta = (x + delta).clamp(0, 1) - x
                delta = delta.renorm(p=2, dim=0, maxnorm=eps)
    finally:
        model.train(was_training)
    return (x + delta).clamp(0, 1).detach()
