"""``admin-users`` (management-API users) and ``bulk-register`` (bulk device registration).

Both work directly on the store, like the other store commands, so they run
with or without a gateway; a running gateway sees the changes through the
store's change feed. Passwords come from ``--password-file``, the
``MTLS_GATEWAY_PASSWORD`` environment variable or a prompt — never from the
command line (it would show in ``ps`` and shell history) — and are stored as
argon2id hashes. ``bulk-register`` hashes each ``ENROLLMENT_OTP`` with a key
derived from the gateway's KEK (``<data_dir>/secrets/kek``), so give it the
gateway's ``--data-dir``. Exit codes as for the store commands: 0 done, 1 rows
refused, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from gateway import operations as ops
from gateway.cli.store_cmds import (
    Context,
    SubParsers,
    common_parser,
    fail,
    print_json,
    print_table,
    read_input,
    run_store_command,
)
from gateway.http.auth import ROLE_MANAGEMENT_ADMIN, ROLE_MANAGEMENT_READ, ROLE_TENANT_ADMIN
from gateway.http.mgmt import enrollment_otp_hasher
from gateway.secrets import SecretBox
from trust.bulk import MAX_BULK_CSV_BYTES

PASSWORD_ENV = "MTLS_GATEWAY_PASSWORD"  # noqa: S105 - a variable name, not a secret
ROLE_ALIASES = {
    "admin": ROLE_TENANT_ADMIN,
    "management-admin": ROLE_MANAGEMENT_ADMIN,
    "management-read": ROLE_MANAGEMENT_READ,
}
KNOWN_ROLES = (ROLE_TENANT_ADMIN, ROLE_MANAGEMENT_ADMIN, ROLE_MANAGEMENT_READ)


def register(sub: SubParsers) -> None:
    text = "management-API users (HTTP Basic <tenant>/<user>) of a tenant"
    group = sub.add_parser("admin-users", help=text, description=text)
    commands = group.add_subparsers(dest="admin_users_command", metavar="COMMAND", required=True)

    text = (
        "create a management-API user; the password is read from --password-file,"
        f" ${PASSWORD_ENV} or a prompt"
    )
    p = commands.add_parser("add", parents=[common_parser()], help=text, description=text)
    p.add_argument("username", metavar="USER", help="user name (1-128 of A-Z a-z 0-9 . _ @ + -)")
    p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
    p.add_argument(
        "--role",
        action="append",
        dest="roles",
        metavar="ROLE",
        help=(
            "role, repeatable: admin (ROLE_TENANT_ADMIN), management-admin"
            " (ROLE_TENANT_MANAGEMENT_ADMIN; in tenant `management` it acts on every tenant),"
            " management-read (ROLE_TENANT_MANAGEMENT_READ), or the full role name"
            " (default: admin)"
        ),
    )
    p.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="file whose first line is the password (at least 8 characters)",
    )
    p.set_defaults(handler=_users_add)

    text = "list a tenant's management-API users and their roles"
    p = commands.add_parser("list", parents=[common_parser()], help=text, description=text)
    p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
    p.set_defaults(handler=_users_list)

    text = (
        "bulk-register certificate devices from a CSV (ID;AUTH_TYPE=CERTIFICATES[;CREDENTIALS"
        " empty][;ENROLLMENT_OTP][;TYPE;NAME;...]); exit 1 if rows were refused"
    )
    p = sub.add_parser("bulk-register", parents=[common_parser()], help=text, description=text)
    p.add_argument("file", type=Path, metavar="FILE.csv", help="bulk registration CSV (; or ,)")
    p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
    p.set_defaults(handler=_bulk_register)


# admin users ---------------------------------------------------------------------


def _roles(given: list[str] | None) -> list[str]:
    roles = []
    for name in given or ["admin"]:
        role = ROLE_ALIASES.get(name.lower(), name.upper())
        if role not in KNOWN_ROLES:
            raise ops.OperationError(
                f"unknown role {name!r}: use admin, management-admin, management-read"
                f" or one of {', '.join(KNOWN_ROLES)}"
            )
        if role not in roles:
            roles.append(role)
    return roles


def _password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        lines = read_input(args.password_file).decode("utf-8", "replace").splitlines()
        if not lines or not lines[0]:
            raise ops.OperationError(f"{args.password_file}: the first line is empty")
        return lines[0]
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise ops.OperationError(
            f"no password: use --password-file or ${PASSWORD_ENV} (no terminal to prompt on)"
        )
    first = getpass.getpass(f"password for {args.tenant}/{args.username}: ")
    if getpass.getpass("again: ") != first:
        raise ops.OperationError("the passwords do not match")
    return first


def _users_add(args: argparse.Namespace) -> int:
    try:
        roles = _roles(args.roles)
        password = _password(args)
    except ops.OperationError as exc:
        return fail(exc.message)

    async def action(ctx: Context) -> int:
        user = await ops.create_admin_user(
            ctx.store, args.tenant, args.username, password, roles, now=ctx.now, actor=ctx.actor
        )
        if ctx.json:
            print_json(_user_json(user))
        else:
            print(
                f"created user {user.tenant}/{user.username} with roles"
                f" {', '.join(sorted(user.roles))}"
            )
        return 0

    return run_store_command(args, action)


def _user_json(user: Any) -> dict[str, Any]:
    return {
        "tenant": user.tenant,
        "userName": user.username,
        "roles": sorted(user.roles),
        "enabled": user.enabled,
    }


def _users_list(args: argparse.Namespace) -> int:
    async def action(ctx: Context) -> int:
        await ops.require_tenant(ctx.store, args.tenant)
        users = await ctx.store.list_admin_users(args.tenant)
        if ctx.json:
            print_json([_user_json(u) for u in users])
        else:
            rows = [
                [
                    u.username,
                    ", ".join(sorted(u.roles)) or "-",
                    "enabled" if u.enabled else "disabled",
                ]
                for u in users
            ]
            print_table(["USER", "ROLES", "STATE"], rows, f"no users in tenant {args.tenant}")
        return 0

    return run_store_command(args, action)


# bulk registration -------------------------------------------------------------------


def _bulk_register(args: argparse.Namespace) -> int:
    try:
        size = args.file.stat().st_size
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror}")
    if size > MAX_BULK_CSV_BYTES:  # refuse before reading it
        return fail(f"{args.file} is larger than {MAX_BULK_CSV_BYTES} bytes")

    async def action(ctx: Context) -> int:
        data = read_input(args.file)
        # OTPs are keyed with the gateway's KEK: run with the gateway's --data-dir
        box = await asyncio.to_thread(SecretBox.load_or_create, ctx.config.data_dir)
        result = await ops.bulk_register(
            ctx.store,
            args.tenant,
            data,
            ctx.now,
            ctx.actor,
            hash_otp=enrollment_otp_hasher(box),
        )
        failures = [
            {"line": f.line, "deviceId": f.device_id, "failureReason": f.reason}
            for f in result.failures
        ]
        if ctx.json:
            print_json(
                {
                    "numberOfAll": result.total,
                    "numberOfCreated": len(result.created),
                    "numberOfFailed": len(result.failures),
                    "created": list(result.created),
                    "failedCreationList": failures,
                }
            )
        else:
            print(
                f"{result.total} rows: {len(result.created)} devices registered (pending their"
                f" first connect), {len(result.failures)} refused"
            )
            rows = [[str(f.line), f.device_id, f.reason] for f in result.failures]
            if rows:
                print_table(["LINE", "ID", "REASON"], rows, "")
        return 1 if result.failures else 0

    return run_store_command(args, action)
