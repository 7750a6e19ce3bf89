"""The KEK file and AES-GCM sealing of :mod:`gateway.secrets`."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.secrets import KEK_BYTES, SecretBox, SecretError, kek_path


def test_kek_is_created_private_and_reused(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path)
    path = kek_path(tmp_path)
    assert path.stat().st_size == KEK_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = SecretBox.load_or_create(tmp_path)
    assert again.key_id == box.key_id
    token = box.seal(b"hello", "p")
    assert again.open(token, "p") == b"hello"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_concurrent_creation_converges_on_one_key(tmp_path: Path) -> None:
    ids: list[str] = []

    def load() -> None:
        ids.append(SecretBox.load_or_create(tmp_path).key_id)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(ids) == 8 and len(set(ids)) == 1


def test_seal_is_randomised_and_bound_to_purpose(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path)
    a, b = box.seal(b"secret", "crl-signer:t1"), box.seal(b"secret", "crl-signer:t1")
    assert a != b and a.startswith(f"mgk1:{box.key_id}:")
    assert b"secret" not in a.encode()
    assert box.open(a, "crl-signer:t1") == b"secret"
    with pytest.raises(SecretError, match="purpose"):
        box.open(a, "crl-signer:t2")


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"), "does not open"),
        (lambda t: "xyz:" + t, "not a sealed value"),
        (lambda t: t.replace(":", ":0", 1), "KEK"),
        (lambda t: t.rsplit(":", 1)[0] + ":!!!", "base64"),
        (lambda t: t.rsplit(":", 1)[0] + ":AAAA", "truncated"),
    ],
)
def test_damaged_tokens_fail_cleanly(tmp_path: Path, mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    box = SecretBox.load_or_create(tmp_path)
    token = box.seal(b"payload-bytes", "p")
    with pytest.raises(SecretError, match=message):
        box.open(mangle(token), "p")


def test_another_kek_cannot_open(tmp_path: Path) -> None:
    one = SecretBox.load_or_create(tmp_path / "a")
    two = SecretBox.load_or_create(tmp_path / "b")
    assert one.key_id != two.key_id
    with pytest.raises(SecretError, match="KEK"):
        two.open(one.seal(b"x", "p"), "p")


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_private_keys_round_trip(tmp_path: Path, kind: str) -> None:
    box = SecretBox.load_or_create(tmp_path)
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    token = box.seal_private_key(key, "tenant-ca:t1")
    back = box.open_private_key(token, "tenant-ca:t1")
    assert back.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    with pytest.raises(SecretError):
        box.open_private_key(box.seal(b"not a key", "p"), "p")


def test_bad_kek_file_is_an_error(tmp_path: Path) -> None:
    path = kek_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"short")
    with pytest.raises(SecretError, match="exactly 32 bytes"):
        SecretBox.load_or_create(tmp_path)
    with pytest.raises(SecretError):
        SecretBox(b"short")
    with pytest.raises(SecretError, match="purpose"):
        SecretBox(b"k" * 32).seal(b"x", "")
    assert "k" * 8 not in repr(SecretBox(b"k" * 32))


def test_kek_file_from_the_environment_is_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances with different data dirs share one KEK through MTLS_GATEWAY_KEK_FILE."""
    shared = tmp_path / "shared" / "kek"
    monkeypatch.setenv("MTLS_GATEWAY_KEK_FILE", str(shared))
    a = SecretBox.load_or_create(tmp_path / "a")
    b = SecretBox.load_or_create(tmp_path / "b")
    assert shared.exists() and a.key_id == b.key_id
    assert not (tmp_path / "a" / "secrets" / "kek").exists()
    assert b.open(a.seal(b"x", "p"), "p") == b"x"
