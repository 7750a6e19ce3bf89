"""Configuration loading and validation: every error names the key and the problem."""

from __future__ import annotations

import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError, env_overrides, load_config, masked

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "gateway.toml"


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path, env=env or {})


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return str(info.value)


def test_defaults_are_valid() -> None:
    config = load_config(env={})
    assert config.listeners.admin.host == "127.0.0.1"
    assert config.listeners.admin.port == 8081
    assert config.lifecycle.shutdown_grace == 10.0
    assert config.lifecycle.cert_expiry_warning_days == 30


def test_the_example_file_shows_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == load_config(env={})


def _keys(cls: type[Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in fields(cls):
        if f.name == "source":
            continue
        value = getattr(cls(), f.name)
        if is_dataclass(value):
            out |= _keys(type(value), f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def _toml_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _toml_keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_the_example_file_documents_every_setting() -> None:
    documented = _toml_keys(tomllib.loads(EXAMPLE.read_text()))
    assert documented == _keys(Config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[listeners.mqtt]\nport = 70000\n", "listeners.mqtt.port: 70000 is not a port number"),
        ("[listeners.admin]\nport = -1\n", "listeners.admin.port: -1 is not a port number"),
        ("[listeners.mqtt]\nhost = ''\n", "listeners.mqtt.host: must not be empty"),
        ("[listeners.mqtt]\nportt = 1\n", "listeners.mqtt.portt: unknown key"),
        ("[listener.mqtt]\nport = 1\n", "listener: unknown key"),
        ("listeners = 5\n", "listeners: expected a table"),
        ("[listeners.mqtt]\nenabled = 'maybe'\n", "listeners.mqtt.enabled: expected true or false"),
        ("[listeners.mqtt]\nport = 1.5\n", "listeners.mqtt.port: expected an integer, got 1.5"),
        ("[limits]\nhandshake_timeout = 0\n", "limits.handshake_timeout: must be greater than 0"),
        ("[limits]\nhandshake_timeout = nan\n", "limits.handshake_timeout: must be greater than 0"),
        ("[limits]\nhandshake_rate = inf\n", "limits.handshake_rate: must be greater than 0"),
        ("[limits]\nmax_connections = true\n", "limits.max_connections: expected an integer"),
        ("[limits]\nmax_packet_size = 10\n", "limits.max_packet_size: must be between 64"),
        ("[trust]\nmax_chain_length = 1\n", "trust.max_chain_length: must be between 2 and 64"),
        ("[trust]\ndecision_cache_size = 0\n", "trust.decision_cache_size: must be greater"),
        ("[tls]\nmin_version = '1.1'\n", "tls.min_version: '1.1' is not one of '1.2', '1.3'"),
        ("[tls]\nserver_cert = 'a.pem'\n", "tls.server_key: must be set when tls.server_cert"),
        ("[tls]\nserver_key = 'a.key'\n", "tls.server_cert: must be set when tls.server_key"),
        ("[mqtt]\nbackend = 'mosquitto'\n", "mqtt.backend: 'mosquitto' is not one of"),
        ("[mqtt]\nupstream_port = 0\n", "mqtt.upstream_port: 0 is not a port number"),
        (
            "[mqtt]\nbackend = 'upstream'\nupstream_host = ''\n",
            'mqtt.upstream_host: must be set when mqtt.backend = "upstream"',
        ),
        ("[mqtt]\nconnect_timeout = -2\n", "mqtt.connect_timeout: must be greater than 0"),
        ("[logging]\nlevel = 'TRACE'\n", "logging.level: 'TRACE' is not one of"),
        ("[logging]\nformat = 'xml'\n", "logging.format: 'xml' is not one of"),
        ("[lifecycle]\nshutdown_grace = -1\n", "lifecycle.shutdown_grace: must be 0 or more"),
        ("[lifecycle]\nshutdown_grace = inf\n", "lifecycle.shutdown_grace: must be 0 or more"),
        ("[lifecycle]\ncert_expiry_warning_days = -3\n", "lifecycle.cert_expiry_warning_days"),
        ("event_loop = 'trio'\n", "event_loop: 'trio' is not one of"),
        ("store = 'mysql://db/x'\n", "store: 'mysql://db/x' is not a sqlite:/// or redis:// URL"),
        ("store = 'sqlite:///'\n", "store: bad store URL 'sqlite:///'"),
        ("store = 'sqlite://host/x.db'\n", "store: bad store URL"),
        ("data_dir = 3\n", "data_dir: expected a path string"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert message in error(tmp_path, text)


def test_two_tcp_listeners_on_one_port(tmp_path: Path) -> None:
    text = "[listeners.mqtt]\nport = 9000\n[listeners.mqtt_service]\nport = 9000\n"
    assert error(tmp_path, text) == (
        "listeners.mqtt_service.port: 9000 is already used by listeners.mqtt.port"
    )


def test_same_port_allowed_across_transports_and_distinct_addresses(tmp_path: Path) -> None:
    # lwm2m is UDP; the two MQTT listeners bind different loopback addresses
    config = load(
        tmp_path,
        "[listeners.mqtt]\nhost = '127.0.0.1'\nport = 9000\n"
        "[listeners.mqtt_service]\nhost = '127.0.0.2'\nport = 9000\n"
        "[listeners.lwm2m]\nport = 9000\n",
    )
    assert config.listeners.lwm2m.port == 9000
    text = "[listeners.mqtt]\nhost = '0.0.0.0'\nport = 9000\n[listeners.https]\nport = 9000\n"
    assert "already used by listeners.mqtt.port" in error(tmp_path, text)


def test_disabled_and_ephemeral_listeners_never_conflict(tmp_path: Path) -> None:
    load(
        tmp_path,
        "[listeners.mqtt]\nport = 0\n[listeners.mqtt_service]\nport = 0\n"
        "[listeners.https]\nenabled = false\nport = 8883\n",
    )


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml", env={})
    assert "not valid TOML" in error(tmp_path, "[listeners\n")


def test_secrets_are_never_echoed(tmp_path: Path) -> None:
    message = error(tmp_path, "[mqtt]\nupstream_password = 123456789\n")
    assert message == "mqtt.upstream_password: expected a string (value not shown)"
    message = error(tmp_path, "store = 'mysql://admin:hunter22@db/x'\n")
    assert "hunter22" not in message and "admin:********@db" in message


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "MTLS_GATEWAY_LOG_LEVEL": "DEBUG",
        "MTLS_GATEWAY_MQTT_UPSTREAM_PASSWORD": "s3cret-value",
        "MTLS_GATEWAY_STORE": "redis://:pw@localhost:6379/0",
    }
    config = load(tmp_path, "[logging]\nlevel = 'ERROR'\n", env)
    assert config.logging.level == "DEBUG"
    assert config.mqtt.upstream_password == "s3cret-value"
    shown = masked(config)
    assert shown["mqtt"]["upstream_password"] == "********"
    assert shown["store"] == "redis://:********@localhost:6379/0"
    assert "s3cret-value" not in repr(shown) and ":pw@" not in repr(shown)
    message = error(tmp_path, "", {"MTLS_GATEWAY_LOG_FORMAT": "yaml"})
    assert message.startswith("logging.format: 'yaml' is not one of")


def test_env_overrides_lists_every_variable() -> None:
    names = env_overrides()
    assert names["MTLS_GATEWAY_SERVER_CERT"] == "tls.server_cert"
    assert names["MTLS_GATEWAY_MQTT_UPSTREAM_PASSWORD"] == "mqtt.upstream_password"
    assert all(name.startswith("MTLS_GATEWAY_") for name in names)


def test_explicit_arguments_win(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("data_dir = 'a'\nstore = 'sqlite:///x.db'\n")
    config = load_config(path, data_dir=tmp_path / "b", store_url="sqlite:///y.db", env={})
    assert config.data_dir == tmp_path / "b"
    assert config.store_url == "sqlite:///y.db"
