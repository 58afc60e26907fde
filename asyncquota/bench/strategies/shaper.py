"""``asyncquota``: one Shaper for the process, as a chatbot server would embed it.

The benchmark runs it with its defaults (no tuning for the benchmark): each call sent with
its class (interactive or batch) and its deadline; a ``QuotaError`` is the caller's answer
("busy, try again in N s"). The tuner runs it with :data:`Options`: plain names and values
(picklable, so they cross into the run's process) that :func:`shaper_arguments` turns into
the Shaper's keyword arguments there, the limit algorithm included. In a virtual run the
Shaper talks to the in-process simulated upstream through the same stand-in for a
connection pool as the other strategies, bounded like its default transport
(``max_connections``, 100), so virtual and real runs bound what is in flight alike.

When the calls belong to tenants (the ``tiers`` scenario), the Shaper sits behind a
governance :class:`~asyncquota.governance.gateway.Gateway`, as a service selling tiers
would run it: one upstream, one model, each tenant's tier a requests-per-minute limit
(its share of the upstream's quota), each call tagged with its tenant. A tenant over its
tier is refused at once (``TenantLimitError``); within a class, the Shaper's queue takes
the tenants in turn.
"""

from __future__ import annotations

import inspect
from array import array
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Self

from ...hooks import Admitted, Event, LoggingHook
from ...limits import AIMD, Fixed, Gradient, Limit
from ...priority import describe_priority
from ...shaper import (
    BACKOFF_RATIO,
    DEFAULT_MAX_CONNECTIONS,
    DROP_TOLERANCE,
    LATENCY_ROOM,
    Shaper,
)
from ...testing.replies import CHAT_PATH
from ..sessions import MODEL, Call, Tenant
from .base import Strategy, Target

if TYPE_CHECKING:
    from ...governance.gateway import Gateway
    from ...governance.tiers import TierLimits

__all__ = [
    "CONTEXT_WINDOW",
    "LIMITS",
    "LIMIT_DEFAULTS",
    "LIMIT_PREFIX",
    "UPSTREAM",
    "OptionValue",
    "Options",
    "QueueWaits",
    "ShaperStrategy",
    "build_limit",
    "gateway_for",
    "shaper_arguments",
    "tier_limits",
]

OptionValue = int | float | str | None
"""One option's value, already of the type its parameter takes."""

Options = tuple[tuple[str, OptionValue], ...]
"""The Shaper's options as ``(name, value)`` pairs: a Shaper keyword argument by its name
(``"retry_budget"``), the limit algorithm as ``"limit"`` (a key of :data:`LIMITS`), and the
algorithm's keyword arguments as ``"limit.NAME"`` (``"limit.initial"``). Empty: defaults."""

LIMITS: Mapping[str, type[AIMD] | type[Gradient] | type[Fixed]] = MappingProxyType(
    {"aimd": AIMD, "gradient": Gradient, "fixed": Fixed}
)
"""The limit algorithms an option may choose, by name."""

LIMIT_DEFAULTS: Mapping[str, Mapping[str, OptionValue]] = MappingProxyType(
    {
        "aimd": MappingProxyType(
            {
                "drop_tolerance": DROP_TOLERANCE,
                "latency_room": LATENCY_ROOM,
                "backoff_ratio": BACKOFF_RATIO,
            }
        )
    }
)
"""What the Shaper's own default limit sets beyond the algorithm's defaults: ``limit.NAME``
options alone (or ``limit=aimd``) then tune the very limit an untuned Shaper runs."""

LIMIT_PREFIX = "limit."

UPSTREAM = "upstream"
"""The gateway's name for the one upstream."""

CONTEXT_WINDOW = 128_000
"""The simulated model's context window, in tokens (every call of the night fits)."""


