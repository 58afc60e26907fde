"""The budget guard: reserve before the call, reconcile after, never overshoot together."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from asyncquota.errors import BudgetExceededError
from asyncquota.governance.budget import (
    SLACK,
    BudgetGuard,
    BudgetReservation,
    Price,
    money,
    month_window,
)
from asyncquota.governance.store import MemoryStore, SQLiteStore
from asyncquota.governance.tiers import DimensionStatus

UTC = ZoneInfo("UTC")


def at(*fields: int, zone: str = "UTC") -> float:
    """Unix time of a wall-clock reading in ``zone``."""
    return datetime(*fields, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[misc]


T0 = at(2026, 3, 20, 12)
APRIL = at(2026, 4, 1)
MARCH = "budget:2026-03"


class Clock:
    """A wall clock the test sets by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def virtual_clock() -> float:
    """Wall time that moves with the test's virtual loop time, starting at T0."""
    return T0 + asyncio.get_running_loop().time()


class WatchedStore:
    """A MemoryStore whose every call takes ``delay`` seconds (so concurrent callers
    interleave at each call) and that records the highest value each counter reached."""

    def __init__(self, *, delay: float = 0.0, wall_clock: Clock | None = None) -> None:
        self.inner = MemoryStore(wall_clock=wall_clock or virtual_clock)
        self.delay = delay
        self.peak: dict[str, float] = {}

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        await asyncio.sleep(self.delay)
        value = await self.inner.reserve(key, amount, limit=limit, expires_at=expires_at)
        return self._watch(key, value)

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        await asyncio.sleep(self.delay)
        value = await self.inner.add(key, amount, expires_at=expires_at)
        self._watch(key, value)
        return value

    async def get(self, keys: Sequence[str]) -> list[float]:
        return await self.inner.get(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _watch(self, key: str, value: float | None) -> float | None:
        if value is not None:
            self.peak[key] = max(self.peak.get(key, 0.0), value)
        return value


async def reserve_all(
    guard: BudgetGuard, tenants: Sequence[str | None], amount: float
) -> tuple[list[BudgetReservation], list[BudgetExceededError]]:
    results = await asyncio.gather(
        *(guard.reserve(tenant, amount) for tenant in tenants), return_exceptions=True
    )
    granted = [r for r in results if isinstance(r, BudgetReservation)]
    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    assert len(granted) + len(refused) == len(results)
    return granted, refused


async def test_1000_concurrent_reservations_of_10_cents_never_overshoot_a_50_dollar_budget():
    store = WatchedStore(delay=0.001)
    guard = BudgetGuard(monthly=50.0, store=store, wall_clock=virtual_clock)

    granted, refused = await reserve_all(guard, [None] * 1000, 0.10)

    assert (len(granted), len(refused)) == (500, 500)
    assert store.peak[MARCH] <= 50.0 + SLACK  # never past the budget, even mid-flight
    assert refused[0].retry_after == APRIL - T0  # until the month renews
    assert refused[0].reason == "budget_exceeded"
    assert await guard.remaining(None) == 0.0

    # The real replies cost $0.06 each: reconciling frees 500 × $0.04 = $20 for more.
    await asyncio.gather(*(r.reconcile(0.06) for r in granted))
    assert await guard.remaining(None) == pytest.approx(20.0)

    more, refused = await reserve_all(guard, [None] * 1000, 0.10)
    assert (len(more), len(refused)) == (200, 800)
    assert store.peak[MARCH] <= 50.0 + SLACK
    assert (await store.get([MARCH]))[0] == pytest.approx(50.0)


async def test_concurrent_reservations_hold_the_global_and_every_tenant_budget_at_once():
    # delay 0: every call yields to the others in arrival order (timers due at the same
    # instant would run in no particular order), so the per-tenant split is exact.
    store = WatchedStore(delay=0.0)
    guard = BudgetGuard(
        monthly=10.0, tenants={"a": 2.0, "b": 2.0, "c": 20.0}, store=store, wall_clock=virtual_clock
    )

    granted, _ = await reserve_all(guard, ["a", "b", "c"] * 200, 0.10)

    by_tenant = {t: sum(1 for r in granted if r.tenant == t) for t in "abc"}
    assert by_tenant == {"a": 20, "b": 20, "c": 60}  # c takes what the global budget has left
    assert store.peak[MARCH] <= 10.0 + SLACK
    assert store.peak[f"{MARCH}:tenant:a"] <= 2.0 + SLACK
    assert store.peak[f"{MARCH}:tenant:b"] <= 2.0 + SLACK
    used = await store.get([MARCH, f"{MARCH}:tenant:a", f"{MARCH}:tenant:c"])
    assert used == pytest.approx([10.0, 2.0, 6.0])


async def test_a_tenant_over_its_own_budget_reserves_nothing_from_the_global_one():
    clock = Clock()
    guard = BudgetGuard(monthly=10.0, tenants={"acme": 1.0}, wall_clock=clock)
    await guard.reserve("acme", 0.8)

    with pytest.raises(BudgetExceededError) as caught:
        await guard.reserve("acme", 0.3)

    assert (
        str(caught.value)
        == "Tenant acme's monthly budget of $1.00 cannot pay $0.30 more this month."
    )
    assert caught.value.tenant == "acme"
    assert caught.value.retry_after == APRIL - T0
    assert [s.used for s in await guard.status("acme")] == [0.8, 0.8]


async def test_a_global_refusal_gives_back_what_the_tenant_budget_had_taken():
    guard = BudgetGuard(monthly=1.0, tenants={"acme": 5.0}, wall_clock=Clock())
    await guard.reserve("acme", 0.9)

    with pytest.raises(BudgetExceededError, match=r"^The global monthly budget of \$1\.00"):
        await guard.reserve("acme", 0.2)

    assert [s.used for s in await guard.status("acme")] == pytest.approx([0.9, 0.9])


async def test_an_overdraft_is_charged_past_the_budget_and_shows_as_used_over_limit():
    guard = BudgetGuard(monthly=1.0, wall_clock=Clock())
    await guard.reserve(None, 0.9)

    reservation = await guard.reserve(None, 0.5, overdraft=True)

    assert reservation.amount == 0.5
    [status] = await guard.status(None)
    assert (status.used, status.limit, status.remaining) == (1.4, 1.0, 0.0)
    assert await guard.remaining(None) == 0.0


async def test_reconcile_refunds_an_overestimate_and_charges_an_underestimate_even_past_budget():
    guard = BudgetGuard(monthly=1.0, tenants={"acme": 1.0}, wall_clock=Clock())
    over = await guard.reserve("acme", 0.5)
    under = await guard.reserve("acme", 0.4)

    await over.reconcile(0.1)
    assert await guard.remaining("acme") == pytest.approx(0.5)
    await under.reconcile(1.0)  # the money is spent: it counts even past the budget

    assert [s.used for s in await guard.status("acme")] == pytest.approx([1.1, 1.1])
    assert await guard.remaining("acme") == 0.0


async def test_cancel_refunds_the_whole_reservation_and_a_reservation_ends_only_once():
    guard = BudgetGuard(monthly=1.0, tenants={"acme": 1.0}, wall_clock=Clock())
    first = await guard.reserve("acme", 0.6)
    second = await guard.reserve("acme", 0.4)
    assert "open=2" in repr(guard)

    await first.cancel()
    await second.reconcile(0.3)

    assert await guard.remaining("acme") == pytest.approx(0.7)
    assert repr(guard) == "<BudgetGuard monthly=$1 tenant_budgets=1 open=0 timezone='UTC'>"
    assert repr(first) == "<BudgetReservation $0.6 tenant='acme' ended>"
    for ending in (first.cancel(), first.reconcile(0.1), second.cancel()):
        with pytest.raises(RuntimeError, match="already been reconciled or cancelled"):
            await ending
    assert await guard.remaining("acme") == pytest.approx(0.7)


async def test_an_invalid_actual_cost_leaves_the_reservation_open():
    guard = BudgetGuard(monthly=1.0, wall_clock=Clock())
    reservation = await guard.reserve(None, 0.5)
    with pytest.raises(ValueError, match=r"^actual must be a finite number of dollars >= 0"):
        await reservation.reconcile(-0.1)
    assert repr(reservation) == "<BudgetReservation $0.5 tenant=None open>"
    await reservation.cancel()
    assert await guard.remaining(None) == 1.0


async def test_the_budget_renews_at_the_start_of_the_next_calendar_month():
    clock = Clock(at(2026, 3, 31, 23, 59, 59))
    guard = BudgetGuard(monthly=1.0, wall_clock=clock)
    await guard.reserve(None, 1.0)
    with pytest.raises(BudgetExceededError) as caught:
        await guard.reserve(None, 0.01)
    assert caught.value.retry_after == 1.0

    clock.now = APRIL
    reservation = await guard.reserve(None, 0.25)

    [status] = await guard.status(None)
    assert status == DimensionStatus("budget", 0.25, 1.0, 0.75, at(2026, 5, 1))
    # A reservation settles against the month it was made in.
    clock.now = at(2026, 3, 31, 23, 0)
    assert await guard.remaining(None) == 0.0
    await reservation.reconcile(0.5)
    clock.now = APRIL
    assert await guard.remaining(None) == 0.5


async def test_in_shanghai_the_month_renews_at_16_00_utc_on_its_last_day():
    clock = Clock(at(2026, 3, 31, 15, 59, 59))  # 23:59:59 in Shanghai
    guard = BudgetGuard(monthly=1.0, timezone="Asia/Shanghai", wall_clock=clock)
    await guard.reserve(None, 1.0)
    with pytest.raises(BudgetExceededError) as caught:
        await guard.reserve(None, 0.5)
    assert caught.value.retry_after == 1.0

    clock.now = at(2026, 3, 31, 16)
    await guard.reserve(None, 0.5)
    assert await guard.remaining(None) == 0.5
    assert at(2026, 3, 31, 16) == at(2026, 4, 1, zone="Asia/Shanghai")


def test_a_month_with_a_daylight_saving_change_is_an_hour_short_or_long():
    paris = ZoneInfo("Europe/Paris")
    march_start = at(2026, 3, 1, zone="Europe/Paris")

    assert month_window(march_start, paris) == ("2026-03", at(2026, 3, 31, 22))
    # 2026-03-29, the day clocks go forward, is 23 h long: March has 743 hours.
    assert month_window(march_start, paris)[1] - march_start == 743 * 3600
    october = at(2026, 10, 1, zone="Europe/Paris")
    assert month_window(october, paris)[1] - october == 745 * 3600
    assert month_window(march_start - 1, paris) == ("2026-02", march_start)
    assert month_window(at(2026, 12, 31, 23), UTC) == ("2026-12", at(2027, 1, 1))


async def test_in_paris_the_march_budget_lasts_743_hours():
    guard = BudgetGuard(
        monthly=1.0, timezone="Europe/Paris", wall_clock=Clock(at(2026, 3, 1, zone="Europe/Paris"))
    )
    await guard.reserve(None, 1.0)
    with pytest.raises(BudgetExceededError) as caught:
        await guard.reserve(None, 1.0)
    assert caught.value.retry_after == 743 * 3600


async def test_status_reports_each_budget_and_counts_spend_where_there_is_no_limit():
    guard = BudgetGuard(monthly=50.0, tenants={"acme": 5.0}, wall_clock=Clock())
    await guard.reserve("acme", 1.25)
    await guard.reserve("bob", 2.0)

    assert await guard.status("acme") == [
        DimensionStatus("budget", 3.25, 50.0, 46.75, APRIL),
        DimensionStatus("tenant_budget", 1.25, 5.0, 3.75, APRIL),
    ]
    assert await guard.status("bob") == [
        DimensionStatus("budget", 3.25, 50.0, 46.75, APRIL),
        DimensionStatus("tenant_budget", 2.0, None, None, None),
    ]
    assert await guard.status(None) == [DimensionStatus("budget", 3.25, 50.0, 46.75, APRIL)]


async def test_remaining_is_the_smaller_budget_left_or_none_when_nothing_is_limited():
    guard = BudgetGuard(tenants={"acme": 5.0}, wall_clock=Clock())
    await guard.reserve("acme", 1.0)
    await guard.reserve("bob", 100.0)

    assert await guard.remaining("acme") == 4.0
    assert await guard.remaining("bob") is None
    assert await guard.remaining(None) is None
    assert await guard.status(None) == [DimensionStatus("budget", 101.0, None, None, None)]

    capped = BudgetGuard(monthly=3.0, tenants={"acme": 5.0}, wall_clock=Clock())
    assert await capped.remaining("acme") == 3.0


async def test_spend_survives_a_restart_with_a_sqlite_store(tmp_path: Path):
    clock = Clock()
    path = tmp_path / "spend.db"
    store = SQLiteStore(path, wall_clock=clock)
    guard = BudgetGuard(monthly=50.0, tenants={"acme": 5.0}, store=store, wall_clock=clock)
    reservation = await guard.reserve("acme", 3.0)
    await reservation.reconcile(2.5)
    await store.aclose()

    clock.now += 3600
    reopened = SQLiteStore(path, wall_clock=clock)
    guard = BudgetGuard(monthly=50.0, tenants={"acme": 5.0}, store=reopened, wall_clock=clock)
    try:
        assert await guard.remaining("acme") == 2.5
        assert [s.used for s in await guard.status("acme")] == [2.5, 2.5]
        with pytest.raises(BudgetExceededError):
            await guard.reserve("acme", 2.6)
    finally:
        await reopened.aclose()


async def test_callers_cancelled_at_random_leak_no_reserved_dollar():
    rng = random.Random(5)
    store = WatchedStore(delay=0.5)  # a reservation takes 1 s: two store calls
    guard = BudgetGuard(monthly=5.0, tenants={"a": 2.0}, store=store, wall_clock=virtual_clock)
    settled: dict[int, tuple[str, float]] = {}

    async def request(index: int, tenant: str) -> None:
        try:
            reservation = await guard.reserve(tenant, 0.10)
        except BudgetExceededError:
            return
        try:
            await asyncio.sleep(rng.uniform(0.0, 3.0))
        except asyncio.CancelledError:
            await reservation.cancel()
            raise
        settled[index] = (tenant, 0.04)  # the ending is decided here, even if cancelled next
        await reservation.reconcile(0.04)

    tasks = [asyncio.create_task(request(i, rng.choice("ab"))) for i in range(200)]
    loop = asyncio.get_running_loop()
    for task in rng.sample(tasks, 100):
        loop.call_later(rng.uniform(0.0, 5.0), task.cancel)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert 0 < cancelled <= 100
    # Refunds for callers cancelled mid-call end in the background, within two store calls.
    await asyncio.sleep(1.0)

    used = await store.get([MARCH, f"{MARCH}:tenant:a", f"{MARCH}:tenant:b"])
    expected_a = sum(cost for tenant, cost in settled.values() if tenant == "a")
    expected_b = sum(cost for tenant, cost in settled.values() if tenant == "b")
    assert used == pytest.approx([expected_a + expected_b, expected_a, expected_b])
    assert expected_a + expected_b > 0
    assert "open=0" in repr(guard)


async def test_a_caller_cancelled_while_its_refund_runs_still_gets_it_refunded():
    store = WatchedStore(delay=1.0)
    guard = BudgetGuard(monthly=5.0, store=store, wall_clock=virtual_clock)
    reservation = await guard.reserve(None, 2.0)
    cancelling = asyncio.create_task(reservation.cancel())
    await asyncio.sleep(0.5)
    cancelling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelling
    assert await store.get([MARCH]) == [2.0]

    await asyncio.sleep(0.5)  # the refund's store call ends at t = 1 + 1
    assert await store.get([MARCH]) == [0.0]


def test_a_price_costs_dollars_per_million_tokens_in_and_out():
    mini = Price(input_per_mtok=0.15, output_per_mtok=0.60)
    assert mini.cost(1_000_000, 0) == pytest.approx(0.15)
    assert mini.cost(1_000, 500) == pytest.approx(0.00045)
    assert Price(0, 0).cost(10**9, 10**9) == 0


@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf, True, "1"])
def test_a_price_must_be_a_finite_number_of_dollars(bad: object):
    with pytest.raises(
        ValueError, match=r"^output_per_mtok must be a finite number of dollars >= 0"
    ):
        Price(input_per_mtok=1.0, output_per_mtok=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"monthly": 0}, "monthly must be a finite number of dollars > 0, not 0."),
        ({"monthly": -5.0}, "monthly must be a finite number of dollars > 0, not -5.0."),
        ({"monthly": math.nan}, "monthly must be a finite number of dollars > 0, not nan."),
        (
            {"tenants": {"acme": math.inf}},
            "tenants['acme'] must be a finite number of dollars > 0, not inf.",
        ),
        (
            {"timezone": "Mars/Olympus"},
            "timezone must be an IANA time zone name such as 'UTC' or 'Europe/Paris', "
            "not 'Mars/Olympus'.",
        ),
    ],
)
def test_invalid_configuration_fails_with_a_message_naming_the_field(
    config: dict[str, object], message: str
):
    with pytest.raises(ValueError) as caught:
        BudgetGuard(**config)  # type: ignore[arg-type]
    assert str(caught.value) == message


