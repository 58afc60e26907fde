"""Tenant tiers: per-model RPM, RPD and TPM limits, admitted all or nothing, with retry_after."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncquota import Priority, TenantLimitError
from asyncquota.governance.store import MemoryStore, SQLiteStore
from asyncquota.governance.tiers import (
    DimensionStatus,
    TenantGrant,
    TenantQuotas,
    Tier,
    TierLimits,
    zone,
)


def test_tier_limits_refuse_anything_but_positive_numbers_naming_the_field():
    assert TierLimits(rpm=60, tpm=1e5).rpd is None
    assert TierLimits(rpd=600.0).rpd == 600  # a whole float is a whole number
    # A fraction would refuse every request: requests and tokens are counted one by one.
    for bad in (0, -1, float("inf"), float("nan"), True, "60", 0.5, 59.9):
        with pytest.raises(ValueError, match=r"TierLimits\.rpd must be a positive whole number"):
            TierLimits(rpd=bad)  # type: ignore[arg-type]


def test_a_tier_gives_a_model_its_own_limits_else_the_wildcard_else_none():
    gpt4o = TierLimits(rpm=10)
    wildcard = TierLimits(rpm=100)
    tier = Tier("pro", {"gpt-4o": gpt4o, "*": wildcard})
    assert tier.limits_for("gpt-4o") is gpt4o
    assert tier.limits_for("gpt-4o-mini") is wildcard
    assert Tier("free", {"gpt-4o": gpt4o}).limits_for("claude").unlimited


def test_a_tier_copies_its_models_read_only_and_validates_them():
    models = {"gpt-4o": TierLimits(rpm=10)}
    tier = Tier("pro", models)
    models["gpt-4o"] = TierLimits(rpm=1)
    assert tier.limits_for("gpt-4o").rpm == 10
    with pytest.raises(TypeError):
        tier.models["x"] = TierLimits()  # type: ignore[index]
    with pytest.raises(ValueError, match="Tier 'pro': the limits of model 'gpt-4o' must be"):
        Tier("pro", {"gpt-4o": {"rpm": 10}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty string"):
        Tier("", {})


def test_a_dimension_status_is_a_frozen_record():
    status = DimensionStatus("rpm", used=3, limit=10, remaining=7, resets_at=60.0)
    with pytest.raises(AttributeError):
        status.used = 4  # type: ignore[misc]


# --- TenantQuotas: admission on virtual time ----------------------------------------------

T0 = 1_773_964_800.0  # 2026-03-20 00:00:00 UTC, a Friday; a whole minute and a whole UTC day
SHANGHAI_DAY_END = 1_774_022_400.0  # 2026-03-21 00:00 in Shanghai = 2026-03-20 16:00 UTC
PARIS_DST_DAY = 1_774_738_800.0  # 2026-03-29 00:00 in Paris (clocks jump 02:00 → 03:00)
PARIS_DST_DAY_END = 1_774_821_600.0  # 2026-03-30 00:00 in Paris: 23 h later


def virtual_wall(start: float = T0) -> Callable[[], float]:
    """Unix time on the test's virtual loop clock, starting at ``start``."""
    return lambda: start + asyncio.get_running_loop().time()


def quotas_for(limits: TierLimits, **options: Any) -> TenantQuotas:
    options.setdefault("wall_clock", virtual_wall())
    return TenantQuotas(
        tiers=[Tier("free", {"gpt-4o": limits})], tenants={"acme": "free"}, **options
    )


async def admit_n(quotas: TenantQuotas, n: int, tokens: float = 0) -> list[TenantGrant]:
    return [await quotas.admit("acme", "gpt-4o", tokens) for _ in range(n)]


async def refusal(quotas: TenantQuotas, tokens: float = 0, **kw: Any) -> TenantLimitError:
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit("acme", "gpt-4o", tokens, **kw)
    return caught.value


