"""Tenant tiers: per-model RPM, RPD and TPM limits, admitted all or nothing, with retry_after."""

from __future__ import annotations

import asyncio
import contextlib
import enum
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
    tenant_id,
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
    assert quotas.tier_of(None) is free  # no tenant: the default tier too
    assert TenantQuotas(tiers=[free], tenants={}).tier_of("stranger") is None
    assert TenantQuotas(tiers=[free], tenants={}).tier_of(None) is None


async def test_bad_token_counts_are_refused():
    quotas = quotas_for(TierLimits(tpm=10))
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="tokens must be a finite number of tokens"):
            await quotas.admit("acme", "gpt-4o", bad)


# --- one identity per tenant ----------------------------------------------------------------


class Plan(enum.IntEnum):
    ACME = 42


class Name(enum.StrEnum):
    ACME = "acme"


def test_a_tenant_id_is_a_string_as_given_and_an_int_as_its_decimal_string():
    assert tenant_id("acme") == "acme"
    assert tenant_id("42") == tenant_id(42) == tenant_id(Plan.ACME) == "42"
    assert tenant_id(-7) == "-7"
    assert tenant_id(Name.ACME) == "acme"
    assert tenant_id(None) is None
    for bad in (42.0, True, b"acme", ("acme",), object()):
        with pytest.raises(TypeError, match="A tenant id must be a str, an int or None"):
            tenant_id(bad)
    with pytest.raises(ValueError, match="must not be empty"):
        tenant_id("")


async def test_42_and_the_string_42_are_one_tenant_with_one_set_of_counters():
    tiers = [Tier("free", {"*": TierLimits(rpm=2)}), Tier("pro", {"*": TierLimits(rpm=100)})]
    quotas = TenantQuotas(tiers=tiers, tenants={42: "free"}, wall_clock=virtual_wall())
    assert quotas.tier_of("42") is quotas.tier_of(42) is tiers[0]
    grant = await quotas.admit(42, "gpt-4o", 0)
    assert grant.tenant == "42"
    await quotas.admit("42", "gpt-4o", 0)
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit(Plan.ACME, "gpt-4o", 0)
    assert caught.value.tenant == "42"
    assert await quotas.status(42, "gpt-4o") == await quotas.status("42", "gpt-4o")
    assert [s.used for s in await quotas.status(42, "gpt-4o")] == [2.0]


def test_a_tenant_listed_twice_under_its_two_spellings_must_agree():
    free, pro = Tier("free", {}), Tier("pro", {})
    quotas = TenantQuotas(tiers=[free, pro], tenants={42: "pro", "42": "pro"})
    assert repr(quotas).startswith("<TenantQuotas tiers=2 tenants=1 ")
    with pytest.raises(ValueError, match=r"Tenant '42' is listed twice \(as '42' too\)"):
        TenantQuotas(tiers=[free, pro], tenants={42: "pro", "42": "free"})
    with pytest.raises(TypeError, match="not float"):
        TenantQuotas(tiers=[free], tenants={4.2: "free"})
    with pytest.raises(ValueError, match="tenants lists None"):
        TenantQuotas(tiers=[free], tenants={None: "free"})


async def test_every_entry_refuses_a_tenant_that_is_not_an_id_and_counts_nothing():
    quotas = quotas_for(TierLimits(rpm=1), store=UnusableStore())
    with pytest.raises(TypeError):
        await quotas.admit(("acme",), "gpt-4o", 0)
    with pytest.raises(TypeError):
        await quotas.status(b"acme", "gpt-4o")
    with pytest.raises(TypeError):
        quotas.tier_of(4.2)
    with pytest.raises(ValueError, match="must not be empty"):
        await quotas.admit("", "gpt-4o", 0)
    assert "admitted=0 refused=0" in repr(quotas)


# --- no tenant: the default tier ------------------------------------------------------------


