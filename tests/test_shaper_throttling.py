"""The Shaper told to slow down: Retry-After cooldowns, pacing by headers, the adaptive limit.

Every test runs on virtual time with a MockTransport: hand-written handlers where the exact
timeline matters, the simulated upstream where the behaviour is about load.
"""

import asyncio
import collections
import itertools
import math
import statistics

import pytest

from asyncquota import (
    AIMD,
    MockTransport,
    QuotaError,
    Request,
    Response,
    Shaper,
)
from asyncquota.testing import SimulatedUpstream, UpstreamConfig
from asyncquota.testing.buckets import ScheduledBucket
from asyncquota.testing.replies import date_header, http_date, rate_limit_headers

URL = "http://upstream.test"
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "Where is my parcel?"}]}
RATE_LIMITED = b'{"error": {"type": "requests", "code": "rate_limit_exceeded"}}'

PATIENT = {"critical": 86_400, "interactive": 86_400, "batch": 86_400}
"""Classes that wait their turn however long (the test is not about waiting in line)."""


def frozen_wall_clock() -> float:
    return 1_800_000_000.0


def now() -> float:
    return asyncio.get_running_loop().time()


async def outcome(call) -> tuple[str, float, QuotaError | None]:
    """What one call ended in, and when."""
    try:
        await call
    except QuotaError as exc:
        return type(exc).__name__, now(), exc
    return "ok", now(), None


# -- Retry-After ------------------------------------------------------------------------


async def test_a_429_with_retry_after_7_holds_every_waiter_until_a_probe_gets_through():
    sends: list[float] = []

    async def upstream(request: Request) -> Response:
        sent = now()
        sends.append(sent)
        await asyncio.sleep(0.1)
        if sent < 1:  # the quota is gone for a second, whatever the Retry-After says
            return Response(429, {"retry-after": "7"}, RATE_LIMITED)
        return Response(200, {}, b"{}")

    async with Shaper(
        URL,
        transport=MockTransport(upstream),
        hooks=(),
        max_wait=PATIENT,
        limit=AIMD(initial=20),
        retry_budget=1.0,
        seed=7,
    ) as shaper:
        calls = [
            asyncio.create_task(outcome(shaper.request("GET", "/v1/models"))) for _ in range(50)
        ]
        await asyncio.sleep(0.1 + 1e-3)
        during = shaper.statistics()
        results = await asyncio.gather(*calls)
        after = shaper.statistics()

    # The first wave of 20 (the initial limit) all got 429 at 0.1. A Retry-After names a
    # rate, not a crowd: the concurrency limit is not cut for it.
    assert sends[:20] == [0.0] * 20
    assert during.throttled == 20
    assert during.limit == 20
    assert during.cooldown_until == pytest.approx(7.1)
    # Then one probe at a time, 10 ms after the 429 and twice as long after each refusal
    # (each answered 0.1 s after it went): 0.11, 0.23, 0.37, 0.55, 0.81 are refused; 1.23
    # gets through and reopens the gate at 1.33. The sends resume spread at the pace the
    # wall set (20 sent at once, read over the shortest window, 0.1 s: 200 a second, a
    # tenth off: 180), none in a burst: the first a unit of it after the reopening.
    assert sends[20:26] == pytest.approx([0.11, 0.23, 0.37, 0.55, 0.81, 1.23])
    resumed = sends[26:]
    assert min(resumed) == pytest.approx(1.33 + 1 / 180)
    assert max(resumed) < 7.1  # nobody waited out the whole Retry-After
    assert [name for name, _, _ in results] == ["ok"] * 50
    assert after.throttled == 25 and after.retried == 20  # refused probes cost no attempt


