"""Random controls for PACD poisons: perturbations of the same images that cost nothing to make.

A crafted poison counts only against its baseline: a random perturbation of the same size on the same
images. :func:`random_poison` makes one as an ordinary :class:`engine.pacd.PoisonSet`, so it is stored,
loaded, applied and evaluated exactly like a crafted poison. Kinds (eps is the L_inf budget, x0 the
clean image, pixels in [0, 1]):

- ``"vertex"``: every pixel moves by +eps or -eps with probability 1/2, except where that move would
  leave [0, 1]: there it moves by eps inward. The highest-energy random poison in the box.
- ``"sign"``: +eps or -eps with probability 1/2, then clipped to [0, 1] (a pixel at 0 pushed down stays).
- ``"uniform"``: a perturbation uniform in [-eps, eps], then clipped to [0, 1].
- ``"shift"``: every pixel +eps, clipped (the class made uniformly brighter; deterministic, no seed).
- ``"twin"`` of a given poison (``like=``): the same per-pixel magnitudes |u - x0| with random signs, inward
  where [0, 1] would clip: the same energy in a random direction. Whether the optimised directions matter
  is the crafted poison against its twin.

The random signs and values come from a generator keyed by (seed, kind, target class), drawn on the CPU
in one pass over the images in index order, so a control is reproducible from its seed on any machine.
"""

from __future__ import annotations

import json

import torch

from ..validate import InputError, check_dataset
from .objective import _generator
from .poisonset import PoisonSet, _hash_clean, _project, _vertex, init_record

__all__ = ["CONTROLS", "random_poison"]

CONTROLS = ("vertex", "sign", "uniform", "shift", "twin")
_KIND_CODE = {k: i + 1 for i, k in enumerate(CONTROLS)}


def _inward(x0: torch.Tensor, step: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``direction`` (+-1 a pixel) flipped where x0 + step * direction would leave [0, 1] and the other way would not."""
    up = x0 + step * direction
    out = (up > 1) | (up < 0)
    down = x0 - step * direction
    flip = out & (down >= 0) & (down <= 1)
    return torch.where(flip, -direction, direction)


def random_poison(train_data, *, target_class: int, eps: float, kind: str, seed: int = 0, like=None):
    """A random control poison of every training image of ``target_class`` (the images :func:`engine.poison`
    poisons), as a :class:`engine.pacd.PoisonSet` with ``method`` "control:KIND" (see the module docstring).

    Args:
        train_data: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,)): the training split the
            crafted poison it is compared with was made on.
        target_class: the class whose images are perturbed.
        eps: L_inf budget, in (0, 1].
        kind: "vertex", "sign", "uniform", "shift" or "twin".
        seed: key of the random signs / values (ignored by "shift").
        like: for "twin" (required there): the crafted PoisonSet whose magnitudes the twin takes; its images,
            class and eps must match (``target_class`` and ``eps`` must equal the poison's). For the other
            kinds, optional: the control then takes exactly the poison's indices and sigma.

    Returns:
        a PoisonSet whose ``settings`` record ``control`` (the kind), ``seed`` and, with ``like``, the poison's
        identity (``like``: sha256, method, steps); its ``encoding`` is float32 (see :meth:`PoisonSet.encode`:
        vertex, sign and shift controls are vertex poisons that the "sign" encoding stores bit for bit).
    """

    images, labels = check_dataset(train_data, "train_data")
    if kind not in CONTROLS:
        raise InputError(f"kind must be one of {', '.join(CONTROLS)}, got {kind!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < float(eps) <= 1:
        raise InputError(f"eps must be a number in (0, 1], got {eps!r}")
    eps = float(eps)
    if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0:
        raise InputError(f"target_class must be an integer >= 0, got {target_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    if kind == "twin" and like is None:
        raise InputError("kind='twin' needs like=the crafted poison whose magnitudes it takes")
    if like is not None:
        if not isinstance(like, PoisonSet):
            raise InputError(f"like must be a PoisonSet, got {type(like).__name__}")
        if like.target_class != target_class or like.eps != eps:
            raise InputError(f"like is a poison of class {like.target_class} at eps {like.eps}, not of class "
                             f"{target_class} at eps {eps}")
        idx = like.indices.clone()
        x0 = like._originals(train_data)  # refuses another training set
    else:
        idx = (labels == target_class).nonzero().flatten()
        if idx.numel() == 0:
            raise InputError(f"target_class {target_class}: no training image of that class")
        x0 = images[idx]
        x0 = x0.to(torch.float32) / 255.0 if x0.dtype == torch.uint8 else x0.to(torch.float32)
    g = _generator("cpu", seed, _KIND_CODE[kind], target_class)
    if kind == "shift":
        out = _vertex(x0, eps, torch.ones_like(x0))
    elif kind in ("vertex", "sign"):
        direction = torch.randint(0, 2, x0.shape, generator=g).to(torch.float32).mul_(2).sub_(1)
        if kind == "vertex":
            direction = _inward(x0, torch.full_like(x0, eps), direction)
        out = _vertex(x0, eps, direction)
    elif kind == "uniform":
        delta = (torch.rand(x0.shape, generator=g, dtype=torch.float32) * 2 - 1) * eps
        out = _project(x0 + delta, x0, eps)
    else:  # twin: the poison's magnitudes, random signs, inward where [0, 1] would clip
        magnitude = (like.images.to(torch.float32) - x0).abs()
        direction = torch.randint(0, 2, x0.shape, generator=g).to(torch.float32).mul_(2).sub_(1)
        direction = _inward(x0, magnitude, direction)
        out = _project(x0 + magnitude * direction, x0, eps)
    settings = {"control": kind, "seed": None if kind == "shift" else seed, "kind": "control"}
    if like is not None:
        settings["like"] = init_record(like)
    y = labels[idx].to(torch.int64)
    return PoisonSet(idx.to(torch.int64), out.contiguous(), y, _hash_clean(images[idx], y), eps,
                     float(like.sigma) if like is not None else 0.0, f"control:{kind}", int(target_class),
                     json.loads(json.dumps(settings)))
