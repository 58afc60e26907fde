"""The official SDKs through a Shaper, on virtual time: the real openai and anthropic clients,
their HTTP through a ShaperTransport, sent by the Shaper's mock transport to the simulated
upstream (each streamed event dripped out on its own)."""

import asyncio
import contextlib

import anthropic
import httpx2
import openai
import pytest

from asyncquota import AIMD, Admitted, Fixed, LoggingHook, Priority
from asyncquota.sdk import ShaperTransport, anthropic_client, openai_client
from asyncquota.shaper import Shaper
from asyncquota.testing import SimulatedUpstream, UpstreamConfig
from asyncquota.transport import MockTransport, Request, Response, StreamResponse

BASE = "http://upstream.test"
KEY = "sk-test-SECRET-4242"
MESSAGES = [{"role": "user", "content": "Where is my parcel?"}]
OPTIONS = ("x-asyncquota-priority", "x-asyncquota-tenant", "x-asyncquota-deadline")


def now() -> float:
    return asyncio.get_running_loop().time()


class Upstream:
    """The simulated provider, recording what reaches it; a stream's events come ``every`` s."""

    def __init__(
        self, every: float = 0.0, *, break_after: int | None = None, **config: object
    ) -> None:
        config.setdefault("headers_style", "none")  # the token gate paces by its own count
        self.model = SimulatedUpstream(UpstreamConfig.preset("steady", **config))
        self.every = every
        self.break_after = break_after  # events, then the connection is reset
        self.seen: list[Request] = []
        self.streams_closed = 0

    async def handle(self, request: Request) -> Response | StreamResponse:
        self.seen.append(request)
        reply = await self.model.handle(request)
        if not reply.headers.get("content-type", "").startswith("text/event-stream"):
            return reply
        return StreamResponse(reply.status, reply.headers, self._drip(reply.body))

    async def _drip(self, body: bytes):
        try:
            for number, event in enumerate(body.split(b"\n\n")[:-1]):
                if number:
                    await asyncio.sleep(self.every)
                if number == self.break_after:
                    raise ConnectionResetError("The simulated upstream reset the connection.")
                yield event + b"\n\n"
        finally:
            self.streams_closed += 1


@contextlib.asynccontextmanager
async def shaped(upstream, **options):
    """A Shaper on ``upstream``, and an openai and an anthropic client through it."""
    options.setdefault("hooks", ())
    async with (
        Shaper(BASE, transport=MockTransport(upstream.handle), **options) as shaper,
        openai_client(shaper, api_key=KEY, base_url=f"{BASE}/v1") as oai,
        anthropic_client(shaper, api_key=KEY) as ant,
    ):
        yield shaper, oai, ant


def chat(client, **arguments):
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **arguments)


def message(client, **arguments):
    arguments.setdefault("max_tokens", 40)
    return client.messages.create(model="claude-haiku", messages=MESSAGES, **arguments)


def ask(client, **arguments):
    """One turn with either SDK: a chat completion, or a message."""
    return (chat if isinstance(client, openai.AsyncOpenAI) else message)(client, **arguments)


async def test_a_chat_completion_goes_through_the_shaper_with_its_options_which_stay_home():
    upstream = Upstream()
    admitted = []

    class Keep:
        def on_event(self, event):
            if isinstance(event, Admitted):
                admitted.append(event)

    async with shaped(upstream, hooks=(Keep(),)) as (shaper, oai, _):
        reply = await chat(
            oai,
            max_tokens=40,
            extra_headers={"X-AsyncQuota-Priority": "batch", "X-AsyncQuota-Tenant": "shop-42"},
        )
        stats = shaper.statistics()
    assert reply.choices[0].message.content.startswith("tok tok")
    completion = reply.usage.completion_tokens
    assert now() == pytest.approx(0.12 + 0.001 * completion)  # the upstream's time, nothing more
    [request] = upstream.seen
    assert request.url == f"{BASE}/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {KEY}"  # the SDK's own credentials
    assert not {name.lower() for name in request.headers} & set(OPTIONS)
    [event] = admitted
    assert event.priority is Priority.BATCH and event.tenant == "shop-42"
    assert (stats.sent, stats.ok, stats.inflight, stats.open_reservations) == (1, 1, 0, 0)


