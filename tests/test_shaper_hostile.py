"""Hostile callers and upstreams at the Shaper's edges: refused at the call, nothing leaks.

Each class of bad input is checked once, where it enters: the caller's options when the
request is made, the upstream's headers when they are read.
"""

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asyncquota import MockTransport, QuotaError, Request, Response, Shaper
from asyncquota.admission import Admission
from asyncquota.dispatch import Dispatcher

URL = "http://upstream.test/v1"


def ok_transport(sent: list[Request] | None = None) -> MockTransport:
    def handle(request: Request) -> Response:
        if sent is not None:
            sent.append(request)
        return Response(200, {}, b"{}")

    return MockTransport(handle)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        ({"method": "GET\r\nX-Evil: 1"}, ValueError, "not a token"),
        ({"headers": {"X-Trace": "a\r\nX-Evil: 1"}}, ValueError, "control character"),
        ({"headers": {"Bad Name": "x"}}, ValueError, "not a token"),
        ({"path": "/../admin"}, ValueError, "climbs above the base path"),
        ({"path": "/%2e%2e/admin"}, ValueError, "climbs above the base path"),
        ({"path": "//elsewhere.test/x"}, ValueError, "single '/'"),
        ({"tenant": {"name": "acme"}}, TypeError, "tenant must be hashable"),
        ({"deadline": 1e-9}, ValueError, "at least 0.001 s"),
    ],
)
async def test_a_malformed_call_is_refused_at_the_call_and_nothing_is_sent(call, error, message):
    sent: list[Request] = []
    async with Shaper(URL, transport=ok_transport(sent), hooks=()) as shaper:
        arguments = {"method": "GET", "path": "/models", **call}
        with pytest.raises(error, match=message):
            await shaper.request(arguments.pop("method"), arguments.pop("path"), **arguments)
        stats = shaper.statistics()
        # The Shaper is untouched and goes on serving.
        await shaper.request("GET", "/models")
    assert [request.url for request in sent] == [URL + "/models"]
    assert stats.sent == 0 and stats.retried == 0 and stats.queued == ()


async def test_a_bad_tenant_with_the_queue_busy_leaves_the_dispatcher_serving():
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return Response(200, {}, b"{}")

    async with Shaper(URL, transport=MockTransport(slow), hooks=(), limit=1) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/a", tenant="x"))
        queued = asyncio.create_task(shaper.request("GET", "/b", tenant="y"))
        await asyncio.sleep(0.01)
        with pytest.raises(TypeError):
            await shaper.request("GET", "/c", tenant=["not", "hashable"])
        release.set()
        replies = await asyncio.gather(first, queued)
    assert [reply.status for reply in replies] == [200, 200]


def test_a_password_in_the_base_url_shows_nowhere():
    shaper = Shaper("https://user:s3cr3t-pw@upstream.test/v1", transport=ok_transport())
    assert "s3cr3t-pw" not in repr(shaper)
    with pytest.raises(ValueError) as raised:
        Shaper("ftp://user:s3cr3t-pw@upstream.test/v1")
    assert "s3cr3t-pw" not in str(raised.value)


async def test_a_shaper_used_from_a_second_loop_says_so_at_once():
    async with Shaper(URL, transport=ok_transport(), hooks=()) as shaper:
        outcome: list[BaseException] = []

        def elsewhere() -> None:
            async def call() -> None:
                try:
                    await shaper.request("GET", "/models")
                except BaseException as exc:
                    outcome.append(exc)

            asyncio.run(call())

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await asyncio.to_thread(thread.join)
        await shaper.request("GET", "/models")  # its own loop is unharmed
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError)
    assert "another event loop" in str(outcome[0])