def build_limit(algorithm: str, parameters: Mapping[str, OptionValue]) -> Limit:
    """The limit ``algorithm`` (a key of :data:`LIMITS`) built with ``parameters``.

    Raises:
        ValueError: an unknown algorithm, a parameter it does not take, one it needs and
            was not given, or a value it refuses (its own message).
    """
    try:
        cls = LIMITS[algorithm]
    except KeyError:
        raise ValueError(
            f"Unknown limit algorithm {algorithm!r}; use one of {', '.join(LIMITS)}."
        ) from None
    accepted = inspect.signature(cls).parameters
    unknown = [name for name in parameters if name not in accepted]
    if unknown:
        raise ValueError(
            f"The {cls.__name__} limit takes no {_listed(unknown)}; it takes "
            f"{_listed(accepted)}."
        )
    arguments: dict[str, Any] = {**LIMIT_DEFAULTS.get(algorithm, {}), **parameters}
    missing = [
        name for name, parameter in accepted.items()
        if parameter.default is inspect.Parameter.empty and name not in arguments
    ]
    if missing:
        raise ValueError(f"The {cls.__name__} limit needs {_listed(missing)}.")
    limit: Limit = cls(**arguments)
    return limit


def _listed(names: Iterable[str]) -> str:
    return ", ".join(LIMIT_PREFIX + name for name in names)


def shaper_arguments(options: Options) -> dict[str, Any]:
    """The Shaper's keyword arguments that ``options`` stand for, its ``limit`` built.

    Without ``"limit"`` but with ``"limit.NAME"`` options, the algorithm is the Shaper's
    default one (``aimd``, with its :data:`LIMIT_DEFAULTS`).

    Raises:
        ValueError: a name given twice, or a limit that cannot be built (see
            :func:`build_limit`).
    """
    names = [name for name, _ in options]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Each option may be given once; {', '.join(repeated)} came twice.")
    arguments: dict[str, Any] = {}
    algorithm: str | None = None
    parameters: dict[str, OptionValue] = {}
    for name, value in options:
        if name == "limit":
            algorithm = str(value)
        elif name.startswith(LIMIT_PREFIX):
            parameters[name.removeprefix(LIMIT_PREFIX)] = value
        else:
            arguments[name] = value
    if algorithm is not None or parameters:
        arguments["limit"] = build_limit(algorithm or "aimd", parameters)
    return arguments


def tier_limits(tenant: Tenant, *, requests_per_minute: float) -> TierLimits:
    """The limits of ``tenant``'s tier: its share of the upstream's requests per minute."""
    from ...governance.tiers import TierLimits

    if tenant.tier_quota is None:
        return TierLimits()
    return TierLimits(rpm=tenant.tier_quota * requests_per_minute)


def gateway_for(shaper: Shaper, target: Target) -> Gateway:
    """A gateway over ``shaper`` enforcing the tiers of ``target``'s tenants.

    One model (the simulated one, free: no budget), reached through ``shaper``; each tier
    limits its tenants to their share of the upstream's nominal requests per minute, on
    the upstream's wall clock (the virtual one in a virtual run). The governance layer is
    imported here, so that runs without tenants neither load nor pay for it.
    """
    from ...governance.budget import Price
    from ...governance.gateway import Gateway
    from ...governance.routing import Model, Router
    from ...governance.tiers import TenantQuotas, Tier

    per_minute = target.config.rps * 60.0
    tiers = {
        tenant.tier: Tier(
            tenant.tier, {"*": tier_limits(tenant, requests_per_minute=per_minute)}
        )
        for tenant in target.tenants
    }
    model = Model(
        MODEL, upstream=UPSTREAM, context_window=CONTEXT_WINDOW, price=Price(0.0, 0.0),
        path=CHAT_PATH,
    )
    wall_clock = target.config.wall_clock
    return Gateway(
        upstreams={UPSTREAM: shaper},
        router=Router(models=(model,), default_model=MODEL),
        tenants=TenantQuotas(
            tiers=tuple(tiers.values()),
            tenants={tenant.name: tenant.tier for tenant in target.tenants},
            wall_clock=wall_clock,
        ),
        wall_clock=wall_clock,
    )


