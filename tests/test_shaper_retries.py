"""The Shaper's retries, and the run where everything goes wrong at once and nothing leaks."""

import asyncio
import collections
import random

import pytest

from asyncquota import (
    AIMD,
    DeadlineExceededError,
    Fixed,
    MockTransport,
    OverloadedError,
    QuotaError,
    QuotaExhaustedError,
    Request,
    Response,
    Shaper,
    UpstreamError,
)

URL = "http://upstream.test"

PATIENT = {"critical": 86_400, "interactive": 86_400, "batch": 86_400}
"""Classes that wait their turn however long (the test is not about waiting in line)."""


def now() -> float:
    return asyncio.get_running_loop().time()


def failing_once(first: Response | BaseException):
    """A handler whose first answer is ``first`` (a reply or an exception), then 200s."""
    calls: list[Request] = []

    async def upstream(request: Request) -> Response:
        calls.append(request)
        if len(calls) == 1:
            if isinstance(first, BaseException):
                raise first
            return first
        return Response(200, {}, b'{"ok": true}')

    return upstream, calls


async def test_a_500_asking_for_a_wait_is_retried_after_it_and_holds_nobody_else():
    upstream, _ = failing_once(Response(500, {"retry-after": "3"}))
    times: list[float] = []

    async def timed(request: Request) -> Response:
        times.append(now())
        return await upstream(request)

    async with Shaper(URL, transport=MockTransport(timed), hooks=(), seed=3) as shaper:
        response = await shaper.request("GET", "/v1/models")
        other = await shaper.request("GET", "/v1/models")
    assert response.attempts == 2 and other.attempts == 1
    # The retry waited its own 3 s (plus a jitter under half a second, so that retries
    # told the same time do not land on the same instant); a 500 is no congestion, so no
    # fleet-wide cooldown: the other request went at once.
    assert times[0] == 0.0 and 3.0 <= times[1] < 3.5 and times[2] == times[1]
    assert shaper.statistics().throttled == 0


@pytest.mark.parametrize(
    "first",
    [
        Response(429, {}, b'{"error": {"code": "rate_limit_exceeded"}}'),
        Response(503),
        Response(529, {}, b'{"type": "error", "error": {"type": "overloaded_error"}}'),
        Response(500),
        ConnectionResetError("reset by peer"),
        ConnectionRefusedError("refused"),
    ],
    ids=["429", "503", "529", "500", "reset", "refused"],
)
async def test_transient_failures_are_retried_and_the_reply_says_how_many_attempts(first):
    upstream, calls = failing_once(first)
    async with Shaper(URL, transport=MockTransport(upstream), hooks=(), seed=3) as shaper:
        response = await shaper.request("POST", "/v1/chat/completions", json={"x": 1})
        stats = shaper.statistics()
    assert response.status == 200 and response.attempts == 2
    assert len(calls) == 2
    first_call, retry = ((r.method, r.url, dict(r.headers), r.body) for r in calls)
    assert first_call == retry  # the same request, sent again
    assert (stats.sent, stats.ok, stats.retried, stats.failed) == (2, 1, 1, 0)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Response(400, {}, b'{"error": {"message": "bad"}}'), UpstreamError),
        (Response(401), UpstreamError),
        (Response(404), UpstreamError),
        (
            Response(429, {}, b'{"error": {"type": "insufficient_quota", "code": "x"}}'),
            QuotaExhaustedError,
        ),
    ],
    ids=["400", "401", "404", "insufficient_quota"],
)
async def test_requests_the_upstream_refused_for_good_are_sent_exactly_once(reply, error):
    transport = MockTransport(lambda request: reply)
    async with Shaper(URL, transport=transport, hooks=()) as shaper:
        with pytest.raises(error) as raised:
            await shaper.request("GET", "/v1/models")
        stats = shaper.statistics()
    assert type(raised.value) is error
    assert raised.value.status == reply.status
    assert transport.calls == 1
    assert (stats.sent, stats.retried, stats.failed, stats.throttled) == (1, 0, 1, 0)
    assert stats.limit == 20  # a refusal is not a congestion signal


async def test_a_retry_re_enters_the_queue_at_its_original_priority_and_age():
    order: list[str] = []

    async def upstream(request: Request) -> Response:
        name = request.url.rsplit("/", 1)[1]
        order.append(name)
        await asyncio.sleep(1)
        if order.count(name) == 1 and name == "old":
            return Response(503)
        return Response(200)

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), max_wait=PATIENT, limit=Fixed(1), seed=0
    ) as shaper:
        calls = [asyncio.create_task(shaper.request("GET", "/old", tenant="a"))]
        await asyncio.sleep(0.5)  # "old" is in flight; three newer ones queue behind it
        for name, rank in (("new1", "interactive"), ("new2", "interactive"), ("bg", "batch")):
            request = shaper.request("GET", f"/{name}", tenant="a", priority=rank)
            calls.append(asyncio.create_task(request))
        await asyncio.gather(*calls)

    # "new1" takes the permit "old" freed while "old" backs off; then the retry of "old"
    # goes before the newer "new2" of its tenant (by its age), and batch goes last.
    assert order == ["old", "new1", "old", "new2", "bg"]


