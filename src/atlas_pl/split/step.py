"""One split-learning step: client forward, activations over the channel, server loss and backward, gradient back."""

from __future__ import annotations

from collections.abc import Callable

import torch

from atlas_pl.profiling import section
from atlas_pl.split.backbone import ServerOutput, SplitBackbone
from atlas_pl.split.channel import Channel

Backward = Callable[[torch.Tensor], None]
ClientBackward = Callable[[torch.Tensor, torch.Tensor], None]  # (h, ∂L/∂h) -> client adapter gradients


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def split_forward_backward(
    backbone: SplitBackbone,
    channel: Channel,
    batch: dict,
    client_adapter: str,
    server_adapter: str,
    backward: Backward | None = None,
    client_idx: int = 0,
    client_backward: ClientBackward | None = None,
) -> ServerOutput:
    """Run one split step up to (not including) the optimizer steps; gradients land in the two adapters.

    1. client: embeddings + blocks ``[0, cut)`` with ``client_adapter`` → ``h``;
    2. ``channel.send_activations(h)`` → the server's leaf copy ``h_s`` (plus mask and labels as metadata);
    3. server: blocks ``[cut, L)`` + head + loss with ``server_adapter``; ``backward(loss)`` fills the server adapter's
       gradients and ``h_s.grad = ∂L/∂h``;
    4. ``channel.send_gradients(h_s.grad)`` → the client backpropagates it through its half.

    With ``backbone.shape == "u_shaped"`` the client also keeps the head and the loss, so labels never leave it:
    the server runs blocks ``[cut, L)`` on ``h_s`` and sends the last hidden states down
    (``channel.send_head_activations``), the client computes head and loss and sends their gradient up
    (``send_head_gradients``), the server backpropagates it to ``h_s.grad``, and step 4 follows. The gradients are
    the same as the two-part split's (``tests/split/test_split_exactness.py``).

    With ``backbone.bottleneck`` the client sends ``z = h + σ ⊙ ε`` instead of ``h`` and backpropagates its penalty
    ``λ · Ī`` first (``atlas_pl.split.bottleneck``); ``∂L/∂z`` then reaches both its adapter and its noise scales.

    Args:
        backbone: The shared split model.
        channel: The link that carries (and counts) activations and gradients.
        batch: ``input_ids``, ``attention_mask``, ``labels`` and optionally ``task_id`` (which task head; default 0).
        client_adapter: Name of the client-half adapter.
        server_adapter: Name of the server-half adapter.
        backward: How to backpropagate the server loss (``LightningModule.manual_backward`` under a Trainer, so
            precision plugins scale it); defaults to ``loss.backward()``.
        client_idx: Client index used by the channel's byte counters.
        client_backward: How the client backpropagates the returned ``∂L/∂h`` through its half (``(h, grad)``;
            ``DPSGD.backward`` for per-example clipping and noise); defaults to ``torch.autograd.backward``.
    """
    if backbone.shape != "u_shaped":  # the two-part step is a group of one
        member = (client_adapter, server_adapter, client_idx)
        return split_group_forward_backward(backbone, channel, [batch], [member], backward, [client_backward])[0]
    mask, labels = batch["attention_mask"], batch["labels"]
    task_id = int(batch.get("task_id", 0))
    with section("split/client_forward"):
        backbone.activate(client_adapter, server_adapter)
        cut = backbone.cut_of(client_adapter)
        hidden = backbone.client_forward(batch["input_ids"], mask, cut)
        sent = hidden
        if backbone.bottleneck is not None and client_adapter in backbone.bottleneck:  # learned noise, before sending
            sent, penalty, _ = backbone.bottleneck(client_adapter, hidden, mask)
            (backward or _plain_backward)(penalty)  # the client's own term: λ · the bound on I(h; z)
    # the labels never leave the client
    with section("split/channel"):
        received = channel.send_activations(sent, {"attention_mask": mask}, client_idx)
    with section("split/server"):
        top = backbone.server_hidden(received, mask, cut)
    with section("split/channel"):
        head_input = channel.send_head_activations(top, client_idx)
    with section("split/client_head"):
        out = backbone.head_forward(head_input, mask, labels, server_adapter, task_id)
        (backward or _plain_backward)(out.loss)  # client: head gradients and ∂L/∂top
    assert head_input.grad is not None
    with section("split/channel"):
        head_grad = channel.send_head_gradients(head_input.grad, client_idx)
    with section("split/server"):
        torch.autograd.backward(top, head_grad)  # server's blocks
    if received.grad is None:
        raise RuntimeError("the server loss does not depend on the cut activations; check the split model")
    with section("split/channel"):
        grad = channel.send_gradients(received.grad, client_idx)
    # The gradient is already in the loss's (possibly scaled) units, so plain autograd continues it unchanged.
    with section("split/client_backward"):
        if client_backward is None:
            torch.autograd.backward(sent, grad)
        else:
            client_backward(sent, grad)
    return out


