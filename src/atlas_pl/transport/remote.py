"""Split training over the network: ``atlas-pl serve`` (server half) and ``atlas-pl client`` (client processes).

Both sides build the same ``Federation`` from the same config and seed, so every adapter starts identical on both; then
each side trains only its half. A client process holds its clients' data, client adapters and client optimizers; the
server holds the server adapters, task heads, server optimizers and the aggregation. Per training batch the client
sends the cut activations (plus attention mask, labels and task id) and gets back ``∂L/∂h`` and the loss; per
validation batch it sends the activations and gets back loss and correctness. At round end each client uploads its
client adapter's LoRA factors; when every expected client of the round has (or ``round_timeout_s`` passed: the
missing ones are left out, as a fault), the server runs ``ClusterAggregation`` on its federation exactly as one
process does, and answers every client with its merged factors.

The server writes ``server_state.pt`` atomically after every round (server adapters, heads, optimizer moments, the
round); ``atlas-pl serve --resume true`` continues from it, and clients started with ``--resume true`` continue from
their own ``client_<i>.pt`` of the same round. A client whose server dies gets a :class:`LinkError` naming the server.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from atlas_pl.data.formats import collate
from atlas_pl.data.sampling import RoundExamples
from atlas_pl.io import atomic_write_json
from atlas_pl.protocol import AdapterUpdate
from atlas_pl.transport.grpc_link import LinkClient
from atlas_pl.transport.wire import Message

WIRE_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def update_message(kind: str, client: int, round_idx: int, update: AdapterUpdate) -> Message:
    """An adapter update as a message: ``A:<module>`` / ``B:<module>`` tensors, scalings and weight as fields."""
    tensors = {f"{side}:{m}": t for m, (a, b) in update.factors.items() for side, t in (("A", a), ("B", b))}
    fields = {"client": str(client), "round": str(round_idx), "scalings": json.dumps(update.scalings),
              "num_examples": repr(float(update.num_examples))}  # fmt: skip
    return Message(kind, fields, tensors)


def message_update(message: Message) -> AdapterUpdate:
    """The adapter update a message carries (see :func:`update_message`)."""
    scalings = {str(m): float(s) for m, s in json.loads(message.field("scalings")).items()}
    factors = {m: (message.tensor(f"A:{m}"), message.tensor(f"B:{m}")) for m in scalings}
    return AdapterUpdate(factors, scalings, float(message.field("num_examples")))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, rename (a kill leaves the previous file)."""
    from atlas_pl.io import atomic_open

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(state, f)


