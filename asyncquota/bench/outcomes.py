"""How a request ended, as one small code, whatever library the strategy used.

Every request the harness starts ends in exactly one outcome, recorded once; a request
still open when the run is stopped has none and is counted ``lost``. :func:`classify` maps
what a strategy raised (asyncquota's errors, the harness's deadline, aiohttp, openai,
tenacity's last attempt) onto the codes, reading status codes by attribute so that it
imports none of those libraries.
"""

from __future__ import annotations

import asyncio
import enum

from ..errors import (
    DeadlineExceededError,
    QuotaError,
    RejectedError,
    TenantLimitError,
    TransportError,
)

__all__ = ["NO_OUTCOME", "REFUSED_OUTCOMES", "Outcome", "classify", "is_error"]


class Outcome(enum.IntEnum):
    """How a request ended."""

    OK = 0
    """Answered (2xx)."""
    SHED = 1
    """Refused early by the client side, with nothing sent (asyncquota's RejectedError)."""
    DEADLINE_EXCEEDED = 2
    """The caller's deadline passed first."""
    THROTTLED = 3
    """Given up on with a 429 (retries, if any, exhausted)."""
    SERVER_ERROR = 4
    """Given up on with a 5xx or 529."""
    HTTP_ERROR = 5
    """Another non-2xx status (400, 404, ...)."""
    TRANSPORT = 6
    """No usable reply: connection reset or refused, a broken body."""
    OTHER = 7
    """Any other exception (a bug in a strategy shows up here, not as a crash)."""
    TENANT_LIMIT = 8
    """Refused at once because the tenant is over its own tier (asyncquota's
    TenantLimitError), with nothing sent; reported within ``shed`` and on its own."""

    @property
    def label(self) -> str:
        """The lowercase name used in reports (``"deadline_exceeded"``)."""
        return self.name.lower()


NO_OUTCOME = -1
"""The code a request log holds for a request that has not ended (yet)."""

REFUSED_OUTCOMES = (Outcome.SHED, Outcome.TENANT_LIMIT)
"""The outcomes reported together as ``shed``: refused at once, nothing sent."""

_ERROR_OUTCOMES = (Outcome.THROTTLED, Outcome.SERVER_ERROR, Outcome.HTTP_ERROR,
                   Outcome.TRANSPORT, Outcome.OTHER)


def classify(exc: BaseException) -> Outcome:
    """The outcome a request that raised ``exc`` ended in."""
    if isinstance(exc, TenantLimitError):
        return Outcome.TENANT_LIMIT
    if isinstance(exc, RejectedError):
        return Outcome.SHED
    if isinstance(exc, DeadlineExceededError | asyncio.TimeoutError):
        return Outcome.DEADLINE_EXCEEDED
    if isinstance(exc, TransportError):
        return Outcome.TRANSPORT
    # aiohttp says .status, openai and httpx say .status_code; asyncquota's errors .status.
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = getattr(exc, "status", None)
    if isinstance(status, int):
        if status == 429:
            return Outcome.THROTTLED
        if status >= 500:
            return Outcome.SERVER_ERROR
        return Outcome.HTTP_ERROR
    if isinstance(exc, QuotaError | OSError) or _is_connection_error(exc):
        return Outcome.TRANSPORT
    return Outcome.OTHER


def _is_connection_error(exc: BaseException) -> bool:
    """aiohttp's ClientError or openai's APIConnectionError, by name (neither is imported)."""
    return any(
        cls.__name__ in {"ClientError", "APIConnectionError", "TransportError"}
        for cls in type(exc).__mro__
    )


def is_error(outcome: int) -> bool:
    """True for the outcomes reported together as ``errors``."""
    return outcome in _ERROR_OUTCOMES
