"""Counters that outlive a request and, with SQLite, a restart: the governance layer's memory.

Tenant day counters and monthly spend must survive a redeploy, and several parts (tiers,
budget) share them, so they live behind one small async interface: a ``Store`` maps string
keys to float counters, each with a Unix time after which it may be forgotten. Three stores
ship: ``MemoryStore`` (a dict, the default), ``SQLiteStore`` (one table in a local file,
standard library only: one machine) and, in :mod:`.redis_store`, ``RedisStore`` (a fleet of
processes on several machines; extra ``redis``).

The one primitive that makes limits hold under concurrency is ``reserve``: add to a counter
unless the result would pass a limit, atomically. A request held against several counters
at once (its minute, its day, its tokens; a budget and a cap) takes them with
``reserve_all``: all of them or none. ``SQLiteStore`` does it in one transaction and
``RedisStore`` in one script, so nobody ever sees part of a request counted;
``MemoryStore`` reserves them one by one and refunds with ``add(-amount)`` what it took when
a later one refuses (counters may be high for a moment, never past a limit), and so does
:func:`reserve_all` for a store of the application's own that has no ``reserve_all``.

A store reads the wall clock only to tell expired counters from live ones.

A store that cannot do its job raises :class:`~asyncquota.errors.StoreUnavailableError`
(a ``QuotaError``): callers refuse the request rather than waive the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import StoreUnavailableError

__all__ = ["MemoryStore", "Reservation", "SQLiteStore", "Store", "reserve_all"]

logger = logging.getLogger("asyncquota.governance")

PURGE_INTERVAL = 60.0
"""Seconds of wall time between two sweeps of expired counters in ``SQLiteStore``."""

BUSY_TIMEOUT_MS = 5000
"""How long one ``SQLiteStore`` call may take by default (its ``timeout``), waiting for
another process's write lock included, before it fails with ``StoreUnavailableError``."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Reservation:
    """One counter a request is held against: add ``amount`` to ``key`` unless the result
    would pass ``limit`` (None: no limit); the counter may be forgotten after ``expires_at``
    (Unix time), as for :meth:`Store.reserve`."""

    key: str
    amount: float
    limit: float | None
    expires_at: float


class Store(Protocol):
    """Float counters keyed by strings, each forgotten after its ``expires_at``."""

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        """Atomically add ``amount`` to counter ``key`` unless the result would pass ``limit``.

        ``limit`` None means no limit. ``expires_at`` (Unix time) is when the counter may be
        forgotten (the end of its window plus a margin). Returns the new value, or None when
        refused (then nothing was added).
        """
        ...

    async def reserve_all(self, reservations: Sequence[Reservation]) -> int | None:
        """Make every reservation, in order, or none of them.

        Each is checked against its counter as the earlier ones in the same call left it
        (a key may appear twice). Returns None when all were made, else the index of the
        first that would pass its limit (then nothing was added). A caller that needs
        several counters goes through :func:`reserve_all`, which also serves a store of
        the application's own written before this method existed.
        """
        ...

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        """Add ``amount`` unconditionally (negative for refunds); the counter never goes
        below 0. Returns the new value."""
        ...

    async def get(self, keys: Sequence[str]) -> list[float]:
        """The current values of ``keys``, in order; 0.0 for unknown or expired keys."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources; further calls raise ``RuntimeError``."""
        ...


async def reserve_all(store: Store, reservations: Sequence[Reservation]) -> int | None:
    """``store.reserve_all(reservations)``, or one by one for a store that has no such method.

    Returns None when every reservation was made, else the index of the first refused
    (nothing is left counted). See :func:`reserve_each` for how a store without the method
    is served.
    """
    method = getattr(store, "reserve_all", None)
    if method is None:
        return await reserve_each(store, reservations)
    refused: int | None = await method(reservations)
    return refused


