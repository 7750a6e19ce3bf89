"""The trust core: pure functions of data, no sockets, no event loop.

- :mod:`trust.certs` parses certificates with clean errors and fingerprints them;
- :mod:`trust.verify` validates a presented chain against anchors (RFC 5280 on
  top of ``cryptography.x509.verification``);
- :mod:`trust.snapshot` is the immutable view of the store a decision reads;
- :mod:`trust.policy` decides a connection: tenant, revocation, device user;
- :mod:`trust.crl` indexes and checks CRLs; :mod:`trust.crl_cache` schedules online
  CRL fetches and answers the online revocation check;
- :mod:`trust.anchors`, :mod:`trust.revocation`, :mod:`trust.pop`, :mod:`trust.bulk`
  validate what operators upload;
- :mod:`trust.ca` (tenant CA), :mod:`trust.est` (EST enrollment, RFC 7030) and
  :mod:`trust.tokens` (device access tokens) are the enrollment and token cores.

Every decision takes ``now`` as an argument, so tests cover expiry without
sleeping.
"""
