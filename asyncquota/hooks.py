"""Instrumentation: what happens to each request, as frozen events handed to hooks.

A hook is anything with an ``on_event(event)`` method. It is called synchronously on the
event loop, so it must be quick and must not raise (an exception from a hook is logged
and swallowed: instrumentation never fails a request). Events are frozen, slotted
dataclasses that share the fields of :class:`Event`; their class says what happened:

    Queued      the request entered the queue (or re-entered it, for a retry)
    Admitted    it left the queue through the gates and is being sent
    Replied     the upstream answered an attempt (any status), after ``seconds``
    Throttled   the upstream answered with a congestion signal (429, 503, 529)
    Retried     it goes back into the queue after a failed attempt
    Shed        it was rejected without being sent (queue full, deadline unreachable,
                a cooldown longer than its deadline, shutdown)
    Completed   it ended: ``outcome`` says how (a RequestOutcome), ``reason`` in detail

The frequent events (Queued, Admitted, Replied, a Completed that is OK) are made only when
some hook would hear them: any hook but a LoggingHook whose logger is above DEBUG.

The default, :class:`LoggingHook`, logs sheds and throttling at INFO and the rest at
DEBUG on the ``asyncquota`` logger (INFO, not WARNING: on a bad night there are thousands,
and they are the library doing its job, not a fault). No request header (API keys live there)
is ever part of an event, and an event's path is scrubbed when it is made (query values
as ``***``, see :func:`~asyncquota.urls.redact_url`): some upstreams take the key in the
query string, and events end in logs.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import DeadlineExceededError, QuotaError
from .outcomes import RequestOutcome, classify
from .priority import Priority, describe_priority
from .urls import redact_url

if TYPE_CHECKING:
    from .ticket import Ticket

__all__ = [
    "Admitted",
    "Completed",
    "Event",
    "Hook",
    "LoggingHook",
    "Queued",
    "Replied",
    "Reporter",
    "Retried",
    "Shed",
    "Throttled",
]

logger = logging.getLogger("asyncquota")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What every event carries.

    Attributes:
        at: loop time of the event.
        method: the request's HTTP method.
        path: the request's path, its query values scrubbed (``/x?key=***``).
        priority: its priority class.
        tenant: its tenant, if any.
        attempt: 1 for the first attempt, 2 for the first retry, ...
    """

    at: float
    method: str
    path: str
    priority: Priority | int
    tenant: Hashable | None
    attempt: int

    def __post_init__(self) -> None:
        scrubbed = redact_url(self.path)
        if scrubbed is not self.path:
            object.__setattr__(self, "path", scrubbed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Queued(Event):
    """The request entered the queue; ``depth`` waiters were queued after it arrived."""

    depth: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted(Event):
    """The request passed the queue and the gates after ``waited`` seconds."""

    waited: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Replied(Event):
    """The upstream answered an attempt with ``status`` after ``seconds``.

    ``seconds`` runs from the send to the whole reply, or for a ``stream`` to its headers
    (the time to its first byte). ``reserved_tokens`` is what the attempt reserved;
    ``used_tokens`` what a successful reply said it used (None: it did not say, or a
    stream, whose usage comes at its end).
    """

    status: int
    seconds: float
    stream: bool
    reserved_tokens: int
    used_tokens: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Throttled(Event):
    """The upstream answered ``status`` (a congestion signal), asking to wait ``retry_after``."""

    status: int
    retry_after: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Retried(Event):
    """The request goes back into the queue after ``delay`` seconds because of ``reason``."""

    reason: str
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Shed(Event):
    """The request was rejected unsent for ``reason``; try again after ``retry_after``."""

    reason: str
    retry_after: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed(Event):
    """The request ended in ``outcome``, ``latency`` seconds after it began.

    ``reason`` says more: "ok", "cancelled" or the error's reason (``"busy"``,
    ``"rate_limited"``, an upstream's error code, ...); ``status`` the last HTTP status.
    """

    outcome: RequestOutcome
    reason: str
    status: int | None
    latency: float


class Hook(Protocol):
    """Receives every event; must be quick and must not block."""

    def on_event(self, event: Event) -> None:
        """Handle one event."""


class LoggingHook:
    """Logs events on the ``asyncquota`` logger (or the one given).

    Sheds and throttling at INFO, everything else at DEBUG, so a production log at INFO
    shows exactly the moments the load shaping had to say no.
    """

    __slots__ = ("_logger",)

    def __init__(self, logger_: logging.Logger | None = None) -> None:
        self._logger = logger_ or logger

    @property
    def debug_enabled(self) -> bool:
        """Whether DEBUG records would be logged (else the frequent events need not be made)."""
        return self._logger.isEnabledFor(logging.DEBUG)

    def enabled_for(self, kind: type[Event]) -> bool:
        """Whether an event of ``kind`` would be logged (else it need not be made)."""
        return self._logger.isEnabledFor(_level_of(kind))

    def on_event(self, event: Event) -> None:
        """Log the event at its level (cheaply skipped when that level is off)."""
        level = _level_of(type(event))
        if self._logger.isEnabledFor(level):
            self._logger.log(level, "%s", event)


def _level_of(kind: type[Event]) -> int:
    """The level a LoggingHook logs ``kind`` at: the moments shaping said no at INFO."""
    return logging.INFO if issubclass(kind, Throttled | Shed) else logging.DEBUG


class Reporter:
    """Counts how a Shaper's requests go and end, and tells its hooks.

    The counters are what ``ShaperStatistics`` reports (see there). The frequent events
    (queued, admitted, ok) are made only when a hook would hear them (``tracing``).
    """

    __slots__ = (
        "_listening",
        "_loggers",
        "_logging",
        "cancelled",
        "deadline",
        "failed",
        "hooks",
        "ok",
        "retried",
        "sent",
        "shed",
        "throttled",
    )

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks: tuple[Hook, ...] = tuple(hooks)
        # Asked several times a request: a hook that is not a LoggingHook always listens;
        # a LoggingHook only while its logger takes DEBUG records.
        self._logging = tuple(hook for hook in self.hooks if isinstance(hook, LoggingHook))
        self._listening = len(self._logging) < len(self.hooks)
        # Their loggers, asked directly (what ``debug_enabled`` asks): ``tracing`` is asked
        # three times a request, and the hop through each hook cost more than the answer.
        self._loggers = tuple(hook._logger for hook in self._logging)
        self.sent = self.ok = self.throttled = self.retried = 0
        self.shed = self.deadline = self.failed = self.cancelled = 0

    def tracing(self) -> bool:
        """Whether the frequent events (queued, admitted, ok) have anyone to hear them."""
        if self._listening:
            return True
        # A plain loop: asked three times a request, and twice as fast as any() over a
        # generator.
        for logger_ in self._loggers:  # noqa: SIM110
            if logger_.isEnabledFor(logging.DEBUG):
                return True
        return False

    def failed_with(self, ticket: Ticket, exc: QuotaError, now: float) -> None:
        """The request ended in ``exc``: count it (deadline, shed unsent, or failed) and tell."""
        if isinstance(exc, DeadlineExceededError):
            self.deadline += 1
        elif ticket.sent == 0:  # refused unsent: shed, whatever the reason
            self.shed += 1
            if self.hooks:
                self.emit(Shed, ticket, now, reason=exc.reason, retry_after=exc.retry_after)
        else:
            self.failed += 1
        self.completed(ticket, classify(exc), exc.reason, getattr(exc, "status", None), now)

    def completed(
        self,
        ticket: Ticket,
        outcome: RequestOutcome,
        reason: str,
        status: int | None,
        now: float,
    ) -> None:
        """The request ended in ``outcome`` (``reason``: "ok", "cancelled" or the error's)."""
        if outcome is not RequestOutcome.OK or self.tracing():
            self.emit(
                Completed,
                ticket,
                now,
                outcome=outcome,
                reason=reason,
                status=status,
                latency=now - ticket.started,
            )

    def emit(self, kind: type[Event], ticket: Ticket, now: float, **fields: Any) -> None:
        """Make one event of ``kind`` about ``ticket`` and hand it to every hook.

        Not made at all when only LoggingHooks listen and none logs ``kind``'s level (a
        refused request's Shed and Completed cost a few µs each, on the path that has to
        say no fastest).
        """
        if not self._listening and not any(hook.enabled_for(kind) for hook in self._logging):
            return
        event = kind(
            at=now,
            method=ticket.method,
            path=ticket.path,
            priority=describe_priority(ticket.priority),
            tenant=ticket.tenant,
            attempt=ticket.attempt,
            **fields,
        )
        for hook in self.hooks:
            try:
                hook.on_event(event)
            except Exception:  # instrumentation never fails a request
                logger.exception("The asyncquota hook %r failed on %s.", hook, event)
