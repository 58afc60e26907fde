"""Per-account monthly caps: a mirror of the provider's own spend cap, reserved with the budgets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from asyncquota import BudgetExceededError, UpstreamCapError
from asyncquota.governance.budget import SLACK, BudgetGuard, BudgetReservation
from asyncquota.governance.store import MemoryStore


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
