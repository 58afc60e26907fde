"""Admission: who may wait in line, for how long, and who is told "busy" at once.

The line is a :class:`~asyncquota.queue.PriorityQueue`; admission decides who enters it
and who leaves it unserved, from what the Shaper has measured of its upstream: the
service rate (admissions per second lately), the time a reply takes, the confirmed
cooldown. A newcomer that cannot be served in time is refused *now*, with a
``retry_after``, rather than near its deadline:

- its deadline falls inside a cooldown the upstream confirmed: ThrottledError;
- the work ahead of it, at the service rate, outlasts its deadline:
  DeadlineUnreachableError;
- it outlasts its class's ``max_wait`` (a quarter of it while the class has a standing
  queue, CoDel's target delay): BusyError.

Those admitted are held to the same bounds while they wait: the line is re-checked
against the service rate every ``RECHECK_INTERVAL`` seconds, newest first within the
heaviest tenant, so a drop in capacity refuses the excess at once; a waiter reaching its
``max_wait`` leaves with a BusyError; a confirmed cooldown past a waiter's deadline ends
it at once.

Why not adaptive LIFO: with admission against a measured service rate, FIFO with a short
standing bound gives the same short waits to those served, refuses the rest at once
(LIFO refuses them late, at their timeout) and keeps order within a tenant.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from .errors import BusyError, DeadlineUnreachableError, RejectedError, ThrottledError
from .priority import Priority, describe_priority
from .queue import PriorityQueue, Waiter
from .window import SlidingCount

if TYPE_CHECKING:
    from .feedback import Feedback
    from .gates import CooldownGate
    from .ticket import Ticket

__all__ = ["DEFAULT_MAX_WAIT", "Admission"]

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

ESTIMATE_TRUST = 0.9
"""Share of its deadline a newcomer's estimated wait may fill: the estimate is a rate, and
a request admitted at the very edge is refused later, near its deadline, when it could
have been told at once."""

SERVICE_RATE_WINDOW = 2.0
"""Seconds of admissions behind the service-rate estimate used to shed early (short, so
that capacity that drops is seen within a couple of seconds)."""

RECHECK_INTERVAL = 0.1
"""Seconds between two checks of the queue against the current service rate."""

RTT_GAIN = 0.125
"""Weight of each new sample in the smoothed reply time (as TCP's SRTT)."""


class Admission:
    """Decides who enters the line and who leaves it unserved; owns the line.

    Args:
        max_queue: waiters the line holds before it sheds the least important.
        max_wait: the longest each class waits, by rank (the ranks not named take the
            next less important named class's value).
        feedback: the Shaper's reading of its upstream (the confirmed cooldown).
        cooldown: the fleet-wide cooldown (no re-check while it is closed).
    """

    __slots__ = (
        "_cooldown",
        "_feedback",
        "_first_served",
        "_max_wait_of",
        "_max_waits",
        "_open",
        "_recheck_timer",
        "_served",
        "_shed_rank",
        "_shed_until",
        "queue",
        "rtt",
    )

    def __init__(
        self,
        *,
        max_queue: int,
        max_wait: Mapping[int, float],
        feedback: Feedback,
        cooldown: CooldownGate,
    ) -> None:
        self.queue: PriorityQueue[Ticket] = PriorityQueue(
            maxsize=max_queue, on_expire=self._waited_too_long
        )
        self._max_waits = tuple(sorted(max_wait.items()))
        self._max_wait_of: dict[int, float] = {}  # by rank, as first asked for
        self._feedback = feedback
        self._cooldown = cooldown
        self._served = SlidingCount(window=SERVICE_RATE_WINDOW)
        self._first_served: float | None = None
        self.rtt = 0.0
        """Smoothed seconds from send to a successful reply (0: none yet)."""
        self._recheck_timer: asyncio.TimerHandle | None = None
        self._open = True
        self._shed_rank, self._shed_until = int(Priority.BATCH), -math.inf

    def close(self) -> None:
        """Stop re-checking the line (the Shaper closes; it empties the line itself)."""
        self._open = False
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
            self._recheck_timer = None

    # ------------------------------------------------------------------ measurements

    def served(self, now: float) -> None:
        """Count one admission (a request handed its grant) at ``now``."""
        if self._first_served is None:
            self._first_served = now
        self._served.add(now)

    def replied(self, seconds: float) -> None:
        """Fold one successful reply's time into ``rtt``."""
        rtt = self.rtt
        self.rtt = seconds if not rtt else rtt + RTT_GAIN * (seconds - rtt)

    def service_rate(self, now: float) -> float:
        """Admissions per second lately (over the time since the first, while that is short)."""
        if self._first_served is None:
            return 0.0
        span = min(SERVICE_RATE_WINDOW, now - self._first_served)
        return self._served.total(now) / span if span > 0 else 0.0

    def estimate_wait(
        self, ticket: Ticket, now: float, cooling: float | None = None
    ) -> float | None:
        """Seconds until a newcomer like ``ticket`` would be admitted, or None if unknown.

        ``cooling``: the confirmed cooldown at ``now``, when the caller has it already.
        """
        if cooling is None:
            cooling = self._feedback.confirmed_cooldown(now)
        ahead = self.queue.ahead_of(ticket.priority, ticket.tenant)
        if ahead == 0:
            return cooling
        rate = self.service_rate(now)
        return cooling + ahead / rate if rate > 0 else None

    # ------------------------------------------------------------------ at the door

    def refuse_early(self, ticket: Ticket, now: float) -> None:
        """Reject now what cannot be served in time (deadline, ``max_wait``), with a hint.

        A retry is held to the cooldown only: it keeps its original age, so the newcomer's
        estimate of the wait does not apply to it.

        Raises:
            RejectedError: shed by ``shed_below``; DeadlineUnreachableError, BusyError.
            ThrottledError: a confirmed cooldown outlasts its deadline.
        """
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
        # Nobody in line (the common case): the wait is the cooldown's, nothing to estimate.
        wait = self.estimate_wait(ticket, now, cooling) if len(self.queue) else cooling
        if wait is None:
            return
        if wait + self.rtt > left * ESTIMATE_TRUST:
            raise DeadlineUnreachableError(
                f"About {wait:.1f} s of work is queued ahead of this request and a reply takes "
                f"about {self.rtt:.1f} s, longer than its deadline of {left:.1f} s; it was not "
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
                f"{class_name(ticket.priority)} request, more than its class waits "
                f"({patience:g} s)",
                wait,
            )

    def leave_by(self, ticket: Ticket) -> float | None:
        """The loop time at which ``ticket`` leaves the line unserved (None: never).

        Its deadline, and for a newcomer its class's ``max_wait`` from when it arrived: a
        retry, or a refused probe, is bound by its deadline only.
        """
        leave_by = ticket.deadline
        if not ticket.sent:
            patience = ticket.enqueued_at + self._max_wait(ticket.priority)
            leave_by = patience if leave_by is None else min(leave_by, patience)
        return leave_by

    def queued(self, loop: asyncio.AbstractEventLoop) -> None:
        """Someone entered the line: keep it re-checked while anyone waits."""
        if self._recheck_timer is None and self._open:
            self._recheck_timer = loop.call_at(loop.time() + RECHECK_INTERVAL, self._recheck)

    def too_late(self, ticket: Ticket, left: float) -> DeadlineUnreachableError:
        """The error of a request with ``left`` seconds, less than a reply takes."""
        return DeadlineUnreachableError(
            f"{ticket.method} {ticket.path} has {left:.2f} s left, less than a typical reply "
            f"takes ({self.rtt:.2f} s); it was not sent.",
            priority=ticket.priority,
            tenant=ticket.tenant,
        )

    # ------------------------------------------------------------------ in line

    def shed_below(self, rank: int, until: float, now: float) -> None:
        """Refuse class ``rank`` and every less important one until ``until`` (see Shaper)."""
        self._shed_rank, self._shed_until = rank, until
        if until > now:
            self.queue.fail_from(rank, lambda waiter: self._shedding_error(waiter.item, now))

    def end_outlasted(self, now: float) -> None:
        """End at once the queued requests whose deadline falls inside the cooldown.

        Like a newcomer refused by ``refuse_early``, they get a ThrottledError carrying
        the cooldown, rather than a DeadlineExceededError at their deadline.
        """
        cooling = self._feedback.confirmed_cooldown(now)
        if cooling <= 0:
            return

        def outlasted(waiter: Waiter[Ticket]) -> ThrottledError:
            left = (waiter.deadline or now) - now
            return ThrottledError(
                f"The upstream asked every caller to wait {cooling:.1f} s, past this "
                f"request's deadline in {left:.1f} s; it was not sent.",
                priority=waiter.priority,
                tenant=waiter.tenant,
                retry_after=cooling,
            )

        self.queue.fail_due_before(now + cooling, outlasted)

    def _recheck(self) -> None:
        """Refuse now, newest first, what the current service rate cannot serve in time.

        A request admitted while the upstream served faster would otherwise wait out its
        ``max_wait`` (or deadline) and be refused late. Runs every ``RECHECK_INTERVAL``
        while anyone waits.
        """
        self._recheck_timer = None
        queue = self.queue
        if not len(queue) or not self._open:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        rate = self.service_rate(now)
        if rate > 0 and not self._cooldown.closed_until:
            ahead = 0
            for rank, depth in queue.depths():
                keep = max(0, math.ceil(rate * self._patience(rank, now)) - ahead)
                if depth > keep:
                    queue.shed_newest(rank, depth - keep, lambda w: self._too_busy(w, now))
                ahead += min(depth, keep)
        self._recheck_timer = loop.call_at(now + RECHECK_INTERVAL, self._recheck)

    def _waited_too_long(self, waiter: Waiter[Ticket], now: float) -> BusyError | None:
        """The line's word for a waiter whose leave-by time came: None at its deadline."""
        ticket = waiter.item
        if ticket.deadline is not None and now >= ticket.deadline - 1e-6:
            return None
        return self._busy(
            ticket,
            f"The request waited {now - ticket.enqueued_at:.2f} s in line, as long as "
            f"{class_name(ticket.priority)} requests wait",
            self.estimate_wait(ticket, now),
        )

    def _too_busy(self, waiter: Waiter[Ticket], now: float) -> BusyError:
        ticket = waiter.item
        return self._busy(
            ticket,
            f"The upstream now serves fewer requests than wait in line: this "
            f"{class_name(ticket.priority)} request would wait past "
            f"{self._patience(ticket.priority, now):g} s",
            self.estimate_wait(ticket, now),
        )

    # ------------------------------------------------------------------ bounds

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
            since = self.queue.nonempty_since(rank)
            if since is not None and now - since >= STANDING_AFTER:
                patience *= STANDING_SHARE
        return patience

    def _busy(self, ticket: Ticket, why: str, retry_after: float | None) -> BusyError:
        return BusyError(
            f"{why}; it was not sent.",
            priority=ticket.priority,
            tenant=ticket.tenant,
            retry_after=retry_after,
        )

    def _shedding_error(self, ticket: Ticket, now: float) -> RejectedError:
        return RejectedError(
            f"Requests of class {class_name(self._shed_rank)} and below are being "
            f"shed for another {self._shed_until - now:.1f} s to keep the upstream for more "
            "urgent work; it was not sent.",
            reason="shedding",
            priority=ticket.priority,
            tenant=ticket.tenant,
            retry_after=self._shed_until - now,
        )


def class_name(rank: int) -> str:
    """A class's name for messages: ``"interactive"``, or the rank of an unnamed one."""
    described = describe_priority(rank)
    return described.name.lower() if isinstance(described, Priority) else str(rank)
