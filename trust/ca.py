"""The tenant Certificate Authority: create, renew, and sign device certificates.

Spec: "Certificate authority", "Creating a CA certificate via REST",
"Auto-renewal of CA certificates", "Enroll a device certificate".

Pure: keys come in and go out as ``cryptography`` objects (encrypting them at
rest is :mod:`gateway.secrets`' job), nothing here reads the clock (every
function takes ``now``, which must be timezone-aware) and nothing touches the
store. Errors are :class:`CaError` subclasses carrying the HTTP status an
adapter answers with.

Decisions:

- **Renewal takes a new serial number.** The spec says only notBefore/notAfter
  change, and the key pair, subject, extensions (so SKI/AKI) are indeed kept.
  But a re-signed certificate with the old serial would be a second, different
  certificate with the same issuer and serial, which RFC 5280 §4.1.2.2 forbids
  (and which breaks CRLs, OCSP and the caches of TLS stacks keyed on issuer +
  serial). Device certificates name their issuer by subject and key identifier,
  neither of which changes, so they verify against the renewed certificate.
  The renewed certificate's SHA-1 fingerprint (the trusted-certificate id)
  therefore changes too: the adapter replaces the stored anchor.
- **notBefore is backdated** by :data:`NOT_BEFORE_BACKDATE` (default 5 minutes,
  overridable per call) so a gateway instance whose clock lags the issuer's
  accepts a fresh certificate at once; a renewed CA with ``notBefore = now``
  would otherwise lock every device out of such an instance for a moment.
  notAfter is always ``now`` + the nominal validity.
- **A device certificate never outlives its CA**: its notAfter is clamped to
  the CA's (see :func:`sign_device_certificate`).
"""

from __future__ import annotations

import calendar
import secrets
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trust.certs import display_name, is_ca
from trust.model import valid_tenant_id

__all__ = [
    "CA_UNAVAILABLE",
    "CA_VALIDITY",
    "DEVICE_VALIDITY",
    "KEYPAIR_MISSING",
    "NOT_BEFORE_BACKDATE",
    "RENEWAL_WINDOW_MONTHS",
    "CaError",
    "CaKey",
    "CaUnavailable",
    "CsrRejected",
    "RenewalNotAllowed",
    "TenantCa",
    "ca_usable_for_enrollment",
    "check_csr",
    "create_tenant_ca",
    "new_serial",
    "next_auto_renewal",
    "platform_subject",
    "renew_tenant_ca",
    "renewal_due",
    "sign_device_certificate",
]

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyType = Literal["ec", "rsa"]

CA_VALIDITY = timedelta(days=1095)
"""Spec: "Each CA certificate has a validity of 1095 days (3 years)"."""
DEVICE_VALIDITY = timedelta(days=365)
"""Spec: device certificates "have 1 year validity from issuance date" (the
spec's example spans exactly 365 days)."""
RENEWAL_WINDOW_MONTHS = 24
"""Spec: renewal only "if the current CA has less than 24 months remaining"."""
NOT_BEFORE_BACKDATE = timedelta(minutes=5)
"""How far notBefore is set before ``now`` (clock skew between instances)."""
CA_RSA_BITS = 3072
"""An RSA CA key is kept across renewals for many years: NIST SP 800-57 puts
2048-bit RSA at its limit in 2030, so the CA gets 3072."""

_MAX_RSA_BITS = 8192
"""Larger RSA keys in a CSR are refused: they buy nothing and cost verify time."""
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)
_KEY_NAMES: tuple[tuple[type, str], ...] = (
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
    (dsa.DSAPublicKey, "DSA"),
)

CA_UNAVAILABLE = (
    "Tenant CA certificate is either missing, expired, or has a validity of less than one year"
)
"""Spec ("Enroll a device certificate"): no usable CA."""
KEYPAIR_MISSING = "Failed to retrieve tenant keypair"
"""Spec ("Enroll a device certificate"): the CA's private key is not available."""


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class CaError(Exception):
    """A CA operation was refused; ``status`` is the HTTP status to answer with.

    The message never contains key material or one-time passwords.
    """

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class RenewalNotAllowed(CaError):
    """Renewal asked for while 24 months or more remain (409: the CA's state, not
    the request, is what makes it fail)."""

    status = 409


