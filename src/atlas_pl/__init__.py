"""atlas-pl: task-aware, heterogeneous-rank, split federated LoRA fine-tuning on PyTorch Lightning (ATLAS).

The main classes load lazily, so ``import atlas_pl`` (and ``atlas_pl.__version__``) stays cheap::

    from atlas_pl import Federation, FederatedDataModule
    from atlas_pl.callbacks import TaskClustering, RankAllocation, ClusterAggregation, RoundCheckpoint
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("atlas-pl")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "AtlasCLI": "atlas_pl.cli",
    "ClientParallelStrategy": "atlas_pl.strategies",
    "FederatedDataModule": "atlas_pl.data",
    "Federation": "atlas_pl.federation",
    "PeftClientMixin": "atlas_pl.peft_client",
    "SplitClient": "atlas_pl.client",
}

__all__ = [
    "AtlasCLI",
    "ClientParallelStrategy",
    "FederatedDataModule",
    "Federation",
    "PeftClientMixin",
    "SplitClient",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atlas_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
