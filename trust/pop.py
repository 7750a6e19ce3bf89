"""Proof of possession of a trusted certificate's private key.

Spec ("Perform a proof of possession"): the platform hands out a verification
code; the owner signs it with ``openssl dgst -sha256 -sign key code.txt |
openssl base64 -A`` and uploads the base64 signature.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

CODE_VALIDITY = timedelta(minutes=10)


def new_verification_code(now: datetime) -> tuple[str, datetime]:
    """A fresh random code and the time until which it may be used."""
    return secrets.token_hex(32), now + CODE_VALIDITY


def verify_signed_code(cert: x509.Certificate, code: str, signed_b64: str) -> bool:
    """True when ``signed_b64`` is the certificate key's SHA-256 signature of ``code``.

    The code file may or may not end with a newline (editors add one), so both
    spellings are accepted; nothing else is.
    """
    try:
        signature = base64.b64decode(signed_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    if not signature or len(signature) > 1024:
        return False
    key = cert.public_key()
    for message in (code.encode(), (code + "\n").encode()):
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            else:
                return False
            return True
        except (InvalidSignature, ValueError):
            continue
    return False
