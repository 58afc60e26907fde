"""The Shaper: the whole request path, one object that async callers use instead of the upstream.

    caller ─► Shaper.request()   estimate tokens; refuse at once what cannot be served in time
              │
              ▼
            queue                priority class → tenant round robin → age; deadlines; bounded
              │  (only the head waits on the gates, so nothing after the queue reorders)
              ▼
            gates                cooldown (Retry-After) → requests/min → tokens/min → permit
              │
              ▼
            transport.send()     one attempt, bounded by the attempt timeout and the deadline
              │
              ▼
            classify             success | throttled | overloaded | retryable | quota | fatal
              │  feeds: the adaptive limit, the cooldown, the gates (rate-limit headers), tokens
              ▼
            done, or back into the queue (same priority, original age) within budget and deadline

The caller's own task sends its request once the dispatcher has admitted it, so cancelling
the caller cancels the upstream request, and every request ends exactly once: in a
:class:`~asyncquota.transport.Response` or in a :class:`~asyncquota.errors.QuotaError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson

from .backoff import RetryBudget, backoff_delay
from .errors import (
    BusyError,
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
from .feedback import Feedback
from .gates import CooldownGate, RateGate, Reservation, TokenGate
from .hooks import (
    Admitted,
    Completed,
    Event,
    Hook,
    LoggingHook,
    Queued,
    Retried,
    Shed,
    Throttled,
    logger,
)
from .limiter import ConcurrencyLimiter, Permit
from .limits import AIMD, Limit
from .middleware import ShaperMiddleware
from .priority import Priority, PriorityLike, coerce_priority, describe_priority
from .queue import PriorityQueue, QueueStatistics, Waiter
from .signals import Classification, Outcome, QuotaSnapshot, classify_error_body
from .streaming import ShapedStream
from .tokens import estimate_tokens, usage_tokens
from .transport import AiohttpTransport, Request, Response, StreamResponse, Transport
from .urls import check_headers, check_method, join_path, redact_url
from .window import SlidingCount

__all__ = ["Shaper", "ShaperStatistics"]

DEFAULT_MAX_CONNECTIONS = 512
"""The default transport's connection pool bound: replies take seconds, so a busy upstream has
hundreds in flight (aiohttp's own default of 100 would cap it at 100 / reply time)."""

UNBOUNDED_PER_MINUTE = 1e12
"""The rate of a gate with no configured quota: it only paces by the upstream's headers."""

AIMD_INITIAL, AIMD_MAX_LIMIT = 20, 10_000
"""The default limit's start and ceiling (the ceiling lowered to the transport's pool)."""

DROP_TOLERANCE = 0.03
LATENCY_ROOM = 0.15
BACKOFF_RATIO = 0.7
"""The default AIMD's cut (CUBIC's): with the latency brake holding the limit below an
upstream's slow zone, a refusal at its concurrency cap is a brush with it, and halving
left the upstream half idle for seconds (0.90-0.93 of the quota in the matrix's rows
with a cap; 0.94-1.0 at 0.7)."""
"""The default limit's share of congestion replies borne without a cut (see AIMD)."""

ESTIMATE_TRUST = 0.9
"""Share of its deadline a newcomer's estimated wait may fill: the estimate is a rate, and
a request admitted at the very edge is refused later, near its deadline, when it could
have been told at once."""

USAGE_CEILING = 4
"""A reply's usage is charged up to this many times its request's estimate (plus 1 024
tokens): more than any real request uses (the estimate counts 4 bytes a token and the
whole ``max_tokens``), little enough that garbage cannot freeze the token gate."""

STREAM_SHUTDOWN = 1.0
"""Seconds ``aclose`` waits, past its grace, for cancelled stream readers to end them."""

MIN_DEADLINE = 0.001
"""The shortest deadline a request may have (seconds): nothing is answered sooner."""

RTT_GAIN = 0.125
"""Weight of each new sample in the smoothed reply time (as TCP's SRTT)."""

SERVICE_RATE_WINDOW = 2.0
"""Seconds of admissions behind the service-rate estimate used to shed early (short, so
that capacity that drops is seen within a couple of seconds)."""

DEFAULT_MAX_WAIT: Mapping[int, float] = MappingProxyType(
    {int(Priority.CRITICAL): 5.0, int(Priority.INTERACTIVE): 2.0, int(Priority.BATCH): 120.0}
)
"""The longest a request of each class waits in line (seconds; see ``Shaper``'s
``max_wait``): a person waiting gets an answer or a "busy, retry in N s" within a couple
of seconds; background work may wait for minutes."""

STANDING_SHARE = 0.25
"""The share of its ``max_wait`` a standing queue of a class above batch is held to (CoDel's
target: interactive 2 s → 0.5 s)."""

STANDING_AFTER = 1.0
"""Seconds a class must have had waiters without a break to be a standing queue (CoDel's
interval): a burst that drains within it is absorbed up to ``max_wait``."""

STALL = 0.5
"""Seconds the dispatcher waits for a permit before telling the limit it has stalled (a
full limit, nothing back: long replies; see ``AIMD.on_stall``)."""

STALL_RETURNS = 4
"""A limit held the dispatcher most of a ``STALL`` has stalled only if fewer than one in
this many of its permits came back meanwhile: replies take more than ``STALL_RETURNS`` ×
``STALL`` seconds, and their successes clock its growth too slowly. Shorter replies clock
it themselves (and a limit they hold is one the upstream may be filling)."""

RECHECK_INTERVAL = 0.1
"""Seconds between two checks of the queue against the current service rate."""



@dataclass(frozen=True, slots=True)
class ShaperStatistics:
    """A snapshot of a Shaper's live state and its counters since it started.

    Attributes:
        queued: requests waiting, per priority class (only classes with waiters).
        inflight: requests sent and not yet answered.
        limit: the adaptive concurrency limit now.
        cooldown_until: loop time until which the upstream asked everyone to wait, if so.
        rpm_level, tpm_level: what the request and token gates hold now (None: no quota).
        service_rate: admissions per second lately (what early shedding divides by).
        quota: the upstream's last rate-limit headers, parsed.
        open_reservations, reserved_tokens: token reservations held and not yet settled
            (requests in flight, and the grant the dispatcher holds for the next head).
        permit_waiters: tasks waiting for a concurrency permit (the dispatcher at most).
        sent, ok, throttled, retried, shed, deadline, failed: counters. ``sent`` counts
            attempts; ``throttled`` counts congestion replies (429, 503, 529); ``shed``
            requests rejected unsent; ``deadline`` requests that ended by their deadline;
            ``failed`` requests that ended in any other error; ``cancelled`` requests
            whose caller gave up (cancelled the call) before they ended.
        pace: the requests per second learnt from refusals at the door (None: none).
        cooldown_probing: the cooldown holds, and a probe may end it early.
        punishing_upstream: the upstream was seen to punish sends inside its windows:
            they are honoured in full.
    """

    queued: tuple[tuple[Priority | int, int], ...]
    inflight: int
    limit: int
    cooldown_until: float | None
    rpm_level: float | None
    tpm_level: float | None
    service_rate: float
    quota: QuotaSnapshot | None
    open_reservations: int
    reserved_tokens: int
    permit_waiters: int
    sent: int
    ok: int
    throttled: int
    retried: int
    shed: int
    deadline: int
    failed: int
    cancelled: int = 0
    pace: float | None = None
    cooldown_probing: bool = False
    punishing_upstream: bool = False


class _Ticket:
    """One request's journey: what to send, its place in line, and the grant to send it."""

    __slots__ = (
        "attempt",
        "body",
        "cost",
        "deadline",
        "enqueued_at",
        "headers",
        "hold",
        "method",
        "path",
        "permit",
        "priority",
        "probe",
        "rate_mark",
        "reservation",
        "sent",
        "started",
        "stream",
        "tenant",
        "token_mark",
        "url",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        priority: int,
        tenant: Hashable | None,
        deadline: float | None,
        cost: int,
        now: float,
    ) -> None:
        self.method = method
        self.path = path
        self.url = url
        self.headers = headers
        self.body = body
        self.priority = priority
        self.tenant = tenant
        self.deadline = deadline
        self.cost = cost
        self.started = now
        self.enqueued_at = now
        self.attempt = 1
        self.sent = 0
        self.permit: Permit | None = None
        self.reservation: Reservation | None = None
        self.hold = False  # a stream: keep the grant past a 2xx until the stream ends
        self.stream: StreamResponse | None = None
        self.probe = 0  # the cooldown generation this attempt probes (0: not a probe)
        self.rate_mark = self.token_mark = 0.0  # the gates' ``taken`` when it was granted


class _Failure:
    """A failed attempt: the error to raise, unless the request may be retried.

    ``probe``: a refused probe of the cooldown. The Shaper chose to send it early; its
    refusal costs the request neither an attempt nor the retry budget.
    """

    __slots__ = ("congestion", "error", "probe", "retry_after", "retryable")

    def __init__(
        self,
        error: QuotaError,
        *,
        retryable: bool,
        retry_after: float | None,
        congestion: bool = False,
        probe: bool = False,
    ) -> None:
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after
        self.congestion = congestion
        self.probe = probe


Send = Callable[[_Ticket, float | None], Awaitable[Response]]


class Shaper:
    """Shapes the load a fleet of async callers puts on one rate-limited upstream.

    Use it as an async context manager and call :meth:`request` wherever the code called the
    upstream before. Requests wait in one priority queue; the head goes out when the
    cooldown, the rate gates and the adaptive concurrency limit allow, so the upstream is
    kept full but not flooded; what cannot be served before its deadline is refused at
    once with a ``retry_after``.

    Args:
        base_url: the upstream's base URL; request paths are joined to it, and nothing is
            ever sent elsewhere.
        limit: the concurrency algorithm (default ``AIMD(drop_tolerance=0.03,
            latency_room=0.15, backoff_ratio=0.7)``: slow start, cut to 70 % once per
            congestion episode, sporadic failures borne, no growth once replies slow
            down with the load; its ``max_limit`` is the transport's pool size).
            Whatever the algorithm, no more requests are in flight than the transport's
            ``max_connections``, when it has one (give your own limit that ``max_limit``
            too, so its cuts bite).
        rpm, tpm: the upstream's known requests and tokens per minute, if known. Without
            them the gates pace only by the upstream's rate-limit headers.
        max_attempts: attempts per request, first included.
        retry_budget: retries allowed per recent request, fleet-wide (0.1: one in ten).
        max_retry_after: the longest Retry-After honoured by retrying (seconds); a longer
            one ends the request with a ThrottledError carrying it.
        max_cooldown: the longest the fleet-wide cooldown holds on one reply's word
            (seconds); a Retry-After or date beyond it (``1e12``, a far-future date) holds
            this long at most, and probes may end it sooner. ``reopen()`` ends it now.
        max_queue: waiters the queue holds before it sheds the least important.
        max_wait: the longest a request of a class waits in line, by class (merged over
            ``DEFAULT_MAX_WAIT``: critical 5 s, interactive 2 s, batch 120 s; a rank
            not named takes the value of the next less important class named). A
            newcomer whose estimated wait is longer is refused at once with a
            ``BusyError`` (``retry_after``: the estimate); one still waiting at its
            ``max_wait`` leaves with one. A retry is bound by its deadline only. For
            classes more important than batch, a *standing* queue (one that has not
            drained for ``STANDING_AFTER`` seconds) is held to ``STANDING_SHARE`` of
            it, as CoDel holds its target delay: under overload the queue keeps only
            what keeps the upstream full, the rest is told "busy" at once, and those
            served are served fresh. Queued requests are re-checked against the current
            service rate every ``RECHECK_INTERVAL`` s, so a drop in capacity refuses the
            excess at once rather than near its deadline.
        default_deadline: seconds a request may take, queueing included, when the caller
            gives none (None: no deadline).
        timeout: the longest one attempt may take, in seconds.
        max_connections: the connection pool's bound (default transport only); also
            the most requests in flight.
        transport: how attempts are sent (default: a pooled aiohttp transport).
        headers: headers added to every request (credentials go here; never logged).
        hooks: instrumentation hooks (default: one LoggingHook).
        cooldown_ramp: seconds over which waiters resume after a cooldown (jitter).
        default_output_tokens: the output allowance of a request that names no max_tokens.
        shutdown_grace: seconds in-flight requests get to finish when the Shaper closes.
        seed: seeds the jitter, for reproducible runs.
        wall_clock: Unix time, used only to read HTTP-date and RFC 3339 values in replies
            that carry no ``Date`` header (everything else runs on the event loop's clock).

    Raises:
        ValueError: a configuration value out of range.
    """

    def __init__(
        self,
        base_url: str,
        *,
        limit: Limit | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        max_attempts: int = 4,
        retry_budget: float = 0.1,
        max_retry_after: float = 300.0,
        max_cooldown: float = 3600.0,
        max_queue: int = 100_000,
        max_wait: Mapping[PriorityLike, float] | None = None,
        default_deadline: float | None = 60.0,
        timeout: float = 120.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        transport: Transport | None = None,
        headers: Mapping[str, str] | None = None,
        hooks: Sequence[Hook] | None = None,
        cooldown_ramp: float = 1.0,
        default_output_tokens: int = 256,
        shutdown_grace: float = 10.0,
        seed: int | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            shown = redact_url(base_url) if isinstance(base_url, str) else type(base_url).__name__
            raise ValueError(f"base_url must be an http:// or https:// URL, not {shown!r}.")
        join_path(base_url.rstrip("/"), "/")  # no query, no control character
        check_headers(headers or {})
        _check("max_attempts", max_attempts, minimum=1, integer=True)
        _check("retry_budget", retry_budget, minimum=0)
        _check("max_cooldown", max_cooldown, minimum=0, strict=True)
        _check("max_retry_after", max_retry_after, minimum=0)
        _check("max_queue", max_queue, minimum=1, integer=True)
        waits = dict(DEFAULT_MAX_WAIT)
        for priority, seconds in (max_wait or {}).items():
            _check(f"max_wait[{priority!r}]", seconds, minimum=0, strict=True)
            waits[coerce_priority(priority)] = float(seconds)
        self._max_waits = tuple(sorted(waits.items()))
        self._max_wait_of: dict[int, float] = {}  # by rank, as first asked for
        if default_deadline is not None:
            _check("default_deadline", default_deadline, minimum=0, strict=True)
        _check("timeout", timeout, minimum=0, strict=True)
        _check("shutdown_grace", shutdown_grace, minimum=0)
        _check("default_output_tokens", default_output_tokens, minimum=0, integer=True)
        self.base_url = base_url.rstrip("/")
        self._max_attempts = max_attempts
        self._max_retry_after = float(max_retry_after)
        self._default_deadline = default_deadline
        self._timeout = float(timeout)
        self.default_output_tokens = default_output_tokens
        self._shutdown_grace = float(shutdown_grace)
        self._wall_clock = wall_clock
        self._headers = dict(headers or {})
        self._hooks: tuple[Hook, ...] = tuple(hooks) if hooks is not None else (LoggingHook(),)
        self._rng = random.Random(seed)
        self._transport: Transport = transport or AiohttpTransport(max_connections=max_connections)
        self._rpm = rpm
        self._tpm = tpm
        self._queue: PriorityQueue[_Ticket] = PriorityQueue(
            maxsize=max_queue, on_expire=self._waited_too_long
        )
        self._recheck_timer: asyncio.TimerHandle | None = None
        self._limit_bound = 0.0  # seconds the dispatcher waited on the limit lately
        self._stall_check_at = -math.inf
        self._stall_returned = 0  # permits ended by the last stall check
        # A transport with a bounded pool says how many it sends at once: more in flight
        # would wait inside the pool, in its order rather than the queue's, unseen.
        pool = getattr(self._transport, "max_connections", None)
        pool = pool if isinstance(pool, int) and pool >= 1 else None
        if limit is None:
            ceiling = min(pool or AIMD_MAX_LIMIT, AIMD_MAX_LIMIT)
            limit = AIMD(
                drop_tolerance=DROP_TOLERANCE,
                latency_room=LATENCY_ROOM,
                backoff_ratio=BACKOFF_RATIO,
                initial=min(AIMD_INITIAL, ceiling),
                max_limit=ceiling,
            )
        self._limiter = ConcurrencyLimiter(limit, ceiling=pool)
        self._rate = RateGate(per_minute=rpm if rpm is not None else UNBOUNDED_PER_MINUTE)
        self._tokens = TokenGate(per_minute=tpm if tpm is not None else UNBOUNDED_PER_MINUTE)
        self._cooldown = CooldownGate(ramp=cooldown_ramp, rng=self._rng)
        self._feedback = Feedback(
            cooldown=self._cooldown,
            rate=self._rate,
            tokens=self._tokens,
            rpm=self._rate.per_minute,
            wall_clock=wall_clock,
            max_cooldown=float(max_cooldown),
        )
        self._budget = RetryBudget(ratio=retry_budget)
        self._served = SlidingCount(window=SERVICE_RATE_WINDOW)
        self._first_served: float | None = None
        self._rtt = 0.0  # smoothed seconds from send to a successful reply
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop start() ran on
        self._work = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._active: set[asyncio.Task[Any]] = set()  # tasks with a request under way
        self._idle = asyncio.Event()
        self._closing: set[asyncio.Task[Any]] = set()  # those aclose had to cancel
        self._state = "new"
        self._shed_rank, self._shed_until = int(Priority.BATCH), -math.inf  # see shed_below
        self._sent = self._ok = self._throttled = self._retried = 0
        self._shed = self._deadline_count = self._failed = self._cancelled = 0
        self._streams: set[ShapedStream] = set()  # open streams, each holding its permit
        self._no_streams = asyncio.Event()  # set when the last open stream ends

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Shaper:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start dispatching (``async with`` does this). Needs a running event loop.

        Raises:
            ClosedError: the Shaper was closed already.
        """
        if self._state == "closed":
            raise ClosedError("This Shaper is closed; make a new one.")
        if self._dispatcher is None:
            self._loop = asyncio.get_running_loop()
            self._dispatcher = self._loop.create_task(
                self._dispatch(), name="asyncquota-dispatcher"
            )
            self._state = "open"

    async def aclose(self) -> None:
        """Shut down: reject the waiting, let in-flight requests finish, close the pool.

        Waiting callers get a ClosedError at once; requests in flight get
        ``shutdown_grace`` seconds to finish and are then cancelled (their callers get a
        ClosedError). Idempotent.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
            self._recheck_timer = None
        self._queue.close(
            lambda waiter: ClosedError(
                "The Shaper is shutting down; this request was not sent.",
                priority=waiter.priority,
                tenant=waiter.tenant,
            )
        )
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + self._shutdown_grace
        if self._active:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self._shutdown_grace)
            self._closing = set(self._active)
            for task in self._closing:
                task.cancel()
            while self._active:
                self._idle.clear()
                await self._idle.wait()
        # Open streams get what is left of the grace to end, then are closed: their
        # readers get a ClosedError, their permits and reservations end.
        if self._streams:
            self._no_streams.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._no_streams.wait(), max(0.0, grace_ends - loop.time())
                )
        if self._streams:
            self._no_streams.clear()
            for stream in list(self._streams):
                await stream._shut()
            with contextlib.suppress(TimeoutError):  # the readers end their streams
                await asyncio.wait_for(self._no_streams.wait(), STREAM_SHUTDOWN)
        await self._transport.aclose()

    # ------------------------------------------------------------------ the public call

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        priority: PriorityLike = Priority.INTERACTIVE,
        tenant: Hashable | None = None,
        deadline: float | None = None,
        cost_tokens: int | None = None,
    ) -> Response:
        """Send one request through the queue and the gates; return the upstream's reply.

        Args:
            method: the HTTP method.
            path: the path under ``base_url`` (a full URL is refused: nothing is sent
                anywhere but the configured upstream).
            json: the JSON body, encoded with orjson.
            headers: extra headers for this request.
            priority: ``"critical"``, ``"interactive"``, ``"batch"``, a Priority or an
                integer rank (smaller goes first).
            tenant: who the request is for; tenants of one class share it fairly.
            deadline: seconds from now this request may take in all, queueing and
                retries included (None: the Shaper's ``default_deadline``).
            cost_tokens: the tokens to reserve, when the caller knows better than the
                estimate (see :mod:`asyncquota.tokens`).

        Returns:
            The successful (2xx) response, with ``attempts`` set.

        Raises:
            RejectedError: not sent: the queue shed it, its deadline is unreachable, or the
                Shaper is closed. ``retry_after`` says when to try again.
            ThrottledError: the upstream keeps rate limiting (or asked for a wait longer
                than the deadline or ``max_retry_after``): ``retry_after`` says how long.
            DeadlineExceededError: the deadline passed while it waited or was in flight.
            OverloadedError, QuotaExhaustedError, TransportError, UpstreamError: the
                upstream's final answer, when retrying is pointless or out of budget.
            ValueError, TypeError: the arguments are malformed.
        """
        ticket = self._ticket(method, path, json, headers, priority, tenant, deadline, cost_tokens)
        return await self._run(ticket, self._send)

    def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        priority: PriorityLike = Priority.INTERACTIVE,
        tenant: Hashable | None = None,
        deadline: float | None = None,
        cost_tokens: int | None = None,
    ) -> ShapedStream:
        """A request whose reply is a stream of Server-Sent Events; use with ``async with``.

        Takes the same arguments as :meth:`request`. Entering the block waits for a turn
        and opens the stream (raising what ``request`` raises); iterating it yields
        :class:`~asyncquota.transport.SSEEvent` s. The stream holds its permit until it
        ends; an error event inside it raises the matching typed error. See
        :mod:`asyncquota.streaming`.
        """
        ticket = self._ticket(method, path, json, headers, priority, tenant, deadline, cost_tokens)
        return ShapedStream(self, ticket)

    @property
    def quota(self) -> QuotaSnapshot | None:
        """What the upstream's rate-limit headers said last (None: nothing yet).

        While more than half of each quota is left, replies are read in full at most every
        ``feedback.AMPLE_READ_INTERVAL`` seconds, so this may be that much behind.
        """
        return self._feedback.quota

    def reopen(self) -> None:
        """End the fleet-wide cooldown now: an operator knows the quota is back.

        Waiting requests resume at once (spread over the ramp); a later congestion reply
        closes it again as usual.
        """
        self._cooldown.reopen()

    def cooldown_remaining(self) -> float:
        """Seconds the fleet-wide cooldown (the upstream's Retry-After) still holds; 0 if open."""
        return self._cooldown.remaining(self._now())

    def shed_below(self, priority: PriorityLike, *, for_seconds: float) -> None:
        """Refuse the class ``priority`` and every less important one for a while.

        An operator's (or an alert's: see ``governance.alerts.ShedBatchAction``) way to
        keep the upstream for the urgent: for ``for_seconds`` from now, new requests of
        that class or below are refused at once with a RejectedError (reason
        ``"shedding"``) whose ``retry_after`` is the time left, and those already waiting
        are refused the same way now. Requests in flight finish. A later call replaces
        this one; ``for_seconds=0`` ends the shedding.

        Raises:
            ValueError: ``for_seconds`` is negative or not finite, or ``priority`` unknown.
        """
        _check("for_seconds", for_seconds, minimum=0)
        rank = coerce_priority(priority)
        now = self._now()
        self._shed_rank, self._shed_until = rank, now + for_seconds
        if for_seconds > 0:
            self._queue.fail_from(rank, lambda waiter: self._shedding_error(waiter.item, now))

    def _shedding_error(self, ticket: _Ticket, now: float) -> RejectedError:
        return RejectedError(
            f"Requests of class {_class_name(self._shed_rank)} and below are being "
            f"shed for another {self._shed_until - now:.1f} s to keep the upstream for more "
            "urgent work; it was not sent.",
            reason="shedding",
            priority=ticket.priority,
            tenant=ticket.tenant,
            retry_after=self._shed_until - now,
        )

    def statistics(self) -> ShaperStatistics:
        """A frozen snapshot of the live state and the counters.

        It may be called from any thread (a monitoring thread, say): it only reads, and
        its clock is the Shaper's loop's.
        """
        now = self._loop.time() if self._loop is not None else 0.0
        queue: QueueStatistics = self._queue.statistics()
        rates = self._rate.statistics()
        tokens = self._tokens.statistics()
        return ShaperStatistics(
            queued=queue.depth_by_priority,
            inflight=self._limiter.inflight,
            limit=self._limiter.capacity,
            cooldown_until=self._cooldown.closed_until,
            rpm_level=rates.level if self._rpm is not None else None,
            tpm_level=tokens.level if self._tpm is not None else None,
            service_rate=self._service_rate(now),
            quota=self._feedback.quota,
            open_reservations=tokens.open_reservations,
            reserved_tokens=tokens.reserved,
            permit_waiters=self._limiter.statistics().waiting,
            sent=self._sent,
            ok=self._ok,
            throttled=self._throttled,
            retried=self._retried,
            shed=self._shed,
            deadline=self._deadline_count,
            failed=self._failed,
            cancelled=self._cancelled,
            pace=self._feedback.pace,
            cooldown_probing=self._cooldown.probing,
            punishing_upstream=self._feedback.punishes,
        )

    def __repr__(self) -> str:
        return (
            f"<Shaper {redact_url(self.base_url)} {self._state} queued={len(self._queue)} "
            f"inflight={self._limiter.inflight}/{self._limiter.capacity} sent={self._sent} "
            f"ok={self._ok} throttled={self._throttled} shed={self._shed}>"
        )

    # ------------------------------------------------------------------ building a request

    @property
    def middleware(self) -> ShaperMiddleware:
        """An aiohttp client middleware shaping a session's requests to this upstream.

        ``aiohttp.ClientSession(middlewares=[shaper.middleware])``; see
        :mod:`asyncquota.middleware` for the per-request option headers.
        """
        return ShaperMiddleware(self)

    def _ticket(
        self,
        method: str,
        path: str,
        payload: Any,
        headers: Mapping[str, str] | None,
        priority: PriorityLike,
        tenant: Hashable | None,
        deadline: float | None,
        cost_tokens: int | None,
    ) -> _Ticket:
        url = join_path(self.base_url, path)  # refuses what would leave the base path
        merged = dict(self._headers)
        if headers:
            check_headers(headers)
            merged.update(headers)
        body = None if payload is None else orjson.dumps(payload)
        if body is not None and not any(k.lower() == "content-type" for k in merged):
            merged["Content-Type"] = "application/json"
        if cost_tokens is None:
            cost_tokens = estimate_tokens(
                len(body or b""), payload, default_output_tokens=self.default_output_tokens
            )
        return self._new_ticket(
            method=method,
            path=path,
            url=url,
            headers=merged,
            body=body,
            priority=priority,
            tenant=tenant,
            deadline=deadline,
            cost_tokens=cost_tokens,
        )

    def _new_ticket(
        self,
        *,
        method: str,
        path: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        priority: PriorityLike,
        tenant: Hashable | None,
        deadline: float | None,
        cost_tokens: int,
    ) -> _Ticket:
        """Validate the caller's options and make the ticket (also for the middleware)."""
        if self._state != "open":
            raise ClosedError(
                "The Shaper is not running: use `async with Shaper(...)` or call start()."
                if self._state == "new"
                else "The Shaper is closed and accepts no more requests."
            )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(
                "This Shaper runs on another event loop; a Shaper (its queue, its timers, its "
                "connection pool) belongs to the loop that started it. Make one per loop."
            )
        # Every option is checked before anything is touched.
        method = check_method(method).upper()
        rank = coerce_priority(priority)
        try:
            hash(tenant)
        except TypeError:
            raise TypeError(
                f"tenant must be hashable (a name, a number, a tuple), not "
                f"{type(tenant).__name__}."
            ) from None
        if deadline is None:
            deadline = self._default_deadline
        elif isinstance(deadline, bool) or not (
            isinstance(deadline, int | float) and math.isfinite(deadline)
        ):
            raise ValueError(f"deadline must be a number of seconds, not {deadline!r}.")
        elif deadline < MIN_DEADLINE:
            raise ValueError(
                f"deadline must be at least {MIN_DEADLINE:g} s (no request can be answered "
                f"sooner), not {deadline!r}."
            )
        if isinstance(cost_tokens, bool) or not isinstance(cost_tokens, int) or cost_tokens < 0:
            raise ValueError(f"cost_tokens must be an integer ≥ 0, not {cost_tokens!r}.")
        now = loop.time()
        return _Ticket(
            method=method,
            path=path,
            url=url,
            headers=headers,
            body=body,
            priority=rank,
            tenant=tenant,
            deadline=None if deadline is None else now + deadline,
            cost=cost_tokens,
            now=now,
        )

    # ------------------------------------------------------------------ the request's life

    async def _run(self, ticket: _Ticket, send: Send) -> Response:
        """Queue, send, classify, retry: until the request ends, exactly once."""
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        self._budget.record_request(ticket.started)
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wait_turn(ticket)
                result = await self._attempt(ticket, send)
                if isinstance(result, Response):
                    result.attempts = ticket.attempt
                    self._ok += 1
                    self._complete(ticket, "ok", result.status)
                    return result
                if result.probe and result.retryable:
                    continue  # back in line: the cooldown holds it until it opens
                delay = self._retry_delay(ticket, result, loop.time())
                if delay is None:
                    raise result.error
                self._retried += 1
                self._emit(Retried, ticket, reason=result.error.reason, delay=delay)
                if delay > 0:
                    await asyncio.sleep(delay)
                ticket.attempt += 1
        except QuotaError as exc:
            self._count_error(ticket, exc)
            raise
        except asyncio.CancelledError:
            if task not in self._closing:
                self._cancelled += 1
                self._complete(ticket, "cancelled", None)
                raise
            closed = ClosedError(
                "The Shaper shut down before this request finished.",
                priority=ticket.priority,
                tenant=ticket.tenant,
            )
            self._count_error(ticket, closed)
            raise closed from None
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    def _count_error(self, ticket: _Ticket, exc: QuotaError) -> None:
        if isinstance(exc, DeadlineExceededError):
            self._deadline_count += 1
        elif ticket.sent == 0:  # refused unsent: shed, whatever the reason
            self._shed += 1
            if self._hooks:
                self._emit(Shed, ticket, reason=exc.reason, retry_after=exc.retry_after)
        else:
            self._failed += 1
        self._complete(ticket, exc.reason, getattr(exc, "status", None))

    async def _wait_turn(self, ticket: _Ticket) -> None:
        """Wait in the queue until the dispatcher hands this ticket a permit to send."""
        self._refuse_early(ticket)
        if self._take_turn_now(ticket):
            if self._tracing():
                self._emit(Admitted, ticket, waited=self._now() - ticket.enqueued_at)
            return
        leave_by = ticket.deadline
        if not ticket.sent:  # a retry, or a refused probe, is bound by its deadline only
            patience = ticket.enqueued_at + self._max_wait(ticket.priority)
            leave_by = patience if leave_by is None else min(leave_by, patience)
        try:
            waiter = self._queue.push(
                ticket,
                priority=ticket.priority,
                tenant=ticket.tenant,
                deadline=leave_by,
                enqueued_at=ticket.enqueued_at,
            )
        except QueueFullError as exc:
            exc.retry_after = self._estimate_wait(ticket)
            raise
        self._work.set()
        if self._recheck_timer is None:
            loop = asyncio.get_running_loop()
            self._recheck_timer = loop.call_at(loop.time() + RECHECK_INTERVAL, self._recheck)
        if self._tracing():
            self._emit(Queued, ticket, depth=len(self._queue))
        try:
            await waiter.future
        except asyncio.CancelledError:
            if ticket.permit is not None:  # admitted, then cancelled before it could run
                self._give_back(ticket)
            raise
        except QueueFullError as exc:
            exc.retry_after = self._estimate_wait(ticket)
            raise
        if self._tracing():
            self._emit(Admitted, ticket, waited=self._now() - ticket.enqueued_at)

    def _take_turn_now(self, ticket: _Ticket) -> bool:
        """The fast path: nobody is waiting and every gate is open, so go without queueing.

        Order is not at stake (the queue is empty and the gates serve their own waiters
        first), and skipping the hop through the dispatcher is most of what asyncquota
        costs when the upstream has room to spare.
        """
        limiter = self._limiter
        if len(self._queue) or limiter.inflight >= limiter.capacity:
            return False
        now = self._now()
        if not self._cooldown.settled(now):
            return False
        reservation = self._tokens._try_reserve_at(ticket.cost, now)
        if reservation is None:
            return False
        if not self._rate._try_acquire_at(now):
            reservation.cancel()
            return False
        ticket.permit, ticket.reservation = limiter.acquire_nowait(), reservation
        self._grant(ticket, 0, now)
        return True

    def _refuse_early(self, ticket: _Ticket) -> None:
        """Reject now what cannot be served in time (deadline, ``max_wait``), with a hint.

        A retry is held to the cooldown only: it keeps its original age, so the newcomer's
        estimate of the wait does not apply to it.
        """
        now = self._now()
        if self._shed_until > now and ticket.priority >= self._shed_rank:
            raise self._shedding_error(ticket, now)
        left = math.inf if ticket.deadline is None else ticket.deadline - now
        cooling = self._feedback.confirmed_cooldown(now)
        if cooling > left:
            raise ThrottledError(
                f"The upstream asked every caller to wait {cooling:.1f} s, longer than this "
                f"request's deadline of {left:.1f} s; it was not sent.",
                priority=ticket.priority,
                tenant=ticket.tenant,
                retry_after=cooling,
            )
        if ticket.sent:  # a retry (or a refused probe) keeps its age: the cooldown only
            return
        wait = self._estimate_wait(ticket)
        if wait is None:
            return
        if wait + self._rtt > left * ESTIMATE_TRUST:
            raise DeadlineUnreachableError(
                f"About {wait:.1f} s of work is queued ahead of this request and a reply takes "
                f"about {self._rtt:.1f} s, longer than its deadline of {left:.1f} s; it was not "
                "sent.",
                priority=ticket.priority,
                tenant=ticket.tenant,
                retry_after=wait,
            )
        if wait <= 0:  # nobody ahead, no cooldown: the common case, nothing to weigh
            return
        patience = self._patience(ticket.priority, now)
        if wait > patience:
            raise self._busy(
                ticket,
                f"About {wait:.1f} s of work is queued ahead of this "
                f"{_class_name(ticket.priority)} request, more than its class waits "
                f"({patience:g} s)",
                wait,
            )

    def _max_wait(self, rank: int) -> float:
        """The configured ``max_wait`` of class ``rank`` (the next named class's if unnamed)."""
        seconds = self._max_wait_of.get(rank)
        if seconds is None:
            seconds = next((w for named, w in self._max_waits if named >= rank), None)
            if seconds is None:
                seconds = self._max_waits[-1][1]
            self._max_wait_of[rank] = seconds
        return seconds

    def _patience(self, rank: int, now: float) -> float:
        """How long a newcomer of class ``rank`` may expect to wait, now (see ``max_wait``)."""
        patience = self._max_wait(rank)
        if rank < Priority.BATCH:
            since = self._queue.nonempty_since(rank)
            if since is not None and now - since >= STANDING_AFTER:
                patience *= STANDING_SHARE
        return patience

    def _waited_too_long(self, waiter: Waiter[_Ticket], now: float) -> BusyError | None:
        """The queue's word for a waiter whose leave-by time came: None at its deadline."""
        ticket = waiter.item
        if ticket.deadline is not None and now >= ticket.deadline - 1e-6:
            return None
        return self._busy(
            ticket,
            f"The request waited {now - ticket.enqueued_at:.2f} s in line, as long as "
            f"{_class_name(ticket.priority)} requests wait",
            self._estimate_wait(ticket),
        )

    def _recheck(self) -> None:
        """Refuse now, newest first, what the current service rate cannot serve in time.

        A request admitted while the upstream served faster would otherwise wait out its
        ``max_wait`` (or deadline) and be refused late. Runs every ``RECHECK_INTERVAL``
        while anyone waits.
        """
        self._recheck_timer = None
        queue = self._queue
        if not len(queue) or self._state != "open":
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        rate = self._service_rate(now)
        if rate > 0 and not self._cooldown.closed_until:
            ahead = 0
            for rank, depth in queue.depths():
                keep = max(0, math.ceil(rate * self._patience(rank, now)) - ahead)
                if depth > keep:
                    queue.shed_newest(rank, depth - keep, lambda w: self._too_busy(w, now))
                ahead += min(depth, keep)
        self._recheck_timer = loop.call_at(now + RECHECK_INTERVAL, self._recheck)

    def _too_busy(self, waiter: Waiter[_Ticket], now: float) -> BusyError:
        ticket = waiter.item
        return self._busy(
            ticket,
            f"The upstream now serves fewer requests than wait in line: this "
            f"{_class_name(ticket.priority)} request would wait past "
            f"{self._patience(ticket.priority, now):g} s",
            self._estimate_wait(ticket),
        )

    def _busy(self, ticket: _Ticket, why: str, retry_after: float | None) -> BusyError:
        return BusyError(
            f"{why}; it was not sent.",
            priority=ticket.priority,
            tenant=ticket.tenant,
            retry_after=retry_after,
        )

    def _end_outlasted(self, now: float) -> None:
        """End at once the queued requests whose deadline falls inside the cooldown.

        Like a newcomer refused by ``_refuse_early``, they get a ThrottledError carrying
        the cooldown, rather than a DeadlineExceededError at their deadline.
        """
        cooling = self._feedback.confirmed_cooldown(now)
        if cooling <= 0:
            return

        def outlasted(waiter: Waiter[_Ticket]) -> ThrottledError:
            left = (waiter.deadline or now) - now
            return ThrottledError(
                f"The upstream asked every caller to wait {cooling:.1f} s, past this "
                f"request's deadline in {left:.1f} s; it was not sent.",
                priority=waiter.priority,
                tenant=waiter.tenant,
                retry_after=cooling,
            )

        self._queue.fail_due_before(now + cooling, outlasted)

    def _estimate_wait(self, ticket: _Ticket) -> float | None:
        """Seconds until a newcomer like ``ticket`` would be admitted, or None if unknown."""
        now = self._now()
        cooling = self._feedback.confirmed_cooldown(now)
        ahead = self._queue.ahead_of(ticket.priority, ticket.tenant)
        if ahead == 0:
            return cooling
        rate = self._service_rate(now)
        return cooling + ahead / rate if rate > 0 else None

    def _service_rate(self, now: float) -> float:
        """Admissions per second lately (over the time since the first, while that is short)."""
        if self._first_served is None:
            return 0.0
        span = min(SERVICE_RATE_WINDOW, now - self._first_served)
        return self._served.total(now) / span if span > 0 else 0.0

    async def _attempt(self, ticket: _Ticket, send: Send) -> Response | _Failure:
        """Send once with the grant the dispatcher gave; feed what came back to the gates."""
        permit, reservation = ticket.permit, ticket.reservation
        assert permit is not None and reservation is not None
        ticket.permit = ticket.reservation = None
        probe, ticket.probe = ticket.probe, 0
        feedback = self._feedback
        now = self._now()
        timeout = self._timeout
        if ticket.deadline is not None:
            timeout = min(timeout, ticket.deadline - now)
            if timeout <= 0 or timeout < self._rtt:
                permit.ignore()
                reservation.cancel()
                feedback.lost(probe)
                if timeout <= 0:
                    raise self._deadline_error(ticket, "before it could be sent")
                # It would use up the upstream's quota only to be cut off at its deadline.
                raise self._too_late(ticket, timeout)
        self._sent += 1
        ticket.sent += 1
        feedback.sent(now, probe)
        sent_at = now
        try:
            reply = await send(ticket, timeout)
        except asyncio.CancelledError:
            # The upstream may have started on it: keep the tokens charged, learn nothing.
            permit.ignore()
            reservation.reconcile(reservation.estimate)
            feedback.lost(probe)
            raise
        except TransportError as exc:
            feedback.lost(probe)
            return self._transport_failed(ticket, exc, permit, reservation)
        now = self._now()
        ok = reply.ok
        verdict = classify_error_body(
            reply.status,
            reply.body,
            None if ok else reply.headers,
            now=None if ok else feedback.reply_time(reply.headers),
        )
        # The reservation is settled before the headers are read: they re-anchor the
        # mirrors at what the upstream counted, this request's own usage included.
        if verdict.kind is Outcome.SUCCESS:
            sample = now - sent_at
            self._rtt = sample if not self._rtt else self._rtt + RTT_GAIN * (sample - self._rtt)
            if ticket.hold:
                ticket.permit, ticket.reservation = permit, reservation
            else:
                permit.success()
                used = usage_tokens(reply.body)
                if used is None:
                    used = reservation.estimate
                # One reply may not charge more than a request could plausibly use: a
                # usage of 5e7 tokens would hold the token gate for minutes.
                reservation.reconcile(min(used, USAGE_CEILING * reservation.estimate + 1024))
            if not feedback.ample(reply.headers, now):
                feedback.observe(reply.headers, now, sent_at, ticket.rate_mark, ticket.token_mark)
            feedback.succeeded(now, probe)
            return reply
        reservation.cancel()
        feedback.observe(reply.headers, now, sent_at, ticket.rate_mark, ticket.token_mark)
        if verdict.congestion:
            limiter = self._limiter
            kind = feedback.refusal(verdict.retry_after)
            if kind == "rate" or (kind == "unknown" and 2 * limiter.inflight < limiter.capacity):
                # A refusal that names a rate (a Retry-After, nothing left in a window),
                # or one that may while few were in flight, is not a sign of too many in
                # flight: the pace, the mirrors and the cooldown answer it; the
                # concurrency limit keeps still.
                permit.ignore()
            else:
                permit.dropped()
            self._throttled += 1
            feedback.congested(
                now,
                sent_at,
                verdict.retry_after,
                probe,
                rate_limited=verdict.kind is Outcome.THROTTLED,
                rtt=self._rtt,
            )
            self._end_outlasted(now)
            if self._hooks:
                self._emit(Throttled, ticket, status=reply.status, retry_after=verdict.retry_after)
        else:
            permit.ignore()
            feedback.lost(probe)
        return _Failure(
            self._upstream_error(ticket, reply, verdict),
            retryable=verdict.retryable,
            retry_after=verdict.retry_after,
            congestion=verdict.congestion,
            probe=bool(probe) and verdict.congestion,
        )

    def _transport_failed(
        self, ticket: _Ticket, exc: TransportError, permit: Permit, reservation: Reservation
    ) -> _Failure:
        """Account for an attempt that got no usable reply; say whether to retry it."""
        deadline = ticket.deadline
        if exc.reason == "timeout" and deadline is not None and self._now() >= deadline - 1e-6:
            permit.ignore()
            reservation.reconcile(reservation.estimate)
            raise self._deadline_error(ticket, "while it was in flight") from exc
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
        return _Failure(exc, retryable=retryable, retry_after=None)

    def _retry_delay(self, ticket: _Ticket, failure: _Failure, now: float) -> float | None:
        """Seconds to wait before re-queueing ``ticket``, or None: it ends with its error."""
        if not failure.retryable or ticket.attempt >= self._max_attempts:
            return None
        retry_after = failure.retry_after
        if retry_after is not None:
            if retry_after > self._max_retry_after:
                return None
            # After a congestion reply the cooldown holds the whole fleet for it: re-queue
            # at once. Any other reply's Retry-After (a 500's, a 503 from a proxy) is this
            # request's own wait.
            delay = 0.0 if failure.congestion else retry_after
            ready = now + retry_after
        else:
            delay = backoff_delay(ticket.attempt - 1, rng=self._rng)
            ready = now + delay
        if ticket.deadline is not None and ready >= ticket.deadline:
            return None
        if not self._budget.try_spend(now):
            return None
        return delay

    def _give_back(self, ticket: _Ticket) -> None:
        """Return an unused grant: nothing was sent, so no sample and no tokens."""
        assert ticket.permit is not None and ticket.reservation is not None
        ticket.permit.ignore()
        ticket.reservation.cancel()
        ticket.permit = ticket.reservation = None
        self._feedback.lost(ticket.probe)
        ticket.probe = 0

    # ------------------------------------------------------------------ the dispatcher

    async def _dispatch(self) -> None:
        """Hand the head of the queue its grant whenever the gates let one more request go.

        The only task that waits on the gates. It takes what one request needs (a rate
        unit, the head's tokens, a concurrency permit) and only then pops the head, so the
        queue alone decides who goes, and a head that leaves meanwhile (deadline, cancel)
        leaves its grant to the next.
        """
        queue, loop = self._queue, asyncio.get_running_loop()
        cooldown = self._cooldown
        permit: Permit | None = None
        reservation: Reservation | None = None
        rate_taken = False
        probe = 0  # the cooldown generation the dispatcher holds a probe of (0: none)
        try:
            while True:
                head = queue.peek()
                if head is None:
                    self._work.clear()
                    await self._work.wait()
                    continue
                if probe and (probe != cooldown.generation or cooldown.is_open()):
                    self._feedback.lost(probe)  # that closure ended: no probe needed
                    probe = 0
                if not probe:
                    # After a cooldown the fleet comes back spread over the ramp, not in
                    # one burst, and at least at the pace it was served before.
                    pace = self._service_rate(loop.time()) * cooldown.ramp
                    probe = await cooldown.wait(spread=max(self._limiter.capacity, int(pace)))
                if not rate_taken:
                    await self._rate.acquire()
                    rate_taken = True
                head = queue.peek()
                if head is None:
                    continue
                if reservation is None or reservation.estimate < head.item.cost:
                    if reservation is not None:
                        reservation.cancel()
                        reservation = None
                    reservation = await self._tokens.reserve(head.item.cost)
                if permit is None:
                    permit = await self._permit(loop)
                head = queue.peek()
                if head is None or head.item.cost > reservation.estimate:
                    continue
                if not (cooldown.is_open() or (probe and probe == cooldown.generation)):
                    continue
                waiter = queue.pop_nowait()
                ticket = waiter.item
                try:
                    left = math.inf if ticket.deadline is None else ticket.deadline - loop.time()
                    if left < self._rtt:
                        # Too late to be answered in time: say so now and keep the grant
                        # (the rate unit and a probe included) for the next head, rather
                        # than spend it on nothing.
                        waiter.set_exception(self._too_late(ticket, left))
                        continue
                    ticket.permit, ticket.reservation = permit, reservation
                    if waiter.admit():
                        self._grant(ticket, probe if not cooldown.is_open() else 0, loop.time())
                        permit, reservation, rate_taken, probe = None, None, False, 0
                    else:  # the caller left between pop and admit: the grant goes on
                        ticket.permit = ticket.reservation = None
                except Exception as exc:
                    # One request's failure must not stop every other: the dispatcher goes
                    # on. Admitted already, the grant is the request's; else the request
                    # ends with an error and the grant stays for the next head.
                    logger.exception("asyncquota could not hand a request its turn.")
                    if permit is not None and ticket.permit is permit and waiter.admitted:
                        permit, reservation, rate_taken, probe = None, None, False, 0
                    else:
                        ticket.permit = ticket.reservation = None
                        if not waiter.done():
                            waiter.set_exception(self._internal_error(ticket, exc))
        finally:
            if permit is not None:
                permit.ignore()
            if reservation is not None:
                reservation.cancel()
            self._feedback.lost(probe)

    async def _permit(self, loop: asyncio.AbstractEventLoop) -> Permit:
        """A concurrency permit for the head; tells the limit when it is what holds us.

        Time spent waiting here is time the limit, not the rate, held the upstream back.
        When that is most of the last ``STALL`` seconds and nobody refused anything, the
        limit is told it stalled (``ConcurrencyLimiter.stalled``): long replies clock its
        growth far too slowly otherwise.
        """
        limiter = self._limiter
        started = loop.time()
        while True:
            try:
                async with asyncio.timeout(STALL):
                    permit = await limiter.acquire()
                break
            except TimeoutError:
                # Not one permit back in a whole STALL: stalled, whatever came before.
                limiter.stalled(loop.time(), spread=STALL)
        now = loop.time()
        self._limit_bound += now - started
        if now >= self._stall_check_at:
            self._check_stall(now)
        return permit

    def _check_stall(self, now: float) -> None:
        """Tell the limiter it stalled if it held us most of a ``STALL`` with little back."""
        limiter = self._limiter
        returned = limiter.returned
        if (
            self._limit_bound >= STALL / 2
            and (returned - self._stall_returned) * STALL_RETURNS < limiter.capacity
        ):
            limiter.stalled(now, spread=STALL)
        self._limit_bound, self._stall_check_at = 0.0, now + STALL
        self._stall_returned = returned

    def _grant(self, ticket: _Ticket, probe: int, now: float) -> None:
        """Mark ``ticket`` granted: the gates' marks for its reply, the probe it carries."""
        ticket.probe = probe
        # The marks leave out the request's own units: an upstream that counts a request
        # in the ``remaining`` of its own reply and one that does not are both read right
        # (the first one unit low, which is safe).
        ticket.rate_mark = self._rate.taken - 1.0
        ticket.token_mark = self._tokens.taken - ticket.cost
        self._count_served(now)

    # ------------------------------------------------------------------ reading replies

    def _upstream_error(
        self, ticket: _Ticket, reply: Response, verdict: Classification
    ) -> UpstreamError:
        kind = verdict.kind
        detail = f": {verdict.message}" if verdict.message else "."
        where = f"{ticket.method} {ticket.path} got HTTP {reply.status}"
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
                status=reply.status,
                body=reply.body,
                priority=ticket.priority,
                tenant=ticket.tenant,
                retry_after=verdict.retry_after,
            )
        else:
            error_class = UpstreamError
            message = f"{where}{detail}"
        return error_class(
            message,
            status=reply.status,
            body=reply.body,
            reason=verdict.code if kind is Outcome.FATAL and verdict.code else None,
            priority=ticket.priority,
            tenant=ticket.tenant,
            retry_after=verdict.retry_after,
        )

    def _internal_error(self, ticket: _Ticket, exc: Exception) -> RejectedError:
        return RejectedError(
            f"{ticket.method} {ticket.path} was not sent: asyncquota failed to hand it its "
            f"turn ({type(exc).__name__}); the Shaper goes on serving.",
            reason="internal_error",
            priority=ticket.priority,
            tenant=ticket.tenant,
        )

    def _too_late(self, ticket: _Ticket, left: float) -> DeadlineUnreachableError:
        return DeadlineUnreachableError(
            f"{ticket.method} {ticket.path} has {left:.2f} s left, less than a typical reply "
            f"takes ({self._rtt:.2f} s); it was not sent.",
            priority=ticket.priority,
            tenant=ticket.tenant,
        )

    def _deadline_error(self, ticket: _Ticket, when: str) -> DeadlineExceededError:
        waited = self._now() - ticket.started
        return DeadlineExceededError(
            f"{ticket.method} {ticket.path} reached its deadline {when}, after {waited:.2f} s.",
            priority=ticket.priority,
            tenant=ticket.tenant,
        )

    # ------------------------------------------------------------------ plumbing

    async def _send(self, ticket: _Ticket, budget: float | None) -> Response:
        return await self._transport.send(
            Request(ticket.method, ticket.url, ticket.headers, ticket.body, budget)
        )

    async def _open_stream(self, ticket: _Ticket, budget: float | None) -> Response:
        """Open a stream; a 2xx one waits on the ticket, an error one is read whole."""
        stream = await self._transport.open_stream(
            Request(ticket.method, ticket.url, ticket.headers, ticket.body, budget)
        )
        if not stream.ok:
            return Response(stream.status, stream.headers, await stream.read())
        ticket.stream = stream
        return Response(stream.status, stream.headers)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _count_served(self, now: float) -> None:
        if self._first_served is None:
            self._first_served = now
        self._served.add(now)

    def _tracing(self) -> bool:
        """Whether the frequent events (queued, admitted, ok) have anyone to hear them."""
        return any(
            not isinstance(hook, LoggingHook) or hook.debug_enabled for hook in self._hooks
        )

    def _complete(self, ticket: _Ticket, outcome: str, status: int | None) -> None:
        if outcome != "ok" or self._tracing():
            self._emit(
                Completed,
                ticket,
                outcome=outcome,
                status=status,
                latency=self._now() - ticket.started,
            )

    def _emit(self, kind: type[Event], ticket: _Ticket, **fields: Any) -> None:
        event = kind(
            at=self._now(),
            method=ticket.method,
            path=ticket.path,
            priority=describe_priority(ticket.priority),
            tenant=ticket.tenant,
            attempt=ticket.attempt,
            **fields,
        )
        for hook in self._hooks:
            try:
                hook.on_event(event)
            except Exception:  # instrumentation never fails a request
                logger.exception("The asyncquota hook %r failed on %s.", hook, event)


def _class_name(rank: int) -> str:
    described = describe_priority(rank)
    return described.name.lower() if isinstance(described, Priority) else str(rank)


def _check(
    name: str, value: float, *, minimum: float, strict: bool = False, integer: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, not {value!r}.")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise ValueError(f"{name} must be {bound}, not {value!r}.")
