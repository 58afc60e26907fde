"""Shaped streams on virtual time: the permit lasts as long as the stream; errors in it count."""

import asyncio

import pytest

from asyncquota import AIMD, MockTransport, OverloadedError, QuotaExhaustedError, Response
from asyncquota.shaper import Shaper
from asyncquota.transport import StreamResponse

SSE = {"content-type": "text/event-stream"}


def anthropic_stream(closed: list[str], *, fail_after: int | None = None):
    async def chunks():
        try:
            yield (
                b'event: message_start\ndata: {"type": "message_start", "message": '
                b'{"usage": {"input_tokens": 30, "output_tokens": 1}}}\n\n'
            )
            for i in range(3):
                await asyncio.sleep(0.5)
                if fail_after is not None and i == fail_after:
                    yield (
                        b'event: error\ndata: {"type": "error", "error": '
                        b'{"type": "overloaded_error", "message": "Overloaded"}}\n\n'
                    )
                yield b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
            yield (
                b'event: message_delta\ndata: {"type": "message_delta", '
                b'"usage": {"output_tokens": 70}}\n\n'
            )
        finally:
            closed.append("closed")

    return chunks()


async def test_a_stream_holds_its_permit_until_it_ends_and_reconciles_its_usage():
    closed: list[str] = []
    transport = MockTransport(lambda request: StreamResponse(200, SSE, anthropic_stream(closed)))
    loop = asyncio.get_running_loop()
    async with Shaper("http://upstream.test", transport=transport, tpm=6000, hooks=()) as shaper:
        start = loop.time()
        async with shaper.stream("POST", "/v1/messages", json={"max_tokens": 500}) as events:
            names = []
            async for event in events:
                names.append(event.event)
                assert shaper.statistics().inflight == 1  # the generation is load on the upstream
        assert loop.time() - start == pytest.approx(1.5)
        assert names[0] == "message_start" and names[-1] == "message_delta"
        assert shaper.statistics().inflight == 0
        assert closed == ["closed"]
        # 100 tokens used (30 in + 70 out), not the ~500 reserved: 6000 tpm = 100 per second
        # refill, burst 100; after 1.5 s the bucket holds its burst again only if reconciled.
        assert shaper.statistics().tpm_level == pytest.approx(100.0)


async def test_an_overloaded_reply_before_the_stream_is_retried_like_any_529():
    closed: list[str] = []
    replies = iter(
        [
            Response(529, {"retry-after": "2"}, b'{"error": {"type": "overloaded_error"}}'),
            StreamResponse(200, SSE, anthropic_stream(closed)),
        ]
    )
    loop = asyncio.get_running_loop()
    async with Shaper(
        "http://upstream.test", transport=MockTransport(lambda r: next(replies)), hooks=()
    ) as shaper, shaper.stream("POST", "/v1/messages", json={}) as events:
        assert events.attempts == 2
        # The 529 held the fleet, and its retry went as the probe 10 ms later: no need to
        # sit out the 2 s the 529 asked for once the probe was let in.
        assert loop.time() == pytest.approx(0.01)
        assert len([event async for event in events]) == 5


async def test_an_overloaded_error_inside_a_200_is_a_congestion_signal_and_a_typed_error():
    closed: list[str] = []
    transport = MockTransport(
        lambda request: StreamResponse(200, SSE, anthropic_stream(closed, fail_after=1))
    )
    async with Shaper(
        "http://upstream.test", transport=transport, limit=AIMD(initial=40), hooks=()
    ) as shaper:
        seen = []
        with pytest.raises(OverloadedError, match="overloaded_error") as caught:
            async with shaper.stream("POST", "/v1/messages", json={}) as events:
                async for event in events:
                    seen.append(event.event)
        stats = shaper.statistics()
    assert seen == ["message_start", "content_block_delta"]
    assert caught.value.status == 200
    assert stats.limit == 20 and stats.throttled == 1 and stats.inflight == 0
    assert closed == ["closed"]


async def test_a_spent_account_reported_inside_a_stream_is_quota_exhaustion_with_its_regain_time():
    async def spent():
        yield b'event: message_start\ndata: {"type": "message_start"}\n\n'
        yield (
            b'event: error\ndata: {"type": "error", "error": {"type": "invalid_request_error", '
            b'"message": "You have reached your specified API usage limits. You will regain '
            b'access on 2027-01-01 at 00:00 UTC."}}\n\n'
        )

    headers = {**SSE, "request-id": "req_42"}
    transport = MockTransport(lambda request: StreamResponse(200, headers, spent()))
    async with Shaper("http://upstream.test", transport=transport, hooks=()) as shaper:
        with pytest.raises(QuotaExhaustedError) as caught:
            async with shaper.stream("POST", "/v1/messages", json={}) as events:
                assert events.headers["Request-Id"] == "req_42"  # any case
                async for _ in events:
                    pass
        stats = shaper.statistics()
    # 2027-01-01 00:00 UTC: what a gateway holds the account until before it probes again.
    assert caught.value.regain_at == 1798761600.0
    assert caught.value.status == 200 and stats.inflight == 0 and stats.throttled == 0


async def test_a_caller_leaving_early_closes_the_stream_and_frees_the_permit():
    closed: list[str] = []
    transport = MockTransport(lambda request: StreamResponse(200, SSE, anthropic_stream(closed)))
    async with Shaper(
        "http://upstream.test", transport=transport, limit=AIMD(initial=8), hooks=()
    ) as shaper:
        async with shaper.stream("POST", "/v1/messages", json={}) as events:
            async for _ in events:
                break
        stats = shaper.statistics()
    assert closed == ["closed"]  # the upstream saw the caller leave and stopped generating
    assert stats.inflight == 0 and stats.limit == 8  # nothing learnt from an abandoned stream


async def test_closing_the_shaper_ends_an_open_stream_within_the_grace_with_closed_error():
    from asyncquota import ClosedError

    async def endless():
        yield b'event: message_start\ndata: {"type": "message_start"}\n\n'
        while True:
            await asyncio.sleep(1)
            yield b'event: ping\ndata: {"type": "ping"}\n\n'

    transport = MockTransport(lambda request: StreamResponse(200, SSE, endless()))
    loop = asyncio.get_running_loop()
    shaper = Shaper("http://upstream.test", transport=transport, hooks=(), shutdown_grace=2.0)
    await shaper.__aenter__()
    read: list[str] = []

    async def reader() -> None:
        async with shaper.stream("POST", "/v1/messages", json={}) as events:
            async for event in events:
                read.append(event.event)

    task = asyncio.create_task(reader())
    await asyncio.sleep(3.5)
    closing_at = loop.time()
    await shaper.aclose()
    with pytest.raises(ClosedError):
        await task
    stats = shaper.statistics()
    assert loop.time() - closing_at == pytest.approx(2.0)  # the grace, then closed
    assert read[:2] == ["message_start", "ping"]
    assert stats.inflight == 0 and stats.open_reservations == 0
