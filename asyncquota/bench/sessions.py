"""The night: thousands of chat sessions, seeded, each drawn the same whatever the strategy.

A :class:`SessionModel` describes the crowd. Session ``i`` is interactive with probability
``interactive_share`` (else batch), sends its first message at a uniform time in
``[0, spike]`` seconds, and after each answer (or error) thinks for an exponential time of
mean ``think_mean`` before sending again, until ``duration`` has passed. Each message asks
for ``max_tokens`` drawn uniformly from ``max_tokens_range`` (both ends included).

Every draw is a pure function of ``(seed, session, turn)``: the 3rd message of session 17
asks for the same ``max_tokens`` and is followed by the same think time under every
strategy, even though strategies answer at different times. No random generator is kept
per session, so 30 000 sessions cost nothing until they speak.

A crowd may belong to several tenants (:class:`Tenant`; the ``tiers`` scenario): each session is
then one tenant's, drawn by the tenants' shares, and thinks for that tenant's mean think
time; its calls carry the tenant's name. The tenant is drawn from a coordinate no other
draw uses, so a crowd without tenants (every other scenario) is drawn exactly as before.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "CLASSES",
    "SCENARIO_TENANTS",
    "Call",
    "Priority",
    "Session",
    "SessionModel",
    "Tenant",
    "Turn",
]

Priority = Literal["interactive", "batch"]
"""The two request classes of the night."""

CLASSES: tuple[Priority, Priority] = ("interactive", "batch")
"""The request classes, in the order of their codes in a request log (0, 1)."""

_MASK = (1 << 64) - 1
_STREAM_CLASS, _STREAM_FIRST, _STREAM_TOKENS, _STREAM_THINK = range(4)
# The class is drawn at turn 0 only, so the class stream's turn 1 is a free coordinate.
_TENANT_TURN, _STREAM_TENANT = 1, _STREAM_CLASS


def _unit(seed: int, session: int, turn: int, stream: int) -> float:
    """A uniform draw in [0, 1) keyed by its coordinates (splitmix64 of the key)."""
    x = (((seed * 0x9E3779B97F4A7C15 + session) * 0xBF58476D1CE4E5B9 + turn) * 4 + stream)
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return (x >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True, slots=True, kw_only=True)
class Tenant:
    """A customer of the chatbot service: some of the sessions are theirs, on their tier.

    Attributes:
        name: how requests are tagged (``"acme"``).
        share: the share of the sessions that are this tenant's.
        think_mean: the mean think time of its sessions, in seconds (a script thinks little).
        tier: the name of the tier it pays for.
        tier_quota: its tier's requests per minute, as a share of the upstream's own
            per-minute request quota (``0.3``: 30 %), or None for a tier without a limit.
            Only a strategy that knows tenants (asyncquota's gateway) enforces it.

    Raises:
        ValueError: an empty name or tier, a share or tier quota outside (0, 1], or a think
            time that is not a positive number of seconds.
    """

    name: str
    share: float
    think_mean: float
    tier: str
    tier_quota: float | None = None

    def __post_init__(self) -> None:
        for what in ("name", "tier"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value:
                raise ValueError(f"A tenant's {what} must be a non-empty string, not {value!r}.")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(
                f"Tenant {self.name!r}: share must be in (0, 1], not {self.share!r}."
            )
        if not (math.isfinite(self.think_mean) and self.think_mean > 0):
            raise ValueError(
                f"Tenant {self.name!r}: think_mean must be a positive number of seconds, "
                f"not {self.think_mean!r}."
            )
        if self.tier_quota is not None and not 0.0 < self.tier_quota <= 1.0:
            raise ValueError(
                f"Tenant {self.name!r}: tier_quota must be in (0, 1] or None, "
                f"not {self.tier_quota!r}."
            )


SCENARIO_TENANTS: Mapping[str, tuple[Tenant, ...]] = MappingProxyType(
    {
        # A paying customer's chat, well under its share, beside a free-tier script that
        # floods: 95 % of the sessions, speaking every 10 s instead of every 30 s. The tiers
        # together fit the upstream's quota: 70 % + 30 %.
        "tiers": (
            Tenant(name="acme", share=0.05, think_mean=30.0, tier="pro", tier_quota=0.7),
            Tenant(name="flood", share=0.95, think_mean=10.0, tier="free", tier_quota=0.3),
        ),
    }
)
"""The tenants of the scenarios that have some, by scenario name (the others have none)."""


@dataclass(frozen=True, slots=True)
class Session:
    """One conversation: its class, when it first speaks (seconds from the start), whose."""

    index: int
    priority: Priority
    first_at: float
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a session: what it asks for, and how long it thinks after the answer."""

    max_tokens: int
    think: float


@dataclass(frozen=True, slots=True)
class Call:
    """One chat completion as a strategy receives it.

    Attributes:
        priority: the request class.
        deadline: seconds from now by which the caller wants the answer (its timeout).
        max_tokens: the completion budget.
        messages: the chat messages (shared between calls: do not mutate).
        tenant: whose call it is (None in a crowd without tenants).
    """

    priority: Priority
    deadline: float
    max_tokens: int
    messages: list[dict[str, str]] = field(repr=False)
    tenant: str | None = None

    @property
    def body(self) -> dict[str, Any]:
        """The OpenAI chat-completions JSON body."""
        return {"model": MODEL, "messages": self.messages, "max_tokens": self.max_tokens}


MODEL = "simulated"
"""The model name every call asks for (the simulated upstream accepts any)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionModel:
    """The crowd of chat sessions a benchmark replays.

    Attributes:
        sessions: how many conversations.
        duration: seconds during which sessions send; nothing new starts after it.
        interactive_share: the share of interactive sessions (the rest are batch).
        spike: first messages arrive uniformly in ``[0, spike]`` seconds.
        think_mean: mean of the exponential think time between an answer and the next
            message (with tenants, each tenant's own ``think_mean`` replaces it).
        max_tokens_range: ``(low, high)``, both included.
        interactive_deadline: seconds an interactive caller waits for an answer.
        batch_deadline: seconds a batch caller waits for an answer.
        prompt_chars: characters of each message (about a quarter as many prompt tokens).
        seed: the seed of every draw.
        tenants: whose sessions these are; each session is one tenant's, drawn by their
            shares. Empty (the default): nobody's, and no tenant is drawn.

    Raises:
        ValueError: a count, a share, a duration or a range out of bounds; tenants whose
            names repeat, whose shares do not add up to 1, or who name one tier with two
            different quotas.
    """

    sessions: int = 30_000
    duration: float = 60.0
    interactive_share: float = 0.7
    spike: float = 5.0
    think_mean: float = 30.0
    max_tokens_range: tuple[int, int] = (64, 256)
    interactive_deadline: float = 10.0
    batch_deadline: float = 120.0
    prompt_chars: int = 400
    seed: int = 0
    tenants: tuple[Tenant, ...] = ()
    _messages: list[dict[str, str]] = field(init=False, repr=False, compare=False)
    _tenant_bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.sessions, bool) or not isinstance(self.sessions, int) or (
            self.sessions < 1
        ):
            raise ValueError(f"sessions must be a positive integer, not {self.sessions!r}.")
        for name in ("duration", "think_mean", "interactive_deadline", "batch_deadline"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}.")
        if not (math.isfinite(self.spike) and self.spike >= 0):
            raise ValueError(f"spike must be 0 seconds or more, not {self.spike!r}.")
        if not 0.0 <= self.interactive_share <= 1.0:
            raise ValueError(
                f"interactive_share must be between 0 and 1, not {self.interactive_share!r}."
            )
        low, high = self.max_tokens_range
        if not 1 <= low <= high:
            raise ValueError(
                "max_tokens_range must be (low, high) with 1 <= low <= high, "
                f"not {self.max_tokens_range!r}."
            )
        if self.prompt_chars < 1:
            raise ValueError(f"prompt_chars must be at least 1, not {self.prompt_chars!r}.")
        self._check_tenants()
        text = ("Tell me something about the night. " * (self.prompt_chars // 35 + 1))
        object.__setattr__(
            self, "_messages", [{"role": "user", "content": text[: self.prompt_chars]}]
        )

    def _check_tenants(self) -> None:
        tenants = tuple(self.tenants)
        object.__setattr__(self, "tenants", tenants)
        for tenant in tenants:
            if not isinstance(tenant, Tenant):
                raise ValueError(f"tenants must be Tenant objects, not {type(tenant).__name__}.")
        names = [t.name for t in tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"Tenant names must differ; got {', '.join(names)}.")
        tiers: dict[str, float | None] = {}
        for tenant in tenants:
            if tiers.setdefault(tenant.tier, tenant.tier_quota) != tenant.tier_quota:
                raise ValueError(
                    f"Tier {tenant.tier!r} is given two quotas: {tiers[tenant.tier]!r} and "
                    f"{tenant.tier_quota!r}."
                )
        if tenants and not math.isclose(sum(t.share for t in tenants), 1.0, abs_tol=1e-9):
            raise ValueError(
                "The tenants' shares must add up to 1 (every session is someone's), not "
                f"{sum(t.share for t in tenants)!r}."
            )
        bounds = tuple(itertools.accumulate(t.share for t in tenants))
        object.__setattr__(self, "_tenant_bounds", bounds)

    def _tenant(self, index: int) -> Tenant | None:
        """The tenant session ``index`` belongs to (None without tenants)."""
        if not self.tenants:
            return None
        u = _unit(self.seed, index, _TENANT_TURN, _STREAM_TENANT) * self._tenant_bounds[-1]
        return self.tenants[min(bisect.bisect_right(self._tenant_bounds, u),
                                len(self.tenants) - 1)]

    @property
    def max_deadline(self) -> float:
        """The longest any caller waits: no request outlives ``duration + max_deadline``."""
        return max(self.interactive_deadline, self.batch_deadline)

    def deadline(self, priority: Priority) -> float:
        """Seconds a caller of this class waits for an answer."""
        return self.interactive_deadline if priority == "interactive" else self.batch_deadline

    def session(self, index: int) -> Session:
        """Session ``index``: its class, the time of its first message and its tenant."""
        seed = self.seed
        interactive = _unit(seed, index, 0, _STREAM_CLASS) < self.interactive_share
        tenant = self._tenant(index)
        return Session(
            index=index,
            priority="interactive" if interactive else "batch",
            first_at=_unit(seed, index, 0, _STREAM_FIRST) * self.spike,
            tenant=None if tenant is None else tenant.name,
        )

    def turn(self, index: int, number: int) -> Turn:
        """Message ``number`` (from 0) of session ``index``."""
        low, high = self.max_tokens_range
        tokens = low + int(_unit(self.seed, index, number, _STREAM_TOKENS) * (high - low + 1))
        tenant = self._tenant(index)
        mean = self.think_mean if tenant is None else tenant.think_mean
        think = -mean * math.log1p(-_unit(self.seed, index, number, _STREAM_THINK))
        return Turn(max_tokens=tokens, think=think)

    def call(self, session: Session, turn: Turn) -> Call:
        """The call a session makes for one of its turns."""
        return Call(
            priority=session.priority,
            deadline=self.deadline(session.priority),
            max_tokens=turn.max_tokens,
            messages=self._messages,
            tenant=session.tenant,
        )
