"""The Gateway: routing, fallbacks, tenant tiers, the budget and alerts, over mock upstreams."""

import asyncio
import collections

import orjson
import pytest

from asyncquota import (
    BudgetExceededError,
    Fixed,
    MockTransport,
    NoRouteError,
    QuotaError,
    RejectedError,
    Request,
    Response,
    Shaper,
    TenantLimitError,
)
from asyncquota.errors import StoreUnavailableError
from asyncquota.governance.alerts import CallbackSink, UsageMonitor
from asyncquota.governance.budget import BudgetGuard, Price
from asyncquota.governance.config import EXHAUSTED_HOLD
from asyncquota.governance.gateway import Gateway
from asyncquota.governance.routing import Model, Router, Rule
from asyncquota.governance.store import MemoryStore, SQLiteStore
from asyncquota.governance.tiers import TenantQuotas, Tier, TierLimits

EPOCH = 1_800_000_000.0  # 2027-01-15 08:00 UTC

PATIENT = {"critical": 86_400, "interactive": 86_400, "batch": 86_400}
"""Classes that wait their turn however long (the test is not about waiting in line)."""


def wall() -> float:
    return EPOCH + asyncio.get_running_loop().time()


def chat(content: str = "Where is my parcel?", max_tokens: int = 100) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


