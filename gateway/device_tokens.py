"""Device access tokens in the daemon: per-tenant signing keys and the token service.

The token format, claims and live rules are pure (:mod:`trust.tokens`); this
module keeps the keys and applies the rules to the current trust snapshot.

* **Keys.** One EC P-256 key per tenant signs (ES256); it is created on the
  tenant's first token request. Tenant option :data:`KEYS_OPTION` holds::

      {"version": 1, "current": "<kid>",
       "keys": [{"kid": "...", "key": "<sealed PKCS#8>", "created": "<ISO>",
                 "retired": "<ISO>" | null}]}

  Each private key is sealed with the KEK (:mod:`gateway.secrets`, purpose
  ``device-token:<tenant>:<kid>``); ``kid`` is the RFC 7638 thumbprint.
  Per-tenant keys keep tenants apart: a token that claims tenant B but was
  signed with tenant A's key names a ``kid`` B does not have.
* **Rotation** (:func:`rotate_key`, ``mtls-gateway tokens rotate-key``) adds a
  new current key and retires the old one, which still verifies the tokens it
  signed until they expire; ``drop_old`` removes old keys at once (every earlier
  token is refused). Retired keys older than the token lifetime are pruned.
* **Caching.** :class:`DeviceTokens` keeps a tenant's keys for
  :data:`KEY_CACHE_TTL` seconds and re-reads them when a token names an unknown
  ``kid`` (at most once per :data:`RELOAD_INTERVAL` per tenant), so a rotation
  made by another instance or the CLI is followed within seconds.
* **Limits.** The store has no compare-and-set: two instances creating a
  tenant's *first* key at the same moment keep one of them; tokens signed with
  the other are refused (unknown ``kid``) and the device asks again. Tokens
  carry serial numbers, not certificates, so the online CRL check (distribution
  points) cannot be repeated for them; the offline list, the device user and
  the anchor are checked on every use.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import TokenConfig
from gateway.secrets import SecretBox, SecretError
from gateway.store.base import Store, StoreError
from gateway.trust_state import TrustState
from protocols.mqtt.server import TokenUnavailable
from trust.model import AuditRecord, DeviceIdentity, Reason, Rejection, valid_tenant_id
from trust.tokens import (
    MAX_TOKEN_CHARS,
    TokenClaims,
    TokenError,
    TokenReason,
    TokenSigner,
    TokenVerifier,
    format_token_response,
    jwk_thumbprint,
    token_still_valid,
)

__all__ = [
    "KEYS_OPTION",
    "KEY_CACHE_TTL",
    "DeviceTokens",
    "KeyInfo",
    "RotateResult",
    "TokenRefused",
    "check_kek",
    "list_keys",
    "rotate_key",
]

log = logging.getLogger("mtls_gateway.tokens")

KEYS_OPTION = "device-token.signing-keys"
"""Tenant option holding the tenant's sealed token-signing keys (JSON, see above)."""
KEY_CACHE_TTL = 10.0
"""Seconds an instance uses a tenant's keys before reading them again."""
RELOAD_INTERVAL = 1.0
"""Least seconds between re-reads caused by unknown ``kid`` values (bounded store load)."""
AUDIT_TYPE = "DeviceToken"
_ALGORITHM = "ES256"
_MIN_LIFETIME = timedelta(seconds=1)


class TokenRefused(Exception):
    """A token (to issue or to accept) that the live rules refuse, with the reason."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason.value}: {rejection.message}")
        self.rejection = rejection


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One stored signing key (the private key stays sealed)."""

    kid: str
    sealed: str
    created: datetime
    retired: datetime | None = None


@dataclass(frozen=True, slots=True)
class RotateResult:
    kid: str
    """The new current key."""
    retired: tuple[str, ...]
    """Keys kept to verify tokens they signed until those expire."""
    dropped: tuple[str, ...]
    """Keys removed: their tokens are refused from now on."""


@dataclass(frozen=True, slots=True)
class _Keys:
    current: str
    keys: tuple[KeyInfo, ...]


def _purpose(tenant: str, kid: str) -> str:
    return f"device-token:{tenant}:{kid}"


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _parse_keys(tenant: str, raw: str) -> _Keys:
    try:
        doc = json.loads(raw)
        keys = tuple(
            KeyInfo(
                kid=str(k["kid"]),
                sealed=str(k["key"]),
                created=datetime.fromisoformat(k["created"]),
                retired=datetime.fromisoformat(k["retired"]) if k.get("retired") else None,
            )
            for k in doc["keys"]
        )
        current = str(doc["current"])
    except (ValueError, KeyError, TypeError):
        raise SecretError(f"token-signing keys of tenant {tenant} are unreadable") from None
    if current not in {k.kid for k in keys}:
        raise SecretError(f"token-signing keys of tenant {tenant} name no current key")
    return _Keys(current, keys)