async def reserve_each(store: Store, reservations: Sequence[Reservation]) -> int | None:
    """All the reservations or none, made one by one with ``store.reserve``.

    When one refuses, those already made are refunded with ``add(-amount)`` before this
    returns the refused index, so a concurrent caller may see them counted for that
    moment: counters can be briefly high, never past a limit. The refund runs as a task of
    its own: a caller cancelled meanwhile, or a store that fails half way, leaves nothing
    counted either (a refund the store refuses is logged and lost: the counter stays high,
    on the closed side, until its window ends).
    """
    held: list[Reservation] = []
    refused = None
    try:
        for index, item in enumerate(reservations):
            counted = await store.reserve(
                item.key, item.amount, limit=item.limit, expires_at=item.expires_at
            )
            if counted is None:
                refused = index
                break
            held.append(item)
    except Exception:
        if held:
            with contextlib.suppress(Exception):  # the refund's own failure is logged
                await asyncio.shield(_give_back(store, held))
        raise
    except BaseException:  # cancelled: the refund finishes on its own
        if held:
            _give_back(store, held)
        raise
    if held and refused is not None:
        await asyncio.shield(_give_back(store, held))
    return refused


_GIVING_BACK: set[asyncio.Task[None]] = set()  # refunds that must finish whoever waits


def _give_back(store: Store, held: Sequence[Reservation]) -> asyncio.Task[None]:
    task = asyncio.ensure_future(_refund(store, tuple(held)))
    _GIVING_BACK.add(task)
    task.add_done_callback(_given_back)
    return task


async def _refund(store: Store, held: tuple[Reservation, ...]) -> None:
    for item in reversed(held):
        await store.add(item.key, -item.amount, expires_at=item.expires_at)


def _given_back(task: asyncio.Task[None]) -> None:
    _GIVING_BACK.discard(task)
    if not task.cancelled() and isinstance(task.exception(), StoreUnavailableError):
        logger.warning("%s A refund of a partial reservation was dropped.", task.exception())


def _check_amount(amount: float, *, signed: bool) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        raise ValueError(f"amount must be a finite number, not {amount!r}.")
    if not signed and amount < 0:
        raise ValueError(f"A reservation's amount must be 0 or more, not {amount!r}.")


def _check_limit(limit: float | None) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | float) or math.isnan(limit)
    ):
        raise ValueError(f"limit must be a number or None, not {limit!r}.")