async def test_requests_naming_no_tenant_share_the_default_tiers_limits():
    store = RecordingStore(wall_clock=virtual_wall())
    quotas = TenantQuotas(
        tiers=[Tier("free", {"*": TierLimits(rpm=2)})],
        tenants={},
        default_tier="free",
        store=store,
        wall_clock=virtual_wall(),
    )
    first = await quotas.admit(None, "gpt-4o", 0)
    assert first.tenant is None
    await quotas.admit(None, "gpt-4o", 0)
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit(None, "gpt-4o", 0)
    assert str(caught.value) == (
        "Requests naming no tenant (tier 'free') are over their limit of 2 requests per "
        "minute on 'gpt-4o'; try again in 90 s."
    )
    assert caught.value.tenant is None
    await quotas.admit("acme", "gpt-4o", 0)  # a named tenant: its own counters
    minute = int(T0 // 60)
    # "*" cannot be a tenant's own key: a tenant "*" is percent-encoded as %2A.
    assert store.keys[0] == f"tier:*:gpt-4o:rpm:{minute}"
    assert store.keys[-1] == f"tier:acme:gpt-4o:rpm:{minute}"
    assert [s.used for s in await quotas.status(None, "gpt-4o")] == [2.0]


# --- limits shared by every model of a tier -------------------------------------------------


def shared_quotas(**options: Any) -> TenantQuotas:
    options.setdefault("wall_clock", virtual_wall())
    tier = Tier(
        "free",
        {"*": TierLimits(rpm=2), "gpt-4o": TierLimits(rpm=1, tpm=1000)},
        shared=TierLimits(rpd=3, tpm=1500),
    )
    return TenantQuotas(tiers=[tier], tenants={"acme": "free"}, **options)


async def test_a_fallback_to_another_model_spends_the_tiers_shared_day_not_a_fresh_one():
    quotas = shared_quotas()
    await quotas.admit("acme", "gpt-4o", 0)
    await quotas.admit("acme", "claude", 0)
    await quotas.admit("acme", "mini", 0)
    # Each model has room of its own left, but the tier's day is spent across them.
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit("acme", "gemini", 0)
    assert (caught.value.dimension, caught.value.model) == ("tier_rpd", "gemini")
    assert caught.value.retry_after == 86_400.0
    assert str(caught.value) == (
        "Tenant 'acme' (tier 'free') is over its limit of 3 requests per day across all "
        "models of its tier; try again in 86400 s."
    )
    await asyncio.sleep(86_400)
    await quotas.admit("acme", "gemini", 0)


async def test_per_model_limits_still_bind_beside_the_shared_ones():
    quotas = shared_quotas()
    await quotas.admit("acme", "gpt-4o", 0)
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit("acme", "gpt-4o", 0)
    assert caught.value.dimension == "rpm"
    # The refused request took nothing from the shared day.
    assert [(s.dimension, s.used) for s in await quotas.status("acme", "gpt-4o")] == [
        ("rpm", 1.0),
        ("tpm", 0.0),
        ("tier_rpd", 1.0),
        ("tier_tpm", 0.0),
    ]


async def test_tokens_are_reconciled_and_refunded_on_the_model_and_the_tier_alike():
    store = RecordingStore(wall_clock=virtual_wall())
    quotas = shared_quotas(store=store)
    grant = await quotas.admit("acme", "gpt-4o", 800)
    minute = int(T0 // 60)
    assert store.keys == [
        f"tier:acme:gpt-4o:rpm:{minute}",
        f"tier:acme:gpt-4o:tpm:{minute}",
        "tier:acme:*:rpd:2026-03-20",
        f"tier:acme:*:tpm:{minute}",
    ]
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit("acme", "claude", 800)  # claude has no tpm; the tier's 1500 binds
    assert caught.value.dimension == "tier_tpm"
    await grant.reconcile(300)
    second = await quotas.admit("acme", "claude", 800)
    tokens = {s.dimension: s.used for s in await quotas.status("acme", "gpt-4o")}
    assert (tokens["tpm"], tokens["tier_tpm"]) == (300.0, 1100.0)
    await second.cancel()
    tokens = {s.dimension: s.used for s in await quotas.status("acme", "gpt-4o")}
    assert (tokens["tier_rpd"], tokens["tier_tpm"]) == (1.0, 300.0)


def test_a_tiers_shared_limits_must_be_tier_limits():
    assert Tier("free", {}).shared.unlimited
    with pytest.raises(ValueError, match="Tier 'free': its shared limits must be a TierLimits"):
        Tier("free", {}, shared={"rpd": 3})  # type: ignore[arg-type]


async def test_a_request_larger_than_a_shared_limit_can_never_pass():
    quotas = shared_quotas()
    with pytest.raises(TenantLimitError) as caught:
        await quotas.admit("acme", "claude", 2000)
    assert caught.value.retry_after is None
    assert str(caught.value) == (
        "Tenant 'acme' (tier 'free') can never send this request to 'claude': it needs 2000, "
        "more than its limit of 1500 tokens per minute across all models of its tier."
    )


# --- reload: tiers and membership replaced while running -------------------------------------


FREE = Tier("free", {"*": TierLimits(rpm=2, rpd=5)})
PRO = Tier("pro", {"*": TierLimits(rpm=100, rpd=1000)})


async def test_reload_moves_a_tenant_to_its_new_tier_keeping_what_it_used():
    quotas = TenantQuotas(tiers=[FREE], tenants={"acme": "free"}, wall_clock=virtual_wall())
    await admit_n(quotas, 2)
    assert (await refusal(quotas)).dimension == "rpm"
    quotas.reload(tiers=[FREE, PRO], tenants={"acme": "pro", "zeta": "free"}, default_tier="free")
    assert quotas.tier_of("acme") is PRO
    assert quotas.default_tier == "free"
    assert quotas.tier_of(None) is FREE
    await quotas.admit("acme", "gpt-4o", 0)
    assert [(s.dimension, s.used, s.limit) for s in await quotas.status("acme", "gpt-4o")] == [
        ("rpm", 3.0, 100),
        ("rpd", 3.0, 1000),
    ]
    # Back to free: today's three still count against free's five.
    quotas.reload(tiers=[FREE], tenants={"acme": "free"})
    await asyncio.sleep(120)
    await admit_n(quotas, 2)
    error = await refusal(quotas)
    assert (error.dimension, error.tenant) == ("rpd", "acme")
    assert repr(quotas) == "<TenantQuotas tiers=1 tenants=1 admitted=5 refused=2 open=5>"


async def test_a_reload_that_does_not_check_changes_nothing():
    quotas = TenantQuotas(
        tiers=[FREE], tenants={"acme": "free"}, timezone="Asia/Shanghai", wall_clock=virtual_wall()
    )
    bad_reloads: list[dict[str, Any]] = [
        {"tiers": [FREE], "tenants": {"acme": "gold"}},
        {"tiers": [FREE, FREE], "tenants": {}},
        {"tiers": [FREE], "tenants": {}, "default_tier": "gold"},
        {"tiers": [FREE], "tenants": {}, "timezone": "Mars/Olympus"},
        {"tiers": [FREE], "tenants": {1.5: "free"}},
    ]
    for bad in bad_reloads:
        with pytest.raises((ValueError, TypeError)):
            quotas.reload(**bad)
        assert quotas.tier_of("acme") is FREE
        assert quotas.timezone == "Asia/Shanghai"
    # timezone=None keeps the zone; default_tier is part of the whole new set.
    quotas.reload(tiers=[FREE, PRO], tenants={}, default_tier="pro")
    assert (quotas.timezone, quotas.tier_of("acme")) == ("Asia/Shanghai", PRO)


async def test_a_reload_can_move_the_end_of_a_tenants_day_to_another_zone():
    quotas = TenantQuotas(
        tiers=[Tier("free", {"*": TierLimits(rpd=1)})],
        tenants={"acme": "free"},
        wall_clock=virtual_wall(SHANGHAI_DAY_END - 3600),  # 15:00 UTC, 23:00 in Shanghai
    )
    [rpd] = await quotas.status("acme", "gpt-4o")
    assert rpd.resets_at == T0 + 86_400
    quotas.reload(
        tiers=[Tier("free", {"*": TierLimits(rpd=1)})],
        tenants={"acme": "free"},
        timezone="Asia/Shanghai",
    )
    [rpd] = await quotas.status("acme", "gpt-4o")
    assert (quotas.timezone, rpd.resets_at) == ("Asia/Shanghai", SHANGHAI_DAY_END)


async def test_grants_in_flight_settle_where_they_were_counted_whatever_a_reload_says():
    store = SlowStore(random.Random(3), wall_clock=virtual_wall())
    free = Tier("free", {"*": TierLimits(rpm=50, tpm=50_000)}, shared=TierLimits(rpd=80))
    pro = Tier("pro", {"gpt-4o": TierLimits(rpd=500)})
    quotas = TenantQuotas(
        tiers=[free], tenants={"acme": "free"}, store=store, wall_clock=virtual_wall()
    )

    async def one(index: int) -> bool:
        """One request: admitted under whichever tiers hold then, settled after a reload."""
        await asyncio.sleep(index / 1000)
        try:
            grant = await quotas.admit("acme", "gpt-4o", 100)
        except TenantLimitError:
            return False
        await asyncio.sleep(0.03)
        if index % 2:
            await grant.reconcile(100)
            return True
        await grant.cancel()
        return False

    async def reloads() -> None:
        for tiers in ([pro], [free], [pro], [free]):
            await asyncio.sleep(0.02)
            quotas.reload(tiers=tiers, tenants={"acme": tiers[0].name})

    kept, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(100))), reloads())
    await asyncio.sleep(1)
    assert "open=0" in repr(quotas)
    minute = int(T0 // 60)
    rpm, tpm, shared_rpd, pro_rpd = await store.get(
        [
            f"tier:acme:gpt-4o:rpm:{minute}",
            f"tier:acme:gpt-4o:tpm:{minute}",
            "tier:acme:*:rpd:2026-03-20",
            "tier:acme:gpt-4o:rpd:2026-03-20",
        ]
    )
    # Requests were kept under both tiers; each counted exactly where it was admitted.
    assert rpm > 0 and pro_rpd > 0
    assert rpm + pro_rpd == sum(kept)
    assert (tpm, shared_rpd) == (rpm * 100, rpm)
