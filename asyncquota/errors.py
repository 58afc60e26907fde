"""The errors asyncquota raises to callers: one tree, each carrying what the caller needs.

Every request that enters asyncquota ends exactly once: in a response, or in one of these::

    QuotaError                       base class; .reason, .priority, .tenant, .retry_after
    ├── RejectedError                refused before reaching the upstream (nothing was sent)
    │   ├── QueueFullError           shed from a full queue: it was the least important waiter
    │   ├── DeadlineUnreachableError shed early: the estimated wait is longer than its deadline
    │   ├── BusyError                shed early: the wait would pass its class's max_wait
    │   ├── ClosedError              the shaper is shutting down or closed
    │   ├── TenantLimitError         the tenant is over its own tier's limit (not congestion)
    │   ├── BudgetExceededError      the budget cannot pay for it and the policy says reject
    │   │   └── UpstreamCapError     the cap of the account that would serve it cannot pay
    │   ├── NoRouteError             no configured model can take it (context too long, ...)
    │   └── StoreUnavailableError    the counter store (tiers, budget) cannot be read or written
    ├── DeadlineExceededError        its deadline passed while it waited or was in flight
    └── UpstreamError                the upstream said no (.status, .body)
        ├── ThrottledError           rate limited (HTTP 429): retry after .retry_after
        ├── OverloadedError          the service is overloaded (503, 529): not your quota
        ├── QuotaExhaustedError      out of credit or out of daily quota: retrying won't help
        └── TransportError           no usable reply: connection refused/reset, timeout, garbage

``retry_after`` is in seconds, from now, whenever asyncquota knows one (a Retry-After
header, the queue's estimate of the wait, a cooldown in force), so a chatbot can answer
"busy, try again in 4 s" instead of spinning.

Messages and body excerpts are scrubbed when an error is made (``urls.redact_text``):
whatever URL or path they mention shows its query values and userinfo as ``***``, since
some upstreams take the API key in the query string.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from .priority import Priority, describe_priority
from .urls import redact_text

__all__ = [
    "BudgetExceededError",
    "BusyError",
    "ClosedError",
    "DeadlineExceededError",
    "DeadlineUnreachableError",
    "NoRouteError",
    "OverloadedError",
    "QueueFullError",
    "QuotaError",
    "QuotaExhaustedError",
    "RejectedError",
    "StoreUnavailableError",
    "TenantLimitError",
    "ThrottledError",
    "TransportError",
    "UpstreamCapError",
    "UpstreamError",
    "WouldBlock",
]

BODY_EXCERPT_CHARS = 500
"""How much of an upstream's error body an UpstreamError keeps (enough to read, never a dump)."""


class QuotaError(Exception):
    """Base class of everything asyncquota raises to a caller.

    Attributes:
        reason: a short machine-readable slug (``"queue_full"``, ``"rate_limited"``, ...).
        priority: the request's priority class (the enum where the rank has a name).
        tenant: the request's tenant, if it had one.
        retry_after: seconds from now after which trying again is sensible, if known.
    """

    default_reason = "quota_error"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        priority: Priority | int | None = None,
        tenant: Hashable | None = None,
        retry_after: float | None = None,
    ) -> None:
        message = redact_text(message)
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.priority = describe_priority(priority) if priority is not None else None
        self.tenant = tenant
        self.retry_after = retry_after

    def __repr__(self) -> str:
        fields = [repr(self.message), f"reason={self.reason!r}"]
        if self.priority is not None:
            fields.append(f"priority={self.priority!r}")
        if self.tenant is not None:
            fields.append(f"tenant={self.tenant!r}")
        if self.retry_after is not None:
            fields.append(f"retry_after={self.retry_after:.3f}")
        return f"{type(self).__name__}({', '.join(fields)})"


class RejectedError(QuotaError):
    """The request was refused before it reached the upstream; nothing was sent."""

    default_reason = "rejected"


class QueueFullError(RejectedError):
    """The queue was full and this was its least important waiter, so it was shed."""

    default_reason = "queue_full"


class DeadlineUnreachableError(RejectedError):
    """Shed early: the estimated wait ahead of it is longer than its deadline allows."""

    default_reason = "deadline_unreachable"


class BusyError(RejectedError):
    """Not sent: more is waiting than can be served within this class's ``max_wait``.

    A standing queue adds waiting, not answers: the request is told at once, with
    ``retry_after`` the estimated wait, or leaves the queue when its ``max_wait`` ends.
    """

    default_reason = "busy"


class ClosedError(RejectedError):
    """The shaper is shutting down or closed and accepts no more work."""

    default_reason = "closed"


