"""The daemon as users run it: ``python -m gateway run`` in a subprocess on
ephemeral ports, its output collected line by line (shared by the e2e tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import ProcResult, env_without_proxy, run

EPHEMERAL_LISTENERS = """
[listeners.mqtt]
host = "127.0.0.1"
port = 0
[listeners.mqtt_service]
host = "127.0.0.1"
port = 0
[listeners.https]
host = "127.0.0.1"
port = 0
[listeners.lwm2m]
host = "127.0.0.1"
port = 0
[listeners.admin]
host = "127.0.0.1"
port = 0
"""
"""Every listener on 127.0.0.1 with a free port (the ready line reports them)."""


class Daemon:
    """``python -m gateway run`` with its combined output collected line by line.

    ``config`` is written to ``tmp/<name>``; ``data`` defaults to ``tmp/data``;
    ``args`` are extra ``run`` options, ``env`` extra environment variables.
    """

    def __init__(
        self,
        tmp: Path,
        config: str,
        *,
        name: str = "gateway.toml",
        data: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.data = data or tmp / "data"
        self.args = tuple(args)
        self.env = dict(env or {})
        self.config_path = tmp / name
        self.config_path.write_text(config)
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def demo(self) -> Path:
        return self.data / "demo"

    @property
    def cafile(self) -> str:
        return str(self.demo / "server-ca.pem")

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def start(self, timeout: float = 30) -> None:
        env = env_without_proxy()
        env.update(self.env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.data),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())
        line = await self.wait_for_log(r"mtls-gateway ready \(", timeout)
        m = re.search(r"ready \((.*?)\)", line)
        assert m is not None
        for part in m.group(1).split(", "):
            name, port = part.split("=")
            self.ports[name] = int(port)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for_log(self, pattern: str, timeout: float = 10, start: int = 0) -> str:
        """The first log line from index ``start`` matching ``pattern`` (bounded wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = start
        while True:
            for line in self.lines[seen:]:
                if re.search(pattern, line):
                    return line
            seen = len(self.lines)
            exited = self._reader is not None and self._reader.done()
            remaining = deadline - loop.time()
            if exited or remaining <= 0:
                raise AssertionError(f"no log line matching {pattern!r}:\n{self.log}")
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), remaining)

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    def count(self, pattern: str) -> int:
        """How many log lines so far match ``pattern``."""
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    async def wait_count(self, pattern: str, expected: int, timeout: float = 10.0) -> int:
        """Wait (bounded) until ``expected`` lines match; returns the final count."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.count(pattern) < expected and loop.time() < end:
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), max(0.0, end - loop.time()))
        return self.count(pattern)

    async def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait for the exit code (kill after ``timeout``)."""
        if self.proc is not None and self.proc.returncode is None:
            self.send(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            await self.close()
            raise

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def cli(self, *args: str, timeout: float = 30) -> ProcResult:
        return await run([sys.executable, "-m", "gateway", *args], timeout=timeout)

    async def http(self, path: str) -> tuple[int, str]:
        """GET on the admin listener with curl: (status, body)."""
        r = await run(
            [
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                self.admin_url + path,
            ]
        )
        assert r.returncode == 0, r.stderr
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body

    async def status(self) -> dict[str, object]:
        code, body = await self.http("/status")
        assert code == 200, body
        result: dict[str, object] = json.loads(body)
        return result

    async def live_sessions(self) -> int:
        sessions = (await self.status())["sessions"]
        assert isinstance(sessions, dict)
        return int(sessions["total"])

    def device(self, n: int) -> tuple[Path, Path]:
        return self.demo / f"device-000{n}.pem", self.demo / f"device-000{n}.key"
