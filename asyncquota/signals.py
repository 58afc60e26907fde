"""Reading what the upstream says: Retry-After, rate-limit headers, error bodies.

Every reply from an LLM API carries hints about the quota behind it, in dialects that
differ by provider: OpenAI's ``x-ratelimit-*`` headers with Go durations, Anthropic's
``anthropic-ratelimit-*`` headers with RFC 3339 timestamps, Gemini's ``RetryInfo`` and
``QuotaFailure`` details inside the error body, ``retry-after-ms`` and ``retry-after`` in
seconds or as an HTTP date. This module turns them into three plain answers:

- :func:`parse_retry_after`: how long the upstream asked us to wait;
- :func:`parse_rate_limit_headers`: how much quota is left, per window, as a
  :class:`QuotaSnapshot`;
- :func:`classify_error_body`: what kind of reply this is (an :class:`Outcome`): success,
  rate limited, out of quota, overloaded, a transient failure, or a refusal; and, when the
  quota is gone, why (:attr:`Classification.reason`) and until when
  (:attr:`Classification.regain_at`) where the provider says or documents it.

Everything here is pure and synchronous, takes ``now`` (Unix seconds) where a timestamp
must be resolved, and never raises on any input: what cannot be read is reported as
``None`` ("the upstream told us nothing"). It runs on every response, so each call builds
one lowercase view of the headers and uses precompiled patterns.

Headers may be any ``Mapping[str, str]`` (a dict, aiohttp's ``CIMultiDictProxy``) or an
iterable of ``(name, value)`` pairs; names are matched case-insensitively and, when a
name repeats, its first value wins. Names and values given as bytes are read as Latin-1
(HTTP's own reading); pairs that are neither are skipped.

An upstream is not trusted to be sane, only to be read: a value no provider could mean
is no information, never an exception and never a reason to stop for long. Counts are
ASCII digits up to :data:`MAX_COUNT` (``"²"``, 5 000 digits, ``-1``, ``NaN`` are None);
every wait or reset (Retry-After, ``retry-after-ms``, an HTTP date, Gemini's
``RetryInfo``, a window reset) is clamped to :data:`MAX_RETRY_AFTER`. Those are this
module's bounds on what the headers say; the Shaper bounds what it does with them again,
by its own, configurable, ceiling.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Literal, TypeAlias, cast
from zoneinfo import ZoneInfo

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "MAX_COUNT",
    "MAX_REGAIN",
    "MAX_RETRY_AFTER",
    "MESSAGE_EXCERPT_CHARS",
    "Classification",
    "HeadersLike",
    "Outcome",
    "Provider",
    "QuotaSnapshot",
    "QuotaWindow",
    "RetryAfterForm",
    "classify_error_body",
    "classify_stream_event",
    "format_duration",
    "names_concurrency",
    "parse_count",
    "parse_duration",
    "parse_http_date",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "retry_after_form",
]

MAX_RETRY_AFTER = 86_400.0
"""The longest wait (seconds) any hint is taken at: a day, the longest quota window
(per-day limits) any provider documents. A larger value is clamped to it, so a bogus
header cannot park the fleet for a year, while long legitimate waits are still honoured
(unlike the SDKs, which ignore anything past 60 s)."""

MAX_COUNT = 10**12
"""The largest request or token count a header is believed: a trillion, a thousand times
any quota a provider sells per minute or per day. Anything larger is garbage (None), so a
limit of 10^300 cannot reach the gates' arithmetic."""

MAX_REGAIN = 32 * 86_400.0
"""The furthest ahead (seconds) a stated regain time is believed: a month and a day, the
longest cycle on which a provider's spend cap or quota comes back. A later one (a body
saying "2099") is no information: the exhaustion is reported without a regain time, so
nothing parks a model for decades on one reply's word."""

MESSAGE_EXCERPT_CHARS = 300
"""How much of a provider's error message a :class:`Classification` keeps."""

MAX_BODY_CHARS = 64 * 1024
"""Bodies longer than this are not parsed: provider error reports are a few hundred bytes,
and a long 200 body is a completion, not an error, so skipping it keeps success cheap."""

HeadersLike: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]
"""Reply headers: a mapping (plain or case-insensitive multidict) or ``(name, value)`` pairs."""

Provider: TypeAlias = Literal["openai", "anthropic"]
"""The rate-limit header dialect seen in a reply."""

# ASCII so that float() never sees other scripts' digits, which it would happily accept.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Go's two micro signs (U+00B5, U+03BC) are both accepted, as Go does.
_DURATION_PARTS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
_DURATION = re.compile(rf"(?:{_DURATION_PARTS.pattern})+", re.ASCII)
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:[Zz]|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def _lower_view(headers: HeadersLike | None) -> dict[str, str]:
    """Header names lowercased, first value of each; anything malformed is skipped."""
    view: dict[str, str] = {}
    if headers is None:
        return view
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        # Already case-insensitive, first value first: the reply headers of every response,
        # so this is the hot path. A non-str value cannot occur in a str multidict.
        return cast("dict[str, str]", headers)
    try:
        items: Iterable[object] = headers.items() if isinstance(headers, Mapping) else headers
        for item in items:
            try:
                name, value = cast("tuple[object, object]", item)
            except (TypeError, ValueError):
                continue
            name, value = _text(name), _text(value)
            if name is not None and value is not None:
                view.setdefault(name.lower(), value)
    except Exception:
        # Not iterable, or a mapping that fails as it is read: not headers we can use.
        return view
    return view


