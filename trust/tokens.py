"""Device access tokens: signed JWTs (RFC 7519) naming a verified device.

Spec ("HTTP"): a device that authenticated with its certificate over MQTT gets
a session token (``71,<token>`` on ``s/dat``) and uses it for HTTP requests
(``Authorization: Bearer``). Pure: PyJWT does the JOSE work, ``now`` is passed
in, and the live checks (device disabled, certificate revoked, anchor
disabled) read a :class:`~trust.snapshot.TrustSnapshot`.

Security choices:

- **Asymmetric keys only, the algorithm pinned per key id.** Each
  verification key carries the one algorithm it accepts; a token whose
  header names another (``none``, ``HS256`` with the public key as the HMAC
  secret, ``RS256`` against an EC key, ...) is refused before any signature
  check (RFC 8725 §3.1, §3.2).
- **Rotation by ``kid``** (RFC 7515 §4.1.4): the ``kid`` defaults to the RFC
  7638 JWK thumbprint of the public key; a verifier holds old and new keys
  until the old tokens have expired.
- **Claims bind the certificate:** ``serial`` (device certificate) and
  ``chain`` (every serial of the verified chain, an addition of ours, so
  revoking an intermediate also kills tokens), ``anchor`` (trusted
  certificate fingerprint), ``tenant`` and ``device``. A token therefore dies
  with its certificate, device user or anchor (:func:`token_still_valid`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trust.model import DeviceIdentity, Reason, Rejection, device_username, valid_tenant_id
from trust.snapshot import TrustSnapshot

__all__ = [
    "DEFAULT_ISSUER",
    "MAX_TOKEN_CHARS",
    "TokenClaims",
    "TokenError",
    "TokenReason",
    "TokenSigner",
    "TokenVerifier",
    "VerificationKey",
    "format_token_response",
    "jwk_thumbprint",
    "token_still_valid",
]

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

DEFAULT_ISSUER = "mtls-gateway"
MAX_TOKEN_CHARS = 8192
"""Longer bearer strings are refused unparsed (bounded work per request)."""
TOKEN_RESPONSE_PREFIX = b"71,"
"""The platform's SmartREST answer on ``s/dat`` carrying the token."""

# RFC 7518 §3.1: the asymmetric algorithms we accept, and what key each needs.
_EC_ALGS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_ASYMMETRIC = frozenset({*_EC_ALGS, *_RSA_ALGS, "EdDSA"})
_MAX_CHAIN = 32
_HEX = re.compile(r"[0-9a-f]{1,40}")


