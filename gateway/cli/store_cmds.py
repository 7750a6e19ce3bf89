"""Operator subcommands over the store: ``tenants``, ``anchors``, ``crl``, ``devices``.

Every command takes ``--data-dir``/``--store``/``--config`` to find the store
and ``--json`` for machine output (human tables otherwise). Exit codes: 0 done,
1 refused or failed (wrong proof-of-possession signature, store unavailable,
CSV rows rejected), 2 bad input (unknown tenant or certificate, invalid file).

Other modules can add commands to a group, e.g. ``crl status``::

    crl = group_commands(sub, "crl")
    p = crl.add_parser("status", parents=[common_parser()], help="...")
    p.set_defaults(handler=lambda args: run_store_command(args, action))
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

from gateway import operations as ops
from gateway.config import Config, ConfigError, load_config
from gateway.http.jsonmodel import trusted_certificate_fields
from gateway.store import open_store
from gateway.store.base import Store, StoreError
from trust.anchors import UploadError
from trust.certs import (
    parse_serial_hex,
    serial_hex,
)
from trust.model import (
    DeviceUser,
    ProvisionedCertificate,
    RevocationEntry,
    Status,
    TrustedCertificate,
)
from trust.revocation import CSV_TEMPLATE

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@dataclass(frozen=True, slots=True)
class Context:
    """What a command's action receives: the open store and the call's parameters."""

    store: Store
    config: Config
    now: datetime
    actor: str
    json: bool


Action = Callable[[Context], Awaitable[int]]

# Failures that are a refusal rather than bad input exit with 1.
_REFUSED = {"pop_failed", "pop_expired", "no_pop_code"}
_GROUPS: weakref.WeakKeyDictionary[argparse.ArgumentParser, SubParsers] = (
    weakref.WeakKeyDictionary()
)


# plumbing ----------------------------------------------------------------------


def common_parser() -> argparse.ArgumentParser:
    """Options every store command accepts (use as ``parents=[common_parser()]``)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("store options")
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="data directory (default: ./var, or $MTLS_GATEWAY_DATA_DIR)",
    )
    group.add_argument(
        "--store",
        metavar="URL",
        help="store URL (default: sqlite:///DIR/gateway.db, or $MTLS_GATEWAY_STORE)",
    )
    group.add_argument("--config", type=Path, metavar="FILE", help="gateway configuration (TOML)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def group_commands(sub: SubParsers, name: str) -> SubParsers:
    """The subcommands of group ``name`` (``crl``, …) registered on ``sub``."""
    return _GROUPS[sub.choices[name]]


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error on stderr and return the exit code."""
    text = " ".join(message.split())
    print(f"mtls-gateway: error: {text}", file=sys.stderr)
    return code


def cli_actor() -> str:
    """Audit user of CLI changes: ``cli:<login name>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def load_cli_config(args: argparse.Namespace) -> Config:
    """The configuration from ``--config``/``--data-dir``/``--store`` and the environment."""
    return load_config(args.config, data_dir=args.data_dir, store_url=args.store)


def run_store_command(args: argparse.Namespace, action: Action, *, create: bool = False) -> int:
    """Open the store, run ``action`` with ``asyncio.run`` and close the store.

    Without ``create`` a missing SQLite file is an error (nothing is created by
    a typo in ``--data-dir``).
    """
    try:
        config = load_cli_config(args)
        store = open_store(config.store_url)
    except (ConfigError, StoreError) as exc:
        return fail(str(exc))
    path = _sqlite_path(store)
    if path is not None and not path.exists():
        if not create:
            return fail(
                f"no store at {path}: run `mtls-gateway init --data-dir {config.data_dir}`"
                " first, or pass --data-dir/--store"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return fail(f"cannot create {path.parent}: {exc.strerror}", 1)
    ctx = Context(store, config, datetime.now(UTC), cli_actor(), bool(args.json))
    return asyncio.run(_run(ctx, action))


async def _run(ctx: Context, action: Action) -> int:
    try:
        await ctx.store.open()
        return await action(ctx)
    except ops.OperationError as exc:
        return fail(exc.message, 1 if exc.code in _REFUSED else 2)
    except UploadError as exc:
        return fail(f"certificate refused ({exc.rule}): {exc.message}")
    except StoreError as exc:
        return fail(str(exc), 1)
    finally:
        await ctx.store.close()


def _sqlite_path(store: Store) -> Path | None:
    from gateway.store.sqlite import SqliteStore

    if not isinstance(store, SqliteStore):
        return None
    # ``sqlite:////abs`` spells ``//abs``: the same file, shown the usual way.
    return Path("/" + store.path.lstrip("/")) if store.path.startswith("/") else Path(store.path)


def read_input(path: Path) -> bytes:
    """A file's bytes, or :class:`ops.OperationError` with a one-line reason."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ops.OperationError(f"cannot read {path}: {exc.strerror or exc}") from None


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    if not rows:
        print(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def iso(value: datetime | None) -> str | None:
    """Platform time format ``yyyy-MM-dd'T'HH:mm:ss.SSS'Z'``."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def short_time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if value else "-"


def _on(value: bool) -> str:
    return "on" if value else "off"


def _tenant_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--tenant", required=required, metavar="T", help="tenant id")


def _add(
    sub: SubParsers, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, parents=[common_parser()], help=help_text, description=help_text
    )
    parser.set_defaults(handler=handler)
    return parser


def _group(sub: SubParsers, name: str, help_text: str) -> SubParsers:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    commands = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    _GROUPS[parser] = commands
    return commands


def register(sub: SubParsers) -> None:
    _register_tenants(_group(sub, "tenants", "list and create tenants"))
    _register_anchors(
        _group(sub, "anchors", "manage trusted certificates (trust anchors) of a tenant")
    )
    _register_crl(_group(sub, "crl", "offline certificate revocation and CRL settings"))
    _register_devices(_group(sub, "devices", "list, enable and disable device users"))


# tenants -------------------------------------------------------------------------


def _register_tenants(sub: SubParsers) -> None:
    _add(sub, "list", "list tenants", _tenants_list)
    p = _add(sub, "create", "create a tenant (no error if it exists)", _tenants_create)
    p.add_argument("tenant", metavar="ID", help="tenant id: 1-64 of A-Z a-z 0-9 _ -")


def _tenants_list(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        tenants = await ctx.store.list_tenants()
        if ctx.json:
            print_json(tenants)
        else:
            print_table(["TENANT"], [[t] for t in tenants], "no tenants")
        return 0

    return run_store_command(args, action)


def _tenants_create(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        created = await ops.create_tenant(ctx.store, args.tenant, ctx.now, ctx.actor)
        if ctx.json:
            print_json({"tenant": args.tenant, "created": created})
        else:
            print(f"{'created' if created else 'kept existing'} tenant {args.tenant}")
        return 0

    return run_store_command(args, action, create=True)


# anchors -------------------------------------------------------------------------


def anchor_json(record: TrustedCertificate, *, pem: bool = False) -> dict[str, Any]:
    """A trusted certificate with the platform's field names (as the API shows it)."""
    out: dict[str, Any] = {"tenant": record.tenant, **trusted_certificate_fields(record)}
    if not pem:
        del out["certInPemFormat"]
    elif record.pop_code_until is not None:
        out["proofOfPossessionVerificationCodeUsableUntil"] = iso(record.pop_code_until)
    return out


def _register_anchors(sub: SubParsers) -> None:
    p = _add(sub, "add", "upload a CA certificate (PEM) as a trusted certificate", _anchors_add)
    p.add_argument("file", type=Path, metavar="FILE.pem", help="the CA certificate in PEM format")
    _tenant_arg(p)
    p.add_argument("--name", default="", help="display name (default: the certificate's CN)")
    p.add_argument("--disabled", action="store_true", help="upload in DISABLED status")
    p.add_argument(
        "--no-auto-registration",
        action="store_true",
        help="do not create device users on first connect (bulk registration needed)",
    )
    p = _add(sub, "list", "list trusted certificates", _anchors_list)
    _tenant_arg(p, required=False)
    for name, help_text, handler in (
        ("show", "show a trusted certificate with its descriptive fields", _anchors_show),
        ("enable", "enable a trusted certificate", _anchors_status(Status.ENABLED)),
        ("disable", "disable a trusted certificate", _anchors_status(Status.DISABLED)),
        ("delete", "delete a trusted certificate permanently", _anchors_delete),
        ("pop-code", "print the proof-of-possession verification code to sign", _pop_code),
        ("pop-verify", "upload the signed verification code", _pop_verify),
        ("pop-confirm", "mark possession as proven (support override)", _pop_set(True)),
        ("pop-unconfirm", "withdraw a proven possession", _pop_set(False)),
        ("set-auto-registration", "turn auto-registration on or off", _anchors_auto),
    ):
        p = _add(sub, name, help_text, handler)
        p.add_argument("fingerprint", metavar="FP", help="SHA-1 fingerprint (40 hex digits)")
        _tenant_arg(p)
        if name == "set-auto-registration":
            p.add_argument("value", choices=("on", "off"))
        if name == "pop-verify":
            sig = p.add_mutually_exclusive_group(required=True)
            sig.add_argument("--signature", metavar="B64", help="base64 signature")
            sig.add_argument("--signature-file", type=Path, metavar="FILE", help="file holding it")


def _print_anchor(ctx: Context, record: TrustedCertificate, message: str) -> None:
    if ctx.json:
        print_json(anchor_json(record))
    else:
        print(message)


def _anchors_add(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        pem = read_input(args.file).decode("utf-8", "replace")
        status = Status.DISABLED if args.disabled else Status.ENABLED
        auto = not args.no_auto_registration
        record = await ops.add_trusted_certificate(
            ctx.store, args.tenant, pem, args.name, status, auto, ctx.now, ctx.actor
        )
        _print_anchor(
            ctx,
            record,
            f"added trusted certificate {record.fingerprint} '{record.name}' to tenant"
            f" {args.tenant} ({status.value}, auto-registration {_on(auto)})",
        )
        return 0

    return run_store_command(args, action)


def _anchors_list(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        if args.tenant is not None:
            await ops.require_tenant(ctx.store, args.tenant)
        records = await ctx.store.list_trusted_certificates(args.tenant)
        items = [anchor_json(r) for r in records]
        if ctx.json:
            print_json(items)
            return 0
        rows = [
            [
                i["tenant"],
                i["fingerprint"],
                i["name"],
                i["status"],
                _on(i["autoRegistrationEnabled"]),
                "complete" if i["proofOfPossessionValid"] else "incomplete",
                str(i.get("notAfter") or "-")[:10],
            ]
            for i in items
        ]
        headers = ["TENANT", "FINGERPRINT", "NAME", "STATUS", "AUTO-REG", "POP", "NOT-AFTER"]
        print_table(headers, rows, "no trusted certificates")
        return 0

    return run_store_command(args, action)


def _anchors_show(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        record = await ops.get_trusted_certificate(ctx.store, args.tenant, args.fingerprint)
        item = anchor_json(record, pem=True)
        if ctx.json:
            print_json(item)
            return 0
        labels = {
            "autoRegistrationEnabled": "auto-registration",
            "proofOfPossessionValid": "proof of possession",
        }
        for key, value in item.items():
            if key == "certInPemFormat" or value is None:
                continue
            if key == "proofOfPossessionValid":
                value = "complete" if value else "incomplete"
            elif isinstance(value, bool):
                value = _on(value)
            print(f"{labels.get(key, key) + ':':<32} {value}")
        print(record.pem.rstrip())
        return 0

    return run_store_command(args, action)


def _anchors_status(status: Status) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        async def action(ctx: Context) -> int:
            record = await ops.update_trusted_certificate(
                ctx.store, args.tenant, args.fingerprint, ctx.now, ctx.actor, status=status
            )
            _print_anchor(ctx, record, f"trusted certificate {record.fingerprint}: {status.value}")
            return 0

        return run_store_command(args, action)

    return handler


def _anchors_auto(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        auto = args.value == "on"
        record = await ops.update_trusted_certificate(
            ctx.store, args.tenant, args.fingerprint, ctx.now, ctx.actor, auto_registration=auto
        )
        _print_anchor(
            ctx, record, f"trusted certificate {record.fingerprint}: auto-registration {_on(auto)}"
        )
        return 0

    return run_store_command(args, action)


def _anchors_delete(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        record = await ops.delete_trusted_certificate(
            ctx.store, args.tenant, args.fingerprint, ctx.now, ctx.actor
        )
        message = f"deleted trusted certificate {record.fingerprint} '{record.name}'"
        _print_anchor(ctx, record, message)
        return 0

    return run_store_command(args, action)


def _pop_code(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        record = await ops.create_pop_code(ctx.store, args.tenant, args.fingerprint, ctx.now)
        until = iso(record.pop_code_until)
        if ctx.json:
            print_json(
                {"fingerprint": record.fingerprint, "code": record.pop_code, "validUntil": until}
            )
            return 0
        print(record.pop_code)
        print(
            f"valid until {until}; save the code to code.txt and sign it with:\n"
            "  openssl dgst -sha256 -sign <private.key> code.txt | openssl base64 -A\n"
            "then: mtls-gateway anchors pop-verify"
            f" {record.fingerprint} --tenant {args.tenant} --signature <B64>",
            file=sys.stderr,
        )
        return 0

    return run_store_command(args, action)


def _pop_verify(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        if args.signature_file is not None:
            signature = read_input(args.signature_file).decode("ascii", "replace")
        else:
            signature = args.signature
        record = await ops.verify_pop(
            ctx.store, args.tenant, args.fingerprint, signature, ctx.now, ctx.actor
        )
        _print_anchor(ctx, record, f"proof of possession complete for {record.fingerprint}")
        return 0

    return run_store_command(args, action)


def _pop_set(confirmed: bool) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        async def action(ctx: Context) -> int:
            record = await ops.set_pop_confirmed(
                ctx.store, args.tenant, args.fingerprint, confirmed, ctx.now, ctx.actor
            )
            state = "complete" if confirmed else "incomplete"
            _print_anchor(ctx, record, f"proof of possession of {record.fingerprint}: {state}")
            return 0

        return run_store_command(args, action)

    return handler


# crl ---------------------------------------------------------------------------------


def revocation_json(entry: RevocationEntry) -> dict[str, Any]:
    return {"serialNumberInHex": entry.serial_hex, "revocationDate": iso(entry.revoked_at)}


def _register_crl(sub: SubParsers) -> None:
    p = _add(sub, "add", "revoke a certificate serial number (irreversible)", _crl_add)
    p.add_argument("serial", metavar="SERIAL_HEX", help="serial number in hexadecimal")
    p.add_argument(
        "--date",
        metavar="ISO",
        help="revocation date, e.g. 2024-01-17T10:48:51.000Z (default: now)",
    )
    _tenant_arg(p)
    p = _add(
        sub,
        "import",
        "bulk-revoke from a CSV file (at most 5000 entries; exit 1 if rows were rejected)",
        _crl_import,
    )
    p.add_argument("file", type=Path, metavar="FILE.csv", help="CSV as printed by `crl template`")
    _tenant_arg(p)
    _tenant_arg(_add(sub, "list", "list revoked serial numbers", _crl_list))
    p = _add(sub, "settings", "show or change the tenant's CRL checks", _crl_settings)
    _tenant_arg(p)
    p.add_argument("--offline", choices=("on", "off"), help="offline (serial list) check")
    p.add_argument("--online", choices=("on", "off"), help="online (CRL distribution point) check")
    _add(sub, "template", "print the CSV template for `crl import`", _crl_template)


def _crl_add(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        request = ops.RevocationRequest(args.serial, args.date)
        added, kept = await ops.add_revocations(
            ctx.store, args.tenant, [request], ctx.now, ctx.actor
        )
        serial = serial_hex(parse_serial_hex(args.serial))
        if ctx.json:
            print_json({"serialNumberInHex": serial, "added": added, "kept": kept})
        elif added:
            print(f"revoked serial {serial} in tenant {args.tenant}")
        else:
            print(f"serial {serial} was already revoked in tenant {args.tenant}: entry kept")
        return 0

    return run_store_command(args, action)


def _crl_import(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        data = read_input(args.file)
        result = await ops.import_revocation_csv(ctx.store, args.tenant, data, ctx.now, ctx.actor)
        if ctx.json:
            errors = [{"line": e.line, "message": e.message} for e in result.errors]
            print_json({"added": result.added, "kept": result.kept, "errors": errors})
        else:
            print(
                f"added {result.added}, kept {result.kept} already revoked,"
                f" rejected {len(result.errors)} rows"
            )
            for error in result.errors:
                print(f"  line {error.line}: {error.message}")
        return 1 if result.errors else 0

    return run_store_command(args, action)


def _crl_list(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        await ops.require_tenant(ctx.store, args.tenant)
        entries = await ctx.store.list_revocations(args.tenant)
        if ctx.json:
            print_json([revocation_json(e) for e in entries])
        else:
            rows = [[e.serial_hex, iso(e.revoked_at) or ""] for e in entries]
            print_table(["SERIAL", "REVOKED"], rows, f"no revoked serials in tenant {args.tenant}")
        return 0

    return run_store_command(args, action)


def _crl_settings(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        if args.offline is None and args.online is None:
            await ops.require_tenant(ctx.store, args.tenant)
            settings = await ctx.store.get_revocation_settings(args.tenant)
        else:
            settings = await ops.set_revocation_settings(
                ctx.store,
                args.tenant,
                ctx.now,
                ctx.actor,
                offline=None if args.offline is None else args.offline == "on",
                online=None if args.online is None else args.online == "on",
            )
        if ctx.json:
            print_json({"offline": settings.offline, "online": settings.online})
        else:
            print(f"offline check: {_on(settings.offline)}")
            print(f"online check:  {_on(settings.online)}")
        return 0

    return run_store_command(args, action)


def _crl_template(args: argparse.Namespace) -> int:
    if args.json:
        print_json({"template": CSV_TEMPLATE})
    else:
        print(CSV_TEMPLATE, end="")
    return 0


# devices -----------------------------------------------------------------------------


def device_json(user: DeviceUser) -> dict[str, Any]:
    return {
        "tenant": user.tenant,
        "deviceId": user.device_id,
        "username": user.username,
        "enabled": user.enabled,
        "registeredVia": user.registered_via,
        "created": iso(user.created),
        "lastConnect": iso(user.last_connect),
    }


def _register_devices(sub: SubParsers) -> None:
    _tenant_arg(_add(sub, "list", "list device users", _devices_list))
    for name, enabled in (("enable", True), ("disable", False)):
        help_text = (
            "enable a device user"
            if enabled
            else "disable a device user (disconnects it; its certificate stays valid)"
        )
        p = _add(sub, name, help_text, _devices_set(enabled))
        p.add_argument("device_id", metavar="DEVICE_ID", help="device id (certificate CN)")
        _tenant_arg(p)
    p = _add(
        sub,
        "certificates",
        "list a device's provisioned certificates (the last 5 seen in a handshake or issued)",
        _devices_certificates,
    )
    p.add_argument("device_id", metavar="DEVICE_ID", help="device id (certificate CN)")
    _tenant_arg(p)
    p = _add(
        sub,
        "revoke-certificate",
        "revoke one of a device's provisioned certificates (adds its serial to the "
        "tenant's revocations; irreversible)",
        _devices_revoke_certificate,
    )
    p.add_argument("device_id", metavar="DEVICE_ID", help="device id (certificate CN)")
    p.add_argument("serial", metavar="SERIAL_HEX", help="serial number in hex")
    _tenant_arg(p)


def _devices_list(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        await ops.require_tenant(ctx.store, args.tenant)
        users = await ctx.store.list_devices(args.tenant)
        if ctx.json:
            print_json([device_json(u) for u in users])
            return 0
        rows = [
            [
                u.device_id,
                u.username,
                "enabled" if u.enabled else "disabled",
                u.registered_via,
                short_time(u.created),
                short_time(u.last_connect),
            ]
            for u in users
        ]
        headers = ["DEVICE", "USER", "STATE", "VIA", "CREATED", "LAST-CONNECT"]
        print_table(headers, rows, f"no device users in tenant {args.tenant}")
        return 0

    return run_store_command(args, action)


def _devices_set(enabled: bool) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        async def action(ctx: Context) -> int:
            user = await ops.set_device_enabled(
                ctx.store, args.tenant, args.device_id, enabled, ctx.now, ctx.actor
            )
            if ctx.json:
                print_json(device_json(user))
            else:
                print(f"device user {user.username}: {'enabled' if enabled else 'disabled'}")
            return 0

        return run_store_command(args, action)

    return handler


def provisioned_json(cert: ProvisionedCertificate) -> dict[str, Any]:
    return {
        "serialNumberInHex": cert.serial_hex,
        "notBefore": iso(cert.not_before),
        "notAfter": iso(cert.not_after),
        "fingerprint": cert.fingerprint,
        "firstSeen": iso(cert.first_seen),
        "lastSeen": iso(cert.last_seen),
    }


def _devices_certificates(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        await ops.require_tenant(ctx.store, args.tenant)
        certs = await ctx.store.list_provisioned_certificates(args.tenant, args.device_id)
        if ctx.json:
            print_json([provisioned_json(c) for c in certs])
            return 0
        rows = [
            [
                c.serial_hex,
                short_time(c.not_before),
                short_time(c.not_after),
                short_time(c.last_seen),
            ]
            for c in certs
        ]
        headers = ["SERIAL", "NOT-BEFORE", "NOT-AFTER", "LAST-SEEN"]
        print_table(headers, rows, f"no provisioned certificates for {args.device_id}")
        return 0

    return run_store_command(args, action)


def _devices_revoke_certificate(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        cert, new = await ops.revoke_provisioned_certificate(
            ctx.store, args.tenant, args.device_id, args.serial, ctx.now, ctx.actor
        )
        if ctx.json:
            print_json({**provisioned_json(cert), "newlyRevoked": new})
        else:
            state = "revoked" if new else "was already revoked"
            print(f"certificate {cert.serial_hex} of {args.device_id}: {state}")
        return 0

    return run_store_command(args, action)
