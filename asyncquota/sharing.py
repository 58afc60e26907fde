"""What the Shaper asks of a fleet it shares its quota with, as a Protocol.

The one fleet there is, :class:`asyncquota.fleet.RedisFleet`, needs redis-py (the extra
``redis``); the core must import without it. So the Shaper, the dispatcher and the
feedback know a fleet only by this interface, which names no Redis: where their units
come from (``take_nowait``, ``take``, ``put_back``, ``bind``), what they tell the others
(``publish_cooldown``, ``observed``), the shared retry counts, and the Shaper's start
and end (``attach``, ``detach``). See ``asyncquota.fleet.client`` for what each does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .backoff import Count
    from .feedback import Feedback
    from .fleet.lease import Grant
    from .gates import CooldownGate, Reservation, TokenGate

__all__ = ["Fleet"]


class Fleet(Protocol):
    """A fleet of processes sharing one quota (``asyncquota.fleet.RedisFleet``)."""

    def attach(
        self,
        *,
        rpm: float | None,
        tpm: float | None,
        cooldown: CooldownGate,
        feedback: Feedback,
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