def _text(value: object) -> str | None:
    """A header name or value as text: str as it is, bytes as Latin-1, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return None


def _clamp(seconds: float) -> float:
    return seconds if seconds <= MAX_RETRY_AFTER else MAX_RETRY_AFTER


def _non_negative_number(text: str) -> float | None:
    """A plain decimal number ≥ 0; None for garbage, negatives, and the words nan/inf.

    A number too large for a float comes back as ``inf``; callers clamp it.
    """
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if value >= 0.0 else None


def _http_date(text: str) -> float | None:
    """An HTTP date (IMF-fixdate, RFC 850 or asctime) as Unix seconds, else None."""
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:
            # asctime carries no zone and "-0000" means "zone unknown": HTTP dates are GMT.
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except (ValueError, TypeError, IndexError, OverflowError, AttributeError):
        return None


def parse_http_date(text: str | bytes | None) -> float | None:
    """An HTTP date (a ``Date`` or ``Retry-After`` header) as Unix seconds, or None.

    IMF-fixdate, RFC 850 and asctime are read (no zone means GMT); anything else, bytes
    that are not a date included, gives None. Never raises. The result is a timestamp,
    not a wait: no bound applies (see :func:`parse_retry_after` for the wait).
    """
    text = _text(text)
    return None if text is None else _http_date(text)


def _rfc3339(text: str) -> float | None:
    """An RFC 3339 timestamp (``2026-11-27T22:40:05.5+02:00``) as Unix seconds, else None."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    leap = 1 if second == "60" else 0  # RFC 3339 allows a leap second; datetime does not
    try:
        zone = UTC
        if sign is not None:
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            zone = timezone(offset if sign == "+" else -offset)
        when = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second) - leap,
            tzinfo=zone,
        )
        return when.timestamp() + leap + (float(fraction) if fraction else 0.0)
    except (ValueError, OverflowError):
        return None


def _until(timestamp: float, now: float) -> float | None:
    """Seconds from ``now`` until ``timestamp``: 0.0 if it has passed, clamped, None if NaN."""
    delta = timestamp - now
    if math.isnan(delta):
        return None
    return _clamp(max(delta, 0.0))


def parse_duration(text: str | bytes) -> float | None:
    """Seconds in a Go-style duration (``1s``, ``20ms``, ``6m0s``, ``1h2m3.5s``), or None.

    OpenAI writes its ``x-ratelimit-reset-*`` headers this way, Gemini its ``retryDelay``.
    Units are ``h``, ``m``, ``s``, ``ms``, ``us``/``µs``/``μs`` and ``ns``, case-sensitive
    as in Go; fractions (``0.5s``, ``.5s``) are fine. A plain number (``"12"``,
    ``"1.5"``) is taken as seconds, which is what OpenAI-compatible servers often send.
    Negative durations, NaN, infinities and anything else (bytes are read as Latin-1)
    come back as None; never raises. The value is not clamped: callers decide how long is
    too long (this module's readers clamp it to :data:`MAX_RETRY_AFTER`).
    """
    decoded = _text(text)
    if decoded is None:
        return None
    # Replies repeat the same few resets; only short texts are cached, so a hostile
    # upstream cannot fill the cache with long ones.
    return _cached_duration(decoded) if len(decoded) <= 32 else _read_duration(decoded)


