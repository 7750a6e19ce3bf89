"""The CoAP message layer for one peer (RFC 7252 §4), sans-IO.

aiocoap is used as the codec only (``Message.decode``/``encode``); this class
owns what aiocoap would otherwise do over its own sockets:

* confirmable requests are answered in a piggybacked ACK, and every received
  CON/NON is remembered by message id for EXCHANGE_LIFETIME / NON_LIFETIME so
  a duplicate gets the cached reply again instead of being processed twice
  (§4.5);
* our own requests are confirmable, one outstanding at a time (NSTART = 1,
  §4.7), retransmitted after a random initial timeout in [ACK_TIMEOUT,
  ACK_TIMEOUT * ACK_RANDOM_FACTOR] that doubles each time, and fail after
  MAX_RETRANSMIT retransmissions (§4.2); responses are matched by token, both
  piggybacked and separate (§5.2);
* a CON ping or an unparsable/unexpected CON is answered with RST (§4.2, §4.3);
  anything else the peer sends that makes no sense is dropped and reported as
  a :class:`Dropped` event (for metrics), never raised.

Time is always passed in (``now``, seconds on any monotonic clock).
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type


@dataclass(frozen=True, slots=True)
class TransmissionParameters:
    """RFC 7252 §4.8 transmission parameters (defaults are the RFC's)."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    max_latency: float = 100.0

    @property
    def max_transmit_span(self) -> float:
        """§4.8.2: ACK_TIMEOUT * (2^MAX_RETRANSMIT - 1) * ACK_RANDOM_FACTOR (45 s)."""
        return self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def exchange_lifetime(self) -> float:
        """§4.8.2: MAX_TRANSMIT_SPAN + 2 * MAX_LATENCY + PROCESSING_DELAY (247 s)."""
        return self.max_transmit_span + 2 * self.max_latency + self.ack_timeout

    @property
    def non_lifetime(self) -> float:
        """§4.8.2: MAX_TRANSMIT_SPAN + MAX_LATENCY (145 s)."""
        return self.max_transmit_span + self.max_latency


# events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    """A new (not duplicate) request; answer it with :meth:`CoapPeer.respond`."""

    message: Message


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The response to our request ``token``."""

    token: bytes
    message: Message


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Our request ``token`` ended without a response (``timeout`` or ``reset``)."""

    token: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """Peer input that was ignored or reset (``reason`` is a metrics label)."""

    reason: str


CoapEvent = IncomingRequest | ResponseReceived | RequestFailed | Dropped


class CoapError(Exception):
    """A local error: our message cannot be sent."""


class MessageTooLarge(CoapError):
    """The encoded message exceeds ``max_message_size`` (one DTLS record)."""


class QueueFull(CoapError):
    """Too many requests are already waiting for this peer."""


# state --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outgoing:
    token: bytes
    message: Message
    mid: int = -1
    data: bytes = b""
    timeout: float = 0.0
    retransmits: int = 0
    next_at: float | None = None


@dataclass(slots=True)
class _Seen:
    expires: float
    reply: bytes | None


class CoapPeer:
    """The message layer towards one peer (one DTLS session)."""

    def __init__(
        self,
        *,
        max_message_size: int = 1024,
        params: TransmissionParameters | None = None,
        rng: random.Random | None = None,
        max_dedup: int = 256,
        max_queue: int = 16,
    ) -> None:
        self.max_message_size = max_message_size
        self.params = params or TransmissionParameters()
        self._rng = rng or random.SystemRandom()
        self.max_dedup = max_dedup
        self.max_queue = max_queue
        self._mid = self._rng.randrange(0x10000)
        self._active: _Outgoing | None = None
        self._queue: deque[_Outgoing] = deque()
        self._awaiting: dict[bytes, _Outgoing] = {}
        self._seen: OrderedDict[int, _Seen] = OrderedDict()
        self._out: list[bytes] = []

    # peer input ----------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[CoapEvent]:
        """One CoAP message from the peer."""
        self._expire_seen(now)
        try:
            if data and data[0] & 0x0F > 8:
                # token lengths 9-15 are a format error (§3); aiocoap would accept
                # some of them as RFC 8974 extended tokens, which we do not speak
                raise ValueError("token length")
            msg = Message.decode(data)
        except Exception:  # aiocoap raises UnparsableMessage, ValueError, ...
            if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == Type.CON:
                self._reset(int.from_bytes(data[2:4], "big"))
            return [Dropped("unparsable")]
        if msg.mtype in (Type.CON, Type.NON):
            return self._receive_message(msg, now)
        return self._receive_ack_or_reset(msg, now)

    def _receive_message(self, msg: Message, now: float) -> list[CoapEvent]:
        con = msg.mtype is Type.CON
        if msg.code == Code.EMPTY:
            if con:
                self._reset(msg.mid)  # CoAP ping (§4.3)
                return []
            return [Dropped("empty_non")]
        seen = self._seen.get(msg.mid)
        if seen is not None:
            if con and seen.reply is not None:
                self._out.append(seen.reply)
            return [Dropped("duplicate")]
        if msg.code.is_request():
            self._remember(msg.mid, con, now, None)
            return [IncomingRequest(msg)]
        if msg.code.is_response():
            request = self._awaiting.get(msg.token)
            if request is None:
                if con:
                    self._reset(msg.mid)
                return [Dropped("unexpected_response")]
            reply = None
            if con:  # a separate response: acknowledge it (§5.2.2)
                reply = _empty(Type.ACK, msg.mid)
                self._out.append(reply)
            self._remember(msg.mid, con, now, reply)
            self._finish(request, now)
            return [ResponseReceived(request.token, msg)]
        if con:
            self._reset(msg.mid)
        return [Dropped("bad_code")]

    def _receive_ack_or_reset(self, msg: Message, now: float) -> list[CoapEvent]:
        request = self._active
        if request is None or request.mid != msg.mid:
            return [Dropped("stray_ack")]  # late or unknown: ignore (§4.2)
        if msg.mtype is Type.RST:
            self._finish(request, now)
            return [RequestFailed(request.token, "reset")]
        if msg.code == Code.EMPTY:
            # acknowledged; the response comes separately, matched by token
            request.next_at = None
            self._active = None
            self._send_next(now)
            return []
        if msg.code.is_response() and msg.token == request.token:
            self._finish(request, now)
            return [ResponseReceived(request.token, msg)]
        return [Dropped("bad_ack")]

    # our side -------------------------------------------------------------------------
    def respond(self, request: Message, response: Message, now: float) -> None:
        """Answer ``request``: piggybacked in the ACK for CON, NON for NON."""
        response.token = request.token
        if request.mtype is Type.CON:
            response.mtype = Type.ACK
            response.mid = request.mid
        else:
            response.mtype = Type.NON
            response.mid = self._next_mid()
        data = response.encode()
        if len(data) > self.max_message_size:
            raise MessageTooLarge(f"response of {len(data)} bytes exceeds {self.max_message_size}")
        self._out.append(data)
        seen = self._seen.get(request.mid)
        if seen is not None and request.mtype is Type.CON:
            seen.reply = data

    def request(self, message: Message, now: float) -> bytes:
        """Queue a confirmable request; returns its token (see the events)."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull("too many requests queued for this peer")
        token = self._new_token()
        message.token = token
        message.mtype = Type.CON
        message.mid = 0
        size = len(message.encode())
        if size > self.max_message_size:
            raise MessageTooLarge(f"request of {size} bytes exceeds {self.max_message_size}")
        outgoing = _Outgoing(token, message)
        self._awaiting[token] = outgoing
        self._queue.append(outgoing)
        self._send_next(now)
        return token

    def cancel(self, token: bytes, now: float) -> None:
        """Forget request ``token`` (its caller gave up)."""
        outgoing = self._awaiting.pop(token, None)
        if outgoing is None:
            return
        if outgoing in self._queue:
            self._queue.remove(outgoing)
        if self._active is outgoing:
            self._active = None
            self._send_next(now)

    def pending(self) -> int:
        """Requests sent or queued that have no response yet."""
        return len(self._awaiting)

    # timers ---------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        return self._active.next_at if self._active is not None else None

    def handle_timer(self, now: float) -> list[CoapEvent]:
        request = self._active
        if request is None or request.next_at is None or now < request.next_at:
            return []
        if request.retransmits >= self.params.max_retransmit:
            self._finish(request, now)
            return [RequestFailed(request.token, "timeout")]
        request.retransmits += 1
        request.timeout *= 2
        request.next_at = now + request.timeout
        self._out.append(request.data)
        return []

    def take_outgoing(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # internals ------------------------------------------------------------------------
    def _send_next(self, now: float) -> None:
        if self._active is not None or not self._queue:
            return
        request = self._queue.popleft()
        request.mid = self._next_mid()
        request.message.mid = request.mid
        request.data = request.message.encode()
        p = self.params
        request.timeout = self._rng.uniform(p.ack_timeout, p.ack_timeout * p.ack_random_factor)
        request.next_at = now + request.timeout
        self._active = request
        self._out.append(request.data)

    def _finish(self, request: _Outgoing, now: float) -> None:
        self._awaiting.pop(request.token, None)
        if self._active is request:
            self._active = None
            self._send_next(now)

    def _remember(self, mid: int, con: bool, now: float, reply: bytes | None) -> None:
        lifetime = self.params.exchange_lifetime if con else self.params.non_lifetime
        self._seen[mid] = _Seen(now + lifetime, reply)
        while len(self._seen) > self.max_dedup:
            self._seen.popitem(last=False)

    def _expire_seen(self, now: float) -> None:
        # insertion order is close enough to expiry order (two lifetimes only)
        while self._seen:
            mid, seen = next(iter(self._seen.items()))
            if seen.expires > now:
                break
            del self._seen[mid]

    def _reset(self, mid: int) -> None:
        self._out.append(_empty(Type.RST, mid))

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _new_token(self) -> bytes:
        while True:
            token = self._rng.getrandbits(32).to_bytes(4, "big")
            if token not in self._awaiting:
                return token


def _empty(mtype: Type, mid: int) -> bytes:
    """An empty ACK or RST (4 bytes: version 1, no token, code 0.00)."""
    return bytes([0x40 | (int(mtype) << 4), 0]) + mid.to_bytes(2, "big")