def _dump_keys(keys: _Keys) -> str:
    return json.dumps(
        {
            "version": 1,
            "current": keys.current,
            "keys": [
                {
                    "kid": k.kid,
                    "key": k.sealed,
                    "created": _iso(k.created),
                    "retired": _iso(k.retired) if k.retired else None,
                }
                for k in keys.keys
            ],
        }
    )


async def _read_keys(store: Store, tenant: str) -> _Keys | None:
    raw = await store.get_option(tenant, KEYS_OPTION)
    return None if raw is None else _parse_keys(tenant, raw)


def _new_key(box: SecretBox, tenant: str, now: datetime) -> KeyInfo:
    key = ec.generate_private_key(ec.SECP256R1())
    kid = jwk_thumbprint(key.public_key())
    return KeyInfo(kid, box.seal_private_key(key, _purpose(tenant, kid)), now)


async def list_keys(store: Store, tenant: str) -> tuple[str | None, tuple[KeyInfo, ...]]:
    """``(current kid, keys)`` of a tenant; ``(None, ())`` before its first token."""
    keys = await _read_keys(store, tenant)
    return (None, ()) if keys is None else (keys.current, keys.keys)


async def check_kek(store: Store, box: SecretBox, tenant: str) -> None:
    """Raise :class:`SecretError` unless ``box`` opens the tenant's current key
    (a key sealed with another KEK would be useless to the gateways)."""
    keys = await _read_keys(store, tenant)
    if keys is not None:
        current = next(k for k in keys.keys if k.kid == keys.current)
        box.open_private_key(current.sealed, _purpose(tenant, current.kid))


async def rotate_key(
    store: Store,
    box: SecretBox,
    tenant: str,
    now: datetime,
    *,
    keep_retired_for: timedelta,
    drop_old: bool = False,
    actor: str = "",
) -> RotateResult:
    """Make a new current signing key for ``tenant`` (audited).

    Old keys are retired (they verify their tokens for ``keep_retired_for``, the
    token lifetime) or, with ``drop_old``, removed at once.
    """
    old = await _read_keys(store, tenant)
    info = _new_key(box, tenant, now)
    kept: list[KeyInfo] = []
    dropped: list[str] = []
    for k in old.keys if old else ():
        retired = k.retired or now
        if drop_old or now - retired >= keep_retired_for:
            dropped.append(k.kid)
        else:
            kept.append(KeyInfo(k.kid, k.sealed, k.created, retired))
    await store.set_option(tenant, KEYS_OPTION, _dump_keys(_Keys(info.kid, (*kept, info))))
    result = RotateResult(info.kid, tuple(k.kid for k in kept), tuple(dropped))
    text = f"New device-token signing key {info.kid}"
    if result.retired:
        kept_kids = ", ".join(result.retired)
        text += f"; retired (still verifying until their tokens expire): {kept_kids}"
    if result.dropped:
        text += f"; removed (their tokens are refused): {', '.join(result.dropped)}"
    try:
        await store.add_audit(
            AuditRecord(tenant, AUDIT_TYPE, "Token signing key rotated", text, now, user=actor)
        )
    except StoreError as exc:
        log.warning("could not write audit record: %s", exc)
    return result


@dataclass(frozen=True, slots=True)
class _Ring:
    signer: TokenSigner
    verifier: TokenVerifier


@dataclass(slots=True)
class _Cached:
    ring: _Ring | None
    loaded: float


def _claimed_tenant(token: str) -> str:
    """The unverified ``tenant`` claim: it only picks whose keys verify the token."""
    if len(token) > MAX_TOKEN_CHARS or not token.isascii() or token.count(".") != 2:
        raise TokenError(TokenReason.MALFORMED, "the token is not a signed JWT (JWS compact)")
    body = token.split(".")[1]
    try:
        payload: Any = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise TokenError(TokenReason.MALFORMED, "the token's payload does not decode") from None
    tenant = payload.get("tenant") if isinstance(payload, dict) else None
    if not isinstance(tenant, str) or not valid_tenant_id(tenant):
        raise TokenError(TokenReason.BAD_CLAIMS, "claim 'tenant' is not a tenant id")
    return tenant