def format_duration(seconds: float) -> str:
    """A duration as Go prints it, to the millisecond: ``0s``, ``250ms``, ``1.5s``, ``6m0s``.

    What OpenAI writes in its ``x-ratelimit-reset-*`` headers (the inverse of
    :func:`parse_duration`, rounded up to the millisecond).
    """
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    whole, frac = divmod(ms, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") + "s" if frac else f"{whole}s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def _read_duration(text: str) -> float | None:
    text = text.strip()
    seconds = _non_negative_number(text)
    if seconds is None:
        if not _DURATION.fullmatch(text):
            return None
        seconds = 0.0
        for amount, unit in _DURATION_PARTS.findall(text):
            seconds += float(amount) * _DURATION_UNITS[unit]
    return seconds if math.isfinite(seconds) else None


_cached_duration = functools.lru_cache(maxsize=4096)(_read_duration)


def _retry_after(view: Mapping[str, str], now: float | None) -> float | None:
    """The rules of :func:`parse_retry_after`, on an already lowercased view."""
    stated = _stated_retry_after(view, dates=now is not None)
    if stated is None:
        return None
    form, value = stated
    if form == "date":
        assert now is not None
        return _until(value, now)
    return _clamp(value)


def _stated_retry_after(
    view: Mapping[str, str], *, dates: bool
) -> tuple[RetryAfterForm, float] | None:
    """The Retry-After a lowercased view states, by the rules of :func:`parse_retry_after`
    in their order: its form and its seconds (a date's Unix time; dates only if
    ``dates``), or None."""
    text = view.get("retry-after-ms")
    if text is not None:
        millis = _non_negative_number(text)
        if millis is not None:
            return "ms", millis / 1000.0
    text = view.get("retry-after")
    if text is None:
        return None
    seconds = _non_negative_number(text)
    if seconds is not None:
        whole = math.isinf(seconds) or seconds == int(seconds)
        return ("whole-seconds" if whole else "seconds"), seconds
    timestamp = _http_date(text) if dates else None
    return None if timestamp is None else ("date", timestamp)


def parse_retry_after(headers: HeadersLike, *, now: float) -> float | None:
    """How many seconds the upstream asked us to wait, or None if it did not say.

    The rules, in order (the same as the OpenAI SDK's, minus its 60 s cap):

    1. ``retry-after-ms``: a number of milliseconds (fractions allowed). If it is missing,
       negative or garbage, the next rule is tried.
    2. ``retry-after`` as a number of seconds (fractions allowed, as OpenAI sends).
       A negative number is garbage: None.
    3. ``retry-after`` as an HTTP date (RFC 9110 IMF-fixdate
       ``Sun, 06 Nov 1994 08:49:37 GMT``, or the obsolete RFC 850 and asctime forms;
       a date without a zone is GMT), resolved against ``now``. A date in the past
       means "now": 0.0.

    The words ``nan``/``inf`` and any other garbage give None; a number too large to be
    plausible (even one too large for a float) is clamped to :data:`MAX_RETRY_AFTER`.

    Args:
        headers: the reply's headers (see the module docstring for accepted shapes).
        now: the current time in Unix seconds, used only to resolve an HTTP date.
    """
    return _retry_after(_lower_view(headers), now)


RetryAfterForm: TypeAlias = Literal["ms", "seconds", "whole-seconds", "date"]
"""How a reply stated its Retry-After, and so how finely: in milliseconds (or a fraction of
a second), in whole seconds (rounded up: the wait lies within a second below), or as an
HTTP date (to the second, on the upstream's clock)."""


def retry_after_form(headers: HeadersLike) -> RetryAfterForm | None:
    """The form of the Retry-After that :func:`parse_retry_after` reads, or None if none.

    By the same rules, in the same order: a ``retry-after-ms`` that reads is ``"ms"``; a
    ``retry-after`` number ``"seconds"`` if it has a fraction, ``"whole-seconds"`` if not;
    a ``retry-after`` date ``"date"``. Never raises.
    """
    stated = _stated_retry_after(_lower_view(headers), dates=True)
    return None if stated is None else stated[0]


@dataclass(frozen=True, slots=True)
class QuotaWindow:
    """One quota window as the upstream reported it; each field None when it did not say.

    Attributes:
        limit: the window's capacity (requests or tokens).
        remaining: how much of it is left.
        reset_after: seconds from the snapshot's ``now`` until the window is full again
            (not until one more request fits), within ``[0, MAX_RETRY_AFTER]``.
    """

    limit: int | None = None
    remaining: int | None = None
    reset_after: float | None = None

    @property
    def is_empty(self) -> bool:
        """True when the upstream said nothing about this window."""
        return self.limit is None and self.remaining is None and self.reset_after is None

    @property
    def fraction_remaining(self) -> float | None:
        """How much of the window is left, in ``[0, 1]``: 0 is exhausted, 1 is untouched.

        None unless both ``limit`` and ``remaining`` are known. A zero limit counts as
        exhausted; a remaining above the limit (Anthropic rounds remaining tokens to the
        nearest thousand) counts as untouched.
        """
        if self.limit is None or self.remaining is None:
            return None
        if self.limit == 0:
            return 0.0
        return min(self.remaining, self.limit) / self.limit


_EMPTY_WINDOW = QuotaWindow()


@dataclass(frozen=True, slots=True)
class QuotaSnapshot:
    """What one reply's headers said about the quota behind it.

    Attributes:
        requests: the request-count window (RPM, or RPD for some tiers).
        tokens: the token window (OpenAI: all tokens; Anthropic: the combined limit).
        input_tokens: Anthropic's input-token window.
        output_tokens: Anthropic's output-token window.
        provider: which header dialect was seen, None if neither.
        retry_after: the reply's Retry-After hint (see :func:`parse_retry_after`).
    """

    requests: QuotaWindow = _EMPTY_WINDOW
    tokens: QuotaWindow = _EMPTY_WINDOW
    input_tokens: QuotaWindow = _EMPTY_WINDOW
    output_tokens: QuotaWindow = _EMPTY_WINDOW
    provider: Provider | None = None
    retry_after: float | None = None

    @property
    def windows(self) -> tuple[QuotaWindow, QuotaWindow, QuotaWindow, QuotaWindow]:
        """The four windows: requests, tokens, input tokens, output tokens."""
        return (self.requests, self.tokens, self.input_tokens, self.output_tokens)

    @property
    def is_empty(self) -> bool:
        """True when the reply carried no quota information at all (DeepSeek, Gemini)."""
        return self.retry_after is None and all(window.is_empty for window in self.windows)

    @property
    def fraction_remaining(self) -> float | None:
        """The tightest window's :attr:`QuotaWindow.fraction_remaining`, None if none known."""
        fractions = [f for f in (w.fraction_remaining for w in self.windows) if f is not None]
        return min(fractions) if fractions else None


# (limit, remaining, reset) header names per window, precomputed once.
_OPENAI_WINDOWS = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}
_ANTHROPIC_WINDOWS = {
    kind: (
        f"anthropic-ratelimit-{kind}-limit",
        f"anthropic-ratelimit-{kind}-remaining",
        f"anthropic-ratelimit-{kind}-reset",
    )
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
}
_OPENAI_NAMES = tuple(name for names in _OPENAI_WINDOWS.values() for name in names)
_ANTHROPIC_NAMES = tuple(name for names in _ANTHROPIC_WINDOWS.values() for name in names)


