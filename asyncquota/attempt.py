"""One attempt: send with the grant, read what came back, feed it to the controls.

    grant (permit, reservation, probe) ─► send ─► classify the reply
        success      the limit gets a sample, the tokens are reconciled with the usage,
                     the headers re-anchor the gates' mirrors
        congestion   a rate-limit refusal: the pace, the mirrors and the cooldown answer
                     it; a crowd refusal also cuts the concurrency limit, at once
        other        the limit learns nothing; the error is built for the caller
        no reply     a timeout is a congestion signal; a connection never made cost no
                     tokens

Every attempt ends its grant exactly once (or hands it on, whole, to a stream's lease)
and comes back as the upstream's :class:`~asyncquota.transport.Response` or as a
:class:`~asyncquota.ticket.Failure` carrying the error and whether it may be retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import TYPE_CHECKING

from .errors import (
    DeadlineExceededError,
    OverloadedError,
    QuotaExhaustedError,
    ThrottledError,
    TransportError,
    UpstreamError,
)
from .hooks import Replied, Throttled
from .priority import describe_priority
from .signals import Classification, Outcome, classify_error_body, retry_after_form
from .ticket import Failure
from .tokens import usage_tokens
from .transport import Response

if TYPE_CHECKING:
    from .admission import Admission
    from .feedback import Feedback
    from .gates import Reservation
    from .hooks import Reporter
    from .limiter import ConcurrencyLimiter, Permit
    from .ticket import Ticket

__all__ = ["Attempts", "upstream_error"]

USAGE_CEILING = 4
"""A reply's usage is charged up to this many times its request's estimate (plus 1 024
tokens): more than any real request uses (the estimate counts 4 bytes a token and the
whole ``max_tokens``), little enough that garbage cannot freeze the token gate."""


_SUCCESS = Outcome.SUCCESS
"""Looked up once: an enum member read through its class costs as much as a call."""


class Attempts:
    """Sends granted tickets once each and feeds each outcome back.

    Args:
        limiter: the concurrency limit (each attempt ends its permit).
        feedback: the reading of the upstream's signals (cooldown, pace, mirrors).
        admission: where the reply time is kept and a cooldown ends doomed waiters.
        reporter: the counters and the hooks.
        timeout: the longest one attempt may take (seconds).
    """

    __slots__ = ("_admission", "_feedback", "_limiter", "_reporter", "_timeout")

    def __init__(
        self,
        *,
        limiter: ConcurrencyLimiter,
        feedback: Feedback,
        admission: Admission,
        reporter: Reporter,
        timeout: float,
    ) -> None:
        self._limiter = limiter
        self._feedback = feedback
        self._admission = admission
        self._reporter = reporter
        self._timeout = timeout

    async def send(self, ticket: Ticket) -> Response | Failure:
        """Send ``ticket`` once with the grant it holds; account for what came back.

        A held ticket (a stream) that succeeds keeps its grant on the ticket.

        Raises:
            DeadlineExceededError: its deadline passed before or while it was sent.
            DeadlineUnreachableError: less is left than a reply takes; not sent.
        """
        permit, reservation = ticket.permit, ticket.reservation
        assert permit is not None and reservation is not None
        ticket.permit = ticket.reservation = None
        probe, ticket.probe = ticket.probe, 0
        feedback, admission = self._feedback, self._admission
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self._timeout
        if ticket.deadline is not None:
            left = ticket.deadline - now
            if left < timeout:  # min(), without the builtin's call: once a request
                timeout = left
            if timeout <= 0 or timeout < admission.rtt:
                permit.ignore()
                reservation.cancel()
                feedback.lost(probe)
                if timeout <= 0:
                    raise _deadline_error(ticket, "before it could be sent", now)
                # It would use up the upstream's quota only to be cut off at its deadline.
                raise admission.too_late(ticket, timeout)
        self._reporter.sent += 1
        ticket.sent += 1
        feedback.sent(now, probe)
        sent_at = now
        try:
            reply = await ticket.send(timeout)
        except asyncio.CancelledError:
            # The upstream may have started on it: keep the tokens charged, learn nothing.
            permit.ignore()
            reservation.reconcile(reservation.estimate)
            feedback.lost(probe)
            raise
        except TransportError as exc:
            feedback.lost(probe)
            return self._transport_failed(ticket, exc, permit, reservation, loop.time())
        now = loop.time()
        ok = reply.ok
        verdict = classify_error_body(
            reply.status,
            reply.body,
            None if ok else reply.headers,
            now=None if ok else feedback.reply_time(reply.headers, now - sent_at),
        )
        # The reservation is settled before the headers are read: they re-anchor the
        # mirrors at what the upstream counted, this request's own usage included.
        reporter = self._reporter
        if verdict.kind is _SUCCESS:
            admission.replied(now - sent_at)
            used: int | None = None
            if ticket.hold:
                ticket.permit, ticket.reservation = permit, reservation
            else:
                permit.success()
                used = usage_tokens(reply.body)
                # One reply may not charge more than a request could plausibly use: a
                # usage of 5e7 tokens would hold the token gate for minutes.
                charged = reservation.estimate
                if used is not None:
                    ceiling = USAGE_CEILING * charged + 1024
                    charged = ceiling if ceiling < used else used  # min(used, ceiling)
                reservation.reconcile(charged)
            if not feedback.ample(reply.headers, now):
                feedback.observe(reply.headers, now, sent_at, ticket)
            feedback.succeeded(now, probe, sent_at)
            if reporter.tracing():
                self._replied(ticket, reply.status, now, sent_at, reservation.estimate, used)
            return reply
        if reporter.tracing():
            self._replied(ticket, reply.status, now, sent_at, reservation.estimate, None)
        reservation.cancel()
        feedback.observe(reply.headers, now, sent_at, ticket)
        if verdict.congestion:
            limiter = self._limiter
            kind = feedback.refusal(verdict.retry_after, verdict.message)
            if kind == "rate" or (kind == "unknown" and 2 * limiter.inflight < limiter.capacity):
                # A refusal that names a rate (a Retry-After, nothing left in a window),
                # or one that may while few were in flight, is not a sign of too many in
                # flight: the pace, the mirrors and the cooldown answer it; the
                # concurrency limit keeps still.
                permit.ignore()
            elif kind == "crowd" and verdict.kind is Outcome.THROTTLED:
                # A 429 that says outright: too many of ours in flight. Cut now. (An
                # overloaded service's 503 / 529 may come at random: the tolerance bears
                # those.)
                permit.crowded()
            else:
                permit.dropped()
            reporter.throttled += 1
            feedback.congested(
                now,
                sent_at,
                verdict.retry_after,
                probe,
                rate_limited=verdict.kind is Outcome.THROTTLED,
                rtt=admission.rtt,
                form=retry_after_form(reply.headers),
                message=verdict.message,
            )
            admission.end_outlasted(now)
            if reporter.hooks:
                reporter.emit(
                    Throttled, ticket, now, status=reply.status, retry_after=verdict.retry_after
                )
        else:
            permit.ignore()
            feedback.lost(probe)
        return Failure(
            upstream_error(
                f"{ticket.method} {ticket.path} got HTTP {reply.status}",
                reply.status,
                reply.body,
                verdict,
                priority=ticket.priority,
                tenant=ticket.tenant,
            ),
            retryable=verdict.retryable,
            retry_after=verdict.retry_after,
            congestion=verdict.congestion,
            probe=bool(probe) and verdict.congestion,
        )

    def _replied(
        self,
        ticket: Ticket,
        status: int,
        now: float,
        sent_at: float,
        reserved: int,
        used: int | None,
    ) -> None:
        self._reporter.emit(
            Replied,
            ticket,
            now,
            status=status,
            seconds=now - sent_at,
            stream=ticket.hold,
            reserved_tokens=reserved,
            used_tokens=used,
        )

    def _transport_failed(
        self,
        ticket: Ticket,
        exc: TransportError,
        permit: Permit,
        reservation: Reservation,
        now: float,
    ) -> Failure:
        """Account for an attempt that got no usable reply; say whether to retry it."""
        deadline = ticket.deadline
        if exc.reason == "timeout" and deadline is not None and now >= deadline - 1e-6:
            permit.ignore()
            reservation.reconcile(reservation.estimate)
            raise _deadline_error(ticket, "while it was in flight", now) from exc
        if exc.reason == "timeout":
            permit.dropped()  # an upstream too slow to answer is a congestion signal
        else:
            permit.ignore()
        if exc.reason == "connect_failed":
            reservation.cancel()  # nothing reached the upstream
        else:
            reservation.reconcile(reservation.estimate)
        exc.priority = describe_priority(ticket.priority)
        exc.tenant = ticket.tenant
        # A body over the cap would be over it again: not retried, like a closed pool.
        retryable = exc.reason not in ("closed", "body_too_large")
        return Failure(exc, retryable=retryable, retry_after=None)


def upstream_error(
    where: str,
    status: int,
    body: bytes,
    verdict: Classification,
    *,
    priority: int,
    tenant: Hashable | None,
) -> UpstreamError:
    """The typed error of a reply (or a stream's error event) classified ``verdict``.

    ``where`` opens its message: which request got what (``"POST /v1/x got HTTP 429"``).
    """
    kind = verdict.kind
    detail = f": {verdict.message}" if verdict.message else "."
    error_class: type[UpstreamError]
    if kind is Outcome.THROTTLED:
        error_class = ThrottledError
        wait = (
            f" and asked to wait {verdict.retry_after:g} s"
            if verdict.retry_after is not None
            else ""
        )
        message = f"{where}: the upstream is rate limiting{wait}{detail}"
    elif kind is Outcome.OVERLOADED:
        error_class = OverloadedError
        message = f"{where}: the upstream service is overloaded{detail}"
    elif kind is Outcome.QUOTA_EXHAUSTED:
        return QuotaExhaustedError(
            f"{where}: the account's quota or credit is exhausted{detail}",
            regain_at=verdict.regain_at,
            why=verdict.reason,
            status=status,
            body=body,
            priority=priority,
            tenant=tenant,
            retry_after=verdict.retry_after,
        )
    else:
        error_class = UpstreamError
        message = f"{where}{detail}"
    return error_class(
        message,
        status=status,
        body=body,
        reason=verdict.code if kind is Outcome.FATAL and verdict.code else None,
        priority=priority,
        tenant=tenant,
        retry_after=verdict.retry_after,
    )


def _deadline_error(ticket: Ticket, when: str, now: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"{ticket.method} {ticket.path} reached its deadline {when}, after "
        f"{now - ticket.started:.2f} s.",
        priority=ticket.priority,
        tenant=ticket.tenant,
    )
