"""``mtls-gateway tokens``: the device-token signing keys of a tenant.

* ``tokens rotate-key --tenant T [--drop-old]``: a new current key signs from
  now on (running gateways pick it up within ``KEY_CACHE_TTL`` seconds). Old
  keys keep verifying their tokens until those expire (``tokens.lifetime``);
  ``--drop-old`` removes them at once, which refuses every token issued before.
* ``tokens keys --tenant T``: the keys (id, created, retired, current).

Keys are sealed with the KEK in ``<data_dir>/secrets/kek``: the command must
see the daemon's data directory (it refuses to create a new KEK).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from gateway.cli.store_cmds import (
    Context,
    SubParsers,
    common_parser,
    fail,
    iso,
    print_json,
    print_table,
    run_store_command,
    short_time,
)
from gateway.device_tokens import KEYS_OPTION, check_kek, list_keys, rotate_key
from gateway.secrets import SecretBox, SecretError, kek_path


def register(sub: SubParsers) -> None:
    group: argparse.ArgumentParser = sub.add_parser(
        "tokens",
        help="device access tokens: signing keys",
        description="Device access tokens (71,<token> on s/dat): the tenants' signing keys.",
    )
    commands = group.add_subparsers(dest="tokens_command", metavar="COMMAND", required=True)
    text = "make a new signing key current for a tenant (old tokens stay valid unless --drop-old)"
    p = commands.add_parser("rotate-key", parents=[common_parser()], help=text, description=text)
    p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
    p.add_argument(
        "--drop-old",
        action="store_true",
        help="remove the old keys now: every token issued before is refused",
    )
    p.set_defaults(handler=lambda args: run_store_command(args, lambda ctx: _rotate(ctx, args)))
    text = "list a tenant's token-signing keys"
    p = commands.add_parser("keys", parents=[common_parser()], help=text, description=text)
    p.add_argument("--tenant", required=True, metavar="T", help="tenant id")
    p.set_defaults(handler=lambda args: run_store_command(args, lambda ctx: _keys(ctx, args)))


def _box(ctx: Context) -> SecretBox:
    path = kek_path(ctx.config.data_dir)
    if not path.exists():
        # a new KEK here would seal a key the daemon cannot open
        raise SecretError(f"no key-encryption key at {path}: pass the gateway's --data-dir")
    return SecretBox.load_or_create(ctx.config.data_dir)


async def _rotate(ctx: Context, args: argparse.Namespace) -> int:
    tenant: str = args.tenant
    if not await ctx.store.tenant_exists(tenant):
        return fail(f"tenant {tenant} not found")
    try:
        box = _box(ctx)
        await check_kek(ctx.store, box, tenant)  # the daemon's KEK, or the new key is useless
    except SecretError as exc:
        return fail(str(exc), 1)
    tokens = ctx.config.tokens
    result = await rotate_key(
        ctx.store,
        box,
        tenant,
        ctx.now,
        keep_retired_for=timedelta(seconds=tokens.lifetime + tokens.leeway),
        drop_old=bool(args.drop_old),
        actor=ctx.actor,
    )
    if ctx.json:
        print_json(
            {
                "tenant": tenant,
                "kid": result.kid,
                "retired": list(result.retired),
                "dropped": list(result.dropped),
            }
        )
        return 0
    print(f"tenant {tenant}: new token-signing key {result.kid}")
    if result.retired:
        print(f"retired, verifying tokens until they expire: {', '.join(result.retired)}")
    if result.dropped:
        print(f"removed, their tokens are refused: {', '.join(result.dropped)}")
    return 0


async def _keys(ctx: Context, args: argparse.Namespace) -> int:
    tenant: str = args.tenant
    if not await ctx.store.tenant_exists(tenant):
        return fail(f"tenant {tenant} not found")
    try:
        current, keys = await list_keys(ctx.store, tenant)
    except SecretError as exc:
        return fail(str(exc), 1)
    if ctx.json:
        print_json(
            [
                {
                    "kid": k.kid,
                    "created": iso(k.created),
                    "retired": iso(k.retired),
                    "current": k.kid == current,
                }
                for k in keys
            ]
        )
        return 0
    rows = [
        [k.kid, short_time(k.created), short_time(k.retired), "yes" if k.kid == current else ""]
        for k in keys
    ]
    print_table(
        ["KID", "CREATED", "RETIRED", "CURRENT"],
        rows,
        f"no keys yet (created on the tenant's first token request; option {KEYS_OPTION})",
    )
    return 0
