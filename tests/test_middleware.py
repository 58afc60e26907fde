"""The aiohttp client middleware, against real local servers on loopback (real time)."""

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncquota import ThrottledError
from asyncquota.middleware import OPTION_HEADERS
from asyncquota.shaper import Shaper

pytestmark = pytest.mark.looptime(False)


class Upstream:
    """Answers 429 (Retry-After 0.1 s) to every request listed in ``throttle``, else 200."""

    def __init__(self, throttle: int = 0) -> None:
        self.throttle = throttle
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        if self.throttle:
            self.throttle -= 1
            return web.json_response(
                {"error": {"type": "requests", "code": "rate_limit_exceeded"}},
                status=429,
                headers={"Retry-After": "0.1"},
            )
        body = await request.json()
        usage = {"prompt_tokens": 3, "completion_tokens": 4}
        return web.json_response({"echo": body, "usage": usage})


async def serve(upstream: Upstream) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_a_session_with_the_middleware_is_shaped_retried_and_the_options_stay_home():
    upstream = Upstream(throttle=1)
    server = await serve(upstream)
    try:
        base = str(server.make_url("/v1"))
        async with (
            Shaper(base, hooks=()) as shaper,
            aiohttp.ClientSession(middlewares=[shaper.middleware]) as session,
            session.post(
                base + "/chat/completions",
                json={"q": "hi"},
                headers={"X-AsyncQuota-Priority": "batch", "X-AsyncQuota-Tenant": "shop-42"},
            ) as response,
        ):
            assert response.status == 200
            assert (await response.json())["echo"] == {"q": "hi"}
            stats = shaper.statistics()
        assert len(upstream.seen) == 2  # the 429, then the retry after the cooldown
        assert stats.sent == 2 and stats.ok == 1 and stats.throttled == 1 and stats.retried == 1
        for headers in upstream.seen:
            assert not {name.lower() for name in headers} & {h.lower() for h in OPTION_HEADERS}
    finally:
        await server.close()


async def test_a_request_that_stays_throttled_raises_the_typed_error():
    upstream = Upstream(throttle=10)
    server = await serve(upstream)
    try:
        base = str(server.make_url("/v1"))
        async with (
            Shaper(base, hooks=(), max_attempts=2) as shaper,
            aiohttp.ClientSession(middlewares=[shaper.middleware]) as session,
        ):
            with pytest.raises(ThrottledError) as caught:
                await session.post(base + "/chat/completions", json={"q": "hi"})
        assert caught.value.retry_after == pytest.approx(0.1)
        # The first attempt, a probe 10 ms after its 429 (refused: a probe costs the
        # request no attempt), then the second attempt.
        assert len(upstream.seen) == 3
    finally:
        await server.close()


async def test_requests_to_another_origin_pass_through_unshaped():
    upstream, other = Upstream(), Upstream()
    server, other_server = await serve(upstream), await serve(other)
    try:
        async with Shaper(str(server.make_url("/v1")), hooks=()) as shaper:
            async with (
                aiohttp.ClientSession(middlewares=[shaper.middleware]) as session,
                session.post(str(other_server.make_url("/v1/x")), json={"q": 1}) as response,
            ):
                assert response.status == 200
            assert shaper.statistics().sent == 0
        assert len(other.seen) == 1 and not upstream.seen
    finally:
        await server.close()
        await other_server.close()


async def test_a_malformed_option_header_is_a_clear_error_and_nothing_is_sent():
    upstream = Upstream()
    server = await serve(upstream)
    try:
        base = str(server.make_url("/v1"))
        async with (
            Shaper(base, hooks=()) as shaper,
            aiohttp.ClientSession(middlewares=[shaper.middleware]) as session,
        ):
            with pytest.raises(ValueError, match="X-AsyncQuota-Deadline"):
                await session.post(base + "/x", json={}, headers={"X-AsyncQuota-Deadline": "soon"})
        assert not upstream.seen
    finally:
        await server.close()


async def test_a_key_in_the_query_shows_in_no_error_event_or_log_line(caplog):
    upstream = Upstream(throttle=10)
    server = await serve(upstream)
    events = []

    class Keep:
        def on_event(self, event):
            events.append(event)

    try:
        base = str(server.make_url("/v1"))
        with caplog.at_level("DEBUG", logger="asyncquota"):
            async with (
                Shaper(base, max_attempts=2, hooks=(Keep(),)) as shaper,
                aiohttp.ClientSession(middlewares=[shaper.middleware]) as session,
            ):
                with pytest.raises(ThrottledError) as caught:
                    await session.post(base + "/models/x?key=SECRET-KEY-42", json={"q": "hi"})
        assert len(upstream.seen) == 3  # sent, key and all: twice and a probe
        shown = [str(caught.value), repr(caught.value), caplog.text, *map(repr, events)]
        assert events
        assert all("SECRET-KEY-42" not in text for text in shown)
        assert all(event.path == "/v1/models/x?key=***" for event in events)
    finally:
        await server.close()
