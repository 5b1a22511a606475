"""One poison from several: :func:`combine_poisons` (a vote of their perturbations' signs, or their mean)."""

from __future__ import annotations

import json

import torch

from .poisonset import PoisonError, PoisonSet, _project, _vertex, init_record

__all__ = ["COMBINE", "combine_poisons"]

COMBINE = ("vote", "mean")
# settings that describe one run rather than the crafting (a combined poison keeps them per input in combined_from)
_RUN_KEYS = ("outer_steps", "total_outer_steps", "lower_resets", "seconds", "history_tail", "upper_by_step",
             "step_seconds_total", "wall_seconds_last_invocation", "init", "snapshot_of", "combine", "combined_from",
             "combined_differ")


def combine_poisons(poisons: list[PoisonSet], train_data, how: str = "vote", *,
                    mixed_methods: bool = False) -> PoisonSet:
    """One poison from several crafted for the same training set, class, procedure, sigma and eps (e.g. runs that
    ended at different vertices of the eps box with the same effect), to keep their common direction.

    how="vote": every pixel moves by eps along the sign of the summed perturbations sum_i (u_i - x0) (0 where that
    sum is 0), then onto [0, 1]: a vertex of the feasible set, like a finished run; of a single poison, that poison
    moved out to the vertex along its own signs. how="mean": the average of the poisoned images (a convex
    combination, so inside the box; needs two or more). ``train_data`` must be the training set the poisons
    were crafted from (checked as :meth:`PoisonSet.apply` does). Settings: those all inputs share (less the
    per-run ones: steps, times, logs), ``combined_from`` (each input's :func:`init_record`: sha256, steps, solver,
    damping, method_args), ``combined_differ`` (the settings the inputs do not share), ``combine`` (``how``),
    ``outer_steps`` 0 and ``total_outer_steps`` the largest of the inputs' (so a warm start from it continues
    every input's schedule).

    mixed_methods: also combine poisons crafted against different procedures (e.g. a SmoothAdv and a MACER
    poison of the same images, sigma and eps); the result's ``method`` is their names joined by "+" in sorted
    order (e.g. "macer+smoothadv"), and ``settings["combined_methods"]`` lists each input's. Off by default, so
    that a poison of another procedure given by mistake is refused.
    """
    if how not in COMBINE:
        raise ValueError(f"how must be one of {COMBINE}, got {how!r}")
    poisons = list(poisons)
    least = 1 if how == "vote" else 2
    if len(poisons) < least or not all(isinstance(ps, PoisonSet) for ps in poisons):
        raise TypeError(f"poisons must be {'one' if least == 1 else 'two'} or more PoisonSets for how={how!r}, "
                        f"got {[type(ps).__name__ for ps in poisons]}")
    first = poisons[0]
    for i, ps in enumerate(poisons[1:], 1):
        method_ok = mixed_methods or ps.method == first.method
        same = method_ok and (ps.target_class, ps.sigma, ps.eps, ps.clean_sha256) == (
            first.target_class, first.sigma, first.eps, first.clean_sha256)
        if not same or not torch.equal(ps.indices, first.indices) or ps.images.shape != first.images.shape:
            hint = "" if method_ok else " (mixed_methods=True combines procedures)"
            raise PoisonError(
                f"poisons[{i}] ({ps.method}, class {ps.target_class}, sigma {ps.sigma}, eps {ps.eps}, {len(ps)} images, "
                f"originals {ps.clean_sha256[:12]}) is not a poison of the same images and settings as poisons[0] "
                f"({first.method}, class {first.target_class}, sigma {first.sigma}, eps {first.eps}, {len(first)} images, "
                f"originals {first.clean_sha256[:12]}){hint}"
            )
    x0 = first._originals(train_data)  # refuses another training set
    stack = torch.stack([ps.images.to(torch.float32) for ps in poisons])
    if how == "mean":
        images = _project(stack.to(torch.float64).mean(0).to(torch.float32), x0, first.eps)
    else:
        direction = (stack.to(torch.float64) - x0.to(torch.float64)).sum(0).sign().to(torch.float32)
        images = _vertex(x0, first.eps, direction)  # the arithmetic a sign file decodes with
    records = [init_record(ps) for ps in poisons]
    shared = [k for k in first.settings if k not in _RUN_KEYS and all(
        k in ps.settings and ps.settings[k] == first.settings[k] for ps in poisons)]
    settings = {k: first.settings[k] for k in shared}
    settings.update({
        "combine": how,
        "combined_from": records,  # each input's solver, damping, method_args and steps
        "combined_differ": sorted({k for ps in poisons for k in ps.settings} - set(shared) - set(_RUN_KEYS)),
        "outer_steps": 0,
        "total_outer_steps": max(r["total_outer_steps"] for r in records),
    })
    methods = sorted({ps.method for ps in poisons})
    if len(methods) > 1:
        settings["combined_methods"] = [ps.method for ps in poisons]
    return PoisonSet(first.indices.clone(), images, first.labels.clone(), first.clean_sha256, first.eps, first.sigma,
                     "+".join(methods), first.target_class, json.loads(json.dumps(settings)))