class CaUnavailable(CaError):
    """The CA cannot sign now (expired or not yet valid).

    409 rather than 5xx: the tenant's state is wrong, and the same request
    succeeds once an administrator creates or renews the CA.
    """

    status = 409


class CsrRejected(CaError):
    """The certificate signing request is unusable (400) or names another
    device (403)."""

    status = 400


# ---------------------------------------------------------------------------
# Creating and renewing the CA
# ---------------------------------------------------------------------------


class TenantCa(NamedTuple):
    """A tenant CA certificate with its private key."""

    certificate: x509.Certificate
    private_key: CaKey


def create_tenant_ca(
    tenant: str,
    now: datetime,
    *,
    organisation: str = "mtls-gateway",
    key_type: KeyType = "ec",
    backdate: timedelta = NOT_BEFORE_BACKDATE,
) -> TenantCa:
    """A new key pair and a self-signed CA certificate ``CN=<tenant>, O=<organisation>``.

    Spec ("Creating a CA certificate via REST"): "a certificate is self-signed
    with tenantID as the Common Name". ECDSA P-256 by default, RSA 3072 with
    ``key_type="rsa"``. Raises ``ValueError`` on a bad tenant id or organisation
    (a local error: the adapter validated the caller already).
    """
    now = _utc(now)
    if not valid_tenant_id(tenant):
        raise ValueError(f"invalid tenant id {tenant!r}")
    # RFC 5280 Appendix A: ub-organization-name is 64.
    if not 1 <= len(organisation) <= 64:
        raise ValueError("organisation must be 1 to 64 characters")
    key: CaKey
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=CA_RSA_BITS)
    else:
        raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")
    # X.500 order, most significant first: O then CN; RFC 4514 renders it
    # reversed, "CN=<tenant>,O=<organisation>".
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, tenant),
        ]
    )
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(now - backdate)
        .not_valid_after(now + CA_VALIDITY)
        # RFC 5280 §4.2.1.9: CA:true, critical. No pathLen: the tenant CA signs
        # device certificates only, but limiting it buys nothing.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        # RFC 5280 §4.2.1.3: keyCertSign for certificates, cRLSign for CRLs
        # (the tenant may publish one), digitalSignature for OCSP-style uses.
        .add_extension(_key_usage(digital_signature=True, cert_sign=True), critical=True)
        # RFC 5280 §4.2.1.2 / §4.2.1.1: key identifiers; a self-signed AKI
        # names its own key, which keeps path building unambiguous after renewal.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    return TenantCa(builder.sign(key, _hash_for(key)), key)


def renewal_due(cert: x509.Certificate, now: datetime) -> bool:
    """True when less than 24 months remain before the CA expires (or it has expired).

    Months are calendar months ("24 months", not 730 days): the window starts
    on the same day-of-month two years before notAfter.
    """
    return cert.not_valid_after_utc < _add_months(_utc(now), RENEWAL_WINDOW_MONTHS)


def renew_tenant_ca(
    cert: x509.Certificate,
    key: CaKey,
    now: datetime,
    *,
    backdate: timedelta = NOT_BEFORE_BACKDATE,
) -> x509.Certificate:
    """Re-sign the CA with the same key, subject and extensions, valid 1095 days from ``now``.

    Spec ("Auto-renewal of CA certificates"): allowed only when less than 24
    months remain (:class:`RenewalNotAllowed` otherwise). The serial number is
    new (module docstring: RFC 5280 §4.1.2.2). Devices issued earlier keep
    verifying: their issuer name and authority key identifier still match.
    """
    now = _utc(now)
    _require_matching_key(cert, key)
    if not renewal_due(cert, now):
        not_after = cert.not_valid_after_utc
        earliest = _add_months(not_after, -RENEWAL_WINDOW_MONTHS)
        raise RenewalNotAllowed(
            "the tenant CA can be renewed only when less than "
            f"{RENEWAL_WINDOW_MONTHS} months remain before it expires; it is valid until "
            f"{not_after.isoformat()}, so renewal is possible after {earliest.isoformat()}"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())  # the same key: checked above
        .serial_number(new_serial())
        .not_valid_before(now - backdate)
        .not_valid_after(now + CA_VALIDITY)
    )
    # Spec: "All CA metadata ... remain unchanged": the CA's own extensions are
    # carried over as they are (these are ours, never a requester's).
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(key, _hash_for(key))