REMAINING = "x-ratelimit-remaining-requests"
HEADER_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["²", "¹²³", "٣٤", "9" * 5000, "-1", "1e999", "nan", "inf", " 7 ", ""]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(remaining=HEADER_TEXT, limit=HEADER_TEXT, reset=HEADER_TEXT)
@example(remaining="0", limit="", reset="1")  # honest headers that hold the line (found)
def test_no_rate_limit_header_an_upstream_sends_can_fail_a_request_or_leak_a_permit(
    remaining, limit, reset
):
    headers = {
        REMAINING: remaining,
        "x-ratelimit-limit-requests": limit,
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-remaining-tokens": remaining,
    }

    async def main() -> None:
        transport = MockTransport(lambda request: Response(200, headers, b"{}"))
        async with Shaper(URL, transport=transport, hooks=(), limit=2) as shaper:
            replies = await asyncio.gather(
                *(shaper.request("GET", "/models") for _ in range(6)), return_exceptions=True
            )
            stats = shaper.statistics()
        # Every request ends once: served, or (headers that do parse, e.g. "0 left, reset in
        # 1 s", may hold the line past the 2 s an interactive request waits) told "busy,
        # retry in N s". Never an untyped error, never a leaked permit or reservation.
        served = [r for r in replies if not isinstance(r, BaseException)]
        refused = [r for r in replies if isinstance(r, BaseException)]
        assert [r.status for r in served] == [200] * len(served)
        assert len(served) >= 2  # the first two go out before any header is read
        assert all(isinstance(r, QuotaError) and r.retry_after is not None for r in refused)
        left = remaining.strip()
        digits = left.lstrip("0")
        if not (left.isascii() and left.isdigit() and len(digits) <= 1 and int(digits or 0) < 6):
            assert not refused  # only a count showing less than the six may hold any back
        assert stats.inflight == 0 and stats.open_reservations == 0

    asyncio.run(main())


async def test_an_absurd_retry_after_holds_at_most_max_cooldown_and_an_operator_can_reopen():
    calls: list[float] = []
    back = False
    loop = asyncio.get_running_loop()

    async def upstream(request: Request) -> Response:
        calls.append(loop.time())
        if not back:
            return Response(429, {"retry-after": "1e12"}, b'{"error": {"type": "requests"}}')
        return Response(200, {}, b"{}")

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), max_cooldown=600, max_retry_after=1e6
    ) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/a", deadline=100_000))
        await asyncio.sleep(1)
        held = shaper.cooldown_remaining()
        probing = shaper.statistics().cooldown_probing
        probes = len(calls) - 1
        back = True
        shaper.reopen()  # the operator knows the quota is back
        reply = await first
    assert 0 < held <= 600  # not the 1e12 s (nor the day) the reply asked for
    assert probing  # and statistics() says why nothing goes
    assert 5 <= probes <= 10  # probing all along, ever further apart
    assert reply.status == 200 and calls[-1] == pytest.approx(1.0)


async def test_a_usage_no_request_could_have_used_does_not_freeze_the_token_gate():
    huge = b'{"usage": {"prompt_tokens": 50000000, "completion_tokens": 1}}'
    answers = iter([Response(200, {}, huge)] + [Response(200, {}, b"{}")] * 10)
    loop = asyncio.get_running_loop()
    async with Shaper(
        URL, transport=MockTransport(lambda request: next(answers)), hooks=(), tpm=60_000
    ) as shaper:
        await shaper.request("POST", "/chat", json={"max_tokens": 100}, deadline=60)
        started = loop.time()
        await shaper.request("POST", "/chat", json={"max_tokens": 100}, deadline=60)
        waited = loop.time() - started
    # Charged at most 4 x its estimate + 1 024 tokens: a few seconds of a 1 000/s gate,
    # not the 14 hours 5e7 tokens would take.
    assert waited < 10


