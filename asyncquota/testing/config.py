"""What the simulated upstream is like: its quotas, its speed and how it says no.

One frozen, validated :class:`UpstreamConfig` describes a provider; ``PRESETS`` names the
scenarios the benchmark harness replays (``UpstreamConfig.preset("crisis")``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "PRESETS",
    "HeadersStyle",
    "LimitHeader",
    "ResetResolution",
    "RetryAfterStyle",
    "UpstreamConfig",
]

RetryAfterStyle = Literal["seconds", "ms", "http-date", "none"]
"""How a 429 says when to come back: ``retry-after: 2`` (whole seconds, never 0),
``retry-after-ms: 1500``, ``retry-after: <HTTP date>``, or not at all."""

HeadersStyle = Literal["openai", "anthropic", "none"]
"""Which rate-limit headers every reply carries (``x-ratelimit-*``, ``anthropic-ratelimit-*``)."""

LimitHeader = Literal["bucket", "per_minute"]
"""What a ``limit`` header states: the bucket's size, or the rate per minute."""

ResetResolution = Literal["ms", "s"]
"""How finely OpenAI-style reset durations are given: to the millisecond, or rounded up to
the second."""

_RETRY_AFTER_STYLES = ("seconds", "ms", "http-date", "none")
_HEADERS_STYLES = ("openai", "anthropic", "none")
_LIMIT_HEADERS = ("bucket", "per_minute")
_RESET_RESOLUTIONS = ("ms", "s")


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """A rate-limited LLM provider, as the simulated upstream plays it.

    Quotas are token buckets. The request bucket holds ``rps * burst_seconds`` requests and
    refills at ``rps``; the token bucket holds ``tpm`` tokens and refills at ``tpm / 60`` per
    second. Each request reserves its prompt estimate plus ``max_tokens`` and is reconciled
    to the tokens it actually produced. The ``schedule`` scales both rates (and so both
    capacities) over time, the way a provider losing half its fleet halves everyone's quota.

    Attributes:
        rps: sustained requests per second.
        burst_seconds: how many seconds of requests the request bucket holds.
        tpm: tokens per minute, or None for no token quota.
        max_concurrency: requests in flight beyond which a request is refused at once
            (429, like DeepSeek), or None for no cap.
        count_rejected: a refused request still takes a request from the bucket (OpenAI
            counts unsuccessful requests toward the limit, so hammering eats the quota).
            The debt is bounded by one bucket: a client that stops hammering is whole
            again after at most ``2 * burst_seconds``.
        schedule: ``(t_start, factor)`` steps, ``t_start`` in seconds since the upstream's
            first request, strictly increasing; from ``t_start`` on, both rates are
            ``factor`` times the configured ones (``((20, 0.5), (40, 1.0))``: 300 → 150 → 300).
        latency_base: seconds every admitted request takes before its first token.
        latency_per_token: seconds per completion token. Completion tokens are drawn
            uniformly from ``[max_tokens / 4, max_tokens]``.
        reply_seconds: ``(low, high)``: each admitted request's reply time is drawn
            uniformly from this range instead of ``latency_base + latency_per_token *
            completion`` (``(5, 30)``: long streamed answers); None (the default): the
            latency model above.
        saturation_slowdown: how much slower replies get as the concurrency cap fills:
            latency grows linearly from 80 % of ``max_concurrency`` in flight up to
            ``1 + saturation_slowdown`` times at 100 % (no effect without a cap).
        retry_after_style: how a 429 says when to come back. ``"seconds"`` is
            ``max(1, ceil(wait))``: a 429 never says 0.
        headers_style: which rate-limit headers every quota-checked reply carries.
        limit_header: what their ``limit`` states: ``"bucket"`` (the bucket's size,
            ``rps * burst_seconds`` requests, ``tpm`` tokens) or ``"per_minute"`` (the rate
            per minute: ``rps * 60`` requests, ``tpm`` tokens, as Anthropic documents it).
            Either follows the schedule. ``remaining`` is the bucket's level either way.
        reset_resolution: OpenAI-style resets (Go durations until the bucket is full) to
            the millisecond (``"ms"``) or rounded up to the second (``"s"``). Anthropic's
            RFC 3339 resets are always to the second.
        clock_skew: seconds the upstream's clock runs ahead of ``wall_clock`` (negative:
            behind). When set, every reply carries the upstream's ``Date`` and the instants
            it renders (HTTP-date Retry-After, RFC 3339 resets, ``created``) are on its
            clock. None (the default): no ``Date`` from the model (an HTTP server adds its
            own, true one) and instants on ``wall_clock``.
        error_500_rate, error_503_rate, error_529_rate: the share of admitted requests that
            fail with that status (on Anthropic streams a 529 arrives as an in-stream
            ``overloaded_error`` event instead).
        insufficient_quota_after: after this many well-formed requests the account is out
            of credit: every later one gets ``insufficient_quota`` (0: from the start;
            None: never).
        exhausted: ``(start, end)`` windows, in seconds since the upstream's first request,
            in order and apart, during which the account's quota is gone: every
            well-formed request is refused at once with the provider's word for it, and
            at ``end`` the quota is back, buckets full (``((20, 45),)``: dead from 20 s to
            45 s). On the Anthropic endpoint that is the spend cap's 400 ("You have
            reached your specified API usage limits. You will regain access on
            2027-01-15 at 08:00:45 UTC.", the window's end on the upstream's clock,
            rounded up to the second); on the OpenAI one a 429 ``insufficient_quota``,
            which states no time.
        hang_rate: the share of admitted requests that stall ``hang_seconds`` before
            their normal reply (the caller's timeout is what usually ends them).
        hang_seconds: how long a stalled reply stalls.
        reset_rate: the share of admitted requests whose connection is reset instead of
            answered.
        penalty: a request arriving while a Retry-After window is open is refused and
            extends the window by ``penalty_extension`` seconds.
        penalty_extension: seconds added to the window per request sent inside it.
        seed: seeds the draws (completion lengths, injected faults): equal seeds and equal
            request sequences give equal runs.
        wall_clock: seconds since the epoch, used only to render HTTP dates and RFC 3339
            resets (and ``created`` fields); inject a fixed or virtual one in tests. It must
            be picklable (a module-level function) for :func:`run_in_process`.
    """

    rps: float = 300.0
    burst_seconds: float = 1.0
    tpm: float | None = None
    max_concurrency: int | None = None
    count_rejected: bool = True
    schedule: tuple[tuple[float, float], ...] = ()
    latency_base: float = 0.120
    latency_per_token: float = 0.001
    reply_seconds: tuple[float, float] | None = None
    saturation_slowdown: float = 1.0
    retry_after_style: RetryAfterStyle = "seconds"
    headers_style: HeadersStyle = "openai"
    limit_header: LimitHeader = "bucket"
    reset_resolution: ResetResolution = "ms"
    clock_skew: float | None = None
    error_500_rate: float = 0.0
    error_503_rate: float = 0.0
    error_529_rate: float = 0.0
    insufficient_quota_after: int | None = None
    exhausted: tuple[tuple[float, float], ...] = ()
    hang_rate: float = 0.0
    hang_seconds: float = 600.0
    reset_rate: float = 0.0
    penalty: bool = False
    penalty_extension: float = 1.0
    seed: int = 0
    wall_clock: Callable[[], float] = field(default=time.time, compare=False)

    def __post_init__(self) -> None:
        _positive("rps", self.rps)
        _positive("burst_seconds", self.burst_seconds)
        if self.tpm is not None:
            _positive("tpm", self.tpm)
        if self.max_concurrency is not None and (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency must be a positive integer or None, not {self.max_concurrency!r}."
            )
        object.__setattr__(self, "schedule", _checked_schedule(self.schedule))
        object.__setattr__(self, "exhausted", _checked_windows(self.exhausted))
        for name in ("latency_base", "latency_per_token", "saturation_slowdown", "hang_seconds",
                     "penalty_extension"):
            _non_negative(name, getattr(self, name))
        for name, choices in (
            ("retry_after_style", _RETRY_AFTER_STYLES),
            ("headers_style", _HEADERS_STYLES),
            ("limit_header", _LIMIT_HEADERS),
            ("reset_resolution", _RESET_RESOLUTIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}."
                )
        if self.reply_seconds is not None:
            object.__setattr__(self, "reply_seconds", _checked_range(self.reply_seconds))
        if self.clock_skew is not None and not (
            isinstance(self.clock_skew, int | float) and math.isfinite(self.clock_skew)
        ):
            raise ValueError(
                f"clock_skew must be a finite number of seconds or None, not {self.clock_skew!r}."
            )
        rates = ("error_500_rate", "error_503_rate", "error_529_rate", "hang_rate", "reset_rate")
        for name in rates:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a share between 0 and 1, not {value!r}.")
        if sum(getattr(self, name) for name in rates) > 1.0 + 1e-9:
            raise ValueError(
                "The fault rates (errors, hangs and resets) together exceed 1: "
                "each admitted request can suffer at most one of them."
            )
        if self.insufficient_quota_after is not None and self.insufficient_quota_after < 0:
            raise ValueError(
                "insufficient_quota_after must be a request count (0 or more) or None, "
                f"not {self.insufficient_quota_after!r}."
            )
        if not callable(self.wall_clock):
            raise ValueError("wall_clock must be a callable returning seconds since the epoch.")

    @property
    def fault_rate(self) -> float:
        """The share of admitted requests that suffer an injected fault of any kind."""
        return (
            self.error_500_rate + self.error_503_rate + self.error_529_rate
            + self.hang_rate + self.reset_rate
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UpstreamConfig:
        """A named scenario from ``PRESETS``, with some fields replaced.

        Raises:
            ValueError: an unknown name, or an override that fails validation.
        """
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(
                f"Unknown upstream preset {name!r}; use one of {', '.join(PRESETS)}."
            ) from None
        return dataclasses.replace(base, **overrides)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}.")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of 0 or more, not {value!r}.")


