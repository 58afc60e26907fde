"""Usage alerts: warn people before a quota runs out, without slowing a single request.

A :class:`UsageMonitor` is a smoke detector on every quota dimension (an upstream's remaining
requests, a tenant's day, the month's budget). ``observe()`` is called on the request path
with the dimension's current use and limit; it is synchronous and cheap, and it only
*decides*: when the use crosses the dimension's warning or critical threshold it makes an
:class:`Alert` and hands it to a bounded outbox per sink. Background tasks deliver it
(logging, a callback, a webhook), each delivery cut at ``send_timeout``, so a slow or dead
webhook costs a request nothing. A full outbox drops the alert and counts it; it never
blocks.

Thresholds are per dimension (:class:`Thresholds`, matched by pattern): 70 % and 90 % unless
a rule says otherwise; the budgets warn at 80 % by default. Each level of each dimension
has its recommended action ("raise tier", "shed batch traffic", ...).

Each level fires once per crossing and re-arms only when the use falls below its threshold
minus ``hysteresis`` and stays there ``rearm_after`` seconds (a minute by default), so a
dimension hovering at 70 % does not page anyone twice. The time is the quiet that makes a
new crossing news: an upstream's remaining requests, read from the headers of every
reply, are the level of a bucket that refills every second and swings by a third between
two replies in real time (the 2 a.m. night's real-time run: 133 alerts from two such
dimensions, 6 on virtual time). A jump
from below the warning straight past the critical threshold fires the critical alert only
(one alert per observation, the most severe; the warning it passed is implied and does not
fire later on the way down either).

Besides crossings, ``event()`` tells of a model's availability: its quota exhausted
(critical), traffic moved off it for another reason (warning), and back again (info). These
fire once per episode, in the same way.

Critical alerts also run the ``on_critical`` actions at once (synchronously, or as a
background task when they return an awaitable); :class:`ShedBatchAction` is the built-in
one: it makes the Shapers refuse batch traffic for a while.

Sinks choose what they take (a :class:`Route`: by level, kind, dimension, tenant) and how
fast (a :class:`Pace`: WeCom and DingTalk robots take 20 messages a minute and block
after). Alerts that come faster than a sink's pace wait for it, and when the pace has one
message left, it carries every alert then waiting, folded into one digest: a burst costs a
robot one message, and nothing is dropped for it.

Delivery accounting: every fired alert is one delivery per sink, and each delivery ends as
exactly one of skipped (the sink's route does not take it), sent, failed (raised, timed out,
or cut at shutdown while sending) or dropped (the outbox was full, the monitor was closed,
or it was still queued when ``aclose()`` gave up); until then it is pending. A delivery
folded into a digest is sent or failed with it, and counted ``aggregated`` too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import inspect
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, Protocol, Self, get_args
from urllib.parse import quote_plus

import aiohttp
import orjson
from yarl import URL

from ..errors import ClosedError, TransportError, UpstreamError
from ..priority import Priority, PriorityLike, coerce_priority, describe_priority

__all__ = [
    "DEFAULT_THRESHOLDS",
    "REARM_AFTER",
    "WEBHOOK_PACES",
    "Alert",
    "AlertKind",
    "AlertLevel",
    "CallbackSink",
    "EventKind",
    "LoggingSink",
    "MonitorStatistics",
    "Pace",
    "Route",
    "ShedBatchAction",
    "Sheddable",
    "Sink",
    "Thresholds",
    "UsageMonitor",
    "WebhookFormat",
    "WebhookSink",
]

logger = logging.getLogger("asyncquota.alerts")

REARM_AFTER = 60.0
"""Seconds a fired level's use must stay below its threshold less the hysteresis before
the level may fire again (see :class:`UsageMonitor`)."""

AlertLevel = Literal["info", "warning", "critical"]
"""How bad it is: ``info`` (something is back to normal), ``warning``, ``critical``."""

AlertKind = Literal["usage", "exhausted", "fallback", "recovered", "digest"]
"""What an alert tells: a dimension's use crossed a threshold (``usage``); a model's quota
is gone (``exhausted``); traffic moved off a model for another reason (``fallback``); a
model is available again (``recovered``); several alerts folded into one message to keep
within a sink's pace (``digest``)."""

EventKind = Literal["exhausted", "fallback", "recovered"]
"""The kinds ``UsageMonitor.event()`` reports."""

WebhookFormat = Literal["json", "wecom", "dingtalk", "feishu", "slack"]
"""The body a webhook expects: the alert's fields, or a message of a chat robot."""

_FORMATS: tuple[str, ...] = get_args(WebhookFormat)
_SIGNED_FORMATS = ("dingtalk", "feishu")
_MARKDOWN_FORMATS = ("wecom", "dingtalk", "feishu")
_ROUTED_KINDS: tuple[str, ...] = ("usage", "exhausted", "fallback", "recovered")

_CLEAR, _WARNING, _CRITICAL = 0, 1, 2
_LEVEL_NAMES: dict[int, AlertLevel] = {_WARNING: "warning", _CRITICAL: "critical"}
_RANKS: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}

_EVENT_LEVELS: dict[str, int] = {"exhausted": _CRITICAL, "fallback": _WARNING}

_DIGEST_ITEMS = 10  # alerts listed one by one in a digest; the rest are counted
_RESOLVED_CACHE = 4096  # dimensions whose thresholds are remembered before starting afresh
_ERRMSG_CHARS = 200
_EARLY = 0.001  # seconds a paced slot may be taken before it is free


def _check_levels(warning: float, critical: float) -> None:
    if not (_is_number(warning) and _is_number(critical) and 0 < warning < critical <= 1):
        raise ValueError(
            "Alert thresholds must satisfy 0 < warning < critical <= 1; "
            f"got warning={warning!r} and critical={critical!r}."
        )


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Alert:
    """A quota dimension crossed a threshold, or a model's availability changed.

    Attributes:
        level: ``"info"``, ``"warning"`` or ``"critical"``.
        dimension: what is measured, family first: ``"upstream:openai:requests"``,
            ``"tenant:acme:gpt-4o:rpd"``, ``"budget"``; ``"model:<name>"`` for an event,
            ``"digest"`` for a digest.
        current: the use when it crossed (0 for events and digests, which measure nothing).
        limit: the limit it is measured against (0 likewise).
        ratio: ``current / limit`` (0 likewise).
        message: a full sentence for a person.
        action: the recommended action (``"raise tier"``, ``"shed batch traffic"``, ...).
        at: Unix time of the crossing (the monitor's ``wall_clock``).
        kind: what it tells (see ``AlertKind``).
        tenant: the tenant it is about, if any (taken from ``tenant:<id>:...`` and
            ``tenant_budget:<id>`` dimensions unless ``observe()`` is told).
        folded: for a digest, the alerts it carries, oldest first.
    """

    level: AlertLevel
    dimension: str
    current: float
    limit: float
    ratio: float
    message: str
    action: str
    at: float
    kind: AlertKind = "usage"
    tenant: str | None = None
    folded: tuple[Alert, ...] = ()