async def test_a_whole_second_retry_after_over_a_fast_bucket_costs_milliseconds_not_seconds():
    # 100 requests a second, a bucket of 10: "retry-after: 1" means "a few ms" here.
    upstream = SimulatedUpstream(
        UpstreamConfig(
            rps=100.0,
            burst_seconds=0.1,
            latency_base=0.2,
            latency_per_token=0.0,
            headers_style="none",
            retry_after_style="seconds",
            count_rejected=False,
            wall_clock=frozen_wall_clock,
        )
    )
    async with Shaper(
        URL, transport=MockTransport(upstream.handle), hooks=(), max_wait=PATIENT
    ) as shaper:
        started = now()
        results = await asyncio.gather(
            *(outcome(shaper.request("POST", CHAT, json=BODY)) for _ in range(300))
        )
        took = now() - started
        closures = shaper._cooldown.statistics().closures
    assert [name for name, _, _ in results] == ["ok"] * 300
    # 300 requests at 100 a second take 3 s at best. Each "retry-after: 1" held the fleet
    # only until a probe got in: honoured in full, the closures alone would take longer.
    assert took < 4.5, took
    assert closures > took
    totals = upstream.stats()["totals"]
    assert totals["429"] <= 0.1 * totals["requests"]


async def test_an_upstream_that_punishes_early_sends_is_learnt_and_then_honoured_in_full():
    # Every send inside the window is refused and pushes the window 1 s later.
    window_end = 0.0
    sends: list[float] = []

    async def upstream(request: Request) -> Response:
        nonlocal window_end
        t = now()
        sends.append(t)
        if t < 0.01 or t < window_end:
            window_end = max(window_end, t + 2.0) + (1.0 if t >= 0.01 else 0.0)
            wait = math.ceil(window_end - t - 1e-9)
            return Response(429, {"retry-after": str(wait)}, RATE_LIMITED)
        return Response(200, {}, b"{}")

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), cooldown_ramp=0.0, limit=AIMD(initial=1)
    ) as shaper:
        first = await outcome(shaper.request("GET", "/v1/models", deadline=60))
        learnt = shaper._feedback.punishes
        # From now on no refusal is borne as chance, and its bucket is never run dry.
        careful = shaper._feedback._pace.careful
        reserve = shaper._rate._bucket._reserve
        # Later windows are honoured in full: no probe knocks inside them.
        window_end = now() + 5.0
        sends.clear()
        window_start = now()
        second = await outcome(shaper.request("GET", "/v1/models", deadline=60))

    assert learnt and careful and reserve > 0
    assert first[0] == "ok"
    assert second[0] == "ok"
    # The second request's first send found the window; it was then held out in full.
    assert len(sends) == 2 and sends[1] >= window_start + 5.0


async def test_after_a_punished_window_one_probe_goes_before_the_fleet():
    # Every send inside the window is refused and pushes it 1 s later; answers take 2 ms.
    # A window may end on an empty bucket: the first send after it is then refused with
    # a window of its own, and every send right behind it (a millisecond later, in real
    # time) buys another second. So once the upstream is known to punish, its window is
    # waited out and one probe goes first; the fleet follows its answer.
    window_end = 2.0
    sends: list[float] = []

    async def upstream(request: Request) -> Response:
        nonlocal window_end
        t = now()
        sends.append(t)
        await asyncio.sleep(0.002)
        if t < window_end:
            if len(sends) > 1:
                window_end += 1.0
            return Response(429, {"retry-after-ms": str(round(1000 * (window_end - t)))}, b"")
        return Response(200, {}, b"{}")

    transport = MockTransport(upstream)
    async with Shaper(URL, transport=transport, hooks=(), cooldown_ramp=0.0) as shaper:
        first = await outcome(shaper.request("GET", "/v1/models", deadline=60))
        assert shaper._feedback.punishes
        window_end = now() + 1.0

        def batch() -> asyncio.Task[tuple[str, float, QuotaError | None]]:
            call = shaper.request("GET", "/v1/models", priority="batch", deadline=60)
            return asyncio.create_task(outcome(call))

        calls = [batch()]
        await asyncio.sleep(0.01)  # its refusal has closed the gate: the rest queue
        calls += [batch() for _ in range(9)]
        results = await asyncio.gather(*calls)

    assert first[0] == "ok" and all(result[0] == "ok" for result in results), (results, sends)
    after = [t for t in sends if t >= window_end]
    assert len(after) == 10 and sends[-11] < window_end  # nothing more landed inside
    # One probe, answered 2 ms later; only then the other nine.
    assert all(t >= after[0] + 0.002 for t in after[1:]), (after, sends, window_end)


