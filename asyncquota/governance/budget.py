"""What requests cost, and a monthly budget that concurrent requests cannot overshoot together.

A request's cost is estimated before it is sent (prompt estimate plus ``max_tokens``, at
the model's :class:`Price`) and **reserved** against the budget; when the reply's real
usage is known the reservation is reconciled to the real cost (the difference is refunded
or charged), and a request that is never sent is cancelled (fully refunded). Gateways that
count spend only after the call let a thousand concurrent requests each see the same
"$0.05 left" and spend it a thousand times; a reservation is an atomic check-and-add in
the store, so the sum of what is reserved and spent never passes the budget, even while
every one of them is in flight.

Two budgets may apply to one request: the global monthly budget and its tenant's own.
A reservation takes both or neither. Spend is always counted (globally, and per tenant for
requests that name one), so status reports it even where no budget is set.

A third may apply, per upstream **account**: a monthly cap that mirrors one the provider
keeps on its side (Anthropic's "specified API usage limits", an OpenAI project's budget).
Past it the provider refuses everything until its month renews, so the cap is reserved in
the same step as the budgets (all or none), never overdrawn, and refused with
:class:`~asyncquota.errors.UpstreamCapError`, which the Gateway answers by moving the
request to its model's fallback. Caps run on UTC months whatever the budget's zone: both
providers renew theirs at 00:00 UTC on the 1st. A cap counts only what passed through
this store; the provider also counts what was spent elsewhere with the same key.

The period is the calendar month in the configured time zone: counters are keyed by month
(``budget:2026-03`` and ``budget:2026-03:tenant:acme``, tenants by :func:`~.tiers.tenant_id`:
``42`` and ``"42"`` are one tenant with one budget and one counter), so a
new month starts at zero without anyone resetting anything, and a reservation reconciles
against the month it was made in (caps: ``cap:2026-03:anthropic#1f0c9a2e``, by account).
Time comes only from the injected ``wall_clock``.

Money is counted in dollars as floats. Sums of decimal prices drift (500 × $0.10 adds up
to 50.00000000000044), so a budget admits up to ``SLACK`` (a billionth of a dollar) past
its limit: enough to absorb the drift, never a real overspend.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from ..errors import BudgetExceededError, StoreUnavailableError, UpstreamCapError
from .store import MemoryStore, Reservation, Store, reserve_all
from .tiers import DimensionStatus, tenant_id, zone

__all__ = [
    "CAP_TIMEZONE",
    "SLACK",
    "BudgetGuard",
    "BudgetReservation",
    "Price",
    "money",
    "month_window",
]

logger = logging.getLogger("asyncquota.governance")

SLACK = 1e-9
"""Dollars a budget admits past its limit, to absorb floating-point drift in sums."""

CAP_TIMEZONE = "UTC"
"""The zone of the caps' months: Anthropic's and OpenAI's own caps renew at 00:00 UTC."""

_KEEP_AFTER_MONTH = 35 * 86_400.0  # a month's counters outlive it: reconciles, status, audits

_T = TypeVar("_T")

_MONEY_FIGURES = 3  # significant figures for amounts under a dollar
_MONEY_DECIMALS = 8  # and no more decimals than that