async def test_an_anthropic_message_goes_through_the_shaper():
    upstream = Upstream()
    async with shaped(upstream) as (shaper, _, ant):
        reply = await message(ant, extra_headers={"X-AsyncQuota-Tenant": "shop-42"})
        stats = shaper.statistics()
    assert reply.content[0].text.startswith("tok tok")
    assert reply.usage.output_tokens >= 10
    [request] = upstream.seen
    assert request.url == f"{BASE}/v1/messages"
    # The SDK's own credentials (Anthropic's SDK of this release sends them as a bearer token).
    assert KEY in {request.headers.get("x-api-key"), request.headers["Authorization"][7:]}
    assert "anthropic-version" in request.headers
    assert not {name.lower() for name in request.headers} & set(OPTIONS)
    assert (stats.sent, stats.ok, stats.inflight, stats.open_reservations) == (1, 1, 0, 0)


async def read_openai_stream(client, shaper, held: list[int]) -> tuple[int, int]:
    stream = await chat(
        client, max_tokens=2000, stream=True, stream_options={"include_usage": True}
    )
    usage = None
    async for chunk in stream:
        held.append(shaper.statistics().inflight)
        usage = chunk.usage or usage
    return usage.prompt_tokens, usage.completion_tokens


async def read_anthropic_stream(client, shaper, held: list[int]) -> tuple[int, int]:
    stream = await message(client, max_tokens=2000, stream=True)
    prompt = completion = 0
    async for event in stream:
        held.append(shaper.statistics().inflight)
        if event.type == "message_start":
            prompt = event.message.usage.input_tokens
        elif event.type == "message_delta":
            completion = event.usage.output_tokens
    return prompt, completion


@pytest.mark.parametrize("read", [read_openai_stream, read_anthropic_stream])
async def test_a_streamed_reply_holds_its_permit_to_the_end_and_is_charged_its_usage(read):
    upstream = Upstream(every=0.25)
    held: list[int] = []
    async with shaped(upstream, tpm=6000) as (shaper, oai, ant):
        client = oai if read is read_openai_stream else ant
        prompt, completion = await read(client, shaper, held)
        stats = shaper.statistics()
    assert len(held) > 10 and set(held) == {1}  # the generation is load on the upstream
    assert (stats.inflight, stats.open_reservations) == (0, 0)
    assert upstream.streams_closed == 1
    # 6000 tpm: 100 tokens a second, a bucket of 100. Reserved was ~2000 (the output cap);
    # charged is what the stream reported, the bucket refilling since it started.
    assert stats.tpm_level == pytest.approx(min(100.0, 100 - (prompt + completion) + 100 * now()))


def openai_429(request: Request) -> Response:
    body = b'{"error": {"message": "Rate limit reached.", "type": "requests", ' \
           b'"param": null, "code": "rate_limit_exceeded"}}'
    return Response(429, {"content-type": "application/json", "retry-after": "1"}, body)


def anthropic_429(request: Request) -> Response:
    body = b'{"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}}'
    return Response(429, {"content-type": "application/json", "retry-after": "1"}, body)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_429_the_shaper_gave_up_on_is_the_sdks_rate_limit_error_and_the_sdk_adds_nothing(
    sdk,
):
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        return openai_429(request) if sdk == "openai" else anthropic_429(request)

    async with (
        Shaper(BASE, transport=MockTransport(answer), hooks=(), max_attempts=2) as shaper,
        # The SDKs' default max_retries (2) stays.
        openai_client(shaper, api_key=KEY, base_url=f"{BASE}/v1") as oai,
        anthropic_client(shaper, api_key=KEY) as ant,
    ):
        with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)) as caught:
            await ask(oai if sdk == "openai" else ant)
        stats = shaper.statistics()
    error = caught.value
    assert error.status_code == 429
    headers = error.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "1000")
    assert headers["x-should-retry"] == "false"
    if sdk == "openai":
        assert error.code == "rate_limit_exceeded"  # the upstream's own error body
    else:
        assert error.body["error"] == {"type": "rate_limit_error", "message": "Slow down."}
    # Exactly the Shaper's attempts reached the upstream (two, and the probes of its
    # cooldown), all of them within the SDK's first and only try.
    assert len(seen) == stats.sent and stats.retried == 1
    assert {request.headers["x-stainless-retry-count"] for request in seen} == {"0"}
    assert stats.failed == 1


