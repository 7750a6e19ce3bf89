"""Device access tokens (trust.tokens): issuing, verifying, rotation, live checks."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from trust import ca
from trust.certs import fingerprint, to_pem
from trust.model import (
    DeviceIdentity,
    DeviceUser,
    Listener,
    Reason,
    Registration,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
)
from trust.snapshot import TrustSnapshot
from trust.tokens import (
    TokenClaims,
    TokenError,
    TokenReason,
    TokenSigner,
    TokenVerifier,
    VerificationKey,
    format_token_response,
    jwk_thumbprint,
    token_still_valid,
)

NOW = datetime(2026, 3, 15, 10, 30, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
LEAF_SERIAL = 0x1234ABCD
INTER_SERIAL = 0x77


@cache
def anchor_cert() -> ca.TenantCa:
    return ca.create_tenant_ca("t1", NOW)


def ec_key(n: int = 0) -> ec.EllipticCurvePrivateKey:
    """The ``n``-th test key (``ec_key()`` and ``ec_key(0)`` are the same key)."""
    return _ec_key(n)


@cache
def _ec_key(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def identity(tenant: str = "t1", device: str = "dev1") -> DeviceIdentity:
    anchor = anchor_cert().certificate
    return DeviceIdentity(
        tenant=tenant,
        device_id=device,
        listener=Listener.MQTT_CORE,
        registration=Registration.EXISTING,
        anchor_fingerprint=fingerprint(anchor),
        leaf_fingerprint="00" * 20,
        leaf_serial=LEAF_SERIAL,
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        chain_serials=(LEAF_SERIAL, INTER_SERIAL, anchor.serial_number),
        chain_fingerprints=("00" * 20, "11" * 20, fingerprint(anchor)),
    )


def signer(n: int = 0) -> TokenSigner:
    return TokenSigner(ec_key(n))


def verifier(*signers: TokenSigner, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier([s.verification_key for s in signers or (signer(),)], **kwargs)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return payload


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(payload).encode())
    return f"{h}.{p}.{b64(signature)}"


def reason_of(token: str, at: datetime = NOW, v: TokenVerifier | None = None) -> TokenReason:
    with pytest.raises(TokenError) as info:
        (v or verifier()).verify(token, at)
    assert info.value.status == 401
    return info.value.reason


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


def test_round_trip() -> None:
    s = signer()
    token = s.issue(identity(), NOW, HOUR)
    claims = verifier(s).verify(token, NOW)
    assert claims == TokenClaims(
        kid=s.kid,
        issuer="mtls-gateway",
        subject="device_dev1",
        tenant="t1",
        device_id="dev1",
        serial=LEAF_SERIAL,
        anchor_fingerprint=fingerprint(anchor_cert().certificate),
        chain_serials=(LEAF_SERIAL, INTER_SERIAL, anchor_cert().certificate.serial_number),
        issued_at=NOW,
        not_before=NOW,
        expires_at=NOW + HOUR,
        token_id=claims.token_id,
    )
    assert claims.serial_hex == "1234abcd"
    assert claims_of(token)["serial"] == "1234abcd"
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["kid"] == s.kid == jwk_thumbprint(
        ec_key().public_key()
    )


def test_chain_claim_always_starts_at_the_device_certificate() -> None:
    s = signer()
    lone = dataclasses.replace(identity(), chain_serials=())
    assert verifier(s).verify(s.issue(lone, NOW, HOUR), NOW).chain_serials == (LEAF_SERIAL,)
    too_long = dataclasses.replace(identity(), chain_serials=tuple(range(1, 40)))
    with pytest.raises(ValueError):
        s.issue(too_long, NOW, HOUR)


def test_every_token_has_its_own_id() -> None:
    s = signer()
    ids = {verifier(s).verify(s.issue(identity(), NOW, HOUR), NOW).token_id for _ in range(20)}
    assert len(ids) == 20


def test_issuer_is_configurable_and_checked() -> None:
    s = TokenSigner(ec_key(), issuer="gw-eu")
    token = s.issue(identity(), NOW, HOUR)
    assert TokenVerifier([s.verification_key], issuer="gw-eu").verify(token, NOW).issuer == "gw-eu"
    assert reason_of(token, v=TokenVerifier([s.verification_key])) is TokenReason.BAD_CLAIMS


@pytest.mark.parametrize(
    ("make", "alg"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (rsa_key, "RS256"),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    ],
)
def test_other_key_types(make: Any, alg: str) -> None:
    s = TokenSigner(make())
    assert s.algorithm == alg
    assert verifier(s).verify(s.issue(identity(), NOW, HOUR), NOW).device_id == "dev1"


def test_rsa_pss_can_be_chosen() -> None:
    s = TokenSigner(rsa_key(), algorithm="PS256")
    assert jwt.get_unverified_header(s.issue(identity(), NOW, HOUR))["alg"] == "PS256"
    assert verifier(s).verify(s.issue(identity(), NOW, HOUR), NOW).tenant == "t1"


@pytest.mark.parametrize("alg", ["ES384", "RS256", "HS256", "none", "EdDSA"])
def test_algorithm_must_fit_the_key(alg: str) -> None:
    with pytest.raises(ValueError):
        TokenSigner(ec_key(), algorithm=alg)
    with pytest.raises(ValueError):
        VerificationKey("k", alg, ec_key().public_key())


def test_bad_lifetime_and_naive_now_are_local_errors() -> None:
    with pytest.raises(ValueError):
        signer().issue(identity(), NOW, timedelta(0))
    with pytest.raises(ValueError):
        signer().issue(identity(), datetime(2026, 1, 1), HOUR)
    token = signer().issue(identity(), NOW, HOUR)
    with pytest.raises(ValueError):
        verifier().verify(token, datetime(2026, 1, 1))


def test_jwk_thumbprint_follows_rfc_7638() -> None:
    key = ec_key().public_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, sort_keys=True, separators=(",", ":")
    )
    expected = b64(hashlib.sha256(canonical.encode()).digest())
    assert jwk_thumbprint(key) == expected
    assert len(expected) == 43
    assert jwk_thumbprint(ec_key(1).public_key()) != expected
    rsa_pub = rsa_key().public_key()
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_pub))
    rsa_canonical = json.dumps(
        {"e": rsa_jwk["e"], "kty": "RSA", "n": rsa_jwk["n"]}, separators=(",", ":")
    )
    assert jwk_thumbprint(rsa_pub) == b64(hashlib.sha256(rsa_canonical.encode()).digest())


def test_format_token_response() -> None:
    token = signer().issue(identity(), NOW, HOUR)
    assert format_token_response(token) == b"71," + token.encode()


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def test_tampered_payload() -> None:
    token = signer().issue(identity(), NOW, HOUR)
    header, _, sig = token.split(".")
    payload = claims_of(token) | {"device": "dev2", "sub": "device_dev2"}
    tampered = f"{header}.{b64(json.dumps(payload).encode())}.{sig}"
    assert reason_of(tampered) is TokenReason.BAD_SIGNATURE


def test_tampered_signature() -> None:
    token = signer().issue(identity(), NOW, HOUR)
    header, payload, sig = token.split(".")
    raw = bytearray(unb64(sig))
    raw[10] ^= 0x01
    assert reason_of(f"{header}.{payload}.{b64(bytes(raw))}") is TokenReason.BAD_SIGNATURE
    assert reason_of(f"{header}.{payload}.") is TokenReason.BAD_SIGNATURE  # stripped


def test_alg_none_is_refused() -> None:
    s = signer()
    payload = claims_of(s.issue(identity(), NOW, HOUR))
    token = forge({"alg": "none", "kid": s.kid, "typ": "JWT"}, payload)
    assert reason_of(token) is TokenReason.WRONG_ALGORITHM
    token = forge({"alg": "None", "kid": s.kid}, payload)
    assert reason_of(token) is TokenReason.WRONG_ALGORITHM


def test_hs256_with_the_public_key_as_secret_is_refused() -> None:
    """The classic key-confusion attack (RFC 8725 §2.1)."""
    s = signer()
    public_pem = ec_key().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    payload = claims_of(s.issue(identity(), NOW, HOUR)) | {"device": "admin", "sub": "device_admin"}
    header = {"alg": "HS256", "kid": s.kid, "typ": "JWT"}
    signing_input = (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}".encode()
    )
    sig = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    assert reason_of(f"{signing_input.decode()}.{b64(sig)}") is TokenReason.WRONG_ALGORITHM


def test_algorithm_of_another_key_type_is_refused() -> None:
    """An RS256 token presented under an EC key's kid."""
    s = signer()
    payload = claims_of(s.issue(identity(), NOW, HOUR))
    token = jwt.encode(payload, rsa_key(), algorithm="RS256", headers={"kid": s.kid})
    assert reason_of(token) is TokenReason.WRONG_ALGORITHM


