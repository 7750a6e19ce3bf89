"""The MQTT front-end of one device connection, sans-IO.

Feed it the device's bytes (:meth:`MqttFrontend.device_data`) and the
broker's bytes (:meth:`MqttFrontend.backend_data`); it returns events for the
glue to carry out. It enforces the listener's identity rule on CONNECT
(8883: ClientId == certificate CN; 9883: username == tenant id), rewrites
client ids, topics and filters into the tenant's namespace in both
directions, and never lets a device reach outside its tenant.

Device access token API (spec "HTTP"; ``token_topics=True``, core MQTT only):
a PUBLISH to ``s/uat`` is acknowledged here, never forwarded, and raises
:class:`TokenRequested`; the glue answers with :meth:`MqttFrontend.token_answer`,
a PUBLISH on ``s/dat`` sent to this connection only. Device PUBLISHes to
``s/dat`` are acknowledged and dropped, so no device can send a forged token
answer to the others of its tenant through the broker.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from protocols.mqtt import topics
from protocols.mqtt.codec import (
    EMPTY_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttDecoder,
    MqttProtocolError,
    Packet,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RawPublish,
    ReasonCode,
    Suback,
    Subscribe,
    Unsubscribe,
    Will,
    connack_for_error,
    disconnect_for_error,
    encode,
    encode_reject_connack,
)
from protocols.mqtt.fastpath import PublishRewriter
from trust.model import Decision, DeviceIdentity, Listener, Reason, Rejection

BACKEND_MAX_PACKET = 268435455
TOKEN_REQUEST_TOPIC = "s/uat"  # noqa: S105 - a topic name, not a secret
TOKEN_RESPONSE_TOPIC = "s/dat"  # noqa: S105


@dataclass(frozen=True, slots=True)
class SendDevice:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendBackend:
    data: bytes


@dataclass(frozen=True, slots=True)
class Authorize:
    """CONNECT passed the listener's rule: admit the device, open the backend,
    then call :meth:`MqttFrontend.backend_ready` (or :meth:`refuse`)."""

    identity: DeviceIdentity
    connect: Connect


@dataclass(frozen=True, slots=True)
class Published:
    """PUBLISHes forwarded (for metrics): ``count`` of them, in ``direction``."""

    direction: str
    count: int = 1


@dataclass(frozen=True, slots=True)
class TokenRequested:
    """The device published to ``s/uat``: issue a token for the connection's
    identity and send it with :meth:`MqttFrontend.token_answer`."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close both sides after sending what was queued. ``code`` is a log reason."""

    code: str
    message: str


Event = SendDevice | SendBackend | Authorize | Close | Published | TokenRequested


class State(enum.Enum):
    AWAIT_CONNECT = 1
    AUTHORIZING = 2
    CONNECTED = 3
    CLOSED = 4


def _connack_refusal(code: ReasonCode, version: int | None, reason: str) -> bytes:
    data = encode_reject_connack(
        int(code), version, reason_string=reason[:200] if version == 5 else None
    )
    return data or b""


