"""Kept importable: the crafting presets live in :mod:`engine.pacd.presets` (``from engine.presets import PRESETS,
preset, DEVIATIONS`` as before)."""

from .pacd.presets import DEVIATIONS, PRESETS, preset

__all__ = ["PRESETS", "DEVIATIONS", "preset"]
