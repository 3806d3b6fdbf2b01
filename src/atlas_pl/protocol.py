"""The federation protocol: the few methods the phase callbacks call on a LightningModule, and the records they pass.

The phase callbacks (``TaskClustering``, ``RankAllocation``, ``ClusterAggregation``) see a module only through these
methods, the way a Flower strategy sees clients only through ``FitIns``/``FitRes`` records. ``Federation`` (many
simulated clients over one backbone) implements them, and so does ``PeftClientMixin`` (one DDP process = one client,
any peft LoRA model); any other LightningModule can implement them too. Clients are named by global integer ids; a
process *hosts* some of them (``local_clients``), all of them in a ``Federation``, one under ``PeftClientMixin``.

=================  ==========================================================================  ==========
method             what it returns or does                                                     phases
=================  ==========================================================================  ==========
local_clients()    ids of the clients this process hosts                                       1, 2, 4
cluster_of(c)      cluster id of client ``c``                                                  1, 2, 4
client_batches()   ``(c, num_batches, seed) ->`` a few training batches of client ``c``        1, 2
task_signal()      ``(c, batches, kind) -> {"<side>.<module>.lora_B": flat tensor}``           1, 2
assign_clusters()  ``(ids)``: client ``i`` (global id) joins cluster ``ids[i]``                1
client_modules()   ``(c, cut) ->`` module names a client adapter covers when cutting at ``cut``  2
client_sizing()    ``-> ClientSizing``: model shape, batch, sequence length (memory estimate)  2
resize()           ``(c, rank_pattern, cut)``: re-create ``c``'s client adapter at those ranks 2
participants()     ids of the hosted clients that trained this round (the senders)           4
adapter_sides()    the sides aggregated per cluster: ``("client",)`` or ``("client", "server")``  4
adapter_layout()   ``(c, side) -> {module: (rank, scaling)}``: what ``c`` can receive          4
pull()             ``(c, side) -> AdapterUpdate``: what ``c`` sends                            4
push()             ``(c, side, AdapterUpdate)``: load what ``c`` receives                      4
=================  ==========================================================================  ==========

Each callback checks at setup that the module has the methods of its phase (:func:`require`) and names every missing
one. Callbacks rebuild the optimizers themselves after ``assign_clusters`` and ``resize`` change parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

Side = Literal["client", "server"]
AdapterLayout = dict[str, tuple[int, float]]  # module name -> (rank, scaling) of one adapter
PROTOCOL_DOCS = "the 'Federation protocol' section of the README and atlas_pl/protocol.py"


@dataclass
class AdapterUpdate:
    """One client's LoRA adapter of one side as it travels to or from the server.

    Attributes:
        factors: Per module ``(A [r×d_in], B [d_out×r])``; the update of the module is ``s · B @ A``.
        scalings: Per module the scaling ``s`` (``alpha / r``).
        num_examples: The sender's aggregation weight (its training-set size); ignored on the way down.
        extras: Other trainable tensors, averaged by ``num_examples`` among the senders holding the same key (task
            heads: ``head.task<t>.weight``).
        base_deltas: Per module a dense ``ΔW`` the receiver adds to its frozen base weight (the FLoRA baseline).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    scalings: dict[str, float]
    num_examples: float = 1.0
    extras: dict[str, Tensor] = field(default_factory=dict)
    base_deltas: dict[str, Tensor] = field(default_factory=dict)

    @property
    def layout(self) -> AdapterLayout:
        """``{module: (rank, scaling)}``."""
        return {m: (int(a.shape[0]), float(self.scalings[m])) for m, (a, _) in self.factors.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the LoRA factors (what crosses the network for the adapter)."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())

    def delta(self, module: str) -> Tensor:
        """The dense update ``s · B @ A`` of ``module`` (for checks; aggregation never forms it)."""
        a, b = self.factors[module]
        return self.scalings[module] * (b.double() @ a.double())

    def cpu(self) -> AdapterUpdate:
        """A copy on the CPU (to gather across processes)."""
        return AdapterUpdate(
            {m: (a.detach().cpu(), b.detach().cpu()) for m, (a, b) in self.factors.items()},
            dict(self.scalings),
            float(self.num_examples),
            {k: v.detach().cpu() for k, v in self.extras.items()},
            {k: v.detach().cpu() for k, v in self.base_deltas.items()},
        )


@dataclass(frozen=True)
class ClientSizing:
    """What a memory estimate of a client needs (see ``atlas_pl.memory``).

    Attributes:
        model_config: The Hugging Face config of the model (``ModelShape.from_config`` reads it).
        batch_size: Training batch size.
        seq_len: Tokens per example.
        target_modules: LoRA target suffixes inside one block (``"attn.c_attn"``).
        cut_layer: Blocks a client runs when it does not choose its own cut.
        dtype: Dtype name of the frozen weights (``"float32"``).
        device: ``"cpu"`` or ``"cuda"``.
        local_steps: Training steps per client per round (latency estimates).
    """

    model_config: Any
    batch_size: int
    seq_len: int
    target_modules: tuple[str, ...]
    cut_layer: int
    dtype: str = "float32"
    device: str = "cpu"
    local_steps: int = 1


@runtime_checkable
class HostsClients(Protocol):
    """What every phase needs: which clients live in this process, and their clusters."""

    def local_clients(self) -> list[int]: ...

    def cluster_of(self, client: int) -> int: ...


@runtime_checkable
class SignalSource(HostsClients, Protocol):
    """A few batches of a client and the gradient signal of its adapters on them."""

    def client_batches(self, client: int, num_batches: int, seed: int) -> list[Any]: ...

    def task_signal(self, client: int, batches: list[Any], kind: str = "grad_B") -> dict[str, Tensor]: ...


@runtime_checkable
class TaskDiscovery(SignalSource, Protocol):
    """Phase 1 (``TaskClustering``): signals in, clusters out."""

    def assign_clusters(self, cluster_ids: Sequence[int]) -> None: ...


@runtime_checkable
class RankConfiguration(SignalSource, Protocol):
    """Phase 2 (``RankAllocation``): module importance in, per-client ranks (and cut) out."""

    def client_modules(self, client: int, cut_layer: int | None = None) -> list[str]: ...

    def client_sizing(self) -> ClientSizing: ...

    def resize(self, client: int, rank_pattern: dict[str, int], cut_layer: int | None = None) -> None: ...


@runtime_checkable
class AdapterExchange(HostsClients, Protocol):
    """Phase 4 (``ClusterAggregation``): adapters pulled from the senders, pushed to every member."""

    def participants(self) -> list[int]: ...

    def adapter_sides(self) -> tuple[Side, ...]: ...

    def adapter_layout(self, client: int, side: Side) -> AdapterLayout: ...

    def pull(self, client: int, side: Side) -> AdapterUpdate: ...

    def push(self, client: int, side: Side, update: AdapterUpdate) -> None: ...


class FederationProtocolError(TypeError):
    """A module handed to a phase callback lacks methods of the federation protocol."""


def protocol_methods(protocol: type) -> list[str]:
    """The method names a protocol class asks for (its own and its bases')."""
    names: dict[str, None] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or klass.__module__ == "typing":
            continue
        names.update(dict.fromkeys(n for n, v in vars(klass).items() if callable(v) and not n.startswith("_")))
    return list(names)


def missing_methods(module: Any, protocol: type) -> list[str]:
    """Methods of ``protocol`` that ``module`` does not provide."""
    return [n for n in protocol_methods(protocol) if not callable(getattr(module, n, None))]


def require(module: Any, protocol: type, who: str) -> None:
    """Raise one clear error unless ``module`` provides every method of ``protocol``.

    Raises:
        FederationProtocolError: Names the module, the missing methods, the fix and where the protocol is documented.
    """
    missing = missing_methods(module, protocol)
    if missing:
        raise FederationProtocolError(
            f"{who} needs {type(module).__name__} to implement the federation protocol ({protocol.__name__}); "
            f"missing: {', '.join(missing)}. Fix: implement them, or mix `atlas_pl.PeftClientMixin` into a module "
            f"whose model is a peft LoRA model (one DDP process = one client); see {PROTOCOL_DOCS}"
        )


def moved_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in a dict, list or tuple) moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: moved_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(moved_to(v, device) for v in batch)
    return batch