@dataclass(frozen=True, slots=True)
class MonitorStatistics:
    """A snapshot of a ``UsageMonitor``.

    Attributes:
        fired: alerts fired (each is one delivery per sink).
        sent: deliveries a sink completed.
        failed: deliveries that raised, timed out, or were cut at shutdown mid-send.
        dropped: deliveries never attempted (outbox full, monitor closed, or still queued
            when ``aclose()`` gave up).
        pending: deliveries queued, waiting for their sink's pace, or being sent now.
        aggregated: deliveries that went folded into a digest (also counted sent or
            failed, with the digest).
        skipped: deliveries a sink's route did not take.
    """

    fired: int
    sent: int
    failed: int
    dropped: int
    pending: int
    aggregated: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """The thresholds and recommended actions of the dimensions a pattern matches.

    Whatever is left out comes from the next rule that matches (see ``UsageMonitor``'s
    ``thresholds``); the two levels go together: a rule that sets one takes the other from
    the monitor's ``warning`` or ``critical``.

    Attributes:
        warning: the ratio of use to limit at which a warning fires.
        critical: the ratio at which a critical alert fires.
        warning_action, critical_action: the recommended action at each level.

    Raises:
        ValueError: a threshold not in ``(0, 1]``, a warning not below the critical
            threshold, an empty action.
    """

    warning: float | None = None
    critical: float | None = None
    warning_action: str | None = None
    critical_action: str | None = None

    def __post_init__(self) -> None:
        for name in ("warning", "critical"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value <= 1):
                raise ValueError(
                    f"A {name} threshold must be above 0 and at most 1, not {value!r}."
                )
        if self.warning is not None and self.critical is not None:
            _check_levels(self.warning, self.critical)
        for name in ("warning_action", "critical_action"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"A {name} must be a non-empty sentence, not {value!r}.")


DEFAULT_THRESHOLDS: Mapping[str, Thresholds] = MappingProxyType(
    {
        "upstream:*": Thresholds(
            warning_action="enable fallback model", critical_action="shed batch traffic"
        ),
        "tenant:*": Thresholds(warning_action="raise tier", critical_action="raise tier"),
        "budget": Thresholds(
            warning=0.8,
            critical=0.9,
            warning_action="downgrade to a cheaper model",
            critical_action="raise the budget",
        ),
        "tenant_budget:*": Thresholds(
            warning=0.8,
            critical=0.9,
            warning_action="downgrade to a cheaper model",
            critical_action="raise the tenant's budget",
        ),
        "upstream_cap:*": Thresholds(
            warning=0.8,
            critical=0.9,
            warning_action="downgrade to a cheaper model or move traffic to the fallbacks",
            critical_action="raise the account's spend cap at the provider and its monthly_cap",
        ),
    }
)
"""The rules every monitor has after its own: actions per dimension family, and the budgets
and the upstream accounts' monthly caps (``upstream_cap:<account>``) warned at 80 % and
90 % whatever the monitor's own pair (the month's money is slower to replace than a
minute's requests). A rule of the monitor's own for the same pattern
overrides these field by field."""

_OTHER_ACTIONS = ("review the quota", "review the quota")


@dataclass(frozen=True, slots=True)
class Pace:
    """At most ``messages`` messages in any ``per`` seconds: a chat robot's own limit.

    It is a sliding window, not a bucket: DingTalk counts 20 messages in any minute and
    blocks a robot for 10 minutes past that; a bucket refilled at 20 a minute would let 40
    through in the first one.

    Raises:
        ValueError: ``messages`` not a positive integer, ``per`` not a positive number.
    """

    messages: int
    per: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.messages, bool) or not isinstance(self.messages, int):
            raise ValueError(
                f"A pace's messages must be a positive integer, not {self.messages!r}."
            )
        if self.messages < 1:
            raise ValueError(
                f"A pace's messages must be a positive integer, not {self.messages!r}."
            )
        if not (_is_number(self.per) and self.per > 0):
            raise ValueError(
                f"A pace's per must be a positive number of seconds, not {self.per!r}."
            )

    def __str__(self) -> str:
        return f"{self.messages} per {self.per:g} s"


WEBHOOK_PACES: Mapping[str, Pace | None] = MappingProxyType(
    {
        "json": None,
        "wecom": Pace(20, 60.0),
        "dingtalk": Pace(20, 60.0),
        # Feishu allows 100 a minute and 5 a second: 5 in any 3 s keeps within both.
        "feishu": Pace(5, 3.0),
        "slack": Pace(1, 1.0),
    }
)
"""A webhook's pace by format, unless it is given one: each robot's documented limit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Which alerts a sink takes: every condition given must hold (none given: all of them).

    Route the operators' robot to what they act on (``dimensions=("upstream:*", "budget",
    "model:*")``), a tenant's own webhook to its alerts (``tenants={"acme"}``), the pager
    to ``min_level="critical"``.

    Attributes:
        min_level: the least severe level taken: ``"info"`` takes all, ``"warning"``
            leaves out recoveries, ``"critical"`` takes critical alerts only.
        kinds: the kinds taken (``"usage"``, ``"exhausted"``, ``"fallback"``,
            ``"recovered"``); empty: every kind.
        dimensions: patterns of the dimensions taken, ``*`` standing for any run of
            characters (``"tenant:*:rpd"``); empty: every dimension.
        tenants: the tenants whose alerts are taken; when given, alerts about no tenant
            (an upstream's, the global budget's, a model's) are not.
        when: a predicate of your own, asked last; what it raises is logged and the alert
            taken (an alert is not lost to a bug in a filter).

    Raises:
        ValueError: an unknown level or kind, an empty pattern or tenant.
    """

    min_level: AlertLevel = "info"
    kinds: Collection[str] = frozenset()
    dimensions: Sequence[str] = ()
    tenants: Collection[str] = frozenset()
    when: Callable[[Alert], bool] | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.min_level not in _RANKS:
            raise ValueError(
                f"Unknown alert level {self.min_level!r}; use 'info', 'warning' or 'critical'."
            )
        kinds = frozenset(self.kinds)
        for kind in sorted(kinds - set(_ROUTED_KINDS)):
            names = ", ".join(repr(name) for name in _ROUTED_KINDS)
            raise ValueError(f"Unknown alert kind {kind!r}; use {names}.")
        dimensions = tuple(self.dimensions)
        tenants = frozenset(self.tenants)
        for what, values in (("dimension pattern", dimensions), ("tenant", tenants)):
            for value in values:
                if not isinstance(value, str) or not value:
                    raise ValueError(f"A route's {what} must be a non-empty string, not {value!r}.")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "dimensions", dimensions)
        object.__setattr__(self, "tenants", tenants)
        object.__setattr__(self, "_patterns", tuple(_pattern(text) for text in dimensions))

    def takes(self, alert: Alert) -> bool:
        """Whether a sink on this route takes the alert."""
        if _RANKS[alert.level] < _RANKS[self.min_level]:
            return False
        if self.kinds and alert.kind not in self.kinds:
            return False
        if self._patterns and not any(p.fullmatch(alert.dimension) for p in self._patterns):
            return False
        if self.tenants and alert.tenant not in self.tenants:
            return False
        if self.when is None:
            return True
        try:
            return bool(self.when(alert))
        except Exception:
            logger.exception(
                "The route predicate %r failed on %s; the alert is taken.",
                self.when,
                alert.dimension,
            )
            return True