def _pad_to(tensor: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """``tensor`` right-padded along dim 1 to ``width`` with ``value``."""
    if tensor.shape[1] == width:
        return tensor
    pad = [0, 0] * (tensor.dim() - 2) + [0, width - tensor.shape[1]]
    return torch.nn.functional.pad(tensor, pad, value=value)


def split_group_forward_backward(
    backbone: SplitBackbone,
    channel: Channel,
    batches: list[dict],
    members: list[tuple[str, str, int]],
    backward: Backward | None = None,
    client_backwards: list[ClientBackward | None] | None = None,
    batched: bool = True,
    max_rows: int | None = None,
) -> list[ServerOutput]:
    """One split step of several clients at once; the server runs each group sharing a server adapter as one batch.

    Every member ``(client_adapter, server_adapter, client_idx)`` runs its client half on its own batch and sends its
    activations. The server then takes the members with the same server adapter and cut layer together: their
    activations are right-padded to the longest sequence and concatenated along the batch, the server blocks run
    once, each member's head and loss run on its own rows (its task head), and one backward of the sum of the
    members' losses fills the server adapter's gradients (their sum) and every member's ``∂L_i/∂h_i``, which go back
    to the members for their client backward. Padding rows and positions are masked, so the result equals running
    the members one at a time and summing their server gradients (``batched=False`` does exactly that; equal up to
    float rounding, ``tests/split/test_server_batching.py``), except for dropout, whose masks are drawn for the
    batch. Two-part splits only.

    Args:
        backbone: The shared split model.
        channel: The link that carries (and counts) activations and gradients.
        backward: How to backpropagate the server loss (as :func:`split_forward_backward`).
        batches: One batch per member (``input_ids``, ``attention_mask``, ``labels``, optional ``task_id``).
        members: ``(client_adapter, server_adapter, client_idx)`` per batch.
        client_backwards: Per member, how it backpropagates ``∂L/∂h`` (``None``: plain autograd).
        batched: Run each server group as one batch (default) or member by member.
        max_rows: At most this many sequences per server pass (``None``: a whole group): a larger group runs as
            several passes of members of similar length, whose server gradients add up (bounds the server's
            activation memory, and the padding).

    Returns:
        Every member's :class:`ServerOutput` (its own loss, correctness and target count).
    """
    if backbone.shape != "two_part":
        raise ValueError(
            f"server batching runs two-part splits; split_shape {backbone.shape!r} keeps the head on the clients. "
            "Fix: data.schedule sequential, or model.split_shape two_part"
        )
    if len(batches) != len(members):
        raise ValueError(f"{len(batches)} batches for {len(members)} members; pass one batch per member")
    sent: list[torch.Tensor] = []
    received: list[torch.Tensor] = []
    cuts: list[int] = []
    for batch, (client_adapter, server_adapter, idx) in zip(batches, members):
        mask = batch["attention_mask"]
        with section("split/client_forward"):
            backbone.activate(client_adapter, server_adapter)
            cuts.append(backbone.cut_of(client_adapter))
            hidden = backbone.client_forward(batch["input_ids"], mask, cuts[-1])
            if backbone.bottleneck is not None and client_adapter in backbone.bottleneck:
                hidden, penalty, _ = backbone.bottleneck(client_adapter, hidden, mask)
                (backward or _plain_backward)(penalty)
        sent.append(hidden)
        with section("split/channel"):
            received.append(channel.send_activations(hidden, {"attention_mask": mask, "labels": batch["labels"]},
                                                     idx))  # fmt: skip
    outs: list[ServerOutput | None] = [None] * len(members)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, ((_, server_adapter, _), cut) in enumerate(zip(members, cuts)):
        groups.setdefault((server_adapter, cut), []).append(i)
    passes: list[tuple[str, int, list[int]]] = []
    for (server_adapter, cut), rows in groups.items():
        if not batched:
            passes += [(server_adapter, cut, [i]) for i in rows]
            continue
        chunk: list[int] = []
        for i in sorted(rows, key=lambda i: received[i].shape[1]) if max_rows else rows:  # similar lengths together
            if chunk and max_rows and sum(received[j].shape[0] for j in chunk) + received[i].shape[0] > max_rows:
                passes.append((server_adapter, cut, chunk))
                chunk = []
            chunk.append(i)
        passes.append((server_adapter, cut, chunk))
    for server_adapter, cut, rows in passes:
        with section("split/server"):
            backbone.activate(members[rows[0]][0], server_adapter)
            if len(rows) == 1:
                (i,) = rows
                b = batches[i]
                outs[i] = backbone.server_forward(received[i], b["attention_mask"], b["labels"], server_adapter,
                                                  int(b.get("task_id", 0)), cut)  # fmt: skip
                (backward or _plain_backward)(outs[i].loss)  # type: ignore[union-attr]
                continue
            width = max(received[i].shape[1] for i in rows)
            hidden = torch.cat([_pad_to(received[i], width, 0.0) for i in rows])
            mask = torch.cat([_pad_to(batches[i]["attention_mask"], width, 0) for i in rows])
            top = backbone.server_hidden(hidden, mask, cut)
            start, total = 0, None
            for i in rows:
                b = batches[i]
                n, t = b["input_ids"].shape
                out = backbone.head_forward(top[start : start + n, :t], b["attention_mask"], b["labels"],
                                            server_adapter, int(b.get("task_id", 0)))  # fmt: skip
                outs[i] = out
                total = out.loss if total is None else total + out.loss
                start += n
            assert total is not None
            (backward or _plain_backward)(total)
    for i, (_, _, idx) in enumerate(members):
        if received[i].grad is None:
            raise RuntimeError("the server loss does not depend on the cut activations; check the split model")
        with section("split/channel"):
            grad = channel.send_gradients(received[i].grad, idx)  # type: ignore[arg-type]
        with section("split/client_backward"):
            own = client_backwards[i] if client_backwards is not None else None
            if own is None:
                torch.autograd.backward(sent[i], grad)
            else:
                own(sent[i], grad)
    return [o for o in outs if o is not None]
