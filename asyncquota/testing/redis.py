"""A throwaway ``redis-server`` on loopback, for tests and the fleet benchmark.

``RedisServer`` starts the system's ``redis-server`` on a free loopback port with nothing
saved to disk, waits until it answers ``PING``, and can be stopped and started again on the
same port (the fleet benchmark kills Redis mid-night and restores it). It needs no Python
client: readiness is checked with a raw RESP ``PING`` over a socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

__all__ = ["INSTALL_HINT", "RedisServer", "RedisServerMissing", "find_redis_server"]

INSTALL_HINT = (
    "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu), "
    "`brew install redis` (macOS), or set AQ_REDIS_SERVER to its path"
)

START_TIMEOUT = 10.0
"""Seconds a server may take to answer PING before it is given up on."""


class RedisServerMissing(RuntimeError):
    """No ``redis-server`` executable was found."""


def find_redis_server() -> str | None:
    """Path of ``redis-server``: ``AQ_REDIS_SERVER`` if set, else the one on ``PATH``."""
    given = os.environ.get("AQ_REDIS_SERVER")
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1``, nothing persisted.

    Use as a context manager, or ``start()``/``stop()``; ``stop()`` then ``start()`` brings
    it back on the same port, empty (as a restarted cache would be).
    """

    def __init__(self, *, port: int | None = None, executable: str | None = None) -> None:
        found = executable or find_redis_server()
        if found is None:
            raise RedisServerMissing(INSTALL_HINT)
        self._executable = found
        self._port = port if port is not None else _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="aq-redis-")
        self._process = subprocess.Popen(
            [self._executable, *self._arguments()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(self._port):
            if self._process.poll() is not None:
                stderr = self._process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                self._process = None
                raise RuntimeError(f"redis-server exited at start: {err.strip()[:500]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT} s")
            time.sleep(0.01)

    def _arguments(self) -> list[str]:
        assert self._dir is not None
        options = {
            "port": str(self._port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": self._dir.name,
            "protected-mode": "yes",
            "loglevel": "warning",
        }
        return [part for name, value in options.items() for part in (f"--{name}", value)]

    def stop(self) -> None:
        """Kill the server at once (SIGKILL: an outage, not a shutdown)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait(timeout=5)
        if process.stderr is not None:
            process.stderr.close()

    def close(self) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer 127.0.0.1:{self._port} {state}>"
