"""The link between a client half and the server half: activations up, activation gradients down.

A :class:`Channel` is the only place tensors cross the cut, so it is where bytes are counted and where the wire format
(optional fp16/bf16/int8 compression) is applied. :class:`InProcessChannel` is the default for simulation: both halves
live in one process and the "transfer" is a detach plus an optional round trip through the wire dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Compression = Literal["none", "fp16", "bf16", "int8"]
_WIRE_BYTES = {"none": None, "fp16": 2, "bf16": 2, "int8": 1}
NoiseKind = Literal["gaussian", "laplace"]


@dataclass(frozen=True)
class ActivationNoise:
    """A defence of the cut activations: the client adds noise to ``h`` before it leaves (``model.activation_noise``).

    The noise is calibrated on each batch's own activations, so one setting means the same noise-to-signal ratio on
    every model and layer: Gaussian ``N(0, (m·rms(h))²)`` or Laplace with scale ``m·rms(h)/√2`` (the same variance),
    ``rms(h)`` over the batch's real tokens. The server computes its loss and ``∂L/∂h`` on the noisy ``h``; the
    client backpropagates that gradient unchanged (the noise is additive). ``multiplier`` 0 turns it off.

    Args:
        multiplier: ``m``, noise standard deviation in units of the activations' RMS (``>= 0``).
        kind: ``gaussian`` or ``laplace``.
    """

    multiplier: float = 0.0
    kind: NoiseKind = "gaussian"

    def __post_init__(self) -> None:
        if not self.multiplier >= 0:
            raise ValueError(f"activation_noise.multiplier must be >= 0 (units of rms(h)), got {self.multiplier!r}")
        if self.kind not in ("gaussian", "laplace"):
            raise ValueError(f"activation_noise.kind must be 'gaussian' or 'laplace', got {self.kind!r}")

    def apply(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` plus the calibrated noise (``hidden`` itself when the multiplier is 0)."""
        if self.multiplier == 0:
            return hidden
        with torch.no_grad():
            real = hidden if attention_mask is None else hidden[attention_mask.bool()]
            scale = self.multiplier * real.float().pow(2).mean().sqrt()
            if self.kind == "gaussian":
                noise = torch.randn_like(hidden, dtype=torch.float32) * scale
            else:
                noise = torch.distributions.Laplace(0.0, float(scale) / 2**0.5).sample(hidden.shape).to(hidden.device)
        return hidden + noise.to(hidden.dtype)


