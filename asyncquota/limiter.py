"""The concurrency limiter: admission to the upstream, one permit per request in flight.

Think of a cloakroom with a number of hooks the manager keeps changing: a caller takes a
ticket (a ``Permit``) when a hook is free, or queues for one, first come first served. When
the request finishes, the caller hands the ticket back and says how it went: ``success()``
(a round-trip sample), ``dropped()`` (a congestion signal: 429, 503/529, timeout) or
``ignore()`` (nothing learned: the caller cancelled, or a 400). The limiter hands that
outcome to its ``Limit`` algorithm and takes the answer as its new capacity.

The limiter does not order work by priority (the queue in front of it does) and does not
wait on rates or cooldowns (the other gates do). A shrinking capacity never revokes a
permit in flight; it only admits nobody until fewer than ``capacity`` are in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from .errors import WouldBlock
from .limits import AIMD, Fixed, Limit

__all__ = ["ConcurrencyLimiter", "Ending", "LimiterStatistics", "Permit", "WouldBlock"]

Ending = Literal["success", "dropped", "ignore"]
"""How a permit ended: a round-trip sample, a congestion signal, or nothing learned."""

_RAMP_SLACK = 1e-6
"""A timer firing this early (clock resolution) counts as on time."""

_RAMP_STEP = 0.001
"""The finest step of a spread growth, seconds: one new slot at a time, at most one a
millisecond. Slots handed out several at a time go out as sends at one instant, and the
first one's refusal cannot stop the others: on an upstream that extends its Retry-After
window for every send inside it, each costs a second. A growth too large for its spread
at this step takes longer than the spread."""




@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a ``ConcurrencyLimiter``.

    Attributes:
        capacity: how many permits may be in flight now.
        inflight: how many permits are held and not yet ended.
        waiting: how many callers wait in ``acquire()``.
        succeeded: permits ended with ``success()``.
        ignored: permits ended with ``ignore()``.
        dropped: permits ended with ``dropped()``.
    """

    capacity: int
    inflight: int
    waiting: int
    succeeded: int
    ignored: int
    dropped: int


