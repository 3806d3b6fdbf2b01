"""The latency model: seconds of one client's round on a device profile, compute plus communication."""

from __future__ import annotations

from dataclasses import dataclass

from atlas_pl.memory.model import ModelShape
from atlas_pl.memory.profiles import DEVICE_PROFILES, DeviceProfile

__all__ = ["LatencyEstimate", "client_step_flops", "estimate_latency"]


@dataclass(frozen=True)
class LatencyEstimate:
    """Seconds of one client's round: ``local_steps`` split steps plus the adapter exchange."""

    compute_s: float
    communication_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s


def client_step_flops(shape: ModelShape, cut_layer: int, batch_size: int, seq_len: int) -> float:
    """FLOPs of a client step: forward (2 per weight per token + ``4 T d`` attention) and backward.

    The frozen linear layers only propagate input gradients in backward (as many FLOPs as forward); attention
    backward costs twice its forward. LoRA adds a negligible ``O(r)`` per token.
    """
    linear = 2 * sum(d_in * d_out for d_in, d_out in shape.target_shapes().values())
    attention = 4 * seq_len * shape.q_dim
    per_token_block = 2 * linear + 3 * attention
    return float(per_token_block * cut_layer * batch_size * seq_len)


def estimate_latency(
    shape: ModelShape,
    cut_layer: int,
    profile: DeviceProfile | str,
    batch_size: int,
    seq_len: int,
    local_steps: int = 1,
    adapter_bytes: int = 0,
    wire_bytes: int = 4,
) -> LatencyEstimate:
    """Compute (FLOPs / device speed) and communication (bytes / link rate) of one client's round.

    Each step sends ``h`` up and receives ``∂L/∂h`` (``batch × seq_len × hidden × wire_bytes`` each); the round
    ends with the client adapter going up and coming back (``adapter_bytes`` each way).
    """
    device = DEVICE_PROFILES[profile] if isinstance(profile, str) else profile
    compute = local_steps * client_step_flops(shape, cut_layer, batch_size, seq_len) / device.flops
    cut = batch_size * seq_len * shape.hidden_size * wire_bytes * 8
    comm = local_steps * (cut / device.uplink_bps + cut / device.downlink_bps)
    comm += adapter_bytes * 8 * (1 / device.uplink_bps + 1 / device.downlink_bps)
    return LatencyEstimate(compute_s=compute, communication_s=comm)
