"""What the Shaper asks of a fleet it shares its quota with, as a Protocol.

The one fleet there is, :class:`asyncquota.fleet.RedisFleet`, needs redis-py (the extra
``redis``); the core must import without it. So the Shaper, the dispatcher and the
feedback know a fleet only by this interface, which names no Redis: where their units
come from (``take_nowait``, ``take``, ``put_back``, ``bind``), what they tell the others
(``publish_cooldown``, ``observed``), the shared retry counts, and the Shaper's start
and end (``attach``, ``detach``). See ``asyncquota.fleet.client`` for what each does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .backoff import Count
    from .gates import CooldownGate, Reservation, TokenGate

__all__ = ["Fleet", "Grant", "Learnt"]


class Grant:
    """One request's share of the quota: a request unit (or none) and its tokens.

    ``pooled``: taken from the lease ``lease`` (debited in Redis: a settlement goes to
    Redis); else from the local fallback buckets while Redis was away (settled locally).
    It must be spent before ``expires_at``, its lease's end: after it Redis no longer
    counts the lease's units as held (see ``scripts.py``), and a late send could go
    beyond the burst. ``marks``: the shared buckets' ``taken`` counters when its lease
    was granted, so a reading of the upstream's headers for this request knows what the
    fleet took since.
    """

    __slots__ = ("expires_at", "lease", "marks", "pooled", "requests", "tokens")

    def __init__(
        self,
        requests: int,
        tokens: int,
        *,
        pooled: bool,
        marks: tuple[float, float],
        lease: str = "",
        expires_at: float = math.inf,
    ) -> None:
        self.requests = requests
        self.tokens = tokens
        self.pooled = pooled
        self.marks = marks
        self.lease = lease
        self.expires_at = expires_at

    def __repr__(self) -> str:
        source = "pool" if self.pooled else "local"
        return f"<Grant requests={self.requests} tokens={self.tokens} from {source}>"


class Learnt(Protocol):
    """What the fleet reads of a Shaper's feedback (``asyncquota.feedback.Feedback``): named
    here by its one attribute, so that the feedback, which knows the fleet, is not known
    back (no import circle)."""

    @property
    def punishes(self) -> bool:
        """Whether the upstream was seen to punish sends inside its Retry-After window."""
        ...


class Fleet(Protocol):
    """A fleet of processes sharing one quota (``asyncquota.fleet.RedisFleet``)."""

    def attach(
        self,
        *,
        rpm: float | None,
        tpm: float | None,
        cooldown: CooldownGate,
        feedback: Learnt,
    ) -> None:
        """A Shaper starts: the quota it shapes, its cooldown gate to keep shut."""

    def detach(self, cooldown: CooldownGate) -> None:
        """The Shaper owning ``cooldown`` has closed."""

    def retry_counts(self, *, window: float) -> tuple[Count, Count]:
        """The fleet's request and retry counts over ``window``, for a ``RetryBudget``."""
        ...

    def take_nowait(self, requests: int, tokens: int, now: float) -> Grant | None:
        """A grant from what this process holds now, or None (the fast path)."""

    async def take(self, requests: int, tokens: int) -> Grant:
        """A grant, waiting for it if need be (the dispatcher)."""
        ...

    def put_back(self, grant: Grant) -> None:
        """A grant that was not used."""

    def bind(self, reservation: Reservation, grant: Grant, gate: TokenGate) -> Reservation:
        """The reservation a granted request carries: settling it settles the grant."""
        ...

    def publish_cooldown(self, seconds: float) -> None:
        """This process's cooldown closed, ``seconds`` from now: the fleet stops too."""

    def observed(self, kind: str, remaining: float) -> None:
        """The upstream said ``remaining`` of ``kind`` (``"requests"`` or ``"tokens"``)."""
