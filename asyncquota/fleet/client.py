"""``RedisFleet``: one quota shared exactly by every process of a fleet, through Redis.

Each process runs its own :class:`~asyncquota.Shaper`, all with the same ``rpm``/``tpm``
(the quota, not a share of it) and each with ``fleet=RedisFleet(url, name=...)``. The
Shaper's gates then take their units from shared buckets in Redis, so N processes
together send what one would, and they share what one learns:

- **Units by lease.** A process takes a small share of the shared buckets in one round
  trip (a lease: about ``lease_period`` of its own recent rate, never more than a fair
  share of the burst) and spends it locally, without Redis, within ``lease_period``; what
  it could not spend goes back when the lease ends. Units are debited when leased and
  counted as held until their lease ends, so the fleet never over-admits, even in a
  burst; a lease granted ahead of the refill says from when it may be spent, so a
  process waits exactly that long instead of polling (see ``scripts.py``). Under
  saturation a round trip serves six requests or more.
- **Tokens settled once.** A request's token reservation comes out of the lease; its
  reconciliation with the real usage (a refund or a charge on the shared bucket) is sent
  with the next round trip, by the reservation's id, applied once however often it is
  sent (a round trip whose reply was lost is resent whole).
- **One cooldown.** A Retry-After seen by one process is published at once; the shared
  "closed until" only moves later, and every reply carries it, so the others stop within
  a lease period. Each process keeps its own cooldown gate (its probes, its reading of a
  punishing upstream): the fleet shares only the closure.
- **One retry budget**: retries against the fleet's requests over the window.
- **The upstream's word**: a process that reads ``remaining`` lowers the shared level to
  it (less what the fleet took since): one process's reading paces all.
- **Liveness**: each round trip (at least one a ``heartbeat``) registers the process;
  live processes are those seen within three heartbeats.

**When Redis fails** (an error, or no answer within ``timeout``: every call is bounded by
it), a breaker opens at once: the process spends what it still holds of its lease, then
runs local buckets at ``quota / live`` (the live count last seen; before Redis ever
counted them, the ``processes`` the fleet was told to expect), empty at first (the
shared level was unknown). A timeout whose timer our own loop ran a whole ``timeout``
late (a process busy with a spike of callers: the reply may have sat in the socket) is
not yet evidence against Redis; a second in a row is. Every ``probe_interval`` one round
trip tries Redis again; the first that succeeds re-registers the process, re-reads the
cooldown, resends the settlements not yet acknowledged, and the process is back in step.
Nothing waits on a dead Redis longer than ``timeout``. A Redis that comes back empty
(restarted) starts with full buckets: the fleet may then send up to one burst more than
its quota, once.

The Shaper does not own its fleet: enter the fleet first (``async with RedisFleet(...)``)
and close it after the Shapers that use it. Several Shapers of one process may share a
fleet only if they shape the same quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..gates import Reservation, TokenBucket
from ..hooks import logger
from ..urls import redact_url
from ..window import SlidingCount
from .lease import FleetReservation, Grant, LeasePool, SharedCount, lease_size
from .scripts import EXCHANGE, EXCHANGE_SHA, keys_for

if TYPE_CHECKING:
    from ..feedback import Feedback
    from ..gates import CooldownGate, TokenGate

__all__ = ["FleetStatistics", "RedisFleet"]

LIVE_HEARTBEATS = 3
"""A process is live while it was seen within this many heartbeats."""

FLUSH_AFTER = 0.1
"""Seconds a settlement or a reading of the upstream may wait for a round trip that goes
anyway (a lease) before one goes for it alone."""

MAX_AHEAD = 1.0
"""Seconds ahead of the refill a lease may be granted (the fleet's queue in Redis); a
longer wait is refused, and the reply says when to ask again."""

SETTLED_TTL = 300.0
"""Seconds Redis remembers a settlement's id: a resend within it is a no-op."""

KEY_TTL = 600.0
"""Seconds a quota's keys outlive their last use (an abandoned quota vanishes)."""

RETRY_SLICES = 10
"""Slices of the retry budget's window in Redis (as ``RetryBudget.BUCKETS``)."""

_COST_GAIN = 0.1
"""Weight of each request in the average tokens per request (sizes token leases)."""

_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True)
class FleetStatistics:
    """A snapshot of one process's view of its fleet.

    Attributes:
        calls: Redis round trips made by this process so far (each script call is one).
        requests: requests this process admitted through the fleet (grants).
        degraded: Redis is unreachable and the process runs on its local share.
        degraded_seconds: seconds spent degraded so far (loop clock), the current spell
            included.
        live_processes: processes of this fleet seen alive lately (1 when alone, or
            degraded without a count).
        leases: leases taken from Redis so far.
    """

    calls: int
    requests: int
    degraded: bool
    degraded_seconds: float
    live_processes: int
    leases: int


