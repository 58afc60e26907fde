"""One entry point over several upstreams: who may spend what on which model.

A :class:`Gateway` sits above one :class:`~asyncquota.Shaper` per upstream and decides,
for each request, before anything is queued::

    route (task, complexity, context → model)  ── budget policy (may downgrade or reject)
      → for the model, then each fallback that fits:
          unavailable? (cooling down, account held: out of quota) → next fallback
          tenant tier (RPM/RPD/TPM for that model)           → TenantLimitError at once
          budget reservation (estimate)                      → BudgetExceededError
            and the cap of the model's account               → UpstreamCapError → next fallback
          the model's Shaper (queue, gates, retries)         → shed, busy, out of quota,
                                                               overloaded, unreachable → next
                                                               fallback
      → reconcile tier tokens and budget with the reply's usage; watch usage for alerts

A tenant over its own tier gets its error at once: it is their quota, not congestion, so
it never waits behind anyone nor falls back to another model. What the upstreams refuse
(cooling down, an account out of quota, shedding, more waiting than a model serves in
time: ``BusyError``, overload, no reply: see ``fallback_on``) moves the request down the
model's fallback chain; the answer says which model answered and why it was chosen. An
account out of quota is held back as a whole until the time its provider named (else
``exhausted_hold``), then probed by one request; see :class:`Gateway`.

:meth:`Gateway.stream` does the same for a streamed reply, event by event: the chain is
walked until a model's stream has said something (what comes before its first content is
held back, so a stream broken off there falls back too), then each event reaches the
caller, in its dialect, as the model sends it (:class:`RoutedStream`).

Cost is estimated before the call (prompt estimate + ``max_tokens``, at the model's
prices) and reserved against the budgets and the monthly cap of the account that serves
the model (``monthly_cap``: a mirror of the provider's own), in one step, so concurrent
requests cannot overshoot together; the reply's ``usage`` settles it. A request its
account's cap cannot pay moves down its chain (a ``fallback`` alert says why) rather than
be sent to a provider that would refuse it.

When the counter store is unavailable (a locked, corrupt or failing SQLite file, a Redis
that does not answer within its timeout; see :class:`~.store.SQLiteStore` and
:class:`~.redis_store.RedisStore`), tiers and budgets fail closed: a request whose limits
cannot be checked is refused with :class:`~asyncquota.errors.StoreUnavailableError`
before anything is sent, and it is not passed to a fallback (they share the store). A
request already served still gets its reply: a settlement the store refuses afterwards
(a refund, a top-up to the real usage) is logged at WARNING on ``asyncquota.governance``
and lost, so the counters keep the estimate charged at admission, never more, never twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Hashable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Self, TypeVar

import orjson

from .. import dialects
from ..dialects import DialectError, dialect_of_path
from ..errors import (
    BudgetExceededError,
    BusyError,
    DeadlineExceededError,
    DeadlineUnreachableError,
    NoRouteError,
    OverloadedError,
    QueueFullError,
    QuotaError,
    QuotaExhaustedError,
    RejectedError,
    StoreUnavailableError,
    ThrottledError,
    TransportError,
    UpstreamCapError,
    UpstreamError,
)
from ..hooks import Hook
from ..options import MIN_DEADLINE, RequestOptions, given_options
from ..priority import Priority, PriorityLike
from ..shaper import Shaper
from ..signals import Provider, QuotaSnapshot, QuotaWindow
from ..streaming import ShapedStream
from ..tokens import output_allowance, prompt_tokens, reply_usage
from ..transport import Response, Transport
from .alerts import LoggingSink, ShedBatchAction, Sink, UsageMonitor, WebhookSink
from .budget import BudgetGuard, BudgetReservation, money
from .config import (
    EXHAUSTED_HOLD,
    FALLBACK_CAUSES,
    ConfigError,
    GovernanceConfig,
    RedisURL,
    load_config,
)
from .redis_store import RedisStore
from .routing import Model, Route, Router
from .store import MemoryStore, SQLiteStore, Store, reserve_all
from .tiers import DimensionStatus, TenantGrant, TenantQuotas, tenant_id

__all__ = [
    "WATCH_INTERVAL",
    "Availability",
    "Gateway",
    "GatewayStatistics",
    "QuotaStatus",
    "Routed",
    "RoutedStream",
]

logger = logging.getLogger("asyncquota.governance")
events_logger = logging.getLogger("asyncquota.gateway")

_EVERY_RANK = -(2**63)  # more important than any class: shed_below() it refuses them all

WATCH_INTERVAL = 1.0
"""Seconds between two readings of a tenant's day usage and the budget for alerts.

The gateway remembers when it last read each tenant only while that matters: an entry
older than this is the same as none, so such entries are swept as the map grows (to twice
its live size, at least ``_WATCH_SWEEP_MIN``). Memory follows the tenants seen in the
last second, not every tenant ever seen."""

_WATCH_SWEEP_MIN = 1024

DEFAULT_OUTPUT_TOKENS = 256

_T = TypeVar("_T")

_RELOADABLE_UPSTREAM_FIELDS = frozenset({"monthly_cap"})
"""What of an upstream's table a reload applies: the rest is its Shaper's, built once."""

_STATED_TO = 1.0
"""Regain times are stated to the second: the account may be back up to that much before."""

_LATER_WORD = _STATED_TO
"""Seconds by which an account's new refusal must name a later end than its hold's to
start a new one: the same second read on two clocks a little apart is the same word."""

_EARLY_PROBES_EVERY = 0.1
"""Seconds between the probes of a stated regain time's last second, while each is refused."""


@dataclass(frozen=True, slots=True)
class Routed:
    """A reply, and how the gateway got it.

    Attributes:
        response: the upstream's successful reply.
        model: the model that answered (its configured name).
        reason: why that model: the rule, a downgrade, a fallback and its cause.
        cost: dollars it cost, from the reply's ``usage`` (the estimate if it had none).
        input_tokens, output_tokens: the usage the cost was computed from.
        passed_over: the models tried or skipped first, each with why (``"gpt-4o:
            cooling down for 7.0 s"``).
    """

    response: Response
    model: str
    reason: str
    cost: float
    input_tokens: int
    output_tokens: int
    passed_over: tuple[str, ...] = ()


AvailabilityState = Literal["available", "cooling down", "exhausted", "probing"]


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether a model takes requests now, and if not, until when and why.

    Attributes:
        state: ``"available"``; ``"cooling down"`` (its upstream asked to wait: the
            gateway passes it over meanwhile); ``"exhausted"`` (its account's quota is
            gone: held back until ``until``); ``"probing"`` (the hold is over: the next
            request, one only, checks whether the quota is back).
        account: the upstream account it is served by: the upstream's name, and a short
            hash of its API key where it has one (``"anthropic#1f0c9a2e"``), never the key.
        until: Unix time at which the hold or the cooldown ends (None: not held).
        why: what the upstream said (``"Anthropic spend cap reached; regain ..."``).
    """

    state: AvailabilityState
    account: str
    until: float | None = None
    why: str | None = None

    def __str__(self) -> str:
        if self.until is None:
            return self.state
        text = f"{self.state} until {_utc(self.until)}"
        return text if self.why is None else f"{text} ({self.why})"


@dataclass(frozen=True, slots=True)
class GatewayStatistics:
    """What the gateway did so far, and which accounts it holds back now.

    Attributes:
        requests: requests that entered ``request()``.
        served: requests a model answered.
        fallbacks: times a request moved from a model to the next of its chain.
        exhaustions: holds started (an account said its quota is gone).
        probes: requests sent as the one probe of an account whose hold ended.
        recoveries: episodes ended (a probe served, or a fallen-back model served again).
        held: the accounts held back now.
        spent: dollars this gateway charged, by model (the usage of served requests at
            the model's prices; the estimate of those that ended in flight).
    """

    requests: int
    served: int
    fallbacks: int
    exhaustions: int
    probes: int
    recoveries: int
    held: tuple[str, ...]
    spent: Mapping[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Hold:
    """An account whose quota is gone: passed over until ``until``, then probed once.

    A regain time the provider stated is probed from a second before it (it is stated to
    the second), one probe at a time, ``_EARLY_PROBES_EVERY`` apart while they are refused.
    """

    until: float  # loop time
    until_wall: float  # the same instant, Unix time
    regain_at: float | None  # what the provider said, if it said
    why: str
    probe_at: float  # loop time the next probe may go (a stated time's second, early)
    models: set[str] = field(default_factory=set)  # the models reported exhausted
    probing: bool = False


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """Where a tenant stands, and what the upstreams said last.

    Attributes:
        tenant: whose limits (None: none, only budget and upstreams).
        models: model → the tenant's tier dimensions for it (used, limit, remaining,
            reset time); a model without limits maps to an empty tuple.
        budget: ``"budget"`` (global) and ``"tenant_budget"`` spend this month.
        upstreams: upstream → its last rate-limit headers (None: none yet).
        availability: model → whether it takes requests now (``str()`` of one reads
            ``"exhausted until 2027-01-16 00:00:00 UTC (Anthropic spend cap reached)"``).
        caps: upstream account → its spend this (UTC) month against its ``monthly_cap``
            (``"upstream_cap"``), for each account that has one.
    """

    tenant: str | None
    models: Mapping[str, tuple[DimensionStatus, ...]]
    budget: tuple[DimensionStatus, ...]
    upstreams: Mapping[str, QuotaSnapshot | None]
    availability: Mapping[str, Availability] = field(default_factory=dict)
    caps: Mapping[str, DimensionStatus] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Estimate:
    input_tokens: int
    output_tokens: int

    @property
    def context(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class _Plan:
    """A request, read once: what every model of its chain is tried with."""

    json: Mapping[str, Any]
    tenant: str | None  # the options' tenant, as tiers, budgets and alerts name it
    speaks: Provider
    options: RequestOptions  # checked once; its deadline covers the whole chain
    estimate: _Estimate
    route: Route
    overdraft: bool
    ends: float | None  # loop time
    headers: Mapping[str, str] | None

    @property
    def rank(self) -> int:
        return self.options.priority

    def for_model(self, left: float | None) -> RequestOptions:
        """The options one model's Shaper gets: what is left of the deadline, the tokens."""
        cost = self.options.cost_tokens
        return self.options.narrowed(left, self.estimate.context if cost is None else cost)