def test_expiry_and_not_before_use_the_injected_clock() -> None:
    token = signer().issue(identity(), NOW, HOUR)
    v = verifier()
    assert v.verify(token, NOW + HOUR - timedelta(seconds=1)).device_id == "dev1"
    assert reason_of(token, NOW + HOUR) is TokenReason.EXPIRED
    assert reason_of(token, NOW + timedelta(days=30)) is TokenReason.EXPIRED
    assert reason_of(token, NOW - timedelta(seconds=1)) is TokenReason.NOT_YET_VALID
    lenient = verifier(leeway=timedelta(seconds=30))
    assert lenient.verify(token, NOW - timedelta(seconds=30)).device_id == "dev1"
    assert lenient.verify(token, NOW + HOUR + timedelta(seconds=29)).device_id == "dev1"


def test_unknown_or_missing_kid() -> None:
    s = signer()
    token = s.issue(identity(), NOW, HOUR)
    assert reason_of(token, v=verifier(signer(1))) is TokenReason.UNKNOWN_KEY
    payload = claims_of(token)
    no_kid = jwt.encode(payload, ec_key(), algorithm="ES256")
    assert reason_of(no_kid) is TokenReason.UNKNOWN_KEY
    int_kid = forge({"alg": "ES256", "kid": 5}, payload, b"x" * 64)
    assert reason_of(int_kid) in {TokenReason.MALFORMED, TokenReason.UNKNOWN_KEY}