class MemoryStore:
    """Counters in a dict: fast, shared by everything in the process, gone at exit.

    Expired counters read as 0 at once and are dropped lazily: a sweep runs after as many
    writes as there were counters at the previous sweep, so each write pays amortised O(1)
    and the dict never holds more than about twice its live counters.

    Args:
        wall_clock: Unix time, used only to tell expired counters.
    """

    __slots__ = ("_closed", "_data", "_wall_clock", "_writes_to_sweep")

    def __init__(self, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._data: dict[str, tuple[float, float]] = {}  # key → (value, expires_at)
        self._writes_to_sweep = 1
        self._closed = False

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        _check_amount(amount, signed=False)
        _check_limit(limit)
        now = self._open_now()
        new = self._value(key, now) + amount
        if limit is not None and new > limit:
            return None
        self._write(key, new, expires_at, now)
        return new

    async def reserve_all(self, reservations: Sequence[Reservation]) -> int | None:
        # One by one through ``reserve``, so a subclass that watches or delays ``reserve``
        # (tests do both) sees every counter; see ``reserve_each`` for the refund.
        return await reserve_each(self, reservations)

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        _check_amount(amount, signed=True)
        now = self._open_now()
        new = max(0.0, self._value(key, now) + amount)
        self._write(key, new, expires_at, now)
        return new

    async def get(self, keys: Sequence[str]) -> list[float]:
        now = self._open_now()
        return [self._value(key, now) for key in keys]

    async def aclose(self) -> None:
        self._closed = True
        self._data.clear()

    def _open_now(self) -> float:
        if self._closed:
            raise RuntimeError("This MemoryStore is closed.")
        return self._wall_clock()

    def _value(self, key: str, now: float) -> float:
        entry = self._data.get(key)
        if entry is None or entry[1] <= now:
            return 0.0
        return entry[0]

    def _write(self, key: str, value: float, expires_at: float, now: float) -> None:
        entry = self._data.get(key)
        if entry is not None and entry[1] > now:
            expires_at = max(expires_at, entry[1])
        self._data[key] = (float(value), float(expires_at))
        self._writes_to_sweep -= 1
        if self._writes_to_sweep <= 0:
            self._data = {k: e for k, e in self._data.items() if e[1] > now}
            self._writes_to_sweep = max(1, len(self._data))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"keys={len(self._data)}"
        return f"<MemoryStore {state}>"


class SQLiteStore:
    """Counters in one table of a local SQLite file: they survive a restart.

    The file is opened in WAL mode. Each ``reserve``, ``reserve_all`` and ``add`` is one
    ``BEGIN IMMEDIATE`` transaction (the reads and the conditional writes under the write
    lock), so several processes may share the file without passing a limit, and a
    ``reserve_all`` is seen whole or not at all. Expired rows read as 0,
    are purged when the store opens and then at most once a minute of wall time, during a
    write. ``synchronous=NORMAL``: a committed counter survives a crash of the process; a
    power loss may lose the last few.

    The disk never blocks the event loop: every sqlite3 call runs on one worker thread of
    this store's own, in order, and the loop only awaits it. Each call is bounded: it
    fails after ``timeout`` seconds (waiting behind this store's earlier calls and for
    another process's write lock both count), and every failure of the file (locked for
    longer than that, corrupt, not a database, a disk error) is raised as
    :class:`~asyncquota.errors.StoreUnavailableError` naming the file, never a key. The
    file is opened by the first call, on the worker, and opened again by a later call if
    that failed, so a store comes back by itself once the file does.

    What that means above the store (tiers, budgets, the gateway): a limit that cannot be
    checked is not waived. An admission or a budget reservation that meets an unavailable
    store refuses the request with that error before anything is sent, and gives back
    what it had counted when the store lets it (a refund the store refuses too is lost:
    the counter stays high by that request until its window ends, which errs on the
    closed side, never past a limit).

    A ``reserve`` or ``reserve_all`` whose caller is cancelled while it runs is undone on
    the worker once it has run, so a cancelled reservation holds nothing; a cancelled
    ``add`` (a refund, a charge) still applies.

    Args:
        path: the database file (created if missing).
        wall_clock: Unix time, used only to tell expired counters.
        timeout: the longest one call may take, in seconds (default ``BUSY_TIMEOUT_MS``).

    Raises:
        ValueError: a timeout that is not a positive number.
    """

    __slots__ = (
        "_calls",
        "_closed",
        "_connection",
        "_executor",
        "_failures",
        "_next_purge",
        "_path",
        "_timeout",
        "_wall_clock",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        wall_clock: Callable[[], float] = time.time,
        timeout: float = BUSY_TIMEOUT_MS / 1000,
    ) -> None:
        if isinstance(timeout, bool) or not (
            isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}.")
        self._path = os.fspath(path)
        self._wall_clock = wall_clock
        self._timeout = float(timeout)
        # One thread, so calls run one at a time and in order, as on one connection.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncquota-sqlite")
        self._connection: sqlite3.Connection | None = None  # used on the worker only
        self._next_purge = -math.inf
        self._closed = False
        self._calls = 0
        self._failures = 0

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        _check_amount(amount, signed=False)
        _check_limit(limit)
        outcome = await self._reserve((Reservation(key, amount, limit, expires_at),))
        return None if isinstance(outcome, int) else outcome[0]

    async def reserve_all(self, reservations: Sequence[Reservation]) -> int | None:
        for item in reservations:
            _check_amount(item.amount, signed=False)
            _check_limit(item.limit)
        if not reservations:
            self._check_open()
            return None
        outcome = await self._reserve(tuple(reservations))
        return outcome if isinstance(outcome, int) else None

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        _check_amount(amount, signed=True)
        change = (Reservation(key, amount, None, expires_at),)
        new = await asyncio.shield(self._submit(self._update, change))
        assert not isinstance(new, int)  # no limit: never refused
        return new[0]

    async def _reserve(self, reservations: tuple[Reservation, ...]) -> list[float] | int:
        running = self._submit(self._update, reservations)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            running.add_done_callback(lambda done: self._undo(done, reservations))
            raise

    async def get(self, keys: Sequence[str]) -> list[float]:
        if not keys:
            self._check_open()
            return []
        return await self._submit(self._read, list(keys))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Behind every call already submitted: they end (each within its timeout) first.
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)

    # ------------------------------------------------------------------ on the event loop

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"This SQLiteStore ({self._path}) is closed.")

    def _submit(self, work: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``work(*args)`` on the worker within this store's timeout."""
        self._check_open()
        self._calls += 1
        deadline = time.monotonic() + self._timeout
        # The clock is read here, on the loop: an injected one may be loop-bound.
        now = self._wall_clock()
        running = asyncio.get_running_loop().run_in_executor(
            self._executor, self._bounded, deadline, now, work, *args
        )
        running.add_done_callback(self._count_failure)
        return running

    def _count_failure(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is not None:
            self._failures += 1

    def _undo(
        self, done: asyncio.Future[list[float] | int], reservations: tuple[Reservation, ...]
    ) -> None:
        """Reservations whose caller left: refund them if they were made."""
        if done.cancelled() or done.exception() is not None or isinstance(done.result(), int):
            return
        if self._closed:
            return
        refunds = tuple(
            Reservation(item.key, -item.amount, None, item.expires_at) for item in reservations
        )
        undo = self._submit(self._update, refunds)
        undo.add_done_callback(_ignore_outcome)

    # ------------------------------------------------------------------ on the worker

    def _bounded(self, deadline: float, now: float, work: Callable[..., _T], *args: Any) -> _T:
        """``work(connection, now, *args)`` with what is left of the timeout; errors mapped."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._unavailable(
                f"it did not answer within {self._timeout:g} s (earlier calls were still "
                "waiting on it)"
            )
        try:
            # The wait for another process's lock gets what is left of this call's time.
            busy = f"PRAGMA busy_timeout = {max(1, int(left * 1000))}"
            connection = self._connection
            if connection is None:
                connection = self._connect(busy, now)
            else:
                connection.execute(busy)
            return work(connection, now, *args)
        except sqlite3.Error as exc:
            if not isinstance(exc, sqlite3.OperationalError) and self._connection is not None:
                # Corrupt, or not a database: open afresh next time rather than reuse it.
                with contextlib.suppress(sqlite3.Error):
                    self._connection.close()
                self._connection = None
            raise self._unavailable(_describe(exc)) from None

    def _unavailable(self, why: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"The counter store {self._path} is unavailable: {why}; the limits kept there "
            "can be neither checked nor charged.",
            path=self._path,
        )

    def _connect(self, busy: str, now: float) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, isolation_level=None, timeout=0)
        try:
            connection.execute(busy)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS counters"
                " (key TEXT PRIMARY KEY, value REAL NOT NULL, expires_at REAL NOT NULL)"
            )
            self._purge_if_due(connection, now)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _read(self, connection: sqlite3.Connection, now: float, keys: list[str]) -> list[float]:
        unique = list(dict.fromkeys(keys))
        placeholders = ",".join("?" * len(unique))
        rows = connection.execute(
            f"SELECT key, value FROM counters WHERE key IN ({placeholders}) AND expires_at > ?",
            [*unique, now],
        ).fetchall()
        values: dict[str, float] = dict(rows)
        return [values.get(key, 0.0) for key in keys]

    def _update(
        self, connection: sqlite3.Connection, now: float, changes: Sequence[Reservation]
    ) -> list[float] | int:
        """One transaction: each change in order, on the live value as the earlier ones left
        it (never below 0); the index of the first that would pass its limit (everything
        rolled back), else the new values."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            values: list[float] = []
            for index, change in enumerate(changes):
                row = connection.execute(
                    "SELECT value, expires_at FROM counters WHERE key = ?", (change.key,)
                ).fetchone()
                live = row is not None and row[1] > now
                new = (row[0] if live else 0.0) + change.amount
                if change.limit is not None and new > change.limit:
                    connection.execute("ROLLBACK")
                    return index
                new = max(0.0, new)
                expires_at = float(change.expires_at)
                keep_until = max(expires_at, row[1]) if live else expires_at
                connection.execute(
                    "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET"
                    " value = excluded.value, expires_at = excluded.expires_at",
                    (change.key, new, keep_until),
                )
                values.append(float(new))
            self._purge_if_due(connection, now)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return values

    def _purge_if_due(self, connection: sqlite3.Connection, now: float) -> None:
        if now >= self._next_purge:
            connection.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            self._next_purge = now + PURGE_INTERVAL

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SQLiteStore {self._path!r} {state} calls={self._calls} failures={self._failures}>"


def _describe(exc: sqlite3.Error) -> str:
    """What went wrong with the file, in words (sqlite3's messages never hold a key)."""
    text = str(exc) or type(exc).__name__
    if "locked" in text or "busy" in text:
        return f"{text} (another process held it for longer than this store waits)"
    return text


def _ignore_outcome(done: asyncio.Future[Any]) -> None:
    # An undo that fails is lost (see the class docstring); its error is read, not leaked.
    if not done.cancelled():
        done.exception()
