"""MqttFrontend: the wire-level PUBLISH fast path against the full decode path.

The fast paths rewrite topics on the wire bytes (runs of PUBLISHes through
``PublishRewriter``, single ones through ``RawPublish``); the reference is the
same front-end with both switched off, so every PUBLISH goes through
``Publish`` objects, ``replace`` and ``encode``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mqtt.codec import (
    Connect,
    MqttDecoder,
    Properties,
    Publish,
    RawPublish,
    Subscribe,
    SubscriptionOptions,
    encode,
)
from protocols.mqtt.session import (
    Authorize,
    Event,
    MqttFrontend,
    Published,
    SendBackend,
    SendDevice,
)
from trust.model import DeviceIdentity, Listener, Registration

NOW = datetime.now(UTC).replace(microsecond=0)
TENANT = "acme-1"


def identity() -> DeviceIdentity:
    return DeviceIdentity(
        tenant=TENANT,
        device_id="dev1",
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


class SlowFrontend(MqttFrontend):
    """The reference: every PUBLISH takes the full decode/encode path."""

    def _mount_topic(self, p: RawPublish) -> bytes | None:
        return None

    def _unmount_topic(self, p: RawPublish) -> bytes | None:
        return None


def connected(cls: type[MqttFrontend], version: int, token_topics: bool = True) -> MqttFrontend:
    fe = cls(identity(), Listener.MQTT_CORE, max_packet_size=1 << 20, token_topics=token_topics)
    events = fe.device_data(encode(Connect("dev1", version), version))
    assert isinstance(events[0], Authorize)
    fe.backend_ready()
    return fe


def summary(events: list[Event]) -> tuple[bytes, bytes, dict[str, int], list[Event]]:
    """(bytes to the device, bytes to the broker, PUBLISH counts, other events)."""
    device = b"".join(e.data for e in events if isinstance(e, SendDevice))
    backend = b"".join(e.data for e in events if isinstance(e, SendBackend))
    counts: dict[str, int] = {}
    for e in events:
        if isinstance(e, Published):
            counts[e.direction] = counts.get(e.direction, 0) + e.count
    rest = [e for e in events if not isinstance(e, SendDevice | SendBackend | Published)]
    return device, backend, counts, rest


_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#/")
_strings = st.text(_chars, max_size=3)
_level = st.text(_chars, min_size=0, max_size=6)
topic_names = st.one_of(
    st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool),
    st.sampled_from(["s/uat", "s/dat", "$SYS/x", "$", "a/b", "é/ü/€", "x" * 300]),
)


@st.composite
def publishes(draw: st.DrawFn, version: int, topic: st.SearchStrategy[str]) -> Publish:
    qos = draw(st.integers(0, 2))
    packet_id = draw(st.integers(1, 0xFFFF)) if qos else None
    props = Properties()
    if version == 5:
        props = Properties(
            payload_format_indicator=draw(st.none() | st.integers(0, 1)),
            message_expiry_interval=draw(st.none() | st.integers(0, 2**32 - 1)),
            content_type=draw(st.none() | st.text(_chars, max_size=5)),
            response_topic=draw(st.none() | st.sampled_from(["reply/x", "r"])),
            correlation_data=draw(st.none() | st.binary(max_size=5)),
            topic_alias=draw(st.none() | st.integers(1, 10)),
            user_properties=tuple(draw(st.lists(st.tuples(_strings, _strings), max_size=2))),
        )
    return Publish(
        draw(topic),
        draw(st.binary(max_size=200)),
        qos,
        draw(st.booleans()),
        bool(qos) and draw(st.booleans()),
        packet_id,
        props,
    )


def _check_device(version: int, pubs: list[Publish], token_topics: bool) -> None:
    fast = connected(MqttFrontend, version, token_topics)
    slow = connected(SlowFrontend, version, token_topics)
    wire = b"".join(encode(p, version) for p in pubs)
    # whole batch at once, then byte by byte for the partial-packet path
    assert summary(fast.device_data(wire)) == summary(slow.device_data(wire))
    fast = connected(MqttFrontend, version, token_topics)
    slow = connected(SlowFrontend, version, token_topics)
    fast_events: list[Event] = []
    slow_events: list[Event] = []
    for i in range(0, len(wire), 7):
        fast_events += fast.device_data(wire[i : i + 7])
        slow_events += slow.device_data(wire[i : i + 7])
    assert summary(fast_events) == summary(slow_events)
    assert fast.state is slow.state


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_device_publish_fast_path_matches_slow_path(data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([4, 5]))
    pubs = data.draw(st.lists(publishes(version, topic_names), min_size=1, max_size=8))
    _check_device(version, pubs, data.draw(st.booleans()))


_backend_topics = st.one_of(
    topic_names.map(lambda t: f"{TENANT}/{t}"),
    topic_names,
    st.sampled_from([f"{TENANT}/", f"{TENANT}/$x", f"{TENANT}x/a", "other/a", TENANT]),
)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_backend_publish_fast_path_matches_slow_path(data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([4, 5]))
    pubs = data.draw(st.lists(publishes(version, _backend_topics), min_size=1, max_size=8))
    wire = b"".join(encode(p, version) for p in pubs)
    fast = connected(MqttFrontend, version)
    slow = connected(SlowFrontend, version)
    assert summary(fast.backend_data(wire)) == summary(slow.backend_data(wire))


def test_fast_path_bytes_decode_to_the_mounted_publish() -> None:
    for version in (4, 5):
        fe = connected(MqttFrontend, version)
        pub = Publish("a/é", b"payload", 1, True, True, 77)
        events = fe.device_data(encode(pub, version) * 3)
        assert [type(e) for e in events] == [SendBackend, Published]
        assert events[1] == Published("device", 3)
        assert isinstance(events[0], SendBackend)
        decoded = MqttDecoder(1 << 20, version, server=True).feed(events[0].data)
        assert decoded == [Publish(f"{TENANT}/a/é", b"payload", 1, True, True, 77)] * 3


def test_forbidden_topics_still_refused() -> None:
    for version in (4, 5):
        for topic in ("$SYS/broker", "$share"):
            fe = connected(MqttFrontend, version)
            ok = encode(Publish("ok", b"1"), version)
            events = fe.device_data(ok + encode(Publish(topic, b"x"), version) + ok)
            _, backend, counts, rest = summary(events)
            assert counts == {"device": 1}
            assert backend == encode(Publish(f"{TENANT}/ok", b"1"), version)
            assert [getattr(e, "code", None) for e in rest] == ["forbidden_topic"]
            assert fe.closed
        fe = connected(MqttFrontend, version)
        events = fe.device_data(b"\x30\x05\x00\x03a/+")  # wildcard: malformed
        assert summary(events)[3][-1].code == "malformed"  # type: ignore[union-attr]


def test_slow_packets_keep_their_order_between_fast_ones() -> None:
    fe = connected(MqttFrontend, 4)
    sub = Subscribe(5, (("x/#", SubscriptionOptions(qos=1)),))
    wire = encode(Publish("a", b"1"), 4) + encode(sub, 4) + encode(Publish("b", b"2"), 4)
    events = fe.device_data(wire)
    sends = [e.data for e in events if isinstance(e, SendBackend)]
    decoded = [p for d in sends for p in MqttDecoder(1 << 20, 4, server=True).feed(d)]
    assert [type(p).__name__ for p in decoded] == ["Publish", "Subscribe", "Publish"]
    assert sum(e.count for e in events if isinstance(e, Published)) == 2


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_streams_end_the_same_way_on_both_paths(data: st.DataObject) -> None:
    """Byte flips, zero packet ids, properties after a cached head, truncation:
    the fast path forwards exactly what the full path forwards and fails the same."""
    version = data.draw(st.sampled_from([4, 5]))
    pub = Publish("a/b", b"x" * 10, data.draw(st.integers(0, 2)), packet_id=None)
    if pub.qos:
        pub = Publish("a/b", b"x" * 10, pub.qos, packet_id=9)
    wire = bytearray(encode(pub, version) * 4)
    wire += b"".join(
        encode(p, version) for p in data.draw(st.lists(publishes(version, topic_names), max_size=3))
    )
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    wire = wire[: data.draw(st.integers(1, len(wire)))]
    step = data.draw(st.sampled_from([len(wire), 1, 5, 13]))
    fast = connected(MqttFrontend, version)
    slow = connected(SlowFrontend, version)
    fast_events: list[Event] = []
    slow_events: list[Event] = []
    for i in range(0, len(wire), step):
        fast_events += fast.device_data(bytes(wire[i : i + step]))
        slow_events += slow.device_data(bytes(wire[i : i + step]))
    assert summary(fast_events) == summary(slow_events)
    assert fast.state is slow.state


def test_cached_head_still_checks_packet_id_and_properties() -> None:
    fe = connected(MqttFrontend, 5)
    good = encode(Publish("t", b"p", 1, packet_id=3), 5)
    zero = bytearray(good)
    zero[5:7] = b"\0\0"  # head: 0x32 len 0x00 0x01 't' | packet id | props
    events = fe.device_data(good + bytes(zero))
    assert summary(events)[2] == {"device": 1}
    assert summary(events)[3][-1].code == "malformed"  # type: ignore[union-attr]
    assert fe.closed
    fe = connected(MqttFrontend, 5)
    for qos, pid in ((0, None), (1, 3), (2, 4)):
        fe = connected(MqttFrontend, 5)
        plain = encode(Publish("t", b"p" * 9, qos, packet_id=pid), 5)
        props = Properties(content_type="a", response_topic="r")
        with_props = encode(Publish("t", b"p", qos, packet_id=pid, properties=props), 5)
        assert len(with_props) == len(plain)  # the same head: only the checks tell them apart
        _, backend, counts, _ = summary(fe.device_data(plain + with_props + plain))
        assert counts == {"device": 3}
        decoded = MqttDecoder(1 << 20, 5, server=True).feed(backend)
        mounted = Properties(content_type="a", response_topic="acme-1/r")
        assert [p.properties for p in decoded] == [Properties(), mounted, Properties()]  # type: ignore[union-attr]


def test_rewrite_cache_is_bounded_and_long_topics_bypass_it() -> None:
    from protocols.mqtt import fastpath

    fe = connected(MqttFrontend, 4)
    wire = b"".join(encode(Publish(f"t/{i}", b"x"), 4) for i in range(fastpath.CACHE_LIMIT + 5))
    long = encode(Publish("l/" + "x" * fastpath.HEAD_LIMIT, b"x"), 4)
    _, backend, counts, _ = summary(fe.device_data(wire + long))
    assert counts == {"device": fastpath.CACHE_LIMIT + 6}
    assert fe._fast_in is not None and len(fe._fast_in._cache) <= fastpath.CACHE_LIMIT
    assert b"acme-1/l/xxx" in backend


def test_a_peer_cycling_through_topics_falls_back_to_the_full_decoder() -> None:
    from protocols.mqtt import fastpath

    fe = connected(MqttFrontend, 4)
    topics = [f"t/{i}" for i in range(fastpath.CACHE_LIMIT * 3)]
    batch = b"".join(encode(Publish(t, b"x"), 4) for t in topics)
    slow = connected(SlowFrontend, 4)
    for _ in range(3):
        assert summary(fe.device_data(batch)) == summary(slow.device_data(batch))
    assert fe._fast_in is not None and fe._fast_in._bypass > 0
    # repeated heads again: the fast path comes back once the bypass is spent
    fe._fast_in._bypass = 1
    same = encode(Publish("t/0", b"x"), 4) * 4
    fe.device_data(same)  # spends the bypass
    assert summary(fe.device_data(same)) == summary(slow.device_data(same))
    assert fe._fast_in._cache
