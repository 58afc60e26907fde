"""The edge to the upstream: one request in, one response out.

A transport knows nothing of queues, limits or retries: it sends exactly one attempt and
returns what came back, or raises :class:`~asyncquota.errors.TransportError` when nothing
usable came back (third-party exceptions are mapped here, at the boundary, and nowhere else).

Three implementations ship: :class:`~asyncquota.http1.HttpTransport` (the Shaper's
default: its own bounded pool of HTTP/1.1 keep-alive connections, in :mod:`asyncquota.http1`),
:class:`AiohttpTransport` (one pooled ``aiohttp`` session with a bounded connector, or a
session of your own with its proxies and middlewares) and :class:`MockTransport` (a function
answers, for tests and the simulator). All three also open streams:
:meth:`Transport.open_stream` returns a :class:`StreamResponse` once the reply headers are
in, and its body arrives chunk by chunk (Server-Sent Events are parsed by
:class:`SSEParser`).

A ``TransportError`` says what happened in its message and, for code, in its ``reason``::

    connect_failed   nothing reached the upstream: refused, DNS, TLS, no connection in time
    timeout          no complete reply within the request's timeout (or a stream went silent)
    connection_lost  the connection dropped or reset before the reply was complete
    bad_reply        the peer answered with something that is not HTTP
    body_too_large   the reply body (or one streamed event) passed the transport's cap
    closed           the transport (or the stream) was closed
    transport        anything else; ``__cause__`` holds the original exception

Messages name the method and the URL scrubbed by :func:`~asyncquota.urls.redact_url`
(query values and userinfo as ``***``: some upstreams put the API key there) and never
the request headers.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import errno
import inspect
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import QuotaError, TransportError
from .urls import redact_text, redact_url

__all__ = [
    "MAX_BODY_BYTES",
    "AiohttpTransport",
    "MockHandler",
    "MockTransport",
    "Request",
    "Response",
    "SSEEvent",
    "SSEParser",
    "StreamResponse",
    "Transport",
    "TransportStatistics",
]


MAX_BODY_BYTES = 64 * 1024 * 1024
"""``AiohttpTransport``'s default cap on one reply body, and on one streamed event or line:
64 MiB, far above any completion (a 128 k-token reply is under 1 MiB of JSON), far below
what would hurt a server holding a few hundred replies at once."""


@dataclass(frozen=True, slots=True)
class Request:
    """One attempt to send to the upstream.

    Attributes:
        method: the HTTP method, upper case.
        url: the absolute URL (the configured upstream's base URL joined with the path).
        headers: request headers (credentials included: never log them).
        body: the encoded body, or None.
        timeout: the longest this attempt may take, in seconds, or None for no limit. For
            ``send`` it bounds the whole attempt (waiting for a pooled connection included);
            for ``open_stream`` it bounds the wait for the reply headers and then each
            silence between two chunks, since a long generation may stream for minutes.
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    timeout: float | None = None


@dataclass(slots=True)
class Response:
    """What the upstream answered to one request.

    Attributes:
        status: the HTTP status code.
        headers: the reply headers, matched case-insensitively.
        body: the whole reply body.
        attempts: how many attempts the request took to get this answer (1 when sent once).
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    attempts: int = 1

    def __post_init__(self) -> None:
        # Callers and mocks may pass a plain dict; lookups must still ignore case.
        if not isinstance(self.headers, CIMultiDictProxy):
            self.headers = CIMultiDictProxy(CIMultiDict(self.headers))

    def json(self) -> Any:
        """The body decoded as JSON (orjson); raises ``orjson.JSONDecodeError`` if it is not."""
        return orjson.loads(self.body)

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    """A snapshot of a transport's state.

    Attributes:
        requests_sent: attempts started (``send`` and ``open_stream`` calls).
        failures: attempts that ended in an error (mid-stream failures included); a
            cancelled attempt is not a failure.
        in_flight: attempts started and not yet ended; an open stream counts until closed.
        connections_open: sockets open to the upstream, idle or in use (0 for a mock).
        connections_in_use: sockets carrying a request right now (0 for a mock).
        connection_limit: the most sockets the pool opens, or None when unbounded.
    """

    requests_sent: int
    failures: int
    in_flight: int
    connections_open: int
    connections_in_use: int
    connection_limit: int | None


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One Server-Sent Event.

    Attributes:
        event: the ``event:`` field, or None when the event had none (a plain message).
        data: the ``data:`` lines joined with ``"\\n"`` (``[DONE]`` is just data).
        id: the last ``id:`` seen on the stream so far, as the SSE standard defines it.
    """

    event: str | None
    data: str
    id: str | None = None


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """Turns the bytes of an event stream into events, whatever the chunk boundaries.

    The parser follows the WHATWG Server-Sent Events rules: lines end in CRLF, LF or CR; a
    blank line dispatches the event being built; ``data:`` lines join with a newline; lines
    starting with ``:`` are comments; one space after the colon is dropped; a leading UTF-8
    BOM is ignored; an event with no ``data:`` line is not dispatched; ``retry:`` and
    unknown fields are ignored. One deliberate leniency: :meth:`flush` dispatches a final
    event that the server did not end with a blank line. Invalid UTF-8 becomes U+FFFD.

    It is pure and incremental: bytes in, events out, no I/O, no clock.

    Args:
        max_event_chars: the most characters one event (its data lines and the line being
            read) may hold; past it :meth:`feed` raises ``ValueError``, so a stream that
            never ends a line cannot grow memory without bound. None: no cap.
    """

    __slots__ = (
        "_data",
        "_data_chars",
        "_decoder",
        "_event",
        "_last_id",
        "_max",
        "_skip_lf",
        "_tail",
        "_tail_chars",
    )

    def __init__(self, *, max_event_chars: int | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._max = max_event_chars
        self._tail: list[str] = []
        self._tail_chars = 0  # what one event holds so far: the line being read ...
        self._data_chars = 0  # ... and its data lines (each counts one more, for its break)
        # A chunk that ends in CR may be the first half of a CRLF split across two chunks.
        self._skip_lf = False
        self._event: str | None = None
        self._data: list[str] = []
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Take the next bytes of the stream; return the events they complete, in order.

        Raises:
            ValueError: the event being read passed ``max_event_chars``.
        """
        return self._feed_text(self._decoder.decode(chunk))

    def flush(self) -> list[SSEEvent]:
        """Signal the end of the stream; return the events still pending."""
        events = self._feed_text(self._decoder.decode(b"", final=True))
        if self._tail:
            self._line("".join(self._tail), events)
            self._tail = []
            self._tail_chars = 0
        self._line("", events)
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return events
        self._tail.append(text)
        self._tail_chars += len(text)
        if "\n" not in text and "\r" not in text:
            # A long line arriving in many small chunks is joined once, when it ends.
            self._check_size()
            return events
        lines = _LINE_BREAK.split("".join(self._tail))
        rest = lines.pop()
        self._tail = [rest] if rest else []
        self._tail_chars = len(rest)
        self._skip_lf = text.endswith("\r")
        for line in lines:
            self._line(line, events)
        self._check_size()
        return events

    def _check_size(self) -> None:
        if self._max is not None and self._tail_chars + self._data_chars > self._max:
            raise ValueError(
                f"An event of the stream passed {self._max} characters before it ended."
            )

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent(self._event, "\n".join(self._data), self._last_id))
            self._data = []
            self._data_chars = 0
            self._event = None
            return
        if line[0] == ":":
            return
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_chars += len(value) + 1
        elif name == "event":
            self._event = value or None
        elif name == "id" and "\x00" not in value:
            self._last_id = value or None


class TransportCounters:
    """What a transport has done so far; shared with the streams it opened."""

    __slots__ = ("failures", "in_flight", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.failures = 0
        self.in_flight = 0

    def begin(self) -> None:
        self.sent += 1
        self.in_flight += 1


class _ChunkList:
    """A plain sequence of chunks, served as an async iterator."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


def _async_chunks(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, bytes | bytearray):
        return _ChunkList([bytes(chunks)])
    if isinstance(chunks, AsyncIterable):
        return aiter(chunks)
    return _ChunkList(chunks)


async def _close_source(source: AsyncIterator[bytes]) -> None:
    # An async generator given by a mock must run its ``finally`` now, not at GC time.
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


class StreamResponse:
    """A reply whose headers are in and whose body arrives chunk by chunk.

    Read it once, in one task: :meth:`events` for an event stream, or :meth:`read` for the
    whole body (an error reply to a streaming request is an ordinary JSON body). The stream
    holds its connection until it is closed: reaching the end closes it, and so do
    :meth:`aclose` and leaving an ``async with`` block. Closing before the end drops the
    connection, so the upstream sees the caller leave and stops generating. After closing,
    ``read`` and ``events`` yield nothing more.

    A :class:`MockTransport` handler builds one to stream, e.g. a simulated generation::

        async def chunks():
            yield b"event: message_start\\ndata: {}\\n\\n"
            await asyncio.sleep(0.5)
            yield b'event: error\\ndata: {"error": {"type": "overloaded_error"}}\\n\\n'

        return StreamResponse(200, {"content-type": "text/event-stream"}, chunks())

    Args:
        status: the HTTP status code.
        headers: the reply headers (matched case-insensitively).
        chunks: the body, as an async iterable of byte chunks (an async generator) or a
            plain iterable of them; an exception it raises becomes a TransportError.
    """

    __slots__ = (
        "_closed",
        "_counters",
        "_finished",
        "_max_bytes",
        "_on_close",
        "_request",
        "_source",
        "headers",
        "status",
    )

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        chunks: AsyncIterable[bytes] | Iterable[bytes] = (),
    ) -> None:
        self.status = status
        self.headers: CIMultiDictProxy[str] = (
            headers
            if isinstance(headers, CIMultiDictProxy)
            else CIMultiDictProxy(CIMultiDict(headers or {}))
        )
        self._source = _async_chunks(chunks)
        self._request: Request | None = None
        self._counters: TransportCounters | None = None
        self._on_close: Callable[[bool], Awaitable[None]] | None = None
        self._max_bytes: int | None = None
        self._finished = False
        self._closed = False

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300

    @property
    def closed(self) -> bool:
        """True once the stream has ended or was closed."""
        return self._closed

    async def read(self) -> bytes:
        """Read the rest of the body and close the stream.

        Raises:
            TransportError: the connection failed or went silent before the end, or the
                body passed the transport's cap (reason ``"body_too_large"``).
        """
        parts: list[bytes] = []
        size = 0
        while (chunk := await self._next_chunk()) is not None:
            size += len(chunk)
            if self._max_bytes is not None and size > self._max_bytes:
                raise await self._too_large(f"a body of more than {self._max_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def events(self) -> AsyncIterator[SSEEvent]:
        """Iterate over the Server-Sent Events of the body; the stream closes at its end.

        Raises (from the iteration):
            TransportError: the connection failed or went silent before the end.
        """
        return _EventIterator(self)

    async def aclose(self) -> None:
        """Close the stream and give back (or drop, if unfinished) its connection."""
        if self._closed:
            return
        self._closed = True
        if self._counters is not None:
            self._counters.in_flight -= 1
        try:
            await _close_source(self._source)
        finally:
            if self._on_close is not None:
                await self._on_close(self._finished)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<StreamResponse status={self.status} {state}>"

    async def _too_large(self, what: str) -> TransportError:
        """Drop the connection and name the overflow (raise the result)."""
        if self._counters is not None:
            self._counters.failures += 1
        await self.aclose()
        request = self._request
        where = f"{request.method} {redact_url(request.url)}" if request is not None else "a stream"
        return TransportError(
            f"The reply to {where} sent {what}, past the transport's cap; "
            "the connection was dropped.",
            reason="body_too_large",
        )

    async def _next_chunk(self) -> bytes | None:
        """The next chunk of the body, or None at its end (the stream is then closed)."""
        if self._closed:
            return None
        timeout = self._request.timeout if self._request is not None else None
        try:
            async with asyncio.timeout(timeout):
                chunk = await anext(self._source)
        except StopAsyncIteration:
            self._finished = True
            await self.aclose()
            return None
        except QuotaError:
            # A mock's chunks may raise a typed error on purpose: it passes unchanged.
            if self._counters is not None:
                self._counters.failures += 1
            await self.aclose()
            raise
        except Exception as exc:
            await self.aclose()
            raise count_failure(exc, self._request, self._counters, streaming=True) from exc
        return chunk


class _EventIterator:
    """The events of one stream, parsed as its chunks arrive."""

    __slots__ = ("_ended", "_parser", "_pending", "_stream")

    def __init__(self, stream: StreamResponse) -> None:
        self._stream = stream
        self._parser = SSEParser(max_event_chars=stream._max_bytes)
        self._pending: collections.deque[SSEEvent] = collections.deque()
        self._ended = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SSEEvent:
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            chunk = await self._stream._next_chunk()
            if chunk is None:
                self._ended = True
                if self._stream._finished:  # not after an early close: that event is cut off
                    self._pending.extend(self._parser.flush())
            else:
                try:
                    self._pending.extend(self._parser.feed(chunk))
                except ValueError:
                    self._ended = True
                    limit = self._stream._max_bytes
                    raise await self._stream._too_large(
                        f"an event of more than {limit} characters"
                    ) from None
        return self._pending.popleft()


def bind_stream(
    stream: StreamResponse,
    request: Request,
    counters: TransportCounters,
    on_close: Callable[[bool], Awaitable[None]] | None = None,
    max_bytes: int | None = None,
) -> StreamResponse:
    """Bind a stream to the attempt it answers, so it can count, time out, cap and clean up."""
    stream._request = request
    stream._counters = counters
    stream._on_close = on_close
    stream._max_bytes = max_bytes
    return stream


class Transport(Protocol):
    """Sends one request, returns one response; maps its own failures to TransportError."""

    async def send(self, request: Request) -> Response:
        """Send ``request`` once and return the full response.

        Raises:
            TransportError: no usable reply (refused, reset, timed out, not HTTP).
        """
        ...

    async def open_stream(self, request: Request) -> StreamResponse:
        """Send ``request`` once and return as soon as the reply headers are in.

        The caller must close the returned stream (``async with`` or ``aclose()``); it
        holds a connection until then.

        Raises:
            TransportError: no reply headers (refused, reset, timed out, not HTTP).
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the transport sends nothing afterwards."""
        ...


# aiohttp reports a reset seen while reading as a bare ClientOSError, not a ConnectionError.
_LOST_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})


