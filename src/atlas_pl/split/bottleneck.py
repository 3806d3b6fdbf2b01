"""A variational information bottleneck at the cut: learned Gaussian noise per hidden dimension (``model.bottleneck``).

Instead of one noise level for every dimension (``model.activation_noise``), each client adapter owns a trainable
log-scale ``ρ`` per hidden dimension and sends ``z = h + σ ⊙ ε``, ``σ_d = exp(ρ_d) · rms(h)`` (``rms`` over the
batch's real tokens, so the scale means the same on every model and layer), ``ε ~ N(0, I)``. Its training objective
adds ``λ · Ī`` to the loss, where ``Ī = mean_d ½ log(1 + v_d / σ_d²)`` is the capacity of a Gaussian channel with
signal variance ``v_d`` (the variance of ``h_d`` over the batch's real tokens): an upper bound, in nats per dimension
and token, on the mutual information ``I(h; z)`` the server can get from ``z`` (Cover & Thomas, Thm. 9.1.1; the
variational bottleneck of Alemi et al., 2017, with the encoder fixed to the client half and a Gaussian channel).
The task gradient lowers ``σ_d`` where noise hurts the loss, the penalty raises it everywhere: noise goes where it
costs least. ``λ`` is the knob (0: the noise stays at its initial scale). The noise applies to training traffic; the
evaluation of a federation scores the clean model, as with ``activation_noise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BottleneckSpec:
    """Settings of the bottleneck (``model.bottleneck: {weight: 0.1, init_scale: 0.3}``).

    Args:
        weight: ``λ``, the weight of the information penalty in the client's loss (``>= 0``).
        init_scale: Initial ``σ_d / rms(h)`` of every dimension (``> 0``).
        learning_rate: The client optimizer's rate for the log-scales (a parameter group of their own: at an adapter's
            rate of ~1e-3 a log-scale moves by at most ~1e-3 per step, far too little over a few rounds).
    """

    weight: float = 0.1
    init_scale: float = 0.3
    learning_rate: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not self.weight >= 0:
            raise ValueError(f"bottleneck.weight must be >= 0 (λ of the information penalty), got {self.weight!r}")
        if isinstance(self.init_scale, bool) or not self.init_scale > 0:
            raise ValueError(f"bottleneck.init_scale must be > 0 (initial noise / rms(h)), got {self.init_scale!r}")
        if isinstance(self.learning_rate, bool) or not self.learning_rate > 0:
            raise ValueError(f"bottleneck.learning_rate must be > 0, got {self.learning_rate!r}")


class InformationBottleneck(nn.Module):
    """Per client adapter, the learned noise scales of the cut activations (``log_scale[name]``: ``[hidden]``).

    Args:
        spec: ``λ`` and the initial scale.
        hidden_size: Width of the cut activations.
    """

    def __init__(self, spec: BottleneckSpec, hidden_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.hidden_size = hidden_size
        self.log_scale = nn.ParameterDict()

    def add(self, name: str) -> None:
        """Give client adapter ``name`` its scales (kept when it already has them)."""
        if name not in self.log_scale:
            self.log_scale[name] = nn.Parameter(torch.full((self.hidden_size,), math.log(self.spec.init_scale)))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.log_scale

    def scales(self, name: str) -> torch.Tensor:
        """``σ_d / rms(h)`` of client adapter ``name`` (a copy)."""
        return self.log_scale[name].detach().exp().clone()

    def forward(  # type: ignore[override]
        self, name: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(z, λ · Ī, Ī)``: the noisy activations to send, the penalty to backpropagate, the bound in nats."""
        real = hidden if attention_mask is None else hidden[attention_mask.bool()]
        with torch.no_grad():
            real = real.float().reshape(-1, hidden.shape[-1])
            rms = real.pow(2).mean().sqrt().clamp_min(1e-12)
            variance = real.var(dim=0, unbiased=False) if real.shape[0] > 1 else real.pow(2).mean(dim=0)
        sigma = self.log_scale[name].exp() * rms
        noise = torch.randn_like(hidden, dtype=torch.float32) * sigma
        z = hidden + noise.to(hidden.dtype)
        own = self.log_scale[name].exp() * rms  # its own graph: the penalty is backpropagated before ``z``'s gradient
        nats = 0.5 * torch.log1p(variance / own.pow(2)).mean()
        return z, self.spec.weight * nats, float(nats.detach())
