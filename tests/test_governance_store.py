"""The counter stores: one contract, three stores (memory, SQLite, Redis), and a restart for
SQLite. Every contract test runs against each store; the Redis ones on a real redis-server
(see the ``redis_url`` fixture), on real time."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from asyncquota.errors import QuotaError, StoreUnavailableError
from asyncquota.governance.redis_store import RedisStore
from asyncquota.governance.store import (
    MemoryStore,
    Reservation,
    SQLiteStore,
    Store,
    reserve_all,
)

# 2100-01-01: in the future of any test run. Redis forgets a counter at its ``expires_at``
# by its own clock, so the contract's expiries must lie ahead of the real one.
T0 = 4_102_444_800.0


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.looptime(False))]
)
async def store(
    request: pytest.FixtureRequest, clock: Clock, tmp_path: Path
) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore(wall_clock=clock)
    elif request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "counters.db", wall_clock=clock)
    else:
        # A generous timeout: a thousand concurrent calls queue for the pool's connections.
        opened = RedisStore(request.getfixturevalue("redis_url"), timeout=5)
    yield opened
    await opened.aclose()


@pytest.fixture(params=["memory", "sqlite"])
async def clocked_store(
    request: pytest.FixtureRequest, clock: Clock, tmp_path: Path
) -> AsyncIterator[Store]:
    """The stores whose expiry follows an injected clock (Redis's follows its own: its
    expiry is tested in test_fleet_store.py)."""
    opened: Store
    if request.param == "memory":
        opened = MemoryStore(wall_clock=clock)
    else:
        opened = SQLiteStore(tmp_path / "counters.db", wall_clock=clock)
    yield opened
    await opened.aclose()


async def test_reserve_adds_until_the_limit_and_a_refusal_adds_nothing(store: Store):
    expires = T0 + 60
    assert await store.reserve("k", 3, limit=5, expires_at=expires) == 3
    assert await store.reserve("k", 2, limit=5, expires_at=expires) == 5
    assert await store.reserve("k", 0.5, limit=5, expires_at=expires) is None
    assert await store.get(["k"]) == [5.0]


async def test_reserve_without_a_limit_always_adds(store: Store):
    assert await store.reserve("k", 1e9, limit=None, expires_at=T0 + 60) == 1e9
    assert await store.reserve("k", 1, limit=None, expires_at=T0 + 60) == 1e9 + 1


async def test_a_reservation_larger_than_the_limit_is_refused_even_on_an_empty_counter(
    store: Store,
):
    assert await store.reserve("k", 11, limit=10, expires_at=T0 + 60) is None
    assert await store.get(["k"]) == [0.0]


async def test_add_refunds_and_charges_and_never_goes_below_zero(store: Store):
    await store.reserve("k", 10, limit=None, expires_at=T0 + 60)
    assert await store.add("k", -4, expires_at=T0 + 60) == 6
    assert await store.add("k", 2.5, expires_at=T0 + 60) == 8.5
    assert await store.add("k", -100, expires_at=T0 + 60) == 0
    assert await store.add("fresh", -1, expires_at=T0 + 60) == 0


async def test_get_reads_in_order_with_zero_for_unknown_keys_and_repeats(store: Store):
    await store.add("a", 1, expires_at=T0 + 60)
    await store.add("b", 2, expires_at=T0 + 60)
    assert await store.get(["b", "nobody", "a", "b"]) == [2.0, 0.0, 1.0, 2.0]
    assert await store.get([]) == []


async def test_an_expired_counter_reads_zero_and_starts_again_from_zero(
    clocked_store: Store, clock: Clock
):
    store = clocked_store
    await store.add("k", 7, expires_at=T0 + 60)
    clock.now = T0 + 59.9
    assert await store.get(["k"]) == [7.0]
    clock.now = T0 + 60
    assert await store.get(["k"]) == [0.0]
    assert await store.reserve("k", 1, limit=5, expires_at=T0 + 120) == 1


async def test_a_live_counter_keeps_its_later_expiry(clocked_store: Store, clock: Clock):
    store = clocked_store
    await store.add("k", 1, expires_at=T0 + 120)
    await store.add("k", 1, expires_at=T0 + 60)  # an earlier expiry does not shorten it
    clock.now = T0 + 90
    assert await store.get(["k"]) == [2.0]


async def test_concurrent_reserves_never_pass_the_limit(store: Store):
    results = await asyncio.gather(
        *(store.reserve("k", 1, limit=500, expires_at=T0 + 60) for _ in range(1000))
    )
    granted = [value for value in results if value is not None]
    assert len(granted) == 500
    assert max(granted) == 500
    assert await store.get(["k"]) == [500.0]


async def test_reserve_all_takes_every_counter_or_none(store: Store):
    expires = T0 + 60
    minute, day, tokens = "rpm", "rpd", "tpm"
    request = [
        Reservation(minute, 1, 3, expires),
        Reservation(day, 1, 2, expires),
        Reservation(tokens, 400, 1000, expires),
    ]
    assert await store.reserve_all(request) is None
    assert await store.reserve_all(request) is None
    assert await store.get([minute, day, tokens]) == [2.0, 2.0, 800.0]
    # The day is full: refused at index 1, and the minute taken before it is not kept.
    assert await store.reserve_all(request) == 1
    assert await store.get([minute, day, tokens]) == [2.0, 2.0, 800.0]
    assert await store.reserve_all([]) is None


async def test_reserve_all_counts_a_repeated_key_with_its_earlier_amount(store: Store):
    twice = [Reservation("k", 3, 5, T0 + 60), Reservation("k", 3, 5, T0 + 60)]
    assert await store.reserve_all(twice) == 1  # 3 fits, 3 + 3 does not: neither is kept
    assert await store.get(["k"]) == [0.0]
    assert await store.reserve_all([twice[0], Reservation("k", 2, 5, T0 + 60)]) is None
    assert await store.get(["k"]) == [5.0]


async def test_concurrent_reserve_alls_never_pass_a_limit_nor_leave_a_part_counted(store: Store):
    request = [Reservation("requests", 1, 500, T0 + 60), Reservation("tokens", 2, 600, T0 + 60)]
    results = await asyncio.gather(*(store.reserve_all(request) for _ in range(1000)))
    assert results.count(None) == 300  # the tokens bind: 600 / 2
    if not isinstance(store, MemoryStore):
        # In one step: the requests counter never held more than the 300 admitted, so
        # nobody was refused on it. (Memory reserves one by one: refunds pending, the
        # requests counter was briefly full, and some were refused there.)
        assert set(results) == {None, 1}
    # Each admitted request counted once on both, the refused ones on neither.
    assert await store.get(["requests", "tokens"]) == [300.0, 600.0]


async def test_sums_of_decimal_amounts_are_the_same_floats_in_every_store(store: Store):
    expected = 0.0
    for cents in (10, 20, 30, 70, 5, 1):
        expected += cents / 100
        assert await store.add("spend", cents / 100, expires_at=T0 + 60) == expected
    assert await store.get(["spend"]) == [expected]  # 1.36 with its float dust, bit for bit
    assert await store.reserve("spend", 0.1, limit=1.5, expires_at=T0 + 60) == expected + 0.1


class OldStore:
    """A store of an application's own, written before ``reserve_all`` existed; it fails
    every call from the ``fail_at``-th on."""

    def __init__(self, fail_at: int = 10**9) -> None:
        self.inner = MemoryStore(wall_clock=Clock())
        self.calls = 0
        self.fail_at = fail_at

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        self._call()
        return await self.inner.reserve(key, amount, limit=limit, expires_at=expires_at)

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        return await self.inner.add(key, amount, expires_at=expires_at)

    async def get(self, keys: Sequence[str]) -> list[float]:
        return await self.inner.get(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _call(self) -> None:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise StoreUnavailableError("The counter store /var/old.db is unavailable.")


async def test_a_store_without_reserve_all_is_reserved_one_by_one_and_refunded():
    old = OldStore()
    request = [Reservation("a", 1, 1, T0 + 60), Reservation("b", 1, 1, T0 + 60)]
    assert await reserve_all(old, request) is None
    assert await reserve_all(old, [Reservation("c", 1, 1, T0 + 60), *request]) == 1
    assert await old.get(["a", "b", "c"]) == [1.0, 1.0, 0.0]  # "c" was given back

    failing = OldStore(fail_at=2)
    with pytest.raises(StoreUnavailableError):
        await reserve_all(failing, request)
    assert await failing.get(["a", "b"]) == [0.0, 0.0]  # the first, taken, was given back


async def test_bad_amounts_and_limits_are_refused_with_a_sentence(store: Store):
    with pytest.raises(ValueError, match="0 or more"):
        await store.reserve("k", -1, limit=None, expires_at=T0 + 60)
    with pytest.raises(ValueError, match="finite number"):
        await store.add("k", float("nan"), expires_at=T0 + 60)
    with pytest.raises(ValueError, match="limit must be a number"):
        await store.reserve("k", 1, limit=float("nan"), expires_at=T0 + 60)
    with pytest.raises(ValueError, match="0 or more"):
        await store.reserve_all([Reservation("k", 1, 5, T0 + 60), Reservation("j", -1, 5, T0)])
    assert await store.get(["k", "j"]) == [0.0, 0.0]


async def test_a_closed_store_refuses_every_call(store: Store):
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await store.get(["k"])
    with pytest.raises(RuntimeError, match="closed"):
        await store.add("k", 1, expires_at=T0 + 60)
    assert "closed" in repr(store)


async def test_memory_store_sweeps_expired_keys_as_it_writes(clock: Clock):
    store = MemoryStore(wall_clock=clock)
    for i in range(100):
        await store.add(f"old{i}", 1, expires_at=T0 + 60)
    assert repr(store) == "<MemoryStore keys=100>"
    clock.now = T0 + 61
    for i in range(200):
        await store.add(f"new{i}", 1, expires_at=T0 + 120)
    # Every old key has been swept; at most the writes since the last sweep are pending.
    assert repr(store) == "<MemoryStore keys=200>"
    assert await store.get(["old0", "new0"]) == [0.0, 1.0]


async def test_sqlite_counters_survive_closing_and_reopening_the_file(clock: Clock, tmp_path: Path):
    path = tmp_path / "counters.db"
    store = SQLiteStore(path, wall_clock=clock)
    await store.reserve("day", 41, limit=100, expires_at=T0 + 86_400)
    await store.add("short", 5, expires_at=T0 + 60)
    await store.aclose()

    clock.now = T0 + 3600
    reopened = SQLiteStore(str(path), wall_clock=clock)
    try:
        assert await reopened.reserve("day", 1, limit=100, expires_at=T0 + 86_400) == 42
        assert await reopened.get(["day", "short"]) == [42.0, 0.0]
        # The expired row was purged when the file was opened, not just hidden.
        assert rows(path) == 1
        assert repr(reopened) == f"<SQLiteStore {str(path)!r} open calls=2 failures=0>"
    finally:
        await reopened.aclose()


def rows(path: Path) -> int:
    """Rows in the counters table, read over a connection of the test's own."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return int(connection.execute("SELECT count(*) FROM counters").fetchone()[0])


