"""The ``atlas-pl`` command: a ``LightningCLI`` over ``Federation`` and ``FederatedDataModule``.

Examples: ``atlas-pl fit --config configs/demo.yaml`` (add ``--print_config`` to see every option, or
``--ckpt_path last`` to resume).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from atlas_pl.callbacks import FederatedProgress, FederatedResults
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.io import AtomicCheckpointIO


class AtlasCLI(LightningCLI):
    """``LightningCLI`` with federation defaults: rounds as epochs, round-named progress, results JSON, atomic ckpts."""

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
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(FederatedProgress())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


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
