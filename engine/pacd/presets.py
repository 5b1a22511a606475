"""Crafting settings of published PACD runs: ``engine.pacd.preset(name, method)`` and ``poison --preset NAME``.

``paper-mnist``: the settings of the reference implementation of Mehra et al. (CVPR 2021),
github.com/hammlab/PoisoningCertifiedDefenses at bec61a6, ``attack_generation/<procedure>/MNIST/`` (file and line
of each value in docs/pacd.md). What the engine still does differently, and why, is listed in
:data:`DEVIATIONS`; every poison made with a preset records the preset and the options given beside it.
"""

from __future__ import annotations

import copy

__all__ = ["PRESETS", "DEVIATIONS", "preset"]

_COMMON = {
    "eps": 0.1,
    "niter1": 10,
    "niter2": 10,
    "lr_u": 0.1,
    "lr_w": 1e-3,
    "damping": 1e-3,
    "batch_clean": 900,
    "batch_poison": 100,
    "batch_val": 100,
    "k": 20,
    "beta": 16.0,
    "a": 0.001,
    "u_update": "adam",
    "solver": "approxgrad",
}

PRESETS: dict[str, dict[str, dict]] = {
    "paper-mnist": {
        # poison_radius_gaussianaug.py: sigma 0.5, lr_p 1e-2, 50 epochs of 55 steps, re-initialised every 10 epochs
        "gaussian": {**_COMMON, "sigma": 0.5, "lr_p": 1e-2, "outer_steps": 2750, "reset_every": 10,
                     "method_args": {}},
        # poison_certified_radius_macer.py: sigma 0.75, lr_p 1e-4, lower MACER k 1, lambda 1, beta 16, gamma 8
        "macer": {**_COMMON, "sigma": 0.75, "lr_p": 1e-4, "outer_steps": 2750, "reset_every": 10,
                  "method_args": {"k": 1, "beta": 16.0, "gamma": 8.0, "lbd": 1.0}},
        # poison_certified_radius_smoothadv_pgd.py: sigma 0.75, niter1 1, lr_p 1e-3, upper a 1e-4, 100 epochs,
        # re-initialised every 20 epochs; the attack: eps 1, 2 steps, 1 noise draw
        "smoothadv": {**_COMMON, "sigma": 0.75, "niter1": 1, "lr_p": 1e-3, "a": 1e-4, "outer_steps": 5500,
                      "reset_every": 20, "method_args": {"eps": 1.0, "steps": 2, "m": 1}},
    },
}

DEVIATIONS: dict[str, list[str]] = {
    "paper-mnist": [
        "Noise: the engine draws every noise sample from a stream keyed by (seed, step, ...), fresh at each outer "
        "step; the reference fixes the lower-level noise per training image for the whole run for MACER and "
        "SmoothAdv, and MACER's upper-level noise per validation image. Keyed fresh noise keeps runs reproducible "
        "and resumable; a fixed draw is one sample of the same objective.",
        "Outer steps: the reference loops over range(1, 51) (range(1, 101) for SmoothAdv), so it runs 50 (100) epochs "
        "and saves the poison at the start of the last one (about 2,695 / 5,445 steps); the preset runs the full "
        "2,750 / 5,500 steps and saves at the end.",
        "Re-initialisation: the reference re-initialises at epochs 10, 20, ... counted from 1 (a first cycle of 9 "
        "epochs); the engine every reset_every epochs counted from 0. The reference also re-initialises after an "
        "epoch whose upper objective is NaN; the engine has no such restart.",
        "SmoothAdv's attack: the reference takes 2 Adam steps (lr = eps) whose state persists across batches, with "
        "an eps warm-up within each 20-epoch cycle (0, 0.4, 0.6, 0.8, then 1; and, by a quirk, no attack in every "
        "20th epoch); the engine takes its own SmoothAdv attack (engine.attacks.smoothadv: steps of 2 eps / steps "
        "along the L2-normalised gradient, from delta = 0 at every outer step) at eps 1 throughout.",
        "Adam on the poison: the reference keeps one Adam state for its 100-image poison variable, shared by whichever "
        "random poison images are drawn; the engine keeps Adam moments per poison image.",
        "Model: the same LeNet (20@5x5, 50@5x5, 500, 10), with the engine's input normalisation as its first layer "
        "(the reference feeds raw pixels); Keras' and PyTorch's default initialisations differ.",
        "Victims: the reference's MACER victim script and certification default to sigma 0.5 while its MACER poison "
        "is made at 0.75; evaluations in this engine use the sigma the poison was made with.",
    ],
}


def preset(name: str, method: str) -> dict:
    """The keyword arguments of :func:`engine.poison` for ``method`` under the preset ``name`` (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    if method not in PRESETS[name]:
        raise ValueError(f"preset {name!r} has no settings for method {method!r}; it has {', '.join(PRESETS[name])}")
    return copy.deepcopy(PRESETS[name][method])
