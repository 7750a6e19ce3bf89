"""Secrets at rest: a key-encryption key (KEK) and AES-256-GCM sealing.

Private keys the gateway keeps in the store (the per-tenant CRL-signing key,
the tenant CA key, token-signing keys) are never written in clear: they are
sealed with a 256-bit KEK that lives outside the store, in
``<data_dir>/secrets/kek`` (mode 0600 in a 0700 directory, created on first
use). A stolen database alone therefore reveals no key.

Every sealed value is bound to a *purpose* string (AES-GCM associated data,
e.g. ``crl-signer:t1``): a value copied to another option or tenant fails to
open instead of silently serving the wrong key.

Sealed format (ASCII, safe in any store)::

    mgk1:<key id>:<base64url(12-byte nonce || ciphertext || 16-byte tag)>

``key id`` is the first 8 hex digits of SHA-256(KEK), so a value sealed with
another KEK gives a clear error. Several gateway instances sharing one store
(Redis) must share the same KEK file: copy it to each of them, or point
``MTLS_GATEWAY_KEK_FILE`` at it.

Usage::

    box = SecretBox.load_or_create(config.data_dir)
    token = box.seal_private_key(key, purpose=f"tenant-ca:{tenant}")
    key = box.open_private_key(token, purpose=f"tenant-ca:{tenant}")
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = ["KEK_BYTES", "PrivateKey", "SecretBox", "SecretError", "kek_path"]

log = logging.getLogger("mtls_gateway.secrets")

KEK_BYTES = 32
"""AES-256."""
_NONCE_BYTES = 12
_PREFIX = "mgk1"
_MAX_SEALED_CHARS = 1 << 20

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class SecretError(Exception):
    """A KEK cannot be read or created, or a sealed value does not open.

    The message never contains key material.
    """


KEK_FILE_ENV = "MTLS_GATEWAY_KEK_FILE"
"""Environment variable naming the KEK file: several gateway instances sharing
one store (Redis) point it at the same (copied or mounted) file."""


def kek_path(data_dir: Path) -> Path:
    """Where the KEK lives: ``$MTLS_GATEWAY_KEK_FILE``, else ``<data_dir>/secrets/kek``."""
    override = os.environ.get(KEK_FILE_ENV)
    if override:
        return Path(override)
    return Path(data_dir) / "secrets" / "kek"


class SecretBox:
    """Seals and opens secrets with one KEK (AES-256-GCM, random 96-bit nonces)."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEK_BYTES:
            raise SecretError(f"a KEK must be {KEK_BYTES} bytes, got {len(kek)}")
        self._aead = AESGCM(kek)
        self.key_id = hashlib.sha256(kek).hexdigest()[:8]
        # HKDF-Extract (RFC 5869 §2.2) once; derive_key expands per purpose.
        self._prk = hmac.new(b"mtls-gateway/derive-key", kek, hashlib.sha256).digest()

    def __repr__(self) -> str:  # never show the key
        return f"SecretBox(key_id={self.key_id})"

    # KEK file ----------------------------------------------------------------------
    @classmethod
    def load_or_create(cls, data_dir: Path) -> SecretBox:
        """Read ``<data_dir>/secrets/kek``, creating it (0600) when absent.

        Creation is race-free between processes: the key is written to a
        private temporary file and hard-linked into place, so a concurrent
        reader sees either no file or a complete one. Blocking file I/O: call
        it from a thread (``asyncio.to_thread``) inside the event loop.
        """
        path = kek_path(data_dir)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SecretError(f"cannot create {path.parent}: {exc.strerror}") from None
        if not path.exists():
            _create_kek(path)
        return cls(_read_kek(path))

    # raw bytes ----------------------------------------------------------------------
    def seal(self, plaintext: bytes, purpose: str) -> str:
        """Encrypt ``plaintext`` for ``purpose``; returns the sealed ASCII token."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, _aad(purpose))
        body = base64.urlsafe_b64encode(nonce + sealed).decode("ascii")
        return f"{_PREFIX}:{self.key_id}:{body}"

    def open(self, token: str, purpose: str) -> bytes:
        """Decrypt a token made by :meth:`seal` for the same ``purpose``."""
        if len(token) > _MAX_SEALED_CHARS:
            raise SecretError("sealed value is too large")
        parts = token.strip().split(":")
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise SecretError("not a sealed value (expected mgk1:<key id>:<data>)")
        if parts[1] != self.key_id:
            raise SecretError(
                f"value was sealed with KEK {parts[1]}, this gateway has KEK {self.key_id}"
                " (copy the same secrets/kek to every instance)"
            )
        try:
            raw = base64.b64decode(parts[2].encode("ascii"), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise SecretError("sealed value is not valid base64") from None
        if len(raw) < _NONCE_BYTES + 16:
            raise SecretError("sealed value is truncated")
        try:
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(purpose))
        except InvalidTag:
            raise SecretError(
                f"sealed value does not open for purpose {purpose!r} (tampered or moved)"
            ) from None

    # derived keys (issue 6) -----------------------------------------------------------
    def derive_key(self, purpose: str, length: int = 32) -> bytes:
        """A secret key for ``purpose`` derived from the KEK (HKDF-SHA256, RFC 5869).

        Deterministic, so every instance sharing the KEK derives the same key
        without storing it (e.g. the pepper of enrollment-OTP hashes); a new
        KEK gives new keys. Independent of the sealing key.
        """
        return HKDFExpand(hashes.SHA256(), length, _aad(purpose)).derive(self._prk)

    # private keys -------------------------------------------------------------------
    def seal_private_key(self, key: PrivateKey, purpose: str) -> str:
        """Seal a private key (PKCS#8 DER inside)."""
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return self.seal(der, purpose)

    def open_private_key(self, token: str, purpose: str) -> PrivateKey:
        """Open a key sealed by :meth:`seal_private_key`."""
        der = self.open(token, purpose)
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError):
            raise SecretError("sealed value is not a private key") from None
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise SecretError(f"unsupported private key type {type(key).__name__}")
        return key


def _aad(purpose: str) -> bytes:
    if not purpose:
        raise SecretError("a purpose is required (it binds the value to its use)")
    return b"mtls-gateway:" + purpose.encode("utf-8")


def _create_kek(path: Path) -> None:
    tmp = path.with_name(f".kek.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(KEK_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic; fails if another process won the race
        log.info("created key-encryption key %s", path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SecretError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _read_kek(path: Path) -> bytes:
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Refusing would take a running site down over a chmod; say it loudly instead.
        log.warning("%s is accessible by group/others: chmod 600 it", path)
    if len(data) != KEK_BYTES:
        raise SecretError(f"{path} must hold exactly {KEK_BYTES} bytes, found {len(data)}")
    return data
