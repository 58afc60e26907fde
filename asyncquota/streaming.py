"""Shaped streams: a Server-Sent Events reply that holds its permit until it ends.

    async with shaper.stream("POST", "/v1/messages", json={..., "stream": True}) as events:
        async for event in events:        # asyncquota.transport.SSEEvent
            print(event.event, event.data)

Entering the block does everything ``Shaper.request`` does up to the reply's headers:
queue, gates, retries of a 429/529 before the stream starts. A 2xx stream then keeps its
concurrency permit and its token reservation until it ends, because a generation in
progress is load on the upstream. How it ends decides what the adaptive limit learns:

- the stream runs to its end: a success (its duration is the RTT sample); the tokens are
  reconciled with the usage the stream reported (OpenAI's final ``usage`` chunk,
  Anthropic's ``message_start`` and ``message_delta``), else kept at the estimate;
- an error event in the stream (Anthropic's ``overloaded_error`` inside a 200, a
  ``rate_limit_error``): the same congestion signal as a 529 or a 429 (the limit is cut,
  a Retry-After closes the cooldown) and the iteration raises the matching typed error.
  A stream that already delivered events is not retried: the caller has seen part of it;
- the caller leaves early, or the connection breaks: nothing is learnt (ignore); the
  tokens stay charged at the estimate, since the upstream may have generated them.

The Shaper's deadline covers the wait up to the reply's headers; after that the attempt
timeout bounds each silence between chunks.

:class:`LeasedEvents` is that life on its own: a stream's events read under its lease,
the lease ended exactly once. ``ShapedStream`` raises an error event as a typed error;
the SDK transport (:mod:`asyncquota.sdk`) passes it on for the SDK to raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, Self

from .attempt import upstream_error
from .errors import ClosedError, QuotaError, UpstreamError
from .signals import Classification, Outcome, classify_stream_event
from .tokens import StreamUsage
from .transport import Response

if TYPE_CHECKING:
    from .limiter import Ending
    from .options import RequestOptions
    from .ticket import Lease, Send
    from .transport import Request, SSEEvent, StreamResponse, Transport

__all__ = ["LeasedEvents", "ShapedStream"]


class Leases(Protocol):
    """What a stream needs of its Shaper: its transport, and a turn with a held grant."""

    @property
    def transport(self) -> Transport:
        """The transport that opens the stream."""

    async def lease(
        self, send: Send, *, method: str, path: str, options: RequestOptions
    ) -> tuple[Response, Lease]:
        """A turn for ``send``, whose grant the returned lease holds (``Shaper.lease``)."""


class LeasedEvents:
    """A streamed reply's events, read under the lease that holds its grant.

    The lease ends exactly once, with what the stream's end teaches: it ran to its end
    (success; the usage it reported is charged), it carried an error event (dropped for
    a congestion signal, which the cooldown and the pace also hear as they would a 429 or
    a 529; else ignore), the connection broke or went silent (ignore), its reader was
    cancelled or its holder closed it early (ignore), or the Shaper shut down (ignore:
    the reader gets the ``closed`` error).

    Args:
        stream: the open 2xx stream.
        lease: the grant it holds (``Shaper.lease``).
        closed: makes the error a reader gets once the Shaper has shut the stream.
    """

    __slots__ = ("_closed", "_events", "_lease", "_reader", "_shut_down", "_stream", "_usage")

    def __init__(
        self, stream: StreamResponse, lease: Lease, *, closed: Callable[[], QuotaError]
    ) -> None:
        self._stream = stream
        self._events: AsyncIterator[SSEEvent] = stream.events()
        self._lease: Lease | None = lease
        self._closed = closed
        self._usage = StreamUsage()
        self._reader: asyncio.Task[Any] | None = None  # the task reading an event now
        self._shut_down = False
        lease.on_shutdown = self._shut

    async def next(self) -> tuple[SSEEvent, Classification | None] | None:
        """The next event, with its classification if it is an error event; None at the end.

        After an error event the lease has ended, and the next call returns None.

        Raises:
            QuotaError: the ``closed`` error once the Shaper shut the stream; a
                TransportError when the connection broke or went silent.
        """
        if self._lease is None:
            if self._shut_down:
                raise self._closed()
            return None
        reader = self._reader = asyncio.current_task()
        try:
            event = await anext(self._events)
        except asyncio.CancelledError:
            self._reader = None
            await self._end("ignore")  # the reader gave up: nothing held past it
            if not self._shut_down:
                raise
            if reader is not None:
                reader.uncancel()  # the Shaper's cancel, answered with its error
            raise self._closed() from None
        except StopAsyncIteration:
            self._reader = None
            await self._end("success")
            return None
        except QuotaError:  # the connection broke or went silent mid-stream
            self._reader = None
            await self._end("ignore")
            raise
        self._reader = None
        self._usage.feed(event.data)
        verdict = classify_stream_event(event.data)
        if verdict is not None:
            lease = self._lease
            await self._end("dropped" if verdict.congestion else "ignore")
            kind = verdict.kind
            if kind in (Outcome.OVERLOADED, Outcome.THROTTLED) and lease is not None:
                lease.congested(verdict.retry_after, rate_limited=kind is Outcome.THROTTLED)
        return event, verdict

    async def aclose(self) -> None:
        """Close the stream; one left before its end teaches the limit nothing."""
        await self._end("ignore")

    async def _shut(self) -> None:
        """The Shaper is closing: end the stream now; its reader gets the closed error.

        A reader waiting for the next event is cancelled and ends the stream itself
        (closing the source under a running reader would fail); otherwise it ends here.
        """
        self._shut_down = True
        reader = self._reader
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()
            return
        await self._end("ignore")

    async def _end(self, ending: Ending) -> None:
        """End the lease exactly once (see ``Lease.end``), and close the stream."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.end(ending, self._usage.total)
        await self._stream.aclose()