def _count(text: str | None) -> int | None:
    """A count in ``[0, MAX_COUNT]`` (``"59"``, ``"59.0"``; fractions are floored), else None.

    Negatives are None: Azure sends ``-1`` to mean "unknown".
    """
    if text is None:
        return None
    # The usual case, no regex. isdigit() alone is not enough: "²" is a digit to it.
    if len(text) < 13 and text.isascii() and text.isdigit():
        return int(text)
    value = _non_negative_number(text)
    if value is None or value > MAX_COUNT:
        return None
    return int(value)


def parse_count(text: str | bytes | None) -> int | None:
    """A request or token count from a header value, or None (the rules of
    :func:`parse_rate_limit_headers`: ASCII digits, ``"59.0"`` floored, up to
    :data:`MAX_COUNT`; ``"²"``, ``"-1"``, ``"1e400"``, bytes that are not a number and
    anything else give None). Never raises: for code that glances at one header."""
    return _count(_text(text))


def _reset_after(text: str | None, now: float) -> float | None:
    """A window reset as seconds from now: a Go duration or an RFC 3339 timestamp.

    Both dialects are accepted under either provider's header names, since OpenAI-compatible
    servers and proxies mix them; the two forms cannot be mistaken for each other.
    """
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds is not None:
        return _clamp(seconds)
    timestamp = _rfc3339(text)
    return None if timestamp is None else _until(timestamp, now)


def _window(view: Mapping[str, str], names: tuple[str, str, str], now: float) -> QuotaWindow:
    limit_name, remaining_name, reset_name = names
    window = QuotaWindow(
        limit=_count(view.get(limit_name)),
        remaining=_count(view.get(remaining_name)),
        reset_after=_reset_after(view.get(reset_name), now),
    )
    return _EMPTY_WINDOW if window.is_empty else window


def _carries_any(view: Mapping[str, str], names: tuple[str, ...]) -> bool:
    # A plain loop: on every reply, and twice as fast as any() over a generator.
    for name in names:  # noqa: SIM110
        if name in view:
            return True
    return False


def parse_rate_limit_headers(headers: HeadersLike, *, now: float) -> QuotaSnapshot:
    """Read the quota windows a reply's headers describe, and its Retry-After.

    Two dialects are understood. If any ``anthropic-ratelimit-*`` header is present the
    reply is read as Anthropic's (``anthropic-ratelimit-{requests,tokens,input-tokens,
    output-tokens}-{limit,remaining,reset}``, resets as RFC 3339 timestamps resolved
    against ``now``); otherwise, if any ``x-ratelimit-{limit,remaining,reset}-{requests,
    tokens}`` header is present, as OpenAI's (resets as Go durations such as ``6m0s``).
    A reset may be written in either form under either dialect.

    Counts are integers ≥ 0; ``"59.0"`` is read as 59, and a negative count (Azure's
    ``-1``) or garbage as None. Resets are seconds from ``now``, 0.0 for a reset in the
    past, clamped to :data:`MAX_RETRY_AFTER`. Any field the reply does not carry, or
    carries as garbage, stays None.

    Args:
        headers: the reply's headers (see the module docstring for accepted shapes).
        now: the current time in Unix seconds, to resolve absolute timestamps.
    """
    view = _lower_view(headers)
    retry_after = _retry_after(view, now)
    if _carries_any(view, _ANTHROPIC_NAMES):
        return QuotaSnapshot(
            requests=_window(view, _ANTHROPIC_WINDOWS["requests"], now),
            tokens=_window(view, _ANTHROPIC_WINDOWS["tokens"], now),
            input_tokens=_window(view, _ANTHROPIC_WINDOWS["input-tokens"], now),
            output_tokens=_window(view, _ANTHROPIC_WINDOWS["output-tokens"], now),
            provider="anthropic",
            retry_after=retry_after,
        )
    if _carries_any(view, _OPENAI_NAMES):
        return QuotaSnapshot(
            requests=_window(view, _OPENAI_WINDOWS["requests"], now),
            tokens=_window(view, _OPENAI_WINDOWS["tokens"], now),
            provider="openai",
            retry_after=retry_after,
        )
    return QuotaSnapshot(retry_after=retry_after)


class Outcome(enum.StrEnum):
    """What kind of reply the upstream gave: decides retrying and congestion control."""

    SUCCESS = "success"
    """The request was served."""
    THROTTLED = "throttled"
    """Rate limited (429): our traffic is above our quota. Retry after a while; congestion."""
    QUOTA_EXHAUSTED = "quota_exhausted"
    """Out of credit, or out of a per-day quota: retrying will not help until it resets."""
    OVERLOADED = "overloaded"
    """The service as a whole is busy (503, 529): retry later; congestion."""
    RETRYABLE = "retryable"
    """A transient failure (500, 502, 504, 408, 409): retry within budget; not congestion."""
    FATAL = "fatal"
    """The request itself was refused (400, 401, 403, 404, 413, 422, ...): do not retry."""


_RETRYABLE_OUTCOMES = frozenset({Outcome.THROTTLED, Outcome.OVERLOADED, Outcome.RETRYABLE})
_CONGESTION_OUTCOMES = frozenset({Outcome.THROTTLED, Outcome.OVERLOADED})


