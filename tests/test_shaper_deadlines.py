"""The Shaper's deadlines, early shedding and priorities, on virtual time with exact timestamps."""

import asyncio
import collections

import pytest

from asyncquota import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    Fixed,
    MockTransport,
    Request,
    Response,
    Shaper,
)

URL = "http://upstream.test"

PATIENT = {"critical": 86_400, "interactive": 86_400, "batch": 86_400}
"""Classes that wait their turn however long (the test is not about waiting in line)."""


def now() -> float:
    return asyncio.get_running_loop().time()


def one_second_upstream(log: list[tuple[float, str]]):
    """A handler that takes 1 s per request and logs (send time, path)."""

    async def upstream(request: Request) -> Response:
        log.append((now(), request.url.removeprefix(URL)))
        await asyncio.sleep(1)
        return Response(200)

    return upstream


async def test_a_request_that_cannot_be_served_before_its_deadline_is_refused_at_once():
    log: list[tuple[float, str]] = []
    async with Shaper(
        URL,
        transport=MockTransport(one_second_upstream(log)),
        hooks=(),
        max_wait=PATIENT,
        limit=Fixed(1),
    ) as shaper:
        backlog = [asyncio.create_task(shaper.request("GET", "/queued")) for _ in range(20)]
        await asyncio.sleep(5.5)  # served one a second: 14.5 s of work is left
        with pytest.raises(DeadlineUnreachableError) as raised:
            await shaper.request("GET", "/late", deadline=3)
        refused_at = now()
        stats = shaper.statistics()
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)

    assert refused_at == 5.5
    assert raised.value.retry_after == pytest.approx(14 / stats.service_rate)
    assert raised.value.retry_after > 3
    assert "/late" not in [path for _, path in log]
    assert stats.shed == 1


async def test_a_request_past_its_deadline_in_flight_is_cancelled_upstream():
    seen: list[str] = []

    async def upstream(request: Request) -> Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append(f"cancelled at {now()}")
            raise
        return Response(200)

    async with Shaper(URL, transport=MockTransport(upstream), hooks=()) as shaper:
        with pytest.raises(DeadlineExceededError, match="in flight"):
            await shaper.request("GET", "/slow", deadline=2.5)
        ended = now()
        stats = shaper.statistics()
    assert ended == 2.5
    assert seen == ["cancelled at 2.5"]
    assert (stats.deadline, stats.inflight, stats.retried) == (1, 0, 0)


async def test_a_queued_request_ends_at_its_deadline_unsent():
    log: list[tuple[float, str]] = []
    async with Shaper(
        URL, transport=MockTransport(one_second_upstream(log)), hooks=(), limit=Fixed(1)
    ) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/first"))
        await asyncio.sleep(0)
        with pytest.raises(DeadlineExceededError):
            await shaper.request("GET", "/second", deadline=0.5)
        assert now() == 0.5
        await first
    assert log == [(0.0, "/first")]


async def test_interactive_requests_overtake_batch_ones_under_overload():
    log: list[tuple[float, str]] = []
    async with Shaper(
        URL,
        transport=MockTransport(one_second_upstream(log)),
        hooks=(),
        max_wait=PATIENT,
        limit=Fixed(1),
    ) as shaper:
        calls = [
            asyncio.create_task(shaper.request("GET", f"/batch{i}", priority="batch"))
            for i in range(4)
        ]
        await asyncio.sleep(0.5)
        calls += [asyncio.create_task(shaper.request("GET", f"/chat{i}")) for i in range(3)]
        calls.append(asyncio.create_task(shaper.request("GET", "/page", priority="critical")))
        await asyncio.gather(*calls)

    assert log == [
        (0.0, "/batch0"),  # already in flight when the others came
        (1.0, "/page"),
        (2.0, "/chat0"),
        (3.0, "/chat1"),
        (4.0, "/chat2"),
        (5.0, "/batch1"),
        (6.0, "/batch2"),
        (7.0, "/batch3"),
    ]


async def test_a_tenant_flooding_the_queue_cannot_starve_another_of_the_same_class():
    log: list[tuple[float, str]] = []
    async with Shaper(
        URL,
        transport=MockTransport(one_second_upstream(log)),
        hooks=(),
        max_wait=PATIENT,
        limit=Fixed(1),
    ) as shaper:
        flood = [
            asyncio.create_task(shaper.request("GET", "/flood", tenant="loud", deadline=600))
            for _ in range(100)
        ]
        await asyncio.sleep(0.5)
        quiet = [
            asyncio.create_task(shaper.request("GET", "/quiet", tenant="calm")) for _ in range(3)
        ]
        await asyncio.gather(*quiet)
        done_at = now()
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)

    # The newcomer joins the round robin at the back: one more of the flood, then turns.
    paths = [path for _, path in log[:7]]
    assert paths == ["/flood", "/flood", "/quiet", "/flood", "/quiet", "/flood", "/quiet"]
    assert done_at == 7.0  # behind one of the flood each, not behind 100


async def test_tenants_of_one_class_share_the_upstream_evenly():
    served: collections.Counter[str] = collections.Counter()

    async def upstream(request: Request) -> Response:
        if now() < 30:  # while all three tenants keep their callers busy
            served[request.url.rsplit("/", 1)[1]] += 1
        await asyncio.sleep(0.1)
        return Response(200)

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), max_wait=PATIENT, limit=Fixed(4)
    ) as shaper:

        async def tenant(name: str, callers: int) -> None:
            async def caller() -> None:
                while now() < 30:
                    await shaper.request("GET", f"/{name}", tenant=name, deadline=600)

            await asyncio.gather(*(caller() for _ in range(callers)))

        await asyncio.gather(tenant("a", 50), tenant("b", 5), tenant("c", 10))

    total = sum(served.values())
    assert total == 30 / 0.1 * 4  # the upstream stayed full
    assert all(abs(count - total / 3) <= 0.02 * total for count in served.values()), served


async def test_a_head_too_close_to_its_deadline_is_told_at_once_and_its_turn_goes_to_the_next():
    sent: list[tuple[float, str]] = []

    async def half_second_upstream(request: Request) -> Response:
        sent.append((now(), request.headers["x-name"]))
        await asyncio.sleep(0.5)
        return Response(200, {}, b"{}")

    async with Shaper(
        URL, transport=MockTransport(half_second_upstream), limit=Fixed(1), hooks=()
    ) as shaper:

        async def ask(name: str, deadline: float) -> tuple[float, str]:
            try:
                await shaper.request("GET", "/x", headers={"x-name": name}, deadline=deadline)
            except DeadlineUnreachableError:
                return now(), f"{name} refused"
            return now(), f"{name} ok"

        ends = await asyncio.gather(ask("a", 10), ask("b", 0.9), ask("c", 10))
    # a teaches the Shaper that a reply takes 0.5 s; at 0.5 b has 0.4 s left: refused there
    # and then, unsent, and c takes the turn in the same instant.
    assert ends == [(0.5, "a ok"), (0.5, "b refused"), (1.0, "c ok")]
    assert sent == [(0.0, "a"), (0.5, "c")]
