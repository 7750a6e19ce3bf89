"""Sans-IO MQTT 3.1.1 / 5.0 codec.

Pure state, no I/O: bytes go into :meth:`MqttDecoder.feed` and immutable packet
dataclasses come out; :func:`encode` turns a packet back into exact wire bytes.
Section numbers (``§x.y``) refer to the MQTT 5.0 OASIS standard unless marked
"3.1.1"; ``[MQTT-a.b.c-n]`` are the normative statement ids.

Protocol versions are the CONNECT protocol levels: ``3`` (MQTT 3.1, "MQIsdp",
wire-identical to 3.1.1 apart from CONNECT), ``4`` (3.1.1) and ``5`` (5.0).

Every problem in received bytes raises :class:`MqttProtocolError` (never
``IndexError``/``UnicodeDecodeError``/...); problems in packets handed to
:func:`encode` raise :class:`MqttEncodeError`. Everything :func:`encode` accepts,
the decoder accepts too, and ``decode(encode(p)) == p``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

__all__ = [
    "EMPTY_PROPERTIES",
    "MAX_PACKET_SIZE",
    "Auth",
    "Connack",
    "Connect",
    "ConnectReturnCode",
    "Disconnect",
    "MqttDecoder",
    "MqttEncodeError",
    "MqttProtocolError",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "RawPublish",
    "ReasonCode",
    "Suback",
    "Subscribe",
    "SubscriptionOptions",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "connack_for_error",
    "disconnect_for_error",
    "encode",
    "encode_reject_connack",
    "encode_varint",
    "reject_connack",
    "v311_return_code",
]

MAX_REMAINING_LENGTH: Final = 268_435_455
"""Largest value a 4-byte Variable Byte Integer can hold (§1.5.5)."""
MAX_PACKET_SIZE: Final = MAX_REMAINING_LENGTH
"""Default decoder limit on the total packet size (fixed header included)."""
_ABSOLUTE_MAX_PACKET: Final = MAX_REMAINING_LENGTH + 5


class PacketType(enum.IntEnum):
    """Control packet types (§2.1.2)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(enum.IntEnum):
    """MQTT 5.0 reason codes (§2.4)."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnectReturnCode(enum.IntEnum):
    """MQTT 3.1.1 CONNACK return codes (3.1.1 §3.2.2.3)."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USER_NAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


_RC = ReasonCode

# Reason codes each packet may carry (§3.2.2.2, §3.4.2.1, §3.5.2.1, §3.6.2.1,
# §3.7.2.1, §3.9.3, §3.11.3, §3.14.2.1, §3.15.2.1).
_CONNACK_CODES_V5: Final = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90}
    | {0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
_CONNACK_CODES_V3: Final = frozenset(range(6))
_PUBACK_CODES: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES: Final = frozenset({0x00, 0x92})
_SUBACK_CODES_V5: Final = frozenset(
    {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}
)
_SUBACK_CODES_V3: Final = frozenset({0x00, 0x01, 0x02, 0x80})
_UNSUBACK_CODES: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_CODES: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90}
    | set(range(0x93, 0xA3))
)
_AUTH_CODES: Final = frozenset({0x00, 0x18, 0x19})

# v5 reason code -> 3.1.1 CONNACK return code, for refusing a 3.1/3.1.1 client.
_V311_RETURN_CODES: Final[dict[int, int]] = {
    _RC.UNSUPPORTED_PROTOCOL_VERSION: ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    _RC.CLIENT_IDENTIFIER_NOT_VALID: ConnectReturnCode.IDENTIFIER_REJECTED,
    _RC.SERVER_UNAVAILABLE: ConnectReturnCode.SERVER_UNAVAILABLE,
    _RC.SERVER_BUSY: ConnectReturnCode.SERVER_UNAVAILABLE,
    _RC.QUOTA_EXCEEDED: ConnectReturnCode.SERVER_UNAVAILABLE,
    _RC.CONNECTION_RATE_EXCEEDED: ConnectReturnCode.SERVER_UNAVAILABLE,
    _RC.BAD_USER_NAME_OR_PASSWORD: ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD,
    _RC.NOT_AUTHORIZED: ConnectReturnCode.NOT_AUTHORIZED,
    _RC.BANNED: ConnectReturnCode.NOT_AUTHORIZED,
    _RC.BAD_AUTHENTICATION_METHOD: ConnectReturnCode.NOT_AUTHORIZED,
}


def v311_return_code(reason_code: int) -> int | None:
    """Map a v5 CONNACK reason code to the 3.1.1 return code with the same meaning.

    ``0x00`` maps to ``0x00``; codes without a 3.1.1 equivalent (e.g. 0x81
    malformed packet) return ``None``: a 3.1.1 server just closes the
    connection in that case (3.1.1 §4.8).
    """
    if reason_code == 0:
        return 0
    return _V311_RETURN_CODES.get(reason_code)


class MqttProtocolError(Exception):
    """Received bytes violate the protocol; the connection must be closed.

    ``reason_code`` is the MQTT 5 reason code to report (CONNACK before the
    session is up, DISCONNECT afterwards); ``protocol_version`` is the
    version in force when it happened (``None`` if no CONNECT was understood);
    ``packets`` holds packets decoded earlier in the same ``feed`` call.
    """

    def __init__(
        self,
        message: str,
        reason_code: int = ReasonCode.MALFORMED_PACKET,
        protocol_version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason_code = int(reason_code)
        self.protocol_version = protocol_version
        self.packets: tuple[Packet, ...] = ()

    @property
    def v311_return_code(self) -> int | None:
        """The 3.1.1 CONNACK return code to send, or ``None`` to just close."""
        return v311_return_code(self.reason_code)

    def __repr__(self) -> str:
        return f"MqttProtocolError({self.message!r}, 0x{self.reason_code:02X})"


class MqttEncodeError(ValueError):
    """A packet handed to :func:`encode` cannot be put on the wire as-is."""


def _malformed(message: str) -> MqttProtocolError:
    return MqttProtocolError(message, ReasonCode.MALFORMED_PACKET)


def _protocol(message: str) -> MqttProtocolError:
    return MqttProtocolError(message, ReasonCode.PROTOCOL_ERROR)


# --------------------------------------------------------------------------
# Packets
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class Properties:
    """MQTT 5.0 properties (§2.2.2.2); ``None``/empty means absent.

    One class serves every packet; which fields may be set depends on the
    packet (checked by the decoder and by :func:`encode`). The two repeatable
    properties are tuples: ``user_properties`` (order preserved, §3.1.2.11.8)
    and ``subscription_identifiers`` (several only in PUBLISH, §3.3.2.3.8).
    """

    payload_format_indicator: int | None = None  # 0x01 byte
    message_expiry_interval: int | None = None  # 0x02 four-byte
    content_type: str | None = None  # 0x03 UTF-8
    response_topic: str | None = None  # 0x08 UTF-8
    correlation_data: bytes | None = None  # 0x09 binary
    subscription_identifiers: tuple[int, ...] = ()  # 0x0B varint
    session_expiry_interval: int | None = None  # 0x11 four-byte
    assigned_client_identifier: str | None = None  # 0x12 UTF-8
    server_keep_alive: int | None = None  # 0x13 two-byte
    authentication_method: str | None = None  # 0x15 UTF-8
    authentication_data: bytes | None = None  # 0x16 binary
    request_problem_information: int | None = None  # 0x17 byte
    will_delay_interval: int | None = None  # 0x18 four-byte
    request_response_information: int | None = None  # 0x19 byte
    response_information: str | None = None  # 0x1A UTF-8
    server_reference: str | None = None  # 0x1C UTF-8
    reason_string: str | None = None  # 0x1F UTF-8
    receive_maximum: int | None = None  # 0x21 two-byte
    topic_alias_maximum: int | None = None  # 0x22 two-byte
    topic_alias: int | None = None  # 0x23 two-byte
    maximum_qos: int | None = None  # 0x24 byte
    retain_available: int | None = None  # 0x25 byte
    user_properties: tuple[tuple[str, str], ...] = ()  # 0x26 UTF-8 pair
    maximum_packet_size: int | None = None  # 0x27 four-byte
    wildcard_subscription_available: int | None = None  # 0x28 byte
    subscription_identifier_available: int | None = None  # 0x29 byte
    shared_subscription_available: int | None = None  # 0x2A byte

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{spec.name}={value!r}"
            for spec in _PROPERTY_SPECS
            if (value := getattr(self, spec.name)) is not None and value != ()
        )
        return f"Properties({fields})"


