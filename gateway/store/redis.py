"""The shared :class:`Store`: one Redis server (or primary) behind several gateways.

Key layout. Every key starts with ``{<namespace>}:`` so several deployments
can share one server, and the braces are a hash tag: all keys of a namespace
live in one cluster slot, which multi-key Lua scripts require. ``<t>`` is a
tenant id (never contains ``:``); values are JSON unless noted::

    schema                  string  layout version (refuses a newer one)
    tenants                 hash    tenant -> created (time text)
    anchors:<t>             hash    fingerprint -> trusted certificate
    anchor-order:<t>        zset    fingerprint, scored by ``anchor-counter`` (insertion order)
    anchor-tenants:<fp>     set     tenants holding that fingerprint
    revocations:<t>         hash    serial hex -> "<n>|<revoked_at>" (n = insertion number)
    crl-settings            hash    tenant -> revocation settings
    devices:<t>             hash    device id -> device user
    device-tenants:<id>     set     tenants where that device user exists
    pending:<t>             hash    device id -> pending registration
    provisioned:<t>:<id>    hash    serial hex -> provisioned certificate (newest 5 kept)
    admins:<t>              hash    user name -> admin user
    admin-tenants:<name>    set     tenants where that admin user exists
    options:<t>             hash    option key -> value (text)
    audit / audit-id        hash / counter   id -> audit record
    audit-index[:...]       zset    "<time>|<id, 20 digits>" at score 0, read by lex range;
                                    one per filter: all, tenant:<t>, type:<type>,
                                    tenant-type:<len(t)>:<t>:<type>
    seq / changes           counter / zset   the change feed (below)

Every write that needs more than one command is one Lua script, which Redis
runs atomically: the tenant check, the write, ``INCR seq`` and the feed entry
(score ``seq``, member ``"<seq>|<unix seconds>|<kind>|<tenant>|<key>"``)
commit together or not at all, and seqs commit in order, so readers may poll
``changes_since`` by seq. The same writes as in SQLite produce feed entries.
A script that appended changes ends with ``PUBLISH <namespace>:changes <seq>``:
subscribers are served only after the script, so they never see the
notification before the data, and a client dying mid-call cannot lose it.

The feed is trimmed like SQLite's (at :meth:`RedisStore.open` and
:meth:`RedisStore.trim_changes`): an entry goes when it is both older than
``change_retention`` (server clock) and more than ``change_keep_rows`` behind
the newest seq. ``seq`` itself never goes back.

Availability: sockets time out after ``timeout`` seconds, commands are not
retried (a lost reply to a write leaves its outcome unknown, and a silent
retry could turn "created" into "already exists"), and every redis-py error is
raised as :class:`StoreUnavailable` (connection, timeout, read-only replica,
loading, out of memory) or :class:`StoreError`. The connection pool checks a
connection when it takes it, so after Redis returns the next call reconnects.
Datetimes are the same fixed-width UTC text as in SQLite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.base import (
    PROVISIONED_KEEP,
    AuditQuery,
    Conflict,
    NotFound,
    Page,
    Store,
    StoreError,
    StoreUnavailable,
    chunks,
)
from gateway.store.sqlite import CA_KEY_OPTION_PREFIX, decode_time, encode_time
from trust.model import (
    TENANT_ID_RE,
    AdminUser,
    AuditRecord,
    Change,
    ChangeKind,
    DeviceUser,
    PendingRegistration,
    ProvisionedCertificate,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
    valid_tenant_id,
)

T = TypeVar("T")
log = logging.getLogger("mtls_gateway.store")

SCHEMA_VERSION = 1
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
REVOCATION_BATCH = 5000
"""Revocations per script call: a large CRL must not block Redis for long."""
TRIM_BATCH = 1000
PUBSUB_PING_INTERVAL = 5.0
"""Silence after which the subscriber pings; no answer in two intervals = dead link."""
RESUBSCRIBE_BACKOFF_MAX = 2.0

# Replies that mean "try again later", not "your request is wrong".
_UNAVAILABLE_REPLIES = (
    "BUSY",
    "LOADING",
    "MASTERDOWN",
    "NOREPLICAS",
    "OOM",
    "TRYAGAIN",
    "CLUSTERDOWN",
)

# ---------------------------------------------------------------------------
# Lua. Every change-producing script gets KEYS[1..3] = seq, changes, tenants and
# ARGV[1] = the notification channel; its own keys and arguments follow.

_KIND_CONSTANTS = "\n".join(f"local KIND_{k.name} = {json.dumps(k.value)}" for k in ChangeKind)

_PRELUDE = (
    _KIND_CONSTANTS
    + """
local SEQ, FEED, TENANTS, CHANNEL = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local last_seq = nil
local function change(kind, tenant, key)
  last_seq = redis.call('INCR', SEQ)
  local now = redis.call('TIME')[1]
  local member = string.format('%d', last_seq) .. '|' .. now .. '|' .. kind .. '|' .. tenant
  redis.call('ZADD', FEED, last_seq, member .. '|' .. key)
end
local function notify()
  if last_seq then redis.call('PUBLISH', CHANNEL, string.format('%d', last_seq)) end
end
local function has_tenant(tenant)
  return redis.call('HEXISTS', TENANTS, tenant) == 1
