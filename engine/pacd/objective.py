"""PACD's upper objective and its keyed randomness.

:func:`soft_radius_objective` is the soft certified-radius surrogate the attacker minimises. Every random draw of a
run comes from a generator keyed by integers (:func:`keyed_generator`, seeded by :func:`derive_seed`), so that the
same key gives the same draws on a resumed run and on any machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_radius_objective", "derive_seed", "keyed_generator"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chain): distinct inputs give independent streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x >> 1


def keyed_generator(device, *parts: int) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`derive_seed` of ``parts`` (e.g. (seed, step, purpose))."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


_generator = keyed_generator  # the former private name


def soft_radius_objective(
    model,
    x,
    target: int,
    *,
    sigma: float,
    k: int = 20,
    beta: float = 16.0,
    a: float = 0.001,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
):
    """Soft certified-radius surrogate of PACD's upper level (to be minimised by the attacker).

    x: (V, C, H, W) validation images of class ``target`` in [0, 1]. With p = mean over k noise draws
    of softmax(beta * logits) (shape (V, K)), counting only images whose top-1 of p is ``target``:

        F = (sigma / 2) * sum_counted [Phi^-1((1-2a) p_target + a) - Phi^-1((1-2a) p_2 + a)] / V

    where p_2 is the largest other class. ``noise`` (k, V, C, H, W) may be given to freeze the draws.
    Returns (F scalar, counted fraction).
    """
    v = x.shape[0]
    if noise is None:
        noise = torch.randn((k,) + tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
    logits = model((x.unsqueeze(0) + sigma * noise).reshape((k * v,) + tuple(x.shape[1:])))
    probs = F.softmax(beta * logits, dim=1).reshape(k, v, -1).mean(0)
    p_t = probs[:, target]
    others = probs.clone()
    others[:, target] = -1.0
    p_2 = others.max(dim=1).values
    counted = (probs.argmax(dim=1) == target).to(x.dtype)
    gap = torch.special.ndtri((1 - 2 * a) * p_t + a) - torch.special.ndtri((1 - 2 * a) * p_2 + a)
    return (sigma / 2) * (gap * counted).sum() / v, float(counted.mean())
