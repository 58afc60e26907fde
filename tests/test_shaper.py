"""The Shaper end to end on virtual time, against the simulated upstream behind a MockTransport."""

import asyncio
import collections
import math

import orjson
import pytest

from asyncquota import (
    AiohttpTransport,
    ClosedError,
    Fixed,
    HttpTransport,
    MockTransport,
    QuotaError,
    Request,
    Response,
)
from asyncquota.hooks import Completed, Event
from asyncquota.shaper import Shaper
from asyncquota.testing import SimulatedUpstream, UpstreamConfig
from asyncquota.tokens import estimate_tokens

BODY = {"model": "m", "messages": [{"role": "user", "content": "Where is my parcel?"}]}

PATIENT = {"critical": 86_400, "interactive": 86_400, "batch": 86_400}
"""Classes that wait their turn however long (the test is not about waiting in line)."""


def frozen_wall_clock() -> float:
    return 1_800_000_000.0


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_a_spike_of_6000_requests_is_served_without_a_wall_of_429s():
    upstream = SimulatedUpstream(UpstreamConfig.preset("crisis", wall_clock=frozen_wall_clock))
    outcomes: collections.Counter[str] = collections.Counter()
    async with Shaper(
        "http://upstream.test", transport=MockTransport(upstream.handle), hooks=(), max_wait=PATIENT
    ) as shaper:

        async def one(i: int) -> None:
            await asyncio.sleep(i * 5 / 6000)
            interactive = i % 10 < 7
            try:
                await shaper.request(
                    "POST",
                    "/v1/chat/completions",
                    json={**BODY, "max_tokens": 128},
                    priority="interactive" if interactive else "batch",
                    deadline=10 if interactive else 120,
                )
                outcomes["ok"] += 1
            except QuotaError as exc:
                outcomes[exc.reason] += 1

        await asyncio.gather(*(one(i) for i in range(6000)))
        stats = shaper.statistics()
    totals = upstream.stats()["totals"]
    assert sum(outcomes.values()) == 6000  # every request ended exactly once
    assert outcomes["ok"] >= 5900
    assert totals["429"] <= 0.01 * totals["requests"]
    assert stats.inflight == 0 and stats.queued == ()


async def test_a_reply_carries_how_many_attempts_it_took():
    replies = iter([Response(503, {"retry-after": "1"}), Response(200, {}, b'{"ok": true}')])
    async with Shaper(
        "http://upstream.test", transport=MockTransport(lambda request: next(replies)), hooks=()
    ) as shaper:
        response = await shaper.request("GET", "/v1/models")
    assert response.json() == {"ok": True}
    assert response.attempts == 2


async def test_a_full_url_as_path_is_refused_so_nothing_leaves_for_another_host():
    async with Shaper(
        "http://upstream.test", transport=MockTransport(lambda r: Response(200)), hooks=()
    ) as shaper:
        with pytest.raises(ValueError, match="must start with a single '/'"):
            await shaper.request("GET", "http://elsewhere.test/steal")


# -- arguments and lifecycle -------------------------------------------------------------


def ok_transport() -> MockTransport:
    return MockTransport(lambda request: Response(200, {}, b"{}"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": "urgent"}, "Unknown priority class 'urgent'"),
        ({"deadline": 0}, "deadline must be at least 0.001 s"),
        ({"deadline": -1.5}, "deadline must be at least 0.001 s"),
        ({"deadline": 1e-9}, "deadline must be at least 0.001 s"),
        ({"deadline": math.nan}, "deadline must be a number of seconds"),
        ({"cost_tokens": -1}, "cost_tokens must be an integer"),
    ],
)
async def test_bad_arguments_are_refused_clearly_and_nothing_is_sent(options, message):
    transport = ok_transport()
    async with Shaper("http://upstream.test", transport=transport, hooks=()) as shaper:
        with pytest.raises(ValueError, match=message):
            await shaper.request("GET", "/v1/models", **options)
        with pytest.raises(ValueError, match="must start with a single '/'"):
            await shaper.request("GET", "v1/models")
    assert transport.calls == 0


async def test_requests_before_start_and_after_close_raise_closed_error():
    transport = ok_transport()
    shaper = Shaper("http://upstream.test", transport=transport, hooks=())
    with pytest.raises(ClosedError, match="not running"):
        await shaper.request("GET", "/v1/models")
    async with shaper:
        await shaper.request("GET", "/v1/models")
    with pytest.raises(ClosedError, match="closed"):
        await shaper.request("GET", "/v1/models")
    with pytest.raises(ClosedError):
        shaper.start()
    assert transport.calls == 1 and transport.closed


# -- shutdown ----------------------------------------------------------------------------


