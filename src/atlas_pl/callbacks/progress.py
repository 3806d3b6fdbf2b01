"""A rich progress bar that names the federated round and the client being trained."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override


class FederatedProgress(RichProgressBar):
    """``RichProgressBar`` whose training line reads ``Round r/R · client c`` instead of ``Epoch``.

    Hooks: ``on_train_batch_start`` — each batch carries its ``client_idx``, so the line names the client being
    trained right now; ``_get_train_description`` (called by ``RichProgressBar``) names the round instead of the epoch.
    """

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        text = f"Round {current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")
        return f"{text:{len(self.validation_description)}}"

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        client = batch.get("client_idx") if isinstance(batch, dict) else None
        if self.progress is not None and self.train_progress_bar_id is not None and client is not None:
            desc = f"{self._get_train_description(trainer.current_epoch).rstrip()} · client {int(client)}"
            self.progress.update(self.train_progress_bar_id, description=desc)