@dataclass(frozen=True, slots=True)
class Classification:
    """What :func:`classify_error_body` made of a reply.

    Attributes:
        kind: the :class:`Outcome`.
        retry_after: seconds to wait before trying again, if the upstream said (a
            Retry-After header, else Gemini's ``RetryInfo.retryDelay``), within
            ``[0, MAX_RETRY_AFTER]``.
        code: the provider's error code or type (``"rate_limit_exceeded"``,
            ``"overloaded_error"``, ``"RESOURCE_EXHAUSTED"``), if the body named one.
        message: an excerpt of the provider's message, at most
            :data:`MESSAGE_EXCERPT_CHARS` characters.
        should_retry: OpenAI's ``x-should-retry`` header (True/False), None if absent.
        regain_at: for QUOTA_EXHAUSTED, the Unix time (wall clock) the quota comes back,
            where the body states it (Anthropic's spend cap: "You will regain access on
            2026-12-01 at 00:00 UTC") or the provider documents it (a Gemini API per-day
            quota: the next midnight Pacific time after the reply); else None, as for
            every other outcome. Believed up to :data:`MAX_REGAIN` after the reply's
            time; a stated time already past is kept as stated (the quota is back).
            Distinct from ``retry_after``: Gemini's per-day refusal still says "retry in
            26 s", which only ends in another refusal before ``regain_at``.
        reason: for QUOTA_EXHAUSTED, a short sentence fragment saying what ran out and
            when it returns, fit for an alert ("Anthropic spend cap reached; regain
            2026-12-01T00:00Z"); None for every other outcome.
    """

    kind: Outcome
    retry_after: float | None = None
    code: str | None = None
    message: str | None = None
    should_retry: bool | None = None
    regain_at: float | None = None
    reason: str | None = None

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed.

        THROTTLED, OVERLOADED and RETRYABLE are; SUCCESS, QUOTA_EXHAUSTED and FATAL are
        not. An ``x-should-retry`` header overrides this for every outcome except SUCCESS
        (nothing to retry) and QUOTA_EXHAUSTED (an explicit "out of credit" or "daily
        quota gone" is more specific than a generic hint). Retry-After and the retry
        budget still decide when, and whether, a retry is sent.
        """
        if self.kind is Outcome.SUCCESS or self.kind is Outcome.QUOTA_EXHAUSTED:
            return False
        if self.should_retry is not None:
            return self.should_retry
        return self.kind in _RETRYABLE_OUTCOMES

    @property
    def congestion(self) -> bool:
        """Whether this reply says "too much traffic" (THROTTLED or OVERLOADED).

        A congestion signal should cut the concurrency limit; a RETRYABLE failure should not.
        """
        return self.kind in _CONGESTION_OUTCOMES


_SUCCESS = Classification(Outcome.SUCCESS)

# Provider error codes/types/statuses (lowercased) that name the outcome outright.
_BILLING_NAMES = frozenset({"billing_error", "billing_hard_limit_reached", "billing_not_active"})
_THROTTLED_NAMES = frozenset({"rate_limit_exceeded", "rate_limit_error", "resource_exhausted"})
_OVERLOADED_NAMES = frozenset({"overloaded_error"})
_RETRYABLE_NAMES = frozenset(
    {"api_error", "server_error", "internal", "timeout_error", "deadline_exceeded"}
)
_PER_DAY = re.compile(r"per[ _-]?day", re.IGNORECASE)
# The Gemini API's own quotas ("generativelanguage.googleapis.com/generate_content_free_tier_
# requests"): Google documents that their per-day counts reset at midnight Pacific time. Other
# Google services (Vertex AI, Code Assist) do not say, so their per-day refusals get no regain.
_GEMINI_API_METRIC = "generativelanguage.googleapis.com/"
_PACIFIC = "America/Los_Angeles"

# Anthropic's messages for a spent account, seen as a 400 invalid_request_error (the spend cap
# the organisation set, an empty balance) or a 429 rate_limit_error (the monthly spend limit):
# not bad requests and not rate limits, since waiting minutes does not bring them back.
_SPEND_CAP = re.compile(r"reached your specified API usage limits", re.IGNORECASE)
_SPEND_LIMIT = re.compile(r"\bspend(?:ing)? limit", re.IGNORECASE)
_NO_CREDIT = re.compile(r"credit balance is too low", re.IGNORECASE)
# DeepSeek's 402 (also sent with other statuses through proxies): "Insufficient Balance".
_NO_BALANCE = re.compile(r"insufficient balance", re.IGNORECASE)

# "You will regain access on 2026-12-01 at 00:00 UTC.", or with a month name ("December 1,
# 2026", "1 Dec 2026"), an optional 12-hour clock, seconds, or a T. The zone must be stated as
# UTC: a regain time is read only where it cannot be read wrong.
_MONTH_NAMES = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, 1)} | {
    name[:3]: number for number, name in enumerate(_MONTH_NAMES, 1)
}
_MONTHS["sept"] = 9
_REGAIN = re.compile(
    r"regain\s+access\s+(?:on\s+)?"
    r"(?:(?P<y1>\d{4})-(?P<m1>\d{1,2})-(?P<d1>\d{1,2})"
    r"|(?P<mon2>[a-z]+)\.?\s+(?P<d2>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y2>\d{4})"
    r"|(?P<d3>\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<mon3>[a-z]+)\.?,?\s+(?P<y3>\d{4}))"
    r"(?:\s*,?\s*(?:at\s+)?|T)(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2}))?\s*(?P<ampm>[ap]\.?m\.?)?"
    r"\s*(?:UTC|GMT|Z|[+]00:?00)(?![a-z0-9])",
    re.IGNORECASE | re.ASCII,
)
# OpenAI answers a single request larger than the whole TPM window with a 429
# rate_limit_exceeded that no amount of waiting will cure.
_TOO_LARGE = re.compile(r"\s*request too large", re.IGNORECASE)
# A refusal for too many requests in flight, not for a rate: Anthropic's "Number of
# concurrent connections has exceeded your rate limit", a gateway's "Too many concurrent
# requests", "concurrency limit reached".
_CONCURRENCY = re.compile(r"\bconcurren(?:t|cy)\b", re.IGNORECASE)


def names_concurrency(message: str | None) -> bool:
    """Whether an error message says the refusal is for too many requests in flight.

    Such a 429 says nothing of a rate: waiting for a slot helps, pacing slower does not
    (a concurrency limit's signal, as a refusal that comes after the request was worked
    on is). ``message`` is a body's message (``Classification.message``); None: no.
    """
    return message is not None and _CONCURRENCY.search(message) is not None


@dataclass(frozen=True, slots=True)
class _Report:
    """What a provider's error body says, whatever its shape."""

    names: frozenset[str]  # lowercased code / type / status strings
    code: str | None
    message: str | None
    is_error: bool  # an "error" key, or Anthropic's top-level "type": "error"
    is_envelope: bool  # Anthropic's top-level "type": "error"
    per_day: bool  # a Google QuotaFailure or ErrorInfo naming a per-day quota
    gemini_api: bool  # ... of the Gemini API itself (whose days end at midnight Pacific)
    retry_delay: float | None  # Gemini RetryInfo.retryDelay


def _excerpt(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text:
        return None
    if len(text) <= MESSAGE_EXCERPT_CHARS:
        return text
    return text[: MESSAGE_EXCERPT_CHARS - 1] + "…"


def _load(body: bytes | str | None) -> object:
    if not body or len(body) > MAX_BODY_CHARS:
        return None
    try:
        return orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return None


def _per_day_quota(entry: object, keys: tuple[str, ...]) -> str | None:
    """The quota metric (or "") of a violation naming a per-day quota, else None."""
    if not isinstance(entry, dict):
        return None
    if not any(isinstance(entry.get(key), str) and _PER_DAY.search(entry[key]) for key in keys):
        return None
    metric = entry.get("quotaMetric", entry.get("quota_metric"))
    return metric if isinstance(metric, str) else ""


def _read_details(details: object) -> tuple[bool, bool, float | None]:
    """Google's ``error.details``: (a per-day quota failed, all of them the Gemini API's,
    the RetryInfo delay)."""
    metrics: list[str] = []
    retry_delay = None
    if not isinstance(details, list):
        return False, False, retry_delay
    for detail in details:
        if not isinstance(detail, dict):
            continue
        kind = detail.get("@type")
        if not isinstance(kind, str):
            continue
        if kind.endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, str) and retry_delay is None:
                seconds = parse_duration(delay)
                retry_delay = None if seconds is None else _clamp(seconds)
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            if isinstance(violations, list):
                for violation in violations:
                    metric = _per_day_quota(violation, ("quotaId", "quotaMetric", "description"))
                    if metric is not None:
                        metrics.append(metric)
        elif kind.endswith("google.rpc.ErrorInfo"):
            # Code Assist names its per-day quota only here ("...RequestsPerDayPerUser...").
            metric = _per_day_quota(detail.get("metadata"), ("quota_limit", "quota_metric"))
            if metric is not None:
                metrics.append(metric)
    gemini_api = bool(metrics) and all(m.startswith(_GEMINI_API_METRIC) for m in metrics)
    return bool(metrics), gemini_api, retry_delay


def _read(body: bytes | str | None) -> _Report | None:
    """Whatever error report a body holds (OpenAI, Anthropic, Gemini, or a list of them)."""
    doc = _load(body)
    if isinstance(doc, list):
        # Gemini sometimes wraps its error object in a list.
        doc = next((item for item in doc if isinstance(item, dict)), None)
    if not isinstance(doc, dict):
        return None
    is_envelope = doc.get("type") == "error"
    error = doc.get("error")
    source = error if isinstance(error, dict) else doc
    # Most specific first: OpenAI's code, Gemini's status, then the type (Anthropic's only).
    names = [
        name
        for name in (source.get("code"), source.get("status"), source.get("type"))
        # Anthropic's envelope says "type": "error" at the top; that names no error.
        if isinstance(name, str) and name and name != "error"
    ]
    message = source.get("message")
    if message is None:
        message = error if isinstance(error, str) else doc.get("detail")
    per_day, gemini_api, retry_delay = _read_details(source.get("details"))
    return _Report(
        names=frozenset(name.lower() for name in names),
        code=_excerpt(names[0]) if names else None,
        message=_excerpt(message),
        is_error=error is not None or is_envelope,
        is_envelope=is_envelope,
        per_day=per_day,
        gemini_api=gemini_api,
        retry_delay=retry_delay,
    )


@dataclass(frozen=True, slots=True)
class _Exhaustion:
    """Why the quota is gone and when it comes back (Unix time), as a body says."""

    reason: str
    regain_at: float | None = None


_PAYMENT_REQUIRED = _Exhaustion("Payment required (HTTP 402)")


def _utc_regain(message: str) -> float | None:
    """The instant in "regain access on <date> at <time> UTC", or None if not certain."""
    match = _REGAIN.search(message)
    if match is None:
        return None
    parts = match.groupdict()
    year = parts["y1"] or parts["y2"] or parts["y3"]
    day = parts["d1"] or parts["d2"] or parts["d3"]
    month_name = (parts["mon2"] or parts["mon3"] or "").lower()
    month = int(parts["m1"]) if parts["m1"] else _MONTHS.get(month_name)
    hour, minute, second = int(parts["h"]), int(parts["mi"]), int(parts["s"] or 0)
    if month is None:
        return None
    if parts["ampm"]:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if parts["ampm"][0] in "pP" else 0)
    try:
        return datetime(int(year), month, int(day), hour, minute, second, tzinfo=UTC).timestamp()
    except (ValueError, OverflowError):
        return None


