"""EST (RFC 7030) request handling, sans I/O: CSR bodies in, response bodies out.

The HTTP adapter authenticates the request (Basic auth with the enrollment
OTP for ``/simpleenroll``; the device's certificate, token or password for
``/simplereenroll``), then calls, in order:

1. :func:`parse_csr` on the body (size-bounded, base64/PEM/DER, key policy,
   proof of possession, CN present);
2. :func:`check_enroll` with the authenticated device id;
3. :func:`trust.ca.ca_usable_for_enrollment` (else :func:`ca_unavailable`) and
   :func:`trust.ca.sign_device_certificate`;
4. :func:`enroll_response` for the body and content type, and
   :func:`enrollment_audit` for the audit record.

Every refusal is an :class:`EstError` (a :class:`trust.ca.CaError`) whose
``status`` is the HTTP status to answer with, so one ``except CaError`` in the
adapter covers this module and the CA.

Suggested answers for the spec's messages (spec: "Enroll a device
certificate", "What to do when the enrollment process has been compromised"):
:func:`ca_unavailable` 409, :func:`keypair_missing` 500, :func:`no_request` 401.
Answer :func:`no_request` for a wrong OTP too (and still run
:func:`verify_otp` when no request exists): distinct answers would tell an
attacker which device ids have pending enrollments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from trust.ca import CA_UNAVAILABLE, KEYPAIR_MISSING, CaError, CsrRejected, check_csr
from trust.certs import serial_hex

__all__ = [
    "CA_UNAVAILABLE",
    "CONTENT_TYPE_PEM",
    "CONTENT_TYPE_PKCS7",
    "KEYPAIR_MISSING",
    "MAX_CSR_BYTES",
    "NO_REQUEST",
    "OTP_HASH_SCHEME",
    "EstError",
    "EstResponse",
    "ca_unavailable",
    "cacerts_response",
    "certs_only_pkcs7_base64",
    "check_enroll",
    "decode_csr",
    "enroll_response",
    "enrollment_audit",
    "hash_otp",
    "keypair_missing",
    "no_request",
    "parse_csr",
    "pem_certificate",
    "verify_otp",
    "wants_pem",
]

MAX_CSR_BYTES = 64 * 1024
"""Largest accepted request body: an RSA 8192 CSR in base64 is under 3 KiB."""
MAX_OTP_BYTES = 1024
"""Longer one-time passwords are refused before hashing (bounded work per request)."""

NO_REQUEST = (
    "No newDeviceRequest found for this ID. It may already be registered, "
    "check the audit logs for details."
)
"""Spec: no pending enrollment for this device (or its OTP was used already)."""

CONTENT_TYPE_PKCS7 = "application/pkcs7-mime; smime-type=certs-only"
"""RFC 7030 §4.1.3 / §4.2.3: certs-only CMS, base64-encoded."""
CONTENT_TYPE_PEM = "application/pkcs10"
"""Spec: with ``Accept: application/pkcs10`` the platform answers a PEM
certificate under this (misnamed, but expected by its clients) media type."""

AUDIT_ACTIVITY = "Tenant certificate authority (CA) signed certificate for device"
AUDIT_TYPE = "TenantCertificateAuthority"

_B64_LINE = 64
_PEM_CSR = re.compile(
    rb"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----(.*?)-----END (?:NEW )?CERTIFICATE REQUEST-----",
    re.DOTALL,
)
_WHITESPACE = re.compile(rb"[ \t\r\n\v\f]+")
_B64_CHARS = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


class EstError(CaError):
    """An EST request is refused: ``status`` is the HTTP status, ``message`` the
    reason a device operator can act on (never secrets)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)


def ca_unavailable() -> EstError:
    """No usable tenant CA (409: the tenant's state, not the request, is wrong)."""
    return EstError(409, CA_UNAVAILABLE)


def keypair_missing() -> EstError:
    """The CA certificate exists but its private key cannot be read (500: ours)."""
    return EstError(500, KEYPAIR_MISSING)


def no_request() -> EstError:
    """No pending enrollment matches the credentials (401, RFC 7030 §3.2.3)."""
    return EstError(401, NO_REQUEST)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def parse_csr(body: bytes, content_transfer_encoding: str | None) -> x509.CertificateSigningRequest:
    """The PKCS#10 request of a ``/simpleenroll`` or ``/simplereenroll`` body.

    RFC 7030 §4.2.1 specifies base64-encoded DER; whitespace and line breaks
    are tolerated (RFC 2045 §6.8 decoders ignore them), and so, for
    robustness, are a PEM block and raw DER (sniffed, whatever the
    Content-Transfer-Encoding header says). The request must then pass
    :func:`trust.ca.check_csr`. Raises :class:`EstError` only: 413 when the
    body is too large, 400 otherwise.
    """
    csr = decode_csr(body, content_transfer_encoding)
    try:
        check_csr(csr)
    except CsrRejected as exc:
        raise EstError(400, exc.message) from None
    return csr


