"""MQTT front-end.

* :mod:`protocols.mqtt.codec` -- sans-IO MQTT 3.1.1 / 5.0 codec: immutable
  packet dataclasses, an incremental :class:`~protocols.mqtt.codec.MqttDecoder`
  and :func:`~protocols.mqtt.codec.encode`; every malformation surfaces as
  :class:`~protocols.mqtt.codec.MqttProtocolError` carrying an MQTT 5 reason code.
* :mod:`protocols.mqtt.topics` -- topic / filter validation and matching, and
  the per-tenant mount point that namespaces topics, shared-subscription groups
  and client identifiers on the single backend broker.
"""
