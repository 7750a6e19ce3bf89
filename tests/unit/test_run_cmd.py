"""The daemon's SIGHUP bookkeeping and certificate-expiry warnings (pure parts)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatch

import pytest

from gateway.admin import ServerCertificate
from gateway.cli.run_cmd import (
    RELOADED_ON_SIGHUP,
    _applicable,
    changed_keys,
    check_server_certificate,
)
from gateway.config import ListenerConfig, LoggingConfig, load_config

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_reload_applies_runtime_settings_and_names_the_rest() -> None:
    running = load_config(env={})
    new = replace(
        running,
        store="sqlite:///other.db",
        listeners=replace(running.listeners, mqtt=ListenerConfig(port=1884)),
        tls=replace(running.tls, server_cert="/new.pem", server_key="/new.key", min_version="1.3"),
        logging=LoggingConfig(level="DEBUG", format="json"),
        lifecycle=replace(running.lifecycle, shutdown_grace=1.0),
        mqtt=replace(running.mqtt, upstream_password="changed-secret"),
    )
    applied = _applicable(running, new)
    assert changed_keys(running, applied) == [
        "lifecycle.shutdown_grace",
        "logging.format",
        "logging.level",
        "tls.server_cert",
        "tls.server_key",
    ]
    assert all(
        any(fnmatch(key, pattern) for pattern in RELOADED_ON_SIGHUP)
        for key in changed_keys(running, applied)
    )
    later = changed_keys(applied, new)
    assert later == ["listeners.mqtt.port", "mqtt.upstream_password", "store", "tls.min_version"]
    assert "changed-secret" not in repr(later)
    assert changed_keys(running, running) == []


def _cert(days_left: float) -> ServerCertificate:
    return ServerCertificate(
        "/etc/gw/server.pem", "CN=gw", "ab" * 32, NOW + timedelta(days=days_left)
    )


@pytest.mark.parametrize(
    ("days_left", "warn_days", "level", "text"),
    [
        (400, 30, None, None),
        (12.2, 30, logging.WARNING, "expires in 12 days"),
        (-1, 30, logging.ERROR, "expired on"),
        (5, 0, None, None),
    ],
)
def test_expiry_warning(
    caplog: pytest.LogCaptureFixture,
    days_left: float,
    warn_days: int,
    level: int | None,
    text: str | None,
) -> None:
    caplog.set_level(logging.INFO, logger="mtls_gateway")
    check_server_certificate(_cert(days_left), warn_days, NOW)
    records = [r for r in caplog.records if r.name == "mtls_gateway"]
    if level is None:
        assert records == []
    else:
        assert [r.levelno for r in records] == [level]
        assert text is not None and text in records[0].getMessage()
        assert "send SIGHUP" in records[0].getMessage()