@dataclass(slots=True)
class _Attached:
    """A Shaper of this process using the fleet: its cooldown gate and its feedback."""

    cooldown: CooldownGate
    feedback: Feedback


@dataclass(slots=True)
class _Quota:
    """The fleet's quota in the script's units (per millisecond); burst 0: no quota."""

    rpm: float | None
    tpm: float | None
    requests_rate: float
    requests_burst: float
    tokens_rate: float
    tokens_burst: float


def _quota(rpm: float | None, tpm: float | None) -> _Quota:
    # The bursts are the Shaper's gates' own: one second's worth (at least one unit).
    return _Quota(
        rpm=rpm,
        tpm=tpm,
        requests_rate=0.0 if rpm is None else rpm / 60_000,
        requests_burst=0.0 if rpm is None else max(1.0, rpm / 60),
        tokens_rate=0.0 if tpm is None else tpm / 60_000,
        tokens_burst=0.0 if tpm is None else max(1.0, tpm / 60),
    )


class RedisFleet:
    """One quota shared by a fleet of processes through Redis (see the module doc).

    Args:
        url: the Redis URL (``redis://``, ``rediss://`` or ``unix://``); it may carry a
            password: it is never shown (``repr``, errors and logs redact it).
        name: the quota's name; every process sharing the quota uses the same one. Its
            keys are ``{aq:<name>}:...``.
        timeout: the longest any Redis call may take (seconds); past it the breaker opens
            (but for a call whose timer our own busy loop ran a whole ``timeout`` late:
            the next call decides).
        lease_period: how long a lease lasts (seconds): it holds about this long of the
            process's recent rate, and every reply carries the cooldown, so the fleet
            learns of one within about this long.
        heartbeat: seconds between registrations when nothing else calls Redis.
        probe_interval: seconds between attempts to reach Redis while it is away.
        processes: how many processes the fleet is expected to run: the share a process
            takes while Redis is away before Redis ever counted the live ones (a fleet
            that starts during an outage). None: such a process takes the whole quota.

    Raises:
        ValueError: a malformed URL or name, or a value out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        timeout: float = 0.05,
        lease_period: float = 0.1,
        heartbeat: float = 1.0,
        probe_interval: float = 0.25,
        processes: int | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(_SCHEMES):
            shown = redact_url(url) if isinstance(url, str) else type(url).__name__
            raise ValueError(f"A fleet needs a redis://, rediss:// or unix:// URL, not {shown!r}.")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError(
                f"name must be a non-empty string of at most 200 characters, not {name!r}."
            )
        if any(c in name for c in "{}") or not name.isprintable():
            raise ValueError(
                f"name may not contain braces or unprintable characters (it goes inside "
                f"the keys' hash tag), not {name!r}."
            )
        for label, value in (
            ("timeout", timeout),
            ("lease_period", lease_period),
            ("heartbeat", heartbeat),
            ("probe_interval", probe_interval),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{label} must be a finite number of seconds > 0, not {value!r}.")
        if processes is not None and (
            isinstance(processes, bool) or not isinstance(processes, int) or processes < 1
        ):
            raise ValueError(f"processes must be a whole number ≥ 1 or None, not {processes!r}.")
        self._url = url
        self.name = name
        self._processes = processes
        self._timeout = float(timeout)
        self._lease_period = float(lease_period)
        self._heartbeat = float(heartbeat)
        self._probe_interval = float(probe_interval)
        self._keys = keys_for(name)
        self._id = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._seq = itertools.count(1)
        self._redis: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._closed = False
        self._quota: _Quota | None = None
        self._attached: list[_Attached] = []
        self._pool = LeasePool()
        # Settlements not yet acknowledged by Redis: id → (requests, tokens, the lease
        # they come back from, if they are a lease's leftovers).
        self._pending: dict[str, tuple[float, float, str]] = {}
        self._flush_at = math.inf  # when pending settlements or readings must go
        self._publish_until = -math.inf  # a cooldown to publish (loop time)
        self._readings: list[tuple[float, float] | None] = [None, None]  # (remaining, mark)
        self._marks = (0.0, 0.0)  # the marks of the last grant settled (its reading's)
        self._retry_counts: tuple[SharedCount, SharedCount] | None = None
        self._seen_until = 0.0  # the latest shared cooldown end seen (Redis ms)
        self._live = 1
        self._counted = False  # whether Redis has told the live count yet
        self._late = False  # the last call timed out while our own loop held its timer
        self._exchanging: asyncio.Task[bool] | None = None
        self._heartbeat_due = -math.inf
        # The breaker.
        self._degraded = False
        self._degraded_since = 0.0
        self._degraded_total = 0.0
        self._next_probe = -math.inf
        self._fallback: tuple[TokenBucket | None, TokenBucket | None] | None = None
        # Counters, and what sizes the leases.
        self._calls = 0
        self._granted = 0
        self._leases = 0
        self._spent = SlidingCount(window=1.0)  # requests granted lately: sizes leases
        self._avg_cost = 0.0

    @property
    def timeout(self) -> float:
        """The longest any Redis call may take (seconds)."""
        return self._timeout

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RedisFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect and register this process (``async with`` does it). Never raises on
        an unreachable Redis: the fleet then starts degraded and keeps trying.

        Raises:
            RuntimeError: the fleet is closed, or was started on another event loop.
        """
        self._ensure_started()
        await self._exchange()

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("This RedisFleet is closed; make a new one.")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._redis = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=self._timeout,
                socket_timeout=None,  # every call is bounded by asyncio.timeout instead
                retry=Retry(NoBackoff(), 0),  # a failure opens the breaker, not a retry
                health_check_interval=0,
            )
            self._keeper = loop.create_task(self._keep(), name=f"asyncquota-fleet-{self.name}")
        elif loop is not self._loop:
            raise RuntimeError("This RedisFleet runs on another event loop; make one per loop.")

    async def aclose(self) -> None:
        """Give back what this process holds, deregister, disconnect. Idempotent.

        Bounded: the last round trip takes ``timeout`` at most, and is skipped while
        Redis is away (what the lease held is then lost to the fleet until it refills).
        """
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._exchanging is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._exchanging)
        if self._redis is not None:
            if not self._degraded:
                self._drain_pool(self._loop.time() if self._loop else 0.0)
                await self._round_trip(leaving=True)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await self._redis.aclose()
            # A Shaper still using it (it should have closed first) runs on its own share.
            self._open_breaker(None)

    # ------------------------------------------------------------------ what the Shaper calls

    def attach(
        self, *, rpm: float | None, tpm: float | None, cooldown: CooldownGate, feedback: Feedback
    ) -> None:
        """A Shaper starts using the fleet: its quota, and the cooldown gate to keep shut.

        Raises:
            ValueError: another Shaper of this process uses it with another quota.
            RuntimeError: the fleet is closed or runs on another loop.
        """
        quota = _quota(rpm, tpm)
        if self._quota is not None and (self._quota.rpm, self._quota.tpm) != (rpm, tpm):
            raise ValueError(
                f"This RedisFleet ({self.name!r}) shapes rpm={self._quota.rpm} "
                f"tpm={self._quota.tpm}; Shapers sharing one fleet must shape the same "
                f"quota (this one has rpm={rpm} tpm={tpm}). Use another fleet name."
            )
        self._ensure_started()
        self._quota = quota
        if self._degraded and self._loop is not None:
            # Attached while Redis is away: its quota's local share, not no limit at all.
            self._fallback = self._local_buckets(self._share(), self._loop.time())
        self._attached.append(_Attached(cooldown, feedback))
        self._kick.set()

    def detach(self, cooldown: CooldownGate) -> None:
        """The Shaper owning ``cooldown`` has closed."""
        self._attached = [a for a in self._attached if a.cooldown is not cooldown]

    def retry_counts(self, *, window: float) -> tuple[SharedCount, SharedCount]:
        """The fleet's request and retry counts for a ``RetryBudget`` (one pair a process).

        Raises:
            ValueError: asked for another window than before.
        """
        if self._retry_counts is None:
            self._retry_counts = (SharedCount(window=window), SharedCount(window=window))
        elif self._retry_counts[0].window != window:
            raise ValueError(
                "Shapers sharing one fleet share its retry budget's window "
                f"({self._retry_counts[0].window:g} s, not {window:g} s)."
            )
        return self._retry_counts

    def take_nowait(self, requests: int, tokens: int, now: float) -> Grant | None:
        """A grant from what this process holds, if it holds enough now; else None.

        What the Shaper's fast path asks: no round trip, no waiting.
        """
        quota = self._quota
        pool = self._pool
        if quota is None:  # no quota attached: nothing to share
            grant = Grant(requests, tokens, pooled=False, marks=pool.marks)
        else:
            r = requests if quota.requests_burst else 0
            t = tokens if quota.tokens_burst else 0
            if not r and not t:  # nothing of it is shared (no rpm, no tpm): nothing to lease
                grant = Grant(requests, tokens, pooled=False, marks=pool.marks)
            elif pool.take(r, t, now):
                grant = Grant(
                    requests,
                    tokens,
                    pooled=True,
                    marks=pool.marks,
                    lease=pool.lease_id,
                    expires_at=pool.expires_at,
                )
            elif self._degraded and self._fallback_take(r, t, now):
                grant = Grant(requests, tokens, pooled=False, marks=pool.marks)
            else:
                return None
        if requests:
            self._granted += requests
            self._spent.add(now, requests)
            if tokens:
                self._avg_cost += _COST_GAIN * (tokens - self._avg_cost)
        return grant

    async def take(self, requests: int, tokens: int) -> Grant:
        """A grant of ``requests`` request units and ``tokens`` tokens, waiting if need be.

        From the lease when it holds enough; else one round trip for a new lease (the
        old one's leftovers go back in it), then as long as the reply says; while Redis
        is away, from the local share.
        """
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            grant = self.take_nowait(requests, tokens, now)
            if grant is not None:
                return grant
            quota = self._quota
            assert quota is not None  # take_nowait grants anything without one
            r = requests if quota.requests_burst else 0
            t = tokens if quota.tokens_burst else 0
            pool = self._pool
            if self._degraded:
                # Look at Redis again no later than the next probe could bring it back.
                await asyncio.sleep(min(self._fallback_wait(r, t, now), self._probe_interval))
            elif now < pool.valid_from and pool.holds(r, t):
                await asyncio.sleep(pool.valid_from - now)  # a lease granted ahead
            elif now < pool.retry_at:
                await asyncio.sleep(pool.retry_at - now)  # the fleet's queue was full
            else:
                await self._exchange(need=(r, t), backlog=now < pool.expires_at)

    def put_back(self, grant: Grant) -> None:
        """A grant that was not used: its units go back where they came from."""
        quota = self._quota
        self._granted -= grant.requests
        if quota is None:
            return
        r = grant.requests if quota.requests_burst else 0.0
        t = grant.tokens if quota.tokens_burst else 0.0
        if not (r or t):
            return
        pool = self._pool
        if not grant.pooled:
            self._fallback_refund(r, t)
        elif grant.lease == pool.lease_id and self._loop and self._loop.time() < pool.expires_at:
            pool.put_back(r, t)
        else:  # its lease has ended: these go back on their own
            self._pending[f"{self._id}:p{next(self._seq)}"] = (-float(r), -float(t), "")
            self._due_flush()

    def bind(self, reservation: Reservation, grant: Grant, gate: TokenGate) -> Reservation:
        """The reservation a granted request carries: settling it settles the grant too."""
        return FleetReservation(reservation, gate, grant, self._settle_grant)

    def publish_cooldown(self, seconds: float) -> None:
        """This process's cooldown closed (or moved later): ``seconds`` from now.

        Sent at once; the shared closure only ever moves later.
        """
        if self._loop is None or self._closed or not seconds > 0:
            return
        self._publish_until = max(self._publish_until, self._loop.time() + seconds)
        self._kick.set()

    def observed(self, kind: str, remaining: float) -> None:
        """The upstream said ``remaining`` for ``kind`` (``"requests"`` or ``"tokens"``).

        Lowers the shared level with the next round trip (within ``FLUSH_AFTER``).
        Called right after the request's reservation was settled (the reply path
        settles, then reads the headers), so the last settled grant's marks are the
        reading's own.
        """
        index = 0 if kind == "requests" else 1
        quota = self._quota
        if quota is None or not (quota.requests_burst, quota.tokens_burst)[index]:
            return
        self._readings[index] = (float(remaining), self._marks[index])
        self._due_flush()

    async def settle(self, request_id: str, tokens: float, *, requests: float = 0.0) -> None:
        """Charge (> 0) or refund (< 0) the shared buckets, once for ``request_id``.

        A second settlement with the same id, from this process or any other, is a
        no-op (Redis remembers ids for ``SETTLED_TTL`` seconds). Sent with the next round
        trip, which this awaits (kept and resent while Redis is away).

        Raises:
            ValueError: an empty id, or an amount that is not a finite number.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, not {request_id!r}.")
        for label, value in (("tokens", tokens), ("requests", requests)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{label} must be a finite number, not {value!r}.")
        self._ensure_started()
        self._pending.setdefault(request_id, (float(requests), float(tokens), ""))
        await self._exchange()

    # ------------------------------------------------------------------ the view

    def statistics(self) -> FleetStatistics:
        """A snapshot of this process's view of the fleet."""
        degraded = self._degraded_total
        if self._degraded and self._loop is not None:
            degraded += max(0.0, self._loop.time() - self._degraded_since)
        return FleetStatistics(
            calls=self._calls,
            requests=self._granted,
            degraded=self._degraded,
            degraded_seconds=degraded,
            live_processes=self._live,
            leases=self._leases,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("degraded" if self._degraded else "ok")
        return (
            f"<RedisFleet {redact_url(self._url)} name={self.name!r} {state} "
            f"live={self._live} calls={self._calls} leases={self._leases} "
            f"requests={self._granted}>"
        )

    # ------------------------------------------------------------------ settlements

    def _settle_grant(self, grant: Grant, actual: int) -> None:
        self._marks = grant.marks
        quota = self._quota
        if quota is None or not quota.tokens_burst:
            return
        delta = actual - grant.tokens
        if not delta:
            return
        if grant.pooled:
            self._pending[f"{self._id}:r{next(self._seq)}"] = (0.0, float(delta), "")
            self._due_flush()
        elif self._fallback is not None:
            if delta > 0:
                self._fallback_charge(0, delta)
            else:
                self._fallback_refund(0, -delta)

    def _due_flush(self) -> None:
        if self._flush_at == math.inf and self._loop is not None:
            self._flush_at = self._loop.time() + FLUSH_AFTER
            self._kick.set()

    def _drain_pool(self, now: float) -> None:
        """Give back what is left of the lease (with the next round trip, by its id).

        A lease ended early, even empty, is given back too: until it ends, Redis counts
        its units as held, and refills the shared bucket only up to what it leaves.
        """
        ends = self._pool.expires_at
        lease, requests, tokens = self._pool.drain()
        if lease and (requests > 0 or tokens > 0 or now < ends):
            self._pending[f"{lease}:back"] = (-requests, -tokens, lease)

    # ------------------------------------------------------------------ round trips

    async def _keep(self) -> None:
        """The background task: heartbeats, flushes, returns of expired leases, probes."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = self._next_due()
            if due > now:
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - now):
                        await self._kick.wait()
                continue
            try:
                await self._exchange()
            except Exception:  # a bug must not stop the heartbeats: say it, go on
                logger.exception("asyncquota fleet %r: a round trip failed.", self.name)
                await asyncio.sleep(self._probe_interval)

    def _next_due(self) -> float:
        if self._degraded:
            return self._next_probe
        due = min(self._heartbeat_due, self._flush_at)
        if self._publish_until > -math.inf:
            return -math.inf
        if self._pool.leftover:
            due = min(due, self._pool.expires_at)
        return due

    async def _exchange(
        self, *, need: tuple[float, float] | None = None, backlog: bool = False
    ) -> bool:
        """One round trip, or the one under way; whether Redis answered.

        One at a time: a caller arriving while one is under way waits for it (its reply
        may be what it needed) rather than sending its own. It runs as a task of its own,
        so a caller cancelled meanwhile loses nothing: a lease granted is still pooled.
        """
        running = self._exchanging
        if running is None:
            running = asyncio.get_running_loop().create_task(self._run_exchange(need, backlog))
            self._exchanging = running
        return await asyncio.shield(running)

    async def _run_exchange(self, need: tuple[float, float] | None, backlog: bool) -> bool:
        try:
            loop = asyncio.get_running_loop()
            now = loop.time()
            pool = self._pool
            if self._closed or (self._degraded and now < self._next_probe and need is None):
                return False
            want = (0.0, 0.0)
            if need is not None and self._quota is not None:
                self._drain_pool(now)
                want = self._lease_wanted(need, now, backlog)
            elif pool.leftover and now >= pool.expires_at:
                self._drain_pool(now)
            return await self._round_trip(need=need or (0.0, 0.0), want=want)
        finally:
            if self._exchanging is asyncio.current_task():
                self._exchanging = None

    def _lease_wanted(
        self, need: tuple[float, float], now: float, backlog: bool
    ) -> tuple[float, float]:
        quota = self._quota
        assert quota is not None
        live = self._live
        want_r = 0.0
        if quota.requests_burst:
            want_r = math.ceil(
                lease_size(
                    need=need[0],
                    rate=self._spent.rate(now),
                    period=self._lease_period,
                    burst=quota.requests_burst,
                    live=live,
                    backlog=backlog,
                )
            )
        want_t = 0.0
        if quota.tokens_burst:
            # Tokens for the requests leased beyond the one needed, at the average cost.
            if quota.requests_burst:
                extra = max(0.0, want_r - need[0])
            else:
                extra = (
                    lease_size(
                        need=1.0,
                        rate=self._spent.rate(now),
                        period=self._lease_period,
                        burst=quota.tokens_burst / max(self._avg_cost, 1.0),
                        live=live,
                        backlog=backlog,
                    )
                    - 1.0
                )
            fair = quota.tokens_burst / max(1, live)
            want_t = max(need[1], min(need[1] + self._avg_cost * extra, fair))
        return (want_r, want_t)

    async def _round_trip(
        self,
        *,
        need: tuple[float, float] = (0.0, 0.0),
        want: tuple[float, float] = (0.0, 0.0),
        leaving: bool = False,
    ) -> bool:
        """Send everything pending, ask for ``want`` (at least ``need``), absorb the reply."""
        redis = self._redis
        assert redis is not None and self._loop is not None
        loop = self._loop
        quota = self._quota or _quota(None, None)
        now = sent = loop.time()
        settlements = list(self._pending.items())
        readings = list(self._readings)
        publish = max(0.0, self._publish_until - now)
        published = self._publish_until
        counts = self._retry_counts
        told = (counts[0].unsent(), counts[1].unsent()) if counts is not None else (0, 0)
        window = counts[0].window if counts is not None else 10.0
        args: list[Any] = [
            self._id,
            1 if leaving else 0,
            int(KEY_TTL * 1000),
            int(LIVE_HEARTBEATS * self._heartbeat * 1000),
            int(SETTLED_TTL * 1000),
            MAX_AHEAD * 1000,
            quota.requests_rate,
            quota.requests_burst,
            quota.tokens_rate,
            quota.tokens_burst,
            need[0],
            want[0],
            need[1],
            want[1],
            publish * 1000,
            *(_reading(readings[0])),
            *(_reading(readings[1])),
            window * 1000 / RETRY_SLICES,
            RETRY_SLICES,
            told[0],
            told[1],
            len(settlements),
            f"{self._id}:l{next(self._seq)}",
            self._lease_period * 1000,
        ]
        for settlement_id, (requests, tokens, lease) in settlements:
            args.extend((settlement_id, requests, tokens, lease))
        reply = await self._call(args)
        now = loop.time()
        if reply is None:
            if counts is not None:
                counts[0].untold(told[0])
                counts[1].untold(told[1])
            return False
        # Acknowledged: forget what was sent (not what came meanwhile).
        for settlement_id, _ in settlements:
            self._pending.pop(settlement_id, None)
        for index, reading in enumerate(readings):
            if reading is not None and self._readings[index] is reading:
                self._readings[index] = None
        if self._pending or any(r is not None for r in self._readings):
            self._flush_at = now + FLUSH_AFTER
        else:
            self._flush_at = math.inf
        if self._publish_until == published:
            self._publish_until = -math.inf
        self._absorb(reply, sent, now, want, published=publish > 0)
        return True

    async def _call(self, args: Sequence[Any]) -> list[Any] | None:
        """One script call, bounded by ``timeout``; None (and the breaker open) on failure."""
        redis = self._redis
        assert redis is not None and self._loop is not None
        keys = self._keys
        started = self._loop.time()
        try:
            async with asyncio.timeout(self._timeout):
                self._calls += 1
                try:
                    reply = await redis.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", EXCHANGE_SHA, len(keys), *keys, *args
                    )
                except NoScriptError:  # a Redis restarted, or flushed: load it again
                    self._calls += 1
                    reply = await redis.execute_command(  # type: ignore[no-untyped-call]
                        "EVAL", EXCHANGE, len(keys), *keys, *args
                    )
        except TimeoutError as exc:
            if self._loop.time() - started > 2 * self._timeout and not self._late:
                # The timer itself ran a whole timeout late: our own loop was busy (a spike
                # of callers), and the reply may have been waiting in the socket. Not yet
                # evidence against Redis: the next call decides (a second such timeout
                # in a row opens the breaker, as any failure does).
                self._late = True
                return None
            self._open_breaker(exc)
            return None
        except (RedisError, OSError) as exc:
            self._open_breaker(exc)
            return None
        except Exception as exc:  # whatever the client does, the Shaper must go on
            logger.exception("asyncquota fleet %r: the Redis client failed.", self.name)
            self._open_breaker(exc)
            return None
        self._late = False
        return list(reply)

    def _absorb(
        self,
        reply: list[Any],
        sent: float,
        now: float,
        want: tuple[float, float],
        *,
        published: bool,
    ) -> None:
        """Take in a reply: the lease, the cooldown, the live count, the fleet's counts.

        The lease is spent here within what Redis granted, whatever the round trip took:
        from the reply plus the wait (Redis counted it from before), until the call's
        start plus the wait and the lease's length (Redis ends it after).
        """
        granted_r, granted_t, wait, retry, until, remaining = (float(x) for x in reply[:6])
        live, taken_r, taken_t = int(reply[6]), float(reply[7]), float(reply[8])
        fleet_requests, fleet_retries = int(reply[9]), int(reply[10])
        if self._degraded:
            self._recover(now)
        self._live = max(1, live)
        self._counted = True
        self._heartbeat_due = now + self._heartbeat
        pool = self._pool
        if granted_r > 0 or granted_t > 0:
            pool.fill(
                _text(reply[11]),
                granted_r,
                granted_t,
                valid_from=now + wait / 1000,
                expires_at=sent + wait / 1000 + self._lease_period,
                marks=(taken_r, taken_t),
            )
            self._leases += 1
        elif want[0] > 0 or want[1] > 0:
            pool.retry_at = now + retry / 1000
        if until > self._seen_until:
            self._seen_until = until
            if remaining > 0 and not published:
                self._apply_cooldown(now + remaining / 1000, now)
        counts = self._retry_counts
        if counts is not None:
            counts[0].seen(fleet_requests, now)
            counts[1].seen(fleet_retries, now)

    def _apply_cooldown(self, until: float, now: float) -> None:
        """Another process's closure: each Shaper here holds until then.

        Held, not honoured in full, unless this Shaper knows its upstream punishes early
        sends: a probe of its own may end it, as its own Retry-After's would (a whole
        second over a bucket refilling every few ms is mostly overstatement).
        """
        from ..feedback import PROBE_FIRST

        for attached in self._attached:
            gate = attached.cooldown
            closed = gate.closed_until
            if closed is not None and closed >= until:
                continue
            if attached.feedback.punishes:
                gate.close_until(until)
            else:
                gate.hold(until, probe_at=now + PROBE_FIRST if closed is None else None)

    # ------------------------------------------------------------------ the breaker

    def _open_breaker(self, exc: BaseException | None) -> None:
        """Redis failed (``exc``; None: the fleet closed): run on this process's share."""
        assert self._loop is not None
        now = self._loop.time()
        self._next_probe = now + self._probe_interval
        if self._degraded:
            return
        self._late = False
        self._degraded = True
        self._degraded_since = now
        share = self._share()
        self._fallback = self._local_buckets(share, now)
        if exc is None:
            return
        logger.warning(
            "asyncquota fleet %r: Redis at %s failed (%s); running on this process's "
            "share (1/%d of the quota) until it answers.",
            self.name,
            redact_url(self._url),
            type(exc).__name__,
            share,
        )

    def _share(self) -> int:
        """How many processes split the quota while Redis is away: the live count Redis
        gave last; never heard from, the ``processes`` the fleet was told to expect
        (without it, this process alone: the whole quota)."""
        return max(1, self._live if self._counted else (self._processes or 1))

    def _local_buckets(
        self, share: int, now: float
    ) -> tuple[TokenBucket | None, TokenBucket | None]:
        """This process's buckets while Redis is away: ``1/share`` of the quota, empty."""
        quota = self._quota
        buckets: list[TokenBucket | None] = []
        for rate, burst in (
            (0.0, 0.0) if quota is None else (quota.requests_rate, quota.requests_burst),
            (0.0, 0.0) if quota is None else (quota.tokens_rate, quota.tokens_burst),
        ):
            if not burst:
                buckets.append(None)
                continue
            bucket = TokenBucket(rate=rate * 1000 / share, burst=max(1.0, burst / share), now=now)
            bucket.take(bucket.burst, now)  # empty: the shared level was unknown
            buckets.append(bucket)
        return buckets[0], buckets[1]

    def _recover(self, now: float) -> None:
        self._degraded = False
        self._degraded_total += max(0.0, now - self._degraded_since)
        self._fallback = None
        logger.warning(
            "asyncquota fleet %r: Redis at %s answers again after %.3f s; back in step.",
            self.name,
            redact_url(self._url),
            now - self._degraded_since,
        )

    def _fallback_take(self, requests: float, tokens: float, now: float) -> bool:
        if self._fallback_wait(requests, tokens, now) > 0:
            return False
        self._fallback_charge(requests, tokens, now)
        return True

    def _fallback_wait(self, requests: float, tokens: float, now: float) -> float:
        if self._fallback is None:
            return 0.0
        wait = 0.0
        for bucket, amount in zip(self._fallback, (requests, tokens), strict=True):
            if bucket is not None and amount:
                wait = max(wait, bucket.time_until(amount, now))
        return wait

    def _fallback_charge(self, requests: float, tokens: float, now: float | None = None) -> None:
        if self._fallback is None or self._loop is None:
            return
        at = self._loop.time() if now is None else now
        for bucket, amount in zip(self._fallback, (requests, tokens), strict=True):
            if bucket is not None and amount:
                bucket.take(amount, at)

    def _fallback_refund(self, requests: float, tokens: float) -> None:
        if self._fallback is None or self._loop is None:
            return
        now = self._loop.time()
        for bucket, amount in zip(self._fallback, (requests, tokens), strict=True):
            if bucket is not None and amount:
                bucket.refund(amount, now)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reading(reading: tuple[float, float] | None) -> tuple[float, float]:
    return (-1.0, 0.0) if reading is None else reading
