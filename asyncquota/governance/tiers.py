"""Tenant tiers: each tenant's own limits on requests per minute, per day, tokens.

A ``Tier`` names limits per model (``TierLimits``: RPM, RPD, TPM, any may be absent) and,
beside them, limits ``shared`` by every model of the tier, so a request that falls back to
another model spends the same allowance rather than a fresh one. ``TenantQuotas`` maps
tenants to tiers and admits a request against the tenant's limits for that model and the
shared ones, all or nothing, before it joins any queue: a tenant over its own quota is
told at once with ``TenantLimitError`` and a ``retry_after`` (it is their quota, not
congestion). Counters live in a ``Store``, so with ``SQLiteStore`` a tenant's day survives a
restart. Tiers and membership can be replaced while requests run (``TenantQuotas.reload``).

A tenant is known by one identity, :func:`tenant_id`: a string as given, an integer as its
decimal string (``42`` and ``"42"`` are the same tenant), None for a request that names no
tenant (the default tier's, when there is one, all such requests counted together).

Minute windows (RPM, TPM) slide, approximately, as Cloudflare's rate limiter does: two fixed
one-minute counters, and the previous minute's count is taken in proportion to the part of
it still inside the last 60 s (``previous × (1 - elapsed / 60) + current``), as if its uses
had been spread evenly over it. So a tenant cannot spend its minute at 0:59 and again at
1:00 (the 2× burst of fixed windows), at the cost of memory of two counters per window.
The approximation errs both ways by at most the unevenness of the previous minute.

Day windows (RPD) are calendar days in the configured time zone (default UTC): the count
resets at that zone's midnight, so a day may last 23 or 25 hours where clocks change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import StoreUnavailableError, TenantLimitError
from ..priority import Priority
from .store import MemoryStore, Reservation, Store, reserve_all

__all__ = [
    "DimensionStatus",
    "TenantGrant",
    "TenantQuotas",
    "Tier",
    "TierLimits",
    "tenant_id",
    "zone",
]

logger = logging.getLogger("asyncquota.governance")

MINUTE = 60.0

MINUTE_SLACK = 1e-8
"""Share of a minute limit forgiven to float rounding: Unix times carry ~0.2 µs of rounding,
which would otherwise refuse a caller that waited exactly ``retry_after``."""

EXPIRY_MARGIN = 3600.0
"""Seconds a day counter is kept past its day (a minute counter: one minute past its use)."""


def _check_limit(owner: str, field: str, value: float | None) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
        or value != int(value)
    ):
        # Requests and tokens are counted one by one: a limit of 0.5 would refuse them all.
        raise ValueError(f"{owner}.{field} must be a positive whole number or None, not {value!r}.")


@dataclass(frozen=True, slots=True)
class TierLimits:
    """One model's limits in a tier; None means that dimension is unlimited.

    Attributes:
        rpm: requests per minute (a sliding minute, see ``TenantQuotas``).
        rpd: requests per day (the calendar day in the configured time zone).
        tpm: tokens per minute (the request's estimate, reconciled with the real usage).

    Raises:
        ValueError: a limit that is not a positive whole number (naming the field); a
            float such as ``600.0`` is whole.
    """

    rpm: float | None = None
    rpd: float | None = None
    tpm: float | None = None

    def __post_init__(self) -> None:
        for field in ("rpm", "rpd", "tpm"):
            _check_limit("TierLimits", field, getattr(self, field))

    @property
    def unlimited(self) -> bool:
        """True when no dimension has a limit (admission then costs nothing)."""
        return self.rpm is None and self.rpd is None and self.tpm is None


UNLIMITED = TierLimits()


def tenant_id(tenant: object) -> str | None:
    """The one identity of a tenant, under which its tier and counters are found.

    The rule: a string is itself; an integer is its decimal string, so ``42`` and ``"42"``
    are the same tenant (a TOML key, a header, a database id all end up as one); None is
    no tenant. Nothing else is guessed at: a float (is ``42.0`` tenant ``"42"``?), a bool,
    bytes or a tuple is refused, as is the empty string.

    Raises:
        TypeError: a tenant that is not a str, an int or None.
        ValueError: the empty string.
    """
    if tenant is None:
        return None
    if isinstance(tenant, str):
        if not tenant:
            raise ValueError("A tenant id must not be empty; use None for no tenant.")
        return str(tenant)  # str(): a subclass (a StrEnum member) as its text
    if isinstance(tenant, int) and not isinstance(tenant, bool):
        return str(int(tenant))  # int(): an IntEnum member as its number, not its name
    raise TypeError(
        f"A tenant id must be a str, an int or None, not {type(tenant).__name__} "
        f"({tenant!r}); tenants are told apart by text, and an int by its decimal string."
    )


@dataclass(frozen=True, slots=True)
class Tier:
    """A named set of limits that tenants subscribe to: per model, and shared by all.

    A request on a model counts against the model's own limits and against ``shared``:
    with ``models={"*": TierLimits(rpm=20)}`` and ``shared=TierLimits(rpd=200)``, a tenant
    sends 20 a minute to each model but 200 a day in all, so falling back to another
    model does not open a fresh day.

    Attributes:
        name: the tier's name, as tenants refer to it.
        models: model name → its limits; the key ``"*"`` applies to every model not named
            (to each on its own). A model neither named nor covered by ``"*"`` has no
            limits of its own. Copied read-only.
        shared: limits on the tier's models together (default: none).

    Raises:
        ValueError: an empty name, or limits that are not a ``TierLimits``.
    """

    name: str
    models: Mapping[str, TierLimits]
    shared: TierLimits = UNLIMITED

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A tier's name must be a non-empty string, not {self.name!r}.")
        for model, limits in self.models.items():
            if not isinstance(model, str) or not model:
                raise ValueError(
                    f"Tier {self.name!r} has a model key {model!r}; use a model name or '*'."
                )
            if not isinstance(limits, TierLimits):
                raise ValueError(
                    f"Tier {self.name!r}: the limits of model {model!r} must be a "
                    f"TierLimits, not {type(limits).__name__}."
                )
        if not isinstance(self.shared, TierLimits):
            raise ValueError(
                f"Tier {self.name!r}: its shared limits must be a TierLimits, not "
                f"{type(self.shared).__name__}."
            )
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    def limits_for(self, model: str) -> TierLimits:
        """The limits that apply to ``model``: its own, else ``"*"``'s, else none."""
        limits = self.models.get(model)
        if limits is None:
            limits = self.models.get("*", UNLIMITED)
        return limits


@dataclass(frozen=True, slots=True)
class DimensionStatus:
    """Where one quota dimension stands: used, limit, what remains and when it frees.

    Attributes:
        dimension: ``"rpm"``, ``"rpd"``, ``"tpm"`` (a tier's limits on one model),
            ``"tier_rpm"``, ``"tier_rpd"``, ``"tier_tpm"`` (its limits shared by all
            models), ``"budget"``, ``"tenant_budget"``, ...
        used: what is counted in the current window.
        limit: the limit, or None when the dimension is unlimited.
        remaining: ``limit - used`` (never below 0), or None when unlimited.
        resets_at: Unix time the window frees (for minute windows, the end of the current
            one-minute counter, when the previous minute's uses have all left the window),
            or None when unlimited.
    """

    dimension: str
    used: float
    limit: float | None
    remaining: float | None
    resets_at: float | None


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``"UTC"``, ``"Asia/Shanghai"``, ``"Europe/Paris"``).

    Raises:
        ValueError: not a known IANA time zone name.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ValueError(
            f"timezone must be an IANA time zone name such as 'UTC' or 'Europe/Paris', "
            f"not {name!r}."
        ) from None


