"""One entry point over several upstreams: who may spend what on which model.

A :class:`Gateway` sits above one :class:`~asyncquota.Shaper` per upstream and decides,
for each request, before anything is queued::

    route (task, complexity, context → model)  ── budget policy (may downgrade or reject)
      → for the model, then each fallback that fits:
          unavailable? (cooling down, out of quota)          → next fallback
          tenant tier (RPM/RPD/TPM for that model)           → TenantLimitError at once
          budget reservation (estimate)                      → BudgetExceededError
          the model's Shaper (queue, gates, retries)         → shed/out of quota → next fallback
      → reconcile tier tokens and budget with the reply's usage; watch usage for alerts

A tenant over its own tier gets its error at once: it is their quota, not congestion, so
it never waits behind anyone nor falls back to another model. What the upstreams refuse
(cooling down, ``insufficient_quota``, shedding) moves the request down the model's
fallback chain; the answer says which model answered and why it was chosen.

Cost is estimated before the call (prompt estimate + ``max_tokens``, at the model's
prices) and reserved against the budgets, so concurrent requests cannot overshoot
together; the reply's ``usage`` settles it.

When the counter store is unavailable (a locked, corrupt or failing SQLite file; see
:class:`~.store.SQLiteStore`), tiers and budgets fail closed: a request whose limits
cannot be checked is refused with :class:`~asyncquota.errors.StoreUnavailableError`
before anything is sent, and it is not passed to a fallback (they share the store). A
request already served still gets its reply: a settlement the store refuses afterwards
(a refund, a top-up to the real usage) is logged at WARNING on ``asyncquota.governance``
and lost, so the counters keep the estimate charged at admission, never more, never twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import orjson

from ..errors import (
    BudgetExceededError,
    DeadlineExceededError,
    DeadlineUnreachableError,
    QueueFullError,
    QuotaError,
    QuotaExhaustedError,
    RejectedError,
    StoreUnavailableError,
    ThrottledError,
    UpstreamError,
)
from ..priority import Priority, PriorityLike, coerce_priority
from ..shaper import Shaper
from ..signals import QuotaSnapshot, QuotaWindow
from ..tokens import output_allowance, prompt_tokens, reply_usage
from ..transport import Response, Transport
from .alerts import LoggingSink, ShedBatchAction, Sink, UsageMonitor, WebhookSink
from .budget import BudgetGuard, BudgetReservation
from .routing import Model, Route, Router
from .store import MemoryStore, SQLiteStore, Store
from .tiers import DimensionStatus, TenantGrant, TenantQuotas, tenant_id

__all__ = ["EXHAUSTED_HOLD", "WATCH_INTERVAL", "Gateway", "QuotaStatus", "Routed"]

logger = logging.getLogger("asyncquota.governance")

EXHAUSTED_HOLD = 300.0
"""Seconds a model whose upstream said ``insufficient_quota`` is passed over for its fallbacks."""

WATCH_INTERVAL = 1.0
"""Seconds between two readings of a tenant's day usage and the budget for alerts.