class SplitServer:
    """The server half of a federation over the network (the ``handler`` of a :class:`LinkServer`).

    Args:
        federation: The federation built from the run's config (its server adapters, heads and optimizers are used).
        aggregation: ``ClusterAggregation`` callback of the config (``None``: no aggregation, local training).
        clients: Client ids expected at every round's aggregation (default: all).
        out_dir: Folder of ``server_state.pt`` (written after every round) and ``server_log.json``.
        round_timeout_s: Seconds to wait at round end for the expected clients before leaving the missing ones out.
        resume: Continue from ``out_dir/server_state.pt``.
    """

    def __init__(
        self,
        federation: Any,
        aggregation: Any = None,
        clients: Sequence[int] | None = None,
        out_dir: str | Path = "server",
        round_timeout_s: float = 600.0,
        resume: bool = False,
    ) -> None:
        self.fed, self.aggregation = federation, aggregation
        self.expected = sorted(clients if clients is not None else range(federation.num_clients))
        self.out_dir, self.round_timeout_s = Path(out_dir), round_timeout_s
        self.optimizers = federation.configure_optimizers()
        self.lock = threading.Lock()  # one server computation at a time: adapters are activated on one backbone
        self.round_done = threading.Condition(self.lock)
        self.uploads: dict[int, AdapterUpdate] = {}
        self.merged: dict[int, dict[int, AdapterUpdate]] = {}  # round -> client -> its merged client adapter
        self.completed_round = -1
        self.log: list[dict[str, Any]] = []
        self.finished: set[int] = set()
        if resume:
            self.load(self.out_dir / "server_state.pt")

    # ------------------------------------------------------------------------------------------ handler
    def __call__(self, message: Message, connection: str) -> Message:
        kind = message.kind
        client = int(message.field("client"))
        if client not in self.expected:
            raise ValueError(f"client {client} is not one of this server's clients {self.expected}")
        if kind == "hello":
            return Message("welcome", {"completed_round": str(self.completed_round),
                                       "num_clients": str(self.fed.num_clients)})  # fmt: skip
        if kind == "step":
            return self.step(client, message, train=True)
        if kind == "eval":
            return self.step(client, message, train=False)
        if kind == "adapter":
            return self.aggregate(client, int(message.field("round")), message_update(message))
        if kind == "bye":
            with self.lock:
                self.finished.add(client)
            return Message("bye", {"client": str(client)})
        raise ValueError(f"the server does not take {kind!r} messages")

    def step(self, client: int, message: Message, train: bool) -> Message:
        """One server half: forward from the received activations, and for training backward plus the AdamW step."""
        fed = self.fed
        split = fed.clients[client]
        device = fed.device
        hidden = message.tensor("hidden").to(device=device, dtype=next(fed.backbone.model.parameters()).dtype)
        mask, labels = message.tensor("attention_mask").to(device), message.tensor("labels").to(device)
        task_id = int(message.fields.get("task_id", "0"))
        with self.lock:
            backbone = fed.backbone
            backbone.activate(split.client_adapter, split.server_adapter)
            cut = backbone.cut_of(split.client_adapter)
            if not train:
                with torch.no_grad():
                    out = backbone.server_forward(hidden, mask, labels, split.server_adapter, task_id, cut)
                tensors = {} if out.correct is None else {"correct": out.correct.to(torch.uint8)}
                return Message("evaluation", {"loss": repr(float(out.loss)), "num_targets": str(int(out.num_targets))},
                               tensors)  # fmt: skip
            opt = self.optimizers[fed.optimizer_index(client)[1]]
            opt.zero_grad(set_to_none=True)
            hidden.requires_grad_(True)
            out = backbone.server_forward(hidden, mask, labels, split.server_adapter, task_id, cut)
            out.loss.backward()
            if hidden.grad is None:
                raise RuntimeError("the server loss does not depend on the cut activations; check the split model")
            opt.step()
            grad = hidden.grad.to(message.tensor("hidden").dtype)
        return Message("gradient", {"loss": repr(float(out.loss.detach())), "num_targets": str(int(out.num_targets))},
                       {"grad": grad})  # fmt: skip

    def aggregate(self, client: int, round_idx: int, update: AdapterUpdate) -> Message:
        """Take ``client``'s round-end adapter; when every expected client's is in, merge; answer with its merge."""
        with self.round_done:
            if round_idx <= self.completed_round:  # a resumed client re-sending a finished round
                return self.merged_reply(client, round_idx)
            self.fed.roster.push(client, "client", update)
            self.uploads[client] = update
            deadline = time.monotonic() + self.round_timeout_s
            while round_idx > self.completed_round:
                if set(self.uploads) >= set(self.expected) or time.monotonic() >= deadline:
                    self.finish_round(round_idx)
                    break
                self.round_done.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self.merged_reply(client, round_idx)

    def merged_reply(self, client: int, round_idx: int) -> Message:
        merged = self.merged.get(round_idx, {}).get(client)
        if merged is None:
            raise ValueError(f"client {client} has no merge for round {round_idx} (it was left out of that round)")
        return update_message("merged", client, round_idx, merged)

    def finish_round(self, round_idx: int) -> None:
        """Aggregate the round on the server's federation (call with the lock held), save, wake the waiting clients."""
        fed = self.fed
        missing = sorted(set(self.expected) - set(self.uploads))
        fed._participants, fed._round_faults = set(self.uploads), dict.fromkeys(missing, "no adapter by round end")
        metrics: dict[str, float] = {}
        if self.aggregation is not None:
            metrics = self.aggregation.aggregate(fed, round_idx)
        self.merged[round_idx] = {c: fed.pull(c, "client") for c in self.uploads}
        self.log.append({"round": round_idx, "clients": sorted(self.uploads), "left_out": missing,
                         **{k: float(v) for k, v in metrics.items()}})  # fmt: skip
        self.uploads, self.completed_round = {}, round_idx
        self.save(self.out_dir / "server_state.pt")
        atomic_write_json(self.out_dir / "server_log.json", self.log)
        self.round_done.notify_all()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        keep = self.fed.trainable_keys()
        return {
            "completed_round": self.completed_round,
            "adapters": {k: v.detach().cpu() for k, v in self.fed.state_dict().items() if k in keep},
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "merged": {r: {c: u.cpu() for c, u in m.items()} for r, m in self.merged.items()},
            "log": self.log,
        }

    def save(self, path: Path) -> None:
        save_state(path, self.state_dict())

    def load(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"--resume: no server state at {path}; start without --resume")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.fed.load_state_dict(state["adapters"], strict=False)
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.completed_round, self.merged, self.log = state["completed_round"], state["merged"], state["log"]


