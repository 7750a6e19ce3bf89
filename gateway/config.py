"""Configuration: one TOML file loaded into frozen dataclasses, validated at load.

Precedence: built-in defaults < TOML file < environment (``MTLS_GATEWAY_*``
for paths and secrets) < command-line options. Every field is documented in
``configs/gateway.toml``; an unknown key or a bad value is a
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

ENV_PREFIX = "MTLS_GATEWAY_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One TCP/UDP listener."""

    enabled: bool = True
    """Whether to open this listener at all."""
    host: str = "0.0.0.0"
    """Address to bind (``0.0.0.0`` all IPv4, ``::`` all IPv6, ``127.0.0.1`` loopback)."""
    port: int = 0
    """Port; 0 picks a free one (tests)."""


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    """The sockets the gateway opens (``[listeners.<name>]``)."""

    mqtt: ListenerConfig = ListenerConfig(port=8883)
    """Core MQTT: ClientId must equal the certificate CN; registration on first connect."""
    mqtt_service: ListenerConfig = ListenerConfig(port=9883)
    """MQTT service: username must equal the tenant id; no registration."""
    https: ListenerConfig = ListenerConfig(port=8443)
    """HTTPS device API, management API and EST."""
    lwm2m: ListenerConfig = ListenerConfig(port=5684)
    """LWM2M over CoAP/DTLS (UDP)."""
    admin: ListenerConfig = ListenerConfig(host="127.0.0.1", port=8081)
    """Plain-HTTP admin listener: /metrics, /healthz, /readyz, /status. Keep it on loopback."""
    management: ListenerConfig = ListenerConfig(enabled=False, host="127.0.0.1", port=8444)
    """Optional plain-HTTP listener serving only the management API (Basic credentials
    travel unencrypted, so its host must be a loopback address). Off by default."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The gateway's own TLS server identity and protocol settings (``[tls]``)."""

    server_cert: str = ""
    """Server certificate chain (PEM). Empty: ``<data_dir>/demo/server.pem``."""
    server_key: str = ""
    """Server private key (PEM). Empty: ``<data_dir>/demo/server.key``."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted."""
    session_tickets: bool = False
    """Issue TLS session tickets (resumption). Off by default: tickets cost ~30% of a
    full handshake even when nobody resumes, and a resumed session carries no chain,
    so its identity comes from the decision cached for that certificate."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds that protect the gateway from slow, greedy or hostile peers (``[limits]``)."""

    handshake_timeout: float = 10.0
    """Seconds a peer has to complete the TLS handshake (and MQTT CONNECT)."""
    max_connections: int = 10000
    """Live connections across TCP listeners; more are refused at accept."""
    handshake_rate: float = 50.0
    """New handshakes per second allowed per source address (token bucket)."""
    handshake_burst: int = 100
    """Bucket size of the per-address handshake rate limit."""
    max_packet_size: int = 256 * 1024
    """Largest MQTT packet accepted from a device, in bytes."""


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """Chain policy and the in-memory trust snapshot (``[trust]``)."""

    max_chain_length: int = 10
    """Largest number of certificates in a verified chain, device and anchor included."""
    require_anchor_in_chain: bool = True
    """Spec rule: the presented chain must contain the trusted certificate (or, for a
    lone device certificate, its issuer must be trusted). False: RFC 5280 path
    building from any presented certificate's issuer."""
    refresh_interval: float = 0.2
    """Seconds between change-feed polls (changes take effect within about this)."""
    decision_cache_size: int = 100000
    """Chains whose decision is cached (invalidated on every trust change)."""
    store_outage_grace: float = 300.0
    """Seconds new handshakes are still decided from the last trust snapshot while the
    store is unreachable; after that they are refused (``store_unavailable``) until it
    returns, since the snapshot may miss revocations."""


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The MQTT broker behind the MQTT front-ends (``[mqtt]``)."""

    backend: Literal["embedded", "upstream"] = "embedded"
    """``embedded``: in-process amqtt broker (MQTT 3.1.1 only, for demos and small
    sites); ``upstream``: any MQTT broker over TCP (production, MQTT 5)."""
    upstream_host: str = "127.0.0.1"
    """Upstream broker address (backend = upstream)."""
    upstream_port: int = 1883
    """Upstream broker port (backend = upstream)."""
    upstream_username: str = ""
    """Optional credentials the gateway presents to the upstream broker."""
    upstream_password: str = ""
    """Secret: prefer the environment variable MTLS_GATEWAY_MQTT_UPSTREAM_PASSWORD."""
    upstream_tls: bool = False
    """Speak TLS to the upstream broker (verified against ``upstream_ca_file``, or the
    system's CAs, and ``upstream_server_name``). Recommended beyond one host; it also
    lets brokers that read a plain socket in small pieces (mosquitto) read whole
    records, which is faster for them."""
    upstream_ca_file: str = ""
    """PEM CA certificates that sign the upstream broker's certificate (empty: the
    system's trust store)."""
    upstream_server_name: str = ""
    """Name the upstream broker's certificate must carry (empty: ``upstream_host``)."""
    upstream_cert_file: str = ""
    """Optional PEM client certificate (chain) the gateway presents to the upstream broker."""
    upstream_key_file: str = ""
    """Private key of ``upstream_cert_file`` (PEM, readable by the gateway only)."""
    connect_timeout: float = 10.0
    """Seconds to wait for the backend's CONNACK."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log output on stderr (``[logging]``); applied again on SIGHUP."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    format: Literal["console", "json"] = "console"
    """``console`` for people, ``json`` (one object per line) for log shippers."""


# lifecycle (issue 10) ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """Reload and shutdown of the daemon (``[lifecycle]``); applied again on SIGHUP."""

    shutdown_grace: float = 10.0
    """Seconds SIGTERM/SIGINT waits for live sessions to close (MQTT 5 clients get
    DISCONNECT 0x8B "server shutting down") before cutting the rest; then exit 0."""
    cert_expiry_warning_days: int = 30
    """Warn at start, on SIGHUP and daily when the server certificate expires within
    this many days; 0 turns the warning off."""


# lwm2m (issue 7) ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Lwm2mConfig:
    """DTLS and LWM2M settings of the UDP listener ``listeners.lwm2m`` (``[lwm2m]``)."""

    mtu: int = 1280
    """Largest UDP payload the gateway sends (bytes); DTLS handshake messages are
    fragmented and packed to fit, and CoAP messages must fit one record."""
    max_datagram: int = 4096
    """Incoming datagrams larger than this are dropped and counted."""
    max_sessions: int = 10000
    """DTLS sessions at once (open and half-open); more ClientHellos are refused."""
    max_handshakes: int = 1000
    """Half-open DTLS handshakes at once (cookie verified, not yet finished)."""
    handshake_timeout: float = 15.0
    """Seconds from a verified cookie to a finished DTLS handshake."""
    idle_timeout: float = 900.0
    """Seconds without a datagram before a DTLS session is closed; a registered
    device's session is kept at least for its registration lifetime."""
    request_timeout: float = 20.0
    """Seconds a server-initiated read/write/execute waits for the device."""
    max_registrations: int = 100000
    """Registered endpoints at once; more Registers get 5.03."""
    intermediates: str = ""
    """PEM file of intermediate CA certificates devices may omit (libcoap's
    coap-client sends only its leaf). Used to build chains, never as trust anchors.
    Empty: ``<data_dir>/demo/intermediate-ca.pem`` when that file exists."""


# online revocation (issue 8) ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class CrlConfig:
    """Online revocation from the certificates' CRL distribution points (``[crl]``).

    Used for tenants whose online CRL check is on (spec: off by default).
    """

    refresh_margin: float = 0.2
    """Refetch a CRL when this fraction of its remaining lifetime (until nextUpdate) is
    left: 0.2 refetches at 80 %. From 0 to below 1."""
    max_age: float = 3600.0
    """Seconds: refetch at least this often even when nextUpdate is further away."""
    fetch_timeout: float = 10.0
    """Seconds one download may take (connect and body)."""
    max_size: int = 10 * 1024 * 1024
    """Largest CRL accepted, in bytes (checked while downloading)."""
    missing_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    """Without a current CRL (never fetched, past nextUpdate, unusable): ``fail_closed``
    refuses the device (``crl_unavailable``), ``fail_open`` accepts it. Serials on a
    cached CRL are refused either way."""
    poll_interval: float = 1.0
    """Seconds between checks for due fetches (new distribution points are fetched at once)."""
    retry_min: float = 1.0
    """Seconds before the first retry of a failed fetch; doubles per failure ..."""
    retry_max: float = 300.0
    """... up to this many seconds. The last good CRL stays in use meanwhile."""
    max_distribution_points: int = 1000
    """Distribution points tracked at most; beyond it new ones count as unavailable."""
    allow_file_urls: bool = False
    """Also read ``file://`` distribution points from this machine (tests, CRLs synced
    by the operator). Only when every trusted CA is yours: a tenant's CA could
    otherwise make the gateway read local files."""


# tenant certificate authority and EST (issue 6) ---------------------------------
@dataclass(frozen=True, slots=True)
class CaConfig:
    """Tenant certificate authorities and EST enrollment (``[ca]``)."""

    organisation: str = "mtls-gateway"
    """``O=`` of every tenant CA subject (``CN=<tenantId>, O=<organisation>``), 1-64 chars."""
    key_type: Literal["ec", "rsa"] = "ec"
    """Key of new tenant CAs: ``ec`` (ECDSA P-256) or ``rsa`` (RSA 3072)."""
    feature_default: bool = True
    """Whether the certificate-authority feature is on for tenants that never set it."""
    auto_renew: str = "10-02 02:00"
    """Yearly auto-renewal moment, ``MM-DD HH:MM`` UTC (spec: 2 October 02:00); "" = off."""
    est_auth_failures: int = 20
    """Failed EST authentications per source address within ``est_auth_window`` before
    further attempts get 429."""
    est_auth_window: float = 60.0
    """Sliding window of the EST failure limit, in seconds."""


def parse_auto_renew(text: str) -> tuple[int, int, int, int] | None:
    """``"MM-DD HH:MM"`` → (month, day, hour, minute); "" → None (auto-renewal off)."""
    value = text.strip()
    if not value:
        return None
    try:
        date, time_ = value.split()
        month, day = (int(x) for x in date.split("-"))
        hour, minute = (int(x) for x in time_.split(":"))
    except ValueError:
        raise ConfigError(
            f"ca.auto_renew: expected MM-DD HH:MM (UTC) or an empty string, got {text!r}"
        ) from None
    # 2000 is a leap year: 29 February is accepted (it then runs in leap years only)
    if not (1 <= month <= 12 and 1 <= day <= _days_in_month(month)):
        raise ConfigError(f"ca.auto_renew: {month:02d}-{day:02d} is not a date")
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ConfigError(f"ca.auto_renew: {hour:02d}:{minute:02d} is not a time of day")
    return month, day, hour, minute


def _days_in_month(month: int) -> int:
    return (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[month - 1]


# device access tokens and the HTTPS device front-end (issue 5) ------------------
@dataclass(frozen=True, slots=True)
class TokenConfig:
    """Device access tokens (``[tokens]``): a device on the core MQTT listener publishes
    to ``s/uat`` and gets ``71,<token>`` on ``s/dat``; the token then authenticates it
    as ``Authorization: Bearer <token>`` on the HTTPS device routes."""

    enabled: bool = True
    """Answer ``s/uat`` and accept bearer tokens. Off: ``s/uat``/``s/dat`` are ordinary
    topics and device routes need a client certificate."""
    lifetime: float = 3600.0
    """Seconds a token is valid (never past the device certificate's notAfter)."""
    leeway: float = 30.0
    """Seconds of clock difference between gateway instances tolerated on nbf/exp."""


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """One upstream HTTP backend behind a path prefix (``[[http.proxy]]``)."""

    prefix: str = ""
    """Path prefix on the HTTPS listener, e.g. ``/backend`` (``/backend/x`` goes upstream)."""
    upstream: str = ""
    """Base URL, e.g. ``http://10.0.0.5:8080/api``: the rest of the path is appended."""
    connect_timeout: float = 5.0
    """Seconds to connect to the upstream; longer is 504."""
    read_timeout: float = 30.0
    """Seconds to wait for the upstream's response headers or its next body chunk."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTPS device front-end (``[http]``)."""

    proxy: tuple[ProxyRoute, ...] = ()
    """Upstream HTTP backends for authenticated devices, one ``[[http.proxy]]`` table each."""


PROXY_RESERVED_PREFIXES = (
    "/identity",
    "/topics",
    "/openapi.yaml",
    "/tenant",
    "/user",
    "/devicecontrol",
    "/audit",
    "/.well-known",
    "/certificate-authority",
    "/features",
)
"""First path segments of the gateway's own routes: no proxy prefix may use them."""
_PROXY_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+")


# -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    data_dir: Path = Path("var")
    """Where the SQLite store, the demo PKI and generated keys live."""
    store: str = ""
    """Store URL: ``sqlite:///path.db`` (default ``<data_dir>/gateway.db``) or ``redis://host:port/db``."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """``auto`` uses uvloop when installed: less CPU per handshake and message; HTTPS
    connections (the event loop's TLS) keep ~50 KB each instead of ~295 KB. MQTT
    connections use the gateway's own TLS layer (~40 KB per idle session) on either."""
    listeners: ListenersConfig = ListenersConfig()
    tls: TlsConfig = TlsConfig()
    limits: LimitsConfig = LimitsConfig()
    trust: TrustConfig = TrustConfig()
    mqtt: MqttConfig = MqttConfig()
    logging: LoggingConfig = LoggingConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    lwm2m: Lwm2mConfig = Lwm2mConfig()
    crl: CrlConfig = CrlConfig()
    ca: CaConfig = CaConfig()
    tokens: TokenConfig = TokenConfig()
    http: HttpConfig = HttpConfig()
    source: str = field(default="", compare=False)
    """Where the configuration came from (for messages)."""

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"

    @property
    def server_cert_path(self) -> Path:
        return (
            Path(self.tls.server_cert)
            if self.tls.server_cert
            else self.data_dir / "demo" / "server.pem"
        )

    @property
    def server_key_path(self) -> Path:
        return (
            Path(self.tls.server_key)
            if self.tls.server_key
            else self.data_dir / "demo" / "server.key"
        )


_ENV_FIELDS = {
    "DATA_DIR": ("data_dir",),
    "STORE": ("store",),
    "SERVER_CERT": ("tls", "server_cert"),
    "SERVER_KEY": ("tls", "server_key"),
    "MQTT_UPSTREAM_PASSWORD": ("mqtt", "upstream_password"),
    "LOG_LEVEL": ("logging", "level"),
    "LOG_FORMAT": ("logging", "format"),
}

SECRET_KEYS = {"upstream_password"}


def env_overrides() -> dict[str, str]:
    """Environment variable name → the dotted key it overrides (docs, ``config check``)."""
    return {ENV_PREFIX + suffix: ".".join(keys) for suffix, keys in _ENV_FIELDS.items()}


def load_config(
    path: Path | None = None,
    *,
    data_dir: Path | None = None,
    store_url: str | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """Load defaults ← TOML ``path`` ← environment ← explicit arguments, validated."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        source = str(path)
    environ = os.environ if env is None else env
    for suffix, keys in _ENV_FIELDS.items():
        value = environ.get(ENV_PREFIX + suffix)
        if value:
            node = raw
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
    config: Config = _build(Config, raw, "")
    if data_dir is not None:
        config = replace(config, data_dir=Path(data_dir))
    if store_url:
        config = replace(config, store=store_url)
    config = replace(config, source=source)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field and range checks; raises :class:`ConfigError`."""
    bound: dict[tuple[str, int], str] = {}
    for f in fields(config.listeners):
        lc: ListenerConfig = getattr(config.listeners, f.name)
        key = f"listeners.{f.name}"
        if not 0 <= lc.port <= 65535:
            raise ConfigError(f"{key}.port: {lc.port} is not a port number (0-65535)")
        if not lc.enabled:
            continue
        if not lc.host.strip():
            raise ConfigError(f"{key}.host: must not be empty (use 0.0.0.0, :: or an address)")
        if lc.port == 0:
            continue
        # Two enabled listeners of one transport on one port: the second bind would
        # fail at start with a less helpful OS error.
        transport = "udp" if f.name in _UDP_LISTENERS else "tcp"
        other = bound.get((transport, lc.port))
        if other is not None and _hosts_overlap(lc.host, getattr(config.listeners, other).host):
            raise ConfigError(f"{key}.port: {lc.port} is already used by listeners.{other}.port")
        bound[(transport, lc.port)] = f.name
    mgmt = config.listeners.management
    if mgmt.enabled and mgmt.host.strip().lower() not in ("127.0.0.1", "::1", "localhost"):
        # plain HTTP carries Basic credentials in clear: never off the machine
        raise ConfigError(
            "listeners.management.host: must be a loopback address (127.0.0.1, ::1 or"
            f" localhost), got {mgmt.host!r}; use the HTTPS listener for remote access"
        )
    if bool(config.tls.server_cert) != bool(config.tls.server_key):
        # One without the other would pair a certificate with the demo key (or back).
        given, missing = ("server_cert", "server_key")[:: 1 if config.tls.server_cert else -1]
        raise ConfigError(f"tls.{missing}: must be set when tls.{given} is set")
    lim = config.limits
    _positive("limits.handshake_timeout", lim.handshake_timeout)
    _positive("limits.max_connections", lim.max_connections)
    _positive("limits.handshake_rate", lim.handshake_rate)
    _positive("limits.handshake_burst", lim.handshake_burst)
    if not 64 <= lim.max_packet_size <= 268435455:
        raise ConfigError(
            f"limits.max_packet_size: must be between 64 and 268435455 bytes, "
            f"got {lim.max_packet_size}"
        )
    if not 2 <= config.trust.max_chain_length <= 64:
        raise ConfigError(
            f"trust.max_chain_length: must be between 2 and 64, got {config.trust.max_chain_length}"
        )
    _positive("trust.refresh_interval", config.trust.refresh_interval)
    _positive("trust.decision_cache_size", config.trust.decision_cache_size)
    mq = config.mqtt
    if not 1 <= mq.upstream_port <= 65535:
        raise ConfigError(f"mqtt.upstream_port: {mq.upstream_port} is not a port number (1-65535)")
    if mq.backend == "upstream" and not mq.upstream_host.strip():
        raise ConfigError('mqtt.upstream_host: must be set when mqtt.backend = "upstream"')
    if bool(mq.upstream_cert_file) != bool(mq.upstream_key_file):
        raise ConfigError("mqtt.upstream_cert_file and mqtt.upstream_key_file go together")
    if (mq.upstream_ca_file or mq.upstream_cert_file) and not mq.upstream_tls:
        raise ConfigError(
            "mqtt.upstream_ca_file/upstream_cert_file are set but mqtt.upstream_tls = false"
        )
    _positive("mqtt.connect_timeout", mq.connect_timeout)
    life = config.lifecycle
    if not math.isfinite(life.shutdown_grace) or life.shutdown_grace < 0:
        raise ConfigError(
            f"lifecycle.shutdown_grace: must be 0 or more seconds, got {life.shutdown_grace}"
        )
    if life.cert_expiry_warning_days < 0:
        raise ConfigError(
            "lifecycle.cert_expiry_warning_days: must be 0 (off) or more days, "
            f"got {life.cert_expiry_warning_days}"
        )
    _validate_lwm2m(config.lwm2m)
    _validate_crl(config.crl)
    _validate_ca(config.ca)
    _validate_tokens(config.tokens)
    _validate_http(config.http)
    if config.store:
        _check_store_url(config.store)


def _validate_lwm2m(lw: Lwm2mConfig) -> None:
    # OpenSSL refuses DTLS MTUs below 256; above 65507 is not a UDP payload.
    if not 256 <= lw.mtu <= 65507:
        raise ConfigError(f"lwm2m.mtu: must be between 256 and 65507 bytes, got {lw.mtu}")
    if not lw.mtu <= lw.max_datagram <= 65535:
        raise ConfigError(
            f"lwm2m.max_datagram: must be between lwm2m.mtu and 65535 bytes, got {lw.max_datagram}"
        )
    for name in ("max_sessions", "max_handshakes", "max_registrations"):
        _positive(f"lwm2m.{name}", getattr(lw, name))
    for name in ("handshake_timeout", "idle_timeout", "request_timeout"):
        value = getattr(lw, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"lwm2m.{name}: must be greater than 0 seconds, got {value}")


def _validate_crl(crl: CrlConfig) -> None:
    if not 0 <= crl.refresh_margin < 1:
        raise ConfigError(
            f"crl.refresh_margin: must be from 0 to below 1, got {crl.refresh_margin}"
        )
    for name in ("max_age", "fetch_timeout", "poll_interval", "retry_min", "retry_max"):
        _positive(f"crl.{name}", getattr(crl, name))
    if crl.retry_max < crl.retry_min:
        raise ConfigError(f"crl.retry_max: must be at least crl.retry_min ({crl.retry_min})")
    _positive("crl.max_size", crl.max_size)
    _positive("crl.max_distribution_points", crl.max_distribution_points)


def _validate_ca(ca: CaConfig) -> None:
    # RFC 5280 Appendix A: ub-organization-name is 64.
    if not 1 <= len(ca.organisation.strip()) <= 64 or ca.organisation != ca.organisation.strip():
        raise ConfigError(
            "ca.organisation: must be 1 to 64 characters without surrounding spaces,"
            f" got {ca.organisation!r}"
        )
    parse_auto_renew(ca.auto_renew)
    _positive("ca.est_auth_failures", ca.est_auth_failures)
    _positive("ca.est_auth_window", ca.est_auth_window)


def _validate_tokens(tokens: TokenConfig) -> None:
    _positive("tokens.lifetime", tokens.lifetime)
    if not math.isfinite(tokens.leeway) or tokens.leeway < 0:
        raise ConfigError(f"tokens.leeway: must be 0 or more seconds, got {tokens.leeway}")


def _validate_http(http: HttpConfig) -> None:
    seen: list[str] = []
    for i, route in enumerate(http.proxy):
        key = f"http.proxy[{i}]"
        prefix = route.prefix
        segments = prefix.split("/")[1:]
        if not _PROXY_PREFIX.fullmatch(prefix) or any(s in (".", "..") for s in segments):
            raise ConfigError(
                f"{key}.prefix: must be a path like /backend (segments of A-Z a-z 0-9 . _ ~ -,"
                f" no trailing /), got {prefix!r}"
            )
        reserved = next((r for r in PROXY_RESERVED_PREFIXES if f"/{segments[0]}" == r), None)
        if reserved is not None:
            raise ConfigError(f"{key}.prefix: {reserved} belongs to the gateway's own routes")
        for other in seen:
            if _nested(prefix, other) or _nested(other, prefix):
                raise ConfigError(f"{key}.prefix: {prefix} overlaps the proxy prefix {other}")
        seen.append(prefix)
        _check_upstream(f"{key}.upstream", route.upstream)
        _positive(f"{key}.connect_timeout", route.connect_timeout)
        _positive(f"{key}.read_timeout", route.read_timeout)


def _nested(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer + "/")


def _check_upstream(key: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        # credentials in the URL would end up in logs and error messages
        raise ConfigError(f"{key}: must not contain credentials")
    if parts.query or parts.fragment or (port is not None and port == 0):
        raise ConfigError(f"{key}: must have no query, fragment or port 0, got {url!r}")


_UDP_LISTENERS = frozenset({"lwm2m"})
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})


def _hosts_overlap(a: str, b: str) -> bool:
    return a == b or a in _WILDCARD_HOSTS or b in _WILDCARD_HOSTS


def _check_store_url(url: str) -> None:
    if not url.startswith(("sqlite:", "redis://", "rediss://")):
        raise ConfigError(f"store: {_mask_url(url)!r} is not a sqlite:/// or redis:// URL")
    # Parse it the way the daemon will, so a bad path fails here with the key named.
    from gateway.store import open_store
    from gateway.store.base import StoreError

    try:
        open_store(url)
    except StoreError as exc:
        raise ConfigError(f"store: {str(exc).replace(url, _mask_url(url))}") from None


def _positive(key: str, value: float) -> None:
    # nan and inf are valid TOML floats; neither makes sense as a limit or timeout
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value}")


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    for key in raw:
        if key not in known:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}{f.name}"
        typ = hints[f.name]
        value = raw[f.name]
        if is_dataclass(typ):
            default = getattr(cls(), f.name)
            merged = _build(typ, value, key + ".")  # type: ignore[arg-type]
            # keep per-field defaults of nested listener tables (e.g. the port)
            explicit = {k: getattr(merged, k) for k in value}
            values[f.name] = replace(default, **explicit)
        else:
            try:
                values[f.name] = _coerce(key, typ, value)
            except ConfigError:
                if f.name not in SECRET_KEYS:
                    raise
                # never echo a secret back, not even a mistyped one
                raise ConfigError(f"{key}: expected a string (value not shown)") from None
    return cls(**values)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if typ is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string")
        return Path(value)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    item_type = get_args(typ)[0] if origin is tuple and get_args(typ) else None
    if isinstance(item_type, type) and is_dataclass(item_type):
        # an array of tables, e.g. [[http.proxy]]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
        return tuple(_build(item_type, item, f"{key}[{i}].") for i, item in enumerate(value))
    return value


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration as a dict with secrets masked (``config show``)."""

    def walk(obj: Any) -> Any:
        if is_dataclass(obj) and not isinstance(obj, type):
            out = {}
            for f in fields(obj):
                v = getattr(obj, f.name)
                out[f.name] = "********" if f.name in SECRET_KEYS and v else walk(v)
            return out
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, tuple):
            return [walk(item) for item in obj]
        return obj

    result: dict[str, Any] = walk(config)
    result["store"] = _mask_url(config.store_url)
    return result


def _mask_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:********@{host}"
    return url