class ConcurrencyLimiter:
    """A FIFO limiter whose capacity follows a ``Limit`` algorithm.

    Waiters are futures in a deque, so nobody keeps a task alive just to wait. A slot is
    handed to the head waiter at the moment it frees (it is counted in flight from then),
    so whenever anyone waits the limiter is full, and a newcomer cannot barge past the
    queue. A waiter cancelled before its turn stays in the deque and is skipped when
    reached; one cancelled just after its grant gives the slot straight to the next waiter.

    Args:
        limit: the algorithm that sets the capacity, an integer for a ``Fixed`` limit, or
            None for a fresh ``AIMD()`` (429-driven, the right default for LLM APIs).
        ceiling: a capacity never exceeded whatever the algorithm says (a connection
            pool's size: more in flight would only wait inside the pool).

    Raises:
        ValueError: an integer limit or a ceiling below 1.
    """

    __slots__ = (
        "_capacity",
        "_ceiling",
        "_dropped",
        "_ignored",
        "_inflight",
        "_limit",
        "_ramp",
        "_succeeded",
        "_timer",
        "_waiters",
        "_waiting",
    )

    def __init__(self, limit: Limit | int | None = None, *, ceiling: int | None = None) -> None:
        if limit is None:
            limit = AIMD()
        if ceiling is not None and (
            isinstance(ceiling, bool) or not isinstance(ceiling, int) or ceiling < 1
        ):
            raise ValueError(f"The ceiling must be an integer of at least 1, not {ceiling!r}.")
        self._ceiling = ceiling
        self._limit: Limit = Fixed(limit) if isinstance(limit, int) else limit
        self._capacity = 1
        self._resize(self._limit.limit)
        self._inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._waiting = 0
        self._succeeded = 0
        self._ignored = 0
        self._dropped = 0
        self._ramp: tuple[float, float] | None = None  # (step, when the next slot is due)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def limit(self) -> Limit:
        """The algorithm that sets the capacity after every sample."""
        return self._limit

    @property
    def capacity(self) -> int:
        """How many permits may be in flight; assigning more wakes waiters at once.

        Raises:
            ValueError: on assignment, a value that is not an integer of at least 1.
        """
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._resize(value)
        self._wake()

    @property
    def inflight(self) -> int:
        """How many permits are held and not yet ended."""
        return self._inflight

    @property
    def returned(self) -> int:
        """How many permits have ended, whatever their outcome."""
        return self._succeeded + self._dropped + self._ignored

    def acquire_nowait(self) -> Permit:
        """Take a permit at once, or refuse; needs a running event loop (for the timestamp).

        Raises:
            WouldBlock: the limiter is full.
        """
        if self._inflight >= self._capacity:
            raise WouldBlock(
                f"No permit is free: {self._inflight} in flight of {self._capacity}, "
                f"{self._waiting} waiting."
            )
        self._inflight += 1
        return Permit(self, asyncio.get_running_loop())

    async def acquire(self) -> Permit:
        """Wait for a permit, first come first served; cancellation returns nothing held."""
        loop = asyncio.get_running_loop()
        if self._inflight < self._capacity:
            self._inflight += 1
            return Permit(self, loop)
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._waiting += 1
        if self._ramp is not None and self._timer is None:
            self._tick()  # a growth that waited for someone to take it goes on
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                self._waiting -= 1
            else:
                # Granted, then cancelled before it could run: the slot is already counted
                # in flight, so pass it on rather than lose it.
                self._inflight -= 1
            # Also sweeps the deque once its last live waiter has gone.
            self._wake()
            raise
        return Permit(self, loop)

    def stalled(self, now: float, *, spread: float = 0.0) -> None:
        """Tell the limit that the limiter has been full a while with nothing coming back.

        A limit that grows on time (``AIMD.on_stall``) may grow; others ignore it. With
        ``spread`` the new slots are handed out evenly over that many seconds rather than
        at once: a growth made on time, with no reply to clock it, is a guess, and a burst
        of it into an upstream that cannot take it would come back as a burst of 429s
        (worse: an upstream that punishes sends inside its Retry-After window counts
        every one of them). Spread, the first refusal, which comes back at once even
        when replies take half a minute, stops it after a few sends.
        """
        grow = getattr(self._limit, "on_stall", None)
        if grow is None:
            return
        capacity = grow(now, self._inflight)
        if capacity > self._capacity and spread > 0:
            step = max(spread / (capacity - self._capacity), _RAMP_STEP)
            self._ramp = (step, now)
            self._tick()
        elif capacity != self._capacity:
            self._resize(capacity)
            self._wake()

    def _ramped(self, capacity: int) -> int:
        """``capacity`` as far as a growth being spread (``stalled``) lets it be now."""
        if self._ramp is None:
            return capacity
        if capacity <= self._capacity:  # cut, or no growth left to spread
            self._ramp = None
            return capacity
        return self._capacity

    def _tick(self) -> None:
        """One step of a spread growth: one more slot, if someone waits for it.

        A slot handed out with nobody to take it (the dispatcher held by the cooldown or
        the rate) would pile up with the next ones and go out as a burst when it is
        let go: the growth waits for a waiter instead (``acquire`` resumes it).
        """
        self._timer = None
        ramp = self._ramp
        if ramp is None:
            return
        step, due = ramp
        target = self._limit.limit
        if self._ceiling is not None:
            target = min(target, self._ceiling)
        if self._capacity >= target:
            self._ramp = None
            return
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now + _RAMP_SLACK >= due:
            self._resize(self._capacity + 1)
            self._wake()
            if self._capacity >= target:
                self._ramp = None
                return
            due = now + step
            self._ramp = (step, due)
        self._timer = loop.call_at(due, self._tick)

    def statistics(self) -> LimiterStatistics:
        """A snapshot of the capacity, the live counts and the outcome counters."""
        return LimiterStatistics(
            capacity=self._capacity,
            inflight=self._inflight,
            waiting=self._waiting,
            succeeded=self._succeeded,
            ignored=self._ignored,
            dropped=self._dropped,
        )

    def _resize(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"The capacity must be an integer of at least 1, not {value!r}.")
        ceiling = self._ceiling
        self._capacity = value if ceiling is None or value <= ceiling else ceiling

    def _wake(self) -> None:
        """Hand free slots to the waiters at the head of the queue, skipping cancelled ones."""
        waiters = self._waiters
        if not self._waiting:
            # Only cancelled waiters are left: drop them all instead of one by one later.
            waiters.clear()
            return
        # A waiter cancelled a moment ago is done but still counted until its task runs,
        # so the deque, not the count, says when to stop.
        while waiters and self._inflight < self._capacity:
            waiter = waiters.popleft()
            if waiter.done():
                continue
            waiter.set_result(None)
            self._waiting -= 1
            self._inflight += 1

    def _release(self, permit: Permit, outcome: Ending, *, crowd: bool = False) -> None:
        """End a permit: free its slot, count the outcome, feed the limit, wake waiters.

        ``crowd``: a drop that named too many in flight, told to a limit that has
        ``on_crowd`` (``AIMD``) instead of ``on_sample``.
        """
        inflight = self._inflight
        self._inflight = inflight - 1
        try:
            if outcome == "ignore":
                self._ignored += 1
                return
            dropped = outcome == "dropped"
            if dropped:
                self._dropped += 1
            else:
                self._succeeded += 1
            now = permit._loop.time()
            rtt = now - permit.acquired_at
            on_crowd = getattr(self._limit, "on_crowd", None) if crowd else None
            if on_crowd is not None:
                capacity = on_crowd(now, rtt, inflight)
            else:
                capacity = self._limit.on_sample(now, rtt, inflight, dropped)
            if self._ramp is not None:  # a growth being spread (rare: no call otherwise)
                capacity = self._ramped(capacity)
            if capacity != self._capacity:
                self._resize(capacity)
        finally:
            if self._waiters:  # else nobody to wake and nothing to sweep
                self._wake()

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyLimiter capacity={self._capacity} inflight={self._inflight} "
            f"waiting={self._waiting}>"
        )