def _day(now: float, tz: ZoneInfo) -> tuple[str, float]:
    """The calendar day containing ``now`` in ``tz`` (ISO date) and when it ends (Unix)."""
    today = datetime.fromtimestamp(now, tz).date()
    tomorrow = today + timedelta(days=1)
    # A midnight that a DST jump skips maps to the jump itself: the day starts then.
    end = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=tz).timestamp()
    return today.isoformat(), end


def _round_up_ms(seconds: float) -> float:
    """Whole milliseconds, rounded up, ignoring float dust (30.999999999996 → 31.0)."""
    return max(0.0, math.ceil(seconds * 1000 - 1e-6) / 1000)


@dataclass(frozen=True, slots=True)
class _Window:
    """One limited dimension of one request at one instant: where it counts and how."""

    dimension: str
    limit: float
    amount: float
    now: float
    key: str
    expires_at: float
    resets_at: float
    previous_key: str | None  # minute windows only: the previous minute's counter

    @property
    def previous_weight(self) -> float:
        """The share of the previous minute still inside the last 60 s."""
        return (self.resets_at - self.now) / MINUTE

    def used(self, previous: float, current: float) -> float:
        """The window's count now (the sliding estimate for minute windows)."""
        return previous * self.previous_weight + current

    def allowance(self, previous: float) -> float:
        """The most the current counter may hold with this request added."""
        if self.previous_key is None:
            return self.limit
        return self.limit * (1 + MINUTE_SLACK) - previous * self.previous_weight

    def wait(self, previous: float, current: float) -> float | None:
        """Seconds until this request fits if nothing else changes; None: it never will."""
        if self.amount > self.limit:
            return None
        if current + self.amount <= self.allowance(previous):
            return 0.0
        if self.previous_key is None:
            return self.resets_at - self.now
        room = self.limit - current - self.amount
        if room >= 0:
            # The previous minute's share shrinks to ``room`` before this minute ends.
            fits_at = self.resets_at - room / previous * MINUTE
        else:
            # This minute's count must first become the previous one, then shrink in turn.
            fits_at = self.resets_at + MINUTE - (self.limit - self.amount) / current * MINUTE
        return fits_at - self.now