@dataclass(frozen=True, slots=True)
class _Admitted:
    """What one model of the chain took for a request: the tier's and the budget's share."""

    body: dict[str, Any]  # in the model's dialect
    translate: bool
    grant: TenantGrant | None
    reservation: BudgetReservation | None
    cost: float  # estimated
    left: float | None  # seconds of the deadline left


@dataclass(slots=True)
class _OpenStream:
    """A model's stream, open and read up to its first content."""

    route: Route
    passed_over: tuple[str, ...]
    shaped: ShapedStream
    translator: dialects.StreamTranslator
    admitted: _Admitted
    first: list[bytes] = field(default_factory=list)  # the caller's, held back so far
    finished: bool = False  # the upstream's stream ended while it was read


class RoutedStream:
    """A streamed reply on its way to the caller, and how the gateway got it.

    Made by :meth:`Gateway.stream`: enter it, then iterate the caller's SSE bytes. Once
    entered, :attr:`model`, :attr:`reason`, :attr:`passed_over` and :attr:`status` say
    who answers; once it ended (run to its end, left, cancelled or broken off),
    :attr:`cost` and the token counts say what was settled (None until then).
    """

    __slots__ = (
        "_ended",
        "_gateway",
        "_open",
        "_plan",
        "_planning",
        "cost",
        "input_tokens",
        "output_tokens",
    )

    def __init__(self, gateway: Gateway, planning: Callable[[], Awaitable[_Plan]]) -> None:
        self._gateway = gateway
        self._planning = planning
        self._plan: _Plan | None = None
        self._open: _OpenStream | None = None
        self._ended = False
        self.cost: float | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    async def __aenter__(self) -> Self:
        """Route the request and open its stream (falling back as ``request`` does).

        Raises:
            What :meth:`Gateway.request` raises; RuntimeError when entered twice.
        """
        if self._plan is not None:
            raise RuntimeError("A RoutedStream is entered once.")
        gateway = self._gateway
        self._plan = plan = await self._planning()
        self._open = await gateway._down_the_chain(plan, gateway._open)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """End the stream; one left before its end is settled at the estimate."""
        await self._end(served=False)

    def _opened(self) -> _OpenStream:
        if self._open is None:
            raise RuntimeError("The stream is not open: use it in an ``async with`` block.")
        return self._open

    @property
    def model(self) -> str:
        """The model that answers (its configured name)."""
        return self._opened().route.model.name

    @property
    def reason(self) -> str:
        """Why that model: the rule, a downgrade, a fallback and its cause."""
        return self._opened().route.reason

    @property
    def passed_over(self) -> tuple[str, ...]:
        """The models tried or skipped first, each with why."""
        return self._opened().passed_over

    @property
    def status(self) -> int:
        """The upstream's HTTP status (2xx: refusals raise instead)."""
        return self._opened().shaped.status

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        opened = self._opened()
        if opened.first:
            held = b"".join(opened.first)  # one write: they were all there at once
            opened.first.clear()
            return held
        if self._ended:
            raise StopAsyncIteration
        try:
            while not opened.finished:
                try:
                    event = await anext(opened.shaped)
                except StopAsyncIteration:
                    opened.finished = True
                    break
                out = opened.translator.feed_events((event,))
                if out:
                    return out
        except DialectError as exc:
            await self._end(served=False)
            raise _untranslatable(exc, opened.shaped.status) from exc
        except BaseException:  # an error event, a broken connection, a cancellation
            await self._end(served=False)
            raise
        await self._end(served=True)
        raise StopAsyncIteration

    async def _end(self, *, served: bool) -> None:
        """Settle the tier and the budget, once; close the model's stream."""
        opened, plan = self._open, self._plan
        if self._ended or opened is None or plan is None:
            return
        self._ended = True
        gateway, admitted, estimate = self._gateway, opened.admitted, plan.estimate
        model = opened.route.model
        if served:
            usage = opened.translator.usage
            self.input_tokens, self.output_tokens, self.cost = await gateway._settle_usage(
                model, plan, admitted, usage
            )
            return
        # Left, cancelled or broken off: the model may have generated it all.
        gateway._charge_estimate(model, admitted, estimate)
        self.input_tokens, self.output_tokens = estimate.input_tokens, estimate.output_tokens
        self.cost = admitted.cost
        await opened.shaped.__aexit__(None, None, None)


