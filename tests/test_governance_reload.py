"""Gateway.reload: a changed configuration applies to the next request, all of it or nothing.

One upstream (``openai``, simulated, every reply a second long) serves two models, ``gpt``
falling back to ``mini``; tenants take the ``free`` tier (3 requests a day) unless listed.
Requests are started, the configuration is reloaded while they are in flight, and what
they and the next request get is checked, in virtual time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest

from asyncquota import (
    BudgetExceededError,
    MockTransport,
    OverloadedError,
    Request,
    Response,
    TenantLimitError,
)
from asyncquota.governance import ConfigError, Gateway, GatewaySpec, Routed, parse_config
from asyncquota.governance.alerts import Thresholds
from asyncquota.testing import SimulatedUpstream, UpstreamConfig

EPOCH = 1_800_000_000.0  # 2027-01-15 08:00 UTC
KEYS = {"OPENAI_KEY": "sk-openai-secret-0002"}


def wall() -> float:
    return EPOCH + asyncio.get_running_loop().time()


class Upstream:
    """The simulated upstream; ``overloaded`` makes one model answer 529."""

    def __init__(self) -> None:
        self.sim = SimulatedUpstream(
            UpstreamConfig(rps=1000.0, latency_base=1.0, latency_per_token=0.0, wall_clock=wall)
        )
        self.overloaded: set[str] = set()

    async def handle(self, request: Request) -> Response:
        if orjson.loads(request.body or b"{}").get("model") in self.overloaded:
            return Response(529, {"content-type": "application/json"}, b'{"error": "busy"}')
        return await self.sim.handle(request)


def table(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": "http://openai.test", "api_key_env": "OPENAI_KEY"}},
        "models": {
            "gpt": {
                "upstream": "openai",
                "context_window": 128_000,
                "input_per_mtok": 2.5,
                "output_per_mtok": 10.0,
                "fallbacks": ["mini"],
            },
            "mini": {
                "upstream": "openai",
                "context_window": 128_000,
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.6,
            },
        },
        "routing": {"default_model": "gpt"},
        "tiers": {"free": {"*": {"rpd": 3}}, "pro": {"*": {"rpd": 100}}},
        "tenants": {"default_tier": "free", "members": {"acme": "free"}},
        "budget": {"monthly": 100.0, "when_spent": "reject"},
        "alerts": {"log": False},
    }
    data.update(changes)
    return data


def build(data: dict[str, Any]) -> tuple[Gateway, Upstream]:
    upstream = Upstream()
    gateway = Gateway.from_config(
        parse_config(data),
        transports={"openai": MockTransport(upstream.handle)},
        wall_clock=wall,
        environ=KEYS,
    )
    return gateway, upstream


def chat() -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 50}


async def test_requests_in_flight_finish_and_the_next_request_meets_the_new_tiers():
    gateway, _ = build(table())
    async with gateway:
        acme = [asyncio.create_task(gateway.request(chat(), tenant="acme")) for _ in range(3)]
        others = [asyncio.create_task(gateway.request(chat(), tenant=f"t{n}")) for n in range(40)]
        await asyncio.sleep(0.5)
        with pytest.raises(TenantLimitError):  # free: 3 a day, all three in flight
            await gateway.request(chat(), tenant="acme")

        assert not any(task.done() for task in (*acme, *others))  # sent, or queued

        gateway.reload(parse_config(table(tenants={"members": {"acme": "pro"}})))

        served = await asyncio.gather(*acme, *others)
        assert all(isinstance(each, Routed) for each in served)
        # Pro's 100 a day, the three of today still counted; and no default tier now.
        assert (await gateway.request(chat(), tenant="acme")).model == "gpt"
        status = await gateway.quota_status("acme", "gpt")
        assert [(s.dimension, s.used, s.limit) for s in status.models["gpt"]] == [("rpd", 4, 100)]
        assert (await gateway.quota_status("t0", "gpt")).models["gpt"] == ()


async def test_a_smaller_budget_refuses_the_next_request_and_in_flight_spend_counts_against_it():
    gateway, _ = build(table())
    async with gateway:
        flying = [asyncio.create_task(gateway.request(chat(), tenant=f"t{n}")) for n in range(3)]
        await asyncio.sleep(0.5)

        gateway.reload(parse_config(table(budget={"monthly": 0.0001, "when_spent": "reject"})))

        served = await asyncio.gather(*flying)
        spent = sum(each.cost for each in served)
        (budget,) = (await gateway.quota_status()).budget
        assert (budget.used, budget.limit) == (pytest.approx(spent), 0.0001)
        with pytest.raises(BudgetExceededError):
            await gateway.request(chat(), tenant="t9")


async def test_routes_models_and_the_gateway_settings_apply_to_the_next_request():
    gateway, upstream = build(table())
    async with gateway:
        upstream.overloaded = {"gpt"}
        assert (await gateway.request(chat())).model == "mini"  # overloaded: falls back
        upstream.overloaded = set()
        routed_before = asyncio.create_task(gateway.request(chat(), tenant="x"))
        await asyncio.sleep(0.5)

        gateway.reload(
            parse_config(
                table(
                    routing={"default_model": "mini"},
                    gateway={"fallback_on": ["exhausted", "transport"]},
                )
            )
        )

        assert (await routed_before).model == "gpt"  # routed before: keeps its route
        assert (await gateway.request(chat(), tenant="y")).model == "mini"
        upstream.overloaded = {"gpt"}
        with pytest.raises(OverloadedError):  # overload no longer falls back
            await gateway.request(chat(), model="gpt", tenant="z")


async def test_alert_thresholds_change_and_an_alert_under_way_is_not_repeated():
    gateway, _ = build(table())
    monitor = gateway.monitor
    assert monitor is not None
    assert monitor.observe("upstream:openai:requests", 75, 100) is not None  # 0.70: warning
    assert monitor.thresholds("budget")[:2] == (0.8, 0.9)

    gateway.reload(
        parse_config(
            table(alerts={"log": False, "warning": 0.8, "thresholds": {"budget": {"warning": 0.5}}})
        )
    )

    assert monitor.thresholds("budget")[:2] == (0.5, 0.9)
    assert monitor.thresholds("upstream:openai:requests")[:2] == (0.8, 0.9)
    assert monitor.observe("upstream:openai:requests", 85, 100) is None  # still the same warning
    alert = monitor.observe("upstream:openai:requests", 95, 100)
    assert alert is not None and alert.level == "critical"
    await gateway.aclose()


async def test_a_bad_configuration_changes_nothing():
    gateway, upstream = build(table())
    async with gateway:
        good = parse_config(
            table(
                tenants={"members": {"acme": "pro"}},
                routing={"default_model": "mini"},
                budget={"monthly": 0.0001, "when_spent": "reject"},
                alerts={"log": False, "warning": 0.5},
            )
        )
        for bad in (
            dataclasses.replace(good, gateway=GatewaySpec(exhausted_hold=-1.0)),
            dataclasses.replace(good, tenants={"acme": "gold"}),
            dataclasses.replace(
                good,
                alerts=dataclasses.replace(
                    good.alerts, thresholds={"budget": Thresholds(warning=0.95)}
                ),
            ),
        ):
            with pytest.raises(ValueError):
                gateway.reload(bad)

        monitor = gateway.monitor
        assert monitor is not None and monitor.thresholds("upstream:x:tokens")[0] == 0.7
        for _ in range(3):
            assert (await gateway.request(chat(), tenant="acme")).model == "gpt"  # route, budget
        with pytest.raises(TenantLimitError):  # still free
            await gateway.request(chat(), tenant="acme")
        upstream.overloaded = {"gpt"}
        assert (await gateway.request(chat(), tenant="b")).model == "mini"  # still falls back


async def test_what_needs_a_restart_is_refused_by_name_and_nothing_changes():
    data = table()
    gateway, _ = build(data)
    moved = table(
        upstreams={
            "openai": {"base_url": "http://elsewhere.test", "api_key_env": "OPENAI_KEY"},
            "spare": {"base_url": "http://spare.test"},
        },
        alerts={"log": True},
        tenants={"members": {"acme": "pro"}},
    )
    with pytest.raises(ConfigError) as refused:
        gateway.reload(parse_config(moved))
    assert str(refused.value) == (
        "The configuration changes what the gateway builds once, at its start: "
        "upstreams.spare (added), upstreams.openai.base_url, alerts.log; restart to apply "
        "it. Nothing was changed."
    )
    status = await gateway.quota_status("acme", "gpt")
    assert [(s.dimension, s.limit) for s in status.models["gpt"]] == [("rpd", 3)]  # still free
    await gateway.aclose()


async def test_a_file_is_reloaded_from_its_path(tmp_path):
    path = tmp_path / "governance.toml"
    base = """
[upstreams.openai]
base_url = "http://openai.test"

[models.gpt]
upstream = "openai"
context_window = 128000
input_per_mtok = 2.5
output_per_mtok = 10.0

[tiers.free]
"*" = { rpd = 1 }
[tiers.pro]
"*" = { rpd = 5 }

[tenants]
default_tier = "free"
"""
    path.write_text(base)
    upstream = Upstream()
    gateway = Gateway.from_config(
        path, transports={"openai": MockTransport(upstream.handle)}, wall_clock=wall
    )
    async with gateway:
        await gateway.request(chat(), model="gpt", tenant="acme")
        with pytest.raises(TenantLimitError):
            await gateway.request(chat(), model="gpt", tenant="acme")
        path.write_text(base.replace('default_tier = "free"', 'default_tier = "pro"'))

        gateway.reload(path)

        assert (await gateway.request(chat(), model="gpt", tenant="acme")).model == "gpt"
