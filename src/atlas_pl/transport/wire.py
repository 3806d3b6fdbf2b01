"""The wire format of the network split: raw tensor bytes plus a small typed header, as one safetensors blob.

Every message is ``safetensors.torch.save(tensors, metadata)``: an 8-byte header length, a JSON header (dtypes, shapes,
offsets, and ``__metadata__``: string keys and values) and the raw tensor bytes. Nothing is pickled, so a message can
only ever decode to tensors and strings. ``kind`` names the message; the other metadata fields are the message's
typed header (client id, round, sequence number, loss, ...), kept as strings on the wire and converted by the reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save

MAX_HEADER_BYTES = 1 << 20
KINDS = ("hello", "welcome", "step", "gradient", "eval", "evaluation", "adapter", "merged", "error", "bye")


class WireError(ValueError):
    """A message that is not a well-formed atlas-pl message (truncated, unknown kind, oversized header)."""


@dataclass
class Message:
    """One message: its kind, a few string fields and named tensors."""

    kind: str
    fields: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def field(self, name: str) -> str:
        """A header field, or a :class:`WireError` naming the message kind and the missing field."""
        if name not in self.fields:
            raise WireError(f"{self.kind!r} message lacks the field {name!r} (fields: {sorted(self.fields)})")
        return self.fields[name]

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor of the message, or a :class:`WireError` naming the message kind and the missing tensor."""
        if name not in self.tensors:
            raise WireError(f"{self.kind!r} message lacks the tensor {name!r} (tensors: {sorted(self.tensors)})")
        return self.tensors[name]


def encode(message: Message) -> bytes:
    """The message as bytes (tensors moved to the CPU and made contiguous; their dtype is kept)."""
    if message.kind not in KINDS:
        raise WireError(f"unknown message kind {message.kind!r}; known: {KINDS}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in message.tensors.items()}
    return save(tensors, metadata={"kind": message.kind, **{k: str(v) for k, v in message.fields.items()}})


def decode(data: bytes) -> Message:
    """The message in ``data``.

    Raises:
        WireError: Truncated bytes, a header over 1 MiB, no ``kind`` or an unknown one.
    """
    if len(data) < 8:
        raise WireError(f"a message needs at least 8 bytes, got {len(data)}")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise WireError(f"bad message header size {size} for {len(data)} bytes (truncated or not an atlas-pl message)")
    try:
        fields = dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
        tensors = load(data)
    except Exception as err:  # noqa: BLE001 - any parse failure is a malformed message
        raise WireError(f"malformed message ({type(err).__name__}: {err})") from err
    kind = fields.pop("kind", None)
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}; known: {KINDS}")
    return Message(kind, fields, tensors)
