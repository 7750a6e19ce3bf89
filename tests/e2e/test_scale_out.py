"""Scale-out shape: two gateway processes sharing one redis-server and one
upstream mosquitto (ARCHITECTURE: "Scaling past one machine")."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.daemon import EPHEMERAL_LISTENERS, Daemon
from tests.helpers import Mosquitto, Pki, Subscriber, mqtt_pub, run
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow


def instance(tmp: Path, name: str, store: str, upstream: int, pki: Pki) -> Daemon:
    """One gateway instance of the shared deployment (its own data dir and ports)."""
    config = (
        f'store = "{store}"\n'
        + EPHEMERAL_LISTENERS
        + f"""
[tls]
server_cert = "{pki.dir / "server.pem"}"
server_key = "{pki.dir / "server.key"}"
[mqtt]
backend = "upstream"
upstream_port = {upstream}
[trust]
store_outage_grace = 60.0
"""
    )
    return Daemon(
        tmp,
        config,
        name=f"{name}.toml",
        data=tmp / name,
        args=["--no-demo"],
        env={"MTLS_GATEWAY_KEK_FILE": str(tmp / "shared-kek")},  # one KEK for all instances
    )


async def cli(*args: str) -> str:
    r = await run([sys.executable, "-m", "gateway", *args], timeout=30)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r.stdout


async def test_two_instances_share_trust_and_messages(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    redis = RedisServer(tmp_path / "redis", persistent=True)
    redis.start()
    broker = Mosquitto(tmp_path)
    broker.start()
    store = redis.url
    a = b = None
    try:
        await cli("tenants", "create", "t1", "--store", store)
        await cli("anchors", "add", str(pki.dir / "root.pem"), "--tenant", "t1", "--store", store)
        await cli("crl", "settings", "--tenant", "t1", "--offline", "on", "--store", store)
        a = instance(tmp_path, "a", store, broker.port, pki)
        await a.start()
        b = instance(tmp_path, "b", store, broker.port, pki)
        await b.start()
        ca = str(pki.dir / "server-ca.pem")
        sub_cert, sub_key, sub_dev = pki.device("on-b")
        pub_cert, pub_key, _ = pki.device("on-a")

        sub = await Subscriber.start(b.ports["mqtt"], ca, sub_cert, sub_key, "on-b", "fleet/#")
        try:
            await asyncio.sleep(1.0)
            r = await mqtt_pub(a.ports["mqtt"], ca, pub_cert, pub_key, "on-a", "fleet/x", "via-a")
            assert r.returncode == 0, r.stderr
            assert await sub.next_line() == "fleet/x via-a"

            # both instances registered their device exactly once in the shared store
            listed = await cli("devices", "list", "--tenant", "t1", "--store", store)
            assert "on-a" in listed and "on-b" in listed

            # revoke B's device through instance A's management API
            (tmp_path / "pw").write_text("s3cret-pass")
            await cli(
                "admin-users",
                "add",
                "ops",
                "--tenant",
                "t1",
                "--password-file",
                str(tmp_path / "pw"),
                "--store",
                store,
            )
            body = json.dumps({"crls": [{"serialNumberInHex": f"{sub_dev.cert.serial_number:x}"}]})
            loop = asyncio.get_running_loop()
            start = loop.time()
            res = await run(
                [
                    "curl",
                    "-sS",
                    "--fail-with-body",
                    "--cacert",
                    ca,
                    "-u",
                    "t1/ops:s3cret-pass",
                    "-X",
                    "PUT",
                    "-H",
                    "Content-Type: application/json",
                    "--data",
                    body,
                    f"https://localhost:{a.ports['https']}/tenant/trusted-certificates/settings/crl",
                ],
                timeout=30,
            )
            assert res.returncode == 0, res.stdout + res.stderr
            await sub.exit(timeout=5)
            assert loop.time() - start < 3.0
        finally:
            await sub.stop()
        r = await mqtt_pub(b.ports["mqtt"], ca, sub_cert, sub_key, "on-b", "fleet/x", "again")
        assert r.returncode != 0

        # loss of Redis: known devices keep connecting from the last snapshot,
        # changes are refused, and everything resumes when Redis returns
        redis.kill()
        r = await mqtt_pub(a.ports["mqtt"], ca, pub_cert, pub_key, "on-a", "fleet/y", "no-redis")
        assert r.returncode == 0, r.stderr
        refused = await run(
            [
                sys.executable,
                "-m",
                "gateway",
                "crl",
                "add",
                "abcdef",
                "--tenant",
                "t1",
                "--store",
                store,
            ],
            timeout=30,
        )
        assert refused.returncode != 0
        assert "Traceback" not in refused.stderr
        redis.start(same_port=True)
        late_cert, late_key, _ = pki.device("late")

        async def accepted() -> bool:
            res = await mqtt_pub(
                b.ports["mqtt"], ca, late_cert, late_key, "late", "fleet/z", "back"
            )
            return res.returncode == 0

        deadline = loop.time() + 10
        while not await accepted():
            assert loop.time() < deadline, "gateway did not recover after Redis came back"
            await asyncio.sleep(0.5)
        listed = await cli("devices", "list", "--tenant", "t1", "--store", store)
        assert "on-a" in listed and "late" in listed
    finally:
        codes = []
        for d in (a, b):
            if d is not None:
                codes.append(await d.stop())
                await d.close()
        broker.stop()
        redis.kill()
    assert codes == [0, 0]