class ShapedStream:
    """An open event stream from the upstream, holding its permit until it ends.

    Made by :meth:`Shaper.stream`; use it as an async context manager and iterate it.
    Built on the Shaper's public :meth:`~asyncquota.Shaper.lease`.
    """

    __slots__ = ("_events", "_options", "_path", "_request", "_shaper", "_stream", "attempts")

    def __init__(
        self, shaper: Leases, request: Request, *, path: str, options: RequestOptions
    ) -> None:
        self._shaper = shaper
        self._request = request
        self._path = path
        self._options = options
        self._stream: StreamResponse | None = None
        self._events: LeasedEvents | None = None
        self.attempts = 0

    async def __aenter__(self) -> Self:
        """Wait for a turn and open the stream (retrying what may be retried).

        Raises:
            QuotaError: as ``Shaper.request`` does, when no stream could be opened.
        """
        transport = self._shaper.transport

        async def open_stream(budget: float | None) -> Response:
            # A 2xx stream is kept open for the reader; an error one is read whole, for
            # the Shaper to classify (and perhaps retry).
            stream = await transport.open_stream(replace(self._request, timeout=budget))
            if not stream.ok:
                return Response(stream.status, stream.headers, await stream.read())
            self._stream = stream
            return Response(stream.status, stream.headers)

        reply, lease = await self._shaper.lease(
            open_stream, method=self._request.method, path=self._path, options=self._options
        )
        self.attempts = reply.attempts
        assert self._stream is not None
        self._events = LeasedEvents(self._stream, lease, closed=self._closed_error)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the stream; a stream left before its end teaches the limit nothing."""
        if self._events is not None:
            await self._events.aclose()

    @property
    def status(self) -> int:
        """The reply's HTTP status (2xx: error replies raise instead)."""
        assert self._stream is not None
        return self._stream.status

    @property
    def headers(self) -> Mapping[str, str]:
        """The reply's headers (matched case-insensitively)."""
        assert self._stream is not None
        return self._stream.headers

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SSEEvent:
        got = None if self._events is None else await self._events.next()
        if got is None:
            raise StopAsyncIteration
        event, verdict = got
        if verdict is not None:
            raise self._stream_error(verdict)
        return event

    def _closed_error(self) -> ClosedError:
        return ClosedError(
            f"The Shaper shut down while the stream of {self._request.method} "
            f"{self._path} was open; it was closed.",
            priority=self._options.priority,
            tenant=self._options.tenant,
        )

    def _stream_error(self, verdict: Classification) -> UpstreamError:
        return upstream_error(
            f"The stream of {self._request.method} {self._path} broke off with an error "
            f"event ({verdict.code or verdict.kind.value})",
            self.status,
            b"",
            verdict,
            priority=self._options.priority,
            tenant=self._options.tenant,
        )