def money(amount: float) -> str:
    """Dollars as a person reads them, precise enough to tell small amounts apart.

    Cents from a dollar up (``$1.00``, ``$5000.00``); below, three significant figures
    (``$0.30``, ``$0.0046``, ``$0.001``, ``$0.00000125``): a budget of a tenth of a cent
    is not "$0.00".
    """
    size = abs(amount)
    decimals = 2
    if 0 < size < 1:
        decimals = min(_MONEY_DECIMALS, max(2, _MONEY_FIGURES - 1 - math.floor(math.log10(size))))
    text = f"{amount:.{decimals}f}"
    if decimals > 2:
        text = text.rstrip("0")
        whole, _, cents = text.partition(".")
        text = f"{whole}.{cents.ljust(2, '0')}"
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price: dollars per million input tokens and per million output tokens.

    Raises:
        ValueError: a price that is negative or not a finite number (naming the field).
    """

    input_per_mtok: float
    output_per_mtok: float

    def __post_init__(self) -> None:
        for field in ("input_per_mtok", "output_per_mtok"):
            _check_dollars(field, getattr(self, field))

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        """Dollars for a request of ``input_tokens`` in and ``output_tokens`` out."""
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


def month_window(now: float, zone: ZoneInfo) -> tuple[str, float]:
    """The calendar month in ``zone`` that Unix time ``now`` falls in, and when it ends.

    Returns:
        ``("YYYY-MM", start of the next month as Unix time)``.
    """
    local = datetime.fromtimestamp(now, zone)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return f"{local.year:04d}-{local.month:02d}", datetime(year, month, 1, tzinfo=zone).timestamp()


_CAP_ZONE = ZoneInfo(CAP_TIMEZONE)


class BudgetGuard:
    """A global monthly budget and per-tenant monthly budgets, in dollars, reserved up front.

    A guard keeps no money in memory: every figure lives in the store, so several guards
    (or processes) sharing one store share one budget, and spend survives a restart with a
    persistent store.

    Args:
        monthly: the global budget per calendar month (None: unlimited).
        tenants: tenant → its own budget per calendar month; tenants not listed have none.
        store: where the counters live (default: a new in-memory store on ``wall_clock``).
        timezone: the IANA zone whose calendar months are the budget periods.
        wall_clock: Unix time now; the only clock the guard reads.
        overdraft_limit: dollars a reservation with ``overdraft=True`` may take past each
            budget, at most (None: no ceiling): the hard stop of "keep serving on the
            cheapest model once the budget is spent".
        caps: upstream account → its monthly cap (UTC months, ``CAP_TIMEZONE``); a
            reservation naming the account takes it too, and never past it, overdraft or
            not: the provider would refuse the request.

    Raises:
        ValueError: a budget or cap that is not a finite number > 0, two keys naming one
            tenant (``42`` and ``"42"``), or an unknown time zone.
        TypeError: a key that is not a tenant id (see :func:`~.tiers.tenant_id`).
    """

    __slots__ = (
        "_background",
        "_caps",
        "_monthly",
        "_open",
        "_overdraft",
        "_store",
        "_tenants",
        "_wall_clock",
        "_zone",
    )

    def __init__(
        self,
        *,
        monthly: float | None = None,
        tenants: Mapping[Hashable, float] | None = None,
        store: Store | None = None,
        timezone: str = "UTC",
        wall_clock: Callable[[], float] = time.time,
        overdraft_limit: float | None = None,
        caps: Mapping[str, float] | None = None,
    ) -> None:
        if overdraft_limit is not None:
            _check_dollars("overdraft_limit", overdraft_limit)
        self._overdraft = overdraft_limit
        if monthly is not None:
            _check_budget("monthly", monthly)
        self._tenants: dict[str, float] = {}
        for tenant, budget in (tenants or {}).items():
            _check_budget(f"tenants[{tenant!r}]", budget)
            who = tenant_id(tenant)
            if who is None or who in self._tenants:
                raise ValueError(
                    f"tenants[{tenant!r}] is no tenant or the same tenant as another key "
                    f"({who!r}): each tenant has one budget."
                )
            self._tenants[who] = budget
        self._monthly = monthly
        self._caps: dict[str, float] = {}
        for account, cap in (caps or {}).items():
            _check_budget(f"caps[{account!r}]", cap)
            self._caps[account] = float(cap)
        self._store: Store = store if store is not None else MemoryStore(wall_clock=wall_clock)
        self._zone = zone(timezone)
        self._wall_clock = wall_clock
        self._open = 0
        # Store updates that must finish even when their caller is cancelled.
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def store(self) -> Store:
        """Where the spend lives (guards on the same store share one budget)."""
        return self._store

    @property
    def caps(self) -> Mapping[str, float]:
        """Upstream account → its monthly cap."""
        return dict(self._caps)

    async def remaining(self, tenant: Hashable | None) -> float | None:
        """Dollars left this month: the smaller of the global and the tenant's (None: unlimited)."""
        if self._monthly is None and self._tenants.get(tenant_id(tenant) or "") is None:
            return None
        left = [s.remaining for s in await self.status(tenant) if s.remaining is not None]
        return min(left)

    async def status(
        self, tenant: Hashable | None, *, account: str | None = None
    ) -> list[DimensionStatus]:
        """This month's spend against each budget that concerns ``tenant`` (and ``account``).

        Returns:
            ``"budget"`` (global) first, then ``"tenant_budget"`` when a tenant is given,
            then ``"upstream_cap"`` when ``account`` has a cap. ``remaining`` never goes
            below 0 (an overdraft shows as ``used > limit``); ``resets_at`` is the start of
            next month (the cap's: in UTC), None where there is no limit.
        """
        now = self._wall_clock()
        counters = self._counters(tenant, now)
        if account is not None and account in self._caps:
            counters.append(self._cap_counter(account, now))
        return await self._read(counters)

    async def cap_status(self) -> dict[str, DimensionStatus]:
        """Each capped account's spend this month against its cap (``"upstream_cap"``)."""
        now = self._wall_clock()
        statuses = await self._read([self._cap_counter(account, now) for account in self._caps])
        return dict(zip(self._caps, statuses, strict=True))

    async def _read(self, counters: list[_Counter]) -> list[DimensionStatus]:
        used = await self._store.get([counter.key for counter in counters])
        return [
            DimensionStatus(
                dimension=counter.dimension,
                used=spent,
                limit=counter.limit,
                remaining=None if counter.limit is None else max(0.0, counter.limit - spent),
                resets_at=None if counter.limit is None else counter.renews,
            )
            for counter, spent in zip(counters, used, strict=True)
        ]

    async def reserve(
        self,
        tenant: Hashable | None,
        amount: float,
        *,
        overdraft: bool = False,
        account: str | None = None,
    ) -> BudgetReservation:
        """Reserve ``amount`` dollars against every budget that concerns the request: all or none.

        Args:
            tenant: whose budget also applies (None: only the global one).
            amount: the estimated cost of the request.
            overdraft: charge it even past a budget (the policy "downgrade to the cheapest
                model and keep serving" once a budget is spent), up to the guard's
                ``overdraft_limit`` past it. Never past a cap.
            account: the upstream account that would serve it; its cap applies too, if it
                has one.

        Raises:
            UpstreamCapError: the account's cap cannot pay for it this month (the budgets
                could); ``retry_after`` is the time until the cap's month renews.
            BudgetExceededError: a budget cannot pay for it this month (and not
                ``overdraft``); ``retry_after`` is the time until next month. Either way
                nothing is reserved.
            ValueError: ``amount`` negative or not finite.

        Under cancellation nothing leaks: a reservation the caller did not live to receive
        is refunded in the background.
        """
        asked = self.ask(tenant, amount, overdraft=overdraft, account=account)
        taking = self._spawn(self._take(asked))
        try:
            await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(
                lambda task: self._refund_orphan(task, amount, asked.expires_at)
            )
            raise
        return self.granted(asked)

    def ask(
        self,
        tenant: Hashable | None,
        amount: float,
        *,
        overdraft: bool = False,
        account: str | None = None,
    ) -> BudgetAsk:
        """``reserve`` up to its reservation: what to reserve on the store, for a caller that
        reserves it with others in one ``reserve_all`` (a Gateway with its tenants' tiers
        on the same store); then ``granted(ask)``, or ``refused(ask, i)`` with the index of
        the refused one among ``ask.reservations``.

        Raises:
            ValueError: ``amount`` negative or not finite.
        """
        _check_dollars("amount", amount)
        now = self._wall_clock()
        counters, expires_at = self._to_charge(tenant, account, now)
        return BudgetAsk(
            tuple(counters),
            self._reservations(counters, amount, overdraft, expires_at),
            amount,
            tenant,
            overdraft,
            expires_at,
            now,
        )

    def granted(self, asked: BudgetAsk) -> BudgetReservation:
        """The reservation of an ask whose reservations were all made."""
        self._open += 1
        keys = tuple(counter.key for counter in asked.counters)
        return BudgetReservation(
            self, keys, asked.amount, tenant=asked.tenant, expires_at=asked.expires_at
        )

    def refused(self, asked: BudgetAsk, index: int) -> BudgetExceededError:
        """The error of an ask whose reservation ``index`` was refused (nothing reserved)."""
        counter = asked.counters[index]
        assert counter.limit is not None  # only a ceiling refuses
        past = self._past(counter, asked.overdraft)
        return self._refusal(counter, counter.limit, past, asked.amount, asked.now, asked.tenant)

    def _to_charge(
        self, tenant: Hashable | None, account: str | None, now: float
    ) -> tuple[list[_Counter], float]:
        """The counters a request charges, and their one expiry."""
        # The tenant first: its budget is the smaller one, so a refusal seldom costs a
        # rollback of the global counter. The cap last: a request no budget can pay is
        # refused as such, not moved to a fallback that the same budgets would refuse.
        counters = self._counters(tenant, now)[::-1]
        if account is not None and account in self._caps:
            counters.append(self._cap_counter(account, now))
        # One expiry for all the counters, the latest: a reconcile adjusts them together.
        expires_at = max(counter.renews for counter in counters) + _KEEP_AFTER_MONTH
        return counters, expires_at

    def _reservations(
        self, counters: Sequence[_Counter], amount: float, overdraft: bool, expires_at: float
    ) -> tuple[Reservation, ...]:
        reservations = []
        for counter in counters:
            limit, past = counter.limit, self._past(counter, overdraft)
            ceiling = None if limit is None or past is None else limit + past + SLACK
            reservations.append(Reservation(counter.key, amount, ceiling, expires_at))
        return tuple(reservations)

    def _counters(self, tenant: Hashable | None, now: float) -> list[_Counter]:
        month, renews = month_window(now, self._zone)
        counters = [_Counter("budget", f"budget:{month}", self._monthly, renews)]
        tenant = tenant_id(tenant)
        if tenant is not None:
            counters.append(
                _Counter(
                    "tenant_budget",
                    f"budget:{month}:tenant:{tenant}",
                    self._tenants.get(tenant),
                    renews,
                )
            )
        return counters

    def _cap_counter(self, account: str, now: float) -> _Counter:
        month, renews = month_window(now, _CAP_ZONE)
        return _Counter(
            "upstream_cap", f"cap:{month}:{account}", self._caps[account], renews, account
        )

    async def _take(self, asked: BudgetAsk) -> tuple[str, ...]:
        # All or none (one transaction or script where the store can): nothing to roll back.
        refused = await reserve_all(self._store, asked.reservations)
        if refused is not None:
            raise self.refused(asked, refused)
        return tuple(counter.key for counter in asked.counters)

    def _past(self, counter: _Counter, overdraft: bool) -> float | None:
        """Dollars ``counter`` may go past its limit (None: no ceiling; a cap: never past)."""
        if counter.limit is None:
            return None
        return self._overdraft if overdraft and counter.account is None else 0.0

    def _refusal(
        self,
        counter: _Counter,
        limit: float,
        past: float | None,
        amount: float,
        now: float,
        tenant: Hashable | None,
    ) -> BudgetExceededError:
        if counter.account is not None:
            return UpstreamCapError(
                f"The monthly cap of {money(limit)} on {counter.account} cannot pay "
                f"{money(amount)} more this month (UTC); its provider would refuse it.",
                account=counter.account,
                cap=limit,
                tenant=tenant,
                retry_after=counter.renews - now,
            )
        owner = "The global" if counter.dimension == "budget" else f"Tenant {tenant}'s"
        beyond = f", even {money(past)} past it" if past else ""
        return BudgetExceededError(
            f"{owner} monthly budget of {money(limit)} cannot pay "
            f"{money(amount)} more this month{beyond}.",
            tenant=tenant,
            retry_after=counter.renews - now,
        )

    async def _add_all(self, keys: Sequence[str], delta: float, expires_at: float) -> None:
        """``delta`` on every counter, together (a store that pipelines the calls of one
        turn, as Redis's does, sends them in one round trip); each applies or fails on its
        own, and the first failure is raised once all were tried."""
        if len(keys) == 1:
            await self._store.add(keys[0], delta, expires_at=expires_at)
            return
        outcomes = await asyncio.gather(
            *(self._store.add(key, delta, expires_at=expires_at) for key in keys),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _refund_orphan(
        self, task: asyncio.Task[tuple[str, ...]], amount: float, expires_at: float
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # nothing was reserved, or _take already rolled back
        self._spawn(self._add_all(task.result(), -amount, expires_at)).add_done_callback(
            _log_lost_refund
        )

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _adjust(self, keys: tuple[str, ...], delta: float, expires_at: float) -> None:
        # Shielded: a caller cancelled mid-refund must not leave the counters half-adjusted.
        await asyncio.shield(self._spawn(self._add_all(keys, delta, expires_at)))

    def __repr__(self) -> str:
        monthly = "unlimited" if self._monthly is None else f"${self._monthly:g}"
        caps = f" caps={len(self._caps)}" if self._caps else ""
        return (
            f"<BudgetGuard monthly={monthly} tenant_budgets={len(self._tenants)}{caps} "
            f"open={self._open} timezone={self._zone.key!r}>"
        )


@dataclass(frozen=True, slots=True)
class _Counter:
    """One monthly counter a request is held against, and its limit (None: counted only)."""

    dimension: str  # "budget", "tenant_budget", "upstream_cap"
    key: str
    limit: float | None
    renews: float  # Unix time its month ends
    account: str | None = None  # a cap's account


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """A request's budget reservation asked but not yet made (see ``BudgetGuard.ask``)."""

    counters: tuple[_Counter, ...]
    reservations: tuple[Reservation, ...]
    amount: float
    tenant: Hashable | None
    overdraft: bool
    expires_at: float
    now: float


class BudgetReservation:
    """Dollars held against the budgets for one request, until its real cost is known.

    End it exactly once: :meth:`reconcile` with the real cost once the reply's usage is
    known, or :meth:`cancel` if the request was never sent.

    Attributes:
        amount: the dollars reserved.
        tenant: whose budget it was also held against (None: only the global one).
    """

    __slots__ = ("_ended", "_expires_at", "_guard", "_keys", "amount", "tenant")

    def __init__(
        self,
        guard: BudgetGuard,
        keys: tuple[str, ...],
        amount: float,
        *,
        tenant: Hashable | None,
        expires_at: float,
    ) -> None:
        self._guard = guard
        self._keys = keys
        self._expires_at = expires_at
        self._ended = False
        self.amount = amount
        self.tenant = tenant

    async def reconcile(self, actual: float) -> None:
        """Settle at the real cost: refund what was over-reserved or charge what was under.

        A charge is applied even past the budget: the money is already spent.

        Raises:
            RuntimeError: the reservation was already reconciled or cancelled.
            ValueError: ``actual`` negative or not finite.
        """
        _check_dollars("actual", actual)
        self._end()
        if actual != self.amount:
            await self._guard._adjust(self._keys, actual - self.amount, self._expires_at)

    async def cancel(self) -> None:
        """Refund the whole reservation: the request was never sent.

        Raises:
            RuntimeError: the reservation was already reconciled or cancelled.
        """
        self._end()
        if self.amount:
            await self._guard._adjust(self._keys, -self.amount, self._expires_at)

    def _end(self) -> None:
        if self._ended:
            raise RuntimeError("This budget reservation has already been reconciled or cancelled.")
        self._ended = True
        self._guard._open -= 1

    def __repr__(self) -> str:
        state = "ended" if self._ended else "open"
        return f"<BudgetReservation ${self.amount:.6g} tenant={self.tenant!r} {state}>"


def _log_lost_refund(task: asyncio.Task[None]) -> None:
    # Nobody awaits an orphan's refund: a refusal of the store is logged, not lost unread.
    if not task.cancelled() and isinstance(task.exception(), StoreUnavailableError):
        logger.warning("%s A budget refund was dropped.", task.exception())


def _check_dollars(field: str, value: float) -> None:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{field} must be a finite number of dollars >= 0, not {value!r}.")


def _check_budget(field: str, value: float) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{field} must be a finite number of dollars > 0, not {value!r}.")


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