end
-- byte order: Lua's '<' follows the server's LC_COLLATE
local function less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
"""
)

_CREATE_TENANT = """
if redis.call('HSETNX', TENANTS, ARGV[2], ARGV[3]) == 0 then return 0 end
change(KIND_TENANT, ARGV[2], '')
notify()
return 1
"""

# KEYS[4..7] = anchors, anchor-order, anchor-counter, anchor-tenants; ARGV tenant, fp, json
_ADD_ANCHOR = """
if not has_tenant(ARGV[2]) then return 'no-tenant' end
if redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4]) == 0 then return 'exists' end
redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), ARGV[3])
redis.call('SADD', KEYS[7], ARGV[2])
change(KIND_ANCHOR, ARGV[2], ARGV[3])
notify()
return 'ok'
"""

# Read-modify-write of one JSON value: KEYS[4] = hash; ARGV tenant, field,
# fields to set (JSON object), change kind ('' = no feed entry).
_MERGE = """
if not has_tenant(ARGV[2]) then return {'no-tenant'} end
local old = redis.call('HGET', KEYS[4], ARGV[3])
if not old then return {'missing'} end
local value = cjson.decode(old)
for k, v in pairs(cjson.decode(ARGV[4])) do value[k] = v end
local new = cjson.encode(value)
redis.call('HSET', KEYS[4], ARGV[3], new)
if ARGV[5] ~= '' then
  change(ARGV[5], ARGV[2], ARGV[3])
  notify()
end
return {'ok', new}
"""

# KEYS[4..7] = anchors, anchor-order, anchor-tenants, options; ARGV tenant, fp, ca-key option
_DELETE_ANCHOR = """
if not has_tenant(ARGV[2]) then return 'no-tenant' end
if redis.call('HDEL', KEYS[4], ARGV[3]) == 0 then return 'missing' end
redis.call('ZREM', KEYS[5], ARGV[3])
redis.call('SREM', KEYS[6], ARGV[2])
redis.call('HDEL', KEYS[7], ARGV[4])
change(KIND_ANCHOR, ARGV[2], ARGV[3])
notify()
return 'ok'
"""

# KEYS[4..3+n] = revocation hashes of n tenants; ARGV[2] = n, ARGV[3..2+n] = the
# tenants, then (tenant number, serial hex, revoked_at) triples.
_ADD_REVOCATIONS = """
local n = tonumber(ARGV[2])
for i = 1, n do
  if not has_tenant(ARGV[2 + i]) then return {'no-tenant', ARGV[2 + i]} end
end
local added = 0
for j = 3 + n, #ARGV, 3 do
  local i = tonumber(ARGV[j])
  local hash, serial = KEYS[3 + i], ARGV[j + 1]
  if redis.call('HEXISTS', hash, serial) == 0 then
    -- entries are never deleted, so HLEN + 1 is a unique insertion number
    local order = string.format('%d', redis.call('HLEN', hash) + 1)
    redis.call('HSET', hash, serial, order .. '|' .. ARGV[j + 2])
    added = added + 1
    change(KIND_REVOCATION, ARGV[2 + i], serial)
  end
end
notify()
return {'ok', added}
"""

# KEYS[4] = crl-settings; ARGV tenant, json
_SET_SETTINGS = """
if not has_tenant(ARGV[2]) then return 'no-tenant' end
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
change(KIND_SETTINGS, ARGV[2], '')
notify()
return 'ok'
"""

# KEYS[4..6] = devices, pending, device-tenants; ARGV tenant, device id, json
_REGISTER_DEVICE = """
if not has_tenant(ARGV[2]) then return {'no-tenant'} end
local created = redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4])
if created == 1 then
  redis.call('SADD', KEYS[6], ARGV[2])
  change(KIND_DEVICE, ARGV[2], ARGV[3])
end
if redis.call('HDEL', KEYS[5], ARGV[3]) == 1 then change(KIND_PENDING, ARGV[2], ARGV[3]) end
notify()
return {'ok', created, redis.call('HGET', KEYS[4], ARGV[3])}
"""

# KEYS[4..5] = devices, pending; ARGV tenant, device id, json
_ADD_PENDING = """
if not has_tenant(ARGV[2]) then return 'no-tenant' end
if redis.call('HEXISTS', KEYS[4], ARGV[3]) == 1 then return 'registered' end
if redis.call('HSETNX', KEYS[5], ARGV[3], ARGV[4]) == 0 then return 'exists' end
change(KIND_PENDING, ARGV[2], ARGV[3])
notify()
return 'ok'
"""

# KEYS[4] = pending; ARGV tenant, device id
_CONSUME_PENDING = """
if not has_tenant(ARGV[2]) then return {'no-tenant'} end
local value = redis.call('HGET', KEYS[4], ARGV[3])
if not value then return {'missing'} end
redis.call('HDEL', KEYS[4], ARGV[3])
change(KIND_PENDING, ARGV[2], ARGV[3])
notify()
return {'ok', value}
"""

# KEYS[4] = provisioned:<t>:<id>; ARGV tenant, serial hex, json, keep
_RECORD_PROVISIONED = """
if not has_tenant(ARGV[2]) then return 'no-tenant' end
local old = redis.call('HGET', KEYS[4], ARGV[3])
if old then
  local value, seen = cjson.decode(old), cjson.decode(ARGV[4]).last_seen
  if less(value.last_seen, seen) then value.last_seen = seen end
  redis.call('HSET', KEYS[4], ARGV[3], cjson.encode(value))
