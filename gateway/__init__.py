"""The daemon: configuration, the store, TLS/DTLS terminators, the session
registry, the management API, metrics and the CLI.

A connection flows listener → ``trust.policy.decide`` (pure, on an in-memory
snapshot of the store) → front-end in ``protocols/``. Everything here is I/O
glue around that decision.
"""