async def test_retries_never_run_past_the_deadline():
    sends: list[float] = []

    async def upstream(request: Request) -> Response:
        sends.append(now())
        await asyncio.sleep(0.3)
        return Response(503)

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), max_attempts=50, retry_budget=10.0
    ) as shaper:
        with pytest.raises(QuotaError) as raised:
            await shaper.request("GET", "/v1/models", deadline=2.0)
        ended = now()
    assert len(sends) >= 2
    assert all(t < 2.0 for t in sends)
    # The last attempt is cut at the deadline, or the next one would start past it.
    if isinstance(raised.value, DeadlineExceededError):
        assert ended == 2.0
    else:
        assert isinstance(raised.value, OverloadedError) and ended < 2.0


async def test_the_retry_budget_caps_retries_fleet_wide():
    transport = MockTransport(lambda request: Response(503))
    async with Shaper(
        URL,
        transport=transport,
        hooks=(),
        max_attempts=4,
        retry_budget=0.1,
        limit=AIMD(initial=200, min_limit=200, max_limit=200),
    ) as shaper:
        results = await asyncio.gather(
            *(shaper.request("GET", "/v1/models") for _ in range(200)), return_exceptions=True
        )
        stats = shaper.statistics()
    assert all(isinstance(result, OverloadedError) for result in results)
    # 10 % of 200 requests, plus the floor of 1 a second over the 10 s window.
    assert stats.retried == 20 + 10
    assert transport.calls == 200 + 30


# -- the big one -------------------------------------------------------------------------

FAULTS = ("ok", "429", "429-after", "503", "529", "500", "reset", "hang", "garbage")


async def test_ten_thousand_requests_through_faults_cancellations_and_deadlines_end_once_each():
    rng = random.Random(20260101)
    upstream_cancelled = 0

    async def upstream(request: Request) -> Response:
        nonlocal upstream_cancelled
        fault = rng.choices(FAULTS, weights=(80, 4, 0.5, 3, 2, 3, 3, 1.5, 3))[0]
        try:
            await asyncio.sleep(round(rng.uniform(0.05, 0.5), 2))
            if fault == "hang":
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            upstream_cancelled += 1
            raise
        if fault == "ok":
            return Response(200, {}, b'{"usage": {"prompt_tokens": 10, "completion_tokens": 20}}')
        if fault == "429":
            return Response(429, {}, b'{"error": {"code": "rate_limit_exceeded"}}')
        if fault == "429-after":
            return Response(429, {"retry-after": f"{rng.uniform(0.05, 1):.2f}"})
        if fault == "reset":
            raise ConnectionResetError("reset")
        if fault == "garbage":
            return Response(200, {"x-ratelimit-remaining-requests": "lots"}, b"\x00\xff{not json")
        return Response(int(fault))

    transport = MockTransport(upstream)
    ended: collections.Counter[str] = collections.Counter()
    started: list[int] = []
    endings: list[int] = []
    async with Shaper(
        URL,
        transport=transport,
        hooks=(),
        tpm=600_000,
        limit=AIMD(initial=100, min_limit=50),  # busy, although one reply in ten is congestion
        timeout=5.0,
        max_queue=3000,
        seed=5,
    ) as shaper:

        async def caller(i: int) -> None:
            await asyncio.sleep(round(rng.uniform(0, 40), 2))  # 10 ms ticks: fewer loop cycles
            started.append(i)
            try:
                await shaper.request(
                    "POST",
                    "/v1/chat/completions",
                    json={"messages": "hi", "max_tokens": 30},
                    priority=rng.choice(("critical", "interactive", "batch")),
                    tenant=rng.randrange(20),
                    deadline=rng.choice((None, 2.0, 10.0, 60.0)),
                )
                ended["ok"] += 1
            except QuotaError as exc:
                ended[type(exc).__name__] += 1
            except asyncio.CancelledError:
                ended["cancelled"] += 1
                endings.append(i)
                raise
            endings.append(i)

        tasks = [asyncio.create_task(caller(i)) for i in range(10_000)]

        async def canceller() -> None:
            for _ in range(1500):
                await asyncio.sleep(rng.expovariate(100))
                rng.choice(tasks).cancel()

        await asyncio.gather(canceller(), *tasks, return_exceptions=True)
        cancelled = sum(tasks[i].cancelled() for i in started)
        await asyncio.sleep(120)  # let the token bucket refill
        stats = shaper.statistics()
        tokens = shaper._tokens.statistics()  # the bucket's level: refilled to its burst
        others = asyncio.all_tasks() - {asyncio.current_task()}

    assert len(started) > 8000
    assert sorted(endings) == sorted(started)  # every caller ended, exactly once
    assert ended["cancelled"] == cancelled > 0
    assert sum(ended.values()) == len(started)
    assert ended["ok"] > 5000, (ended, stats)
    assert {"ThrottledError", "DeadlineExceededError", "TransportError"} <= set(ended)
    assert upstream_cancelled > 0
    # Nothing leaked: no permit, no reservation, no waiter, no task.
    assert stats.inflight == 0 and stats.permit_waiters == 0 and stats.queued == ()
    assert stats.open_reservations == 0 and stats.reserved_tokens == 0
    assert tokens.level == tokens.burst
    assert transport.statistics().in_flight == 0
    assert [task.get_name() for task in others] == ["asyncquota-dispatcher"]
    assert stats.ok == ended["ok"]
