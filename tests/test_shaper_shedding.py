"""Shedding a class on purpose: ``Shaper.shed_below`` (an operator's or an alert's action)."""

import asyncio

import pytest

from asyncquota import (
    Fixed,
    MockTransport,
    Priority,
    RejectedError,
    Request,
    RequestOptions,
    Response,
)
from asyncquota.shaper import Shaper

PATIENT = {"critical": 86_400, "interactive": 86_400, "batch": 86_400}
"""Classes that wait their turn however long (the test is not about waiting in line)."""


def now() -> float:
    return asyncio.get_running_loop().time()


def slow_upstream(seconds: float) -> MockTransport:
    async def answer(request: Request) -> Response:
        await asyncio.sleep(seconds)
        return Response(200, {}, b"{}")

    return MockTransport(answer)


async def test_batch_is_refused_at_once_with_the_time_left_and_interactive_still_goes():
    transport = slow_upstream(1.0)
    async with Shaper("http://upstream.test", transport=transport, hooks=()) as shaper:
        await asyncio.sleep(5)
        shaper.shed_below("batch", for_seconds=60)
        await asyncio.sleep(20)
        with pytest.raises(RejectedError) as refused:
            await shaper.request("GET", "/v1/models", priority="batch")
        assert now() == 25  # at once, not after a wait
        assert refused.value.reason == "shedding"
        assert refused.value.retry_after == pytest.approx(40)
        assert refused.value.priority is Priority.BATCH
        assert "batch and below" in str(refused.value)
        reply = await shaper.request("GET", "/v1/models", priority="interactive")
        assert reply.status == 200
        assert shaper.statistics().shed == 1
    assert transport.calls == 1


async def test_those_waiting_in_the_shed_classes_are_told_now_and_the_rest_keep_their_turn():
    transport = slow_upstream(10.0)
    async with Shaper(
        "http://upstream.test", transport=transport, limit=Fixed(1), hooks=(), max_wait=PATIENT
    ) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/v1/a", priority="critical"))
        await asyncio.sleep(0)
        waiting = {
            priority: asyncio.create_task(shaper.request("GET", "/v1/b", priority=priority))
            for priority in ("critical", "interactive", "batch", 30)
        }
        await asyncio.sleep(1)
        shaper.shed_below("interactive", for_seconds=5)
        await asyncio.sleep(0)
        for priority in ("interactive", "batch", 30):
            assert waiting[priority].done()
            error = waiting[priority].exception()
            assert isinstance(error, RejectedError) and error.reason == "shedding"
            assert error.retry_after == pytest.approx(5)
        assert not waiting["critical"].done()
        assert (await first).status == 200
        assert (await waiting["critical"]).status == 200
        assert now() == 20
        # five seconds are long over: the shed classes are served again
        assert (await shaper.request("GET", "/v1/c", priority="batch")).status == 200
    assert transport.calls == 3


async def test_a_later_call_replaces_the_shedding_and_zero_ends_it():
    async with Shaper("http://upstream.test", transport=slow_upstream(0.1), hooks=()) as shaper:
        shaper.shed_below("batch", for_seconds=60)
        shaper.shed_below("batch", for_seconds=0)
        assert (await shaper.request("GET", "/v1/models", priority="batch")).status == 200
        shaper.shed_below("interactive", for_seconds=3)
        with pytest.raises(RejectedError):
            await shaper.request("GET", "/v1/models", priority="interactive")
        await asyncio.sleep(3)
        assert (await shaper.request("GET", "/v1/models", priority="interactive")).status == 200


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf")])
async def test_a_bad_duration_is_refused(seconds):
    async with Shaper("http://upstream.test", transport=slow_upstream(0.1), hooks=()) as shaper:
        with pytest.raises(ValueError, match="for_seconds"):
            shaper.shed_below("batch", for_seconds=seconds)


async def test_refusal_tells_what_the_door_would_say_and_counts_nothing():
    transport = slow_upstream(1.0)
    async with Shaper(
        "http://upstream.test", transport=transport, limit=Fixed(1), hooks=()
    ) as shaper:
        batch = RequestOptions(priority="batch", deadline=30)
        assert shaper.refusal(batch) is None  # nothing shed, nobody waiting
        shaper.shed_below("batch", for_seconds=60)
        refused = shaper.refusal(batch)
        assert isinstance(refused, RejectedError) and refused.reason == "shedding"
        assert refused.retry_after == pytest.approx(60)
        assert shaper.refusal(RequestOptions(priority="interactive")) is None
        # Asked, not refused: no request was made, none counted, nothing sent.
        stats = shaper.statistics()
        assert (stats.shed, stats.sent, stats.queued) == (0, 0, ())
        # The door itself says the same.
        with pytest.raises(RejectedError, match="batch and below"):
            await shaper.request("GET", "/v1/models", options=batch)
        assert shaper.statistics().shed == 1
    assert shaper.refusal(batch) is None  # closed: request() says why
    assert transport.calls == 0