class MqttFrontend:
    """One device connection's MQTT rules and namespace rewriting."""

    # one per live session: slotted, and the rarely used containers are made on demand
    __slots__ = (
        "_assigned_id",
        "_backend",
        "_connect",
        "_device",
        "_fast_in",
        "_fast_out",
        "_held",
        "_local_qos2",
        "_prefix",
        "_refused_subs",
        "allow_v5",
        "client_id",
        "decision",
        "listener",
        "state",
        "tenant",
        "token_topics",
        "version",
    )

    def __init__(
        self,
        decision: Decision,
        listener: Listener,
        *,
        max_packet_size: int,
        allow_v5: bool = True,
        token_topics: bool = False,
    ) -> None:
        self.decision = decision
        self.listener = listener
        self.allow_v5 = allow_v5
        self.token_topics = token_topics
        """Handle ``s/uat``/``s/dat`` here (device access token API) instead of the broker."""
        self.state = State.AWAIT_CONNECT
        self.version: int | None = None
        self.tenant: str | None = None
        self.client_id: str | None = None
        self._assigned_id: str | None = None
        self._device = MqttDecoder(max_packet_size)
        self._backend: MqttDecoder | None = None
        self._held: list[Packet | RawPublish] | None = None
        self._connect: Connect | None = None
        # SUBSCRIBE packet id -> positions refused by the gateway (merged into SUBACK)
        self._refused_subs: dict[int, list[tuple[int, int]]] | None = None
        # QoS 2 packet ids of token-topic PUBLISHes answered here (PUBREL is ours too)
        self._local_qos2: set[int] | None = None
        # "<tenant>/" as UTF-8 once the tenant id is known valid (wire fast path)
        self._prefix: bytes | None = None
        # wire fast paths, made on the first data after CONNECT
        self._fast_in: PublishRewriter | None = None
        self._fast_out: PublishRewriter | None = None

    @property
    def closed(self) -> bool:
        """True once the connection must end (read through a method so mypy
        does not narrow ``state`` across calls that change it)."""
        return self.state is State.CLOSED

    # device → gateway ----------------------------------------------------------
    def device_data(self, data: bytes) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if self.state is State.CONNECTED:
            fast = self._fast_in
            if fast is None:
                fast = self._fast_in = self._rewriter(self._mount_topic, self._device)
            return self._fast(fast, self._device, data, self._device_data, "device")
        return self._device_data(data)

    def _device_data(self, data: bytes) -> list[Event]:
        try:
            packets = self._device.feed_raw(data)
        except MqttProtocolError as exc:
            events: list[Event] = []
            for done in exc.packets:
                events += self._device_packet(done)
                if self.closed:
                    return events
            return events + self._protocol_error(exc)
        if self.state is not State.CONNECTED:
            out: list[Event] = []
            for p in packets:
                out += self._device_packet(p)
                if self.closed:
                    break
            return out
        return self._forward_batch(packets, self._mount_raw, self._forward_device, "device")

    def _rewriter(
        self, policy: Callable[[RawPublish], bytes | None], decoder: MqttDecoder
    ) -> PublishRewriter:
        assert self.version is not None
        return PublishRewriter(
            policy,
            version=self.version,
            max_packet_size=decoder.max_packet_size,
            server=decoder.server,
        )

    def _fast(
        self,
        fast: PublishRewriter,
        decoder: MqttDecoder,
        data: bytes,
        slow: Callable[[bytes], list[Event]],
        direction: str,
    ) -> list[Event]:
        """Forward the leading run of plain PUBLISHes on the wire (see
        :mod:`protocols.mqtt.fastpath`); the rest takes the full decoder."""
        if decoder.buffered:
            data = decoder.take_pending() + data
        pieces: list[bytes] = []
        count, used = fast.run(data, pieces)
        if not count:
            return slow(data)
        joined = b"".join(pieces)
        head: list[Event] = [
            SendDevice(joined) if direction == "backend" else SendBackend(joined),
            Published(direction, count),
        ]
        if used == len(data):
            return head
        return head + slow(data[used:])

    def _forward_batch(
        self,
        packets: list[Packet | RawPublish],
        fast: Callable[[RawPublish], bytes | None],
        slow: Callable[[Packet | RawPublish], list[Event]],
        direction: str,
    ) -> list[Event]:
        """Forward a batch: PUBLISHes the wire fast path can rewrite are joined
        into one send with one :class:`Published`; the rest go the full way
        (in order: queued fast-path bytes are emitted before a slow event)."""
        out: list[Event] = []
        chunks: list[bytes] = []
        count = 0
        to_device = direction == "backend"
        for p in packets:
            if type(p) is RawPublish:
                data = fast(p)
                if data is not None:
                    chunks.append(data)
                    count += 1
                    continue
            if chunks:
                joined = b"".join(chunks)
                out.append(SendDevice(joined) if to_device else SendBackend(joined))
                chunks = []
            out += slow(p)
            if self.closed:
                break
        if chunks:
            joined = b"".join(chunks)
            out.append(SendDevice(joined) if to_device else SendBackend(joined))
        if count:
            out.append(Published(direction, count))
        return out

    def _tenant_prefix(self) -> bytes | None:
        prefix = self._prefix
        if prefix is None and self.tenant is not None:
            try:
                topics.validate_tenant_id(self.tenant)
            except ValueError:
                return None  # the full path reports it
            prefix = self._prefix = (self.tenant + "/").encode()
        return prefix

    def _mount_raw(self, p: RawPublish) -> bytes | None:
        """Device PUBLISH → broker bytes on the wire, or ``None`` for the full path
        (token topics, topic aliases, Response Topic, refused or oversized topics)."""
        topic = self._mount_topic(p)
        return None if topic is None else p.with_topic(topic)

    def _mount_topic(self, p: RawPublish) -> bytes | None:
        """The broker-side topic of a device PUBLISH, or ``None`` for the full path."""
        props = p.properties
        if props.topic_alias is not None or props.response_topic is not None:
            return None
        topic = p.topic
        if self.token_topics and topic in (TOKEN_REQUEST_TOPIC, TOKEN_RESPONSE_TOPIC):
            return None
        prefix = self._tenant_prefix()
        if prefix is None or not self._topic_allowed(topic):
            return None
        return prefix + p.topic_bytes

    def _unmount_raw(self, p: RawPublish) -> bytes | None:
        """Broker PUBLISH → device bytes on the wire, or ``None`` for the full path."""
        topic = self._unmount_topic(p)
        return None if topic is None else p.with_topic(topic)

    def _unmount_topic(self, p: RawPublish) -> bytes | None:
        """The device-side topic of a broker PUBLISH, or ``None`` for the full path."""
        props = p.properties
        if props.topic_alias is not None or props.response_topic is not None:
            return None
        prefix = self._tenant_prefix()
        raw = p.topic_bytes
        if prefix is None or not raw.startswith(prefix):
            return None
        inner = p.topic[len(prefix) :]  # the tenant id is ASCII: same offset
        if not inner or inner[0] == "$":
            return None
        # the decoder refused wildcards and U+0000 in the whole topic already
        return raw[len(prefix) :]

    def _protocol_error(self, exc: MqttProtocolError) -> list[Event]:
        self.state, was = State.CLOSED, self.state
        first = was is State.AWAIT_CONNECT
        data = connack_for_error(exc) if first else disconnect_for_error(exc)
        events: list[Event] = [SendDevice(data)] if data else []
        return [*events, Close("malformed", exc.message)]

    def _device_packet(self, p: Packet | RawPublish) -> list[Event]:
        if self.state is State.AWAIT_CONNECT:
            assert isinstance(p, Connect)  # the server-side decoder guarantees it
            return self._on_connect(p)
        if self.state is State.AUTHORIZING:
            if self._held is None:
                self._held = []
            self._held.append(p)
            return []
        return self._forward_device(p)

    def _on_connect(self, p: Connect) -> list[Event]:
        self.version = p.protocol_level
        version = p.protocol_level
        decision = self.decision
        if isinstance(decision, Rejection):
            return self._refuse_connect(
                ReasonCode.NOT_AUTHORIZED, decision.reason.value, decision.message
            )
        if self.listener is Listener.MQTT_CORE:
            if p.client_id != decision.device_id:
                return self._refuse_connect(
                    ReasonCode.NOT_AUTHORIZED,
                    "client_id_mismatch",
                    f"ClientId {p.client_id!r} must equal the certificate CN "
                    f"{decision.device_id!r}",
                )
        elif self.listener is Listener.MQTT_SERVICE and p.username != decision.tenant:
            return self._refuse_connect(
                ReasonCode.NOT_AUTHORIZED,
                "username_mismatch",
                "MQTT username must be the tenant id of the certificate",
            )
        if version == 5 and not self.allow_v5:
            return self._refuse_connect(
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                "unsupported_version",
                "MQTT 5 needs the upstream broker backend",
            )
        self.tenant = decision.tenant
        self.client_id = p.client_id
        if not p.client_id:
            # 9883 only (8883 requires the CN): give the session a unique id.
            self._assigned_id = "auto-" + secrets.token_hex(8)
            self.client_id = self._assigned_id
        if p.will is not None and not self._topic_allowed(p.will.topic):
            return self._refuse_connect(
                ReasonCode.NOT_AUTHORIZED,
                "forbidden_topic",
                "will topic is not allowed",
            )
        self._connect = p
        self.state = State.AUTHORIZING
        return [Authorize(decision, p)]

    def _refuse_connect(self, code: ReasonCode, log_code: str, message: str) -> list[Event]:
        self.state = State.CLOSED
        return [SendDevice(_connack_refusal(code, self.version, message)), Close(log_code, message)]

    def refuse(self, code: ReasonCode, log_code: str, message: str) -> list[Event]:
        """Refuse a connection in AUTHORIZING (admission or backend failed)."""
        return self._refuse_connect(code, log_code, message)

    def backend_ready(
        self, *, username: str | None = None, password: bytes | None = None
    ) -> list[Event]:
        """The backend is open: send the rewritten CONNECT and anything held."""
        assert self._connect is not None and self.tenant is not None and self.client_id is not None
        version = self._connect.protocol_level
        self._backend = MqttDecoder(BACKEND_MAX_PACKET, version, server=False)
        will = self._connect.will
        if will is not None:
            will = Will(
                topics.to_backend_topic(self.tenant, will.topic),
                will.payload,
                will.qos,
                will.retain,
                self._mount_props(will.properties),
            )
        props = self._connect.properties
        if version == 5:
            props = replace(props, authentication_method=None, authentication_data=None)
        backend_connect = replace(
            self._connect,
            client_id=topics.to_backend_client_id(self.tenant, self.client_id),
            username=username,
            password=password if username is not None else None,
            will=will,
            properties=props,
        )
        self._connect = None  # not needed any more: no CONNECT kept per session
        self.state = State.CONNECTED
        out: list[Event] = [SendBackend(encode(backend_connect, version))]
        held, self._held = self._held or [], None
        for p in held:
            out += self._forward_device(p)
            if self.state is State.CLOSED:
                break
        return out

    def _topic_allowed(self, topic: str) -> bool:
        try:
            topics.validate_topic_name(topic)
        except ValueError:
            return False
        return not topic.startswith("$")

    def _mount_props(self, props: Properties) -> Properties:
        if props.response_topic is None or self.tenant is None:
            return props
        return replace(
            props, response_topic=topics.to_backend_topic(self.tenant, props.response_topic)
        )

    def _unmount_props(self, props: Properties) -> Properties:
        if props.response_topic is None or self.tenant is None:
            return props
        inner = topics.from_backend_topic(self.tenant, props.response_topic)
        return replace(props, response_topic=inner)

    def _forward_device(self, p: Packet | RawPublish) -> list[Event]:
        assert self.tenant is not None and self.version is not None
        v = self.version
        if isinstance(p, RawPublish):
            data = self._mount_raw(p)
            if data is not None:
                return [SendBackend(data), Published("device")]
            p = p.packet()
        if isinstance(p, Publish):
            if self.token_topics and p.topic in (TOKEN_REQUEST_TOPIC, TOKEN_RESPONSE_TOPIC):
                return self._token_publish(p)
            if p.topic == "" and p.properties.topic_alias is not None:
                mounted = p  # alias already bound to a mounted topic at the broker
            elif not self._topic_allowed(p.topic):
                return self._kick(
                    ReasonCode.TOPIC_NAME_INVALID,
                    "forbidden_topic",
                    f"topic {p.topic!r} is not allowed",
                )
            else:
                mounted = replace(
                    p,
                    topic=topics.to_backend_topic(self.tenant, p.topic),
                    properties=self._mount_props(p.properties),
                )
            return [SendBackend(encode(mounted, v)), Published("device")]
        if isinstance(p, Pubrel) and self._local_qos2 and p.packet_id in self._local_qos2:
            self._local_qos2.discard(p.packet_id)
            return [SendDevice(encode(Pubcomp(p.packet_id), v))]
        if isinstance(p, Subscribe):
            return self._subscribe(p)
        if isinstance(p, Unsubscribe):
            filters = tuple(
                self._mount_filter(f) or topics.to_backend_topic(self.tenant, "%refused-filter%")
                for f in p.topic_filters
            )
            return [SendBackend(encode(replace(p, topic_filters=filters), v))]
        if isinstance(p, Disconnect):
            self.state = State.CLOSED
            return [SendBackend(encode(p, v)), Close("client_disconnect", "device sent DISCONNECT")]
        if isinstance(p, Auth):
            return self._kick(
                ReasonCode.BAD_AUTHENTICATION_METHOD,
                "auth_unsupported",
                "enhanced authentication is not supported",
            )
        return [SendBackend(encode(p, v))]

    def _token_publish(self, p: Publish) -> list[Event]:
        """Acknowledge a PUBLISH to a token topic here; only ``s/uat`` asks for a token."""
        assert self.version is not None
        out: list[Event] = []
        fresh = True
        if p.qos == 1 and p.packet_id is not None:
            out.append(SendDevice(encode(Puback(p.packet_id), self.version)))
        elif p.qos == 2 and p.packet_id is not None:
            # a re-sent QoS 2 PUBLISH (before PUBREL) is the same request, not a new one
            answered = self._local_qos2
            if answered is None:
                answered = self._local_qos2 = set()
            fresh = p.packet_id not in answered
            answered.add(p.packet_id)
            out.append(SendDevice(encode(Pubrec(p.packet_id), self.version)))
        if p.topic == TOKEN_REQUEST_TOPIC and fresh:
            out.append(TokenRequested())
        return out

    def token_answer(self, payload: bytes) -> list[Event]:
        """The ``s/dat`` PUBLISH (QoS 0) carrying ``payload`` (``71,<token>``) to the device."""
        if self.state is not State.CONNECTED or self.version is None:
            return []
        answer = Publish(TOKEN_RESPONSE_TOPIC, payload)
        return [SendDevice(encode(answer, self.version))]

    def _mount_filter(self, f: str) -> str | None:
        assert self.tenant is not None
        try:
            topics.validate_topic_filter(f)
            if f.startswith("$") and not f.startswith("$share/"):
                return None
            return topics.to_backend_filter(self.tenant, f)
        except ValueError:
            return None

    def _subscribe(self, p: Subscribe) -> list[Event]:
        assert self.version is not None
        allowed = []
        refused: list[tuple[int, int]] = []
        for i, (f, opts) in enumerate(p.subscriptions):
            mounted = self._mount_filter(f)
            if mounted is None:
                refused.append(
                    (i, 0x80 if self.version != 5 else int(ReasonCode.TOPIC_FILTER_INVALID))
                )
            else:
                allowed.append((mounted, opts))
        if not allowed:
            codes = tuple(c for _, c in refused)
            return [SendDevice(encode(Suback(p.packet_id, codes), self.version))]
        if refused:
            if self._refused_subs is None:
                self._refused_subs = {}
            self._refused_subs[p.packet_id] = refused
        return [SendBackend(encode(replace(p, subscriptions=tuple(allowed)), self.version))]

    def _kick(self, code: ReasonCode, log_code: str, message: str) -> list[Event]:
        self.state = State.CLOSED
        out: list[Event] = []
        if self.version == 5:
            props = Properties(reason_string=message[:200])
            out.append(SendDevice(encode(Disconnect(int(code), props), 5)))
        return [*out, Close(log_code, message)]

    # broker → gateway ----------------------------------------------------------
    def backend_data(self, data: bytes) -> list[Event]:
        if self.state is State.CLOSED or self._backend is None:
            return []
        if self.state is State.CONNECTED:
            fast = self._fast_out
            if fast is None:
                fast = self._fast_out = self._rewriter(self._unmount_topic, self._backend)
            return self._fast(fast, self._backend, data, self._backend_data, "backend")
        return self._backend_data(data)

    def _backend_data(self, data: bytes) -> list[Event]:
        assert self._backend is not None
        try:
            packets = self._backend.feed_raw(data)
        except MqttProtocolError as exc:
            self.state = State.CLOSED
            return [Close("backend_protocol_error", f"broker sent invalid MQTT: {exc.message}")]
        return self._forward_batch(packets, self._unmount_raw, self._forward_backend, "backend")

    def _forward_backend(self, p: Packet | RawPublish) -> list[Event]:
        assert self.tenant is not None and self.version is not None
        v = self.version
        if isinstance(p, RawPublish):
            p = p.packet()
        if isinstance(p, Publish):
            if p.topic == "" and p.properties.topic_alias is not None:
                return [SendDevice(encode(p, v)), Published("backend")]
            inner = topics.from_backend_topic(self.tenant, p.topic)
            if inner is None:
                # Never deliver outside the namespace; still complete the broker's flow.
                if p.qos == 1 and p.packet_id is not None:
                    return [SendBackend(encode(Puback(p.packet_id), v))]
                if p.qos == 2 and p.packet_id is not None:
                    return [SendBackend(encode(Pubrec(p.packet_id), v))]
                return []
            out = replace(p, topic=inner, properties=self._unmount_props(p.properties))
            return [SendDevice(encode(out, v)), Published("backend")]
        if isinstance(p, Suback):
            refused = self._refused_subs.pop(p.packet_id, None) if self._refused_subs else None
            if refused:
                codes = list(p.reason_codes)
                for pos, code in refused:
                    codes.insert(pos, code)
                p = replace(p, reason_codes=tuple(codes))
            return [SendDevice(encode(p, v))]
        if isinstance(p, Connack):
            if self._assigned_id is not None and v == 5:
                p = replace(
                    p,
                    properties=replace(p.properties, assigned_client_identifier=self._assigned_id),
                )
            elif p.properties.assigned_client_identifier is not None:
                p = replace(p, properties=replace(p.properties, assigned_client_identifier=None))
            return [SendDevice(encode(p, v))]
        if isinstance(p, Disconnect):
            self.state = State.CLOSED
            return [SendDevice(encode(p, v)), Close("backend_disconnect", "broker sent DISCONNECT")]
        return [SendDevice(encode(p, v))]

    # gateway-initiated ---------------------------------------------------------
    def kick(self, reason: str, message: str) -> list[Event]:
        """Close a live session (revocation, disable, shutdown): a v5 DISCONNECT
        with the matching reason code; 3.1.1 has none, the socket just closes."""
        code = (
            ReasonCode.SERVER_SHUTTING_DOWN if reason == "shutdown" else ReasonCode.NOT_AUTHORIZED
        )
        if self.state is State.CLOSED:
            return []
        if self.state is not State.CONNECTED:
            self.state = State.CLOSED
            return [Close(reason, message)]
        return self._kick(code, reason, message)


__all__ = [
    "EMPTY_PROPERTIES",
    "Authorize",
    "Close",
    "Event",
    "MqttFrontend",
    "Published",
    "Reason",
    "SendBackend",
    "SendDevice",
    "State",
    "TokenRequested",
]
