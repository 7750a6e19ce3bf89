"""The TLS terminator for TCP listeners (8883, 9883, 8443).

Accepts plain TCP, applies the connection limit and the per-address
handshake rate limit *before* any TLS work, upgrades with ``start_tls``
under the handshake timeout, extracts the presented chain, asks
:class:`~gateway.trust_state.TrustState` for the decision and hands the
authenticated stream to the front-end's handler.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from gateway.metrics import GatewayMetrics
from gateway.trust_state import TrustState, peer_chain_der
from trust.model import Decision, DeviceIdentity, Listener

log = logging.getLogger("mtls_gateway.tls")


@dataclass(slots=True)
class TlsConnection:
    """An established TLS connection with its trust decision."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    listener: Listener
    decision: Decision
    chain_der: list[bytes] | None


Handler = Callable[[TlsConnection], Awaitable[None]]


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


READ_LIMIT = 64 * 1024


class _TlsStreamProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol for use under TLS, where half-close is not supported."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class _Accepted(asyncio.Protocol):
    """Holds a freshly accepted socket still: reading is paused before any byte
    can arrive, so the ClientHello is left for ``start_tls`` (no race)."""

    def __init__(self, listener: TlsListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but behave like one
        tcp = cast(asyncio.Transport, transport)
        tcp.pause_reading()
        self.listener._spawn(tcp)

    def connection_lost(self, exc: Exception | None) -> None:
        return None


class TlsListener:
    """One TCP+TLS listener."""

    def __init__(
        self,
        listener: Listener,
        host: str,
        port: int,
        trust: TrustState,
        handler: Handler,
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
        self.handler = handler
        self.metrics = metrics
        self.limiter = limiter
        self.rate = rate
        self.handshake_timeout = handshake_timeout
        self.context = trust.server_context(listener)
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    @property
    def bound_port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Accepted(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        log.info("%s listening on %s:%d (TLS)", self.listener.value, self.host, self.bound_port)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        await self.stop_accepting()
        for task in list(self._conn_tasks):
            task.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)

    def _spawn(self, transport: asyncio.Transport) -> None:
        task = asyncio.create_task(self._serve(transport))
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    async def _serve(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername") or ("?", 0)
        address = str(peername[0])
        peer = f"{address}:{peername[1]}"
        lname = self.listener.value
        if not self.limiter.try_acquire():
            self.metrics.refused.inc(lname, "max_connections")
            log.warning(
                "refusing %s on %s: max_connections=%d reached", peer, lname, self.limiter.limit
            )
            transport.abort()
            return
        try:
            if not self.rate.allow(address, time.monotonic()):
                self.metrics.refused.inc(lname, "handshake_rate")
                log.warning("refusing %s on %s: handshake rate limit for this address", peer, lname)
                transport.abort()
                return
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=READ_LIMIT)
            protocol = _TlsStreamProtocol(reader)
            try:
                tls_transport = await asyncio.wait_for(
                    loop.start_tls(
                        transport,
                        protocol,
                        self.context,
                        server_side=True,
                        ssl_handshake_timeout=self.handshake_timeout,
                    ),
                    timeout=self.handshake_timeout + 1,
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                reason = _verify_failure_reason(exc)
                self.metrics.handshakes.inc(lname, "rejected", reason)
                log.info(
                    "handshake failed listener=%s peer=%s reason=%s (%s)",
                    lname,
                    peer,
                    reason,
                    exc.__class__.__name__,
                )
                transport.abort()
                return
            if tls_transport is None:  # pragma: no cover - start_tls contract
                transport.abort()
                return
            writer = asyncio.StreamWriter(tls_transport, protocol, reader, loop)
            ssl_object = writer.get_extra_info("ssl_object")
            chain = peer_chain_der(ssl_object) if ssl_object is not None else None
            if ssl_object is not None and ssl_object.session_reused:
                decision = self.trust.decide_resumed(chain[0] if chain else None, self.listener)
            else:
                decision = self.trust.decide_der(chain, self.listener)
            self.metrics.handshake_seconds.observe(time.perf_counter() - started, lname)
            if isinstance(decision, DeviceIdentity):
                self.metrics.handshakes.inc(lname, "accepted", "ok")
            else:
                self.metrics.handshakes.inc(lname, "rejected", decision.reason.value)
            conn = TlsConnection(reader, writer, peer, self.listener, decision, chain)
            try:
                await self.handler(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handler crashed for %s on %s", peer, lname)
            finally:
                if not writer.is_closing():
                    tls_transport.abort()
        finally:
            self.limiter.release()
