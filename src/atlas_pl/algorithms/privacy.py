"""Differential privacy for client fingerprints: the Gaussian mechanism and its ``(ε, δ)`` accounting (pure).

A client clips its fingerprint to norm ``C`` and adds ``N(0, σ²C²)`` noise before it leaves the client
(``privatize``); ``dp_epsilon`` reports the ``ε`` the release costs at a given ``δ`` through ``dp_accounting``.

What is protected: the clipped vector is treated as one record with L2 sensitivity ``C`` (add/remove neighbouring,
as in ``dp_accounting``). That bounds what the server learns about a client's whole contribution to ``f_i``. It is
not an example-level guarantee for the client's data set: that needs per-example clipping before the gradients are
summed (DP-SGD), which this helper does not do. Post-processing (re-normalizing the noisy vector, k-means) costs
nothing more.
"""

from __future__ import annotations

import math
from typing import Literal

import dp_accounting
import torch

Accountant = Literal["rdp", "pld"]


def clip_to_norm(vector: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale ``vector`` by ``min(1, C / ‖vector‖)`` so its L2 norm is at most ``clip_norm``.

    Raises:
        ValueError: ``clip_norm`` is not positive.
    """
    if not clip_norm > 0:
        raise ValueError(f"`clip_norm` must be > 0, got {clip_norm!r}; pass the L2 bound C, e.g. 1.0")
    norm = float(torch.linalg.vector_norm(vector))
    return vector * min(1.0, clip_norm / norm) if norm > 0 else vector.clone()


def privatize(
    vector: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian mechanism: clip ``vector`` to norm ``C`` and add ``N(0, σ²C²)`` to every coordinate.

    Args:
        vector: The fingerprint (any shape; usually ``[dim]``).
        clip_norm: ``C``, the L2 bound (the sensitivity).
        noise_multiplier: ``σ``, noise standard deviation in units of ``C``; 0 clips without noise.
        generator: A CPU generator for reproducible noise; the global RNG when None.

    Returns:
        The noisy vector, same shape, dtype and device as ``vector``.

    Raises:
        ValueError: ``clip_norm`` is not positive or ``noise_multiplier`` is negative.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier!r}; use 0 for clipping only")
    clipped = clip_to_norm(vector, clip_norm)
    noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    return clipped + (noise * noise_multiplier * clip_norm).to(dtype=vector.dtype, device=vector.device)


def dp_epsilon(
    noise_multiplier: float,
    steps: int,
    delta: float,
    sampling_rate: float = 1.0,
    accountant: Accountant = "rdp",
) -> float:
    """``ε`` of ``steps`` Gaussian releases with noise multiplier ``σ`` at the given ``δ``.

    Each release is ``GaussianDpEvent(σ)``, Poisson-subsampled with ``sampling_rate`` when it is below 1, composed
    ``steps`` times. ``"rdp"`` is fast and a slight over-estimate; ``"pld"`` is tighter and slower.

    Args:
        noise_multiplier: ``σ`` (noise std / clip norm); 0 gives ``inf``.
        steps: Number of releases (e.g. 1 fingerprint per client, or one per clustering round).
        delta: Target ``δ`` in (0, 1), conventionally below 1 / number of records.
        sampling_rate: Poisson sampling probability of a record per release, in (0, 1].
        accountant: ``"rdp"`` (Rényi DP) or ``"pld"`` (privacy loss distributions).

    Returns:
        ``ε`` (``math.inf`` without noise).

    Raises:
        ValueError: An argument is out of range.
    """
    _check_accounting_args(noise_multiplier, steps, delta, sampling_rate, accountant)
    if noise_multiplier == 0:
        return math.inf
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    acc: dp_accounting.PrivacyAccountant
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    acc.compose(event, count=steps)
    return float(acc.get_epsilon(delta))


def _check_accounting_args(
    noise_multiplier: float, steps: int, delta: float, sampling_rate: float, accountant: str
) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1 (number of releases), got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}; a common choice is 1e-5")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"`sampling_rate` must be in (0, 1], got {sampling_rate!r}; use 1.0 without subsampling")
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"`accountant` must be 'rdp' or 'pld', got {accountant!r}")