async def test_rpm_refuses_the_61st_request_and_it_passes_when_the_window_frees():
    quotas = quotas_for(TierLimits(rpm=60))
    await asyncio.sleep(30)  # 00:00:30
    await admit_n(quotas, 60)
    error = await refusal(quotas, priority=Priority.BATCH)
    assert (error.dimension, error.model, error.tenant) == ("rpm", "gpt-4o", "acme")
    assert error.priority is Priority.BATCH
    # The 60 uses become "the previous minute" at 01:00 and leave it evenly: one has left
    # by 01:01. (A true sliding window would wait to 01:30; the estimate errs short here.)
    assert error.retry_after == 31.0
    assert str(error) == (
        "Tenant 'acme' (tier 'free') is over its limit of 60 requests per minute on "
        "'gpt-4o'; try again in 31 s."
    )
    await asyncio.sleep(30.99)
    assert (await refusal(quotas)).retry_after == 0.01
    await asyncio.sleep(0.01)
    await quotas.admit("acme", "gpt-4o", 0)
    assert repr(quotas) == "<TenantQuotas tiers=1 tenants=1 admitted=61 refused=2 open=61>"


async def test_a_minute_spent_at_0_59_cannot_be_spent_again_at_1_00():
    quotas = quotas_for(TierLimits(rpm=60))
    await asyncio.sleep(59)
    await admit_n(quotas, 60)
    await asyncio.sleep(1)  # 01:00: a fixed window would allow 60 more now
    assert (await refusal(quotas)).retry_after == 1.0
    await asyncio.sleep(30)  # 01:30: half of the previous minute is still inside the window
    await admit_n(quotas, 30)
    assert (await refusal(quotas)).retry_after == 1.0


async def test_a_burst_at_the_very_start_of_a_minute_waits_a_little_over_a_minute():
    # The documented edge of the estimate: it spreads the burst over its minute, so at 01:00
    # all 60 uses still count and one has left only at 01:01 (a true window frees at 01:00).
    quotas = quotas_for(TierLimits(rpm=60))
    await admit_n(quotas, 60)
    assert (await refusal(quotas)).retry_after == 61.0
    await asyncio.sleep(61)
    await quotas.admit("acme", "gpt-4o", 0)


async def test_rpd_resets_at_utc_midnight():
    quotas = quotas_for(TierLimits(rpd=3), wall_clock=virtual_wall(T0 + 86_400 - 600))
    await admit_n(quotas, 3)
    error = await refusal(quotas)
    assert (error.dimension, error.retry_after) == ("rpd", 600.0)
    assert "3 requests per day" in str(error)
    await asyncio.sleep(600)
    await admit_n(quotas, 3)


async def test_rpd_resets_at_midnight_in_shanghai_which_is_16_00_utc():
    start = SHANGHAI_DAY_END - 3600  # 23:00 in Shanghai, 15:00 UTC
    quotas = quotas_for(TierLimits(rpd=2), timezone="Asia/Shanghai", wall_clock=virtual_wall(start))
    await admit_n(quotas, 2)
    assert (await refusal(quotas)).retry_after == 3600.0
    await asyncio.sleep(3600)
    await admit_n(quotas, 2)
    [rpd] = await quotas.status("acme", "gpt-4o")
    assert rpd.resets_at == SHANGHAI_DAY_END + 86_400


async def test_rpd_on_the_paris_dst_day_lasts_23_hours():
    quotas = quotas_for(
        TierLimits(rpd=1), timezone="Europe/Paris", wall_clock=virtual_wall(PARIS_DST_DAY)
    )
    await quotas.admit("acme", "gpt-4o", 0)
    assert (await refusal(quotas)).retry_after == 23 * 3600
    [rpd] = await quotas.status("acme", "gpt-4o")
    assert rpd.resets_at == PARIS_DST_DAY_END
    await asyncio.sleep(23 * 3600)
    await quotas.admit("acme", "gpt-4o", 0)


async def test_tpm_counts_the_estimate_and_reconcile_refunds_or_charges_the_difference():
    quotas = quotas_for(TierLimits(tpm=1000))
    first = await quotas.admit("acme", "gpt-4o", 800)
    error = await refusal(quotas, tokens=300)
    assert error.dimension == "tpm"
    await first.reconcile(500)  # the estimate was 300 too high: room at once
    second = await quotas.admit("acme", "gpt-4o", 300)
    await second.reconcile(450)  # and 150 too low: charged
    [tpm] = await quotas.status("acme", "gpt-4o")
    assert (tpm.used, tpm.remaining) == (950.0, 50.0)


async def test_a_request_larger_than_the_tpm_limit_can_never_pass():
    quotas = quotas_for(TierLimits(tpm=1000))
    error = await refusal(quotas, tokens=1500)
    assert error.retry_after is None
    assert "can never send this request" in str(error)