async def test_sqlite_purges_expired_rows_at_most_once_a_minute(clock: Clock, tmp_path: Path):
    path = tmp_path / "counters.db"
    store = SQLiteStore(path, wall_clock=clock)
    try:
        await store.add("a", 1, expires_at=T0 + 10)
        clock.now = T0 + 30
        await store.add("b", 1, expires_at=T0 + 600)
        assert rows(path) == 2  # "a" has expired, but the last sweep was 30 s ago
        clock.now = T0 + 60
        await store.add("b", 1, expires_at=T0 + 600)
        assert rows(path) == 1
    finally:
        await store.aclose()


async def test_two_sqlite_stores_on_one_file_share_the_limit(clock: Clock, tmp_path: Path):
    path = tmp_path / "counters.db"
    first = SQLiteStore(path, wall_clock=clock)
    second = SQLiteStore(path, wall_clock=clock)
    try:
        rng = random.Random(5)
        stores = [first, second]
        results = [
            await rng.choice(stores).reserve("k", 1, limit=30, expires_at=T0 + 60)
            for _ in range(50)
        ]
        assert sum(value is not None for value in results) == 30
        assert await first.get(["k"]) == await second.get(["k"]) == [30.0]
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_file_that_is_not_a_database_fails_each_call_with_a_typed_error_naming_it(
    tmp_path: Path,
):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 100)
    store = SQLiteStore(path)  # opening waits for the first call, on the worker
    try:
        for call in (
            store.reserve("tier:acme:secret-key", 1, limit=5, expires_at=T0 + 60),
            store.add("tier:acme:secret-key", 1, expires_at=T0 + 60),
            store.get(["tier:acme:secret-key"]),
        ):
            with pytest.raises(StoreUnavailableError) as caught:
                await call
            assert isinstance(caught.value, QuotaError)
            assert caught.value.path == str(path)
            assert caught.value.reason == "store_unavailable"
            assert str(path) in str(caught.value)
            assert "not a database" in str(caught.value)
            assert "secret-key" not in str(caught.value)
        assert "failures=3" in repr(store)
    finally:
        await store.aclose()


