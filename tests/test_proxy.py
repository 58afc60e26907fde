"""The proxy end to end: the real openai and anthropic SDKs and raw aiohttp, on loopback,
against the simulated upstream (and, for streams cut short, a slow one of the test's own).

The helpers at the top are shared with the other proxy and command-line tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from asyncquota.proxy import Proxy, load, serve
from asyncquota.testing import UpstreamConfig
from asyncquota.testing import serve as serve_upstream

pytestmark = pytest.mark.looptime(False)

PRO_KEY = "sk-proxy-pro"
FREE_KEY = "sk-proxy-free"
ENVIRON = {"PRO_PROXY_KEY": PRO_KEY, "UPSTREAM_KEY": "sk-upstream-secret"}
HI = [{"role": "user", "content": "Where is my parcel?"}]

CONFIG = """
[proxy]
max_body_bytes = 65536
{proxy_extra}
[[proxy.keys]]
name = "acme-web"
key_env = "PRO_PROXY_KEY"
tenant = "acme"
max_priority = "interactive"
[[proxy.keys]]
name = "free-trial"
key_sha256 = "{free_digest}"
tenant = "trial"
max_priority = "batch"

[upstreams.openai]
base_url = "{openai}"
api_key_env = "UPSTREAM_KEY"
[upstreams.anthropic]
base_url = "{anthropic}"
api_key_env = "UPSTREAM_KEY"
auth = "x-api-key"

[models.gpt-4o-mini]
upstream = "openai"
context_window = 128000
input_per_mtok = 0.15
output_per_mtok = 0.60
[models.claude-haiku]
upstream = "anthropic"
context_window = 200000
input_per_mtok = 0.80
output_per_mtok = 4.00
path = "/v1/messages"
[models.text-embedding-3-small]
upstream = "openai"
context_window = 8192
input_per_mtok = 0.02
output_per_mtok = 0.0
path = "/v1/embeddings"

[routing]
default_model = "gpt-4o-mini"

