"""The protocol driver interface of ``fleet run``.

A *driver* opens one device session over TLS with the device's own
certificate and sends application messages on it. ``fleet run`` does the rest
(arrival pacing, keep-alive loop, reconnect storms, statistics), so a new
protocol only has to provide:

* a class with ``__init__(self, options: DriverOptions)`` and
  ``async def connect(self, device: Device) -> DeviceSession`` that raises
  :class:`ConnectFailure` (with a stable ``reason``) when the gateway refuses
  the device or the connection fails;
* a session object satisfying :class:`DeviceSession`;
* one line in :data:`DRIVERS` (``"name": "module:Class"``, imported lazily in
  the worker processes).

Failure reasons are ``category:detail`` labels; the category (before the
colon) groups them in reports: ``tls`` (handshake or TLS alert, e.g.
``tls:tlsv1_alert_unknown_ca``), ``connack`` (MQTT refusal code, e.g.
``connack:5``), ``http`` (status, for an HTTPS driver), ``timeout``,
``reset``, ``closed`` (clean close before an answer), ``refused`` (TCP).
"""

from __future__ import annotations

import errno
import importlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = [
    "DRIVERS",
    "ConnectFailure",
    "ConnectTimings",
    "Device",
    "DeviceSession",
    "Driver",
    "DriverOptions",
    "classify",
    "client_context",
    "load_driver",
]


@dataclass(frozen=True, slots=True)
class Device:
    """One simulated device of the manifest."""

    device_id: str
    """The certificate's CN (the device id at the gateway)."""
    cert: Path
    """Chain file, leaf first."""
    key: Path
    """Private key (PEM)."""
    bad: bool = False
    """Signed by an untrusted CA: the gateway must reject it."""


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """What every driver is told about the target (from ``fleet run`` options)."""

    host: str = "127.0.0.1"
    """Gateway address (loopback by default)."""
    port: int = 8883
    """Gateway port of the protocol's listener."""
    cafile: Path | None = None
    """CA of the gateway's server certificate; None skips server verification."""
    server_name: str | None = None
    """Name to verify the server certificate against (default: ``host``)."""
    tenant: str | None = None
    """Tenant id (the MQTT service listener's username)."""
    qos: int = 0
    """MQTT QoS of published messages (0 or 1)."""
    connect_timeout: float = 10.0
    """Seconds for TCP connect + TLS handshake + the protocol's accept."""
    keepalive: int = 60
    """Protocol keep-alive in seconds (MQTT CONNECT keep-alive)."""
    topic: str = "fleet/{device}/telemetry"
    """Where messages go; ``{device}`` is replaced by the device id."""
    payload_size: int = 64
    """Bytes per message."""
    extra: dict[str, str] = field(default_factory=dict)
    """Protocol-specific settings of future drivers."""


@dataclass(frozen=True, slots=True)
class ConnectTimings:
    """Seconds spent in each phase of one successful connect."""

    tcp: float
    """TCP connect."""
    tls: float
    """TLS handshake (client side: until the client's Finished is sent)."""
    accept: float
    """From the first protocol request to the gateway's positive answer (CONNACK)."""


class ConnectFailure(Exception):
    """A connect attempt failed; ``reason`` is a stable ``category:detail`` label."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]


class DeviceSession(Protocol):
    """A live device connection as ``fleet run`` drives it."""

    timings: ConnectTimings

    @property
    def failure(self) -> str | None:
        """None while the connection is up, else the reason it ended."""
        ...

    @property
    def acked(self) -> int:
        """Messages the gateway acknowledged so far (QoS 1)."""
        ...

    def take_ack_latencies(self) -> list[float]:
        """Acknowledgement latencies (seconds) gathered since the last call."""
        ...

    async def send(self, seq: int) -> None:
        """Send one application message."""
        ...

    async def keepalive(self) -> None:
        """Keep an idle session alive (e.g. MQTT PINGREQ)."""
        ...

    async def close(self) -> None:
        """End the session politely (e.g. MQTT DISCONNECT), never raising."""
        ...

    def abort(self) -> None:
        """Drop the connection at once (reconnect storms)."""
        ...


class Driver(Protocol):
    """Opens sessions for one protocol (constructed with a :class:`DriverOptions`)."""

    async def connect(self, device: Device) -> DeviceSession:
        """Connect ``device``; raise :class:`ConnectFailure` when that fails."""
        ...


DRIVERS: dict[str, str] = {
    "mqtt": "gateway.fleet.mqtt_client:CoreDriver",
    "mqtt-service": "gateway.fleet.mqtt_client:ServiceDriver",
    # "https": "gateway.fleet.https_client:HttpsDriver",   (issue 5)
    # "lwm2m": "gateway.fleet.lwm2m_client:Lwm2mDriver",   (issue 7)
}
"""Protocol name → ``module:Class`` of its driver."""


def load_driver(name: str, options: DriverOptions) -> Driver:
    """Import and instantiate the driver registered as ``name``."""
    try:
        target = DRIVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown protocol {name!r} (available: {', '.join(sorted(DRIVERS))})"
        ) from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    driver: Driver = cls(options)
    return driver


def client_context(device: Device, options: DriverOptions) -> ssl.SSLContext:
    """A TLS client context presenting the device's chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if options.cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(options.cafile))
    ctx.load_cert_chain(str(device.cert), str(device.key))
    return ctx


def classify(exc: BaseException) -> str:
    """A stable failure label for an exception raised while connecting or reading."""
    if isinstance(exc, ConnectFailure):
        return exc.reason
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls:server_certificate"
    if isinstance(exc, ssl.SSLError):
        detail = (exc.reason or exc.__class__.__name__).lower()
        return f"tls:{detail}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, EOFError):
        return "closed"
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        return f"os:{name.lower()}" if name else "os:error"
    return f"error:{exc.__class__.__name__}"