@dataclass(frozen=True)
class GradientSparsity:
    """A defence of the gradients a U-shaped client returns (``model.gradient_sparsity``): only the largest entries go.

    Before ``∂L/∂`` of the last hidden states leaves the client, every position's vector keeps its ``ceil(keep·d)``
    entries of largest magnitude and the rest become 0; the server backpropagates that sparse gradient. On the wire a
    sparse vector is its kept values plus one int32 index each, counted when that is smaller than the dense vector.
    ``keep`` 1 turns it off. The label-inference scores of ``atlas_pl.attacks.label_leakage`` measure what it hides.

    Args:
        keep: Fraction of each gradient vector's entries kept, in ``(0, 1]``.
    """

    keep: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"gradient_sparsity.keep must be in (0, 1] (fraction of entries kept), got {self.keep!r}")

    def kept(self, width: int) -> int:
        """Entries kept of a vector of ``width`` entries (at least one)."""
        return max(1, min(width, math.ceil(self.keep * width)))

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` with all but the ``kept`` largest-magnitude entries of each last-dimension vector set to 0."""
        width = grad.shape[-1]
        k = self.kept(width)
        if k == width:
            return grad
        with torch.no_grad():
            index = grad.abs().topk(k, dim=-1).indices
            return torch.zeros_like(grad).scatter_(-1, index, grad.gather(-1, index))

    def wire_bytes(self, grad: torch.Tensor, compression: Compression = "none") -> int:
        """Bytes of ``grad`` on the wire: dense, or kept values + int32 indices when that is smaller."""
        dense = tensor_wire_bytes(grad, compression)
        width = grad.shape[-1] if grad.dim() else 1
        k = self.kept(width)
        if k == width:
            return dense
        rows = grad.numel() // width
        value = _WIRE_BYTES[compression] or grad.element_size()
        return min(dense, rows * k * (value + 4) + (4 * rows if compression == "int8" else 0))


@dataclass
class ChannelStats:
    """Bytes that crossed the cut, split by direction and kind."""

    activations_up: int = 0
    metadata_up: int = 0
    gradients_down: int = 0
    adapters_up: int = 0
    adapters_down: int = 0
    fingerprints_up: int = 0
    head_activations_down: int = 0  # U-shaped split: last hidden states to the client's head
    head_gradients_up: int = 0  # U-shaped split: their gradients back to the server
    messages: int = 0
    per_client_up: dict[int, int] = field(default_factory=dict)
    per_client_down: dict[int, int] = field(default_factory=dict)

    @property
    def bytes_up(self) -> int:
        return self.activations_up + self.metadata_up + self.adapters_up + self.fingerprints_up + self.head_gradients_up

    @property
    def bytes_down(self) -> int:
        return self.gradients_down + self.adapters_down + self.head_activations_down

    def as_dict(self) -> dict[str, int]:
        return {
            "activations_up": self.activations_up,
            "metadata_up": self.metadata_up,
            "gradients_down": self.gradients_down,
            "adapters_up": self.adapters_up,
            "adapters_down": self.adapters_down,
            "fingerprints_up": self.fingerprints_up,
            "head_activations_down": self.head_activations_down,
            "head_gradients_up": self.head_gradients_up,
            "messages": self.messages,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }

    def state_dict(self) -> dict:
        state: dict = self.as_dict()
        state["per_client_up"] = dict(self.per_client_up)
        state["per_client_down"] = dict(self.per_client_down)
        return state

    def merged(self, state: dict) -> ChannelStats:
        """These counts plus another's (a ``state_dict``): the totals of two processes."""
        other = ChannelStats()
        other.load_state_dict(state)
        out = ChannelStats()
        for key in ("activations_up", "metadata_up", "gradients_down", "adapters_up", "adapters_down",
                    "fingerprints_up", "head_activations_down", "head_gradients_up", "messages"):  # fmt: skip
            setattr(out, key, getattr(self, key) + getattr(other, key))
        for key in ("per_client_up", "per_client_down"):
            mine, theirs = getattr(self, key), getattr(other, key)
            setattr(out, key, {c: mine.get(c, 0) + theirs.get(c, 0) for c in sorted({*mine, *theirs})})
        return out

    def load_state_dict(self, state: dict) -> None:
        keys = ("activations_up", "metadata_up", "gradients_down", "adapters_up", "adapters_down", "fingerprints_up",
                "head_activations_down", "head_gradients_up")  # fmt: skip
        for key in (*keys, "messages"):
            setattr(self, key, int(state.get(key, 0)))
        self.per_client_up = {int(k): int(v) for k, v in state.get("per_client_up", {}).items()}
        self.per_client_down = {int(k): int(v) for k, v in state.get("per_client_down", {}).items()}


def tensor_wire_bytes(tensor: torch.Tensor, compression: Compression = "none") -> int:
    """Bytes a tensor takes on the wire under ``compression`` (int8 adds one fp32 scale per row)."""
    width = _WIRE_BYTES[compression]
    if width is None:
        return tensor.numel() * tensor.element_size()
    return tensor.numel() * width + (4 * int8_rows(tensor) if compression == "int8" else 0)


def int8_rows(tensor: torch.Tensor) -> int:
    """Rows of ``tensor`` that int8 gives their own scale: every vector along the last dimension (one per token)."""
    return max(1, tensor.numel() // tensor.shape[-1]) if tensor.dim() else 1


def compress_roundtrip(tensor: torch.Tensor, compression: Compression) -> torch.Tensor:
    """What the receiver sees after ``tensor`` is encoded in the wire format and decoded back to its dtype.

    ``int8``: symmetric absmax quantization with one fp32 scale per row (each token's vector along the last
    dimension), so a token with large activations does not crush the resolution of the others.
    """
    if compression == "none":
        return tensor
    if compression in ("fp16", "bf16"):
        wire = torch.float16 if compression == "fp16" else torch.bfloat16
        return tensor.to(wire).to(tensor.dtype)
    x = tensor.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return ((x / scale).round().clamp(-127, 127).to(torch.int8).float() * scale).to(tensor.dtype)


class Channel:
    """Interface of the cut-layer link. Subclasses move tensors; this class counts bytes.

    Args:
        compression: Wire format of activations and gradients: ``"none"`` (their dtype), ``"fp16"``, ``"bf16"`` or
            ``"int8"`` (absmax quantization, one fp32 scale per row: 1 byte per entry + 4 per token vector).
        noise: Noise the client adds to the activations before they leave (:class:`ActivationNoise`; default none).
        sparsity: Sparsification of the gradients a U-shaped client returns (:class:`GradientSparsity`; default
            none).
    """

    def __init__(
        self,
        compression: Compression = "none",
        noise: ActivationNoise | None = None,
        sparsity: GradientSparsity | None = None,
    ) -> None:
        if compression not in _WIRE_BYTES:
            raise ValueError(f"`compression` must be one of {sorted(_WIRE_BYTES)}, got {compression!r}")
        self.compression: Compression = compression
        self.noise = noise or ActivationNoise()
        self.sparsity = sparsity or GradientSparsity()
        self.stats = ChannelStats()

    def _count(self, client_idx: int, up: int = 0, down: int = 0) -> None:
        self.stats.messages += 1
        if up:
            self.stats.per_client_up[client_idx] = self.stats.per_client_up.get(client_idx, 0) + up
        if down:
            self.stats.per_client_down[client_idx] = self.stats.per_client_down.get(client_idx, 0) + down

    def send_activations(
        self, hidden: torch.Tensor, metadata: dict[str, torch.Tensor], client_idx: int = 0
    ) -> torch.Tensor:
        """Client → server: the cut activations plus the metadata the server needs (mask, labels).

        Returns:
            The server's copy of ``hidden``: a leaf that requires grad, so ``.grad`` holds ``∂L/∂h`` after backward.
        """
        act = tensor_wire_bytes(hidden, self.compression)
        meta = sum(tensor_wire_bytes(t) for t in metadata.values())
        self.stats.activations_up += act
        self.stats.metadata_up += meta
        self._count(client_idx, up=act + meta)
        return self._transfer(self.noise.apply(hidden.detach(), metadata.get("attention_mask"))).requires_grad_(True)

    def send_gradients(self, grad: torch.Tensor, client_idx: int = 0) -> torch.Tensor:
        """Server → client: ``∂L/∂h`` for the client's backward pass."""
        nbytes = tensor_wire_bytes(grad, self.compression)
        self.stats.gradients_down += nbytes
        self._count(client_idx, down=nbytes)
        return self._transfer(grad)

    def send_head_activations(self, hidden: torch.Tensor, client_idx: int = 0) -> torch.Tensor:
        """Server → client (U-shaped split): the last hidden states for the client's head; a leaf that requires grad."""
        nbytes = tensor_wire_bytes(hidden, self.compression)
        self.stats.head_activations_down += nbytes
        self._count(client_idx, down=nbytes)
        return self._transfer(hidden).requires_grad_(True)

    def send_head_gradients(self, grad: torch.Tensor, client_idx: int = 0) -> torch.Tensor:
        """Client → server (U-shaped split): ``∂L/∂`` of those hidden states, sparsified first if asked."""
        nbytes = self.sparsity.wire_bytes(grad, self.compression)
        self.stats.head_gradients_up += nbytes
        self._count(client_idx, up=nbytes)
        return self._transfer(self.sparsity.apply(grad.detach()))

    def send_adapters(self, nbytes_up: int, nbytes_down: int, client_idx: int = 0) -> None:
        """Count adapter traffic at round end (client adapter up for aggregation, merged adapter down)."""
        self.stats.adapters_up += nbytes_up
        self.stats.adapters_down += nbytes_down
        self._count(client_idx, up=nbytes_up, down=nbytes_down)

    def send_fingerprint(self, nbytes: int, client_idx: int = 0) -> None:
        """Count a task fingerprint sent from client to server (phase 1)."""
        self.stats.fingerprints_up += nbytes
        self._count(client_idx, up=nbytes, down=0)

    def _transfer(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class InProcessChannel(Channel):
    """Both halves in one process: the transfer detaches and applies the wire format, nothing is copied otherwise."""

    def _transfer(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compress_roundtrip(tensor.detach(), self.compression)
