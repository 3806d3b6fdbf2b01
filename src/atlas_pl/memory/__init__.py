"""The client memory and latency models, and the device profiles they are checked against.

* :mod:`atlas_pl.memory.model`: the memory model (:class:`ModelShape`, :func:`estimate_client_memory` and its
  :class:`MemoryEstimate`, the per-block activation :class:`Stage` list) and the size helpers (:func:`parse_size`,
  :func:`format_size`, :func:`dtype_bytes`);
* :mod:`atlas_pl.memory.profiles`: the client device profiles (:data:`DEVICE_PROFILES` of :class:`DeviceProfile`,
  network :data:`LINKS`);
* :mod:`atlas_pl.memory.latency`: the latency model (:func:`estimate_latency` and its :class:`LatencyEstimate`).

Every name is importable from ``atlas_pl.memory`` itself.
"""

from atlas_pl.memory.latency import LatencyEstimate, client_step_flops, estimate_latency
from atlas_pl.memory.model import (
    DTYPE_BYTES,
    Arch,
    Device,
    MemoryEstimate,
    ModelShape,
    Stage,
    block_stages,
    client_ranks,
    dtype_bytes,
    estimate_client_memory,
    format_size,
    parse_size,
    peak_backward_extra,
)
from atlas_pl.memory.profiles import DEVICE_PROFILES, LINKS, DeviceProfile

__all__ = [
    "Arch",
    "DEVICE_PROFILES",
    "DTYPE_BYTES",
    "Device",
    "DeviceProfile",
    "LINKS",
    "LatencyEstimate",
    "MemoryEstimate",
    "ModelShape",
    "Stage",
    "block_stages",
    "client_ranks",
    "client_step_flops",
    "dtype_bytes",
    "estimate_client_memory",
    "estimate_latency",
    "format_size",
    "parse_size",
    "peak_backward_extra",
]
