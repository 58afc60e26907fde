"""Dispatch: hand each request its turn, the grant to send it, in the line's order.

A request's turn comes in one of two ways:

- the fast path: nobody waits and every gate is open, so it takes its grant at once,
  without queueing (order is not at stake; skipping the hop through the dispatcher is
  most of what asyncquota costs when the upstream has room to spare);
- the line: it waits in the queue, and the dispatcher, the only task that waits on the
  gates, takes what one request needs (a rate unit, the head's tokens, a concurrency
  permit, the cooldown's leave or its probe) and only then pops the head, so the queue
  alone decides who goes, and a head that leaves meanwhile (deadline, cancel) leaves
  its grant to the next.

The dispatcher also tells the concurrency limit when it is what holds the upstream back
(``STALL``): long replies clock an adaptive limit's growth far too slowly otherwise.

With a fleet (``asyncquota.fleet``), a grant also holds a share of the fleet's quota: a
request unit and the reservation's tokens, taken from the process's lease (the fast
path only when the lease holds them; the dispatcher waits for a lease if need be), and
the reservation it carries settles the fleet's tokens too.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from .errors import QueueFullError, RejectedError
from .hooks import Admitted, Queued, logger

if TYPE_CHECKING:
    from .admission import Admission
    from .feedback import Feedback
    from .gates import CooldownGate, RateGate, Reservation, TokenGate
    from .hooks import Reporter
    from .limiter import ConcurrencyLimiter, Permit
    from .sharing import Fleet, Grant
    from .ticket import Ticket

__all__ = ["Dispatcher"]

STALL = 0.5
"""Seconds the dispatcher waits for a permit before telling the limit it has stalled (a
full limit, nothing back: long replies; see ``AIMD.on_stall``)."""

STALL_RETURNS = 4
"""A limit held the dispatcher most of a ``STALL`` has stalled only if fewer than one in
this many of its permits came back meanwhile: replies take more than ``STALL_RETURNS`` ×
``STALL`` seconds, and their successes clock its growth too slowly. Shorter replies clock
it themselves (and a limit they hold is one the upstream may be filling)."""


class Dispatcher:
    """Hands requests their turns: the fast path, the wait in line, the dispatcher task."""

    __slots__ = (
        "_admission",
        "_cooldown",
        "_feedback",
        "_fleet",
        "_limit_bound",
        "_limiter",
        "_rate",
        "_reporter",
        "_stall_check_at",
        "_stall_returned",
        "_tokens",
        "_work",
    )

    def __init__(
        self,
        *,
        admission: Admission,
        limiter: ConcurrencyLimiter,
        rate: RateGate,
        tokens: TokenGate,
        cooldown: CooldownGate,
        feedback: Feedback,
        reporter: Reporter,
        fleet: Fleet | None = None,
    ) -> None:
        self._admission = admission
        self._fleet = fleet
        self._limiter = limiter
        self._rate = rate
        self._tokens = tokens
        self._cooldown = cooldown
        self._feedback = feedback
        self._reporter = reporter
        self._work = asyncio.Event()
        self._limit_bound = 0.0  # seconds the dispatcher waited on the limit lately
        self._stall_check_at = -math.inf
        self._stall_returned = 0  # permits ended by the last stall check

    def turn_now(self, ticket: Ticket, loop: asyncio.AbstractEventLoop) -> bool:
        """Refuse ``ticket`` early, or take its turn at once; whether it holds a grant.

        A plain call, not a coroutine: with room to spare it is the whole turn (the fast
        path). Else ``wait_in_line`` waits for it. ``loop``: the running loop (the
        caller has it at hand).

        Raises:
            RejectedError, ThrottledError: refused (see ``Admission.refuse_early``).
        """
        now = loop.time()
        self._admission.refuse_early(ticket, now)
        if not self._take_turn_now(ticket, now):
            return False
        reporter = self._reporter
        if reporter.tracing():
            now = loop.time()
            reporter.emit(Admitted, ticket, now, waited=now - ticket.enqueued_at)
        return True

    async def wait_in_line(self, ticket: Ticket) -> None:
        """Return once ``ticket``, which ``turn_now`` could not serve, holds a grant to send.

        Raises:
            RejectedError: shed from a full line (QueueFullError), or left the line
                unserved (BusyError).
            DeadlineExceededError: the deadline passed in line.
        """
        admission, reporter = self._admission, self._reporter
        loop = asyncio.get_running_loop()
        queue = admission.queue
        try:
            waiter = queue.push(
                ticket,
                priority=ticket.priority,
                tenant=ticket.tenant,
                deadline=admission.leave_by(ticket),
                enqueued_at=ticket.enqueued_at,
            )
        except QueueFullError as exc:
            exc.retry_after = admission.estimate_wait(ticket, loop.time())
            raise
        self._work.set()
        admission.queued(loop)
        if reporter.tracing():
            reporter.emit(Queued, ticket, loop.time(), depth=len(queue))
        try:
            await waiter.future
        except asyncio.CancelledError:
            if ticket.permit is not None:  # admitted, then cancelled before it could run
                self.give_back(ticket)
            raise
        except QueueFullError as exc:
            exc.retry_after = admission.estimate_wait(ticket, loop.time())
            raise
        finally:
            # The future keeps the refusal it ended with, and the refusal's traceback
            # this frame: no reference cycle through it.
            del waiter
        if reporter.tracing():
            now = loop.time()
            reporter.emit(Admitted, ticket, now, waited=now - ticket.enqueued_at)

    def give_back(self, ticket: Ticket) -> None:
        """Return an unused grant: nothing was sent, so no sample and no tokens."""
        assert ticket.permit is not None and ticket.reservation is not None
        ticket.permit.ignore()
        ticket.reservation.cancel()
        ticket.permit = ticket.reservation = None
        self._feedback.lost(ticket.probe)
        ticket.probe = 0

    def _take_turn_now(self, ticket: Ticket, now: float) -> bool:
        """The fast path: nobody is waiting and every gate is open, so go without queueing."""
        limiter = self._limiter
        if len(self._admission.queue) or limiter.inflight >= limiter.capacity:
            return False
        if not self._cooldown.settled(now):
            return False
        fleet = self._fleet
        grant = None if fleet is None else fleet.take_nowait(1, ticket.cost, now)
        if fleet is not None and grant is None:
            return False
        reservation = self._tokens._try_reserve_at(ticket.cost, now)
        if reservation is None or not self._rate._try_acquire_at(now):
            if reservation is not None:
                reservation.cancel()
            if fleet is not None and grant is not None:
                fleet.put_back(grant)
            return False
        if fleet is not None and grant is not None:
            reservation = fleet.bind(reservation, grant, self._tokens)
        ticket.permit, ticket.reservation = limiter.acquire_nowait(), reservation
        self._grant(ticket, 0, now)
        return True

    def _grant(self, ticket: Ticket, probe: int, now: float) -> None:
        """Mark ``ticket`` granted: the gates' marks for its reply, the probe it carries."""
        ticket.probe = probe
        # The marks leave out the request's own units: an upstream that counts a request
        # in the ``remaining`` of its own reply and one that does not are both read right
        # (the first one unit low, which is safe).
        rate, tokens = self._rate, self._tokens
        ticket.rate_mark = rate.taken - 1.0
        ticket.token_mark = tokens.taken - ticket.cost
        level = rate.mirror_level
        ticket.rate_level = None if level is None else level + 1.0
        level = tokens.mirror_level
        ticket.token_level = None if level is None else level + ticket.cost
        self._admission.served(now)

    async def run(self) -> None:
        """The dispatcher task: hand the head of the line its grant whenever one is ready."""
        admission = self._admission
        queue, loop = admission.queue, asyncio.get_running_loop()
        cooldown = self._cooldown
        fleet = self._fleet
        permit: Permit | None = None
        reservation: Reservation | None = None
        grant: Grant | None = None  # the fleet's share held for the reservation
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
                    pace = admission.service_rate(loop.time()) * cooldown.ramp
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
                if fleet is not None and (
                    grant is None
                    or grant.tokens < reservation.estimate
                    or grant.expires_at <= loop.time()  # its lease ended: no longer held
                ):
                    if grant is not None:
                        fleet.put_back(grant)
                        grant = None
                    grant = await fleet.take(1, reservation.estimate)
                head = queue.peek()
                if head is None or head.item.cost > reservation.estimate:
                    continue
                if not (cooldown.is_open() or (probe and probe == cooldown.generation)):
                    continue
                waiter = queue.pop_nowait()
                ticket = waiter.item
                try:
                    left = math.inf if ticket.deadline is None else ticket.deadline - loop.time()
                    if left < admission.rtt:
                        # Too late to be answered in time: say so now and keep the grant
                        # (the rate unit and a probe included) for the next head, rather
                        # than spend it on nothing.
                        waiter.set_exception(admission.too_late(ticket, left))
                        continue
                    ticket.permit, ticket.reservation = permit, reservation
                    if fleet is not None and grant is not None:
                        ticket.reservation = fleet.bind(reservation, grant, self._tokens)
                    if waiter.admit():
                        self._grant(ticket, probe if not cooldown.is_open() else 0, loop.time())
                        permit, reservation, rate_taken, probe = None, None, False, 0
                        grant = None
                    else:  # the caller left between pop and admit: the grant goes on
                        ticket.permit = ticket.reservation = None
                except Exception as exc:
                    # One request's failure must not stop every other: the dispatcher goes
                    # on. Admitted already, the grant is the request's; else the request
                    # ends with an error and the grant stays for the next head.
                    logger.exception("asyncquota could not hand a request its turn.")
                    if permit is not None and ticket.permit is permit and waiter.admitted:
                        permit, reservation, rate_taken, probe = None, None, False, 0
                        grant = None
                    else:
                        ticket.permit = ticket.reservation = None
                        if not waiter.done():
                            waiter.set_exception(_internal_error(ticket, exc))
        finally:
            if permit is not None:
                permit.ignore()
            if reservation is not None:
                reservation.cancel()
            if fleet is not None and grant is not None:
                fleet.put_back(grant)
            self._feedback.lost(probe)

    async def _permit(self, loop: asyncio.AbstractEventLoop) -> Permit:
        """A concurrency permit for the head; tells the limit when it is what holds us.

        Time spent waiting here is time the limit, not the rate, held the upstream back.
        When that is most of the last ``STALL`` seconds and nobody refused anything, the
        limit is told it stalled (``ConcurrencyLimiter.stalled``).
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


def _internal_error(ticket: Ticket, exc: Exception) -> RejectedError:
    return RejectedError(
        f"{ticket.method} {ticket.path} was not sent: asyncquota failed to hand it its "
        f"turn ({type(exc).__name__}); the Shaper goes on serving.",
        reason="internal_error",
        priority=ticket.priority,
        tenant=ticket.tenant,
    )