_Charge = tuple[str, float, float]  # (key, amount, expires_at): one change to one counter

SHARED_PREFIX = "tier_"
"""Prefix of the dimensions of a tier's shared limits (``tier_rpd``), beside ``rpd``."""

_TOKEN_DIMENSIONS = frozenset({"tpm", SHARED_PREFIX + "tpm"})


@dataclass(frozen=True, slots=True)
class TierAsk:
    """A tenant's admission asked but not yet reserved (see ``TenantQuotas.ask``)."""

    tenant: str | None
    tier: Tier
    model: str
    tokens: float
    windows: tuple[_Window, ...]
    reservations: tuple[Reservation, ...]
    priority: Priority | int | None


class TenantGrant:
    """A request's admission against its tenant's tier (from ``TenantQuotas.admit``):
    settle it once, when the request ends.

    ``reconcile(actual_tokens)`` when the upstream reports the real usage (the tokens
    counted at admission are refunded or topped up), or ``cancel()`` when the request was
    never sent (the request and its tokens are refunded). A grant for a tenant without
    limits changes nothing but still ends once. A grant settles the counters it was
    admitted on, even after ``TenantQuotas.reload`` changed the tenant's tier.

    Attributes:
        tenant: the tenant admitted, as :func:`tenant_id` reads it (None for none).
        model: the model it was admitted for.
        tokens: the tokens counted at admission.
    """

    __slots__ = ("_charges", "_ended", "_quotas", "_tpm", "model", "tenant", "tokens")

    def __init__(
        self,
        quotas: TenantQuotas,
        tenant: str | None,
        model: str,
        tokens: float,
        charges: tuple[_Charge, ...],
        tpm: tuple[_Charge, ...],
    ) -> None:
        self._quotas = quotas
        self.tenant = tenant
        self.model = model
        self.tokens = tokens
        self._charges = charges
        self._tpm = tpm
        self._ended = False

    async def reconcile(self, actual_tokens: float) -> None:
        """Count ``actual_tokens`` instead of the estimate against tokens per minute.

        The difference goes to the minute the request was admitted in (of the model's
        limit and of the tier's shared one), so an estimate that was too high frees room
        at once.

        Raises:
            ValueError: ``actual_tokens`` not a finite number >= 0.
            RuntimeError: the grant has already ended.
        """
        _check_tokens(actual_tokens, "actual_tokens")
        self._end()
        if actual_tokens != self.tokens:
            difference = actual_tokens - self.tokens
            await self._quotas._settle(tuple((key, difference, exp) for key, _, exp in self._tpm))

    async def cancel(self) -> None:
        """The request was never sent: give back the request and its tokens.

        Raises:
            RuntimeError: the grant has already ended.
        """
        self._end()
        await self._quotas._settle(tuple((key, -amount, exp) for key, amount, exp in self._charges))

    @property
    def ended(self) -> bool:
        """True once ``reconcile`` or ``cancel`` has been called."""
        return self._ended

    def _end(self) -> None:
        if self._ended:
            raise RuntimeError(
                f"This grant for tenant {self.tenant!r} on {self.model!r} has already ended; "
                "reconcile or cancel it once."
            )
        self._ended = True
        if self._charges:
            self._quotas._open -= 1

    def __repr__(self) -> str:
        state = "ended" if self._ended else "open"
        return (
            f"<TenantGrant tenant={self.tenant!r} model={self.model!r} "
            f"tokens={self.tokens:g} {state}>"
        )


