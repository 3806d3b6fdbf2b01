"""How an encoder classifier turns its last hidden states into one vector per example.

* ``mean``: the attention-mask-weighted mean of the last hidden states (padding excluded);
* ``cls``: the first token's state;
* ``pooler``: the model's own pooler (BERT: ``tanh(W h_0 + b)``), which is only useful when it was trained;
* ``auto`` (the default) picks one per checkpoint, by this rule:

  1. a sentence-transformers folder (``modules.json`` naming a ``Pooling`` module beside ``config.json``) uses the
     pooling the encoder was trained with: ``cls`` when its pooling config sets ``pooling_mode_cls_token``, else
     ``mean`` (mean, max, weighted-mean and last-token modes all map to ``mean``). Its ``pooler.*`` weights are never
     trusted: all-MiniLM-L6-v2 ships a pooler with a zero bias and a random weight;
  2. otherwise ``pooler`` when the model has a pooler whose bias is not all zero (a trained pooler, e.g. BERT's NSP
     pooler; Hugging Face initializes a missing or fresh pooler's bias to zero), else ``mean``.

  Only a local folder is inspected for sentence-transformers files; a hub id is judged by its pooler's weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

Pooling = Literal["auto", "mean", "cls", "pooler"]
ResolvedPooling = Literal["mean", "cls", "pooler"]
POOLINGS: tuple[str, ...] = ("auto", "mean", "cls", "pooler")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t m_t h_t / Σ_t m_t`` per example: the mean of the states of the non-padding tokens."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def sentence_transformers_pooling(folder: str | Path) -> ResolvedPooling | None:
    """The pooling a sentence-transformers checkpoint in ``folder`` was trained with, or ``None`` if it is not one."""
    modules_file = Path(folder) / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    except (ValueError, AttributeError, TypeError):
        return None
    if not pooling_dirs:
        return None
    config_file = Path(folder) / pooling_dirs[0] / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return "cls" if config.get("pooling_mode_cls_token") else "mean"


def has_trained_pooler(pooler: nn.Module | None) -> bool:
    """Whether ``pooler`` exists and its dense bias is not all zero (fresh Hugging Face poolers have a zero bias)."""
    dense = getattr(pooler, "dense", None)
    bias = getattr(dense, "bias", None)
    return isinstance(bias, torch.Tensor) and bool(bias.count_nonzero())


def validate_pooling(pooling: str) -> None:
    """Check that ``pooling`` is one of ``auto``, ``mean``, ``cls``, ``pooler``.

    Raises:
        ValueError: It is not.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {list(POOLINGS)}, got {pooling!r}")


def resolve_pooling(pooling: str, model: Any, pooler: nn.Module | None) -> ResolvedPooling:
    """Turn ``pooling`` (``auto`` included) into the mode a classifier uses, by the rule in the module docstring.

    Args:
        pooling: ``auto``, ``mean``, ``cls`` or ``pooler``.
        model: The Hugging Face model (its ``name_or_path`` locates a sentence-transformers folder).
        pooler: The model's pooler module, or ``None`` when it has none.

    Raises:
        ValueError: An unknown ``pooling``, or ``pooler`` asked of a model without a pooler.
    """
    validate_pooling(pooling)
    if pooling == "pooler" and pooler is None:
        raise ValueError("`pooling='pooler'` needs a model with a pooler (this one has none); use 'mean' or 'cls'")
    if pooling != "auto":
        return cast(ResolvedPooling, pooling)
    folder = str(getattr(model, "name_or_path", "") or "")
    from_folder = sentence_transformers_pooling(folder) if folder and Path(folder).is_dir() else None
    if from_folder is not None:
        return from_folder
    return "pooler" if has_trained_pooler(pooler) else "mean"


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: ResolvedPooling, pooler: nn.Module | None
) -> torch.Tensor:
    """One vector per example from the last hidden states ``[B, T, H]`` by a resolved ``pooling`` mode."""
    if pooling == "mean":
        return mean_pool(hidden, attention_mask)
    if pooling == "cls":
        return hidden[:, 0]
    if pooler is None:
        raise ValueError("`pooling='pooler'` needs a model with a pooler; use 'mean' or 'cls'")
    return pooler(hidden)
