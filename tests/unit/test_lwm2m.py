"""The sans-IO CoAP message layer and LWM2M registration interface, with
``now`` injected: deduplication, retransmission schedule, expiry."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime, timedelta

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from hypothesis import given
from hypothesis import strategies as st

from protocols.lwm2m.coap import (
    CoapPeer,
    Dropped,
    IncomingRequest,
    MessageTooLarge,
    QueueFull,
    RequestFailed,
    ResponseReceived,
    TransmissionParameters,
)
from protocols.lwm2m.links import LinkFormatError, ObjectLink, parse_object_links
from protocols.lwm2m.registration import (
    Client,
    Deregistered,
    Registered,
    RegistrationRegistry,
    Updated,
)

T0 = 100.0
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DEV = Client("t1", "dev-1", ("127.0.0.1", 5000))


def wire(code: Code, mtype: Type, mid: int, token: bytes = b"", **kw: object) -> bytes:
    m = Message(code=code, **kw)
    m.mtype, m.mid, m.token = mtype, mid, token
    return bytes(m.encode())


def decode(data: bytes) -> Message:
    return Message.decode(data)


# CoAP message layer ---------------------------------------------------------------------


def test_con_request_is_answered_in_a_piggybacked_ack_and_deduplicated() -> None:
    peer = CoapPeer()
    req = wire(Code.POST, Type.CON, 7, b"tk", uri_path=("rd",))
    (event,) = peer.receive(req, T0)
    assert isinstance(event, IncomingRequest)
    peer.respond(event.message, Message(code=Code.CREATED, location_path=("rd", "x")), T0)
    (ack,) = peer.take_outgoing()
    msg = decode(ack)
    assert (msg.mtype, msg.mid, msg.token, msg.code) == (Type.ACK, 7, b"tk", Code.CREATED)
    # the duplicate is not processed again, the cached ACK is re-sent (RFC 7252 §4.5)
    assert peer.receive(req, T0 + 10) == [Dropped("duplicate")]
    assert peer.take_outgoing() == [ack]
    # after EXCHANGE_LIFETIME the message id may be reused for a new request
    lifetime = TransmissionParameters().exchange_lifetime
    assert lifetime == 247
    again = peer.receive(req, T0 + lifetime + 1)
    assert isinstance(again[0], IncomingRequest)


def test_non_request_gets_a_non_response_and_duplicates_are_ignored() -> None:
    peer = CoapPeer(rng=random.Random(1))
    req = wire(Code.GET, Type.NON, 9, b"n", uri_path=("x",))
    (event,) = peer.receive(req, T0)
    assert isinstance(event, IncomingRequest)
    peer.respond(event.message, Message(code=Code.CONTENT, payload=b"v"), T0)
    (resp,) = peer.take_outgoing()
    assert decode(resp).mtype is Type.NON and decode(resp).token == b"n"
    assert peer.receive(req, T0 + 1) == [Dropped("duplicate")]
    assert peer.take_outgoing() == []


def test_ping_and_unparsable_con_get_reset_garbage_is_dropped() -> None:
    peer = CoapPeer()
    assert peer.receive(wire(Code.EMPTY, Type.CON, 3), T0) == []
    (rst,) = peer.take_outgoing()
    assert decode(rst).mtype is Type.RST and decode(rst).mid == 3
    # CON header with a bad token length (9): unparsable, rejected with RST (§4.2)
    assert peer.receive(bytes([0x49, 0x01, 0x00, 0x05]) + b"x" * 9, T0) == [Dropped("unparsable")]
    assert decode(peer.take_outgoing()[0]).mid == 5
    assert peer.receive(b"\xff", T0) == [Dropped("unparsable")]
    assert peer.take_outgoing() == []
    # an ACK for nothing we sent
    assert peer.receive(wire(Code.EMPTY, Type.ACK, 99), T0) == [Dropped("stray_ack")]


@given(st.binary(max_size=64))
def test_receive_never_raises(data: bytes) -> None:
    peer = CoapPeer()
    for event in peer.receive(data, T0):
        assert isinstance(event, IncomingRequest | Dropped)
    peer.take_outgoing()


def test_retransmission_schedule_and_give_up() -> None:
    """RFC 7252 §4.2: initial timeout in [2, 3] s, doubled, MAX_RETRANSMIT = 4."""
    rng = random.Random(42)
    expected_first = random.Random(42)
    peer = CoapPeer(rng=rng)
    expected_first.randrange(0x10000)  # the initial message id
    expected_first.getrandbits(32)  # the token
    timeout = expected_first.uniform(2.0, 3.0)
    token = peer.request(Message(code=Code.GET, uri_path=("3", "0", "0")), T0)
    (first,) = peer.take_outgoing()
    sent_at = [T0]
    events: list[object] = []
    now = T0
    while not events:
        at = peer.next_timer()
        assert at is not None
        now = at
        events = list(peer.handle_timer(now))
        out = peer.take_outgoing()
        if out:
            assert out == [first]  # the very same bytes, same message id
            sent_at.append(now)
    assert events == [RequestFailed(token, "timeout")]
    offsets = [t - T0 for t in sent_at]
    assert offsets == pytest.approx([0, timeout, 3 * timeout, 7 * timeout, 15 * timeout])
    assert now - T0 == pytest.approx(31 * timeout)
    assert 2.0 <= timeout <= 3.0
    assert peer.next_timer() is None and peer.pending() == 0


def test_piggybacked_response_stops_retransmission() -> None:
    peer = CoapPeer()
    token = peer.request(Message(code=Code.GET, uri_path=("3", "0", "0")), T0)
    sent = decode(peer.take_outgoing()[0])
    assert sent.mtype is Type.CON
    ack = wire(Code.CONTENT, Type.ACK, sent.mid, token, payload=b"Open Mobile Alliance")
    (event,) = peer.receive(ack, T0 + 1)
    assert isinstance(event, ResponseReceived) and event.message.payload == b"Open Mobile Alliance"
    assert peer.next_timer() is None
    # a wrong token in an ACK is not our response
    token2 = peer.request(Message(code=Code.GET, uri_path=("1",)), T0)
    mid2 = decode(peer.take_outgoing()[0]).mid
    assert peer.receive(wire(Code.CONTENT, Type.ACK, mid2, b"zz"), T0) == [Dropped("bad_ack")]
    assert peer.pending() == 1 and token2


def test_empty_ack_then_separate_response() -> None:
    peer = CoapPeer()
    token = peer.request(Message(code=Code.GET, uri_path=("3", "0", "0")), T0)
    mid = decode(peer.take_outgoing()[0]).mid
    assert peer.receive(wire(Code.EMPTY, Type.ACK, mid), T0 + 0.5) == []
    assert peer.next_timer() is None  # acknowledged: no more retransmissions
    separate = wire(Code.CONTENT, Type.CON, 4242, token, payload=b"late")
    (event,) = peer.receive(separate, T0 + 5)
    assert isinstance(event, ResponseReceived) and event.message.payload == b"late"
    (ack,) = peer.take_outgoing()
    assert decode(ack).mtype is Type.ACK and decode(ack).mid == 4242
    # its retransmission is acknowledged again but not delivered twice
    assert peer.receive(separate, T0 + 6) == [Dropped("duplicate")]
    assert peer.take_outgoing() == [ack]
    # a response nobody asked for is reset
    assert peer.receive(wire(Code.CONTENT, Type.CON, 4243, b"??"), T0) == [
        Dropped("unexpected_response")
    ]
    assert decode(peer.take_outgoing()[0]).mtype is Type.RST


def test_reset_fails_the_request_and_nstart_queues_the_next() -> None:
    peer = CoapPeer(max_queue=2)
    t1 = peer.request(Message(code=Code.GET, uri_path=("1",)), T0)
    t2 = peer.request(Message(code=Code.GET, uri_path=("2",)), T0)
    (only,) = peer.take_outgoing()  # NSTART = 1: the second waits
    assert decode(only).token == t1
    with pytest.raises(QueueFull):
        for _ in range(3):
            peer.request(Message(code=Code.GET, uri_path=("3",)), T0)
    assert peer.receive(wire(Code.EMPTY, Type.RST, decode(only).mid), T0) == [
        RequestFailed(t1, "reset")
    ]
    (second,) = peer.take_outgoing()
    assert decode(second).token == t2
    peer.cancel(t2, T0)
    (third,) = peer.take_outgoing()  # the queued one goes out in turn
    assert decode(third).opt.uri_path == ("3",) and peer.pending() == 1


def test_messages_larger_than_one_record_are_refused() -> None:
    peer = CoapPeer(max_message_size=100)
    with pytest.raises(MessageTooLarge):
        peer.request(Message(code=Code.PUT, uri_path=("1", "0", "1"), payload=b"x" * 200), T0)
    (event,) = peer.receive(wire(Code.GET, Type.CON, 1, b"a", uri_path=("x",)), T0)
    assert isinstance(event, IncomingRequest)
    with pytest.raises(MessageTooLarge):
        peer.respond(event.message, Message(code=Code.CONTENT, payload=b"y" * 200), T0)


# link format ---------------------------------------------------------------------------


def test_object_links() -> None:
    links = parse_object_links(b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>;ver=1.1,</5>')
    assert [link.path for link in links] == ["/1/0", "/3/0", "/5"]
    assert links[1] == ObjectLink(3, 0, (("ver", "1.1"),))
    alt = parse_object_links(b'</lwm2m>;rt="oma.lwm2m",</lwm2m/3/0>')
    assert [link.path for link in alt] == ["/3/0"]
    assert parse_object_links(b"") == ()
    for bad in (b"</a/b>", b"</1/2/3>", b"</70000>", b"not a link", b"\xff\xfe", b"</x/1/0>"):
        with pytest.raises(LinkFormatError):
            parse_object_links(bad)


@given(st.binary(max_size=200))
def test_link_parsing_raises_only_link_format_errors(data: bytes) -> None:
    with contextlib.suppress(LinkFormatError):
        parse_object_links(data)


# registration interface ------------------------------------------------------------------


def request(
    code: Code,
    path: tuple[str, ...],
    query: tuple[str, ...] = (),
    payload: bytes = b"",
    **kw: object,
) -> Message:
    return Message(code=code, uri_path=path, uri_query=query, payload=payload, **kw)


def register(
    rd: RegistrationRegistry,
    query: tuple[str, ...] = ("ep=dev-1", "lt=300", "lwm2m=1.1"),
    client: Client = DEV,
    now: datetime = NOW,
    payload: bytes = b"</1/0>,</3/0>",
) -> tuple[Message, object]:
    return rd.handle(request(Code.POST, ("rd",), query, payload, content_format=40), client, now)


def test_register_update_deregister() -> None:
    rd = RegistrationRegistry(new_id=iter(["a1", "b2"]).__next__)
    response, outcome = register(rd)
    assert response.code == Code.CREATED and tuple(response.opt.location_path) == ("rd", "a1")
    assert isinstance(outcome, Registered)
    reg = rd.get("t1", "dev-1")
    assert reg is not None and reg.lifetime == 300 and reg.version == "1.1"
    assert [o.path for o in reg.objects] == ["/1/0", "/3/0"] and reg.session == DEV.session
    later = NOW + timedelta(seconds=100)
    moved = Client("t1", "dev-1", ("127.0.0.1", 6000))  # new DTLS session, same device
    response, outcome = rd.handle(
        request(Code.POST, ("rd", "a1"), ("lt=600",), b"</3/0>"), moved, later
    )
    assert response.code == Code.CHANGED and isinstance(outcome, Updated)
    reg = rd.get("t1", "dev-1")
    assert reg is not None and reg.lifetime == 600 and reg.updated_at == later
    assert [o.path for o in reg.objects] == ["/3/0"] and reg.session == moved.session
    response, outcome = rd.handle(request(Code.DELETE, ("rd", "a1")), DEV, later)
    assert response.code == Code.DELETED and isinstance(outcome, Deregistered)
    assert rd.get("t1", "dev-1") is None and len(rd) == 0


@pytest.mark.parametrize(
    ("query", "payload", "code"),
    [
        (("ep=someone-else", "lt=300"), b"</1/0>", Code.FORBIDDEN),
        (("ep=dev-1", "lt=0"), b"</1/0>", Code.BAD_REQUEST),
        (("ep=dev-1", "lt=abc"), b"</1/0>", Code.BAD_REQUEST),
        (("ep=dev-1", "lwm2m=2.0"), b"</1/0>", Code.PRECONDITION_FAILED),
        (("ep=dev-1", "b=X"), b"</1/0>", Code.BAD_REQUEST),
        (("ep=dev-1", "ep=dev-1"), b"</1/0>", Code.BAD_REQUEST),
        (("ep=dev-1",), b"</a/b>", Code.BAD_REQUEST),
    ],
)
def test_register_is_refused(query: tuple[str, ...], payload: bytes, code: Code) -> None:
    rd = RegistrationRegistry()
    response, outcome = register(rd, query, payload=payload)
    assert response.code == code and outcome is None and len(rd) == 0
    assert response.payload  # a diagnostic payload


def test_register_without_ep_uses_the_certificate_name() -> None:
    rd = RegistrationRegistry()
    response, _ = register(rd, ("lt=60",))
    assert response.code == Code.CREATED
    reg = rd.get("t1", "dev-1")
    assert reg is not None and reg.lifetime == 60 and reg.version == "1.0" and reg.binding == "U"


def test_other_requests_are_refused() -> None:
    rd = RegistrationRegistry()
    assert rd.handle(request(Code.GET, ("rd",)), DEV, NOW)[0].code == Code.METHOD_NOT_ALLOWED
    assert rd.handle(request(Code.GET, ("other",)), DEV, NOW)[0].code == Code.NOT_FOUND
    assert rd.handle(request(Code.POST, ("rd", "nope")), DEV, NOW)[0].code == Code.NOT_FOUND
    wrong_format = request(Code.POST, ("rd",), ("ep=dev-1",), b"{}", content_format=50)
    assert rd.handle(wrong_format, DEV, NOW)[0].code == Code.UNSUPPORTED_CONTENT_FORMAT
    if_match = request(Code.POST, ("rd",), ("ep=dev-1",), b"</1/0>", if_match=[b"x"])
    assert rd.handle(if_match, DEV, NOW)[0].code == Code.BAD_OPTION


def test_only_the_owner_may_update_or_deregister() -> None:
    rd = RegistrationRegistry(new_id=lambda: "id1")
    register(rd)
    other = Client("t1", "dev-2", ("127.0.0.1", 7000))
    other_tenant = Client("t2", "dev-1", ("127.0.0.1", 7001))
    for who in (other, other_tenant):
        assert rd.handle(request(Code.POST, ("rd", "id1")), who, NOW)[0].code == Code.NOT_FOUND
        assert rd.handle(request(Code.DELETE, ("rd", "id1")), who, NOW)[0].code == Code.NOT_FOUND
    assert rd.get("t1", "dev-1") is not None


def test_lifetime_expiry_with_injected_now() -> None:
    rd = RegistrationRegistry()
    register(rd, ("ep=dev-1", "lt=300"))
    reg = rd.get("t1", "dev-1")
    assert reg is not None and rd.next_expiry() == NOW + timedelta(seconds=300)
    assert rd.expire(NOW + timedelta(seconds=299)) == []
    # an update restarts the lifetime
    rd.handle(request(Code.POST, ("rd", reg.id)), DEV, NOW + timedelta(seconds=200))
    assert rd.expire(NOW + timedelta(seconds=300)) == []
    assert rd.next_expiry() == NOW + timedelta(seconds=500)
    (gone,) = rd.expire(NOW + timedelta(seconds=500))
    assert gone.endpoint == "dev-1" and rd.get("t1", "dev-1") is None
    assert rd.next_expiry() is None
    # an expired registration's id is gone: its update is 4.04
    assert rd.handle(request(Code.POST, ("rd", reg.id)), DEV, NOW)[0].code == Code.NOT_FOUND


def test_register_again_replaces_and_capacity_is_bounded() -> None:
    rd = RegistrationRegistry(max_registrations=1, new_id=iter(["r1", "r2", "r3"]).__next__)
    register(rd)
    _, outcome = register(rd)
    assert isinstance(outcome, Registered) and outcome.replaced is not None
    assert outcome.replaced.id == "r1" and rd.by_id("r1") is None and len(rd) == 1
    other = Client("t1", "dev-2", ("127.0.0.1", 7000))
    response, _ = register(rd, ("ep=dev-2",), client=other)
    assert response.code == Code.SERVICE_UNAVAILABLE


def test_detach_keeps_the_registration_without_a_session() -> None:
    rd = RegistrationRegistry()
    register(rd)
    (detached,) = rd.detach(DEV.session)
    assert detached.session is None
    reg = rd.get("t1", "dev-1")
    assert reg is not None and reg.session is None
    assert rd.detach(DEV.session) == []
    assert rd.remove_endpoint("t1", "dev-1") is not None and len(rd) == 0