else
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
end
local keep = tonumber(ARGV[5])
if redis.call('HLEN', KEYS[4]) <= keep then return 'ok' end
local all = redis.call('HGETALL', KEYS[4])
local rows = {}
for i = 1, #all, 2 do rows[#rows + 1] = {all[i], cjson.decode(all[i + 1]).not_before} end
-- newest not_before first; serial hex has no leading zeros, so longer is larger
table.sort(rows, function(a, b)
  if a[2] ~= b[2] then return less(b[2], a[2]) end
  if #a[1] ~= #b[1] then return #a[1] > #b[1] end
  return less(b[1], a[1])
end)
for i = keep + 1, #rows do redis.call('HDEL', KEYS[4], rows[i][1]) end
return 'ok'
"""

# Tenant-checked HSET / HDEL without a feed entry: KEYS[4] = hash, KEYS[5] = an
# index set to add the tenant to ('' = none); ARGV tenant, 'set' | 'del', field, value
_TENANT_HASH = """
if not has_tenant(ARGV[2]) then return 'no-tenant' end
if ARGV[3] == 'del' then
  redis.call('HDEL', KEYS[4], ARGV[4])
else
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
end
if KEYS[5] ~= '' then redis.call('SADD', KEYS[5], ARGV[2]) end
return 'ok'
"""

# KEYS = audit, audit-id, then the four indexes; ARGV json, time text
_ADD_AUDIT = """
local id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], id, ARGV[1])
local member = ARGV[2] .. '|' .. string.format('%020d', id)
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], 0, member) end
return id
"""

# KEYS = seq, changes; ARGV cutoff (unix seconds), keep rows, batch
_TRIM = """
local bound = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[2])
if bound < 1 then return 0 end
local rows = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', bound, 'LIMIT', 0, tonumber(ARGV[3]))
local cutoff, removed = tonumber(ARGV[1]), 0
for _, row in ipairs(rows) do
  -- oldest first, and the server clock rarely steps back: stop at the first young one
  if tonumber(string.match(row, '^%d+|(%d+)|')) >= cutoff then break end
  redis.call('ZREM', KEYS[2], row)
  removed = removed + 1
