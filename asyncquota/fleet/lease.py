"""What one process holds of the fleet's quota: its lease, its grants, its shared counts.

Pure parts, no Redis and no waiting (``client.py`` does the talking):

- :class:`LeasePool`: the units this process took from the shared buckets in its last
  exchange, spendable from ``valid_from`` until ``expires_at``, after which what is left
  goes back. Units are debited in Redis when they are leased, so the pool never needs
  Redis to spend one: that is how a request costs a fraction of a round trip.
- :func:`lease_size`: how much to ask for.
- :class:`Grant`: one request's share (a request unit and its tokens) and where it
  came from: the pool (owed to Redis) or the local fallback (while Redis is away).
- :class:`FleetReservation`: a token reservation whose settlement is also the fleet's.
- :class:`SharedCount`: a retry-budget count that adds the rest of the fleet's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..gates import Reservation
from ..sharing import Grant
from ..window import SlidingCount

if TYPE_CHECKING:
    from ..gates import TokenGate

__all__ = [
    "LEASE_MIN_UNITS",
    "FleetReservation",
    "Grant",
    "LeasePool",
    "SharedCount",
    "lease_size",
]

LEASE_MIN_UNITS = 6
"""Requests a lease holds at least while this process has more demand than its lease (a
backlog), the fair cap permitting: a round trip per six requests or fewer under
saturation (the target is 0.2), whatever this process's share of the rate."""


def lease_size(
    *, need: float, rate: float, period: float, burst: float, live: int, backlog: bool
) -> float:
    """How many units to lease: about ``period`` seconds of this process's recent rate.

    Never more than a fair share of the bucket's burst (``burst / live``: a lease is
    taken from what every process could send at once, and one process must not hold it
    all), never less than ``need``. With a backlog, at least ``LEASE_MIN_UNITS``: the
    process shows it could spend more, and a lease sized from a rate the fleet held down
    would stay one round trip per request.
    """
    size = rate * period
    if backlog:
        size = max(size, LEASE_MIN_UNITS)
    fair = burst / max(1, live)
    return max(need, min(size, fair))


class LeasePool:
    """The units of this process's current lease (pure: methods take ``now``).

    A lease is spendable in ``[valid_from, expires_at)``: it may start later than the
    reply that granted it (granted ahead of the refill), and it ends a short while later,
    so units a process cannot use go back to the others. ``lease_id`` is its name in
    Redis. ``retry_at`` is when to ask again after a refusal (the shared buckets were
    further in debt than one may wait).
    """

    __slots__ = (
        "expires_at",
        "lease_id",
        "marks",
        "requests",
        "retry_at",
        "tokens",
        "valid_from",
    )

    def __init__(self) -> None:
        self.requests = 0.0
        self.tokens = 0.0
        self.valid_from = -math.inf
        self.expires_at = -math.inf
        self.retry_at = -math.inf
        self.lease_id = ""
        self.marks = (0.0, 0.0)

    def fill(
        self,
        lease_id: str,
        requests: float,
        tokens: float,
        *,
        valid_from: float,
        expires_at: float,
        marks: tuple[float, float],
    ) -> None:
        """Hold a new lease (the old one must have been emptied by ``drain``)."""
        self.lease_id = lease_id
        self.requests = requests
        self.tokens = tokens
        self.valid_from = valid_from
        self.expires_at = expires_at
        self.marks = marks

    def drain(self) -> tuple[str, float, float]:
        """Empty the pool: its lease id and what is left of it, to give back."""
        left = (self.lease_id, self.requests, self.tokens)
        self.requests = self.tokens = 0.0
        self.lease_id = ""
        self.expires_at = -math.inf
        return left

    def holds(self, requests: float, tokens: float) -> bool:
        """Whether the lease has this much left (spendable now or when it starts)."""
        return self.requests >= requests and self.tokens >= tokens

    def take(self, requests: float, tokens: float, now: float) -> bool:
        """Spend this much if the lease is in its window and holds it; say whether."""
        if not (self.valid_from <= now < self.expires_at) or not self.holds(requests, tokens):
            return False
        self.requests -= requests
        self.tokens -= tokens
        return True

    def put_back(self, requests: float, tokens: float) -> None:
        """Units taken and not spent come back (they were debited in Redis all the same)."""
        self.requests += requests
        self.tokens += tokens

    @property
    def leftover(self) -> bool:
        """Whether anything is left to give back."""
        return self.requests > 0 or self.tokens > 0

    def __repr__(self) -> str:
        return (
            f"<LeasePool requests={self.requests:g} tokens={self.tokens:g} "
            f"valid={self.valid_from:.3f}..{self.expires_at:.3f}>"
        )


class FleetReservation(Reservation):
    """A token reservation backed by a fleet grant: settling it settles the fleet's too.

    The Shaper's own ``TokenGate`` reservation (``inner``) is reconciled as ever; then
    the difference between the usage and the tokens the grant took from the fleet is
    handed to ``settled`` (a refund or a charge on the shared bucket, applied once by the
    reservation's id). Ending it twice raises, as any reservation does.
    """

    __slots__ = ("_inner", "_on_settle", "grant")

    def __init__(
        self,
        inner: Reservation,
        gate: TokenGate,
        grant: Grant,
        on_settle: Callable[[Grant, int], None],
    ) -> None:
        super().__init__(gate, inner.estimate)
        self._inner = inner
        self.grant = grant
        self._on_settle = on_settle

    def reconcile(self, actual: int) -> None:
        """Settle with the real usage, here and in the fleet (see ``Reservation``)."""
        self._inner.reconcile(actual)
        self._ended = True
        self._actual = actual
        self._on_settle(self.grant, actual)

    def cancel(self) -> None:
        """Give every reserved token back, here and to the fleet: nothing was sent."""
        self._inner.cancel()
        self._ended = True
        self._on_settle(self.grant, 0)


class SharedCount:
    """A count over a sliding window: this process's own, plus the rest of the fleet's.

    The fleet's total comes back with each exchange; what the others counted is that
    total less what this process had sent of its own. Between exchanges the others' part
    stands still; a view older than the window (Redis away) counts for nothing.
    """

    __slots__ = ("_others", "_own", "_seen_at", "_unsent")

    def __init__(self, *, window: float) -> None:
        self._own = SlidingCount(window=window)
        self._unsent = 0  # counted here, not yet told to the fleet
        self._others = 0
        self._seen_at = -math.inf

    @property
    def window(self) -> float:
        """The span counted, in seconds."""
        return self._own.window

    def add(self, now: float, n: int = 1) -> None:
        """Count ``n`` events at ``now``."""
        self._own.add(now, n)
        self._unsent += n

    def total(self, now: float) -> int:
        """The fleet's count over the window ending at ``now``, as known here."""
        others = self._others if now - self._seen_at < self._own.window else 0
        return self._own.total(now) + others

    @property
    def counted(self) -> int:
        """The total as of the last call (for ``repr``)."""
        return self._own.counted + self._others

    def unsent(self) -> int:
        """What to tell the fleet now; it counts as told (see ``untold``)."""
        n, self._unsent = self._unsent, 0
        return n

    def untold(self, n: int) -> None:
        """An exchange failed: ``n`` counts are still to be told."""
        self._unsent += n

    def seen(self, fleet_total: int, now: float) -> None:
        """The fleet's total as an exchange just read it (ours told so far included)."""
        told = self._own.total(now) - self._unsent
        self._others = max(0, fleet_total - told)
        self._seen_at = now

    def __repr__(self) -> str:
        return f"<SharedCount own={self._own.counted} others={self._others}>"
