"""Split execution: the architecture registry, the split backbone, the cut-layer channel and the split step."""

from atlas_pl.split.backbone import ServerOutput, SplitBackbone, split_model
from atlas_pl.split.channel import Channel, ChannelStats, InProcessChannel
from atlas_pl.split.registry import ArchSpec, get_arch
from atlas_pl.split.step import split_forward_backward

__all__ = [
    "ArchSpec",
    "Channel",
    "ChannelStats",
    "InProcessChannel",
    "ServerOutput",
    "SplitBackbone",
    "get_arch",
    "split_forward_backward",
    "split_model",
]