def transport_error(
    exc: BaseException, request: Request | None, *, streaming: bool = False
) -> TransportError:
    """Name in one sentence what went wrong with ``request``, keeping secrets out."""
    where = f"{request.method} {redact_url(request.url)}" if request is not None else "the stream"
    detail = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    detail = redact_text(detail, request.url) if request is not None else redact_text(detail)
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    # Parser errors span several lines; a message is one sentence on one line.
    detail = " ".join(detail.split()).rstrip(". ")
    timeout = request.timeout if request is not None else None
    within = f"within {timeout:g} s" if timeout is not None else "in time"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        message, reason = (
            f"Could not connect to the upstream for {where} in time ({detail}).",
            "connect_failed",
        )
    elif isinstance(exc, TimeoutError):
        message = (
            f"The stream from {where} went silent: no data came {within}."
            if streaming
            else f"{where} did not get a complete reply {within}."
        )
        reason = "timeout"
    elif isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        message, reason = (
            f"Could not connect to the upstream for {where} ({detail}).",
            "connect_failed",
        )
    elif isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | ConnectionError
    ) or (isinstance(exc, OSError) and exc.errno in _LOST_ERRNOS):
        message = f"The connection for {where} was lost before the reply was complete ({detail})."
        reason = "connection_lost"
    elif isinstance(exc, aiohttp.ClientResponseError):
        message, reason = f"{where} got a reply that is not valid HTTP ({detail}).", "bad_reply"
    else:
        message, reason = f"{where} failed ({detail}).", "transport"
    return TransportError(message, reason=reason)


