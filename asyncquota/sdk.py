"""The official SDKs, shaped: ``openai`` and ``anthropic`` clients whose HTTP goes through a Shaper.

    async with Shaper("https://api.openai.com/v1") as shaper:
        client = openai_client(shaper, api_key=key)
        reply = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Where is my parcel?"}],
            extra_headers={"X-AsyncQuota-Priority": "batch", "X-AsyncQuota-Tenant": "shop-42"},
        )

:func:`openai_client` and :func:`anthropic_client` make the SDK's own client (every
keyword passed through; ``base_url`` defaults to the Shaper's) around an httpx2 client
whose transport is a :class:`ShaperTransport`: both SDKs send over httpx2, and each call
the SDK makes becomes one request through the Shaper's queue, gates and retries, sent by
the Shaper's own transport (its pool). Nothing is sent anywhere but under the Shaper's
``base_url``: a request elsewhere raises ValueError.

Per call, options travel in the ``X-AsyncQuota-*`` headers (``extra_headers=``), removed
before sending (see :mod:`asyncquota.options`). Without ``X-AsyncQuota-Deadline`` the
SDK's read timeout is the deadline (the SDKs default to 600 s: set ``timeout=`` on the
client or the call); without ``X-AsyncQuota-Cost-Tokens`` the tokens are estimated from
the JSON body (its ``max_tokens`` included).

The Shaper owns the retries. A request that ends in error reaches the SDK as an HTTP
error reply in the provider's shape, so the SDK raises its usual ``RateLimitError`` or
``APIStatusError`` subclass; every such reply says ``x-should-retry: false``, so the SDK
adds no retries of its own, whatever its ``max_retries``. The reply is:

- the upstream's own last error reply (status, body, headers), when the Shaper gave up
  on one, with ``retry-after`` and ``retry-after-ms`` set to the Shaper's hint;
- else one made from the :class:`~asyncquota.errors.QuotaError`, in the provider's error
  JSON (Anthropic's for requests that carry ``anthropic-version``, else OpenAI's; its
  ``code`` / message say what asyncquota decided)::

      429  ThrottledError (incl. a cooldown that outlasts the deadline), TenantLimitError,
           BudgetExceededError
      503  refused unsent: shed, queue full, busy, deadline unreachable, closed
      504  DeadlineExceededError, a timed-out attempt
      502  no usable reply (connection refused or lost, not HTTP)
      400  NoRouteError

A streamed call (``"stream": true`` in the body) holds its concurrency permit and token
reservation until the SDK closes the stream (read to its end, closed early, or its
reader cancelled); the tokens are reconciled with the usage the stream reports (OpenAI
reports it only with ``stream_options={"include_usage": True}``). An error event inside
a 200 stream (Anthropic's ``overloaded_error``) is passed on for the SDK to raise, and
teaches the Shaper what a 529 or a 429 would. A stream that breaks mid-way raises
httpx2's ``ReadError`` (``ReadTimeout`` for a silence past the attempt's timeout), as a
broken connection would (the openai SDK wraps it in ``APIConnectionError`` or
``APITimeoutError``); so does a stream still open when the Shaper closes.

Credentials are the SDK's (``api_key=``); nothing here logs a header.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Self

try:
    import httpx2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "asyncquota.sdk needs httpx2 (the SDKs' HTTP library): pip install 'asyncquota[sdk]'"
    ) from exc
import orjson
from multidict import CIMultiDict

from .errors import (
    BudgetExceededError,
    ClosedError,
    DeadlineExceededError,
    NoRouteError,
    OverloadedError,
    QuotaError,
    TenantLimitError,
    ThrottledError,
    TransportError,
    UpstreamError,
)
from .options import MIN_DEADLINE, OPTION_HEADERS, RequestOptions
from .streaming import LeasedEvents
from .tokens import estimate_tokens
from .transport import Request, Response
from .urls import join_path, redact_url

if TYPE_CHECKING:
    import anthropic
    import openai

    from .shaper import Shaper
    from .ticket import Lease
    from .transport import SSEEvent, StreamResponse

__all__ = ["ShaperTransport", "anthropic_client", "openai_client"]

Dialect = Literal["openai", "anthropic"]

# What httpx2 put on the request for its own connection; the Shaper's transport sets its
# own (and decodes what it asked to be compressed).
_NOT_FORWARDED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}
)
# What described the reply's bytes on the wire, no longer true of the decoded body; and
# the retry advice, which is ours to give.
_NOT_RETURNED = frozenset(
    {
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
    }
)


class ShaperTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that sends every request through a Shaper.

    What :func:`openai_client` and :func:`anthropic_client` build their clients on; give
    it to an ``httpx2.AsyncClient`` of your own (``openai.DefaultAsyncHttpxClient(
    transport=ShaperTransport(shaper))``) to make the SDK client yourself. See the module
    docstring for what it does with options, errors and streams.

    It owns no connections (the Shaper's transport does): closing it leaves the Shaper
    running, and it serves for as long as the Shaper does.

    Args:
        shaper: the Shaper to send through; only its ``base_url`` is ever contacted.
    """

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper
        self._base = httpx2.URL(shaper.base_url)

    def __repr__(self) -> str:
        return f"<ShaperTransport {redact_url(self._shaper.base_url)}>"

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` through the Shaper; an error ends as an error reply (see above).

        Raises:
            ValueError: the request is not for the Shaper's ``base_url``, or an option
                header holds a malformed value; nothing is sent.
        """
        url = self._url_of(request.url)
        headers = request.headers
        options = RequestOptions.from_headers(
            {name: headers.get_list(name) for name in OPTION_HEADERS}
        )
        body = await request.aread()
        payload = _json_body(body, headers.get("content-type"))
        if options.deadline is None:
            read = _read_timeout(request)
            if read is not None:
                options = replace(options, deadline=max(read, MIN_DEADLINE))
        if options.cost_tokens is None:
            cost = estimate_tokens(
                len(body), payload, default_output_tokens=self._shaper.default_output_tokens
            )
            options = replace(options, cost_tokens=cost)
        skipped = {name.lower() for name in OPTION_HEADERS} | _NOT_FORWARDED
        encoding = headers.encoding
        forwarded = CIMultiDict(
            (name.decode(encoding), value.decode(encoding))
            for name, value in headers.raw
            if name.decode(encoding).lower() not in skipped
        )
        attempt = Request(request.method, url, forwarded, body or None)
        dialect: Dialect = "anthropic" if "anthropic-version" in headers else "openai"
        path = request.url.raw_path.decode("ascii")
        if isinstance(payload, dict) and payload.get("stream") is True:
            return await self._stream(attempt, path, options, dialect)
        return await self._send(attempt, path, options, dialect)

    async def _send(
        self, attempt: Request, path: str, options: RequestOptions, dialect: Dialect
    ) -> httpx2.Response:
        transport = self._shaper.transport
        replies: list[Response] = []

        async def send(budget: float | None) -> Response:
            reply = await transport.send(replace(attempt, timeout=budget))
            replies.append(reply)
            return reply

        try:
            reply = await self._shaper.shape(
                send, method=attempt.method, path=path, options=options
            )
        except QuotaError as error:
            return _error_reply(error, replies[-1] if replies else None, dialect)
        return httpx2.Response(
            reply.status, headers=_returned(reply.headers.items()), content=reply.body
        )

    async def _stream(
        self, attempt: Request, path: str, options: RequestOptions, dialect: Dialect
    ) -> httpx2.Response:
        transport = self._shaper.transport
        replies: list[Response] = []
        opened: list[StreamResponse] = []

        async def open_stream(budget: float | None) -> Response:
            # A 2xx stream is kept open for the SDK; an error one is read whole, for the
            # Shaper to classify (and perhaps retry).
            stream = await transport.open_stream(replace(attempt, timeout=budget))
            if not stream.ok:
                reply = Response(stream.status, stream.headers, await stream.read())
                replies.append(reply)
                return reply
            opened.append(stream)
            return Response(stream.status, stream.headers)

        try:
            _, lease = await self._shaper.lease(
                open_stream, method=attempt.method, path=path, options=options
            )
        except QuotaError as error:
            return _error_reply(error, replies[-1] if replies else None, dialect)
        # A 2xx ends the request: the lease is that of the stream opened last.
        stream = opened[-1]
        body = _LeasedBody(stream, lease, f"{attempt.method} {redact_url(path)}")
        return httpx2.Response(
            stream.status, headers=_returned(stream.headers.items()), stream=body
        )

    def _url_of(self, url: httpx2.URL) -> str:
        """The URL to send to: ``url``, checked to lie under the Shaper's ``base_url``."""
        base = self._base
        base_path = base.raw_path.rstrip(b"/")
        raw_path = url.raw_path
        if (
            (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port)
            or not raw_path.startswith(base_path + b"/")
        ):
            raise ValueError(
                f"{redact_url(str(url))} is not under the Shaper's base_url "
                f"{redact_url(self._shaper.base_url)}; a ShaperTransport sends nothing elsewhere."
            )
        # join_path refuses what would climb out of the base path once dots are resolved.
        return join_path(self._shaper.base_url, raw_path[len(base_path) :].decode("ascii"))


class _LeasedBody(httpx2.AsyncByteStream):
    """The body of a streamed reply: its events as they come, holding the lease until closed.

    Read by :class:`~asyncquota.streaming.LeasedEvents`, as a ShapedStream is (the lease
    ends exactly once, the usage is read on the way), and passed on re-encoded, one event
    a chunk: the SDKs read events, not bytes. An error event is passed on for the SDK to
    raise; a broken or silent connection, or the Shaper shutting down, is the ReadError
    (or ReadTimeout) an httpx2 transport raises.
    """

    def __init__(self, stream: StreamResponse, lease: Lease, where: str) -> None:
        self._events = LeasedEvents(
            stream,
            lease,
            closed=lambda: ClosedError(
                f"The Shaper shut down while the stream of {where} was open; it was closed."
            ),
        )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        try:
            got = await self._events.next()
        except ClosedError as exc:
            raise httpx2.ReadError(str(exc)) from exc
        except TransportError as exc:  # the connection broke or went silent mid-stream
            error = httpx2.ReadTimeout if exc.reason == "timeout" else httpx2.ReadError
            raise error(str(exc)) from exc
        if got is None:
            raise StopAsyncIteration
        return _encode(got[0])

    async def aclose(self) -> None:
        """The SDK closed the stream: a stream left before its end teaches nothing."""
        await self._events.aclose()

def openai_client(shaper: Shaper, **kwargs: Any) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` whose requests go through ``shaper``.

    Every keyword goes to ``AsyncOpenAI`` as given; ``base_url`` defaults to the Shaper's
    (an OpenAI-compatible base URL ends in ``/v1``) and must lie under it.

    Raises:
        ImportError: the openai SDK is not installed.
        TypeError: an ``http_client`` was given (give yours a ``ShaperTransport`` instead).
        ValueError: a ``base_url`` outside the Shaper's.
    """
    try:
        import openai
    except ImportError:
        raise ImportError(
            "openai_client needs the openai SDK: pip install 'asyncquota[sdk]'"
        ) from None
    http_client = openai.DefaultAsyncHttpxClient(transport=_transport(shaper, kwargs))
    return openai.AsyncOpenAI(**kwargs, http_client=http_client)


def anthropic_client(shaper: Shaper, **kwargs: Any) -> anthropic.AsyncAnthropic:
    """An ``anthropic.AsyncAnthropic`` whose requests go through ``shaper``.

    Every keyword goes to ``AsyncAnthropic`` as given; ``base_url`` defaults to the
    Shaper's and must lie under it.

    Raises:
        ImportError: the anthropic SDK is not installed.
        TypeError: an ``http_client`` was given (give yours a ``ShaperTransport`` instead).
        ValueError: a ``base_url`` outside the Shaper's.
    """
    try:
        import anthropic
    except ImportError:
        raise ImportError(
            "anthropic_client needs the anthropic SDK: pip install 'asyncquota[sdk]'"
        ) from None
    http_client = anthropic.DefaultAsyncHttpxClient(transport=_transport(shaper, kwargs))
    return anthropic.AsyncAnthropic(**kwargs, http_client=http_client)


def _transport(shaper: Shaper, kwargs: dict[str, Any]) -> ShaperTransport:
    """The transport for an SDK client made with ``kwargs`` (``base_url`` set and checked)."""
    if "http_client" in kwargs:
        raise TypeError(
            "The client's http_client is made around a ShaperTransport; to bring your own, "
            "give it transport=ShaperTransport(shaper) and make the SDK client yourself."
        )
    transport = ShaperTransport(shaper)
    base_url = kwargs.setdefault("base_url", shaper.base_url)
    transport._url_of(httpx2.URL(str(base_url).rstrip("/") + "/"))
    return transport


def _json_body(body: bytes, content_type: str | None) -> Any:
    """The decoded JSON body (for ``max_tokens`` and ``stream``), or None."""
    if not body or content_type is None or "json" not in content_type:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _read_timeout(request: httpx2.Request) -> float | None:
    """The read timeout httpx2 gives the request (the SDK's ``timeout``), if any."""
    timeout = request.extensions.get("timeout")
    read = timeout.get("read") if isinstance(timeout, Mapping) else None
    return float(read) if isinstance(read, int | float) and math.isfinite(read) else None


def _returned(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in _NOT_RETURNED]


def _encode(event: SSEEvent) -> bytes:
    lines = [] if event.event is None else [f"event: {event.event}"]
    if event.id is not None:
        lines.append(f"id: {event.id}")
    lines.extend(f"data: {line}" for line in event.data.split("\n"))
    lines.append("\n")
    return "\n".join(lines).encode()


def _status_of(error: QuotaError) -> int:
    """The HTTP status that tells an SDK what ``error`` is (see the module docstring)."""
    if isinstance(error, ThrottledError | TenantLimitError | BudgetExceededError):
        return 429
    if isinstance(error, TransportError):
        return 504 if error.reason == "timeout" else 502
    if isinstance(error, UpstreamError):
        if error.status is not None and error.status >= 400:
            return error.status
        return 503 if isinstance(error, OverloadedError) else 502
    if isinstance(error, DeadlineExceededError):
        return 504
    if isinstance(error, NoRouteError):
        return 400
    return 503  # refused unsent: shed, queue full, busy, deadline unreachable, closed


def _error_body(error: QuotaError, status: int, dialect: Dialect) -> bytes:
    """``error`` in the provider's error JSON."""
    if dialect == "anthropic":
        kind = {
            400: "invalid_request_error",
            429: "rate_limit_error",
            503: "overloaded_error",
            504: "timeout_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": str(error)}})
    kind = (
        "server_error"
        if status >= 500
        else "rate_limit_exceeded"
        if status == 429
        else "invalid_request_error"
    )
    return orjson.dumps(
        {"error": {"message": str(error), "type": kind, "param": None, "code": error.reason}}
    )


def _error_reply(error: QuotaError, last: Response | None, dialect: Dialect) -> httpx2.Response:
    """How the SDK learns of ``error``: an error reply it raises and does not retry.

    The upstream's own last reply when the Shaper gave up on it, else one made from the
    error; either way with the Shaper's retry hint and ``x-should-retry: false``.
    """
    status = _status_of(error)
    headers: list[tuple[str, str]]
    if (
        isinstance(error, UpstreamError)
        and not isinstance(error, TransportError)
        and last is not None
        and last.status == error.status == status
    ):
        headers, body = _returned(last.headers.items()), last.body
    else:
        headers, body = [("content-type", "application/json")], _error_body(error, status, dialect)
    wait = error.retry_after
    if wait is not None and math.isfinite(wait) and wait >= 0:
        headers.append(("retry-after", str(math.ceil(wait))))
        headers.append(("retry-after-ms", str(math.ceil(wait * 1000))))
    headers.append(("x-should-retry", "false"))
    return httpx2.Response(status, headers=headers, content=body)