class RemoteClients:
    """The client processes' side: train, evaluate and aggregate some clients of a federation through a server.

    Args:
        federation: The federation built from the run's config (only the hosted clients' client adapters train).
        datamodule: The set-up datamodule of the config (each hosted client reads only its own data).
        link: The connection to the server.
        clients: The client ids this process runs.
        compression: Wire dtype of activations and gradients (``none``, ``bf16``, ``fp16``).
    """

    def __init__(
        self, federation: Any, datamodule: Any, link: LinkClient, clients: Sequence[int], compression: str = "none"
    ) -> None:
        if compression not in WIRE_DTYPES:
            raise ValueError(f"`compression` must be one of {sorted(WIRE_DTYPES)}, got {compression!r}")
        unknown = [c for c in clients if not 0 <= c < federation.num_clients]
        if unknown or not clients:
            raise ValueError(f"--clients {list(clients)}: ids must be in [0, {federation.num_clients})")
        self.fed, self.dm, self.link, self.clients = federation, datamodule, link, list(clients)
        self.wire = WIRE_DTYPES[compression]
        self.optimizers = federation.configure_optimizers()
        self.sampler = datamodule.train_sampler()
        self.examples = RoundExamples(item for client in datamodule.train_datasets for item in client)
        self.history: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self.bytes_up = self.bytes_down = 0

    def _exchange(self, message: Message) -> Message:
        sent, received = self.link.bytes_sent, self.link.bytes_received
        reply = self.link.request(message)
        self.bytes_up += self.link.bytes_sent - sent
        self.bytes_down += self.link.bytes_received - received
        return reply

    def hello(self) -> int:
        """Greet the server for every hosted client; returns the last round the server completed."""
        return min(int(self._exchange(Message("hello", {"client": str(c)})).field("completed_round"))
                   for c in self.clients)  # fmt: skip

    def batches(self, client: int, round_idx: int) -> list[dict]:
        pad = self.dm.pad_id
        return [collate([self.examples[i] for i in idx], pad) for idx in self.sampler.client_batches(client, round_idx)]

    def train_step(self, client: int, batch: dict) -> float:
        """One split step of ``client`` across the network: activations up, gradient down, both AdamW steps."""
        started = time.perf_counter()
        fed = self.fed
        split = fed.clients[client]
        opt = self.optimizers[fed.optimizer_index(client)[0]]
        opt.zero_grad(set_to_none=True)
        backbone = fed.backbone
        backbone.activate(split.client_adapter, split.server_adapter)
        hidden = backbone.client_forward(
            batch["input_ids"], batch["attention_mask"], backbone.cut_of(split.client_adapter)
        )
        reply = self._exchange(self._activations("step", client, hidden, batch))
        grad = reply.tensor("grad").to(hidden.dtype)
        torch.autograd.backward(hidden, grad)
        opt.step()
        self.step_seconds.append(time.perf_counter() - started)
        return float(reply.field("loss"))

    def _activations(self, kind: str, client: int, hidden: torch.Tensor, batch: dict) -> Message:
        sent = self.fed.channel.noise.apply(hidden.detach(), batch["attention_mask"])  # the config's defence, if any
        wire = sent if self.wire is None else sent.to(self.wire)
        tensors = {"hidden": wire, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
        return Message(kind, {"client": str(client), "task_id": str(int(batch.get("task_id", 0)))}, tensors)

    @torch.no_grad()
    def evaluate(self, client: int) -> dict[str, float]:
        """Validation loss of ``client`` via the server, per target as one process computes it, and accuracy.

        The accuracy (``val_token_acc``) is the server half's own correctness: an encoder's class, a causal LM's first
        answer token (not the label-word scoring of ``fit``'s ``val_acc``).
        """
        fed, backbone = self.fed, self.fed.backbone
        split = fed.clients[client]
        data, bs, pad = self.dm.val_datasets[client], self.dm.batch_size, self.dm.pad_id
        loss = targets = correct = seen = 0.0
        for start in range(0, len(data), bs):
            batch = collate(data[start : start + bs], pad)
            backbone.activate(split.client_adapter, split.server_adapter)
            hidden = backbone.client_forward(batch["input_ids"], batch["attention_mask"],
                                             backbone.cut_of(split.client_adapter))  # fmt: skip
            reply = self._exchange(self._activations("eval", client, hidden, batch))
            n = float(reply.field("num_targets"))
            loss, targets = loss + float(reply.field("loss")) * n, targets + n
            if "correct" in reply.tensors:
                correct, seen = correct + float(reply.tensors["correct"].sum()), seen + reply.tensors["correct"].numel()
        out = {f"val_loss/client_{client:03d}": loss / max(targets, 1.0)}
        if seen:  # the server half's own correctness (encoders: the class; causal LMs: the first answer token)
            out[f"val_token_acc/client_{client:03d}"] = correct / seen
        return out

    def round(self, round_idx: int) -> dict[str, Any]:
        """Train every hosted client's batches of the round, aggregate through the server, evaluate."""
        losses = {c: [self.train_step(c, b) for b in self.batches(c, round_idx)] for c in self.clients}
        for c in self.clients:
            update = self.fed.pull(c, "client")
            update.num_examples = float(self.fed.num_examples[c])
            reply = self._exchange(update_message("adapter", c, round_idx, update))
            self.fed.push(c, "client", message_update(reply))
        row: dict[str, Any] = {"round": round_idx}
        for c in self.clients:
            row[f"train_loss/client_{c:03d}"] = sum(losses[c]) / max(1, len(losses[c]))
            row.update(self.evaluate(c))
        row.update(bytes_up=self.bytes_up, bytes_down=self.bytes_down)
        self.history.append(row)
        return row

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self, round_idx: int) -> dict[str, Any]:
        keep = {k for k in self.fed.trainable_keys() if any(f".{self.fed.clients[c].client_adapter}." in k
                                                             for c in self.clients)}  # fmt: skip
        return {
            "completed_round": round_idx,
            "adapters": {k: v.detach().cpu() for k, v in self.fed.state_dict().items() if k in keep},
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "history": self.history,
            "bytes": (self.bytes_up, self.bytes_down),
        }

    def load(self, path: Path) -> int:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.fed.load_state_dict(state["adapters"], strict=False)
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.history = list(state["history"])
        self.bytes_up, self.bytes_down = state["bytes"]
        return int(state["completed_round"])
