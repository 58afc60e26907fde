"""Token-bucket arithmetic under a capacity schedule: pure, synchronous, driven by ``now``.

A bucket refills at ``rate`` and holds at most ``rate * burst`` (its capacity). The schedule
multiplies the rate, and so the capacity, from given times on; when capacity drops, the
level drops with it. The level may go below zero (a debt) when refused requests are
counted against the quota.
"""

from __future__ import annotations

import bisect
import math

__all__ = ["EPSILON", "ScheduledBucket", "factor_at"]

EPSILON = 1e-9
"""Slack for float sums: a level within this of the amount asked for is enough."""


def factor_at(schedule: tuple[tuple[float, float], ...], t: float) -> float:
    """The schedule's rate factor in force at ``t`` (1.0 before the first step)."""
    i = bisect.bisect_right(schedule, t, key=lambda step: step[0])
    return schedule[i - 1][1] if i else 1.0


class ScheduledBucket:
    """A token bucket whose rate follows a schedule; every method takes ``now`` explicitly.

    Callers move it to ``now`` with :meth:`advance` before reading or changing the level;
    ``now`` never goes backwards.
    """

    __slots__ = ("_burst", "_capacities", "_rates", "_starts", "_step", "level", "updated")

    def __init__(
        self, *, rate: float, burst: float, schedule: tuple[tuple[float, float], ...] = ()
    ) -> None:
        self._burst = burst
        steps = ((0.0, 1.0), *schedule) if not schedule or schedule[0][0] > 0 else schedule
        self._starts = [t for t, _ in steps]
        self._rates = [rate * factor for _, factor in steps]
        self._capacities = [r * burst for r in self._rates]
        self._step = 0
        self.level = self._capacities[0]
        self.updated = 0.0

    def __repr__(self) -> str:
        return (
            f"<ScheduledBucket level={self.level:.3f}/{self.capacity:.3f} "
            f"rate={self.rate:g}/s at t={self.updated:.3f}>"
        )

    @property
    def rate(self) -> float:
        """The refill rate in force at the last :meth:`advance`."""
        return self._rates[self._step]

    @property
    def capacity(self) -> float:
        """The most the bucket holds at the last :meth:`advance`."""
        return self._capacities[self._step]

    def advance(self, now: float) -> None:
        """Refill up to ``now``, segment by segment across schedule steps."""
        starts = self._starts
        while self._step + 1 < len(starts) and starts[self._step + 1] <= now:
            end = starts[self._step + 1]
            self._refill(end)
            self._step += 1
            # A capacity drop takes what no longer fits away at once.
            self.level = min(self.level, self._capacities[self._step])
        self._refill(now)

    def _refill(self, until: float) -> None:
        if until > self.updated:
            capacity, rate = self._capacities[self._step], self._rates[self._step]
            if self.level < capacity:
                self.level = min(capacity, self.level + rate * (until - self.updated))
            self.updated = until

    def has(self, amount: float) -> bool:
        """True if ``amount`` can be taken now."""
        return self.level >= amount - EPSILON

    def take(self, amount: float, *, floor: float | None = None) -> None:
        """Take ``amount``; with ``floor``, the level goes no lower than it (a bounded debt)."""
        self.level -= amount
        if floor is not None and self.level < floor:
            self.level = floor

    def give_back(self, amount: float) -> None:
        """Return ``amount`` (an over-reservation), up to capacity."""
        self.level = min(self._capacities[self._step], self.level + amount)

    def time_until(self, amount: float) -> float:
        """Seconds from the last :meth:`advance` until ``amount`` fits (inf if it never does).

        Walks the schedule forward: a wait may span a capacity change, and an amount larger
        than a step's capacity waits for a step where it fits.
        """
        if self.level >= amount - EPSILON:
            return 0.0
        level, t, step = self.level, self.updated, self._step
        while True:
            rate, capacity = self._rates[step], self._capacities[step]
            end = self._starts[step + 1] if step + 1 < len(self._starts) else math.inf
            if amount <= capacity + EPSILON:
                fits_at = t + (amount - level) / rate
                # On a step's last instant the next step's capacity already holds.
                if fits_at < end:
                    return fits_at - self.updated
            if end == math.inf:
                return math.inf
            level = min(capacity, level + rate * (end - t))
            t, step = end, step + 1
            level = min(level, self._capacities[step])

    def time_to_full(self) -> float:
        """Seconds from the last :meth:`advance` until full at the current rate (the reset)."""
        return max(0.0, (self.capacity - self.level) / self.rate)
