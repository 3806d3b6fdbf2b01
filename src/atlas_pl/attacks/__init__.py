"""Attacks on what a split server sees, to measure privacy (pure torch; no Lightning)."""

from atlas_pl.attacks.inversion import (
    InversionResult,
    LearnedInverter,
    invert_activations,
    learned_inversion,
    token_scores,
)
from atlas_pl.attacks.labels import label_leakage

__all__ = [
    "InversionResult",
    "LearnedInverter",
    "invert_activations",
    "label_leakage",
    "learned_inversion",
    "token_scores",
]