def _check_tokens(tokens: float, name: str) -> None:
    if (
        isinstance(tokens, bool)
        or not isinstance(tokens, int | float)
        or not math.isfinite(tokens)
        or tokens < 0
    ):
        raise ValueError(f"{name} must be a finite number of tokens >= 0, not {tokens!r}.")


_UNITS = {"rpm": "requests per minute", "rpd": "requests per day", "tpm": "tokens per minute"}


@dataclass(frozen=True, slots=True)
class _Plan:
    """Tiers, membership and the days' zone: checked whole, replaced whole, read once a call."""

    tiers: Mapping[str, Tier]
    members: Mapping[str, Tier]
    default: Tier | None
    zone: ZoneInfo

    @classmethod
    def build(
        cls,
        tiers: Sequence[Tier],
        tenants: Mapping[Hashable, str],
        default_tier: str | None,
        timezone: str,
    ) -> _Plan:
        by_name: dict[str, Tier] = {}
        for index, tier in enumerate(tiers):
            if not isinstance(tier, Tier):
                raise ValueError(f"tiers[{index}] must be a Tier, not {type(tier).__name__}.")
            if tier.name in by_name:
                raise ValueError(f"tiers[{index}] repeats the tier name {tier.name!r}.")
            by_name[tier.name] = tier
        known = ", ".join(repr(name) for name in by_name) or "none"
        members: dict[str, Tier] = {}
        for tenant, name in tenants.items():
            who = tenant_id(tenant)
            if who is None:
                raise ValueError(
                    "tenants lists None; requests naming no tenant take the default_tier."
                )
            if name not in by_name:
                raise ValueError(
                    f"Tenant {who!r} is assigned to unknown tier {name!r}; known tiers: {known}."
                )
            if members.get(who, by_name[name]) is not by_name[name]:
                raise ValueError(
                    f"Tenant {who!r} is listed twice (as {tenant!r} too), in tiers "
                    f"{members[who].name!r} and {name!r}; an int and its decimal string "
                    "are one tenant."
                )
            members[who] = by_name[name]
        if default_tier is not None and default_tier not in by_name:
            raise ValueError(
                f"default_tier {default_tier!r} is not a known tier; known tiers: {known}."
            )
        return cls(
            tiers=MappingProxyType(by_name),
            members=MappingProxyType(members),
            default=None if default_tier is None else by_name[default_tier],
            zone=zone(timezone),
        )

    def tier_of(self, tenant: str | None) -> Tier | None:
        tier = None if tenant is None else self.members.get(tenant)
        return self.default if tier is None else tier


