"""``tenacity``: aiohttp, an aiolimiter at the known quota, tenacity retries honouring Retry-After.

The careful user's recipe: a leaky bucket (``AsyncLimiter``) set to the requests per second
on the provider's pricing page, each attempt taking a slot, and tenacity retrying 429s,
5xx and dropped connections up to 6 attempts, waiting what Retry-After says (seconds,
milliseconds or an HTTP date) or else a jittered exponential backoff (the OpenAI docs'
``wait_random_exponential(min=1, max=60)``).
"""

from __future__ import annotations

import email.utils
import time

from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from ..sessions import Call
from .base import HTTPStatusError, Strategy, Target, chat_request, raise_for_status
from .naive import DEFAULT_POOL

__all__ = ["TenacityStrategy", "retry_after_seconds"]

MAX_ATTEMPTS = 6


def retry_after_seconds(error: BaseException | None) -> float | None:
    """What a reply's ``retry-after-ms`` or ``retry-after`` (seconds or date) asks, if anything."""
    if not isinstance(error, HTTPStatusError):
        return None
    headers = error.headers
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    # The user's code compares an HTTP date with the wall clock, as every client does.
    return max(0.0, when.timestamp() - time.time())


def _retryable(error: BaseException) -> bool:
    if isinstance(error, HTTPStatusError):
        return error.status == 429 or error.status >= 500
    return isinstance(error, OSError) or type(error).__name__ == "TransportError"


class _WaitRetryAfter:
    """Wait what the upstream asked for, else a jittered exponential backoff."""

    def __init__(self) -> None:
        self._fallback = wait_random_exponential(min=1, max=60)

    def __call__(self, state: RetryCallState) -> float:
        outcome = state.outcome
        asked = retry_after_seconds(outcome.exception() if outcome is not None else None)
        return asked if asked is not None else self._fallback(state)


class TenacityStrategy(Strategy):
    """Rate-limit each attempt at the known quota; retry with tenacity."""

    name = "tenacity"
    description = "aiohttp + aiolimiter at the known quota + tenacity honouring Retry-After"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._transport = target.transport(max_connections=DEFAULT_POOL)
        self._limiter = AsyncLimiter(target.config.rps, 1.0)
        self._wait = _WaitRetryAfter()

    async def complete(self, call: Call) -> None:
        """Try up to 6 times, each attempt taking a slot of the limiter first."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            wait=self._wait,
            stop=stop_after_attempt(MAX_ATTEMPTS),
            reraise=True,
        ):
            with attempt:
                async with self._limiter:
                    response = await self._transport.send(
                        chat_request(self.target.base_url, call)
                    )
                raise_for_status(response)
                response.json()

    async def aclose(self) -> None:
        """Close the session."""
        await self._transport.aclose()
