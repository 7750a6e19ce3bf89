"""Tests for the sans-IO MQTT codec (protocols.mqtt.codec)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.mqtt.codec import (
    EMPTY_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttDecoder,
    MqttEncodeError,
    MqttProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
    connack_for_error,
    disconnect_for_error,
    encode,
    encode_reject_connack,
    reject_connack,
    v311_return_code,
)

MALFORMED = 0x81
PROTOCOL = 0x82

# --------------------------------------------------------------------------
# Strategies (written independently of the codec's own property table)
# --------------------------------------------------------------------------

mqtt_text = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=8)
topic_text = st.text(
    st.characters(exclude_characters="\x00+#", codec="utf-8"), min_size=1, max_size=8
)
small_binary = st.binary(max_size=12)
u8_bool = st.integers(0, 1)
u16 = st.integers(0, 0xFFFF)
u16_nonzero = st.integers(1, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
user_props = st.lists(st.tuples(mqtt_text, mqtt_text), min_size=1, max_size=3).map(tuple)
sub_id = st.integers(1, 268_435_455)

PROPERTY_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": u8_bool,
    "message_expiry_interval": u32,
    "content_type": mqtt_text,
    "response_topic": topic_text,
    "correlation_data": small_binary,
    "session_expiry_interval": u32,
    "assigned_client_identifier": mqtt_text,
    "server_keep_alive": u16,
    "authentication_method": mqtt_text,
    "authentication_data": small_binary,
    "request_problem_information": u8_bool,
    "will_delay_interval": u32,
    "request_response_information": u8_bool,
    "response_information": mqtt_text,
    "server_reference": mqtt_text,
    "reason_string": mqtt_text,
    "receive_maximum": u16_nonzero,
    "topic_alias_maximum": u16,
    "topic_alias": u16_nonzero,
    "maximum_qos": u8_bool,
    "retain_available": u8_bool,
    "user_properties": user_props,
    "maximum_packet_size": st.integers(1, 0xFFFF_FFFF),
    "wildcard_subscription_available": u8_bool,
    "subscription_identifier_available": u8_bool,
    "shared_subscription_available": u8_bool,
}
_MESSAGE = ["payload_format_indicator", "message_expiry_interval", "content_type"]
_MESSAGE += ["response_topic", "correlation_data", "user_properties"]
ALLOWED: dict[str, list[str]] = {
    "publish": [*_MESSAGE, "topic_alias"],
    "will": [*_MESSAGE, "will_delay_interval"],
    "connect": [
        "session_expiry_interval",
        "authentication_method",
        "authentication_data",
        "request_problem_information",
        "request_response_information",
        "receive_maximum",
        "topic_alias_maximum",
        "user_properties",
        "maximum_packet_size",
    ],
    "connack": [
        "session_expiry_interval",
        "assigned_client_identifier",
        "server_keep_alive",
        "authentication_method",
        "authentication_data",
        "response_information",
        "server_reference",
        "reason_string",
        "receive_maximum",
        "topic_alias_maximum",
        "maximum_qos",
        "retain_available",
        "user_properties",
        "maximum_packet_size",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
    ],
    "ack": ["reason_string", "user_properties"],
    "subscribe": ["user_properties"],
    "unsubscribe": ["user_properties"],
    "disconnect": [
        "session_expiry_interval",
        "server_reference",
        "reason_string",
        "user_properties",
    ],
    "auth": ["authentication_method", "authentication_data", "reason_string", "user_properties"],
}


@st.composite
def properties(draw: st.DrawFn, kind: str, version: int) -> Properties:
    if version != 5:
        return EMPTY_PROPERTIES
    values = draw(
        st.fixed_dictionaries({}, optional={n: PROPERTY_STRATEGIES[n] for n in ALLOWED[kind]})
    )
    if kind == "publish":
        values["subscription_identifiers"] = tuple(draw(st.lists(sub_id, max_size=3)))
    if kind == "subscribe":
        values["subscription_identifiers"] = tuple(draw(st.lists(sub_id, max_size=1)))
    if "authentication_data" in values and kind in ("connect",):
        values.setdefault("authentication_method", "m")
    return Properties(**values)


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    clean = draw(st.booleans())
    if version == 3:
        client_id = draw(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=23)
        )
    else:
        client_id = draw(mqtt_text)
        if version == 4 and not client_id:
            clean = True
    username = draw(st.none() | mqtt_text)
    password = draw(st.none() | small_binary)
    if version != 5 and username is None:
        password = None
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(topic_text),
            draw(small_binary),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(properties("will", version)),
        )
    return Connect(
        client_id,
        version,
        clean,
        draw(u16),
        username,
        password,
        will,
        draw(properties("connect", version)),
    )


CONNACK_V5 = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C]
CONNACK_V5 += [0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
PUBACK_V5 = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
PUBREL_V5 = [0x00, 0x92]
SUBACK_V5 = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
UNSUBACK_V5 = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
DISCONNECT_V5 = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90]
DISCONNECT_V5 += list(range(0x93, 0xA3))


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    code = draw(st.sampled_from(CONNACK_V5 if version == 5 else range(6)))
    session_present = draw(st.booleans()) if code == 0 else False
    return Connack(session_present, code, draw(properties("connack", version)))


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties("publish", version))
    topic = draw(topic_text)
    if version == 5 and props.topic_alias is not None and draw(st.booleans()):
        topic = ""
    return Publish(
        topic,
        draw(st.binary(max_size=64)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(u16_nonzero) if qos else None,
        props,
    )


@st.composite
def pub_acks(draw: st.DrawFn, version: int) -> Packet:
    classes: list[type[Puback | Pubrec | Pubrel | Pubcomp]] = [Puback, Pubrec, Pubrel, Pubcomp]
    cls = draw(st.sampled_from(classes))
    code = 0
    if version == 5:
        code = draw(st.sampled_from(PUBACK_V5 if cls in (Puback, Pubrec) else PUBREL_V5))
    packet: Packet = cls(draw(u16_nonzero), code, draw(properties("ack", version)))
    return packet


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    subs = []
    for _ in range(draw(st.integers(1, 4))):
        topic_filter = draw(st.one_of(mqtt_text, st.just("$share/g/a/#"), st.just("+/#")))
        if version == 5:
            no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")
            opts = SubscriptionOptions(
                draw(st.integers(0, 2)), no_local, draw(st.booleans()), draw(st.integers(0, 2))
            )
        else:
            opts = SubscriptionOptions(draw(st.integers(0, 2)))
        subs.append((topic_filter, opts))
    return Subscribe(draw(u16_nonzero), tuple(subs), draw(properties("subscribe", version)))


@st.composite
def subacks(draw: st.DrawFn, version: int) -> Suback:
    valid = SUBACK_V5 if version == 5 else [0, 1, 2, 0x80]
    codes = tuple(draw(st.lists(st.sampled_from(valid), min_size=1, max_size=4)))
    return Suback(draw(u16_nonzero), codes, draw(properties("ack", version)))


@st.composite
def unsubscribes(draw: st.DrawFn, version: int) -> Unsubscribe:
    filters = tuple(draw(st.lists(mqtt_text, min_size=1, max_size=4)))
    return Unsubscribe(draw(u16_nonzero), filters, draw(properties("unsubscribe", version)))


@st.composite
def unsubacks(draw: st.DrawFn, version: int) -> Unsuback:
    if version != 5:
        return Unsuback(draw(u16_nonzero))
    codes = tuple(draw(st.lists(st.sampled_from(UNSUBACK_V5), min_size=1, max_size=4)))
    return Unsuback(draw(u16_nonzero), codes, draw(properties("ack", version)))


@st.composite
def disconnects(draw: st.DrawFn, version: int) -> Disconnect:
    if version != 5:
        return Disconnect()
    code = draw(st.sampled_from(DISCONNECT_V5))
    return Disconnect(code, draw(properties("disconnect", version)))


@st.composite
def auths(draw: st.DrawFn) -> Auth:
    code = draw(st.sampled_from([0x00, 0x18, 0x19]))
    return Auth(code, draw(properties("auth", 5)))


def packets(version: int, *, with_connect: bool = True) -> st.SearchStrategy[Packet]:
    choices: list[st.SearchStrategy[Any]] = [
        connacks(version),
        publishes(version),
        pub_acks(version),
        subscribes(version),
        subacks(version),
        unsubscribes(version),
        unsubacks(version),
        st.just(Pingreq()),
        st.just(Pingresp()),
        disconnects(version),
    ]
    if with_connect:
        choices.append(connects(version))
    if version == 5:
        choices.append(auths())
    return st.one_of(choices)


def decode_all(data: bytes, version: int | None = 4, **kwargs: Any) -> list[Packet]:
    if version is None:
        return MqttDecoder(**kwargs).feed(data)
    return MqttDecoder(protocol_version=version, server=False, **kwargs).feed(data)


def decode_error(data: bytes, version: int | None = 4, **kwargs: Any) -> MqttProtocolError:
    with pytest.raises(MqttProtocolError) as info:
        decode_all(data, version, **kwargs)
    return info.value


VERSIONS = [3, 4, 5]
SETTINGS = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(data=st.data())
def test_round_trip_every_packet(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    wire = encode(packet, version)
    assert decode_all(wire, version) == [packet]


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=60)
@given(data=st.data())
def test_round_trip_connect_server_side(version: int, data: st.DataObject) -> None:
    connect = data.draw(connects(version))
    decoder = MqttDecoder()
    assert decoder.protocol_version is None
    assert decoder.feed(encode(connect, version)) == [connect]
    assert decoder.protocol_version == version


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_in_random_chunks(version: int, data: st.DataObject) -> None:
    connect = data.draw(connects(version))
    client_packets = st.one_of(
        publishes(version),
        pub_acks(version),
        subscribes(version),
        unsubscribes(version),
        st.just(Pingreq()),
        disconnects(version),
    ).filter(lambda p: not (isinstance(p, Publish) and p.properties.subscription_identifiers))
    rest = data.draw(st.lists(client_packets, max_size=8))
    stream = b"".join(encode(p, version) for p in [connect, *rest])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = MqttDecoder()  # server side: learns the version from CONNECT
    out: list[Packet] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == [connect, *rest]
    assert decoder.buffered == 0


def test_byte_by_byte_and_single_feed() -> None:
    pkts: list[Packet] = [
        Connect("dev", 5, keepalive=30, properties=Properties(receive_maximum=10)),
        Publish(
            "a/b", b"x" * 300, 1, packet_id=1, properties=Properties(user_properties=(("k", "v"),))
        ),
        Publish("a/c", b"", 0),
        Pubrec(7),
        Pubrel(7),
        Subscribe(2, (("a/#", SubscriptionOptions(1, no_local=True)),)),
        Pingreq(),
        Disconnect(0x04),
    ]
    stream = b"".join(encode(p, 5) for p in pkts)
    decoder = MqttDecoder()
    out: list[Packet] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        assert decoder.buffered <= 300 + 40
    assert out == pkts
    assert MqttDecoder().feed(stream) == pkts
    assert MqttDecoder().feed(bytearray(stream)) == pkts
    assert MqttDecoder().feed(memoryview(stream)) == pkts


def test_feed_does_not_keep_caller_buffer_exported() -> None:
    buf = bytearray(encode(Connect("x"), 4) + b"\x30\x06\x00\x01")
    MqttDecoder().feed(buf)
    buf.extend(b"resize works")  # would raise BufferError if a view were still held


# --------------------------------------------------------------------------
# Hand-built wire vectors
# --------------------------------------------------------------------------

MQTT = b"\x00\x04MQTT"

VECTORS: list[tuple[int, bytes, Packet]] = [
    # Minimal 3.1.1 CONNECT: clean session, keepalive 60, client id "abc" (3.1.1 §3.1).
    (4, b"\x10\x0f" + MQTT + b"\x04\x02\x00\x3c\x00\x03abc", Connect("abc", 4, True, 60)),
    # 3.1.1 CONNECT with will (QoS 1), user name and password: flags 0xCE.
    (
        4,
        b"\x10\x1b" + MQTT + b"\x04\xce\x00\x0a\x00\x02id\x00\x01w\x00\x01x\x00\x01u\x00\x02pw",
        Connect("id", 4, True, 10, "u", b"pw", Will("w", b"x", 1, False)),
    ),
    # Will retain + QoS 2, no clean session, empty password: flags 0x74 | 0x80.
    (
        4,
        b"\x10\x17" + MQTT + b"\x04\xf4\x00\x00\x00\x01c\x00\x01t\x00\x00\x00\x01u\x00\x00",
        Connect("c", 4, False, 0, "u", b"", Will("t", b"", 2, True)),
    ),
    # MQTT 3.1 ("MQIsdp", level 3).
    (3, b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01x", Connect("x", 3, True, 60)),
    # MQTT 5 CONNECT with Session Expiry Interval 0x78 (§3.1.2.11.2).
    (
        5,
        b"\x10\x13" + MQTT + b"\x05\x02\x00\x1e\x05\x11\x00\x00\x00\x78\x00\x01c",
        Connect("c", 5, True, 30, properties=Properties(session_expiry_interval=0x78)),
    ),
    # MQTT 5 CONNECT with will properties (Will Delay 5) and empty properties.
    (
        5,
        b"\x10\x19" + MQTT + b"\x05\x06\x00\x00\x00\x00\x01c\x05\x18\x00\x00\x00\x05"
        b"\x00\x01t\x00\x00",
        Connect("c", 5, True, 0, will=Will("t", b"", properties=Properties(will_delay_interval=5))),
    ),
    (4, b"\x20\x02\x00\x00", Connack()),
    (4, b"\x20\x02\x01\x00", Connack(True)),
    (4, b"\x20\x02\x00\x05", Connack(False, 5)),
    (5, b"\x20\x03\x00\x00\x00", Connack()),
    (5, b"\x20\x07\x00\x87\x04\x1f\x00\x01r", Connack(False, 0x87, Properties(reason_string="r"))),
    (4, b"\x30\x07\x00\x03a/bhi", Publish("a/b", b"hi")),
    (4, b"\x32\x09\x00\x03a/b\x00\x0ahi", Publish("a/b", b"hi", 1, packet_id=10)),
    (4, b"\x3d\x05\x00\x01a\xff\xff", Publish("a", b"", 2, True, True, 0xFFFF)),
    (
        5,
        b"\x30\x08\x00\x00\x03\x23\x00\x05hi",
        Publish("", b"hi", properties=Properties(topic_alias=5)),
    ),
    (
        5,
        b"\x30\x12\x00\x01a\x0e\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w",
        Publish("a", properties=Properties(user_properties=(("k", "v"), ("k", "w")))),
    ),
    (
        5,
        b"\x30\x0a\x00\x01a\x05\x0b\x01\x0b\x80\x01\x01",
        Publish("a", b"\x01", properties=Properties(subscription_identifiers=(1, 128))),
    ),
    (4, b"\x40\x02\x00\x01", Puback(1)),
    (5, b"\x40\x02\x00\x01", Puback(1)),
    (5, b"\x40\x03\x00\x01\x10", Puback(1, 0x10)),
    (5, b"\x50\x07\x00\x01\x80\x03\x1f\x00\x00", Pubrec(1, 0x80, Properties(reason_string=""))),
    (4, b"\x62\x02\x00\x01", Pubrel(1)),
    (5, b"\x62\x03\x00\x01\x92", Pubrel(1, 0x92)),
    (4, b"\x70\x02\x12\x34", Pubcomp(0x1234)),
    (4, b"\x82\x08\x00\x01\x00\x03a/b\x01", Subscribe(1, (("a/b", SubscriptionOptions(1)),))),
    (
        5,
        b"\x82\x0b\x00\x01\x02\x0b\x07\x00\x03a/b\x1e",
        Subscribe(
            1,
            (("a/b", SubscriptionOptions(2, True, True, 1)),),
            Properties(subscription_identifiers=(7,)),
        ),
    ),
    (4, b"\x90\x04\x00\x01\x01\x80", Suback(1, (1, 0x80))),
    (5, b"\x90\x04\x00\x01\x00\x8f", Suback(1, (0x8F,))),
    (4, b"\xa2\x05\x00\x02\x00\x01a", Unsubscribe(2, ("a",))),
    (5, b"\xa2\x06\x00\x02\x00\x00\x01a", Unsubscribe(2, ("a",))),
    (4, b"\xb0\x02\x00\x02", Unsuback(2)),
    (5, b"\xb0\x04\x00\x02\x00\x11", Unsuback(2, (0x11,))),
    (4, b"\xc0\x00", Pingreq()),
    (4, b"\xd0\x00", Pingresp()),
    (4, b"\xe0\x00", Disconnect()),
    (5, b"\xe0\x00", Disconnect()),
    (5, b"\xe0\x01\x04", Disconnect(0x04)),
    (
        5,
        b"\xe0\x07\x8e\x05\x11\x00\x00\x00\x00",
        Disconnect(0x8E, Properties(session_expiry_interval=0)),
    ),
    (5, b"\xf0\x00", Auth()),
    (
        5,
        b"\xf0\x08\x18\x06\x15\x00\x03abc",
        Auth(0x18, Properties(authentication_method="abc")),
    ),
]


@pytest.mark.parametrize(("version", "wire", "packet"), VECTORS)
def test_wire_vectors(version: int, wire: bytes, packet: Packet) -> None:
    assert encode(packet, version) == wire
    assert decode_all(wire, version) == [packet]


def test_connect_vector_server_side() -> None:
    wire = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"
    decoder = MqttDecoder()
    assert decoder.feed(wire) == [Connect("abc", 4, True, 60)]
    assert decoder.protocol_version == 4


@pytest.mark.parametrize(
    ("wire", "packet"),
    [
        (b"\x40\x03\x00\x01\x00", Puback(1)),  # reason code present, §3.4.2.1
        (b"\x40\x04\x00\x01\x00\x00", Puback(1)),  # empty properties present
        (b"\xe0\x01\x00", Disconnect()),
        (b"\xe0\x02\x00\x00", Disconnect()),
        (b"\xf0\x01\x00", Auth()),
        (b"\x20\x03\x00\x00\x00", Connack()),
    ],
)
def test_v5_long_forms_decode_to_canonical(wire: bytes, packet: Packet) -> None:
    assert decode_all(wire, 5) == [packet]


def test_large_remaining_length_varint() -> None:
    payload = b"p" * 20000
    wire = encode(Publish("t", payload), 4)
    assert wire[:4] == b"\x30\xa3\x9c\x01"  # 20003 = 0x23 + 0x1c*128 + 1*16384
    assert decode_all(wire) == [Publish("t", payload)]


# --------------------------------------------------------------------------
# Size limit
# --------------------------------------------------------------------------


def test_oversize_rejected_from_fixed_header_alone() -> None:
    decoder = MqttDecoder(max_packet_size=100, protocol_version=4)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(b"\x30\x80\x01")  # remaining length 128, no body yet
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert decoder.buffered == 0


def test_oversize_rejected_when_header_arrives_piecewise() -> None:
    decoder = MqttDecoder(max_packet_size=1000, protocol_version=4)
    assert decoder.feed(b"\x30") == []
    assert decoder.feed(b"\xff") == []
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(b"\x7f")  # 16383
    assert info.value.reason_code == 0x95


def test_oversize_connect_before_version_known() -> None:
    err = decode_error(b"\x10\xff\xff\xff\x7f", None)
    assert err.reason_code == 0x95
    assert err.protocol_version is None
    assert connack_for_error(err) is None  # no 3.1.1 equivalent: just close


def test_limit_counts_whole_packet() -> None:
    wire = encode(Publish("t", b"x" * 10), 4)  # 2 + 13 bytes
    assert decode_all(wire, 4, max_packet_size=len(wire)) == [Publish("t", b"x" * 10)]
    assert decode_error(wire, 4, max_packet_size=len(wire) - 1).reason_code == 0x95


@settings(max_examples=100)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=10))
def test_buffer_never_exceeds_limit(chunks: list[bytes]) -> None:
    decoder = MqttDecoder(max_packet_size=64, protocol_version=5, server=False)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except MqttProtocolError:
            return
        assert decoder.buffered <= 64


def test_decoder_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        MqttDecoder(max_packet_size=1)
    with pytest.raises(ValueError):
        MqttDecoder(protocol_version=6)


# --------------------------------------------------------------------------
# Malformations -> reason codes
# --------------------------------------------------------------------------


def _props(body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((len(body),)) + body


def _pkt(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first, len(body))) + body


MALFORMATIONS: list[tuple[str, int, bytes, int]] = [
    ("reserved type 0", 4, b"\x00\x00", MALFORMED),
    ("PUBREL flags 0000", 4, b"\x60\x02\x00\x01", MALFORMED),
    ("SUBSCRIBE flags 0000", 4, _pkt(0x80, b"\x00\x01\x00\x01a\x00"), MALFORMED),
    ("UNSUBSCRIBE flags 0000", 4, _pkt(0xA0, b"\x00\x01\x00\x01a"), MALFORMED),
    ("PUBACK flags 0001", 4, b"\x41\x02\x00\x01", MALFORMED),
    ("CONNACK flags", 4, b"\x21\x02\x00\x00", MALFORMED),
    ("PINGREQ flags", 4, b"\xc8\x00", MALFORMED),
    ("DISCONNECT flags", 5, b"\xe2\x00", MALFORMED),
    ("PUBLISH QoS 3", 4, _pkt(0x36, b"\x00\x01a\x00\x01"), MALFORMED),
    ("PUBLISH DUP at QoS 0", 4, _pkt(0x38, b"\x00\x01a"), MALFORMED),
    ("remaining length 5 bytes", 4, b"\x30\xff\xff\xff\xff\x01", MALFORMED),
    ("remaining length not minimal", 4, b"\xc0\x80\x00", MALFORMED),
    ("truncated topic length", 4, b"\x30\x01\x00", MALFORMED),
    ("topic longer than packet", 4, b"\x30\x04\x00\x05ab", MALFORMED),
    ("ill-formed UTF-8", 4, _pkt(0x30, b"\x00\x02\xc3\x28"), MALFORMED),
    ("UTF-8 surrogate", 4, _pkt(0x30, b"\x00\x03\xed\xa0\x80"), MALFORMED),
    ("overlong UTF-8 NUL", 4, _pkt(0x30, b"\x00\x02\xc0\x80"), MALFORMED),
    ("U+0000 in topic", 4, _pkt(0x30, b"\x00\x03a\x00b"), MALFORMED),
    ("wildcard in topic", 4, _pkt(0x30, b"\x00\x03a/#"), 0x90),
    ("plus in topic", 5, _pkt(0x30, b"\x00\x01+\x00"), 0x90),
    ("empty topic 3.1.1", 4, _pkt(0x30, b"\x00\x00"), PROTOCOL),
    ("empty topic no alias", 5, _pkt(0x30, b"\x00\x00\x00"), PROTOCOL),
    ("PUBLISH packet id 0", 4, _pkt(0x32, b"\x00\x01a\x00\x00"), PROTOCOL),
    ("PUBACK packet id 0", 4, b"\x40\x02\x00\x00", PROTOCOL),
    ("SUBSCRIBE packet id 0", 4, _pkt(0x82, b"\x00\x00\x00\x01a\x00"), PROTOCOL),
    ("PUBACK 3.1.1 trailing byte", 4, b"\x40\x03\x00\x01\x00", MALFORMED),
    ("PUBACK truncated", 4, b"\x40\x01\x00", MALFORMED),
    ("PINGREQ with body", 4, b"\xc0\x01\x00", MALFORMED),
    ("DISCONNECT 3.1.1 with body", 4, b"\xe0\x01\x00", MALFORMED),
    ("AUTH before MQTT 5", 4, b"\xf0\x00", MALFORMED),
    ("SUBSCRIBE without filters", 4, b"\x82\x02\x00\x01", PROTOCOL),
    ("SUBSCRIBE v5 without filters", 5, b"\x82\x03\x00\x01\x00", PROTOCOL),
    ("SUBSCRIBE missing options", 4, _pkt(0x82, b"\x00\x01\x00\x01a"), MALFORMED),
    ("SUBSCRIBE 3.1.1 QoS 3", 4, _pkt(0x82, b"\x00\x01\x00\x01a\x03"), MALFORMED),
    ("SUBSCRIBE 3.1.1 reserved bits", 4, _pkt(0x82, b"\x00\x01\x00\x01a\x04"), MALFORMED),
    ("SUBSCRIBE v5 reserved bits", 5, _pkt(0x82, b"\x00\x01\x00\x00\x01a\x40"), MALFORMED),
    ("SUBSCRIBE v5 QoS 3", 5, _pkt(0x82, b"\x00\x01\x00\x00\x01a\x03"), PROTOCOL),
    ("SUBSCRIBE retain handling 3", 5, _pkt(0x82, b"\x00\x01\x00\x00\x01a\x30"), PROTOCOL),
    (
        "no local on shared subscription",
        5,
        _pkt(0x82, b"\x00\x01\x00\x00\x0a$share/g/a\x04"),
        PROTOCOL,
    ),
    ("UNSUBSCRIBE without filters", 4, b"\xa2\x02\x00\x01", PROTOCOL),
    ("UNSUBACK 3.1.1 with codes", 4, b"\xb0\x03\x00\x01\x00", MALFORMED),
    ("UNSUBACK v5 without codes", 5, b"\xb0\x03\x00\x01\x00", PROTOCOL),
    ("SUBACK without codes", 4, b"\x90\x02\x00\x01", PROTOCOL),
    ("SUBACK 3.1.1 invalid code", 4, b"\x90\x03\x00\x01\x03", PROTOCOL),
    ("SUBACK v5 invalid code", 5, b"\x90\x04\x00\x01\x00\x03", PROTOCOL),
    ("CONNACK 3.1.1 code 6", 4, b"\x20\x02\x00\x06", PROTOCOL),
    ("CONNACK v5 code 0x01", 5, b"\x20\x03\x00\x01\x00", PROTOCOL),
    ("CONNACK ack flags reserved", 4, b"\x20\x02\x02\x00", MALFORMED),
    ("CONNACK session present + refusal", 4, b"\x20\x02\x01\x05", PROTOCOL),
    ("CONNACK 3.1.1 trailing", 4, b"\x20\x03\x00\x00\x00", MALFORMED),
    ("PUBACK v5 invalid code", 5, b"\x40\x03\x00\x01\x92", PROTOCOL),
    ("PUBREL v5 invalid code", 5, b"\x62\x03\x00\x01\x10", PROTOCOL),
    ("DISCONNECT invalid code", 5, b"\xe0\x01\x05", PROTOCOL),
    ("AUTH invalid code", 5, b"\xf0\x01\x87", PROTOCOL),
    # MQTT 5 properties
    (
        "duplicate property",
        5,
        _pkt(0x30, b"\x00\x01a" + _props(b"\x23\x00\x01\x23\x00\x02")),
        PROTOCOL,
    ),
    (
        "property not allowed in PUBLISH",
        5,
        _pkt(0x30, b"\x00\x01a" + _props(b"\x11\x00\x00\x00\x01")),
        PROTOCOL,
    ),
    (
        "property not allowed in CONNACK",
        5,
        _pkt(0x20, b"\x00\x00" + _props(b"\x23\x00\x01")),
        PROTOCOL,
    ),
    (
        "property not allowed in UNSUBSCRIBE",
        5,
        _pkt(0xA2, b"\x00\x01" + _props(b"\x1f\x00\x00") + b"\x00\x01a"),
        PROTOCOL,
    ),
    ("unknown property id", 5, _pkt(0x30, b"\x00\x01a" + _props(b"\x7f\x00")), MALFORMED),
    ("property id 0", 5, _pkt(0x30, b"\x00\x01a" + _props(b"\x00")), MALFORMED),
    ("property length past end", 5, _pkt(0x30, b"\x00\x01a\x10\x23\x00\x01"), MALFORMED),
    ("property value truncated", 5, _pkt(0x30, b"\x00\x01a" + _props(b"\x02\x00\x00")), MALFORMED),
    (
        "user property value missing",
        5,
        _pkt(0x30, b"\x00\x01a" + _props(b"\x26\x00\x01k")),
        MALFORMED,
    ),
    ("payload format 2", 5, _pkt(0x30, b"\x00\x01a" + _props(b"\x01\x02")), PROTOCOL),
    ("topic alias 0", 5, _pkt(0x30, b"\x00\x01a" + _props(b"\x23\x00\x00")), PROTOCOL),
    (
        "subscription id 0",
        5,
        _pkt(0x82, b"\x00\x01" + _props(b"\x0b\x00") + b"\x00\x01a\x00"),
        PROTOCOL,
    ),
    (
        "subscription id twice in SUBSCRIBE",
        5,
        _pkt(0x82, b"\x00\x01" + _props(b"\x0b\x01\x0b\x02") + b"\x00\x01a\x00"),
        PROTOCOL,
    ),
    (
        "subscription id 5-byte varint",
        5,
        _pkt(0x30, b"\x00\x01a" + _props(b"\x0b\xff\xff\xff\xff\x01")),
        MALFORMED,
    ),
    (
        "subscription id non-minimal varint",
        5,
        _pkt(0x30, b"\x00\x01a" + _props(b"\x0b\x81\x00")),
        MALFORMED,
    ),
    ("maximum QoS 2", 5, _pkt(0x20, b"\x00\x00" + _props(b"\x24\x02")), PROTOCOL),
    ("receive maximum 0", 5, _pkt(0x20, b"\x00\x00" + _props(b"\x21\x00\x00")), PROTOCOL),
    (
        "maximum packet size 0",
        5,
        _pkt(0x20, b"\x00\x00" + _props(b"\x27\x00\x00\x00\x00")),
        PROTOCOL,
    ),
    (
        "reason string U+0000",
        5,
        _pkt(0x40, b"\x00\x01\x00" + _props(b"\x1f\x00\x01\x00")),
        MALFORMED,
    ),
]


@pytest.mark.parametrize(
    ("version", "wire", "code"),
    [pytest.param(v, w, c, id=name) for name, v, w, c in MALFORMATIONS],
)
def test_malformations(version: int, wire: bytes, code: int) -> None:
    err = decode_error(wire, version)
    assert err.reason_code == code, err.message
    assert err.protocol_version == version


def _connect_wire(variable: bytes, payload: bytes) -> bytes:
    return _pkt(0x10, variable + payload)


CONNECT_ERRORS: list[tuple[str, bytes, int, int | None]] = [
    ("protocol name", _connect_wire(b"\x00\x04MQTX\x04\x02\x00\x00", b"\x00\x01c"), 0x84, None),
    ("protocol level 6", _connect_wire(MQTT + b"\x06\x02\x00\x00", b"\x00\x01c"), 0x84, None),
    (
        "protocol level 3 as MQTT",
        _connect_wire(MQTT + b"\x03\x02\x00\x00", b"\x00\x01c"),
        0x84,
        None,
    ),
    (
        "MQIsdp level 4",
        _connect_wire(b"\x00\x06MQIsdp\x04\x02\x00\x00", b"\x00\x01c"),
        0x84,
        None,
    ),
    ("reserved flag", _connect_wire(MQTT + b"\x04\x03\x00\x00", b"\x00\x01c"), MALFORMED, 4),
    (
        "will QoS 3",
        _connect_wire(MQTT + b"\x04\x1e\x00\x00", b"\x00\x01c\x00\x01t\x00\x00"),
        MALFORMED,
        4,
    ),
    (
        "will QoS without will",
        _connect_wire(MQTT + b"\x04\x0a\x00\x00", b"\x00\x01c"),
        MALFORMED,
        4,
    ),
    (
        "will retain without will",
        _connect_wire(MQTT + b"\x05\x22\x00\x00\x00", b"\x00\x01c"),
        MALFORMED,
        5,
    ),
    (
        "password without user",
        _connect_wire(MQTT + b"\x04\x42\x00\x00", b"\x00\x01c\x00\x00"),
        MALFORMED,
        4,
    ),
    ("empty id without clean", _connect_wire(MQTT + b"\x04\x00\x00\x00", b"\x00\x00"), 0x85, 4),
    (
        "MQIsdp long id",
        _connect_wire(b"\x00\x06MQIsdp\x03\x02\x00\x00", b"\x00\x18" + b"i" * 24),
        0x85,
        3,
    ),
    ("MQIsdp empty id", _connect_wire(b"\x00\x06MQIsdp\x03\x02\x00\x00", b"\x00\x00"), 0x85, 3),
    (
        "auth data without method",
        _connect_wire(MQTT + b"\x05\x02\x00\x00" + _props(b"\x16\x00\x01x"), b"\x00\x01c"),
        PROTOCOL,
        5,
    ),
    (
        "will property not allowed",
        _connect_wire(
            MQTT + b"\x05\x06\x00\x00\x00",
            b"\x00\x01c" + _props(b"\x23\x00\x01") + b"\x00\x01t\x00\x00",
        ),
        PROTOCOL,
        5,
    ),
    (
        "CONNECT property not allowed",
        _connect_wire(MQTT + b"\x05\x02\x00\x00" + _props(b"\x18\x00\x00\x00\x01"), b"\x00\x01c"),
        PROTOCOL,
        5,
    ),
    (
        "missing will payload",
        _connect_wire(MQTT + b"\x04\x06\x00\x00", b"\x00\x01c\x00\x01t"),
        MALFORMED,
        4,
    ),
    ("missing user name", _connect_wire(MQTT + b"\x04\x82\x00\x00", b"\x00\x01c"), MALFORMED, 4),
    ("trailing bytes", _connect_wire(MQTT + b"\x04\x02\x00\x00", b"\x00\x01cX"), MALFORMED, 4),
    ("truncated header", _pkt(0x10, MQTT + b"\x04\x02"), MALFORMED, 4),
    ("truncated name", _pkt(0x10, b"\x00\x04MQ"), MALFORMED, None),
]


@pytest.mark.parametrize(
    ("wire", "code", "version"),
    [pytest.param(w, c, v, id=name) for name, w, c, v in CONNECT_ERRORS],
)
def test_connect_errors(wire: bytes, code: int, version: int | None) -> None:
    err = decode_error(wire, None)
    assert err.reason_code == code, err.message
    assert err.protocol_version == version


def test_connect_error_connack_bytes() -> None:
    bad_version = decode_error(_connect_wire(MQTT + b"\x06\x02\x00\x00", b"\x00\x01c"), None)
    assert connack_for_error(bad_version) == b"\x20\x02\x00\x01"
    bad_id = decode_error(_connect_wire(MQTT + b"\x04\x00\x00\x00", b"\x00\x00"), None)
    assert bad_id.v311_return_code == 0x02
    assert connack_for_error(bad_id) == b"\x20\x02\x00\x02"
    malformed_v4 = decode_error(_connect_wire(MQTT + b"\x04\x03\x00\x00", b"\x00\x01c"), None)
    assert connack_for_error(malformed_v4) is None
    malformed_v5 = decode_error(_connect_wire(MQTT + b"\x05\x03\x00\x00\x00", b"\x00\x01c"), None)
    assert connack_for_error(malformed_v5) == b"\x20\x03\x00\x81\x00"


def test_v5_allows_empty_id_and_password_without_user() -> None:
    wire = _connect_wire(MQTT + b"\x05\x40\x00\x00\x00", b"\x00\x00\x00\x02pw")
    assert decode_all(wire, None) == [Connect("", 5, False, 0, None, b"pw")]


def test_server_state_checks() -> None:
    err = decode_error(b"\xc0\x00", None)  # PINGREQ before CONNECT
    assert (err.reason_code, err.protocol_version) == (PROTOCOL, None)
    connect = encode(Connect("c"), 4)
    assert decode_error(connect + connect, None).reason_code == PROTOCOL
    for server_only in (b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x00", b"\xd0\x00"):
        err = decode_error(connect + server_only, None)
        assert (err.reason_code, err.protocol_version) == (PROTOCOL, 4)
    sub_id = encode(Publish("a", properties=Properties(subscription_identifiers=(1,))), 5)
    connect5 = encode(Connect("c", 5), 5)
    assert decode_error(connect5 + sub_id, None).reason_code == PROTOCOL
    assert decode_all(sub_id, 5)[0] == Publish(
        "a", properties=Properties(subscription_identifiers=(1,))
    )
    # A server that handled CONNECT elsewhere keeps the checks with an explicit version.
    with pytest.raises(MqttProtocolError):
        MqttDecoder(protocol_version=4, server=True).feed(connect)


def test_error_is_sticky_and_keeps_earlier_packets() -> None:
    decoder = MqttDecoder(protocol_version=4)
    with pytest.raises(MqttProtocolError) as info:
        decoder.feed(b"\xc0\x00\xc0\x00\x00\x00")
    assert info.value.packets == (Pingreq(), Pingreq())
    with pytest.raises(MqttProtocolError) as again:
        decoder.feed(b"\xc0\x00")
    assert again.value.reason_code == MALFORMED
    assert decoder.buffered == 0


def test_error_does_not_lock_buffer_for_partial_packet() -> None:
    decoder = MqttDecoder(protocol_version=4)
    assert decoder.feed(b"\x30\x05\x00\x03") == []
    with pytest.raises(MqttProtocolError):
        decoder.feed(b"a\x00b")


# --------------------------------------------------------------------------
# Fuzzing: nothing but MqttProtocolError may escape
# --------------------------------------------------------------------------


def _feed_expecting_only_protocol_errors(decoder: MqttDecoder, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            for packet in decoder.feed(chunk):
                assert isinstance(packet, Packet)
    except MqttProtocolError as exc:
        assert 0x80 <= exc.reason_code <= 0xA2


@settings(max_examples=300)
@given(st.sampled_from([None, 3, 4, 5]), st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_only_raise_protocol_errors(version: int | None, chunks: list[bytes]) -> None:
    decoder = MqttDecoder(protocol_version=version, server=version is None)
    _feed_expecting_only_protocol_errors(decoder, chunks)


VALID_CONNECTS = [
    encode(Connect("dev"), 4),
    encode(Connect("dev", 5, properties=Properties(receive_maximum=5)), 5),
    encode(Connect("dev", 3), 3),
]


@settings(max_examples=300)
@given(st.sampled_from(VALID_CONNECTS), st.binary(max_size=96), st.integers(1, 16))
def test_random_bytes_after_connect(connect: bytes, tail: bytes, step: int) -> None:
    stream = connect + tail
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    _feed_expecting_only_protocol_errors(MqttDecoder(), chunks)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VERSIONS), st.data())
def test_mutated_packets_only_raise_protocol_errors(version: int, data: st.DataObject) -> None:
    wire = bytearray(encode(data.draw(packets(version)), version))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        index = data.draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == "flip" and wire:
            wire[index] = data.draw(st.integers(0, 255))
        elif op == "insert":
            wire.insert(index, data.draw(st.integers(0, 255)))
        elif op == "delete" and wire:
            del wire[index]
        else:
            del wire[index:]
    decoder = MqttDecoder(protocol_version=version, server=False)
    _feed_expecting_only_protocol_errors(decoder, [bytes(wire), b"\x00" * 8])


# --------------------------------------------------------------------------
# Encoder validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "version"),
    [
        (Publish("a", qos=3, packet_id=1), 4),
        (Publish("a", qos=1), 4),
        (Publish("a", qos=1, packet_id=0), 4),
        (Publish("a", qos=0, packet_id=1), 4),
        (Publish("a", dup=True), 4),
        (Publish("a/#"), 4),
        (Publish(""), 4),
        (Publish(""), 5),
        (Publish("a\x00"), 4),
        (Publish("\ud800"), 4),
        (Publish("x" * 65536), 4),
        (Publish("a", properties=Properties(topic_alias=1)), 4),
        (Publish("a", properties=Properties(topic_alias=0)), 5),
        (Publish("a", properties=Properties(session_expiry_interval=1)), 5),
        (Publish("a", properties=Properties(message_expiry_interval=2**32)), 5),
        (Publish("a", properties=Properties(payload_format_indicator=2)), 5),
        (Connect("c", 5), 4),
        (Connect("c", 4, password=b"p"), 4),
        (Connect("", 4, clean_start=False), 4),
        (Connect("x" * 24, 3), 3),
        (Connect("c", 4, keepalive=70000), 4),
        (Connect("c", 5, properties=Properties(authentication_data=b"d")), 5),
        (Connect("c", 5, will=Will("t", properties=Properties(topic_alias=1))), 5),
        (Connect("c", 5, will=Will("t", qos=3)), 5),
        (Connect("c", 4, will=Will("t", b"x" * 65536)), 4),
        (Connack(True, 5), 4),
        (Connack(False, 6), 4),
        (Connack(False, 0x01), 5),
        (Puback(1, 0x10), 4),
        (Puback(1, 0x92), 5),
        (Pubrel(1, 0x10), 5),
        (Puback(0), 4),
        (Subscribe(1, ()), 4),
        (Subscribe(1, (("a", SubscriptionOptions(1, no_local=True)),)), 4),
        (Subscribe(1, (("a", SubscriptionOptions(3)),)), 5),
        (Subscribe(1, (("a", SubscriptionOptions(0, retain_handling=3)),)), 5),
        (Subscribe(1, (("$share/g/a", SubscriptionOptions(0, no_local=True)),)), 5),
        (
            Subscribe(
                1, (("a", SubscriptionOptions()),), Properties(subscription_identifiers=(1, 2))
            ),
            5,
        ),
        (Suback(1, ()), 4),
        (Suback(1, (0x8F,)), 4),
        (Unsubscribe(1, ()), 4),
        (Unsuback(1, (0,)), 4),
        (Unsuback(1, ()), 5),
        (Disconnect(0x04), 4),
        (Disconnect(0x05), 5),
        (Auth(), 4),
        (Auth(0x87), 5),
    ],
)
def test_encode_rejects_invalid_packets(packet: Packet, version: int) -> None:
    with pytest.raises(MqttEncodeError):
        encode(packet, version)


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(MqttEncodeError):
        encode(Pingreq(), 6)
    with pytest.raises(MqttEncodeError):
        encode("not a packet", 4)  # type: ignore[arg-type]
    assert issubclass(MqttEncodeError, ValueError)


# --------------------------------------------------------------------------
# Refusal helpers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "v311"),
    [
        (0x00, 0x00),
        (0x84, 0x01),
        (0x85, 0x02),
        (0x88, 0x03),
        (0x89, 0x03),
        (0x86, 0x04),
        (0x87, 0x05),
        (0x8A, 0x05),
        (0x81, None),
        (0x82, None),
        (0x95, None),
    ],
)
def test_v311_return_codes(reason: int, v311: int | None) -> None:
    assert v311_return_code(reason) == v311
    assert MqttProtocolError("x", reason).v311_return_code == v311


def test_reject_connack() -> None:
    assert reject_connack(0x87, 5) == Connack(False, 0x87)
    assert reject_connack(0x87, 4) == Connack(False, 0x05)
    assert reject_connack(0x86, 3) == Connack(False, 0x04)
    assert reject_connack(0x81, 4) is None
    assert reject_connack(0x8F, 5) == Connack(False, 0x80)  # not a CONNACK code
    assert reject_connack(0x86, 5, reason_string="nope") == Connack(
        False, 0x86, Properties(reason_string="nope")
    )
    with pytest.raises(ValueError):
        reject_connack(0x00, 5)
    assert encode_reject_connack(0x86, 4) == b"\x20\x02\x00\x04"
    assert encode_reject_connack(0x86, 5) == b"\x20\x03\x00\x86\x00"
    assert encode_reject_connack(0x84, None) == b"\x20\x02\x00\x01"
    assert encode_reject_connack(0x95, 4) is None
    assert encode_reject_connack(0x95, 5) == b"\x20\x03\x00\x95\x00"


def test_disconnect_for_error() -> None:
    assert disconnect_for_error(MqttProtocolError("x", 0x81, 5)) == b"\xe0\x01\x81"
    assert disconnect_for_error(MqttProtocolError("x", 0x90, 5)) == b"\xe0\x01\x90"
    assert disconnect_for_error(MqttProtocolError("x", 0x85, 5)) == b"\xe0\x01\x82"
    assert disconnect_for_error(MqttProtocolError("x", 0x81, 4)) is None
    assert disconnect_for_error(MqttProtocolError("x", 0x81, None)) is None