def decode_csr(
    body: bytes, content_transfer_encoding: str | None
) -> x509.CertificateSigningRequest:
    """:func:`parse_csr` without :func:`trust.ca.check_csr`.

    For an adapter that hands the request straight to
    :func:`trust.ca.sign_device_certificate`, which runs the same check: the
    CSR's signature verification is the most expensive step of an enrollment
    (~0.3 ms), so it should run once.
    """
    # Bound the input before looking at it (STYLE: bound every buffer).
    if len(body) > MAX_CSR_BYTES:
        raise EstError(413, f"the request body is larger than {MAX_CSR_BYTES} bytes")
    cte = (content_transfer_encoding or "").strip()
    if cte.lower() not in ("", "base64", "binary", "7bit", "8bit"):
        raise EstError(
            400,
            f"unsupported Content-Transfer-Encoding {cte[:40]!r}; "
            "send the CSR base64-encoded (RFC 7030 §4.2.1)",
        )
    der = _csr_der(bytes(body))
    try:
        return x509.load_der_x509_csr(der)
    except Exception:
        raise EstError(
            400, "the request body is not a PKCS#10 certificate signing request (CSR)"
        ) from None


def check_enroll(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    """The CSR must ask for exactly the authenticated device's identity.

    Spec: "The Common Name (CN) field in the CSR subject must exactly match
    the device ID" (case-sensitive, no normalisation). A mismatch is 403: the
    credentials are valid but do not authorise that subject (RFC 7030 §3.7
    leaves this authorisation to the server; RFC 9110 §15.5.4), the request
    itself is well formed. For ``/simplereenroll`` RFC 7030 §4.2.2 asks for
    the same subject as the current certificate, which for our CN-only
    certificates is the same check. Other subject attributes are ignored: the
    issued certificate carries the CN only.
    """
    try:
        cn = check_csr(csr)
    except CsrRejected as exc:
        raise EstError(400, exc.message) from None
    if cn != device_id:
        raise EstError(
            403, f"the CSR's Common Name {cn!r} does not match the device id {device_id!r}"
        )


def _csr_der(body: bytes) -> bytes:
    stripped = body.strip()
    if not stripped:
        raise EstError(400, "the request body is empty; send a base64-encoded PKCS#10 CSR")
    if b"-----BEGIN" in stripped:
        match = _PEM_CSR.search(stripped)
        if match is None:
            raise EstError(400, "the PEM body holds no CERTIFICATE REQUEST block")
        return _b64decode(match.group(1), "the PEM CERTIFICATE REQUEST block")
    # A DER SEQUENCE starts with 0x30 followed by a length octet; long-form
    # lengths (0x81/0x82) are not base64 characters, so DER is never mistaken
    # for base64 text.
    if stripped[0] == 0x30 and not _B64_CHARS.fullmatch(_WHITESPACE.sub(b"", stripped)):
        # Only leading whitespace can be dropped: trailing octets may be DER.
        return body.lstrip()
    return _b64decode(stripped, "the request body")


def _b64decode(text: bytes, what: str) -> bytes:
    compact = _WHITESPACE.sub(b"", text)
    if not _B64_CHARS.fullmatch(compact) or len(compact) % 4 == 1:
        raise EstError(
            400, f"{what} is not base64: send the DER CSR base64-encoded (RFC 7030 §4.2.1)"
        )
    # Some clients drop the padding; restore it rather than refuse.
    compact += b"=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise EstError(400, f"{what} is not valid base64") from None


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EstResponse:
    """What the adapter sends for a successful enrollment (status 201, per the spec)."""

    content_type: str
    body: bytes
    content_transfer_encoding: str | None
    """``"base64"`` for the PKCS#7 body (RFC 7030 §4.2.3), None for PEM."""


def certs_only_pkcs7_base64(certs: Sequence[x509.Certificate]) -> bytes:
    """A degenerate, certs-only CMS SignedData, DER, base64 in 64-character lines.

    RFC 7030 §4.1.3 and §4.2.3 (``application/pkcs7-mime; smime-type=certs-only``,
    base64). Lines of 64 stay within RFC 2045 §6.8's 76 and match PEM habits.
    Raises ``ValueError`` for an empty list (a local error).
    """
    if not certs:
        raise ValueError("a certs-only response needs at least one certificate")
    der = pkcs7.serialize_certificates(list(certs), Encoding.DER)
    text = base64.b64encode(der)
    return b"".join(text[i : i + _B64_LINE] + b"\n" for i in range(0, len(text), _B64_LINE))


def cacerts_response(ca_certs: Sequence[x509.Certificate]) -> bytes:
    """The ``/cacerts`` body (RFC 7030 §4.1.3): the tenant's CA certificates,
    duplicates dropped, in the same certs-only format."""
    unique: dict[bytes, x509.Certificate] = {}
    for cert in ca_certs:
        unique.setdefault(cert.public_bytes(Encoding.DER), cert)
    return certs_only_pkcs7_base64(list(unique.values()))


def pem_certificate(cert: x509.Certificate) -> bytes:
    """The issued certificate as PEM (spec: the ``Accept: application/pkcs10`` answer)."""
    return cert.public_bytes(Encoding.PEM)


def wants_pem(accept: str | None) -> bool:
    """True when the client's Accept header asks for ``application/pkcs10``.

    Spec: PKCS#7 is the default, "Clients can optionally request for a PKCS10
    format by sending Accept: application/pkcs10". A media range with ``q=0``
    is a refusal (RFC 9110 §12.4.2), not a request.
    """
    if not accept:
        return False
    for item in accept[:1024].split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if media.lower() != "application/pkcs10":
            continue
        q = next((p.split("=", 1)[1] for p in params if p.lower().startswith("q=")), "1")
        try:
            if float(q) > 0:
                return True
        except ValueError:
            continue
    return False


def enroll_response(cert: x509.Certificate, accept: str | None) -> EstResponse:
    """The body and content type for an issued certificate, per the Accept header."""
    if wants_pem(accept):
        return EstResponse(CONTENT_TYPE_PEM, pem_certificate(cert), None)
    return EstResponse(CONTENT_TYPE_PKCS7, certs_only_pkcs7_base64([cert]), "base64")


# ---------------------------------------------------------------------------
# One-time passwords
# ---------------------------------------------------------------------------

OTP_HASH_SCHEME = "hmac-sha256"
"""Prefix of a stored OTP hash: ``hmac-sha256$<salt>$<mac>`` (base64url, unpadded)."""
MIN_OTP_KEY_BYTES = 16
_OTP_SALT_BYTES = 16
_OTP_CONTEXT = b"mtls-gateway/est-otp/v1\x00"


def hash_otp(otp: str, key: bytes) -> str:
    """The stored form of an enrollment OTP: a salted HMAC-SHA256 under ``key``.

    Why not a password hash (argon2): an OTP is a one-time secret checked once,
    and a memory-hard hash (~0.1 s, 64 MiB) would cap enrollment at ~10/s per
    core. The key is a server-side secret kept outside the store (derived
    from the KEK), so a stolen store alone cannot be brute-forced offline;
    the random salt hides which devices share an OTP. Raises ``ValueError``
    for an empty or oversized OTP or a short key (local errors).
    """
    if not otp:
        raise ValueError("the enrollment OTP must not be empty")
    data = otp.encode("utf-8")
    if len(data) > MAX_OTP_BYTES:
        raise ValueError(f"the enrollment OTP must be at most {MAX_OTP_BYTES} bytes")
    _check_otp_key(key)
    salt = secrets.token_bytes(_OTP_SALT_BYTES)
    return f"{OTP_HASH_SCHEME}${_b64url(salt)}${_b64url(_otp_mac(key, salt, data))}"


def verify_otp(stored_hash: str | None, otp: str, key: bytes) -> bool:
    """True when ``otp`` matches ``stored_hash`` (constant-time comparison).

    Never raises on peer input. With ``stored_hash=None`` (no pending request)
    or an unreadable hash a MAC is still computed, so a miss costs the same
    as a wrong OTP.
    """
    _check_otp_key(key)
    data = otp.encode("utf-8", "surrogatepass")
    if len(data) > MAX_OTP_BYTES:
        return False
    parsed = _parse_otp_hash(stored_hash) if stored_hash is not None else None
    salt, expected = parsed if parsed is not None else (b"\x00" * _OTP_SALT_BYTES, b"")
    actual = _otp_mac(key, salt, data)
    return hmac.compare_digest(actual, expected) and parsed is not None


def _check_otp_key(key: bytes) -> None:
    if len(key) < MIN_OTP_KEY_BYTES:
        raise ValueError(f"the OTP key must be at least {MIN_OTP_KEY_BYTES} bytes")


def _otp_mac(key: bytes, salt: bytes, otp: bytes) -> bytes:
    return hmac.new(key, _OTP_CONTEXT + salt + otp, hashlib.sha256).digest()


def _parse_otp_hash(stored: str) -> tuple[bytes, bytes] | None:
    scheme, _, rest = stored.partition("$")
    salt_text, _, mac_text = rest.partition("$")
    if scheme != OTP_HASH_SCHEME:
        return None
    try:
        salt, mac = _b64url_decode(salt_text), _b64url_decode(mac_text)
    except ValueError:
        return None
    if len(salt) != _OTP_SALT_BYTES or len(mac) != hashlib.sha256().digest_size:
        return None
    return salt, mac


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if len(text) > 64:
        raise ValueError("too long")
    padded = text.encode("ascii") + b"=" * (-len(text) % 4)  # UnicodeEncodeError is a ValueError
    try:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except binascii.Error:
        raise ValueError("not base64url") from None


# ---------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------


def enrollment_audit(device_id: str, serial: int) -> tuple[str, str, str]:
    """(activity, type, text) of the audit record for an issued certificate.

    Spec ("What to do when the enrollment process has been compromised"):
    operators search for this activity and type, and for the text
    ``Certificate serial number hex: '<serial>'`` (lower-case hex, as
    :func:`trust.certs.serial_hex` and the revocation list spell serials).
    """
    text = (
        f"Tenant CA signed a certificate for device {device_id!r}. "
        f"Certificate serial number hex: '{serial_hex(serial)}'"
    )
    return AUDIT_ACTIVITY, AUDIT_TYPE, text