class Permit:
    """Leave to send one request; it ends in exactly one of ``success``, ``dropped`` (or
    ``crowded``), ``ignore``.

    Also a context manager (``with permit:`` or ``async with await limiter.acquire() as
    permit:``): a block that ends without an explicit outcome counts as ``success()``
    when it exits normally and as ``ignore()`` when it raises. A 429 inside the block
    should call ``dropped()`` before raising.

    Attributes:
        acquired_at: the event-loop time at which the permit was granted.
    """

    __slots__ = ("_limiter", "_loop", "_outcome", "acquired_at")

    def __init__(self, limiter: ConcurrencyLimiter, loop: asyncio.AbstractEventLoop) -> None:
        self._limiter = limiter
        self._loop = loop
        self._outcome: Ending | None = None
        self.acquired_at = loop.time()

    @property
    def outcome(self) -> Ending | None:
        """How the permit ended (``"success"``, ``"dropped"``, ``"ignore"``), or None if held."""
        return self._outcome

    def success(self) -> None:
        """End with a round-trip sample: the request got a reply that was not a congestion signal.

        Raises:
            RuntimeError: the permit has already ended.
        """
        self._end("success")

    def dropped(self) -> None:
        """End with a congestion signal: a 429, an overload (503/529) or a timeout.

        Raises:
            RuntimeError: the permit has already ended.
        """
        self._end("dropped")

    def crowded(self) -> None:
        """End with a refusal that names too many in flight (a concurrency cap's 429).

        A congestion signal, as ``dropped`` (its ``outcome`` is ``"dropped"``), and one
        that is no chance: a limit with ``on_crowd`` (``AIMD``) cuts at once, beyond the
        tolerance it keeps for sporadic failures.

        Raises:
            RuntimeError: the permit has already ended.
        """
        self._end("dropped", crowd=True)

    def ignore(self) -> None:
        """End without teaching the limit anything: cancelled, or an error such as a 400.

        Raises:
            RuntimeError: the permit has already ended.
        """
        self._end("ignore")

    def _end(self, outcome: Ending, *, crowd: bool = False) -> None:
        if self._outcome is not None:
            raise RuntimeError(
                f"This permit already ended with {self._outcome}(); a permit ends exactly once, "
                f"so {'crowded' if crowd else outcome}() is refused."
            )
        self._outcome = outcome
        self._limiter._release(self, outcome, crowd=crowd)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._outcome is None:
            self._end("success" if exc_type is None else "ignore")

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        state = self._outcome or "held"
        return f"<Permit acquired_at={self.acquired_at:.3f} {state}>"
