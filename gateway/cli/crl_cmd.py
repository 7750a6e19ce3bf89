"""``mtls-gateway crl status``: the online-revocation state of a running gateway.

Per CRL distribution point: state (current, stale, never fetched), last
successful fetch, next update, revoked serials, failures and the last error.

By default it reads ``<data_dir>/crl-status.json``, which the daemon rewrites
atomically on every change and every 30 s (so it works without the admin
listener, and after the daemon stopped: the file says when it was written).
``--admin URL`` asks the admin listener instead (``GET URL/status``, member
``crl``).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.cli.store_cmds import SubParsers, fail, group_commands, print_json, print_table
from gateway.config import ConfigError, load_config
from gateway.crl_fetcher import STATUS_FILE, STATUS_INTERVAL

MAX_STATUS_BYTES = 64 << 20


def register(sub: SubParsers) -> None:
    crl = group_commands(sub, "crl")
    help_text = "online revocation: state of each CRL distribution point of the running gateway"
    p = crl.add_parser("status", help=help_text, description=help_text)
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"read DIR/{STATUS_FILE} (default: ./var, or $MTLS_GATEWAY_DATA_DIR)",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="gateway configuration (TOML)")
    p.add_argument(
        "--admin",
        metavar="URL",
        help="ask the admin listener instead, e.g. http://127.0.0.1:8081",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    try:
        doc = _from_admin(args.admin) if args.admin else _from_file(args)
    except _Unavailable as exc:
        return fail(str(exc), 1)
    if args.json:
        print_json(doc)
        return 0
    print(_header(doc, datetime.now(UTC)))
    rows = [
        [
            dp.get("url", ""),
            dp.get("kind", ""),
            dp.get("state", ""),
            _time(dp.get("lastFetch")),
            _time(dp.get("nextUpdate")),
            "-" if dp.get("entries") is None else str(dp["entries"]),
            f"{dp.get('failures', 0)} ({dp.get('consecutiveFailures', 0)} in a row)",
            dp.get("lastError") or "",
        ]
        for dp in doc.get("distributionPoints", [])
    ]
    print_table(
        ["URL", "KIND", "STATE", "LAST FETCH", "NEXT UPDATE", "ENTRIES", "FAILURES", "LAST ERROR"],
        rows,
        "no CRL distribution points seen yet (none of the certificates checked online had one)",
    )
    return 0


class _Unavailable(Exception):
    pass


def _from_file(args: argparse.Namespace) -> dict[str, Any]:
    try:
        config = load_config(args.config, data_dir=args.data_dir)
    except ConfigError as exc:
        raise _Unavailable(str(exc)) from None
    path = config.data_dir / STATUS_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        raise _Unavailable(
            f"no CRL status at {path}: is the gateway running with --data-dir "
            f"{config.data_dir}? (or pass --admin URL)"
        ) from None
    except OSError as exc:
        raise _Unavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    return _parse(data, str(path))


def _from_admin(base: str) -> dict[str, Any]:
    url = base.rstrip("/") + "/status"
    if not url.startswith(("http://", "https://")):
        raise _Unavailable(f"--admin: {base!r} is not an http:// or https:// URL")
    try:
        # the admin listener is local or on a management network: no proxy from the env
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as resp:
            data = resp.read(MAX_STATUS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Unavailable(f"cannot reach the admin listener at {url}: {exc}") from None
    doc = _parse(data, url).get("crl")
    if not isinstance(doc, dict):
        raise _Unavailable(f"{url} has no CRL status (member 'crl'); read the status file instead")
    return doc


def _parse(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_STATUS_BYTES:
        raise _Unavailable(f"{where} is larger than {MAX_STATUS_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise _Unavailable(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Unavailable(f"{where} is not a CRL status document")
    return doc


def _header(doc: dict[str, Any], now: datetime) -> str:
    text = f"missing-CRL policy: {doc.get('missingPolicy', '?')}"
    written = _parse_time(doc.get("generatedAt"))
    if written is not None:
        age = (now - written).total_seconds()
        text += f"; status of pid {doc.get('pid', '?')} at {_time(doc.get('generatedAt'))}"
        if age > 3 * STATUS_INTERVAL:
            text += f" ({age:.0f} s ago: is the gateway still running?)"
    return text


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _time(value: object) -> str:
    when = _parse_time(value)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if when else "-"
