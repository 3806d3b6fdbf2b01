"""A client's task signal: what its adapters would learn from a few batches, measured without changing them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from atlas_pl.split.step import split_forward_backward

if TYPE_CHECKING:
    from atlas_pl.client import SplitClient

SignalKind = Literal["grad_B", "contrast", "update"]
SIGNAL_KINDS = ("grad_B", "contrast", "update")


def task_signal(client: SplitClient, batches: list[dict], kind: SignalKind = "grad_B") -> dict[str, torch.Tensor]:
    """The task signal of one split client; its adapters (and heads) are restored afterwards.

    ``grad_B``: the gradient of the client and server LoRA ``B`` factors summed over ``batches`` (``∇_A`` is zero
    while ``B = 0``). ``update``: the change of every LoRA factor after one split step per batch with a fresh AdamW.
    Every step crosses the cut and is counted by the client's channel.

    Returns:
        ``{"client.<module>.lora_B": tensor, "server.<module>.lora_B": ...}`` (flattened).
    """
    split = client.split
    sides = {"client": client.client_adapter, "server": client.server_adapter}
    saved = {n: split.adapter_state(n) for n in sides.values()}
    opts = (client.client_optimizer(), client.server_optimizer())
    if kind not in SIGNAL_KINDS:
        raise ValueError(f"`kind` must be one of {SIGNAL_KINDS}, got {kind!r}")
    objective = split.objective_of("contrast" if kind == "contrast" else split.objective)
    with torch.enable_grad(), objective:
        for batch in batches:
            if kind == "update":
                client.run_split_step(batch, opts)
            else:
                split_forward_backward(
                    split, client.channel, batch, sides["client"], sides["server"], client_idx=client.client_idx
                )
    signal: dict[str, torch.Tensor] = {}
    for side, name in sides.items():
        for module, (a, b, _) in split.bank.factors(name).items():
            if kind == "update":
                signal[f"{side}.{module}.lora_A"] = (a.detach() - saved[name][f"{module}.lora_A"]).flatten()
                signal[f"{side}.{module}.lora_B"] = (b.detach() - saved[name][f"{module}.lora_B"]).flatten()
            elif b.grad is not None:
                signal[f"{side}.{module}.lora_B"] = b.grad.detach().flatten().clone()
        for param in split.server_parameters(name):  # its LoRA factors (and task heads)
            param.grad = None
        split.load_adapter_state(name, saved[name])
    return signal