async def test_closing_rejects_the_waiting_lets_the_in_flight_finish_and_cancels_the_rest():
    async def upstream(request: Request) -> Response:
        await asyncio.sleep(float(request.url.rsplit("/", 1)[1]))
        return Response(200)

    transport = MockTransport(upstream)
    shaper = Shaper(
        "http://upstream.test",
        transport=transport,
        hooks=(),
        max_wait=PATIENT,
        limit=Fixed(2),
        shutdown_grace=5.0,
    )
    async with shaper:
        quick = asyncio.create_task(shaper.request("GET", "/3"))
        slow = asyncio.create_task(shaper.request("GET", "/60"))
        waiting = [asyncio.create_task(shaper.request("GET", "/1")) for _ in range(3)]
        await asyncio.sleep(1)
    closed_at = now()

    assert (await quick).status == 200  # finished within the grace period
    with pytest.raises(ClosedError, match="shut down before this request finished"):
        await slow
    for task in waiting:
        with pytest.raises(ClosedError, match="not sent"):
            await task
    assert closed_at == 1 + 5.0
    assert transport.closed and transport.statistics().in_flight == 0
    assert transport.calls == 2
    assert asyncio.all_tasks() == {asyncio.current_task()}
    stats = shaper.statistics()
    assert (stats.ok, stats.shed, stats.failed, stats.inflight, stats.queued) == (1, 3, 1, 0, ())


async def test_closing_an_idle_shaper_is_immediate_and_idempotent():
    transport = ok_transport()
    shaper = Shaper("http://upstream.test", transport=transport, hooks=())
    async with shaper:
        pass
    await shaper.aclose()
    assert now() == 0 and transport.closed
    assert asyncio.all_tasks() == {asyncio.current_task()}


# -- tokens ------------------------------------------------------------------------------


async def test_the_token_estimate_is_reserved_and_reconciled_with_the_openai_usage():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    estimate = estimate_tokens(len(orjson.dumps(body)), body, default_output_tokens=256)
    seen: list[float] = []

    async def upstream(request: Request) -> Response:
        seen.append(shaper.statistics().tpm_level)
        return Response(200, {}, b'{"usage": {"prompt_tokens": 7, "completion_tokens": 13}}')

    async with Shaper(
        "http://upstream.test", transport=MockTransport(upstream), hooks=(), tpm=60_000
    ) as shaper:
        full = shaper.statistics().tpm_level
        await shaper.request("POST", "/v1/chat/completions", json=body)
        after = shaper.statistics().tpm_level

    assert full == 1000  # one second's worth
    assert seen == [1000 - estimate]  # reserved while in flight
    assert after == 1000 - 20  # settled at what the reply says it used


@pytest.mark.parametrize(
    ("usage", "used"),
    [
        (b'{"usage": {"input_tokens": 30, "output_tokens": 12}}', 42),
        (b'{"usage": {"prompt_tokens": 5, "completion_tokens": 0}}', 5),
        (b'{"choices": []}', 300),  # no usage: the reservation stands
    ],
    ids=["anthropic", "openai", "none"],
)
async def test_cost_tokens_overrides_the_estimate_and_usage_settles_it(usage, used):
    transport = MockTransport(lambda request: Response(200, {}, usage))
    async with Shaper("http://upstream.test", transport=transport, hooks=(), tpm=60_000) as shaper:
        await shaper.request("POST", "/v1/messages", json={"max_tokens": 5000}, cost_tokens=300)
        assert shaper.statistics().tpm_level == 1000 - used
        assert shaper.statistics().open_reservations == 0


async def test_concurrent_large_requests_cannot_overshoot_the_tpm():
    sends: list[tuple[float, int]] = []

    async def upstream(request: Request) -> Response:
        sends.append((now(), 400))
        await asyncio.sleep(0.2)
        return Response(200, {}, b'{"usage": {"prompt_tokens": 100, "completion_tokens": 300}}')

    async with Shaper(
        "http://upstream.test",
        transport=MockTransport(upstream),
        hooks=(),
        max_wait=PATIENT,
        tpm=60_000,
    ) as shaper:
        await asyncio.gather(
            *(shaper.request("POST", "/v1/chat/completions", cost_tokens=400) for _ in range(50))
        )

    # 1000 tokens at once, then 1000 a second: by any time t, at most 1000 + 1000 t sent.
    for i, (t, _) in enumerate(sends):
        assert (i + 1) * 400 <= 1000 + 1000 * t + 1e-6, (i, t)
    assert sends[-1][0] == pytest.approx((50 * 400 - 1000) / 1000, abs=0.41)


# -- statistics and hooks ----------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_event(self, event: Event) -> None:
        self.events.append(event)


class Broken:
    def on_event(self, event: Event) -> None:
        raise RuntimeError("this hook is broken")