def count_failure(
    exc: Exception,
    request: Request | None,
    counters: TransportCounters | None,
    *,
    streaming: bool = False,
) -> TransportError:
    """Count a failed attempt and name it as a TransportError (raise it ``from exc``)."""
    if counters is not None:
        counters.failures += 1
    return transport_error(exc, request, streaming=streaming)


def closed_error(name: str) -> TransportError:
    return TransportError(f"The {name} is closed and sends nothing more.", reason="closed")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _pool_counts(connector: aiohttp.BaseConnector | None) -> tuple[int, int]:
    """(open, in use) sockets of an aiohttp connector, 0 where its internals are unknown.

    aiohttp has no public counters; ``_acquired`` (sockets lent out) and ``_conns`` (idle
    sockets per host) have been stable for years, and a change there must not break sends.
    """
    try:
        in_use = len(getattr(connector, "_acquired", ()))
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
    except (AttributeError, TypeError):
        return 0, 0
    return idle + in_use, in_use


def check_pool_settings(
    max_connections: int, connect_timeout: float, keepalive: float, max_body_bytes: int
) -> None:
    """Refuse, in a sentence, a connection pool's setting that cannot work.

    Raises:
        ValueError: a non-integer or non-positive limit, a non-positive duration.
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
        raise ValueError(f"max_body_bytes must be an integer, not {type(max_body_bytes).__name__}.")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be at least 1, not {max_body_bytes}.")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ValueError(
            f"max_connections must be an integer, not {type(max_connections).__name__}."
        )
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}.")
    if not connect_timeout > 0:
        raise ValueError(f"connect_timeout must be positive, not {connect_timeout}.")
    if not keepalive > 0:
        raise ValueError(f"keepalive must be positive, not {keepalive}.")


class AiohttpTransport:
    """Sends attempts over one pooled aiohttp session with a bounded number of sockets.

    However many callers wait, at most ``max_connections`` sockets open; the rest wait for
    a pooled connection (keep-alive reuses them). The session is created on first use, in
    the running event loop (so the transport can be built outside one), and belongs to
    that loop. Works on the standard loop and on uvloop.

    Cancelling a caller cancels its attempt: an unfinished connection is closed, so the
    upstream sees the caller leave and the pool gets the slot back. Redirects are not
    followed: one attempt is one HTTP exchange, and a 3xx is returned as it came.

    Args:
        max_connections: the most sockets open at once (to each host and in total).
        connect_timeout: seconds to open a socket (TLS included); waiting for a pooled
            connection is bounded by the request's own timeout instead.
        keepalive: seconds an idle socket stays open for reuse.
        session: a session to use instead of creating one. Its connector then rules
            (``max_connections`` and ``keepalive`` do not apply), and ``aclose`` leaves it
            open: it is yours.
        max_body_bytes: the largest reply body ``send`` reads, and the largest event (or
            line) a stream's :meth:`~StreamResponse.events` holds, or a stream's
            :meth:`~StreamResponse.read` returns. Past it the attempt fails with a
            TransportError of reason ``"body_too_large"`` and its connection is dropped;
            nothing past the cap is buffered. A ``Content-Length`` above it fails before
            the body is read.

    Raises:
        ValueError: a non-positive limit or duration.
    """

    __slots__ = (
        "_closed",
        "_connect_timeout",
        "_counters",
        "_keepalive",
        "_max_body",
        "_max_connections",
        "_owns_session",
        "_session",
    )

    def __init__(
        self,
        *,
        max_connections: int = 100,
        connect_timeout: float = 10.0,
        keepalive: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        check_pool_settings(max_connections, connect_timeout, keepalive, max_body_bytes)
        self._max_connections = max_connections
        self._max_body = max_body_bytes
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._session = session
        self._owns_session = session is None
        self._counters = TransportCounters()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    @property
    def max_connections(self) -> int | None:
        """The most requests its pool sends at once (None: a given session without a bound).

        The Shaper never lets more than this be in flight, so no request waits inside the
        pool, behind the queue's back.
        """
        if self._owns_session:
            return self._max_connections
        connector = self._session.connector if self._session is not None else None
        limit = getattr(connector, "limit", 0)
        return limit if isinstance(limit, int) and limit > 0 else None

    async def send(self, request: Request) -> Response:
        """Send ``request`` once and return the full response.

        Raises:
            TransportError: no usable reply (see the module docstring for the reasons).
        """
        session = self._ready_session()
        timeout = aiohttp.ClientTimeout(total=request.timeout, sock_connect=self._connect_timeout)
        self._counters.begin()
        try:
            reply = await session.request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.body,
                timeout=timeout,
                allow_redirects=False,
            )
            try:
                body = await self._read_capped(reply, request)
            finally:
                # What ``async with`` on the request would do on leaving (aiohttp's
                # ``ClientResponse.__aexit__``), without the four coroutines of its two
                # context managers: give the connection back, wait for the writer.
                reply.release()
                await reply.wait_for_close()
            return Response(reply.status, reply.headers, body)
        except TransportError:
            self._counters.failures += 1
            raise
        except Exception as exc:
            raise count_failure(exc, request, self._counters) from exc
        finally:
            self._counters.in_flight -= 1

    async def _read_capped(self, reply: aiohttp.ClientResponse, request: Request) -> bytes:
        """The whole body, or a TransportError (connection closed) once it passes the cap."""
        cap = self._max_body
        declared = reply.content_length
        parts: list[bytes] = []
        size = 0
        if declared is None or declared <= cap:
            # ``iter_any`` without its iterator: ``readany`` gives b"" at the end, and an
            # iterator's StopAsyncIteration costs more than the chunk it ends on.
            content = reply.content
            while chunk := await content.readany():
                size += len(chunk)
                if size > cap:
                    break
                parts.append(chunk)
            else:
                return b"".join(parts)
        reply.close()  # the rest is never read: the socket goes, not back to the pool
        said = (
            f"a body of {declared} bytes"
            if declared is not None and declared > cap
            else (f"a body of more than {cap} bytes")
        )
        raise TransportError(
            f"The reply to {request.method} {redact_url(request.url)} had {said}, past the "
            f"transport's cap of {cap}; the connection was dropped.",
            reason="body_too_large",
        )

    async def open_stream(self, request: Request) -> StreamResponse:
        """Send ``request`` once; return a stream as soon as the reply headers are in.

        Raises:
            TransportError: no reply headers (see the module docstring for the reasons).
        """
        session = self._ready_session()
        # The stream's length is unknown: only the wait for headers and each silence after
        # them are bounded (by the request's timeout), never the whole stream.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
        self._counters.begin()
        try:
            async with asyncio.timeout(request.timeout):
                reply = await session.request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    data=request.body,
                    timeout=timeout,
                    allow_redirects=False,
                )
        except BaseException as exc:
            self._counters.in_flight -= 1
            if isinstance(exc, Exception):
                raise count_failure(exc, request, self._counters) from exc
            raise

        async def on_close(finished: bool) -> None:
            if finished:
                reply.release()
            else:
                reply.close()

        stream = StreamResponse(reply.status, reply.headers, reply.content.iter_any())
        return bind_stream(stream, request, self._counters, on_close, self._max_body)

    async def aclose(self) -> None:
        """Close the session this transport created (never one it was given)."""
        if self._closed:
            return
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    def statistics(self) -> TransportStatistics:
        """A snapshot of the attempts and of the connection pool."""
        connector = self._session.connector if self._session is not None else None
        connections_open, connections_in_use = _pool_counts(connector)
        if connector is not None:
            limit = connector.limit or None
        else:
            limit = self._max_connections if self._owns_session else None
        return TransportStatistics(
            requests_sent=self._counters.sent,
            failures=self._counters.failures,
            in_flight=self._counters.in_flight,
            connections_open=connections_open,
            connections_in_use=connections_in_use,
            connection_limit=limit,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        limit = stats.connection_limit if stats.connection_limit is not None else "unbounded"
        return (
            f"<AiohttpTransport {'closed' if self._closed else 'open'}"
            f" connections={stats.connections_open}/{limit}"
            f" in_use={stats.connections_in_use} in_flight={stats.in_flight}"
            f" sent={stats.requests_sent} failures={stats.failures}>"
        )

    def _ready_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise closed_error("transport")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=self._max_connections,
                keepalive_timeout=self._keepalive,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=_json_dumps,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
        return self._session


MockHandler = Callable[[Request], Awaitable[Response | StreamResponse] | Response | StreamResponse]
"""What answers a MockTransport: a function (plain or async) of the request."""


class MockTransport:
    """A transport whose upstream is a function: for tests and the simulator.

    The handler gets each :class:`Request` and returns (or awaits to) a :class:`Response`,
    or a :class:`StreamResponse` to stream a body over (virtual) time. Either kind serves
    both ``send`` (a stream is read to the end) and ``open_stream`` (a plain body becomes a
    one-chunk stream). The request's timeout is enforced as the real transport does.

    An exception the handler (or its chunks) raises becomes a TransportError, so
    ``raise ConnectionResetError`` simulates a reset connection; a QuotaError passes
    through unchanged.

    Args:
        handler: the function that answers.
    """

    __slots__ = ("_closed", "_counters", "_handler")

    def __init__(self, handler: MockHandler) -> None:
        if not callable(handler):
            raise ValueError(f"The handler must be callable, not {type(handler).__name__}.")
        self._handler = handler
        self._counters = TransportCounters()
        self._closed = False

    @property
    def calls(self) -> int:
        """How many attempts the handler has been asked to answer."""
        return self._counters.sent

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    async def send(self, request: Request) -> Response:
        """Ask the handler; return its response (a streamed one read to the end).

        Raises:
            TransportError: the handler raised, took longer than the request's timeout, or
                the transport is closed.
        """
        if self._closed:
            raise closed_error("mock transport")
        self._counters.begin()
        try:
            async with asyncio.timeout(request.timeout):
                reply = await self._answer(request)
                if isinstance(reply, Response):
                    return reply
                try:
                    body = b"".join([chunk async for chunk in reply._source])
                finally:
                    await _close_source(reply._source)
                return Response(reply.status, reply.headers, body)
        except QuotaError:
            self._counters.failures += 1
            raise
        except Exception as exc:
            raise count_failure(exc, request, self._counters) from exc
        finally:
            self._counters.in_flight -= 1

    async def open_stream(self, request: Request) -> StreamResponse:
        """Ask the handler; return its reply as a stream.

        Raises:
            TransportError: the handler raised, took longer than the request's timeout, or
                the transport is closed.
        """
        if self._closed:
            raise closed_error("mock transport")
        self._counters.begin()
        try:
            async with asyncio.timeout(request.timeout):
                reply = await self._answer(request)
        except BaseException as exc:
            self._counters.in_flight -= 1
            if isinstance(exc, QuotaError):
                self._counters.failures += 1
            elif isinstance(exc, Exception):
                raise count_failure(exc, request, self._counters) from exc
            raise
        if isinstance(reply, Response):
            reply = StreamResponse(reply.status, reply.headers, [reply.body])
        return bind_stream(reply, request, self._counters)

    async def aclose(self) -> None:
        """Refuse further attempts (they raise TransportError with reason ``"closed"``)."""
        self._closed = True

    def statistics(self) -> TransportStatistics:
        """A snapshot of the attempts (a mock has no sockets: those counts are 0)."""
        return TransportStatistics(
            requests_sent=self._counters.sent,
            failures=self._counters.failures,
            in_flight=self._counters.in_flight,
            connections_open=0,
            connections_in_use=0,
            connection_limit=None,
        )

    def __repr__(self) -> str:
        counters = self._counters
        return (
            f"<MockTransport {'closed' if self._closed else 'open'} calls={counters.sent}"
            f" in_flight={counters.in_flight} failures={counters.failures}>"
        )

    async def _answer(self, request: Request) -> Response | StreamResponse:
        reply = self._handler(request)
        if inspect.isawaitable(reply):
            reply = await reply
        if not isinstance(reply, Response | StreamResponse):
            raise TypeError(
                f"A mock handler must return a Response or a StreamResponse, "
                f"not {type(reply).__name__}."
            )
        return reply
