"""Upload validation of trusted certificates (spec: "To add a certificate").

Rules, each with its own error code so the API can say which one failed:
PEM parses to one certificate, X.509 version 3, BasicConstraints CA:true,
valid now (not expired, not yet valid), not already in this tenant, and not
already uploaded *and* proof-of-possession-confirmed by another tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509

from trust.certs import CertificateError, fingerprint, is_ca, load_certificate, to_pem
from trust.model import Status, TrustedCertificate


class UploadError(ValueError):
    """An upload broke a rule: ``rule`` is a stable code, the message says why."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def validate_upload(
    pem: str,
    tenant: str,
    same_certificate: Sequence[TrustedCertificate],
    now: datetime,
) -> x509.Certificate:
    """Check an upload; ``same_certificate`` are existing copies (any tenant) of it.

    Callers first parse to learn the fingerprint, then pass the copies found;
    :func:`parse_upload` does the first half.
    """
    cert = parse_upload(pem)
    if cert.version is not x509.Version.v3:
        raise UploadError("version", "certificate must be an X.509 version 3 certificate")
    if not is_ca(cert):
        raise UploadError("not_ca", "certificate must have BasicConstraints CA:true")
    if cert.not_valid_after_utc <= now:
        raise UploadError(
            "expired", f"certificate expired on {cert.not_valid_after_utc.isoformat()}"
        )
    if cert.not_valid_before_utc > now:
        raise UploadError(
            "not_yet_valid",
            f"certificate is not valid before {cert.not_valid_before_utc.isoformat()}",
        )
    for other in same_certificate:
        if other.tenant == tenant:
            raise UploadError("duplicate", "certificate is already uploaded in this tenant")
    for other in same_certificate:
        if other.proof_of_possession_valid:
            raise UploadError(
                "owned_elsewhere",
                "certificate is already uploaded by another tenant "
                "that proved possession of its key",
            )
    return cert


def parse_upload(pem: str) -> x509.Certificate:
    """Exactly one PEM certificate, else :class:`UploadError` (rule ``pem``)."""
    if "-----BEGIN" not in pem:
        raise UploadError(
            "pem", "certInPemFormat must be a PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    try:
        return load_certificate(_normalise_pem(pem))
    except CertificateError as exc:
        raise UploadError("pem", f"certInPemFormat is not a valid certificate: {exc}") from None


def new_trusted_certificate(
    cert: x509.Certificate,
    tenant: str,
    *,
    name: str,
    status: Status,
    auto_registration: bool,
    now: datetime,
    tenant_ca: bool = False,
) -> TrustedCertificate:
    """The record to store for a validated upload."""
    return TrustedCertificate(
        tenant=tenant,
        fingerprint=fingerprint(cert),
        name=name,
        status=status,
        auto_registration=auto_registration,
        pem=to_pem(cert),
        tenant_ca=tenant_ca,
        created=now,
    )


def _normalise_pem(pem: str) -> str:
    """Accept the platform's habit of PEM with the newlines removed."""
    text = pem.strip()
    if "\n" in text:
        return text
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if text.startswith(begin) and text.endswith(end):
        body = text[len(begin) : -len(end)].replace(" ", "")
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return "\n".join([begin, *lines, end]) + "\n"
    return text
