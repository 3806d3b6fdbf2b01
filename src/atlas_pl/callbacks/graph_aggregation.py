"""``GraphAggregation``: the MIRA baseline — personalized adapters pulled toward their task neighbours.

MIRA (federated multi-task learning for LLMs) keeps one adapter per client and, at the end of each round, moves every
client's parameters toward those of the clients it is similar to, with the Laplacian step of a task-similarity graph
``W``: ``θ_k ← θ_k − λ Σ_l W_kl (θ_k − θ_l)`` (``W`` row-normalized, so this is ``(1 − λ) θ_k + λ Σ_l W_kl θ_l``). There
are no clusters and no merge. MIRA takes the graph as given; without task labels the graph here is estimated each
round from the clients' own updates: ``W_kl ∝ max(0, cos(ΔW_k, ΔW_l))`` over the concatenated dense updates
``s · B @ A`` of every module and side (``W_kk = 0``). The callback uses only the federation protocol and aggregates
at the same point of a round as :class:`ClusterAggregation`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from atlas_pl.algorithms.merge import fedavg
from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation, check_quorum, collect_updates
from atlas_pl.protocol import AdapterUpdate


def similarity_graph(updates: dict[int, list[AdapterUpdate]]) -> tuple[list[int], Tensor]:
    """Row-normalized task-similarity graph of clients from their updates.

    Args:
        updates: Per client its updates (one per adapter side); every client must hold the same modules.

    Returns:
        The client ids (graph order) and ``W`` (``n × n``, float64): ``max(0, cos)`` between the concatenated dense
        updates, zero diagonal, rows summing to 1 (a row of zeros where a client is similar to nobody).
    """
    ids = sorted(updates)
    vectors = []
    for c in ids:
        parts = [
            (float(u.scalings[m]) * (b.double() @ a.double())).flatten()
            for u in updates[c]
            for m, (a, b) in sorted(u.factors.items())
        ]
        vectors.append(torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64))
    x = torch.stack(vectors)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    w = (x @ x.T).clamp_min(0.0)
    w.fill_diagonal_(0.0)
    rows = w.sum(dim=1, keepdim=True)
    return ids, torch.where(rows > 0, w / rows.clamp_min(1e-30), torch.zeros_like(w))


class GraphAggregation(ClusterAggregation):
    """MIRA: every client keeps its own adapter, moved toward its neighbours on a task-similarity graph each round.

    Hooks: those of :class:`ClusterAggregation` (the round's last training batch). Needs one rank for all clients
    (the mixing acts on the ``A`` and ``B`` factors, as MIRA does) and ``share: none`` in a ``Federation`` (one
    adapter per client on both sides); clusters are ignored.

    Args:
        strength: ``λ`` in ``θ_k ← (1 − λ) θ_k + λ Σ_l W_kl θ_l`` (0 = local training, 1 = replace by the neighbours'
            weighted mean).
        every_n_rounds: Mix after every N-th round.
    """

    def __init__(self, strength: float = 0.5, every_n_rounds: int = 1) -> None:
        super().__init__("fedavg", every_n_rounds)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"`strength` must be a number in [0, 1], got {strength!r}")
        self.strength = float(strength)
        self.graph: Tensor | None = None

    def aggregate(self, module: Any, round_idx: int = 0) -> dict[str, float]:
        """Pull every client's adapters, build the graph, push each hosted client its mixed adapter; return metrics.

        Raises:
            ValueError: Clients hold different ranks or modules (MIRA mixes factors of one shape).
        """
        sides, local, clusters, sent, faults = collect_updates(module)
        check_quorum(clusters, sent, faults, self.quorum, round_idx)
        per_client: dict[int, list[AdapterUpdate]] = {}
        for (c, _side), u in sorted(sent.items()):
            per_client.setdefault(c, []).append(u)
        shapes = {c: [(m, tuple(a.shape), tuple(b.shape)) for u in us for m, (a, b) in sorted(u.factors.items())]
                  for c, us in per_client.items()}  # fmt: skip
        if len({tuple(v) for v in shapes.values()}) > 1:
            raise ValueError(
                "GraphAggregation (MIRA) mixes the A and B factors of every client, which needs one rank and the same "
                "modules for all; drop RankAllocation or give it a single budget, and keep one cut layer"
            )
        ids, w = similarity_graph(per_client)
        self.graph = w
        metrics: dict[str, float] = {"aggregation/graph_mean_degree": float((w > 0).sum(dim=1).double().mean())}
        for k in local:
            if k in faults and ids:  # left out this round: no row in the graph; it gets the mean of the senders
                for side in sides:
                    senders = [sent[(c, side)] for c in ids]
                    module.push(k, side, mix(senders[0], senders, torch.ones(len(ids)) / len(ids), 1.0))
                continue
            if k not in ids:
                continue
            row = w[ids.index(k)]
            if float(row.sum()) == 0.0:  # similar to nobody: keeps its own adapter
                continue
            for side in sides:
                module.push(k, side, mix(sent[(k, side)], [sent[(c, side)] for c in ids], row, self.strength))
        return metrics


def mix(own: AdapterUpdate, others: list[AdapterUpdate], row: Tensor, strength: float) -> AdapterUpdate:
    """``(1 − λ) θ_own + λ Σ_l row_l θ_l`` for every factor, and for every extra among the clients holding it."""
    weights = [float(w) for w in row]
    out = AdapterUpdate({}, dict(own.scalings), own.num_examples)
    for m, (a, b) in own.factors.items():
        neighbours = fedavg([{"A": u.factors[m][0], "B": u.factors[m][1]} for u in others], weights)
        mixed = fedavg([{"A": a, "B": b}, neighbours], [1 - strength, strength])
        out.factors[m] = (mixed["A"], mixed["B"])
    for key, value in own.extras.items():
        held = [j for j, u in enumerate(others) if key in u.extras and weights[j] > 0]
        if not held:
            out.extras[key] = value
            continue
        neighbour = fedavg([{key: others[j].extras[key]} for j in held], [weights[j] for j in held])[key]
        out.extras[key] = fedavg([{key: value}, {key: neighbour}], [1 - strength, strength])[key]
    return out
