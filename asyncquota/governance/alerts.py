"""Usage alerts: warn people before a quota runs out, without slowing a single request.

A :class:`UsageMonitor` is a smoke detector on every quota dimension (an upstream's remaining
requests, a tenant's day, the month's budget). ``observe()`` is called on the request path
with the dimension's current use and limit; it is synchronous and cheap, and it only
*decides*: when the use crosses the warning (70 %) or critical (90 %) threshold it makes an
:class:`Alert` and hands it to a bounded outbox per sink. Background tasks deliver it
(logging, a callback, a webhook), each delivery cut at ``send_timeout``, so a slow or dead
webhook costs a request nothing. A full outbox drops the alert and counts it; it never
blocks.

Each level fires once per crossing and re-arms only when the use falls below its threshold
minus ``hysteresis``, so a dimension hovering at 70 % does not page anyone twice. A jump
from below the warning straight past the critical threshold fires the critical alert only
(one alert per observation, the most severe; the warning it passed is implied and does not
fire later on the way down either).

Critical alerts also run the ``on_critical`` actions at once (synchronously, or as a
background task when they return an awaitable); :class:`ShedBatchAction` is the built-in
one: it makes the Shapers refuse batch traffic for a while.

Delivery accounting: every fired alert is one delivery per sink, and each delivery ends as
exactly one of sent, failed (raised, timed out, or cut at shutdown while sending) or dropped
(the outbox was full, the monitor was closed, or it was still queued when ``aclose()``
gave up); until then it is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Self

import aiohttp
import orjson
from yarl import URL

from ..errors import ClosedError, TransportError, UpstreamError
from ..priority import Priority, PriorityLike, coerce_priority, describe_priority

__all__ = [
    "Alert",
    "CallbackSink",
    "LoggingSink",
    "MonitorStatistics",
    "ShedBatchAction",
    "Sheddable",
    "Sink",
    "UsageMonitor",
    "WebhookFormat",
    "WebhookSink",
]

logger = logging.getLogger("asyncquota.alerts")

WebhookFormat = Literal["json", "wecom", "dingtalk", "slack"]
"""The body a webhook expects: the alert's fields, or a text message of a chat robot."""

_FORMATS: tuple[str, ...] = ("json", "wecom", "dingtalk", "slack")

_CLEAR, _WARNING, _CRITICAL = 0, 1, 2
_LEVEL_NAMES = {_WARNING: "warning", _CRITICAL: "critical"}

# The dimension family is the part before the first ":" ("tenant:acme:gpt-4o:rpd" → "tenant").
_DEFAULT_ACTIONS: dict[str, tuple[str, str]] = {
    "upstream": ("enable fallback model", "shed batch traffic"),
    "tenant": ("raise tier", "raise tier"),
    "budget": ("downgrade to a cheaper model", "raise the budget"),
    "tenant_budget": ("downgrade to a cheaper model", "raise the tenant's budget"),
}
_OTHER_ACTIONS = ("review the quota", "review the quota")


@dataclass(frozen=True, slots=True)
class Alert:
    """A quota dimension crossed a threshold.

    Attributes:
        level: ``"warning"`` or ``"critical"``.
        dimension: what is measured, family first: ``"upstream:openai:requests"``,
            ``"tenant:acme:gpt-4o:rpd"``, ``"budget"``.
        current: the use when it crossed.
        limit: the limit it is measured against.
        ratio: ``current / limit``.
        message: a full sentence for a person.
        action: the recommended action (``"raise tier"``, ``"shed batch traffic"``, ...).
        at: Unix time of the crossing (the monitor's ``wall_clock``).
    """

    level: str
    dimension: str
    current: float
    limit: float
    ratio: float
    message: str
    action: str
    at: float


@dataclass(frozen=True, slots=True)
class MonitorStatistics:
    """A snapshot of a ``UsageMonitor``.

    Attributes:
        fired: alerts fired (each is one delivery per sink).
        sent: deliveries a sink completed.
        failed: deliveries that raised, timed out, or were cut at shutdown mid-send.
        dropped: deliveries never attempted (outbox full, monitor closed, or still queued
            when ``aclose()`` gave up).
        pending: deliveries queued or being sent now.
    """

    fired: int
    sent: int
    failed: int
    dropped: int
    pending: int