def test_another_key_under_a_known_kid_fails_the_signature() -> None:
    impostor = TokenSigner(ec_key(1), kid=signer().kid)
    token = impostor.issue(identity(), NOW, HOUR)
    assert reason_of(token) is TokenReason.BAD_SIGNATURE


def test_key_rotation() -> None:
    old, new = signer(0), signer(1)
    old_token = old.issue(identity(), NOW, HOUR)
    new_token = new.issue(identity(), NOW, HOUR)
    both = verifier(old).with_key(new.verification_key)
    assert both.kids == {old.kid, new.kid}
    assert both.verify(old_token, NOW).kid == old.kid
    assert both.verify(new_token, NOW).kid == new.kid
    retired = both.without_key(old.kid)
    assert reason_of(old_token, v=retired) is TokenReason.UNKNOWN_KEY
    assert retired.verify(new_token, NOW).kid == new.kid


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "a.b.c.d", "é.é.é", "x" * 10000, "e30.e30.e30"],
)
def test_malformed_tokens(token: str) -> None:
    assert reason_of(token) in {TokenReason.MALFORMED, TokenReason.WRONG_ALGORITHM}


def test_critical_header_is_refused() -> None:
    s = signer()
    payload = claims_of(s.issue(identity(), NOW, HOUR))
    token = jwt.encode(
        payload, ec_key(), algorithm="ES256", headers={"kid": s.kid, "crit": ["exp"]}
    )
    assert reason_of(token) is TokenReason.MALFORMED