async def test_a_cooldown_past_the_deadline_is_a_429_at_once_with_the_time_left():
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        return Response(429, {"content-type": "application/json", "retry-after": "30"}, b"{}")

    async with (
        Shaper(BASE, transport=MockTransport(answer), hooks=()) as shaper,
        openai_client(shaper, api_key=KEY, base_url=f"{BASE}/v1") as oai,
    ):
        errors = []
        for _ in range(3):  # the upstream's 429, a probe 10 ms later, then no more sends
            with pytest.raises(openai.RateLimitError) as caught:
                await chat(oai, extra_headers={"X-AsyncQuota-Deadline": "5"})
            errors.append(caught.value)
    assert now() == pytest.approx(0.01)
    assert len(seen) == 2
    refused = errors[-1]  # refused by the Shaper: the provider's error JSON, made here
    assert (refused.code, refused.type) == ("rate_limited", "rate_limit_exceeded")
    assert "longer than this request's deadline" in str(refused)
    headers = refused.response.headers
    assert headers["retry-after"] == "30" and headers["x-should-retry"] == "false"
    assert headers["retry-after-ms"] == "30000"  # the probe's 429 renewed the 30 s


@pytest.mark.parametrize(
    ("sdk", "error_class"),
    [("openai", openai.InternalServerError), ("anthropic", anthropic.ServiceUnavailableError)],
)
async def test_a_refusal_is_a_503_with_the_hint_at_once_and_nothing_is_sent(sdk, error_class):
    upstream = Upstream()
    async with shaped(upstream) as (shaper, oai, ant):
        shaper.shed_below("batch", for_seconds=30)
        batch = {"X-AsyncQuota-Priority": "batch"}
        with pytest.raises(error_class) as caught:
            await ask(oai if sdk == "openai" else ant, extra_headers=batch)
    error = caught.value
    assert now() == 0  # told at once: no retry, no wait
    assert error.status_code == 503
    assert error.response.headers["retry-after"] == "30"
    assert error.response.headers["retry-after-ms"] == "30000"
    assert error.response.headers["x-should-retry"] == "false"
    if sdk == "openai":
        assert error.code == "shedding" and error.type == "server_error"
    else:
        assert error.body["error"]["type"] == "overloaded_error"
    assert "batch and below" in str(error)
    assert upstream.seen == []


async def test_a_queue_full_refusal_reaches_the_least_important_caller_as_a_503():
    upstream = Upstream(latency_base=10.0)
    patient = {"critical": 600, "interactive": 600, "batch": 600}
    async with shaped(upstream, limit=Fixed(1), max_queue=1, max_wait=patient) as (_, oai, _a):

        def turn(priority: str):
            headers = {"X-AsyncQuota-Priority": priority}
            return asyncio.create_task(chat(oai, max_tokens=20, extra_headers=headers))

        first, queued = turn("batch"), turn("batch")  # one in flight, one in line
        await asyncio.sleep(1)
        urgent = turn("critical")  # the line holds one: the batch request makes way
        with pytest.raises(openai.InternalServerError) as caught:
            await queued
        assert now() == 1  # told at once
        assert (await first).choices and (await urgent).choices
    error = caught.value
    assert (error.status_code, error.code) == (503, "queue_full")
    assert error.response.headers["x-should-retry"] == "false"
    assert "least important waiter" in str(error)
    assert len(upstream.seen) == 2


