"""LWM2M front-end: the registration interface over CoAP over DTLS (UDP 5684).

The layers, each testable alone:

* :mod:`gateway.dtls` -- the DTLS 1.2 terminator (cookie exchange, flights and
  MTU, timers, caps, the trust decision inside the handshake); it emits
  ``Established(peer, identity)``, ``DataReceived`` and ``Closed`` events.
* :mod:`protocols.lwm2m.coap` -- sans-IO CoAP message layer per DTLS session
  (RFC 7252 §4: ACKs, deduplication by message id, retransmission of our own
  confirmable requests); aiocoap is only the codec.
* :mod:`protocols.lwm2m.links` -- the object list (RFC 6690 link format).
* :mod:`protocols.lwm2m.registration` -- sans-IO Register / Update /
  De-register and the registry of endpoints with lifetime expiry (``now``
  passed in). The ``ep`` must equal the certificate CN; the tenant is the one
  the device user is registered in (the trust decision), never a parameter.
* :mod:`protocols.lwm2m.server` -- the asyncio glue and the device-management
  API (``read``/``write``/``execute``/``endpoints``) for the HTTP layer.
* :mod:`protocols.lwm2m.client` -- a small LWM2M client over a pyOpenSSL DTLS
  client, for tests and device simulators.
"""
