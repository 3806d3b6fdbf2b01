"""Per-module importance of LoRA modules from clients' gradient signals, averaged per cluster (phase 2).

Importance of module ``m`` for one client is a first-order sensitivity of its loss to the module's adapter:

* ``"grad_norm"`` (default): ``I(m) = sqrt(‖∇_A L‖_F² + ‖∇_B L‖_F²)``. At LoRA's initialisation ``B = 0`` so
  ``∇_A L = 0`` and this is ``‖∇_B L‖_F``, the size of the first step the module would take; it needs no weights and
  works on the very first batch.
* ``"saliency"``: ``I(m) = Σ |A ⊙ ∇_A L| + Σ |B ⊙ ∇_B L|``, the first-order loss change of zeroing each LoRA weight,
  summed (the PLATON/AdaLoRA sensitivity). It is zero at initialisation (``B = 0``, hence ``∇_A L = 0``), so use it
  after a warm-up step.

Clients' importances are normalised to sum to 1 before averaging, so a client with larger gradients (a harder task, a
different batch size) does not dominate its cluster's pattern. Pure torch; no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

Method = Literal["grad_norm", "saliency"]
_FACTORS = (".lora_A", ".lora_B")
_PEFT_PREFIX = "base_model.model."


def module_of(key: str) -> str:
    """Module name of a LoRA tensor key.

    ``"transformer.h.0.attn.c_attn.lora_B"`` (``AdapterBank.state``), peft's
    ``"base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"`` and a bare module name all map to
    ``"transformer.h.0.attn.c_attn"``.
    """
    for factor in _FACTORS:
        if key.endswith(factor):
            key = key[: -len(factor)]
            break
        inside = key.find(factor + ".")
        if inside >= 0:
            key = key[:inside]
            break
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def module_importance(
    grads: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None = None,
    method: Method = "grad_norm",
) -> dict[str, float]:
    """One client's importance of each LoRA module.

    Args:
        grads: Gradient per LoRA tensor, keyed as in ``AdapterBank.state`` (``<module>.lora_A``/``<module>.lora_B``),
            by peft parameter names, or by module name (one tensor per module).
        weights: The LoRA tensors themselves, same keys (needed by ``"saliency"``).
        method: ``"grad_norm"`` or ``"saliency"`` (see the module docstring).

    Returns:
        Module name → importance (>= 0), in the order of first appearance.

    Raises:
        ValueError: Unknown ``method``, ``"saliency"`` without ``weights`` or with a key missing from them, or no
            gradients.
    """
    if method not in ("grad_norm", "saliency"):
        raise ValueError(f"`method` must be 'grad_norm' or 'saliency', got {method!r}")
    if not grads:
        raise ValueError("`grads` is empty: pass the gradient of each LoRA tensor (lora_A/lora_B) of the client")
    if method == "saliency":
        missing = sorted(set(grads) - set(weights or {}))
        if missing:
            raise ValueError(f"method 'saliency' needs `weights` for every gradient; missing {missing[:3]}")
    squares: dict[str, float] = {}
    for key, grad in grads.items():
        g = grad.detach().double()
        if method == "grad_norm":
            value = float(g.square().sum())
        else:
            value = float((g * weights[key].detach().double()).abs().sum())  # type: ignore[index]
        name = module_of(key)
        squares[name] = squares.get(name, 0.0) + value
    if method == "grad_norm":
        return {m: v**0.5 for m, v in squares.items()}
    return squares


def normalize_importance(importance: Mapping[str, float]) -> dict[str, float]:
    """Scale one client's importances to sum to 1 (all-zero importances become uniform).

    Raises:
        ValueError: A negative or non-finite importance.
    """
    bad = {m: v for m, v in importance.items() if not (v >= 0 and v < float("inf"))}
    if bad:
        first = next(iter(bad.items()))
        raise ValueError(f"importance must be finite and >= 0, got {first[1]!r} for module {first[0]!r}")
    total = sum(importance.values())
    if total == 0:
        return {m: 1.0 / len(importance) for m in importance} if importance else {}
    return {m: v / total for m, v in importance.items()}


def cluster_importance(
    per_client: Sequence[Mapping[str, float]], cluster_ids: Sequence[int]
) -> dict[int, dict[str, float]]:
    """Mean normalised importance per cluster: ``I_c(m) = mean_{i in c} I_i(m) / Σ_m' I_i(m')``.

    Clients may cover different modules (different cut layers); a module's mean runs over the clients that report it.

    Args:
        per_client: Importance per client (:func:`module_importance`).
        cluster_ids: Cluster of each client, same order.

    Returns:
        Cluster id → module → importance, clusters in ascending order.

    Raises:
        ValueError: ``per_client`` and ``cluster_ids`` differ in length.
    """
    if len(per_client) != len(cluster_ids):
        raise ValueError(
            f"`cluster_ids` must have one entry per client: {len(cluster_ids)} ids for {len(per_client)} clients"
        )
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, dict[str, int]] = {}
    for importance, cluster in zip(per_client, cluster_ids):
        c = int(cluster)
        for module, value in normalize_importance(importance).items():
            sums.setdefault(c, {})[module] = sums.get(c, {}).get(module, 0.0) + value
            counts.setdefault(c, {})[module] = counts.get(c, {}).get(module, 0) + 1
    return {c: {m: v / counts[c][m] for m, v in sums[c].items()} for c in sorted(sums)}
