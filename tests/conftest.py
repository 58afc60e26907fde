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
