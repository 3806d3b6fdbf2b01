"""The ``atlas-pl`` command: a ``LightningCLI`` over ``Federation`` and ``FederatedDataModule``.

Examples: ``atlas-pl fit --config configs/demo.yaml`` (add ``--print_config`` to see every option, or
``--ckpt_path last`` to resume).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from atlas_pl.callbacks import FederatedProgress, FederatedResults, RoundCheckpoint
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.io import AtomicCheckpointIO


class AtlasCLI(LightningCLI):
    """``LightningCLI`` with federation defaults: rounds as epochs, round progress, results JSON, round checkpoints.

    A ``RoundCheckpoint`` writes ``<save_dir>/<name>/checkpoints/last.ckpt`` atomically after every round (unless the
    config has its own ``ModelCheckpoint`` or ``trainer.enable_checkpointing`` is false).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clients", "model.num_clients")
        parser.link_arguments("data.task_format", "model.task_format")

    def instantiate_trainer(self, **kwargs: Any):  # type: ignore[override]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("plugins") is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(c, FederatedResults) for c in callbacks):
            callbacks.append(FederatedResults())
        if config.get("enable_checkpointing") is not False:
            callbacks = with_round_checkpoint(callbacks, config)
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(FederatedProgress())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def default_checkpoint_dir(config: dict[str, Any]) -> str:
    """``<save_dir>/<name>/checkpoints`` of the configured logger (not its versioned folder: ``last`` must find it)."""
    logger = config.get("logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    root_dir = config.get("default_root_dir") or os.getcwd()
    root = getattr(logger, "root_dir", None)
    if root is None:  # no logger object: Lightning's default logger folder, or the root folder without a logger
        root = root_dir if logger is False else os.path.join(root_dir, "lightning_logs")
    return os.path.join(str(root), "checkpoints")


def with_round_checkpoint(callbacks: list[Any], config: dict[str, Any]) -> list[Any]:
    """Add a ``RoundCheckpoint`` unless one is configured; warn of a ``ModelCheckpoint`` that never writes per round."""
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    for c in checkpoints:
        if not isinstance(c, RoundCheckpoint) and c.save_last and c.save_top_k == 0:
            warnings.warn(
                "ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only when fit ends (Lightning >= 2.6): "
                "a crash loses every round. Use atlas_pl.callbacks.RoundCheckpoint (or drop the callback: atlas-pl "
                "adds one) to write last.ckpt after every round",
                UserWarning,
                stacklevel=2,
            )
    if checkpoints:
        return callbacks
    return [*callbacks, RoundCheckpoint(dirpath=default_checkpoint_dir(config))]


TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 5,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,
    "log_every_n_steps": 1,
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``atlas-pl`` console script (``args`` for programmatic use and tests)."""
    try:
        AtlasCLI(
            Federation,
            FederatedDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except (ValueError, KeyError, FileNotFoundError) as err:
        if os.environ.get("ATLAS_PL_DEBUG"):
            traceback.print_exc()
        print(f"atlas-pl: error: {err}\n(set ATLAS_PL_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