async def test_a_punishing_upstream_in_whole_seconds_is_learnt_by_the_third_refused_probe():
    # The window grows a second with every send inside it, but its whole-second values
    # round: the first refused probe's window looks no later than the first (3 s, then
    # 3.01 s). Against the closure's first stated end, a second's growth beyond the
    # rounding shows by the second refused probe here, and by the third whatever the
    # rounding.
    window_end = 2.005
    sends: list[float] = []

    async def upstream(request: Request) -> Response:
        nonlocal window_end
        t = now()
        sends.append(t)
        if t < window_end:
            if len(sends) > 1:
                window_end += 1.0
            return Response(
                429, {"retry-after": str(math.ceil(window_end - t - 1e-9))}, RATE_LIMITED
            )
        return Response(200, {}, b"{}")

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), cooldown_ramp=0.0, limit=1
    ) as shaper:
        result = await outcome(shaper.request("GET", "/v1/models", deadline=60))
        learnt = shaper._feedback.punishes

    assert result[0] == "ok"
    assert learnt
    refused_probes = len(sends) - 2  # the first send and the last, answered
    assert refused_probes == 2, sends
    # Once learnt, the window is waited out in full: the answered send comes after it.
    assert sends[-1] >= window_end


EPOCH = 1_800_000_000.0


def dated(headers: dict[str, str]) -> dict[str, str]:
    """The headers with a ``Date`` as servers send it: the upstream's time, truncated."""
    return {**headers, "date": date_header(EPOCH + now())}


@pytest.mark.parametrize("punishes", [False, True])
async def test_dates_read_against_a_truncated_date_header_tell_a_punishing_upstream_apart(
    punishes: bool,
):
    # Retry-After as an HTTP date (rounded up to the second) and every reply's Date
    # truncated to its second, as aiohttp and nginx send it. Each refused request counts
    # against the quota and moves the window's end 4 ms later: the end crosses a whole
    # second (1.994 s to 2.002 s) while the probes knock. Read against its own truncated
    # Date, the first refusal (at 1.001 s, early in its second) stated an end at 2.001 s
    # and the second probe's (at 1.031 s) one at 3.031 s: more than the second of
    # rounding apart, taken for a punishing upstream (the real-time row 15, in half its
    # runs). A clock learnt from the Dates of the replies before reads both ends to the
    # second the upstream meant. An upstream that does punish (a second per knock) is
    # still told by the second refused probe.
    window_end = 1.990
    sends: list[float] = []

    async def upstream(request: Request) -> Response:
        nonlocal window_end
        t = now()
        sends.append(t)
        if 1.0 <= t < window_end:
            window_end += 1.0 if punishes and len(sends) > 5 else 0.004
            return Response(
                429, dated({"retry-after": http_date(EPOCH + window_end)}), RATE_LIMITED
            )
        return Response(200, dated({}), b"{}")

    async with Shaper(
        URL,
        transport=MockTransport(upstream),
        hooks=(),
        cooldown_ramp=0.0,
        limit=1,
        wall_clock=lambda: EPOCH + now(),
    ) as shaper:
        for at in (0.0, 0.3, 0.6, 0.9):  # replies at several phases of the second
            await asyncio.sleep(at - now())
            await shaper.request("GET", "/v1/models")
        await asyncio.sleep(1.001 - now())
        result = await outcome(shaper.request("GET", "/v1/models", deadline=60))
        learnt = shaper._feedback.punishes

    assert result[0] == "ok"
    assert learnt is punishes
    refused = [t for t in sends if t >= 1.0][:-1]
    if punishes:
        assert len(refused) == 3  # the first send and two probes; then the window in full
        assert sends[-1] >= window_end
    else:
        # Probed until the window ended, 10 ms after the first refusal and then twice as
        # far apart each time: never held for the window's stated whole second or more.
        assert sends[-1] < window_end + 0.7, sends


