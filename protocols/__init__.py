"""Protocol front-ends of the gateway.

Every front-end is split in two layers:

* a *sans-IO core* (pure state machines and codecs, in the style of h11 and
  aioquic): it is fed bytes and returns events/packets, never touches sockets,
  never awaits and never reads the clock, so it is cheap to unit-test and fuzz;
* a *thin asyncio glue* layer that owns the transport, timers and back-pressure
  and only shuttles bytes between the network and the core.
"""
