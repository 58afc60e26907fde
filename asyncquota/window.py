"""A count of events over the last few seconds, in fixed slices: O(1) per call, fixed memory.

Used for "how many requests lately" wherever a rate is needed: the retry budget (retries
per recent request) and the shaper's service rate (how fast the queue drains, which is how
it knows early that a newcomer cannot be served before its deadline).
"""

from __future__ import annotations

import math

__all__ = ["SlidingCount"]


class SlidingCount:
    """Events counted over the last ``window`` seconds, in ``slices`` fixed slices.

    A count leaves the window as a whole slice, at most one slice (``window / slices``
    seconds) late. Pure: every method takes ``now``; time running backwards is treated as
    standing still.

    Raises:
        ValueError: ``window`` not a finite number greater than 0, or ``slices`` < 1.
    """

    __slots__ = ("_counts", "_epoch", "_slices", "_total", "_width", "window")

    def __init__(self, *, window: float, slices: int = 10) -> None:
        if not (isinstance(window, int | float) and math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a finite number of seconds > 0, not {window!r}.")
        if not isinstance(slices, int) or slices < 1:
            raise ValueError(f"slices must be an integer of at least 1, not {slices!r}.")
        self.window = float(window)
        self._slices = slices
        self._width = self.window / slices
        self._counts = [0] * slices
        self._total = 0
        self._epoch: int | None = None

    def add(self, now: float, n: int = 1) -> None:
        """Count ``n`` events at ``now``."""
        epoch = math.floor(now / self._width)
        # Usually still in the newest slice; else _advance first: it may replace the counts.
        index = epoch % self._slices if epoch == self._epoch else self._advance(now)
        self._counts[index] += n
        self._total += n

    def total(self, now: float) -> int:
        """Events counted in the window ending at ``now``."""
        self._advance(now)
        return self._total

    def rate(self, now: float) -> float:
        """Events per second over the window ending at ``now``."""
        return self.total(now) / self.window

    @property
    def counted(self) -> int:
        """The total as of the last call (no time passes: for ``repr`` and logs)."""
        return self._total

    def _advance(self, now: float) -> int:
        epoch = math.floor(now / self._width)
        last = self._epoch
        if last is None or epoch - last >= self._slices:
            self._counts = [0] * self._slices
            self._total = 0
        elif epoch > last:
            for expired in range(last + 1, epoch + 1):
                index = expired % self._slices
                self._total -= self._counts[index]
                self._counts[index] = 0
        else:
            epoch = last
        self._epoch = epoch
        return epoch % self._slices

    def __repr__(self) -> str:
        return f"<SlidingCount total={self._total} window={self.window:g}s>"
