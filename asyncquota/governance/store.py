"""Counters that outlive a request and, with SQLite, a restart: the governance layer's memory.

Tenant day counters and monthly spend must survive a redeploy, and several parts (tiers,
budget) share them, so they live behind one small async interface: a ``Store`` maps string
keys to float counters, each with a Unix time after which it may be forgotten. Two stores
ship here: ``MemoryStore`` (a dict, the default) and ``SQLiteStore`` (one table in a local
file, standard library only). A Redis store for several processes can implement the same
protocol later.

The one primitive that makes limits hold under concurrency is ``reserve``: add to a counter
unless the result would pass a limit, atomically. A caller that needs several counters at
once (a request against its minute and its day) reserves them one by one and refunds with
``add(-amount)`` what it took when a later one refuses: counters may be briefly high, never
past a limit.

A store reads the wall clock only to tell expired counters from live ones.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["MemoryStore", "SQLiteStore", "Store"]

PURGE_INTERVAL = 60.0
"""Seconds of wall time between two sweeps of expired counters in ``SQLiteStore``."""

BUSY_TIMEOUT_MS = 5000
"""How long ``SQLiteStore`` waits for another process's write lock before failing."""


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

    The file is opened in WAL mode; nothing is loaded up front. Each ``reserve`` and ``add``
    is one ``BEGIN IMMEDIATE`` transaction (the read and the conditional write under the
    write lock), so several processes may share the file without passing a limit. Expired
    rows read as 0, are purged when the store opens and then at most once a minute of wall
    time, during a write.

    The sqlite3 calls are synchronous and run on the event loop: a local WAL write takes
    well under a millisecond, less than handing it to a thread would cost. Only when another
    process holds the write lock does a call block, for up to ``BUSY_TIMEOUT_MS``.
    ``synchronous=NORMAL``: a committed counter survives a crash of the process; a power
    loss may lose the last few.

    Args:
        path: the database file (created if missing).
        wall_clock: Unix time, used only to tell expired counters.

    Raises:
        sqlite3.Error: the file cannot be opened or is not a database.
    """

    __slots__ = ("_connection", "_next_purge", "_path", "_wall_clock")

    def __init__(
        self, path: str | os.PathLike[str], *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._path = os.fspath(path)
        self._wall_clock = wall_clock
        connection = sqlite3.connect(self._path, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS counters"
                " (key TEXT PRIMARY KEY, value REAL NOT NULL, expires_at REAL NOT NULL)"
            )
        except BaseException:
            connection.close()
            raise
        self._connection: sqlite3.Connection | None = connection
        self._next_purge = -math.inf
        self._purge_if_due(connection, wall_clock())

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        _check_amount(amount, signed=False)
        _check_limit(limit)
        return self._update(key, amount, limit, expires_at)

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        _check_amount(amount, signed=True)
        new = self._update(key, amount, None, expires_at)
        assert new is not None  # no limit: never refused
        return new

    async def get(self, keys: Sequence[str]) -> list[float]:
        connection = self._open()
        if not keys:
            return []
        now = self._wall_clock()
        unique = list(dict.fromkeys(keys))
        placeholders = ",".join("?" * len(unique))
        rows = connection.execute(
            f"SELECT key, value FROM counters WHERE key IN ({placeholders}) AND expires_at > ?",
            [*unique, now],
        ).fetchall()
        values: dict[str, float] = dict(rows)
        return [values.get(key, 0.0) for key in keys]

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError(f"This SQLiteStore ({self._path}) is closed.")
        return self._connection

    def _update(
        self, key: str, amount: float, limit: float | None, expires_at: float
    ) -> float | None:
        """One transaction: read the live value, refuse past ``limit``, else write (≥ 0)."""
        connection = self._open()
        now = self._wall_clock()
        connection.execute("BEGIN IMMEDIATE")
        try:
            row = connection.execute(
                "SELECT value, expires_at FROM counters WHERE key = ?", (key,)
            ).fetchone()
            live = row is not None and row[1] > now
            new = (row[0] if live else 0.0) + amount
            if limit is not None and new > limit:
                connection.execute("ROLLBACK")
                return None
            new = max(0.0, new)
            keep_until = max(float(expires_at), row[1]) if live else float(expires_at)
            connection.execute(
                "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET"
                " value = excluded.value, expires_at = excluded.expires_at",
                (key, new, keep_until),
            )
            self._purge_if_due(connection, now)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return new

    def _purge_if_due(self, connection: sqlite3.Connection, now: float) -> None:
        if now >= self._next_purge:
            connection.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            self._next_purge = now + PURGE_INTERVAL

    def __repr__(self) -> str:
        if self._connection is None:
            return f"<SQLiteStore {self._path!r} closed>"
        (count,) = self._connection.execute("SELECT count(*) FROM counters").fetchone()
        return f"<SQLiteStore {self._path!r} keys={count}>"
