"""Wire-level PUBLISH forwarding: the QoS 0/1/2 telemetry hot path.

Most of what crosses the gateway is PUBLISH packets whose only change is the
topic: the tenant prefix is added on the way to the broker and removed on the
way back. :class:`PublishRewriter` does that on the wire bytes of a run of
complete PUBLISH packets, without building a packet object per message.

Correctness rests on one observation: everything the decoder validates in a
PUBLISH, and everything the rewrite depends on, is in the packet's *head* (the
first byte with the flags, the Remaining Length, the topic length and the
topic) except the packet identifier, the MQTT 5 properties and the payload.
So the first packet with a given head is validated by a real
:class:`~protocols.mqtt.codec.MqttDecoder` configured like the session's own,
and the head's rewrite is cached; later packets with the same head only need
their packet identifier checked (non-zero) and, for MQTT 5, an empty property
list. Anything else (another packet type, properties, a partial packet, a
topic the session's policy does not pass) stops the run and is left to the
full decoder, which reports errors exactly as it always does.
"""

from __future__ import annotations

from collections.abc import Callable

from protocols.mqtt.codec import (
    EMPTY_PROPERTIES,
    MAX_REMAINING_LENGTH,
    MqttDecoder,
    MqttProtocolError,
    RawPublish,
    encode_varint,
)

TopicPolicy = Callable[[RawPublish], bytes | None]
"""The session's rule for one validated PUBLISH without properties: the topic
to send instead (UTF-8 wire bytes), or ``None`` when the packet must take the
full path (token topics, topics outside the namespace, refused topics)."""

CACHE_LIMIT = 16
"""Distinct heads remembered per direction of a session: devices publish to a
handful of topics; one cycling through many just misses the cache (and takes
the full decoder's cost). With :data:`HEAD_LIMIT` this bounds what a session
can make the cache hold to a few KB, whatever its peer sends."""

HEAD_LIMIT = 256
"""Longer heads (long topics) take the full path."""

BYPASS_BATCHES = 64
"""Reads left to the full decoder after the cache overflowed: a peer cycling
through more topics than the cache holds would pay a miss (a validation by a
fresh decoder, about twice the full decoder's cost) on most packets."""

_PUBLISH = 3


class PublishRewriter:
    """Rewrites the topic of runs of complete PUBLISH packets on the wire."""

    __slots__ = ("_bypass", "_cache", "_max_packet_size", "_policy", "_server", "_version")

    def __init__(
        self, policy: TopicPolicy, *, version: int, max_packet_size: int, server: bool
    ) -> None:
        self._policy = policy
        self._version = version
        self._max_packet_size = max_packet_size
        self._server = server
        self._cache: dict[bytes, bytes | None] = {}
        self._bypass = 0  # reads still left to the full decoder

    def run(self, buf: bytes, out: list[bytes]) -> tuple[int, int]:
        """Rewrite the PUBLISH packets at the start of ``buf`` into ``out``
        (pieces to join); return (packets rewritten, bytes consumed). Stops at
        the first packet the fast path does not take; never consumes a part of
        a packet."""
        if self._bypass:
            self._bypass -= 1
            return 0, 0
        n = len(buf)
        pos = 0
        count = 0
        v5 = self._version == 5
        append = out.append
        # The head of the previous packet: telemetry repeats it (same topic,
        # same size), and an equal head means an equal packet length.
        head = b""
        new = b""
        head_len = size = checked = 0
        while pos < n:
            if size and buf.startswith(head, pos):
                end = pos + size
                if end > n:
                    break
            else:
                parsed = self._parse(buf, pos, n)
                if parsed is None:
                    break
                head, new_or_none, end = parsed
                if new_or_none is None:
                    break
                new = new_or_none
                head_len = len(head)
                size = end - pos
                checked = (2 if buf[pos] & 0x06 else 0) + (1 if v5 else 0)
            tail = pos + head_len
            if checked:
                if checked & 2:  # QoS 1 or 2: the packet identifier must not be 0
                    if not (buf[tail] | buf[tail + 1]):
                        break
                    if v5 and buf[tail + 2]:  # properties present: full path
                        break
                elif buf[tail]:  # MQTT 5, QoS 0: properties present
                    break
            append(new)
            append(buf[tail:end])
            count += 1
            pos = end
        return count, pos

    def _parse(self, buf: bytes, pos: int, n: int) -> tuple[bytes, bytes | None, int] | None:
        """(head, its rewrite or ``None``, packet end) of the complete PUBLISH
        at ``pos`` with room for its packet id and property length; ``None``
        if there is none."""
        first = buf[pos]
        if first >> 4 != _PUBLISH:
            return None
        # Remaining Length (the minimal-encoding and size rules are checked by
        # the decoder when a head is first seen)
        i = pos + 1
        length = shift = 0
        while True:
            if i >= n or shift > 21:
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        end = i + length
        if end > n or i + 2 > end:
            return None
        head_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        fixed = (2 if first & 0x06 else 0) + (1 if self._version == 5 else 0)
        if head_end + fixed > end or head_end - pos > HEAD_LIMIT:
            return None
        head = buf[pos:head_end]
        cache = self._cache
        if head in cache:
            return head, cache[head], end
        return head, self._learn(head, buf[pos:end]), end

    def _learn(self, head: bytes, packet: bytes) -> bytes | None:
        """Validate the first packet seen with ``head`` and cache its rewrite."""
        decoder = MqttDecoder(self._max_packet_size, self._version, server=self._server)
        try:
            (p,) = decoder.feed_raw(packet)
        except (MqttProtocolError, ValueError):
            return None  # the full decoder reports it
        if not isinstance(p, RawPublish) or p.properties != EMPTY_PROPERTIES:
            return None  # not cached: the properties are not part of the head
        topic = self._policy(p)
        new = None if topic is None else _head(p.first, 2 + len(topic) + len(p.tail), topic)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
            self._bypass = BYPASS_BATCHES
        self._cache[head] = new
        return new


def _head(first: int, remaining: int, topic: bytes) -> bytes | None:
    """Fixed header, topic length and topic of a PUBLISH; ``None`` if too large."""
    n = len(topic)
    if n > 0xFFFF or remaining > MAX_REMAINING_LENGTH:
        return None
    return bytes((first,)) + encode_varint(remaining) + n.to_bytes(2, "big") + topic
