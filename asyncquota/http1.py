"""The Shaper's default transport: HTTP/1.1 keep-alive connections on asyncio protocols.

Why not aiohttp's ``ClientSession`` here: measured with ``benchmarks/overhead.py``, its
layers (request and response objects, header multidicts built twice, timers, traces, a
writer and a reader stream per reply) cost about three times what one exchange needs,
and that cost is paid on every request the Shaper sends. :class:`HttpTransport` does one
exchange with one write and one parse: the request head is one string written with its
body; the reply is parsed where it lands (``data_received``), and the caller's future gets
the status, the headers and the whole body at once. aiohttp still serves everything else
(the proxy, the simulator, :class:`~asyncquota.transport.AiohttpTransport` for a session
of one's own).

What it speaks: HTTP/1.1 over TCP or TLS, one request at a time on a connection
(no pipelining), bodies framed by ``Content-Length``, chunked or read until the close;
``Content-Encoding`` gzip and deflate (advertised); interim 1xx replies skipped. What
it refuses, as a :class:`~asyncquota.errors.TransportError` of reason ``bad_reply``: a
status line or header line that is not HTTP, obsolete line folding, a chunk size that is
not hex, ``Content-Length`` values that disagree or come with ``Transfer-Encoding``, a
transfer or content coding it cannot decode, a head over 64 KiB. It follows no redirect
and no proxy (use ``AiohttpTransport`` with a session for those).

A host's addresses are connected to as aiohttp does (happy eyeballs: the next address is
tried a quarter second into a connect that has not answered). The pool: at most
``max_connections`` sockets, open or opening, to all hosts together;
an idle socket is reused last-in first-out and closed after ``keepalive`` seconds, or at
once when the upstream closes it. Callers beyond the bound wait first-in first-out, within
their own timeout. A connection is reused only after a complete reply that did not say
``Connection: close`` (HTTP/1.0: only with ``keep-alive``) and had nothing after its end.
A caller cancelled mid-exchange closes its connection, so the upstream sees it leave.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import re
import socket
import ssl as ssl_module
import zlib
from typing import Any, Final, Self
from urllib.parse import quote, unquote, urlsplit

import aiohappyeyeballs
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import TransportError
from .transport import (
    MAX_BODY_BYTES,
    Request,
    Response,
    StreamResponse,
    TransportCounters,
    TransportStatistics,
    bind_stream,
    check_pool_settings,
    closed_error,
    count_failure,
)
from .urls import redact_text, redact_url

__all__ = ["HttpTransport"]

MAX_HEAD_BYTES: Final = 64 * 1024
"""The longest reply head (status line and headers) read; past it the reply is refused."""

MAX_LINE_BYTES: Final = 8 * 1024
"""The longest chunk-size or trailer line read."""

HAPPY_EYEBALLS_DELAY: Final = 0.25
"""Seconds one address of a host has to connect before the next is tried as well
(aiohttp's default, and RFC 8305's recommendation)."""

STREAM_HIGH: Final = 1024 * 1024
"""A stream stops reading from its socket while this much is buffered and unread..."""

STREAM_LOW: Final = 256 * 1024
"""...and starts again once its reader has brought it under this."""

_URL_CACHE: Final = 256
_USER_AGENT: Final = "asyncquota (python; HTTP/1.1)"

# Reply states: what the bytes that come next are.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_EOF, _DONE = range(9)

# Request headers the transport writes itself (a caller's own are dropped) or writes only
# when the caller did not (a caller's own are kept).
_DROP, _HOST, _AGENT, _ACCEPT, _ENCODING, _AUTH = 0, 1, 2, 4, 8, 16
_SPECIAL: Final = {
    "content-length": _DROP,
    "transfer-encoding": _DROP,
    "connection": _DROP,
    "keep-alive": _DROP,
    "host": _HOST,
    "user-agent": _AGENT,
    "accept": _ACCEPT,
    "accept-encoding": _ENCODING,
    "authorization": _AUTH,
}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE: Final = _PATH_SAFE + "?"
_BODYLESS_STATUS: Final = frozenset({204, 304})
_WITH_EMPTY_BODY: Final = frozenset({"POST", "PUT", "PATCH"})
_NO_HEADERS: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())
_TOKENS_SEEN: set[str] = set()
"""Methods and header names checked once to be HTTP tokens (bounded: cleared when full)."""


class _Failed(Exception):
    """What went wrong on a connection, before the request it served is named."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _bad(detail: str) -> _Failed:
    return _Failed("bad_reply", detail)