def _next_midnight(now: float | None, zone_name: str) -> float | None:
    """Unix time of the first midnight in ``zone_name`` after ``now`` (None: no now)."""
    if now is None:
        return None
    try:
        zone = ZoneInfo(zone_name)
        tomorrow = datetime.fromtimestamp(now, zone).date() + timedelta(days=1)
        # A midnight a DST jump skips maps to the jump itself: the day starts then.
        return datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=zone).timestamp()
    except (ValueError, OverflowError, OSError, KeyError):
        # NaN or a time out of range; or no tz database: no regain rather than a wrong one.
        return None


def _exhaustion(report: _Report, now: float | None) -> _Exhaustion | None:
    """What ran out, if the body says the account's quota or credit is gone."""
    message = report.message or ""
    names = report.names
    if _SPEND_CAP.search(message):
        return _Exhaustion("Anthropic spend cap reached", _utc_regain(message))
    if _SPEND_LIMIT.search(message):
        return _Exhaustion("Anthropic monthly spend limit reached")
    if _NO_CREDIT.search(message):
        return _Exhaustion("Anthropic credit balance too low")
    if report.per_day:
        if report.gemini_api:
            return _Exhaustion("Gemini per-day quota exhausted", _next_midnight(now, _PACIFIC))
        return _Exhaustion("Google per-day quota exhausted")
    if "insufficient_quota" in names:
        return _Exhaustion("OpenAI quota exhausted (insufficient_quota)")
    billing = sorted(names & _BILLING_NAMES)
    if billing:
        return _Exhaustion(f"Billing stopped the account ({billing[0]})")
    if _NO_BALANCE.search(message):
        return _Exhaustion("Insufficient balance")
    return None


