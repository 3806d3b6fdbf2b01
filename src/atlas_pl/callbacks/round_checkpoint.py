"""``RoundCheckpoint``: a resumable ``last.ckpt`` at the end of every federated round, written atomically.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` only when fit ends in Lightning
2.6 (``last`` follows a top-k save, and with ``save_top_k=0`` there is none), so a run killed in round 9 of 10 leaves
nothing to resume. This subclass writes ``last.ckpt`` at the end of every ``every_n_epochs``-th training epoch
(= round), after aggregation, validation and every other callback's epoch-end work, so ``--ckpt_path last`` resumes
exactly where the last completed round stopped. Top-k checkpoints (``monitor``, ``save_top_k``) are as before.

Each write goes to a temporary file in the same folder, is fsynced and renamed into place (``AtomicCheckpointIO``), so
a kill during the write leaves the previous round's ``last.ckpt`` intact; the stale temporary file is never picked up by
``last`` and is removed at the next ``setup``. Write time and size of every checkpoint are logged
(``checkpoint/write_seconds``, ``checkpoint/megabytes``, step = round) and kept in :attr:`writes`.

Works in any Lightning project; nothing here knows about ``Federation``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from atlas_pl.io import AtomicCheckpointIO, remove_stale_temporaries


class RoundCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes a resumable ``last.ckpt`` after every round (training epoch), atomically.

    Hooks: ``on_train_epoch_end`` — after the round's aggregation and validation, so the checkpoint holds the
    finished round (``on_validation_end`` does nothing, so no mid-round write); ``setup`` swaps in the atomic
    checkpoint IO and removes temporaries of killed writes before training starts.

    Args:
        dirpath: Folder of the checkpoints; ``None`` = Lightning's default (``<log_dir>/checkpoints``). The
            ``atlas-pl`` CLI passes ``<save_dir>/<name>/checkpoints`` so that ``--ckpt_path last`` finds it again.
        every_n_epochs: Write every this many rounds (``>= 1``); the last round of fit is always written.
        save_top_k: Top-k checkpoints besides ``last.ckpt`` (``0``: only ``last.ckpt``; needs ``monitor`` for ``> 1``).
        monitor: Metric ranking top-k checkpoints (e.g. ``val_acc``); ``None`` keeps the latest.
        mode: ``min`` or ``max`` for ``monitor``.
        filename: Name pattern of top-k checkpoints (``ModelCheckpoint`` syntax).
        verbose: Print a line per write.
        make_io_atomic: Replace a plain ``TorchCheckpointIO`` (Lightning's default) with ``AtomicCheckpointIO`` (same
            file format) at ``setup``; custom checkpoint IO plugins are left alone.
        asynchronous: Write in a background thread (Lightning's ``AsyncCheckpointIO`` around the atomic writer): the
            round waits only for the checkpoint dict and a copy of its tensors, the serialization, write and fsync
            overlap the next round. ``fit`` waits for the last write before it returns. A kill during a write still
            leaves the previous ``last.ckpt`` (the write is atomic), which can then be a round older than the last
            finished one. ``checkpoint/write_seconds`` is then the time the round waited.

    Raises:
        ValueError: ``every_n_epochs`` < 1 or ``save_top_k`` < -1.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int = 1,
        save_top_k: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        filename: str | None = None,
        verbose: bool = False,
        make_io_atomic: bool = True,
        asynchronous: bool = False,
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be an int >= 1 (rounds between writes), got {every_n_epochs!r}")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"`save_top_k` must be an int >= -1, got {save_top_k!r}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=True,
            save_top_k=save_top_k,
            mode=mode,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=True,
        )
        self.make_io_atomic = make_io_atomic
        self.asynchronous = asynchronous
        self.writes: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ policy
    def should_save(self, trainer: L.Trainer) -> bool:
        """Whether the round that just ended gets a ``last.ckpt`` (every ``every_n_epochs``-th and the final one)."""
        round_number = trainer.current_epoch + 1
        final = trainer.max_epochs is not None and round_number >= trainer.max_epochs
        return round_number % self._every_n_epochs == 0 or final or trainer.should_stop

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        io = trainer.strategy.checkpoint_io
        if self.make_io_atomic and type(io) is TorchCheckpointIO:
            io = trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.asynchronous and not isinstance(io, AsyncCheckpointIO):
            trainer.strategy.checkpoint_io = AsyncCheckpointIO(io)
        if trainer.is_global_zero and stage == "fit" and self.dirpath is not None:
            for path in remove_stale_temporaries(self.dirpath):
                rank_zero_info(f"removed {path.name}: a checkpoint write that was killed before it completed")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # top-k as in ModelCheckpoint (and `last` when it follows)
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved == self.last_model_path:
            return  # already written at this step
        if not self._should_skip_saving_checkpoint(trainer) and self.should_save(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the round's checkpoint is written at its very end (``on_train_epoch_end``), not mid-round."""

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return
        # written in the background: the file there now may still be the previous one, so no size is read
        size = os.path.getsize(filepath) if os.path.exists(filepath) and not self.asynchronous else 0
        record = {"round": int(trainer.current_epoch), "file": os.path.basename(filepath), "seconds": seconds,
                  "bytes": size, "asynchronous": self.asynchronous}  # fmt: skip
        self.writes.append(record)
        metrics = {"checkpoint/write_seconds": seconds}
        if not self.asynchronous:
            metrics["checkpoint/megabytes"] = size / 1e6
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(trainer.current_epoch))
        if self.verbose:
            rank_zero_info(f"round {record['round']}: wrote {filepath} ({size / 1e6:.2f} MB in {seconds:.3f} s)")