end
return removed
"""

_SCRIPTS = {
    "create_tenant": _CREATE_TENANT,
    "add_anchor": _ADD_ANCHOR,
    "merge": _MERGE,
    "delete_anchor": _DELETE_ANCHOR,
    "add_revocations": _ADD_REVOCATIONS,
    "set_settings": _SET_SETTINGS,
    "register_device": _REGISTER_DEVICE,
    "add_pending": _ADD_PENDING,
    "consume_pending": _CONSUME_PENDING,
    "record_provisioned": _RECORD_PROVISIONED,
    "tenant_hash": _TENANT_HASH,
}
_PLAIN_SCRIPTS = {"add_audit": _ADD_AUDIT, "trim": _TRIM}


# ---------------------------------------------------------------------------
# value encoding


def _opt_time(value: datetime | None) -> str | None:
    return None if value is None else encode_time(value)


def _opt_decode(value: Any) -> datetime | None:
    return None if value is None else decode_time(str(value))


def _anchor_json(cert: TrustedCertificate) -> str:
    return json.dumps(
        {
            "name": cert.name,
            "status": cert.status.value,
            "auto_registration": cert.auto_registration,
            "pem": cert.pem,
            "proof_of_possession_valid": cert.proof_of_possession_valid,
            "tenant_ca": cert.tenant_ca,
            "pop_code": cert.pop_code,
            "pop_code_until": _opt_time(cert.pop_code_until),
            "created": _opt_time(cert.created),
        }
    )


def _anchor(tenant: str, fingerprint: str, raw: str) -> TrustedCertificate:
    v = json.loads(raw)
    return TrustedCertificate(
        tenant=tenant,
        fingerprint=fingerprint,
        name=str(v["name"]),
        status=Status(v["status"]),
        auto_registration=bool(v["auto_registration"]),
        pem=str(v["pem"]),
        proof_of_possession_valid=bool(v["proof_of_possession_valid"]),
        tenant_ca=bool(v["tenant_ca"]),
        pop_code=None if v["pop_code"] is None else str(v["pop_code"]),
        pop_code_until=_opt_decode(v["pop_code_until"]),
        created=_opt_decode(v["created"]),
    )


def _device(tenant: str, device_id: str, raw: str) -> DeviceUser:
    v = json.loads(raw)
    return DeviceUser(
        tenant=tenant,
        device_id=device_id,
        enabled=bool(v["enabled"]),
        registered_via=str(v["registered_via"]),
        created=_opt_decode(v["created"]),
        last_connect=_opt_decode(v["last_connect"]),
    )


def _pending_json(pending: PendingRegistration) -> str:
    return json.dumps(
        {
            "otp_hash": pending.otp_hash,
            "attributes": [list(pair) for pair in pending.attributes],
            "created": _opt_time(pending.created),
        }
    )


def _pending(tenant: str, device_id: str, raw: str) -> PendingRegistration:
    v = json.loads(raw)
    return PendingRegistration(
        tenant=tenant,
        device_id=device_id,
        otp_hash=None if v["otp_hash"] is None else str(v["otp_hash"]),
        attributes=tuple((str(k), str(x)) for k, x in v["attributes"]),
        created=_opt_decode(v["created"]),
    )


def _provisioned(tenant: str, device_id: str, serial_hex: str, raw: str) -> ProvisionedCertificate:
    v = json.loads(raw)
    return ProvisionedCertificate(
        tenant=tenant,
        device_id=device_id,
        serial=int(serial_hex, 16),
        not_before=decode_time(v["not_before"]),
        not_after=decode_time(v["not_after"]),
        fingerprint=str(v["fingerprint"]),
        first_seen=decode_time(v["first_seen"]),
        last_seen=decode_time(v["last_seen"]),
    )


def _admin(tenant: str, username: str, raw: str) -> AdminUser:
    v = json.loads(raw)
    return AdminUser(
        tenant=tenant,
        username=username,
        password_hash=str(v["password_hash"]),
        roles=frozenset(str(r) for r in v["roles"]),
        enabled=bool(v["enabled"]),
    )


def _audit(audit_id: int, raw: str) -> AuditRecord:
    v = json.loads(raw)
    return AuditRecord(
        id=audit_id,
        tenant=str(v["tenant"]),
        type=str(v["type"]),
        activity=str(v["activity"]),
        text=str(v["text"]),
        time=decode_time(v["time"]),
        user=str(v["user"]),
        source=str(v["source"]),
        severity=str(v["severity"]),
    )


def _change(member: str) -> Change:
    seq, _at, kind, tenant, key = member.split("|", 4)
    return Change(seq=int(seq), kind=ChangeKind(kind), tenant=tenant, key=key)


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# ---------------------------------------------------------------------------


class RedisStore(Store):
    """A :class:`Store` in Redis, shared by several gateway processes and the CLI.

    Also offers :meth:`wait_for_change`, which the trust follower uses to
    refresh as soon as any instance changed something.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "mtlsgw",
        timeout: float = 2.0,
        change_retention: timedelta = timedelta(days=7),
        change_keep_rows: int = 100_000,
    ) -> None:
        if not NAMESPACE_RE.fullmatch(namespace):
            raise StoreError(f"invalid Redis namespace {namespace!r}: 1-64 of A-Z a-z 0-9 _ . -")
        self.url = url
        self.namespace = namespace
        self.timeout = timeout
        self.change_retention = change_retention
        self.change_keep_rows = change_keep_rows
        self.channel = f"{namespace}:changes"
        self._where = _redact(url)
        self._prefix = f"{{{namespace}}}:"
        # redis-py's own annotations and the older types-redis stubs disagree
        # (generic Redis[str], aclose), so the client stays Any here; every
        # result is converted explicitly where it is read.
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._listener: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, namespace={self.namespace!r})"

    # plumbing ----------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _translate(self, exc: RedisError | OSError) -> StoreError:
        where = f"Redis store {self._where}"
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            return StoreUnavailable(f"{where} unavailable: {detail}")
        # redis-py strips the error code from the replies it maps to a class
        code = getattr(exc, "status_code", None) or detail.split(" ", 1)[0]
        if isinstance(exc, ReadOnlyError) or code in _UNAVAILABLE_REPLIES:
            return StoreUnavailable(f"{where} cannot take the request now: {detail}")
        return StoreError(f"{where}: {detail}")

    async def _call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(client)``; redis-py errors leave as store errors."""
        client = self._client
        if client is None:
            raise StoreUnavailable(f"Redis store {self._where} is not open")
        try:
            return await op(client)
        except (RedisError, OSError) as exc:
            raise self._translate(exc) from exc

    async def _multi(self, build: Callable[[Any], object]) -> list[Any]:
        """Queue commands with ``build(pipe)``; run them as one MULTI/EXEC snapshot."""

        async def op(client: Any) -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                build(pipe)
                return list(await pipe.execute())

        return await self._call(op)

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        """A change-producing script: the common keys and channel come first."""
        common = [self._key("seq"), self._key("changes"), self._key("tenants")]
        script = self._scripts.get(name)
        if script is None:
            raise StoreUnavailable(f"Redis store {self._where} is not open")
        return await self._call(
            lambda _client: script(keys=[*common, *keys], args=[self.channel, *args])
        )

    @staticmethod
    def _tenant_missing(tenant: str) -> NotFound:
        return NotFound(f"tenant {tenant} not found")

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            raise StoreError(f"store {self._where} is already open")
        try:
            client = redis.asyncio.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
                client_name=f"mtls-gateway:{self.namespace}",
            )
        except ValueError as exc:
            raise StoreError(f"bad store URL {self._where}: {exc}") from exc
        self._client = client
        self._scripts = {n: client.register_script(_PRELUDE + s) for n, s in _SCRIPTS.items()}
        self._scripts.update({n: client.register_script(s) for n, s in _PLAIN_SCRIPTS.items()})
        self._changed = asyncio.Event()
        try:
            await self._check_schema()
            await self.trim_changes()
        except BaseException:
            await self.close()
            raise

    async def _check_schema(self) -> None:
        key = self._key("schema")

        async def op(client: Any) -> str:
            await client.set(key, SCHEMA_VERSION, nx=True)
            return str(await client.get(key))

        found = await self._call(op)
        if not found.isdigit() or int(found) > SCHEMA_VERSION:
            raise StoreError(
                f"Redis store {self._where} namespace {self.namespace} has layout version"
                f" {found}, newer than this build's {SCHEMA_VERSION}: upgrade mtls-gateway"
            )

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:  # closing a dead connection
                log.debug("closing Redis store %s: %s", self._where, exc)

    async def ping(self) -> None:
        await self._call(lambda client: client.ping())

    async def trim_changes(self) -> int:
        """Trim the change feed now (see the module docstring); returns entries removed."""
        cutoff = int((datetime.now(UTC) - self.change_retention).timestamp())
        keys = [self._key("seq"), self._key("changes")]
        script = self._scripts["trim"]
        total = 0
        args = [cutoff, self.change_keep_rows, TRIM_BATCH]
        while True:
            removed = int(await self._call(lambda _c: script(keys=keys, args=args)))
            total += removed
            if removed < TRIM_BATCH:
                return total

    # change notifications -----------------------------------------------------
    # the name the trust follower looks for; a plain timeout reads better there
    async def wait_for_change(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s for a change notification from any instance.

        True when one arrived since the previous call returned (notifications
        are coalesced: meant for one follower per store). The first call
        starts the subscriber; each (re)subscription also counts as a change,
        since notifications sent while unsubscribed are lost. Never raises
        for a lost Redis: it just returns False when the time is up.
        """
        if self._client is None:
            raise StoreUnavailable(f"Redis store {self._where} is not open")
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="redis-store-changes")
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    async def _listen(self) -> None:
        """Subscriber task: sets ``_changed`` per notification; resubscribes after a loss."""
        loop = asyncio.get_running_loop()
        backoff, lost = 0.1, False
        while self._client is not None:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                last_heard = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=PUBSUB_PING_INTERVAL)
                    if message is None:
                        # a half-open TCP connection is silent, not closed: probe it
                        if loop.time() - last_heard > 2 * PUBSUB_PING_INTERVAL:
                            raise RedisConnectionError("no answer to PING from the subscriber")
                        await pubsub.ping()
                        continue
                    last_heard = loop.time()
                    if message["type"] == "subscribe":
                        # Only now does Redis deliver to us: whatever changed
                        # before may have gone unnoticed, so report a change.
                        if lost:
                            log.info("Redis change notifications resumed (%s)", self._where)
                        backoff, lost = 0.1, False
                        self._changed.set()
                    elif message["type"] == "message":
                        self._changed.set()
            except (RedisError, OSError) as exc:
                if not lost:
                    log.warning(
                        "Redis change notifications lost (%s): %s; polling until they resume",
                        self._where,
                        exc,
                    )
                lost = True
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError) as exc:
                    log.debug("closing the Redis subscriber: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESUBSCRIBE_BACKOFF_MAX)

    # tenants -----------------------------------------------------------------
    async def create_tenant(self, tenant: str) -> bool:
        # fullmatch too: TENANT_ID_RE ends in "$", which also accepts "t1\n"
        if not (valid_tenant_id(tenant) and TENANT_ID_RE.fullmatch(tenant)):
            raise StoreError(f"invalid tenant id {tenant!r}: 1-64 of A-Z a-z 0-9 _ -")
        now = encode_time(datetime.now(UTC))
        return int(await self._script("create_tenant", [], [tenant, now])) == 1

    async def list_tenants(self) -> list[str]:
        tenants = await self._call(lambda client: client.hkeys(self._key("tenants")))
        return sorted(str(t) for t in tenants)

    async def tenant_exists(self, tenant: str) -> bool:
        if not valid_tenant_id(tenant):
            return False
        return bool(await self._call(lambda c: c.hexists(self._key("tenants"), tenant)))

    async def _read_in_tenant(self, tenant: str, build: Callable[[Any], object]) -> list[Any]:
        """Check the tenant and run ``build``'s commands in one snapshot."""
        if not valid_tenant_id(tenant):
            # keys embed the tenant id: never let an invalid one address other keys
            raise self._tenant_missing(tenant)

        def queue(pipe: Any) -> None:
            pipe.hexists(self._key("tenants"), tenant)
            build(pipe)

        exists, *results = await self._multi(queue)
        if not exists:
            raise self._tenant_missing(tenant)
        return results

    # trusted certificates ----------------------------------------------------
    async def add_trusted_certificate(self, cert: TrustedCertificate) -> None:
        tenant, fp = cert.tenant, cert.fingerprint
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        keys = [
            self._key("anchors", tenant),
            self._key("anchor-order", tenant),
            self._key("anchor-counter"),
            self._key("anchor-tenants", fp),
        ]
        status = await self._script("add_anchor", keys, [tenant, fp, _anchor_json(cert)])
        if status == "no-tenant":
            raise self._tenant_missing(tenant)
        if status == "exists":
            raise Conflict(f"trusted certificate {fp} already exists in tenant {tenant}")

    async def get_trusted_certificate(self, tenant: str, fingerprint: str) -> TrustedCertificate:
        (raw,) = await self._read_in_tenant(
            tenant, lambda p: p.hget(self._key("anchors", tenant), fingerprint)
        )
        if raw is None:
            raise NotFound(f"trusted certificate {fingerprint} not found in tenant {tenant}")
        return _anchor(tenant, fingerprint, raw)

    async def _anchors_of(self, tenants: Sequence[str]) -> list[tuple[float, TrustedCertificate]]:
        def queue(pipe: Any) -> None:
            for t in tenants:
                pipe.zrange(self._key("anchor-order", t), 0, -1, withscores=True)
                pipe.hgetall(self._key("anchors", t))

        results = await self._multi(queue)
        found: list[tuple[float, TrustedCertificate]] = []
        for i, tenant in enumerate(tenants):
            order, values = results[2 * i], results[2 * i + 1]
            for fp, score in order:
                raw = values.get(fp)
                if raw is not None:
                    found.append((float(score), _anchor(tenant, str(fp), raw)))
        return found

    async def list_trusted_certificates(
        self, tenant: str | None = None
    ) -> list[TrustedCertificate]:
        if tenant is None:
            tenants = await self.list_tenants()
        elif valid_tenant_id(tenant):
            tenants = [tenant]
        else:
            return []
        found = await self._anchors_of(tenants)
        return [cert for _, cert in sorted(found, key=lambda pair: pair[0])]

    async def find_trusted_certificates(self, fingerprint: str) -> list[TrustedCertificate]:
        members = await self._call(lambda c: c.smembers(self._key("anchor-tenants", fingerprint)))
        tenants = sorted(str(t) for t in members)

        def queue(pipe: Any) -> None:
            for t in tenants:
                pipe.zscore(self._key("anchor-order", t), fingerprint)
                pipe.hget(self._key("anchors", t), fingerprint)

        results = await self._multi(queue)
        found = [
            (float(results[2 * i]), _anchor(t, fingerprint, results[2 * i + 1]))
            for i, t in enumerate(tenants)
            if results[2 * i] is not None and results[2 * i + 1] is not None
        ]
        return [cert for _, cert in sorted(found, key=lambda pair: pair[0])]

    async def update_trusted_certificate(
        self,
        tenant: str,
        fingerprint: str,
        *,
        name: str | None = None,
        status: Status | None = None,
        auto_registration: bool | None = None,
        proof_of_possession_valid: bool | None = None,
        pop_code: str | None = None,
        pop_code_until: datetime | None = None,
        clear_pop_code: bool = False,
        pem: str | None = None,
    ) -> TrustedCertificate:
        if clear_pop_code and (pop_code is not None or pop_code_until is not None):
            raise StoreError("clear_pop_code cannot be combined with pop_code or pop_code_until")
        fields: dict[str, object] = {
            k: v
            for k, v in {
                "name": name,
                "status": None if status is None else status.value,
                "auto_registration": auto_registration,
                "proof_of_possession_valid": proof_of_possession_valid,
                "pop_code": pop_code,
                "pop_code_until": _opt_time(pop_code_until),
                "pem": pem,
            }.items()
            if v is not None
        }
        if clear_pop_code:
            fields.update(pop_code=None, pop_code_until=None)
        raw = await self._merge(
            "anchors", tenant, fingerprint, fields, ChangeKind.ANCHOR, "trusted certificate"
        )
        return _anchor(tenant, fingerprint, raw)

    async def _merge(
        self,
        hash_name: str,
        tenant: str,
        field: str,
        fields: dict[str, object],
        kind: ChangeKind | None,
        what: str,
    ) -> str:
        """Set ``fields`` of one stored JSON object; returns the new JSON."""
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        args = [tenant, field, json.dumps(fields), "" if kind is None else kind.value]
        reply = await self._script("merge", [self._key(hash_name, tenant)], args)
        if reply[0] == "no-tenant":
            raise self._tenant_missing(tenant)
        if reply[0] == "missing":
            raise NotFound(f"{what} {field} not found in tenant {tenant}")
        return str(reply[1])

    async def delete_trusted_certificate(self, tenant: str, fingerprint: str) -> None:
        """Delete the anchor and its tenant-CA private key option ``ca-key:<fingerprint>``."""
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        keys = [
            self._key("anchors", tenant),
            self._key("anchor-order", tenant),
            self._key("anchor-tenants", fingerprint),
            self._key("options", tenant),
        ]
        args = [tenant, fingerprint, CA_KEY_OPTION_PREFIX + fingerprint]
        status = await self._script("delete_anchor", keys, args)
        if status == "no-tenant":
            raise self._tenant_missing(tenant)
        if status == "missing":
            raise NotFound(f"trusted certificate {fingerprint} not found in tenant {tenant}")

    # revocation --------------------------------------------------------------
    async def add_revocations(self, entries: Sequence[RevocationEntry]) -> tuple[int, int]:
        """Batches of :data:`REVOCATION_BATCH`, each atomic.

        Every tenant is checked before the first batch (tenants are never
        deleted), so an unknown tenant writes nothing. Should Redis fail
        between batches, calling again with the same entries completes the
        import: duplicates keep the existing entry.
        """
        rows = [(e.tenant, e.serial_hex, encode_time(e.revoked_at)) for e in entries]
        if not rows:
            return 0, 0
        tenants = sorted({t for t, _, _ in rows})
        for t in tenants:
            if not valid_tenant_id(t):
                raise self._tenant_missing(t)
        exists = await self._call(lambda c: c.hmget(self._key("tenants"), tenants))
        for t, present in zip(tenants, exists, strict=True):
            if present is None:
                raise self._tenant_missing(t)
        added = 0
        for batch in chunks(rows, REVOCATION_BATCH):
            batch_tenants = sorted({t for t, _, _ in batch})
            number = {t: i + 1 for i, t in enumerate(batch_tenants)}
            keys = [self._key("revocations", t) for t in batch_tenants]
            args: list[object] = [len(batch_tenants), *batch_tenants]
            for t, serial, at in batch:
                args += [number[t], serial, at]
            reply = await self._script("add_revocations", keys, args)
            if reply[0] == "no-tenant":
                raise self._tenant_missing(str(reply[1]))
            added += int(reply[1])
        return added, len(rows) - added

    async def list_revocations(self, tenant: str) -> list[RevocationEntry]:
        if not valid_tenant_id(tenant):
            return []
        values = await self._call(lambda c: c.hgetall(self._key("revocations", tenant)))
        ordered = []
        for serial, value in values.items():
            order, at = str(value).split("|", 1)
            ordered.append((int(order), RevocationEntry(tenant, int(serial, 16), decode_time(at))))
        return [entry for _, entry in sorted(ordered, key=lambda pair: pair[0])]

    async def get_revocation_settings(self, tenant: str) -> RevocationSettings:
        (raw,) = await self._read_in_tenant(
            tenant, lambda p: p.hget(self._key("crl-settings"), tenant)
        )
        if raw is None:
            return RevocationSettings()
        v = json.loads(raw)
        return RevocationSettings(offline=bool(v["offline"]), online=bool(v["online"]))

    async def set_revocation_settings(self, tenant: str, settings: RevocationSettings) -> None:
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        value = json.dumps({"offline": settings.offline, "online": settings.online})
        status = await self._script("set_settings", [self._key("crl-settings")], [tenant, value])
        if status == "no-tenant":
            raise self._tenant_missing(tenant)

    # device users ------------------------------------------------------------
    async def register_device(
        self, tenant: str, device_id: str, via: str, now: datetime
    ) -> tuple[DeviceUser, bool]:
        """Create-if-absent in one script: race-free across processes and instances.

        A new user is enabled, ``registered_via=via``, ``created=now`` and has
        no ``last_connect`` yet (call :meth:`touch_device`).
        """
        value = json.dumps(
            {
                "enabled": True,
                "registered_via": via,
                "created": encode_time(now),
                "last_connect": None,
            }
        )
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        keys = [
            self._key("devices", tenant),
            self._key("pending", tenant),
            self._key("device-tenants", device_id),
        ]
        reply = await self._script("register_device", keys, [tenant, device_id, value])
        if reply[0] == "no-tenant":
            raise self._tenant_missing(tenant)
        return _device(tenant, device_id, str(reply[2])), int(reply[1]) == 1

    async def get_device(self, tenant: str, device_id: str) -> DeviceUser:
        (raw,) = await self._read_in_tenant(
            tenant, lambda p: p.hget(self._key("devices", tenant), device_id)
        )
        if raw is None:
            raise NotFound(f"device {device_id} not found in tenant {tenant}")
        return _device(tenant, device_id, raw)

    async def list_devices(self, tenant: str) -> list[DeviceUser]:
        if not valid_tenant_id(tenant):
            return []
        values = await self._call(lambda c: c.hgetall(self._key("devices", tenant)))
        return [_device(tenant, str(d), values[d]) for d in sorted(values)]

    async def find_device_tenants(self, device_id: str) -> list[str]:
        members = await self._call(lambda c: c.smembers(self._key("device-tenants", device_id)))
        return sorted(str(t) for t in members)

    async def set_device_enabled(self, tenant: str, device_id: str, enabled: bool) -> DeviceUser:
        raw = await self._merge(
            "devices", tenant, device_id, {"enabled": enabled}, ChangeKind.DEVICE, "device"
        )
        return _device(tenant, device_id, raw)

    async def touch_device(self, tenant: str, device_id: str, now: datetime) -> None:
        fields: dict[str, object] = {"last_connect": encode_time(now)}
        await self._merge("devices", tenant, device_id, fields, None, "device")

    # pending (bulk) registrations ---------------------------------------------
    async def add_pending_registration(self, pending: PendingRegistration) -> None:
        tenant, device_id = pending.tenant, pending.device_id
        value = _pending_json(pending)
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        keys = [self._key("devices", tenant), self._key("pending", tenant)]
        status = await self._script("add_pending", keys, [tenant, device_id, value])
        if status == "no-tenant":
            raise self._tenant_missing(tenant)
        if status == "registered":
            raise Conflict(f"device {device_id} is already registered in tenant {tenant}")
        if status == "exists":
            raise Conflict(
                f"a pending registration of device {device_id} already exists in tenant {tenant}"
            )

    async def get_pending_registration(self, tenant: str, device_id: str) -> PendingRegistration:
        (raw,) = await self._read_in_tenant(
            tenant, lambda p: p.hget(self._key("pending", tenant), device_id)
        )
        if raw is None:
            raise NotFound(
                f"pending registration of device {device_id} not found in tenant {tenant}"
            )
        return _pending(tenant, device_id, raw)

    async def list_pending_registrations(self, tenant: str) -> list[PendingRegistration]:
        if not valid_tenant_id(tenant):
            return []
        values = await self._call(lambda c: c.hgetall(self._key("pending", tenant)))
        return [_pending(tenant, str(d), values[d]) for d in sorted(values)]

    async def consume_pending_registration(
        self, tenant: str, device_id: str
    ) -> PendingRegistration:
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        reply = await self._script(
            "consume_pending", [self._key("pending", tenant)], [tenant, device_id]
        )
        if reply[0] == "no-tenant":
            raise self._tenant_missing(tenant)
        if reply[0] == "missing":
            raise NotFound(
                f"pending registration of device {device_id} not found in tenant {tenant}"
            )
        return _pending(tenant, device_id, str(reply[1]))

    # provisioned certificates -------------------------------------------------
    async def record_provisioned_certificate(self, cert: ProvisionedCertificate) -> None:
        """Upsert, keeping ``first_seen``; ``last_seen`` never moves backwards."""
        value = json.dumps(
            {
                "not_before": encode_time(cert.not_before),
                "not_after": encode_time(cert.not_after),
                "fingerprint": cert.fingerprint,
                "first_seen": encode_time(cert.first_seen),
                "last_seen": encode_time(cert.last_seen),
            }
        )
        if not valid_tenant_id(cert.tenant):
            raise self._tenant_missing(cert.tenant)
        key = self._key("provisioned", cert.tenant, cert.device_id)
        args = [cert.tenant, cert.serial_hex, value, PROVISIONED_KEEP]
        if await self._script("record_provisioned", [key], args) == "no-tenant":
            raise self._tenant_missing(cert.tenant)

    async def list_provisioned_certificates(
        self, tenant: str, device_id: str
    ) -> list[ProvisionedCertificate]:
        """Newest ``not_before`` first (then the larger serial)."""
        if not valid_tenant_id(tenant):
            return []
        values = await self._call(lambda c: c.hgetall(self._key("provisioned", tenant, device_id)))
        certs = [_provisioned(tenant, device_id, str(s), v) for s, v in values.items()]
        return sorted(certs, key=lambda c: (c.not_before, c.serial), reverse=True)

    # admin users -------------------------------------------------------------
    async def put_admin_user(self, user: AdminUser) -> None:
        value = json.dumps(
            {
                "password_hash": user.password_hash,
                "roles": sorted(user.roles),
                "enabled": user.enabled,
            }
        )
        await self._tenant_hash(
            user.tenant,
            "admins",
            "set",
            user.username,
            value,
            index=self._key("admin-tenants", user.username),
        )

    async def get_admin_user(self, tenant: str, username: str) -> AdminUser:
        (raw,) = await self._read_in_tenant(
            tenant, lambda p: p.hget(self._key("admins", tenant), username)
        )
        if raw is None:
            raise NotFound(f"admin user {username} not found in tenant {tenant}")
        return _admin(tenant, username, raw)

    async def find_admin_users(self, username: str) -> list[AdminUser]:
        members = await self._call(lambda c: c.smembers(self._key("admin-tenants", username)))
        tenants = sorted(str(t) for t in members)

        def queue(pipe: Any) -> None:
            for t in tenants:
                pipe.hget(self._key("admins", t), username)

        values = await self._multi(queue)
        return [_admin(t, username, v) for t, v in zip(tenants, values, strict=True) if v]

    async def list_admin_users(self, tenant: str) -> list[AdminUser]:
        if not valid_tenant_id(tenant):
            return []
        raw = await self._call(lambda c: c.hgetall(self._key("admins", tenant)))
        return sorted(
            (_admin(tenant, str(name), value) for name, value in raw.items()),
            key=lambda u: u.username,
        )

    # secrets and options -----------------------------------------------------
    async def _tenant_hash(
        self, tenant: str, hash_name: str, op: str, field: str, value: str, index: str = ""
    ) -> None:
        if not valid_tenant_id(tenant):
            raise self._tenant_missing(tenant)
        keys = [self._key(hash_name, tenant), index]
        if await self._script("tenant_hash", keys, [tenant, op, field, value]) == "no-tenant":
            raise self._tenant_missing(tenant)

    async def set_option(self, tenant: str, key: str, value: str) -> None:
        await self._tenant_hash(tenant, "options", "set", key, value)

    async def get_option(self, tenant: str, key: str) -> str | None:
        """None when the option (or the tenant) does not exist."""
        if not valid_tenant_id(tenant):
            return None
        value = await self._call(lambda c: c.hget(self._key("options", tenant), key))
        return None if value is None else str(value)

    async def delete_option(self, tenant: str, key: str) -> None:
        """Idempotent for a missing key; :class:`NotFound` for a missing tenant."""
        await self._tenant_hash(tenant, "options", "del", key, "")

    # audit -------------------------------------------------------------------
    def _audit_indexes(self, tenant: str | None, type_: str | None) -> list[str]:
        """The lex index for each filter combination (all four for a record)."""
        index = self._key("audit-index")
        if tenant is None and type_ is None:
            return [index]
        if type_ is None:
            return [f"{index}:tenant:{tenant}"]
        if tenant is None:
            return [f"{index}:type:{type_}"]
        return [f"{index}:tenant-type:{len(tenant)}:{tenant}:{type_}"]

    async def add_audit(self, record: AuditRecord) -> int:
        """Append (``record.id`` is ignored). The tenant need not exist."""
        at = encode_time(record.time)
        value = json.dumps(
            {
                "tenant": record.tenant,
                "type": record.type,
                "activity": record.activity,
                "text": record.text,
                "time": at,
                "user": record.user,
                "source": record.source,
                "severity": record.severity,
            }
        )
        indexes = [
            *self._audit_indexes(None, None),
            *self._audit_indexes(record.tenant, None),
            *self._audit_indexes(None, record.type),
            *self._audit_indexes(record.tenant, record.type),
        ]
        keys = [self._key("audit"), self._key("audit-id"), *indexes]
        script = self._scripts.get("add_audit")
        if script is None:
            raise StoreUnavailable(f"Redis store {self._where} is not open")
        return int(await self._call(lambda _c: script(keys=keys, args=[value, at])))

    async def list_audit(self, query: AuditQuery, page: Page) -> tuple[list[AuditRecord], int]:
        """Newest ``time`` first (then newest id); ``date_from``/``date_to`` inclusive."""
        if page.page_size < 1 or page.current_page < 1:
            raise StoreError(
                f"bad page (page_size={page.page_size}, current_page={page.current_page}):"
                " both must be at least 1"
            )
        (index,) = self._audit_indexes(query.tenant, query.type)
        # members are "<27-char time>|<20-digit id>": '|' and '~' bracket every id
        low = "-" if query.date_from is None else f"[{encode_time(query.date_from)}|"
        high = "+" if query.date_to is None else f"[{encode_time(query.date_to)}|~"
        offset = (page.current_page - 1) * page.page_size

        def queue(pipe: Any) -> None:
            pipe.zlexcount(index, low, high)
            pipe.zrevrangebylex(index, high, low, start=offset, num=page.page_size)

        total, members = await self._multi(queue)
        ids = [int(str(m).rsplit("|", 1)[1]) for m in members]
        if not ids:
            return [], int(total)
        values = await self._call(lambda c: c.hmget(self._key("audit"), ids))
        records = [_audit(i, v) for i, v in zip(ids, values, strict=True) if v is not None]
        return records, int(total)

    # change feed -------------------------------------------------------------
    async def change_seq(self) -> int:
        value = await self._call(lambda c: c.get(self._key("seq")))
        return 0 if value is None else int(value)

    async def changes_since(self, seq: int, limit: int = 10000) -> list[Change]:
        """Safe to poll by seq: scripts run one at a time, so seqs commit in order."""
        if limit < 1:
            raise StoreError(f"bad limit {limit}: must be at least 1")
        members = await self._call(
            lambda c: c.zrangebyscore(self._key("changes"), f"({seq}", "+inf", start=0, num=limit)
        )
        return [_change(str(m)) for m in members]
