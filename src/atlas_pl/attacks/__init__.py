"""Attacks on what a split server sees, to measure privacy (pure torch; no Lightning)."""

from atlas_pl.attacks.inversion import InversionResult, invert_activations, token_scores
from atlas_pl.attacks.labels import label_leakage

__all__ = ["InversionResult", "invert_activations", "label_leakage", "token_scores"]
