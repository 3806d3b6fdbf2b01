"""A gRPC link between split clients and the split server: one bidirectional stream per client connection.

The service has one method, ``/atlas_pl.Split/Exchange``, registered as a generic handler on raw bytes (no ``.proto``
code generation): every request and every reply is one :mod:`atlas_pl.transport.wire` message. The server answers the
requests of a stream in order, one reply per request. A client connection carries a connection id and, when the
server has one, the shared token (``authorization: Bearer <token>`` metadata, compared in constant time); TLS is on
when the server gets a certificate and key and the client the CA certificate. The client waits at most ``timeout_s``
for each reply and keeps at most ``window`` requests in flight.
"""

from __future__ import annotations

import hmac
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from atlas_pl.transport.wire import Message, WireError, decode, encode

METHOD = "/atlas_pl.Split/Exchange"
MAX_MESSAGE_BYTES = 1 << 30
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
Handler = Callable[[Message, str], Message]


class LinkError(RuntimeError):
    """The link to the server failed: refused, unauthenticated, timed out, or the server went away."""


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class LinkServer:
    """The server end: calls ``handler(message, connection_id)`` for every request and streams back its reply.

    Args:
        handler: Turns one request into one reply; an exception becomes an ``error`` reply naming it (the stream
            stays open), so one bad request does not end the client's connection.
        address: ``host:port`` to listen on (port 0: any free port, see :attr:`port`).
        token: Shared secret every client must present; ``None`` accepts every client (loopback tests).
        tls_cert: PEM certificate of the server (with ``tls_key``: TLS on).
        tls_key: PEM private key of the server.
        max_workers: Threads serving connections (one per open client stream).
    """

    def __init__(
        self,
        handler: Handler,
        address: str = "127.0.0.1:0",
        token: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_workers: int = 32,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both `tls_cert` and `tls_key` (PEM files); pass both or neither")
        self.handler, self.token = handler, token
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_OPTIONS)
        method = grpc.stream_stream_rpc_method_handler(self._exchange)  # raw bytes in and out
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("atlas_pl.Split", {"Exchange": method}),)
        )
        if tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(_read(tls_key), _read(tls_cert))])
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise LinkError(f"cannot listen on {address!r} (in use, or not a valid host:port)")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"

    def start(self) -> LinkServer:
        self._server.start()
        return self

    def stop(self, grace_s: float | None = 1.0) -> None:
        self._server.stop(grace_s).wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (``True``) or ``timeout_s`` passes (``False``)."""
        return bool(self._server.wait_for_termination(timeout_s))

    def _exchange(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        metadata = dict(context.invocation_metadata())
        if self.token is not None:
            given = str(metadata.get("authorization", ""))
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing token; pass the server's --token")
        connection = str(metadata.get("x-atlas-connection", context.peer()))
        for data in requests:
            try:
                reply = self.handler(decode(data), connection)
            except Exception as err:  # noqa: BLE001 - the client gets the reason, the server keeps serving
                reply = Message("error", {"reason": f"{type(err).__name__}: {err}"})
            yield encode(reply)


class LinkClient:
    """The client end: ``request(message)`` sends one message and returns the server's reply.

    Args:
        target: The server's ``host:port``.
        token: The server's shared token (``None`` when it has none).
        tls_root_cert: PEM certificate that signed the server's (TLS on); ``None`` = plain TCP.
        timeout_s: Seconds to wait for each reply before :class:`LinkError`.
        window: Requests in flight at most (:meth:`send` blocks beyond it); 1 = strict request/reply.
        connect_timeout_s: Seconds to wait for the server to accept the connection.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_root_cert: str | Path | None = None,
        timeout_s: float = 120.0,
        window: int = 1,
        connect_timeout_s: float = 30.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"`window` must be >= 1, got {window!r}")
        self.target, self.timeout_s, self.connection = target, timeout_s, uuid.uuid4().hex
        self.bytes_sent = self.bytes_received = 0  # encoded message bytes that crossed this link
        if tls_root_cert is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_root_cert))
            self._channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError as err:
            self._channel.close()
            raise LinkError(f"no server answers at {target} after {connect_timeout_s:.0f} s; start `atlas-pl serve` "
                            "there first, or fix --server") from err  # fmt: skip
        metadata = [("x-atlas-connection", self.connection)]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._inbox: queue.Queue[bytes | BaseException] = queue.Queue()
        self._slots = threading.BoundedSemaphore(window)
        stream = self._channel.stream_stream(METHOD)
        self._replies = stream(iter(self._outbox.get, None), metadata=metadata)
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()

    def _read_replies(self) -> None:
        try:
            for data in self._replies:
                self._inbox.put(data)
            self._inbox.put(LinkError(f"the server at {self.target} closed the stream"))
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            detail = err.details() if hasattr(err, "details") else str(err)
            self._inbox.put(LinkError(f"link to {self.target} failed ({code}): {detail}"))

    def send(self, message: Message) -> None:
        """Queue one request (blocks while ``window`` requests await their replies)."""
        if not self._slots.acquire(timeout=self.timeout_s):
            raise LinkError(f"{self.target}: no reply to the {self.timeout_s:.0f} s old requests in flight")
        data = encode(message)
        self.bytes_sent += len(data)
        self._outbox.put(data)

    def receive(self) -> Message:
        """The reply to the oldest request in flight.

        Raises:
            LinkError: No reply within ``timeout_s``, the server went away, or it answered with an ``error``.
        """
        try:
            item = self._inbox.get(timeout=self.timeout_s)
        except queue.Empty as err:
            raise LinkError(f"no reply from {self.target} within {self.timeout_s:.0f} s (raise --timeout_s, or check "
                            "the server)") from err  # fmt: skip
        self._slots.release()
        if isinstance(item, BaseException):
            self._inbox.put(item)  # every later receive fails the same way
            raise item
        self.bytes_received += len(item)
        try:
            reply = decode(item)
        except WireError as err:
            raise LinkError(f"unreadable reply from {self.target}: {err}") from err
        if reply.kind == "error":
            raise LinkError(f"the server refused the request: {reply.fields.get('reason', '?')}")
        return reply

    def request(self, message: Message) -> Message:
        """Send ``message`` and return its reply."""
        self.send(message)
        return self.receive()

    def close(self) -> None:
        self._outbox.put(None)
        self._channel.close()

    def __enter__(self) -> LinkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
