"""``mtls-gateway config check|show`` and ``mtls-gateway status``.

``config check FILE`` validates a configuration the way ``run`` will (file,
then environment overrides) and also loads the server certificate and key
when they are configured explicitly: exit 0 valid, 2 invalid, with the key
and the problem named. ``config show`` prints the effective configuration as
TOML (or JSON) with secrets masked. ``status`` asks a running daemon's admin
listener for its live sessions, listeners and store health: exit 0 healthy
and ready, 1 unhealthy, not ready or unreachable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.cli.store_cmds import SubParsers, fail, print_json, print_table
from gateway.config import ENV_PREFIX, Config, ConfigError, env_overrides, load_config, masked

LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def register(sub: SubParsers) -> None:
    group = sub.add_parser(
        "config",
        help="check or show the gateway configuration",
        description="Check a configuration file, or show the effective configuration.",
    )
    commands = group.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "check",
        help="validate a configuration file (exit 0 valid, 2 invalid)",
        description="Validate FILE as `run` would: TOML, keys, types, ranges, environment "
        "overrides, and the server certificate/key pair when set explicitly.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="TOML configuration file")
    p.set_defaults(handler=_check)
    p = commands.add_parser(
        "show",
        help="print the effective configuration (secrets masked)",
        description="Print the configuration `run` would use: defaults < FILE < environment "
        "(MTLS_GATEWAY_*) < options. Secrets are masked.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="data directory")
    p.add_argument("--store", metavar="URL", help="store URL")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(handler=_show)

    p = sub.add_parser(
        "status",
        help="show live sessions, listeners and store health of a running gateway",
        description="Ask a running gateway's admin listener (GET /status). Exit 0 when it "
        "is ready and its store healthy, 1 otherwise or when it cannot be reached.",
    )
    p.add_argument(
        "--admin",
        metavar="URL",
        help="admin listener URL (default: from --config, else http://127.0.0.1:8081)",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--json", action="store_true", help="print the JSON as received")
    p.set_defaults(handler=_status)


# config check ------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        notes = _check_files(config)
    except ConfigError as exc:
        return fail(f"{args.file}: {exc}")
    known = env_overrides()
    print(f"{args.file}: valid")
    for name in sorted(k for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and v):
        if name in known:
            print(f"  environment: {name} overrides {known[name]}")
        else:
            print(f"  note: {name} is not a known setting and is ignored (a typo?)")
    for note in notes:
        print(f"  note: {note}")
    return 0


def _check_files(config: Config) -> list[str]:
    """Load the server certificate and key when configured; notes for the rest."""
    notes: list[str] = []
    if config.tls.server_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(config.tls.server_cert, config.tls.server_key)
        except FileNotFoundError as exc:
            missing = exc.filename or f"{config.tls.server_cert} or {config.tls.server_key}"
            raise ConfigError(f"tls.server_cert/server_key: {missing}: file not found") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "tls.server_cert/server_key: cannot load the certificate and key as a pair "
                f"({exc.__class__.__name__}: {getattr(exc, 'reason', None) or exc})"
            ) from None
    elif not config.server_cert_path.exists():
        notes.append(
            f"{config.server_cert_path} does not exist yet: `run` creates a demo PKI on first "
            "start (set tls.server_cert and tls.server_key for production)"
        )
    admin = config.listeners.admin
    if admin.enabled and admin.host not in ("127.0.0.1", "::1", "localhost"):
        notes.append(
            f"listeners.admin.host = {admin.host!r}: the admin listener has no authentication"
        )
    return notes


# config show -------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, data_dir=args.data_dir, store_url=args.store)
    except ConfigError as exc:
        return fail(str(exc))
    tree = masked(config)
    source = tree.pop("source", "")
    if args.json:
        print_json(tree)
    else:
        print(f"# effective configuration (defaults < {source} < environment < options)")
        print(to_toml(tree), end="")
    return 0


def to_toml(tree: dict[str, Any]) -> str:
    """TOML for a tree of tables and scalars (what ``masked`` returns)."""
    lines: list[str] = []
    _emit(tree, [], lines)
    return "\n".join(lines) + "\n"


def _emit(tree: dict[str, Any], path: list[str], lines: list[str]) -> None:
    tables = {k: v for k, v in tree.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in tree.items() if _is_table_array(v)}
    scalars = {k: v for k, v in tree.items() if k not in tables and k not in arrays}
    if path and scalars:
        lines.append("")
        lines.append(f"[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit(value, [*path, key], lines)
    for key, items in arrays.items():
        for item in items:  # e.g. [[http.proxy]]
            lines.append("")
            lines.append(f"[[{'.'.join([*path, key])}]]")
            for k, v in item.items():
                lines.append(f"{k} = {_toml_value(v)}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes
    return json.dumps(str(value), ensure_ascii=False)


# status ------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    url = args.admin
    if url is None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return fail(str(exc))
        admin = config.listeners.admin
        host = LOOPBACK_FOR.get(admin.host, admin.host)
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{admin.port}"
    url = url.rstrip("/")
    # no proxy: the admin listener is local, and a proxy would answer for it
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/status", timeout=args.timeout) as response:
            status: dict[str, Any] = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return fail(f"cannot reach the gateway's admin listener at {url}: {reason}", 1)
    if args.json:
        print_json(status)
    else:
        _print_status(status, url)
    healthy = bool(status.get("store", {}).get("healthy")) and bool(status.get("ready"))
    return 0 if healthy else 1


def _print_status(s: dict[str, Any], url: str) -> None:
    store = s.get("store", {})
    trust = s.get("trust", {})
    up = int(s.get("uptimeSeconds", 0))
    print(
        f"mtls-gateway {s.get('version')} (pid {s.get('pid')}) at {url}: "
        f"{'ready' if s.get('ready') else 'NOT READY'}, up {up // 3600}h{up % 3600 // 60:02d}m"
    )
    health = "healthy" if store.get("healthy") else f"UNAVAILABLE: {store.get('error')}"
    print(f"store: {store.get('url')} ({health})")
    print(f"trust: snapshot seq {trust.get('snapshotSeq')}, {trust.get('tenants')} tenants")
    cert = s.get("serverCertificate")
    if cert:
        print(
            f"server certificate: {cert['subject']} sha256 {cert['sha256'][:16]}…, "
            f"expires {cert['notAfter']} ({cert['daysLeft']} days)"
        )
    print()
    rows = [
        [str(x.get("name")), str(x.get("protocol")), f"{x.get('host')}:{x.get('port')}"]
        for x in s.get("listeners", [])
    ]
    print_table(["LISTENER", "PROTOCOL", "ADDRESS"], rows, "no listeners")
    print()
    sessions = s.get("sessions", {})
    print(f"live sessions: {sessions.get('total', 0)}")
    rows = [
        [str(x["listener"]), str(x["tenant"]), str(x["sessions"])]
        for x in sessions.get("byListener", [])
    ]
    if rows:
        print_table(["LISTENER", "TENANT", "SESSIONS"], rows, "")
