"""A request's options: made and checked once, then carried through the request path.

    options = RequestOptions(priority="batch", tenant="shop-42", deadline=30)
    await shaper.request("POST", "/v1/chat/completions", json=body, options=options)

What a caller says about one request, apart from the request itself: its priority class,
its tenant, its deadline and the tokens to reserve for it. The Shaper's ``request`` and
``stream`` take them as keywords or as one ``RequestOptions``; the aiohttp middleware,
the SDK transports and the Gateway make one (from headers, or from their own arguments)
and hand it on, so a value is checked in one place, before anything is queued or counted.

Callers that cannot pass keywords (an aiohttp session, an SDK, another language through
the proxy) give the options in headers, which are removed before the request is sent:

    X-AsyncQuota-Priority     critical | interactive | batch | an integer rank
    X-AsyncQuota-Tenant       the tenant (a string)
    X-AsyncQuota-Deadline     seconds from now (a number)
    X-AsyncQuota-Cost-Tokens  tokens to reserve (an integer)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from .priority import Priority, PriorityLike, coerce_priority

__all__ = [
    "COST_HEADER",
    "DEADLINE_HEADER",
    "MIN_DEADLINE",
    "OPTION_HEADERS",
    "PRIORITY_HEADER",
    "TENANT_HEADER",
    "RequestOptions",
    "given_options",
]

PRIORITY_HEADER = "X-AsyncQuota-Priority"
TENANT_HEADER = "X-AsyncQuota-Tenant"
DEADLINE_HEADER = "X-AsyncQuota-Deadline"
COST_HEADER = "X-AsyncQuota-Cost-Tokens"
OPTION_HEADERS = (PRIORITY_HEADER, TENANT_HEADER, DEADLINE_HEADER, COST_HEADER)
"""The headers that carry per-request options; never sent upstream."""

MIN_DEADLINE = 0.001
"""The shortest deadline a request may have (seconds): nothing is answered sooner."""


@dataclass(frozen=True, slots=True, init=False)
class RequestOptions:
    """What a caller asked of one request, checked.

    Attributes:
        priority: the class's integer rank (smaller goes first); given as ``"critical"``,
            ``"interactive"``, ``"batch"``, a Priority or an integer.
        tenant: who the request is for; tenants of one class share it fairly. Any
            hashable value.
        deadline: seconds from the call the request may take in all, queueing and
            retries included (None: the Shaper's ``default_deadline``).
        cost_tokens: the tokens to reserve, when the caller knows better than the
            estimate (None: estimated from the body, see :mod:`asyncquota.tokens`).

    Raises:
        ValueError: a deadline not a finite number of at least ``MIN_DEADLINE`` seconds,
            a negative or non-integer ``cost_tokens``, an unknown class name.
        TypeError: a priority that is neither a name nor an integer; an unhashable tenant.
    """

    priority: int = Priority.INTERACTIVE
    tenant: Hashable | None = None
    deadline: float | None = None
    cost_tokens: int | None = None

    def __init__(
        self,
        priority: PriorityLike = Priority.INTERACTIVE,
        tenant: Hashable | None = None,
        deadline: float | None = None,
        cost_tokens: int | None = None,
    ) -> None:
        # A hand-written __init__ (frozen: object.__setattr__) so that the stored
        # priority is always the rank, whatever the caller wrote.
        object.__setattr__(self, "priority", coerce_priority(priority))
        try:
            hash(tenant)
        except TypeError:
            raise TypeError(
                f"tenant must be hashable (a name, a number, a tuple), not "
                f"{type(tenant).__name__}."
            ) from None
        object.__setattr__(self, "tenant", tenant)
        if deadline is not None:
            if isinstance(deadline, bool) or not (
                isinstance(deadline, int | float) and math.isfinite(deadline)
            ):
                raise ValueError(f"deadline must be a number of seconds, not {deadline!r}.")
            if deadline < MIN_DEADLINE:
                raise ValueError(
                    f"deadline must be at least {MIN_DEADLINE:g} s (no request can be "
                    f"answered sooner), not {deadline!r}."
                )
            deadline = float(deadline)
        object.__setattr__(self, "deadline", deadline)
        if cost_tokens is not None and (
            isinstance(cost_tokens, bool) or not isinstance(cost_tokens, int) or cost_tokens < 0
        ):
            raise ValueError(f"cost_tokens must be an integer ≥ 0, not {cost_tokens!r}.")
        object.__setattr__(self, "cost_tokens", cost_tokens)

    def narrowed(self, deadline: float | None, cost_tokens: int | None) -> RequestOptions:
        """These options with ``deadline`` and ``cost_tokens`` replaced, checked as ``__init__``
        checks them; the rest, checked already, is copied as it is (a Gateway narrows a
        request's options for every model it tries: the whole ``__init__`` each time cost
        more than the Shaper's own admission).

        Raises:
            ValueError: as ``__init__`` for a bad ``deadline`` or ``cost_tokens``.
        """
        if not (
            (deadline is None or (type(deadline) is float and MIN_DEADLINE <= deadline < math.inf))
            and (cost_tokens is None or (type(cost_tokens) is int and cost_tokens >= 0))
        ):
            return RequestOptions(self.priority, self.tenant, deadline, cost_tokens)  # raises
        options = object.__new__(RequestOptions)
        object.__setattr__(options, "priority", self.priority)
        object.__setattr__(options, "tenant", self.tenant)
        object.__setattr__(options, "deadline", deadline)
        object.__setattr__(options, "cost_tokens", cost_tokens)
        return options

    @classmethod
    def from_headers(cls, values: Mapping[str, Sequence[str]]) -> RequestOptions:
        """The options given in ``X-AsyncQuota-*`` headers (``OPTION_HEADERS``).

        Args:
            values: each option header's values by its name as in ``OPTION_HEADERS``
                (an empty sequence, or no entry: not given). A header given twice is
                refused rather than guessed between.

        Raises:
            ValueError: a header given more than once, or holding a malformed value.
        """
        priority = _single(values, PRIORITY_HEADER)
        deadline = _single(values, DEADLINE_HEADER)
        cost = _single(values, COST_HEADER)
        return cls(
            priority=priority if priority is not None else Priority.INTERACTIVE,
            tenant=_single(values, TENANT_HEADER),
            deadline=None if deadline is None else _seconds(deadline),
            cost_tokens=None if cost is None else _tokens(cost),
        )


_INTERACTIVE = Priority.INTERACTIVE
_DEFAULT = RequestOptions()


def given_options(
    options: RequestOptions | None,
    priority: PriorityLike,
    tenant: Hashable | None,
    deadline: float | None,
    cost_tokens: int | None,
) -> RequestOptions:
    """The options a call gave as one object, or made from its keywords; not both.

    For methods that take both ways (``Shaper.request``, ``Gateway.request``, ...):
    ``priority`` at its default (interactive) and the others None count as not given.

    Raises:
        ValueError: both ways were used, or a keyword is malformed.
        TypeError: ``options`` is not a RequestOptions, or a keyword is malformed.
    """
    if options is None:
        if priority is _INTERACTIVE and tenant is None and deadline is None and cost_tokens is None:
            return _DEFAULT  # the usual call: frozen, so one made once serves every time
        return RequestOptions(priority, tenant, deadline, cost_tokens)
    if not isinstance(options, RequestOptions):
        raise TypeError(f"options must be a RequestOptions, not {type(options).__name__}.")
    if (
        tenant is not None
        or deadline is not None
        or cost_tokens is not None
        or coerce_priority(priority) != Priority.INTERACTIVE
    ):
        raise ValueError(
            "Give priority, tenant, deadline and cost_tokens either as keywords or in "
            "options, not both."
        )
    return options


def _single(values: Mapping[str, Sequence[str]], name: str) -> str | None:
    given = values.get(name)
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"The {name} header was given {len(given)} times; give it once.")
    return given[0].strip()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"The {DEADLINE_HEADER} header must be a number of seconds, not {text!r}."
        ) from None
    if not math.isfinite(value):
        raise ValueError(
            f"The {DEADLINE_HEADER} header must be a finite number of seconds, not {text!r}."
        )
    return value


def _tokens(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"The {COST_HEADER} header must be an integer, not {text!r}.") from None
