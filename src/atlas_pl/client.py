"""``SplitClient``: one client of split learning as a LightningModule with manual optimization.

A client owns a client-half LoRA adapter and (a handle on) a server-half adapter on a shared ``SplitBackbone``, and
two optimizers: the client's and the server's. Alone under a plain ``Trainer`` it is the unit a real deployment runs;
inside a ``Federation`` many of them share one backbone and the federation drives their steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import lightning as L
import torch
from typing_extensions import override

from atlas_pl.algorithms.privacy import DPSGD
from atlas_pl.profiling import section
from atlas_pl.split.backbone import ServerOutput, SplitBackbone
from atlas_pl.split.channel import Channel, InProcessChannel
from atlas_pl.split.step import Backward, split_forward_backward


class SplitClient(L.LightningModule):
    """A split-learning client (client half + server half of one model) trained with manual optimization.

    Args:
        backbone: The split model. Its adapters ``client_adapter``/``server_adapter`` are created when missing.
        client_adapter: Name of this client's client-half adapter.
        server_adapter: Name of the server-half adapter this client trains with (its own, or its cluster's).
        learning_rate: AdamW learning rate of both adapters.
        weight_decay: AdamW weight decay.
        channel: The cut-layer link; a fresh ``InProcessChannel`` when omitted.
        client_idx: Index used in logs and byte counters.
        owns_backbone: Register ``backbone`` as a submodule (standalone use). A federation passes ``False`` so one
            backbone is not registered (and checkpointed) once per client.
        dp_sgd: Train the client adapter with DP-SGD (per-example clipping and Gaussian noise,
            :class:`atlas_pl.algorithms.DPSGD`); ``dp_steps`` counts its private steps for the accountant.
    """

    def __init__(
        self,
        backbone: SplitBackbone,
        client_adapter: str = "client",
        server_adapter: str = "server",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        channel: Channel | None = None,
        client_idx: int = 0,
        owns_backbone: bool = True,
        dp_sgd: DPSGD | None = None,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {learning_rate!r}")
        self.automatic_optimization = False
        if owns_backbone:
            self.backbone = backbone
        else:
            object.__setattr__(self, "_shared_backbone", backbone)
        if client_adapter not in backbone.client_adapters:
            backbone.add_client_adapter(client_adapter)
        if server_adapter not in backbone.server_adapters:
            backbone.add_server_adapter(server_adapter)
        self.client_adapter = client_adapter
        self.server_adapter = server_adapter
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.channel = channel or InProcessChannel()
        self.client_idx = client_idx
        self.dp_sgd = dp_sgd
        self.dp_steps = 0  # private steps taken (the accountant's T)
        self.dp_batch_size = 0  # examples per step (the accountant's sampling rate is this / client examples)
        self.dp_clipped = 0.0  # share of the last step's examples whose gradient was clipped

    @property
    def split(self) -> SplitBackbone:
        return self.__dict__.get("_shared_backbone") or self.backbone

    # ------------------------------------------------------------------------------------------ optimizers
    def make_optimizer(self, params: Sequence[Any]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    def client_optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.split.client_parameters(self.client_adapter))

    def server_optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.split.server_parameters(self.server_adapter))

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.client_optimizer(), self.server_optimizer()]

    # ------------------------------------------------------------------------------------------ steps
    def run_split_step(
        self,
        batch: dict,
        optimizers: Sequence[Any],
        backward: Backward | None = None,
        check: Callable[[ServerOutput], None] | None = None,
    ) -> ServerOutput:
        """One split step followed by the client and server optimizer steps.

        Args:
            batch: ``input_ids``, ``attention_mask``, ``labels``.
            optimizers: ``(client_optimizer, server_optimizer)`` (Lightning-wrapped or plain).
            backward: Server-loss backward (``manual_backward`` of the module attached to the Trainer).
            check: Called after the backward, before the optimizer steps; if it raises, the gradients are cleared,
                no step is taken and the error propagates (``atlas_pl.faults.check_step``).
        """
        client_opt, server_opt = optimizers
        client_opt.zero_grad(set_to_none=True)
        server_opt.zero_grad(set_to_none=True)
        out = split_forward_backward(
            self.split,
            self.channel,
            batch,
            self.client_adapter,
            self.server_adapter,
            backward=backward,
            client_idx=self.client_idx,
            client_backward=self._private_backward if self.dp_sgd is not None else None,
        )
        if check is not None:
            try:
                check(out)
            except BaseException:
                client_opt.zero_grad(set_to_none=True)
                server_opt.zero_grad(set_to_none=True)
                raise
        with section("split/optimizers"):
            server_opt.step()
            client_opt.step()
        return out

    def _private_backward(self, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        assert self.dp_sgd is not None
        norms = self.dp_sgd.backward(hidden, grad, self.split.bank.parameters(self.client_adapter))
        self.dp_steps += 1
        self.dp_batch_size = max(self.dp_batch_size, int(hidden.shape[0]))
        self.dp_clipped = float((norms > self.dp_sgd.clip_norm).double().mean())

    @torch.no_grad()
    def evaluate(self, batch: dict) -> ServerOutput:
        """Loss and per-example correctness with this client's adapters (no gradient, nothing sent)."""
        return self.split(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            client_adapter=self.client_adapter,
            server_adapter=self.server_adapter,
            task_id=int(batch.get("task_id", 0)),
        )

    @override
    def training_step(self, batch: dict, batch_idx: int) -> None:
        out = self.run_split_step(batch, cast(list, self.optimizers()), self.manual_backward)
        self.log("train_loss", out.loss.detach(), prog_bar=True, batch_size=out.num_targets)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.evaluate(batch)
        self.log("val_loss", out.loss, prog_bar=True, batch_size=out.num_targets)
        self.log("val_acc", out.correct.float().mean(), batch_size=out.correct.numel())

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = self.evaluate(batch)
        self.log("test_loss", out.loss, batch_size=out.num_targets)
        self.log("test_acc", out.correct.float().mean(), batch_size=out.correct.numel())