async def test_the_dispatcher_survives_one_request_it_cannot_hand_a_turn(caplog, monkeypatch):
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return Response(200, {}, b"{}")

    grant = Dispatcher._grant

    def broken_for_b(self, ticket, probe, now):  # a bug that strikes one request only
        grant(self, ticket, probe, now)
        if ticket.path == "/b":
            raise RuntimeError("boom")

    monkeypatch.setattr(Dispatcher, "_grant", broken_for_b)
    async with Shaper(URL, transport=MockTransport(slow), hooks=(), limit=1) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/a"))
        doomed = asyncio.create_task(shaper.request("GET", "/b"))
        after = asyncio.create_task(shaper.request("GET", "/c"))
        await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(first, doomed, after, return_exceptions=True)
        stats = shaper.statistics()
    # /b was admitted before the failure: its grant was its own, and it was served.
    assert [getattr(r, "status", None) for r in results] == [200, 200, 200]
    assert stats.inflight == 0 and stats.open_reservations == 0
    assert "could not hand a request its turn" in caplog.text


async def test_a_request_the_dispatcher_fails_on_ends_with_an_error_and_the_rest_go_on(
    caplog, monkeypatch
):
    async def one_second(request: Request) -> Response:
        await asyncio.sleep(1)
        return Response(200, {}, b"{}")

    def broken(self, ticket, left):  # a bug on the way to refusing one request
        raise RuntimeError("boom")

    monkeypatch.setattr(Admission, "too_late", broken)
    async with Shaper(
        URL, transport=MockTransport(one_second), hooks=(), limit=1, max_wait={"interactive": 60}
    ) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/a"))
        # Due in 1.5 s, reached at 1 s with a reply taking 1 s: refused, by the broken path.
        doomed = asyncio.create_task(shaper.request("GET", "/b", deadline=1.5))
        after = asyncio.create_task(shaper.request("GET", "/c"))
        results = await asyncio.gather(first, doomed, after, return_exceptions=True)
        stats = shaper.statistics()
    assert isinstance(results[1], QuotaError) and results[1].reason == "internal_error"
    assert [getattr(r, "status", None) for r in (results[0], results[2])] == [200, 200]
    assert stats.inflight == 0 and stats.open_reservations == 0
    assert "could not hand a request its turn" in caplog.text


async def test_cancelled_requests_are_counted_and_statistics_work_from_another_thread():
    async def slow(request: Request) -> Response:
        await asyncio.sleep(10)
        return Response(200, {}, b"{}")

    async with Shaper(URL, transport=MockTransport(slow), hooks=()) as shaper:
        calls = [asyncio.create_task(shaper.request("GET", "/models")) for _ in range(3)]
        await asyncio.sleep(1)
        calls[0].cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        from_thread = await asyncio.to_thread(shaper.statistics)
    assert from_thread.cancelled == 1
    assert from_thread.sent == 3 and from_thread.ok == 2
    assert from_thread.sent == from_thread.ok + from_thread.cancelled


async def test_nothing_left_for_a_thousand_hours_holds_sends_a_minute_at_most():
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    def upstream(request: Request) -> Response:
        calls.append(loop.time())
        headers = {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "0" if len(calls) == 1 else "99",
            "x-ratelimit-reset-requests": "1000h0m0s" if len(calls) == 1 else "10ms",
        }
        return Response(200, headers, b"{}")

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=(), max_wait={"interactive": 120}
    ) as shaper:
        await shaper.request("GET", "/models")
        await shaper.request("GET", "/models", deadline=120)
    assert calls[0] == 0.0 and 0 < calls[1] <= 60.0


async def test_a_reply_over_the_body_cap_is_not_fetched_again():
    from asyncquota import TransportError

    calls = 0

    def too_large(request: Request) -> Response:
        nonlocal calls
        calls += 1
        raise TransportError("The reply's body is over the cap.", reason="body_too_large")

    async with Shaper(URL, transport=MockTransport(too_large), hooks=()) as shaper:
        with pytest.raises(TransportError) as raised:
            await shaper.request("GET", "/huge")
    assert raised.value.reason == "body_too_large" and calls == 1
