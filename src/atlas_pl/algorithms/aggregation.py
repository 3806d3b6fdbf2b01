"""Aggregation of LoRA adapters (pure torch; no Lightning).

An adapter state is ``{"<module>.lora_A": A [r×d_in], "<module>.lora_B": B [d_out×r]}`` as produced by
``AdapterBank.state``. Weights ``p_i`` come from the clients' ``num_examples``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize_weights(num_examples: Sequence[float]) -> list[float]:
    """``p_i = n_i / Σ n`` with checks.

    Raises:
        ValueError: Empty input, a negative count, or all counts zero.
    """
    if len(num_examples) == 0:
        raise ValueError("cannot aggregate zero clients: `num_examples` is empty")
    if any(n < 0 for n in num_examples):
        raise ValueError(f"`num_examples` must be >= 0, got {list(num_examples)}")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError(f"`num_examples` sum to 0 ({list(num_examples)}): no client has data to weight by")
    return [float(n) / total for n in num_examples]


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg of adapter tensors: every ``lora_A`` and ``lora_B`` averaged separately with weights ``p_i``.

    This is SplitLoRA's aggregation; it needs equal shapes (equal ranks). Note that ``mean(B) @ mean(A)`` is not
    ``mean(B @ A)``; exact merging of the products is ``aggregate_lora`` (phase 4).

    Raises:
        ValueError: States disagree in keys or shapes (heterogeneous ranks need exact aggregation).
    """
    weights = normalize_weights(num_examples)
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} adapter states but {len(weights)} weights")
    keys = list(states[0])
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [s[key] for s in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1 or any(set(s) != set(keys) for s in states):
            raise ValueError(
                f"fedavg needs equal adapter shapes; {key} has shapes {sorted(shapes)}. Use exact "
                "aggregation for heterogeneous ranks"
            )
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for w, t in zip(weights, tensors):
            acc += w * t.to(torch.float64)
        out[key] = acc.to(tensors[0].dtype)
    return out