async def test_a_negative_amount_is_refused_before_anything_is_reserved():
    guard = BudgetGuard(monthly=1.0, wall_clock=Clock())
    with pytest.raises(
        ValueError, match=r"^amount must be a finite number of dollars >= 0, not -1"
    ):
        await guard.reserve(None, -1)
    assert "open=0" in repr(guard)
    assert await guard.remaining(None) == 1.0


async def test_a_budget_of_a_tenth_of_a_cent_is_told_in_figures_that_tell_it_apart():
    guard = BudgetGuard(monthly=10.0, tenants={"trial": 0.001}, wall_clock=Clock())
    await guard.reserve("trial", 0.0008, overdraft=True)

    with pytest.raises(BudgetExceededError) as caught:
        await guard.reserve("trial", 0.00042)

    assert str(caught.value) == (
        "Tenant trial's monthly budget of $0.001 cannot pay $0.00042 more this month."
    )


def test_money_keeps_cents_from_a_dollar_and_three_figures_below():
    assert [money(v) for v in (5000, 1, 0.3, 0.0046, 0.001, 0.00000125, -0.002, 0)] == [
        "$5000.00",
        "$1.00",
        "$0.30",
        "$0.0046",
        "$0.001",
        "$0.00000125",
        "-$0.002",
        "$0.00",
    ]