def _regain(found: _Exhaustion | None, now: float | None) -> tuple[float | None, str | None]:
    """(regain_at, reason) of an exhaustion: a regain past belief dropped, the reason completed."""
    if found is None:
        return None, None
    regain_at = found.regain_at
    if regain_at is not None and now is not None and not regain_at - now <= MAX_REGAIN:
        regain_at = None  # beyond MAX_REGAIN, or now is NaN
    reason = found.reason
    if regain_at is not None:
        when = datetime.fromtimestamp(regain_at, UTC)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ" if when.second else "%Y-%m-%dT%H:%MZ")
        reason = f"{reason}; regain {stamp}"
    return regain_at, reason


def _named_outcome(report: _Report) -> Outcome | None:
    """The outcome the body names outright, if it names one (exhaustion aside)."""
    names = report.names
    message = report.message or ""
    if not names.isdisjoint(_OVERLOADED_NAMES):
        return Outcome.OVERLOADED
    if not names.isdisjoint(_THROTTLED_NAMES):
        return Outcome.FATAL if _TOO_LARGE.match(message) else Outcome.THROTTLED
    if not names.isdisjoint(_RETRYABLE_NAMES):
        return Outcome.RETRYABLE
    return None


def _status_outcome(status: int) -> Outcome:
    """The outcome the HTTP status alone implies."""
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status == 429:
        return Outcome.THROTTLED
    if status == 402:
        return Outcome.QUOTA_EXHAUSTED
    if status in (503, 529):
        return Outcome.OVERLOADED
    # 408 (the server timed out waiting for us) and 409 (OpenAI's lock timeout) are
    # retried by the official SDKs, like every 5xx.
    if status in (408, 409) or 500 <= status < 600:
        return Outcome.RETRYABLE
    return Outcome.FATAL


_BOOLEANS = {"true": True, "false": False}


def _should_retry(view: Mapping[str, str]) -> bool | None:
    text = view.get("x-should-retry")
    if text is None:
        return None
    return _BOOLEANS.get(text.strip().lower())


def _may_hold_error(body: bytes | str | None) -> bool:
    # A cheap scan before parsing a 200 body: an error report has an "error" key. On
    # every success; bytes' ``rfind`` scans a body in half the time of its ``in``.
    if isinstance(body, bytes):
        return body.rfind(b'"error"') >= 0
    return isinstance(body, str) and '"error"' in body


