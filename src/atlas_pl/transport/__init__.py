"""Split training across processes and hosts: the wire format, a gRPC link, and the two halves' drivers."""

from atlas_pl.transport.grpc_link import LinkClient, LinkError, LinkServer
from atlas_pl.transport.remote import RemoteClients, SplitServer
from atlas_pl.transport.wire import Message, WireError, decode, encode

__all__ = ["LinkClient", "LinkError", "LinkServer", "Message", "RemoteClients", "SplitServer", "WireError", "decode",
           "encode"]  # fmt: skip