def _resigned(**changes: Any) -> str:
    """A token signed with the real key whose claims were altered (or removed: None)."""
    s = signer()
    payload = claims_of(s.issue(identity(), NOW, HOUR)) | changes
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, ec_key(), algorithm="ES256", headers={"kid": s.kid})


@pytest.mark.parametrize(
    "claim", ["iss", "sub", "tenant", "device", "serial", "anchor", "exp", "jti"]
)
def test_missing_claims(claim: str) -> None:
    assert reason_of(_resigned(**{claim: None})) is TokenReason.MISSING_CLAIMS


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": "device_other"},
        {"tenant": "no spaces allowed"},
        {"tenant": 5},
        {"serial": "xyz"},
        {"serial": "ABC"},  # we always write lower case
        {"chain": "1234abcd"},
        {"chain": []},
        {"chain": ["ff"]},  # does not start with the serial
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": 10**12 * 1000},
        {"nbf": int((NOW + 2 * HOUR).timestamp())},  # expires before valid
        {"anchor": ""},
    ],
)
def test_bad_claims(changes: dict[str, Any]) -> None:
    assert reason_of(_resigned(**changes)) is TokenReason.BAD_CLAIMS


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        verifier().verify(text, NOW)


# ---------------------------------------------------------------------------
# Live checks against the trust snapshot
# ---------------------------------------------------------------------------


def snapshot(
    *,
    enabled: bool = True,
    device: bool = True,
    anchor_status: Status | None = Status.ENABLED,
    anchor_tenant: str = "t1",
    revoked: tuple[int, ...] = (),
    offline: bool = True,
) -> TrustSnapshot:
    anchor = anchor_cert().certificate
    certs = []
    if anchor_status is not None:
        certs.append(
            TrustedCertificate(
                tenant=anchor_tenant,
                fingerprint=fingerprint(anchor),
                name="tenant CA",
                status=anchor_status,
                auto_registration=True,
                pem=to_pem(anchor),
                tenant_ca=True,
            )
        )
    return TrustSnapshot.build(
        tenants=["t1"],
        certificates=certs,
        revocations=[RevocationEntry("t1", s, NOW) for s in revoked],
        settings={"t1": RevocationSettings(offline=offline)},
        devices=[DeviceUser("t1", "dev1", enabled=enabled)] if device else [],
    )


@cache
def live_claims() -> TokenClaims:
    s = signer()
    return verifier(s).verify(s.issue(identity(), NOW, HOUR), NOW)


def test_token_still_valid_when_nothing_changed() -> None:
    assert token_still_valid(live_claims(), snapshot()) is None


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"enabled": False}, Reason.DEVICE_DISABLED),
        ({"device": False}, Reason.NOT_REGISTERED),
        ({"revoked": (LEAF_SERIAL,)}, Reason.REVOKED),
        ({"revoked": (INTER_SERIAL,)}, Reason.REVOKED),
        ({"anchor_status": Status.DISABLED}, Reason.ANCHOR_DISABLED),
        ({"anchor_status": None}, Reason.UNTRUSTED),
        ({"anchor_tenant": "t2"}, Reason.UNTRUSTED),  # the anchor now belongs elsewhere
    ],
)
def test_token_no_longer_valid(kwargs: dict[str, Any], reason: Reason) -> None:
    rejection = token_still_valid(live_claims(), snapshot(**kwargs))
    assert rejection is not None
    assert rejection.reason is reason
    assert rejection.tenant == "t1" and rejection.device_id == "dev1"


def test_revocation_counts_only_when_the_offline_check_is_on() -> None:
    snap = snapshot(revoked=(LEAF_SERIAL,), offline=False)
    assert token_still_valid(live_claims(), snap) is None
