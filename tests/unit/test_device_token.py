"""The device access token in the daemon: the MQTT front-end's ``s/uat``/``s/dat``
handling (sans-IO), the token service with stored per-tenant keys (real SQLite
store and trust state), key rotation and its CLI, and the ``[tokens]`` /
``[[http.proxy]]`` configuration."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations
from gateway.cli import main
from gateway.config import ConfigError, TokenConfig, load_config
from gateway.device_tokens import (
    KEY_CACHE_TTL,
    KEYS_OPTION,
    DeviceTokens,
    TokenRefused,
    list_keys,
    rotate_key,
)
from gateway.pki import make_device
from gateway.secrets import SecretBox
from gateway.store.sqlite import SqliteStore
from gateway.trust_state import TrustState
from protocols.mqtt.codec import (
    Connect,
    MqttDecoder,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    SubscriptionOptions,
    encode,
)
from protocols.mqtt.server import TokenUnavailable
from protocols.mqtt.session import (
    Authorize,
    Event,
    MqttFrontend,
    SendBackend,
    SendDevice,
    TokenRequested,
)
from tests.helpers import Pki
from trust.model import DeviceIdentity, Listener, Reason, Registration, Status
from trust.policy import DecisionPolicy
from trust.tokens import TokenError, TokenReason

NOW = datetime.now(UTC).replace(microsecond=0)


# the MQTT front-end (sans-IO) ---------------------------------------------------


def identity(tenant: str = "t1", device: str = "dev1") -> DeviceIdentity:
    return DeviceIdentity(
        tenant=tenant,
        device_id=device,
        listener=Listener.MQTT_CORE,
        registration=Registration.EXISTING,
        anchor_fingerprint="ab" * 20,
        leaf_fingerprint="cd" * 20,
        leaf_serial=0x1234,
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=30),
        chain_serials=(0x1234, 0x77),
        chain_fingerprints=("cd" * 20, "ab" * 20),
    )


def connected(version: int = 4, *, token_topics: bool = True) -> MqttFrontend:
    fe = MqttFrontend(
        identity(), Listener.MQTT_CORE, max_packet_size=65536, token_topics=token_topics
    )
    events = fe.device_data(encode(Connect("dev1", version), version))
    assert isinstance(events[0], Authorize)
    fe.backend_ready()
    return fe


def device_packets(events: list[Event], version: int = 4) -> list[object]:
    decoder = MqttDecoder(65536, version, server=False)
    return [p for e in events if isinstance(e, SendDevice) for p in decoder.feed(e.data)]


def backend_packets(events: list[Event], version: int = 4) -> list[object]:
    decoder = MqttDecoder(65536, version, server=True)  # after CONNECT
    return [p for e in events if isinstance(e, SendBackend) for p in decoder.feed(e.data)]


@pytest.mark.parametrize("version", [4, 5])
def test_token_request_qos0_is_answered_here_and_never_forwarded(version: int) -> None:
    fe = connected(version)
    events = fe.device_data(encode(Publish("s/uat", b""), version))
    assert events == [TokenRequested()]
    answer = fe.token_answer(b"71,abc.def.ghi")
    [publish] = device_packets(answer, version)
    assert publish == Publish("s/dat", b"71,abc.def.ghi")


def test_token_request_qos1_is_acknowledged_first() -> None:
    fe = connected()
    events = fe.device_data(encode(Publish("s/uat", b"", qos=1, packet_id=7), 4))
    assert device_packets(events) == [Puback(7)]
    assert events[-1] == TokenRequested()
    assert not any(isinstance(e, SendBackend) for e in events)


def test_token_request_qos2_completes_locally_and_counts_once() -> None:
    fe = connected()
    first = fe.device_data(encode(Publish("s/uat", b"", qos=2, packet_id=9), 4))
    assert device_packets(first) == [Pubrec(9)]
    assert first[-1] == TokenRequested()
    again = fe.device_data(encode(Publish("s/uat", b"", qos=2, dup=True, packet_id=9), 4))
    assert device_packets(again) == [Pubrec(9)]
    assert TokenRequested() not in again  # the same request, re-sent
    done = fe.device_data(encode(Pubrel(9), 4))
    assert device_packets(done) == [Pubcomp(9)]
    assert not any(isinstance(e, SendBackend) for e in first + again + done)
    # a PUBREL for another id still belongs to the broker
    other = fe.device_data(encode(Pubrel(10), 4))
    assert backend_packets(other) == [Pubrel(10)]


def test_publishes_to_s_dat_are_dropped_so_no_device_can_forge_an_answer() -> None:
    fe = connected()
    events = fe.device_data(encode(Publish("s/dat", b"71,forged", qos=1, packet_id=3), 4))
    assert device_packets(events) == [Puback(3)]
    assert TokenRequested() not in events
    assert not any(isinstance(e, SendBackend) for e in events)


def test_other_topics_and_subscriptions_still_go_to_the_broker() -> None:
    fe = connected()
    events = fe.device_data(
        encode(Publish("s/us", b"x"), 4)
        + encode(Subscribe(1, (("s/dat", SubscriptionOptions(1)),)), 4)
    )
    packets = backend_packets(events)
    assert packets[0] == Publish("t1/s/us", b"x")
    assert isinstance(packets[1], Subscribe) and packets[1].subscriptions[0][0] == "t1/s/dat"


def test_without_token_topics_s_uat_is_an_ordinary_topic() -> None:
    fe = connected(token_topics=False)
    events = fe.device_data(encode(Publish("s/uat", b"", qos=1, packet_id=2), 4))
    assert backend_packets(events) == [Publish("t1/s/uat", b"", qos=1, packet_id=2)]
    assert TokenRequested() not in events


def test_token_request_held_while_authorizing_is_answered_after() -> None:
    fe = MqttFrontend(identity(), Listener.MQTT_CORE, max_packet_size=65536, token_topics=True)
    data = encode(Connect("dev1", 4), 4) + encode(Publish("s/uat", b""), 4)
    events = fe.device_data(data)
    assert [type(e) for e in events] == [Authorize]
    assert TokenRequested() in fe.backend_ready()


def test_no_answer_before_the_session_is_connected() -> None:
    fe = MqttFrontend(identity(), Listener.MQTT_CORE, max_packet_size=65536, token_topics=True)
    assert fe.token_answer(b"71,x") == []


# the token service ----------------------------------------------------------------


@dataclass
class Env:
    store: SqliteStore
    trust: TrustState
    box: SecretBox
    pki: Pki
    clock: list[datetime]
    mono: list[float]
    data_dir: Path

    def tokens(self, config: TokenConfig | None = None) -> DeviceTokens:
        return DeviceTokens(
            self.store,
            self.box,
            self.trust,
            config or TokenConfig(lifetime=3600.0, leeway=0.0),
            clock=lambda: self.clock[0],
            monotonic=lambda: self.mono[0],
        )

    async def identity(
        self, cn: str, *, days: float = 365, pki: Pki | None = None, tenant: str = "t1"
    ) -> DeviceIdentity:
        """A device accepted by the real trust policy, and registered."""
        pki = pki or self.pki
        await self.trust.refresh()
        dev = make_device(cn, pki.inter, now=self.clock[0], days=days)
        chain = [c.public_bytes(Encoding.DER) for c in (dev.cert, pki.inter.cert, pki.root.cert)]
        decision = self.trust.decide_der(chain, Listener.MQTT_CORE, self.clock[0])
        assert isinstance(decision, DeviceIdentity), decision
        assert decision.tenant == tenant
        await self.store.register_device(tenant, cn, "auto", self.clock[0])
        await self.trust.refresh()
        return decision


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    pki = Pki.create(tmp_path / "pki")
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    for tenant in ("t1", "t2"):
        await store.create_tenant(tenant)
    await operations.add_trusted_certificate(
        store,
        "t1",
        pki.root.cert_pem().decode(),
        "root",
        Status.ENABLED,
        True,
        datetime.now(UTC),
        "test",
    )
    trust = TrustState(
        store,
        DecisionPolicy(),
        server_cert=pki.dir / "server.pem",
        server_key=pki.dir / "server.key",
    )
    await trust.start()
    box = SecretBox.load_or_create(tmp_path)
    yield Env(store, trust, box, pki, [NOW], [1000.0], tmp_path)
    await trust.stop()
    await store.close()


async def test_first_token_creates_a_sealed_key_and_verifies(env: Env) -> None:
    tokens = env.tokens()
    ident = await env.identity("dev1")
    assert await env.store.get_option("t1", KEYS_OPTION) is None
    token = await tokens.issue(ident)
    stored = json.loads(await env.store.get_option("t1", KEYS_OPTION) or "{}")
    assert stored["current"] == jwt.get_unverified_header(token)["kid"]
    assert stored["keys"][0]["key"].startswith("mgk1:")  # sealed with the KEK
    claims = await tokens.verify(token)
    assert (claims.tenant, claims.device_id, claims.serial) == ("t1", "dev1", ident.leaf_serial)
    assert claims.expires_at - claims.issued_at == timedelta(hours=1)
    # another instance sharing the store (and the KEK) accepts it
    assert (await env.tokens().verify(token)).token_id == claims.token_id
    answer = await tokens.mqtt_answer(ident)
    assert answer.startswith(b"71,ey")


async def test_lifetime_never_outlives_the_certificate(env: Env) -> None:
    ident = await env.identity("short", days=0.01)  # 864 s left
    claims = await env.tokens().verify(await env.tokens().issue(ident))
    assert claims.expires_at <= ident.not_after
    dying = replace(ident, not_after=env.clock[0] + timedelta(milliseconds=500))
    with pytest.raises(TokenRefused) as info:
        await env.tokens().issue(dying)
    assert info.value.rejection.reason is Reason.EXPIRED
    with pytest.raises(TokenUnavailable):
        await env.tokens().mqtt_answer(dying)


async def test_expired_and_tampered_tokens(env: Env) -> None:
    tokens = env.tokens(TokenConfig(lifetime=60.0, leeway=5.0))
    token = await tokens.issue(await env.identity("dev1"))
    env.clock[0] += timedelta(seconds=64)  # within the leeway
    await tokens.verify(token)
    env.clock[0] += timedelta(seconds=1)
    with pytest.raises(TokenError) as info:
        await tokens.verify(token)
    assert info.value.reason is TokenReason.EXPIRED
    env.clock[0] = NOW
    head, body, sig = token.split(".")
    with pytest.raises(TokenError) as info:
        await tokens.verify(f"{head}.{body}.{sig[:-6]}AAAAAA")
    assert info.value.reason in (TokenReason.BAD_SIGNATURE, TokenReason.MALFORMED)
    with pytest.raises(TokenError):
        await tokens.verify("not-a-token")


async def test_a_token_signed_with_another_tenants_key_is_refused(env: Env) -> None:
    tokens = env.tokens()
    token = await tokens.issue(await env.identity("dev1"))
    # t2 trusts another PKI, has a device of the same name and keys of its own
    other = Pki.create(env.data_dir / "t2pki", name="Tenant2")
    await operations.add_trusted_certificate(
        env.store,
        "t2",
        other.root.cert_pem().decode(),
        "r",
        Status.ENABLED,
        True,
        datetime.now(UTC),
        "t",
    )
    t2_ident = await env.identity("dev1", pki=other, tenant="t2")
    t2_claims = await tokens.verify(await tokens.issue(t2_ident))
    assert t2_claims.tenant == "t2"
    # forge: t1's key, t2 in the claims
    kid = jwt.get_unverified_header(token)["kid"]
    stored = json.loads(await env.store.get_option("t1", KEYS_OPTION) or "{}")
    key = env.box.open_private_key(stored["keys"][0]["key"], f"device-token:t1:{kid}")
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(dict(claims, tenant="t2"), key, algorithm="ES256", headers={"kid": kid})
    with pytest.raises(TokenError) as info:
        await tokens.verify(forged)
    assert info.value.reason is TokenReason.UNKNOWN_KEY
    # a tenant the gateway does not know costs no store read
    unknown = jwt.encode(dict(claims, tenant="nope"), key, algorithm="ES256", headers={"kid": kid})
    with pytest.raises(TokenError) as info:
        await tokens.verify(unknown)
    assert info.value.reason is TokenReason.UNKNOWN_KEY


async def test_live_rules_disable_revoke_and_anchor(env: Env) -> None:
    tokens = env.tokens()
    ident = await env.identity("dev1")
    token = await tokens.issue(ident)
    await env.store.set_device_enabled("t1", "dev1", False)
    await env.trust.refresh()
    with pytest.raises(TokenRefused) as info:
        await tokens.verify(token)
    assert info.value.rejection.reason is Reason.DEVICE_DISABLED
    with pytest.raises(TokenRefused):  # nor is a new one issued
        await tokens.issue(ident)
    await env.store.set_device_enabled("t1", "dev1", True)
    await operations.set_revocation_settings(env.store, "t1", NOW, "t", offline=True)
    await operations.add_revocations(
        env.store, "t1", [(f"{env.pki.inter.cert.serial_number:x}", None)], NOW, "t"
    )
    await env.trust.refresh()
    with pytest.raises(TokenRefused) as info:
        await tokens.verify(token)
    assert info.value.rejection.reason is Reason.REVOKED


async def test_rotation_keeps_old_tokens_until_dropped(env: Env) -> None:
    tokens, other_instance = env.tokens(), env.tokens()
    ident = await env.identity("dev1")
    old = await tokens.issue(ident)
    old_kid = jwt.get_unverified_header(old)["kid"]
    result = await rotate_key(
        env.store, env.box, "t1", NOW, keep_retired_for=timedelta(hours=1), actor="test"
    )
    assert result.retired == (old_kid,) and result.dropped == ()
    # the cache expires, then new tokens use the new key; old ones still verify
    env.mono[0] += KEY_CACHE_TTL
    new = await tokens.issue(ident)
    assert jwt.get_unverified_header(new)["kid"] == result.kid
    await tokens.verify(old)
    # an instance that cached the old keys meets the new kid: it re-reads once
    await other_instance.verify(new)
    current, keys = await list_keys(env.store, "t1")
    assert current == result.kid and [k.kid for k in keys] == [old_kid, result.kid]
    # drop the old key: its tokens die once the caches expire
    await rotate_key(
        env.store, env.box, "t1", NOW, keep_retired_for=timedelta(hours=1), drop_old=True
    )
    env.mono[0] += KEY_CACHE_TTL
    for instance in (tokens, other_instance):
        with pytest.raises(TokenError) as info:
            await instance.verify(old)
        assert info.value.reason is TokenReason.UNKNOWN_KEY
        with pytest.raises(TokenError):
            await instance.verify(new)


async def test_unknown_kids_do_not_hammer_the_store(env: Env) -> None:
    tokens = env.tokens()
    token = await tokens.issue(await env.identity("dev1"))
    stored = json.loads(await env.store.get_option("t1", KEYS_OPTION) or "{}")
    kid = stored["current"]
    key = env.box.open_private_key(stored["keys"][0]["key"], f"device-token:t1:{kid}")
    claims = jwt.decode(token, options={"verify_signature": False})
    reads = 0
    real = env.store.get_option

    async def counting(tenant: str, name: str) -> str | None:
        nonlocal reads
        reads += 1
        return await real(tenant, name)

    env.store.get_option = counting  # type: ignore[method-assign]
    for i in range(20):
        bogus = jwt.encode(claims, key, algorithm="ES256", headers={"kid": f"bogus-{i}"})
        with pytest.raises(TokenError):
            await tokens.verify(bogus)
    assert reads <= 1


# the CLI ----------------------------------------------------------------------------


async def test_cli_rotate_key_and_list(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    await env.tokens().issue(await env.identity("dev1"))
    first, _ = await list_keys(env.store, "t1")
    args = ["--data-dir", str(env.data_dir), "--json"]
    # the CLI runs its own event loop: call it from a thread
    import asyncio

    code = await asyncio.to_thread(main, ["tokens", "rotate-key", "--tenant", "t1", *args])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["retired"] == [first] and out["kid"] != first
    code = await asyncio.to_thread(main, ["tokens", "keys", "--tenant", "t1", *args])
    listed = json.loads(capsys.readouterr().out)
    assert code == 0 and [k["current"] for k in listed] == [False, True]
    code = await asyncio.to_thread(
        main, ["tokens", "rotate-key", "--tenant", "t1", "--drop-old", *args]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == [first, out["kid"]]
    assert await asyncio.to_thread(main, ["tokens", "keys", "--tenant", "nope", *args]) == 2


def test_cli_refuses_to_create_a_kek(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "create", "t1", "--data-dir", str(tmp_path)]) in (0, 2)
    capsys.readouterr()
    code = main(["tokens", "rotate-key", "--tenant", "t1", "--data-dir", str(tmp_path)])
    assert code == 1
    assert "no key-encryption key" in capsys.readouterr().err
    assert not (tmp_path / "secrets" / "kek").exists()


# configuration -------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path, env={})


def test_token_and_proxy_configuration(tmp_path: Path) -> None:
    config = load_config(env={})
    assert config.tokens == TokenConfig() and config.tokens.enabled
    assert config.http.proxy == ()
    loaded = _load(
        tmp_path,
        '[tokens]\nlifetime = 60\n[[http.proxy]]\nprefix = "/backend"\n'
        'upstream = "https://10.0.0.5:8443/api"\nread_timeout = 5\n',
    )
    assert loaded.tokens.lifetime == 60.0  # type: ignore[attr-defined]
    [route] = loaded.http.proxy  # type: ignore[attr-defined]
    assert (route.prefix, route.upstream, route.read_timeout) == (
        "/backend",
        "https://10.0.0.5:8443/api",
        5.0,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tokens]\nlifetime = 0\n", "tokens.lifetime: must be greater than 0"),
        ("[tokens]\nleeway = -1\n", "tokens.leeway: must be 0 or more"),
        ("[http]\nproxy = 3\n", "http.proxy: expected an array of tables"),
        ('[[http.proxy]]\nprefix = "/a"\nupstream = "http://h"\nx = 1\n', "http.proxy[0].x"),
        ('[[http.proxy]]\nprefix = "a"\nupstream = "http://h"\n', "http.proxy[0].prefix"),
        ('[[http.proxy]]\nprefix = "/a/"\nupstream = "http://h"\n', "http.proxy[0].prefix"),
        ('[[http.proxy]]\nprefix = "/a/../b"\nupstream = "http://h"\n', "http.proxy[0].prefix"),
        ('[[http.proxy]]\nprefix = "/identity"\nupstream = "http://h"\n', "gateway's own"),
        ('[[http.proxy]]\nprefix = "/tenant/x"\nupstream = "http://h"\n', "gateway's own"),
        ('[[http.proxy]]\nprefix = "/.well-known"\nupstream = "http://h"\n', "http.proxy[0]"),
        ('[[http.proxy]]\nprefix = "/a"\nupstream = "ftp://h"\n', "http.proxy[0].upstream"),
        ('[[http.proxy]]\nprefix = "/a"\nupstream = "http://u:p@h"\n', "must not contain cred"),
        ('[[http.proxy]]\nprefix = "/a"\nupstream = "http://h/?q"\n', "no query"),
        (
            '[[http.proxy]]\nprefix = "/a"\nupstream = "http://h"\n'
            '[[http.proxy]]\nprefix = "/a/b"\nupstream = "http://h"\n',
            "http.proxy[1].prefix: /a/b overlaps the proxy prefix /a",
        ),
        (
            '[[http.proxy]]\nprefix = "/a"\nupstream = "http://h"\nread_timeout = 0\n',
            "http.proxy[0].read_timeout",
        ),
    ],
)
def test_invalid_token_and_proxy_settings_name_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert message in str(info.value)