class Gateway:
    """Routes requests to models over several upstreams under tenant tiers and a budget.

    Args:
        upstreams: upstream name → its Shaper (the gateway starts and closes them).
        router: the models, routing rules and fallback chains.
        tenants: the tenants' tiers (None: no tenant limits).
        budget: the budgets, and the accounts' monthly caps (None: neither).
        monitor: usage alerts (None: none). It watches the upstreams' remaining requests
            and tokens, each tenant's requests today, and the budgets.
        downgrade_share: a request whose estimated cost is above this share of the budget
            left is downgraded to a cheaper model of its chain that fits.
        when_spent: once a budget cannot pay for a request: ``"downgrade"`` serves it on
            the cheapest model of its chain anyway (past the budget), ``"reject"``
            refuses it with BudgetExceededError.
        downgrade_at: the share of a budget spent (the global one, the tenant's, or the
            cap of the account serving the routed model: the fullest) from which every
            request goes to the cheapest model of its chain that fits it (None: only
            ``downgrade_share`` and ``when_spent`` act, and a cap only when it cannot pay).
        default_output_tokens: the output allowance of a request naming no ``max_tokens``.
        store: a store the gateway owns and closes (the one ``from_config`` made).
        wall_clock: Unix time (for the ``retry_after`` of a spent budget, and to turn a
            provider's regain time into a hold).
        accounts: upstream → the account it bills (default: its name). Upstreams of one
            account are held back together. ``from_config`` names each by its upstream and
            a short hash of its API key, so two upstreams sharing a key share the hold.
        exhausted_hold: seconds an account that said its quota is gone is held back when
            it did not say until when; one that did is held until then (Anthropic's spend
            cap names the day, Gemini's per-day quota midnight Pacific).
        dialect: the shape of the callers' bodies, ``"openai"`` (chat completions) or
            ``"anthropic"`` (messages), unless a request names its own. A model whose path
            speaks the other dialect gets the body translated (``asyncquota.dialects``) and
            its reply, streamed reply and error body translated back, so the caller reads
            the shape it sent whichever model answered. A body one dialect cannot say
            faithfully passes that model over (nothing is sent to it); when no model of
            the chain can take it, NoRouteError names the field.
        fallback_on: which failures move a request to the next model of its chain, of
            ``config.FALLBACK_CAUSES`` (rate limiting, shedding and busy always do). Without
            ``"exhausted"`` an account out of quota is still held back (nothing is sent
            to it), but its requests get QuotaExhaustedError instead of a fallback, and
            a request its account's cap cannot pay gets UpstreamCapError.

    Exhaustion is held per account: when a model's account says its quota is gone, every
    model of that account is passed over until the hold ends, requests already queued on
    its Shapers are refused at once (and move to their fallbacks), and when the hold ends
    one request probes the account while the others keep to the fallbacks; the probe
    served ends the hold, refused starts a new one. Each hold, fallback episode and
    recovery is an alert (``monitor.event``), a WARNING on the ``asyncquota.gateway``
    logger, a count in :meth:`statistics` and a state in :meth:`quota_status`.

    An account's monthly cap (``BudgetGuard(caps=...)``, keyed by the names of
    ``accounts``) is reserved with the budgets. A request it cannot pay moves down its
    chain; the first such refusal of a model is a ``fallback`` alert, and the episode lasts
    until the cap's month renews or a reload changes the cap (a smaller request it still
    pays meanwhile is served without ending it: no alert for each turn near the edge).

    A running gateway takes a changed configuration with :meth:`reload` (tiers, budgets,
    caps, routes, alert thresholds, these settings), without dropping a request.

    Raises:
        ValueError: a model's upstream is not among ``upstreams``, or a setting out of range.
    """

    def __init__(
        self,
        *,
        upstreams: Mapping[str, Shaper],
        router: Router,
        tenants: TenantQuotas | None = None,
        budget: BudgetGuard | None = None,
        monitor: UsageMonitor | None = None,
        downgrade_share: float = 0.1,
        when_spent: Literal["downgrade", "reject"] = "downgrade",
        default_output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        store: Store | None = None,
        wall_clock: Callable[[], float] = time.time,
        accounts: Mapping[str, str] | None = None,
        exhausted_hold: float = EXHAUSTED_HOLD,
        fallback_on: Collection[str] = FALLBACK_CAUSES,
        dialect: Provider = dialects.OPENAI,
        downgrade_at: float | None = None,
    ) -> None:
        _check_upstreams(router, upstreams)
        policy = _policy(
            downgrade_share=downgrade_share,
            when_spent=when_spent,
            downgrade_at=downgrade_at,
            exhausted_hold=exhausted_hold,
            fallback_on=fallback_on,
        )
        if isinstance(default_output_tokens, bool) or not (
            isinstance(default_output_tokens, int) and default_output_tokens >= 0
        ):
            raise ValueError(
                f"default_output_tokens must be an integer >= 0, not {default_output_tokens!r}."
            )
        _check_dialect(dialect)
        self._dialect = dialect
        self._upstreams = dict(upstreams)
        self._accounts = {name: (accounts or {}).get(name, name) for name in self._upstreams}
        self._policy = policy
        self._holds: dict[str, _Hold] = {}  # account → its hold
        self._fallen: dict[str, str] = {}  # model → why its traffic moved (not exhaustion)
        # model → the account whose cap it fell back for, and when that cap renews (Unix)
        self._capped: dict[str, tuple[str, float]] = {}
        self._counts = dict.fromkeys(
            ("requests", "served", "fallbacks", "exhaustions", "probes", "recoveries"), 0
        )
        self._spent: dict[str, float] = {}  # model → dollars charged by this gateway
        self._router = router
        self._tenants = tenants
        self._budget = budget
        self._monitor = monitor
        self._config: GovernanceConfig | None = None  # what from_config and reload applied
        self._default_output = default_output_tokens
        self._store = store
        self._fleets: list[Any] = []  # RedisFleets from_config made (closed after the Shapers)
        self._wall_clock = wall_clock
        self._watched: dict[str | None, float] = {}  # tenant → last reading (loop time)
        self._watch_sweep_at = _WATCH_SWEEP_MIN  # sweep stale entries past this size
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ building one

    @classmethod
    def from_config(
        cls,
        config: GovernanceConfig | str | os.PathLike[str],
        *,
        transports: Mapping[str, Transport] | None = None,
        wall_clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        sinks: Sequence[Sink] = (),
        dialect: Provider = dialects.OPENAI,
        hooks: Mapping[str, Sequence[Hook]] | None = None,
    ) -> Gateway:
        """Build a gateway, its Shapers, store, tiers, budget and alerts from configuration.

        Args:
            config: a ``GovernanceConfig`` or the path of a TOML file (see
                :mod:`asyncquota.governance.config`).
            transports: upstream name → a transport to use instead of the aiohttp pool
                (tests, the simulator).
            wall_clock: Unix time, for day and month windows and reply dates.
            environ: where API keys, webhook URLs and signing secrets named by ``*_env``
                are read (default: the process environment).
            sinks: sinks of the application's own (a ``CallbackSink``), beside the
                configured ones; used only when the file has an ``[alerts]`` section.
            dialect: the shape of the callers' bodies (see :class:`Gateway`).
            hooks: upstream name → the hooks of its Shaper (the proxy's Prometheus
                hooks); an upstream not named keeps the Shaper's default.

        Raises:
            ConfigError: the file is invalid (the message names the field).
            ValueError: an environment variable the configuration names is not set.
        """
        if not isinstance(config, GovernanceConfig):
            config = load_config(Path(config))
        env = os.environ if environ is None else environ
        transports = transports or {}
        store: Store
        fleets: dict[str, Any] = {}  # upstream name → its RedisFleet (a Redis store only)
        if isinstance(config.store, Path):
            store = SQLiteStore(config.store, wall_clock=wall_clock)
        elif config.store is not None:  # a Redis URL: counters shared by a fleet
            store = RedisStore(config.store)
        else:
            store = MemoryStore(wall_clock=wall_clock)
        shapers: dict[str, Shaper] = {}
        accounts: dict[str, str] = {}
        by_key: dict[str, str] = {}  # a key's digest → the account named after its first upstream
        for spec in config.upstreams:
            headers = dict(spec.headers)
            if spec.api_key_env is not None:
                key = _env(env, spec.api_key_env, f"upstreams.{spec.name}.api_key_env")
                digest = hashlib.sha256(key.encode()).hexdigest()[:8]
                accounts[spec.name] = by_key.setdefault(digest, f"{spec.name}#{digest}")
                if spec.auth == "x-api-key":
                    headers["x-api-key"] = key
                else:
                    headers["Authorization"] = f"Bearer {key}"
            # What the file left out keeps the Shaper's own default.
            options: dict[str, Any] = {
                name: value
                for name in ("max_connections", "default_deadline", "timeout")
                if (value := getattr(spec, name)) is not None
            }
            if isinstance(config.store, RedisURL):
                # A fleet of gateways (the proxy's processes) on one Redis shares the
                # upstreams' quotas too, not only the tiers and budgets: one RedisFleet a
                # upstream, named after it (its rpm/tpm is the quota every process shapes).
                from ..fleet import RedisFleet

                fleets[spec.name] = options["fleet"] = RedisFleet(
                    str(config.store), name=f"upstream:{spec.name}"
                )
            shapers[spec.name] = Shaper(
                spec.base_url,
                rpm=spec.rpm,
                tpm=spec.tpm,
                headers=headers,
                transport=transports.get(spec.name),
                wall_clock=wall_clock,
                hooks=(hooks or {}).get(spec.name),
                **options,
            )
        parts = _parts(config, store, wall_clock, accounts)
        monitor = None
        if config.alerts is not None:
            alerts = config.alerts
            every: list[Sink] = [LoggingSink()] if alerts.log else []
            for index, hook in enumerate(alerts.webhooks):
                where = f"alerts.webhooks[{index}]"
                url = hook.url or _env(env, hook.url_env or "", f"{where}.url_env")
                secret = hook.secret
                if hook.secret_env is not None:
                    secret = _env(env, hook.secret_env, f"{where}.secret_env")
                every.append(
                    WebhookSink(
                        url,
                        format=hook.format,
                        secret=secret,
                        markdown=hook.markdown,
                        route=hook.route,
                        pace=hook.pace,
                        timeout=hook.timeout,
                    )
                )
            actions = (
                [ShedBatchAction(list(shapers.values()), for_seconds=alerts.shed_seconds)]
                if alerts.shed_batch_on_critical
                else []
            )
            monitor = UsageMonitor(
                warning=alerts.warning,
                critical=alerts.critical,
                hysteresis=alerts.hysteresis,
                rearm_after=alerts.rearm_after,
                thresholds=alerts.thresholds,
                sinks=[*every, *sinks],
                on_critical=actions,
                wall_clock=wall_clock,
            )
        policy = parts.policy
        gateway = cls(
            upstreams=shapers,
            router=parts.router,
            tenants=parts.tenants,
            budget=parts.budget,
            monitor=monitor,
            downgrade_share=policy.share,
            when_spent=policy.when_spent,
            store=store,
            wall_clock=wall_clock,
            accounts=accounts,
            exhausted_hold=policy.hold,
            fallback_on=policy.fallback_on,
            dialect=dialect,
            downgrade_at=policy.downgrade_at,
        )
        gateway._config = config
        gateway._fleets = list(fleets.values())
        return gateway

    def reload(self, config: GovernanceConfig | str | os.PathLike[str]) -> None:
        """Apply a changed configuration while serving, all of it or nothing.

        What a reload changes: the routing table and the models (prices, context windows,
        API names, paths, fallbacks) on the upstreams there are; the tiers, their
        membership and the default tier (``TenantQuotas.reload``: what a tenant used today
        still counts); the budgets (a new ``BudgetGuard`` on the same store: spend so far
        counts against the new limits), the upstreams' ``monthly_cap`` (spend so far on the
        account counts against the new cap); the alerts' levels, hysteresis and thresholds
        (``UsageMonitor.reload``: a dimension alerting keeps its episode); the time zones;
        and ``[gateway]`` and the ``[budget]`` policy (``downgrade_share``, ``when_spent``,
        ``downgrade_at``). An account held keeps its hold; ``exhausted_hold`` applies to the
        holds that start after.

        Everything is checked first; on any error nothing changes. Then it all changes in
        one step (no ``await`` in between): a request reads one configuration or the
        other at each of its steps. Requests in flight are not dropped: each settles its
        tier grant and budget reservation on the counters it took them from, and a request
        already routed keeps its route.

        What the gateway builds once, at its start, needs a restart: the upstreams (each
        is a Shaper with its connections, key and quota; all but ``monthly_cap``), the
        store, and the sinks of ``[alerts]`` (``log``, the webhooks,
        ``shed_batch_on_critical``, ``shed_seconds``), and ``[alerts]`` itself appearing
        or going. A gateway built from Python objects
        rather than ``from_config`` knows its upstreams by name only: it refuses a set of
        upstream names that differs, and a ``store``.

        Args:
            config: a ``GovernanceConfig`` or the path of a TOML file.

        Raises:
            ConfigError: the file is invalid, or the configuration changes what needs a
                restart (the message names each field); nothing changed.
            ValueError, TypeError: a class refused its part (a tier named by no one, a
                setting out of range); nothing changed.
        """
        if not isinstance(config, GovernanceConfig):
            config = load_config(Path(config))
        restart = self._needs_restart(config)
        if restart:
            raise ConfigError(
                "The configuration changes what the gateway builds once, at its start: "
                f"{', '.join(restart)}; restart to apply it. Nothing was changed."
            )
        store = self._counters_store()
        owned = store is None
        capped = any(spec.monthly_cap is not None for spec in config.upstreams)
        if store is None and (config.tiers or config.budget is not None or capped):
            store = MemoryStore(wall_clock=self._wall_clock)
        # each class checks its part
        parts = _parts(config, store, self._wall_clock, self._accounts)
        _check_upstreams(parts.router, self._upstreams)
        alerts = config.alerts
        if alerts is not None:
            UsageMonitor(  # checked as the monitor's reload will, on one that sends nothing
                warning=alerts.warning,
                critical=alerts.critical,
                hysteresis=alerts.hysteresis,
                rearm_after=alerts.rearm_after,
                thresholds=alerts.thresholds,
                sinks=(),
            )
        # Nothing below raises: what it applies was checked above.
        if self._tenants is not None and parts.tenants is not None:
            members: dict[Hashable, str] = {tenant: tier for tenant, tier in config.tenants.items()}
            self._tenants.reload(
                tiers=config.tiers,
                tenants=members,
                default_tier=config.default_tier,
                timezone=parts.tenants.timezone,
            )
        else:
            self._tenants = parts.tenants
        if self._monitor is not None and alerts is not None:
            self._monitor.reload(
                warning=alerts.warning,
                critical=alerts.critical,
                hysteresis=alerts.hysteresis,
                rearm_after=alerts.rearm_after,
                thresholds=alerts.thresholds,
            )
        # A cap episode ends with a changed cap: the next request served says so.
        caps_before = {} if self._budget is None else self._budget.caps
        caps_now = {} if parts.budget is None else parts.budget.caps
        self._capped = {
            name: (account, renews)
            for name, (account, renews) in self._capped.items()
            if caps_before.get(account) == caps_now.get(account)
        }
        self._budget = parts.budget
        self._router = parts.router
        self._policy = parts.policy
        if owned and store is not None:
            self._store = store
        names = {model.name for model in parts.router.models}
        self._fallen = {name: why for name, why in self._fallen.items() if name in names}
        self._config = config
        logger.info(
            "The configuration was reloaded: %d models, %d tiers, budget %s, alerts %s.",
            len(names),
            len(config.tiers),
            "on" if parts.budget is not None else "off",
            "on" if alerts is not None else "off",
        )

    def _needs_restart(self, config: GovernanceConfig) -> list[str]:
        """The fields of ``config`` a reload cannot apply, by their path in the file."""
        changed: list[str] = []
        names = {spec.name for spec in config.upstreams}
        changed += [f"upstreams.{name} (added)" for name in sorted(names - set(self._upstreams))]
        changed += [f"upstreams.{name} (removed)" for name in sorted(set(self._upstreams) - names)]
        old = self._config
        if old is not None:
            before = {spec.name: spec for spec in old.upstreams}
            for spec in config.upstreams:
                was = before.get(spec.name)
                if was is not None:
                    changed += [
                        f"upstreams.{spec.name}.{each.name}"
                        for each in fields(spec)
                        if each.name not in _RELOADABLE_UPSTREAM_FIELDS
                        and getattr(spec, each.name) != getattr(was, each.name)
                    ]
        if (old.store if old is not None else None) != config.store:
            changed.append("store")
        if (config.alerts is None) != (self._monitor is None):
            changed.append("alerts (added)" if config.alerts is not None else "alerts (removed)")
        elif old is not None and old.alerts is not None and config.alerts is not None:
            changed += [
                f"alerts.{name}"
                for name in ("log", "shed_batch_on_critical", "shed_seconds", "webhooks")
                if getattr(config.alerts, name) != getattr(old.alerts, name)
            ]
        return changed

    def _counters_store(self) -> Store | None:
        """The store of the tiers' and budgets' counters (None: there is none yet)."""
        if self._store is not None:
            return self._store
        if self._tenants is not None:
            return self._tenants.store
        return None if self._budget is None else self._budget.store

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start the Shapers and the monitor (``async with`` does this)."""
        for shaper in self._upstreams.values():
            shaper.start()
        if self._monitor is not None:
            self._monitor.start()

    async def aclose(self) -> None:
        """Close the Shapers (see ``Shaper.aclose``), let settlements finish, close the rest."""
        await asyncio.gather(*(shaper.aclose() for shaper in self._upstreams.values()))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._monitor is not None:
            await self._monitor.aclose()
        if self._store is not None:
            await self._store.aclose()
        for fleet in self._fleets:
            await fleet.aclose()

    @property
    def upstreams(self) -> Mapping[str, Shaper]:
        """The Shapers, by upstream name."""
        return dict(self._upstreams)

    @property
    def monitor(self) -> UsageMonitor | None:
        """The usage monitor (None: no alerts)."""
        return self._monitor

    @property
    def router(self) -> Router:
        """The routing table."""
        return self._router

    # ------------------------------------------------------------------ the call

    async def request(
        self,
        json: Mapping[str, Any],
        *,
        model: str | None = None,
        task: str | None = None,
        complexity: str | None = None,
        tenant: Hashable | None = None,
        priority: PriorityLike = Priority.INTERACTIVE,
        deadline: float | None = None,
        cost_tokens: int | None = None,
        headers: Mapping[str, str] | None = None,
        dialect: Provider | None = None,
        options: RequestOptions | None = None,
    ) -> Routed:
        """Route one JSON request to a model and send it through that model's Shaper.

        The body is sent with its ``model`` field set to the chosen model's API name, in
        that model's dialect; the reply comes back in the body's (see ``dialect`` of
        :class:`Gateway`). A body with ``"stream": true`` gets the whole stream's bytes,
        translated event by event.

        Args:
            json: the request body (chat completion or messages).
            model: the model asked for (wins over the routing rules; fallbacks still apply).
            task, complexity: matched against the routing rules.
            tenant: whose tier and budget apply.
            priority, deadline, cost_tokens, headers: as for ``Shaper.request`` (the
                deadline covers every model tried; ``cost_tokens`` is what each model's
                Shaper reserves, by default the gateway's estimate).
            dialect: the body's shape, ``"openai"`` or ``"anthropic"`` (None: the
                gateway's).
            options: priority, tenant, deadline and cost_tokens made once (see
                :class:`~asyncquota.options.RequestOptions`), instead of the keywords.

        Raises:
            TenantLimitError: the tenant is over its tier's limit for the model.
            BudgetExceededError: the budget cannot pay and the policy is to reject.
            StoreUnavailableError: tiers or budgets could not be checked (the store is
                locked, corrupt or failing): refused, nothing sent, no fallback tried.
            NoRouteError: no model fits the request, or none can take it in its dialect
                (the message names the field that cannot be translated); nothing was sent.
            QuotaError: what the last model's Shaper raised (see ``Shaper.request``).
            ValueError: a malformed argument.
        """
        given = given_options(options, priority, tenant, deadline, cost_tokens)
        plan = await self._plan(json, model, task, complexity, given, headers, dialect)
        return await self._down_the_chain(plan, self._send)

    def stream(
        self,
        json: Mapping[str, Any],
        *,
        model: str | None = None,
        task: str | None = None,
        complexity: str | None = None,
        tenant: Hashable | None = None,
        priority: PriorityLike = Priority.INTERACTIVE,
        deadline: float | None = None,
        cost_tokens: int | None = None,
        headers: Mapping[str, str] | None = None,
        dialect: Provider | None = None,
        options: RequestOptions | None = None,
    ) -> RoutedStream:
        """Route one streamed request; its events reach the caller as the model sends them.

        Use it with ``async with`` and iterate it: each item is the bytes of the caller's
        dialect's Server-Sent Events for one upstream event (translated event by event
        when the model speaks the other dialect), ready to be written to a client::

            async with gateway.stream(body, tenant="acme") as stream:
                start_response(stream.model)
                async for chunk in stream:
                    await client.write(chunk)

        Takes the arguments of :meth:`request` (the body is sent with ``"stream": true``).
        Entering the block routes and opens the stream, and reads it up to its first event
        with content (a text or tool call delta, a finish, or the end): what the model says
        before that (Anthropic's ``message_start``, a ping, OpenAI's role-only chunk) is
        held back, so a model that breaks off there (Anthropic's ``overloaded_error``
        inside a 200) or refuses the stream (exhausted, overloaded, busy, unreachable)
        passes it to the next model of its chain as :meth:`request` would; the caller has
        seen nothing yet. From the first item on, the stream stays on its model: an error
        event after it raises the matching ``UpstreamError`` from the iteration.

        The stream holds its Shaper permit until it ends (see ``Shaper.stream``). The
        tenant's tier and the budget are settled once, when it ends: with the usage the
        stream reported if it ran to its end, else (left early, cancelled, broken off) at
        the estimate, since the model may have generated it all.

        Raises:
            What :meth:`request` raises, from entering the block; ``UpstreamError`` (an
            error event, or an event the caller's dialect cannot say) and ``QuotaError``
            (the connection broke, the Shaper closed) from the iteration.
        """
        given = given_options(options, priority, tenant, deadline, cost_tokens)
        return RoutedStream(
            self,
            lambda: self._plan(
                {**json, "stream": True}, model, task, complexity, given, headers, dialect
            ),
        )

    async def _plan(
        self,
        json: Mapping[str, Any],
        model: str | None,
        task: str | None,
        complexity: str | None,
        options: RequestOptions,
        headers: Mapping[str, str] | None,
        dialect: Provider | None,
    ) -> _Plan:
        """What every model of the request's chain is tried with (see :meth:`request`)."""
        if not isinstance(json, Mapping):
            raise TypeError(
                f"json must be a mapping (the request body), not {type(json).__name__}."
            )
        who = tenant_id(options.tenant)  # once, so tiers, budget and alerts see one identity
        options = replace(options, tenant=who)
        speaks = self._dialect if dialect is None else _check_dialect(dialect)
        estimate = _Estimate(
            input_tokens=prompt_tokens(len(orjson.dumps(json))),
            output_tokens=output_allowance(json, default_output_tokens=self._default_output),
        )
        route: Route | None = self._router.route(
            context_tokens=estimate.context, model=model, task=task, complexity=complexity
        )
        assert route is not None
        route, overdraft = await self._budget_policy(route, who, estimate)
        loop = asyncio.get_running_loop()
        ends = None if options.deadline is None else loop.time() + options.deadline
        return _Plan(json, who, speaks, options, estimate, route, overdraft, ends, headers)

    async def _down_the_chain(
        self,
        plan: _Plan,
        attempt: Callable[[Route, _Plan, tuple[str, ...]], Coroutine[Any, Any, _T]],
    ) -> _T:
        """Try the plan's model, then each fallback, as the upstreams' answers say."""
        loop = asyncio.get_running_loop()
        route: Route | None = plan.route
        rank, tenant = plan.rank, plan.tenant
        passed_over: list[str] = []
        last: QuotaError | None = None
        self._counts["requests"] += 1
        try:
            while route is not None:
                current = route.model
                hold = self._holds.get(self._accounts[current.upstream])
                why, probe = self._availability(current, hold, loop.time())
                if hold is not None and why is not None:
                    follow = route.chain[0].name if route.chain else None
                    self._report_exhausted(current, hold, follow)
                    if follow is None or "exhausted" not in self._policy.fallback_on:
                        raise self._held_error(current, hold, rank, tenant, loop.time())
                if why is None or not route.chain:  # the last one is tried whatever its state
                    follow = route.chain[0].name if route.chain else None
                    try:
                        served = await attempt(route, plan, tuple(passed_over))
                    except DialectError as exc:
                        why = f"cannot take it in its dialect ({exc})"
                        last = NoRouteError(
                            f"No model could take the request: {current.name} cannot say it in "
                            f"its dialect ({exc}); it was not sent.",
                            priority=rank,
                            tenant=tenant,
                        )
                    except QuotaExhaustedError as exc:
                        why, last = self._exhaust(current, exc, follow, probe), exc
                        if "exhausted" not in self._policy.fallback_on:
                            raise
                    except UpstreamCapError as exc:
                        # Our mirror of the provider's cap: its exhaustion, seen before sending.
                        if "exhausted" not in self._policy.fallback_on:
                            raise
                        why, last = self._cap_reached(current, exc, follow), exc
                    except OverloadedError as exc:
                        if "overloaded" not in self._policy.fallback_on:
                            raise
                        status = "an error event" if exc.status == 200 else f"HTTP {exc.status}"
                        why, last = f"overloaded ({status})", exc
                        self._fall_back(current, why, follow)
                    except TransportError as exc:
                        if "transport" not in self._policy.fallback_on:
                            raise
                        why, last = "unreachable (no usable reply)", exc
                        self._fall_back(current, why, follow)
                    except (QueueFullError, DeadlineUnreachableError) as exc:
                        why, last = "shedding", exc
                    except BusyError as exc:
                        # More waits on it than it serves within the class's max_wait: the
                        # capacity of the next model is as good as its own.
                        why, last = "busy (more waits than it serves in time)", exc
                    except RejectedError as exc:
                        # Queued when its account's quota went: refused at once to move on.
                        hold = self._holds.get(self._accounts[current.upstream])
                        if exc.reason != "shedding" or hold is None:
                            raise
                        why, last = _held_for(hold), exc
                    except ThrottledError as exc:
                        if exc.retry_after is None:
                            raise
                        why, last = f"rate limited for {exc.retry_after:.1f} s", exc
                    else:
                        self._served(current, probe)
                        return served
                    finally:
                        if probe:
                            self._probe_over(current)
                passed_over.append(f"{current.name}: {why}")
                route = route.fallback(why)
                if route is not None:
                    self._counts["fallbacks"] += 1
            assert last is not None
            raise last
        finally:
            last = None  # its traceback holds this frame: no reference cycle through it

    async def quota_status(
        self, tenant: Hashable | None = None, model: str | None = None
    ) -> QuotaStatus:
        """The tenant's tier usage per model, the budgets and caps, and the upstreams' last headers.

        Args:
            tenant: whose tier (None: the requests naming no tenant, under the default
                tier if there is one); ``42`` and ``"42"`` are one tenant.
            model: one model (None: every configured model).

        Raises:
            ValueError: ``model`` is not configured, or the empty tenant.
            TypeError: ``tenant`` is neither a str, an int nor None.
        """
        tenant = tenant_id(tenant)
        names = (
            [self._router.model(model).name]
            if model is not None
            else [m.name for m in self._router.models]
        )
        models: dict[str, tuple[DimensionStatus, ...]] = {}
        for name in names:
            dims: list[DimensionStatus] = []
            if self._tenants is not None:
                dims = await self._tenants.status(tenant, name)
            models[name] = tuple(dims)
        budget: tuple[DimensionStatus, ...] = ()
        caps: dict[str, DimensionStatus] = {}
        if self._budget is not None:
            budget = tuple(await self._budget.status(tenant))
            caps = await self._budget.cap_status()
        now, wall = asyncio.get_running_loop().time(), self._wall_clock()
        return QuotaStatus(
            tenant=tenant,
            models=models,
            budget=budget,
            upstreams={name: shaper.quota for name, shaper in self._upstreams.items()},
            availability={
                name: self._state_of(self._router.model(name), now, wall) for name in names
            },
            caps=caps,
        )

    def statistics(self) -> GatewayStatistics:
        """What the gateway did so far, and the accounts it holds back now."""
        return GatewayStatistics(
            **self._counts,
            held=tuple(sorted(self._holds)),
            spent=MappingProxyType(dict(self._spent)),
        )

    def __repr__(self) -> str:
        counts = self._counts
        return (
            f"<Gateway upstreams={len(self._upstreams)} requests={counts['requests']} "
            f"served={counts['served']} fallbacks={counts['fallbacks']} "
            f"held={sorted(self._holds)}>"
        )

    def _state_of(self, model: Model, now: float, wall: float) -> Availability:
        account = self._accounts[model.upstream]
        hold = self._holds.get(account)
        if hold is not None:
            state: AvailabilityState = "exhausted" if now < hold.probe_at else "probing"
            return Availability(state, account, hold.until_wall, hold.why)
        cooling = self._upstreams[model.upstream].confirmed_cooldown()
        if cooling > 0:
            return Availability(
                "cooling down", account, wall + cooling, "the upstream asked to wait"
            )
        return Availability("available", account)

    # ------------------------------------------------------------------ inside

    async def _budget_policy(
        self, route: Route, tenant: str | None, estimate: _Estimate
    ) -> tuple[Route, bool]:
        """The route after the budget's say, and whether it may overdraw."""
        if self._budget is None:
            return route, False
        account = self._accounts[route.model.upstream]
        limited = [s for s in await self._budget.status(tenant, account=account) if s.limit]
        if not limited:
            return route, False
        # The cap of the routed model's account joins downgrade_at only: the budgets pay
        # for the request wherever it goes, a cap only on its account (see _down_the_chain).
        statuses = [s for s in limited if s.dimension != "upstream_cap"]
        cost = route.model.price.cost(estimate.input_tokens, estimate.output_tokens)
        cheaper, policy = self._router.cheaper, self._policy
        left = min((s.remaining or 0.0 for s in statuses), default=math.inf)
        if cost > left:
            if policy.when_spent == "reject":
                renews = min((s.resets_at for s in statuses if s.resets_at), default=None)
                raise BudgetExceededError(
                    f"The budget has {money(left)} left this month, less than this "
                    f"request's estimated {money(cost)}; it was not sent.",
                    tenant=tenant,
                    retry_after=None if renews is None else max(0.0, renews - self._wall_clock()),
                )
            cheapest = cheaper(
                route, input_tokens=estimate.input_tokens, output_tokens=estimate.output_tokens
            )
            chosen = cheapest or route
            return (
                Route(
                    model=chosen.model,
                    reason=f"{chosen.reason}; the budget is spent ({money(left)} left): "
                    "served on the cheapest model of its chain",
                    chain=chosen.chain,
                ),
                True,
            )
        fullest = max(limited, key=lambda s: s.used / (s.limit or 1.0))
        spent = fullest.used / (fullest.limit or 1.0)
        if policy.downgrade_at is not None and spent >= policy.downgrade_at:
            down = cheaper(
                route, input_tokens=estimate.input_tokens, output_tokens=estimate.output_tokens
            )
            if down is not None:
                what = (
                    f"the monthly cap of {account}"
                    if fullest.dimension == "upstream_cap"
                    else "the budget"
                )
                return (
                    Route(
                        model=down.model,
                        reason=f"{down.reason}; {spent:.0%} of {what} is spent",
                        chain=down.chain,
                    ),
                    False,
                )
            return route, False
        if cost > policy.share * left:
            down = cheaper(
                route,
                input_tokens=estimate.input_tokens,
                output_tokens=estimate.output_tokens,
                max_cost=policy.share * left,
            ) or cheaper(
                route, input_tokens=estimate.input_tokens, output_tokens=estimate.output_tokens
            )
            if down is not None:
                return down, False
        return route, False

    def _availability(
        self, model: Model, hold: _Hold | None, now: float
    ) -> tuple[str | None, bool]:
        """Why ``model`` should be passed over right now (None: it may be sent to), and
        whether this request is the one probe of its account's ended hold."""
        if hold is not None:
            if now < hold.probe_at or hold.probing:
                return _held_for(hold), False
            hold.probing = True  # this request, and only it, goes to see
            self._counts["probes"] += 1
            self._shed_account(self._accounts[model.upstream], 0.0)
            return None, True
        # A confirmed cooldown only: a Retry-After's hold may end at its probe in a few ms
        # (passing the model over for the whole stated window drained its line onto the
        # fallback, and left it under-used in the real-time night); the model's Shaper
        # still refuses at once what a hold would keep past its deadline (``_ask_first``).
        cooling = self._upstreams[model.upstream].confirmed_cooldown()
        if cooling > 0:
            return f"cooling down for {cooling:.1f} s", False
        return None, False

    def _shed_account(self, account: str, seconds: float) -> None:
        """Every class on ``account``'s Shapers refused for ``seconds`` (0: no longer)."""
        for name, of in self._accounts.items():
            if of == account:
                self._upstreams[name].shed_below(_EVERY_RANK, for_seconds=seconds)

    def _exhaust(
        self, model: Model, exc: QuotaExhaustedError, follow: str | None, probe: bool
    ) -> str:
        """Hold the model's account back: until the provider's regain time, else the default."""
        account = self._accounts[model.upstream]
        now, wall = asyncio.get_running_loop().time(), self._wall_clock()
        regain = exc.regain_at if exc.regain_at is not None and exc.regain_at > wall else None
        seconds = self._policy.hold if regain is None else regain - wall
        why = exc.why or "out of quota"
        hold = self._holds.get(account)
        later = hold is None or now + seconds > hold.until + _LATER_WORD
        if hold is not None and probe and not later and hold.regain_at is not None:
            # A probe of the stated time's last second, refused: the same word, said
            # again. Nothing to restate; the next probe goes a moment later.
            hold.probe_at = min(hold.until, now + _EARLY_PROBES_EVERY)
            self._shed_account(account, max(0.0, hold.until - now))
            return _held_for(hold)
        renewed = later or probe
        if renewed:
            # A new hold, a failed probe's, or a later word; a refusal of a request sent
            # before the hold began never shortens it, nor restates it: the same regain
            # time read on two clocks a little apart (wall and loop) is the same word.
            if hold is None:
                self._counts["exhaustions"] += 1
            hold = _Hold(
                until=now + seconds,
                until_wall=wall + seconds,
                regain_at=regain,
                why=why,
                probe_at=now + seconds - (0.0 if regain is None else _STATED_TO),
                models=set() if hold is None else hold.models,
            )
            self._holds[account] = hold
            events_logger.warning(
                "Model %s on %s is out of quota until %s (%s): %s; when the hold ends, one "
                "request will probe it.",
                model.name,
                account,
                _utc(hold.until_wall),
                why,
                f"its traffic moves to {follow}" if follow else "it has no fallback",
            )
        assert hold is not None
        # The alarm first: the requests shed below wake thousands of tasks at once, and an
        # alert queued after them waits its turn behind all of them (seconds).
        self._report_exhausted(model, hold, follow, force=True)
        if renewed:
            # Queued requests of the account leave now, for their fallbacks; new ones are
            # kept away by the gateway, and by the Shapers should anyone call them directly.
            self._shed_account(account, seconds)
        return _held_for(hold)

    def _report_exhausted(
        self, model: Model, hold: _Hold, follow: str | None, *, force: bool = False
    ) -> None:
        if model.name in hold.models and not force:
            return
        hold.models.add(model.name)
        if self._monitor is not None:
            self._monitor.event(
                "exhausted",
                model.name,
                upstream=self._accounts[model.upstream],
                until=hold.until_wall,
                fallback=follow,
                reason=hold.why,
            )

    def _probe_over(self, model: Model) -> None:
        """A probe ended without an answer on the quota: the next request probes again."""
        hold = self._holds.get(self._accounts[model.upstream])
        if hold is not None:
            hold.probing = False

    def _cap_reached(self, model: Model, exc: UpstreamCapError, follow: str | None) -> str:
        """Its account's cap cannot pay: a fallback episode until the cap renews."""
        renews = self._wall_clock() + (exc.retry_after or 0.0)
        self._capped[model.name] = (exc.account, renews)
        why = f"at its account's monthly cap of {money(exc.cap)}"
        self._fall_back(
            model,
            why,
            follow,
            until=renews,
            action=f"raise the spend cap of {exc.account} at its provider, then its "
            f"monthly_cap, or wait for the cap to renew; make sure {follow} can carry the "
            "traffic meanwhile",
        )
        return why

    def _fall_back(
        self,
        model: Model,
        why: str,
        follow: str | None,
        *,
        until: float | None = None,
        action: str | None = None,
    ) -> None:
        """Traffic moves off ``model`` for a failure other than exhaustion."""
        if follow is None or model.name in self._fallen:
            return
        self._fallen[model.name] = why
        events_logger.warning(
            "Model %s on %s is %s: its traffic moves to %s.",
            model.name,
            self._accounts[model.upstream],
            why,
            follow,
        )
        if self._monitor is not None:
            self._monitor.event(
                "fallback",
                model.name,
                upstream=self._accounts[model.upstream],
                until=until,
                fallback=follow,
                reason=why,
                action=action,
            )

    def _served(self, model: Model, probe: bool) -> None:
        """A reply from ``model``: a probe ends its account's hold, any ends a fallback."""
        self._counts["served"] += 1
        account = self._accounts[model.upstream]
        recovered: set[str] = set()
        if probe and (hold := self._holds.pop(account, None)) is not None:
            recovered |= hold.models
            events_logger.warning(
                "The quota of %s is back: a probe on %s was served; its traffic returns.",
                account,
                model.name,
            )
        capped = self._capped.get(model.name)
        # A request its cap still pays does not end a cap's episode: the cap's renewal does.
        if capped is None or capped[1] <= self._wall_clock():
            self._capped.pop(model.name, None)
            if self._fallen.pop(model.name, None) is not None:
                recovered.add(model.name)
                events_logger.warning("Model %s serves again; its traffic returns.", model.name)
        if recovered:
            self._counts["recoveries"] += 1
        if self._monitor is not None:
            for name in sorted(recovered):
                self._monitor.event("recovered", name, upstream=account)

    def _held_error(
        self, model: Model, hold: _Hold, rank: int, tenant: str | None, now: float
    ) -> QuotaExhaustedError:
        return QuotaExhaustedError(
            f"Model {model.name} is held back: the quota of {self._accounts[model.upstream]} "
            f"is gone ({hold.why}) until {_utc(hold.until_wall)}, and no fallback could take "
            "the request; it was not sent.",
            regain_at=hold.regain_at,
            why=hold.why,
            priority=rank,
            tenant=tenant,
            retry_after=max(0.0, hold.until - now) or None,
        )

    async def _admit(self, route: Route, plan: _Plan) -> _Admitted:
        """The body in the model's dialect, the tier's grant and the budget's reservation.

        Raises:
            DialectError: the model's dialect cannot say the body (nothing was taken).
            TenantLimitError, BudgetExceededError (UpstreamCapError: the model's account's
                cap), StoreUnavailableError: refused.
            DeadlineExceededError: the deadline passed (what was taken is given back).
        """
        model, estimate, tenant = route.model, plan.estimate, plan.tenant
        # Translated first: a body the model's dialect cannot say costs nothing.
        hears = dialect_of_path(model.path)
        translate = hears is not None and hears != plan.speaks
        body = dict(_to_dialect(plan.json, hears) if translate and hears is not None else plan.json)
        body["model"] = model.api_name or model.name
        grant: TenantGrant | None = None
        cost = model.price.cost(estimate.input_tokens, estimate.output_tokens)
        reservation: BudgetReservation | None = None
        tenants, budget = self._tenants, self._budget
        if tenants is not None and budget is not None and tenants.store is budget.store:
            # One store: the tier's counters and the budget's in one all-or-none step (one
            # round trip on Redis), the tier's first, so its refusal is the one reported.
            grant, reservation = await self._admit_together(tenants, budget, model, plan, cost)
        else:
            if tenants is not None:
                grant = await tenants.admit(
                    tenant, model.name, estimate.context, priority=plan.rank
                )
            try:
                if budget is not None:
                    reservation = await budget.reserve(
                        tenant,
                        cost,
                        overdraft=plan.overdraft,
                        account=self._accounts[model.upstream],
                    )
            except BaseException:
                if grant is not None:
                    self._settle(grant.cancel())
                raise
        left = None
        if plan.ends is not None:
            left = plan.ends - asyncio.get_running_loop().time()
            if left < MIN_DEADLINE:
                self._release(grant, reservation)
                raise DeadlineExceededError(
                    "The request's deadline passed before a model could take it.",
                    priority=plan.rank,
                    tenant=tenant,
                )
        return _Admitted(body, translate, grant, reservation, cost, left)

    async def _admit_together(
        self, tenants: TenantQuotas, budget: BudgetGuard, model: Model, plan: _Plan, cost: float
    ) -> tuple[TenantGrant, BudgetReservation]:
        """The tier's and the budget's shares of a request, reserved in one ``reserve_all``.

        Raises:
            TenantLimitError, BudgetExceededError (UpstreamCapError), StoreUnavailableError:
                refused; nothing was counted.
        """
        asked = await tenants.ask(
            plan.tenant, model.name, plan.estimate.context, priority=plan.rank
        )
        owed = budget.ask(
            plan.tenant, cost, overdraft=plan.overdraft, account=self._accounts[model.upstream]
        )
        tier_items = () if isinstance(asked, TenantGrant) else asked.reservations
        # All or none; a cancelled call leaves nothing counted (the store sees to it).
        refused = await reserve_all(tenants.store, (*tier_items, *owed.reservations))
        if refused is not None:
            if refused < len(tier_items):
                assert not isinstance(asked, TenantGrant)
                raise await tenants.refused(asked, refused)
            raise budget.refused(owed, refused - len(tier_items))
        grant = asked if isinstance(asked, TenantGrant) else tenants.granted(asked)
        return grant, budget.granted(owed)

    async def _send(self, route: Route, plan: _Plan, passed_over: tuple[str, ...]) -> Routed:
        """One model: tier, budget reservation, the Shaper, then settle with the usage."""
        model, estimate = route.model, plan.estimate
        shaper = self._upstreams[model.upstream]
        _ask_first(shaper, plan)
        admitted = await self._admit(route, plan)
        grant, reservation = admitted.grant, admitted.reservation
        try:
            response = await shaper.request(
                "POST",
                model.path,
                json=admitted.body,
                headers=plan.headers,
                options=plan.for_model(admitted.left),
            )
        except RejectedError:
            self._release(grant, reservation)  # nothing was sent
            raise
        except UpstreamError as exc:
            self._release(grant, reservation)  # refused: no tokens were generated
            if admitted.translate:
                _error_to_dialect(exc, plan.speaks)
            raise
        except BaseException:
            # Deadline or cancellation in flight: the upstream may have charged it.
            self._charge_estimate(model, admitted, estimate)
            raise
        usage = reply_usage(response.body)
        if admitted.translate:
            response, usage = self._reply_to_dialect(response, usage, plan.json, plan.speaks)
        used_in, used_out, cost = await self._settle_usage(model, plan, admitted, usage)
        return Routed(
            response=response,
            model=model.name,
            reason=route.reason,
            cost=cost,
            input_tokens=used_in,
            output_tokens=used_out,
            passed_over=passed_over,
        )

    async def _settle_usage(
        self, model: Model, plan: _Plan, admitted: _Admitted, usage: tuple[int, int] | None
    ) -> tuple[int, int, float]:
        """Settle a served request with its usage (else the estimate); feed the monitor."""
        used_in, used_out = (
            usage
            if usage is not None
            else (plan.estimate.input_tokens, plan.estimate.output_tokens)
        )
        cost = model.price.cost(used_in, used_out)
        settling = []
        if admitted.grant is not None:
            settling.append(self._settle(admitted.grant.reconcile(used_in + used_out)))
        if admitted.reservation is not None:
            settling.append(self._settle(admitted.reservation.reconcile(cost)))
        self._spend(model, cost)
        if settling:
            # Settled before the caller hears back, so its next request sees the real spend.
            await asyncio.shield(asyncio.gather(*settling))
        self._watch(plan.tenant, model, self._upstreams[model.upstream])
        return used_in, used_out, cost

    async def _open(self, route: Route, plan: _Plan, passed_over: tuple[str, ...]) -> _OpenStream:
        """One model, streamed: tier, budget, the Shaper's stream, read to its first content.

        Raises:
            What ``_send`` raises; an error event before any content as its typed error
            (nothing was given to the caller: the chain goes on).
        """
        model, estimate = route.model, plan.estimate
        shaper = self._upstreams[model.upstream]
        _ask_first(shaper, plan)
        admitted = await self._admit(route, plan)
        grant, reservation = admitted.grant, admitted.reservation
        shaped = shaper.stream(
            "POST",
            model.path,
            json=admitted.body,
            headers=plan.headers,
            options=plan.for_model(admitted.left),
        )
        try:
            await shaped.__aenter__()
        except RejectedError:
            self._release(grant, reservation)
            raise
        except UpstreamError as exc:
            self._release(grant, reservation)
            if admitted.translate:
                _error_to_dialect(exc, plan.speaks)
            raise
        except BaseException:
            self._charge_estimate(model, admitted, estimate)
            raise
        opened = _OpenStream(
            route=route,
            passed_over=passed_over,
            shaped=shaped,
            translator=self._stream_translator(model, plan),
            admitted=admitted,
        )
        try:
            async for event in shaped:
                out = opened.translator.feed_events((event,))
                if out:
                    opened.first.append(out)
                if dialects.has_content(event.data):
                    break
            else:
                opened.finished = True  # it ended with nothing to say
        except (UpstreamError, DialectError) as exc:
            await shaped.__aexit__(None, None, None)
            if isinstance(exc, UpstreamError):
                self._release(grant, reservation)  # broken off before any content
                raise
            self._charge_estimate(model, admitted, estimate)
            raise _untranslatable(exc, shaped.status) from exc
        except BaseException:
            await shaped.__aexit__(None, None, None)
            self._charge_estimate(model, admitted, estimate)
            raise
        return opened

    def _stream_translator(self, model: Model, plan: _Plan) -> dialects.StreamTranslator:
        """Reads the model's stream, says it in the caller's dialect, and counts its usage."""
        hears = dialect_of_path(model.path) or plan.speaks
        if hears == plan.speaks:
            return dialects.PassThroughStream()
        if plan.speaks == dialects.OPENAI:
            options = plan.json.get("stream_options")
            include = isinstance(options, Mapping) and options.get("include_usage") is True
            return dialects.AnthropicStreamToOpenAI(
                created=int(self._wall_clock()), include_usage=include
            )
        return dialects.OpenAIStreamToAnthropic()

    def _reply_to_dialect(
        self,
        response: Response,
        usage: tuple[int, int] | None,
        asked: Mapping[str, Any],
        speaks: Provider,
    ) -> tuple[Response, tuple[int, int] | None]:
        """The model's reply in the caller's dialect, and its usage (a stream's included).

        Raises:
            UpstreamError: the reply cannot be read or said in the caller's dialect (it was
                served: its cost is settled at the estimate).
        """
        created = int(self._wall_clock())
        try:
            if asked.get("stream") is True:
                translator: dialects.AnthropicStreamToOpenAI | dialects.OpenAIStreamToAnthropic
                if speaks == dialects.OPENAI:
                    options = asked.get("stream_options")
                    include = isinstance(options, Mapping) and options.get("include_usage") is True
                    translator = dialects.AnthropicStreamToOpenAI(
                        created=created, include_usage=include
                    )
                else:
                    translator = dialects.OpenAIStreamToAnthropic()
                body = translator.feed(response.body) + translator.flush()
                usage = translator.usage or usage
            else:
                reply = orjson.loads(response.body)
                if not isinstance(reply, Mapping):
                    raise DialectError("reply", "the reply is not a JSON object")
                translated = (
                    dialects.anthropic_reply_to_openai(reply, created=created)
                    if speaks == dialects.OPENAI
                    else dialects.openai_reply_to_anthropic(reply)
                )
                body = orjson.dumps(translated)
        except (DialectError, orjson.JSONDecodeError) as exc:
            raise _untranslatable(exc, response.status, response.body) from exc
        headers = {
            name: value
            for name, value in response.headers.items()
            if name.lower() not in ("content-length", "content-encoding")
        }
        return Response(response.status, headers, body, attempts=response.attempts), usage

    def _release(self, grant: TenantGrant | None, reservation: BudgetReservation | None) -> None:
        if grant is not None:
            self._settle(grant.cancel())
        if reservation is not None:
            self._settle(reservation.cancel())

    def _charge_estimate(self, model: Model, admitted: _Admitted, estimate: _Estimate) -> None:
        """Charge a request the model may have answered (in flight when it ended) its estimate."""
        if admitted.grant is not None:
            self._settle(admitted.grant.reconcile(estimate.context))
        if admitted.reservation is not None:
            self._settle(admitted.reservation.reconcile(admitted.cost))
        self._spend(model, admitted.cost)

    def _spend(self, model: Model, cost: float) -> None:
        self._spent[model.name] = self._spent.get(model.name, 0.0) + cost

    def _settle(self, settling: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a settlement to its end even if the caller is cancelled meanwhile.

        One the store refuses is logged and dropped (see the module docstring): the reply
        it follows is the caller's, whatever the store's state.
        """
        task = asyncio.get_running_loop().create_task(_unless_store_fails(settling))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ watching usage

    def _watch(self, tenant: str | None, model: Model, shaper: Shaper) -> None:
        """Feed the monitor: the upstream's headers now; day usage, budgets and the model's
        account's cap at most once a second per tenant."""
        monitor = self._monitor
        if monitor is None:
            return
        snapshot = shaper.quota
        if snapshot is not None:
            for what, window in (("requests", snapshot.requests), ("tokens", snapshot.tokens)):
                _observe_window(monitor, f"upstream:{model.upstream}:{what}", window)
        now = asyncio.get_running_loop().time()
        watched = self._watched
        last = watched.get(tenant)
        if last is not None and now - last < WATCH_INTERVAL:
            return
        watched[tenant] = now
        if len(watched) > self._watch_sweep_at:
            self._watched = {t: at for t, at in watched.items() if now - at < WATCH_INTERVAL}
            self._watch_sweep_at = max(_WATCH_SWEEP_MIN, 2 * len(self._watched))
        self._settle(self._watch_stores(monitor, tenant, model.name, model.upstream))

    async def _watch_stores(
        self, monitor: UsageMonitor, tenant: str | None, model: str, upstream: str
    ) -> None:
        if self._tenants is not None:
            who = "Requests naming no tenant" if tenant is None else f"Tenant {tenant}"
            for status in await self._tenants.status(tenant, model):
                if status.dimension not in ("rpd", "tier_rpd") or not status.limit:
                    continue
                # A tier's shared limit is named as the configuration names it; no model
                # may be called "shared", so the two never meet.
                scope = model if status.dimension == "rpd" else "shared"
                what = f"{model} requests" if status.dimension == "rpd" else "requests (all models)"
                monitor.observe(
                    f"tenant:{tenant or ''}:{scope}:rpd",
                    status.used,
                    status.limit,
                    message=(
                        f"{who} used {status.used / status.limit:.0%} of its {what} today "
                        f"({status.used:g} of {status.limit:g})."
                    ),
                    tenant=tenant,
                )
        if self._budget is not None:
            account = self._accounts[upstream]
            for status in await self._budget.status(tenant, account=account):
                if not status.limit:
                    continue
                if status.dimension == "upstream_cap":
                    monitor.observe(
                        f"upstream_cap:{account}",
                        status.used,
                        status.limit,
                        message=(
                            f"{account} spent {status.used / status.limit:.0%} of its monthly "
                            f"cap this month ({money(status.used)} of {money(status.limit)}); "
                            "past it, its models' requests go to their fallbacks."
                        ),
                    )
                    continue
                name = "budget" if status.dimension == "budget" else f"tenant_budget:{tenant}"
                monitor.observe(name, status.used, status.limit)


async def _unless_store_fails(work: Coroutine[Any, Any, None]) -> None:
    try:
        await work
    except StoreUnavailableError as exc:
        logger.warning("%s A settlement or usage reading after the reply was dropped.", exc)


@dataclass(frozen=True, slots=True)
class _Policy:
    """The gateway's own settings, checked: ``reload`` swaps them in one step."""

    share: float  # downgrade_share
    when_spent: Literal["downgrade", "reject"]
    downgrade_at: float | None
    hold: float  # exhausted_hold
    fallback_on: frozenset[str]


def _policy(
    *,
    downgrade_share: float,
    when_spent: Literal["downgrade", "reject"],
    downgrade_at: float | None,
    exhausted_hold: float,
    fallback_on: Collection[str],
) -> _Policy:
    """The settings of the same names, checked (see :class:`Gateway`).

    Raises:
        ValueError: a setting out of range.
    """
    if not (_is_number(downgrade_share) and 0 < downgrade_share <= 1):
        raise ValueError(
            f"downgrade_share must lie in (0, 1], not {downgrade_share!r}: it is the "
            "share of the budget left above which a request is downgraded."
        )
    if downgrade_at is not None and not (_is_number(downgrade_at) and 0 < downgrade_at <= 1):
        raise ValueError(
            f"downgrade_at must lie in (0, 1], not {downgrade_at!r}: it is the share of "
            "a budget spent from which requests are downgraded."
        )
    if when_spent not in ("downgrade", "reject"):
        raise ValueError(f'when_spent must be "downgrade" or "reject", not {when_spent!r}.')
    if not (_is_number(exhausted_hold) and exhausted_hold > 0):
        raise ValueError(f"exhausted_hold must be a number of seconds > 0, not {exhausted_hold!r}.")
    unknown = sorted(set(fallback_on) - set(FALLBACK_CAUSES))
    if isinstance(fallback_on, str) or unknown:
        raise ValueError(
            f"fallback_on must be a collection of {', '.join(FALLBACK_CAUSES)}, "
            f"not {fallback_on!r}."
        )
    return _Policy(
        share=float(downgrade_share),
        when_spent=when_spent,
        downgrade_at=downgrade_at,
        hold=float(exhausted_hold),
        fallback_on=frozenset(fallback_on),
    )


@dataclass(frozen=True, slots=True)
class _Parts:
    """What a configuration makes that a reload may swap."""

    router: Router
    tenants: TenantQuotas | None
    budget: BudgetGuard | None
    policy: _Policy


def _parts(
    config: GovernanceConfig,
    store: Store | None,
    wall_clock: Callable[[], float],
    accounts: Mapping[str, str],
) -> _Parts:
    """The router, tiers, budget and settings of ``config``, each checked by its class.

    ``accounts`` names the account of each upstream that has a key (the others are their
    own account, by name): the upstreams' caps are kept per account.

    Raises:
        ValueError, TypeError: a class refused its part, or two upstreams of one account
            state different caps.
    """
    tenants = None
    if config.tiers:
        members: dict[Hashable, str] = {tenant: tier for tenant, tier in config.tenants.items()}
        tenants = TenantQuotas(
            tiers=config.tiers,
            tenants=members,
            default_tier=config.default_tier,
            store=store,
            timezone=config.tenant_timezone or config.timezone,
            wall_clock=wall_clock,
        )
    spec = config.budget
    caps = _caps(config, accounts)
    budget = None
    if spec is not None or caps:
        budgets: dict[Hashable, float] = (
            {} if spec is None else {tenant: cap for tenant, cap in spec.tenants.items()}
        )
        budget = BudgetGuard(
            monthly=None if spec is None else spec.monthly,
            tenants=budgets,
            store=store,
            timezone=config.timezone,
            wall_clock=wall_clock,
            overdraft_limit=None if spec is None else spec.overdraft_limit,
            caps=caps,
        )
    return _Parts(
        router=Router(
            models=config.models,
            rules=config.rules,
            fallbacks=config.fallbacks,
            default_model=config.default_model,
        ),
        tenants=tenants,
        budget=budget,
        policy=_policy(
            downgrade_share=0.1 if spec is None else spec.downgrade_share,
            when_spent="downgrade" if spec is None else spec.when_spent,
            downgrade_at=None if spec is None else spec.downgrade_at,
            exhausted_hold=config.gateway.exhausted_hold,
            fallback_on=config.gateway.fallback_on,
        ),
    )


def _caps(config: GovernanceConfig, accounts: Mapping[str, str]) -> dict[str, float]:
    """Account → its monthly cap, from the upstreams that state one.

    Raises:
        ValueError: two upstreams of one account (one API key) state different caps.
    """
    caps: dict[str, float] = {}
    stated: dict[str, str] = {}  # account → the upstream whose cap it took
    for spec in config.upstreams:
        if spec.monthly_cap is None:
            continue
        account = accounts.get(spec.name, spec.name)
        if account in caps and caps[account] != spec.monthly_cap:
            raise ValueError(
                f"upstreams.{stated[account]}.monthly_cap ({money(caps[account])}) and "
                f"upstreams.{spec.name}.monthly_cap ({money(spec.monthly_cap)}) are caps of "
                "one account (the same API key), which the provider caps once; state one."
            )
        caps[account] = spec.monthly_cap
        stated.setdefault(account, spec.name)
    return caps


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _check_upstreams(router: Router, upstreams: Collection[str]) -> None:
    missing = sorted({m.upstream for m in router.models} - set(upstreams))
    if missing:
        raise ValueError(f"Models name upstreams that are not configured: {', '.join(missing)}.")


def _check_dialect(dialect: object) -> Provider:
    if dialect not in (dialects.OPENAI, dialects.ANTHROPIC):
        raise ValueError(
            f'dialect must be "{dialects.OPENAI}" or "{dialects.ANTHROPIC}", not {dialect!r}.'
        )
    return dialect


def _to_dialect(body: Mapping[str, Any], hears: Provider) -> dict[str, Any]:
    """A request body in the model's dialect (raises DialectError: nothing is sent)."""
    if hears == dialects.ANTHROPIC:
        return dialects.openai_request_to_anthropic(body)
    return dialects.anthropic_request_to_openai(body)


def _error_to_dialect(exc: UpstreamError, speaks: Provider) -> None:
    """Say an error body in the caller's dialect, where it is whole JSON."""
    try:
        error = orjson.loads(exc.body) if exc.body else None
    except orjson.JSONDecodeError:
        return  # cut short, or not JSON: kept as the upstream said it
    if isinstance(error, Mapping):
        translated = (
            dialects.anthropic_error_to_openai(error)
            if speaks == dialects.OPENAI
            else dialects.openai_error_to_anthropic(error)
        )
        exc.body = orjson.dumps(translated).decode()


def _untranslatable(exc: Exception, status: int, body: bytes | None = None) -> UpstreamError:
    return UpstreamError(
        f"The reply could not be said in the request's dialect ({exc}).",
        status=status,
        body=body,
        reason="untranslatable_reply",
    )


def _ask_first(shaper: Shaper, plan: _Plan) -> None:
    """Raise the refusal ``shaper`` would give ``plan``'s request at its door, before the
    costly part (its body translated, the tier's and the budget's share reserved).

    Raises:
        RejectedError, ThrottledError: what ``Shaper.request`` would raise unsent; the
            chain takes it as it takes the Shaper's own (busy, shedding: the next model).
    """
    left = None if plan.ends is None else plan.ends - asyncio.get_running_loop().time()
    if left is not None and left < MIN_DEADLINE:
        return  # _admit says the deadline passed
    refused = shaper.refusal(plan.for_model(left))
    if refused is not None:
        try:
            raise refused
        finally:
            refused = None  # its traceback holds this frame: no reference cycle through it


def _held_for(hold: _Hold) -> str:
    if hold.probing:
        return f"out of quota ({hold.why}); a probe is checking whether it is back"
    return f"out of quota until {_utc(hold.until_wall)} ({hold.why})"


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _observe_window(monitor: UsageMonitor, dimension: str, window: QuotaWindow) -> None:
    if window.limit and window.remaining is not None:
        used = max(0, window.limit - window.remaining)
        monitor.observe(dimension, used, window.limit)


def _env(environ: Mapping[str, str], name: str, where: str) -> str:
    value = environ.get(name)
    if not value:
        raise ValueError(f"{where} names the environment variable {name!r}, which is not set.")
    return value
