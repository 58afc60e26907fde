"""How a request ended: one small vocabulary for the hooks, the metrics and the bench.

Every request ends in exactly one :class:`RequestOutcome`. The Shaper's ``Completed``
event carries it (beside the error's own ``reason``, which is finer), the Prometheus
metrics count by it (its labels are bounded: fit for a label), and the bench records it
for every strategy, asyncquota's peers included: :func:`classify` maps what any of them
raised (asyncquota's errors, aiohttp's, openai's, a timeout) onto it, reading status codes
by attribute so that it imports none of those libraries.

Not to be confused with :class:`asyncquota.signals.Outcome`, which classifies one *reply*
(success, throttled, overloaded, ...), nor with a permit's ending (success, dropped,
ignore: what the concurrency limit learns from one attempt).
"""

from __future__ import annotations

import asyncio
import enum

from .errors import (
    DeadlineExceededError,
    OverloadedError,
    RejectedError,
    TenantLimitError,
    ThrottledError,
    TransportError,
)

__all__ = ["REFUSED_OUTCOMES", "RequestOutcome", "classify", "is_error"]


class RequestOutcome(enum.IntEnum):
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
    CANCELLED = 9
    """The caller gave up (cancelled the call) before it ended."""

    @property
    def label(self) -> str:
        """The lowercase name used in reports and metric labels (``"deadline_exceeded"``)."""
        return self.name.lower()


REFUSED_OUTCOMES = (RequestOutcome.SHED, RequestOutcome.TENANT_LIMIT)
"""The outcomes reported together as ``shed``: refused at once, nothing sent."""

_ERROR_OUTCOMES = (
    RequestOutcome.THROTTLED,
    RequestOutcome.SERVER_ERROR,
    RequestOutcome.HTTP_ERROR,
    RequestOutcome.TRANSPORT,
    RequestOutcome.OTHER,
)


def classify(exc: BaseException) -> RequestOutcome:
    """The outcome of a request that raised ``exc``."""
    if isinstance(exc, TenantLimitError):
        return RequestOutcome.TENANT_LIMIT
    if isinstance(exc, RejectedError):
        return RequestOutcome.SHED
    if isinstance(exc, DeadlineExceededError | asyncio.TimeoutError):
        return RequestOutcome.DEADLINE_EXCEEDED
    if isinstance(exc, asyncio.CancelledError):
        return RequestOutcome.CANCELLED
    if isinstance(exc, TransportError):
        return RequestOutcome.TRANSPORT
    if isinstance(exc, ThrottledError):  # a 429, or a wait longer than the deadline
        return RequestOutcome.THROTTLED
    if isinstance(exc, OverloadedError):
        return RequestOutcome.SERVER_ERROR
    # aiohttp says .status, openai and httpx say .status_code; asyncquota's errors .status.
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = getattr(exc, "status", None)
    if isinstance(status, int):
        if status == 429:
            return RequestOutcome.THROTTLED
        if status >= 500:
            return RequestOutcome.SERVER_ERROR
        return RequestOutcome.HTTP_ERROR
    if isinstance(exc, OSError) or _is_connection_error(exc):
        return RequestOutcome.TRANSPORT
    return RequestOutcome.OTHER


def _is_connection_error(exc: BaseException) -> bool:
    """aiohttp's ClientError, openai's APIConnectionError, httpx's TransportError, by name.

    None of those libraries is imported.
    """
    return any(
        cls.__name__ in {"ClientError", "APIConnectionError", "TransportError"}
        for cls in type(exc).__mro__
    )


def is_error(outcome: int) -> bool:
    """True for the outcomes reported together as ``errors``."""
    return outcome in _ERROR_OUTCOMES