async def test_a_retry_after_of_200_s_is_probed_and_honoured_while_the_probes_are_refused():
    calls: list[float] = []

    async def upstream(request: Request) -> Response:
        calls.append(now())
        if now() < 200:
            return Response(429, {"retry-after": str(math.ceil(200 - now()))}, RATE_LIMITED)
        return Response(200, {}, b'{"ok": true}')

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), cooldown_ramp=0.0
    ) as shaper:
        response = await shaper.request("GET", "/v1/models", deadline=300)
        stats = shaper.statistics()

    assert response.attempts == 2  # the refused probes cost no attempt
    assert calls[0] == 0.0 and calls[-1] >= 200.0
    # Probes 10 ms after the 429, then twice as far apart: a handful in 200 s, not a flood.
    # (the last send is the window's end, not a probe)
    gaps = [b - a for a, b in itertools.pairwise(calls[1:-1])]
    assert all(later >= 2 * earlier - 1e-6 for earlier, later in itertools.pairwise(gaps))
    assert len(calls) <= 20
    assert stats.retried == 1


async def test_a_retry_after_past_the_deadline_ends_the_caller_at_the_429_with_the_hint():
    async def upstream(request: Request) -> Response:
        await asyncio.sleep(0.5)
        return Response(429, {"retry-after": "7"}, RATE_LIMITED)

    transport = MockTransport(upstream)
    async with Shaper(URL, transport=transport, hooks=()) as shaper:
        name, at, error = await outcome(shaper.request("GET", "/v1/models", deadline=5))

    assert name == "ThrottledError"
    assert at == 0.5  # at the 429, not at the deadline
    assert error is not None and error.retry_after == 7.0
    assert transport.calls == 1


async def test_once_a_probe_confirms_the_window_a_newcomer_past_it_is_refused_unsent():
    calls: list[float] = []

    async def upstream(request: Request) -> Response:
        calls.append(now())
        return Response(429, {"retry-after": str(math.ceil(30 - now()))}, RATE_LIMITED)

    async with Shaper(URL, transport=MockTransport(upstream), hooks=()) as shaper:
        await outcome(shaper.request("GET", "/v1/models", deadline=10))
        await asyncio.sleep(5)
        # Unconfirmed, the window may be a whole-second overstatement: it goes, as a probe.
        probed = await outcome(shaper.request("GET", "/v1/models", deadline=10))
        await asyncio.sleep(1)
        name, at, error = await outcome(shaper.request("GET", "/v1/models", deadline=10))
        stats = shaper.statistics()

    assert probed[0] == "ThrottledError"
    assert (name, at) == ("ThrottledError", 6.0)
    assert error is not None and error.retry_after == pytest.approx(24.0)
    assert calls == [0.0, 5.0]
    assert stats.shed == 1


async def test_queued_requests_whose_deadline_falls_inside_a_confirmed_cooldown_end_at_once():
    gate = asyncio.Event()

    async def upstream(request: Request) -> Response:
        await gate.wait()
        return Response(429, {"retry-after": "30"}, RATE_LIMITED)

    # One in flight, fixed: an AIMD would grow on the stall and send /b beside /a.
    async with Shaper(URL, transport=MockTransport(upstream), hooks=(), limit=1) as shaper:
        first = asyncio.create_task(outcome(shaper.request("GET", "/a", deadline=60)))
        await asyncio.sleep(1)
        short = asyncio.create_task(outcome(shaper.request("GET", "/b", deadline=10)))
        long = asyncio.create_task(outcome(shaper.request("GET", "/c", deadline=100)))
        await asyncio.sleep(1)
        gate.set()  # the 429 arrives at t=2: held until t=32, a probe at 2.01
        name, at, error = await short  # /a probes: refused, so the window is real
        long.cancel()
        await asyncio.gather(first, long, return_exceptions=True)

    assert (name, at) == ("ThrottledError", 2.01)
    assert error is not None and error.retry_after == pytest.approx(30.0)