class TenantLimitError(RejectedError):
    """The tenant is over a limit of its own tier (RPM, RPD or TPM for that model).

    It is their quota, not congestion: nothing was queued and nothing was sent.
    ``retry_after`` says when the window frees enough for this request.

    Attributes:
        dimension: which limit: ``"rpm"``, ``"rpd"`` or ``"tpm"``.
        model: the model the limit belongs to.
    """

    default_reason = "tenant_limit"

    def __init__(
        self, message: str, *, dimension: str = "", model: str | None = None, **fields: Any
    ) -> None:
        super().__init__(message, **fields)
        self.dimension = dimension
        self.model = model


class BudgetExceededError(RejectedError):
    """The budget (global or the tenant's) cannot pay for this request; nothing was sent.

    ``retry_after`` is the time until the budget period renews, when known.
    """

    default_reason = "budget_exceeded"


class UpstreamCapError(BudgetExceededError):
    """The monthly spend cap of the upstream account that would serve it cannot pay; nothing
    was sent.

    The cap mirrors one the provider keeps on its side (Anthropic's usage limits, an OpenAI
    project's budget): past it the provider refuses everything until its month renews, so
    the Gateway refuses first and moves the request down its model's fallback chain. This
    error reaches a caller only when no model of the chain could take the request.
    ``retry_after`` is the time until the cap's month renews (00:00 UTC on the 1st).

    Attributes:
        account: the upstream account whose cap it is (``"anthropic#1f0c9a2e"``: the
            upstream's name and a short hash of its key, never the key).
        cap: the cap, in dollars a month.
    """

    default_reason = "upstream_cap"

    def __init__(self, message: str, *, account: str = "", cap: float = 0.0, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.account = account
        self.cap = cap


class NoRouteError(RejectedError):
    """No configured model can take this request (its context is too long for all of them,
    or every model of its fallback chain refused it); nothing was sent."""

    default_reason = "no_route"


class StoreUnavailableError(RejectedError):
    """The counter store behind tenant tiers and budgets cannot be read or written.

    The file is locked by another process for longer than the store waits, corrupt, on a
    failing disk, or this store's earlier calls are still waiting on it. Limits that
    cannot be checked are not waived: the request is refused (nothing was sent, nothing
    was charged). The message names the store's file, never a counter's key.

    Attributes:
        path: the store's file.
    """

    default_reason = "store_unavailable"

    def __init__(self, message: str, *, path: str = "", **fields: Any) -> None:
        super().__init__(message, **fields)
        self.path = path


class DeadlineExceededError(QuotaError):
    """The request's deadline passed while it waited, or while it was in flight."""

    default_reason = "deadline_exceeded"


class UpstreamError(QuotaError):
    """The upstream answered with an error (or could not be reached).

    Attributes:
        status: the HTTP status, or None when no reply arrived.
        body: at most ``BODY_EXCERPT_CHARS`` characters of the reply body, decoded leniently.
    """

    default_reason = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: bytes | str | None = None,
        reason: str | None = None,
        priority: Priority | int | None = None,
        tenant: Hashable | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message, reason=reason, priority=priority, tenant=tenant, retry_after=retry_after
        )
        self.status = status
        self.body = excerpt(body)


class ThrottledError(UpstreamError):
    """The upstream rate-limited this request (HTTP 429); try again after ``retry_after``."""

    default_reason = "rate_limited"


class OverloadedError(UpstreamError):
    """The upstream service as a whole is overloaded (503, Anthropic's 529)."""

    default_reason = "overloaded"


class QuotaExhaustedError(UpstreamError):
    """The account is out of credit or out of its daily quota: retrying will not help.

    Attributes:
        regain_at: Unix time at which the provider says the quota comes back (Anthropic's
            spend cap names a date; Gemini's per-day quota resets at midnight Pacific), or
            None when it did not say.
        why: a short account of it for an operator ("Anthropic spend cap reached; regain
            2026-12-01T00:00Z"), or None.
    """

    default_reason = "quota_exhausted"

    def __init__(
        self,
        message: str,
        *,
        regain_at: float | None = None,
        why: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.regain_at = regain_at
        self.why = why


class TransportError(UpstreamError):
    """No usable reply: connection refused or reset, a timeout, or a body that is not HTTP."""

    default_reason = "transport"


def excerpt(body: bytes | str | None, limit: int = BODY_EXCERPT_CHARS) -> str:
    """The first ``limit`` characters of a body, decoded leniently, marked when cut, scrubbed."""
    if body is None:
        return ""
    if isinstance(body, bytes):
        # At most 4 bytes a character: a huge body is never decoded whole.
        text = body[: 4 * limit + 4].decode("utf-8", "replace")
        cut = len(body) > 4 * limit + 4 or len(text) > limit
    else:
        text, cut = body, len(body) > limit
    # An upstream may echo the request line, key and all, in its error page.
    return redact_text(text[:limit] + "…" if cut else text)


class WouldBlock(RuntimeError):
    """A ``*_nowait`` call would have had to wait; nothing was taken.

    Not a QuotaError: primitives raise it to their own callers (the Shaper), never to a
    request's caller.
    """
