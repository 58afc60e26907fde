"""The Shaper's surface for senders of their own: ``shape`` and ``lease`` (virtual time)."""

import asyncio

import pytest

from asyncquota import Fixed, MockTransport, RequestOptions, Response, Shaper, TransportError
from asyncquota.transport import Request

URL = "https://api.example.com"


def unused(request: Request) -> Response:
    raise AssertionError("the Shaper's own transport is not used by shape() or lease()")


async def test_shape_sends_each_attempt_through_the_callers_sender_within_the_deadline():
    budgets: list[float | None] = []
    sent_at: list[float] = []
    replies = [Response(429, {"retry-after": "2"}, b"{}"), Response(200, {}, b'{"ok": 1}')]
    loop = asyncio.get_running_loop()

    async def send(budget: float | None) -> Response:
        budgets.append(budget)
        sent_at.append(loop.time())
        return replies.pop(0)

    async with Shaper(URL, transport=MockTransport(unused), hooks=(), timeout=30) as shaper:
        reply = await shaper.shape(
            send, method="post", path="/v1/chat?key=secret", options=RequestOptions(deadline=10)
        )
        stats = shaper.statistics()
    assert reply.status == 200 and reply.attempts == 2
    # The first attempt may take the deadline (10 s, under the 30 s timeout); the retry
    # (a probe of the cooldown, sent early), what is left of it.
    assert sent_at[0] == 0.0 and sent_at[1] > 0.0
    assert budgets == pytest.approx([10.0, 10.0 - sent_at[1]])
    assert stats.sent == 2 and stats.throttled == 1 and stats.ok == 1


async def test_shape_turns_a_senders_transport_error_into_a_retry_then_its_error():
    calls = 0

    async def send(budget: float | None) -> Response:
        nonlocal calls
        calls += 1
        raise TransportError("connection reset", reason="connection_reset")

    async with Shaper(URL, transport=MockTransport(unused), hooks=(), max_attempts=2) as shaper:
        with pytest.raises(TransportError) as caught:
            await shaper.shape(send, method="GET", path="/v1/models", options=RequestOptions())
    assert calls == 2 and caught.value.reason == "connection_reset"


async def test_a_lease_holds_its_permit_until_it_is_ended_once():
    async def send(budget: float | None) -> Response:
        return Response(200, {}, b"")

    async with Shaper(URL, transport=MockTransport(unused), hooks=(), limit=Fixed(1)) as shaper:
        reply, lease = await shaper.lease(
            send, method="POST", path="/v1/messages", options=RequestOptions(cost_tokens=50)
        )
        assert reply.status == 200 and lease.open
        held = shaper.statistics()
        assert held.inflight == 1 and held.open_reservations == 1
        # The only permit is held: another request waits for it.
        other = asyncio.create_task(
            shaper.shape(send, method="GET", path="/x", options=RequestOptions())
        )
        await asyncio.sleep(1)
        assert not other.done()
        lease.end("success", used_tokens=80)
        lease.end("dropped")  # a second end does nothing
        assert (await other).status == 200
        after = shaper.statistics()
    assert not lease.open
    assert after.inflight == 0 and after.open_reservations == 0


async def test_closing_the_shaper_ends_the_open_leases_telling_their_holders_first():
    async def send(budget: float | None) -> Response:
        return Response(200, {}, b"")

    told: list[str] = []
    async with Shaper(URL, transport=MockTransport(unused), hooks=(), shutdown_grace=1) as shaper:
        _, quiet = await shaper.lease(send, method="GET", path="/a", options=RequestOptions())
        _, watched = await shaper.lease(send, method="GET", path="/b", options=RequestOptions())

        async def on_shutdown() -> None:
            told.append("b")
            watched.end("ignore")

        watched.on_shutdown = on_shutdown
    assert told == ["b"]
    assert not quiet.open and not watched.open
    assert shaper.statistics().inflight == 0


# -- events nobody hears are not made ----------------------------------------------------


async def test_a_logging_hook_gets_only_the_events_its_logger_would_log():
    import logging

    from asyncquota import LoggingHook, RejectedError
    from asyncquota.hooks import Completed, Shed

    heard: list[object] = []

    class Recording(LoggingHook):
        def on_event(self, event) -> None:
            heard.append(event)
            super().on_event(event)

    log = logging.getLogger("asyncquota.test.quiet")

    async def upstream(request: Request) -> Response:
        return Response(200, {}, b"{}")

    async with Shaper(
        "http://upstream.test", transport=MockTransport(upstream), hooks=(Recording(log),)
    ) as shaper:
        shaper.shed_below("interactive", for_seconds=60)  # refused at once
        for level, expected in (
            (logging.WARNING, []),  # neither the Shed (INFO) nor Completed (DEBUG) is made
            (logging.INFO, [Shed]),
            (logging.DEBUG, [Shed, Completed]),
        ):
            log.setLevel(level)
            heard.clear()
            with pytest.raises(RejectedError):
                await shaper.request("GET", "/v1/models")
            assert [type(event) for event in heard] == expected, level