EMPTY_PROPERTIES: Final = Properties()


@dataclass(frozen=True, slots=True)
class Will:
    """Will message carried in CONNECT (§3.1.3.2-§3.1.3.4)."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT (§3.1). ``protocol_level`` is 3, 4 or 5."""

    client_id: str
    protocol_level: int = 4
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connack:
    """CONNACK (§3.2). ``reason_code`` is the 3.1.1 return code for 3.1/3.1.1."""

    session_present: bool = False
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH (§3.3). ``packet_id`` is ``None`` exactly when ``qos`` is 0."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Puback:
    """PUBACK (§3.4)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pubrec:
    """PUBREC (§3.5)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pubrel:
    """PUBREL (§3.6)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pubcomp:
    """PUBCOMP (§3.7)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """Subscription options byte (§3.8.3.1); 3.1.1 only carries ``qos``."""

    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE (§3.8): ``(topic filter, options)`` pairs, at least one.

    Filters are *not* syntax-checked here: an invalid filter is answered per
    filter in SUBACK (0x8F / 0x80), see :mod:`protocols.mqtt.topics`.
    """

    packet_id: int
    subscriptions: tuple[tuple[str, SubscriptionOptions], ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Suback:
    """SUBACK (§3.9): one reason/return code per filter."""

    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """UNSUBSCRIBE (§3.10): at least one topic filter."""

    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsuback:
    """UNSUBACK (§3.11); ``reason_codes`` is empty for 3.1.1."""

    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Pingreq:
    """PINGREQ (§3.12)."""


@dataclass(frozen=True, slots=True)
class Pingresp:
    """PINGRESP (§3.13)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT (§3.14); reason code and properties are v5 only."""

    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (§3.15), MQTT 5.0 only."""

    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)

_PINGREQ: Final = Pingreq()
_PINGRESP: Final = Pingresp()

# --------------------------------------------------------------------------
# Property table (§2.2.2.2)
# --------------------------------------------------------------------------

_T_BYTE, _T_U16, _T_U32, _T_VARINT, _T_UTF8, _T_BINARY, _T_PAIR = range(7)
_WILL: Final = 0  # pseudo packet kind for Will Properties (§3.1.3.2)

_PT = PacketType
_ALL_WITH_PROPS: Final = frozenset(
    {_WILL, _PT.CONNECT, _PT.CONNACK, _PT.PUBLISH, _PT.PUBACK, _PT.PUBREC, _PT.PUBREL}
    | {_PT.PUBCOMP, _PT.SUBSCRIBE, _PT.SUBACK, _PT.UNSUBSCRIBE, _PT.UNSUBACK}
    | {_PT.DISCONNECT, _PT.AUTH}
)
_MESSAGE: Final = frozenset({_PT.PUBLISH, _WILL})


@dataclass(frozen=True, slots=True)
class _PropSpec:
    ident: int
    name: str
    kind: int
    allowed: frozenset[int]


_PROPERTY_SPECS: Final = (
    _PropSpec(0x01, "payload_format_indicator", _T_BYTE, _MESSAGE),
    _PropSpec(0x02, "message_expiry_interval", _T_U32, _MESSAGE),
    _PropSpec(0x03, "content_type", _T_UTF8, _MESSAGE),
    _PropSpec(0x08, "response_topic", _T_UTF8, _MESSAGE),
    _PropSpec(0x09, "correlation_data", _T_BINARY, _MESSAGE),
    _PropSpec(0x0B, "subscription_identifiers", _T_VARINT, frozenset({_PT.PUBLISH, _PT.SUBSCRIBE})),
    _PropSpec(
        0x11,
        "session_expiry_interval",
        _T_U32,
        frozenset({_PT.CONNECT, _PT.CONNACK, _PT.DISCONNECT}),
    ),
    _PropSpec(0x12, "assigned_client_identifier", _T_UTF8, frozenset({_PT.CONNACK})),
    _PropSpec(0x13, "server_keep_alive", _T_U16, frozenset({_PT.CONNACK})),
    _PropSpec(
        0x15, "authentication_method", _T_UTF8, frozenset({_PT.CONNECT, _PT.CONNACK, _PT.AUTH})
    ),
    _PropSpec(
        0x16, "authentication_data", _T_BINARY, frozenset({_PT.CONNECT, _PT.CONNACK, _PT.AUTH})
    ),
    _PropSpec(0x17, "request_problem_information", _T_BYTE, frozenset({_PT.CONNECT})),
    _PropSpec(0x18, "will_delay_interval", _T_U32, frozenset({_WILL})),
    _PropSpec(0x19, "request_response_information", _T_BYTE, frozenset({_PT.CONNECT})),
    _PropSpec(0x1A, "response_information", _T_UTF8, frozenset({_PT.CONNACK})),
    _PropSpec(0x1C, "server_reference", _T_UTF8, frozenset({_PT.CONNACK, _PT.DISCONNECT})),
    _PropSpec(
        0x1F,
        "reason_string",
        _T_UTF8,
        frozenset({_PT.CONNACK, _PT.PUBACK, _PT.PUBREC, _PT.PUBREL, _PT.PUBCOMP})
        | frozenset({_PT.SUBACK, _PT.UNSUBACK, _PT.DISCONNECT, _PT.AUTH}),
    ),
    _PropSpec(0x21, "receive_maximum", _T_U16, frozenset({_PT.CONNECT, _PT.CONNACK})),
    _PropSpec(0x22, "topic_alias_maximum", _T_U16, frozenset({_PT.CONNECT, _PT.CONNACK})),
    _PropSpec(0x23, "topic_alias", _T_U16, frozenset({_PT.PUBLISH})),
    _PropSpec(0x24, "maximum_qos", _T_BYTE, frozenset({_PT.CONNACK})),
    _PropSpec(0x25, "retain_available", _T_BYTE, frozenset({_PT.CONNACK})),
    _PropSpec(0x26, "user_properties", _T_PAIR, _ALL_WITH_PROPS),
    _PropSpec(0x27, "maximum_packet_size", _T_U32, frozenset({_PT.CONNECT, _PT.CONNACK})),
    _PropSpec(0x28, "wildcard_subscription_available", _T_BYTE, frozenset({_PT.CONNACK})),
    _PropSpec(0x29, "subscription_identifier_available", _T_BYTE, frozenset({_PT.CONNACK})),
    _PropSpec(0x2A, "shared_subscription_available", _T_BYTE, frozenset({_PT.CONNACK})),
)
_SPEC_BY_ID: Final = {spec.ident: spec for spec in _PROPERTY_SPECS}