@pytest.mark.looptime(False)
async def test_a_locked_file_fails_within_the_timeout_while_the_loop_keeps_running(
    tmp_path: Path,
):
    path = tmp_path / "counters.db"
    store = SQLiteStore(path, timeout=0.5)
    await store.add("k", 1, expires_at=time.time() + 60)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(StoreUnavailableError, match="locked") as caught:
            await store.reserve("k", 1, limit=10, expires_at=time.time() + 60)
        waited = loop.time() - started
        assert 0.4 <= waited < 1.5
        assert str(path) in str(caught.value)
        # The loop ran all along: ~50 ticks of 10 ms in 0.5 s (a blocked loop gives 0-1).
        assert ticks >= 20
        # Calls queued behind a blocked one share its bound instead of adding theirs up.
        started = loop.time()
        results = await asyncio.gather(
            *(store.add("k", 1, expires_at=time.time() + 60) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreUnavailableError) for r in results)
        assert loop.time() - started < 1.5
    finally:
        ticker.cancel()
        holder.execute("ROLLBACK")
        holder.close()
    # Once the lock is gone the store works again, and nothing was counted meanwhile.
    assert await store.get(["k"]) == [1.0]
    await store.aclose()


@pytest.mark.looptime(False)
async def test_a_reservation_whose_caller_is_cancelled_while_it_runs_is_undone(tmp_path: Path):
    path = tmp_path / "counters.db"
    store = SQLiteStore(path, timeout=2)
    holder = sqlite3.connect(path, isolation_level=None)
    await store.get(["k"])  # opened
    holder.execute("BEGIN EXCLUSIVE")
    reserving = asyncio.create_task(store.reserve("k", 3, limit=10, expires_at=time.time() + 60))
    await asyncio.sleep(0.1)  # the reservation waits for the lock on the worker
    reserving.cancel()
    holder.execute("ROLLBACK")  # it now goes through, for a caller that is gone
    holder.close()
    with pytest.raises(asyncio.CancelledError):
        await reserving
    for _ in range(100):
        if await store.get(["k"]) == [0.0]:
            break
        await asyncio.sleep(0.01)
    assert await store.get(["k"]) == [0.0]
    await store.aclose()


@pytest.mark.looptime(False)
async def test_a_reserve_all_whose_caller_is_cancelled_while_it_runs_is_undone_whole(
    tmp_path: Path,
):
    path = tmp_path / "counters.db"
    store = SQLiteStore(path, timeout=2)
    holder = sqlite3.connect(path, isolation_level=None)
    await store.add("b", 1, expires_at=time.time() + 60)
    holder.execute("BEGIN EXCLUSIVE")
    expires = time.time() + 60
    reserving = asyncio.create_task(
        store.reserve_all([Reservation("a", 3, 10, expires), Reservation("b", 2, 10, expires)])
    )
    await asyncio.sleep(0.1)
    reserving.cancel()
    holder.execute("ROLLBACK")
    holder.close()
    with pytest.raises(asyncio.CancelledError):
        await reserving
    for _ in range(100):
        if await store.get(["a", "b"]) == [0.0, 1.0]:
            break
        await asyncio.sleep(0.01)
    assert await store.get(["a", "b"]) == [0.0, 1.0]
    await store.aclose()


def test_the_store_timeout_is_validated(tmp_path: Path):
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="timeout"):
            SQLiteStore(tmp_path / "x.db", timeout=bad)
