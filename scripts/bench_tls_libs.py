#!/usr/bin/env python3
"""Server-side CPU of one full TLS 1.3 mTLS handshake, in-process over memory
BIOs (no sockets, no event loop): the stdlib ``ssl`` module (the system's
OpenSSL, what the TCP listeners use) against pyOpenSSL (the OpenSSL bundled with
``cryptography``, what the DTLS listener uses).

The device presents a 3-certificate ECDSA P-256 chain (device, intermediate,
root); the server verifies it against the root, session tickets off (the
gateway's default). Only the server's calls are timed (``time.process_time``).
Prints per-round medians and the ratio; asserts nothing (docs/performance.md,
"Handshakes: what is in the way").

    .venv/bin/python scripts/bench_tls_libs.py [--handshakes 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ssl
import sys
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.pki import make_ca, make_device, make_server, pem_chain, write_private


def make_pki(d: Path, devices: int) -> list[ssl.SSLContext]:
    """Server files in ``d`` and one client context per device."""
    root = make_ca("Bench Root")
    inter = make_ca("Bench Intermediate", issuer=root)
    server = make_server(make_ca("Bench Server CA"))
    (d / "root.pem").write_bytes(pem_chain(root))
    (d / "server.pem").write_bytes(pem_chain(server))
    write_private(d / "server.key", server.key_pem())
    clients = []
    for i in range(devices):
        dev = make_device(f"dev-{i}", inter)
        (d / "dev.pem").write_bytes(pem_chain(dev, inter, root))
        write_private(d / "dev.key", dev.key_pem())
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname = False
        c.verify_mode = ssl.CERT_NONE
        c.load_cert_chain(d / "dev.pem", d / "dev.key")
        clients.append(c)
    return clients


def stdlib_server(d: Path) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    c.load_cert_chain(d / "server.pem", d / "server.key")
    c.verify_mode = ssl.CERT_REQUIRED
    c.load_verify_locations(d / "root.pem")
    c.num_tickets = 0
    c.options |= ssl.OP_NO_TICKET
    return c


def pyopenssl_server(d: Path) -> SSL.Context:
    c = SSL.Context(SSL.TLS_SERVER_METHOD)
    c.use_certificate_chain_file(str(d / "server.pem"))
    c.use_privatekey_file(str(d / "server.key"))
    c.load_verify_locations(str(d / "root.pem"))
    c.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    c.set_options(SSL.OP_NO_TICKET)
    return c


def run_stdlib(server: ssl.SSLContext, clients: list[ssl.SSLContext], n: int) -> float:
    cpu = 0.0
    for i in range(n):
        ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
        client = clients[i % len(clients)].wrap_bio(ci, co)
        t = time.process_time()
        srv = server.wrap_bio(si, so, server_side=True)
        cpu += time.process_time() - t
        client_done = server_done = False
        while not (client_done and server_done):
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            si.write(co.read())
            if not server_done:
                t = time.process_time()
                try:
                    srv.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
                cpu += time.process_time() - t
            ci.write(so.read())
    return cpu / n


def run_pyopenssl(server: SSL.Context, clients: list[ssl.SSLContext], n: int) -> float:
    cpu = 0.0
    for i in range(n):
        ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = clients[i % len(clients)].wrap_bio(ci, co)
        t = time.process_time()
        srv = SSL.Connection(server, None)
        srv.set_accept_state()
        cpu += time.process_time() - t
        client_done = server_done = False
        while not (client_done and server_done):
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            data = co.read()
            t = time.process_time()
            if data:
                srv.bio_write(data)
            if not server_done:
                try:
                    srv.do_handshake()
                    server_done = True
                except SSL.WantReadError:
                    pass
            try:
                out = srv.bio_read(65536)
            except SSL.WantReadError:
                out = b""
            cpu += time.process_time() - t
            ci.write(out)
        if srv.get_peer_certificate() is None:
            raise RuntimeError("pyOpenSSL server saw no client certificate")
    return cpu / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handshakes", type=int, default=500, help="per library per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        clients = make_pki(d, 50)
        std, pyo = stdlib_server(d), pyopenssl_server(d)
        run_stdlib(std, clients, 50)  # warm up
        run_pyopenssl(pyo, clients, 50)
        std_name = ssl.OPENSSL_VERSION
        pyo_name = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        for r in range(args.rounds):  # alternating, so drift cancels
            a = run_stdlib(std, clients, args.handshakes)
            b = run_pyopenssl(pyo, clients, args.handshakes)
            print(
                f"round {r + 1}: stdlib ssl ({std_name}) {a * 1e6:6.0f} us,"
                f" pyOpenSSL ({pyo_name}) {b * 1e6:6.0f} us per handshake,"
                f" stdlib/pyOpenSSL {a / b:.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