class Sink(Protocol):
    """Somewhere alerts go. ``send`` may be slow or fail: the monitor bounds and counts it.

    A sink that also has an ``async aclose()`` is closed by the monitor's ``aclose()``; one
    with a ``route`` attribute (a ``Route``, or None) gets only the alerts it takes; one with
    a ``pace`` attribute (a ``Pace``, or None) is sent at most that many messages, a burst
    beyond it folded into one digest. The built-in sinks take both as arguments.
    """

    async def send(self, alert: Alert) -> None:
        """Deliver one alert; raise when it could not be delivered."""
        ...


class LoggingSink:
    """Logs alerts: INFO for a recovery, WARNING for a warning, ERROR for a critical one.

    The record carries the alert as ``record.alert`` for structured handlers.

    Args:
        logger: where to log (default: the ``asyncquota.alerts`` logger).
        route: which alerts it takes (None: all).
        pace: at most how many messages (None: unpaced).
    """

    __slots__ = ("_logger", "pace", "route")

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        route: Route | None = None,
        pace: Pace | None = None,
    ) -> None:
        self._logger = logger or logging.getLogger("asyncquota.alerts")
        self.route = route
        self.pace = pace

    async def send(self, alert: Alert) -> None:
        """Log the alert at its level."""
        level = _LOG_LEVELS[alert.level]
        if alert.folded:
            self._logger.log(level, "%s", "\n".join(_lines(alert)), extra={"alert": alert})
        else:
            self._logger.log(
                level,
                "%s Recommended action: %s.",
                alert.message,
                alert.action,
                extra={"alert": alert},
            )

    def __repr__(self) -> str:
        return f"<LoggingSink {self._logger.name}>"


class CallbackSink:
    """Hands alerts to a function, sync or async (``fn(alert)`` may return an awaitable).

    Args:
        fn: called with each alert; whatever it raises counts as a failed delivery.
        route: which alerts it takes (None: all).
        pace: at most how many calls (None: unpaced).
    """

    __slots__ = ("_fn", "pace", "route")

    def __init__(
        self,
        fn: Callable[[Alert], Awaitable[None] | None],
        *,
        route: Route | None = None,
        pace: Pace | None = None,
    ) -> None:
        self._fn = fn
        self.route = route
        self.pace = pace

    async def send(self, alert: Alert) -> None:
        """Call the function, and await its result when it is awaitable."""
        result = self._fn(alert)
        if inspect.isawaitable(result):
            await result

    def __repr__(self) -> str:
        return f"<CallbackSink {getattr(self._fn, '__qualname__', repr(self._fn))}>"