class TenantQuotas:
    """Each tenant's tier limits: admits requests all or nothing, or refuses them.

    ``admit`` counts one request against RPM and RPD and the request's token estimate
    against TPM, for that tenant, on the model's own limits and on the tier's shared ones,
    and returns a ``TenantGrant`` to settle when the request ends. Over any limit it
    refuses at once with ``TenantLimitError`` carrying the dimension (``"rpd"``, or
    ``"tier_rpd"`` for a shared limit) and a ``retry_after``: the seconds until that
    window frees enough for this request if nothing else changes, computed from the same
    sliding estimate that admits (so a caller that waits it is admitted), rounded up to the
    millisecond. For a minute window it is at most 60 s plus the request's share of the
    limit (60 × amount / limit): a minute spent entirely in its first second is still
    counted whole at the next minute's start, and leaves evenly from then. When several
    limits refuse, the longest wait is reported. A request larger than a limit can never
    pass: its ``retry_after`` is None.

    Admission reserves the dimensions together with the store's ``reserve_all``: in one
    transaction on ``SQLiteStore``, one script on ``RedisStore``, so no other process sees
    part of a request counted. ``MemoryStore`` (and a store of the application's own
    without ``reserve_all``) reserves them one by one and, when one refuses, refunds the
    ones it took: counters can be high for a moment, never past a limit, and a concurrent
    request may be refused in that moment.

    Tenants are told apart by :func:`tenant_id` (``42`` and ``"42"`` are one tenant), at
    every entry: the constructor's and ``reload``'s ``tenants``, ``admit``, ``status``,
    ``tier_of``. A tenant not listed, and a request naming no tenant (None), take
    ``default_tier``; without one they are unlimited. All requests naming no tenant share
    one set of counters.

    Counters are kept in ``store`` under ``tier:{tenant}:{model}:{dimension}:{window}``
    (tenant and model percent-encoded, ``*`` for no tenant and for the shared limits;
    window = the Unix minute number, or the ISO date in the time zone), so they are shared
    by every ``TenantQuotas`` on the same store and, with ``SQLiteStore``, survive a
    restart. The store is not closed by this object (others may share it).

    Args:
        tiers: the tiers, with unique names.
        tenants: tenant → the name of its tier.
        default_tier: the tier of tenants not listed and of requests naming no tenant
            (None: they are unlimited).
        store: where counters live (default: a new ``MemoryStore``).
        timezone: the IANA zone whose midnight ends a tenant's day (default UTC); it may
            differ from the budget's, whose months are another matter.
        wall_clock: Unix time; the only clock read.

    Raises:
        ValueError: duplicate tier names, a tenant or ``default_tier`` naming an unknown
            tier, a tenant listed twice in different tiers (``42`` and ``"42"``), None or
            ``""`` as a tenant, or an unknown time zone.
        TypeError: a tenant that is not a str or an int.
    """

    __slots__ = (
        "_admitted",
        "_open",
        "_plan",
        "_refused",
        "_settling",
        "_store",
        "_wall_clock",
    )

    def __init__(
        self,
        *,
        tiers: Sequence[Tier],
        tenants: Mapping[Hashable, str],
        default_tier: str | None = None,
        store: Store | None = None,
        timezone: str = "UTC",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._plan = _Plan.build(tiers, tenants, default_tier, timezone)
        if not callable(wall_clock):
            raise ValueError("wall_clock must be a callable returning Unix time in seconds.")
        self._wall_clock = wall_clock
        self._store: Store = store if store is not None else MemoryStore(wall_clock=wall_clock)
        self._settling: set[asyncio.Task[None]] = set()
        self._admitted = 0
        self._refused = 0
        self._open = 0

    @property
    def default_tier(self) -> str | None:
        """The name of the tier of unlisted tenants and of no tenant (None: unlimited)."""
        default = self._plan.default
        return None if default is None else default.name

    @property
    def timezone(self) -> str:
        """The IANA zone whose midnight ends a tenant's day."""
        return self._plan.zone.key

    @property
    def store(self) -> Store:
        """Where the counters live (a guard or quotas on the same store share them)."""
        return self._store

    def reload(
        self,
        *,
        tiers: Sequence[Tier],
        tenants: Mapping[Hashable, str],
        default_tier: str | None = None,
        timezone: str | None = None,
    ) -> None:
        """Replace the tiers, the membership and the default tier at once, while running.

        Everything is checked first, as the constructor checks it; on any error nothing
        changes. Then the new set replaces the old in one step: an admission or a status
        reads the one or the other, never a mix. Counters are kept by tenant, model and
        window, not by tier, so what a tenant has used this minute and today still counts
        against whatever limits it has now (a tenant moved from free to pro keeps its 150
        requests of today against pro's 2 000); a limit that no longer exists is no longer
        read, and its counters expire. Grants in flight settle the counters they were
        admitted on, whatever the new tiers say. The store, the clock and the statistics
        stay.

        Args:
            tiers, tenants, default_tier: as for the constructor (the whole new set, not
                changes to the old one).
            timezone: the zone of tenants' days (None: keep the current one). A new zone
                counts days under the new zone's date from now on, so today's RPD count
                starts afresh when the date differs there.

        Raises:
            ValueError, TypeError: as the constructor's; the old configuration stays.
        """
        zone_name = self._plan.zone.key if timezone is None else timezone
        self._plan = _Plan.build(tiers, tenants, default_tier, zone_name)

    def tier_of(self, tenant: Hashable | None) -> Tier | None:
        """The tier ``tenant`` belongs to: its own, else the default (also for None);
        None: no limits.

        Raises:
            TypeError, ValueError: ``tenant`` is not a tenant id (see :func:`tenant_id`).
        """
        return self._plan.tier_of(tenant_id(tenant))

    async def admit(
        self,
        tenant: Hashable | None,
        model: str,
        tokens: float,
        *,
        priority: Priority | int | None = None,
    ) -> TenantGrant:
        """Count one request and ``tokens`` for ``tenant`` on ``model``, or refuse it whole.

        A tenant without a tier, or whose tier puts no limit on ``model`` and none shared,
        gets a grant that changes nothing (no store call). Safe under cancellation: a
        cancelled admission gives back whatever it had counted.

        Raises:
            TenantLimitError: over a limit; nothing is counted. ``dimension`` names the
                limit, ``retry_after`` the seconds until it frees enough (None: never).
            ValueError: ``tokens`` not a finite number >= 0, or the empty tenant.
            TypeError: ``tenant`` is neither a str, an int nor None.
        """
        asked = await self.ask(tenant, model, tokens, priority=priority)
        if isinstance(asked, TenantGrant):
            return asked
        # All or none; a cancelled admission leaves nothing counted (the store sees to it).
        refused = await reserve_all(self._store, asked.reservations)
        if refused is not None:
            raise await self.refused(asked, refused)
        return self.granted(asked)

    async def ask(
        self,
        tenant: Hashable | None,
        model: str,
        tokens: float,
        *,
        priority: Priority | int | None = None,
    ) -> TenantGrant | TierAsk:
        """``admit`` up to its reservation: what to reserve on the store (a ``TierAsk``),
        or at once a grant that changes nothing (no limit applies: no store call).

        For a caller that reserves these with others in one ``reserve_all`` (a Gateway
        with its budget on the same store): then ``granted(ask)``, or ``refused(ask, i)``
        with the index of the refused reservation among ``ask.reservations``.

        Raises:
            ValueError, TypeError: as ``admit``.
        """
        _check_tokens(tokens, "tokens")
        who = tenant_id(tenant)
        plan = self._plan
        tier = plan.tier_of(who)
        windows = [] if tier is None else self._windows(who, model, tier, tokens, plan.zone)
        if tier is None or not windows:
            self._admitted += 1
            return TenantGrant(self, who, model, tokens, (), ())
        keys = [w.previous_key for w in windows if w.previous_key is not None]
        previous = dict(zip(keys, await self._store.get(keys), strict=True))
        reservations = tuple(
            Reservation(
                window.key,
                window.amount,
                window.allowance(previous.get(window.previous_key or "", 0.0)),
                window.expires_at,
            )
            for window in windows
        )
        return TierAsk(who, tier, model, tokens, tuple(windows), reservations, priority)

    def granted(self, asked: TierAsk) -> TenantGrant:
        """The grant of an ask whose reservations were all made."""
        self._admitted += 1
        self._open += 1
        taken = tuple((item.key, item.amount, item.expires_at) for item in asked.reservations)
        tpm = tuple(
            charge
            for charge, window in zip(taken, asked.windows, strict=True)
            if window.dimension in _TOKEN_DIMENSIONS
        )
        return TenantGrant(self, asked.tenant, asked.model, asked.tokens, taken, tpm)

    async def refused(self, asked: TierAsk, index: int) -> TenantLimitError:
        """The error of an ask whose reservation ``index`` was refused (nothing counted)."""
        self._refused += 1
        windows = asked.windows
        return await self._refusal(
            asked.tenant, asked.tier, asked.model, windows, windows[index], asked.priority
        )

    async def status(self, tenant: Hashable | None, model: str) -> list[DimensionStatus]:
        """Used, limit, remaining and reset time of each limited dimension on ``model``.

        The model's own limits come first (``rpm``, ``rpd``, ``tpm``), then the tier's
        shared ones (``tier_rpm``, ``tier_rpd``, ``tier_tpm``). Dimensions without a limit
        are left out: a tenant with no limits on ``model`` gets an empty list. A minute
        window's ``used`` is the sliding estimate (fractional).

        Raises:
            TypeError, ValueError: ``tenant`` is not a tenant id (see :func:`tenant_id`).
        """
        who = tenant_id(tenant)
        plan = self._plan
        tier = plan.tier_of(who)
        windows = [] if tier is None else self._windows(who, model, tier, 0.0, plan.zone)
        counts = await self._counts(windows)
        statuses = []
        for window, (previous, current) in zip(windows, counts, strict=True):
            used = window.used(previous, current)
            statuses.append(
                DimensionStatus(
                    dimension=window.dimension,
                    used=used,
                    limit=window.limit,
                    remaining=max(0.0, window.limit - used),
                    resets_at=window.resets_at,
                )
            )
        return statuses

    def _windows(
        self, tenant: str | None, model: str, tier: Tier, tokens: float, tz: ZoneInfo
    ) -> list[_Window]:
        """The limited windows of a request made now: the model's rpm, rpd, tpm, then the
        tier's shared ones."""
        now = self._wall_clock()
        who = "*" if tenant is None else quote(tenant, safe="")
        minute = math.floor(now / MINUTE)
        minute_end = (minute + 1) * MINUTE

        def minute_window(
            prefix: str, scope: str, dimension: str, limit: float, amount: float
        ) -> _Window:
            return _Window(
                dimension=scope + dimension,
                limit=limit,
                amount=amount,
                now=now,
                key=f"{prefix}:{dimension}:{minute}",
                # Read as "this minute", then as "the previous minute", then a margin.
                expires_at=minute_end + 2 * MINUTE,
                resets_at=minute_end,
                previous_key=f"{prefix}:{dimension}:{minute - 1}",
            )

        windows: list[_Window] = []
        for prefix, scope, limits in (
            (f"tier:{who}:{quote(model, safe='')}", "", tier.limits_for(model)),
            (f"tier:{who}:*", SHARED_PREFIX, tier.shared),
        ):
            if limits.rpm is not None:
                windows.append(minute_window(prefix, scope, "rpm", limits.rpm, 1.0))
            if limits.rpd is not None:
                day, day_end = _day(now, tz)
                windows.append(
                    _Window(
                        dimension=scope + "rpd",
                        limit=limits.rpd,
                        amount=1.0,
                        now=now,
                        key=f"{prefix}:rpd:{day}",
                        expires_at=day_end + EXPIRY_MARGIN,
                        resets_at=day_end,
                        previous_key=None,
                    )
                )
            if limits.tpm is not None:
                windows.append(minute_window(prefix, scope, "tpm", limits.tpm, tokens))
        return windows

    async def _counts(self, windows: Sequence[_Window]) -> list[tuple[float, float]]:
        """(previous, current) counter values of each window, in one store call."""
        keys: list[str] = []
        for window in windows:
            keys.extend((window.previous_key or window.key, window.key))
        values = await self._store.get(keys) if keys else []
        return [
            (values[2 * i] if window.previous_key is not None else 0.0, values[2 * i + 1])
            for i, window in enumerate(windows)
        ]

    async def _refusal(
        self,
        tenant: str | None,
        tier: Tier,
        model: str,
        windows: Sequence[_Window],
        refused: _Window,
        priority: Priority | int | None,
    ) -> TenantLimitError:
        """The error for a refusal, naming the limit with the longest wait (fresh counts)."""
        waits = {
            window.dimension: window.wait(*counts)
            for window, counts in zip(windows, await self._counts(windows), strict=True)
        }
        worst, worst_wait = refused, waits[refused.dimension]
        for window in windows:
            wait = waits[window.dimension]
            if worst_wait is not None and (wait is None or wait > worst_wait):
                worst, worst_wait = window, wait
        shared = worst.dimension.startswith(SHARED_PREFIX)
        limit = f"{worst.limit:g} {_UNITS[worst.dimension.removeprefix(SHARED_PREFIX)]}"
        if shared:
            limit += " across all models of its tier"
        who = "Requests naming no tenant" if tenant is None else f"Tenant {tenant!r}"
        who += f" (tier {tier.name!r})"
        verb, their = ("are", "their") if tenant is None else ("is", "its")
        if worst_wait is None:
            message = (
                f"{who} can never send this request to {model!r}: it needs "
                f"{worst.amount:g}, more than {their} limit of {limit}."
            )
            retry_after = None
        else:
            retry_after = _round_up_ms(worst_wait)
            where = "" if shared else f" on {model!r}"
            message = (
                f"{who} {verb} over {their} limit of {limit}{where}; "
                f"try again in {retry_after:g} s."
            )
        return TenantLimitError(
            message,
            dimension=worst.dimension,
            model=model,
            tenant=tenant,
            priority=priority,
            retry_after=retry_after,
        )

    async def _settle(self, changes: tuple[_Charge, ...]) -> None:
        """Apply counter changes (refunds, top-ups), even if the caller is cancelled meanwhile."""
        if not changes:
            return
        task = asyncio.ensure_future(self._apply(changes))
        self._settling.add(task)
        task.add_done_callback(self._settled)
        await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        # A caller cancelled meanwhile never reads the outcome; a refusal of the store is
        # then logged here rather than lost as "never retrieved".
        if not task.cancelled() and isinstance(task.exception(), StoreUnavailableError):
            logger.warning("%s A tier counter change was dropped.", task.exception())

    async def _apply(self, changes: tuple[_Charge, ...]) -> None:
        for key, amount, expires_at in changes:
            await self._store.add(key, amount, expires_at=expires_at)

    def __repr__(self) -> str:
        plan = self._plan
        return (
            f"<TenantQuotas tiers={len(plan.tiers)} tenants={len(plan.members)} "
            f"admitted={self._admitted} refused={self._refused} open={self._open}>"
        )
