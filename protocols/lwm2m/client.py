"""A small LWM2M client over a pyOpenSSL DTLS client, for tests and simulators.

:class:`DtlsClient` is a DTLS 1.2 client over memory BIOs and an asyncio UDP
socket (with handshake retransmission, which tests can turn off to prove the
server's own timer). :class:`Lwm2mClient` speaks CoAP through the same sans-IO
:class:`~protocols.lwm2m.coap.CoapPeer` the gateway uses and answers the
gateway's Read / Write / Execute from a table of resource values (Block2 for
values larger than one block). By default only the leaf certificate is sent,
like libcoap's ``coap-client``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from OpenSSL import SSL

from gateway.dtls import DTLS_1_2, pack_datagrams, split_records
from protocols.lwm2m.coap import (
    CoapPeer,
    IncomingRequest,
    RequestFailed,
    ResponseReceived,
)

TEXT_PLAIN = 0
LINK_FORMAT = 40


class DtlsHandshakeError(ConnectionError):
    """The DTLS handshake failed (alert, timeout or verification)."""


def client_context(
    cert: Path | None, key: Path | None, cafile: Path | None, *, send_chain: bool = False
) -> SSL.Context:
    """A DTLS 1.2 client context; ``send_chain`` sends the whole chain file
    instead of only its first certificate."""
    ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    ctx.set_min_proto_version(DTLS_1_2)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    if cert is not None and key is not None:
        if send_chain:
            ctx.use_certificate_chain_file(str(cert))
        else:
            ctx.use_certificate_file(str(cert))
        ctx.use_privatekey_file(str(key))
    if cafile is not None:
        ctx.load_verify_locations(str(cafile))
        ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
    return ctx


class DtlsClient(asyncio.DatagramProtocol):
    """One DTLS client session over a connected UDP socket."""

    def __init__(self, context: SSL.Context, *, mtu: int, retransmit: bool) -> None:
        self.mtu = mtu
        self.retransmit = retransmit
        self.conn = SSL.Connection(context, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(mtu)
        self.on_data: Callable[[bytes], None] | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        """Resolves with why the session ended: ``close_notify``, ``error: ...``."""
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.datagrams_received = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        cert: Path | None,
        key: Path | None,
        cafile: Path | None,
        mtu: int = 1200,
        handshake_timeout: float = 10.0,
        local_addr: tuple[str, int] | None = None,
        retransmit: bool = True,
        send_chain: bool = False,
    ) -> DtlsClient:
        """Handshake with ``host:port``; raises :class:`DtlsHandshakeError`."""
        ctx = client_context(cert, key, cafile, send_chain=send_chain)
        client = cls(ctx, mtu=mtu, retransmit=retransmit)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: client, remote_addr=(host, port), local_addr=local_addr
        )
        client._step()
        try:
            await asyncio.wait_for(asyncio.shield(client._handshake), handshake_timeout)
        except TimeoutError:
            client.abort()
            raise DtlsHandshakeError("handshake timed out") from None
        except BaseException:
            client.abort()
            raise
        return client

    @property
    def local_port(self) -> int:
        assert self._transport is not None
        port: int = self._transport.get_extra_info("sockname")[1]
        return port

    def max_plaintext(self) -> int:
        return int(self.conn.get_cleartext_mtu())

    def send(self, data: bytes) -> None:
        if self.closed.done():
            raise ConnectionError("DTLS session closed")
        self.conn.send(data)
        self._flush()

    def close(self) -> None:
        """Send close_notify and close the socket."""
        if not self.closed.done():
            with contextlib.suppress(SSL.Error):
                self.conn.shutdown()
            self._flush()
            self.closed.set_result("closed by us")
        self.abort()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if not self._handshake.done():
            self._handshake.set_exception(DtlsHandshakeError("aborted"))
            self._handshake.exception()  # retrieved: no "never retrieved" warning
        if not self.closed.done():
            self.closed.set_result("aborted")

    # asyncio.DatagramProtocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's and uvloop's UDP transports do not subclass DatagramTransport
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.datagrams_received += 1
        if self.closed.done():
            return
        self.conn.bio_write(data)
        self._step()

    def error_received(self, exc: Exception) -> None:
        if not self._handshake.done():
            self._fail(f"error: {exc}")

    # internals ----------------------------------------------------------------------------
    def _step(self) -> None:
        if not self._handshake.done():
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                self._flush()
                self._arm()
                return
            except SSL.Error as exc:
                self._flush()
                self._fail(f"error: {exc}")
                return
            self._handshake.set_result(None)
        while True:
            try:
                data = self.conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._flush()
                if not self.closed.done():
                    self.closed.set_result("close_notify")
                return
            except SSL.Error as exc:
                if not self.closed.done():
                    self.closed.set_result(f"error: {exc}")
                return
            if self.on_data is not None:
                self.on_data(data)
        self._flush()
        self._arm()

    def _fail(self, reason: str) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(DtlsHandshakeError(reason))
        if not self.closed.done():
            self.closed.set_result(reason)

    def _flush(self) -> None:
        chunks = []
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks or self._transport is None:
            return
        data = b"".join(chunks)
        for datagram in pack_datagrams(split_records(data) or [data], self.mtu):
            self._transport.sendto(datagram)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.retransmit or self._handshake.done():
            return
        timeout = self.conn.DTLSv1_get_timeout()
        if timeout is not None:
            self._timer = self._loop.call_later(timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._handshake.done():
            return
        try:
            self.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._fail(f"error: {exc}")
            return
        self._flush()
        self._arm()


class Lwm2mClient:
    """Registers an endpoint and serves the gateway's requests from ``resources``
    (``{"/3/0/0": b"value"}``). Writes update the table; executes are recorded."""

    def __init__(
        self,
        dtls: DtlsClient,
        endpoint: str,
        resources: dict[str, bytes] | None = None,
        *,
        block_size: int = 512,
    ) -> None:
        self.dtls = dtls
        self.endpoint = endpoint
        self.resources = dict(resources or {})
        self.block_szx = max(0, min(6, block_size.bit_length() - 5))
        self.coap = CoapPeer(max_message_size=dtls.max_plaintext())
        self.location: tuple[str, ...] | None = None
        self.requests: list[Message] = []
        """Every request the gateway sent (for assertions)."""
        self.executed: list[tuple[str, bytes]] = []
        self._waiters: dict[bytes, asyncio.Future[Message]] = {}
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        dtls.on_data = self._on_data

    async def register(
        self,
        *,
        lifetime: int = 300,
        version: str = "1.1",
        binding: str = "U",
        objects: str = "</1/0>,</3/0>",
        ep: str | None = "",
        wait: float = 10.0,
    ) -> Message:
        """Register (``ep=""`` sends our endpoint name, ``None`` omits it)."""
        query = [f"lt={lifetime}", f"lwm2m={version}", f"b={binding}"]
        if ep is not None:
            query.insert(0, f"ep={ep or self.endpoint}")
        message = Message(
            code=Code.POST, uri_path=("rd",), uri_query=tuple(query), payload=objects.encode()
        )
        message.opt.content_format = LINK_FORMAT
        response = await self.request(message, wait)
        if response.code == Code.CREATED:
            self.location = tuple(response.opt.location_path)
        return response

    async def update(
        self, *, lifetime: int | None = None, objects: str | None = None, wait: float = 10.0
    ) -> Message:
        assert self.location is not None, "register first"
        query = () if lifetime is None else (f"lt={lifetime}",)
        message = Message(code=Code.POST, uri_path=self.location, uri_query=query)
        if objects is not None:
            message.payload = objects.encode()
            message.opt.content_format = LINK_FORMAT
        return await self.request(message, wait)

    async def deregister(self, wait: float = 10.0) -> Message:
        assert self.location is not None, "register first"
        return await self.request(Message(code=Code.DELETE, uri_path=self.location), wait)

    async def request(self, message: Message, wait: float = 10.0) -> Message:
        token = self.coap.request(message, self._loop.time())
        future: asyncio.Future[Message] = self._loop.create_future()
        self._waiters[token] = future
        self._flush()
        try:
            return await asyncio.wait_for(future, wait)
        finally:
            self._waiters.pop(token, None)

    # incoming ---------------------------------------------------------------------------
    def _on_data(self, data: bytes) -> None:
        now = self._loop.time()
        for event in self.coap.receive(data, now):
            if isinstance(event, IncomingRequest):
                self.requests.append(event.message)
                self.coap.respond(event.message, self._serve(event.message), now)
            elif isinstance(event, ResponseReceived):
                future = self._waiters.get(event.token)
                if future is not None and not future.done():
                    future.set_result(event.message)
            elif isinstance(event, RequestFailed):
                future = self._waiters.get(event.token)
                if future is not None and not future.done():
                    future.set_exception(TimeoutError(event.reason))
        self._flush()

    def _serve(self, request: Message) -> Message:
        path = "/" + "/".join(request.opt.uri_path)
        if request.code == Code.GET:
            value = self.resources.get(path)
            if value is None:
                return Message(code=Code.NOT_FOUND)
            return self._content(request, value)
        if request.code == Code.PUT:
            self.resources[path] = request.payload
            return Message(code=Code.CHANGED)
        if request.code == Code.POST:
            self.executed.append((path, request.payload))
            return Message(code=Code.CHANGED)
        return Message(code=Code.METHOD_NOT_ALLOWED)

    def _content(self, request: Message, value: bytes) -> Message:
        asked = request.opt.block2
        szx = self.block_szx if asked is None else min(asked.size_exponent, self.block_szx)
        size = 1 << (szx + 4)
        if asked is None and len(value) <= size:
            response = Message(code=Code.CONTENT, payload=value)
        else:
            start = 0 if asked is None else asked.block_number << (asked.size_exponent + 4)
            chunk = value[start : start + size]
            more = start + size < len(value)
            response = Message(code=Code.CONTENT, payload=chunk)
            response.opt.block2 = BlockOption.BlockwiseTuple(start // size, more, szx)
        response.opt.content_format = TEXT_PLAIN
        return response

    # timers ------------------------------------------------------------------------------
    def _flush(self) -> None:
        for data in self.coap.take_outgoing():
            with contextlib.suppress(ConnectionError, SSL.Error):
                self.dtls.send(data)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.coap.next_timer()
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for event in self.coap.handle_timer(self._loop.time()):
            if isinstance(event, RequestFailed):
                future = self._waiters.get(event.token)
                if future is not None and not future.done():
                    future.set_exception(TimeoutError(event.reason))
        self._flush()
