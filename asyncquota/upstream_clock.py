"""The upstream's clock, learnt from its ``Date`` headers to within an exchange's time.

An upstream states instants on its own clock: an HTTP-date Retry-After, Anthropic's RFC
3339 resets. They are read against the reply's ``Date``, which puts right a clock that is
seconds off ours. But a ``Date`` is the upstream's time *truncated to the second*
(RFC 9110 §6.6.1; aiohttp and nginx send it so): read as the reply's time it is up to a
second early, and every instant read against it up to a second late. Two refusals of one
window, each rounded up to its second and each read against its own truncated ``Date``,
can then state ends two seconds apart with nothing moved; and "the window grew while we
knocked" is how an upstream that punishes early sends is told (``Feedback``).

Each exchange bounds the offset between the upstream's clock and ours. Its ``Date`` was
taken somewhere between our send and the reply's arrival, and names the second it was
taken in::

    Date - arrival  <=  offset  <  Date + 1 - send

Replies land at every phase of the upstream's second, so the bounds close in to about one
exchange's time within a second or two of traffic. A reply the bounds cannot hold (a clock
stepped, on either side) starts them again from its own.

Pure but for the wall clock it is given; nothing here waits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .signals import parse_http_date

__all__ = ["UpstreamClock"]


class UpstreamClock:
    """The upstream's time at a reply, from its ``Date`` header and our wall clock.

    Args:
        wall_clock: our Unix time (``time.time`` in production, a virtual clock in tests).
    """

    __slots__ = ("_date", "_high", "_low", "_wall_clock", "uncertainty")

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._wall_clock = wall_clock
        self._low = -math.inf  # the upstream's clock less ours, at least...
        self._high = math.inf  # ...and less than this
        self._date: tuple[str, float | None] = ("", None)  # the last Date text, parsed
        self.uncertainty = 0.0
        """Seconds by which the last reading may be early (0 with no ``Date``: our own
        clock, read exactly)."""

    def read(self, date: str | None, elapsed: float) -> float:
        """The upstream's Unix time now, for a reply carrying ``date`` (its ``Date``).

        ``elapsed``: seconds since the request went out. Without a readable ``Date``, our
        own wall clock. Otherwise the earliest time the replies so far allow, never later
        than the upstream's (so a date read against it is never read early), and at most
        ``uncertainty`` seconds earlier.
        """
        wall = self._wall_clock()
        stamped = self._parse(date) if date else None
        if stamped is None:
            self.uncertainty = 0.0
            return wall
        low = stamped - wall
        high = stamped + 1.0 - (wall - max(0.0, elapsed))
        if low >= self._high or high <= self._low:
            # Nothing the earlier replies allow: a clock stepped. Start again from this one.
            self._low, self._high = low, high
        else:
            if low > self._low:
                self._low = low
            if high < self._high:
                self._high = high
        self.uncertainty = min(1.0, self._high - self._low)
        return wall + self._low

    def _parse(self, date: str) -> float | None:
        # Replies within one second share a Date: parse each text once.
        text, parsed = self._date
        if date != text:
            parsed = parse_http_date(date)
            if parsed is not None and not math.isfinite(parsed):
                parsed = None
            self._date = (date, parsed)
        return parsed

    def __repr__(self) -> str:
        return f"<UpstreamClock offset in [{self._low:.3f}, {self._high:.3f}) s>"