@pytest.mark.parametrize(
    ("sdk", "error_class"),
    [("openai", openai.InternalServerError), ("anthropic", anthropic.InternalServerError)],
)
async def test_no_usable_reply_is_a_502_after_the_shapers_attempts_only(sdk, error_class):
    seen: list[Request] = []

    def reset(request: Request) -> Response:
        seen.append(request)
        raise ConnectionResetError("reset by peer")

    async with (
        Shaper(BASE, transport=MockTransport(reset), hooks=(), max_attempts=2) as shaper,
        openai_client(shaper, api_key=KEY, base_url=f"{BASE}/v1") as oai,
        anthropic_client(shaper, api_key=KEY) as ant,
    ):
        with pytest.raises(error_class) as caught:
            await ask(oai if sdk == "openai" else ant)
    assert caught.value.status_code == 502
    assert "connection" in str(caught.value) and "was lost" in str(caught.value)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(seen) == 2
    assert {request.headers["x-stainless-retry-count"] for request in seen} == {"0"}


async def test_a_stream_broken_mid_way_is_the_sdks_connection_error_and_nothing_is_held():
    upstream = Upstream(every=0.5, break_after=3)
    async with shaped(upstream, limit=AIMD(initial=8)) as (shaper, oai, _):
        read = []
        with pytest.raises(openai.APIConnectionError) as caught:
            async for chunk in await chat(oai, max_tokens=2000, stream=True):
                read.append(chunk)
        stats = shaper.statistics()
    assert len(read) == 3
    assert isinstance(caught.value.__cause__, httpx2.ReadError)
    assert (stats.inflight, stats.open_reservations, stats.limit) == (0, 0, 8)
    assert upstream.streams_closed == 1


@pytest.mark.parametrize(
    ("sdk", "error_class"),
    [("openai", openai.InternalServerError), ("anthropic", anthropic.GatewayTimeoutError)],
)
@pytest.mark.parametrize(("headers", "ends_at"), [({}, 5.0), ({"X-AsyncQuota-Deadline": "2"}, 2.0)])
async def test_the_sdks_timeout_is_the_deadline_unless_the_call_names_one(
    sdk, error_class, headers, ends_at
):
    upstream = Upstream(hang_rate=1.0)
    async with shaped(upstream) as (_, oai, ant):
        client = (oai if sdk == "openai" else ant).with_options(timeout=5.0)
        with pytest.raises(error_class) as caught:
            await ask(client, extra_headers=headers)
    assert now() == pytest.approx(ends_at)
    assert caught.value.status_code == 504
    assert len(upstream.seen) == 1  # the SDK did not try again


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_reader_cancelled_mid_stream_leaves_nothing_held_and_the_upstream_knows(sdk):
    upstream = Upstream(every=1.0)
    async with shaped(upstream, limit=AIMD(initial=8)) as (shaper, oai, ant):
        started = asyncio.Event()

        async def reader() -> None:
            stream = await ask(oai if sdk == "openai" else ant, max_tokens=2000, stream=True)
            async for _ in stream:
                started.set()

        task = asyncio.create_task(reader())
        await started.wait()
        await asyncio.sleep(2.5)
        assert shaper.statistics().inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = shaper.statistics()
    assert (stats.inflight, stats.open_reservations, stats.reserved_tokens) == (0, 0, 0)
    assert stats.limit == 8  # an abandoned stream teaches nothing
    assert upstream.streams_closed == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_stream_closed_early_by_the_sdk_frees_its_permit(sdk):
    upstream = Upstream(every=1.0)
    async with shaped(upstream) as (shaper, oai, ant):
        stream = await ask(oai if sdk == "openai" else ant, max_tokens=2000, stream=True)
        async with stream:
            async for _ in stream:
                break
            assert shaper.statistics().inflight == 1
        stats = shaper.statistics()
        assert (stats.inflight, stats.open_reservations) == (0, 0)
        assert upstream.streams_closed == 1


async def test_an_overloaded_event_in_an_anthropic_stream_is_the_sdks_error_and_cuts_the_limit():
    upstream = Upstream(error_529_rate=1.0)
    async with shaped(upstream, limit=AIMD(initial=40)) as (shaper, _, ant):
        seen = []
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for event in await message(ant, stream=True):
                seen.append(event.type)
        stats = shaper.statistics()
    assert seen == ["message_start"]
    assert caught.value.body["error"]["type"] == "overloaded_error"  # the upstream's event
    assert stats.limit == 20 and stats.throttled == 1
    assert (stats.inflight, stats.open_reservations) == (0, 0)


