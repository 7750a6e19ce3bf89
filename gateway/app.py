"""The gateway process: wires the store, trust state, session registry,
listeners and front-ends together, and runs until told to stop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from gateway.admission import Admission
from gateway.config import Config
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
    _owns_store: bool = False

    async def start(self) -> None:
        cfg = self.config
        if self.store is None:
            self.store = open_store(cfg.store_url)
            await self.store.open()
            self._owns_store = True
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
        )
        await self.trust.start()
        self.trust.on_change(self._on_trust_change)

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

    async def _on_trust_change(self, snap: TrustSnapshot, changes: list[Change]) -> None:
        for session, reason, message in self.registry.affected(snap, changes):
            self.metrics.sessions_closed.inc(reason.value)
            self.registry.kill(session, reason.value, message)

    def port(self, name: str) -> int:
        """The bound port of a listener (useful when configured with port 0)."""
        return self.listeners[name].bound_port

    async def stop(self, grace: float = 5.0) -> None:
        for listener in self.listeners.values():
            await listener.stop_accepting()
        await asyncio.wait_for(self.registry.close_all("shutdown", "gateway shutting down"), grace)
        for listener in self.listeners.values():
            await listener.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.trust is not None:
            await self.trust.stop()
        if self.store is not None and self._owns_store:
            await self.store.close()
        log.info("gateway stopped")