class _Target:
    """One URL taken apart once: where to connect and what to write."""

    __slots__ = ("auth", "host", "host_header", "key", "port", "server_hostname", "target", "tls")

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _Failed("transport", f"the URL is malformed: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _Failed("transport", f"the URL's scheme is {scheme or 'missing'}, not http(s)")
        host = parts.hostname
        if not host:
            raise _Failed("transport", "the URL names no host")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise _Failed("transport", f"the URL's host is not a valid name: {exc}") from None
        self.tls = scheme == "https"
        default_port = 443 if self.tls else 80
        self.port = port or default_port
        self.host = host
        self.key = (scheme, host, self.port)
        shown = f"[{host}]" if ":" in host else host
        self.server_hostname = host if self.tls else None
        self.target = _quoted(parts.path or "/", _PATH_SAFE) + (
            "?" + _quoted(parts.query, _QUERY_SAFE) if parts.query else ""
        )
        self.auth: str | None = None
        if parts.username is not None or parts.password is not None:
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self.host_header = shown if self.port == default_port else f"{shown}:{self.port}"


def _quoted(text: str, safe: str) -> str:
    """``text`` as it goes on the request line: what is already valid passes unchanged."""
    if text.isascii() and text.isprintable() and " " not in text:
        return text
    return quote(text, safe=safe)


class _Connection(asyncio.Protocol):
    """One socket to the upstream, carrying one exchange at a time.

    The reply is parsed as its bytes land. A whole reply (``send``) resolves the waiter
    once, complete; a stream resolves it when the head is in, and then each time a piece
    of the body (or its end, or a failure) arrives.
    """

    __slots__ = (
        "_body",
        "_buffer",
        "_buffered",
        "_cap",
        "_decoder",
        "_failure",
        "_head_only",
        "_keep",
        "_lost_hook",
        "_paused",
        "_remaining",
        "_size",
        "_state",
        "_streaming",
        "_waiter",
        "headers",
        "idle_since",
        "key",
        "lost",
        "reusable",
        "status",
        "transport",
    )

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reusable = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: CIMultiDictProxy[str] | None = None
        self._lost_hook: Any = None
        self._state = _IDLE
        self._buffer = b""
        self._waiter: asyncio.Future[None] | None = None
        self._failure: _Failed | None = None
        self._head_only = False
        self._keep = False
        self._streaming = False
        self._cap = 0
        self._size = 0
        self._remaining = 0
        self._decoder: Any = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False

    # -- the exchange, from the caller's side

    def begin(
        self, data: bytes, *, head_only: bool, cap: int, streaming: bool
    ) -> asyncio.Future[None]:
        """Write a request; the future resolves when the reply (or its head) is in."""
        assert self.transport is not None and self._state is _IDLE
        self._state = _HEAD
        self._head_only = head_only
        self._cap = cap
        self._streaming = streaming
        self._size = 0
        self._failure = None
        self._decoder = None
        self._buffer = b""
        self.reusable = False
        self._body.clear()
        self._buffered = 0
        waiter = self._waiter = _loop_future()
        self.transport.write(data)
        return waiter

    def body(self) -> bytes:
        """The whole body of a complete reply."""
        parts = self._body
        if len(parts) == 1:
            return parts.popleft()
        body = b"".join(parts)
        parts.clear()
        return body

    def expire(self) -> None:
        """The attempt's time is up: fail whoever waits (the connection is then dropped)."""
        self._fail(_Failed("timeout", "no complete reply in time"))

    def abort(self, failure: _Failed | None = None) -> None:
        """Close the socket at once (the exchange, if any, fails with ``failure``)."""
        if failure is not None:
            self._fail(failure)
        self.lost = True
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    async def next_chunk(self) -> bytes | None:
        """A stream's next piece of body, or None at its end."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < STREAM_LOW and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self._failure is not None:
                raise self._failure
            if self._state is _DONE:
                return None
            waiter = self._waiter = _loop_future()
            await waiter

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._state is _IDLE or self._state is _DONE:
            # Bytes nobody asked for: whatever the socket carries next cannot be trusted.
            self.reusable = False
            if self._state is _IDLE:  # idle in the pool: out of it, its slot freed
                self.abort()
                if self._lost_hook is not None:
                    self._lost_hook(self)
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        try:
            self._parse(data)
        except _Failed as failure:
            self.abort(failure)
        except zlib.error as exc:
            self.abort(_bad(f"the compressed body is corrupt: {exc}"))

    def eof_received(self) -> bool | None:
        self._closed_by_peer(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_peer(exc)
        self.transport = None

    # -- parsing

    def _parse(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state is _LENGTH or state is _CHUNK_DATA:
                remaining = self._remaining
                if end - pos < remaining:
                    self._remaining = remaining - (end - pos)
                    self._take(data[pos:] if pos else data)
                    return
                self._take(data[pos : pos + remaining])
                pos += remaining
                self._remaining = 0
                if state is _LENGTH:
                    self._complete(pos < end)
                    return
                self._state = _CHUNK_END
            elif state is _HEAD:
                cut = data.find(b"\r\n\r\n", pos)
                if cut < 0:
                    if end - pos > MAX_HEAD_BYTES:
                        raise _bad(f"a reply head of more than {MAX_HEAD_BYTES} bytes")
                    self._buffer = data[pos:]
                    return
                if cut - pos > MAX_HEAD_BYTES:
                    raise _bad(f"a reply head of more than {MAX_HEAD_BYTES} bytes")
                self._head(data[pos:cut])
                pos = cut + 4
                if self._state is _DONE:  # a reply without a body
                    self._complete(pos < end)
                    return
            elif state is _CHUNK_SIZE or state is _TRAILER:
                cut = data.find(b"\r\n", pos)
                if cut < 0:
                    if end - pos > MAX_LINE_BYTES:
                        raise _bad(f"a chunk-size or trailer line of over {MAX_LINE_BYTES} bytes")
                    self._buffer = data[pos:]
                    return
                line = data[pos:cut]
                pos = cut + 2
                if state is _TRAILER:
                    if not line:
                        self._complete(pos < end)
                        return
                    continue  # trailer fields are not kept
                size = _chunk_size(line)
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILER
            elif state is _CHUNK_END:
                if end - pos < 2:
                    self._buffer = data[pos:]
                    return
                if data[pos : pos + 2] != b"\r\n":
                    raise _bad("a chunk does not end with CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state is _UNTIL_EOF:
                self._take(data[pos:] if pos else data)
                return
            else:  # _DONE within this read: bytes after the reply's end
                self.reusable = False
                return

    def _head(self, block: bytes) -> None:
        """Read a reply head; set the state its body is framed by."""
        lines = block.decode("latin-1").split("\r\n")
        status_line = lines[0]
        if (
            len(status_line) < 12
            or not status_line.startswith("HTTP/1.")
            or status_line[8] != " "
            or not status_line[9:12].isdigit()
            or (len(status_line) > 12 and status_line[12] != " ")
            or status_line[7] not in "01"
        ):
            raise _bad(f"the status line is {status_line[:80]!r}")
        status = int(status_line[9:12])
        if status < 100:
            raise _bad(f"the status line is {status_line[:80]!r}")
        if 100 <= status < 200:
            if status == 101:
                raise _bad("the upstream switched protocols, which was not asked for")
            return  # an interim reply: the real one follows
        keep_alive = status_line[7] == "1"
        length: int | None = None
        chunked = False
        coding = ""
        pairs: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name[0] in " \t" or name[-1] in " \t" or " " in name:
                raise _bad(f"a header line is {line[:80]!r}")
            value = value.strip(" \t")
            pairs.append((name, value))
            low = name.lower()
            if low == "content-length":
                length = _content_length(value, length)
            elif low == "transfer-encoding":
                codings = [c.strip().lower() for c in value.split(",") if c.strip()]
                if codings != ["chunked"] or chunked:
                    raise _bad(f"a Transfer-Encoding of {value[:80]!r}, not chunked")
                chunked = True
            elif low == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens:
                    keep_alive = True
            elif low == "content-encoding":
                coding = value.strip().lower()
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(pairs))
        self._keep = keep_alive
        if self._head_only or status in _BODYLESS_STATUS:
            self._state = _DONE
            self._wake_stream()
            return
        if chunked and length is not None:
            raise _bad("both Content-Length and Transfer-Encoding frame the body")
        if coding and coding != "identity":
            if coding in ("gzip", "x-gzip"):
                self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif coding == "deflate":
                self._decoder = _Deflate()
            else:
                raise _bad(f"a Content-Encoding of {coding[:40]!r}, which was not offered")
        else:
            self._decoder = None
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not self._streaming and length > self._cap:
                raise _Failed("body_too_large", f"a body of {length} bytes")
            self._remaining = length
            self._state = _LENGTH if length else _DONE
        else:
            self._keep = False
            self._state = _UNTIL_EOF
        if self._state is not _DONE:
            self._wake_stream()

    def _take(self, chunk: bytes) -> None:
        """A piece of the body, as framed: decoded, counted, kept or handed to the reader."""
        decoder = self._decoder
        if decoder is not None:
            room = self._cap - self._size if not self._streaming else STREAM_HIGH
            chunk = decoder.decompress(chunk, room + 1)
            if not self._streaming and (len(chunk) > room or decoder.unconsumed_tail):
                raise _Failed("body_too_large", f"a body of more than {self._cap} bytes")
            while self._streaming and decoder.unconsumed_tail:
                self._keep_chunk(chunk)
                chunk = decoder.decompress(decoder.unconsumed_tail, STREAM_HIGH)
            if not chunk:
                return
        self._keep_chunk(chunk)

    def _keep_chunk(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._streaming:
            self._body.append(chunk)
            self._buffered += len(chunk)
            if self._buffered > STREAM_HIGH and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake_stream()
            return
        self._size += len(chunk)
        if self._size > self._cap:
            raise _Failed("body_too_large", f"a body of more than {self._cap} bytes")
        self._body.append(chunk)

    def _complete(self, trailing: bool) -> None:
        """The reply is whole: wake the caller; say whether the socket may serve again."""
        decoder = self._decoder
        if decoder is not None:
            self._decoder = None
            self._keep_chunk(decoder.flush())
        self._state = _DONE
        self.reusable = self._keep and not trailing and not self.lost
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_stream(self) -> None:
        waiter = self._waiter
        if self._streaming and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: _Failed) -> None:
        if self._state is _DONE or self._state is _IDLE or self._failure is not None:
            return
        self._failure = failure
        self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(failure)

    def _closed_by_peer(self, exc: Exception | None) -> None:
        was_lost = self.lost
        self.lost = True
        self.reusable = False
        if self._state is _UNTIL_EOF:
            try:
                self._complete(False)
            except (_Failed, zlib.error) as failure:
                self._fail(
                    failure if isinstance(failure, _Failed) else _bad(f"corrupt body: {failure}")
                )
        elif exc is not None:
            lost = _Failed("connection_lost", f"{type(exc).__name__}: {exc}")
            lost.__cause__ = exc
            self._fail(lost)
        else:
            self._fail(_Failed("connection_lost", "the upstream closed the connection"))
        if not was_lost and self._lost_hook is not None:
            self._lost_hook(self)


class _Deflate:
    """``deflate`` as servers send it: zlib-wrapped as the RFC says, or raw as some do."""

    __slots__ = ("_inner",)

    def __init__(self) -> None:
        self._inner: Any = None

    @property
    def unconsumed_tail(self) -> bytes:
        return self._inner.unconsumed_tail if self._inner is not None else b""

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if self._inner is None:
            if not data:
                return b""
            wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        out: bytes = self._inner.decompress(data, max_length)
        return out

    def flush(self) -> bytes:
        return self._inner.flush() if self._inner is not None else b""


def _loop_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


def _chunk_size(line: bytes) -> int:
    text = line.split(b";", 1)[0].strip(b" \t")
    if not text or len(text) > 16:
        raise _bad(f"a chunk size of {line[:40]!r}")
    try:
        return int(text, 16)
    except ValueError:
        raise _bad(f"a chunk size of {line[:40]!r}") from None


def _content_length(value: str, before: int | None) -> int:
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise _bad(f"Content-Length values that disagree ({value[:80]!r})")
    text = values.pop()
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise _bad(f"a Content-Length of {value[:80]!r}")
    length = int(text)
    if before is not None and before != length:
        raise _bad("Content-Length values that disagree")
    return length


class HttpTransport:
    """Sends attempts over a bounded pool of HTTP/1.1 keep-alive connections.

    However many callers wait, at most ``max_connections`` sockets open (to all hosts
    together); the rest wait, first come first served, for one to be free. The pool
    belongs to the event loop of its first request. Works on the standard loop and on
    uvloop. See the module docstring for what it speaks and refuses.

    Args:
        max_connections: the most sockets open at once.
        connect_timeout: seconds to open a socket (TLS included); waiting for a free
            connection is bounded by the request's own timeout instead.
        keepalive: seconds an idle socket stays open for reuse.
        max_body_bytes: the largest reply body ``send`` reads (after decompression), and
            the largest event (or line) a stream's :meth:`~StreamResponse.events` holds, or
            a stream's :meth:`~StreamResponse.read` returns. Past it the attempt fails with
            a TransportError of reason ``"body_too_large"`` and its connection is dropped.
        ssl_context: the TLS settings for ``https`` (default: the system's trusted
            certificates, host names checked).

    Raises:
        ValueError: a non-positive limit or duration.
    """

    __slots__ = (
        "_closed",
        "_connect_timeout",
        "_conns",
        "_counters",
        "_idle",
        "_in_use",
        "_keepalive",
        "_loop",
        "_max_body",
        "_max_connections",
        "_open",
        "_ssl",
        "_sweep",
        "_targets",
        "_waiters",
    )

    def __init__(
        self,
        *,
        max_connections: int = 100,
        connect_timeout: float = 10.0,
        keepalive: float = 30.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        ssl_context: ssl_module.SSLContext | None = None,
    ) -> None:
        check_pool_settings(max_connections, connect_timeout, keepalive, max_body_bytes)
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._max_body = max_body_bytes
        self._ssl = ssl_context
        self._counters = TransportCounters()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._conns: set[_Connection] = set()
        self._open = 0  # sockets open or opening (the bound), idle ones included
        self._in_use = 0
        self._waiters: collections.deque[
            tuple[tuple[str, str, int], asyncio.Future[_Connection | None]]
        ] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    @property
    def max_connections(self) -> int:
        """The most requests its pool sends at once.

        The Shaper never lets more than this be in flight, so no request waits inside the
        pool, behind the queue's back.
        """
        return self._max_connections

    async def send(self, request: Request) -> Response:
        """Send ``request`` once and return the full response.

        Raises:
            TransportError: no usable reply (see :mod:`asyncquota.transport` for the
                reasons).
        """
        if self._closed:
            raise closed_error("transport")
        self._counters.begin()
        try:
            conn = await self._exchange(request, streaming=False)
            reply = Response(conn.status, conn.headers or _NO_HEADERS, conn.body())
            self._give_back(conn)
            return reply
        except Exception as exc:
            error = self._failed(exc, request)
            raise error from error.__cause__
        finally:
            self._counters.in_flight -= 1

    async def open_stream(self, request: Request) -> StreamResponse:
        """Send ``request`` once; return a stream as soon as the reply headers are in.

        Raises:
            TransportError: no reply headers (see :mod:`asyncquota.transport`).
        """
        if self._closed:
            raise closed_error("transport")
        counters = self._counters
        counters.begin()
        try:
            conn = await self._exchange(request, streaming=True)
        except BaseException as exc:
            counters.in_flight -= 1  # an open stream counts until it is closed
            if isinstance(exc, Exception):
                error = self._failed(exc, request)
                raise error from error.__cause__
            raise

        async def on_close(finished: bool) -> None:
            if not finished:
                conn.abort()
            self._give_back(conn)

        headers = conn.headers or _NO_HEADERS
        stream = StreamResponse(conn.status, headers, _StreamBody(conn, request, self._max_body))
        return bind_stream(stream, request, counters, on_close, self._max_body)

    async def _exchange(self, request: Request, *, streaming: bool) -> _Connection:
        """Write ``request`` on a connection (idle, new or given back) and wait for the
        whole reply, or only its head when ``streaming``, within the request's timeout.

        The connection is the caller's to give back; on failure it is dropped here.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        target = self._targets.get(request.url) or self._target(request.url)
        data = _encode(request, target)
        deadline = None if request.timeout is None else loop.time() + request.timeout
        conn = self._take_idle(target.key, loop) or await self._acquire(target, deadline)
        try:
            waiter = conn.begin(
                data, head_only=request.method == "HEAD", cap=self._max_body, streaming=streaming
            )
            if deadline is None:
                await waiter
            else:
                timer = loop.call_at(deadline, conn.expire)
                try:
                    await waiter
                finally:
                    timer.cancel()
        except BaseException:
            conn.abort()
            self._give_back(conn)
            raise
        return conn

    def _failed(self, exc: Exception, request: Request) -> TransportError:
        """Count a failed attempt; the TransportError to raise ``from`` its ``__cause__``."""
        if isinstance(exc, _Failed):
            self._counters.failures += 1
            return _error(exc, request, self._max_body)
        if isinstance(exc, TransportError):
            self._counters.failures += 1
            return exc
        error = count_failure(exc, request, self._counters)
        error.__cause__ = exc
        return error

    async def aclose(self) -> None:
        """Close every connection; the transport sends nothing afterwards.

        Exchanges still in flight fail with a TransportError of reason ``"closed"``.
        """
        if self._closed:
            return
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        closed = _Failed("closed", "the transport was closed")
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(closed)
        self._idle.clear()
        for conn in list(self._conns):
            conn.abort(closed)
        self._conns.clear()
        self._open = self._in_use = 0
        await asyncio.sleep(0)  # let the sockets' close callbacks run

    def statistics(self) -> TransportStatistics:
        """A snapshot of the attempts and of the connection pool."""
        return TransportStatistics(
            requests_sent=self._counters.sent,
            failures=self._counters.failures,
            in_flight=self._counters.in_flight,
            connections_open=self._open,
            connections_in_use=self._in_use,
            connection_limit=self._max_connections,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<HttpTransport {'closed' if self._closed else 'open'}"
            f" connections={stats.connections_open}/{stats.connection_limit}"
            f" in_use={stats.connections_in_use} in_flight={stats.in_flight}"
            f" sent={stats.requests_sent} failures={stats.failures}>"
        )

    # -- the pool

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None and self._conns:
            raise RuntimeError(
                "This transport's connections belong to another event loop; make one "
                "transport per loop."
            )
        self._loop = loop

    def _target(self, url: str) -> _Target:
        target = _Target(url)
        if len(self._targets) >= _URL_CACHE:
            self._targets.clear()
        self._targets[url] = target
        return target

    def _take_idle(
        self, key: tuple[str, str, int], loop: asyncio.AbstractEventLoop
    ) -> _Connection | None:
        """The most recently used idle connection to ``key`` that may still serve."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = loop.time()
        while idle:
            conn = idle.pop()
            if not conn.lost and now - conn.idle_since < self._keepalive:
                self._in_use += 1
                return conn
            self._drop(conn, wake=False)
        return None

    async def _acquire(self, target: _Target, deadline: float | None) -> _Connection:
        """A connection to ``target``: a free one, a new one, or one given back (waiting)."""
        assert self._loop is not None
        waiters = self._waiters
        while waiters and waiters[0][1].done():  # callers who left: timed out, cancelled
            waiters.popleft()
        if self._open >= self._max_connections and not waiters:
            self._evict_idle()
        if self._open < self._max_connections and not waiters:
            self._open += 1
            return await self._connect(target, deadline)
        waiter: asyncio.Future[_Connection | None] = self._loop.create_future()
        waiters.append((target.key, waiter))
        timer = None if deadline is None else self._loop.call_at(deadline, _time_out, waiter)
        try:
            conn = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._return_grant(waiter.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if conn is not None:
            return conn
        return await self._connect(target, deadline)  # a slot was kept for this caller

    def _return_grant(self, conn: _Connection | None) -> None:
        """A waiter left after being granted: the connection (or the slot) goes on."""
        if conn is not None:
            self._give_back(conn)
        else:
            self._open -= 1
            self._wake()

    async def _connect(self, target: _Target, deadline: float | None) -> _Connection:
        """Open a socket (its slot already counted in ``_open``)."""
        loop = self._loop
        assert loop is not None
        ssl_context: ssl_module.SSLContext | None = None
        if target.tls:
            if self._ssl is None:
                self._ssl = ssl_module.create_default_context()
            ssl_context = self._ssl
        connect_by = loop.time() + self._connect_timeout
        by_deadline = deadline is not None and deadline <= connect_by
        key = target.key
        try:
            async with asyncio.timeout_at(deadline if by_deadline else connect_by):
                sock, conn = await _open_socket(loop, target, key, ssl_context)
        except BaseException as exc:
            if self._closed:
                if isinstance(exc, Exception):
                    raise _Failed("closed", "the transport was closed") from None
                raise
            self._open -= 1
            self._wake()
            if isinstance(exc, TimeoutError):
                if by_deadline:
                    raise
                raise _Failed(
                    "connect_failed", f"no connection within {self._connect_timeout:g} s"
                ) from None
            if isinstance(exc, OSError):
                raise _Failed("connect_failed", f"{type(exc).__name__}: {exc}") from exc
            raise
        if self._closed:
            conn.abort()
            raise _Failed("closed", "the transport was closed")
        if conn.transport is None:  # uvloop may call connection_made a step later
            conn.transport = sock  # type: ignore[assignment]  # uvloop's is not a subclass
        conn._lost_hook = self._idle_lost
        self._conns.add(conn)
        self._in_use += 1
        return conn

    def _give_back(self, conn: _Connection) -> None:
        """An exchange is over: hand the connection on, keep it idle, or drop it."""
        if self._closed:  # its slot went with the pool
            conn.abort()
            return
        self._in_use -= 1
        if not conn.reusable or conn.lost or self._closed:
            self._drop(conn)
            return
        conn._state = _IDLE
        conn.headers = None
        conn._waiter = None
        waiters = self._waiters
        while waiters:
            key, waiter = waiters.popleft()
            if waiter.done():
                continue
            if key == conn.key:
                self._in_use += 1
                waiter.set_result(conn)
            else:  # its slot goes to a caller of another host
                self._forget(conn)
                conn.abort()
                self._open += 1
                waiter.set_result(None)
            return
        assert self._loop is not None
        conn.idle_since = self._loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._keepalive, self._sweep_idle)

    def _drop(self, conn: _Connection, *, wake: bool = True) -> None:
        """Close a connection and free its slot."""
        if conn in self._conns:
            self._forget(conn)
            conn.abort()
            self._open -= 1
            if wake:
                self._wake()

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        conn._lost_hook = None

    def _wake(self) -> None:
        """A slot is free: keep it for the first caller still waiting."""
        waiters = self._waiters
        while waiters and self._open < self._max_connections:
            _, waiter = waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    def _evict_idle(self) -> None:
        """At the bound with callers of another host: close one idle socket for them."""
        for idle in self._idle.values():
            if idle:
                self._drop(idle.pop(0), wake=False)
                return

    def _idle_lost(self, conn: _Connection) -> None:
        """The upstream closed a socket: out of the idle list, its slot freed."""
        if conn._state is not _IDLE:
            return  # in an exchange: its caller drops it
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            self._drop(conn)

    def _sweep_idle(self) -> None:
        """Close idle sockets past ``keepalive``; come back for the next to expire."""
        assert self._loop is not None
        self._sweep = None
        now = self._loop.time()
        soonest: float | None = None
        for idle in self._idle.values():
            for conn in [c for c in idle if now - c.idle_since >= self._keepalive]:
                idle.remove(conn)
                self._drop(conn)
            for conn in idle:
                expiry = conn.idle_since + self._keepalive
                soonest = expiry if soonest is None or expiry < soonest else soonest
        if soonest is not None:
            self._sweep = self._loop.call_at(soonest, self._sweep_idle)


async def _open_socket(
    loop: asyncio.AbstractEventLoop,
    target: _Target,
    key: tuple[str, str, int],
    ssl_context: ssl_module.SSLContext | None,
) -> tuple[asyncio.BaseTransport, _Connection]:
    """A connected socket to ``target``, its protocol a fresh :class:`_Connection`.

    The host's addresses are tried as aiohttp tries them (RFC 8305's happy eyeballs, with
    aiohttp's own ``aiohappyeyeballs``): the next starts when the last has not connected
    within ``HAPPY_EYEBALLS_DELAY``, so an address that swallows its connects (a broken
    IPv6 route) costs a quarter second, not the connect timeout. uvloop's
    ``create_connection`` tries them one after another.
    """
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address found for {target.host}")
    sock = await aiohappyeyeballs.start_connection(
        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
    )
    try:
        transport, conn = await loop.create_connection(
            lambda: _Connection(key),
            sock=sock,
            ssl=ssl_context,
            server_hostname=target.server_hostname,
        )
    except BaseException:
        sock.close()
        raise
    return transport, conn


class _StreamBody:
    """A stream's body chunks, read from its connection as they arrive."""

    __slots__ = ("_cap", "_conn", "_request")

    def __init__(self, conn: _Connection, request: Request, cap: int) -> None:
        self._conn = conn
        self._request = request
        self._cap = cap

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._conn.next_chunk()
        except _Failed as failure:
            error = _error(failure, self._request, self._cap, streaming=True)
            raise error from error.__cause__
        if chunk is None:
            raise StopAsyncIteration
        return chunk


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _encode(request: Request, target: _Target) -> bytes:
    """The request's head and body, as written on the socket.

    Raises:
        _Failed: a header name or value would break the head (CR, LF, a name that is
            not a token): nothing is sent.
    """
    method = request.method
    lines = [method, " ", target.target, " HTTP/1.1\r\n"]
    seen = 0
    expected = 1
    for name, value in request.headers.items():
        flag = _SPECIAL.get(name.lower())
        if flag is not None:
            if flag == _DROP:
                continue
            seen |= flag
        lines += (name, ": ", value, "\r\n")
        expected += 1
    if not seen & _HOST:
        lines += ("Host: ", target.host_header, "\r\n")
        expected += 1
    if not seen & _AGENT:
        lines.append("User-Agent: " + _USER_AGENT + "\r\n")
        expected += 1
    if not seen & _ACCEPT:
        lines.append("Accept: */*\r\n")
        expected += 1
    if not seen & _ENCODING:
        lines.append("Accept-Encoding: gzip, deflate\r\n")
        expected += 1
    if target.auth is not None and not seen & _AUTH:
        lines += ("Authorization: ", target.auth, "\r\n")
        expected += 1
    body = request.body
    if body is not None:
        lines += ("Content-Length: ", str(len(body)), "\r\n\r\n")
        expected += 2
    elif method in _WITH_EMPTY_BODY:
        lines.append("Content-Length: 0\r\n\r\n")
        expected += 2
    else:
        lines.append("\r\n")
        expected += 1
    head = "".join(lines)
    if head.count("\n") != expected or head.count("\r") != expected:
        raise _Failed("transport", "a header name or value holds a line break; nothing was sent")
    _check_token(method, "the method")
    for name in request.headers:
        _check_token(name, "a header name")
    data = head.encode("utf-8")
    return data + body if body else data


def _check_token(text: str, what: str) -> None:
    if text in _TOKENS_SEEN:
        return
    if _TOKEN.fullmatch(text) is None:
        raise _Failed("transport", f"{what} is not an HTTP token; nothing was sent")
    if len(_TOKENS_SEEN) >= _URL_CACHE:
        _TOKENS_SEEN.clear()
    _TOKENS_SEEN.add(text)


def _error(
    failure: _Failed, request: Request, cap: int, *, streaming: bool = False
) -> TransportError:
    """Name ``failure`` of ``request`` in one sentence, keeping secrets out."""
    where = f"{request.method} {redact_url(request.url)}"
    detail = " ".join(redact_text(failure.detail, request.url).split()).rstrip(". ")
    reason = failure.reason
    if reason == "connect_failed":
        message = f"Could not connect to the upstream for {where} ({detail})."
    elif reason == "connection_lost":
        message = f"The connection for {where} was lost before the reply was complete ({detail})."
    elif reason == "bad_reply":
        message = f"{where} got a reply that is not valid HTTP ({detail})."
    elif reason == "body_too_large":
        message = (
            f"The reply to {where} had {detail}, past the transport's cap of {cap}; "
            "the connection was dropped."
        )
    elif reason == "closed":
        message = f"{where} was not completed: the transport was closed."
    elif reason == "timeout":
        within = f"within {request.timeout:g} s" if request.timeout is not None else "in time"
        message = (
            f"The stream from {where} went silent: no data came {within}."
            if streaming
            else f"{where} did not get a complete reply {within}."
        )
    else:
        message = f"{where} failed ({detail})."
    error = TransportError(message, reason=reason)
    # What the socket raised, if anything did (raise it ``from error.__cause__``); a timer's
    # end is a TimeoutError.
    error.__cause__ = failure.__cause__ or (TimeoutError() if reason == "timeout" else None)
    return error

