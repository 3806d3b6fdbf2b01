"""``ClusterAggregation``: phase 4 of ATLAS — per-cluster aggregation of heterogeneous-rank LoRA adapters.

At the end of a round every client that trained sends its adapter (``pull``), the server merges each cluster's
adapters with the chosen :class:`~atlas_pl.algorithms.AggregationMethod` (``Exact``: ``ΔW_c = Σ p_i s_i B_i A_i`` from
stacked factors, re-decomposed to each member's ranks) and every member receives its share (``push``). The callback
sees the module only through the federation protocol (``atlas_pl.protocol.AdapterExchange``): ``Federation``
implements it for many simulated clients in one process, ``PeftClientMixin`` for one client per DDP process, where
the senders are gathered across processes with ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from atlas_pl.algorithms.aggregation import AggregationMethod, AggregationReport, aggregation_method
from atlas_pl.distributed import gather_objects, is_distributed
from atlas_pl.protocol import AdapterExchange, AdapterUpdate, FederationProtocolError, require


class ClusterAggregation(Callback):
    """Aggregate LoRA adapters per cluster at the end of every ``every_n_rounds``-th round.

    Hook: ``on_train_batch_end`` of the round's last training batch — after the round's last step, before its
    validation, so the round's validation scores the aggregated adapters; the same point under one process or many
    (``ClientParallelStrategy`` gives every process the same number of batches per round, so the collective of every
    process meets there). ``setup`` checks the protocol, ``on_fit_start`` the module's client record (weight and
    cluster, where it has one), ``on_train_epoch_start`` that a round has a length.

    Args:
        method: The aggregation method: an :class:`~atlas_pl.algorithms.AggregationMethod` (YAML:
            ``{class_path: atlas_pl.algorithms.Exact}``; also ``FedAvg``, ``ZeroPad``, ``DenseSVD``, ``FLoRA``) or its
            name (``exact``, ``fedavg``, ``zero_pad``, ``dense_svd``, ``flora``).
        every_n_rounds: Aggregate after every N-th round (epoch).
        global_weight: ``β`` in ``ΔW_c ← (1 − β) ΔW_c + β ΔW_all``: each cluster's merge leans toward the merge of
            every client (0 = per-cluster only, ATLAS as specified; 1 = one global model). Done exactly by weighting
            the senders: client ``i`` counts ``(1 − β) n_i / N_c`` in its own cluster plus ``β n_i / N`` in every
            cluster.
        reset_optimizer: Also forget each member's AdamW moments after it receives the merge (the module's
            ``reset_optimizer_state(client, side)``): the merged factors are a new basis, the kept moments belong to
            the old one. Off by default (the moments are kept, as in every baseline).
    """

    def __init__(
        self,
        method: AggregationMethod | str = "exact",
        every_n_rounds: int = 1,
        global_weight: float = 0.0,
        reset_optimizer: bool = False,
    ) -> None:
        self.method = aggregation_method(method)
        number = isinstance(global_weight, (int, float)) and not isinstance(global_weight, bool)
        if not number or not 0 <= global_weight <= 1:
            raise ValueError(f"`global_weight` must be a number in [0, 1], got {global_weight!r}")
        self.global_weight = float(global_weight)
        self.reset_optimizer = bool(reset_optimizer)
        if isinstance(every_n_rounds, bool) or not isinstance(every_n_rounds, int) or every_n_rounds < 1:
            raise ValueError(f"`every_n_rounds` must be an int >= 1, got {every_n_rounds!r}")
        self.every_n_rounds = every_n_rounds
        self.last_round = -1
        self.reports: dict[int, AggregationReport] = {}

    def should_aggregate(self, round_idx: int) -> bool:
        """Whether to aggregate at the end of ``round_idx`` (0-based): the policy a subclass may change."""
        return (round_idx + 1) % self.every_n_rounds == 0 and round_idx > self.last_round

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, AdapterExchange, "ClusterAggregation")
            if self.reset_optimizer and not callable(getattr(pl_module, "reset_optimizer_state", None)):
                raise FederationProtocolError(
                    f"ClusterAggregation(reset_optimizer=True) needs {type(pl_module).__name__}."
                    "reset_optimizer_state(client, side); implement it (see Federation.reset_optimizer_state) or set "
                    "reset_optimizer=False"
                )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = getattr(pl_module, "client_record", None)  # PeftClientMixin: warn or fail before any training
        if callable(record):
            record()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.num_training_batches == float("inf"):
            raise ValueError(
                "ClusterAggregation aggregates at a round's last batch, but the train dataloader has no length; "
                "give it a `__len__` or set `trainer.limit_train_batches` to an int"
            )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches or not self.should_aggregate(trainer.current_epoch):
            return
        metrics = self.aggregate(pl_module)
        self.last_round = trainer.current_epoch
        pl_module.log_dict(metrics, logger=False, batch_size=1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)

    # ------------------------------------------------------------------------------------------ one aggregation
    def aggregate(self, module: Any) -> dict[str, float]:
        """Pull the senders' adapters, merge per cluster and side, push every hosted member its share; return metrics.

        Under several processes each process sends its senders and cluster ids to all (one collective per call).

        Raises:
            ValueError: The method cannot serve these clusters (FLoRA with several) or these adapters.
        """
        sides, local, clusters, sent = collect_updates(module)
        self.method.check_clusters(len(set(clusters.values())))
        metrics: dict[str, float] = {}
        for cluster in sorted(set(clusters.values())):
            members = [c for c in local if clusters[c] == cluster]
            for side in sides:
                senders = [u for (c, s), u in sorted(sent.items()) if s == side and clusters[c] == cluster]
                if not senders or not members:
                    continue
                if self.global_weight > 0:
                    senders = mixed_senders(sent, clusters, cluster, side, self.global_weight)
                updates, report = self.method.aggregate(senders, [module.adapter_layout(c, side) for c in members])
                for client, update in zip(members, updates):
                    module.push(client, side, update)
                    if self.reset_optimizer:
                        module.reset_optimizer_state(client, side)
                if side == "client":
                    self.reports[cluster] = report
                metrics.update(report_metrics(report, cluster, side, members))
        return metrics

    # ------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_round": self.last_round, "method": self.method.name}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_round = int(state_dict.get("last_round", -1))


def collect_updates(
    module: Any,
) -> tuple[tuple[str, ...], list[int], dict[int, int], dict[tuple[int, str], AdapterUpdate]]:
    """What one aggregation starts from, under several processes gathered from all of them (one collective).

    Returns:
        The adapter sides, this process's hosted clients, every client's cluster, and every participant's pulled
        update per ``(client, side)``.
    """
    sides = tuple(module.adapter_sides())
    local = list(module.local_clients())
    clusters = {c: int(module.cluster_of(c)) for c in local}
    sent = {(c, s): module.pull(c, s) for c in module.participants() for s in sides}
    if is_distributed():
        shared = gather_objects((clusters, {k: u.cpu() for k, u in sent.items()}))
        clusters = {c: k for part, _ in shared for c, k in part.items()}
        sent = {key: u for _, part in shared for key, u in part.items()}
    return sides, local, clusters, sent


def mixed_senders(
    sent: dict[tuple[int, str], AdapterUpdate], clusters: dict[int, int], cluster: int, side: str, beta: float
) -> list[AdapterUpdate]:
    """Every sender of ``side`` weighted so that their merge is ``(1 − β) ΔW_cluster + β ΔW_all``.

    Client ``i`` (``n_i`` examples) counts ``(1 − β) n_i / N_c`` if it is in ``cluster`` plus ``β n_i / N``; a merge
    that normalizes the weights then yields the mixture exactly (the merge is linear in the weights).
    """
    side_sent = {c: u for (c, s), u in sorted(sent.items()) if s == side}
    total = sum(float(u.num_examples) for u in side_sent.values())
    in_cluster = sum(float(u.num_examples) for c, u in side_sent.items() if clusters[c] == cluster)
    out = []
    for c, u in side_sent.items():
        weight = beta * float(u.num_examples) / total
        if clusters[c] == cluster:
            weight += (1 - beta) * float(u.num_examples) / in_cluster
        if weight > 0:
            out.append(replace(u, num_examples=weight))
    return out


def report_metrics(report: AggregationReport, cluster: int, side: str, members: list[int]) -> dict[str, float]:
    """Scalars of one cluster's aggregation: mean update norm, bytes, and each member's truncation error."""
    norms = list(report.update_norm.values())
    out = {
        f"aggregation/{side}_update_norm/cluster_{cluster}": float(sum(norms) / max(1, len(norms))),
        f"aggregation/{side}_bytes/cluster_{cluster}": float(report.bytes_exchanged),
    }
    for j, client in enumerate(members):
        errors = [errs[j] for errs in report.truncation_error.values() if j < len(errs) and errs[j] == errs[j]]
        if errors:
            out[f"aggregation/{side}_truncation_error/client_{client:03d}"] = float(max(errors))
    return out