def _checked_range(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"reply_seconds must be a (low, high) pair of seconds or None, not {value!r}."
        ) from None
    if not (math.isfinite(high) and 0 <= low <= high):
        raise ValueError(
            f"reply_seconds must be (low, high) with 0 <= low <= high, not {value!r}."
        )
    return low, high


def _checked_schedule(steps: Any) -> tuple[tuple[float, float], ...]:
    checked: list[tuple[float, float]] = []
    previous = -math.inf
    for step in steps:
        try:
            t_start, factor = (float(x) for x in step)
        except (TypeError, ValueError):
            raise ValueError(
                f"Each schedule step is a (t_start, factor) pair of numbers, not {step!r}."
            ) from None
        if not (math.isfinite(t_start) and t_start > previous and t_start >= 0):
            raise ValueError(
                "Schedule steps must start at 0 s or later, in strictly increasing order; "
                f"{step!r} does not."
            )
        _positive("A schedule factor", factor)
        checked.append((t_start, factor))
        previous = t_start
    return tuple(checked)


def _checked_windows(windows: Any) -> tuple[tuple[float, float], ...]:
    checked: list[tuple[float, float]] = []
    previous = 0.0
    for window in windows:
        try:
            start, end = (float(x) for x in window)
        except (TypeError, ValueError):
            raise ValueError(
                f"Each exhausted window is a (start, end) pair of seconds, not {window!r}."
            ) from None
        if not (math.isfinite(end) and previous <= start < end):
            raise ValueError(
                "Exhausted windows must start at 0 s or later, end after they start, and "
                f"follow one another without overlapping; {window!r} does not."
            )
        checked.append((start, end))
        previous = end
    return tuple(checked)


