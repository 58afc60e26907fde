"""One request's journey through the Shaper, and what it holds on the way.

A :class:`Ticket` is made once per request, from its checked options, and carried through
every stage: admission (may it wait?), the queue, dispatch (its turn, with a grant: a
concurrency permit, a token reservation, perhaps the cooldown's probe), the attempt,
and back into line for a retry. A failed attempt comes back as a :class:`Failure`. A
grant kept past the reply, as a stream keeps it while it is read, becomes a
:class:`Lease`, which its holder ends exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import QuotaError
    from .gates import Reservation
    from .limiter import Ending, Permit
    from .transport import Response

__all__ = ["Failure", "Lease", "Send", "Ticket"]

Send = Callable[[float | None], Awaitable["Response"]]
"""How one attempt is sent: given the seconds it may take (None: no bound), the reply."""


class Ticket:
    """One request's journey: how to send it, its place in line, and the grant to send it."""

    __slots__ = (
        "attempt",
        "cost",
        "deadline",
        "enqueued_at",
        "hold",
        "method",
        "path",
        "permit",
        "priority",
        "probe",
        "rate_level",
        "rate_mark",
        "reservation",
        "send",
        "sent",
        "started",
        "tenant",
        "token_level",
        "token_mark",
    )

    def __init__(
        self,
        method: str,
        path: str,
        send: Send,
        priority: int,
        tenant: Hashable | None,
        deadline: float | None,
        cost: int,
        now: float,
        hold: bool = False,
    ) -> None:
        # Not keyword-only: the Shaper makes a ticket for every request, and a call that
        # names its nine arguments costs more than all the rest of this method does.
        self.method = method
        self.path = path  # shown in errors, events and logs only (scrubbed by the maker)
        self.send = send
        self.priority = priority
        self.tenant = tenant
        self.deadline = deadline  # loop time, or None
        self.cost = cost
        self.started = now
        self.enqueued_at = now
        self.attempt = 1
        self.sent = 0
        self.permit: Permit | None = None
        self.reservation: Reservation | None = None
        self.hold = hold  # a stream: keep the grant past a 2xx, as a Lease
        self.probe = 0  # the cooldown generation this attempt probes (0: not a probe)
        self.rate_mark = self.token_mark = 0.0  # the gates' ``taken`` when it was granted
        # Their mirrors' levels then (None: no mirror), this request's units left in.
        self.rate_level: float | None = None
        self.token_level: float | None = None


class Failure:
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


class Lease:
    """A grant kept past its reply: a stream's permit and tokens, held until it ends.

    A generation in progress is load on the upstream, so an open stream keeps its
    concurrency permit and its token reservation. Its holder ends the lease exactly once
    (later calls do nothing) with what the stream's end teaches; the Shaper that made it
    ends the leases still open when it closes, after calling their ``on_shutdown``.

    Attributes:
        on_shutdown: set by the holder: awaited when the Shaper closes with the lease
            still open (a stream's reader is told, and ends the lease itself).
    """

    __slots__ = ("_congested", "_on_end", "_permit", "_reservation", "on_shutdown")

    def __init__(
        self,
        permit: Permit,
        reservation: Reservation,
        *,
        on_end: Callable[[Lease], None],
        congested: Callable[[float | None, bool], None],
    ) -> None:
        self._permit: Permit | None = permit
        self._reservation: Reservation | None = reservation
        self._on_end = on_end
        self._congested = congested
        self.on_shutdown: Callable[[], Awaitable[None]] | None = None

    @property
    def open(self) -> bool:
        """Whether the lease still holds its grant."""
        return self._permit is not None

    def end(self, ending: Ending, used_tokens: int | None = None) -> None:
        """Give the grant back: once; later calls do nothing.

        Args:
            ending: what the end teaches the concurrency limit, as a ``Permit``'s:
                ``"success"`` (the stream ran to its end: the limit gets a sample),
                ``"dropped"`` (it broke off with a congestion signal: the limit is cut),
                ``"ignore"`` (left early or broken: nothing is learnt).
            used_tokens: the usage the stream reported; charged after a success, else
                (or when None) the tokens stay charged at the estimate, since the
                upstream may have generated them.
        """
        permit, reservation = self._permit, self._reservation
        if permit is None or reservation is None:
            return
        self._permit = self._reservation = None
        if ending == "success":
            permit.success()
        elif ending == "dropped":
            permit.dropped()
        else:
            permit.ignore()
        used = used_tokens if used_tokens and ending == "success" else reservation.estimate
        reservation.reconcile(used)
        self._on_end(self)

    def congested(self, retry_after: float | None, *, rate_limited: bool) -> None:
        """The stream broke off with a congestion event: told as a 429 or a 529 would be.

        Counted as throttled; a ``retry_after`` closes the fleet-wide cooldown. End the
        lease with ``"dropped"`` too.
        """
        self._congested(retry_after, rate_limited)
