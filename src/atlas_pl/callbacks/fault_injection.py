"""``FaultInjection``: make chosen clients fail in chosen rounds, to test and demonstrate fault tolerance.

At the start of every round each hosted client fails with probability ``rate`` (seeded by ``seed`` and the round, so a
run and its resume inject the same faults), with a kind drawn from ``kinds``:

* ``raise`` — its split step raises a ``RuntimeError`` (a crashed client);
* ``nan`` — its client-side activations become NaN (a diverged client: the loss and gradients are not finite);
* ``timeout`` — its split step first sleeps ``delay_s`` (a client that does not answer within ``faults.timeout_s``).

The faults last for the client's whole round. Use it with a ``Federation`` whose ``faults: {tolerate: true}`` (and a
``timeout_s`` below ``delay_s`` for ``timeout``); without tolerance the first injected fault ends the run, which is how
a plain run reacts. The injected faults are kept in ``injected`` (round → client → kind).

    model:
      faults: {tolerate: true, timeout_s: 2}
    trainer:
      callbacks:
        - class_path: atlas_pl.callbacks.FaultInjection
          init_args: {rate: 0.3, kinds: [raise, nan, timeout], delay_s: 3}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

KINDS = ("raise", "nan", "timeout")


class FaultInjection(Callback):
    """Inject client faults (``raise``, ``nan``, ``timeout``) into a ``Federation``'s rounds.

    Hooks: ``on_train_epoch_start`` draws the round's faulty clients and arms them; ``on_train_batch_start`` /
    ``on_train_batch_end`` turn the NaN switch on and off around the batches of a ``nan`` client;
    ``on_train_epoch_end`` (and ``on_exception``) disarm everything.

    Args:
        rate: Probability that a client fails in a round, in ``[0, 1]``.
        kinds: Fault kinds to draw from (``raise``, ``nan``, ``timeout``).
        delay_s: How long a ``timeout`` client's step sleeps before it runs.
        seed: Seed of the draws (combined with the round index).
    """

    def __init__(self, rate: float = 0.3, kinds: Sequence[str] = KINDS, delay_s: float = 1.0, seed: int = 0) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"`rate` must be a number in [0, 1], got {rate!r}")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"`kinds` must be a non-empty list among {list(KINDS)}, got {list(kinds)}")
        if not delay_s > 0:
            raise ValueError(f"`delay_s` must be positive, got {delay_s!r}")
        self.rate, self.kinds, self.delay_s, self.seed = float(rate), list(kinds), float(delay_s), int(seed)
        self.injected: dict[int, dict[int, str]] = {}
        self._armed: dict[int, str] = {}
        self._nan_on = False
        self._hook: Any = None

    def draw(self, round_idx: int, clients: Sequence[int]) -> dict[int, str]:
        """The faulty clients of ``round_idx`` and their kinds (the same for the same seed and round)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + round_idx)
        fails = torch.rand(len(clients), generator=g) < self.rate
        kinds = torch.randint(len(self.kinds), (len(clients),), generator=g)
        return {int(c): self.kinds[int(k)] for c, f, k in zip(clients, fails, kinds) if bool(f)}

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module: Any = pl_module
        self._armed = self.draw(trainer.current_epoch, list(module.local_clients()))
        self.injected[trainer.current_epoch] = dict(self._armed)
        for client, kind in self._armed.items():
            if kind in ("raise", "timeout"):
                _wrap_step(module.clients[client], kind, self.delay_s)
        if "nan" in self._armed.values() and self._hook is None:
            embeddings = module.backbone.model.get_input_embeddings()
            self._hook = embeddings.register_forward_hook(self._poison)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._nan_on = self._armed.get(int(batch["client_idx"])) == "nan"

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._nan_on = False  # never past the client's own step (validation runs before the epoch ends)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.disarm(pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.disarm(pl_module)

    def disarm(self, pl_module: Any) -> None:
        for client in self._armed:
            pl_module.clients[client].__dict__.pop("run_split_step", None)  # back to the class's method
        self._armed, self._nan_on = {}, False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _poison(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output * float("nan") if self._nan_on else None

    # ------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"injected": {str(r): {str(c): k for c, k in v.items()} for r, v in self.injected.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.injected = {int(r): {int(c): k for c, k in v.items()} for r, v in state_dict.get("injected", {}).items()}


def _wrap_step(client: Any, kind: str, delay_s: float) -> None:
    """Shadow ``client.run_split_step`` for the round: raise, or sleep ``delay_s`` and then step."""
    step = type(client).run_split_step.__get__(client)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if kind == "raise":
            raise RuntimeError(f"injected fault: client {client.client_idx} crashed")
        time.sleep(delay_s)
        return step(*args, **kwargs)

    client.run_split_step = failing
