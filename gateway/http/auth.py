"""HTTP Basic authentication of management users, roles and login rate limits.

* Credentials: ``Authorization: Basic base64("<tenant>/<user>:<password>")``,
  or ``<user>:<password>`` when exactly one tenant has that user. Passwords
  are argon2id hashes in the store (:func:`gateway.operations.hash_password`).
* Verification is memory-hard (~0.1 s, 64 MiB): it runs in worker threads,
  at most :attr:`LoginPolicy.concurrent_verifications` at a time, and a
  verified (user, password, hash) is remembered for ``cache_ttl`` seconds as
  an HMAC under a per-process random key, so clients that send Basic
  credentials on every request do not pay it each time. A changed password
  or a disabled user takes effect at once (the hash is part of the key; the
  user record is read on every request).
* Failed logins are limited per source address and per user (sliding
  window): past the limit, attempts get 429 with ``Retry-After`` before any
  password is checked. A failure is counted *before* the slow check, so a
  burst of parallel guesses cannot slip through. Credentials proven within
  ``cache_ttl`` still pass, so an attacker guessing an admin's password
  cannot lock out that admin's running session.
* Roles (spec): ``ROLE_TENANT_ADMIN`` and ``ROLE_TENANT_MANAGEMENT_ADMIN``
  change trust settings, ``ROLE_TENANT_MANAGEMENT_READ`` reads them. A user of
  the ``management`` tenant with ``ROLE_TENANT_MANAGEMENT_ADMIN`` is an
  operator and may act on any tenant; everyone else only on their own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from gateway import operations as ops
from gateway.http.server import ApiError
from gateway.store.base import NotFound, Store, StoreError
from trust.model import MANAGEMENT_TENANT, AdminUser, AuditRecord, valid_tenant_id

__all__ = [
    "KNOWN_ROLES",
    "READ_ROLES",
    "ROLE_MANAGEMENT_ADMIN",
    "ROLE_MANAGEMENT_READ",
    "ROLE_TENANT_ADMIN",
    "WRITE_ROLES",
    "Authenticator",
    "Credentials",
    "FailureLimiter",
    "LoginPolicy",
    "Principal",
    "parse_basic",
]

log = logging.getLogger("mtls_gateway.http.auth")

ROLE_TENANT_ADMIN = "ROLE_TENANT_ADMIN"
ROLE_MANAGEMENT_ADMIN = "ROLE_TENANT_MANAGEMENT_ADMIN"
ROLE_MANAGEMENT_READ = "ROLE_TENANT_MANAGEMENT_READ"
WRITE_ROLES = frozenset({ROLE_TENANT_ADMIN, ROLE_MANAGEMENT_ADMIN})
READ_ROLES = WRITE_ROLES | {ROLE_MANAGEMENT_READ}
KNOWN_ROLES = READ_ROLES

REALM = "mtls-gateway"
MAX_AUTH_HEADER = 4096


@functools.cache
def _dummy_hash() -> str:
    """Checked when the user does not exist, so that an unknown user costs the
    same time as a wrong password (no user enumeration by timing)."""
    return ops.hash_password(os.urandom(16).hex())


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """Login limits (defaults suit an operator API; tests may lower them)."""

    user_failures: int = 5
    """Failed logins per user within ``window`` before further attempts get 429."""
    address_failures: int = 20
    """Failed logins per source address within ``window`` before 429."""
    window: float = 60.0
    """Sliding window, seconds. ``Retry-After`` is when the oldest failure leaves it."""
    cache_ttl: float = 300.0
    """Seconds a verified password is remembered (as an HMAC, never in clear)."""
    concurrent_verifications: int = 2
    """argon2 checks running at once (each takes 64 MiB and a core for ~0.1 s)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    tenant: str | None
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(tenant={self.tenant!r}, username={self.username!r})"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated management user."""

    tenant: str
    username: str
    roles: frozenset[str]

    @property
    def is_operator(self) -> bool:
        """A management-tenant management admin: may act on every tenant."""
        return self.tenant == MANAGEMENT_TENANT and ROLE_MANAGEMENT_ADMIN in self.roles

    @property
    def can_write(self) -> bool:
        return bool(self.roles & WRITE_ROLES)

    @property
    def can_read(self) -> bool:
        return bool(self.roles & READ_ROLES)

    def may_access(self, tenant: str) -> bool:
        return tenant == self.tenant or self.is_operator

    def actor(self, tenant: str) -> str:
        """Audit ``user``: the name, qualified when acting on another tenant."""
        return self.username if tenant == self.tenant else f"{self.tenant}/{self.username}"