class Sink(Protocol):
    """Somewhere alerts go. ``send`` may be slow or fail: the monitor bounds and counts it.

    A sink that also has an ``async aclose()`` is closed by the monitor's ``aclose()``.
    """

    async def send(self, alert: Alert) -> None:
        """Deliver one alert; raise when it could not be delivered."""
        ...


class LoggingSink:
    """Logs alerts: WARNING for a warning, ERROR for a critical one.

    The record carries the alert as ``record.alert`` for structured handlers.

    Args:
        logger: where to log (default: the ``asyncquota.alerts`` logger).
    """

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("asyncquota.alerts")

    async def send(self, alert: Alert) -> None:
        """Log the alert at its level."""
        level = logging.ERROR if alert.level == "critical" else logging.WARNING
        self._logger.log(
            level, "%s Recommended action: %s.", alert.message, alert.action, extra={"alert": alert}
        )

    def __repr__(self) -> str:
        return f"<LoggingSink {self._logger.name}>"


class CallbackSink:
    """Hands alerts to a function, sync or async (``fn(alert)`` may return an awaitable).

    Args:
        fn: called with each alert; whatever it raises counts as a failed delivery.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[Alert], Awaitable[None] | None]) -> None:
        self._fn = fn

    async def send(self, alert: Alert) -> None:
        """Call the function, and await its result when it is awaitable."""
        result = self._fn(alert)
        if inspect.isawaitable(result):
            await result

    def __repr__(self) -> str:
        return f"<CallbackSink {getattr(self._fn, '__qualname__', repr(self._fn))}>"


class WebhookSink:
    """POSTs alerts to an HTTP webhook: a generic JSON one, or a chat robot's.

    Bodies by ``format``:

        json      the alert's fields: ``{"level": ..., "dimension": ..., ..., "at": ...}``
        wecom     ``{"msgtype": "text", "text": {"content": TEXT}}`` (WeCom group robot)
        dingtalk  the same shape (DingTalk custom robot)
        slack     ``{"text": TEXT}`` (Slack incoming webhook)

    where TEXT is ``"[asyncquota critical] <message> Recommended action: <action>."`` (a
    DingTalk robot secured by keyword can use ``asyncquota`` as its keyword).

    Webhook URLs carry their key (WeCom's ``?key=``, DingTalk's ``?access_token=``, Slack's
    whole path), so errors and ``repr`` name a webhook by its origin only
    (``https://hooks.slack.com/…``), and the headers (an ``Authorization`` may live there)
    are never shown at all.

    Args:
        url: the absolute http(s) URL to POST to.
        format: ``"json"``, ``"wecom"``, ``"dingtalk"`` or ``"slack"``.
        session: an aiohttp session to send with (left open by ``aclose()``); None: the sink
            opens its own on first use and closes it in ``aclose()``.
        timeout: seconds a POST may take in all.
        headers: extra request headers.

    Raises:
        ValueError: a URL that is not absolute http(s), an unknown format, a timeout that
            is not positive.
    """

    __slots__ = (
        "_closed",
        "_format",
        "_headers",
        "_owns_session",
        "_secrets",
        "_session",
        "_timeout",
        "_url",
        "_where",
    )

    def __init__(
        self,
        url: str,
        *,
        format: WebhookFormat = "json",
        session: aiohttp.ClientSession | None = None,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            parsed = URL(url)
        except (TypeError, ValueError):
            parsed = URL()
        if parsed.scheme not in ("http", "https") or not parsed.host:
            # The URL itself is not repeated: it may carry the webhook's key.
            raise ValueError(
                "A webhook URL must be an absolute http or https URL with a host; the one "
                f"given is {'an ' + parsed.scheme + ' URL' if parsed.scheme else 'not'}."
            )
        if format not in _FORMATS:
            names = ", ".join(repr(name) for name in _FORMATS)
            raise ValueError(f"Unknown webhook format {format!r}; use one of {names}.")
        if not timeout > 0:
            raise ValueError(
                f"A webhook timeout must be a positive number of seconds, not {timeout!r}."
            )
        self._url = url
        self._where = _origin(parsed)
        self._secrets = _secrets(url, parsed)
        self._format = format
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._closed = False

    async def send(self, alert: Alert) -> None:
        """POST the alert.

        Raises:
            TransportError: the webhook could not be reached or did not answer within the
                timeout, or the sink is closed.
            UpstreamError: it answered a non-2xx status, or (WeCom, DingTalk) a 200 whose
                ``errcode`` is not 0: those robots refuse a message that way.
        """
        if self._closed:
            raise TransportError(f"The webhook sink for {self._where} is closed.", reason="closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                self._url, data=self._body(alert), headers=self._headers, timeout=self._timeout
            ) as response:
                status, body = response.status, await response.read()
        except TimeoutError as exc:
            raise TransportError(
                f"The webhook {self._where} did not answer within {self._timeout.total:g} s.",
                reason="timeout",
            ) from exc
        except aiohttp.ClientError as exc:
            detail = str(exc)
            for secret in self._secrets:
                detail = detail.replace(secret, "…")
            detail = f"{type(exc).__name__}: {' '.join(detail.split()).rstrip('. ')}"
            if isinstance(exc, aiohttp.ClientConnectorError):
                message, reason = f"could not be reached ({detail})", "connect_failed"
            else:
                message, reason = f"failed ({detail})", "transport"
            raise TransportError(f"The webhook {self._where} {message}.", reason=reason) from exc
        if not 200 <= status < 300:
            raise UpstreamError(
                f"The webhook {self._where} answered HTTP {status}.", status=status, body=body
            )
        if self._format in ("wecom", "dingtalk"):
            errcode = _errcode(body)
            if errcode:
                raise UpstreamError(
                    f"The webhook {self._where} refused the message (errcode {errcode}).",
                    status=status,
                    body=body,
                )

    async def aclose(self) -> None:
        """Close the session the sink opened itself (a session passed in stays open)."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    def _body(self, alert: Alert) -> bytes:
        if self._format == "json":
            return orjson.dumps(alert)
        text = f"[asyncquota {alert.level}] {alert.message} Recommended action: {alert.action}."
        if self._format == "slack":
            return orjson.dumps({"text": text})
        return orjson.dumps({"msgtype": "text", "text": {"content": text}})

    def __repr__(self) -> str:
        return f"<WebhookSink {self._format} {self._where}>"


def _origin(url: URL) -> str:
    """How a webhook is named in messages: its origin, with ``/…`` where a path or key was."""
    hidden = url.raw_path not in ("", "/") or bool(url.raw_query_string)
    return f"{url.origin()}/…" if hidden else str(url.origin())


def _secrets(url: str, parsed: URL) -> tuple[str, ...]:
    """Every spelling of the parts of a webhook URL that may carry its key, longest first."""
    parts = {
        url,
        str(parsed),
        parsed.path,
        parsed.raw_path,
        parsed.query_string,
        parsed.raw_query_string,
        url.partition("?")[2],
        parsed.raw_password or "",
    }
    return tuple(sorted(parts - {"", "/"}, key=len, reverse=True))


def _errcode(body: bytes) -> object:
    """The ``errcode`` of a WeCom/DingTalk reply (0, or None when the reply has none)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document.get("errcode") if isinstance(document, dict) else None


class Sheddable(Protocol):
    """What ShedBatchAction acts on (a Shaper): refuse a priority class and lower for a while."""

    def shed_below(self, priority: Priority | int, *, for_seconds: float) -> None:
        """Refuse new requests of ``priority`` and less important ones for ``for_seconds``
        (with ``retry_after``), and shed those of them already waiting."""
        ...


class ShedBatchAction:
    """An ``on_critical`` action: make the Shapers refuse batch traffic for a while.

    When an upstream is nearly out of quota, the background work is the part that can come
    back later; refusing it at once keeps what is left for the people waiting. Only alerts
    whose dimension starts with ``dimensions`` act (by default the upstreams' own: a
    tenant near its day limit or a budget near its end is no reason to refuse everybody's
    batch work); ``""`` acts on every critical alert.

    Args:
        targets: the Shapers (anything with ``shed_below``) to tell, in order.
        for_seconds: how long they refuse it.
        priority: the class refused, with every less important one.
        dimensions: the dimension prefix this action reacts to.

    Raises:
        ValueError: no target, a duration that is not positive, an unknown priority class.
    """

    __slots__ = ("_dimensions", "_for_seconds", "_priority", "_targets")

    def __init__(
        self,
        targets: Sequence[Sheddable],
        *,
        for_seconds: float = 60.0,
        priority: PriorityLike = "batch",
        dimensions: str = "upstream:",
    ) -> None:
        if not targets:
            raise ValueError("A ShedBatchAction needs at least one target to shed on.")
        if not for_seconds > 0:
            raise ValueError(
                f"for_seconds must be a positive number of seconds, not {for_seconds!r}."
            )
        self._targets = tuple(targets)
        self._for_seconds = float(for_seconds)
        self._priority = describe_priority(coerce_priority(priority))
        self._dimensions = dimensions

    def __call__(self, alert: Alert) -> None:
        """Tell every target to shed, if the alert's dimension is one this action watches."""
        if alert.dimension.startswith(self._dimensions):
            for target in self._targets:
                target.shed_below(self._priority, for_seconds=self._for_seconds)

    def __repr__(self) -> str:
        return (
            f"<ShedBatchAction {self._priority!r} for {self._for_seconds:g} s "
            f"on {self._dimensions or 'any'}* targets={len(self._targets)}>"
        )


class _Outbox:
    """One sink's bounded queue and the task that delivers it."""

    __slots__ = ("overflowing", "queue", "sending", "sink", "task")

    def __init__(self, sink: Sink, max_pending: int) -> None:
        self.sink = sink
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(max_pending)
        self.task: asyncio.Task[None] | None = None
        self.sending = False
        self.overflowing = False  # a drop was logged; the next is logged once it drained


class UsageMonitor:
    """Watches quota dimensions and alerts once per threshold crossing.

    Call ``observe()`` wherever a dimension's use is known; it returns at once. Alerts wait
    in each sink's outbox until ``start()`` (or ``async with``) runs the delivery tasks, one
    per sink, so one dead webhook does not hold back the others.

    Args:
        warning: the ratio of use to limit at which a warning fires.
        critical: the ratio at which a critical alert fires (and ``on_critical`` runs).
        hysteresis: how far below its threshold the ratio must fall before a level fires
            again.
        sinks: where alerts go (default: one ``LoggingSink``; ``()`` for none).
        on_critical: actions run with each critical alert, at once, on the calling
            path; sync ones must be quick, an awaitable result runs as a background task.
            What they raise is logged, never passed to ``observe()``'s caller.
        max_pending: the size of each sink's outbox.
        send_timeout: seconds one delivery may take before it is cut and counted failed.
        wall_clock: Unix time for ``Alert.at``.

    Raises:
        ValueError: thresholds not in ``0 < warning < critical <= 1``, a hysteresis not in
            ``[0, warning)``, a ``max_pending`` below 1, a ``send_timeout`` not positive.
    """

    __slots__ = (
        "_actions",
        "_critical",
        "_dropped",
        "_failed",
        "_fired",
        "_hysteresis",
        "_on_critical",
        "_outboxes",
        "_send_timeout",
        "_sent",
        "_state",
        "_wall_clock",
        "_warning",
        "_within",
    )

    def __init__(
        self,
        *,
        warning: float = 0.7,
        critical: float = 0.9,
        hysteresis: float = 0.05,
        sinks: Sequence[Sink] | None = None,
        on_critical: Sequence[Callable[[Alert], Awaitable[None] | None]] = (),
        max_pending: int = 1000,
        send_timeout: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < warning < critical <= 1:
            raise ValueError(
                "Alert thresholds must satisfy 0 < warning < critical <= 1; "
                f"got warning={warning!r} and critical={critical!r}."
            )
        if not 0 <= hysteresis < warning:
            raise ValueError(
                f"hysteresis must be at least 0 and below warning ({warning!r}), "
                f"not {hysteresis!r}."
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer of at least 1, not {max_pending!r}.")
        if not send_timeout > 0:
            raise ValueError(
                f"send_timeout must be a positive number of seconds, not {send_timeout!r}."
            )
        self._warning = float(warning)
        self._critical = float(critical)
        self._hysteresis = float(hysteresis)
        self._on_critical = tuple(on_critical)
        self._send_timeout = float(send_timeout)
        self._wall_clock = wall_clock
        chosen: Sequence[Sink] = (LoggingSink(),) if sinks is None else sinks
        self._outboxes = tuple(_Outbox(sink, max_pending) for sink in chosen)
        self._state: dict[str, int] = {}  # dimension → highest level fired and not re-armed
        self._actions: set[asyncio.Task[None]] = set()
        self._within = "new"
        self._fired = self._sent = self._failed = self._dropped = 0

    # ------------------------------------------------------------------ the request path

    def observe(
        self,
        dimension: str,
        current: float,
        limit: float,
        *,
        action: str | None = None,
        message: str | None = None,
    ) -> Alert | None:
        """Record a dimension's use; return the alert it fires, if it crosses a threshold.

        Cheap and synchronous: a dictionary look-up and a few comparisons unless it fires.
        After ``aclose()`` it still decides and returns alerts, but sends nothing and runs
        no action.

        Args:
            dimension: what is measured (its family, before the first ``":"``, picks the
                default action: upstream, tenant, budget, tenant_budget).
            current: the use now (requests, tokens, dollars...).
            limit: the limit it is measured against.
            action: the recommended action (default: the family's).
            message: the sentence for a person (default: a generic one with the figures).

        Raises:
            ValueError: a limit that is not positive.
        """
        if not limit > 0:
            raise ValueError(
                f"The limit of {dimension!r} must be a positive number, not {limit!r}."
            )
        ratio = current / limit
        state = self._state.get(dimension, _CLEAR)
        if state == _CRITICAL and ratio < self._critical - self._hysteresis:
            state = _WARNING
        if state == _WARNING and ratio < self._warning - self._hysteresis:
            state = _CLEAR
        if ratio >= self._critical and state < _CRITICAL:
            level = _CRITICAL
        elif ratio >= self._warning and state < _WARNING:
            level = _WARNING
        else:
            if state == _CLEAR:
                self._state.pop(dimension, None)
            else:
                self._state[dimension] = state
            return None
        self._state[dimension] = level
        alert = self._alert(level, dimension, current, limit, ratio, action, message)
        self._fired += 1
        if self._within == "closed":
            self._dropped += len(self._outboxes)
            return alert
        for outbox in self._outboxes:
            self._post(outbox, alert)
        if level == _CRITICAL:
            for run in self._on_critical:
                self._run_action(run, alert)
        return alert

    def _alert(
        self,
        level: int,
        dimension: str,
        current: float,
        limit: float,
        ratio: float,
        action: str | None,
        message: str | None,
    ) -> Alert:
        name = _LEVEL_NAMES[level]
        if action is None:
            family = dimension.partition(":")[0]
            action = _DEFAULT_ACTIONS.get(family, _OTHER_ACTIONS)[level - 1]
        if message is None:
            message = (
                f"Usage of {dimension} reached {round(ratio * 100)} % of its limit "
                f"({_figure(current)} of {_figure(limit)})."
            )
        return Alert(name, dimension, current, limit, ratio, message, action, self._wall_clock())

    def _post(self, outbox: _Outbox, alert: Alert) -> None:
        try:
            outbox.queue.put_nowait(alert)
        except asyncio.QueueFull:
            self._dropped += 1
            if not outbox.overflowing:
                outbox.overflowing = True
                logger.warning(
                    "The alert outbox of %r is full (%d waiting); alerts to it are dropped "
                    "until it drains, starting with: %s",
                    outbox.sink,
                    outbox.queue.maxsize,
                    alert.message,
                )

    def _run_action(self, run: Callable[[Alert], Awaitable[None] | None], alert: Alert) -> None:
        try:
            result = run(alert)
        except Exception:
            logger.exception("The on_critical action %r failed on %s.", run, alert.dimension)
            return
        if not inspect.isawaitable(result):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if inspect.iscoroutine(result):
                result.close()
            logger.error(
                "The on_critical action %r is async but observe() ran outside an event loop; "
                "it did not run for %s.",
                run,
                alert.dimension,
            )
            return
        task = loop.create_task(_finish(result, run, alert), name="asyncquota-alert-action")
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start delivering (``async with`` does this). Needs a running event loop.

        Raises:
            ClosedError: the monitor was closed already.
        """
        if self._within == "closed":
            raise ClosedError("This UsageMonitor is closed; make a new one.")
        if self._within == "new":
            loop = asyncio.get_running_loop()
            for index, outbox in enumerate(self._outboxes):
                outbox.task = loop.create_task(
                    self._deliver(outbox), name=f"asyncquota-alerts-{index}"
                )
            self._within = "open"

    async def aclose(self, *, grace: float = 2.0) -> None:
        """Deliver what is queued within ``grace`` seconds, then stop and close the sinks.

        Deliveries still queued then are counted dropped, one being sent is cut (failed);
        background actions still running are cancelled. Sinks with an ``aclose()`` are
        closed. Idempotent.

        Raises:
            ValueError: a negative grace.
        """
        if not grace >= 0:
            raise ValueError(f"grace must be a number of seconds of at least 0, not {grace!r}.")
        if self._within == "closed":
            return
        started = self._within == "open"
        self._within = "closed"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                if started:
                    for outbox in self._outboxes:
                        await outbox.queue.join()
                while self._actions:
                    await asyncio.wait(set(self._actions))
        tasks = [outbox.task for outbox in self._outboxes if outbox.task is not None]
        tasks += self._actions
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for outbox in self._outboxes:
            self._dropped += outbox.queue.qsize()
            while not outbox.queue.empty():
                outbox.queue.get_nowait()
                outbox.queue.task_done()
            close = getattr(outbox.sink, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    logger.exception("Closing the alert sink %r failed.", outbox.sink)

    async def _deliver(self, outbox: _Outbox) -> None:
        """Send the outbox's alerts one by one, each within ``send_timeout``, forever."""
        queue = outbox.queue
        while True:
            alert = await queue.get()
            outbox.sending = True
            try:
                async with asyncio.timeout(self._send_timeout) as deadline:
                    await outbox.sink.send(alert)
            except asyncio.CancelledError:
                self._failed += 1
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    self._log_failure(outbox, alert, "it was cut at shutdown")
                    raise
                # A sink that raises CancelledError of its own accord has just failed.
                self._log_failure(outbox, alert, "the sink raised CancelledError")
            except Exception as exc:
                self._failed += 1
                reason = (
                    f"it took longer than {self._send_timeout:g} s"
                    if deadline.expired()
                    else f"{type(exc).__name__}: {exc}"
                )
                self._log_failure(outbox, alert, reason)
            else:
                self._sent += 1
            finally:
                outbox.sending = False
                queue.task_done()
            if queue.empty():
                outbox.overflowing = False

    def _log_failure(self, outbox: _Outbox, alert: Alert, reason: str) -> None:
        logger.warning(
            "The %s alert on %s was not delivered to %r: %s.",
            alert.level,
            alert.dimension,
            outbox.sink,
            reason.rstrip("."),
        )

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> MonitorStatistics:
        """Counts of alerts fired and of their deliveries."""
        pending = sum(outbox.queue.qsize() + outbox.sending for outbox in self._outboxes)
        return MonitorStatistics(
            fired=self._fired,
            sent=self._sent,
            failed=self._failed,
            dropped=self._dropped,
            pending=pending,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<UsageMonitor {self._within} sinks={len(self._outboxes)} "
            f"alerting={len(self._state)} fired={stats.fired} sent={stats.sent} "
            f"failed={stats.failed} dropped={stats.dropped} pending={stats.pending}>"
        )


async def _finish(result: Awaitable[Any], run: object, alert: Alert) -> None:
    """Await an async on_critical action, logging what it raises."""
    try:
        await result
    except Exception:
        logger.exception("The on_critical action %r failed on %s.", run, alert.dimension)


def _figure(value: float) -> str:
    """A number as a person reads it: ``910``, ``45.5``, ``0.33``."""
    return format(value, ".2f").rstrip("0").rstrip(".")
