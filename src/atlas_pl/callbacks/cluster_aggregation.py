"""``ClusterAggregation``: phase 4 of ATLAS — per-cluster aggregation of heterogeneous-rank LoRA adapters.

At the end of a round the adapters of each cluster's participating clients are merged exactly
(``ΔW_c = Σ p_i s_i B_i A_i`` from stacked factors, see ``algorithms.aggregation``) and every member of the cluster
receives the merge re-decomposed to its own ranks; the baselines (``fedavg``, ``zero_pad``, ``flora``,
``dense_svd``) are options of the same call.

Two ways to use it:

* with ``Federation`` (atlas-pl's module: many simulated clients over one backbone) — it takes aggregation over from
  the module's built-in FedAvg;
* in any Lightning project whose module holds peft LoRA layers and trains under DDP, where each process is one client
  with its own rank pattern: every ``every_n_rounds`` epochs it gathers the adapters across processes with
  ``torch.distributed`` collectives, merges within the cluster named by the module's ``cluster_id`` attribute and
  loads each process's share back, weighting each client by the module's ``num_examples`` attribute. A module
  without them gets the defaults (cluster 0, weight 1) and one ``UserWarning`` per missing attribute.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from atlas_pl.algorithms.aggregation import AggregationReport, Method, aggregate_lora

METHODS = ("exact", "fedavg", "zero_pad", "flora", "dense_svd")

_CLIENT_DEFAULTS: dict[str, tuple[Any, str]] = {
    "num_examples": (1, "this client's aggregation weight; every client counts equally"),
    "cluster_id": (0, "this client's cluster; all clients are merged together"),
}


class ClusterAggregation(Callback):
    """Aggregate LoRA adapters per cluster at the end of every ``every_n_rounds`` rounds.

    In DDP mode (a module other than ``Federation``; one process = one client) the callback reads two attributes of
    the module at the start of fit and at each aggregation (set them in ``__init__`` or ``setup``, e.g.
    ``self.num_examples = len(train_dataset)`` and ``self.cluster_id = 1``):

    * ``num_examples`` (a number > 0): the client's aggregation weight, normally its training-set size;
    * ``cluster_id`` (an int): clients are merged only with the clients of the same cluster.

    A missing attribute is not an error, since one cluster with equal weights is a valid federation: the callback
    then uses ``num_examples=1`` / ``cluster_id=0`` and warns once per attribute (a ``UserWarning`` naming the
    attribute, the default and how to set it), so a misspelt attribute does not go unnoticed. A present attribute
    with a bad value (``num_examples`` not a finite number > 0, ``cluster_id`` not an int) raises a ``ValueError``
    at the start of fit.

    Args:
        method: ``exact`` (ATLAS: lossless merge, best rank-``r_j`` re-decomposition per client), ``fedavg``
            (SplitLoRA; equal ranks), ``zero_pad`` (HetLoRA-style), ``flora`` (merge into the base weights; one
            cluster only, because the frozen base is shared), ``dense_svd`` (FlexLoRA).
        every_n_rounds: Aggregate after every N-th round (epoch).
        adapter_name: DDP mode: the peft adapter to aggregate.
    """

    def __init__(self, method: Method = "exact", every_n_rounds: int = 1, adapter_name: str = "default") -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        if isinstance(every_n_rounds, bool) or not isinstance(every_n_rounds, int) or every_n_rounds < 1:
            raise ValueError(f"`every_n_rounds` must be an int >= 1, got {every_n_rounds!r}")
        self.method: Method = method
        self.every_n_rounds = every_n_rounds
        self.adapter_name = adapter_name
        self.last_round = -1
        self.reports: dict[int, AggregationReport] = {}
        self._warned: set[str] = set()

    def should_aggregate(self, round_idx: int) -> bool:
        """Whether to aggregate at the end of ``round_idx`` (0-based)."""
        return (round_idx + 1) % self.every_n_rounds == 0 and round_idx > self.last_round

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if _is_federation(pl_module):
            pl_module.external_aggregation = True  # type: ignore[assignment]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _is_federation(pl_module):
            return
        if not _lora_layers(pl_module, self.adapter_name):
            raise ValueError(
                f"ClusterAggregation found no peft LoRA layers with adapter {self.adapter_name!r} in "
                f"{type(pl_module).__name__}; wrap the model with peft.get_peft_model or set `adapter_name`"
            )
        self.client_record(pl_module)  # up front: warn about missing attributes, reject bad values before training

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _is_federation(pl_module) or batch_idx + 1 < trainer.num_training_batches:
            return
        if self.should_aggregate(trainer.current_epoch):
            self.aggregate_federation(pl_module)
            self.last_round = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _is_federation(pl_module) or not self.should_aggregate(trainer.current_epoch):
            return
        self.aggregate_distributed(pl_module)
        self.last_round = trainer.current_epoch

    # ------------------------------------------------------------------------------------------ federation
    @torch.no_grad()
    def aggregate_federation(self, fed: Any) -> dict[str, float]:
        """Aggregate every cluster of a ``Federation`` (client and per-client server adapters); log; return metrics."""
        metrics: dict[str, float] = {}
        participants = fed.participants
        kinds = ["client_adapter"] + (["server_adapter"] if fed.server_adapters == "per_client" else [])
        for cluster in sorted(set(fed.cluster_ids)):
            members = [i for i, c in enumerate(fed.cluster_ids) if c == cluster]
            active = [i for i in participants if i in members]
            if not active:
                continue
            for kind in kinds:
                names = [getattr(fed.clients[i], kind) for i in members]
                weights = [fed.num_examples[i] for i in active]
                report, order = self._merge_into(fed, names, [members.index(i) for i in active], weights)
                nbytes = self._count(fed, kind, members, active)
                side = kind.split("_")[0]
                metrics.update(_report_metrics(report, cluster, side, [members[j] for j in order]))
                metrics[f"aggregation/{side}_bytes/cluster_{cluster}"] = float(nbytes)
            if fed.server_adapters == "per_client":
                fed.aggregate_heads(active, members)
        fed.log_round(metrics)
        return metrics

    def _merge_into(
        self, fed: Any, names: list[str], active: list[int], weights: list[int]
    ) -> tuple[AggregationReport, list[int]]:
        """Merge the active adapters among ``names``; load the result into all of them; report and their order.

        Clients that cut at different layers hold different modules: each module is merged among the clients that
        hold it (groups of modules with the same holders are merged together).
        """
        if self.method == "flora" and len(set(fed.cluster_ids)) > 1:
            raise ValueError(
                "`method='flora'` merges into the frozen base weights, which all clusters share; use it "
                "with one cluster, or choose 'exact'"
            )
        bank = fed.backbone.bank
        order = active + [j for j in range(len(names)) if j not in active]  # active clients first, then the others
        groups: dict[tuple[int, ...], list[str]] = {}
        for module in dict.fromkeys(m for n in names for m in bank.ranks[n]):
            groups.setdefault(tuple(j for j in order if module in bank.ranks[names[j]]), []).append(module)
        new_states: list[dict[str, torch.Tensor]] = [{} for _ in names]
        report = AggregationReport(method=self.method)
        for holders, modules in groups.items():
            part = self._merge_group(fed, names, holders, [j for j in active if j in holders], weights, active, modules)
            for j, state in zip(holders, part[0]):
                new_states[j].update(state)
            for module, errors in part[1].truncation_error.items():
                by_client = dict(zip(holders, errors))
                report.truncation_error[module] = [by_client.get(j, float("nan")) for j in order]
            report.update_norm.update(part[1].update_norm)
            report.merged_rank.update(part[1].merged_rank)
            report.bytes_up += part[1].bytes_up
            report.bytes_down += part[1].bytes_down
            report.base_updates.update(part[1].base_updates)
        for j, state in enumerate(new_states):
            bank.load_state(names[j], state)
        if report.base_updates:
            _add_to_base(fed.backbone, report.base_updates)
        return report, order

    def _merge_group(
        self,
        fed: Any,
        names: list[str],
        holders: tuple[int, ...],
        sources: list[int],
        weights: list[int],
        active: list[int],
        modules: list[str],
    ) -> tuple[list[dict[str, torch.Tensor]], AggregationReport]:
        """Merge ``modules`` of the ``sources`` and re-decompose for every holder (``holders`` order)."""
        bank = fed.backbone.bank

        def state(j: int) -> dict[str, torch.Tensor]:
            full = bank.state(names[j])
            return {k: v for k, v in full.items() if k.rsplit(".", 1)[0] in modules}

        if not sources:  # no active client holds these modules this round: keep them as they are
            return [state(j) for j in holders], AggregationReport(method=self.method)
        src_states = [state(j) for j in sources]
        scalings = [{m: s for m, (_, _, s) in bank.factors(names[j]).items() if m in modules} for j in sources]
        src_weights = [weights[active.index(j)] for j in sources]
        extra = len(holders) - len(sources)
        return aggregate_lora(
            src_states + [src_states[0]] * extra,
            src_weights + [0] * extra,
            scalings + [scalings[0]] * extra,
            target_ranks=[{m: bank.ranks[names[j]][m] for m in modules} for j in holders],
            method=self.method,
        )

    @staticmethod
    def _count(fed: Any, kind: str, members: list[int], active: list[int]) -> int:
        """Count adapters up (active clients) and down (every member); return the bytes."""
        bank = fed.backbone.bank
        total = 0
        for i in active:
            total += bank.nbytes(getattr(fed.clients[i], kind))
            fed.channel.send_adapters(bank.nbytes(getattr(fed.clients[i], kind)), 0, client_idx=i)
        for i in members:
            total += bank.nbytes(getattr(fed.clients[i], kind))
            fed.channel.send_adapters(0, bank.nbytes(getattr(fed.clients[i], kind)), client_idx=i)
        return total

    # ------------------------------------------------------------------------------ DDP (one client per process)
    @torch.no_grad()
    def aggregate_distributed(self, pl_module: L.LightningModule) -> AggregationReport | None:
        """Gather this cluster's adapters from every process, merge, and load this process's share."""
        layers = _lora_layers(pl_module, self.adapter_name)
        state = {f"{n}.lora_A": m.lora_A[self.adapter_name].weight.detach().cpu() for n, m in layers}
        state.update({f"{n}.lora_B": m.lora_B[self.adapter_name].weight.detach().cpu() for n, m in layers})
        scaling = {n: float(m.scaling[self.adapter_name]) for n, m in layers}
        num_examples, cluster = self.client_record(pl_module)
        mine: dict[str, Any] = {
            "state": state,
            "scaling": scaling,
            "num_examples": num_examples,
            "cluster": cluster,
            "rank": _rank(),
        }
        peers = sorted((p for p in _all_gather(mine) if p["cluster"] == mine["cluster"]), key=lambda p: p["rank"])
        me = [p["rank"] for p in peers].index(mine["rank"])
        new_states, report = aggregate_lora(
            [p["state"] for p in peers],
            [p["num_examples"] for p in peers],
            [p["scaling"] for p in peers],
            method=self.method,
        )
        ours = new_states[me]
        for n, m in layers:
            m.lora_A[self.adapter_name].weight.copy_(ours[f"{n}.lora_A"])
            m.lora_B[self.adapter_name].weight.copy_(ours[f"{n}.lora_B"])
        self.reports[cluster] = report
        metrics = _report_metrics(report, cluster, "adapter", [p["rank"] for p in peers])
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=pl_module.current_epoch)
        return report

    def client_record(self, pl_module: L.LightningModule) -> tuple[float, int]:
        """This process's ``(num_examples, cluster_id)``: the module's attributes, or the defaults with a warning.

        Raises:
            ValueError: If ``num_examples`` is not a finite number > 0 or ``cluster_id`` is not an int.
        """
        name = type(pl_module).__name__
        weight = _scalar(self._attribute(pl_module, "num_examples"))
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < float(weight) < math.inf:
            raise ValueError(
                f"`{name}.num_examples` must be a number > 0 (this client's aggregation weight), got {weight!r}; "
                "fix: set it to the size of this client's training set"
            )
        cluster = _scalar(self._attribute(pl_module, "cluster_id"))
        if isinstance(cluster, bool) or not isinstance(cluster, numbers.Integral):
            raise ValueError(
                f"`{name}.cluster_id` must be an int, got {cluster!r}; fix: set it to this client's cluster index"
            )
        return float(weight), int(cluster)

    def _attribute(self, pl_module: L.LightningModule, attr: str) -> Any:
        if hasattr(pl_module, attr):
            return getattr(pl_module, attr)
        default, meaning = _CLIENT_DEFAULTS[attr]
        if attr not in self._warned:
            self._warned.add(attr)
            warnings.warn(
                f"ClusterAggregation: {type(pl_module).__name__} has no `{attr}` attribute; using {attr}={default} "
                f"({meaning}); fix: set `self.{attr} = ...` in the module's __init__ or setup",
                UserWarning,
                stacklevel=3,
            )
        return default

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"last_round": self.last_round, "method": self.method}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_round = int(state_dict.get("last_round", -1))


def _is_federation(module: Any) -> bool:
    return hasattr(module, "clients") and hasattr(module, "backbone") and hasattr(module, "cluster_ids")


def _lora_layers(module: torch.nn.Module, adapter: str) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in module.named_modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})]


def _scalar(value: Any) -> Any:
    """A one-element tensor as its Python number; anything else unchanged."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather(obj: dict) -> list[dict]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _report_metrics(report: AggregationReport, cluster: int, side: str, members: list[int]) -> dict[str, float]:
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


def _add_to_base(backbone: Any, updates: dict[str, torch.Tensor]) -> None:
    """FLoRA: add each module's dense merged update to its frozen base weight (Conv1D stores ``W`` transposed)."""
    for module, delta in updates.items():
        layer = backbone.model.get_submodule(module).get_base_layer()
        weight = layer.weight
        weight.add_((delta.T if backbone.arch.fan_in_fan_out else delta).to(weight.dtype))
