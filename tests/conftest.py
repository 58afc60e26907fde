"""Test-suite plumbing: virtual time for every async test, and two safety nets around it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import pytest


def pytest_collection_modifyitems(session: pytest.Session) -> None:
    # A deadlocked test (every task waiting, no timer left) would otherwise hang the run forever
    # on virtual time. With these defaults it fails after ~1 s of real time; a module or test may
    # override them with its own looptime marker (closer markers win).
    session.add_marker(pytest.mark.looptime(idle_step=0.05, idle_timeout=1.0))


@pytest.fixture(autouse=True)
def close_the_loop_looptime_opens_for_a_sync_test(request: pytest.FixtureRequest):
    """Close the event loop looptime's hook creates (and drops) around each sync test.

    With pytest-asyncio's autouse ``event_loop_policy``, looptime calls
    ``policy.get_event_loop()`` for sync tests too, which creates a loop nobody closes; the
    next async test replaces it and its ``__del__`` warns ("unclosed event loop"), which the
    suite's ``filterwarnings = error`` turns into a failure of an unrelated test.
    """
    yield
    if not inspect.iscoroutinefunction(request.function):
        policy = asyncio.get_event_loop_policy()
        with contextlib.suppress(RuntimeError):
            policy.get_event_loop().close()
        policy.set_event_loop(None)


@pytest.fixture
def refusing_port():
    """A loopback port that refuses every connection for the whole test.

    The socket stays bound (never listening) until the test ends. A port bound and closed at
    once is free again: the kernel may then hand it to a client as its own source port, and a
    connect to it reaches itself (TCP's simultaneous open) and "succeeds".
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server():
    """A ``redis-server`` on a free loopback port for the whole run (nothing persisted).

    Tests that need it fail when ``AQ_REQUIRE_REDIS=1`` (as ``.ci/run`` sets) and the server
    is missing; elsewhere they are skipped with how to install it.
    """
    import os

    from asyncquota.testing.redis import INSTALL_HINT, RedisServer, find_redis_server

    if find_redis_server() is None:
        if os.environ.get("AQ_REQUIRE_REDIS") == "1":
            pytest.fail(f"AQ_REQUIRE_REDIS=1 but {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied before the test (FLUSHALL over a raw socket)."""
    import socket

    if not redis_server.running:
        redis_server.start()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=2) as sock:
        sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
        assert sock.recv(64).startswith(b"+OK")
    return redis_server.url
