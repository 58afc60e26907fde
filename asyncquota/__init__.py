"""asyncquota: load shaping for asyncio clients of rate-limited LLM APIs."""

from .errors import (
    ClosedError,
    DeadlineExceededError,
    DeadlineUnreachableError,
    OverloadedError,
    QueueFullError,
    QuotaError,
    QuotaExhaustedError,
    RejectedError,
    ThrottledError,
    TransportError,
    UpstreamError,
)
from .priority import Priority, PriorityLike, coerce_priority

__all__ = [
    "ClosedError",
    "DeadlineExceededError",
    "DeadlineUnreachableError",
    "OverloadedError",
    "Priority",
    "PriorityLike",
    "QueueFullError",
    "QuotaError",
    "QuotaExhaustedError",
    "RejectedError",
    "ThrottledError",
    "TransportError",
    "UpstreamError",
    "coerce_priority",
]