class QueueWaits:
    """A hook keeping how long each first attempt waited in the Shaper before its send.

    It reads the ``waited`` of every ``Admitted`` event (enqueue to admission: the
    request's arrival to its send, for a first attempt; a retry keeps its first arrival,
    so it is left out). It runs on every request: one type check and an append.
    """

    __slots__ = ("_waits",)

    def __init__(self) -> None:
        self._waits: dict[object, array[float]] = {}

    def on_event(self, event: Event) -> None:
        """Keep an admission's wait."""
        if type(event) is Admitted and event.attempt == 1:
            waits = self._waits.get(event.priority)
            if waits is None:
                waits = self._waits[event.priority] = array("d")
            waits.append(event.waited)

    def by_class(self) -> dict[str, array[float]]:
        """The waits kept so far, by class name (``"interactive"``, ``"batch"``)."""
        return {_name(priority): waits for priority, waits in self._waits.items()}


class ShaperStrategy(Strategy):
    """Every call through one asyncquota Shaper (behind a gateway when calls have tenants).

    Args:
        target: the upstream.
        options: the Shaper's options (default none: the Shaper exactly as it ships).

    Raises:
        ValueError: an option the Shaper or its limit refuses (their own messages).
        TypeError: a name the Shaper takes no keyword argument by.
    """

    name = "asyncquota"
    description = "asyncquota.Shaper with its defaults"
    queue_wait_source = "the Shaper's Admitted.waited: arrival to send, first attempts"

    def __init__(self, target: Target, *, options: Options = ()) -> None:
        super().__init__(target)
        arguments = shaper_arguments(options)
        # The night's seed also seeds the jitter, so a virtual run repeats to the request.
        arguments.setdefault("seed", target.config.seed)
        # The same pool as the Shaper's default transport, in a virtual run too (where it
        # stands in for the aiohttp connector), so virtual and real runs bound alike.
        connections = arguments.pop("max_connections", DEFAULT_MAX_CONNECTIONS)
        transport = target.shaper_transport(max_connections=connections)
        # The default hook, and one keeping the queue waits (the frequent events are then
        # made: a few per request, the price of the measurement).
        self._waits = QueueWaits()
        # The upstream's wall clock, to read its dates (the real one, or a virtual run's).
        self._shaper = Shaper(
            target.base_url,
            transport=transport,
            wall_clock=target.config.wall_clock,
            hooks=(LoggingHook(), self._waits),
            **arguments,
        )
        self._gateway = gateway_for(self._shaper, target) if target.tenants else None

    async def __aenter__(self) -> Self:
        if self._gateway is not None:
            await self._gateway.__aenter__()
        else:
            await self._shaper.__aenter__()
        return self

    async def complete(self, call: Call) -> None:
        """Send the call with its class, deadline and tenant; a QuotaError is the answer if any.

        Through the gateway, a tenant over its tier gets ``TenantLimitError`` at once.
        """
        if self._gateway is not None:
            routed = await self._gateway.request(
                call.body, tenant=call.tenant, priority=call.priority, deadline=call.deadline
            )
            routed.response.json()
            return
        response = await self._shaper.request(
            "POST", CHAT_PATH, json=call.body, priority=call.priority, deadline=call.deadline
        )
        response.json()

    async def aclose(self) -> None:
        """Shut the Shaper down (waiting callers are told, the pool is closed)."""
        if self._gateway is not None:
            await self._gateway.aclose()
        else:
            await self._shaper.aclose()

    def queue_waits(self) -> Mapping[str, Sequence[float]]:
        """Each first attempt's wait from arrival to send, by class."""
        return self._waits.by_class()

    def sample(self) -> Mapping[str, float]:
        """The concurrency limit and the queue depth per class, for the plot."""
        stats = self._shaper.statistics()
        queued = {f"queue_{_name(rank)}": float(n) for rank, n in stats.queued}
        return {"limit": float(stats.limit), "inflight": float(stats.inflight), **queued}


def _name(rank: object) -> str:
    described = describe_priority(rank) if isinstance(rank, int) else rank
    return getattr(described, "name", str(described)).lower()