# Properties whose value must be 0 or 1, and those for which 0 is forbidden.
_BOOLEAN_PROPS: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_NONZERO_PROPS: Final = frozenset({0x0B, 0x21, 0x23, 0x27})
_INT_LIMITS: Final = {
    _T_BYTE: 0xFF,
    _T_U16: 0xFFFF,
    _T_U32: 0xFFFF_FFFF,
    _T_VARINT: MAX_REMAINING_LENGTH,
}


def _property_value_problem(ident: int, value: int) -> str | None:
    # §3.3.2.3.2, §3.1.2.11.6/7, §3.2.2.3.4/5/11/12/13: boolean-like bytes;
    # §3.3.2.3.8, §3.1.2.11.3, §3.3.2.3.4, §3.1.2.11.4: zero is a protocol error.
    if ident in _BOOLEAN_PROPS and value > 1:
        return f"property 0x{ident:02X} must be 0 or 1, got {value}"
    if ident in _NONZERO_PROPS and value == 0:
        return f"property 0x{ident:02X} must not be 0"
    return None


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

_ByteSource: TypeAlias = bytes | bytearray | memoryview


class _Reader:
    """Bounds-checked cursor over ``buf[pos:end]`` (no copies until a value is taken)."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def _need(self, n: int) -> int:
        pos = self.pos
        if pos + n > self.end:
            raise _malformed("packet shorter than its fields")
        self.pos = pos + n
        return pos

    def u8(self) -> int:
        pos = self._need(1)
        return self.buf[pos]

    def u16(self) -> int:
        pos = self._need(2)
        buf = self.buf
        return (buf[pos] << 8) | buf[pos + 1]

    def u32(self) -> int:
        pos = self._need(4)
        return int.from_bytes(self.buf[pos : pos + 4], "big")

    def varint(self) -> int:
        value = 0
        shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift == 28:  # §1.5.5: at most four bytes
                raise _malformed("variable byte integer longer than 4 bytes")
        if byte == 0 and shift:  # [MQTT-1.5.5-1] minimum number of bytes
            raise _malformed("variable byte integer not minimally encoded")
        return value

    def take(self, n: int) -> bytes:
        pos = self._need(n)
        return bytes(self.buf[pos : pos + n])

    def binary(self) -> bytes:
        return self.take(self.u16())

    def utf8(self) -> str:
        n = self.u16()
        pos = self._need(n)
        return _decode_utf8(self.buf, pos, pos + n)

    def rest(self) -> bytes:
        pos = self.pos
        self.pos = self.end
        return bytes(self.buf[pos : self.end])

    def remaining(self) -> int:
        return self.end - self.pos

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise _malformed("unexpected bytes after the last field")

    def properties(self, kind: int) -> Properties:
        length = self.varint()
        if length == 0:
            return EMPTY_PROPERTIES
        prop_end = self.pos + length
        if prop_end > self.end:
            raise _malformed("property length exceeds the packet")
        outer_end = self.end
        self.end = prop_end
        values: dict[str, Any] = {}
        user: list[tuple[str, str]] = []
        sub_ids: list[int] = []
        while self.pos < prop_end:
            ident = self.u8()
            spec = _SPEC_BY_ID.get(ident)
            if spec is None:
                raise _malformed(f"unknown property identifier 0x{ident:02X}")
            if kind not in spec.allowed:
                raise _protocol(f"property {spec.name} not allowed in this packet")
            ptype = spec.kind
            value: Any
            if ptype == _T_BYTE:
                value = self.u8()
            elif ptype == _T_U16:
                value = self.u16()
            elif ptype == _T_U32:
                value = self.u32()
            elif ptype == _T_VARINT:
                value = self.varint()
            elif ptype == _T_UTF8:
                value = self.utf8()
            elif ptype == _T_BINARY:
                value = self.binary()
            else:
                user.append((self.utf8(), self.utf8()))
                continue
            if ptype != _T_UTF8 and ptype != _T_BINARY:
                problem = _property_value_problem(ident, value)
                if problem is not None:
                    raise _protocol(problem)
            if ident == 0x0B:
                # Several only in PUBLISH (§3.3.2.3.8); once in SUBSCRIBE (§3.8.2.1.2).
                if sub_ids and kind != PacketType.PUBLISH:
                    raise _protocol("duplicate subscription identifier")
                sub_ids.append(value)
            elif spec.name in values:  # §2.2.2.2: non-repeatable
                raise _protocol(f"duplicate property {spec.name}")
            else:
                values[spec.name] = value
        self.end = outer_end
        if user:
            values["user_properties"] = tuple(user)
        if sub_ids:
            values["subscription_identifiers"] = tuple(sub_ids)
        return Properties(**values)


def _decode_utf8(buf: memoryview, start: int, end: int) -> str:
    # §1.5.4: well-formed UTF-8 [MQTT-1.5.4-1], no U+0000 [MQTT-1.5.4-2].
    try:
        text = str(buf[start:end], "utf-8")
    except UnicodeDecodeError:
        raise _malformed("ill-formed UTF-8 string") from None
    if "\x00" in text:
        raise _malformed("UTF-8 string contains U+0000")
    return text


# Fixed-header flags every type but PUBLISH must carry (§2.1.3).
_REQUIRED_FLAGS: Final = (-1, 0, 0, -1, 0, 0, 0b0010, 0, 0b0010, 0, 0b0010, 0, 0, 0, 0, 0)
# Packets only a server sends: a server-side decoder rejects them (§2.1.2).
_SERVER_TO_CLIENT: Final = frozenset({_PT.CONNACK, _PT.SUBACK, _PT.UNSUBACK, _PT.PINGRESP})


class MqttDecoder:
    """Incremental MQTT decoder: :meth:`feed` bytes, get complete packets.

    * ``protocol_version=None`` (server side): the first packet must be CONNECT
      (§3.1 [MQTT-3.1.0-1]) and its level fixes the version for the stream.
    * ``protocol_version=3|4|5``: decode with that version (client side, or a
      server that has already handled CONNECT).
    * ``server`` (default: ``protocol_version is None``) additionally rejects a
      second CONNECT [MQTT-3.1.0-2], packets only a server sends, and a
      client PUBLISH carrying Subscription Identifiers [MQTT-3.3.4-6].

    ``max_packet_size`` bounds the *total* packet size (fixed header included,
    as the v5 Maximum Packet Size property does, §3.1.2.11.4). It is checked as
    soon as the fixed header is complete, before any body byte is buffered, so
    the internal buffer never exceeds ``max_packet_size`` bytes.

    After an error the decoder stays failed: every later ``feed`` raises.
    """

    __slots__ = (
        "_error",
        "_max_packet_size",
        "_pending",
        "_pending_total",
        "_raw",
        "_server",
        "_version",
    )

    def __init__(
        self,
        max_packet_size: int = MAX_PACKET_SIZE,
        protocol_version: int | None = None,
        *,
        server: bool | None = None,
    ) -> None:
        if not 2 <= max_packet_size <= _ABSOLUTE_MAX_PACKET:
            raise ValueError(f"max_packet_size out of range: {max_packet_size}")
        if protocol_version not in (None, 3, 4, 5):
            raise ValueError(f"unsupported protocol version: {protocol_version}")
        self._max_packet_size = max_packet_size
        self._version = protocol_version
        self._server = protocol_version is None if server is None else server
        self._pending = bytearray()
        self._pending_total: int | None = None
        self._error: MqttProtocolError | None = None
        self._raw = False

    @property
    def protocol_version(self) -> int | None:
        """Version in force (3, 4, 5) or ``None`` while waiting for CONNECT."""
        return self._version

    @property
    def buffered(self) -> int:
        """Number of bytes of an incomplete packet currently held."""
        return len(self._pending)

    @property
    def max_packet_size(self) -> int:
        """The limit on the total packet size this decoder enforces."""
        return self._max_packet_size

    @property
    def server(self) -> bool:
        """True for the server side of a connection (see the class docstring)."""
        return self._server

    def take_pending(self) -> bytes:
        """Remove and return the bytes of the incomplete packet held (feeding
        them back later, followed by the rest, decodes it as if never taken)."""
        held = bytes(self._pending)
        self._pending = bytearray()
        self._pending_total = None
        return held

    def feed(self, data: _ByteSource) -> list[Packet]:
        """Consume ``data``; return the packets it completes (possibly none).

        Raises :class:`MqttProtocolError` on the first violation; packets decoded
        earlier in this call are attached to the exception as ``packets``.
        """
        if self._error is not None:
            err = self._error
            raise MqttProtocolError(
                f"decoder already failed: {err.message}", err.reason_code, err.protocol_version
            )
        out: list[Any] = []
        try:
            with memoryview(data) as view:
                self._feed(view, out)
        except MqttProtocolError as exc:
            if exc.protocol_version is None:
                exc.protocol_version = self._version
            exc.packets = tuple(out)
            self._error = exc
            self._pending = bytearray()
            self._pending_total = None
            raise
        return out

    def feed_raw(self, data: _ByteSource) -> list[Packet | RawPublish]:
        """Like :meth:`feed`, but each PUBLISH comes as a :class:`RawPublish`
        (validated exactly as :meth:`feed` does, not decoded into a
        :class:`Publish`). Errors carry ``RawPublish`` items in ``packets`` too."""
        self._raw = True
        try:
            return self.feed(data)  # type: ignore[return-value]
        finally:
            self._raw = False

    def _feed(self, view: memoryview, out: list[Any]) -> None:
        n = len(view)
        pos = self._feed_pending(view, out) if self._pending else 0
        total: int | None = None
        while pos < n:
            header = self._header(view, pos, n)
            if header is None:
                total = None
                break
            body, length = header
            end = body + length
            if end > n:
                total = end - pos
                break
            out.append(self._decode(view, pos, body, end))
            pos = end
        if pos < n:
            self._pending += view[pos:]
            self._pending_total = total

    def _feed_pending(self, view: memoryview, out: list[Any]) -> int:
        """Complete the buffered partial packet from ``view``; return bytes used."""
        pending = self._pending
        n = len(view)
        used = 0
        total = self._pending_total
        while total is None:  # fixed header still incomplete (at most 4 bytes held)
            if used >= n:
                return used
            pending.append(view[used])
            used += 1
            header = self._header(bytes(pending), 0, len(pending))
            if header is not None:
                total = header[0] + header[1]
        take = min(total - len(pending), n - used)
        pending += view[used : used + take]
        used += take
        if len(pending) < total:
            self._pending_total = total
            return used
        self._pending = bytearray()
        self._pending_total = None
        with memoryview(pending) as packet:
            header = self._header(packet, 0, total)
            assert header is not None
            out.append(self._decode(packet, 0, header[0], total))
        return used

    def _header(self, buf: _ByteSource, pos: int, n: int) -> tuple[int, int] | None:
        """Parse and check the fixed header at ``pos``: (body start, remaining length)."""
        first = buf[pos]
        self._check_first_byte(first)
        i = pos + 1
        value = 0
        shift = 0
        while True:
            if i >= n:
                return None
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift == 28:  # §2.1.4: Remaining Length is at most 4 bytes
                raise _malformed("remaining length longer than 4 bytes")
        if byte == 0 and shift:  # [MQTT-1.5.5-1]
            raise _malformed("remaining length not minimally encoded")
        if i - pos + value > self._max_packet_size:
            raise MqttProtocolError(
                f"packet of {i - pos + value} bytes exceeds the maximum of {self._max_packet_size}",
                ReasonCode.PACKET_TOO_LARGE,
            )
        return i, value

    def _check_first_byte(self, first: int) -> None:
        ptype = first >> 4
        if ptype == 0:  # §2.1.2: reserved
            raise _malformed("reserved packet type 0")
        version = self._version
        if version is None:
            if ptype != PacketType.CONNECT:
                raise _protocol("first packet must be CONNECT")  # [MQTT-3.1.0-1]
        elif ptype == PacketType.CONNECT and self._server:
            raise _protocol("second CONNECT on the connection")  # [MQTT-3.1.0-2]
        elif ptype == PacketType.AUTH and version != 5:
            raise _malformed("AUTH (type 15) is reserved before MQTT 5")  # 3.1.1 §2.2.1
        if self._server and ptype in _SERVER_TO_CLIENT:
            raise _protocol(f"{PacketType(ptype).name} may only be sent by a server")
        flags = first & 0x0F
        if ptype == PacketType.PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:  # §3.3.1.2 [MQTT-3.3.1-4]
                raise _malformed("PUBLISH with QoS 3")
            if qos == 0 and flags & 0x08:  # [MQTT-3.3.1-2]
                raise _malformed("PUBLISH with DUP set at QoS 0")
        elif flags != _REQUIRED_FLAGS[ptype]:  # §2.1.3 [MQTT-2.1.3-1]
            raise _malformed(f"invalid fixed header flags for {PacketType(ptype).name}")

    def _decode(self, buf: memoryview, start: int, body: int, end: int) -> Packet | RawPublish:
        first = buf[start]
        ptype = first >> 4
        reader = _Reader(buf, body, end)
        if ptype == PacketType.PUBLISH:
            if self._raw:
                return self._raw_publish(first, reader)
            return self._publish(first, reader)
        if ptype == PacketType.CONNECT:
            connect = _decode_connect(reader)
            if self._version is None:
                self._version = connect.protocol_level
            return connect
        version = self._version
        assert version is not None
        v5 = version == 5
        if ptype <= PacketType.PUBCOMP:
            if ptype == PacketType.CONNACK:
                return _decode_connack(reader, v5)
            return _decode_pub_ack(ptype, reader, v5)
        if ptype == PacketType.SUBSCRIBE:
            return _decode_subscribe(reader, v5)
        if ptype == PacketType.SUBACK:
            return _decode_suback(reader, v5)
        if ptype == PacketType.UNSUBSCRIBE:
            return _decode_unsubscribe(reader, v5)
        if ptype == PacketType.UNSUBACK:
            return _decode_unsuback(reader, v5)
        if ptype == PacketType.PINGREQ or ptype == PacketType.PINGRESP:
            if end != body:  # §3.12, §3.13: no variable header or payload
                raise _malformed("PINGREQ/PINGRESP with a body")
            return _PINGREQ if ptype == PacketType.PINGREQ else _PINGRESP
        if ptype == PacketType.DISCONNECT:
            code, props = _decode_reason_tail(reader, v5, PacketType.DISCONNECT)
            if code not in _DISCONNECT_CODES:
                raise _protocol(f"invalid DISCONNECT reason code 0x{code:02X}")
            return Disconnect(code, props)
        code, props = _decode_reason_tail(reader, v5, PacketType.AUTH)
        if code not in _AUTH_CODES:
            raise _protocol(f"invalid AUTH reason code 0x{code:02X}")
        return Auth(code, props)

    def _publish_header(
        self, first: int, reader: _Reader
    ) -> tuple[str, int, int, int | None, Properties]:
        """Validate a PUBLISH up to its payload: (topic, topic start, topic end,
        packet id, properties); ``reader`` is left at the payload."""
        version = self._version
        assert version is not None
        qos = (first >> 1) & 3
        n = reader.u16()
        topic_start = reader._need(n)
        topic_end = topic_start + n
        topic = _decode_utf8(reader.buf, topic_start, topic_end)
        if "+" in topic or "#" in topic:  # [MQTT-3.3.2-2]
            raise MqttProtocolError("wildcard in PUBLISH topic", ReasonCode.TOPIC_NAME_INVALID)
        packet_id = None
        if qos:
            packet_id = reader.u16()
            if packet_id == 0:  # [MQTT-2.2.1-3]
                raise _protocol("PUBLISH with packet identifier 0")
        props = EMPTY_PROPERTIES
        if version == 5:
            props = reader.properties(PacketType.PUBLISH)
            if not topic and props.topic_alias is None:  # §3.3.2.3.4
                raise _protocol("empty topic without a topic alias")
            if self._server and props.subscription_identifiers:  # [MQTT-3.3.4-6]
                raise _protocol("client PUBLISH with a subscription identifier")
        elif not topic:  # 3.1.1 [MQTT-4.7.3-1]
            raise _protocol("empty PUBLISH topic")
        return topic, topic_start, topic_end, packet_id, props

    def _publish(self, first: int, reader: _Reader) -> Publish:
        topic, _, _, packet_id, props = self._publish_header(first, reader)
        return Publish(
            topic,
            reader.rest(),
            (first >> 1) & 3,
            bool(first & 0x01),
            bool(first & 0x08),
            packet_id,
            props,
        )

    def _raw_publish(self, first: int, reader: _Reader) -> RawPublish:
        topic, start, end, packet_id, props = self._publish_header(first, reader)
        buf = reader.buf
        return RawPublish(
            first,
            topic,
            bytes(buf[start:end]),
            bytes(buf[end : reader.end]),
            reader.pos - end,
            packet_id,
            props,
        )


class RawPublish:
    """A fully validated PUBLISH kept as wire bytes (:meth:`MqttDecoder.feed_raw`),
    so a proxy can rewrite its topic without decoding and re-encoding it.

    ``tail`` is everything after the topic name (packet id, properties,
    payload); the payload starts at ``tail[payload_offset:]``.
    """

    __slots__ = (
        "first",
        "packet_id",
        "payload_offset",
        "properties",
        "tail",
        "topic",
        "topic_bytes",
    )

    def __init__(
        self,
        first: int,
        topic: str,
        topic_bytes: bytes,
        tail: bytes,
        payload_offset: int,
        packet_id: int | None,
        properties: Properties,
    ) -> None:
        self.first = first
        self.topic = topic
        self.topic_bytes = topic_bytes
        self.tail = tail
        self.payload_offset = payload_offset
        self.packet_id = packet_id
        self.properties = properties

    def packet(self) -> Publish:
        """The decoded :class:`Publish` (what :meth:`MqttDecoder.feed` returns)."""
        first = self.first
        return Publish(
            self.topic,
            self.tail[self.payload_offset :],
            (first >> 1) & 3,
            bool(first & 0x01),
            bool(first & 0x08),
            self.packet_id,
            self.properties,
        )

    def with_topic(self, topic_bytes: bytes) -> bytes | None:
        """The same packet on the wire under another (already valid, UTF-8
        encoded) topic name; ``None`` if it would not fit a packet."""
        n = len(topic_bytes)
        if n > 0xFFFF:
            return None
        length = 2 + n + len(self.tail)
        if length > MAX_REMAINING_LENGTH:
            return None
        return b"".join(
            (
                bytes((self.first,)),
                encode_varint(length),
                n.to_bytes(2, "big"),
                topic_bytes,
                self.tail,
            )
        )


def _decode_connect(reader: _Reader) -> Connect:
    name = reader.utf8()
    level = reader.u8()
    # §3.1.2.1-2; 3.1.1 §3.1.2.2 [MQTT-3.1.2-2]: answer with 0x84 / return code 1.
    if not ((name == "MQTT" and level in (4, 5)) or (name == "MQIsdp" and level == 3)):
        raise MqttProtocolError(
            f"unsupported protocol {name!r} level {level}",
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
        )
    try:
        return _decode_connect_rest(reader, level)
    except MqttProtocolError as exc:
        exc.protocol_version = level
        raise


def _decode_connect_rest(reader: _Reader, level: int) -> Connect:
    v5 = level == 5
    flags = reader.u8()
    if flags & 0x01:  # [MQTT-3.1.2-3]
        raise _malformed("CONNECT reserved flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:  # §3.1.2.6 [MQTT-3.1.2-12]
        raise _malformed("will QoS 3")
    if not will_flag and (will_qos or will_retain):  # [MQTT-3.1.2-11], [MQTT-3.1.2-13]
        raise _malformed("will QoS/retain set without the will flag")
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if has_password and not has_username and not v5:  # 3.1.1 [MQTT-3.1.2-22]
        raise _malformed("password without user name")
    keepalive = reader.u16()
    props = EMPTY_PROPERTIES
    if v5:
        props = reader.properties(PacketType.CONNECT)
        if props.authentication_data is not None and props.authentication_method is None:
            raise _protocol("authentication data without a method")  # §3.1.2.11.10
    client_id = reader.utf8()
    clean_start = bool(flags & 0x02)
    if level == 4 and not client_id and not clean_start:  # 3.1.1 [MQTT-3.1.3-8]
        raise MqttProtocolError(
            "empty client identifier requires clean session",
            ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
        )
    if level == 3 and not 1 <= len(client_id) <= 23:  # MQTT 3.1 §3.1 payload
        raise MqttProtocolError(
            "MQTT 3.1 client identifier must be 1-23 characters",
            ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
        )
    will = None
    if will_flag:
        will_props = reader.properties(_WILL) if v5 else EMPTY_PROPERTIES
        will_topic = reader.utf8()
        will = Will(will_topic, reader.binary(), will_qos, will_retain, will_props)
    username = reader.utf8() if has_username else None
    password = reader.binary() if has_password else None
    reader.expect_end()
    return Connect(client_id, level, clean_start, keepalive, username, password, will, props)


def _decode_connack(reader: _Reader, v5: bool) -> Connack:
    flags = reader.u8()
    if flags & 0xFE:  # §3.2.2.1 [MQTT-3.2.2-1]
        raise _malformed("CONNACK reserved flags set")
    code = reader.u8()
    if code not in (_CONNACK_CODES_V5 if v5 else _CONNACK_CODES_V3):
        raise _protocol(f"invalid CONNACK code 0x{code:02X}")
    if flags and code:  # [MQTT-3.2.2-6]; 3.1.1 [MQTT-3.2.2-4]
        raise _protocol("session present with a refusal code")
    props = reader.properties(PacketType.CONNACK) if v5 else EMPTY_PROPERTIES
    reader.expect_end()
    return Connack(bool(flags), code, props)


_PUB_ACK_CLASSES: Final[dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]]] = {
    PacketType.PUBACK: Puback,
    PacketType.PUBREC: Pubrec,
    PacketType.PUBREL: Pubrel,
    PacketType.PUBCOMP: Pubcomp,
}


def _decode_pub_ack(ptype: int, reader: _Reader, v5: bool) -> Puback | Pubrec | Pubrel | Pubcomp:
    packet_id = _packet_id(reader)
    code = 0
    props = EMPTY_PROPERTIES
    # §3.4.2.1: in v5 reason code and properties may be omitted (remaining length 2/3).
    if v5 and reader.remaining():
        code = reader.u8()
        codes = _PUBACK_CODES if ptype <= PacketType.PUBREC else _PUBREL_CODES
        if code not in codes:
            raise _protocol(f"invalid {PacketType(ptype).name} reason code 0x{code:02X}")
        if reader.remaining():
            props = reader.properties(ptype)
    reader.expect_end()
    return _PUB_ACK_CLASSES[ptype](packet_id, code, props)


def _packet_id(reader: _Reader) -> int:
    packet_id = reader.u16()
    if packet_id == 0:  # [MQTT-2.2.1-3]
        raise _protocol("packet identifier 0")
    return packet_id


def _decode_subscribe(reader: _Reader, v5: bool) -> Subscribe:
    packet_id = _packet_id(reader)
    props = reader.properties(PacketType.SUBSCRIBE) if v5 else EMPTY_PROPERTIES
    subs: list[tuple[str, SubscriptionOptions]] = []
    while reader.remaining():
        topic_filter = reader.utf8()
        options = reader.u8()
        qos = options & 0x03
        if v5:
            if options & 0xC0:  # [MQTT-3.8.3-5]
                raise _malformed("subscription options reserved bits set")
            if qos == 3:  # §3.8.3.1
                raise _protocol("subscription with QoS 3")
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:  # §3.8.3.1
                raise _protocol("retain handling 3")
            no_local = bool(options & 0x04)
            if no_local and topic_filter.startswith("$share/"):  # [MQTT-3.8.3-4]
                raise _protocol("no local on a shared subscription")
            opts = SubscriptionOptions(qos, no_local, bool(options & 0x08), retain_handling)
        else:
            if options & 0xFC or qos == 3:  # 3.1.1 [MQTT-3.8.3-4]
                raise _malformed("invalid requested QoS byte")
            opts = _V3_SUB_OPTIONS[qos]
        subs.append((topic_filter, opts))
    if not subs:  # [MQTT-3.8.3-2]; 3.1.1 [MQTT-3.8.3-3]
        raise _protocol("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(subs), props)


_V3_SUB_OPTIONS: Final = tuple(SubscriptionOptions(qos) for qos in range(3))


def _decode_suback(reader: _Reader, v5: bool) -> Suback:
    packet_id = _packet_id(reader)
    props = reader.properties(PacketType.SUBACK) if v5 else EMPTY_PROPERTIES
    codes = tuple(reader.rest())
    valid = _SUBACK_CODES_V5 if v5 else _SUBACK_CODES_V3
    if not codes or not valid.issuperset(codes):  # §3.9.3
        raise _protocol("invalid SUBACK reason codes")
    return Suback(packet_id, codes, props)


def _decode_unsubscribe(reader: _Reader, v5: bool) -> Unsubscribe:
    packet_id = _packet_id(reader)
    props = reader.properties(PacketType.UNSUBSCRIBE) if v5 else EMPTY_PROPERTIES
    filters: list[str] = []
    while reader.remaining():
        filters.append(reader.utf8())
    if not filters:  # [MQTT-3.10.3-2]
        raise _protocol("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(filters), props)


def _decode_unsuback(reader: _Reader, v5: bool) -> Unsuback:
    packet_id = _packet_id(reader)
    if not v5:
        reader.expect_end()  # 3.1.1 §3.11: remaining length 2
        return Unsuback(packet_id)
    props = reader.properties(PacketType.UNSUBACK)
    codes = tuple(reader.rest())
    if not codes or not _UNSUBACK_CODES.issuperset(codes):  # §3.11.3
        raise _protocol("invalid UNSUBACK reason codes")
    return Unsuback(packet_id, codes, props)


def _decode_reason_tail(reader: _Reader, v5: bool, kind: int) -> tuple[int, Properties]:
    """Reason code + properties of DISCONNECT/AUTH, both optional (§3.14.2.1, §3.15.2.1)."""
    if not v5:
        reader.expect_end()  # 3.1.1 §3.14: no variable header
        return 0, EMPTY_PROPERTIES
    code = 0
    props = EMPTY_PROPERTIES
    if reader.remaining():
        code = reader.u8()
        if reader.remaining():
            props = reader.properties(kind)
    reader.expect_end()
    return code, props


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------

_VARINT_SMALL: Final = tuple(bytes((i,)) for i in range(128))
_EMPTY_PROPS_WIRE: Final = b"\x00"


def encode_varint(value: int) -> bytes:
    """A Variable Byte Integer (§1.5.5), e.g. a Remaining Length."""
    if value < 128:
        return _VARINT_SMALL[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _enc_u16(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise MqttEncodeError(f"{what} out of range: {value}")
    return value.to_bytes(2, "big")


def _enc_str(value: str, what: str) -> bytes:
    if "\x00" in value:  # [MQTT-1.5.4-2]
        raise MqttEncodeError(f"{what} contains U+0000")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates [MQTT-1.5.4-1]
        raise MqttEncodeError(f"{what} is not encodable as UTF-8") from None
    if len(raw) > 0xFFFF:
        raise MqttEncodeError(f"{what} longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _enc_binary(value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise MqttEncodeError(f"{what} longer than 65535 bytes")
    return len(value).to_bytes(2, "big") + bytes(value)


def _enc_packet_id(packet_id: int) -> bytes:
    if not 1 <= packet_id <= 0xFFFF:  # [MQTT-2.2.1-3]
        raise MqttEncodeError(f"packet identifier out of range: {packet_id}")
    return packet_id.to_bytes(2, "big")


def _enc_int_property(spec: _PropSpec, value: int) -> bytes:
    if not 0 <= value <= _INT_LIMITS[spec.kind]:
        raise MqttEncodeError(f"property {spec.name} out of range: {value}")
    problem = _property_value_problem(spec.ident, value)
    if problem is not None:
        raise MqttEncodeError(problem)
    if spec.kind == _T_VARINT:
        return encode_varint(value)
    size = {_T_BYTE: 1, _T_U16: 2, _T_U32: 4}[spec.kind]
    return value.to_bytes(size, "big")


def _enc_properties(props: Properties, kind: int) -> bytes:
    if props is EMPTY_PROPERTIES or props == EMPTY_PROPERTIES:
        return _EMPTY_PROPS_WIRE
    out = bytearray()
    for spec in _PROPERTY_SPECS:
        value = getattr(props, spec.name)
        if value is None or value == ():
            continue
        if kind not in spec.allowed:
            raise MqttEncodeError(f"property {spec.name} not allowed in this packet")
        ident = bytes((spec.ident,))
        if spec.kind == _T_PAIR:
            for key, val in value:
                out += ident
                out += _enc_str(key, "user property name")
                out += _enc_str(val, "user property value")
        elif spec.ident == 0x0B:
            if len(value) > 1 and kind != PacketType.PUBLISH:
                raise MqttEncodeError("only PUBLISH may carry several subscription identifiers")
            for sub_id in value:
                out += ident
                out += _enc_int_property(spec, sub_id)
        elif spec.kind == _T_UTF8:
            out += ident
            out += _enc_str(value, spec.name)
        elif spec.kind == _T_BINARY:
            out += ident
            out += _enc_binary(value, spec.name)
        else:
            out += ident
            out += _enc_int_property(spec, value)
    return encode_varint(len(out)) + out


def _no_properties(props: Properties, version: int) -> None:
    if props != EMPTY_PROPERTIES:
        raise MqttEncodeError(f"properties need MQTT 5, not protocol version {version}")


def _frame(first: int, *parts: bytes) -> bytes:
    length = sum(len(part) for part in parts)
    if length > MAX_REMAINING_LENGTH:
        raise MqttEncodeError(f"packet too large: remaining length {length}")
    return b"".join((bytes((first,)), encode_varint(length), *parts))


def _check_qos(qos: int, what: str) -> None:
    if qos not in (0, 1, 2):
        raise MqttEncodeError(f"{what} QoS must be 0, 1 or 2, not {qos}")


def _enc_connect(p: Connect, version: int) -> bytes:
    if p.protocol_level != version:
        raise MqttEncodeError(
            f"CONNECT protocol level {p.protocol_level} encoded as version {version}"
        )
    v5 = version == 5
    flags = 0x02 if p.clean_start else 0
    if p.will is not None:
        _check_qos(p.will.qos, "will")
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if p.username is None and not v5:  # 3.1.1 [MQTT-3.1.2-22]
            raise MqttEncodeError("MQTT 3.1.1 forbids a password without a user name")
        flags |= 0x40
    if version == 4 and not p.client_id and not p.clean_start:  # [MQTT-3.1.3-8]
        raise MqttEncodeError("empty client identifier requires clean session")
    if version == 3 and not 1 <= len(p.client_id) <= 23:
        raise MqttEncodeError("MQTT 3.1 client identifier must be 1-23 characters")
    parts = [
        b"\x00\x06MQIsdp\x03" if version == 3 else b"\x00\x04MQTT" + bytes((version,)),
        bytes((flags,)),
        _enc_u16(p.keepalive, "keepalive"),
    ]
    if v5:
        props = p.properties
        if props.authentication_data is not None and props.authentication_method is None:
            raise MqttEncodeError("authentication data without a method")
        parts.append(_enc_properties(props, PacketType.CONNECT))
    else:
        _no_properties(p.properties, version)
    parts.append(_enc_str(p.client_id, "client identifier"))
    if p.will is not None:
        if v5:
            parts.append(_enc_properties(p.will.properties, _WILL))
        else:
            _no_properties(p.will.properties, version)
        parts.append(_enc_str(p.will.topic, "will topic"))
        parts.append(_enc_binary(p.will.payload, "will payload"))
    if p.username is not None:
        parts.append(_enc_str(p.username, "user name"))
    if p.password is not None:
        parts.append(_enc_binary(p.password, "password"))
    return _frame(0x10, *parts)


def _enc_connack(p: Connack, version: int) -> bytes:
    v5 = version == 5
    if p.reason_code not in (_CONNACK_CODES_V5 if v5 else _CONNACK_CODES_V3):
        raise MqttEncodeError(f"invalid CONNACK code 0x{p.reason_code:02X} for v{version}")
    if p.session_present and p.reason_code:  # [MQTT-3.2.2-6]
        raise MqttEncodeError("session present with a refusal code")
    head = bytes((1 if p.session_present else 0, p.reason_code))
    if v5:
        return _frame(0x20, head, _enc_properties(p.properties, PacketType.CONNACK))
    _no_properties(p.properties, version)
    return _frame(0x20, head)


def _enc_publish(p: Publish, version: int) -> bytes:
    _check_qos(p.qos, "PUBLISH")
    if "+" in p.topic or "#" in p.topic:  # [MQTT-3.3.2-2]
        raise MqttEncodeError("wildcard in PUBLISH topic")
    first = 0x30 | (p.qos << 1) | (0x01 if p.retain else 0) | (0x08 if p.dup else 0)
    topic = _enc_str(p.topic, "topic")
    if p.qos:
        if p.packet_id is None:
            raise MqttEncodeError("QoS>0 PUBLISH needs a packet identifier")
        packet_id = _enc_packet_id(p.packet_id)
    else:
        if p.packet_id is not None:
            raise MqttEncodeError("QoS 0 PUBLISH must not have a packet identifier")
        if p.dup:  # [MQTT-3.3.1-2]
            raise MqttEncodeError("DUP must be 0 for QoS 0")
        packet_id = b""
    if version == 5:
        if not p.topic and p.properties.topic_alias is None:  # §3.3.2.3.4
            raise MqttEncodeError("empty topic needs a topic alias")
        props = _enc_properties(p.properties, PacketType.PUBLISH)
    else:
        if not p.topic:
            raise MqttEncodeError("empty PUBLISH topic")
        _no_properties(p.properties, version)
        props = b""
    return _frame(first, topic, packet_id, props, p.payload)


def _enc_pub_ack(p: Puback | Pubrec | Pubrel | Pubcomp, version: int) -> bytes:
    ptype = _PUB_ACK_TYPES[type(p)]
    first = (ptype << 4) | _REQUIRED_FLAGS[ptype]
    packet_id = _enc_packet_id(p.packet_id)
    if version != 5:
        if p.reason_code:
            raise MqttEncodeError("reason codes need MQTT 5")
        _no_properties(p.properties, version)
        return _frame(first, packet_id)
    codes = _PUBACK_CODES if ptype <= PacketType.PUBREC else _PUBREL_CODES
    if p.reason_code not in codes:
        raise MqttEncodeError(f"invalid {PacketType(ptype).name} code 0x{p.reason_code:02X}")
    props = _enc_properties(p.properties, ptype)
    if props == _EMPTY_PROPS_WIRE:  # §3.4.2.1: shortest form
        if p.reason_code == 0:
            return _frame(first, packet_id)
        return _frame(first, packet_id, bytes((p.reason_code,)))
    return _frame(first, packet_id, bytes((p.reason_code,)), props)


_PUB_ACK_TYPES: Final[dict[type, int]] = {
    Puback: PacketType.PUBACK,
    Pubrec: PacketType.PUBREC,
    Pubrel: PacketType.PUBREL,
    Pubcomp: PacketType.PUBCOMP,
}


def _enc_subscribe(p: Subscribe, version: int) -> bytes:
    if not p.subscriptions:  # [MQTT-3.8.3-2]
        raise MqttEncodeError("SUBSCRIBE needs at least one topic filter")
    v5 = version == 5
    parts = [_enc_packet_id(p.packet_id)]
    if v5:
        sub_ids = p.properties.subscription_identifiers
        if len(sub_ids) > 1:
            raise MqttEncodeError("SUBSCRIBE carries at most one subscription identifier")
        parts.append(_enc_properties(p.properties, PacketType.SUBSCRIBE))
    else:
        _no_properties(p.properties, version)
    for topic_filter, opts in p.subscriptions:
        _check_qos(opts.qos, "subscription")
        parts.append(_enc_str(topic_filter, "topic filter"))
        if v5:
            if opts.retain_handling not in (0, 1, 2):
                raise MqttEncodeError(f"retain handling must be 0-2: {opts.retain_handling}")
            if opts.no_local and topic_filter.startswith("$share/"):  # [MQTT-3.8.3-4]
                raise MqttEncodeError("no local on a shared subscription")
            byte = (
                opts.qos
                | (0x04 if opts.no_local else 0)
                | (0x08 if opts.retain_as_published else 0)
                | (opts.retain_handling << 4)
            )
        else:
            if opts != _V3_SUB_OPTIONS[opts.qos]:
                raise MqttEncodeError("subscription options other than QoS need MQTT 5")
            byte = opts.qos
        parts.append(bytes((byte,)))
    return _frame(0x82, *parts)


def _enc_suback(p: Suback, version: int) -> bytes:
    v5 = version == 5
    valid = _SUBACK_CODES_V5 if v5 else _SUBACK_CODES_V3
    if not p.reason_codes or not valid.issuperset(p.reason_codes):
        raise MqttEncodeError(f"invalid SUBACK codes {p.reason_codes!r}")
    if v5:
        props = _enc_properties(p.properties, PacketType.SUBACK)
    else:
        _no_properties(p.properties, version)
        props = b""
    return _frame(0x90, _enc_packet_id(p.packet_id), props, bytes(p.reason_codes))


def _enc_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    if not p.topic_filters:  # [MQTT-3.10.3-2]
        raise MqttEncodeError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_enc_packet_id(p.packet_id)]
    if version == 5:
        parts.append(_enc_properties(p.properties, PacketType.UNSUBSCRIBE))
    else:
        _no_properties(p.properties, version)
    parts.extend(_enc_str(f, "topic filter") for f in p.topic_filters)
    return _frame(0xA2, *parts)


def _enc_unsuback(p: Unsuback, version: int) -> bytes:
    packet_id = _enc_packet_id(p.packet_id)
    if version != 5:
        if p.reason_codes:
            raise MqttEncodeError("UNSUBACK reason codes need MQTT 5")
        _no_properties(p.properties, version)
        return _frame(0xB0, packet_id)
    if not p.reason_codes or not _UNSUBACK_CODES.issuperset(p.reason_codes):
        raise MqttEncodeError(f"invalid UNSUBACK codes {p.reason_codes!r}")
    props = _enc_properties(p.properties, PacketType.UNSUBACK)
    return _frame(0xB0, packet_id, props, bytes(p.reason_codes))


def _enc_pingreq(p: Pingreq, version: int) -> bytes:
    return b"\xc0\x00"


def _enc_pingresp(p: Pingresp, version: int) -> bytes:
    return b"\xd0\x00"


def _enc_reason_tail(
    first: int, code: int, props: Properties, kind: int, valid: frozenset[int]
) -> bytes:
    if code not in valid:
        raise MqttEncodeError(f"invalid {PacketType(kind).name} reason code 0x{code:02X}")
    wire = _enc_properties(props, kind)
    if wire == _EMPTY_PROPS_WIRE:  # §3.14.2.1, §3.15.2.1: shortest form
        return _frame(first) if code == 0 else _frame(first, bytes((code,)))
    return _frame(first, bytes((code,)), wire)


def _enc_disconnect(p: Disconnect, version: int) -> bytes:
    if version != 5:
        if p.reason_code:
            raise MqttEncodeError("DISCONNECT reason codes need MQTT 5")
        _no_properties(p.properties, version)
        return b"\xe0\x00"
    return _enc_reason_tail(
        0xE0, p.reason_code, p.properties, PacketType.DISCONNECT, _DISCONNECT_CODES
    )


def _enc_auth(p: Auth, version: int) -> bytes:
    if version != 5:
        raise MqttEncodeError("AUTH needs MQTT 5")
    return _enc_reason_tail(0xF0, p.reason_code, p.properties, PacketType.AUTH, _AUTH_CODES)


_ENCODERS: Final[dict[type, Any]] = {
    Connect: _enc_connect,
    Connack: _enc_connack,
    Publish: _enc_publish,
    Puback: _enc_pub_ack,
    Pubrec: _enc_pub_ack,
    Pubrel: _enc_pub_ack,
    Pubcomp: _enc_pub_ack,
    Subscribe: _enc_subscribe,
    Suback: _enc_suback,
    Unsubscribe: _enc_unsubscribe,
    Unsuback: _enc_unsuback,
    Pingreq: _enc_pingreq,
    Pingresp: _enc_pingresp,
    Disconnect: _enc_disconnect,
    Auth: _enc_auth,
}


def encode(packet: Packet, protocol_version: int) -> bytes:
    """Encode ``packet`` as wire bytes for ``protocol_version`` (3, 4 or 5).

    Raises :class:`MqttEncodeError` for packets the protocol does not allow
    (wrong fields for the version, out-of-range values, disallowed properties).
    """
    if protocol_version not in (3, 4, 5):
        raise MqttEncodeError(f"unsupported protocol version {protocol_version}")
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise MqttEncodeError(f"not an MQTT packet: {packet!r}")
    wire: bytes = encoder(packet, protocol_version)
    return wire


# --------------------------------------------------------------------------
# Refusal helpers
# --------------------------------------------------------------------------


def reject_connack(
    reason_code: int, protocol_version: int, *, reason_string: str | None = None
) -> Connack | None:
    """CONNACK refusing a connection with v5 ``reason_code`` (>= 0x80).

    For MQTT 5 the reason code is used as-is (codes CONNACK cannot carry become
    0x80 unspecified error) with an optional Reason String. For 3.1/3.1.1 it is
    mapped with :func:`v311_return_code`; ``None`` means no 3.1.1 equivalent
    exists and the connection should just be closed (3.1.1 §4.8).
    """
    if reason_code < 0x80:
        raise ValueError(f"not a refusal reason code: 0x{reason_code:02X}")
    if protocol_version == 5:
        code = reason_code if reason_code in _CONNACK_CODES_V5 else ReasonCode.UNSPECIFIED_ERROR
        props = (
            EMPTY_PROPERTIES if reason_string is None else Properties(reason_string=reason_string)
        )
        return Connack(False, int(code), props)
    v3_code = v311_return_code(reason_code)
    return None if v3_code is None else Connack(False, v3_code)


def encode_reject_connack(
    reason_code: int, protocol_version: int | None, *, reason_string: str | None = None
) -> bytes | None:
    """Wire bytes of :func:`reject_connack`; an unknown version uses the 3.1.1 form.

    The 3.1.1 form (4 bytes) is what clients of any version best understand
    when their protocol level was not accepted (§3.1.2.2, 3.1.1 [MQTT-3.1.2-2]).
    """
    version = 4 if protocol_version is None else protocol_version
    connack = reject_connack(reason_code, version, reason_string=reason_string)
    return None if connack is None else encode(connack, version)


def connack_for_error(error: MqttProtocolError) -> bytes | None:
    """CONNACK bytes to send when decoding CONNECT failed (``None``: just close)."""
    return encode_reject_connack(error.reason_code, error.protocol_version)


def disconnect_for_error(error: MqttProtocolError) -> bytes | None:
    """v5 DISCONNECT bytes for an error after CONNECT; ``None`` for 3.1.1 (just close)."""
    if error.protocol_version != 5:
        return None
    code = error.reason_code
    if code < 0x80 or code not in _DISCONNECT_CODES:
        code = ReasonCode.PROTOCOL_ERROR
    return encode(Disconnect(int(code)), 5)
