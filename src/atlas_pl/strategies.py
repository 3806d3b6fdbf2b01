"""``ClientParallelStrategy``: one federated client per process, no gradient all-reduce.

Plain DDP averages gradients every step and requires every process to hold parameters of the same shapes. Federated
clients do neither: each trains its own adapters (possibly of its own rank) on its own data and only meets the others
at aggregation (``ClusterAggregation``), which uses ``torch.distributed`` collectives itself. This strategy keeps
everything DDP sets up — one process per device, the process group, launchers — but does not wrap the module in
``DistributedDataParallel``, does not shard a client's data with a ``DistributedSampler`` (each process's dataloader
*is* its client's data), and makes every process run the same number of batches per round: Lightning meets the
other processes in a collective at every training step, so a process with more batches would wait forever for the
others at aggregation. The processes agree on the smallest count when the train dataloaders are built, and the others
train that many batches per round (a warning names the counts).

    trainer = L.Trainer(strategy=ClientParallelStrategy(), devices=4, callbacks=[ClusterAggregation("exact")])
    # CLI: --trainer.strategy client_parallel --trainer.devices 4
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from lightning.fabric.utilities.data import has_len
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from atlas_pl.distributed import gather_objects, is_distributed


class ClientParallelStrategy(DDPStrategy):
    """DDP processes without ``DistributedDataParallel``: each process trains independently between aggregations."""

    strategy_name = "client_parallel"

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        # Lightning would shard every process's data with a DistributedSampler; here each process is its own client.
        # (A private attribute of the pinned Lightning; tests/callbacks/test_foreign_project.py checks the effect.)
        self._trainer()._accelerator_connector.use_distributed_sampler = False

    @override
    def configure_ddp(self) -> None:
        """Leave the module unwrapped: no gradient synchronisation, no same-shape requirement."""

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Give every process's train dataloader the same number of batches (the smallest among the processes).

        Raises:
            ValueError: A process's train dataloader has no length (rounds could not end at the same step).
        """
        if not (is_distributed() and self._trainer().training):
            return dataloader
        mine = len(dataloader) if has_len(dataloader) else None  # type: ignore[arg-type]
        counts = gather_objects(mine)
        if any(c is None for c in counts):
            raise ValueError(
                "ClientParallelStrategy needs a train dataloader with a length on every process (rounds must end at "
                f"the same step everywhere); got lengths {counts} by process rank. Fix: give the dataset a __len__"
            )
        agreed = min(counts)
        if len(set(counts)) > 1:
            rank_zero_warn(
                f"the clients' train dataloaders have {counts} batches (by process rank); every client trains "
                f"{agreed} per round so that all processes aggregate at the same step (shuffle the larger clients' "
                "data to see all of it over the rounds, or give every client the same number of batches)"
            )
        return dataloader if mine == agreed else FirstBatches(dataloader, agreed)

    def _trainer(self) -> Any:
        module = self.lightning_module
        if module is None:
            raise RuntimeError("ClientParallelStrategy is not connected to a LightningModule yet")
        return module.trainer


class FirstBatches:
    """The first ``num_batches`` batches of a dataloader (attributes are the dataloader's)."""

    def __init__(self, dataloader: Any, num_batches: int) -> None:
        self.dataloader, self.num_batches = dataloader, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.dataloader), self.num_batches)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["dataloader"], name)


if ClientParallelStrategy.strategy_name not in StrategyRegistry:  # `--trainer.strategy client_parallel`
    StrategyRegistry.register(
        ClientParallelStrategy.strategy_name,
        ClientParallelStrategy,
        description="DDP processes without gradient synchronisation: one federated client (or a shard) per process",
    )