async def test_closing_the_shaper_ends_an_open_sdk_stream_within_the_grace():
    upstream = Upstream(every=1.0)
    shaper = Shaper(BASE, transport=MockTransport(upstream.handle), hooks=(), shutdown_grace=2.0)
    await shaper.__aenter__()
    read: list[str] = []

    async def reader() -> None:
        async with openai_client(shaper, api_key=KEY, base_url=f"{BASE}/v1") as client:
            async for chunk in await chat(client, max_tokens=2000, stream=True):
                read.append(chunk.id)

    task = asyncio.create_task(reader())
    await asyncio.sleep(3.5)
    closing_at = now()
    await shaper.aclose()
    with pytest.raises(openai.APIConnectionError):
        await task
    stats = shaper.statistics()
    assert now() - closing_at == pytest.approx(2.0)  # the grace, then closed
    assert len(read) == 4  # the events of 0, 1, 2, 3 s and those of the grace's 4, 5 s
    assert (stats.inflight, stats.open_reservations) == (0, 0)
    assert upstream.streams_closed == 1


async def test_only_the_shapers_base_url_is_ever_contacted():
    upstream = Upstream()
    async with Shaper(f"{BASE}/v1", transport=MockTransport(upstream.handle), hooks=()) as shaper:
        with pytest.raises(ValueError, match="not under the Shaper's base_url"):
            openai_client(shaper, api_key=KEY, base_url="http://elsewhere.test/v1")
        async with httpx2.AsyncClient(transport=ShaperTransport(shaper)) as client:
            for url in ("http://elsewhere.test/v1/x", f"{BASE}/v2/x", "https://upstream.test/v1/x"):
                with pytest.raises(ValueError, match="sends nothing elsewhere"):
                    await client.get(url)
    assert upstream.seen == []


async def test_an_http_client_of_ones_own_is_refused_with_the_way_to_make_one():
    async with Shaper(BASE, transport=MockTransport(Upstream().handle), hooks=()) as shaper:
        with pytest.raises(TypeError, match=r"transport=ShaperTransport\(shaper\)"):
            openai_client(shaper, http_client=httpx2.AsyncClient())


async def test_a_client_made_by_hand_around_the_transport_works_the_same():
    upstream = Upstream()
    async with Shaper(BASE, transport=MockTransport(upstream.handle), hooks=()) as shaper:
        http_client = openai.DefaultAsyncHttpxClient(transport=ShaperTransport(shaper))
        async with openai.AsyncOpenAI(
            api_key=KEY, base_url=f"{BASE}/v1", http_client=http_client
        ) as client:
            reply = await chat(client, max_tokens=20)
        assert shaper.statistics().ok == 1
    assert reply.choices[0].message.content.startswith("tok")


async def test_a_malformed_option_header_is_a_clear_error_and_nothing_is_sent():
    upstream = Upstream()
    async with shaped(upstream) as (_, oai, _ant):
        with pytest.raises(ValueError, match="X-AsyncQuota-Deadline"):
            await chat(oai, extra_headers={"X-AsyncQuota-Deadline": "soon"})
    assert upstream.seen == []


async def test_the_api_key_is_in_no_error_event_or_log_line(caplog):
    events = []

    class Keep:
        def on_event(self, event):
            events.append(event)

    transport, hooks = MockTransport(openai_429), (LoggingHook(), Keep())
    with caplog.at_level("DEBUG", logger="asyncquota"):
        async with (
            Shaper(BASE, transport=transport, hooks=hooks, max_attempts=2) as shaper,
            openai_client(shaper, api_key=KEY, base_url=f"{BASE}/v1") as oai,
        ):
            with pytest.raises(openai.RateLimitError) as caught:
                await chat(oai)
    assert events and caplog.records
    shown = [str(caught.value), repr(caught.value.body), caplog.text, *map(repr, events)]
    assert all(KEY not in text for text in shown)
