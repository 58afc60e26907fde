"""Per-account monthly caps: a mirror of the provider's own spend cap, reserved with the budgets.

The guard on its own first (reserve, refuse, settle, renew), then the Gateway: two
simulated upstreams, ``anthropic`` (``claude``, capped) falling back to ``openai``
(``gpt``), in virtual time.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from asyncquota import (
    BudgetExceededError,
    MockTransport,
    Request,
    Response,
    Shaper,
    UpstreamCapError,
)
from asyncquota.governance import CallbackSink, ConfigError, Gateway, parse_config
from asyncquota.governance.alerts import Alert
from asyncquota.governance.budget import SLACK, BudgetGuard, BudgetReservation, Price
from asyncquota.governance.routing import Model, Router
from asyncquota.governance.store import MemoryStore
from asyncquota.testing import SimulatedUpstream, UpstreamConfig


def at(*fields: int, zone: str = "UTC") -> float:
    return datetime(*fields, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[misc]


T0 = at(2026, 3, 20, 12)
APRIL = at(2026, 4, 1)
ACCOUNT = "anthropic#1f0c9a2e"
CAP_KEY = f"cap:2026-03:{ACCOUNT}"


def virtual_clock() -> float:
    return T0 + asyncio.get_running_loop().time()


class WatchedStore:
    """A MemoryStore whose calls take ``delay`` seconds each (concurrent callers interleave)
    and that records the highest value each counter reached."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.inner = MemoryStore(wall_clock=virtual_clock)
        self.delay = delay
        self.peak: dict[str, float] = {}

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        await asyncio.sleep(self.delay)
        value = await self.inner.reserve(key, amount, limit=limit, expires_at=expires_at)
        if value is not None:
            self.peak[key] = max(self.peak.get(key, 0.0), value)
        return value

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        await asyncio.sleep(self.delay)
        return await self.inner.add(key, amount, expires_at=expires_at)

    async def get(self, keys: Sequence[str]) -> list[float]:
        return await self.inner.get(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- the guard ----------------------------------------------------------------------------------


async def test_1000_concurrent_reservations_never_overshoot_an_accounts_cap():
    store = WatchedStore(delay=0.001)
    guard = BudgetGuard(monthly=1000.0, caps={ACCOUNT: 5.0}, store=store, wall_clock=virtual_clock)

    results = await asyncio.gather(
        *(guard.reserve(None, 0.01, account=ACCOUNT) for _ in range(1000)), return_exceptions=True
    )

    granted = [r for r in results if isinstance(r, BudgetReservation)]
    refused = [r for r in results if isinstance(r, UpstreamCapError)]
    assert (len(granted), len(refused)) == (500, 500)
    assert store.peak[CAP_KEY] <= 5.0 + SLACK  # never past the cap, even mid-flight
    # every refusal gave back what the global budget had taken for it
    assert await store.get(["budget:2026-03", CAP_KEY]) == pytest.approx([5.0, 5.0])
    assert refused[0].account == ACCOUNT and refused[0].cap == 5.0
    assert refused[0].reason == "upstream_cap"
    assert refused[0].retry_after == APRIL - T0  # 00:00 UTC on the 1st


async def test_a_cap_is_never_overdrawn_even_where_the_budget_may_be():
    guard = BudgetGuard(
        monthly=1.0, overdraft_limit=10.0, caps={ACCOUNT: 2.0}, wall_clock=virtual_clock
    )
    await guard.reserve(None, 1.5, overdraft=True, account=ACCOUNT)  # past the budget: allowed
    with pytest.raises(UpstreamCapError) as refused:
        await guard.reserve(None, 1.0, overdraft=True, account=ACCOUNT)
    assert str(refused.value) == (
        f"The monthly cap of $2.00 on {ACCOUNT} cannot pay $1.00 more this month (UTC); its "
        "provider would refuse it."
    )
    # another account is not capped: the overdraft goes on there
    await guard.reserve(None, 1.0, overdraft=True, account="openai#00aa11bb")
    assert [(s.dimension, s.used) for s in await guard.status(None, account=ACCOUNT)] == [
        ("budget", 2.5),
        ("upstream_cap", 1.5),
    ]


async def test_a_request_no_budget_can_pay_is_refused_by_the_budget_not_the_cap():
    guard = BudgetGuard(monthly=1.0, caps={ACCOUNT: 1.0}, wall_clock=virtual_clock)
    await guard.reserve(None, 0.9, account=ACCOUNT)
    with pytest.raises(BudgetExceededError) as refused:
        await guard.reserve(None, 0.5, account=ACCOUNT)
    # not a reason to try another model: the budget pays for every model alike
    assert not isinstance(refused.value, UpstreamCapError)


async def test_the_cap_is_settled_with_the_real_cost_once_and_a_cancel_refunds_it():
    guard = BudgetGuard(tenants={"acme": 10.0}, caps={ACCOUNT: 10.0}, wall_clock=virtual_clock)
    served = await guard.reserve("acme", 1.0, account=ACCOUNT)
    unsent = await guard.reserve("acme", 2.0, account=ACCOUNT)

    await served.reconcile(0.25)
    await unsent.cancel()
    with pytest.raises(RuntimeError):
        await served.reconcile(0.25)

    used = {s.dimension: s.used for s in await guard.status("acme", account=ACCOUNT)}
    assert used == pytest.approx({"budget": 0.25, "tenant_budget": 0.25, "upstream_cap": 0.25})
    assert "caps=1 open=0" in repr(guard)


async def test_callers_cancelled_at_random_leak_no_dollar_of_the_cap():
    rng = random.Random(7)
    store = WatchedStore(delay=0.5)  # every store call takes half a second: cancels land mid-way
    guard = BudgetGuard(monthly=100.0, caps={ACCOUNT: 3.0}, store=store, wall_clock=virtual_clock)
    settled: list[float] = []

    async def request() -> None:
        try:
            reservation = await guard.reserve("acme", 0.10, account=ACCOUNT)
        except UpstreamCapError:
            return
        try:
            await asyncio.sleep(rng.uniform(0.0, 3.0))
        except asyncio.CancelledError:
            await reservation.cancel()
            raise
        settled.append(0.04)  # decided here, even if cancelled during the reconcile
        await reservation.reconcile(0.04)

    tasks = [asyncio.create_task(request()) for _ in range(100)]
    loop = asyncio.get_running_loop()
    for task in rng.sample(tasks, 50):
        loop.call_later(rng.uniform(0.0, 5.0), task.cancel)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert 0 < sum(isinstance(o, asyncio.CancelledError) for o in outcomes) <= 50
    await asyncio.sleep(2.0)  # refunds of callers cancelled mid-call end in the background

    assert store.peak[CAP_KEY] <= 3.0 + SLACK
    used = await store.get(["budget:2026-03", "budget:2026-03:tenant:acme", CAP_KEY])
    assert settled and used == pytest.approx([sum(settled)] * 3)
    assert "open=0" in repr(guard)


async def test_the_cap_renews_at_midnight_utc_whatever_the_budgets_time_zone():
    now = at(2026, 3, 31, 20)  # 04:00 on April 1st in Shanghai, still March in UTC
    guard = BudgetGuard(
        monthly=10.0, caps={ACCOUNT: 1.0}, timezone="Asia/Shanghai", wall_clock=lambda: now
    )
    await guard.reserve(None, 1.0, account=ACCOUNT)
    budget, cap = await guard.status(None, account=ACCOUNT)
    assert (budget.resets_at, cap.resets_at) == (at(2026, 5, 1, zone="Asia/Shanghai"), APRIL)
    with pytest.raises(UpstreamCapError) as refused:
        await guard.reserve(None, 0.5, account=ACCOUNT)
    assert refused.value.retry_after == 4 * 3600
    assert (await guard.cap_status())[ACCOUNT].used == 1.0


async def test_only_capped_accounts_are_counted_and_a_cap_must_be_a_positive_amount():
    guard = BudgetGuard(caps={ACCOUNT: 1.0}, wall_clock=virtual_clock)
    await guard.reserve(None, 5.0, account="openai")  # no cap: only the global spend counts
    assert [s.dimension for s in await guard.status(None, account="openai")] == ["budget"]
    assert (await guard.cap_status())[ACCOUNT].used == 0.0
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match=r"caps\['a'\] must be a finite number of dollars > 0"):
            BudgetGuard(caps={"a": bad})  # type: ignore[dict-item]