_CRISIS = UpstreamConfig(
    rps=300.0,
    tpm=9_000_000.0,
    max_concurrency=128,
    headers_style="openai",
    retry_after_style="seconds",
)

PRESETS: Mapping[str, UpstreamConfig] = MappingProxyType(
    {
        # The quota that ran dry on the 30 000-session night.
        "crisis": _CRISIS,
        # The same, losing half its capacity from 20 s to 40 s.
        "shift": dataclasses.replace(_CRISIS, schedule=((20.0, 0.5), (40.0, 1.0))),
        # A comfortable quota: the reference for goodput without a shortage.
        "steady": UpstreamConfig(rps=1000.0, tpm=30_000_000.0, max_concurrency=1024),
        # Anthropic's dialect of no: its headers, HTTP-date Retry-After, 1 % overloaded.
        "anthropic": dataclasses.replace(
            _CRISIS,
            headers_style="anthropic",
            retry_after_style="http-date",
            error_529_rate=0.01,
        ),
        # A provider that punishes clients sending inside their Retry-After window.
        "penalty": dataclasses.replace(_CRISIS, penalty=True, penalty_extension=1.0),
        # The crisis quota shared by two tenants on different tiers, one of them flooding
        # (the bench's tenants: asyncquota.bench.sessions.SCENARIO_TENANTS).
        "tiers": _CRISIS,
        # The 2 a.m. night: the crisis on an Anthropic-dialect account whose quota is gone
        # from 20 s to 45 s (the bench's fallback: asyncquota.bench.exhaustion).
        "exhaustion": dataclasses.replace(
            _CRISIS,
            headers_style="anthropic",
            retry_after_style="http-date",
            exhausted=((20.0, 45.0),),
        ),
    }
)
