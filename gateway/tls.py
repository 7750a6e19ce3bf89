"""The TLS terminator for TCP listeners (8883, 9883).

Accepts plain TCP, applies the connection limit and the per-address
handshake rate limit *before* any TLS work, runs the handshake under its
timeout, extracts the presented chain, asks
:class:`~gateway.trust_state.TrustState` for the decision and hands the TLS
transport, with that decision, to the front-end's protocol.

The TLS layer is our own :class:`TlsTransport` (OpenSSL through
``ssl.SSLObject`` and two memory BIOs on a plain TCP transport) rather than the
event loop's ``ssl=`` transport, for the memory an idle connection keeps
(measured with uvloop, per connection): uvloop's SSL transport gives every
connection its own 256 KiB read buffer (~4-5 KB of it resident), a 64-slot
write deque, the ``getpeercert()`` dict and a transport object of its own
(~8 KB in all); a plain TCP transport reads into the loop's shared buffer.
After the handshake, data goes through OpenSSL in slices of one record: a
memory BIO never shrinks, so it keeps the capacity of the largest write it ever
took (with the loop's transport, up to a whole 256 KiB read or a whole write).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from gateway.metrics import GatewayMetrics
from gateway.trust_state import TrustState, peer_chain_der
from trust.model import Decision, DeviceIdentity, Listener

log = logging.getLogger("mtls_gateway.tls")

HANDSHAKE_SLICE = 1024
"""Bytes handed to OpenSSL at a time during the handshake (see ``_handshake``)."""
RECORD_SLICE = 16 * 1024
"""Bytes handed to OpenSSL at a time after the handshake, in both directions
(the plaintext of one TLS record): what the memory BIOs keep stays bounded
whatever the size of a read or a write."""
SHUTDOWN_TIMEOUT = 30.0
"""Seconds ``close()`` waits for the peer's close_notify before cutting the
connection (uvloop's and asyncio's default; front-ends cut sooner)."""
WRITE_HIGH_WATER = 512 * 1024
"""Ciphertext queued on the TCP transport before the protocol is paused
(``pause_writing``); it resumes at a quarter of it (uvloop's SSL defaults)."""

_HANDSHAKE, _OPEN, _SHUTDOWN, _CLOSED = 0, 1, 2, 3
_AGAIN = (ssl.SSLWantReadError, ssl.SSLSyscallError)  # as uvloop and asyncio treat them


@dataclass(slots=True)
class TlsPeer:
    """An established TLS connection's peer and trust decision."""

    peer: str
    listener: Listener
    decision: Decision


ProtocolFactory = Callable[[TlsPeer], asyncio.Protocol]
"""``factory(peer)``: the protocol that takes over the TLS transport after the
handshake (``connection_made`` follows at once)."""


class ConnectionLimiter:
    """Counts live connections across listeners against ``max_connections``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class HandshakeRateLimiter:
    """Token bucket per source address (rate/s, burst); idle buckets are pruned."""

    def __init__(self, rate: float, burst: int, max_tracked: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_tracked = max_tracked
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, address: str, now: float) -> bool:
        tokens, last = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return False
        self._buckets[address] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_tracked:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        for addr, (_, last) in list(self._buckets.items()):
            if now - last > full_after:
                del self._buckets[addr]


def _verify_failure_reason(exc: BaseException) -> str:
    """A stable reason label for a failed handshake (by OpenSSL verify code, not text)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            return "expired"
        if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
            return "not_yet_valid"
        if code in (2, 18, 19, 20, 21):  # no issuer / self-signed / unable to verify leaf
            return "untrusted"
        if code in (24, 25):  # invalid CA / path length exceeded
            return "not_ca" if code == 24 else "path_length"
        if code == 26:  # invalid purpose
            return "bad_usage"
        return f"verify_{code}"
    if isinstance(exc, ssl.SSLError):
        lib_reason = (exc.reason or "").lower()
        if (
            "peer_did_not_return_a_certificate" in lib_reason
            or "certificate required" in lib_reason
        ):
            return "no_certificate"
        return "tls_error"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    return "connection_lost"


class TlsTransport(asyncio.Transport, asyncio.Protocol):
    """One TLS connection: the protocol of its plain TCP transport and, once the
    handshake is done, the transport of the front-end's protocol.

    Both roles in one object (one object per connection instead of two): the
    TCP transport calls the :class:`asyncio.Protocol` methods
    (``connection_made``, ``data_received``, ``eof_received``,
    ``connection_lost``, ``pause_writing``/``resume_writing``), the front-end
    calls the :class:`asyncio.Transport` ones. Semantics follow uvloop's SSL
    transport: one ``data_received`` per TCP read, a TCP end without
    close_notify is a lost connection, ``close()`` sends close_notify and waits
    (up to :data:`SHUTDOWN_TIMEOUT`) for the peer's, ``abort()`` cuts at once.
    """

    __slots__ = (
        "_app",
        "_backlog",
        "_error",
        "_held",
        "_in",
        "_listener",
        "_out",
        "_paused",
        "_peer",
        "_sslobj",
        "_started",
        "_state",
        "_tcp",
        "_timer",
    )

    def __init__(self, listener: TlsListener, peer: str, started: float) -> None:
        self._listener = listener
        self._peer = peer
        self._started = started
        self._state = _HANDSHAKE
        self._tcp: asyncio.Transport | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject | None = None
        self._app: asyncio.BaseProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None  # handshake, then shutdown
        self._paused = False  # reading paused by the front-end
        self._held: bytes | None = None  # TCP data that arrived while paused
        self._backlog: bytes | None = None  # plaintext a renegotiation holds up
        self._error: Exception | None = None  # for the front-end's connection_lost

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._sslobj

    # the TCP transport's protocol ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses
        tcp = self._tcp = cast(asyncio.Transport, transport)
        listener = self._listener
        try:
            self._sslobj = listener.context.wrap_bio(self._in, self._out, server_side=True)
            tcp.set_write_buffer_limits(WRITE_HIGH_WATER)
        except Exception as exc:
            self._handshake_failed(exc)
            return
        self._timer = asyncio.get_running_loop().call_later(
            listener.handshake_timeout, self._handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _OPEN:
            if self._paused:
                self._held = data if self._held is None else self._held + data
            else:
                self._read(data)
        elif state == _HANDSHAKE:
            self._handshake(data)
        elif state == _SHUTDOWN:
            self._shutdown_step(data)

    def eof_received(self) -> bool:
        if self._state == _HANDSHAKE:
            self._handshake_failed(ConnectionResetError("connection closed during the handshake"))
        elif self._state != _CLOSED:
            # a TCP end without close_notify: a lost connection, not an orderly EOF
            self._state = _SHUTDOWN
            self._cancel_timer()
            if self._tcp is not None:
                self._tcp.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _CLOSED
        self._cancel_timer()
        self._held = self._backlog = None
        if state == _HANDSHAKE:
            self._listener._handshake_failed(self, exc or ConnectionResetError("connection lost"))
        self._listener._lost(self)
        app, self._app = self._app, None
        if app is not None:
            error, self._error = self._error, None
            app.connection_lost(exc or error)

    def pause_writing(self) -> None:
        if self._app is not None and self._state == _OPEN:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None and self._state == _OPEN:
            self._app.resume_writing()

    # TLS -----------------------------------------------------------------------
    def _handshake(self, data: bytes) -> None:
        # The incoming BIO keeps the capacity of its largest write for the life
        # of the connection. Handing OpenSSL a large flight (the client's
        # certificates) in HANDSHAKE_SLICE pieces lets it move each into its own
        # record buffer, which it frees after the handshake: ~0.8 KB less per
        # idle connection for one or two more do_handshake calls (~1 % of a
        # handshake's CPU; 512-byte pieces would save 1.5 KB for ~3 %).
        sslobj = self._sslobj
        assert sslobj is not None
        n = len(data)
        try:
            if n <= HANDSHAKE_SLICE:
                self._in.write(data)
                sslobj.do_handshake()
            else:
                view = memoryview(data)
                for pos in range(0, n, HANDSHAKE_SLICE):
                    self._in.write(view[pos : pos + HANDSHAKE_SLICE])
                    try:
                        sslobj.do_handshake()
                        break  # done: the rest (application data) stays in the BIO
                    except _AGAIN:
                        if pos + HANDSHAKE_SLICE >= n:
                            raise
                if pos + HANDSHAKE_SLICE < n:
                    self._in.write(view[pos + HANDSHAKE_SLICE :])
        except _AGAIN:
            self._flush()
            return
        except Exception as exc:  # ssl.SSLError: verification failed, not TLS, ...
            self._handshake_failed(exc)
            return
        self._cancel_timer()
        self._state = _OPEN
        self._flush()  # the server's last flight (TLS 1.2 Finished, TLS 1.3 tickets)
        app = self._listener._established(self, self._started)
        self._started = 0.0
        if app is None or self._state != _OPEN:
            return
        self._app = app
        app.connection_made(self)
        if self._state == _OPEN and not self._paused:
            # what came with the client's last flight (the MQTT CONNECT, typically)
            self._read(b"")

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._handshake_failed(TimeoutError("TLS handshake timed out"))

    def _handshake_failed(self, exc: BaseException) -> None:
        """Count and log the failure, then cut the connection (as uvloop does:
        no alert is flushed)."""
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        self._cancel_timer()
        self._listener._handshake_failed(self, exc)
        if self._tcp is not None:
            self._tcp.abort()

    def _read(self, data: bytes) -> None:
        """Decrypt ``data`` (sliced) and give the front-end all of it in one call."""
        sslobj, incoming = self._sslobj, self._in
        assert sslobj is not None
        chunks: list[bytes] = []
        eof = False
        n = len(data)
        view = memoryview(data) if n > RECORD_SLICE else None
        pos = 0
        try:
            while True:
                if view is None:
                    if n:
                        incoming.write(data)
                    pos = n
                elif pos < n:
                    incoming.write(view[pos : pos + RECORD_SLICE])
                    pos += RECORD_SLICE
                try:
                    while incoming.pending or sslobj.pending():
                        chunk = sslobj.read(RECORD_SLICE)
                        if not chunk:
                            eof = True  # close_notify
                            break
                        chunks.append(chunk)
                except _AGAIN:
                    pass
                if eof or pos >= n:
                    break
        except ssl.SSLZeroReturnError:
            eof = True
        except Exception as exc:  # a bad record: the connection is unusable
            self._fatal(exc)
            return
        if self._backlog is not None:  # a renegotiation may have let it through
            backlog, self._backlog = self._backlog, None
            self._write(backlog)
        self._flush()  # whatever OpenSSL answered on its own (key update, renegotiation)
        app = self._app
        if chunks and app is not None:
            cast(asyncio.Protocol, app).data_received(
                chunks[0] if len(chunks) == 1 else b"".join(chunks)
            )
        if eof and self._state == _OPEN:
            # the peer's close_notify: an orderly end (the answer is our close_notify)
            if self._app is not None:
                cast(asyncio.Protocol, self._app).eof_received()
            self.close()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` (sliced) onto the TCP transport."""
        sslobj, out, tcp = self._sslobj, self._out, self._tcp
        assert sslobj is not None and tcp is not None
        if len(data) <= RECORD_SLICE:  # the usual case: one record, one write
            try:
                sslobj.write(data)
            except _AGAIN:  # a renegotiation wants the peer first: retried after a read
                self._backlog = bytes(data)
            except Exception as exc:
                self._fatal(exc)
                return
            if out.pending:
                tcp.write(out.read())
            return
        view = memoryview(data).cast("B")
        n = len(view)
        pos = 0
        pieces: list[bytes] = []
        try:
            while pos < n:
                sslobj.write(view[pos : pos + RECORD_SLICE])
                pos += RECORD_SLICE
                pieces.append(out.read())
        except _AGAIN:
            self._backlog = bytes(view[pos:])
        except Exception as exc:
            self._fatal(exc)
            return
        if out.pending:
            pieces.append(out.read())
        tcp.writelines(pieces)

    def _flush(self) -> None:
        out = self._out
        if out.pending and self._tcp is not None:
            self._tcp.write(out.read())

    def _fatal(self, exc: Exception) -> None:
        log.info(
            "TLS error listener=%s peer=%s: %s", self._listener.listener.value, self._peer, exc
        )
        self._error = exc
        self.abort()

    def _shutdown_step(self, data: bytes = b"") -> None:
        """Skip application data, send close_notify, close once the peer's came."""
        sslobj, incoming, tcp = self._sslobj, self._in, self._tcp
        assert sslobj is not None and tcp is not None
        view = memoryview(data)
        try:
            # at least one pass: from close(), records may still be unread in the BIO
            # (reading paused, or closed in connection_made) and OpenSSL fails a
            # shutdown that meets application data
            for pos in range(0, len(data) or 1, RECORD_SLICE):
                incoming.write(view[pos : pos + RECORD_SLICE])
                try:
                    while sslobj.read(RECORD_SLICE):
                        pass
                except _AGAIN:
                    pass
            try:
                sslobj.unwrap()
            except _AGAIN:
                self._flush()
                return
            self._flush()
        except ssl.SSLZeroReturnError:
            self._flush()
        except Exception as exc:
            self._fatal(exc)
            return
        self._cancel_timer()
        tcp.close()

    def _shutdown_timeout(self) -> None:
        self._timer = None
        if self._state == _SHUTDOWN and self._tcp is not None:
            self._error = TimeoutError("TLS shutdown timed out")
            self._tcp.abort()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _resume(self) -> None:
        """After ``resume_reading``: what arrived (or stayed in the BIO) meanwhile."""
        if self._state != _OPEN or self._paused:
            return
        held, self._held = self._held, None
        self._read(held if held is not None else b"")

    # the front-end's transport ---------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return self._listener.context
        if sslobj is not None and self._state != _HANDSHAKE:
            if name == "peercert":
                return sslobj.getpeercert()  # computed on demand: not kept per connection
            if name == "cipher":
                return sslobj.cipher()
            if name == "compression":
                return sslobj.compression()
        tcp = self._tcp
        return tcp.get_extra_info(name, default) if tcp is not None else default

    def is_closing(self) -> bool:
        return self._state != _OPEN

    def close(self) -> None:
        """Send what is queued and close_notify; the TCP connection closes once
        the peer answers (or after :data:`SHUTDOWN_TIMEOUT`)."""
        if self._state == _OPEN:
            self._state = _SHUTDOWN
            self._held = None
            if self._paused and self._tcp is not None:
                self._tcp.resume_reading()  # the peer's close_notify (or FIN) must be read
            self._timer = asyncio.get_running_loop().call_later(
                SHUTDOWN_TIMEOUT, self._shutdown_timeout
            )
            self._shutdown_step()
        elif self._state == _HANDSHAKE:
            self.abort()

    def abort(self) -> None:
        self._state = _CLOSED
        self._cancel_timer()
        if self._tcp is not None:
            self._tcp.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._app)

    def is_reading(self) -> bool:
        return not self._paused

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._state == _OPEN and self._tcp is not None:
                self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._state == _OPEN and self._tcp is not None:
                self._tcp.resume_reading()
                if self._held is not None or self._in.pending:
                    asyncio.get_running_loop().call_soon(self._resume)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._tcp is not None
        return self._tcp.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        queued = len(self._backlog) if self._backlog is not None else 0
        return queued + (self._tcp.get_write_buffer_size() if self._tcp is not None else 0)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._state != _OPEN:
            return  # after close() or abort(): dropped, as the event loop's TLS does
        if self._backlog is not None:
            self._backlog += bytes(data)
            return
        self._write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def can_write_eof(self) -> bool:
        return False


class TlsListener:
    """One TCP+TLS listener.

    Our own accept loop checks the connection limit and the per-address rate
    *before* any TLS work, then hands the socket to
    ``loop.connect_accepted_socket`` with a :class:`TlsTransport` as its
    protocol: the TLS layer owns the socket from its first byte, so a
    ClientHello can never race an upgrade. The handshake, its timeout and the
    decision run in that protocol's callbacks (no task per handshake beyond
    the one that attaches the socket).

    Authenticated connections go to the protocol ``protocol_factory`` returns;
    the connection slot is released when the TCP connection is gone.
    """

    def __init__(
        self,
        listener: Listener,
        host: str,
        port: int,
        trust: TrustState,
        protocol_factory: ProtocolFactory,
        *,
        metrics: GatewayMetrics,
        limiter: ConnectionLimiter,
        rate: HandshakeRateLimiter,
        handshake_timeout: float,
    ) -> None:
        self.listener = listener
        self.host = host
        self.port = port
        self.trust = trust
        self.protocol_factory = protocol_factory
        self.metrics = metrics
        self.limiter = limiter
        self.rate = rate
        self.handshake_timeout = handshake_timeout
        self.context = trust.server_context(listener)
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        # every admitted connection is in exactly one of these until it is gone
        self._handshaking: set[TlsTransport] = set()
        self._live: set[TlsTransport] = set()  # handed to a protocol
        self._refusals_logged_at = 0.0
        self._refusals_unlogged = 0

    @property
    def bound_port(self) -> int:
        assert self._sock is not None
        port: int = self._sock.getsockname()[1]
        return port

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server(
            (self.host, self.port),
            family=family,
            backlog=1024,
            dualstack_ipv6=family == socket.AF_INET6 and self.host in ("::", ""),
        )
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"accept-{self.listener}")
        log.info("%s listening on %s:%d (TLS)", self.listener.value, self.host, self.bound_port)

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()

    async def stop(self) -> None:
        await self.stop_accepting()
        for task in list(self._conn_tasks):
            task.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        for conn in list(self._handshaking):
            conn.abort()  # not counted: the gateway stops, the peer did nothing wrong
        for conn in list(self._live):
            if not conn.is_closing():
                conn.abort()
        await asyncio.sleep(0)  # let connection_lost run

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        lsock = self._sock
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE/ENFILE: back off instead of spinning
                log.error("accept failed on %s: %s", self.listener.value, exc)
                await asyncio.sleep(0.1)
                continue
            self._admit(conn, addr)
            # drain the backlog in one go: one loop iteration per accept is slow
            for _ in range(64):
                try:
                    conn, addr = lsock.accept()
                except OSError:
                    break
                self._admit(conn, addr)

    def _admit(
        self, conn: socket.socket, addr: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        address = str(addr[0])
        lname = self.listener.value
        reason = None
        if not self.limiter.try_acquire():
            reason = "max_connections"
        elif not self.rate.allow(address, time.monotonic()):
            self.limiter.release()
            reason = "handshake_rate"
        if reason is not None:
            self.metrics.refused.inc(lname, reason)
            self._log_refusal(address, reason)
            # RST rather than FIN: no TIME_WAIT left behind by a flood
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.create_task(self._serve(conn, f"{address}:{addr[1]}"))
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    def _log_refusal(self, address: str, reason: str) -> None:
        """At most one line per second for refusals (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self._refusals_logged_at < 1.0:
            self._refusals_unlogged += 1
            return
        extra = (
            f" (+{self._refusals_unlogged} more since the last report)"
            if self._refusals_unlogged
            else ""
        )
        limit = f"max_connections={self.limiter.limit}" if reason == "max_connections" else reason
        log.warning(
            "refusing connections on %s: %s reached; last from %s%s",
            self.listener.value,
            limit,
            address,
            extra,
        )
        self._refusals_logged_at = now
        self._refusals_unlogged = 0

    def _decide(self, ssl_object: ssl.SSLObject | None) -> Decision:
        """The trust decision; the chain is dropped once it is made."""
        chain = peer_chain_der(ssl_object) if ssl_object is not None else None
        if ssl_object is not None and ssl_object.session_reused:
            return self.trust.decide_resumed(chain[0] if chain else None, self.listener)
        return self.trust.decide_der(chain, self.listener)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        """Attach the socket to a :class:`TlsTransport`; the rest happens in its
        callbacks (the handshake starts with the ClientHello)."""
        tls = TlsTransport(self, peer, time.perf_counter())
        self._handshaking.add(tls)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: tls, conn)
        except BaseException as exc:
            if isinstance(exc, OSError) and tls in self._handshaking:
                self._handshake_failed(tls, exc)
            tls.abort()
            conn.close()
            self._lost(tls)
            if not isinstance(exc, OSError):
                raise

    def _handshake_failed(self, tls: TlsTransport, exc: BaseException) -> None:
        lname = self.listener.value
        reason = _verify_failure_reason(exc)
        self.metrics.handshakes.inc(lname, "rejected", reason)
        log.info(
            "handshake failed listener=%s peer=%s reason=%s (%s)",
            lname,
            tls.peer,
            reason,
            exc.__class__.__name__,
        )

    def _established(self, tls: TlsTransport, started: float) -> asyncio.Protocol | None:
        """The handshake is done: decide, count, and return the protocol that
        takes the connection over (None: the connection was cut)."""
        lname = self.listener.value
        try:
            decision = self._decide(tls.ssl_object)
        except Exception:
            log.exception("trust decision failed for %s on %s", tls.peer, lname)
            tls.abort()
            return None
        self.metrics.handshake_seconds.observe(time.perf_counter() - started, lname)
        if isinstance(decision, DeviceIdentity):
            self.metrics.handshakes.inc(lname, "accepted", "ok")
        else:
            self.metrics.handshakes.inc(lname, "rejected", decision.reason.value)
        self._handshaking.discard(tls)
        self._live.add(tls)
        try:
            return self.protocol_factory(TlsPeer(tls.peer, self.listener, decision))
        except Exception:
            log.exception("handler crashed for %s on %s", tls.peer, lname)
            tls.abort()
            return None

    def _lost(self, tls: TlsTransport) -> None:
        """The TCP connection is gone: release its slot (once)."""
        if tls in self._live:
            self._live.discard(tls)
        elif tls in self._handshaking:
            self._handshaking.discard(tls)
        else:
            return
        self.limiter.release()
