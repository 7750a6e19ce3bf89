"""``mtls-gateway config check|show`` and ``status`` (no daemon: unreachable)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.cli.config_cmd import to_toml
from gateway.config import load_config
from gateway.pki import make_ca, make_server, write_private
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MTLS_GATEWAY_DATA_DIR", "MTLS_GATEWAY_STORE", "MTLS_GATEWAY_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(REPO / "configs" / "gateway.toml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_check_rejects_with_key_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[limits]\nhandshake_timeout = -1\n")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: limits.handshake_timeout: must be greater than 0, got -1.0" in err


def test_check_loads_an_explicit_certificate_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = make_ca("Check CA")
    one, other = make_server(ca), make_server(ca)
    (tmp_path / "server.pem").write_bytes(one.cert_pem())
    write_private(tmp_path / "server.key", one.key_pem())
    write_private(tmp_path / "other.key", other.key_pem())
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"[tls]\nserver_cert = '{tmp_path}/server.pem'\nserver_key = '{tmp_path}/server.key'\n"
    )
    assert main(["config", "check", str(path)]) == 0
    path.write_text(
        f"[tls]\nserver_cert = '{tmp_path}/server.pem'\nserver_key = '{tmp_path}/other.key'\n"
    )
    assert main(["config", "check", str(path)]) == 2
    assert "cannot load the certificate and key as a pair" in capsys.readouterr().err
    path.write_text(
        f"[tls]\nserver_cert = '{tmp_path}/nope.pem'\nserver_key = '{tmp_path}/server.key'\n"
    )
    assert main(["config", "check", str(path)]) == 2
    assert "file not found" in capsys.readouterr().err


def test_check_flags_unknown_environment_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MTLS_GATEWAY_LOGLEVEL", "DEBUG")
    monkeypatch.setenv("MTLS_GATEWAY_LOG_FORMAT", "json")
    assert main(["config", "check", str(REPO / "configs" / "gateway.toml")]) == 0
    out = capsys.readouterr().out
    assert "MTLS_GATEWAY_LOGLEVEL is not a known setting" in out
    assert "MTLS_GATEWAY_LOG_FORMAT overrides logging.format" in out


def test_show_prints_loadable_toml_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MTLS_GATEWAY_MQTT_UPSTREAM_PASSWORD", "do-not-print-me")
    path = tmp_path / "gateway.toml"
    path.write_text("[listeners.mqtt]\nport = 1234\n[lifecycle]\nshutdown_grace = 2.5\n")
    assert main(["config", "show", "--config", str(path), "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "do-not-print-me" not in out
    tree = tomllib.loads(out)
    assert tree["mqtt"]["upstream_password"] == "********"
    assert tree["listeners"]["mqtt"]["port"] == 1234
    # what it prints is itself a valid configuration with the same effect
    (tmp_path / "shown.toml").write_text(out)
    again = load_config(tmp_path / "shown.toml", env={})
    assert again.listeners.mqtt.port == 1234
    assert again.lifecycle.shutdown_grace == 2.5
    assert again.store_url == f"sqlite:///{(tmp_path / 'gateway.db').resolve()}"

    assert main(["config", "show", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["listeners"]["mqtt"]["port"] == 1234


def test_status_without_a_daemon_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--admin", url, "--timeout", "5"]) == 1
    assert f"cannot reach the gateway's admin listener at {url}" in capsys.readouterr().err


def test_to_toml_writes_tables_arrays_of_tables_and_escapes() -> None:
    tree = {
        "name": 'a "quoted" \\ value',
        "ratio": 0.5,
        "off": False,
        "empty": [],
        "outer": {"port": 1, "inner": {"hosts": ["a", "b"]}},
        "routes": [{"prefix": "/x", "timeout": 5.0}, {"prefix": "/y", "timeout": 1.0}],
    }
    assert tomllib.loads(to_toml(tree)) == tree