def classify_error_body(
    status: int,
    body: bytes | str | None,
    headers: HeadersLike | None = None,
    *,
    now: float | None = None,
) -> Classification:
    """Tell what kind of reply this is, and what the upstream said about retrying.

    The status decides, refined by the body:

    - 2xx is SUCCESS, unless the body is a JSON object with ``"type": "error"``
      (Anthropic reports ``overloaded_error`` that way inside a 200); then the body's
      error type decides, and an unknown one is FATAL.
    - 429 is THROTTLED; 402 is QUOTA_EXHAUSTED; 503 and 529 are OVERLOADED.
    - 408, 409 and the other 5xx are RETRYABLE: transient, but not congestion. A 504 is a
      proxy's timeout, usually a long generation rather than a busy service, so it does not
      cut the concurrency limit; a 408 is our own connection idling out.
    - Any other status (other 4xx, 1xx, 3xx, nonsense) is FATAL.

    A body that says the account is spent overrides the status, whatever it is (a 400, a
    403, a 429): QUOTA_EXHAUSTED, with a ``reason`` for an alert and, where known, the
    ``regain_at`` time. These are Anthropic's spend cap ("You have reached your specified
    API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.": regain at that
    instant; a date that is missing, malformed, not in UTC or more than
    :data:`MAX_REGAIN` ahead gives none), its monthly spend limit and "credit balance is
    too low"; OpenAI's ``insufficient_quota`` (as type or code) and billing errors; a
    Google ``QuotaFailure`` or ``ErrorInfo`` naming a per-day quota (regain at the next
    midnight Pacific time after ``now`` for the Gemini API's own quotas, as Google
    documents; none for other Google services); DeepSeek's "Insufficient Balance". A 402
    whose body says nothing of the kind is QUOTA_EXHAUSTED too ("Payment required").

    A body that names another error overrides the status too:
    ``overloaded_error`` is OVERLOADED; ``rate_limit_exceeded``, ``rate_limit_error``
    and Gemini's other ``RESOURCE_EXHAUSTED`` are THROTTLED, except OpenAI's "Request too
    large" (one request above the whole window: waiting never helps), which is FATAL.
    Generic server-error names never override the status.

    ``retry_after`` comes from the headers (the rules of :func:`parse_retry_after`; an
    HTTP date needs ``now``, numbers do not), else from Gemini's ``RetryInfo.retryDelay``.
    ``x-should-retry`` is kept in ``should_retry`` and overrides
    :attr:`Classification.retryable` (see there). Nothing here raises: an empty, HTML or
    otherwise unreadable body leaves the status to decide alone.

    Args:
        status: the HTTP status code.
        body: the reply body (only bodies up to :data:`MAX_BODY_CHARS` are parsed).
        headers: the reply's headers, if at hand.
        now: the reply's time in Unix seconds (its ``Date`` header, else the wall clock),
            to resolve a Retry-After date and a regain the provider documents relative to
            it (a Gemini per-day quota); without it neither is given.
    """
    report: _Report | None
    found: _Exhaustion | None = None
    if 200 <= status < 300:
        report = _read(body) if _may_hold_error(body) else None
        if report is None or not report.is_envelope:
            return _SUCCESS
        found = _exhaustion(report, now)
        kind = Outcome.QUOTA_EXHAUSTED if found else _named_outcome(report) or Outcome.FATAL
    else:
        report = _read(body)
        named = None
        if report is not None:
            found = _exhaustion(report, now)
            named = Outcome.QUOTA_EXHAUSTED if found else _named_outcome(report)
        kind = (
            named
            if named is not None and named is not Outcome.RETRYABLE
            else _status_outcome(status)
        )
        if kind is Outcome.QUOTA_EXHAUSTED and found is None:
            found = _PAYMENT_REQUIRED
    view = _lower_view(headers)
    retry_after = _retry_after(view, now)
    if retry_after is None and report is not None:
        retry_after = report.retry_delay
    regain_at, reason = _regain(found, now)
    return Classification(
        kind,
        retry_after=retry_after,
        code=report.code if report is not None else None,
        message=report.message if report is not None else None,
        should_retry=_should_retry(view),
        regain_at=regain_at,
        reason=reason,
    )


def classify_stream_event(data: bytes | str, *, now: float | None = None) -> Classification | None:
    """Classify one server-sent event's ``data:`` payload, or None if it is not an error.

    Anthropic reports trouble in the middle of a 200 stream as
    ``{"type": "error", "error": {"type": "overloaded_error", "message": ...}}``;
    OpenAI-compatible servers as ``{"error": {...}}``. The error decides as in
    :func:`classify_error_body` (a spent account → QUOTA_EXHAUSTED with its ``reason``
    and ``regain_at``, ``overloaded_error`` → OVERLOADED, ``rate_limit_error`` →
    THROTTLED, ``api_error`` → RETRYABLE, ...); an error with an unknown name is FATAL.
    Ordinary events, ``[DONE]`` and garbage give None.

    Args:
        data: the event's data.
        now: Unix time of the reply, for a regain the provider states relative to it (a
            Gemini per-day quota); a stated date needs none.
    """
    report = _read(data)
    if report is None or not report.is_error:
        return None
    found = _exhaustion(report, now)
    regain_at, reason = _regain(found, now)
    return Classification(
        Outcome.QUOTA_EXHAUSTED if found else _named_outcome(report) or Outcome.FATAL,
        retry_after=report.retry_delay,
        code=report.code,
        message=report.message,
        regain_at=regain_at,
        reason=reason,
    )