async def test_cancel_refunds_the_request_and_its_tokens():
    quotas = quotas_for(TierLimits(rpm=1, rpd=1, tpm=100))
    grant = await quotas.admit("acme", "gpt-4o", 100)
    await refusal(quotas)
    await grant.cancel()
    assert [s.used for s in await quotas.status("acme", "gpt-4o")] == [0.0, 0.0, 0.0]
    await quotas.admit("acme", "gpt-4o", 100)


async def test_a_refusal_counts_nothing_and_names_the_longest_wait():
    quotas = quotas_for(TierLimits(rpm=2, rpd=2, tpm=100))
    await admit_n(quotas, 2, tokens=10)
    error = await refusal(quotas, tokens=10)
    assert error.dimension == "rpd"  # rpm frees within a minute, rpd only at midnight
    assert error.retry_after == 86_400.0
    assert [s.used for s in await quotas.status("acme", "gpt-4o")] == [2.0, 2.0, 20.0]


async def test_status_tells_used_limit_remaining_and_reset_of_each_limited_dimension():
    quotas = quotas_for(TierLimits(rpm=10, rpd=100, tpm=1000))
    await asyncio.sleep(45)
    await admit_n(quotas, 4, tokens=100)
    await asyncio.sleep(30)  # 01:15: the last 60 s hold three quarters of the previous minute
    assert await quotas.status("acme", "gpt-4o") == [
        DimensionStatus("rpm", used=3.0, limit=10, remaining=7.0, resets_at=T0 + 120),
        DimensionStatus("rpd", used=4.0, limit=100, remaining=96.0, resets_at=T0 + 86_400),
        DimensionStatus("tpm", used=300.0, limit=1000, remaining=700.0, resets_at=T0 + 120),
    ]
    assert await quotas.status("acme", "claude") == []
    assert await quotas.status("stranger", "gpt-4o") == []


async def test_limits_are_per_tenant_and_per_model():
    tier = Tier("free", {"gpt-4o": TierLimits(rpm=1), "*": TierLimits(rpm=2)})
    quotas = TenantQuotas(tiers=[tier], tenants={}, default_tier="free", wall_clock=virtual_wall())
    await quotas.admit("acme", "gpt-4o", 0)
    await quotas.admit("zeta", "gpt-4o", 0)  # another tenant: its own minute
    await quotas.admit("acme", "mini", 0)
    await quotas.admit("acme", "mini", 0)  # "*" applies to each model on its own
    await quotas.admit("acme", "other", 0)
    with pytest.raises(TenantLimitError):
        await quotas.admit("acme", "mini", 0)


