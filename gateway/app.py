"""The gateway process: wires the store, trust state, session registry,
listeners and front-ends together, and runs until told to stop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gateway.admin import AdminServer, ServerCertificate, read_server_certificate
from gateway.admission import Admission
from gateway.config import Config
from gateway.http.server import HttpContext, HttpServer, start_http_servers
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.store import open_store
from gateway.store.base import Store
from gateway.tls import ConnectionLimiter, HandshakeRateLimiter, TlsListener
from gateway.trust_state import TrustState
from protocols.mqtt.backend import Backend
from protocols.mqtt.backends import make_backend
from protocols.mqtt.server import MqttServer
from trust.model import Change, Listener
from trust.policy import DecisionPolicy
from trust.snapshot import TrustSnapshot
from trust.verify import VerifyPolicy

log = logging.getLogger("mtls_gateway")


@dataclass
class Gateway:
    """A running gateway. ``await start()``, then ``await stop()``."""

    config: Config
    store: Store | None = None
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    registry: SessionRegistry = field(default_factory=SessionRegistry)
    trust: TrustState | None = None
    backend: Backend | None = None
    listeners: dict[str, TlsListener] = field(default_factory=dict)
    admin: AdminServer | None = None
    ready: bool = False
    """True from the end of ``start()`` (listeners bound, snapshot loaded) until ``stop()``."""
    server_certificate: ServerCertificate | None = None
    http: dict[str, HttpServer] = field(default_factory=dict)
    """The HTTPS listener (and the optional plain management listener), by name."""
    http_context: HttpContext | None = None
    _owns_store: bool = False

    async def start(self) -> None:
        cfg = self.config
        if self.store is None:
            self.store = open_store(cfg.store_url)
            await self.store.open()
            self._owns_store = True
        await self._start_admin()
        policy = DecisionPolicy(
            verify=VerifyPolicy(max_chain_length=cfg.trust.max_chain_length),
            require_anchor_in_chain=cfg.trust.require_anchor_in_chain,
        )
        self.trust = TrustState(
            self.store,
            policy,
            server_cert=cfg.server_cert_path,
            server_key=cfg.server_key_path,
            refresh_interval=cfg.trust.refresh_interval,
            cache_size=cfg.trust.decision_cache_size,
            session_tickets=cfg.tls.session_tickets,
            min_tls=cfg.tls.min_version,
            outage_grace=cfg.trust.store_outage_grace,
        )
        await self.trust.start()
        self.trust.on_change(self._on_trust_change)
        self.server_certificate = _describe_server_certificate(cfg.server_cert_path)

        self.backend = make_backend(
            cfg.mqtt.backend,
            host=cfg.mqtt.upstream_host,
            port=cfg.mqtt.upstream_port,
            connect_timeout=cfg.mqtt.connect_timeout,
        )
        await self.backend.start()
        admission = Admission(self.store, self.metrics)
        limiter = ConnectionLimiter(cfg.limits.max_connections)
        rate = HandshakeRateLimiter(cfg.limits.handshake_rate, cfg.limits.handshake_burst)
        mqtt = MqttServer(
            self.backend,
            admission,
            self.registry,
            self.metrics,
            max_packet_size=cfg.limits.max_packet_size,
            connect_timeout=cfg.limits.handshake_timeout,
            backend_timeout=cfg.mqtt.connect_timeout,
            upstream_username=cfg.mqtt.upstream_username,
            upstream_password=cfg.mqtt.upstream_password,
        )
        for name, kind in (("mqtt", Listener.MQTT_CORE), ("mqtt_service", Listener.MQTT_SERVICE)):
            lc = getattr(cfg.listeners, name)
            if not lc.enabled:
                continue
            listener = TlsListener(
                kind,
                lc.host,
                lc.port,
                self.trust,
                mqtt.handle,
                metrics=self.metrics,
                limiter=limiter,
                rate=rate,
                handshake_timeout=cfg.limits.handshake_timeout,
            )
            await listener.start()
            self.listeners[name] = listener
        await self._start_https()
        self.ready = True

    async def _on_trust_change(self, snap: TrustSnapshot, changes: list[Change]) -> None:
        for session, reason, message in self.registry.affected(snap, changes):
            self.metrics.sessions_closed.inc(reason.value)
            self.registry.kill(session, reason.value, message)

    def port(self, name: str) -> int:
        """The bound port of a listener (useful when configured with port 0)."""
        if name in self.http:
            return self.http[name].bound_port
        return self.listeners[name].bound_port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, close sessions (MQTT 5: DISCONNECT 0x8B) for up to ``grace``
        seconds (default ``lifecycle.shutdown_grace``), then cut what is left."""
        self.ready = False
        if grace is None:
            grace = self.config.lifecycle.shutdown_grace
        for listener in self.listeners.values():
            await listener.stop_accepting()
        for server in self.http.values():
            await server.stop()
        try:
            if len(self.registry):
                await asyncio.wait_for(
                    self.registry.close_all("shutdown", "gateway shutting down"), grace
                )
        except TimeoutError:
            log.warning(
                "%d sessions still open after %.1fs: closing them", len(self.registry), grace
            )
        for listener in self.listeners.values():
            await listener.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.trust is not None:
            await self.trust.stop()
        if self.store is not None and self._owns_store:
            await self.store.close()
        log.info("gateway stopped")

    # HTTPS listener: management API (issue 4) and device routes ------------------
    async def _start_https(self) -> None:
        assert self.store is not None and self.trust is not None
        self.http_context, self.http = await start_http_servers(
            self.store, self.trust, self.registry, self.metrics, self.config
        )

    # admin listener and server certificate (issue 10) ---------------------------
    async def _start_admin(self) -> None:
        # Started before the listeners so /healthz and /readyz answer during start-up.
        lc = self.config.listeners.admin
        if lc.enabled:
            self.admin = AdminServer(self, lc.host, lc.port)
            await self.admin.start()

    def reload_server_certificate(self) -> ServerCertificate | None:
        """Serve the certificate now in the configured files to new connections;
        established sessions keep theirs. Raises (and changes nothing) when the
        files do not load."""
        assert self.trust is not None
        cfg = self.config
        self.trust.reload_server_certificate(cfg.server_cert_path, cfg.server_key_path)
        self.server_certificate = _describe_server_certificate(cfg.server_cert_path)
        return self.server_certificate


def _describe_server_certificate(path: Path) -> ServerCertificate | None:
    try:
        return read_server_certificate(path)
    except (OSError, ValueError) as exc:
        # ssl loaded it, so this is only our description failing: do not stop for it
        log.warning("cannot describe the server certificate %s: %s", path, exc)
        return None
