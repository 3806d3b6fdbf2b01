"""``PeftClientMixin``: the federation protocol for "one DDP process = one client" over any peft LoRA model.

Mix it into a LightningModule whose model is wrapped by ``peft.get_peft_model`` and train with
``ClientParallelStrategy``: each process is one client (client id = the process's global rank), and the three phase
callbacks work unchanged::

    class MyModule(PeftClientMixin, L.LightningModule): ...   # self.model = get_peft_model(base, LoraConfig(...))

    callbacks = [TaskClustering(num_clusters=2), RankAllocation(budgets=["1GB"]), ClusterAggregation()]
    trainer = L.Trainer(strategy=ClientParallelStrategy(), devices=2, callbacks=callbacks)

The module may set two attributes (in ``__init__`` or ``setup``): ``num_examples`` (its aggregation weight, normally
its training-set size) and ``cluster_id`` (its cluster; ``TaskClustering`` writes it). A missing one gets its default
(1 and 0) with one ``UserWarning``; a bad value raises a ``ValueError`` naming the fix. The task signal is the
gradient of the adapter's ``B`` factors of the loss ``training_step`` returns (override :meth:`client_loss` otherwise).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel

from atlas_pl.protocol import AdapterLayout, AdapterUpdate, ClientSizing, Side, moved_to

_DEFAULTS: dict[str, tuple[Any, str]] = {
    "num_examples": (1, "this client's aggregation weight; every client counts equally"),
    "cluster_id": (0, "this client's cluster; all clients are merged together"),
}
_BLOCK = re.compile(r"\.(\d+)\.(.+)$")


class PeftClientMixin:
    """The federation protocol for a LightningModule holding one peft LoRA model; this process is one client.

    Attributes:
        adapter_name: The peft adapter that is federated (``"default"`` unless set otherwise).
    """

    adapter_name: str = "default"
    if TYPE_CHECKING:  # provided by the LightningModule this is mixed into
        trainer: Any
        device: torch.device
        global_rank: int
        training_step: Any
        parameters: Any
        modules: Any

    # ------------------------------------------------------------------------------------------ who
    def local_clients(self) -> list[int]:
        return [self._me()]

    def participants(self) -> list[int]:
        return [self._me()]

    def cluster_of(self, client: int) -> int:
        return self.client_record()[1]

    def assign_clusters(self, cluster_ids: Any) -> None:
        self.cluster_id = int(cluster_ids[self._me()])

    def client_record(self) -> tuple[float, int]:
        """This client's ``(num_examples, cluster_id)``: the attributes, or the defaults with one warning each.

        Raises:
            ValueError: ``num_examples`` is not a finite number > 0, or ``cluster_id`` is not an int.
        """
        name = type(self).__name__
        weight = _scalar(self._attribute("num_examples"))
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < float(weight) < math.inf:
            raise ValueError(
                f"`{name}.num_examples` must be a number > 0 (this client's aggregation weight), got {weight!r}; "
                "fix: set it to the size of this client's training set"
            )
        cluster = _scalar(self._attribute("cluster_id"))
        if isinstance(cluster, bool) or not isinstance(cluster, numbers.Integral):
            raise ValueError(
                f"`{name}.cluster_id` must be an int, got {cluster!r}; fix: set it to this client's cluster index"
            )
        return float(weight), int(cluster)

    # ------------------------------------------------------------------------------------------ phases 1-2
    def client_batches(self, client: int, num_batches: int, seed: int) -> list[Any]:
        """The first ``num_batches`` batches of this client's train dataloader, on its device."""
        trainer: Any = self.trainer
        source = trainer.datamodule if trainer.datamodule is not None else self
        loader = source.train_dataloader()  # type: ignore[union-attr]
        return [moved_to(b, self.device) for b in islice(loader, num_batches)]

    def client_loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss whose gradient is the task signal: what ``training_step`` returns (a tensor or ``{"loss"}``)."""
        out = self.training_step(batch, batch_idx)
        return out["loss"] if isinstance(out, dict) else out

    def task_signal(self, client: int, batches: list[Any], kind: str = "grad_B") -> dict[str, torch.Tensor]:
        """``{"client.<module>.lora_B": gradient}`` summed over ``batches``; gradients are cleared afterwards.

        Raises:
            ValueError: ``kind`` other than ``grad_B``.
        """
        if kind != "grad_B":
            raise ValueError(f"PeftClientMixin computes the 'grad_B' signal only, got kind={kind!r}")
        layers = self._lora_layers()
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                self.client_loss(batch, i).backward()
        signal = {}
        for module, layer in layers.items():
            grad = layer.lora_B[self.adapter_name].weight.grad
            if grad is not None:
                signal[f"client.{module}.lora_B"] = grad.detach().flatten().clone()
        for param in self.parameters():
            param.grad = None
        return signal

    def client_modules(self, client: int, cut_layer: int | None = None) -> list[str]:
        """Every module the adapter covers (the whole model runs on this client: no cut layers).

        Raises:
            ValueError: A cut layer was asked for.
        """
        if cut_layer is not None:
            raise ValueError(
                f"{type(self).__name__} runs the whole model on the client: it has no cut layers; leave "
                "`RankAllocation.cut_layers` unset"
            )
        return list(self._lora_layers())

    def client_sizing(self) -> ClientSizing:
        """Model config, batch size and sequence length (read off the first training batch's ``input_ids``)."""
        config = getattr(self._peft().base_model.model, "config", None)
        batch = self.client_batches(self._me(), 1, 0)[0]
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        suffixes = tuple(dict.fromkeys(m.group(2) for name in self._lora_layers() if (m := _BLOCK.search(name))))
        weight = next(p for p in self._peft().parameters() if not p.requires_grad)
        return ClientSizing(
            model_config=config,
            batch_size=int(ids.shape[0]),
            seq_len=int(ids.shape[-1]),
            target_modules=suffixes,
            cut_layer=int(getattr(config, "num_hidden_layers", 1)),
            dtype=str(weight.dtype).replace("torch.", ""),
            device=weight.device.type,
        )

    def resize(self, client: int, rank_pattern: dict[str, int], cut_layer: int | None = None) -> None:
        """Re-create the adapter with per-module ranks (fresh LoRA init, ``B = 0``), keeping each module's scaling."""
        self.client_modules(client, cut_layer)  # refuses a cut
        if {m: r for m, (r, _) in self.adapter_layout(client, "client").items()} == dict(rank_pattern):
            return
        peft, name = self._peft(), self.adapter_name
        scalings = {m: s for m, (_, s) in self.adapter_layout(client, "client").items()}
        top = max(rank_pattern.values())
        config: Any = peft.peft_config[name]
        config.r, config.lora_alpha = top, scalings[next(iter(rank_pattern))] * top
        config.rank_pattern = dict(rank_pattern)
        config.alpha_pattern = {m: scalings[m] * r for m, r in rank_pattern.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            peft.delete_adapter(name)
        peft.add_adapter(name, config)
        peft.set_adapter(name)

    # ------------------------------------------------------------------------------------------ phase 4
    def adapter_sides(self) -> tuple[Side, ...]:
        return ("client",)

    def adapter_layout(self, client: int, side: Side) -> AdapterLayout:
        name = self.adapter_name
        return {m: (int(layer.r[name]), float(layer.scaling[name])) for m, layer in self._lora_layers().items()}

    def pull(self, client: int, side: Side) -> AdapterUpdate:
        name = self.adapter_name
        layers = self._lora_layers()
        return AdapterUpdate(
            {
                m: (lay.lora_A[name].weight.detach().clone(), lay.lora_B[name].weight.detach().clone())
                for m, lay in layers.items()
            },  # fmt: skip
            {m: float(lay.scaling[name]) for m, lay in layers.items()},
            self.client_record()[0],
        )

    @torch.no_grad()
    def push(self, client: int, side: Side, update: AdapterUpdate) -> None:
        name = self.adapter_name
        layers = self._lora_layers()
        for module, (a, b) in update.factors.items():
            layers[module].lora_A[name].weight.copy_(a)
            layers[module].lora_B[name].weight.copy_(b)
        for module, delta in update.base_deltas.items():
            weight = layers[module].get_base_layer().weight
            weight.add_((delta.T if getattr(layers[module], "fan_in_fan_out", False) else delta).to(weight))

    # ------------------------------------------------------------------------------------------ helpers
    def _me(self) -> int:
        return int(getattr(self, "global_rank", 0))

    def _peft(self) -> PeftModel:
        for module in self.modules():
            if isinstance(module, PeftModel):
                return module
        raise ValueError(
            f"{type(self).__name__} holds no peft model; wrap its model with peft.get_peft_model(base, LoraConfig(...))"
        )

    def _lora_layers(self) -> dict[str, Any]:
        """Module name (relative to the base model, as peft's ``rank_pattern`` keys) → LoRA layer with the adapter."""
        base: Any = self._peft().base_model.model
        layers = {n: m for n, m in base.named_modules() if self.adapter_name in getattr(m, "lora_A", {})}
        if not layers:
            raise ValueError(
                f"{type(self).__name__} has no LoRA layer with adapter {self.adapter_name!r}; set `adapter_name`"
            )
        return layers

    def _attribute(self, attr: str) -> Any:
        if hasattr(self, attr):
            return getattr(self, attr)
        default, meaning = _DEFAULTS[attr]
        warned: set[str] = self.__dict__.setdefault("_atlas_warned", set())
        if attr not in warned:
            warned.add(attr)
            warnings.warn(
                f"{type(self).__name__} has no `{attr}` attribute; using {attr}={default} ({meaning}); fix: set "
                f"`self.{attr} = ...` in the module's __init__ or setup",
                UserWarning,
                stacklevel=3,
            )
        return default


def _scalar(value: Any) -> Any:
    """A one-element tensor as its Python number; anything else unchanged."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
