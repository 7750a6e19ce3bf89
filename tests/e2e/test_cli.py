"""``mtls-gateway init`` and the store commands, run as real subprocesses."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.pki import make_ca
from trust.certs import fingerprint

REPO = Path(__file__).resolve().parents[2]
DEVICES = ("device-0001", "device-0002", "device-0003", "lwm2m-0001")
KEYS = (
    "root-ca.key",
    "intermediate-ca.key",
    "server-ca.key",
    "server.key",
    *(f"{d}.key" for d in DEVICES),
)


def cli(*args: str | Path, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_GATEWAY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if ok is True:
        assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_json(*args: str | Path) -> Any:
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised data directory shared by the module's tests."""
    directory = tmp_path_factory.mktemp("data")
    cli("init", "--data-dir", directory)
    return directory


def certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# init -------------------------------------------------------------------------------------


def test_init_creates_pki_with_private_modes(data: Path) -> None:
    demo = data / "demo"
    assert (data / "gateway.db").is_file()
    for name in (*KEYS, "admin-password"):
        mode = stat.S_IMODE((demo / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"
    for name in ("root-ca.pem", "intermediate-ca.pem", "server-ca.pem", "server.pem"):
        assert len(certs(demo / name)) == 1
    assert len((demo / "admin-password").read_text().strip()) >= 16


def test_device_chain_is_leaf_intermediate_root(data: Path) -> None:
    demo = data / "demo"
    root, inter = certs(demo / "root-ca.pem")[0], certs(demo / "intermediate-ca.pem")[0]
    for device in DEVICES:
        chain = certs(demo / f"{device}.pem")
        assert [cn(c) for c in chain] == [device, cn(inter), cn(root)]
        assert chain[1] == inter and chain[2] == root
        chain[0].verify_directly_issued_by(chain[1])
        chain[1].verify_directly_issued_by(chain[2])
        chain[2].verify_directly_issued_by(chain[2])


def test_server_certificate_names_and_separate_ca(data: Path) -> None:
    demo = data / "demo"
    server, server_ca = certs(demo / "server.pem")[0], certs(demo / "server-ca.pem")[0]
    root = certs(demo / "root-ca.pem")[0]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= ips
    server.verify_directly_issued_by(server_ca)
    assert server_ca.subject != root.subject
    assert fingerprint(server_ca) != fingerprint(root)


def test_init_prints_runnable_next_steps(tmp_path: Path) -> None:
    out = cli("init", "--data-dir", tmp_path).stdout
    demo = tmp_path / "demo"
    assert (
        f"mosquitto_sub -h localhost -p 8883 --cafile {demo}/server-ca.pem"
        f" --cert {demo}/device-0001.pem --key {demo}/device-0001.key -i device-0001"
        " -t 'demo/#' -v"
    ) in out
    assert f"--cert {demo}/device-0002.pem --key {demo}/device-0002.key -i device-0002" in out
    assert f"mtls-gateway trust verify {demo}/device-0001.pem --tenant demo" in out
    assert "created" in out


def test_init_rerun_keeps_root_and_password(data: Path) -> None:
    demo = data / "demo"
    root_before = fingerprint(certs(demo / "root-ca.pem")[0])
    password_before = (demo / "admin-password").read_text()
    out = cli("init", "--data-dir", data).stdout
    assert fingerprint(certs(demo / "root-ca.pem")[0]) == root_before
    assert (demo / "admin-password").read_text() == password_before
    states = [line.split()[0] for line in out.splitlines() if line.startswith(("created", "kept"))]
    assert states and set(states) == {"kept"}
    anchors = cli_json("anchors", "list", "--tenant", "demo", "--data-dir", data)
    assert [a["fingerprint"] for a in anchors].count(root_before) == 1


def test_init_recreates_only_missing_pieces(tmp_path: Path) -> None:
    cli("init", "--data-dir", tmp_path)
    demo = tmp_path / "demo"
    root = (demo / "root-ca.pem").read_bytes()
    first = (demo / "device-0001.pem").read_bytes()
    (demo / "device-0003.pem").unlink()
    (demo / "device-0003.key").unlink()
    out = cli("init", "--data-dir", tmp_path).stdout
    created = [line for line in out.splitlines() if line.startswith("created")]
    assert [line.split()[-1] for line in created] == [
        str(demo / "device-0003.pem"),
        str(demo / "device-0003.key"),
    ]
    assert (demo / "root-ca.pem").read_bytes() == root
    assert (demo / "device-0001.pem").read_bytes() == first
    (demo / "device-0002.key").unlink()  # half a pair: refuse rather than overwrite
    proc = cli("init", "--data-dir", tmp_path, ok=None)
    assert proc.returncode == 1
    assert "device-0002" in proc.stderr and (demo / "device-0002.pem").exists()


# anchors ----------------------------------------------------------------------------------


def test_anchors_list_json_has_demo_root(data: Path) -> None:
    root = fingerprint(certs(data / "demo" / "root-ca.pem")[0])
    anchors = cli_json("anchors", "list", "--data-dir", data)
    demo = next(a for a in anchors if a["fingerprint"] == root)
    assert demo["tenant"] == "demo"
    assert demo["status"] == "ENABLED"
    assert demo["autoRegistrationEnabled"] is True
    assert demo["proofOfPossessionValid"] is True
    assert demo["version"] == 3


def test_anchors_add_new_ca_then_disable(data: Path, tmp_path: Path) -> None:
    ca = make_ca("extra CA")
    pem = tmp_path / "extra.pem"
    pem.write_bytes(ca.cert_pem())
    added = cli_json(
        "anchors", "add", pem, "--tenant", "demo", "--name", "extra", "--no-auto-registration",
        "--data-dir", data,
    )  # fmt: skip
    fp = fingerprint(ca.cert)
    assert (added["fingerprint"], added["name"]) == (fp, "extra")
    assert added["autoRegistrationEnabled"] is False and added["status"] == "ENABLED"
    cli("anchors", "disable", fp, "--tenant", "demo", "--data-dir", data)
    shown = cli_json("anchors", "show", fp, "--tenant", "demo", "--data-dir", data)
    assert shown["status"] == "DISABLED" and shown["subject"] == "CN=extra CA"
    again = cli("anchors", "add", pem, "--tenant", "demo", "--data-dir", data, ok=False)
    assert again.returncode == 2 and "duplicate" in again.stderr


def test_pop_flow_with_openssl(data: Path, tmp_path: Path) -> None:
    ca = make_ca("pop CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    fp = fingerprint(ca.cert)
    cli("anchors", "add", tmp_path / "ca.pem", "--tenant", "demo", "--data-dir", data)
    code = cli("anchors", "pop-code", fp, "--tenant", "demo", "--data-dir", data).stdout
    (tmp_path / "code.txt").write_text(code)
    wrong = make_ca("someone else")
    (tmp_path / "wrong.key").write_bytes(wrong.key_pem())
    for key, expected in (("wrong.key", 1), ("ca.key", 0)):
        sig = subprocess.run(
            f"openssl dgst -sha256 -sign {key} code.txt | openssl base64 -A > sig.b64",
            shell=True,
            cwd=tmp_path,
            check=True,
        )
        assert sig.returncode == 0
        proc = cli(
            "anchors", "pop-verify", fp, "--tenant", "demo",
            "--signature-file", tmp_path / "sig.b64", "--data-dir", data, ok=None,
        )  # fmt: skip
        assert proc.returncode == expected, proc.stderr
    shown = cli_json("anchors", "show", fp, "--tenant", "demo", "--data-dir", data)
    assert shown["proofOfPossessionValid"] is True


# crl and devices ----------------------------------------------------------------------


def test_crl_add_and_list(data: Path) -> None:
    cli("crl", "add", "0B8A5B9DD501A88775399B9A048811A3", "--tenant", "demo", "--data-dir", data)
    cli("crl", "add", "0b:8a:5b:9d:d5:01:a8:87:75:39:9b:9a:04:88:11:a3", "--tenant", "demo",
        "--date", "2020-01-01T00:00:00.000Z", "--data-dir", data)  # fmt: skip
    entries = cli_json("crl", "list", "--tenant", "demo", "--data-dir", data)
    serials = [e["serialNumberInHex"] for e in entries]
    assert serials.count("b8a5b9dd501a88775399b9a048811a3") == 1
    table = cli("crl", "list", "--tenant", "demo", "--data-dir", data).stdout
    assert "b8a5b9dd501a88775399b9a048811a3" in table


def test_crl_import_reports_rows_and_settings(data: Path, tmp_path: Path) -> None:
    csv = tmp_path / "revoked.csv"
    csv.write_text(cli("crl", "template").stdout + "zz-not-hex,\n0c,\n")
    proc = cli("crl", "import", csv, "--tenant", "demo", "--data-dir", data, "--json", ok=None)
    assert proc.returncode == 1  # one row rejected, the others stored
    result = json.loads(proc.stdout)
    assert result["added"] + result["kept"] == 2 and [e["line"] for e in result["errors"]] == [3]
    assert cli_json("crl", "settings", "--tenant", "demo", "--data-dir", data) == {
        "offline": False,
        "online": False,
    }
    changed = cli_json("crl", "settings", "--tenant", "demo", "--offline", "on", "--data-dir", data)
    assert changed == {"offline": True, "online": False}


def test_devices_disable(data: Path) -> None:
    cli("devices", "disable", "lwm2m-0001", "--tenant", "demo", "--data-dir", data)
    devices = cli_json("devices", "list", "--tenant", "demo", "--data-dir", data)
    lwm2m = next(d for d in devices if d["deviceId"] == "lwm2m-0001")
    assert lwm2m["enabled"] is False and lwm2m["registeredVia"] == "manual"
    missing = cli("devices", "disable", "ghost", "--tenant", "demo", "--data-dir", data, ok=False)
    assert missing.returncode == 2 and "ghost" in missing.stderr


def test_tenants(data: Path) -> None:
    cli("tenants", "create", "acme", "--data-dir", data)
    assert set(cli_json("tenants", "list", "--data-dir", data)) >= {"demo", "acme"}
    bad = cli("tenants", "create", "no spaces", "--data-dir", data, ok=False)
    assert bad.returncode == 2


# errors and help ------------------------------------------------------------------------


def test_bad_pem_is_a_one_line_error(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    proc = cli("anchors", "add", bad, "--tenant", "demo", "--data-dir", data, ok=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr
    for args in (
        ("anchors", "add", tmp_path / "missing.pem", "--tenant", "demo"),
        ("anchors", "list", "--tenant", "nope"),
        ("anchors", "show", "00" * 20, "--tenant", "demo"),
        ("crl", "add", "xyz", "--tenant", "demo"),
    ):
        proc = cli(*args, "--data-dir", data, ok=False)
        assert proc.returncode == 2, args
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_store_is_an_error(tmp_path: Path) -> None:
    proc = cli("anchors", "list", "--data-dir", tmp_path / "nothing", ok=False)
    assert proc.returncode == 2 and "init" in proc.stderr
    assert not (tmp_path / "nothing").exists()


COMMANDS = [
    ("init",),
    ("tenants",), ("tenants", "list"), ("tenants", "create"),
    ("anchors",), *[("anchors", c) for c in (
        "add", "list", "show", "enable", "disable", "delete", "set-auto-registration",
        "pop-code", "pop-verify", "pop-confirm", "pop-unconfirm",
    )],
    ("crl",), *[("crl", c) for c in ("add", "import", "list", "settings", "template")],
    ("devices",), ("devices", "list"), ("devices", "enable"), ("devices", "disable"),
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: tuple[str, ...]) -> None:
    out = cli(*command, "--help").stdout
    assert "usage:" in out
    if len(command) == 2 or command == ("init",):
        assert "--data-dir" in out and "--store" in out and "--json" in out


def test_ca_create_renew_show_and_audit(data: Path) -> None:
    d = ("--data-dir", data)
    created = cli_json("ca", "create", "--tenant", "demo", *d)
    assert created["tenantCertificateAuthority"] is True
    assert created["subject"].startswith("CN=demo, O=")
    again = cli("ca", "create", "--tenant", "demo", *d, ok=None)
    assert again.returncode == 1 and "already" in again.stderr.lower()
    # a fresh CA has 36 months left: renewal is refused with a clear message
    renew = cli("ca", "renew", "--tenant", "demo", *d, ok=None)
    assert renew.returncode == 1 and "24 months" in renew.stderr
    shown = cli("ca", "show", "--tenant", "demo", *d).stdout
    assert shown.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in shown
    records = cli_json("audit", "list", "--tenant", "demo", *d)["auditRecords"]
    assert records and all("PRIVATE KEY" not in r["text"] for r in records)
    assert (
        cli_json("audit", "list", "--tenant", "demo", "--type", "NoSuchType", *d)["auditRecords"]
        == []
    )


def test_device_certificates_list_and_revoke(data: Path) -> None:
    d = ("--data-dir", data)
    listed = cli_json("devices", "certificates", "device-0001", "--tenant", "demo", *d)
    assert listed == []  # nothing seen in a handshake yet
    missing = cli(
        "devices", "revoke-certificate", "device-0001", "abc", "--tenant", "demo", *d, ok=None
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_trust_verify_tenant_applies_the_online_crl_check(tmp_path: Path) -> None:
    """`trust verify --tenant` fetches the chain's CRL distribution points once,
    so it answers like the listeners for tenants with the online check on."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from gateway.pki import make_crl, make_device, pem_chain

    data = tmp_path / "data"
    crl_path = tmp_path / "root.crl"
    url = crl_path.as_uri()
    root = make_ca("Online Root")
    revoked = make_device("gone", root, crl_urls=[url])
    fine = make_device("fine", root, crl_urls=[url])
    crl_path.write_bytes(
        make_crl(
            root, [(revoked.cert.serial_number, revoked.cert.not_valid_before_utc)]
        ).public_bytes(Encoding.DER)
    )
    (tmp_path / "root.pem").write_bytes(root.cert_pem())
    (tmp_path / "gone.pem").write_bytes(pem_chain(revoked, root))
    (tmp_path / "fine.pem").write_bytes(pem_chain(fine, root))
    config = tmp_path / "gateway.toml"
    config.write_text("[crl]\nallow_file_urls = true\n")
    d = ("--data-dir", data, "--config", config)
    cli("tenants", "create", "t9", *d)
    cli("anchors", "add", tmp_path / "root.pem", "--tenant", "t9", *d)
    cli("crl", "settings", "--tenant", "t9", "--online", "on", *d)
    gone = cli("trust", "verify", tmp_path / "gone.pem", "--tenant", "t9", "--json", *d, ok=None)
    assert gone.returncode == 1, gone.stdout + gone.stderr
    assert json.loads(gone.stdout)["reason"] == "revoked"
    ok = cli("trust", "verify", tmp_path / "fine.pem", "--tenant", "t9", *d)
    assert ok.stdout.startswith("accepted")
    # with the online check off, the CRL is not consulted
    cli("crl", "settings", "--tenant", "t9", "--online", "off", *d)
    cli("trust", "verify", tmp_path / "gone.pem", "--tenant", "t9", *d)