def parse_basic(header: str) -> Credentials:
    """Decode ``Basic base64(<tenant>/<user>:<password>)``; :class:`ApiError` 401."""
    if len(header) > MAX_AUTH_HEADER:
        raise _unauthorized("Authorization header is too long")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise _unauthorized("use HTTP Basic authentication: <tenant>/<user>:<password>")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _unauthorized("Basic credentials are not valid base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    login, sep, password = text.partition(":")
    if not sep or not login:
        raise _unauthorized("Basic credentials must be <tenant>/<user>:<password>")
    tenant, slash, username = login.partition("/")
    if not slash:
        return Credentials(None, login, password)
    if not tenant or not username:
        raise _unauthorized("Basic credentials must be <tenant>/<user>:<password>")
    return Credentials(tenant, username, password)


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        "security/unauthorized",
        message,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


class FailureLimiter:
    """Sliding-window failure counter per key. Pure apart from its table: every
    method takes ``now`` (monotonic seconds). Memory is bounded by ``max_keys``."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """Keys currently tracked."""
        return len(self._failures)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when not blocked."""
        times = self._expire(key, now)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[-self.limit] + self.window - now)

    def failure(self, key: str, now: float) -> bool:
        """Count a failure; True when this one reaches the limit."""
        times = self._expire(key, now)
        if times is None:
            times = self._failures[key] = deque()
        times.append(now)
        self._failures.move_to_end(key)
        if len(self._failures) > self.max_keys:
            self._prune(now)
        return len(times) == self.limit

    def forgive(self, key: str) -> None:
        """Undo the newest failure (it was a provisional count that succeeded)."""
        times = self._failures.get(key)
        if times:
            times.pop()

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)

    def _expire(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            times = self._expire(key, now)
            if not times:
                del self._failures[key]
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)  # least recently failing first


class Authenticator:
    """Turns a request's Basic credentials into a :class:`Principal`."""

    def __init__(
        self,
        store: Store,
        policy: LoginPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy or LoginPolicy()
        self.clock = clock
        self.by_user = FailureLimiter(self.policy.user_failures, self.policy.window)
        self.by_address = FailureLimiter(self.policy.address_failures, self.policy.window)
        self._cache_key = os.urandom(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._verifying = asyncio.Semaphore(self.policy.concurrent_verifications)

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization")
        if not header:
            raise _unauthorized("authentication required")
        creds = parse_basic(header)
        user = await self._find_user(creds)
        user_key = f"{user.tenant}/{user.username}" if user else _given(creds)
        address = request.remote or "unknown"
        now = self.clock()
        proof = self._proof(creds, user)
        if proof is not None and self._is_verified(proof, now):
            return self._principal(user)
        wait = max(
            self.by_address.retry_after(address, now), self.by_user.retry_after(user_key, now)
        )
        if wait > 0:
            raise ApiError(
                429,
                "security/too_many_requests",
                "too many failed logins; try again later",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        # count first, forgive on success: parallel guesses cannot all slip through
        blocked_address = self.by_address.failure(address, now)
        blocked_user = self.by_user.failure(user_key, now)
        ok = await self._verify(user, creds.password)
        if ok and user is not None and user.enabled and proof is not None:
            self.by_address.forgive(address)
            self.by_user.reset(user_key)
            self._remember(proof, now)
            return self._principal(user)
        if blocked_address:
            log.warning("login failures from %s reached the limit: blocking it", address)
        if blocked_user:
            log.warning("login failures for user %s reached the limit: blocking it", user_key)
            if user is not None:
                await self._audit_block(user, address)
        raise _unauthorized("invalid credentials")

    # helpers ---------------------------------------------------------------------
    async def _find_user(self, creds: Credentials) -> AdminUser | None:
        try:
            if creds.tenant is not None:
                if not valid_tenant_id(creds.tenant):
                    return None
                return await self.store.get_admin_user(creds.tenant, creds.username)
            found = await self.store.find_admin_users(creds.username)
        except NotFound:
            return None
        # a bare user name must be unambiguous; otherwise the tenant is required
        return found[0] if len(found) == 1 else None

    def _proof(self, creds: Credentials, user: AdminUser | None) -> bytes | None:
        if user is None:
            return None
        material = "\x00".join((user.tenant, user.username, user.password_hash, creds.password))
        return hmac.new(
            self._cache_key, material.encode("utf-8", "replace"), hashlib.sha256
        ).digest()

    def _is_verified(self, proof: bytes, now: float) -> bool:
        until = self._verified.get(proof)
        if until is None:
            return False
        if until <= now:
            del self._verified[proof]
            return False
        return True

    def _remember(self, proof: bytes, now: float) -> None:
        self._verified[proof] = now + self.policy.cache_ttl
        self._verified.move_to_end(proof)
        while len(self._verified) > 10_000:
            self._verified.popitem(last=False)

    async def _verify(self, user: AdminUser | None, password: str) -> bool:
        def check() -> bool:
            if user is None:
                ops.verify_admin_password(AdminUser("", "", _dummy_hash()), password)
                return False
            return ops.verify_admin_password(user, password)

        async with self._verifying:
            return await asyncio.to_thread(check)

    @staticmethod
    def _principal(user: AdminUser | None) -> Principal:
        assert user is not None
        return Principal(user.tenant, user.username, frozenset(user.roles))

    async def _audit_block(self, user: AdminUser, address: str) -> None:
        policy = self.policy
        try:
            await self.store.add_audit(
                AuditRecord(
                    tenant=user.tenant,
                    type=ops.AUDIT_USER,
                    activity="Login blocked",
                    text=(
                        f"{policy.user_failures} failed logins for user {user.username} within"
                        f" {policy.window:g} s (last from {address}): further attempts refused"
                        " for a while"
                    ),
                    time=datetime.now(UTC),
                    user=user.username,
                    source=address,
                    severity="warning",
                )
            )
        except StoreError as exc:
            log.warning("could not write audit record: %s", exc)


def _given(creds: Credentials) -> str:
    return f"{creds.tenant or '*'}/{creds.username}"
