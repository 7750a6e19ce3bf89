"""``mtls-gateway run``: the daemon.

Signals: ``SIGHUP`` re-reads the configuration file and the server
certificate/key (established sessions keep running; settings that only
change on restart are named in a log line); ``SIGTERM``/``SIGINT`` stop
accepting, close sessions within ``lifecycle.shutdown_grace``, close the store
and exit 0. The server certificate's expiry is checked at start, on SIGHUP and
daily.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.admin import ServerCertificate
from gateway.app import Gateway
from gateway.config import Config, ConfigError, load_config, masked
from gateway.logs import setup_logging
from gateway.store.base import StoreError

log = logging.getLogger("mtls_gateway")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="start the gateway daemon",
        description="Start the gateway. On first start with the default data directory a "
        "demo tenant and PKI are created (see `mtls-gateway init`).",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--data-dir", type=Path, help="data directory (default ./var)")
    p.add_argument("--store", help="store URL (sqlite:///path.db or redis://host:port/db)")
    p.add_argument(
        "--no-demo", action="store_true", help="do not create the demo PKI on first start"
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    def load() -> Config:
        return load_config(args.config, data_dir=args.data_dir, store_url=args.store)

    try:
        config = load()
    except ConfigError as exc:
        print(f"mtls-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format)
    _install_loop(config)
    try:
        return asyncio.run(_serve(config, demo=not args.no_demo, load=load))
    except KeyboardInterrupt:
        return 0


def _install_loop(config: Config) -> None:
    if config.event_loop == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if config.event_loop == "uvloop":
            raise SystemExit("event_loop = uvloop but uvloop is not installed") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, *, demo: bool, load: Callable[[], Config]) -> int:
    from gateway.store import open_store

    stop = asyncio.Event()
    daemon: _Daemon | None = None
    loop = asyncio.get_running_loop()
    # Installed first: SIGHUP's default action would kill a daemon still starting.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: daemon.request_reload() if daemon else log.warning("SIGHUP ignored: starting"),
    )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(config.store_url)
    try:
        await store.open()
    except StoreError as exc:
        log.error("cannot open the store: %s", exc)
        return 1
    try:
        if demo and not config.server_cert_path.exists():
            from gateway.demo import ensure_demo

            await ensure_demo(config.data_dir, store, datetime.now(UTC))
            log.info("demo PKI ready in %s", config.data_dir / "demo")
        for path in (config.server_cert_path, config.server_key_path):
            if not path.exists():
                # exit 2: a configuration problem that a restart will not fix
                log.error(
                    "%s not found: set tls.server_cert and tls.server_key, or run "
                    "`mtls-gateway init` for a demo PKI",
                    path,
                )
                return 2
        gateway = Gateway(config, store=store)
        try:
            await gateway.start()
        except OSError as exc:  # typically a port in use
            log.error("cannot start: %s", exc)
            await gateway.stop(0)
            return 1
        daemon = _Daemon(gateway, load)
        ports = [f"{n}={gateway.port(n)}" for n in (*gateway.listeners, *gateway.http)]
        ports += [f"{n}={gateway.udp_port(n)}" for n in gateway.udp_listeners]
        if gateway.admin is not None:
            ports.append(f"admin={gateway.admin.bound_port}")
        log.info("mtls-gateway ready (%s); store %s", ", ".join(ports), masked(config)["store"])
        daemon.start()
        await stop.wait()
        grace = gateway.config.lifecycle.shutdown_grace
        log.info("stopping: no new connections, closing sessions (grace %.1fs)", grace)
        await daemon.stop()
        await gateway.stop()
    finally:
        await store.close()
    return 0


RELOADED_ON_SIGHUP = ("tls.server_cert", "tls.server_key", "logging.*", "lifecycle.*")
"""Settings SIGHUP applies (documented in docs/configuration.md); the rest need a restart."""


def _applicable(running: Config, new: Config) -> Config:
    """``running`` with the settings of ``new`` that SIGHUP applies."""
    return replace(
        running,
        tls=replace(running.tls, server_cert=new.tls.server_cert, server_key=new.tls.server_key),
        logging=new.logging,
        lifecycle=new.lifecycle,
    )


def changed_keys(a: Config, b: Config) -> list[str]:
    """Dotted names of the settings that differ (names only: values may be secrets)."""
    flat_a, flat_b = _flatten(asdict(a)), _flatten(asdict(b))
    flat_a.pop("source", None)
    flat_b.pop("source", None)
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


EXPIRY_CHECK_INTERVAL = 24 * 3600.0
"""Seconds between server-certificate expiry checks (daily)."""


def check_server_certificate(cert: ServerCertificate | None, warn_days: int, now: datetime) -> None:
    """Log a warning when the served certificate expires within ``warn_days`` (0: never)."""
    if cert is None or warn_days <= 0:
        return
    left = cert.days_left(now)
    if left <= 0:
        log.error(
            "server certificate %s (%s) expired on %s: replace it and send SIGHUP",
            cert.path,
            cert.subject,
            cert.not_after.isoformat(),
        )
    elif left <= warn_days:
        log.warning(
            "server certificate %s (%s) expires in %d days, on %s: replace it and send SIGHUP",
            cert.path,
            cert.subject,
            round(left),
            cert.not_after.isoformat(),
        )


class _Daemon:
    """SIGHUP reloads and the daily expiry check of one running gateway."""

    def __init__(self, gateway: Gateway, load: Callable[[], Config]) -> None:
        self.gateway = gateway
        self.load = load
        self._reload: asyncio.Task[None] | None = None
        self._again = False
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_expiry(), name="cert-expiry")

    async def stop(self) -> None:
        for task in (self._watch, self._reload):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def request_reload(self) -> None:
        if not self.gateway.ready:
            log.warning("SIGHUP ignored: the gateway is stopping")
            return
        if self._reload is not None and not self._reload.done():
            self._again = True  # signals arriving during a reload coalesce into one more
            return
        self._reload = asyncio.create_task(self._reload_until_settled(), name="sighup")

    async def _reload_until_settled(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            try:
                await self.reload()
            except Exception:
                log.exception("SIGHUP: reload failed; the running configuration is unchanged")

    async def reload(self) -> None:
        """Re-read the configuration and the server certificate (what SIGHUP does)."""
        gw = self.gateway
        running = gw.config
        try:
            new = self.load()
        except ConfigError as exc:
            # still reload the certificate: rotating it must not depend on the file
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            new = None
        applied = running if new is None else _applicable(running, new)
        later = [] if new is None else changed_keys(applied, new)
        if later:
            log.warning(
                "SIGHUP: changed settings that take effect only after a restart: %s",
                ", ".join(later),
            )
        if applied.logging != running.logging:
            setup_logging(applied.logging.level, applied.logging.format)
        gw.config = applied
        try:
            cert = gw.reload_server_certificate()
        except Exception as exc:  # ssl.SSLError, OSError, pyOpenSSL's SSL.Error (DTLS)
            gw.config = replace(applied, tls=running.tls)
            log.error(
                "SIGHUP: server certificate %s / key %s not loaded (%s); still serving the "
                "previous one",
                applied.server_cert_path,
                applied.server_key_path,
                exc,
            )
        else:
            log.info(
                "SIGHUP: server certificate reloaded: %s sha256=%s, valid until %s",
                cert.subject if cert else applied.server_cert_path,
                cert.sha256 if cert else "?",
                cert.not_after.isoformat() if cert else "?",
            )
            check_server_certificate(
                cert, applied.lifecycle.cert_expiry_warning_days, datetime.now(UTC)
            )
        if new is not None:
            log.info(
                "SIGHUP: configuration reloaded from %s (applied: %s)",
                new.source,
                ", ".join(changed_keys(running, gw.config)) or "no changes",
            )

    async def _watch_expiry(self) -> None:
        while True:
            cfg = self.gateway.config
            check_server_certificate(
                self.gateway.server_certificate,
                cfg.lifecycle.cert_expiry_warning_days,
                datetime.now(UTC),
            )
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL)
