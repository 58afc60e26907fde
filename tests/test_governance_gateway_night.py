"""The Gateway on the night a provider's quota is gone: configuration, holds, alerts, formats.

Two upstreams from one TOML-shaped configuration: ``anthropic`` (Anthropic messages,
``claude``) falls back to ``openai`` (OpenAI chat, ``gpt``). Each is the simulated upstream
behind a mock transport; ``Night`` can make the Anthropic account answer its spend cap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from asyncquota import (
    BudgetExceededError,
    MockTransport,
    NoRouteError,
    OverloadedError,
    QuotaExhaustedError,
    Request,
    Response,
)
from asyncquota.governance import CallbackSink, Gateway, parse_config
from asyncquota.governance.alerts import Alert
from asyncquota.testing import SimulatedUpstream, UpstreamConfig
from asyncquota.transport import StreamResponse

EPOCH = 1_800_000_000.0  # 2027-01-15 08:00 UTC
REGAIN = 1_800_057_600.0  # 2027-01-16 00:00 UTC: 16 h after EPOCH
SPEND_CAP = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "You have reached your specified API usage limits. You will regain access "
        "on 2027-01-16 at 00:00 UTC.",
    },
}
KEYS = {"ANTHROPIC_KEY": "sk-ant-secret-0001", "OPENAI_KEY": "sk-openai-secret-0002"}


def wall() -> float:
    return EPOCH + asyncio.get_running_loop().time()


def sim_wall() -> float:
    return EPOCH


class Night:
    """The simulated upstream, and a switch that makes it answer the spend cap."""

    def __init__(self, dialect: str) -> None:
        self.sim = SimulatedUpstream(
            UpstreamConfig(rps=1000.0, latency_base=0.1, latency_per_token=0.0, wall_clock=sim_wall)
        )
        self.dialect = dialect
        self.capped = False
        self.overloaded = False
        self.breaks = False  # streams break off with overloaded_error after message_start
        self.paced = False  # streams go out event by event, 0.1 s apart
        self.sent_at: list[float] = []  # loop time each paced event left
        self.cut = 0  # paced streams whose caller closed them before their end
        self.seen: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: Request) -> Response:
        self.seen.append(orjson.loads(request.body or b"{}"))
        self.paths.append(request.url)
        self.headers.append(dict(request.headers))
        if self.capped:
            await asyncio.sleep(0.05)
            return Response(400, {"content-type": "application/json"}, orjson.dumps(SPEND_CAP))
        if self.overloaded:
            await asyncio.sleep(0.05)
            body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return Response(529, {"content-type": "application/json"}, orjson.dumps(body))
        if self.breaks and b'"stream":true' in (request.body or b""):
            return StreamResponse(200, {"content-type": "text/event-stream"}, BROKEN_OFF)
        response = await self.sim.handle(request)
        if self.paced and response.headers.get("content-type") == "text/event-stream":
            return StreamResponse(response.status, response.headers, self.pace(response.body))
        return response

    async def pace(self, body: bytes) -> AsyncIterator[bytes]:
        events = [event + b"\n\n" for event in body.split(b"\n\n") if event]
        loop = asyncio.get_running_loop()
        sent = 0
        try:
            for event in events:
                self.sent_at.append(loop.time())
                yield event
                sent += 1
                await asyncio.sleep(0.1)
        finally:
            self.cut += sent < len(events)


BROKEN_OFF = [
    b'event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_1", '
    b'"type": "message", "role": "assistant", "model": "claude", "content": [], '
    b'"usage": {"input_tokens": 12, "output_tokens": 1}}}\n\n',
    b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
    b'"message": "Overloaded"}}\n\n',
]


def config(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstreams": {
            "anthropic": {
                "base_url": "http://anthropic.test",
                "api_key_env": "ANTHROPIC_KEY",
                "auth": "x-api-key",
            },
            "openai": {"base_url": "http://openai.test", "api_key_env": "OPENAI_KEY"},
        },
        "models": {
            "claude": {
                "upstream": "anthropic",
                "context_window": 200_000,
                "input_per_mtok": 3.0,
                "output_per_mtok": 15.0,
                "path": "/v1/messages",
                "fallbacks": ["gpt"],
            },
            "gpt": {
                "upstream": "openai",
                "context_window": 128_000,
                "input_per_mtok": 2.5,
                "output_per_mtok": 10.0,
            },
        },
        "routing": {"default_model": "claude"},
    }
    for key, value in extra.items():
        data[key] = value
    return data


def build(data: dict[str, Any], **kwargs: Any) -> tuple[Gateway, dict[str, Night]]:
    ups = {"anthropic": Night("anthropic"), "openai": Night("openai")}
    gateway = Gateway.from_config(
        parse_config(data),
        transports={name: MockTransport(up.handle) for name, up in ups.items()},
        wall_clock=wall,
        environ=KEYS,
        **kwargs,
    )
    return gateway, ups


def chat(content: str = "Where is my parcel?", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 50, **extra}


# -- configuration ------------------------------------------------------------------------------


async def test_a_tenant_given_as_an_int_is_the_member_and_budget_of_its_string():
    data = config(
        tiers={"free": {"*": {"rpd": 1}}, "pro": {"*": {"rpd": 100}}},
        tenants={"default_tier": "free", "members": {"42": "pro"}},
        budget={"monthly": 100.0, "tenants": {"42": 0.001}},
    )
    data["budget"]["when_spent"] = "reject"
    gateway, _ = build(data)
    async with gateway:
        # pro's 100 a day, not free's 1: the member "42"
        await gateway.request(chat(), tenant=42, model="gpt")
        await gateway.request({**chat(), "max_tokens": 1}, tenant="42", model="gpt")
        status = await gateway.quota_status(42, model="gpt")
        # a budget of $0.001 a month, mostly spent by the first: the same tenant's
        with pytest.raises(BudgetExceededError) as spent_out:
            await gateway.request(chat(), tenant="42", model="gpt")
    # told in figures that tell them apart, not "$0.0005 left ... estimated $0.0005"
    assert str(spent_out.value).startswith(
        "The budget has $0.000515 left this month, less than this request's estimated $0.00055"
    )
    assert status.tenant == "42"
    rpd = next(d for d in status.models["gpt"] if d.dimension == "rpd")
    assert (rpd.used, rpd.limit) == (2, 100)
    spent = next(d for d in status.budget if d.dimension == "tenant_budget")
    assert spent.limit == 0.001 and spent.used > 0.0004


async def test_requests_naming_no_tenant_take_the_default_tier_and_are_watched():
    got: list[Alert] = []
    data = config(
        tiers={"free": {"*": {"rpd": 10}, "shared": {"rpd": 4}}},
        tenants={"default_tier": "free", "timezone": "Asia/Shanghai"},
        alerts={"log": False, "thresholds": {"tenant:*": {"warning": 0.5, "critical": 0.75}}},
    )
    gateway, _ = build(data, sinks=[CallbackSink(got.append)])
    async with gateway:
        for _ in range(3):
            await gateway.request(chat(), model="gpt")
            await asyncio.sleep(1.0)
        status = await gateway.quota_status(None, model="gpt")
    shared = next(d for d in status.models["gpt"] if d.dimension == "tier_rpd")
    assert (shared.used, shared.limit) == (3, 4)
    # the day of tenants ends at midnight in Shanghai (UTC+8): 2027-01-16 00:00 +08:00
    assert shared.resets_at == 1_800_000_000.0 + 8 * 3600
    # 2/4 then 3/4 of the tier's shared day: a warning, then a critical alert
    assert [(a.level, a.dimension, a.tenant) for a in got] == [
        ("warning", "tenant::shared:rpd", None),
        ("critical", "tenant::shared:rpd", None),
    ]
    assert (
        got[0].message
        == "Requests naming no tenant used 50% of its requests (all models) today (2 of 4)."
    )


@pytest.mark.looptime(False)
async def test_a_configured_webhook_is_signed_in_markdown_routed_and_paced_as_the_file_says():
    from aiohttp import web

    got: list[tuple[str, dict[str, Any]]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((request.path_qs, await request.json()))
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    app = web.Application()
    app.router.add_post("/robot/send", hook)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    data = config(
        alerts={
            "log": False,
            "webhooks": [
                {
                    "url_env": "ROBOT_URL",
                    "format": "dingtalk",
                    "secret_env": "ROBOT_SECRET",
                    "markdown": True,
                    "kinds": ["usage"],
                    "pace": {"messages": 1, "per": 60.0},
                }
            ],
        }
    )
    environ = {
        **KEYS,
        "ROBOT_URL": f"http://127.0.0.1:{port}/robot/send?access_token=tok",
        "ROBOT_SECRET": "SEC-do-not-show",
    }
    gateway = Gateway.from_config(parse_config(data), environ=environ)
    try:
        async with gateway:
            monitor = gateway.monitor
            assert monitor is not None
            monitor.event("fallback", "claude", reason="overloaded")  # not its kind
            monitor.observe("budget", 85.0, 100.0)
            monitor.observe("budget", 95.0, 100.0)  # inside the pace: folded or held
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
        stats = monitor.statistics()
    finally:
        await runner.cleanup()
    assert len(got) == 1
    path, body = got[0]
    assert "access_token=tok" in path and "&timestamp=" in path and "&sign=" in path
    assert body["msgtype"] == "markdown"
    assert stats.skipped == 1  # the fallback event, not routed to this robot


# -- exhaustion: held per account until the stated regain, probed once, queued moved ------------


async def test_a_spend_cap_moves_the_night_to_the_fallback_and_says_so_once(caplog):
    got: list[Alert] = []
    gateway, ups = build(config(alerts={"log": False}), sinks=[CallbackSink(got.append)])
    ups["anthropic"].capped = True
    caplog.set_level(logging.WARNING, logger="asyncquota.gateway")
    async with gateway:
        first = await gateway.request(chat())
        later = [await gateway.request(chat()) for _ in range(3)]
        status = await gateway.quota_status()
    assert first.model == "gpt" and all(r.model == "gpt" for r in later)
    assert len(ups["anthropic"].seen) == 1  # held back after its word: nothing more sent
    assert first.passed_over[0].startswith("claude: out of quota until 2027-01-16 00:00:00 UTC")
    exhausted = [a for a in got if a.kind == "exhausted"]
    assert len(exhausted) == 1 and exhausted[0].level == "critical"
    claude = status.availability["claude"]
    assert claude.state == "exhausted" and claude.until == REGAIN
    assert str(claude).startswith("exhausted until 2027-01-16 00:00:00 UTC (Anthropic spend cap")
    assert claude.account.startswith("anthropic#")
    assert str(status.availability["gpt"]) == "available"
    stats = gateway.statistics()
    assert (stats.exhaustions, stats.fallbacks, stats.held) == (1, 4, (claude.account,))
    warnings = [r for r in caplog.records if r.name == "asyncquota.gateway"]
    assert len(warnings) == 1 and "moves to gpt" in warnings[0].getMessage()
    assert all(key not in caplog.text for key in KEYS.values())
    assert all(key not in repr(status) for key in KEYS.values())


async def test_refusals_of_requests_sent_before_the_hold_do_not_restate_it(caplog):
    loop = asyncio.get_running_loop()
    ups = {"anthropic": Night("anthropic"), "openai": Night("openai")}
    gateway = Gateway.from_config(
        parse_config(config()),
        transports={name: MockTransport(up.handle) for name, up in ups.items()},
        wall_clock=lambda: EPOCH + 0.999999 * loop.time(),  # a wall clock a little slow
        environ=KEYS,
    )
    ups["anthropic"].capped = True
    caplog.set_level(logging.WARNING, logger="asyncquota.gateway")

    async def later() -> Any:
        await asyncio.sleep(0.01)  # sent before the first refusal; refused after it
        return await gateway.request(chat())

    async with gateway:
        served = await asyncio.gather(gateway.request(chat()), later())
    assert [r.model for r in served] == ["gpt", "gpt"] and len(ups["anthropic"].seen) == 2
    warnings = [r for r in caplog.records if r.name == "asyncquota.gateway"]
    assert len(warnings) == 1  # one hold, said once: not again for each refusal in flight


async def test_the_hold_ends_at_the_stated_regain_with_one_probe_not_a_stampede():
    got: list[Alert] = []
    gateway, ups = build(config(alerts={"log": False}), sinks=[CallbackSink(got.append)])
    ups["anthropic"].capped = True
    async with gateway:
        await gateway.request(chat())
        await asyncio.sleep(REGAIN - EPOCH - 60)  # a minute before midnight UTC: still held
        assert (await gateway.request(chat())).model == "gpt"
        assert len(ups["anthropic"].seen) == 1
        await asyncio.sleep(60)
        ups["anthropic"].capped = False
        burst = await asyncio.gather(*(gateway.request(chat()) for _ in range(5)))
        after = await gateway.request(chat())
    assert sorted(r.model for r in burst) == ["claude", "gpt", "gpt", "gpt", "gpt"]
    probing = [r for r in burst if r.model == "gpt"]
    assert all("a probe is checking" in r.passed_over[0] for r in probing)
    assert after.model == "claude"
    assert len(ups["anthropic"].seen) == 3  # the refusal, the probe, then traffic again
    assert [a.kind for a in got] == ["exhausted", "recovered"]
    stats = gateway.statistics()
    assert (stats.probes, stats.recoveries, stats.held) == (1, 1, ())


async def test_a_regain_stated_to_the_second_is_probed_in_its_last_second(caplog):
    caplog.set_level(logging.WARNING)
    got: list[Alert] = []
    gateway, ups = build(config(alerts={"log": False}), sinks=[CallbackSink(got.append)])
    ups["anthropic"].capped = True
    loop_regain = REGAIN - EPOCH  # the loop time of the stated regain
    served: list[tuple[float, str]] = []

    async def ask() -> None:
        routed = await gateway.request(chat())
        served.append((asyncio.get_running_loop().time(), routed.model))

    async with gateway:
        await gateway.request(chat())
        await asyncio.sleep(loop_regain - 1.5 - asyncio.get_running_loop().time())
        # The account is back 0.4 s into the stated time's last second; a caller every 20 ms.
        asyncio.get_running_loop().call_later(1.1, setattr, ups["anthropic"], "capped", False)
        callers = []
        for _ in range(100):
            callers.append(asyncio.create_task(ask()))
            await asyncio.sleep(0.02)
        await asyncio.gather(*callers)
    first_back = min(t for t, model in served if model == "claude")
    assert loop_regain - 0.4 < first_back < loop_regain - 0.1  # not a second late
    # Probes one at a time, 0.1 s apart from a second before, each refused but the last.
    refused = len(ups["anthropic"].seen) - 1 - sum(model == "claude" for _, model in served)
    assert 3 <= refused <= 5
    # Refused early probes say nothing new: one hold, one alarm, one recovery.
    assert [a.kind for a in got] == ["exhausted", "recovered"]
    holds = [r for r in caplog.records if "out of quota until" in r.getMessage()]
    assert len(holds) == 1  # the hold, said when it began; not again for each probe
    assert gateway.statistics().recoveries == 1


async def test_a_refused_probe_holds_the_account_again_for_the_configured_hold():
    gateway, ups = build(config(gateway={"exhausted_hold": 120.0}))
    ups["anthropic"].capped = True
    async with gateway:
        await gateway.request(chat())
        await asyncio.sleep(REGAIN - EPOCH)
        probe = await gateway.request(chat())  # still capped past the stated day
        status = await gateway.quota_status(model="claude")
        await asyncio.sleep(119)
        assert (await gateway.request(chat())).model == "gpt"
        await asyncio.sleep(1)
        ups["anthropic"].capped = False
        back = await gateway.request(chat())
    assert probe.model == "gpt" and back.model == "claude"
    assert len(ups["anthropic"].seen) == 3
    assert status.availability["claude"].until == pytest.approx(wall_at(REGAIN - EPOCH + 120.05))
    assert gateway.statistics().exhaustions == 1  # one episode, probed twice
    assert gateway.statistics().probes == 2


def wall_at(loop_time: float) -> float:
    return EPOCH + loop_time


async def test_requests_queued_on_an_exhausted_account_move_to_the_fallback_at_once():
    data = config()
    data["upstreams"]["anthropic"]["rpm"] = 6  # one every 10 s: the rest queue
    gateway, ups = build(data)
    ups["anthropic"].capped = True
    loop = asyncio.get_running_loop()
    async with gateway:
        started = loop.time()

        async def timed() -> tuple[str, float]:
            routed = await gateway.request(chat())
            return routed.model, loop.time() - started

        done = await asyncio.gather(*(timed() for _ in range(6)))
    assert len(ups["anthropic"].seen) == 1  # only the first was sent; the queued never were
    assert [model for model, _ in done] == ["gpt"] * 6
    # the refusal took 0.05 s, the fallback's reply 0.1 s: nobody waited its turn on claude
    assert max(at for _, at in done) == pytest.approx(0.15, abs=0.02)


async def test_the_exhausted_alarm_goes_out_before_the_queued_requests_move():
    # Shedding a spent account's line wakes every request queued on it at once; an alert
    # queued after them would wait behind them all (in real time, seconds of a busy loop).
    data = config(alerts={"log": False})
    data["upstreams"]["anthropic"]["rpm"] = 6  # one every 10 s: the rest queue
    ups = {"anthropic": Night("anthropic"), "openai": Night("openai")}
    ups["anthropic"].capped = True
    order: list[str] = []

    async def fallback(request: Request) -> Response:
        order.append("moved")
        return await ups["openai"].handle(request)

    gateway = Gateway.from_config(
        parse_config(data),
        transports={
            "anthropic": MockTransport(ups["anthropic"].handle),
            "openai": MockTransport(fallback),
        },
        wall_clock=wall,
        environ=KEYS,
        sinks=[CallbackSink(lambda alert: order.append(alert.kind))],
    )
    async with gateway:
        await asyncio.gather(*(gateway.request(chat()) for _ in range(6)))
    # The request that heard the refusal moves on in the same step; the five queued
    # behind it move after the alarm (before this, all six went first).
    assert order == ["moved", "exhausted"] + ["moved"] * 5


async def test_without_exhausted_in_fallback_on_the_held_model_fails_fast_and_sends_nothing():
    gateway, ups = build(config(gateway={"fallback_on": ["overloaded", "transport"]}))
    ups["anthropic"].capped = True
    async with gateway:
        with pytest.raises(QuotaExhaustedError) as first:
            await gateway.request(chat())
        with pytest.raises(QuotaExhaustedError) as second:
            await gateway.request(chat())
    assert first.value.regain_at == REGAIN
    assert second.value.status is None and "it was not sent" in str(second.value)
    assert second.value.retry_after == pytest.approx(REGAIN - EPOCH - 0.05, abs=0.01)
    assert len(ups["anthropic"].seen) == 1 and not ups["openai"].seen


async def test_two_upstreams_with_one_key_are_one_account_held_together():
    data = config()
    data["upstreams"]["anthropic_eu"] = {
        "base_url": "http://eu.anthropic.test",
        "api_key_env": "ANTHROPIC_KEY",
        "auth": "x-api-key",
    }
    data["models"]["claude-eu"] = {
        "upstream": "anthropic_eu",
        "context_window": 200_000,
        "input_per_mtok": 3.0,
        "output_per_mtok": 15.0,
        "path": "/v1/messages",
        "fallbacks": ["gpt"],
    }
    eu = Night("anthropic")
    ups = {"anthropic": Night("anthropic"), "openai": Night("openai"), "anthropic_eu": eu}
    gateway = Gateway.from_config(
        parse_config(data),
        transports={name: MockTransport(up.handle) for name, up in ups.items()},
        wall_clock=wall,
        environ=KEYS,
    )
    ups["anthropic"].capped = True
    async with gateway:
        await gateway.request(chat(), model="claude")
        routed = await gateway.request(chat(), model="claude-eu")
        status = await gateway.quota_status()
    assert routed.model == "gpt" and not eu.seen
    assert status.availability["claude-eu"].state == "exhausted"
    assert status.availability["claude"].account == status.availability["claude-eu"].account


# -- one format across providers ------------------------------------------------------------


def anthropic_body(**extra: Any) -> dict[str, Any]:
    return {
        "system": "You track parcels.",
        "messages": [{"role": "user", "content": "Where is my parcel?"}],
        "max_tokens": 50,
        **extra,
    }


def sse_data(body: bytes) -> list[Any]:
    return [
        line[6:] if line[6:] == b"[DONE]" else orjson.loads(line[6:])
        for line in body.split(b"\n")
        if line.startswith(b"data: ")
    ]


async def test_an_openai_caller_served_by_claude_reads_openai_whole_and_streamed():
    gateway, ups = build(config())
    async with gateway:
        whole = await gateway.request(chat())
        streamed = await gateway.request(chat(stream=True, stream_options={"include_usage": True}))
    sent = ups["anthropic"].seen[0]
    assert sent["model"] == "claude" and sent["messages"][0]["content"] == "Where is my parcel?"
    assert "choices" not in sent and sent["max_tokens"] == 50
    reply = whole.response.json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] == whole.output_tokens > 0
    chunks = sse_data(streamed.response.body)
    assert chunks[-1] == b"[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[-2]["usage"]["completion_tokens"] == streamed.output_tokens > 0


async def test_an_anthropic_caller_falls_back_to_openai_and_reads_anthropic_whole_and_streamed():
    gateway, ups = build(config(), dialect="anthropic")
    ups["anthropic"].capped = True
    async with gateway:
        whole = await gateway.request(anthropic_body())
        streamed = await gateway.request(anthropic_body(stream=True))
    assert (whole.model, streamed.model) == ("gpt", "gpt")
    sent = ups["openai"].seen[0]
    assert sent["messages"][0] == {"role": "system", "content": "You track parcels."}
    assert sent["model"] == "gpt"
    reply = whole.response.json()
    assert reply["type"] == "message" and reply["content"][0]["type"] == "text"
    assert reply["stop_reason"] in ("end_turn", "max_tokens")
    events = sse_data(streamed.response.body)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert streamed.output_tokens == events[-2]["usage"]["output_tokens"] > 0


async def test_a_body_one_dialect_cannot_say_passes_that_model_over_and_sends_it_nothing():
    gateway, ups = build(config())
    async with gateway:
        served = await gateway.request(chat(n=1, seed=7))  # neutral and dropped: said
        routed = await gateway.request(chat(n=2))  # Anthropic has no n=2: gpt takes it
    assert served.model == "claude"
    assert routed.model == "gpt" and routed.passed_over[0].startswith(
        "claude: cannot take it in its dialect (n: Anthropic has no equivalent"
    )
    assert len(ups["anthropic"].seen) == 1
    gateway, ups = build(config(), dialect="anthropic")
    ups["anthropic"].capped = True
    async with gateway:
        await gateway.request(anthropic_body())  # the hold begins
        with pytest.raises(NoRouteError, match="top_k"):
            await gateway.request(anthropic_body(top_k=5))
    assert len(ups["openai"].seen) == 1


async def test_an_error_from_a_translated_model_reaches_the_caller_in_its_dialect():
    gateway, ups = build(config(gateway={"fallback_on": []}))
    ups["anthropic"].capped = True
    async with gateway:
        with pytest.raises(QuotaExhaustedError) as refused:
            await gateway.request(chat())
    error = orjson.loads(refused.value.body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("You have reached your specified API usage limits")


async def test_an_overloaded_model_falls_back_and_recovers_and_each_is_said_once():
    got: list[Alert] = []
    gateway, ups = build(config(alerts={"log": False}), sinks=[CallbackSink(got.append)])
    ups["anthropic"].overloaded = True
    async with gateway:
        moved = [await gateway.request(chat()) for _ in range(3)]
        ups["anthropic"].overloaded = False
        await asyncio.sleep(30)
        back = await gateway.request(chat())
    assert [r.model for r in moved] == ["gpt"] * 3 and back.model == "claude"
    assert moved[0].passed_over[0] == "claude: overloaded (HTTP 529)"
    assert [(a.kind, a.dimension) for a in got] == [
        ("fallback", "model:claude"),
        ("recovered", "model:claude"),
    ]
    assert gateway.statistics().recoveries == 1


async def test_overload_does_not_fall_back_when_fallback_on_leaves_it_out():
    gateway, ups = build(config(gateway={"fallback_on": ["exhausted"]}))
    ups["anthropic"].overloaded = True
    async with gateway:
        with pytest.raises(OverloadedError):
            await gateway.request(chat())
    assert not ups["openai"].seen


# -- streamed through the gateway, event by event -------------------------------------------


async def read(stream: Any) -> list[tuple[float, bytes]]:
    loop = asyncio.get_running_loop()
    return [(loop.time(), chunk) async for chunk in stream]


def arrivals(got: list[tuple[float, bytes]]) -> list[float]:
    return [round(at, 6) for at, _ in got]


def left_at(times: list[float], skip: float | None = None) -> list[float]:
    """The instants the caller should get a chunk: one per upstream event (but ``skip``)."""
    return [round(at, 6) for at in times if at != skip]


async def test_an_openai_caller_streams_from_claude_translated_event_by_event_as_it_comes():
    gateway, ups = build(config(budget={"monthly": 100.0}))
    claude = ups["anthropic"]
    claude.paced = True
    async with gateway:
        body = chat(stream_options={"include_usage": True})
        async with gateway.stream(body) as stream:
            got = await read(stream)
        spent = (await gateway.quota_status()).budget[0].used
        inflight = gateway.upstreams["anthropic"].statistics().inflight
    assert stream.model == "claude" and claude.seen[0]["stream"] is True
    chunks = sse_data(b"".join(chunk for _, chunk in got))
    assert chunks[-1] == b"[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # Each chunk reached the caller the instant its event left the upstream (message_start,
    # the empty block and the ping were held back until the first text, then went with it).
    assert arrivals(got) == left_at(claude.sent_at[3:], skip=claude.sent_at[-3])
    usage = chunks[-2]["usage"]
    assert (stream.input_tokens, stream.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert spent == pytest.approx(stream.cost) and stream.cost > 0
    assert inflight == 0 and claude.cut == 0


async def test_an_anthropic_caller_falls_back_to_gpt_and_streams_anthropic_events_as_they_come():
    gateway, ups = build(config(), dialect="anthropic")
    ups["anthropic"].capped = True
    gpt = ups["openai"]
    gpt.paced = True
    async with gateway, gateway.stream(anthropic_body()) as stream:
        got = await read(stream)
    assert stream.model == "gpt"
    assert stream.passed_over[0].startswith("claude: out of quota until 2027-01-16")
    sent = gpt.seen[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    events = sse_data(b"".join(chunk for _, chunk in got))
    assert [e["type"] for e in events[:2]] == ["message_start", "content_block_start"]
    assert events[-1]["type"] == "message_stop"
    assert stream.output_tokens == events[-2]["usage"]["output_tokens"] > 0
    # the role-only chunk waited for the first text; then one arrival per upstream event
    # (the usage chunk but not: its figures go out with [DONE], in message_delta)
    assert arrivals(got) == left_at(gpt.sent_at[1:], skip=gpt.sent_at[-2])


async def test_a_stream_broken_off_before_any_content_falls_back_unseen_by_the_caller():
    got_alerts: list[Alert] = []
    gateway, ups = build(
        config(budget={"monthly": 100.0}, alerts={"log": False}),
        sinks=[CallbackSink(got_alerts.append)],
    )
    ups["anthropic"].breaks = True
    async with gateway:
        async with gateway.stream(chat(stream_options={"include_usage": True})) as stream:
            got = await read(stream)
        spent = (await gateway.quota_status()).budget[0].used
        claude = gateway.upstreams["anthropic"].statistics()
    assert stream.model == "gpt"
    assert stream.passed_over == ("claude: overloaded (an error event)",)
    chunks = sse_data(b"".join(chunk for _, chunk in got))
    assert chunks[-1] == b"[DONE]" and all(c["model"] == "gpt" for c in chunks[:-1])
    assert stream.output_tokens == chunks[-2]["usage"]["completion_tokens"]  # read in passing
    assert spent == pytest.approx(stream.cost)  # gpt's reply only: claude's was released
    assert claude.inflight == 0
    assert [(a.kind, a.dimension) for a in got_alerts] == [("fallback", "model:claude")]


async def test_a_stream_left_early_or_cancelled_is_settled_once_at_the_estimate():
    gateway, ups = build(config(budget={"monthly": 100.0}))
    claude = ups["anthropic"]
    claude.paced = True
    async with gateway:
        async with gateway.stream(chat()) as left:
            async for _ in left:
                break  # the caller hangs up after the first chunk
        first = (await gateway.quota_status()).budget[0].used

        reading = asyncio.Event()

        async def listen() -> None:
            async with gateway.stream(chat()) as stream:
                async for _ in stream:
                    reading.set()

        task = asyncio.create_task(listen())
        await reading.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1)  # the settlement tasks, and anything a second one would do
        second = (await gateway.quota_status()).budget[0].used
        inflight = gateway.upstreams["anthropic"].statistics().inflight
    estimate = left.cost
    assert estimate is not None and estimate > 0
    assert (left.input_tokens, left.output_tokens) == (left.input_tokens, 50)
    assert first == pytest.approx(estimate) and second == pytest.approx(2 * estimate)
    assert claude.cut == 2 and inflight == 0