# -- pacing by the upstream's rate-limit headers -----------------------------------------


def paced_upstream(**overrides) -> SimulatedUpstream:
    """20 requests a bucket, refilling in 2 s: replies say "remaining ~0, reset 2s" under load."""
    config = dict(
        rps=10.0,
        burst_seconds=2.0,
        latency_base=0.1,
        latency_per_token=0.0,
        wall_clock=frozen_wall_clock,
    )
    config.update(overrides)
    return SimulatedUpstream(UpstreamConfig(**config))


async def drive(upstream: SimulatedUpstream, n: int, **options) -> collections.Counter[str]:
    results: collections.Counter[str] = collections.Counter()
    async with Shaper(
        URL,
        transport=MockTransport(upstream.handle),
        hooks=(),
        max_wait=PATIENT,
        default_deadline=None,
        wall_clock=frozen_wall_clock,
        seed=1,
        **options,
    ) as shaper:

        async def one() -> None:
            name, _, _ = await outcome(
                shaper.request("POST", CHAT, json={**BODY, "max_tokens": 64})
            )
            results[name] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return results


# Anthropic's resets are whole seconds (and its remaining tokens round to the nearest
# thousand): on these small buckets, which refill in 2 s and 60 s, the refill rate they
# tell errs low by up to a tenth.
GOODPUT = [("openai", 0.95), ("anthropic", 0.90)]


@pytest.mark.parametrize(("style", "goodput"), GOODPUT)
async def test_pacing_by_the_requests_window_keeps_the_upstream_full_without_a_429(
    style, goodput
):
    upstream = paced_upstream(headers_style=style)
    results = await drive(upstream, 200)
    assert results == {"ok": 200}
    assert upstream.stats()["totals"]["429"] == 0
    # The upstream accepts its bucket of 20 at once, then 10 a second: by the last send
    # (a reply takes 0.1 s) it could have taken 20 + 10 * t.
    last_send = now() - 0.1
    assert goodput * (20 + 10 * last_send) <= 200


@pytest.mark.parametrize(("style", "goodput"), GOODPUT)
async def test_pacing_by_the_tokens_window_keeps_the_upstream_full_without_a_429(
    style, goodput
):
    # ~69 tokens a request against 6000 tokens a minute: the token quota is what binds.
    upstream = paced_upstream(rps=1000.0, tpm=6000.0, headers_style=style)
    results = await drive(upstream, 200)
    totals = upstream.stats()["totals"]
    assert results == {"ok": 200}
    assert totals["429"] == 0
    served = totals["prompt_tokens"] + totals["completion_tokens"]
    last_send = now() - 0.1
    assert served <= 6000 + 100 * last_send  # never faster than the quota refills
    assert served >= goodput * (6000 + 100 * last_send)


async def test_a_long_token_reset_still_lets_the_shaper_use_the_whole_quota():
    # A token bucket that takes six minutes to fill ("x-ratelimit-reset-tokens: 6m0s"):
    # 36 000 tokens, 100 a second. Each request costs 100 tokens and takes 1 s.
    tokens = ScheduledBucket(rate=100.0, burst=360.0)
    refused = 0

    async def upstream(request: Request) -> Response:
        nonlocal refused
        tokens.advance(now())
        headers = rate_limit_headers(
            "openai",
            requests=(10_000, 10_000, 0.0),
            tokens=(tokens.capacity, tokens.level, tokens.time_to_full()),
            wall_clock=frozen_wall_clock,
        )
        if not tokens.has(100):
            refused += 1
            return Response(429, headers, RATE_LIMITED)
        tokens.take(100)
        await asyncio.sleep(1.0)
        return Response(200, headers, b"{}")

    async with Shaper(
        URL,
        transport=MockTransport(upstream),
        hooks=(),
        max_wait=PATIENT,
        default_deadline=None,
        wall_clock=frozen_wall_clock,
    ) as shaper:
        results = await asyncio.gather(
            *(outcome(shaper.request("POST", CHAT, cost_tokens=100)) for _ in range(1000))
        )
        quota = shaper.statistics().quota

    assert quota is not None and quota.tokens.reset_after is not None
    assert [name for name, _, _ in results] == ["ok"] * 1000
    assert refused == 0
    last_send = now() - 1.0
    assert 0.95 * (36_000 + 100 * last_send) <= 1000 * 100


