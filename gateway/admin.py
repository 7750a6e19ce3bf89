"""The admin listener: plain HTTP for operators and monitoring.

- ``GET /metrics``: Prometheus text: the gateway's counters plus live sessions
  per listener and tenant, store health, readiness, build info and the server
  certificate's expiry (collected when scraped, never stale).
- ``GET /healthz``: 200 while the process and the store answer, else 503.
- ``GET /readyz``: 200 once the listeners are bound and the first trust
  snapshot is loaded (and until shutdown starts), else 503.
- ``GET /status``: JSON for ``mtls-gateway status``.

There is no authentication and nothing secret is served (store URLs are
masked): bind it to loopback, the default, or to a management network.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import platform
import re
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.config import masked
from gateway.store.base import StoreError
from gateway.store.sqlite import SqliteStore
from trust.certs import load_certificates

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("mtls_gateway.admin")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def gateway_version() -> str:
    """The installed distribution's version (``unknown`` when run from a bare tree)."""
    try:
        return metadata.version("mtls-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """What operators need to know about the served server certificate."""

    path: str
    subject: str
    sha256: str
    not_after: datetime

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "path": self.path,
            "subject": self.subject,
            "sha256": self.sha256,
            "notAfter": self.not_after.isoformat(),
            "daysLeft": round(self.days_left(now), 1),
        }


def read_server_certificate(path: Path) -> ServerCertificate:
    """The first certificate of a PEM chain file; raises ``OSError`` or ``ValueError``."""
    leaf = load_certificates(path.read_bytes())[0]
    return ServerCertificate(
        path=str(path),
        subject=leaf.subject.rfc4514_string(),
        sha256=hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest(),
        not_after=leaf.not_valid_after_utc,
    )


_URL_CREDENTIALS = re.compile(r"(://[^:/@\s]*):[^@\s]+@")


def _mask_credentials(text: str) -> str:
    """Store errors may quote a URL; its password must not reach a response."""
    return _URL_CREDENTIALS.sub(r"\1:********@", text)


class AdminServer:
    """The admin HTTP listener of one :class:`~gateway.app.Gateway`."""

    def __init__(
        self, gateway: Gateway, host: str, port: int, *, probe_timeout: float = 2.0
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self.probe_timeout = probe_timeout
        self.started_at = datetime.now(UTC)
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._store_file: tuple[int, int] | None = None
        self._register_metrics()

    @property
    def bound_port(self) -> int:
        """The port actually bound (the configured one may be 0)."""
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/readyz", self._handle_readyz)
        app.router.add_get("/status", self._handle_status)
        # no access log: a scrape every few seconds would drown the decision log
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            sock = await self._bind()
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(sock.getsockname()[1])
        self._store_file = self._sqlite_identity()
        log.info("admin listening on http://%s:%d", self.host, self._port)

    async def _bind(self) -> socket.socket:
        # Bind ourselves so that port 0 works and the bound port is known.
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:  # pragma: no cover - getaddrinfo raises instead
            raise OSError(f"cannot resolve admin host {self.host!r}")
        family, _, _, _, address = infos[0]
        return socket.create_server(address, family=family, backlog=128)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # probes ----------------------------------------------------------------
    async def probe_store(self) -> str | None:
        """None when the store answers, else why not (safe to show an operator)."""
        store = self.gateway.store
        if store is None:
            return "the store is not open"
        try:
            await asyncio.wait_for(store.ping(), self.probe_timeout)
        except TimeoutError:
            return f"the store did not answer within {self.probe_timeout:g}s"
        except StoreError as exc:
            return _mask_credentials(str(exc))
        except Exception as exc:  # a driver error the store did not translate
            return _mask_credentials(f"{exc.__class__.__name__}: {exc}")
        return self._sqlite_moved()

    def _sqlite_identity(self) -> tuple[int, int] | None:
        store = self.gateway.store
        if not isinstance(store, SqliteStore):
            return None
        try:
            st = os.stat(store.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _sqlite_moved(self) -> str | None:
        """SQLite keeps answering from a file that was deleted, moved or copied over
        while open; the CLI and other processes then use a different database, so
        this gateway would never see their changes. Report that as unhealthy."""
        store = self.gateway.store
        if self._store_file is None or not isinstance(store, SqliteStore):
            return None
        try:
            st = os.stat(store.path)
        except OSError:
            return f"store file {store.path} is gone (removed or moved while in use)"
        if (st.st_dev, st.st_ino) != self._store_file:
            return f"store file {store.path} was replaced while in use: restart the gateway"
        return None

    # metrics ---------------------------------------------------------------
    def _register_metrics(self) -> None:
        gw = self.gateway
        r = gw.metrics.registry

        def sessions() -> dict[tuple[str, ...], float]:
            return {k: float(n) for k, n in gw.registry.count_by().items()}

        def ready() -> dict[tuple[str, ...], float]:
            return {(): 1.0 if gw.ready else 0.0}

        def seq() -> dict[tuple[str, ...], float]:
            return {(): float(gw.trust.snapshot.seq) if gw.trust is not None else 0.0}

        def expiry() -> dict[tuple[str, ...], float]:
            cert = gw.server_certificate
            return {} if cert is None else {(): cert.not_after.timestamp()}

        r.gauge(
            "mtls_gateway_live_sessions",
            "Authenticated device sessions now open, by listener and tenant.",
            ("listener", "tenant"),
            collect=sessions,
        )
        self._store_up = r.gauge(
            "mtls_gateway_store_up", "1 if the store answered the last probe, else 0."
        )
        r.gauge("mtls_gateway_ready", "1 while the gateway accepts devices.", collect=ready)
        r.gauge(
            "mtls_gateway_trust_snapshot_seq",
            "Change-feed sequence number of the trust snapshot in use.",
            collect=seq,
        )
        r.gauge(
            "mtls_gateway_server_certificate_expiry_timestamp_seconds",
            "When the served server certificate expires (Unix time).",
            collect=expiry,
        )
        build = r.gauge(
            "mtls_gateway_build_info",
            "Always 1; the labels say what is running.",
            ("version", "python", "openssl"),
        )
        build.set(1, gateway_version(), platform.python_version(), ssl.OPENSSL_VERSION)

    # handlers --------------------------------------------------------------
    async def _handle_metrics(self, _request: web.Request) -> web.Response:
        problem = await self.probe_store()
        self._store_up.set(0 if problem else 1)
        return web.Response(
            body=self.gateway.metrics.registry.render().encode(),
            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE},
        )

    async def _handle_healthz(self, _request: web.Request) -> web.Response:
        problem = await self.probe_store()
        self._store_up.set(0 if problem else 1)
        if problem:
            return web.json_response({"status": "unavailable", "store": problem}, status=503)
        return web.json_response({"status": "ok"})

    async def _handle_readyz(self, _request: web.Request) -> web.Response:
        ready = self.gateway.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _handle_status(self, _request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def status(self) -> dict[str, Any]:
        """What ``mtls-gateway status`` prints (camelCase JSON like the REST API)."""
        gw = self.gateway
        now = datetime.now(UTC)
        problem = await self.probe_store()
        self._store_up.set(0 if problem else 1)
        listeners: list[dict[str, Any]] = [
            {"name": name, "protocol": lst.listener.value, "host": lst.host, "port": gw.port(name)}
            for name, lst in gw.listeners.items()
        ]
        for name, server in gw.http.items():
            lc = getattr(gw.config.listeners, name, None)
            host = lc.host if lc is not None else ""
            protocol = "https" if name == "https" else "http"
            listeners.append(
                {"name": name, "protocol": protocol, "host": host, "port": server.bound_port}
            )
        for name, udp in gw.udp_listeners.items():
            listeners.append(
                {"name": name, "protocol": f"{name}/udp", "host": udp.host, "port": udp.bound_port}
            )
        listeners.append(
            {"name": "admin", "protocol": "http", "host": self.host, "port": self._port}
        )
        counts = gw.registry.count_by()
        cert = gw.server_certificate
        snapshot = gw.trust.snapshot if gw.trust is not None else None
        return {
            "version": gateway_version(),
            "pid": os.getpid(),
            "startedAt": self.started_at.isoformat(),
            "uptimeSeconds": round(time.time() - self.started_at.timestamp(), 1),
            "ready": gw.ready,
            "store": {
                "url": masked(gw.config)["store"],
                "healthy": problem is None,
                "error": problem,
            },
            "trust": {
                "snapshotSeq": snapshot.seq if snapshot is not None else None,
                "tenants": len(snapshot.tenants) if snapshot is not None else 0,
            },
            "listeners": listeners,
            "sessions": {
                "total": sum(counts.values()),
                "byListener": [
                    {"listener": listener, "tenant": tenant, "sessions": n}
                    for (listener, tenant), n in sorted(counts.items())
                ],
            },
            "serverCertificate": cert.as_json(now) if cert is not None else None,
            # online revocation, read by `mtls-gateway crl status --admin URL`
            "crl": gw.crl.status(now) if gw.crl is not None else None,
        }
