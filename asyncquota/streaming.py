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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Self

import orjson

from .errors import ClosedError, OverloadedError, QuotaError, ThrottledError, UpstreamError
from .signals import Classification, Outcome, classify_stream_event
from .tokens import usage_from_mapping

if TYPE_CHECKING:
    from .gates import Reservation
    from .limiter import Permit
    from .shaper import Shaper, _Ticket
    from .transport import SSEEvent, StreamResponse

__all__ = ["ShapedStream"]


class ShapedStream:
    """An open event stream from the upstream, holding its permit until it ends.

    Made by :meth:`Shaper.stream`; use it as an async context manager and iterate it.
    """

    __slots__ = (
        "_events",
        "_input_tokens",
        "_output_tokens",
        "_permit",
        "_reader",
        "_reservation",
        "_shaper",
        "_shut_down",
        "_stream",
        "_ticket",
        "attempts",
    )

    def __init__(self, shaper: Shaper, ticket: _Ticket) -> None:
        self._shaper = shaper
        self._ticket = ticket
        self._stream: StreamResponse | None = None
        self._events: AsyncIterator[SSEEvent] | None = None
        self._permit: Permit | None = None
        self._reservation: Reservation | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self.attempts = 0
        self._reader: asyncio.Task[Any] | None = None  # the task reading an event now
        self._shut_down = False

    async def __aenter__(self) -> Self:
        """Wait for a turn and open the stream (retrying what may be retried).

        Raises:
            QuotaError: as ``Shaper.request`` does, when no stream could be opened.
        """
        shaper, ticket = self._shaper, self._ticket
        ticket.hold = True
        reply = await shaper._run(ticket, shaper._open_stream)
        self.attempts = reply.attempts
        self._stream = ticket.stream
        self._permit, self._reservation = ticket.permit, ticket.reservation
        ticket.stream = ticket.permit = ticket.reservation = None
        assert self._stream is not None
        self._events = self._stream.events()
        shaper._streams.add(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the stream; a stream left before its end teaches the limit nothing."""
        await self._end("ignore")

    @property
    def status(self) -> int:
        """The reply's HTTP status (2xx: error replies raise instead)."""
        assert self._stream is not None
        return self._stream.status

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SSEEvent:
        if self._events is None:
            if self._shut_down:
                raise self._closed_error()
            raise StopAsyncIteration
        reader = self._reader = asyncio.current_task()
        try:
            event = await anext(self._events)
        except asyncio.CancelledError:
            self._reader = None
            if not self._shut_down:
                raise
            if reader is not None:
                reader.uncancel()  # the Shaper's cancel, answered with a ClosedError
            await self._end("ignore")
            raise self._closed_error() from None
        except StopAsyncIteration:
            self._reader = None
            await self._end("success")
            raise
        except QuotaError:  # the connection broke or went silent mid-stream
            self._reader = None
            await self._end("ignore")
            raise
        self._reader = None
        self._count_usage(event.data)
        verdict = classify_stream_event(event.data)
        if verdict is not None:
            await self._end("dropped" if verdict.congestion else "ignore")
            raise self._stream_error(verdict)
        return event

    async def _shut(self) -> None:
        """The Shaper is closing: end the stream now; its reader gets a ClosedError.

        A reader waiting for the next event is cancelled and ends the stream itself
        (closing the source under a running reader would fail); otherwise it ends here.
        """
        self._shut_down = True
        reader = self._reader
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()
            return
        await self._end("ignore")

    def _closed_error(self) -> ClosedError:
        return ClosedError(
            f"The Shaper shut down while the stream of {self._ticket.method} "
            f"{self._ticket.path} was open; it was closed.",
            priority=self._ticket.priority,
            tenant=self._ticket.tenant,
        )

    async def _end(self, outcome: str) -> None:
        """End the permit and the reservation exactly once, and close the stream."""
        permit, reservation, stream = self._permit, self._reservation, self._stream
        self._permit = self._reservation = None
        self._events = None
        streams = self._shaper._streams
        streams.discard(self)
        if not streams:
            self._shaper._no_streams.set()
        if permit is not None:
            if outcome == "success":
                permit.success()
            elif outcome == "dropped":
                permit.dropped()
            else:
                permit.ignore()
        if reservation is not None:
            used = self._input_tokens + self._output_tokens
            reservation.reconcile(used if used and outcome == "success" else reservation.estimate)
        if stream is not None:
            await stream.aclose()

    def _count_usage(self, data: str) -> None:
        """Keep the largest input and output counts the stream has reported so far."""
        if '"usage"' not in data:
            return
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(document, dict):
            return
        message = document.get("message")
        usage = document.get("usage")
        if isinstance(message, dict) and isinstance(message.get("usage"), dict):
            usage = message["usage"]  # Anthropic's message_start
        if not isinstance(usage, dict):
            return
        parts = [usage.get(k) for k in ("prompt_tokens", "input_tokens")]
        inputs = max((v for v in parts if isinstance(v, int) and v > 0), default=0)
        total = usage_from_mapping(usage) or 0
        self._input_tokens = max(self._input_tokens, inputs)
        self._output_tokens = max(self._output_tokens, total - inputs)

    def _stream_error(self, verdict: Classification) -> UpstreamError:
        shaper, ticket = self._shaper, self._ticket
        kind, retry_after = verdict.kind, verdict.retry_after
        error_class: type[UpstreamError] = UpstreamError
        if kind is Outcome.OVERLOADED:
            error_class = OverloadedError
        elif kind is Outcome.THROTTLED:
            error_class = ThrottledError
        if kind in (Outcome.OVERLOADED, Outcome.THROTTLED):
            shaper._throttled += 1
            now = shaper._now()
            shaper._feedback.congested(
                now, now, retry_after, 0, rate_limited=kind is Outcome.THROTTLED
            )
        detail = f": {verdict.message}" if verdict.message else "."
        return error_class(
            f"The stream of {ticket.method} {ticket.path} broke off with an error event "
            f"({verdict.code or kind.value}){detail}",
            status=self.status,
            reason=None,
            priority=ticket.priority,
            tenant=ticket.tenant,
            retry_after=retry_after,
        )