def next_auto_renewal(
    now: datetime, month: int = 10, day: int = 2, hour: int = 2, minute: int = 0
) -> datetime:
    """The first yearly auto-renewal moment strictly after ``now`` (UTC).

    Spec: "automatically renewed on 2 October at 02:00 AM every year"; the
    date and time are configurable. A 29 February schedule runs in leap years
    only. Raises ``ValueError`` for a date that never occurs.
    """
    now = _utc(now)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ValueError("hour must be 0-23 and minute 0-59")
    # Every valid month/day occurs within 8 consecutive years (29 February
    # included, across a skipped leap year such as 2100).
    for year in range(now.year, now.year + 9):
        try:
            moment = datetime(year, month, day, hour, minute, tzinfo=UTC)
        except ValueError:
            continue
        if moment > now:
            return moment
    raise ValueError(f"no date {month:02d}-{day:02d} exists")


def ca_usable_for_enrollment(cert: x509.Certificate | None, now: datetime) -> bool:
    """Spec ("Enroll a device certificate"): False when the CA is missing,
    expired (or not yet valid), or has less than one year left.

    One year is :data:`DEVICE_VALIDITY`, so a usable CA can always issue a
    full-length device certificate that does not outlive it.
    """
    if cert is None:
        return False
    now = _utc(now)
    if cert.not_valid_before_utc > now:
        return False
    return cert.not_valid_after_utc - now >= DEVICE_VALIDITY


# ---------------------------------------------------------------------------
# Signing device certificates
# ---------------------------------------------------------------------------


def check_csr(csr: x509.CertificateSigningRequest) -> str:
    """Check what we require of any CSR and return its Common Name.

    Raises :class:`CsrRejected` (400) when the key is not EC P-256/P-384 or
    RSA 2048-8192, the self-signature (proof of possession: RFC 2986 §3,
    RFC 7030 §3.4) does not verify or uses MD5/SHA-1,
    or the subject has not exactly one non-empty CN. Other subject attributes
    are allowed (OpenSSL's defaults add C/ST/O) and ignored.
    """
    try:
        public = csr.public_key()
    except Exception:
        raise CsrRejected(
            "the CSR's public key algorithm is not supported; "
            "use an EC P-256 or P-384 key, or RSA of at least 2048 bits"
        ) from None
    problem = _key_problem(public)
    if problem:
        raise CsrRejected(problem)
    try:
        hash_alg = csr.signature_hash_algorithm
        valid = csr.is_signature_valid
    except Exception:
        raise CsrRejected("the CSR's signature algorithm is not supported") from None
    if isinstance(hash_alg, _WEAK_HASHES):
        raise CsrRejected(
            f"the CSR is signed with {hash_alg.name.upper()}; use SHA-256 or stronger"
        )
    if not valid:
        raise CsrRejected(
            "the CSR's signature does not verify with its public key (no proof of possession)"
        )
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except Exception:
        raise CsrRejected("the CSR's subject does not parse") from None
    if not cns:
        raise CsrRejected("the CSR's subject has no Common Name (CN); it must be the device id")
    if len(cns) > 1:
        raise CsrRejected("the CSR's subject has more than one Common Name (CN)")
    cn = cns[0].value
    # RFC 5280 Appendix A: ub-common-name is 64.
    if not isinstance(cn, str) or not 1 <= len(cn) <= 64:
        raise CsrRejected("the CSR's Common Name (CN) must be a string of 1 to 64 characters")
    return cn


