"""Client device profiles: memory, sustained compute and network link of the kinds of device a client runs on.

A profile's memory is the budget the estimated client peak (:mod:`atlas_pl.memory.model`) must fit; its compute and
link rates set the round latency (:mod:`atlas_pl.memory.latency`).
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas_pl.memory.model import parse_size

__all__ = ["DEVICE_PROFILES", "LINKS", "DeviceProfile"]

LINKS: dict[str, tuple[float, float]] = {
    "4g": (10e6, 40e6),
    "5g": (60e6, 300e6),
    "wifi": (50e6, 150e6),
    "ethernet": (1e9, 1e9),
}
"""Link name → (uplink, downlink) in bits per second (typical sustained rates, not peak)."""


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of client device.

    Attributes:
        memory: Memory the training process may use, in bytes.
        flops: Sustained FLOP/s of a training step on the device (far below the datasheet peak).
        link: Key of :data:`LINKS`.
    """

    memory: int
    flops: float
    link: str

    @property
    def uplink_bps(self) -> float:
        return LINKS[self.link][0]

    @property
    def downlink_bps(self) -> float:
        return LINKS[self.link][1]


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "phone-1gb": DeviceProfile(memory=parse_size("1GB"), flops=2e10, link="4g"),
    "phone-4gb": DeviceProfile(memory=parse_size("4GB"), flops=5e10, link="5g"),
    "jetson-8gb": DeviceProfile(memory=parse_size("8GB"), flops=1e12, link="wifi"),
    "laptop-16gb": DeviceProfile(memory=parse_size("16GB"), flops=2e11, link="wifi"),
    "gpu-24gb": DeviceProfile(memory=parse_size("24GB"), flops=3e13, link="ethernet"),
}
"""Named client devices; ``relative speed`` = ``flops / DEVICE_PROFILES['phone-1gb'].flops``."""
