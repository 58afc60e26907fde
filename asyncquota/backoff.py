"""How long to wait before a retry, and whether the fleet may retry at all.

Two pure functions and two pure objects, all taking ``now`` where time matters:

- ``backoff_delay``: exponential backoff with full jitter (AWS Architecture Blog,
  "Exponential Backoff And Jitter"): a uniform draw in ``[0, min(cap, base * 2**attempt))``.
  Full jitter spreads a crowd of retries across the whole interval instead of moving the
  crowd later in one piece.
- ``retry_delay``: the upstream's Retry-After when it gave one (if it is not too long),
  else ``backoff_delay``.
- ``RetryBudget``: retries may be at most a fraction of recent requests plus a small floor
  (Envoy's retry budget, gRPC's retry throttling, botocore's adaptive mode): when the
  upstream is failing, retries stop multiplying the load.
- ``RetryPolicy``: the Shaper's whole decision for a failed attempt: retryable at all,
  attempts left, ``retry_delay``, the deadline, the budget.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

from .window import SlidingCount

__all__ = ["RetryBudget", "RetryBudgetStatistics", "RetryPolicy", "backoff_delay", "retry_delay"]


def _check_number(name: str, value: float, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "greater than 0" if positive else "of at least 0"
        raise ValueError(f"{name} must be a finite number {bound}, not {value!r}.")
    return float(value)


def _ceiling(attempt: int, base: float, cap: float) -> float:
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise TypeError(f"attempt must be an integer, not {attempt!r}.")
    if attempt < 0:
        raise ValueError(f"attempt must be at least 0 (0 is the first retry), not {attempt}.")
    base = _check_number("base", base, positive=True)
    cap = _check_number("cap", cap, positive=True)
    if cap < base:
        raise ValueError(f"cap ({cap!r}) must be at least base ({base!r}).")
    # Compare exponents: 2**attempt, or even cap / base, can overflow a float.
    if attempt >= math.log2(cap) - math.log2(base):
        return cap
    return min(cap, math.ldexp(base, attempt))


def _draw(rng: random.Random | None) -> float:
    return rng.random() if rng is not None else random.random()


def backoff_delay(
    attempt: int,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """A full-jitter backoff: uniform in ``[0, min(cap, base * 2**attempt))``.

    Args:
        attempt: 0 for the first retry, 1 for the second, ... Any size: past the cap the
            ceiling stays at ``cap`` (no overflow at attempt 10 000).
        base: the ceiling of the first retry's delay, in seconds.
        cap: the largest ceiling, in seconds.
        rng: the source of randomness; default the ``random`` module's.

    Raises:
        ValueError: ``attempt`` is negative, ``base`` is not greater than 0, or ``cap`` is
            less than ``base`` (or either is not finite).
        TypeError: ``attempt`` is not an integer.
    """
    return _draw(rng) * _ceiling(attempt, base, cap)


def retry_delay(
    attempt: int,
    *,
    retry_after: float | None,
    max_retry_after: float,
    base: float = 0.5,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float | None:
    """How long to wait before retry number ``attempt``, or None if it is not worth it.

    With a Retry-After from the upstream: honour it, plus a jitter in ``[0, base)`` so
    retries told the same time do not land on the same instant, unless it is longer than
    ``max_retry_after``: then None, meaning "too long to wait here: give up, or tell the
    caller when to come back". A Retry-After in the past (a stale HTTP date) counts as 0.
    Without one: ``backoff_delay(attempt, base=base, cap=cap, rng=rng)``.

    Args:
        attempt: 0 for the first retry.
        retry_after: seconds the upstream asked to wait, or None if it did not say.
        max_retry_after: the longest Retry-After worth waiting for here, in seconds.
        base, cap, rng: as for ``backoff_delay``; ``base`` also bounds the jitter.

    Raises:
        ValueError: as for ``backoff_delay``; ``max_retry_after`` negative; ``retry_after``
            not finite.
        TypeError: as for ``backoff_delay``.
    """
    ceiling = _ceiling(attempt, base, cap)
    max_retry_after = _check_number("max_retry_after", max_retry_after, positive=False)
    if retry_after is None:
        return _draw(rng) * ceiling
    if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
        raise TypeError(f"retry_after must be a number, not {type(retry_after).__name__}.")
    if not math.isfinite(retry_after):
        raise ValueError(f"retry_after must be a finite number of seconds, not {retry_after!r}.")
    wait = max(0.0, float(retry_after))
    if wait > max_retry_after:
        return None
    return wait + _draw(rng) * base


class Count(Protocol):
    """Events over a sliding window: a ``SlidingCount``, or a fleet's shared one."""

    @property
    def counted(self) -> int: ...

    def add(self, now: float, n: int = 1) -> None: ...

    def total(self, now: float) -> int: ...


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a ``RetryBudget``.

    Attributes:
        requests: requests recorded in the current window.
        retries: retries spent in the current window.
        available: retries that may still be spent now.
        denied: retries refused since the budget was made.
    """

    requests: int
    retries: int
    available: float
    denied: int


class RetryBudget:
    """Retries at most ``ratio`` of recent requests, plus a floor: one budget for the fleet.

    Over the last ``window`` seconds, retries may number at most
    ``ratio * requests + min_per_second * window``. The floor keeps a quiet client able to
    retry at all; the ratio keeps a failing upstream from being hit by retries on top of
    every request. Count every first attempt with ``record_request``; ask
    ``try_spend`` before each retry (it records the retry when it says yes).

    The window slides in ``BUCKETS`` fixed slices of ``window / BUCKETS`` seconds: a
    count leaves the window as a whole slice, at most one slice late. Each call costs
    O(1) (amortised: it clears the slices that have expired since the last call, at most
    ``BUCKETS``), and memory is fixed. Pure: every method takes ``now``, and time that runs
    backwards is treated as standing still.

    Args:
        ratio: retries allowed per request in the window (0.1: one retry per ten requests).
        min_per_second: retries per second always allowed, whatever the traffic.
        window: the span, in seconds, over which requests and retries are counted.
        counts: the request and retry counts, when they are shared (a fleet's, over
            ``window``: ``RedisFleet.retry_counts``): the ratio and the floor then hold
            for the whole fleet. Default: this process's own.

    Raises:
        ValueError: ``ratio`` or ``min_per_second`` negative, or ``window`` not greater than
            0 (or any of them not finite).
    """

    BUCKETS = 10
    """Slices the window is cut into."""

    __slots__ = ("_denied", "_floor", "_ratio", "_requests", "_retries", "_window")

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        min_per_second: float = 1.0,
        window: float = 10.0,
        counts: tuple[Count, Count] | None = None,
    ) -> None:
        self._ratio = _check_number("ratio", ratio, positive=False)
        floor_rate = _check_number("min_per_second", min_per_second, positive=False)
        self._window = _check_number("window", window, positive=True)
        self._floor = floor_rate * self._window
        self._requests: Count
        self._retries: Count
        if counts is not None:
            self._requests, self._retries = counts
        else:
            self._requests = SlidingCount(window=self._window, slices=self.BUCKETS)
            self._retries = SlidingCount(window=self._window, slices=self.BUCKETS)
        self._denied = 0

    def record_request(self, now: float) -> None:
        """Count one request (a first attempt, not a retry) at ``now``."""
        self._requests.add(now)

    def try_spend(self, now: float) -> bool:
        """Spend one retry if the budget allows it at ``now``; say whether it did."""
        if self._retries.total(now) + 1 > self._allowed(now):
            self._denied += 1
            return False
        self._retries.add(now)
        return True

    def available(self, now: float) -> float:
        """How many retries may be spent at ``now`` (may be fractional)."""
        return max(0.0, self._allowed(now) - self._retries.total(now))

    def statistics(self, now: float) -> RetryBudgetStatistics:
        """A snapshot at ``now``."""
        available = self.available(now)
        return RetryBudgetStatistics(
            requests=self._requests.total(now),
            retries=self._retries.total(now),
            available=available,
            denied=self._denied,
        )

    def _allowed(self, now: float) -> float:
        return self._ratio * self._requests.total(now) + self._floor

    def __repr__(self) -> str:
        return (
            f"<RetryBudget ratio={self._ratio:g} floor={self._floor:g}/{self._window:g}s "
            f"requests={self._requests.counted} retries={self._retries.counted} "
            f"denied={self._denied}>"
        )


class RetryPolicy:
    """Whether a failed attempt is tried again, and after how long.

    A request is retried while it has attempts left, the wait is not longer than
    ``max_retry_after``, it would be ready before its deadline, and the fleet's retry
    budget has a retry to spend (asked last, so that only retries that happen spend).

    Args:
        max_attempts: attempts per request, the first included.
        max_retry_after: the longest Retry-After worth waiting for (seconds).
        budget: the fleet-wide retry budget.
        rng: the jitter's source (seeded for reproducible runs).
    """

    __slots__ = ("_budget", "_max_attempts", "_max_retry_after", "_rng")

    def __init__(
        self,
        *,
        max_attempts: int,
        max_retry_after: float,
        budget: RetryBudget,
        rng: random.Random | None = None,
    ) -> None:
        self._max_attempts = max_attempts
        self._max_retry_after = _check_number("max_retry_after", max_retry_after, positive=False)
        self._budget = budget
        self._rng = rng

    def record_request(self, now: float) -> None:
        """Count a new request (its first attempt) in the budget."""
        self._budget.record_request(now)

    def delay(
        self,
        attempt: int,
        *,
        retryable: bool,
        retry_after: float | None,
        held: bool,
        deadline: float | None,
        now: float,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None: the request ends.

        Args:
            attempt: the attempt that failed (1 for the first).
            retryable: whether its failure may be retried at all.
            retry_after: the wait the upstream asked for, if it did.
            held: the fleet-wide cooldown holds every request for ``retry_after`` (a
                congestion reply): the request goes back in line at once and waits
                there, ready when the cooldown opens. Any other reply's Retry-After (a
                500's, a 503 from a proxy) is this request's own wait, jittered.
            deadline: the loop time the request must end by, if any.
            now: the loop time.
        """
        if not retryable or attempt >= self._max_attempts:
            return None
        if held and retry_after is not None:
            if retry_after > self._max_retry_after:
                return None
            delay, ready = 0.0, now + retry_after
        else:
            wait = retry_delay(
                attempt - 1,
                retry_after=retry_after,
                max_retry_after=self._max_retry_after,
                rng=self._rng,
            )
            if wait is None:
                return None
            delay, ready = wait, now + wait
        if deadline is not None and ready >= deadline:
            return None
        if not self._budget.try_spend(now):
            return None
        return delay
