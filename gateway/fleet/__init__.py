"""Simulated device fleets: ``mtls-gateway fleet pki|register|run``.

A load test is three steps, each usable alone:

* :mod:`gateway.fleet.pki` writes a fleet directory: a root CA (optionally an
  intermediate), N device keys and chain files made in a process pool, a
  loopback server certificate and ``manifest.json``. A ``--bad-ratio`` share of
  devices is deliberately signed by an *untrusted* CA; the manifest says which.
* :mod:`gateway.fleet.register` puts the fleet into a gateway's store: the root
  as a trusted certificate (auto-registration on unless told), pending bulk
  registrations, or pre-registered device users. The :class:`~gateway.fleet.register.Registrar`
  protocol is the seam for a management-API client.
* :mod:`gateway.fleet.run` starts worker processes (one event loop each, uvloop
  when installed) that open the devices' connections at the requested arrival
  rate, keep them alive publishing, optionally force a reconnect storm, and
  merge what they measured into one :class:`~gateway.fleet.report.FleetReport`.

Protocols are pluggable: a driver (:mod:`gateway.fleet.driver`) opens one
device session and sends messages on it; :mod:`gateway.fleet.mqtt_client`
provides ``mqtt`` and ``mqtt-service``. Everything stays bounded: a run stops
after its duration plus a hard timeout, whatever the peer does.
"""
