"""The tenant's offline revocations as a signed X.509 CRL, and its signer.

``GET /tenant/trusted-certificates/settings/crl`` answers a DER CRL
(RFC 5280 §5) listing every serial the tenant revoked. It is signed by the
tenant CA when the tenant has one (:attr:`HttpContext.tenant_ca_signer`),
otherwise by a per-tenant CRL-signing key the gateway creates on first use:
an EC P-256 key sealed with the KEK (:mod:`gateway.secrets`), kept with its
self-signed certificate in tenant option :data:`SIGNER_OPTION`. The
certificate is downloadable at ``…/settings/crl/signer`` and verifies the
CRL: ``openssl crl -inform DER -in t.crl -CAfile signer.pem``.

The CRL is an export of the tenant's list for other systems (its own
``nextUpdate`` is a week ahead); the gateway itself checks revocations from
the store, not from this file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from gateway.secrets import PrivateKey, SecretBox, SecretError
from gateway.store.base import Store
from trust.certs import CertificateError, load_certificate
from trust.model import RevocationEntry

__all__ = [
    "CRL_VALIDITY",
    "SIGNER_OPTION",
    "CrlSigner",
    "build_crl",
    "crl_signer",
    "make_signer_certificate",
    "revocations_csv",
]

SIGNER_OPTION = "crl.signer"
"""Tenant option holding ``{"key": <sealed PKCS#8>, "certificate": <PEM>}``."""
SIGNER_VALIDITY = timedelta(days=3650)
SIGNER_RENEW_BEFORE = timedelta(days=30)
CRL_VALIDITY = timedelta(days=7)

CrlSigner = tuple[x509.Certificate, PrivateKey]
TenantCaLookup = Callable[[str], Awaitable[CrlSigner | None]]


def _purpose(tenant: str) -> str:
    return f"crl-signer:{tenant}"


def make_signer_certificate(tenant: str, key: PrivateKey, now: datetime) -> x509.Certificate:
    """Self-signed certificate of a tenant's CRL-signing key (keyUsage cRLSign)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"CRL signer of tenant {tenant}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-gateway"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + SIGNER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _hash(key))
    )


def build_crl(
    entries: Sequence[RevocationEntry],
    signer: CrlSigner,
    now: datetime,
    number: int,
) -> bytes:
    """A DER CRL of ``entries`` signed by ``signer`` (RFC 5280 §5.1, with the
    mandatory CRLNumber and nextUpdate, and the signer's key identifier)."""
    cert, key = signer
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return builder.sign(key, _hash(key)).public_bytes(Encoding.DER)


def revocations_csv(entries: Sequence[RevocationEntry]) -> str:
    """The list in the upload format (``serialNumberInHex,revocationDate``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["serialNumberInHex", "revocationDate"])
    for e in entries:
        when = e.revoked_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        writer.writerow([e.serial_hex, when])
    return out.getvalue()


async def crl_signer(
    store: Store,
    box: SecretBox,
    tenant: str,
    now: datetime,
    tenant_ca: TenantCaLookup | None = None,
) -> CrlSigner:
    """The tenant CA when there is one, else the gateway's CRL-signing key for
    the tenant (created, or re-certified near expiry, on demand)."""
    if tenant_ca is not None:
        found = await tenant_ca(tenant)
        if found is not None:
            return found
    return await gateway_signer(store, box, tenant, now)


async def gateway_signer(store: Store, box: SecretBox, tenant: str, now: datetime) -> CrlSigner:
    """The gateway's CRL signer of ``tenant``: key and certificate are kept as one
    option value, so concurrent creators (several instances) leave a matching pair."""
    stored = await _load_signer(store, box, tenant)
    if stored is not None and stored[0].not_valid_after_utc - SIGNER_RENEW_BEFORE > now:
        return stored
    key = stored[1] if stored is not None else ec.generate_private_key(ec.SECP256R1())
    cert = make_signer_certificate(tenant, key, now)
    value = {
        "key": box.seal_private_key(key, _purpose(tenant)),
        "certificate": cert.public_bytes(Encoding.PEM).decode("ascii"),
    }
    await store.set_option(tenant, SIGNER_OPTION, json.dumps(value))
    # another instance may have written its own pair meanwhile: use what the store kept
    return await _load_signer(store, box, tenant) or (cert, key)


async def _load_signer(store: Store, box: SecretBox, tenant: str) -> CrlSigner | None:
    raw = await store.get_option(tenant, SIGNER_OPTION)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        cert = load_certificate(value["certificate"])
        sealed = value["key"]
    except (ValueError, KeyError, TypeError, CertificateError):
        raise SecretError(f"stored CRL signer of tenant {tenant} is unreadable") from None
    try:
        key = box.open_private_key(sealed, _purpose(tenant))
    except SecretError as exc:
        # never silently replace a key that other instances (with the right KEK) use
        raise SecretError(f"CRL-signing key of tenant {tenant} does not open: {exc}") from None
    return cert, key


def _hash(key: PrivateKey) -> hashes.SHA256 | None:
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None  # Ed25519 signs without a separate digest