# -- the gateway --------------------------------------------------------------------------------

EPOCH = 1_800_000_000.0  # 2027-01-15 08:00 UTC
FEBRUARY = at(2027, 2, 1)
KEYS = {"ANTHROPIC_KEY": "sk-ant-secret-0001", "OPENAI_KEY": "sk-openai-secret-0002"}


def wall() -> float:
    return EPOCH + asyncio.get_running_loop().time()


class Upstream:
    """A simulated upstream that records the bodies it was sent; ``overloaded`` answers 529."""

    def __init__(self) -> None:
        self.sim = SimulatedUpstream(
            UpstreamConfig(rps=1000.0, latency_base=0.1, latency_per_token=0.0, wall_clock=wall)
        )
        self.seen: list[dict[str, Any]] = []
        self.overloaded = False

    async def handle(self, request: Request) -> Response:
        self.seen.append(orjson.loads(request.body or b"{}"))
        if self.overloaded:
            body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return Response(529, {"content-type": "application/json"}, orjson.dumps(body))
        return await self.sim.handle(request)


def config(cap: float | None = 0.01, **extra: Any) -> dict[str, Any]:
    anthropic: dict[str, Any] = {
        "base_url": "http://anthropic.test",
        "api_key_env": "ANTHROPIC_KEY",
        "auth": "x-api-key",
    }
    if cap is not None:
        anthropic["monthly_cap"] = cap
    data: dict[str, Any] = {
        "upstreams": {
            "anthropic": anthropic,
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
    data.update(extra)
    return data


def build(data: dict[str, Any], **kwargs: Any) -> tuple[Gateway, dict[str, Upstream]]:
    ups = {"anthropic": Upstream(), "openai": Upstream()}
    gateway = Gateway.from_config(
        parse_config(data),
        transports={name: MockTransport(up.handle) for name, up in ups.items()},
        wall_clock=wall,
        environ=KEYS,
        **kwargs,
    )
    return gateway, ups


def chat(max_tokens: int = 50) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Where is my parcel?"}],
        "max_tokens": max_tokens,
    }


async def claude_cap(gateway: Gateway) -> tuple[str, float, float | None]:
    ((account, cap),) = (await gateway.quota_status()).caps.items()
    return account, cap.used, cap.limit


async def test_a_request_the_cap_cannot_pay_falls_back_and_one_fallback_alert_says_why(caplog):
    got: list[Alert] = []
    gateway, ups = build(config(cap=0.003, alerts={"log": False}), sinks=[CallbackSink(got.append)])
    caplog.set_level(logging.WARNING, logger="asyncquota.gateway")
    async with gateway:
        served = [await gateway.request(chat()) for _ in range(12)]
        small = await gateway.request(chat(max_tokens=1))  # what is left of the cap pays it
        served.append(small)
        account, used, cap = await claude_cap(gateway)
    on_claude = [r for r in served if r.model == "claude"]
    first_gpt = next(i for i, r in enumerate(served) if r.model == "gpt")
    assert 0 < first_gpt < 12 and served[11].model == "gpt"
    assert len(ups["anthropic"].seen) == len(on_claude)  # nothing sent past the cap
    # the spend counted is what the replies cost, and it never passed the cap
    assert used == pytest.approx(sum(r.cost for r in on_claude)) and used <= 0.003 + SLACK
    assert cap == 0.003 and account.startswith("anthropic#")
    moved = served[first_gpt]
    assert moved.passed_over == ("claude: at its account's monthly cap of $0.003",)
    assert moved.reason == "fallback from claude: at its account's monthly cap of $0.003"
    fallbacks = [a for a in got if a.kind == "fallback"]
    assert len(fallbacks) == 1 and fallbacks[0].dimension == "model:claude"
    assert fallbacks[0].message == (
        f"Model claude on {account} is unavailable until 2027-02-01 00:00:00 UTC (at its "
        "account's monthly cap of $0.003): traffic moved to gpt."
    )
    assert fallbacks[0].action == (
        f"raise the spend cap of {account} at its provider, then its monthly_cap, or wait for "
        "the cap to renew; make sure gpt can carry the traffic meanwhile"
    )
    assert small.model == "claude" and small.passed_over == ()
    assert "recovered" not in [a.kind for a in got]  # a smaller request it paid ends nothing
    warnings = [r.getMessage() for r in caplog.records if r.name == "asyncquota.gateway"]
    assert warnings == [
        f"Model claude on {account} is at its account's monthly cap of $0.003: its traffic "
        "moves to gpt."
    ]
    assert all(key not in caplog.text + repr(got) for key in KEYS.values())


async def test_the_cap_episode_ends_when_its_month_renews_at_midnight_utc():
    got: list[Alert] = []
    gateway, _ = build(config(cap=0.001, alerts={"log": False}), sinks=[CallbackSink(got.append)])
    async with gateway:
        assert (await gateway.request(chat())).model == "claude"
        assert (await gateway.request(chat())).model == "gpt"
        await asyncio.sleep(FEBRUARY - EPOCH - 60)  # a minute before: still January's cap
        assert (await gateway.request(chat())).model == "gpt"
        await asyncio.sleep(60)
        renewed = await gateway.request(chat())
        _, used, _ = await claude_cap(gateway)
    assert renewed.model == "claude" and used == pytest.approx(renewed.cost)
    assert [a.kind for a in got] == ["fallback", "recovered"]


async def test_many_concurrent_requests_never_spend_past_the_cap_and_all_are_served():
    store = WatchedStore(delay=0.001)
    sims = {"anthropic": Upstream(), "openai": Upstream()}
    shapers = {
        name: Shaper(f"http://{name}.test", transport=MockTransport(up.handle), wall_clock=wall)
        for name, up in sims.items()
    }
    claude = Model("claude", "anthropic", 200_000, Price(3.0, 15.0), path="/v1/messages")
    gpt = Model("gpt", "openai", 128_000, Price(2.5, 10.0))
    router = Router(models=[claude, gpt], fallbacks={"claude": ["gpt"]}, default_model="claude")
    guard = BudgetGuard(caps={"anthropic": 0.05}, store=store, wall_clock=wall)
    async with Gateway(upstreams=shapers, router=router, budget=guard, wall_clock=wall) as gateway:
        served = await asyncio.gather(*(gateway.request(chat()) for _ in range(300)))
        cap = (await gateway.quota_status()).caps["anthropic"]
    on_claude = [r for r in served if r.model == "claude"]
    assert 0 < len(on_claude) < 300 and len(sims["anthropic"].seen) == len(on_claude)
    assert store.peak["cap:2027-01:anthropic"] <= 0.05 + SLACK  # reservations in flight included
    assert cap.used == pytest.approx(sum(r.cost for r in on_claude))  # settled once each
    assert "open=0" in repr(guard)


async def test_a_refused_or_streamed_request_settles_the_cap_exactly_once():
    gateway, ups = build(config(cap=1.0))
    async with gateway:
        ups["anthropic"].overloaded = True
        gateway_refused = await gateway.request(chat())  # 529: falls back, nothing generated
        _, after_refusal, _ = await claude_cap(gateway)
        ups["anthropic"].overloaded = False
        async with gateway.stream(chat()) as stream:
            async for _ in stream:
                pass
        _, after_stream, _ = await claude_cap(gateway)
    assert gateway_refused.model == "gpt" and after_refusal == 0.0
    assert stream.model == "claude" and stream.cost is not None and stream.cost > 0
    assert after_stream == pytest.approx(stream.cost)


async def test_downgrade_at_applies_to_the_cap_and_a_reload_picks_up_a_new_cap():
    data = config(cap=1.0, budget={"downgrade_at": 0.8})
    gateway, ups = build(data)
    async with gateway:
        first = await gateway.request(chat())
        # the same account's cap, made so that the first request spent 85 % of it
        gateway.reload(parse_config(config(cap=first.cost / 0.85, budget={"downgrade_at": 0.8})))
        second = await gateway.request(chat())
        account, used, cap = await claude_cap(gateway)
    assert first.model == "claude" and second.model == "gpt"
    assert second.reason.endswith(f"; 85% of the monthly cap of {account} is spent")
    assert (used, cap) == (pytest.approx(first.cost), pytest.approx(first.cost / 0.85))
    assert len(ups["anthropic"].seen) == 1


async def test_raising_the_cap_by_reload_ends_the_episode_and_traffic_returns():
    got: list[Alert] = []
    gateway, _ = build(config(cap=0.001, alerts={"log": False}), sinks=[CallbackSink(got.append)])
    async with gateway:
        await gateway.request(chat())
        assert (await gateway.request(chat())).model == "gpt"
        gateway.reload(parse_config(config(cap=0.0011, alerts={"log": False})))
        still = await gateway.request(chat(max_tokens=1))  # fits the little room left
        gateway.reload(parse_config(config(cap=10.0, alerts={"log": False})))
        back = await gateway.request(chat())
        caps_removed = config(cap=None, alerts={"log": False})
        gateway.reload(parse_config(caps_removed))
        status = await gateway.quota_status()
    assert still.model == "claude" and back.model == "claude"
    # the small cap raise ended the episode at its next reply, the big one had none to end
    assert [a.kind for a in got] == ["fallback", "recovered"]
    assert status.caps == {}


async def test_the_usage_monitor_warns_at_80_and_90_percent_of_a_cap_with_an_action():
    got: list[Alert] = []
    gateway, _ = build(config(cap=0.02, alerts={"log": False}), sinks=[CallbackSink(got.append)])
    async with gateway:
        for _ in range(40):
            if (await gateway.request(chat())).model == "gpt":
                break
            await asyncio.sleep(1.0)  # the monitor reads the stores at most once a second
        account, used, cap = await claude_cap(gateway)
    # refused when less than one request's estimate ($0.0008) was left: past 90 %
    assert cap is not None and used / cap >= 0.95
    usage = [a for a in got if a.dimension.startswith("upstream_cap:")]
    assert [(a.level, a.dimension) for a in usage] == [
        ("warning", f"upstream_cap:{account}"),
        ("critical", f"upstream_cap:{account}"),
    ]
    assert usage[0].action == "downgrade to a cheaper model or move traffic to the fallbacks"
    assert usage[1].action == "raise the account's spend cap at the provider and its monthly_cap"
    assert usage[0].message.startswith(f"{account} spent 8")  # 80-89 %: one request ~4 %
    assert usage[0].message.endswith(
        " of $0.02); past it, its models' requests go to their fallbacks."
    )


async def test_without_exhausted_in_fallback_on_a_capped_model_fails_fast_and_sends_nothing():
    gateway, ups = build(config(cap=0.0001, gateway={"fallback_on": ["overloaded"]}))
    async with gateway:
        with pytest.raises(UpstreamCapError) as refused:
            await gateway.request(chat())
    assert refused.value.retry_after == pytest.approx(FEBRUARY - EPOCH)
    assert not ups["anthropic"].seen and not ups["openai"].seen


async def test_the_last_model_of_a_chain_over_its_cap_is_refused_with_the_cap_error():
    data = config(cap=0.0001)
    del data["models"]["claude"]["fallbacks"]
    gateway, ups = build(data)
    async with gateway:
        with pytest.raises(UpstreamCapError) as refused:
            await gateway.request(chat())
    assert refused.value.account.startswith("anthropic#")
    assert "sk-ant" not in str(refused.value) and not ups["anthropic"].seen


async def test_two_upstreams_of_one_account_share_one_cap_and_must_agree_on_it():
    data = config(cap=0.001)
    data["upstreams"]["anthropic_eu"] = {
        "base_url": "http://eu.anthropic.test",
        "api_key_env": "ANTHROPIC_KEY",  # the same key: the same account at the provider
        "auth": "x-api-key",
    }
    parse_config(data)  # one states the cap: it is the account's
    data["upstreams"]["anthropic_eu"]["monthly_cap"] = 0.002
    with pytest.raises(ValueError, match=r"upstreams\.anthropic\.monthly_cap \(\$0\.001\) and "):
        Gateway.from_config(parse_config(data), environ=KEYS)


def test_a_cap_in_the_file_must_be_a_positive_number_of_dollars():
    with pytest.raises(ConfigError, match=r"upstreams\.anthropic\.monthly_cap must be a positive"):
        parse_config(config(cap=0))
    with pytest.raises(ConfigError, match=r"upstreams\.anthropic\.monthly_cap must be a positive"):
        parse_config(config(cap="500"))  # type: ignore[arg-type]
