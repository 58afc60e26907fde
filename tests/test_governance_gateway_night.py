"""The Gateway on the night a provider's quota is gone: configuration, holds, alerts, formats.

Two upstreams from one TOML-shaped configuration: ``anthropic`` (Anthropic messages,
``claude``) falls back to ``openai`` (OpenAI chat, ``gpt``). Each is the simulated upstream
behind a mock transport; ``Night`` can make the Anthropic account answer its spend cap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from asyncquota import BudgetExceededError, MockTransport, Request, Response
from asyncquota.governance import CallbackSink, Gateway, parse_config
from asyncquota.governance.alerts import Alert
from asyncquota.testing import SimulatedUpstream, UpstreamConfig

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
        return await self.sim.handle(request)


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
        with pytest.raises(BudgetExceededError):
            await gateway.request(chat(), tenant="42", model="gpt")
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