def sign_device_certificate(
    csr: x509.CertificateSigningRequest,
    ca_cert: x509.Certificate,
    ca_key: CaKey,
    device_id: str,
    now: datetime,
    *,
    backdate: timedelta = NOT_BEFORE_BACKDATE,
) -> x509.Certificate:
    """Issue a device certificate for ``device_id`` from a CSR.

    The certificate: subject ``CN=<device_id>`` only, the CSR's public key,
    CA:false, keyUsage digitalSignature (+ keyEncipherment for RSA), EKU
    clientAuth, SKI/AKI, a fresh random serial, valid one year from ``now``.
    Nothing else of the CSR is used: requested extensions (a CA:true, extra
    EKUs, SANs) and other subject attributes are ignored: what a certificate
    says is this CA's policy, never the requester's.

    notAfter is clamped to the CA's notAfter: RFC 5280 path validation would
    refuse the certificate past that point anyway, so the certificate states
    its real life. :func:`ca_usable_for_enrollment` keeps the clamp from
    happening in the enrollment flow.

    The CSR is re-checked (:func:`check_csr`; CN equal to ``device_id``, else
    403) so this function is safe to call on its own. Raises
    :class:`CsrRejected`, :class:`CaUnavailable` (the CA is expired or not yet
    valid), or :class:`CaError` 500 when ``ca_key`` is not the CA's key.
    """
    now = _utc(now)
    _require_matching_key(ca_cert, ca_key)
    if not is_ca(ca_cert):
        raise CaError("the issuing certificate is not a CA (BasicConstraints)", status=500)
    ca_not_after = ca_cert.not_valid_after_utc
    if not ca_cert.not_valid_before_utc <= now < ca_not_after:
        raise CaUnavailable(CA_UNAVAILABLE)
    cn = check_csr(csr)
    if cn != device_id:
        raise CsrRejected(
            f"the CSR's Common Name {cn!r} does not match the device id {device_id!r}",
            status=403,
        )
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):  # pragma: no cover
        raise CsrRejected("unsupported key")  # check_csr admits only these two families
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(now - backdate)
        .not_valid_after(min(now + DEVICE_VALIDITY, ca_not_after))
        # RFC 5280 §4.2.1.9: an end entity is CA:false.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # RFC 5280 §4.2.1.3: TLS client authentication only signs; RSA device
        # certificates conventionally also allow keyEncipherment.
        .add_extension(
            _key_usage(
                digital_signature=True, key_encipherment=isinstance(public, rsa.RSAPublicKey)
            ),
            critical=True,
        )
        # RFC 5280 §4.2.1.12: restrict the certificate to TLS client authentication.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
    )
    return builder.sign(ca_key, _hash_for(ca_key))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def new_serial() -> int:
    """A random positive serial of exactly 20 octets in DER.

    RFC 5280 §4.1.2.2: positive, at most 20 octets, unique per issuer. 158
    random bits (the top bit of 159 set, so the DER is never padded with a
    zero octet) make a collision negligible without a registry of used serials.
    """
    return secrets.randbits(158) | (1 << 158)


def platform_subject(name: x509.Name) -> str:
    """A name as the platform shows it: ``"CN=t123, O=mtls-gateway"``.

    RFC 4514 order (most specific first) with ", " between RDNs.
    """
    return display_name(name)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    # X.509 times carry whole seconds; dropping the fraction here makes
    # notBefore/notAfter exactly now ± the nominal durations.
    return now.astimezone(UTC).replace(microsecond=0)


def _add_months(moment: datetime, months: int) -> datetime:
    """``moment`` shifted by calendar months, the day clamped to the month's end."""
    years, month0 = divmod(moment.month - 1 + months, 12)
    year, month = moment.year + years, month0 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _require_matching_key(cert: x509.Certificate, key: CaKey) -> None:
    """The private key must belong to the certificate: signing with another key
    would issue certificates nothing can verify."""
    try:
        cert_key = cert.public_key()
    except Exception:
        cert_key = None
    if not isinstance(cert_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or _spki(
        cert_key
    ) != _spki(key.public_key()):
        raise CaError(KEYPAIR_MISSING + ": the private key does not match the CA", status=500)


def _hash_for(key: CaKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """Signature hash matched to the key's strength (SHA-256 for P-256 and RSA)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size >= 512:
            return hashes.SHA512()
        if key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


def _key_problem(public: object) -> str | None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        if isinstance(public.curve, _ALLOWED_CURVES):
            return None
        return (
            f"EC curve {public.curve.name} is not supported; use P-256 (secp256r1) "
            "or P-384 (secp384r1)"
        )
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            return (
                f"RSA key of {public.key_size} bits is too small; at least 2048 bits are required"
            )
        if public.key_size > _MAX_RSA_BITS:
            return f"RSA key of {public.key_size} bits is too large; at most {_MAX_RSA_BITS}"
        return None
    kind = next((n for t, n in _KEY_NAMES if isinstance(public, t)), "this kind of")
    return (
        f"{kind} keys are not supported; use an EC P-256 or P-384 key, or RSA of at least 2048 bits"
    )


def _key_usage(
    *, digital_signature: bool, key_encipherment: bool = False, cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate, ca_key: CaKey) -> x509.AuthorityKeyIdentifier:
    """RFC 5280 §4.2.1.1: the AKI equals the issuer's SKI when it has one."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
