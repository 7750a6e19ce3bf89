"""The TLS terminator for TCP listeners (8883, 9883, 8443).

Accepts plain TCP, applies the connection limit and the per-address
handshake rate limit *before* any TLS work, runs the handshake under its
timeout, extracts the presented chain, asks
:class:`~gateway.trust_state.TrustState` for the decision and hands the TLS
transport, with that decision, to the front-end's protocol.
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

from gateway.metrics import GatewayMetrics
from gateway.trust_state import TrustState, peer_chain_der
from trust.model import Decision, DeviceIdentity, Listener

log = logging.getLogger("mtls_gateway.tls")


@dataclass(slots=True)
class TlsPeer:
    """An established TLS connection's peer and trust decision."""

    peer: str
    listener: Listener
    decision: Decision


ProtocolFactory = Callable[[TlsPeer, Callable[[], None]], asyncio.Protocol]
"""``factory(peer, done)``: the protocol that takes over the TLS transport after
the handshake; it must call ``done()`` once, from its ``connection_lost``."""


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


class _Handoff(asyncio.Protocol):
    """The TLS transport's protocol until the real one takes over: keeps what
    arrives between the end of the handshake and the hand-over."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False
        self.exc: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc

    def hand_over(self, transport: asyncio.BaseTransport, protocol: asyncio.Protocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.data:
            data = bytes(self.data)
            self.data.clear()
            protocol.data_received(data)
        if self.lost:
            protocol.connection_lost(self.exc)


class TlsListener:
    """One TCP+TLS listener.

    Our own accept loop checks the connection limit and the per-address rate
    *before* any TLS work, then hands the socket to
    ``loop.connect_accepted_socket(ssl=...)``: the TLS layer owns the socket
    from its first byte, so a ClientHello can never race the upgrade (with
    uvloop, a plain transport starts reading as soon as it exists).

    Authenticated connections go to the protocol ``protocol_factory`` returns
    (``transport.set_protocol``: no stream pair, no task per connection).
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
        self._live: set[asyncio.Transport] = set()  # handed to a protocol
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
        for transport in list(self._live):
            if not transport.is_closing():
                transport.abort()
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
        lname = self.listener.value
        handed_over = False
        try:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            protocol = _Handoff()
            try:
                tls_transport, _ = await asyncio.wait_for(
                    loop.connect_accepted_socket(
                        lambda: protocol,
                        conn,
                        ssl=self.context,
                        ssl_handshake_timeout=self.handshake_timeout,
                    ),
                    timeout=self.handshake_timeout + 1,
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                reason = _verify_failure_reason(exc)
                if isinstance(exc, ConnectionAbortedError) and (
                    time.perf_counter() - started >= self.handshake_timeout * 0.9
                ):
                    # asyncio reports its own handshake timeout as an abort
                    reason = "timeout"
                self.metrics.handshakes.inc(lname, "rejected", reason)
                log.info(
                    "handshake failed listener=%s peer=%s reason=%s (%s)",
                    lname,
                    peer,
                    reason,
                    exc.__class__.__name__,
                )
                conn.close()
                return
            decision = self._decide(tls_transport.get_extra_info("ssl_object"))
            self.metrics.handshake_seconds.observe(time.perf_counter() - started, lname)
            if isinstance(decision, DeviceIdentity):
                self.metrics.handshakes.inc(lname, "accepted", "ok")
            else:
                self.metrics.handshakes.inc(lname, "rejected", decision.reason.value)
            handed_over = self._hand_over(tls_transport, protocol, peer, decision)
        finally:
            if not handed_over:
                self.limiter.release()

    def _hand_over(
        self, transport: asyncio.Transport, handoff: _Handoff, peer: str, decision: Decision
    ) -> bool:
        """Give the transport to the factory's protocol; from here on the
        connection slot is released by the protocol's ``done()``."""
        self._live.add(transport)

        def done() -> None:
            if transport in self._live:
                self._live.discard(transport)
                self.limiter.release()

        try:
            handoff.hand_over(
                transport, self.protocol_factory(TlsPeer(peer, self.listener, decision), done)
            )
        except Exception:
            log.exception("handler crashed for %s on %s", peer, self.listener.value)
            transport.abort()
            done()
        return True
