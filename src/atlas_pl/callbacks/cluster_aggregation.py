"""``ClusterAggregation``: phase 4 of ATLAS — per-cluster aggregation of heterogeneous-rank LoRA adapters.

At the end of a round every client that trained sends its adapter (``pull``), the server merges each cluster's
adapters with the chosen :class:`~atlas_pl.algorithms.AggregationMethod` (``Exact``: ``ΔW_c = Σ p_i s_i B_i A_i`` from
stacked factors, re-decomposed to each member's ranks) and every member receives its share (``push``). The callback
sees the module only through the federation protocol (``atlas_pl.protocol.AdapterExchange``): ``Federation``
implements it for many simulated clients in one process, ``PeftClientMixin`` for one client per DDP process, where
the senders are gathered across processes with ``torch.distributed``.

Faults (``atlas_pl.faults``): a sender whose update is not finite is dropped (and reported) before any merge; clients
the module reports as faulty this round (``round_faults()``, optional) send nothing but still receive their cluster's
merge; a cluster with fewer than ``quorum`` of its round's clients answering fails the round with the reasons.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from atlas_pl.algorithms.aggregation import AggregationMethod, AggregationReport, aggregation_method
from atlas_pl.distributed import gather_objects, is_distributed
from atlas_pl.faults import QuorumError, non_finite, quorum_message
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
        quorum: Fraction of a cluster's clients of the round (those that sent, plus those left out for a fault) that
            must have sent a finite update; below it the round fails with a ``QuorumError`` naming the faults. With
            the default 0 a cluster needs one healthy sender.
    """

    def __init__(
        self,
        method: AggregationMethod | str = "exact",
        every_n_rounds: int = 1,
        global_weight: float = 0.0,
        reset_optimizer: bool = False,
        quorum: float = 0.0,
    ) -> None:
        self.method = aggregation_method(method)
        if isinstance(quorum, bool) or not isinstance(quorum, (int, float)) or not 0 <= quorum <= 1:
            raise ValueError(f"`quorum` must be a number in [0, 1], got {quorum!r}")
        self.quorum = float(quorum)
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
        metrics = self.aggregate(pl_module, trainer.current_epoch)
        self.last_round = trainer.current_epoch
        pl_module.log_dict(metrics, logger=False, batch_size=1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)

    # ------------------------------------------------------------------------------------------ one aggregation
    def aggregate(self, module: Any, round_idx: int = 0) -> dict[str, float]:
        """Pull the senders' adapters, merge per cluster and side, push every hosted member its share; return metrics.

        Under several processes each process sends its senders and cluster ids to all (one collective per call).

        Raises:
            ValueError: The method cannot serve these clusters (FLoRA with several) or these adapters.
            QuorumError: A cluster had fewer healthy senders than ``quorum`` asks.
        """
        sides, local, clusters, sent, faults = collect_updates(module)
        check_quorum(clusters, sent, faults, self.quorum, round_idx)
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


class RoundUpdates(NamedTuple):
    """What one aggregation starts from (see :func:`collect_updates`)."""

    sides: tuple[str, ...]
    local: list[int]
    clusters: dict[int, int]
    sent: dict[tuple[int, str], AdapterUpdate]
    faults: dict[int, str]


def collect_updates(module: Any) -> RoundUpdates:
    """What one aggregation starts from, under several processes gathered from all of them (one collective).

    Returns:
        The adapter sides, this process's hosted clients, every client's cluster, every healthy participant's pulled
        update per ``(client, side)``, and the faulty clients with their reason: those the module left out this round
        (``round_faults()``, where it has one) and those whose update holds a NaN or an infinity (dropped here).
    """
    sides = tuple(module.adapter_sides())
    local = list(module.local_clients())
    clusters = {c: int(module.cluster_of(c)) for c in local}
    reported = getattr(module, "round_faults", None)
    faults: dict[int, str] = dict(reported()) if callable(reported) else {}
    sent = {(c, s): module.pull(c, s) for c in module.participants() if c not in faults for s in sides}
    if is_distributed():
        shared = gather_objects((clusters, {k: u.cpu() for k, u in sent.items()}, faults))
        clusters = {c: k for part, _, _ in shared for c, k in part.items()}
        sent = {key: u for _, part, _ in shared for key, u in part.items()}
        faults = {c: why for _, _, part in shared for c, why in part.items()}
    for (c, side), u in sorted(sent.items()):
        if c not in faults and non_finite([t for ab in u.factors.values() for t in ab] + list(u.extras.values())):
            faults[c] = f"non-finite {side} update"
    sent = {key: u for key, u in sent.items() if key[0] not in faults}
    return RoundUpdates(sides, local, clusters, sent, faults)


def check_quorum(
    clusters: dict[int, int], sent: dict[tuple[int, str], AdapterUpdate], faults: dict[int, str], quorum: float,
    round_idx: int,
) -> None:  # fmt: skip
    """Check that every cluster with faulty clients this round can still be merged.

    It needs one healthy sender and ``quorum`` of its round's clients (healthy senders plus faulty) healthy.

    Raises:
        QuorumError: Names the round, the cluster, the healthy count and every fault with its reason.
    """
    for cluster in sorted({clusters[c] for c in faults if c in clusters}):
        healthy = sorted({c for c, _ in sent if clusters.get(c) == cluster})
        failed = {c: why for c, why in faults.items() if clusters.get(c) == cluster}
        if not healthy or len(healthy) < math.ceil(quorum * (len(healthy) + len(failed)) - 1e-9):
            raise QuorumError(quorum_message(round_idx, cluster, healthy, failed, quorum))


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
