"""Write a results JSON at the end of fit: final metrics per client and cluster, history per round, traffic."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from atlas_pl.io import atomic_write_json


class FederatedResults(Callback):
    """Save ``results.json`` (atomically) in the logger's folder when fit ends.

    Args:
        filename: File name inside ``trainer.log_dir`` (or ``default_root_dir`` without a logger).
    """

    def __init__(self, filename: str = "results.json") -> None:
        if not filename.endswith(".json"):
            raise ValueError(f"`filename` must end with .json, got {filename!r}")
        self.filename = filename
        self._start = 0.0
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = folder / self.filename
        atomic_write_json(self.path, self.collect(trainer, pl_module))
        rank_zero_info(f"results written to {self.path}")

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        history = list(getattr(pl_module, "history", []))
        channel = getattr(pl_module, "channel", None)
        final = history[-1] if history else {}
        return {
            "rounds": int(trainer.current_epoch),
            "wall_seconds": time.perf_counter() - self._start,
            "hparams": dict(pl_module.hparams),
            "final": final,
            "history": history,
            "cluster_ids": list(getattr(pl_module, "cluster_ids", [])),
            "num_examples": list(getattr(pl_module, "num_examples", [])),
            "traffic": channel.stats.as_dict() if channel is not None else {},
        }