# -- the adaptive limit ------------------------------------------------------------------


async def test_the_limit_follows_an_upstream_concurrency_cap_down_and_back_up():
    inflight = 0

    def cap(t: float) -> int:
        return 32 if 20 <= t < 40 else 64

    async def upstream(request: Request) -> Response:
        nonlocal inflight
        if inflight >= cap(now()):
            return Response(429, {}, RATE_LIMITED)  # no Retry-After, like DeepSeek
        inflight += 1
        try:
            await asyncio.sleep(0.5)
        finally:
            inflight -= 1
        return Response(200, {}, b"{}")

    samples: list[tuple[float, int]] = []
    async with Shaper(
        URL,
        transport=MockTransport(upstream),
        hooks=(),
        default_deadline=None,
        max_attempts=10,
        retry_budget=1.0,
    ) as shaper:

        async def caller() -> None:
            while now() < 60:
                await outcome(shaper.request("GET", "/v1/models", priority="batch"))

        async def sampler() -> None:
            while now() < 60:
                samples.append((now(), shaper.statistics().limit))
                await asyncio.sleep(0.25)

        await asyncio.gather(sampler(), *(caller() for _ in range(200)))

    def phase(start: float, end: float) -> list[int]:
        return [limit for t, limit in samples if start <= t < end]

    for start, end, capacity in ((5, 20, 64), (25, 40, 32), (45, 60, 64)):
        limits = phase(start, end)
        assert 0.5 * capacity <= statistics.median(limits) <= 1.5 * capacity, (start, limits)
    assert min(limit for _, limit in samples) >= 8  # never collapsed towards the floor


async def test_a_burst_of_429s_from_one_overload_cuts_the_limit_once():
    async def upstream(request: Request) -> Response:
        await asyncio.sleep(1)
        return Response(429, {}, RATE_LIMITED)

    async with Shaper(
        URL,
        transport=MockTransport(upstream),
        hooks=(),
        limit=AIMD(initial=100),
        max_attempts=1,
    ) as shaper:
        results = await asyncio.gather(
            *(outcome(shaper.request("GET", "/v1/models")) for _ in range(100))
        )
        stats = shaper.statistics()

    assert [name for name, _, _ in results] == ["ThrottledError"] * 100
    assert stats.throttled == 100
    assert stats.limit == 50


async def test_a_queued_request_whose_deadline_outlasts_the_cooldown_keeps_its_place():
    calls: list[float] = []

    async def upstream(request: Request) -> Response:
        calls.append(now())
        if len(calls) == 1:
            await asyncio.sleep(1)
            return Response(429, {"retry-after": "5"}, RATE_LIMITED)
        return Response(200)

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), limit=AIMD(initial=1), cooldown_ramp=0
    ) as shaper:
        first = asyncio.create_task(outcome(shaper.request("GET", "/a", deadline=60)))
        await asyncio.sleep(0.5)
        queued = await outcome(shaper.request("GET", "/b", deadline=30))
        earlier = await first

    # The throttled first request retries first (it is older) as the probe, 10 ms after the
    # 429; its success reopens the gate and the queued one goes.
    assert calls == [0.0, 1.01, 1.01]
    assert queued == ("ok", 1.01, None)
    assert earlier == ("ok", 1.01, None)
