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

The period is the calendar month in the configured time zone: counters are keyed by month
(``budget:2026-03`` and ``budget:2026-03:tenant:acme``, tenants by :func:`~.tiers.tenant_id`:
``42`` and ``"42"`` are one tenant with one budget and one counter), so a
new month starts at zero without anyone resetting anything, and a reservation reconciles
against the month it was made in. Time comes only from the injected ``wall_clock``.

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

from ..errors import BudgetExceededError, StoreUnavailableError
from .store import MemoryStore, Store
from .tiers import DimensionStatus, tenant_id, zone

__all__ = ["SLACK", "BudgetGuard", "BudgetReservation", "Price", "money", "month_window"]

logger = logging.getLogger("asyncquota.governance")

SLACK = 1e-9
"""Dollars a budget admits past its limit, to absorb floating-point drift in sums."""

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

    Raises:
        ValueError: a budget that is not a finite number > 0, two keys naming one tenant
            (``42`` and ``"42"``), or an unknown time zone.
        TypeError: a key that is not a tenant id (see :func:`~.tiers.tenant_id`).
    """

    __slots__ = (
        "_background",
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

    async def remaining(self, tenant: Hashable | None) -> float | None:
        """Dollars left this month: the smaller of the global and the tenant's (None: unlimited)."""
        if self._monthly is None and self._tenants.get(tenant_id(tenant) or "") is None:
            return None
        left = [s.remaining for s in await self.status(tenant) if s.remaining is not None]
        return min(left)

    async def status(self, tenant: Hashable | None) -> list[DimensionStatus]:
        """This month's spend against each budget that concerns ``tenant``.

        Returns:
            ``"budget"`` (global) first, then ``"tenant_budget"`` when a tenant is given.
            ``remaining`` never goes below 0 (an overdraft shows as ``used > limit``);
            ``resets_at`` is the start of next month, None where there is no limit.
        """
        now = self._wall_clock()
        month, renews = month_window(now, self._zone)
        counters = self._counters(tenant, month)
        used = await self._store.get([key for _, key, _ in counters])
        return [
            DimensionStatus(
                dimension=dimension,
                used=spent,
                limit=limit,
                remaining=None if limit is None else max(0.0, limit - spent),
                resets_at=None if limit is None else renews,
            )
            for (dimension, _, limit), spent in zip(counters, used, strict=True)
        ]

    async def reserve(
        self, tenant: Hashable | None, amount: float, *, overdraft: bool = False
    ) -> BudgetReservation:
        """Reserve ``amount`` dollars against the global and the tenant's budget: both or neither.

        Args:
            tenant: whose budget also applies (None: only the global one).
            amount: the estimated cost of the request.
            overdraft: charge it even past a budget (the policy "downgrade to the cheapest
                model and keep serving" once a budget is spent), up to the guard's
                ``overdraft_limit`` past it.

        Raises:
            BudgetExceededError: either budget cannot pay for it this month (and not
                ``overdraft``); ``retry_after`` is the time until next month; nothing is
                reserved.
            ValueError: ``amount`` negative or not finite.

        Under cancellation nothing leaks: a reservation the caller did not live to receive
        is refunded in the background.
        """
        _check_dollars("amount", amount)
        now = self._wall_clock()
        month, renews = month_window(now, self._zone)
        counters = self._counters(tenant, month)
        expires_at = renews + _KEEP_AFTER_MONTH
        taking = self._spawn(
            self._take(
                counters,
                amount,
                overdraft=overdraft,
                expires_at=expires_at,
                tenant=tenant,
                retry_after=renews - now,
            )
        )
        try:
            keys = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(lambda task: self._refund_orphan(task, amount, expires_at))
            raise
        self._open += 1
        return BudgetReservation(self, keys, amount, tenant=tenant, expires_at=expires_at)

    def _counters(self, tenant: Hashable | None, month: str) -> list[tuple[str, str, float | None]]:
        counters: list[tuple[str, str, float | None]] = [
            ("budget", f"budget:{month}", self._monthly)
        ]
        tenant = tenant_id(tenant)
        if tenant is not None:
            counters.append(
                ("tenant_budget", f"budget:{month}:tenant:{tenant}", self._tenants.get(tenant))
            )
        return counters

    async def _take(
        self,
        counters: list[tuple[str, str, float | None]],
        amount: float,
        *,
        overdraft: bool,
        expires_at: float,
        tenant: Hashable | None,
        retry_after: float,
    ) -> tuple[str, ...]:
        taken: list[str] = []
        try:
            # The tenant first: its budget is the smaller one, so a refusal seldom costs a
            # rollback of the global counter.
            for dimension, key, limit in reversed(counters):
                past = (self._overdraft if overdraft else 0.0) if limit is not None else None
                ceiling = None if limit is None or past is None else limit + past + SLACK
                held = await self._store.reserve(key, amount, limit=ceiling, expires_at=expires_at)
                if held is None:
                    assert limit is not None  # only a ceiling refuses
                    owner = "The global" if dimension == "budget" else f"Tenant {tenant}'s"
                    beyond = f", even {money(past)} past it" if past else ""
                    raise BudgetExceededError(
                        f"{owner} monthly budget of {money(limit)} cannot pay "
                        f"{money(amount)} more this month{beyond}.",
                        tenant=tenant,
                        retry_after=retry_after,
                    )
                taken.append(key)
        except BaseException:
            await self._add_all(taken, -amount, expires_at)
            raise
        return tuple(taken)

    async def _add_all(self, keys: Sequence[str], delta: float, expires_at: float) -> None:
        for key in keys:
            await self._store.add(key, delta, expires_at=expires_at)

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
        return (
            f"<BudgetGuard monthly={monthly} tenant_budgets={len(self._tenants)} "
            f"open={self._open} timezone={self._zone.key!r}>"
        )


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
