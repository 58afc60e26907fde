"""The transport edge: SSE parsing, the mock upstream (virtual time) and aiohttp (real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from asyncquota import ThrottledError, TransportError
from asyncquota.http1 import HttpTransport
from asyncquota.transport import (
    AiohttpTransport,
    MockTransport,
    Request,
    Response,
    SSEEvent,
    SSEParser,
    StreamResponse,
)

OVERLOADED = orjson.dumps(
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
).decode()


def parse(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.flush()


# --- SSE parsing: pure, no loop ---------------------------------------------------------------


def test_sse_joins_data_lines_skips_comments_and_reads_the_event_and_id_fields():
    stream = (
        b': keep-alive\nevent: message_start\nid: 7\ndata: {"a":\ndata:  1}\n\ndata: [DONE]\n\n'
    )
    assert parse(stream) == [
        SSEEvent("message_start", '{"a":\n 1}', "7"),
        SSEEvent(None, "[DONE]", "7"),
    ]


def test_sse_accepts_crlf_and_cr_line_ends_and_dispatches_a_final_event_without_blank_line():
    assert parse(b"event: ping\r\ndata: a\r\n\r\ndata: b\rdata: c\r\rdata: last") == [
        SSEEvent("ping", "a"),
        SSEEvent(None, "b\nc"),
        SSEEvent(None, "last"),
    ]


def test_sse_a_crlf_split_between_two_chunks_is_one_line_end():
    assert parse(b"data: a\r", b"\n", b"\r", b"\ndata: b\r\n\r\n") == [
        SSEEvent(None, "a"),
        SSEEvent(None, "b"),
    ]


def test_sse_ignores_events_without_data_a_bom_unknown_fields_and_ids_with_nul():
    stream = "\ufeffevent: lonely\n\nretry: 10\nfoo: bar\nid: a\x00b\ndata\n\n".encode()
    assert parse(stream) == [SSEEvent(None, "")]


def test_sse_a_multibyte_character_split_across_chunks_survives_and_garbage_is_replaced():
    text = "data: héllo ✓\n\n".encode()
    assert parse(text[:8], text[8:13], text[13:]) == [SSEEvent(None, "héllo ✓")]
    assert parse(b"data: \xff\n\n") == [SSEEvent(None, "\ufffd")]


field_value = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\x00"))
sse_events = st.lists(
    st.tuples(
        st.none() | field_value.filter(bool),
        st.lists(field_value, min_size=1, max_size=3),
        st.none() | field_value.filter(bool),
    ),
    max_size=5,
)


@given(
    events=sse_events,
    line_end=st.sampled_from(["\n", "\r\n", "\r"]),
    final_blank_line=st.booleans(),
    data=st.data(),
)
def test_sse_any_split_of_a_valid_stream_gives_the_same_events(
    events, line_end, final_blank_line, data
):
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id = None
    for name, data_lines, event_id in events:
        lines.append(": a comment")
        if name is not None:
            lines.append(f"event: {name}")
        if event_id is not None:
            lines.append(f"id: {event_id}")
            last_id = event_id
        lines.extend(f"data: {line}" for line in data_lines)
        lines.append("")
        expected.append(SSEEvent(name, "\n".join(data_lines), last_id))
    if lines and not final_blank_line:
        lines.pop()
    stream = line_end.join(lines).encode() + (line_end.encode() if lines else b"")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert parse(*chunks) == expected
    assert parse(stream) == expected


# --- MockTransport: virtual time --------------------------------------------------------------


def post(url: str = "https://api.example/v1/chat", **kwargs) -> Request:
    return Request("POST", url, {"content-type": "application/json"}, b"{}", **kwargs)


async def test_a_mock_answers_with_its_handler_plain_or_async_and_counts_the_calls():
    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.5)
        return Response(200, {"X-RateLimit-Remaining-Requests": "59"}, request.body or b"")

    loop = asyncio.get_running_loop()
    transport = MockTransport(slow)
    response = await transport.send(post())
    assert loop.time() == 1.5
    assert response.json() == {}
    assert response.headers["x-ratelimit-remaining-requests"] == "59"

    plain = MockTransport(lambda request: Response(204))
    assert (await plain.send(post())).status == 204
    assert (await plain.send(post())).ok
    assert plain.calls == 2
    assert repr(plain) == "<MockTransport open calls=2 in_flight=0 failures=0>"


async def test_a_mock_slower_than_the_attempt_timeout_fails_exactly_at_the_timeout():
    async def hang(request: Request) -> Response:
        await asyncio.sleep(60)
        return Response(200)

    transport = MockTransport(hang)
    with pytest.raises(TransportError) as caught:
        await transport.send(post(timeout=2.5))
    assert asyncio.get_running_loop().time() == 2.5
    assert caught.value.reason == "timeout"
    assert str(caught.value) == (
        "POST https://api.example/v1/chat did not get a complete reply within 2.5 s."
    )
    assert transport.statistics().failures == 1


async def test_a_handler_raising_a_reset_becomes_a_transport_error_and_a_quota_error_passes():
    def reset(request: Request) -> Response:
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(TransportError) as caught:
        await MockTransport(reset).send(post())
    assert caught.value.reason == "connection_lost"
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert caught.value.status is None

    throttled = ThrottledError("Slow down.", status=429, retry_after=7)

    def throttle(request: Request) -> Response:
        raise throttled

    transport = MockTransport(throttle)
    with pytest.raises(ThrottledError) as passed:
        await transport.send(post())
    assert passed.value is throttled
    assert transport.statistics().failures == 1


async def test_an_error_message_never_shows_the_headers_or_the_query_where_keys_live():
    def refuse(request: Request) -> Response:
        raise ConnectionRefusedError(f"Connect call failed for {request.url}")

    request = Request(
        "POST",
        "https://user:pw@generativelanguage.example/v1/models:generate?key=AIza-secret",
        {"Authorization": "Bearer sk-secret"},
    )
    with pytest.raises(TransportError) as caught:
        await MockTransport(refuse).send(request)
    message = str(caught.value)
    assert caught.value.reason == "connect_failed"
    assert "secret" not in message
    assert "pw" not in message
    assert message.startswith(
        "Could not connect to the upstream for POST "
        "https://***@generativelanguage.example/v1/models:generate?key=*** ("
    )


async def test_a_closed_mock_refuses_to_send():
    transport = MockTransport(lambda request: Response(200))
    await transport.aclose()
    assert transport.closed
    with pytest.raises(TransportError, match="closed") as caught:
        await transport.send(post())
    assert caught.value.reason == "closed"
    with pytest.raises(TransportError, match="closed"):
        await transport.open_stream(post())
    assert transport.calls == 0


async def test_a_mock_streams_events_over_virtual_time_including_an_in_stream_error():
    loop = asyncio.get_running_loop()
    finished = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"event: message_start\ndata: {}\n\n"
        await asyncio.sleep(2)
        yield b"event: error\ndata: " + OVERLOADED.encode()
        await asyncio.sleep(1)
        yield b"\n\n"
        finished.append(loop.time())

    transport = MockTransport(
        lambda request: StreamResponse(200, {"Content-Type": "text/event-stream"}, chunks())
    )
    seen = []
    async with await transport.open_stream(post()) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert transport.statistics().in_flight == 1
        async for event in stream.events():
            seen.append((loop.time(), event))
    assert seen == [
        (0.0, SSEEvent("message_start", "{}")),
        (3.0, SSEEvent("error", OVERLOADED)),
    ]
    assert orjson.loads(seen[1][1].data)["error"]["type"] == "overloaded_error"
    assert finished == [3.0]
    assert stream.closed
    assert transport.statistics().in_flight == 0


async def test_a_mock_reply_serves_either_call_a_body_as_one_chunk_a_stream_read_whole():
    sse = MockTransport(lambda request: Response(200, body=b"data: a\n\ndata: [DONE]\n\n"))
    stream = await sse.open_stream(post())
    assert [event.data async for event in stream.events()] == ["a", "[DONE]"]
    assert stream.closed

    chunked = MockTransport(lambda request: StreamResponse(429, chunks=[b'{"error":', b" 1}"]))
    response = await chunked.send(post())
    assert (response.status, response.json()) == (429, {"error": 1})

    error_stream = await chunked.open_stream(post())
    assert await error_stream.read() == b'{"error": 1}'
    assert error_stream.closed
    assert await error_stream.read() == b""


async def test_closing_a_mock_stream_early_ends_its_generator_and_a_silent_stream_times_out():
    loop = asyncio.get_running_loop()
    left_at = []

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: tick\n\ndata: cut"
                await asyncio.sleep(1)
                yield b" off\n\n"
        finally:
            left_at.append(loop.time())

    transport = MockTransport(lambda request: StreamResponse(200, chunks=endless()))
    stream = await transport.open_stream(post())
    events = stream.events()
    assert (await anext(events)).data == "tick"
    assert (await anext(events)).data == "cut off"
    assert (await anext(events)).data == "tick"
    await stream.aclose()
    assert left_at == [1.0]
    assert [event async for event in events] == []

    async def stalls() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        await asyncio.sleep(30)
        yield b"data: never\n\n"

    silent = MockTransport(lambda request: StreamResponse(200, chunks=stalls()))
    stream = await silent.open_stream(post(timeout=4))
    received = []
    with pytest.raises(TransportError) as caught:
        async for event in stream.events():
            received.append(event.data)
    assert received == ["first"]
    assert loop.time() == 1.0 + 4
    assert caught.value.reason == "timeout"
    assert "went silent" in str(caught.value)
    assert stream.closed
    assert silent.statistics().in_flight == 0
    assert silent.statistics().failures == 1


async def test_a_connection_reset_mid_stream_is_a_transport_error_and_closes_the_stream():
    async def drops() -> AsyncIterator[bytes]:
        yield b"data: partial\n\n"
        raise ConnectionResetError("reset")

    transport = MockTransport(lambda request: StreamResponse(200, chunks=drops()))
    stream = await transport.open_stream(post())
    with pytest.raises(TransportError) as caught:
        [event async for event in stream.events()]
    assert caught.value.reason == "connection_lost"
    assert stream.closed
    assert transport.statistics().in_flight == 0


async def test_cancelling_mock_attempts_at_random_leaks_nothing():
    rng = random.Random(20240611)
    loop = asyncio.get_running_loop()

    async def handler(request: Request) -> Response | StreamResponse:
        await asyncio.sleep(rng.uniform(0.1, 2))
        if request.method == "GET":
            return Response(200)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                await asyncio.sleep(0.5)
                yield b"data: x\n\n"

        return StreamResponse(200, chunks=chunks())

    transport = MockTransport(handler)

    async def stream_all() -> int:
        async with await transport.open_stream(Request("POST", "http://up/")) as stream:
            return len([event async for event in stream.events()])

    tasks = [
        asyncio.create_task(transport.send(Request("GET", "http://up/")))
        if i % 2
        else asyncio.create_task(stream_all())
        for i in range(40)
    ]
    doomed = rng.sample(tasks, 20)
    for task in doomed:
        loop.call_later(rng.uniform(0, 4), task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    survivors = [r for t, r in zip(tasks, results, strict=True) if t not in doomed]
    assert all(not isinstance(r, BaseException) for r in survivors)
    assert any(isinstance(r, asyncio.CancelledError) for r in results)
    stats = transport.statistics()
    assert stats.in_flight == 0
    assert stats.requests_sent == 40
    assert stats.failures == 0


def test_configuration_is_validated_with_sentences():
    with pytest.raises(ValueError, match="max_connections must be at least 1, not 0"):
        AiohttpTransport(max_connections=0)
    with pytest.raises(ValueError, match="max_connections must be an integer"):
        AiohttpTransport(max_connections=True)
    with pytest.raises(ValueError, match="connect_timeout must be positive"):
        AiohttpTransport(connect_timeout=0)
    with pytest.raises(ValueError, match="keepalive must be positive"):
        AiohttpTransport(keepalive=-1)
    with pytest.raises(ValueError, match="handler must be callable"):
        MockTransport(42)  # type: ignore[arg-type]


def test_an_unused_transport_opens_nothing_and_says_so():
    transport = AiohttpTransport(max_connections=8)
    assert repr(transport) == (
        "<AiohttpTransport open connections=0/8 in_use=0 in_flight=0 sent=0 failures=0>"
    )


# --- AiohttpTransport: a real local server on loopback, real time ------------------------------

real_time = pytest.mark.looptime(False)


@pytest.fixture(params=[AiohttpTransport, HttpTransport], ids=["aiohttp", "http1"])
def make(request: pytest.FixtureRequest) -> type[AiohttpTransport | HttpTransport]:
    """Each pool the library ships: the same behaviour is asked of both."""
    return request.param  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serving(routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]):
    """An aiohttp server on 127.0.0.1 (a free port); yields its base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(reply: bytes, *, reset: bool = False):
    """A TCP server that reads one request head, writes ``reply`` as is, then hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        if reset:
            # Linger 0 turns the close into a TCP RST: a reset, not an orderly goodbye.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@real_time
async def test_a_pool_round_trips_json_with_case_insensitive_headers_over_one_kept_connection(make):
    async def echo(request: web.Request) -> web.Response:
        payload = await request.json()
        return web.json_response(
            {"echo": payload, "auth": request.headers["AUTHORIZATION"]},
            headers={"X-RateLimit-Remaining-Requests": "41"},
        )

    async with serving({"/v1/chat": echo}) as url:
        transport = make(max_connections=4)
        request = Request(
            "POST",
            f"{url}/v1/chat",
            {"Authorization": "Bearer sk-test", "Content-Type": "application/json"},
            orjson.dumps({"messages": ["héllo"]}),
            timeout=2,
        )
        first = await transport.send(request)
        second = await transport.send(request)
        assert first.status == 200
        assert first.json() == {"echo": {"messages": ["héllo"]}, "auth": "Bearer sk-test"}
        assert first.headers["x-ratelimit-remaining-requests"] == "41"
        assert second.body == first.body
        stats = transport.statistics()
        assert (stats.requests_sent, stats.failures, stats.in_flight) == (2, 0, 0)
        assert (stats.connections_open, stats.connections_in_use) == (1, 0)
        assert stats.connection_limit == 4
        assert "connections=1/4 in_use=0" in repr(transport)
        await transport.aclose()
        assert transport.closed
        with pytest.raises(TransportError, match="closed"):
            await transport.send(request)


@real_time
async def test_a_pool_a_hanging_upstream_fails_at_the_attempt_timeout(make):
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    async with serving({"/": hang}) as url:
        transport = make()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportError) as caught:
            await transport.send(Request("GET", f"{url}/", timeout=0.2))
        assert 0.2 <= loop.time() - started < 1.0
        assert caught.value.reason == "timeout"
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert transport.statistics().connections_in_use == 0

        started = loop.time()
        with pytest.raises(TransportError) as caught:
            await transport.open_stream(Request("GET", f"{url}/", timeout=0.2))
        assert 0.2 <= loop.time() - started < 1.0
        assert caught.value.reason == "timeout"
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.in_flight, stats.failures) == (0, 0, 2)
        await transport.aclose()


@real_time
@pytest.mark.parametrize(
    ("reply", "reset", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", False, "connection_lost"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", True, "connection_lost"),
        (b"", True, "connection_lost"),
        (b"", False, "connection_lost"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False, "bad_reply"),
    ],
    ids=["closed-mid-body", "reset-mid-body", "reset-before-reply", "hung-up", "not-http"],
)
async def test_a_pool_a_broken_reply_is_a_transport_error(make, reply, reset, reason):
    async with raw_server(reply, reset=reset) as url:
        transport = make()
        with pytest.raises(TransportError) as caught:
            await transport.send(Request("GET", f"{url}/?key=secret", timeout=2))
        assert caught.value.reason == reason
        if make is AiohttpTransport:
            assert isinstance(caught.value.__cause__, aiohttp.ClientError)
        assert "secret" not in str(caught.value)
        assert transport.statistics().failures == 1
        await transport.aclose()


@real_time
async def test_a_pool_a_refused_connection_is_a_transport_error(make):
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        transport = make()
        with pytest.raises(TransportError) as caught:
            await transport.send(Request("GET", f"http://127.0.0.1:{port}/", timeout=2))
        await transport.aclose()
    assert caught.value.reason == "connect_failed"
    cause = aiohttp.ClientConnectorError if make is AiohttpTransport else ConnectionRefusedError
    assert isinstance(caught.value.__cause__, cause)


@real_time
async def test_a_pool_cancelling_the_caller_cancels_the_upstream_request_and_frees_the_socket(make):
    entered = asyncio.Event()
    disconnected = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            disconnected.set()
            raise
        return web.Response()

    async with serving({"/": slow}) as url:
        transport = make()
        caller = asyncio.create_task(transport.send(Request("GET", f"{url}/", timeout=10)))
        await asyncio.wait_for(entered.wait(), 2)
        assert transport.statistics().connections_in_use == 1
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(disconnected.wait(), 2)
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.in_flight, stats.failures) == (0, 0, 0)
        await transport.aclose()


@real_time
async def test_a_pool_fifty_callers_never_open_more_than_max_connections(make):
    active = peak = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return web.Response(text="ok")

    async with serving({"/": slow}) as url:
        transport = make(max_connections=4)
        request = Request("GET", f"{url}/", timeout=5)
        responses = await asyncio.gather(*(transport.send(request) for _ in range(50)))
        assert [r.body for r in responses] == [b"ok"] * 50
        assert peak == 4
        stats = transport.statistics()
        assert stats.connections_open <= 4
        assert stats.requests_sent == 50
        await transport.aclose()


async def sse_handler(request: web.Request) -> web.StreamResponse:
    if request.query.get("fail"):
        return web.json_response({"error": {"type": "rate_limit_error"}}, status=429)
    reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await reply.prepare(request)
    await reply.write(b"event: message_start\r\ndata: {}\r\n\r\n: ping\r\n")
    await asyncio.sleep(0.01)
    await reply.write(b'event: content_block_delta\ndata: {"text":')
    await reply.write(b' "hi"}\n\nevent: error\ndata: ' + OVERLOADED.encode() + b"\n\n")
    if request.query.get("endless"):
        while True:
            await asyncio.sleep(0.01)
            await reply.write(b"data: tick\n\n")
    await reply.write_eof()
    return reply


@real_time
async def test_a_pool_streams_sse_events_with_an_in_stream_error_then_releases_the_socket(make):
    async with serving({"/": sse_handler}) as url:
        transport = make()
        async with await transport.open_stream(Request("POST", f"{url}/", timeout=2)) as stream:
            assert stream.ok
            assert stream.headers["content-type"] == "text/event-stream"
            events = [event async for event in stream.events()]
        assert events == [
            SSEEvent("message_start", "{}"),
            SSEEvent("content_block_delta", '{"text": "hi"}'),
            SSEEvent("error", OVERLOADED),
        ]
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.connections_open, stats.in_flight) == (0, 1, 0)

        refused = await transport.open_stream(Request("POST", f"{url}/?fail=1", timeout=2))
        assert refused.status == 429
        assert orjson.loads(await refused.read()) == {"error": {"type": "rate_limit_error"}}
        assert refused.closed
        await transport.aclose()


@real_time
async def test_a_pool_leaving_a_stream_early_drops_its_connection(make):
    async with serving({"/": sse_handler}) as url:
        transport = make()
        request = Request("GET", f"{url}/?endless=1", timeout=2)
        async with await transport.open_stream(request) as stream:
            async for event in stream.events():
                if event.data == "tick":
                    break
            assert transport.statistics().connections_in_use == 1
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.connections_open, stats.in_flight) == (0, 0, 0)
        await transport.aclose()


@real_time
async def test_a_pool_a_stream_cut_off_mid_body_is_a_transport_error_and_frees_the_socket(make):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    cut = head + b"\r\nf\r\ndata: partial\n\n\r\n8\r\ndata"
    async with raw_server(cut, reset=True) as url:
        transport = make()
        stream = await transport.open_stream(Request("POST", f"{url}/", timeout=2))
        received = []
        with pytest.raises(TransportError) as caught:
            async for event in stream.events():
                received.append(event.data)
        assert received == ["partial"]
        assert caught.value.reason == "connection_lost"
        assert stream.closed
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.in_flight, stats.failures) == (0, 0, 1)
        await transport.aclose()


@real_time
async def test_aiohttp_a_session_passed_in_is_used_and_left_open_for_its_owner():
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with serving({"/": ok}) as url, aiohttp.ClientSession() as session:
        transport = AiohttpTransport(session=session)
        assert (await transport.send(Request("GET", f"{url}/", timeout=2))).body == b"ok"
        assert transport.statistics().connection_limit == 100
        await transport.aclose()
        assert not session.closed


def test_a_pool_round_trip_on_uvloop(make):
    async def main() -> tuple[int, bytes, bool]:
        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"loop": type(asyncio.get_running_loop()).__module__})

        async with serving({"/": ok}) as url:
            transport = make(max_connections=2)
            response = await transport.send(Request("GET", f"{url}/", timeout=2))
            await transport.aclose()
        return response.status, response.body, isinstance(asyncio.get_running_loop(), uvloop.Loop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        status, body, on_uvloop = runner.run(main())
    assert (status, orjson.loads(body), on_uvloop) == (200, {"loop": "uvloop"}, True)


# --- Bounds: a reply body, a streamed event ---------------------------------------------------


async def endless_body(request: web.Request) -> web.StreamResponse:
    """A 200 whose body never ends (chunked), or declares a huge Content-Length."""
    reply = web.StreamResponse()
    if request.query.get("declared"):
        reply.content_length = 10**12
    elif request.query.get("sse"):
        reply.content_type = "text/event-stream"
    await reply.prepare(request)
    chunk = b"data: " if request.query.get("sse") else b"x"
    while True:  # the client must give up first
        await reply.write(chunk + b"y" * 16_384)
        await asyncio.sleep(0)


@real_time
@pytest.mark.parametrize("query", ["", "?declared=1"], ids=["chunked", "content-length"])
async def test_a_pool_a_body_past_the_cap_is_a_transport_error_and_its_connection_is_dropped(
    make, query
):
    async with serving({"/": endless_body, "/ok": _ok}) as url:
        transport = make(max_body_bytes=100_000)
        with pytest.raises(TransportError) as caught:
            await transport.send(Request("GET", f"{url}/{query}", timeout=5))
        assert caught.value.reason == "body_too_large"
        assert "100000" in str(caught.value)
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.connections_open, stats.in_flight) == (0, 0, 0)
        assert stats.failures == 1
        # A body at the cap still arrives whole.
        reply = await transport.send(Request("GET", f"{url}/ok", timeout=5))
        assert reply.body == b"z" * 100_000
        await transport.aclose()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(body=b"z" * 100_000)


@real_time
async def test_a_pool_a_streamed_event_or_body_past_the_cap_fails_and_drops_the_socket(make):
    async with serving({"/": endless_body}) as url:
        transport = make(max_body_bytes=100_000)
        stream = await transport.open_stream(Request("GET", f"{url}/?sse=1", timeout=5))
        with pytest.raises(TransportError) as caught:
            async for _ in stream.events():
                pass
        assert caught.value.reason == "body_too_large"
        assert stream.closed
        stream = await transport.open_stream(Request("GET", f"{url}/", timeout=5))
        with pytest.raises(TransportError, match="cap") as caught:
            await stream.read()
        assert caught.value.reason == "body_too_large"
        stats = transport.statistics()
        assert (stats.connections_in_use, stats.in_flight, stats.failures) == (0, 0, 2)
        await transport.aclose()


def test_the_body_cap_is_validated():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_body_bytes"):
            AiohttpTransport(max_body_bytes=bad)  # type: ignore[arg-type]


def test_an_sse_parser_with_a_cap_refuses_a_line_or_an_event_that_never_ends():
    parser = SSEParser(max_event_chars=100)
    assert parser.feed(b"data: " + b"a" * 50 + b"\n\n") == [SSEEvent(None, "a" * 50)]
    with pytest.raises(ValueError, match="100 characters"):
        for _ in range(10):
            parser.feed(b"b" * 20)  # one line, never ended
    many = SSEParser(max_event_chars=100)
    with pytest.raises(ValueError):
        many.feed(b"data:\n" * 200)  # empty data lines, each one held


@real_time
async def test_a_pool_a_failure_never_shows_a_password_or_a_query_key(make, refusing_port: int):
    port = refusing_port  # bound, never listening: every connect is refused
    transport = make()
    url = f"http://me:hunter22@127.0.0.1:{port}/v1/x?key=AIza-SECRET&alt=sse"
    for call in (transport.send, transport.open_stream):
        with pytest.raises(TransportError) as caught:
            await call(Request("POST", url, timeout=2))
        shown = str(caught.value) + repr(caught.value)
        assert "hunter22" not in shown and "SECRET" not in shown
        assert f"http://***@127.0.0.1:{port}/v1/x?key=***&alt=***" in shown
    await transport.aclose()