The gateway remembers when it last read each tenant only while that matters: an entry
older than this is the same as none, so such entries are swept as the map grows (to twice
its live size, at least ``_WATCH_SWEEP_MIN``). Memory follows the tenants seen in the
last second, not every tenant ever seen."""

_WATCH_SWEEP_MIN = 1024

DEFAULT_OUTPUT_TOKENS = 256


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


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """Where a tenant stands, and what the upstreams said last.

    Attributes:
        tenant: whose limits (None: none, only budget and upstreams).
        models: model → the tenant's tier dimensions for it (used, limit, remaining,
            reset time); a model without limits maps to an empty tuple.
        budget: ``"budget"`` (global) and ``"tenant_budget"`` spend this month.
        upstreams: upstream → its last rate-limit headers (None: none yet).
    """

    tenant: str | None
    models: Mapping[str, tuple[DimensionStatus, ...]]
    budget: tuple[DimensionStatus, ...]
    upstreams: Mapping[str, QuotaSnapshot | None]


@dataclass(frozen=True, slots=True)
class _Estimate:
    input_tokens: int
    output_tokens: int

    @property
    def context(self) -> int:
        return self.input_tokens + self.output_tokens


class Gateway:
    """Routes requests to models over several upstreams under tenant tiers and a budget.

    Args:
        upstreams: upstream name → its Shaper (the gateway starts and closes them).
        router: the models, routing rules and fallback chains.
        tenants: the tenants' tiers (None: no tenant limits).
        budget: the budgets (None: no budget).
        monitor: usage alerts (None: none). It watches the upstreams' remaining requests
            and tokens, each tenant's requests today, and the budgets.
        downgrade_share: a request whose estimated cost is above this share of the budget
            left is downgraded to a cheaper model of its chain that fits.
        when_spent: once a budget cannot pay for a request: ``"downgrade"`` serves it on
            the cheapest model of its chain anyway (past the budget), ``"reject"``
            refuses it with BudgetExceededError.
        default_output_tokens: the output allowance of a request naming no ``max_tokens``.
        store: a store the gateway owns and closes (the one ``from_config`` made).
        wall_clock: Unix time (for the ``retry_after`` of a spent budget).

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
    ) -> None:
        missing = sorted({m.upstream for m in router.models} - set(upstreams))
        if missing:
            raise ValueError(
                f"Models name upstreams that are not configured: {', '.join(missing)}."
            )
        if not (math.isfinite(downgrade_share) and 0 < downgrade_share <= 1):
            raise ValueError(
                f"downgrade_share must lie in (0, 1], not {downgrade_share!r}: it is the "
                "share of the budget left above which a request is downgraded."
            )
        if when_spent not in ("downgrade", "reject"):
            raise ValueError(f'when_spent must be "downgrade" or "reject", not {when_spent!r}.')
        if isinstance(default_output_tokens, bool) or not (
            isinstance(default_output_tokens, int) and default_output_tokens >= 0
        ):
            raise ValueError(
                f"default_output_tokens must be an integer >= 0, not {default_output_tokens!r}."
            )
        self._upstreams = dict(upstreams)
        self._router = router
        self._tenants = tenants
        self._budget = budget
        self._monitor = monitor
        self._share = float(downgrade_share)
        self._when_spent = when_spent
        self._default_output = default_output_tokens
        self._store = store
        self._wall_clock = wall_clock
        self._exhausted: dict[str, float] = {}  # model → loop time until which it is skipped
        self._watched: dict[str | None, float] = {}  # tenant → last reading (loop time)
        self._watch_sweep_at = _WATCH_SWEEP_MIN  # sweep stale entries past this size
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ building one

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        transports: Mapping[str, Transport] | None = None,
        wall_clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        sinks: Sequence[Sink] = (),
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

        Raises:
            ConfigError: the file is invalid (the message names the field).
            ValueError: an environment variable the configuration names is not set.
        """
        from .config import GovernanceConfig, load_config

        if not isinstance(config, GovernanceConfig):
            config = load_config(Path(config))
        env = os.environ if environ is None else environ
        transports = transports or {}
        store: Store = (
            SQLiteStore(config.store, wall_clock=wall_clock)
            if config.store is not None
            else MemoryStore(wall_clock=wall_clock)
        )
        shapers: dict[str, Shaper] = {}
        for spec in config.upstreams:
            headers = dict(spec.headers)
            if spec.api_key_env is not None:
                key = _env(env, spec.api_key_env, f"upstreams.{spec.name}.api_key_env")
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
            shapers[spec.name] = Shaper(
                spec.base_url,
                rpm=spec.rpm,
                tpm=spec.tpm,
                headers=headers,
                transport=transports.get(spec.name),
                wall_clock=wall_clock,
                **options,
            )
        router = Router(
            models=config.models,
            rules=config.rules,
            fallbacks=config.fallbacks,
            default_model=config.default_model,
        )
        tenants = None
        if config.tiers:
            tenants = TenantQuotas(
                tiers=config.tiers,
                tenants=config.tenants,
                default_tier=config.default_tier,
                store=store,
                timezone=config.tenant_timezone or config.timezone,
                wall_clock=wall_clock,
            )
        budget, share = None, 0.1
        when_spent: Literal["downgrade", "reject"] = "downgrade"
        if config.budget is not None:
            budget = BudgetGuard(
                monthly=config.budget.monthly,
                tenants=config.budget.tenants,
                store=store,
                timezone=config.timezone,
                wall_clock=wall_clock,
            )
            share, when_spent = config.budget.downgrade_share, config.budget.when_spent
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
                thresholds=alerts.thresholds,
                sinks=[*every, *sinks],
                on_critical=actions,
                wall_clock=wall_clock,
            )
        return cls(
            upstreams=shapers,
            router=router,
            tenants=tenants,
            budget=budget,
            monitor=monitor,
            downgrade_share=share,
            when_spent=when_spent,
            store=store,
            wall_clock=wall_clock,
        )

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
        headers: Mapping[str, str] | None = None,
    ) -> Routed:
        """Route one JSON request to a model and send it through that model's Shaper.

        The body is sent with its ``model`` field set to the chosen model's API name.

        Args:
            json: the request body (chat completion or messages).
            model: the model asked for (wins over the routing rules; fallbacks still apply).
            task, complexity: matched against the routing rules.
            tenant: whose tier and budget apply.
            priority, deadline, headers: as for ``Shaper.request`` (the deadline covers
                every model tried).

        Raises:
            TenantLimitError: the tenant is over its tier's limit for the model.
            BudgetExceededError: the budget cannot pay and the policy is to reject.
            StoreUnavailableError: tiers or budgets could not be checked (the store is
                locked, corrupt or failing): refused, nothing sent, no fallback tried.
            NoRouteError: no model fits the request.
            QuotaError: what the last model's Shaper raised (see ``Shaper.request``).
            ValueError: a malformed argument.
        """
        if not isinstance(json, Mapping):
            raise TypeError(
                f"json must be a mapping (the request body), not {type(json).__name__}."
            )
        tenant = tenant_id(tenant)  # once, so tiers, budget and alerts see one identity
        rank = coerce_priority(priority)
        estimate = _Estimate(
            input_tokens=prompt_tokens(len(orjson.dumps(json))),
            output_tokens=output_allowance(json, default_output_tokens=self._default_output),
        )
        route: Route | None = self._router.route(
            context_tokens=estimate.context, model=model, task=task, complexity=complexity
        )
        assert route is not None
        route, overdraft = await self._budget_policy(route, tenant, estimate)
        loop = asyncio.get_running_loop()
        ends = None if deadline is None else loop.time() + _seconds(deadline)
        passed_over: list[str] = []
        last: QuotaError | None = None
        while route is not None:
            current = route.model
            why = self._unavailable(current, loop.time())
            if why is None or not route.chain:  # the last one is tried whatever its state
                try:
                    return await self._send(
                        route,
                        json,
                        estimate,
                        tenant,
                        rank,
                        ends,
                        headers,
                        overdraft,
                        tuple(passed_over),
                    )
                except QuotaExhaustedError as exc:
                    self._exhausted[current.name] = loop.time() + EXHAUSTED_HOLD
                    why, last = "out of quota", exc
                except (QueueFullError, DeadlineUnreachableError) as exc:
                    why, last = "shedding", exc
                except ThrottledError as exc:
                    if exc.retry_after is None:
                        raise
                    why, last = f"rate limited for {exc.retry_after:.1f} s", exc
            passed_over.append(f"{current.name}: {why}")
            route = route.fallback(why)
        assert last is not None
        raise last

    async def quota_status(
        self, tenant: Hashable | None = None, model: str | None = None
    ) -> QuotaStatus:
        """The tenant's tier usage per model, the budgets, and the upstreams' last headers.

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
        budget = tuple(await self._budget.status(tenant)) if self._budget is not None else ()
        return QuotaStatus(
            tenant=tenant,
            models=models,
            budget=budget,
            upstreams={name: shaper.quota for name, shaper in self._upstreams.items()},
        )

    # ------------------------------------------------------------------ inside

    async def _budget_policy(
        self, route: Route, tenant: str | None, estimate: _Estimate
    ) -> tuple[Route, bool]:
        """The route after the budget's say, and whether it may overdraw."""
        if self._budget is None:
            return route, False
        left = await self._budget.remaining(tenant)
        if left is None:
            return route, False
        cost = route.model.price.cost(estimate.input_tokens, estimate.output_tokens)
        cheaper = self._router.cheaper
        if cost > left:
            if self._when_spent == "reject":
                statuses = await self._budget.status(tenant)
                renews = min((s.resets_at for s in statuses if s.resets_at), default=None)
                raise BudgetExceededError(
                    f"The budget has ${left:.4f} left this month, less than this request's "
                    f"estimated ${cost:.4f}; it was not sent.",
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
                    reason=f"{chosen.reason}; the budget is spent (${left:.4f} left): "
                    "served on the cheapest model of its chain",
                    chain=chosen.chain,
                ),
                True,
            )
        if cost > self._share * left:
            down = cheaper(
                route,
                input_tokens=estimate.input_tokens,
                output_tokens=estimate.output_tokens,
                max_cost=self._share * left,
            ) or cheaper(
                route, input_tokens=estimate.input_tokens, output_tokens=estimate.output_tokens
            )
            if down is not None:
                return down, False
        return route, False

    def _unavailable(self, model: Model, now: float) -> str | None:
        """Why ``model`` should be passed over for a fallback right now, or None."""
        until = self._exhausted.get(model.name)
        if until is not None:
            if now < until:
                return "out of quota"
            del self._exhausted[model.name]
        cooling = self._upstreams[model.upstream].cooldown_remaining()
        if cooling > 0:
            return f"cooling down for {cooling:.1f} s"
        return None

    async def _send(
        self,
        route: Route,
        json: Mapping[str, Any],
        estimate: _Estimate,
        tenant: str | None,
        rank: int,
        ends: float | None,
        headers: Mapping[str, str] | None,
        overdraft: bool,
        passed_over: tuple[str, ...],
    ) -> Routed:
        """One model: tier, budget reservation, the Shaper, then settle with the usage."""
        model = route.model
        shaper = self._upstreams[model.upstream]
        grant: TenantGrant | None = None
        if self._tenants is not None:
            grant = await self._tenants.admit(tenant, model.name, estimate.context, priority=rank)
        estimated_cost = model.price.cost(estimate.input_tokens, estimate.output_tokens)
        reservation: BudgetReservation | None = None
        try:
            if self._budget is not None:
                reservation = await self._budget.reserve(
                    tenant, estimated_cost, overdraft=overdraft
                )
        except BaseException:
            if grant is not None:
                self._settle(grant.cancel())
            raise
        loop = asyncio.get_running_loop()
        left = None
        if ends is not None:
            left = ends - loop.time()
            if left <= 0:
                self._release(grant, reservation)
                raise DeadlineExceededError(
                    "The request's deadline passed before a model could take it.",
                    priority=rank,
                    tenant=tenant,
                )
        body = dict(json)
        body["model"] = model.api_name or model.name
        try:
            response = await shaper.request(
                "POST",
                model.path,
                json=body,
                headers=headers,
                priority=rank,
                tenant=tenant,
                deadline=left,
                cost_tokens=estimate.context,
            )
        except RejectedError:
            self._release(grant, reservation)  # nothing was sent
            raise
        except UpstreamError:
            self._release(grant, reservation)  # refused: no tokens were generated
            raise
        except BaseException:
            # Deadline or cancellation in flight: the upstream may have charged it.
            self._charge_estimate(grant, reservation, estimate, estimated_cost)
            raise
        usage = reply_usage(response.body)
        used_in, used_out = (
            usage
            if usage is not None
            else (
                estimate.input_tokens,
                estimate.output_tokens,
            )
        )
        cost = model.price.cost(used_in, used_out)
        settling = []
        if grant is not None:
            settling.append(self._settle(grant.reconcile(used_in + used_out)))
        if reservation is not None:
            settling.append(self._settle(reservation.reconcile(cost)))
        if settling:
            # Settled before the caller hears back, so its next request sees the real spend.
            await asyncio.shield(asyncio.gather(*settling))
        self._watch(tenant, model, shaper)
        return Routed(
            response=response,
            model=model.name,
            reason=route.reason,
            cost=cost,
            input_tokens=used_in,
            output_tokens=used_out,
            passed_over=passed_over,
        )

    def _release(self, grant: TenantGrant | None, reservation: BudgetReservation | None) -> None:
        if grant is not None:
            self._settle(grant.cancel())
        if reservation is not None:
            self._settle(reservation.cancel())

    def _charge_estimate(
        self,
        grant: TenantGrant | None,
        reservation: BudgetReservation | None,
        estimate: _Estimate,
        cost: float,
    ) -> None:
        if grant is not None:
            self._settle(grant.reconcile(estimate.context))
        if reservation is not None:
            self._settle(reservation.reconcile(cost))

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
        """Feed the monitor: the upstream's headers now, day usage and budget at most 1/s."""
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
        self._settle(self._watch_stores(monitor, tenant, model.name))

    async def _watch_stores(self, monitor: UsageMonitor, tenant: str | None, model: str) -> None:
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
            for status in await self._budget.status(tenant):
                if status.limit:
                    name = "budget" if status.dimension == "budget" else f"tenant_budget:{tenant}"
                    monitor.observe(name, status.used, status.limit)


async def _unless_store_fails(work: Coroutine[Any, Any, None]) -> None:
    try:
        await work
    except StoreUnavailableError as exc:
        logger.warning("%s A settlement or usage reading after the reply was dropped.", exc)


def _observe_window(monitor: UsageMonitor, dimension: str, window: QuotaWindow) -> None:
    if window.limit and window.remaining is not None:
        used = max(0, window.limit - window.remaining)
        monitor.observe(dimension, used, window.limit)


def _seconds(deadline: float) -> float:
    if isinstance(deadline, bool) or not (
        isinstance(deadline, int | float) and math.isfinite(deadline) and deadline > 0
    ):
        raise ValueError(f"deadline must be a number of seconds > 0, not {deadline!r}.")
    return float(deadline)


def _env(environ: Mapping[str, str], name: str, where: str) -> str:
    value = environ.get(name)
    if not value:
        raise ValueError(f"{where} names the environment variable {name!r}, which is not set.")
    return value