[tiers.free]
"*" = {{ rpm = {free_rpm} }}
[tiers.pro]
"*" = {{ rpm = 600 }}
[tenants]
default_tier = "free"
[tenants.members]
acme = "pro"
{extra}
"""


def quick_upstream() -> UpstreamConfig:
    return UpstreamConfig.preset("steady", latency_base=0.01, latency_per_token=0.0)


def write_config(
    path: Path,
    *,
    openai: str,
    anthropic: str | None = None,
    free_rpm: int = 3,
    extra: str = "",
    proxy_extra: str = "",
) -> Path:
    path.write_text(
        CONFIG.format(
            openai=openai,
            anthropic=anthropic or openai,
            free_digest=hashlib.sha256(FREE_KEY.encode()).hexdigest(),
            free_rpm=free_rpm,
            extra=extra,
            proxy_extra=proxy_extra,
        )
    )
    return path


@contextlib.asynccontextmanager
async def running_proxy(config: Path) -> AsyncIterator[tuple[str, Proxy]]:
    """The proxy the file configures, served on loopback: its base URL and itself."""
    settings, governance = load(config)
    proxy = Proxy.from_config(settings, governance, environ=ENVIRON)
    async with serve(proxy) as url:
        yield url, proxy


@contextlib.asynccontextmanager
async def proxy_over_simulated(
    tmp_path: Path, *, free_rpm: int = 3, extra: str = ""
) -> AsyncIterator[tuple[str, Proxy]]:
    """The test proxy over one simulated upstream serving both dialects."""
    async with serve_upstream(quick_upstream()) as upstream:
        config = write_config(
            tmp_path / "gateway.toml", openai=upstream, free_rpm=free_rpm, extra=extra
        )
        async with running_proxy(config) as running:
            yield running


def sdk(url: str, key: str = PRO_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def held(proxy: Proxy) -> dict[str, tuple[int, int, int, int]]:
    """Per upstream: requests in flight, token reservations, attempts and sockets in use."""
    out = {}
    for name, shaper in proxy.gateway.upstreams.items():
        stats, transport = shaper.statistics(), shaper.transport.statistics()
        out[name] = (
            stats.inflight,
            stats.open_reservations,
            transport.in_flight,
            transport.connections_in_use,
        )
    return out


NOTHING_HELD = {"openai": (0, 0, 0, 0), "anthropic": (0, 0, 0, 0)}


# ---------------------------------------------------------------------------- the SDKs


async def test_the_openai_sdk_chats_through_the_proxy_with_the_tenants_own_rate_headers(
    tmp_path,
):
    async with proxy_over_simulated(tmp_path) as (url, _):
        async with sdk(url) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HI, max_tokens=20
            )
        reply = raw.parse()
        assert reply.choices[0].message.content
        assert raw.headers["x-asyncquota-model"] == "gpt-4o-mini"
        # The tenant's pro tier (600 a minute), not the upstream account's headers.
        assert raw.headers["x-ratelimit-limit-requests"] == "600"
        assert raw.headers["x-ratelimit-remaining-requests"] == "599"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_an_openai_caller_streams_from_a_claude_model_translated(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, proxy):
        async with sdk(url) as client:
            stream = await client.chat.completions.create(
                model="claude-haiku", messages=HI, max_tokens=20, stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = [], None
            async for chunk in stream:
                text += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
        assert "".join(text)
        assert usage is not None and usage.completion_tokens > 0
        assert held(proxy) == NOTHING_HELD


async def test_the_anthropic_sdk_sends_messages_answered_by_either_model(tmp_path):
    import anthropic  # a test dependency: its absence is a failure, not a skip

    async with proxy_over_simulated(tmp_path) as (url, proxy):
        async with anthropic.AsyncAnthropic(base_url=url, api_key=PRO_KEY, max_retries=0) as client:
            served = await client.messages.create(
                model="gpt-4o-mini", max_tokens=20, messages=HI
            )
            assert served.content[0].text
            async with client.messages.stream(
                model="claude-haiku", max_tokens=20, messages=HI
            ) as stream:
                assert await stream.get_final_text()
        wrong = anthropic.AsyncAnthropic(base_url=url, api_key="sk-wrong", max_retries=0)
        async with wrong:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await wrong.messages.create(model="claude-haiku", max_tokens=20, messages=HI)
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert held(proxy) == NOTHING_HELD


async def test_an_unknown_key_is_a_401_the_sdk_reads_and_never_reaches_the_upstream(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, proxy):
        for key in ("sk-wrong", PRO_KEY + "x", PRO_KEY[:-1]):
            async with sdk(url, key) as client:
                with pytest.raises(openai.AuthenticationError) as refused:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
            assert refused.value.code == "invalid_api_key"
        assert all(s.statistics().sent == 0 for s in proxy.gateway.upstreams.values())


async def test_models_lists_the_configured_models(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, _):
        async with sdk(url) as client:
            models = await client.models.list()
        assert [m.id for m in models.data] == [
            "gpt-4o-mini", "claude-haiku", "text-embedding-3-small"
        ]


async def test_a_flooding_free_key_is_refused_with_hints_while_a_pro_key_is_served(tmp_path):
    async with proxy_over_simulated(tmp_path, free_rpm=5) as (url, _):
        async def one(client: openai.AsyncOpenAI) -> int | openai.RateLimitError:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=HI, max_tokens=5
                )
            except openai.RateLimitError as exc:
                return exc
            return 200

        free, pro = sdk(url, FREE_KEY), sdk(url)
        async with free, pro:
            results = await asyncio.gather(
                *(one(free) for _ in range(40)), *(one(pro) for _ in range(20))
            )

        flood, paid = results[:40], results[40:]
        assert paid == [200] * 20
        assert flood.count(200) == 5
        refusals = [r for r in flood if isinstance(r, openai.RateLimitError)]
        assert len(refusals) == 35
        for refusal in refusals:
            headers = refusal.response.headers
            assert float(headers["retry-after-ms"]) > 0
            assert int(headers["retry-after"]) >= 1
            assert headers["x-should-retry"] == "true"
            assert headers["x-ratelimit-limit-requests"] == "5"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert refusal.code == "rate_limit_exceeded"


async def test_a_spent_budget_says_so_and_not_to_retry(tmp_path):
    extra = '[budget]\nmonthly = 0.0000001\nwhen_spent = "reject"\n'
    async with proxy_over_simulated(tmp_path, extra=extra) as (url, proxy):
        async with sdk(url) as client:
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        assert refused.value.code == "insufficient_quota"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert all(s.statistics().sent == 0 for s in proxy.gateway.upstreams.values())


async def test_a_key_claims_no_more_priority_than_its_max(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {FREE_KEY}", "X-AsyncQuota-Priority": "critical"}
        body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5}
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
        async with http.get(f"{url}/metrics") as r:
            metrics = await r.text()
        served = [line for line in metrics.splitlines() if "asyncquota_requests_total{" in line]
        assert served == [
            'asyncquota_requests_total{class="batch",outcome="ok",upstream="openai"} 1.0'
        ]


# ---------------------------------------------------------------------------- raw HTTP


async def post(
    http: aiohttp.ClientSession, url: str, data: bytes, **headers: str
) -> tuple[int, dict[str, object], dict[str, str]]:
    headers = {"Authorization": f"Bearer {PRO_KEY}", **headers}
    async with http.post(url, data=data, headers=headers) as response:
        return response.status, orjson.loads(await response.read()), dict(response.headers)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object, not a JSON array"),
        (b"", 400, "no body"),
        (b'{"model": 4}', 400, "model must be a string"),
        (b'{"model": "gpt-5", "messages": []}', 404, "'gpt-5' is not served here"),
        (b'{"model": "text-embedding-3-small", "messages": []}', 404, "not served at"),
    ],
)
async def test_a_bad_body_is_refused_naming_the_problem(tmp_path, body, status, words):
    async with proxy_over_simulated(tmp_path) as (url, proxy), aiohttp.ClientSession() as http:
        got, error, _ = await post(
            http, f"{url}/v1/chat/completions", body, **{"Content-Type": "application/json"}
        )
        assert got == status
        assert words in error["error"]["message"]  # type: ignore[index]
        got, error, _ = await post(
            http, f"{url}/v1/messages", body, **{"Content-Type": "application/json"}
        )
        assert got == status
        assert error["type"] == "error" and words in error["error"]["message"]  # type: ignore[index]
        assert all(s.statistics().sent == 0 for s in proxy.gateway.upstreams.values())


async def test_a_huge_body_is_a_413_whether_its_length_is_declared_or_not(tmp_path):
    huge = b'{"model": "gpt-4o-mini", "pad": "' + b"x" * 70_000 + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 8192):
            yield huge[start : start + 8192]

    async with proxy_over_simulated(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        status, error, _ = await post(http, f"{url}/v1/chat/completions", huge)
        assert status == 413
        assert "at most 65536 bytes" in error["error"]["message"]  # type: ignore[index]
        headers = {"Authorization": f"Bearer {PRO_KEY}"}
        async with http.post(
            f"{url}/v1/messages", data=chunked(), headers=headers
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["type"] == "request_too_large"


async def test_headers_past_the_limit_are_refused_before_any_handler(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, proxy), aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {PRO_KEY}", "X-Pad": "x" * 9000}
        async with http.post(f"{url}/v1/chat/completions", data=b"{}", headers=headers) as r:
            assert r.status in (400, 431)
        assert all(s.statistics().sent == 0 for s in proxy.gateway.upstreams.values())


async def test_options_headers_are_checked_and_the_tenant_is_the_keys(tmp_path):
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": HI})
    async with proxy_over_simulated(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        endpoint = f"{url}/v1/chat/completions"
        status, error, _ = await post(http, endpoint, body, **{"X-AsyncQuota-Deadline": "soon"})
        assert status == 400 and "X-AsyncQuota-Deadline" in error["error"]["message"]  # type: ignore[index]
        status, error, _ = await post(http, endpoint, body, **{"X-AsyncQuota-Tenant": "trial"})
        assert status == 403 and "for tenant 'acme'" in error["error"]["message"]  # type: ignore[index]
        status, _, _ = await post(http, endpoint, body, **{"X-AsyncQuota-Tenant": "acme"})
        assert status == 200


async def test_wrong_methods_and_paths_get_json_errors_and_contact_no_upstream(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, proxy), aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {PRO_KEY}"}
        async with http.get(f"{url}/v1/chat/completions", headers=headers) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
            assert "Use POST" in (await r.json())["error"]["message"]
        for path in ("/v1/files", "/http://evil.example/v1/chat/completions", "/v1/../stats"):
            async with http.post(f"{url}{path}", data=b"{}", headers=headers) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "not_found"
        assert all(s.statistics().sent == 0 for s in proxy.gateway.upstreams.values())


async def test_health_readiness_and_metrics(tmp_path):
    async with proxy_over_simulated(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{url}/readyz") as r:
            assert r.status == 200 and (await r.json())["problems"] == []
        async with sdk(url) as client:
            await client.chat.completions.create(model="claude-haiku", messages=HI, max_tokens=5)
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'asyncquota_inflight{upstream="openai"} 0.0' in text
        assert 'asyncquota_upstream_replies_total{code="200",upstream="anthropic"} 1.0' in text
        assert "asyncquota_gateway_served_total 1.0" in text
        assert 'asyncquota_spent_dollars_total{model="claude-haiku"}' in text
        assert "process_cpu_seconds_total" in text


async def test_readiness_says_why_it_cannot_serve(tmp_path, monkeypatch):
    from asyncquota.errors import StoreUnavailableError

    async with proxy_over_simulated(tmp_path) as (url, proxy), aiohttp.ClientSession() as http:
        shapers = list(proxy.gateway.upstreams.values())
        # One upstream cooling down is no reason: the others serve.
        monkeypatch.setattr(shapers[0], "confirmed_cooldown", lambda: 30.0)
        async with http.get(f"{url}/readyz") as r:
            assert r.status == 200
        # Every one held by a Retry-After its probe may end: still ready.
        for shaper in shapers:
            monkeypatch.setattr(shaper, "cooldown_remaining", lambda: 30.0)
        async with http.get(f"{url}/readyz") as r:
            assert r.status == 200
        for shaper in shapers:
            monkeypatch.setattr(shaper, "confirmed_cooldown", lambda: 30.0)

        async def unreadable(*args, **kwargs):
            raise StoreUnavailableError("the store is locked")

        monkeypatch.setattr(proxy.gateway, "quota_status", unreadable)
        async with http.get(f"{url}/readyz") as r:
            assert r.status == 503
            assert (await r.json())["problems"] == [
                "every upstream is cooling down",
                "the counter store cannot be read",
            ]
        async with http.get(f"{url}/healthz") as r:
            assert r.status == 200  # alive all the same


# ---------------------------------------------------------------------------- streams cut


class SlowStream:
    """An OpenAI-compatible upstream whose streams send a chunk every 10 ms, for a minute.

    ``closed`` is set when the proxy hangs up on a stream it opened.
    """

    def __init__(self) -> None:
        self.opened = 0
        self.closed = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.opened += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index in range(6000):
                chunk = {
                    "id": "c", "object": "chat.completion.chunk", "created": 0,
                    "model": "m", "choices": [
                        {"index": 0, "delta": {"content": f"w{index} "}, "finish_reason": None}
                    ],
                }
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            self.closed.set()
            raise
        return response


@contextlib.asynccontextmanager
async def slow_upstream() -> AsyncIterator[tuple[str, SlowStream]]:
    model = SlowStream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", model.chat)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", model
    finally:
        await runner.cleanup()


async def test_a_client_leaving_mid_stream_ends_the_upstream_call_and_holds_nothing(tmp_path):
    async with slow_upstream() as (upstream, model):
        config = write_config(tmp_path / "gateway.toml", openai=upstream)
        async with running_proxy(config) as (url, proxy):
            for _ in range(3):
                model.closed.clear()
                async with aiohttp.ClientSession() as http:
                    response = await http.post(
                        f"{url}/v1/chat/completions",
                        json={"model": "gpt-4o-mini", "messages": HI, "stream": True},
                        headers={"Authorization": f"Bearer {PRO_KEY}"},
                    )
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/event-stream")
                    assert "Content-Encoding" not in response.headers
                    assert (await response.content.readline()).startswith(b"data: ")
                    response.close()  # the client hangs up mid-stream
                await asyncio.wait_for(model.closed.wait(), 10)
            settled = await proxy.gateway.quota_status("acme", "gpt-4o-mini")
            for _ in range(100):  # the settlements run as tasks of their own
                if held(proxy) == NOTHING_HELD:
                    break
                await asyncio.sleep(0.01)
            assert held(proxy) == NOTHING_HELD
            assert model.opened == 3
            rpm = next(d for d in settled.models["gpt-4o-mini"] if d.dimension == "rpm")
            assert round(rpm.used) == 3


async def test_a_stream_over_the_request_timeout_ends_with_an_error_event(tmp_path):
    async with slow_upstream() as (upstream, model):
        config = write_config(
            tmp_path / "gateway.toml", openai=upstream, proxy_extra="request_timeout = 0.5"
        )
        async with running_proxy(config) as (url, proxy), aiohttp.ClientSession() as http:
            async with http.post(
                f"{url}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": HI, "stream": True},
                headers={"Authorization": f"Bearer {PRO_KEY}"},
            ) as response:
                assert response.status == 200
                body = await response.read()
            last = body.strip().split(b"\n\n")[-1]
            assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == (
                "request_timeout"
            )
            await asyncio.wait_for(model.closed.wait(), 10)
            assert held(proxy)["openai"] == (0, 0, 0, 0)


async def test_only_the_providers_beta_flags_of_a_clients_headers_reach_the_upstream(tmp_path):
    seen: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        return web.json_response(
            {
                "id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        config = write_config(tmp_path / "gateway.toml", openai=f"http://{host}:{port}")
        headers = {
            "Authorization": f"Bearer {PRO_KEY}",
            "OpenAI-Beta": "assistants=v2",
            "X-Internal-Trace": "do-not-forward",
            "Cookie": "session=secret",
        }
        body = {"model": "gpt-4o-mini", "messages": HI}
        async with running_proxy(config) as (url, _), aiohttp.ClientSession() as http:
            response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            assert response.status == 200
            response.release()
    finally:
        await runner.cleanup()
    [sent] = seen
    lowered = {name.lower(): value for name, value in sent.items()}
    assert lowered["openai-beta"] == "assistants=v2"
    assert "x-internal-trace" not in lowered and "cookie" not in lowered
    assert PRO_KEY not in " ".join(lowered.values())  # the client's key stays at the proxy
