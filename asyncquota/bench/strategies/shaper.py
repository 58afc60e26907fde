"""``asyncquota``: the Shaper with its defaults, as a chatbot server would embed it.

No tuning for the benchmark: one ``Shaper`` for the process, each call sent with its class
(interactive or batch) and its deadline; a ``QuotaError`` is the caller's answer ("busy,
try again in N s"). In a virtual run the Shaper talks to the in-process simulated upstream
through a plain ``MockTransport``: its own concurrency limit bounds what is in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

from ...priority import describe_priority
from ...shaper import Shaper
from ...testing.replies import CHAT_PATH
from ...transport import MockTransport
from ..sessions import Call
from .base import Strategy, Target

__all__ = ["ShaperStrategy"]


class ShaperStrategy(Strategy):
    """Every call through one asyncquota Shaper."""

    name = "asyncquota"
    description = "asyncquota.Shaper with its defaults"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        transport = MockTransport(target.handler) if target.handler is not None else None
        # The upstream's wall clock, to read its dates (the real one, or a virtual run's).
        self._shaper = Shaper(
            target.base_url, transport=transport, wall_clock=target.config.wall_clock
        )

    async def __aenter__(self) -> Self:
        await self._shaper.__aenter__()
        return self

    async def complete(self, call: Call) -> None:
        """Send the call with its class and deadline; a QuotaError is the answer if any."""
        response = await self._shaper.request(
            "POST", CHAT_PATH, json=call.body, priority=call.priority, deadline=call.deadline
        )
        response.json()

    async def aclose(self) -> None:
        """Shut the Shaper down (waiting callers are told, the pool is closed)."""
        await self._shaper.aclose()

    def sample(self) -> Mapping[str, float]:
        """The concurrency limit and the queue depth per class, for the plot."""
        stats = self._shaper.statistics()
        queued = {f"queue_{_name(rank)}": float(n) for rank, n in stats.queued}
        return {"limit": float(stats.limit), "inflight": float(stats.inflight), **queued}


def _name(rank: object) -> str:
    described = describe_priority(rank) if isinstance(rank, int) else rank
    return getattr(described, "name", str(described)).lower()