class DeviceTokens:
    """Issues and checks device access tokens with the tenants' stored keys."""

    def __init__(
        self,
        store: Store,
        box: SecretBox,
        trust: TrustState,
        config: TokenConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.box = box
        self.trust = trust
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self._rings: dict[str, _Cached] = {}
        self._load_lock = asyncio.Lock()

    @property
    def lifetime(self) -> timedelta:
        return timedelta(seconds=self.config.lifetime)

    async def issue(self, identity: DeviceIdentity) -> str:
        """A token for a connected device; :class:`TokenRefused` if it may not have one.

        Raises :class:`StoreError` / :class:`SecretError` when the keys are unavailable.
        """
        now = self.clock()
        # whole seconds, never past the certificate's notAfter
        seconds = math.floor(min(self.lifetime, identity.not_after - now).total_seconds())
        if timedelta(seconds=seconds) < _MIN_LIFETIME:
            raise TokenRefused(
                Rejection(
                    Reason.EXPIRED,
                    "the device certificate expires too soon for a token",
                    identity.tenant,
                    identity.device_id,
                )
            )
        ring = await self._ring(identity.tenant, create=True)
        assert ring is not None
        token = ring.signer.issue(identity, now, timedelta(seconds=seconds))
        # never hand out a token that requests would refuse
        await self._check_live(ring.verifier.verify(token, now))
        return token

    async def mqtt_answer(self, identity: DeviceIdentity) -> bytes:
        """The ``s/dat`` payload ``71,<token>`` (the MQTT front-end's ``issue_token``)."""
        try:
            token = await self.issue(identity)
        except TokenRefused as exc:
            reason = exc.rejection
            raise TokenUnavailable(f"{reason.reason.value}: {reason.message}") from None
        except (StoreError, SecretError, OSError) as exc:
            raise TokenUnavailable(f"token-signing keys unavailable: {exc}") from None
        return format_token_response(token)

    async def verify(self, token: str) -> TokenClaims:
        """The claims of a usable token: :class:`TokenError` when it is not a valid
        token of its tenant now, :class:`TokenRefused` when the live rules refuse it."""
        tenant = _claimed_tenant(token)
        if tenant not in self.trust.snapshot.tenants:
            raise TokenError(TokenReason.UNKNOWN_KEY, "the token's key id (kid) is not known")
        now = self.clock()
        try:
            ring = await self._ring(tenant, create=False)
        except SecretError as exc:
            log.error("cannot open the token keys of tenant %s: %s", tenant, exc)
            ring = None
        if ring is None:
            raise TokenError(TokenReason.UNKNOWN_KEY, "the token's key id (kid) is not known")
        try:
            claims = ring.verifier.verify(token, now)
        except TokenError as exc:
            if exc.reason is not TokenReason.UNKNOWN_KEY or not self._may_reload(tenant):
                raise
            ring = await self._ring(tenant, create=False, reload=True)  # rotated elsewhere?
            if ring is None:
                raise
            claims = ring.verifier.verify(token, now)
        if claims.tenant != tenant:  # pragma: no cover - the signature covers the claim
            raise TokenError(TokenReason.BAD_CLAIMS, "the token names another tenant")
        await self._check_live(claims)
        return claims

    async def _check_live(self, claims: TokenClaims) -> None:
        if self.trust.snapshot_too_stale():
            raise TokenRefused(
                Rejection(
                    Reason.STORE_UNAVAILABLE,
                    "the store has been unreachable for longer than the outage grace period",
                )
            )
        problem = token_still_valid(claims, self.trust.snapshot)
        if problem is not None and problem.reason is Reason.NOT_REGISTERED:
            # registered on this very connection a moment ago: not in the snapshot yet
            with contextlib.suppress(StoreError, OSError):
                await self.trust.refresh()
            problem = token_still_valid(claims, self.trust.snapshot)
        if problem is not None:
            raise TokenRefused(problem)

    def _may_reload(self, tenant: str) -> bool:
        hit = self._rings.get(tenant)
        return hit is None or self.monotonic() - hit.loaded >= RELOAD_INTERVAL

    async def _ring(self, tenant: str, *, create: bool, reload: bool = False) -> _Ring | None:
        hit = self._rings.get(tenant)
        if hit is not None and not reload and self._fresh(hit) and (hit.ring or not create):
            return hit.ring
        async with self._load_lock:  # one store read (or key creation) at a time
            hit = self._rings.get(tenant)
            if hit is not None and not reload and self._fresh(hit) and (hit.ring or not create):
                return hit.ring
            keys = await _read_keys(self.store, tenant)
            if keys is None and create:
                info = _new_key(self.box, tenant, self.clock())
                await self.store.set_option(
                    tenant, KEYS_OPTION, _dump_keys(_Keys(info.kid, (info,)))
                )
                log.info("created the device-token signing key %s of tenant %s", info.kid, tenant)
                # another instance may have written its key meanwhile: use what the store kept
                keys = await _read_keys(self.store, tenant)
            ring = self._open(tenant, keys) if keys is not None else None
            if len(self._rings) > 100_000:  # tenants are few; never grow without bound
                self._rings.clear()
            self._rings[tenant] = _Cached(ring, self.monotonic())
            return ring

    def _fresh(self, hit: _Cached) -> bool:
        return self.monotonic() - hit.loaded < KEY_CACHE_TTL

    def _open(self, tenant: str, keys: _Keys) -> _Ring:
        signer: TokenSigner | None = None
        verification = []
        for info in keys.keys:
            key = self.box.open_private_key(info.sealed, _purpose(tenant, info.kid))
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise SecretError(f"token-signing key {info.kid} of tenant {tenant} is not EC")
            current = TokenSigner(key, kid=info.kid, algorithm=_ALGORITHM)
            verification.append(current.verification_key)
            if info.kid == keys.current:
                signer = current
        assert signer is not None  # _parse_keys checked that current exists
        leeway = timedelta(seconds=self.config.leeway)
        return _Ring(signer, TokenVerifier(verification, leeway=leeway))
