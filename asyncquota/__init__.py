"""asyncquota: load shaping for asyncio clients of rate-limited LLM APIs.

Use :class:`Shaper` (``shaper.request``, ``shaper.stream``, ``shaper.middleware``). The
request path, one stage a module, the Shaper wiring them::

    options (options.py) → admission and the line (admission.py, queue.py, priority.py)
    → dispatch (dispatch.py: gates.py, limiter.py, limits.py) → attempt (attempt.py:
    transport.py, signals.py, feedback.py) → retry or result (backoff.py)

Every error a caller can see is in errors.py, under QuotaError.
"""

from .backoff import RetryBudget, RetryPolicy, backoff_delay, retry_delay
from .errors import (
    BudgetExceededError,
    BusyError,
    ClosedError,
    DeadlineExceededError,
    DeadlineUnreachableError,
    NoRouteError,
    OverloadedError,
    QueueFullError,
    QuotaError,
    QuotaExhaustedError,
    RejectedError,
    StoreUnavailableError,
    TenantLimitError,
    ThrottledError,
    TransportError,
    UpstreamCapError,
    UpstreamError,
)
from .gates import CooldownGate, RateGate, Reservation, TokenBucket, TokenGate
from .hooks import Admitted, Completed, Event, Hook, LoggingHook, Queued, Retried, Shed, Throttled
from .http1 import HttpTransport
from .limiter import ConcurrencyLimiter, LimiterStatistics, Permit
from .limits import AIMD, Fixed, Gradient, Limit
from .options import RequestOptions
from .priority import Priority, PriorityLike, coerce_priority
from .queue import PriorityQueue, QueueStatistics, Waiter
from .shaper import Shaper, ShaperStatistics
from .signals import (
    Classification,
    Outcome,
    QuotaSnapshot,
    QuotaWindow,
    classify_error_body,
    classify_stream_event,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
)
from .streaming import ShapedStream
from .ticket import Lease
from .transport import (
    AiohttpTransport,
    MockTransport,
    Request,
    Response,
    SSEEvent,
    StreamResponse,
    Transport,
)

__all__ = [
    "AIMD",
    "Admitted",
    "AiohttpTransport",
    "BudgetExceededError",
    "BusyError",
    "Classification",
    "ClosedError",
    "Completed",
    "ConcurrencyLimiter",
    "CooldownGate",
    "DeadlineExceededError",
    "DeadlineUnreachableError",
    "Event",
    "Fixed",
    "Gradient",
    "Hook",
    "HttpTransport",
    "Lease",
    "Limit",
    "LimiterStatistics",
    "LoggingHook",
    "MockTransport",
    "NoRouteError",
    "Outcome",
    "OverloadedError",
    "Permit",
    "Priority",
    "PriorityLike",
    "PriorityQueue",
    "QueueFullError",
    "QueueStatistics",
    "Queued",
    "QuotaError",
    "QuotaExhaustedError",
    "QuotaSnapshot",
    "QuotaWindow",
    "RateGate",
    "RejectedError",
    "Request",
    "RequestOptions",
    "Reservation",
    "Response",
    "Retried",
    "RetryBudget",
    "RetryPolicy",
    "SSEEvent",
    "ShapedStream",
    "Shaper",
    "ShaperStatistics",
    "Shed",
    "StoreUnavailableError",
    "StreamResponse",
    "TenantLimitError",
    "Throttled",
    "ThrottledError",
    "TokenBucket",
    "TokenGate",
    "Transport",
    "TransportError",
    "UpstreamCapError",
    "UpstreamError",
    "Waiter",
    "backoff_delay",
    "classify_error_body",
    "classify_stream_event",
    "coerce_priority",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "retry_delay",
]


def __getattr__(name: str) -> object:
    # PrometheusHook needs the ``prometheus`` extra: imported when asked for, so that the
    # core does not depend on prometheus_client (a missing extra says which pip command).
    if name == "PrometheusHook":
        from .prometheus import PrometheusHook

        return PrometheusHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
