"""The gateway process: wires the store, trust state, session registry,
listeners and front-ends together, and runs until told to stop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from gateway.admin import AdminServer, ServerCertificate, read_server_certificate
from gateway.admission import Admission
from gateway.ca_service import CaAutoRenewal, ca_service_for
from gateway.config import Config, ConfigError, MqttConfig
from gateway.crl_fetcher import STATUS_FILE, CrlFetcher
from gateway.device_tokens import DeviceTokens
from gateway.dtls import DtlsListener, DtlsServer, DtlsSettings, DtlsTrust
from gateway.http.device import DEVICE_SERVICES, DeviceServices
from gateway.http.lwm2m import LWM2M_SERVICE
from gateway.http.server import HttpContext, HttpServer, start_http_servers
from gateway.metrics import GatewayMetrics
from gateway.secrets import SecretBox
from gateway.sessions import SessionRegistry
from gateway.store import open_store
from gateway.store.base import Store
from gateway.tls import ConnectionLimiter, HandshakeRateLimiter, TlsListener
from gateway.trust_state import TrustState
from protocols.lwm2m.server import Lwm2mServer
from protocols.mqtt.backend import Backend
from protocols.mqtt.backends import make_backend
from protocols.mqtt.server import MqttServer
from trust.certs import CertificateError, load_certificates
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
    lwm2m: Lwm2mServer | None = None
    """The LWM2M front-end and device-management API (None when disabled)."""
    udp_listeners: dict[str, DtlsListener] = field(default_factory=dict)
    crl: CrlFetcher | None = None
    """Online revocation: CRL downloads and the online check (``crl.status()``)."""
    ca_renewal: CaAutoRenewal | None = None
    """The yearly tenant-CA auto-renewal task (issue 6)."""
    tokens: DeviceTokens | None = None
    """Device access tokens (issue 5; None when ``tokens.enabled`` is off)."""
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
        await self._start_crl()
        self.server_certificate = _describe_server_certificate(cfg.server_cert_path)

        self.backend = make_backend(
            cfg.mqtt.backend,
            host=cfg.mqtt.upstream_host,
            port=cfg.mqtt.upstream_port,
            connect_timeout=cfg.mqtt.connect_timeout,
            tls=upstream_tls_context(cfg.mqtt),
            server_name=cfg.mqtt.upstream_server_name or None,
        )
        await self.backend.start()
        admission = Admission(self.store, self.metrics)
        await self._start_tokens()
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
            issue_token=self.tokens.mqtt_answer if self.tokens is not None else None,
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
                mqtt.protocol,
                metrics=self.metrics,
                limiter=limiter,
                rate=rate,
                handshake_timeout=cfg.limits.handshake_timeout,
            )
            await listener.start()
            self.listeners[name] = listener
        if cfg.listeners.lwm2m.enabled:
            await self._start_lwm2m(admission)
        await self._start_https(admission)
        await self._start_ca_renewal()
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

    def udp_port(self, name: str) -> int:
        """The bound port of a UDP listener (``lwm2m``)."""
        return self.udp_listeners[name].bound_port

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
        if self.ca_renewal is not None:
            await self.ca_renewal.stop()
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
        await self._stop_lwm2m()
        if self.admin is not None:
            await self.admin.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.crl is not None:
            await self.crl.stop()
        if self.trust is not None:
            await self.trust.stop()
        if self.store is not None and self._owns_store:
            await self.store.close()
        log.info("gateway stopped")

    # HTTPS listener: management API (issue 4) and device routes ------------------
    async def _start_https(self, admission: Admission) -> None:
        assert self.store is not None and self.trust is not None
        # device routes share the MQTT backend (the embedded broker is in-process)
        services = DeviceServices(admission, self.backend, self.tokens)
        self.http_context, self.http = await start_http_servers(
            self.store,
            self.trust,
            self.registry,
            self.metrics,
            self.config,
            extra={DEVICE_SERVICES: services, LWM2M_SERVICE: self.lwm2m},
        )

    # device access tokens (issue 5) ----------------------------------------------
    async def _start_tokens(self) -> None:
        assert self.store is not None and self.trust is not None
        if self.config.tokens.enabled:
            box = await asyncio.to_thread(SecretBox.load_or_create, self.config.data_dir)
            self.tokens = DeviceTokens(self.store, box, self.trust, self.config.tokens)

    # tenant CA auto-renewal (issue 6) -------------------------------------------
    async def _start_ca_renewal(self) -> None:
        assert self.http_context is not None
        service = ca_service_for(self.http_context)
        self.ca_renewal = CaAutoRenewal(service, self.config.ca.auto_renew)
        await self.ca_renewal.start()

    # LWM2M over CoAP/DTLS (issue 7) --------------------------------------------
    async def _start_lwm2m(self, admission: Admission) -> None:
        assert self.trust is not None
        cfg, lw = self.config, self.config.lwm2m
        trust = DtlsTrust(
            self.trust,
            _lwm2m_intermediates(self.config),
            max_chain_length=cfg.trust.max_chain_length,
        )
        loop = asyncio.get_running_loop()
        server = DtlsServer(
            DtlsSettings(
                mtu=lw.mtu,
                max_datagram=lw.max_datagram,
                max_sessions=lw.max_sessions,
                max_handshakes=lw.max_handshakes,
                handshake_timeout=lw.handshake_timeout,
                idle_timeout=lw.idle_timeout,
                max_chain_length=cfg.trust.max_chain_length,
            ),
            cert_file=cfg.server_cert_path,
            key_file=cfg.server_key_path,
            decide=trust.decide,
            metrics=self.metrics,
            now=loop.time(),
            verify_certificates=trust.verify_certificates(),
        )
        trust.server = server
        self.trust.on_change(trust.on_change)
        lc = cfg.listeners.lwm2m
        listener = DtlsListener(server, lc.host, lc.port)
        self.lwm2m = Lwm2mServer(
            listener,
            self.registry,
            admission,
            self.metrics,
            request_timeout=lw.request_timeout,
            max_registrations=lw.max_registrations,
        )
        await self.lwm2m.start()
        await listener.start()
        self.udp_listeners["lwm2m"] = listener

    async def _stop_lwm2m(self) -> None:
        if self.lwm2m is not None:
            await self.lwm2m.stop()
        for udp in self.udp_listeners.values():
            await udp.stop()

    # online revocation from CRL distribution points (issue 8) -------------------
    async def _start_crl(self) -> None:
        # Before the listeners: the first decisions already consult the online check.
        assert self.trust is not None
        self.crl = CrlFetcher.from_config(
            self.config.crl,
            trust=self.trust,
            registry=self.registry,
            metrics=self.metrics,
            status_path=self.config.data_dir / STATUS_FILE,
        )
        await self.crl.start()

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
        for udp in self.udp_listeners.values():
            udp.server.set_server_certificate(cfg.server_cert_path, cfg.server_key_path)
        self.server_certificate = _describe_server_certificate(cfg.server_cert_path)
        return self.server_certificate


def _lwm2m_intermediates(cfg: Config) -> list[x509.Certificate]:
    """``lwm2m.intermediates``, else the demo intermediate when it exists."""
    path = Path(cfg.lwm2m.intermediates) if cfg.lwm2m.intermediates else None
    if path is None:
        demo = cfg.data_dir / "demo" / "intermediate-ca.pem"
        if not demo.exists():
            return []
        path = demo
    try:
        return load_certificates(path.read_bytes())
    except (OSError, CertificateError) as exc:
        raise ValueError(f"lwm2m.intermediates: cannot load {path}: {exc}") from None


def _describe_server_certificate(path: Path) -> ServerCertificate | None:
    try:
        return read_server_certificate(path)
    except (OSError, ValueError) as exc:
        # ssl loaded it, so this is only our description failing: do not stop for it
        log.warning("cannot describe the server certificate %s: %s", path, exc)
        return None


def upstream_tls_context(mq: MqttConfig) -> ssl.SSLContext | None:
    """The client context for TLS to the upstream broker (``None``: plain TCP).

    The broker's certificate is always verified, name included: a gateway that
    authenticates devices must not hand their sessions to an impostor.
    """
    if not mq.upstream_tls or mq.backend != "upstream":
        return None
    try:
        ctx = ssl.create_default_context(cafile=mq.upstream_ca_file or None)
        if mq.upstream_cert_file:
            ctx.load_cert_chain(mq.upstream_cert_file, mq.upstream_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.upstream TLS files: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
