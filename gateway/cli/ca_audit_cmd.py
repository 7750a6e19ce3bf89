"""``mtls-gateway ca …`` (tenant certificate authority) and ``audit list``."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from gateway.ca_service import CaService
from gateway.cli.store_cmds import (
    Context,
    SubParsers,
    anchor_json,
    common_parser,
    fail,
    iso,
    print_json,
    print_table,
    run_store_command,
    short_time,
)
from gateway.cli.trust_cmd import parse_time
from gateway.secrets import SecretBox
from gateway.store.base import AuditQuery, Page
from trust.ca import CaError
from trust.certs import load_certificate
from trust.model import AuditRecord


def register(sub: SubParsers) -> None:
    ca = sub.add_parser(
        "ca",
        help="the tenant certificate authority (EST enrollment signs with it)",
        description="Create, renew and show a tenant's certificate authority.",
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    for name, help_text, handler in (
        ("create", "create the tenant CA (one per tenant; its key is stored encrypted)", _create),
        ("renew", "renew the tenant CA (only when less than 24 months remain)", _renew),
        ("show", "show the tenant CA certificate", _show),
    ):
        p = ca_sub.add_parser(
            name, parents=[common_parser()], help=help_text, description=help_text
        )
        p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
        p.set_defaults(handler=handler)

    audit = sub.add_parser("audit", help="read the audit log", description="Read the audit log.")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = audit_sub.add_parser("list", parents=[common_parser()], help="audit records, newest first")
    p.add_argument("--tenant", metavar="T", help="only this tenant")
    p.add_argument(
        "--type", metavar="TYPE", help="only this record type (e.g. CRL, TrustedCertificate)"
    )
    p.add_argument(
        "--from", dest="date_from", type=parse_time, metavar="TIME", help="not before (ISO-8601)"
    )
    p.add_argument(
        "--to", dest="date_to", type=parse_time, metavar="TIME", help="not after (ISO-8601)"
    )
    p.add_argument(
        "--limit", type=int, default=50, metavar="N", help="at most N records (default 50)"
    )
    p.set_defaults(handler=_audit_list)


def _service(ctx: Context) -> CaService:
    return CaService(ctx.store, SecretBox.load_or_create(ctx.config.data_dir), ctx.config.ca)


def _print(ctx: Context, record: Any, message: str) -> None:
    if ctx.json:
        print_json(anchor_json(record))
    else:
        print(f"{message}: {record.fingerprint} (valid until {iso(_not_after(record))})")


def _not_after(record: Any) -> datetime | None:
    return load_certificate(record.pem).not_valid_after_utc


def _create(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        try:
            record = await _service(ctx).create(args.tenant, ctx.now, ctx.actor)
        except CaError as exc:
            return fail(str(exc), 1)
        _print(ctx, record, f"tenant CA of {args.tenant} created")
        return 0

    return run_store_command(args, action)


def _renew(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        try:
            record = await _service(ctx).renew(args.tenant, ctx.now, ctx.actor)
        except CaError as exc:
            return fail(str(exc), 1)
        _print(ctx, record, f"tenant CA of {args.tenant} renewed")
        return 0

    return run_store_command(args, action)


def _show(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        record = await _service(ctx).current(args.tenant)
        if record is None:
            print(f"tenant {args.tenant} has no CA (create one with `mtls-gateway ca create`)")
            return 1
        if ctx.json:
            print_json(anchor_json(record, pem=True))
        else:
            print(record.pem, end="")
        return 0

    return run_store_command(args, action)


def audit_json(r: AuditRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "tenant": r.tenant,
        "type": r.type,
        "activity": r.activity,
        "text": r.text,
        "time": iso(r.time),
        "user": r.user,
        "source": r.source,
        "severity": r.severity,
    }


def _audit_list(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        query = AuditQuery(
            tenant=args.tenant, type=args.type, date_from=args.date_from, date_to=args.date_to
        )
        records, total = await ctx.store.list_audit(query, Page(max(1, args.limit), 1))
        if ctx.json:
            print_json({"auditRecords": [audit_json(r) for r in records], "total": total})
            return 0
        rows = [[short_time(r.time), r.tenant, r.type, r.activity, r.text[:80]] for r in records]
        print_table(["TIME", "TENANT", "TYPE", "ACTIVITY", "TEXT"], rows, "no audit records")
        return 0

    return run_store_command(args, action)
