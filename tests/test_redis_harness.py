"""The throwaway redis-server the fleet tests and the fleet benchmark start."""

from __future__ import annotations

import socket

import pytest

from asyncquota.testing.redis import RedisServer, RedisServerMissing


def _command(port: int, *parts: bytes) -> bytes:
    wire = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(wire)
        return sock.recv(256)


def test_the_fixture_gives_an_empty_server(redis_url: str, redis_server: RedisServer) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert _command(redis_server.port, b"SET", b"k", b"1") == b"+OK\r\n"
    assert _command(redis_server.port, b"DBSIZE") == b":1\r\n"


def test_killed_and_restored_on_the_same_port_and_empty() -> None:
    with RedisServer() as server:
        port = server.port
        _command(port, b"SET", b"k", b"1")
        server.stop()
        assert not server.running
        with pytest.raises(OSError):
            _command(port, b"PING")
        server.start()
        assert server.port == port
        assert _command(port, b"DBSIZE") == b":0\r\n"
    assert not server.running


def test_a_missing_executable_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQ_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisServerMissing, match="apt-get install redis-server"):
        RedisServer()
