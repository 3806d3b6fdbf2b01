"""``ClientParallelStrategy``: one federated client (or shard of clients) per process, no gradient all-reduce.

Plain DDP averages gradients every step and requires every process to hold parameters of the same shapes. Federated
clients do neither: each trains its own adapters (possibly of its own rank) on its own data and only meets the others
at aggregation (``ClusterAggregation``), which uses ``torch.distributed`` collectives itself. This strategy keeps
everything DDP sets up — one process per device, the process group, distributed samplers, launchers — but does not wrap
the module in ``DistributedDataParallel``.

    trainer = L.Trainer(strategy=ClientParallelStrategy(), devices=4, callbacks=[ClusterAggregation("exact")])
    # CLI: --trainer.strategy atlas_pl.strategies.ClientParallelStrategy --trainer.devices 4
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class ClientParallelStrategy(DDPStrategy):
    """DDP processes without ``DistributedDataParallel``: each process trains independently between aggregations."""

    strategy_name = "client_parallel"

    def configure_ddp(self) -> None:
        """Leave the module unwrapped: no gradient synchronisation, no same-shape requirement."""
