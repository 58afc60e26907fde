"""What the proxy says when it says no: the provider's error JSON and the retry headers.

Every refusal reaches the client in the shape its SDK reads, chosen by the route it called
(``/v1/messages``: Anthropic's, every other: OpenAI's)::

    OpenAI     {"error": {"message": ..., "type": ..., "param": null, "code": ...}}
    Anthropic  {"type": "error", "error": {"type": ..., "message": ...}}

with the status the SDKs know (asyncquota's error tree, mapped in :func:`refusal_of`)::

    429  TenantLimitError, ThrottledError          x-should-retry: true when a wait is known
    429  BudgetExceededError, QuotaExhaustedError  x-should-retry: false (insufficient_quota)
    503  shed, busy, queue full, deadline unreachable, overloaded, closed, store unavailable
    400  NoRouteError (no model can take it)       504 DeadlineExceededError
    502  TransportError, the upstream refusing the proxy's own key (401, 403)
    4xx, 5xx  an upstream's other refusal: its status and, when whole, its own error JSON

and, where a wait is known, ``Retry-After`` (whole seconds, rounded up) and
``retry-after-ms`` (what the SDKs read first). The tenant's own quota travels on every
reply as ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (:func:`rate_headers`):
the tightest of its tier's request and token windows on the model, never the upstream
account's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import orjson

from ..dialects import ANTHROPIC
from ..errors import (
    BudgetExceededError,
    DeadlineExceededError,
    NoRouteError,
    OverloadedError,
    QuotaError,
    QuotaExhaustedError,
    RejectedError,
    TenantLimitError,
    ThrottledError,
    TransportError,
    UpstreamError,
)
from ..governance.tiers import DimensionStatus
from ..signals import Provider, format_duration

__all__ = ["ProxyError", "error_body", "error_event", "rate_headers", "refusal_of"]

_OPENAI_TYPES = {429: "requests"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
_REQUEST_WINDOWS = ("rpm", "rpd", "tier_rpm", "tier_rpd")
_TOKEN_WINDOWS = ("tpm", "tier_tpm")


class ProxyError(Exception):
    """A refusal on its way to the client: status, words, and whether to come back.

    Attributes:
        status: the HTTP status.
        message: a full sentence for the client.
        code: OpenAI's ``code`` (a slug such as ``"invalid_api_key"``), or None.
        kind: OpenAI's ``type`` when it is not the status's usual one.
        retry_after: seconds after which trying again is sensible, or None.
        should_retry: the ``x-should-retry`` the SDKs obey (None: not said).
        body: the upstream's own error JSON, passed on as it is (None: made here).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        kind: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.body = body

    def headers(self) -> dict[str, str]:
        """``Retry-After``, ``retry-after-ms`` and ``x-should-retry``, as far as known."""
        headers = {}
        if self.retry_after is not None and math.isfinite(self.retry_after):
            wait = max(0.0, self.retry_after)
            headers["Retry-After"] = str(math.ceil(wait - 1e-9))
            headers["retry-after-ms"] = str(math.ceil(wait * 1000 - 1e-6))
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


def error_body(dialect: Provider, error: ProxyError) -> bytes:
    """The error's JSON in ``dialect``'s shape (the upstream's own, when it gave one)."""
    if error.body is not None:
        return error.body
    if dialect == ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})
    default = "invalid_request_error" if error.status < 500 else "server_error"
    kind = error.kind or _OPENAI_TYPES.get(error.status, default)
    return orjson.dumps(
        {"error": {"message": error.message, "type": kind, "param": None, "code": error.code}}
    )


def error_event(dialect: Provider, error: ProxyError) -> bytes:
    """The error as a Server-Sent Event, for a stream that breaks off after its headers."""
    body = error_body(dialect, error)
    if dialect == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def refusal_of(exc: QuotaError) -> ProxyError:
    """The client's answer to what the gateway raised (see the table in the module)."""
    wait = exc.retry_after
    hinted = wait is not None
    if isinstance(exc, BudgetExceededError | QuotaExhaustedError):
        return ProxyError(
            429, exc.message, code="insufficient_quota", kind="insufficient_quota",
            retry_after=wait, should_retry=False,
        )
    if isinstance(exc, TenantLimitError):
        kind = "tokens" if exc.dimension.endswith("tpm") else "requests"
        return ProxyError(
            429, exc.message, code="rate_limit_exceeded", kind=kind, retry_after=wait,
            should_retry=hinted,
        )
    if isinstance(exc, ThrottledError):
        return ProxyError(
            429, exc.message, code="rate_limit_exceeded", retry_after=wait, should_retry=hinted
        )
    if isinstance(exc, NoRouteError):
        return ProxyError(400, exc.message, code=exc.reason, should_retry=False)
    if isinstance(exc, RejectedError | OverloadedError):
        return ProxyError(503, exc.message, code=exc.reason, retry_after=wait, should_retry=hinted)
    if isinstance(exc, DeadlineExceededError):
        return ProxyError(504, exc.message, code=exc.reason, should_retry=False)
    if isinstance(exc, TransportError):
        return ProxyError(502, exc.message, code=exc.reason, should_retry=False)
    if isinstance(exc, UpstreamError) and exc.status in (401, 403):
        # The upstream refused the proxy's own key: not the client's to fix.
        return ProxyError(
            502, f"The upstream refused the proxy's credentials (HTTP {exc.status}); tell "
            "the proxy's operator.", code="upstream_auth", should_retry=False,
        )
    if isinstance(exc, UpstreamError) and exc.status is not None and 400 <= exc.status < 600:
        return ProxyError(
            exc.status, exc.message, code=exc.reason, retry_after=wait, should_retry=False,
            body=_whole_json(exc.body),
        )
    return ProxyError(503, exc.message, code=exc.reason, retry_after=wait, should_retry=hinted)


def rate_headers(dimensions: Sequence[DimensionStatus], now: float) -> dict[str, str]:
    """The tenant's ``x-ratelimit-*`` headers from its tier's windows at Unix time ``now``.

    Requests are the tightest of its request windows (per minute, per day, the model's or
    the tier's shared one), tokens the tightest of its token windows; a kind it has no
    limit on is left out.
    """
    headers: dict[str, str] = {}
    for kind, names in (("requests", _REQUEST_WINDOWS), ("tokens", _TOKEN_WINDOWS)):
        windows = [
            d for d in dimensions
            if d.dimension in names and d.limit is not None and d.remaining is not None
        ]
        if not windows:
            continue
        tightest = min(windows, key=lambda d: d.remaining or 0.0)
        assert tightest.limit is not None and tightest.remaining is not None
        headers[f"x-ratelimit-limit-{kind}"] = str(math.floor(tightest.limit))
        headers[f"x-ratelimit-remaining-{kind}"] = str(math.floor(tightest.remaining))
        reset = 0.0 if tightest.resets_at is None else tightest.resets_at - now
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(max(0.0, reset))
    return headers


def _whole_json(body: str) -> bytes | None:
    """The body, when it is a whole JSON object (an excerpt cut short is not)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    return orjson.dumps(parsed) if isinstance(parsed, Mapping) else None
