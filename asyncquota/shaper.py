"""The Shaper: the whole request path, one object that async callers use instead of the upstream.

    caller ─► Shaper.request()   options checked once (options.py); a ticket (ticket.py)
              │
              ▼
            admission            refuse at once what cannot be served in time (admission.py)
              │
              ▼
            queue                priority class → tenant round robin → age; deadlines; bounded
              │  (only the head waits on the gates, so nothing after the queue reorders)
              ▼
            dispatch             cooldown (Retry-After) → requests/min → tokens/min → permit
              │                  (dispatch.py, on gates.py and limiter.py)
              ▼
            attempt              send once, bounded by the attempt timeout and the deadline;
              │                  classify the reply and feed it to the limit, the cooldown
              │                  and the gates (attempt.py, feedback.py)
              ▼
            done, or back into the queue (same priority, original age) within the retry
            policy (backoff.py): attempts, Retry-After, deadline, budget

The Shaper owns these stages and wires them; each is a module whose name says what it
does. The caller's own task sends its request once the dispatcher has admitted it, so
cancelling the caller cancels the upstream request, and every request ends exactly once:
in a :class:`~asyncquota.transport.Response` or in a :class:`~asyncquota.errors.QuotaError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .admission import DEFAULT_MAX_WAIT, Admission
from .attempt import Attempts
from .backoff import RetryBudget, RetryPolicy
from .dispatch import Dispatcher
from .errors import ClosedError, QuotaError
from .feedback import Feedback
from .gates import CooldownGate, RateGate, TokenGate
from .hooks import Hook, LoggingHook, Reporter, Retried
from .http1 import HttpTransport
from .limiter import ConcurrencyLimiter
from .limits import AIMD, Limit
from .middleware import ShaperMiddleware
from .options import RequestOptions, given_options
from .outcomes import RequestOutcome
from .priority import Priority, PriorityLike, coerce_priority
from .sharing import Fleet
from .signals import QuotaSnapshot
from .streaming import ShapedStream
from .ticket import Lease, Send, Ticket
from .tokens import estimate_tokens
from .transport import Request, Response, Transport
from .urls import check_headers, check_method, join_path, redact_url

__all__ = ["Shaper", "ShaperStatistics"]

DEFAULT_MAX_CONNECTIONS = 512
"""The default transport's connection pool bound: replies take seconds, so a busy upstream has
hundreds in flight (aiohttp's own default of 100 would cap it at 100 / reply time)."""

UNBOUNDED_PER_MINUTE = 1e12
"""The rate of a gate with no configured quota: it only paces by the upstream's headers."""

AIMD_INITIAL, AIMD_MAX_LIMIT = 20, 10_000
"""The default limit's start and ceiling (the ceiling lowered to the transport's pool)."""

DROP_TOLERANCE = 0.03
"""The default limit's share of congestion replies borne without a cut (see AIMD)."""

LATENCY_ROOM = 0.15
"""The default limit's latency brake: no growth while replies are this much slower than
the fastest lately (see AIMD)."""

BACKOFF_RATIO = 0.7
"""The default AIMD's cut (CUBIC's): with the latency brake holding the limit below an
upstream's slow zone, a refusal at its concurrency cap is a brush with it, and halving
left the upstream half idle for seconds (0.90-0.93 of the quota in the matrix's rows
with a cap; 0.94-1.0 at 0.7)."""

URL_CACHE = 1024
"""Request paths whose checked URL the Shaper remembers (most callers use a handful)."""

RETRY_WINDOW = 10.0
"""Seconds over which the retry budget counts requests and retries."""

STREAM_SHUTDOWN = 1.0
"""Seconds ``aclose`` waits, past its grace, for cancelled stream readers to end them."""


@dataclass(frozen=True, slots=True)
class ShaperStatistics:
    """A snapshot of a Shaper's live state and its counters since it started.

    Attributes:
        queued: requests waiting, per priority class (only classes with waiters).
        inflight: requests sent and not yet answered.
        limit: the adaptive concurrency limit now.
        cooldown_until: loop time until which the upstream asked everyone to wait, if so.
        cooldown_remaining: seconds from the snapshot until then (0: open).
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
    cooldown_remaining: float = 0.0


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
        transport: how attempts are sent (default: an :class:`~asyncquota.http1.HttpTransport`
            of ``max_connections`` keep-alive connections).
        headers: headers added to every request (credentials go here; never logged).
        hooks: instrumentation hooks (default: one LoggingHook).
        cooldown_ramp: seconds over which waiters resume after a cooldown (jitter).
        default_output_tokens: the output allowance of a request that names no max_tokens.
        shutdown_grace: seconds in-flight requests get to finish when the Shaper closes.
        seed: seeds the jitter, for reproducible runs.
        wall_clock: Unix time, used only to read HTTP-date and RFC 3339 values in replies
            that carry no ``Date`` header (everything else runs on the event loop's clock).
        fleet: share the quota with other processes (``asyncquota.fleet.RedisFleet``,
            extra ``redis``): every process passes the same ``rpm``/``tpm`` (the whole
            quota) and its own fleet of the same name; together they send no more than
            one quota, and share the cooldown, the retry budget and the upstream's
            rate-limit headers. The Shaper does not close the fleet: open it before,
            close it after.

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
        fleet: Fleet | None = None,
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
        if default_deadline is not None:
            _check("default_deadline", default_deadline, minimum=0, strict=True)
        _check("timeout", timeout, minimum=0, strict=True)
        _check("shutdown_grace", shutdown_grace, minimum=0)
        _check("default_output_tokens", default_output_tokens, minimum=0, integer=True)
        self.base_url = base_url.rstrip("/")
        self._default_deadline = default_deadline
        self.default_output_tokens = default_output_tokens
        self._shutdown_grace = float(shutdown_grace)
        self._headers = dict(headers or {})
        self._typed = any(k.lower() == "content-type" for k in self._headers)
        self._urls: dict[str, str] = {}  # path → its checked URL (see URL_CACHE)
        self._rng = random.Random(seed)
        self._transport: Transport = transport or HttpTransport(max_connections=max_connections)
        self._rpm = rpm
        self._tpm = tpm
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
        # The stages, each in its own module; the Shaper wires them and owns their life.
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
        self._reporter = Reporter(hooks if hooks is not None else (LoggingHook(),))
        self._admission = Admission(
            max_queue=max_queue, max_wait=waits, feedback=self._feedback, cooldown=self._cooldown
        )
        self._dispatcher = Dispatcher(
            admission=self._admission,
            limiter=self._limiter,
            rate=self._rate,
            tokens=self._tokens,
            cooldown=self._cooldown,
            feedback=self._feedback,
            reporter=self._reporter,
            fleet=fleet,
        )
        self._fleet = fleet
        self._feedback.fleet = fleet
        self._attempts = Attempts(
            limiter=self._limiter,
            feedback=self._feedback,
            admission=self._admission,
            reporter=self._reporter,
            timeout=float(timeout),
        )
        self._retries = RetryPolicy(
            max_attempts=max_attempts,
            max_retry_after=float(max_retry_after),
            budget=RetryBudget(
                ratio=retry_budget,
                window=RETRY_WINDOW,
                counts=None if fleet is None else fleet.retry_counts(window=RETRY_WINDOW),
            ),
            rng=self._rng,
        )
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop start() ran on
        self._dispatching: asyncio.Task[None] | None = None
        self._active: set[asyncio.Task[Any]] = set()  # tasks with a request under way
        self._idle = asyncio.Event()
        self._closing: set[asyncio.Task[Any]] = set()  # those aclose had to cancel
        self._state = "new"
        self._leases: set[Lease] = set()  # grants held by open streams
        self._no_leases = asyncio.Event()  # set when the last open lease ends

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
        if self._dispatching is None:
            self._loop = asyncio.get_running_loop()
            if self._fleet is not None:
                self._fleet.attach(
                    rpm=self._rpm, tpm=self._tpm, cooldown=self._cooldown, feedback=self._feedback
                )
            self._dispatching = self._loop.create_task(
                self._dispatcher.run(), name="asyncquota-dispatcher"
            )
            self._state = "open"

    async def aclose(self) -> None:
        """Shut down: reject the waiting, let in-flight requests finish, close the pool.

        Waiting callers get a ClosedError at once; requests in flight get
        ``shutdown_grace`` seconds to finish and are then cancelled (their callers get a
        ClosedError); open streams get what is left of the grace, then are closed (their
        readers get a ClosedError). Idempotent.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        self._admission.close()
        self._admission.queue.close(
            lambda waiter: ClosedError(
                "The Shaper is shutting down; this request was not sent.",
                priority=waiter.priority,
                tenant=waiter.tenant,
            )
        )
        if self._dispatching is not None:
            self._dispatching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatching
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
        if self._leases:
            self._no_leases.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_leases.wait(), max(0.0, grace_ends - loop.time()))
        if self._leases:
            self._no_leases.clear()
            for lease in list(self._leases):
                if lease.on_shutdown is not None:
                    await lease.on_shutdown()
                else:
                    lease.end("ignore")
            with contextlib.suppress(TimeoutError):  # the readers end their streams
                await asyncio.wait_for(self._no_leases.wait(), STREAM_SHUTDOWN)
        await self._transport.aclose()
        if self._fleet is not None:
            self._fleet.detach(self._cooldown)

    # ------------------------------------------------------------------ the public calls

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
        options: RequestOptions | None = None,
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
            options: the four above made once (see :class:`RequestOptions`), instead of
                them.

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
        options = given_options(options, priority, tenant, deadline, cost_tokens)
        method, url, merged, body, cost = self._prepare(method, path, json, headers, options)
        transport = self._transport

        def send(timeout: float | None) -> Awaitable[Response]:
            return transport.send(Request(method, url, merged, body, timeout))

        return await self._run(self._ticket(method, path, send, options, cost))

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
        options: RequestOptions | None = None,
    ) -> ShapedStream:
        """A request whose reply is a stream of Server-Sent Events; use with ``async with``.

        Takes the same arguments as :meth:`request`. Entering the block waits for a turn
        and opens the stream (raising what ``request`` raises); iterating it yields
        :class:`~asyncquota.transport.SSEEvent` s. The stream holds its permit until it
        ends; an error event inside it raises the matching typed error. See
        :mod:`asyncquota.streaming`.
        """
        options = given_options(options, priority, tenant, deadline, cost_tokens)
        method, url, merged, body, cost = self._prepare(method, path, json, headers, options)
        return ShapedStream(
            self,
            Request(method, url, merged, body),
            path=path,
            options=replace(options, cost_tokens=cost),
        )

    async def shape(
        self, send: Send, *, method: str, path: str, options: RequestOptions
    ) -> Response:
        """Send a request of your own making through the queue, the gates and the retries.

        For code that sends by other means than the Shaper's transport (the aiohttp
        middleware, an SDK's transport): each attempt calls ``send(timeout)``, which
        returns the upstream's :class:`~asyncquota.transport.Response` or raises a
        :class:`~asyncquota.errors.TransportError`. The reply is read and fed back as
        for :meth:`request`, which this otherwise is.

        Args:
            send: sends one attempt, within ``timeout`` seconds (None: no bound).
            method: the request's HTTP method.
            path: what identifies the request in errors, events and logs (scrubbed).
            options: its options; without ``cost_tokens``, the reservation is the
                Shaper's ``default_output_tokens`` (nothing here reads the body).

        Raises:
            What :meth:`request` raises.
        """
        return await self._run(self._sender_ticket(send, method, path, options, hold=False))

    async def lease(
        self, send: Send, *, method: str, path: str, options: RequestOptions
    ) -> tuple[Response, Lease]:
        """Like :meth:`shape`, but the grant outlives the reply: end the lease yourself.

        For replies that keep the upstream busy after their headers (streams): the
        concurrency permit and the token reservation are held by the returned
        :class:`~asyncquota.ticket.Lease` until it is ended, exactly once, with what the
        end teaches (see ``Lease.end``). :class:`~asyncquota.streaming.ShapedStream` is
        built on it. The Shaper ends the leases still open when it closes.

        Raises:
            What :meth:`request` raises.
        """
        ticket = self._sender_ticket(send, method, path, options, hold=True)
        reply = await self._run(ticket)
        permit, reservation = ticket.permit, ticket.reservation
        assert permit is not None and reservation is not None
        ticket.permit = ticket.reservation = None
        lease = Lease(
            permit, reservation, on_end=self._lease_ended, congested=self._stream_congested
        )
        self._leases.add(lease)
        return reply, lease

    @property
    def transport(self) -> Transport:
        """The transport attempts go through (the pooled aiohttp one by default)."""
        return self._transport

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
        return self._cooldown.remaining(asyncio.get_running_loop().time())

    def confirmed_cooldown(self) -> float:
        """Seconds of cooldown that evidence confirms; 0 while a probe may still end it.

        A Retry-After *holds* the line and sends one probe early (it is about the request
        that got it, and often overstates the wait): until that probe is refused, the hold
        may end in milliseconds. Confirmed: a probe was refused, or the upstream punishes
        early sends (its every window is honoured in full). What a router should pass a
        model over for; ``cooldown_remaining`` is the window as stated.
        """
        return self._feedback.confirmed_cooldown(asyncio.get_running_loop().time())

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
        now = asyncio.get_running_loop().time()
        self._admission.shed_below(rank, now + for_seconds, now)

    def refusal(self, options: RequestOptions | None = None) -> QuotaError | None:
        """The refusal a request with ``options`` would meet at the door now, or None.

        What ``request`` would raise before queueing it (shed, busy, deadline unreachable,
        a confirmed cooldown past its deadline), decided the same way, but nothing is
        queued, counted or reported. For a router (the Gateway) to ask before it does
        costly work for a request on this upstream (translating its body, reserving a
        tenant's and a budget's share) that would end unsent anyway: when a spent
        account's line moves to a fallback, thousands of requests ask at once. None too
        while the Shaper is not open (``request`` then says why).
        """
        if self._state != "open":
            return None
        options = options or RequestOptions()
        now = asyncio.get_running_loop().time()
        deadline = options.deadline if options.deadline is not None else self._default_deadline
        ticket = Ticket(
            method="",
            path="",
            send=_unsendable,
            priority=options.priority,
            tenant=options.tenant,
            deadline=None if deadline is None else now + deadline,
            cost=0,
            now=now,
        )
        try:
            self._admission.refuse_early(ticket, now)
        except QuotaError as exc:
            return exc
        return None

    def statistics(self) -> ShaperStatistics:
        """A frozen snapshot of the live state and the counters.

        It may be called from any thread (a monitoring thread, say): it only reads, and
        its clock is the Shaper's loop's.
        """
        now = self._loop.time() if self._loop is not None else 0.0
        queue = self._admission.queue.statistics()
        rates = self._rate.statistics()
        tokens = self._tokens.statistics()
        counts = self._reporter
        return ShaperStatistics(
            queued=queue.depth_by_priority,
            inflight=self._limiter.inflight,
            limit=self._limiter.capacity,
            cooldown_until=self._cooldown.closed_until,
            rpm_level=rates.level if self._rpm is not None else None,
            tpm_level=tokens.level if self._tpm is not None else None,
            service_rate=self._admission.service_rate(now),
            quota=self._feedback.quota,
            open_reservations=tokens.open_reservations,
            reserved_tokens=tokens.reserved,
            permit_waiters=self._limiter.statistics().waiting,
            sent=counts.sent,
            ok=counts.ok,
            throttled=counts.throttled,
            retried=counts.retried,
            shed=counts.shed,
            deadline=counts.deadline,
            failed=counts.failed,
            cancelled=counts.cancelled,
            pace=self._feedback.pace,
            cooldown_probing=self._cooldown.probing,
            punishing_upstream=self._feedback.punishes,
            cooldown_remaining=self._cooldown.remaining(now),
        )

    def __repr__(self) -> str:
        counts = self._reporter
        return (
            f"<Shaper {redact_url(self.base_url)} {self._state} "
            f"queued={len(self._admission.queue)} "
            f"inflight={self._limiter.inflight}/{self._limiter.capacity} sent={counts.sent} "
            f"ok={counts.ok} throttled={counts.throttled} shed={counts.shed}>"
        )

    @property
    def middleware(self) -> ShaperMiddleware:
        """An aiohttp client middleware shaping a session's requests to this upstream.

        ``aiohttp.ClientSession(middlewares=[shaper.middleware])``; see
        :mod:`asyncquota.middleware` for the per-request option headers.
        """
        return ShaperMiddleware(self)

    # ------------------------------------------------------------------ a request's life

    def _prepare(
        self,
        method: str,
        path: str,
        payload: Any,
        headers: Mapping[str, str] | None,
        options: RequestOptions,
    ) -> tuple[str, str, dict[str, str], bytes | None, int]:
        """The request to send (under ``base_url``, with the Shaper's headers) and its cost.

        Its method, URL, headers and body, not yet a :class:`Request`: each attempt makes
        its own, with its timeout.
        """
        method = check_method(method).upper()
        urls = self._urls
        url = urls.get(path)
        if url is None:
            url = join_path(self.base_url, path)  # refuses what would leave the base path
            if len(urls) >= URL_CACHE:
                urls.clear()
            urls[path] = url
        merged = dict(self._headers)
        typed = self._typed
        if headers:
            check_headers(headers)
            merged.update(headers)
            typed = typed or any(k.lower() == "content-type" for k in headers)
        body = None if payload is None else orjson.dumps(payload)
        if body is not None and not typed:
            merged["Content-Type"] = "application/json"
        cost = options.cost_tokens
        if cost is None:
            cost = estimate_tokens(
                len(body or b""), payload, default_output_tokens=self.default_output_tokens
            )
        return method, url, merged, body, cost

    def _sender_ticket(
        self, send: Send, method: str, path: str, options: RequestOptions, *, hold: bool
    ) -> Ticket:
        """The ticket of a request sent by the caller's ``send`` (``shape``, ``lease``)."""
        cost = options.cost_tokens
        if cost is None:  # no body to read: the output allowance alone
            cost = estimate_tokens(0, None, default_output_tokens=self.default_output_tokens)
        return self._ticket(
            check_method(method).upper(), redact_url(path), send, options, cost, hold=hold
        )

    def _ticket(
        self,
        method: str,
        path: str,
        send: Send,
        options: RequestOptions,
        cost: int,
        *,
        hold: bool = False,
    ) -> Ticket:
        """The ticket of a checked request, if the Shaper is open on this loop."""
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
        deadline = options.deadline
        if deadline is None:
            deadline = self._default_deadline
        now = loop.time()
        return Ticket(  # positionally: once a request (see Ticket.__init__)
            method,
            path,
            send,
            options.priority,
            options.tenant,
            None if deadline is None else now + deadline,  # its deadline, in loop time
            cost,
            now,
            hold,
        )

    async def _run(self, ticket: Ticket) -> Response:
        """Wait a turn, send, retry by the policy: until the request ends, exactly once."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._active.add(task)
        reporter = self._reporter
        self._retries.record_request(ticket.started)
        dispatcher = self._dispatcher
        try:
            while True:
                if not dispatcher.turn_now(ticket, loop):
                    await dispatcher.wait_in_line(ticket)
                result = await self._attempts.send(ticket)
                if isinstance(result, Response):
                    result.attempts = ticket.attempt
                    reporter.ok += 1
                    if reporter.tracing():  # a success's Completed is a frequent event
                        reporter.completed(
                            ticket, RequestOutcome.OK, "ok", result.status, loop.time()
                        )
                    return result
                if result.probe and result.retryable:
                    continue  # back in line: the cooldown holds it until it opens
                delay = self._retries.delay(
                    ticket.attempt,
                    retryable=result.retryable,
                    retry_after=result.retry_after,
                    held=result.congestion,
                    deadline=ticket.deadline,
                    now=loop.time(),
                )
                if delay is None:
                    raise result.error
                reporter.retried += 1
                if reporter.hooks:
                    reporter.emit(
                        Retried, ticket, loop.time(), reason=result.error.reason, delay=delay
                    )
                if delay > 0:
                    await asyncio.sleep(delay)
                ticket.attempt += 1
        except QuotaError as exc:
            reporter.failed_with(ticket, exc, loop.time())
            raise
        except asyncio.CancelledError:
            if task not in self._closing:
                reporter.cancelled += 1
                reporter.completed(
                    ticket, RequestOutcome.CANCELLED, "cancelled", None, loop.time()
                )
                raise
            closed = ClosedError(
                "The Shaper shut down before this request finished.",
                priority=ticket.priority,
                tenant=ticket.tenant,
            )
            reporter.failed_with(ticket, closed, loop.time())
            raise closed from None
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    def _lease_ended(self, lease: Lease) -> None:
        self._leases.discard(lease)
        if not self._leases:
            self._no_leases.set()

    def _stream_congested(self, retry_after: float | None, rate_limited: bool) -> None:
        self._reporter.throttled += 1
        now = asyncio.get_running_loop().time()
        self._feedback.congested(now, now, retry_after, 0, rate_limited=rate_limited)


def _check(
    name: str, value: float, *, minimum: float, strict: bool = False, integer: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, not {value!r}.")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise ValueError(f"{name} must be {bound}, not {value!r}.")


async def _unsendable(_: float | None) -> Response:
    raise AssertionError("a ticket made only to ask admission was sent")
