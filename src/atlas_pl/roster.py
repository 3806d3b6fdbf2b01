"""``ClientRoster``: the bookkeeping of a federation's clients — adapter names, clusters, ranks, cuts and sharing.

Every client trains with one client-half and one server-half adapter on the shared ``SplitBackbone``. Which adapter
that is follows the sharing policy and the client's cluster:

===========  ==========================  ==========================  =====================================
``share``    client adapter              server adapter              meaning
===========  ==========================  ==========================  =====================================
``none``     ``client_<i>``              ``server_<i>``              each client its own (local, or both
                                                                     sides aggregated per cluster)
``server``   ``client_<i>``              ``server_c<k>``             the cluster trains one server adapter
``all``      ``client_c<k>``             ``server_c<k>``             the cluster trains one model on its
                                                                     clients' batches in turn (pooled data)
===========  ==========================  ==========================  =====================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from atlas_pl.protocol import AdapterLayout, AdapterUpdate, Side
from atlas_pl.split.backbone import SplitBackbone

Share = Literal["none", "server", "all"]
SHARES = ("none", "server", "all")


class ClientRoster:
    """Adapter names, clusters, ranks and cut layers of ``num_clients`` clients on one backbone.

    Args:
        backbone: The shared split model; adapters are created on it as clients need them.
        num_clients: Number of clients.
        share: Sharing policy (see the module docstring).

    Raises:
        ValueError: ``share`` is not ``none``, ``server`` or ``all``.
    """

    def __init__(self, backbone: SplitBackbone, num_clients: int, share: Share = "server") -> None:
        if share not in SHARES:
            raise ValueError(f"`share` must be one of {SHARES}, got {share!r}")
        self.backbone, self.num_clients, self.share = backbone, num_clients, share
        self.cluster_ids: list[int] = [0] * num_clients
        self._folded: list[torch.Tensor] = []  # base deltas already added to the shared frozen weights

    def adapter(self, client: int, side: Side) -> str:
        """Name of the adapter ``client`` trains on ``side``."""
        cluster = self.cluster_ids[client]
        if side == "client":
            return f"client_c{cluster}" if self.share == "all" else f"client_{client}"
        return f"server_{client}" if self.share == "none" else f"server_c{cluster}"

    def aggregated_sides(self) -> tuple[Side, ...]:
        """Sides whose adapters belong to one client (and are merged per cluster): none when the cluster pools."""
        return {"none": ("client", "server"), "server": ("client",), "all": ()}[self.share]  # type: ignore[return-value]

    def assign(self, cluster_ids: Sequence[int]) -> None:
        """Move clients into clusters; a new shared adapter starts as a copy of what its first member used so far.

        Raises:
            ValueError: Not one id per client, or a negative id.
        """
        ids = [int(c) for c in cluster_ids]
        if len(ids) != self.num_clients or min(ids) < 0:
            raise ValueError(
                f"`cluster_ids` needs {self.num_clients} ids >= 0 (one per client), got {list(cluster_ids)!r}; "
                "clients left out of clustering must still be assigned a cluster"
            )
        before = {(c, side): self.adapter(c, side) for c in range(self.num_clients) for side in ("server", "client")}
        self.cluster_ids = ids
        backbone = self.backbone
        for (client, side), old in before.items():
            name = self.adapter(client, side)  # type: ignore[arg-type]
            if side == "server" and name not in backbone.server_adapters:
                backbone.add_server_adapter(name)
                backbone.load_adapter_state(name, backbone.adapter_state(old))
            elif side == "client" and name not in backbone.client_adapters:
                pattern, cut = dict(backbone.bank.ranks[old]), backbone.cut_of(old)
                backbone.add_client_adapter(name, rank_pattern=pattern, cut_layer=cut)
                backbone.load_adapter_state(name, backbone.adapter_state(old))

    def resize(self, name: str, rank_pattern: dict[str, int], cut_layer: int | None = None) -> None:
        """Re-create adapter ``name`` with ``rank_pattern`` (and a client's ``cut_layer``) unless it is so already.

        Resized adapters restart from ``B = 0`` and keep the update scaling ``lora_alpha / lora_rank``.

        Raises:
            ValueError: A cut outside ``[model.cut_layer, num_layers - 1]``.
        """
        bank, backbone = self.backbone.bank, self.backbone
        if cut_layer is not None and cut_layer != backbone.cut_of(name):
            backbone.validate_client_cut(cut_layer)
            bank.delete(name)
            backbone.add_client_adapter(name, rank_pattern=dict(rank_pattern), cut_layer=cut_layer)
            return
        if {m: bank.ranks[name].get(m) for m in rank_pattern} == dict(rank_pattern):
            return
        lora = backbone.lora
        bank.resize(name, dict(rank_pattern), lora.alpha / lora.rank, lora.dropout)

    # ------------------------------------------------------------------------------------------ exchange
    def layout(self, client: int, side: Side) -> AdapterLayout:
        """``{module: (rank, scaling)}`` of the adapter ``client`` trains on ``side``."""
        factors = self.backbone.bank.factors(self.adapter(client, side))
        return {m: (int(a.shape[0]), s) for m, (a, _, s) in factors.items()}

    def pull(self, client: int, side: Side, num_examples: float, task_id: int) -> AdapterUpdate:
        """A copy of ``client``'s adapter on ``side``; the server side also carries the head of the client's task.

        The head is keyed by its head id: clients of tasks that share a head average one head.
        """
        name = self.adapter(client, side)
        factors = self.backbone.bank.factors(name)
        head = self.backbone.head_state(name, task_id) if side == "server" else {}
        return AdapterUpdate(
            {m: (a.detach().clone(), b.detach().clone()) for m, (a, b, _) in factors.items()},
            {m: s for m, (_, _, s) in factors.items()},
            float(num_examples),
            extras={f"head.task{self.backbone.head_of(task_id)}.{k}": v for k, v in head.items()},
        )

    def push(self, client: int, side: Side, update: AdapterUpdate) -> None:
        """Load ``update`` into ``client``'s adapter on ``side`` (given modules and heads only)."""
        name = self.adapter(client, side)
        self.backbone.bank.load_factors(name, update.factors)
        if update.extras:
            self.backbone.load_adapter_state(name, dict(update.extras))
        for module, delta in update.base_deltas.items():
            if not any(delta is done for done in self._folded):  # one frozen base: fold each delta once
                self._folded.append(delta)
                add_to_base(self.backbone, module, delta)

    def end_aggregation(self) -> None:
        """Forget the deltas folded into the base (call once per round)."""
        self._folded = []

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "cluster_ids": list(self.cluster_ids),
            "adapter_ranks": {n: dict(r) for n, r in self.backbone.bank.ranks.items()},
            "client_cuts": dict(self.backbone.client_cuts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore clusters (creating their adapters), then every adapter's ranks and cut."""
        self.assign(list(state.get("cluster_ids", self.cluster_ids)))
        cuts = {str(k): int(v) for k, v in state.get("client_cuts", {}).items()}
        for name, ranks in state.get("adapter_ranks", {}).items():
            if name in self.backbone.bank.ranks:
                self.resize(name, {m: int(r) for m, r in ranks.items()}, cuts.get(name))


@torch.no_grad()
def add_to_base(backbone: SplitBackbone, module: str, delta: torch.Tensor) -> None:
    """Add a dense update to a module's frozen base weight (GPT-2's ``Conv1D`` stores ``W`` transposed)."""
    weight = backbone.model.get_submodule(module).get_base_layer().weight
    weight.add_((delta.T if backbone.arch.fan_in_fan_out else delta).to(weight.dtype))
