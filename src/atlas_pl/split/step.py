"""One split-learning step: client forward, activations over the channel, server loss and backward, gradient back."""

from __future__ import annotations

from collections.abc import Callable

import torch

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
    mask, labels = batch["attention_mask"], batch["labels"]
    task_id = int(batch.get("task_id", 0))
    backbone.activate(client_adapter, server_adapter)
    cut = backbone.cut_of(client_adapter)
    hidden = backbone.client_forward(batch["input_ids"], mask, cut)
    sent = hidden
    if backbone.bottleneck is not None and client_adapter in backbone.bottleneck:  # learned noise, before sending
        sent, penalty, _ = backbone.bottleneck(client_adapter, hidden, mask)
        (backward or _plain_backward)(penalty)  # the client's own term: λ · the bound on I(h; z)
    if backbone.shape == "u_shaped":  # the labels never leave the client
        received = channel.send_activations(sent, {"attention_mask": mask}, client_idx)
        top = backbone.server_hidden(received, mask, cut)
        head_input = channel.send_head_activations(top, client_idx)
        out = backbone.head_forward(head_input, mask, labels, server_adapter, task_id)
        (backward or _plain_backward)(out.loss)  # client: head gradients and ∂L/∂top
        assert head_input.grad is not None
        torch.autograd.backward(top, channel.send_head_gradients(head_input.grad, client_idx))  # server's blocks
    else:
        received = channel.send_activations(sent, {"attention_mask": mask, "labels": labels}, client_idx)
        out = backbone.server_forward(received, mask, labels, server_adapter, task_id, cut)
        (backward or _plain_backward)(out.loss)
    if received.grad is None:
        raise RuntimeError("the server loss does not depend on the cut activations; check the split model")
    grad = channel.send_gradients(received.grad, client_idx)
    # The gradient is already in the loss's (possibly scaled) units, so plain autograd continues it unchanged.
    if client_backward is None:
        torch.autograd.backward(sent, grad)
    else:
        client_backward(sent, grad)
    return out
