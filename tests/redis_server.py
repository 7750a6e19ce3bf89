"""A real ``redis-server`` for tests: loopback, ephemeral port, bounded waits.

Not installed is a failure, not a skip: ``make test`` installs it (``system-deps``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.helpers import free_port

REDIS_SERVER = Path("/usr/bin/redis-server")
START_TIMEOUT = 10.0


class RedisServer:
    """One redis-server process writing into ``workdir``.

    ``persistent=True`` turns on the append-only file with an fsync per write,
    so data survives even :meth:`kill` (SIGKILL), as in a production setup.
    """

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.workdir = workdir
        self.persistent = persistent
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, *, same_port: bool = False) -> None:
        """Start and wait until it answers PING; ``same_port`` for a restart."""
        if not os.access(REDIS_SERVER, os.X_OK):
            pytest.fail(
                f"{REDIS_SERVER} not found: the Redis store tests need a real redis-server"
                " (run `make system-deps` or `apt-get install redis-server`)",
                pytrace=False,
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if same_port else 3  # a fresh port may be taken between probe and bind
        for _ in range(attempts):
            if not same_port:
                self.port = free_port()
            if self._launch():
                return
        raise RuntimeError(
            f"redis-server did not start on 127.0.0.1:{self.port}; log:\n{self._log_tail()}"
        )

    def _launch(self) -> bool:
        aof = ["--appendonly", "yes", "--appendfsync", "always"]
        args = [
            str(REDIS_SERVER),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            "--save",
            "",
            *(aof if self.persistent else ["--appendonly", "no"]),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if self._answers_ping():
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # "-LOADING" while reading the AOF
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash (no shutdown save)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