class TokenReason(StrEnum):
    """Why a token was refused (logs and metrics use these codes)."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    WRONG_ALGORITHM = "wrong_algorithm"
    BAD_SIGNATURE = "bad_signature"
    MISSING_CLAIMS = "missing_claims"
    BAD_CLAIMS = "bad_claims"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"


class TokenError(Exception):
    """A bearer token is refused. Every reason is HTTP 401 with
    ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750 §3.1)."""

    status = 401

    def __init__(self, reason: TokenReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified content of a device access token."""

    kid: str
    issuer: str
    subject: str
    """The device user name, ``device_<device id>``."""
    tenant: str
    device_id: str
    serial: int
    """Serial number of the device certificate the token was issued for."""
    anchor_fingerprint: str
    chain_serials: tuple[int, ...]
    """Serials of the chain verified at issuance, device certificate first."""
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    token_id: str
    """``jti``: unique per token (for logs, or a deny-list if one is ever needed)."""

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that verifies tokens of one ``kid`` with one algorithm."""

    kid: str
    algorithm: str
    public_key: PublicKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_key_algorithm(self.public_key, self.algorithm)

    @classmethod
    def from_public_key(
        cls, public_key: PublicKey, *, kid: str | None = None, algorithm: str | None = None
    ) -> VerificationKey:
        """Default ``kid``: the RFC 7638 thumbprint; default algorithm: from the key."""
        return cls(
            kid=kid or jwk_thumbprint(public_key),
            algorithm=algorithm or _default_algorithm(public_key),
            public_key=public_key,
        )


class TokenSigner:
    """Issues device access tokens with one private key."""

    __slots__ = ("_alg", "_issuer", "_key", "_kid")

    def __init__(
        self,
        key: SigningKey,
        *,
        issuer: str = DEFAULT_ISSUER,
        kid: str | None = None,
        algorithm: str | None = None,
    ) -> None:
        """``algorithm`` defaults to the key's (ES256 for P-256); ``kid`` to the
        RFC 7638 thumbprint of the public key."""
        public = key.public_key()
        self._alg = algorithm or _default_algorithm(public)
        _check_key_algorithm(public, self._alg)
        self._key = key
        self._kid = kid or jwk_thumbprint(public)
        self._issuer = issuer

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def algorithm(self) -> str:
        return self._alg

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def verification_key(self) -> VerificationKey:
        """What a :class:`TokenVerifier` needs to accept this signer's tokens."""
        return VerificationKey(self._kid, self._alg, self._key.public_key())

    def issue(self, identity: DeviceIdentity, now: datetime, lifetime: timedelta) -> str:
        """A token for ``identity`` valid from ``now`` for ``lifetime`` (whole seconds)."""
        seconds = math.ceil(lifetime.total_seconds())
        if seconds <= 0:
            raise ValueError("token lifetime must be positive")
        iat = _timestamp(now)
        chain = identity.chain_serials
        if chain[:1] != (identity.leaf_serial,):  # the verified chain starts at the leaf
            chain = (identity.leaf_serial, *chain)
        if len(chain) > _MAX_CHAIN:
            raise ValueError(f"a chain of more than {_MAX_CHAIN} certificates cannot be bound")
        payload = {
            "iss": self._issuer,
            "sub": identity.username,
            "tenant": identity.tenant,
            "device": identity.device_id,
            "serial": identity.serial_hex,
            "chain": [format(s, "x") for s in chain],
            "anchor": identity.anchor_fingerprint,
            "iat": iat,
            "nbf": iat,
            "exp": iat + seconds,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(payload, self._key, algorithm=self._alg, headers={"kid": self._kid})


class TokenVerifier:
    """Verifies device access tokens against a set of keys, by ``kid``.

    Immutable: :meth:`with_key` / :meth:`without_key` return new verifiers,
    so rotating keys is swapping one reference.
    """

    __slots__ = ("_issuer", "_keys", "_leeway")

    def __init__(
        self,
        keys: Iterable[VerificationKey],
        *,
        issuer: str = DEFAULT_ISSUER,
        leeway: timedelta = timedelta(0),
    ) -> None:
        """``leeway`` widens nbf/exp for clock skew between gateway instances."""
        self._keys: Mapping[str, VerificationKey] = {k.kid: k for k in keys}
        self._issuer = issuer
        self._leeway = leeway

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def with_key(self, key: VerificationKey) -> TokenVerifier:
        return TokenVerifier([*self._keys.values(), key], issuer=self._issuer, leeway=self._leeway)

    def without_key(self, kid: str) -> TokenVerifier:
        keys = [k for k in self._keys.values() if k.kid != kid]
        return TokenVerifier(keys, issuer=self._issuer, leeway=self._leeway)

    def verify(self, token: str, now: datetime) -> TokenClaims:
        """The claims of a valid token at ``now``, else :class:`TokenError`."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise TokenError(TokenReason.MALFORMED, "the token is empty or too long")
        if not token.isascii() or token.count(".") != 2:
            raise TokenError(TokenReason.MALFORMED, "the token is not a signed JWT (JWS compact)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError(TokenReason.MALFORMED, "the token header does not decode") from None
        alg = header.get("alg")
        # RFC 8725 §3.1: never "none", never HMAC (a public key is no secret).
        if not isinstance(alg, str) or alg not in _ASYMMETRIC:
            raise TokenError(
                TokenReason.WRONG_ALGORITHM, f"algorithm {str(alg)[:20]!r} is not accepted"
            )
        if "crit" in header:
            # RFC 7515 §4.1.11: we understand no critical header extension.
            raise TokenError(TokenReason.MALFORMED, "the token has critical header extensions")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError(TokenReason.UNKNOWN_KEY, "the token's key id (kid) is not known")
        if alg != key.algorithm:
            # RFC 8725 §3.1: the algorithm is the key's, not the token's choice.
            raise TokenError(
                TokenReason.WRONG_ALGORITHM,
                f"algorithm {alg} is not the algorithm of key {kid!r} ({key.algorithm})",
            )
        try:
            payload = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm],
                # Times and claims are checked below, against ``now``, not the clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenError(
                TokenReason.BAD_SIGNATURE, "the token's signature is invalid"
            ) from None
        except jwt.InvalidAlgorithmError:  # pragma: no cover - pinned above
            raise TokenError(TokenReason.WRONG_ALGORITHM, "algorithm not accepted") from None
        except jwt.PyJWTError:
            raise TokenError(TokenReason.MALFORMED, "the token's payload does not decode") from None
        claims = self._claims(key.kid, payload)
        leeway = self._leeway
        moment = _utc(now)
        # RFC 7519 §4.1.5: not accepted before nbf; §4.1.4: only before exp.
        if moment < claims.not_before - leeway:
            raise TokenError(
                TokenReason.NOT_YET_VALID,
                f"the token is not valid before {claims.not_before.isoformat()}",
            )
        if moment >= claims.expires_at + leeway:
            raise TokenError(
                TokenReason.EXPIRED, f"the token expired at {claims.expires_at.isoformat()}"
            )
        return claims

    def _claims(self, kid: str, payload: dict[str, Any]) -> TokenClaims:
        required = ("iss", "sub", "tenant", "device", "serial", "anchor", "iat", "nbf", "exp")
        missing = [name for name in (*required, "jti") if name not in payload]
        if missing:
            raise TokenError(
                TokenReason.MISSING_CLAIMS, f"the token lacks claims: {', '.join(missing)}"
            )
        strings = {n: payload[n] for n in ("iss", "sub", "tenant", "device", "anchor", "jti")}
        for name, value in strings.items():
            if not isinstance(value, str) or not value:
                raise TokenError(TokenReason.BAD_CLAIMS, f"claim {name!r} must be a string")
        if strings["iss"] != self._issuer:
            raise TokenError(TokenReason.BAD_CLAIMS, "the token was issued by someone else")
        tenant, device = strings["tenant"], strings["device"]
        if not valid_tenant_id(tenant):
            raise TokenError(TokenReason.BAD_CLAIMS, "claim 'tenant' is not a tenant id")
        if strings["sub"] != device_username(device):
            raise TokenError(TokenReason.BAD_CLAIMS, "claim 'sub' does not name claim 'device'")
        serial = _hex_claim(payload["serial"], "serial")
        chain_raw = payload.get("chain", [payload["serial"]])
        if not isinstance(chain_raw, list) or not 1 <= len(chain_raw) <= _MAX_CHAIN:
            raise TokenError(TokenReason.BAD_CLAIMS, "claim 'chain' must be a list of serials")
        chain = tuple(_hex_claim(s, "chain") for s in chain_raw)
        if chain[0] != serial:
            raise TokenError(TokenReason.BAD_CLAIMS, "claim 'chain' does not start with 'serial'")
        times = {n: payload[n] for n in ("iat", "nbf", "exp")}
        for name, value in times.items():
            # bool is an int in Python, not a NumericDate (RFC 7519 §2).
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TokenError(
                    TokenReason.BAD_CLAIMS, f"claim {name!r} must be an integer NumericDate"
                )
            if value > 253402300799:  # 9999-12-31T23:59:59Z: keeps datetime in range
                raise TokenError(TokenReason.BAD_CLAIMS, f"claim {name!r} is out of range")
        if times["exp"] <= times["nbf"]:
            raise TokenError(TokenReason.BAD_CLAIMS, "the token expires before it is valid")
        return TokenClaims(
            kid=kid,
            issuer=strings["iss"],
            subject=strings["sub"],
            tenant=tenant,
            device_id=device,
            serial=serial,
            anchor_fingerprint=strings["anchor"],
            chain_serials=chain,
            issued_at=datetime.fromtimestamp(times["iat"], UTC),
            not_before=datetime.fromtimestamp(times["nbf"], UTC),
            expires_at=datetime.fromtimestamp(times["exp"], UTC),
            token_id=strings["jti"],
        )


def token_still_valid(claims: TokenClaims, snapshot: TrustSnapshot) -> Rejection | None:
    """Apply the live rules to a verified token: None when it may be used.

    The same rules as a connection (:func:`trust.policy.decide`): the device
    user must exist and be enabled; when the tenant's offline revocation check
    is on, no serial of the chain may be revoked; the anchor must still be a
    trusted certificate of the tenant and enabled. A deleted device user also
    kills the token (spec: tokens are useless once the user is disabled, and
    deleting is the stronger act). Online CRL checks need a fetcher and are
    the caller's.
    """
    tenant, device_id = claims.tenant, claims.device_id
    user = snapshot.device(tenant, device_id)
    if user is None:
        return Rejection(
            Reason.NOT_REGISTERED,
            f"device user {device_username(device_id)} no longer exists in tenant {tenant}",
            tenant=tenant,
            device_id=device_id,
        )
    if not user.enabled:
        return Rejection(
            Reason.DEVICE_DISABLED,
            f"device user {device_username(device_id)} is disabled in tenant {tenant}",
            tenant=tenant,
            device_id=device_id,
        )
    trust = snapshot.tenant(tenant)
    if trust.settings.offline:
        for serial in claims.chain_serials:
            if serial in trust.revoked:
                role = "device" if serial == claims.serial else "chain"
                return Rejection(
                    Reason.REVOKED,
                    f"{role} certificate serial {serial:x} is revoked in tenant {tenant}",
                    tenant=tenant,
                    device_id=device_id,
                )
    anchors = [
        a for a in snapshot.by_fingerprint.get(claims.anchor_fingerprint, ()) if a.tenant == tenant
    ]
    if not anchors:
        return Rejection(
            Reason.UNTRUSTED,
            "the trusted certificate the token was issued under was removed",
            tenant=tenant,
            device_id=device_id,
        )
    if not any(a.enabled for a in anchors):
        return Rejection(
            Reason.ANCHOR_DISABLED,
            "the trusted certificate the token was issued under is disabled",
            tenant=tenant,
            device_id=device_id,
        )
    return None


def format_token_response(token: str) -> bytes:
    """The ``s/dat`` payload carrying a token: ``71,<token>``."""
    return TOKEN_RESPONSE_PREFIX + token.encode("ascii")


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of a public key.

    Only the required members, sorted, no whitespace (RFC 7638 §3.2-3.3).
    """
    members: dict[str, str]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
            public_key.curve.name
        )
        if crv is None:
            raise ValueError(f"EC curve {public_key.curve.name} has no JWK name")
        size = (public_key.curve.key_size + 7) // 8
        nums = public_key.public_numbers()
        members = {
            "crv": crv,
            "kty": "EC",
            "x": _b64url(nums.x.to_bytes(size, "big")),
            "y": _b64url(nums.y.to_bytes(size, "big")),
        }
    elif isinstance(public_key, rsa.RSAPublicKey):
        rsa_nums = public_key.public_numbers()
        members = {"e": _b64url(_uint(rsa_nums.e)), "kty": "RSA", "n": _b64url(_uint(rsa_nums.n))}
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    else:
        raise ValueError(f"unsupported key type {type(public_key).__name__}")
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode("ascii")
    return _b64url(hashlib.sha256(canonical).digest())


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _default_algorithm(public_key: PublicKey) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for alg, curve in _EC_ALGS.items():
            if public_key.curve.name == curve:
                return alg
        raise ValueError(f"EC curve {public_key.curve.name} is not usable for JWS")
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(public_key).__name__}")


def _check_key_algorithm(public_key: PublicKey, alg: str) -> None:
    """RFC 7518 §3.4: ESxxx names the curve; RSA keys must be >= 2048 bits (§3.3)."""
    if alg in _EC_ALGS:
        ok = (
            isinstance(public_key, ec.EllipticCurvePublicKey)
            and public_key.curve.name == _EC_ALGS[alg]
        )
    elif alg in _RSA_ALGS:
        ok = isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048
    elif alg == "EdDSA":
        ok = isinstance(public_key, ed25519.Ed25519PublicKey)
    else:
        ok = False
    if not ok:
        raise ValueError(f"algorithm {alg!r} cannot be used with this key")


def _hex_claim(value: object, name: str) -> int:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise TokenError(TokenReason.BAD_CLAIMS, f"claim {name!r} must hold hex serial numbers")
    return int(value, 16)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _timestamp(now: datetime) -> int:
    return math.floor(_utc(now).timestamp())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