async def test_statistics_add_up_and_hooks_see_one_completed_per_request(caplog):
    script = {  # path: (seconds it takes, reply) per attempt
        "/ok": [(0, Response(200))],
        "/retried": [(0, Response(503)), (0, Response(200))],
        "/throttled": [(1, Response(429, {"retry-after": "500"}))],
        "/refused": [(0, Response(400))],
        "/slow": [(100, Response(200))],
        "/late": [(0, Response(200))],
    }

    async def upstream(request: Request) -> Response:
        took, reply = script[request.url.removeprefix("http://upstream.test")].pop(0)
        await asyncio.sleep(took)
        return reply

    recorder = Recorder()
    async with Shaper(
        "http://upstream.test",
        transport=MockTransport(upstream),
        hooks=(Broken(), recorder),
        limit=Fixed(10),
        seed=2,
    ) as shaper:
        results = await asyncio.gather(
            *(
                shaper.request("GET", path, deadline=60 if path != "/slow" else 5)
                for path in ("/ok", "/retried", "/throttled", "/refused", "/slow")
            ),
            return_exceptions=True,
        )
        # the 429 at t=1 held the gate for up to 500 s; a newcomer goes as its probe 10 ms
        # later, and its success reopens the gate
        late = await asyncio.gather(shaper.request("GET", "/late"), return_exceptions=True)
        stats = shaper.statistics()

    names = [type(r).__name__ for r in results + late]
    assert names == [
        "Response",
        "Response",
        "ThrottledError",
        "UpstreamError",
        "DeadlineExceededError",
        "Response",
    ]
    assert (stats.sent, stats.ok, stats.throttled, stats.retried) == (7, 3, 2, 1)
    assert (stats.shed, stats.deadline, stats.failed) == (0, 1, 2)
    assert stats.ok + stats.shed + stats.deadline + stats.failed == 6  # every request once
    kinds = collections.Counter(type(event).__name__ for event in recorder.events)
    del kinds["Queued"]  # a request that finds every gate open may skip the queue
    assert kinds == {
        "Admitted": 7,  # one per attempt: /retried went twice
        "Replied": 6,  # one per answer: the seventh attempt ran out of time
        "Throttled": 2,
        "Retried": 1,
        "Completed": 6,
    }
    completed = [e for e in recorder.events if isinstance(e, Completed)]
    assert sorted(e.reason for e in completed) == sorted(
        ["ok", "ok", "rate_limited", "upstream_error", "deadline_exceeded", "ok"]
    )
    assert sorted(e.outcome.label for e in completed) == sorted(
        ["ok", "ok", "throttled", "http_error", "deadline_exceeded", "ok"]
    )
    assert "this hook is broken" in caplog.text


async def test_ample_headers_are_read_in_full_at_most_every_50_ms_and_low_ones_at_once():
    remaining = iter([990, 980, 970, 400, 390])

    def upstream(request: Request) -> Response:
        left = next(remaining)
        return Response(
            200,
            {
                "x-ratelimit-limit-requests": "1000",
                "x-ratelimit-remaining-requests": str(left),
                "x-ratelimit-reset-requests": "1s",
            },
            b"{}",
        )

    async with Shaper(
        "http://upstream.test", transport=MockTransport(upstream), hooks=()
    ) as shaper:

        async def seen_after(delay: float) -> int | None:
            await asyncio.sleep(delay)
            await shaper.request("GET", "/v1/models")
            assert shaper.quota is not None
            return shaper.quota.requests.remaining

        assert await seen_after(0) == 990  # the first reply is read in full
        assert await seen_after(0.01) == 990  # more than half left: a glance only
        assert await seen_after(0.05) == 970  # 50 ms on: read in full again
        assert await seen_after(0.001) == 400  # less than half: read at once
        assert await seen_after(0.001) == 390  # and every time while it stays low


class PoolOf8(MockTransport):
    """A mock transport that says its pool sends 8 at once (as AiohttpTransport does)."""

    max_connections = 8


async def test_no_more_requests_are_in_flight_than_the_transport_has_connections():
    inflight = peak = 0

    async def upstream(request: Request) -> Response:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.1)
        inflight -= 1
        return Response(200, {}, b"{}")

    async with Shaper(
        "http://upstream.test", transport=PoolOf8(upstream), hooks=(), max_wait=PATIENT
    ) as shaper:
        await asyncio.gather(*(shaper.request("GET", "/v1/models") for _ in range(500)))
        assert shaper.statistics().limit <= 8
    assert peak == 8  # the pool is used, never overrun (slow start reached it)


def test_both_pools_tell_their_size_and_the_shaper_sends_through_its_own_by_default():
    assert AiohttpTransport(max_connections=12).max_connections == 12
    assert HttpTransport(max_connections=12).max_connections == 12
    shaper = Shaper("http://upstream.test", max_connections=12, hooks=())
    assert isinstance(shaper.transport, HttpTransport)
    assert shaper.transport.max_connections == 12