class WebhookSink:
    """POSTs alerts to an HTTP webhook: a generic JSON one, or a chat robot's.

    Bodies by ``format`` (TEXT and MARKDOWN below):

        json      the alert's fields: ``{"level": ..., "dimension": ..., ..., "at": ...}``
        wecom     ``{"msgtype": "text", "text": {"content": TEXT}}`` (WeCom group robot);
                  markdown: ``{"msgtype": "markdown", "markdown": {"content": MARKDOWN}}``
        dingtalk  the same text shape (DingTalk custom robot); markdown:
                  ``{"msgtype": "markdown", "markdown": {"title": TITLE, "text": MARKDOWN}}``
        feishu    ``{"msg_type": "text", "content": {"text": TEXT}}`` (Feishu/Lark custom
                  bot); markdown: a rich-text ``post`` with TITLE and one line a paragraph
        slack     ``{"text": TEXT}`` (Slack incoming webhook; Slack reads it as mrkdwn)

    where TEXT is ``"[asyncquota critical] <message> Recommended action: <action>."`` and
    TITLE ``"[asyncquota critical] <dimension>"`` (a robot secured by keyword can use
    ``asyncquota`` as its keyword). A digest lists its alerts one a line, ten at most.

    Signed robots (``secret``): DingTalk's (加签) get ``&timestamp=<ms>&sign=<sign>`` on the
    URL, where sign is the URL-encoded base64 of HMAC-SHA256 keyed by the secret over
    ``"<timestamp>\\n<secret>"``; Feishu's get ``"timestamp": "<s>"`` and ``"sign"`` in the
    body, the base64 of HMAC-SHA256 keyed by ``"<timestamp>\\n<secret>"`` over nothing. Both
    robots refuse a timestamp more than an hour off, so ``clock`` must be Unix time.

    A chat robot refuses a message inside a 200 (``errcode`` for WeCom and DingTalk,
    ``code`` or the older ``StatusCode`` for Feishu): that, and a 200 whose body is not such
    a JSON reply, is a failure whose error carries the robot's ``errmsg``.

    Webhook URLs carry their key (WeCom's ``?key=``, DingTalk's ``?access_token=``, Slack's
    and Feishu's whole path), so errors and ``repr`` name a webhook by its origin only
    (``https://hooks.slack.com/…``); the headers (an ``Authorization`` may live there), the
    secret and the signed URL are never shown at all.

    Args:
        url: the absolute http(s) URL to POST to.
        format: ``"json"``, ``"wecom"``, ``"dingtalk"``, ``"feishu"`` or ``"slack"``.
        secret: the signing secret of a DingTalk or Feishu robot (None: unsigned).
        markdown: send WeCom and DingTalk markdown, and Feishu rich text, instead of text.
        route: which alerts it takes (None: all).
        pace: at most how many messages (None: the format's, ``WEBHOOK_PACES``).
        session: an aiohttp session to send with (left open by ``aclose()``); None: the sink
            opens its own on first use and closes it in ``aclose()``.
        timeout: seconds a POST may take in all.
        headers: extra request headers.
        clock: Unix time in seconds, for signatures.

    Raises:
        ValueError: a URL that is not absolute http(s), an unknown format, a timeout that
            is not positive, a secret or markdown for a format that has none.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_format",
        "_headers",
        "_markdown",
        "_owns_session",
        "_secret",
        "_secrets",
        "_session",
        "_timeout",
        "_url",
        "_where",
        "pace",
        "route",
    )

    def __init__(
        self,
        url: str,
        *,
        format: WebhookFormat = "json",
        secret: str | None = None,
        markdown: bool = False,
        route: Route | None = None,
        pace: Pace | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
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
        if secret is not None:
            if format not in _SIGNED_FORMATS:
                raise ValueError(
                    f"Only DingTalk and Feishu robots sign their messages; a {format} webhook "
                    "takes no secret."
                )
            if not isinstance(secret, str) or not secret:
                # Not repeated: whatever was given in its place may be a secret too.
                raise ValueError("A webhook secret must be a non-empty string.")
        if markdown and format not in _MARKDOWN_FORMATS:
            raise ValueError(
                f"Markdown is for WeCom, DingTalk and Feishu robots, not a {format} webhook."
            )
        self._url = url
        self._where = _origin(parsed)
        self._secret = secret
        self._secrets = _secrets(url, parsed) + ((secret,) if secret else ())
        self._format = format
        self._markdown = markdown
        self.route = route
        self.pace = WEBHOOK_PACES[format] if pace is None else pace
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._clock = clock
        self._closed = False

    async def send(self, alert: Alert) -> None:
        """POST the alert.

        Raises:
            TransportError: the webhook could not be reached or did not answer within the
                timeout, or the sink is closed.
            UpstreamError: it answered a non-2xx status, or (WeCom, DingTalk, Feishu) a 200
                that refuses the message or is not the robot's JSON reply.
        """
        if self._closed:
            raise TransportError(f"The webhook sink for {self._where} is closed.", reason="closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url, body, hidden = self._request(alert)
        try:
            async with self._session.post(
                url, data=body, headers=self._headers, timeout=self._timeout
            ) as response:
                status, reply = response.status, await response.read()
        except TimeoutError as exc:
            raise TransportError(
                f"The webhook {self._where} did not answer within {self._timeout.total:g} s.",
                reason="timeout",
            ) from exc
        except aiohttp.ClientError as exc:
            detail = self._scrub(str(exc), hidden)
            detail = f"{type(exc).__name__}: {' '.join(detail.split()).rstrip('. ')}"
            if isinstance(exc, aiohttp.ClientConnectorError):
                message, reason = f"could not be reached ({detail})", "connect_failed"
            else:
                message, reason = f"failed ({detail})", "transport"
            raise TransportError(f"The webhook {self._where} {message}.", reason=reason) from exc
        if not 200 <= status < 300:
            raise UpstreamError(
                f"The webhook {self._where} answered HTTP {status}.", status=status, body=reply
            )
        refusal = self._refusal(reply)
        if refusal is not None:
            raise UpstreamError(
                f"The webhook {self._where} {self._scrub(refusal, hidden)}.",
                status=status,
                body=reply,
            )

    async def aclose(self) -> None:
        """Close the session the sink opened itself (a session passed in stays open)."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    def _request(self, alert: Alert) -> tuple[str | URL, bytes, tuple[str, ...]]:
        """The URL to POST to, the body, and what of them must never be shown."""
        if self._format == "json":
            return self._url, orjson.dumps(alert), ()
        body = self._body(alert)
        if self._secret is None:
            return self._url, orjson.dumps(body), ()
        if self._format == "feishu":
            seconds = round(self._clock())
            signed = {"timestamp": str(seconds), "sign": _feishu_sign(self._secret, seconds)}
            return self._url, orjson.dumps({**signed, **body}), ()
        millis = round(self._clock() * 1000)
        sign = _dingtalk_sign(self._secret, millis)
        base = str(URL(self._url))
        url = f"{base}{'&' if '?' in base else '?'}timestamp={millis}&sign={sign}"
        # encoded=True: the sign is sent exactly as DingTalk computes it (%2B, %2F, %3D).
        return URL(url, encoded=True), orjson.dumps(body), (url, sign)

    def _body(self, alert: Alert) -> dict[str, Any]:
        """A chat robot's message."""
        text = _text(alert)
        if self._format == "slack":
            return {"text": text}
        if self._format == "feishu":
            if not self._markdown:
                return {"msg_type": "text", "content": {"text": text}}
            paragraphs = [[{"tag": "text", "text": line}] for line in _lines(alert)]
            post = {"en_us": {"title": _title(alert), "content": paragraphs}}
            return {"msg_type": "post", "content": {"post": post}}
        if self._format == "wecom":
            # WeCom cuts nothing: it refuses a text over 2 048 bytes, markdown over 4 096.
            if self._markdown:
                return {
                    "msgtype": "markdown",
                    "markdown": {"content": _cut(_markdown(alert), 4096)},
                }
            return {"msgtype": "text", "text": {"content": _cut(text, 2048)}}
        if self._markdown:
            markdown = {"title": _title(alert), "text": _markdown(alert)}
            return {"msgtype": "markdown", "markdown": markdown}
        return {"msgtype": "text", "text": {"content": text}}

    def _refusal(self, reply: bytes) -> str | None:
        """Why a chat robot's 2xx reply refuses the message (None: it took it)."""
        if self._format in ("json", "slack"):
            return None
        try:
            document = orjson.loads(reply)
        except orjson.JSONDecodeError:
            document = None
        if not isinstance(document, dict):
            return f"answered {_excerpt(reply)!r}, which is not its JSON reply"
        if self._format == "feishu":
            # Feishu's reply has code and msg; older ones StatusCode and StatusMessage only.
            code_field, message_field = (
                ("StatusCode", "StatusMessage")
                if "code" not in document and "StatusCode" in document
                else ("code", "msg")
            )
        else:
            code_field, message_field = "errcode", "errmsg"
        code = document.get(code_field)
        if code == 0 and not isinstance(code, bool):
            return None
        if code is None:
            return f"answered a reply without {code_field}: {_excerpt(reply)!r}"
        said = document.get(message_field)
        detail = f": {_excerpt(str(said))}" if said else ""
        return f"refused the message ({code_field} {code}{detail})"

    def _scrub(self, text: str, hidden: tuple[str, ...]) -> str:
        for secret in sorted((*self._secrets, *hidden), key=len, reverse=True):
            text = text.replace(secret, "…")
        return text

    def __repr__(self) -> str:
        options = "".join(
            (" signed" if self._secret else "", " markdown" if self._markdown else "")
        )
        return f"<WebhookSink {self._format}{options} {self._where}>"