class RecordingStore(MemoryStore):
    """A memory store that remembers the keys it is asked about."""

    __slots__ = ("keys",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.keys: list[str] = []

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        self.keys.append(key)
        return await super().reserve(key, amount, limit=limit, expires_at=expires_at)


async def test_counters_are_keyed_by_tenant_model_dimension_and_window():
    store = RecordingStore(wall_clock=virtual_wall())
    quotas = quotas_for(TierLimits(rpm=5, rpd=5, tpm=5), store=store)
    quotas_odd = TenantQuotas(
        tiers=[Tier("free", {"*": TierLimits(rpd=5)})],
        tenants={"a:b/c": "free"},
        store=store,
        wall_clock=virtual_wall(),
    )
    await quotas.admit("acme", "gpt-4o", 1)
    await quotas_odd.admit("a:b/c", "org/model", 1)
    minute = int(T0 // 60)
    assert store.keys == [
        f"tier:acme:gpt-4o:rpm:{minute}",
        "tier:acme:gpt-4o:rpd:2026-03-20",
        f"tier:acme:gpt-4o:tpm:{minute}",
        "tier:a%3Ab%2Fc:org%2Fmodel:rpd:2026-03-20",
    ]


class UnusableStore(MemoryStore):
    """Fails the test if anyone touches it."""

    async def reserve(self, *args: Any, **kw: Any) -> float | None:
        raise AssertionError("The store was called.")

    async def get(self, keys: Sequence[str]) -> list[float]:
        raise AssertionError("The store was called.")


async def test_no_tenant_or_no_limits_is_admitted_without_touching_the_store():
    quotas = quotas_for(TierLimits(rpm=1), store=UnusableStore())
    for tenant, model in ((None, "gpt-4o"), ("acme", "claude"), ("stranger", "gpt-4o")):
        grant = await quotas.admit(tenant, model, 10**6)
        await grant.reconcile(5)
        with pytest.raises(RuntimeError, match="already ended"):
            await grant.cancel()


async def test_a_grant_ends_once():
    quotas = quotas_for(TierLimits(rpm=10, tpm=100))
    grant = await quotas.admit("acme", "gpt-4o", 10)
    assert repr(grant) == "<TenantGrant tenant='acme' model='gpt-4o' tokens=10 open>"
    await grant.reconcile(12)
    assert grant.ended
    with pytest.raises(RuntimeError, match="already ended"):
        await grant.reconcile(12)
    with pytest.raises(RuntimeError, match="already ended"):
        await grant.cancel()
    assert "ended" in repr(grant)
    with pytest.raises(ValueError, match="actual_tokens must be a finite number"):
        await (await quotas.admit("acme", "gpt-4o", 1)).reconcile(-1)


async def test_the_day_counter_survives_a_restart_with_sqlite(tmp_path: Path):
    path = tmp_path / "governance.db"
    wall = virtual_wall(T0 + 3600)
    store = SQLiteStore(path, wall_clock=wall)
    await admit_n(quotas_for(TierLimits(rpd=3), store=store, wall_clock=wall), 2)
    await store.aclose()

    await asyncio.sleep(600)  # the process restarts ten minutes later
    store = SQLiteStore(path, wall_clock=wall)
    try:
        quotas = quotas_for(TierLimits(rpd=3), store=store, wall_clock=wall)
        await quotas.admit("acme", "gpt-4o", 0)
        assert (await refusal(quotas)).dimension == "rpd"
        [rpd] = await quotas.status("acme", "gpt-4o")
        assert rpd.used == 3.0
    finally:
        await store.aclose()


class SlowStore(MemoryStore):
    """A memory store that takes a little (seeded random) time before each call, like a
    network store: admissions interleave and can be cancelled in the middle."""

    __slots__ = ("peak", "rng")

    def __init__(self, rng: random.Random, **kw: Any) -> None:
        super().__init__(**kw)
        self.rng = rng
        self.peak: dict[str, float] = {}

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        await asyncio.sleep(self.rng.choice((0, 0.001, 0.002)))
        value = await super().reserve(key, amount, limit=limit, expires_at=expires_at)
        if value is not None:
            self.peak[key] = max(self.peak.get(key, 0.0), value)
        return value

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        await asyncio.sleep(self.rng.choice((0, 0.001, 0.002)))
        return await super().add(key, amount, expires_at=expires_at)

    async def get(self, keys: Sequence[str]) -> list[float]:
        await asyncio.sleep(self.rng.choice((0, 0.001, 0.002)))
        return await super().get(keys)


async def test_1000_concurrent_admissions_never_pass_a_limit():
    store = SlowStore(random.Random(1), wall_clock=virtual_wall())
    quotas = quotas_for(TierLimits(rpm=200, rpd=300, tpm=150_000), store=store)
    results = await asyncio.gather(
        *(quotas.admit("acme", "gpt-4o", 1000) for _ in range(1000)), return_exceptions=True
    )
    granted = [r for r in results if isinstance(r, TenantGrant)]
    refused = [r for r in results if isinstance(r, TenantLimitError)]
    assert len(granted) == 150  # tpm binds: 150 × 1000 tokens
    assert len(refused) == 850
    minute = int(T0 // 60)
    # Counted one by one, refunded when a later limit refuses: high for a while, never past.
    assert store.peak[f"tier:acme:gpt-4o:rpm:{minute}"] == 200
    assert store.peak["tier:acme:gpt-4o:rpd:2026-03-20"] <= 300
    assert store.peak[f"tier:acme:gpt-4o:tpm:{minute}"] == 150_000
    assert [s.used for s in await quotas.status("acme", "gpt-4o")] == [150, 150, 150_000]


async def test_cancelled_admissions_and_cancelled_refunds_leak_no_count():
    rng = random.Random(7)
    store = SlowStore(rng, wall_clock=virtual_wall())
    quotas = quotas_for(TierLimits(rpm=100, rpd=200, tpm=10_000), store=store)
    cancelled_while: Counter[str] = Counter()

    async def user() -> None:
        phase = "arriving"
        try:
            await asyncio.sleep(rng.random() / 20)
            phase = "admitting"
            try:
                grant = await quotas.admit("acme", "gpt-4o", 100)
            except TenantLimitError:
                return
            phase = "holding"
            try:
                await asyncio.sleep(rng.random() / 200)
            finally:
                phase = "refunding"
                await grant.cancel()
                phase = "refunded"  # a cancellation seen here came while holding
        except asyncio.CancelledError:
            cancelled_while[phase] += 1
            raise

    tasks = [asyncio.create_task(user()) for _ in range(300)]
    while pending := [t for t in tasks if not t.done()]:
        await asyncio.sleep(rng.random() / 1000)
        rng.choice(pending).cancel()
    await asyncio.sleep(1)  # refunds shielded from a cancellation finish on their own
    assert [s.used for s in await quotas.status("acme", "gpt-4o")] == [0, 0, 0]
    assert "open=0" in repr(quotas)
    # The seed does cancel callers in the middle of each step.
    assert min(cancelled_while[p] for p in ("admitting", "refunded", "refunding")) >= 5


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None)
@given(
    first=st.lists(st.integers(1, 400), max_size=8),
    second=st.lists(st.integers(1, 400), max_size=8),
    offsets=st.tuples(st.integers(0, 59_999), st.integers(0, 59_999)),
    tokens=st.integers(1, 1000),
)
def test_waiting_retry_after_is_enough_and_10_ms_less_is_not(
    first: list[int], second: list[int], offsets: tuple[int, int], tokens: int
) -> None:
    """Whatever the two minutes held, retry_after is the first millisecond that fits."""

    async def scenario() -> None:
        clock = Clock(T0 + offsets[0] / 1000)
        quotas = quotas_for(TierLimits(tpm=1000), wall_clock=clock)
        for minute, amounts in ((0, first), (1, second)):
            clock.now = T0 + 60 * minute + offsets[minute] / 1000
            for amount in amounts:
                with contextlib.suppress(TenantLimitError):
                    await quotas.admit("acme", "gpt-4o", amount)
        try:
            await quotas.admit("acme", "gpt-4o", tokens)
        except TenantLimitError as error:
            assert error.retry_after is not None
            assert 0 < error.retry_after <= 120
            refused_at = clock.now
            if error.retry_after >= 0.01:
                clock.now = refused_at + error.retry_after - 0.01
                with pytest.raises(TenantLimitError):
                    await quotas.admit("acme", "gpt-4o", tokens)
            clock.now = refused_at + error.retry_after
            await quotas.admit("acme", "gpt-4o", tokens)

    # A loop of its own, not asyncio.run(): that would unset the loop looptime keeps aside.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


# --- configuration ------------------------------------------------------------------------


def test_a_tenant_on_an_unknown_tier_is_refused_naming_both():
    with pytest.raises(
        ValueError,
        match=r"Tenant 'acme' is assigned to unknown tier 'gold'; known tiers: 'free', 'pro'\.",
    ):
        TenantQuotas(tiers=[Tier("free", {}), Tier("pro", {})], tenants={"acme": "gold"})


def test_other_configuration_mistakes_are_refused_with_a_sentence():
    free = Tier("free", {})
    with pytest.raises(ValueError, match="default_tier 'gold' is not a known tier"):
        TenantQuotas(tiers=[free], tenants={}, default_tier="gold")
    with pytest.raises(ValueError, match=r"tiers\[1\] repeats the tier name 'free'"):
        TenantQuotas(tiers=[free, free], tenants={})
    with pytest.raises(ValueError, match=r"IANA time zone name .* not 'Mars/Olympus'"):
        TenantQuotas(tiers=[free], tenants={}, timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="not 'Europe'"):
        zone("Europe")


def test_tier_of_gives_a_listed_tenant_its_tier_and_others_the_default():
    free, pro = Tier("free", {}), Tier("pro", {})
    quotas = TenantQuotas(tiers=[free, pro], tenants={"acme": "pro"}, default_tier="free")
    assert quotas.tier_of("acme") is pro
    assert quotas.tier_of("stranger") is free
    assert quotas.tier_of(None) is None
    assert TenantQuotas(tiers=[free], tenants={}).tier_of("stranger") is None


async def test_bad_token_counts_are_refused():
    quotas = quotas_for(TierLimits(tpm=10))
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="tokens must be a finite number of tokens"):
            await quotas.admit("acme", "gpt-4o", bad)
