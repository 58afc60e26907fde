"""``naive``: one aiohttp session, every call sent at once, no retries.

What most code looks like on day one: ``asyncio.gather`` over the conversations, each doing
``session.post(...)`` and ``raise_for_status()``. The session's pool holds aiohttp's default
of 100 connections; a 429 is an error the caller sees.
"""

from __future__ import annotations

from ..sessions import Call
from .base import Strategy, Target, chat_request, raise_for_status

__all__ = ["NaiveStrategy"]

DEFAULT_POOL = 100
"""aiohttp's default connection limit (``TCPConnector(limit=100)``)."""


class NaiveStrategy(Strategy):
    """Send every call as it comes, once."""

    name = "naive"
    description = "one aiohttp session, asyncio.gather, no retries"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._transport = target.transport(max_connections=DEFAULT_POOL)

    async def complete(self, call: Call) -> None:
        """POST the call; a non-2xx reply raises."""
        response = await self._transport.send(chat_request(self.target.base_url, call))
        raise_for_status(response)
        response.json()

    async def aclose(self) -> None:
        """Close the session."""
        await self._transport.aclose()