class Upstream:
    """A mock upstream that records what it got and answers as told (default: 200 + usage)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict] = []
        self.replies: collections.deque[Response] = collections.deque()
        self.latency = 0.1

    async def handle(self, request: Request) -> Response:
        self.seen.append(orjson.loads(request.body or b"{}"))
        await asyncio.sleep(self.latency)
        if self.replies:
            return self.replies.popleft()
        usage = {"prompt_tokens": 1000, "completion_tokens": 500}
        return Response(200, {}, orjson.dumps({"usage": usage, "upstream": self.name}))


MODELS = (
    Model(
        "big", upstream="a", context_window=32_000, price=Price(10.0, 30.0), api_name="big-2026-01"
    ),
    Model("small", upstream="b", context_window=16_000, price=Price(0.5, 1.5)),
    Model("long", upstream="b", context_window=200_000, price=Price(3.0, 15.0)),
)


RULES = (Rule(model="big", task="code_review", complexity="high"),)


def make_gateway(
    *,
    rules=RULES,
    fallbacks=None,
    tenants=None,
    budget=None,
    monitor=None,
    when_spent="downgrade",
    deadline=30.0,
    downgrade_at=None,
):
    ups = {"a": Upstream("a"), "b": Upstream("b")}
    shapers = {
        name: Shaper(
            f"http://{name}.test",
            transport=MockTransport(up.handle),
            hooks=(),
            max_wait=PATIENT,
            default_deadline=deadline,
            wall_clock=wall,
        )
        for name, up in ups.items()
    }
    router = Router(
        models=MODELS,
        rules=rules,
        fallbacks=fallbacks if fallbacks is not None else {"big": ["small", "long"]},
        default_model="small",
    )
    gateway = Gateway(
        upstreams=shapers,
        router=router,
        tenants=tenants,
        budget=budget,
        monitor=monitor,
        when_spent=when_spent,
        wall_clock=wall,
        downgrade_at=downgrade_at,
    )
    return gateway, ups


# -- routing -----------------------------------------------------------------------------


async def test_the_table_picks_the_model_and_the_body_names_its_api_name():
    gateway, ups = make_gateway()
    async with gateway:
        routed = await gateway.request(chat(), task="code_review", complexity="high")
        plain = await gateway.request(chat(), task="qa", complexity="low")
    assert routed.model == "big" and routed.reason.startswith("rule 0: task=code_review")
    assert ups["a"].seen[0]["model"] == "big-2026-01"
    assert plain.model == "small" and plain.reason == "default model"
    assert ups["b"].seen[0]["model"] == "small"
    # the cost is the reply's usage at the model's prices: 1000 in, 500 out
    assert routed.cost == pytest.approx((1000 * 10.0 + 500 * 30.0) / 1e6)
    assert (routed.input_tokens, routed.output_tokens) == (1000, 500)


async def test_a_context_too_long_for_every_model_is_refused_and_nothing_is_sent():
    gateway, ups = make_gateway(fallbacks={})
    async with gateway:
        with pytest.raises(NoRouteError):
            await gateway.request(chat("x" * 4 * 40_000), model="big")
    assert not ups["a"].seen and not ups["b"].seen


async def test_a_long_request_falls_to_a_model_whose_window_fits():
    gateway, ups = make_gateway()
    async with gateway:
        routed = await gateway.request(chat("x" * 4 * 50_000), model="big")
    assert routed.model == "long"
    assert "too small" in routed.reason
    assert not ups["a"].seen


# -- fallbacks ---------------------------------------------------------------------------


async def test_while_a_model_cools_down_requests_go_to_its_fallback_and_say_why():
    gateway, ups = make_gateway(deadline=10.0)
    refusal = Response(429, {"retry-after": "30"}, b'{"error": {}}')
    ups["a"].replies.extend([refusal, refusal])
    ups["a"].latency = 0.001  # refused at the door, as a rate limiter does
    async with gateway:
        # the upstream asks for 30 s, longer than the 10 s deadline: the next model takes it
        first = await gateway.request(chat(), model="big")
        assert first.model == "small"
        assert first.passed_over == ("big: rate limited for 30.0 s",)
        # A Retry-After is about the request that got it: the next request for big goes
        # to see (the hold's probe), and is refused as well: now the wait is confirmed.
        second = await gateway.request(chat(), model="big")
        assert second.model == "small" and len(ups["a"].seen) == 2
        third = await gateway.request(chat(), model="big")
        assert third.model == "small"
        assert third.reason.startswith("fallback from big: cooling down for")
        assert len(ups["a"].seen) == 2  # nothing more was sent to the cooling upstream
        await asyncio.sleep(31)
        fourth = await gateway.request(chat(), model="big")
    assert fourth.model == "big"


async def test_a_retry_after_that_a_probe_ends_does_not_send_the_model_s_traffic_elsewhere():
    # One 429 with a whole second's Retry-After over a bucket that refills in ms: the hold
    # is a hint. Passed over for the whole stated second, the model's line drained onto
    # its fallback (the real-time 2 a.m. night left its primary under-used so).
    gateway, ups = make_gateway(deadline=10.0)
    ups["a"].replies.append(Response(429, {"retry-after": "1"}, b'{"error": {}}'))
    ups["a"].latency = 0.001  # refused at the door, as a rate limiter does
    async with gateway:
        first = asyncio.create_task(gateway.request(chat(), model="big"))
        await asyncio.sleep(0.003)  # refused, held "for 1 s", its probe not yet out
        assert gateway.upstreams["a"].cooldown_remaining() > 0.9
        second = await gateway.request(chat(), model="big")
        routed = await first
    assert (routed.model, second.model) == ("big", "big")  # not sent elsewhere for 1 s
    assert second.passed_over == ()
    assert len(ups["a"].seen) == 3  # the refused one, its probe (served), the second
    assert not ups["b"].seen


async def test_a_model_with_more_waiting_than_it_serves_in_time_passes_the_excess_to_its_fallback():
    ups = {"a": Upstream("a"), "b": Upstream("b")}
    ups["a"].latency = 5.0
    shapers = {
        name: Shaper(
            f"http://{name}.test",
            transport=MockTransport(up.handle),
            hooks=(),
            limit=Fixed(1),
            max_wait={**PATIENT, "interactive": 1.0} if name == "a" else PATIENT,
            wall_clock=wall,
        )
        for name, up in ups.items()
    }
    router = Router(models=MODELS, fallbacks={"big": ["small"]}, default_model="small")
    async with Gateway(upstreams=shapers, router=router, wall_clock=wall) as gateway:
        first = asyncio.create_task(gateway.request(chat(), model="big"))
        await asyncio.sleep(0)
        # One in flight, for 5 s: the second waits out interactive's 1 s in line, then moves.
        second = await gateway.request(chat(), model="big")
        assert asyncio.get_running_loop().time() == pytest.approx(1.1)
        assert (second.model, second.passed_over) == (
            "small",
            ("big: busy (more waits than it serves in time)",),
        )
        assert (await first).model == "big"


async def test_insufficient_quota_moves_to_the_fallback_and_keeps_the_model_aside_for_a_while():
    gateway, ups = make_gateway()
    body = orjson.dumps(
        {
            "error": {
                "type": "insufficient_quota",
                "code": "insufficient_quota",
                "message": "You exceeded your current quota.",
            }
        }
    )
    ups["a"].replies.append(Response(429, {}, body))
    async with gateway:
        first = await gateway.request(chat(), model="big")
        second = await gateway.request(chat(), model="big")
        assert len(ups["a"].seen) == 1
        assert (first.model, second.model) == ("small", "small")
        assert second.reason == (
            "fallback from big: out of quota until 2027-01-15 08:05:00 UTC "
            "(OpenAI quota exhausted (insufficient_quota))"
        )
        await asyncio.sleep(EXHAUSTED_HOLD)
        # the hold is over: the next request probes the model, and is served
        assert (await gateway.request(chat(), model="big")).model == "big"
        assert (await gateway.request(chat(), model="big")).model == "big"
    stats = gateway.statistics()
    assert (stats.exhaustions, stats.probes, stats.recoveries, stats.held) == (1, 1, 1, ())


async def test_the_last_model_of_a_chain_is_tried_whatever_its_state_and_its_error_is_raised():
    gateway, ups = make_gateway(fallbacks={})
    ups["a"].replies.extend(Response(500, {}, b"oops") for _ in range(10))
    async with gateway:
        with pytest.raises(QuotaError) as failed:
            await gateway.request(chat(), model="big")
    assert failed.value.reason != "no_route"
    assert not ups["b"].seen


# -- tenant tiers ------------------------------------------------------------------------


def tiers(store=None):
    return TenantQuotas(
        tiers=[
            Tier("free", {"*": TierLimits(rpm=2, rpd=10)}),
            Tier("pro", {"*": TierLimits(rpm=100)}),
        ],
        tenants={"acme": "pro"},
        default_tier="free",
        store=store or MemoryStore(wall_clock=wall),
        wall_clock=wall,
    )


async def test_a_tenant_over_its_tier_is_refused_at_once_without_a_call_or_a_fallback():
    gateway, ups = make_gateway(tenants=tiers())
    async with gateway:
        for _ in range(2):
            await gateway.request(chat(), tenant="corner-shop")
        started = asyncio.get_running_loop().time()
        with pytest.raises(TenantLimitError) as refused:
            await gateway.request(chat(), tenant="corner-shop")
        assert asyncio.get_running_loop().time() == started  # at once
        assert refused.value.dimension == "rpm" and refused.value.model == "small"
        assert 0 < refused.value.retry_after <= 120
        # another tenant of another tier is not held back by it
        await gateway.request(chat(), tenant="acme")
    assert len(ups["b"].seen) == 3


async def test_quota_status_reports_the_tenant_per_model_and_the_upstreams_headers():
    gateway, ups = make_gateway(tenants=tiers())
    ups["b"].replies.append(
        Response(
            200,
            {
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-reset-requests": "1s",
            },
            b"{}",
        )
    )
    async with gateway:
        await gateway.request(chat(), tenant="corner-shop")
        status = await gateway.quota_status("corner-shop", "small")
    dims = {d.dimension: d for d in status.models["small"]}
    assert dims["rpd"].used == 1 and dims["rpd"].limit == 10 and dims["rpd"].remaining == 9
    assert status.upstreams["b"].requests.remaining == 59
    assert status.upstreams["a"] is None


# -- the budget --------------------------------------------------------------------------


async def test_a_request_too_dear_for_what_is_left_is_downgraded_within_its_chain():
    # big costs 0.0046 estimated; 10 % of a $0.02 budget is 0.002: downgraded to small
    budget = BudgetGuard(monthly=0.02, store=MemoryStore(wall_clock=wall), wall_clock=wall)
    gateway, ups = make_gateway(budget=budget)
    async with gateway:
        routed = await gateway.request(chat(), model="big")
    assert routed.model == "small"
    assert routed.reason.startswith("downgraded from big")
    assert not ups["a"].seen


async def test_a_spent_budget_rejects_when_told_to_and_says_when_it_renews():
    budget = BudgetGuard(monthly=0.001, store=MemoryStore(wall_clock=wall), wall_clock=wall)
    gateway, ups = make_gateway(budget=budget, when_spent="reject")
    async with gateway:
        await gateway.request(chat(max_tokens=10))  # small: ~$0.00003 estimated, $0.00125 real
        with pytest.raises(BudgetExceededError) as refused:
            await gateway.request(chat(max_tokens=10))
    assert 0 < refused.value.retry_after <= 31 * 86_400
    assert len(ups["b"].seen) == 1


async def test_a_spent_budget_serves_on_the_cheapest_model_when_told_to_downgrade():
    budget = BudgetGuard(monthly=0.001, store=MemoryStore(wall_clock=wall), wall_clock=wall)
    gateway, _ = make_gateway(budget=budget)
    async with gateway:
        await gateway.request(chat(max_tokens=10))
        routed = await gateway.request(chat(), model="big")
        status = await gateway.quota_status()
    assert routed.model == "small" and "the budget is spent" in routed.reason
    assert status.budget[0].used > 0.001  # an overdraft, as configured


async def test_from_80_percent_of_the_budget_spent_requests_go_to_the_cheapest_that_fits():
    budget = BudgetGuard(monthly=1000.0, store=MemoryStore(wall_clock=wall), wall_clock=wall)
    gateway, _ = make_gateway(budget=budget, downgrade_at=0.8)
    async with gateway:
        spent = await budget.reserve(None, 799.0)
        await spent.reconcile(799.0)
        before = await gateway.request(chat(), model="big")  # 79.9 %... + this one's cost
        more = await budget.reserve(None, 1.0)
        await more.reconcile(1.0)
        after = await gateway.request(chat(), model="big")
        longer = await gateway.request(chat("x" * 4 * 20_000), model="big")
    assert before.model == "big"
    assert after.model == "small" and after.reason.endswith("80% of the budget is spent")
    # small's 16 000 tokens cannot hold it: the cheapest that fits is long
    assert longer.model == "long"


async def test_a_downgrade_past_the_budget_stops_at_its_overdraft_limit():
    budget = BudgetGuard(
        monthly=0.001,
        store=MemoryStore(wall_clock=wall),
        wall_clock=wall,
        overdraft_limit=0.002,
    )
    gateway, _ = make_gateway(budget=budget)
    async with gateway:
        served = [await gateway.request(chat(), model="small") for _ in range(3)]
        with pytest.raises(BudgetExceededError, match="past it"):
            await gateway.request(chat(), model="small")
        status = await gateway.quota_status()
    # Each reserves its estimate ($0.00016) and costs $0.00125 (1000 in, 500 out): the
    # third is admitted at $0.0025 spent, the fourth would pass $0.001 + $0.002.
    assert all("the budget is spent" in r.reason for r in served[1:])
    assert status.budget[0].used == pytest.approx(3 * 0.00125)


async def test_a_thousand_concurrent_requests_cannot_overshoot_the_budget_together():
    # Each reply costs the estimate (usage echoes it); $0.05 pays for exactly so many.
    budget = BudgetGuard(monthly=0.05, store=MemoryStore(wall_clock=wall), wall_clock=wall)
    gateway, _ = make_gateway(budget=budget, when_spent="reject", deadline=300)
    body = chat("x" * 396, max_tokens=100)
    prompt = -(-len(orjson.dumps(body)) // 4)  # the gateway's estimate: 4 bytes a token
    cost = Price(0.5, 1.5).cost(prompt, 100)
    peak = 0.0

    async def handle(request: Request) -> Response:
        nonlocal peak
        peak = max(peak, (await budget.status(None))[0].used)
        await asyncio.sleep(1.0)
        usage = {"prompt_tokens": prompt, "completion_tokens": 100}
        return Response(200, {}, orjson.dumps({"usage": usage}))

    gateway._upstreams["b"] = Shaper(  # the same gateway, a slow upstream with usage
        "http://b.test",
        transport=MockTransport(handle),
        hooks=(),
        wall_clock=wall,
        max_wait=PATIENT,  # all 1 000 wait their turn: none is told "busy"
    )
    outcomes: collections.Counter[str] = collections.Counter()
    async with gateway:

        async def one() -> None:
            try:
                await gateway.request(body, model="small")
                outcomes["ok"] += 1
            except BudgetExceededError:
                outcomes["refused"] += 1

        await asyncio.gather(*(one() for _ in range(1000)))
        spent = (await budget.status(None))[0].used
    fits = int(0.05 / cost + 1e-9)
    assert outcomes["ok"] == fits and outcomes["refused"] == 1000 - fits
    assert peak <= 0.05 + 1e-9 and spent == pytest.approx(fits * cost)


# -- alerts ------------------------------------------------------------------------------


async def test_a_tenant_nearing_its_day_limit_raises_a_warning_then_a_critical_alert():
    got = []
    monitor = UsageMonitor(sinks=[CallbackSink(got.append)], wall_clock=wall)
    gateway, _ = make_gateway(tenants=tiers(), monitor=monitor)
    async with gateway:
        for _ in range(9):
            await gateway.request(chat(), tenant="corner-shop")
            await asyncio.sleep(60)  # keep under the tier's 2 a minute; readings at most 1/s
        await asyncio.sleep(1)
    levels = [(a.level, a.dimension) for a in got]
    assert levels == [
        ("warning", "tenant:corner-shop:small:rpd"),
        ("critical", "tenant:corner-shop:small:rpd"),
    ]
    assert "Tenant corner-shop used 70% of its small requests today" in got[0].message
    assert got[0].action == "raise tier"


# -- a dead store --------------------------------------------------------------------------


class BreakableStore(MemoryStore):
    """A MemoryStore that fails as an unavailable SQLite file would, when told to."""

    broken = False

    def _open_now(self) -> float:
        if self.broken:
            raise StoreUnavailableError(
                "The counter store /var/quota.db is unavailable: database is locked.",
                path="/var/quota.db",
            )
        return super()._open_now()


async def test_a_dead_store_refuses_the_request_before_anything_is_sent_and_tries_no_fallback():
    store = BreakableStore(wall_clock=wall)
    budget = BudgetGuard(monthly=100.0, store=store, wall_clock=wall)
    gateway, ups = make_gateway(tenants=tiers(store), budget=budget)
    async with gateway:
        await gateway.request(chat(), tenant="acme")
        store.broken = True
        for tenant in ("acme", "corner-shop", None):
            with pytest.raises(StoreUnavailableError, match=r"/var/quota\.db") as caught:
                await gateway.request(chat(), tenant=tenant, task="code_review", complexity="high")
            assert caught.value.reason == "store_unavailable"
        assert sum(len(up.seen) for up in ups.values()) == 1
        store.broken = False
        spent_before = (await budget.status(None))[0].used
        await gateway.request(chat(), tenant="acme")
        # Nothing the refused requests reserved stayed charged, nothing was charged twice.
        assert (await budget.status(None))[0].used == pytest.approx(2 * spent_before)


async def test_a_store_that_dies_while_the_upstream_answers_still_gives_the_reply(caplog):
    store = BreakableStore(wall_clock=wall)
    budget = BudgetGuard(monthly=100.0, store=store, wall_clock=wall)
    gateway, ups = make_gateway(tenants=tiers(store), budget=budget)

    async def break_then_answer(request: Request) -> Response:
        store.broken = True
        return await ups["b"].handle(request)

    gateway.upstreams["b"]._transport = MockTransport(break_then_answer)  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="asyncquota.governance"):
        async with gateway:
            routed = await gateway.request(chat(), tenant="acme")
    assert routed.response.status == 200
    assert "database is locked" in caplog.text and "dropped" in caplog.text
    assert "never retrieved" not in caplog.text


async def test_a_corrupt_sqlite_file_refuses_requests_naming_the_file(tmp_path):
    path = tmp_path / "quota.sqlite3"
    path.write_bytes(b"not a database" * 200)
    store = SQLiteStore(path, wall_clock=wall)
    gateway, ups = make_gateway(tenants=tiers(store))
    async with gateway:
        with pytest.raises(StoreUnavailableError) as caught:
            await gateway.request(chat(), tenant="corner-shop")
    await store.aclose()
    assert str(path) in str(caught.value) and "corner-shop" not in str(caught.value)
    assert not ups["a"].seen and not ups["b"].seen


async def test_the_gateway_forgets_tenants_it_has_not_read_for_a_while():
    monitor = UsageMonitor(sinks=[], wall_clock=wall)
    gateway, _ = make_gateway(tenants=tiers(), monitor=monitor)
    async with gateway:
        for wave in range(3):
            await asyncio.gather(
                *(gateway.request(chat(), tenant=f"t{wave}-{i}") for i in range(3000))
            )
            await asyncio.sleep(5)
        # Only the last wave (read within the last second or so) may still be remembered.
        assert len(gateway._watched) <= 2 * 3000 + 1
        await asyncio.gather(*(gateway.request(chat(), tenant=f"late-{i}") for i in range(1500)))
    assert len(gateway._watched) <= 3000 + 1500
    assert not any(tenant.startswith("t0-") for tenant in gateway._watched)


# -- options --------------------------------------------------------------------------------


async def test_options_made_once_reach_the_models_shaper():
    from asyncquota.hooks import Admitted, Replied
    from asyncquota.options import RequestOptions
    from asyncquota.priority import Priority

    seen: list[object] = []

    class Recorder:
        def on_event(self, event: object) -> None:
            seen.append(event)

    up = Upstream("b")
    shaper = Shaper("http://b.test", transport=MockTransport(up.handle), hooks=(Recorder(),))
    router = Router(models=MODELS, rules=(), fallbacks={}, default_model="small")
    gateway = Gateway(upstreams={"a": shaper, "b": shaper}, router=router, wall_clock=wall)
    async with gateway:
        options = RequestOptions("batch", tenant=42, deadline=20, cost_tokens=5000)
        routed = await gateway.request(chat(), options=options)
        with pytest.raises(ValueError, match="either as keywords or in options, not both"):
            await gateway.request(chat(), options=options, priority="critical")
    assert routed.model == "small"
    admitted = next(e for e in seen if isinstance(e, Admitted))
    replied = next(e for e in seen if isinstance(e, Replied))
    # The class and the tenant (as tiers name it: "42") carried through; the Shaper
    # reserved the caller's 5 000 tokens rather than the gateway's estimate.
    assert admitted.priority == Priority.BATCH and admitted.tenant == "42"
    assert replied.reserved_tokens == 5000


async def test_a_model_that_would_refuse_at_its_door_costs_the_tenant_and_budget_nothing():
    # The small model's upstream sheds batch: a batch request for it is refused unsent,
    # asked before its body is sent anywhere and before its tenant's day and the budget
    # are touched (when a spent account's line moves, thousands ask at once).
    class Counting(MemoryStore):
        writes = 0

        async def reserve(self, key, amount, *, limit, expires_at):
            Counting.writes += 1
            return await super().reserve(key, amount, limit=limit, expires_at=expires_at)

        async def add(self, key, amount, *, expires_at):
            Counting.writes += 1
            return await super().add(key, amount, expires_at=expires_at)

    store = Counting(wall_clock=wall)
    budget = BudgetGuard(monthly=100.0, store=store, wall_clock=wall)
    gateway, ups = make_gateway(tenants=tiers(store), budget=budget, fallbacks={})
    async with gateway:
        gateway.upstreams["b"].shed_below("batch", for_seconds=600)
        with pytest.raises(RejectedError) as refused:
            await gateway.request(chat(), tenant="corner-shop", priority="batch")
        assert refused.value.reason == "shedding"
        assert Counting.writes == 0  # no tier or budget share taken (and given back)
        served = await gateway.request(chat(), tenant="corner-shop")  # interactive goes
        assert Counting.writes > 0
    assert served.model == "small" and len(ups["b"].seen) == 1


async def test_a_tier_and_a_budget_on_one_store_are_reserved_in_one_step_all_or_none():
    steps: list[list[str]] = []

    class Watching(MemoryStore):
        async def reserve_all(self, reservations):
            steps.append([item.key for item in reservations])
            return await super().reserve_all(reservations)

    store = Watching(wall_clock=wall)
    budget = BudgetGuard(monthly=0.005, store=store, wall_clock=wall)  # a few requests' worth
    quotas = tiers(store)
    gateway, ups = make_gateway(tenants=quotas, budget=budget, when_spent="reject")
    async with gateway:
        await gateway.request(chat(), tenant="acme")
        [step] = steps
        assert any(k.startswith("tier:") for k in step)
        assert any(k.startswith("budget:") for k in step)
        # Until the budget cannot pay: then refused whole, the tenant's minute not counted.
        with pytest.raises(BudgetExceededError):
            for _ in range(50):
                await gateway.request(chat(), tenant="acme")
        dims = {d.dimension: d for d in await quotas.status("acme", "small")}
    assert 1 < len(ups["b"].seen) < 50
    assert dims["rpm"].used == len(ups["b"].seen)  # only what was served counted