def _dingtalk_sign(secret: str, millis: int) -> str:
    """DingTalk's sign: urlencode(base64(HMAC-SHA256(secret, "<millis>\\n<secret>")))."""
    digest = hmac.new(secret.encode(), f"{millis}\n{secret}".encode(), hashlib.sha256).digest()
    return quote_plus(base64.b64encode(digest))


def _feishu_sign(secret: str, seconds: int) -> str:
    """Feishu's sign: base64(HMAC-SHA256 keyed by "<seconds>\\n<secret>", of nothing)."""
    digest = hmac.new(f"{seconds}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _lines(alert: Alert) -> list[str]:
    """An alert as lines: the message and its action, or a digest's message and its items."""
    if not alert.folded:
        return [alert.message, f"Recommended action: {alert.action}."]
    items = [
        f"{index}. [{each.level}] {each.message} Recommended action: {each.action}."
        for index, each in enumerate(alert.folded[:_DIGEST_ITEMS], 1)
    ]
    rest = len(alert.folded) - _DIGEST_ITEMS
    return [alert.message, *items, *([f"… and {rest} more."] if rest > 0 else [])]


def _text(alert: Alert) -> str:
    lines = _lines(alert)
    joined = "\n".join(lines) if alert.folded else " ".join(lines)
    return f"[asyncquota {alert.level}] {joined}"


def _title(alert: Alert) -> str:
    about = f"{len(alert.folded)} alerts" if alert.folded else alert.dimension
    return f"[asyncquota {alert.level}] {about}"


def _markdown(alert: Alert) -> str:
    message, *rest = _lines(alert)
    tail = "\n".join(rest) if alert.folded else f"> {rest[0]}"
    return f"### {_title(alert)}\n\n{message}\n\n{tail}"


def _cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes, ending in "…" where it was cut."""
    if len(text.encode()) <= limit:
        return text
    return text.encode()[: limit - 3].decode("utf-8", "ignore") + "…"


def _excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= _ERRMSG_CHARS else text[: _ERRMSG_CHARS - 1] + "…"


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


class _Window:
    """When a paced sink's last messages went: a sliding window (pure: it takes ``now``)."""

    __slots__ = ("pace", "times")

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self.times: deque[float] = deque()

    def left(self, now: float) -> int:
        """Messages the pace allows at ``now``."""
        # A timer may wake a hair before the time it was set for (floats, clock
        # resolution); a send is recorded when it ended, after the robot counted it.
        while self.times and self.times[0] + self.pace.per <= now + _EARLY:
            self.times.popleft()
        return self.pace.messages - len(self.times)

    def free_at(self, now: float) -> float:
        """The earliest time, from ``now`` on, at which a message may go."""
        return now if self.left(now) > 0 else self.times[0] + self.pace.per

    def record(self, now: float) -> None:
        self.times.append(now)


class _Outbox:
    """One sink's route, pace, bounded queue and the task that delivers it."""

    __slots__ = ("held", "overflowing", "queue", "route", "sink", "task", "window")

    def __init__(self, sink: Sink, max_pending: int) -> None:
        self.sink = sink
        self.route: Route | None = getattr(sink, "route", None)
        pace: Pace | None = getattr(sink, "pace", None)
        self.window = None if pace is None else _Window(pace)
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(max_pending)
        self.task: asyncio.Task[None] | None = None
        self.held = 0  # alerts taken from the queue: waiting for the pace, or being sent
        self.overflowing = False  # a drop was logged; the next is logged once it drained


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A dimension's thresholds and actions, every rule applied."""

    warning: float
    critical: float
    actions: tuple[str, str]


class UsageMonitor:
    """Watches quota dimensions and alerts once per threshold crossing.

    Call ``observe()`` wherever a dimension's use is known, and ``event()`` when a model's
    availability changes; both return at once. Alerts wait in each sink's outbox until
    ``start()`` (or ``async with``) runs the delivery tasks, one per sink, so one dead
    webhook does not hold back the others.

    A dimension's thresholds and actions come from the rules that match it, in order: the
    ``thresholds`` given, then ``DEFAULT_THRESHOLDS``. The first rule that sets a level sets
    both (the one it leaves out is ``warning`` or ``critical`` below); each action comes from
    the first rule that sets it (else ``"review the quota"``). A rule given for a pattern of
    ``DEFAULT_THRESHOLDS`` overrides that one field by field: ``{"budget":
    Thresholds(critical=0.95)}`` keeps the budget's 80 % warning.

    Args:
        warning: the ratio of use to limit at which a warning fires, where no rule says.
        critical: the ratio at which a critical alert fires (and ``on_critical`` runs),
            where no rule says.
        hysteresis: how far below its threshold the ratio must fall before a level fires
            again.
        rearm_after: seconds the ratio must stay that far below before the level fires
            again (on the running loop's clock; observed outside a loop, at once).
        thresholds: dimension pattern (``*`` stands for any run of characters:
            ``"tenant:*:rpd"``, ``"upstream:openai:*"``, ``"budget"``) → its rule, first
            match first.
        sinks: where alerts go (default: one ``LoggingSink``; ``()`` for none).
        on_critical: actions run with each critical alert, at once, on the calling
            path; sync ones must be quick, an awaitable result runs as a background task.
            What they raise is logged, never passed to ``observe()``'s caller.
        max_pending: the size of each sink's outbox.
        send_timeout: seconds one delivery may take before it is cut and counted failed.
        wall_clock: Unix time for ``Alert.at``.

    Raises:
        ValueError: thresholds not in ``0 < warning < critical <= 1`` (the monitor's, or a
            rule's with the monitor's filled in), a hysteresis not in ``[0, warning)`` for
            every warning, an empty pattern, a ``max_pending`` below 1, a ``send_timeout``
            not positive, a ``rearm_after`` negative or not finite.
    """

    __slots__ = (
        "_actions",
        "_aggregated",
        "_critical",
        "_dropped",
        "_failed",
        "_fired",
        "_hysteresis",
        "_on_critical",
        "_outboxes",
        "_quiet",
        "_rearm_after",
        "_resolved",
        "_rules",
        "_send_timeout",
        "_sent",
        "_skipped",
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
        rearm_after: float = REARM_AFTER,
        thresholds: Mapping[str, Thresholds] | None = None,
        sinks: Sequence[Sink] | None = None,
        on_critical: Sequence[Callable[[Alert], Awaitable[None] | None]] = (),
        max_pending: int = 1000,
        send_timeout: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        _check_levels(warning, critical)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer of at least 1, not {max_pending!r}.")
        if not send_timeout > 0:
            raise ValueError(
                f"send_timeout must be a positive number of seconds, not {send_timeout!r}."
            )
        self._warning = float(warning)
        self._critical = float(critical)
        self._rules = _rules(thresholds or {}, self._warning, self._critical, hysteresis)
        self._hysteresis = float(hysteresis)
        self._rearm_after = _rearm_after(rearm_after)
        self._on_critical = tuple(on_critical)
        self._send_timeout = float(send_timeout)
        self._wall_clock = wall_clock
        chosen: Sequence[Sink] = (LoggingSink(),) if sinks is None else sinks
        self._outboxes = tuple(_Outbox(sink, max_pending) for sink in chosen)
        self._state: dict[str, int] = {}  # dimension → highest level fired and not re-armed
        self._quiet: dict[str, float] = {}  # dimension → loop time it fell below its re-arm
        self._resolved: dict[str, _Resolved] = {}
        self._actions: set[asyncio.Task[None]] = set()
        self._within = "new"
        self._fired = self._sent = self._failed = self._dropped = 0
        self._aggregated = self._skipped = 0

    def reload(
        self,
        *,
        warning: float = 0.7,
        critical: float = 0.9,
        hysteresis: float = 0.05,
        rearm_after: float = REARM_AFTER,
        thresholds: Mapping[str, Thresholds] | None = None,
    ) -> None:
        """Replace the levels and the rules while running; the sinks and episodes stay.

        Everything is checked first, as the constructor checks it; on any error nothing
        changes. A dimension already alerting keeps its level: it fires again only on
        crossing a higher threshold (the new one), and is re-armed once it falls below
        the new threshold less the new hysteresis, so a reload never repeats an alert
        nor loses one. Sinks, their outboxes and pace, actions and statistics are kept.

        Args:
            warning, critical, hysteresis, rearm_after, thresholds: as for the
                constructor (the whole new set, not changes to the old one).

        Raises:
            ValueError: as the constructor's; the old thresholds stay.
        """
        _check_levels(warning, critical)
        rules = _rules(thresholds or {}, float(warning), float(critical), hysteresis)
        quiet = _rearm_after(rearm_after)
        self._warning, self._critical = float(warning), float(critical)
        self._hysteresis = float(hysteresis)
        self._rearm_after = quiet
        self._rules = rules
        self._resolved.clear()

    def thresholds(self, dimension: str) -> tuple[float, float, str, str]:
        """The warning and critical thresholds of a dimension, and the action at each.

        What ``observe()`` applies, every rule resolved: ``(0.8, 0.9, "downgrade to a
        cheaper model", "raise the budget")`` for ``"budget"`` by default.
        """
        resolved = self._resolve(dimension)
        return (resolved.warning, resolved.critical, *resolved.actions)

    def _resolve(self, dimension: str) -> _Resolved:
        resolved = self._resolved.get(dimension)
        if resolved is not None:
            return resolved
        levels: tuple[float, float] | None = None
        warning_action = critical_action = None
        for pattern, rule in self._rules:
            if not pattern.fullmatch(dimension):
                continue
            if levels is None and (rule.warning is not None or rule.critical is not None):
                levels = (
                    self._warning if rule.warning is None else rule.warning,
                    self._critical if rule.critical is None else rule.critical,
                )
            warning_action = warning_action or rule.warning_action
            critical_action = critical_action or rule.critical_action
        warning, critical = levels or (self._warning, self._critical)
        actions = (warning_action or _OTHER_ACTIONS[0], critical_action or _OTHER_ACTIONS[1])
        resolved = _Resolved(warning, critical, actions)
        if len(self._resolved) >= _RESOLVED_CACHE:
            self._resolved.clear()  # dimensions come and go with tenants; keep it bounded
        self._resolved[dimension] = resolved
        return resolved

    # ------------------------------------------------------------------ the request path

    def observe(
        self,
        dimension: str,
        current: float,
        limit: float,
        *,
        action: str | None = None,
        message: str | None = None,
        tenant: str | None = None,
    ) -> Alert | None:
        """Record a dimension's use; return the alert it fires, if it crosses a threshold.

        Cheap and synchronous: a dictionary look-up and a few comparisons unless it fires.
        After ``aclose()`` it still decides and returns alerts, but sends nothing and runs
        no action.

        Args:
            dimension: what is measured (it picks the thresholds and the default action:
                ``upstream:<name>:requests``, ``tenant:<id>:<model>:rpd``, ``budget``,
                ``tenant_budget:<id>``, ``upstream_cap:<account>``...).
            current: the use now (requests, tokens, dollars...).
            limit: the limit it is measured against.
            action: the recommended action (default: the dimension's).
            message: the sentence for a person (default: a generic one with the figures).
            tenant: the tenant it is about (default: read from a ``tenant:`` or
                ``tenant_budget:`` dimension; give it when a tenant id may contain ``:``).

        Raises:
            ValueError: a limit that is not positive.
        """
        if not limit > 0:
            raise ValueError(
                f"The limit of {dimension!r} must be a positive number, not {limit!r}."
            )
        resolved = self._resolve(dimension)
        ratio = current / limit
        state = self._state.get(dimension, _CLEAR)
        if state != _CLEAR:
            state = self._rearm(dimension, state, ratio, resolved)
        if ratio >= resolved.critical and state < _CRITICAL:
            level = _CRITICAL
        elif ratio >= resolved.warning and state < _WARNING:
            level = _WARNING
        else:
            if state == _CLEAR:
                self._state.pop(dimension, None)
            else:
                self._state[dimension] = state
            return None
        self._state[dimension] = level
        if message is None:
            message = (
                f"Usage of {dimension} reached {round(ratio * 100)} % of its limit "
                f"({_figure(current)} of {_figure(limit)})."
            )
        alert = Alert(
            _LEVEL_NAMES[level],
            dimension,
            current,
            limit,
            ratio,
            message,
            resolved.actions[level - 1] if action is None else action,
            self._wall_clock(),
            tenant=_tenant_of(dimension) if tenant is None else tenant,
        )
        self._dispatch(alert)
        return alert

    def _rearm(self, dimension: str, state: int, ratio: float, resolved: _Resolved) -> int:
        """The level a fired dimension stays at: lower once clearly and lastingly below."""
        calm = state
        if calm == _CRITICAL and ratio < resolved.critical - self._hysteresis:
            calm = _WARNING
        if calm == _WARNING and ratio < resolved.warning - self._hysteresis:
            calm = _CLEAR
        if calm == state:
            self._quiet.pop(dimension, None)
            return state
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return calm  # no loop, no clock to wait on
        since = self._quiet.setdefault(dimension, now)
        if now - since < self._rearm_after:
            return state
        del self._quiet[dimension]
        return calm

    def event(
        self,
        kind: EventKind,
        model: str,
        *,
        upstream: str | None = None,
        until: float | None = None,
        fallback: str | None = None,
        reason: str | None = None,
        action: str | None = None,
        message: str | None = None,
    ) -> Alert | None:
        """Tell of a model's availability; return the alert it fires, if any.

        The one call the Gateway makes when it holds a model back or lets it go again;
        call it every time, the monitor keeps to once per episode (dimension
        ``model:<model>``):

            exhausted  (critical) the model's quota is gone: held back until ``until``,
                       its traffic moved to ``fallback`` (None: it has none, its requests
                       fail). Fires unless the model is already reported exhausted; runs
                       the ``on_critical`` actions.
            fallback   (warning) traffic moved off the model for another reason
                       (overloaded, unreachable: say which in ``reason``). Fires unless the
                       model is already reported exhausted or fallen back.
            recovered  (info) the model serves again (a probe succeeded, or the hold
                       ended): traffic returns to it. Fires only after one of the others,
                       and ends the episode.

        For example, ``monitor.event("exhausted", "claude-sonnet", upstream="anthropic",
        until=reset, fallback="gpt-4o", reason="You have reached your specified API usage
        limits")`` fires "Model claude-sonnet's quota on anthropic is exhausted until
        2026-04-01 00:00:00 UTC (You have reached your specified API usage limits): traffic
        moved to gpt-4o." with the recommended action "raise the quota or add credit on
        anthropic; make sure gpt-4o can carry the traffic meanwhile".

        Cheap and synchronous, like ``observe()``; after ``aclose()`` it still decides and
        returns alerts, but sends nothing and runs no action.

        Args:
            kind: ``"exhausted"``, ``"fallback"`` or ``"recovered"``.
            model: the model's configured name.
            upstream: the upstream (account) it is served by, if known.
            until: Unix time at which it is expected back, if known.
            fallback: the model its traffic moved to (None: none).
            reason: what the upstream said, or why it is passed over (a short phrase).
            action: the recommended action (default: one for the kind, as above).
            message: the sentence for a person (default: one for the kind, as above).

        Raises:
            ValueError: an unknown kind, an empty model name.
        """
        if kind not in ("exhausted", "fallback", "recovered"):
            raise ValueError(f"Unknown event {kind!r}; use 'exhausted', 'fallback' or 'recovered'.")
        if not isinstance(model, str) or not model:
            raise ValueError(f"An event needs the model's name, not {model!r}.")
        dimension = f"model:{model}"
        state = self._state.get(dimension, _CLEAR)
        if kind == "recovered":
            if state == _CLEAR:
                return None
            self._state.pop(dimension)
            level: AlertLevel = "info"
        else:
            rank = _EVENT_LEVELS[kind]
            if state >= rank:
                return None
            self._state[dimension] = rank
            level = _LEVEL_NAMES[rank]
        default_message, default_action = _event_text(
            kind, model, upstream, until, fallback, reason
        )
        alert = Alert(
            level,
            dimension,
            0.0,
            0.0,
            0.0,
            default_message if message is None else message,
            default_action if action is None else action,
            self._wall_clock(),
            kind=kind,
        )
        self._dispatch(alert)
        return alert

    def _dispatch(self, alert: Alert) -> None:
        """Count the alert fired; queue it for each sink whose route takes it; act if critical."""
        self._fired += 1
        closed = self._within == "closed"
        for outbox in self._outboxes:
            if outbox.route is not None and not outbox.route.takes(alert):
                self._skipped += 1
            elif closed:
                self._dropped += 1
            else:
                self._post(outbox, alert)
        if alert.level == "critical" and not closed:
            for run in self._on_critical:
                self._run_action(run, alert)

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

        Deliveries still queued then, or waiting for their sink's pace, are counted dropped;
        one being sent is cut (failed); background actions still running are cancelled.
        Sinks with an ``aclose()`` are closed. Idempotent.

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
        """Send the outbox's alerts in order, at the sink's pace, each within ``send_timeout``.

        When the pace has one message left and more than one alert waits, that message is
        a digest of all of them.
        """
        queue, window = outbox.queue, outbox.window
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            outbox.held = 1
            attempted = False
            deadline: asyncio.Timeout | None = None
            try:
                if window is not None:
                    wait = window.free_at(loop.time()) - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if window.left(loop.time()) == 1:
                        while not queue.empty():
                            batch.append(queue.get_nowait())
                        outbox.held = len(batch)
                alert = batch[0] if len(batch) == 1 else self._digest(batch, window)
                attempted = True
                async with asyncio.timeout(self._send_timeout) as deadline:
                    await outbox.sink.send(alert)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                shutdown = task is not None and task.cancelling() > 0
                if not attempted:
                    self._dropped += len(batch)  # it was waiting for the pace: shutdown
                    raise
                self._failed += len(batch)
                self._aggregated += len(batch) if len(batch) > 1 else 0
                if shutdown:
                    self._log_failure(outbox, alert, "it was cut at shutdown")
                    raise
                # A sink that raises CancelledError of its own accord has just failed.
                self._log_failure(outbox, alert, "the sink raised CancelledError")
            except Exception as exc:
                self._failed += len(batch)
                self._aggregated += len(batch) if len(batch) > 1 else 0
                reason = (
                    f"it took longer than {self._send_timeout:g} s"
                    if deadline is not None and deadline.expired()
                    else f"{type(exc).__name__}: {exc}"
                )
                self._log_failure(outbox, alert, reason)
            else:
                self._sent += len(batch)
                self._aggregated += len(batch) if len(batch) > 1 else 0
            finally:
                if window is not None and attempted:
                    window.record(loop.time())
                outbox.held = 0
                for _ in batch:
                    queue.task_done()
            if queue.empty():
                outbox.overflowing = False

    def _digest(self, batch: list[Alert], window: _Window | None) -> Alert:
        """One alert that carries a burst: the most severe level, a count, every alert."""
        worst = max(batch, key=lambda alert: _RANKS[alert.level]).level
        counts = ", ".join(
            f"{count} {level}"
            for level in ("critical", "warning", "info")
            if (count := sum(alert.level == level for alert in batch))
        )
        pace = f" ({window.pace})" if window is not None else ""
        return Alert(
            worst,
            "digest",
            0.0,
            0.0,
            0.0,
            f"{len(batch)} alerts came faster than this sink's pace{pace} allows, in one "
            f"message: {counts}.",
            "see each alert's own",
            self._wall_clock(),
            kind="digest",
            folded=tuple(batch),
        )

    def _log_failure(self, outbox: _Outbox, alert: Alert, reason: str) -> None:
        what = (
            f"A digest of {len(alert.folded)} alerts ({alert.level} at worst)"
            if alert.folded
            else f"The {alert.level} alert on {alert.dimension}"
        )
        logger.warning("%s was not delivered to %r: %s.", what, outbox.sink, reason.rstrip("."))

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> MonitorStatistics:
        """Counts of alerts fired and of their deliveries."""
        pending = sum(outbox.queue.qsize() + outbox.held for outbox in self._outboxes)
        return MonitorStatistics(
            fired=self._fired,
            sent=self._sent,
            failed=self._failed,
            dropped=self._dropped,
            pending=pending,
            aggregated=self._aggregated,
            skipped=self._skipped,
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


def _event_text(
    kind: str,
    model: str,
    upstream: str | None,
    until: float | None,
    fallback: str | None,
    reason: str | None,
) -> tuple[str, str]:
    """The default message and recommended action of a model's event."""
    on = f" on {upstream}" if upstream else ""
    account = upstream or model
    why = f" ({reason.strip().rstrip('.')})" if reason else ""
    when = f" until {_utc(until)}" if until is not None else ""
    if kind == "recovered":
        return f"Model {model}{on} is available again{why}: traffic returns to it.", ("none needed")
    if fallback:
        traffic = f"traffic moved to {fallback}"
        watch = f"make sure {fallback} can carry the traffic meanwhile"
    else:
        traffic = "it has no fallback, so its requests fail"
        watch = f"configure a fallback model for {model}"
    if kind == "exhausted":
        return (
            f"Model {model}'s quota{on} is exhausted{when}{why}: {traffic}.",
            f"raise the quota or add credit on {account}; {watch}",
        )
    return (
        f"Model {model}{on} is unavailable{when}{why}: {traffic}.",
        f"check {account}'s status; {watch}",
    )


def _utc(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tenant_of(dimension: str) -> str | None:
    """The tenant a ``tenant:<id>:...`` or ``tenant_budget:<id>`` dimension is about."""
    family, _, rest = dimension.partition(":")
    if family == "tenant_budget":
        return rest or None
    if family == "tenant":
        return rest.partition(":")[0] or None
    return None


def _rules(
    given: Mapping[str, Thresholds], warning: float, critical: float, hysteresis: float
) -> tuple[tuple[re.Pattern[str], Thresholds], ...]:
    """The rules in the order they apply (the given ones, each merged over the default of
    its pattern, then the other defaults), every pair of levels checked."""
    ordered = [
        (
            pattern,
            _over(rule, DEFAULT_THRESHOLDS[pattern]) if pattern in DEFAULT_THRESHOLDS else rule,
        )
        for pattern, rule in given.items()
    ]
    ordered += [(p, rule) for p, rule in DEFAULT_THRESHOLDS.items() if p not in given]
    warnings = [warning]
    for pattern, rule in ordered:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"A thresholds pattern must be a non-empty string, not {pattern!r}.")
        if rule.warning is None and rule.critical is None:
            continue
        pair = (
            warning if rule.warning is None else rule.warning,
            critical if rule.critical is None else rule.critical,
        )
        if not pair[0] < pair[1]:
            raise ValueError(
                f"The thresholds of {pattern!r} must satisfy warning < critical; with the "
                f"monitor's filled in they are warning={pair[0]!r} and critical={pair[1]!r}."
            )
        warnings.append(pair[0])
    for each in warnings:
        if not 0 <= hysteresis < each:
            raise ValueError(
                f"hysteresis must be at least 0 and below warning ({each!r}), not {hysteresis!r}."
            )
    return tuple((_pattern(pattern), rule) for pattern, rule in ordered)


def _over(own: Thresholds, default: Thresholds) -> Thresholds:
    """``own``, its missing fields taken from ``default``."""
    return Thresholds(
        warning=default.warning if own.warning is None else own.warning,
        critical=default.critical if own.critical is None else own.critical,
        warning_action=own.warning_action or default.warning_action,
        critical_action=own.critical_action or default.critical_action,
    )


def _pattern(text: str) -> re.Pattern[str]:
    """A dimension pattern: ``*`` stands for any run of characters, the rest for itself."""
    return re.compile(".*".join(re.escape(part) for part in text.split("*")))


def _rearm_after(seconds: float) -> float:
    if isinstance(seconds, bool) or not (
        isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0
    ):
        raise ValueError(f"rearm_after must be a number of seconds >= 0, not {seconds!r}.")
    return float(seconds)


def _figure(value: float) -> str:
    """A number as a person reads it: ``910``, ``45.5``, ``0.33``."""
    return format(value, ".2f").rstrip("0").rstrip(".")
