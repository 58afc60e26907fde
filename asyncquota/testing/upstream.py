"""A rate-limited LLM provider in a box: the model behind the mock handler and the server.

:class:`SimulatedUpstream` answers OpenAI chat completions and Anthropic messages the way a
provider under quota does. Each well-formed request passes, in order:

1. the account's credit (``insufficient_quota`` once it has run out, and in an
   ``exhausted`` window the provider's exhaustion reply: Anthropic's spend cap, OpenAI's
   ``insufficient_quota``);
2. the concurrency cap (over it: 429 at once, no Retry-After, like DeepSeek);
3. the penalty window, in penalty mode (inside it: 429, and the window grows);
4. the request bucket (no request left: 429 ``requests``);
5. the token bucket (prompt estimate + ``max_tokens`` reserved; short: 429 ``tokens``);

then it is in flight: it may stall, fail (500/503/529) or have its connection reset, else
it takes ``latency_base + latency_per_token * completion`` seconds, or a time drawn from
``reply_seconds`` (longer near the concurrency cap), and replies, its token reservation
reconciled to the tokens it produced. Every 429 from the buckets carries an honest
Retry-After: sending nothing else and coming back after it, the request is admitted (an
HTTP date is honest against the reply's ``Date``, or against a clock no later than the
upstream's).

Time is the running loop's, counted from the upstream's first request, so the same model
runs in virtual time under looptime and in real time in the server process. The wall clock
(``config.wall_clock``, ``clock_skew`` ahead) only renders dates.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..transport import Request, Response
from .buckets import ScheduledBucket, factor_at
from .config import UpstreamConfig
from .replies import (
    CHAT_PATH,
    JSON_TYPE,
    MESSAGES_PATH,
    SSE_TYPE,
    AnthropicDialect,
    Dialect,
    OpenAIDialect,
    Parsed,
    date_header,
    rate_limit_headers,
    retry_after_headers,
)

__all__ = ["SATURATION_KNEE", "SPEND_CAP_MESSAGE", "SimulatedUpstream", "spend_cap_body"]

SATURATION_KNEE = 0.8
"""Share of the concurrency cap in flight from which replies start to slow down."""

SPEND_CAP_MESSAGE = "You have reached your specified API usage limits."
"""The first sentence of Anthropic's spend-cap refusal (the second says when access returns)."""


def spend_cap_body(regain: float) -> bytes:
    """Anthropic's spend-cap 400 body, regaining access at Unix time ``regain``.

    The instant is rounded up to the second (never early) and written as Anthropic writes
    it, ``on 2026-12-01 at 00:00 UTC``, with the seconds when they are not zero.
    """
    stamp = time.gmtime(math.ceil(regain - 1e-6))
    when = time.strftime("%Y-%m-%d at %H:%M" + (":%S" if stamp.tm_sec else ""), stamp)
    message = f"{SPEND_CAP_MESSAGE} You will regain access on {when} UTC."
    return orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    )

# Timeline row fields, in order.
_REQUESTS, _OK, _THROTTLED, _FIVE_XX, _INFLIGHT_MAX, _ADMITTED_OK = range(6)

_FAULT_500, _FAULT_503, _FAULT_529, _FAULT_HANG, _FAULT_RESET = range(5)

_JSON_HEADERS = {"content-type": JSON_TYPE}


class SimulatedUpstream:
    """The model of a rate-limited LLM provider; ``handle`` is a MockTransport handler.

    Args:
        config: the provider to play.
    """

    __slots__ = (
        "_anthropic",
        "_clock",
        "_config",
        "_exhaustion",
        "_fault_thresholds",
        "_inflight",
        "_last_admitted",
        "_max_inflight",
        "_number",
        "_openai",
        "_outcomes",
        "_penalty_until",
        "_request_floor",
        "_requests",
        "_rng",
        "_t0",
        "_timeline",
        "_tokens",
        "_tokens_served",
        "_well_formed",
    )

    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._openai = OpenAIDialect(max_concurrency=config.max_concurrency)
        self._anthropic = AnthropicDialect(max_concurrency=config.max_concurrency)
        cumulative = 0.0
        thresholds = []
        for rate in (config.error_500_rate, config.error_503_rate, config.error_529_rate,
                     config.hang_rate, config.reset_rate):
            cumulative += rate
            thresholds.append(cumulative)
        self._fault_thresholds = tuple(thresholds)
        skew = config.clock_skew
        wall_clock = config.wall_clock
        self._clock: Callable[[], float] = (
            wall_clock if not skew else lambda: wall_clock() + skew
        )
        self._inflight = 0
        self.reset()

    def reset(self) -> None:
        """Start over: full buckets, zero statistics, the clock restarting at the next request.

        Requests still in flight finish normally; only the in-flight count survives.
        """
        config = self._config
        self._requests = ScheduledBucket(
            rate=config.rps, burst=config.burst_seconds, schedule=config.schedule
        )
        # A refused request's debt is bounded by one bucket (see UpstreamConfig.count_rejected).
        self._request_floor = -self._requests.capacity
        self._tokens = (
            ScheduledBucket(rate=config.tpm / 60.0, burst=60.0, schedule=config.schedule)
            if config.tpm is not None
            else None
        )
        self._rng = random.Random(config.seed)
        self._t0: float | None = None
        self._penalty_until = -math.inf
        self._number = 0
        self._well_formed = 0
        self._last_admitted: float | None = None
        self._max_inflight = self._inflight
        self._outcomes = {"ok": 0, "429": 0, "5xx": 0, "other": 0}
        self._tokens_served = [0, 0]
        self._timeline: list[list[int]] = []
        # Per exhausted window: requests refused in it, and when the first was.
        self._exhaustion: list[list[Any]] = [[0, None] for _ in config.exhausted]

    @property
    def config(self) -> UpstreamConfig:
        """The provider being played."""
        return self._config

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._inflight

    def __repr__(self) -> str:
        outcomes = self._outcomes
        return (
            f"<SimulatedUpstream requests={self._number} ok={outcomes['ok']} "
            f"429={outcomes['429']} 5xx={outcomes['5xx']} other={outcomes['other']} "
            f"inflight={self._inflight} rps={self._config.rps:g}>"
        )

    # -- time and bookkeeping ------------------------------------------------------------

    def _now(self) -> float:
        loop_time = asyncio.get_running_loop().time()
        if self._t0 is None:
            self._t0 = loop_time
        return loop_time - self._t0

    def _row(self, now: float) -> list[int]:
        second = int(now)
        timeline = self._timeline
        while len(timeline) <= second:
            timeline.append([0, 0, 0, 0, self._inflight, 0])
        return timeline[second]

    def _finish(self, now: float, status: int) -> None:
        """Count one request's outcome; status 0 means it got no reply at all."""
        row = self._row(now)
        if 200 <= status < 300:
            self._outcomes["ok"] += 1
            row[_OK] += 1
        elif status == 429:
            self._outcomes["429"] += 1
            row[_THROTTLED] += 1
        elif status >= 500:
            self._outcomes["5xx"] += 1
            row[_FIVE_XX] += 1
        else:
            self._outcomes["other"] += 1

    def _reply(self, now: float, status: int, body: bytes, headers: dict[str, str]) -> Response:
        self._finish(now, status)
        return Response(status=status, headers=self._dated(headers), body=body)

    def _dated(self, headers: dict[str, str]) -> dict[str, str]:
        """The headers with the upstream's ``Date``, when its clock is set apart from ours."""
        if self._config.clock_skew is None:
            return headers
        return {**headers, "date": date_header(self._clock())}

    def _quota_headers(self) -> dict[str, str]:
        config = self._config
        requests, tokens = self._requests, self._tokens
        per_minute = config.limit_header == "per_minute"
        return rate_limit_headers(
            config.headers_style,
            requests=(
                requests.rate * 60.0 if per_minute else requests.capacity,
                requests.level,
                requests.time_to_full(),
            ),
            tokens=(
                tokens.rate * 60.0 if per_minute else tokens.capacity,
                tokens.level,
                tokens.time_to_full(),
            )
            if tokens is not None
            else None,
            wall_clock=self._clock,
            reset_resolution=config.reset_resolution,
        )

    # -- the request path ----------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request as the provider would (a MockTransport handler).

        Raises:
            ConnectionResetError: the injected connection reset (a transport maps it to
                TransportError).
        """
        now = self._now()
        self._number += 1
        self._row(now)[_REQUESTS] += 1
        path = request.url.partition("?")[0]
        dialect: Dialect
        if path.endswith(CHAT_PATH):
            dialect = self._openai
        elif path.endswith(MESSAGES_PATH):
            dialect = self._anthropic
        else:
            return self._reply(now, 404, self._openai.not_found_body, _JSON_HEADERS)
        if request.method != "POST":
            return self._reply(
                now, 405, dialect.bad_request(f"Use POST on {path}."), _JSON_HEADERS
            )
        try:
            payload = orjson.loads(request.body or b"")
        except orjson.JSONDecodeError:
            return self._reply(
                now, 400, dialect.bad_request("The body is not valid JSON."), _JSON_HEADERS
            )
        parsed = dialect.parse(payload)
        if isinstance(parsed, str):
            return self._reply(now, 400, dialect.bad_request(parsed), _JSON_HEADERS)
        refusal = self._admit(now, dialect, parsed)
        if refusal is not None:
            return refusal
        return await self._serve(now, dialect, parsed)

    def _admit(self, now: float, dialect: Dialect, parsed: Parsed) -> Response | None:
        """Pass the request through credit, concurrency, penalty and buckets; None if admitted."""
        config = self._config
        self._well_formed += 1
        if (
            config.insufficient_quota_after is not None
            and self._well_formed > config.insufficient_quota_after
        ):
            return self._reply(
                now, dialect.insufficient_quota_status, dialect.insufficient_quota_body,
                _JSON_HEADERS,
            )
        for index, (start, end) in enumerate(config.exhausted):
            if start <= now < end:
                return self._exhausted(now, dialect, index, end)
        cost = parsed.prompt_tokens + parsed.max_tokens
        requests, tokens = self._requests, self._tokens
        requests.advance(now)
        if tokens is not None:
            tokens.advance(now)
        if config.max_concurrency is not None and self._inflight >= config.max_concurrency:
            self._count_refusal()
            # Nobody can say when a slot frees up, so no Retry-After (DeepSeek sends none).
            headers = {"content-type": JSON_TYPE, **self._quota_headers()}
            return self._reply(now, 429, dialect.concurrency_body, headers)
        if config.penalty and now < self._penalty_until:
            self._penalty_until += config.penalty_extension
            self._count_refusal()
            return self._throttle(now, dialect.throttled_requests_body, cost)
        if not requests.has(1.0):
            self._count_refusal()
            return self._throttle(now, dialect.throttled_requests_body, cost)
        requests.take(1.0)
        if tokens is not None:
            if not tokens.has(cost):
                if not config.count_rejected:
                    requests.give_back(1.0)
                return self._throttle(now, dialect.throttled_tokens_body, cost)
            tokens.take(cost)
        self._last_admitted = now
        return None

    def _exhausted(self, now: float, dialect: Dialect, window: int, end: float) -> Response:
        """The provider's word for a spent account, in window ``window`` (ending at ``end``)."""
        seen = self._exhaustion[window]
        seen[0] += 1
        if seen[1] is None:
            seen[1] = now
        if isinstance(dialect, AnthropicDialect):
            body = spend_cap_body(self._clock() + (end - now))
            return self._reply(now, 400, body, _JSON_HEADERS)
        return self._reply(
            now, dialect.insufficient_quota_status, dialect.insufficient_quota_body,
            _JSON_HEADERS,
        )

    def _count_refusal(self) -> None:
        if self._config.count_rejected:
            self._requests.take(1.0, floor=self._request_floor)

    def _throttle(self, now: float, body: bytes, cost: float) -> Response:
        """A 429 whose Retry-After is when one request and ``cost`` tokens both fit."""
        config = self._config
        wait = self._requests.time_until(1.0)
        if self._tokens is not None:
            wait = max(wait, self._tokens.time_until(cost))
        wait = max(wait, self._penalty_until - now)
        if config.penalty and math.isfinite(wait):
            self._penalty_until = now + wait
        headers = {
            "content-type": JSON_TYPE,
            **self._quota_headers(),
            **retry_after_headers(config.retry_after_style, wait, self._clock),
        }
        return self._reply(now, 429, body, headers)

    def _draw_fault(self) -> int | None:
        thresholds = self._fault_thresholds
        if thresholds[-1] <= 0.0:
            return None
        roll = self._rng.random()
        for fault, threshold in enumerate(thresholds):
            if roll < threshold:
                return fault
        return None

    async def _serve(self, start: float, dialect: Dialect, parsed: Parsed) -> Response:
        """The admitted request in flight: stall, fail, reset or reply; always reconciled."""
        config = self._config
        self._inflight += 1
        inflight = self._inflight
        if inflight > self._max_inflight:
            self._max_inflight = inflight
        row = self._row(start)
        if inflight > row[_INFLIGHT_MAX]:
            row[_INFLIGHT_MAX] = inflight
        number = self._number
        low = math.ceil(parsed.max_tokens / 4)
        completion = low + int(self._rng.random() * (parsed.max_tokens - low + 1))
        fault = self._draw_fault()
        # Until a reply says otherwise, the provider charges the whole completion: it keeps
        # generating when the caller walks away.
        produced = completion
        try:
            if fault == _FAULT_HANG:
                await asyncio.sleep(config.hang_seconds)
            if fault is not None and fault <= _FAULT_529:
                produced = 0
                await asyncio.sleep(config.latency_base)
                return self._fail(dialect, parsed, number, fault)
            if config.reply_seconds is None:
                latency = config.latency_base + config.latency_per_token * completion
            else:
                shortest, longest = config.reply_seconds
                latency = shortest + (longest - shortest) * self._rng.random()
            if config.max_concurrency is not None:
                load = inflight / config.max_concurrency
                if load > SATURATION_KNEE:
                    latency *= 1.0 + config.saturation_slowdown * (
                        (load - SATURATION_KNEE) / (1.0 - SATURATION_KNEE)
                    )
            await asyncio.sleep(latency)
            if fault == _FAULT_RESET:
                produced = 0
                raise ConnectionResetError("The simulated upstream reset the connection.")
        except BaseException:
            # Cancelled by the caller, or reset: the books are settled without a reply.
            self._finish(self._reconcile(parsed, produced), 0)
            raise
        created = int(self._clock())
        if parsed.stream:
            body, content_type = dialect.stream(parsed, number, completion, created), SSE_TYPE
        else:
            body, content_type = dialect.reply(parsed, number, completion, created), JSON_TYPE
        now = self._reconcile(parsed, completion)
        self._tokens_served[0] += parsed.prompt_tokens
        self._tokens_served[1] += completion
        headers = {"content-type": content_type, **self._quota_headers()}
        self._row(start)[_ADMITTED_OK] += 1
        return self._reply(now, 200, body, headers)

    def _fail(self, dialect: Dialect, parsed: Parsed, number: int, fault: int) -> Response:
        status = (500, 503, 529)[fault]
        if status == 529 and parsed.stream and isinstance(dialect, AnthropicDialect):
            # Anthropic may start a stream and then break it off as overloaded.
            body = dialect.stream(parsed, number, 0, 0, overloaded=True)
            now = self._reconcile(parsed, 0)
            self._finish(now, 529)
            return Response(
                status=200,
                headers=self._dated({"content-type": SSE_TYPE, **self._quota_headers()}),
                body=body,
            )
        now = self._reconcile(parsed, 0)
        headers = {"content-type": JSON_TYPE, **self._quota_headers()}
        return self._reply(now, status, dialect.server_error_bodies[status], headers)

    def _reconcile(self, parsed: Parsed, produced: int) -> float:
        """Leave the flight: return the unused reservation; the time, for the outcome."""
        now = self._now()
        self._inflight -= 1
        if self._tokens is not None:
            self._tokens.advance(now)
            self._tokens.give_back(parsed.max_tokens - produced)
        self._requests.advance(now)
        return now

    # -- statistics ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals and a per-second timeline, as plain JSON-ready data.

        ``totals``: requests, ok, 429, 5xx, other (400/404/405, resets, cancelled),
        inflight, max_inflight, prompt_tokens and completion_tokens (of successful replies),
        last_admitted_at (seconds from the first request to the last one admitted past the
        buckets, or None).
        ``exhausted``: one entry per ``exhausted`` window: its start and end, the requests
        refused in it, and first_refused_at (seconds from the first request, or None).
        ``timeline``: one entry per second since the first request: t, requests (arrived),
        ok, 429, 5xx (decided in that second), inflight_max, capacity_rps, and admitted_ok
        (admitted in that second and answered 200, whenever the answer came).
        """
        config = self._config
        totals: dict[str, Any] = {"requests": self._number, **self._outcomes}
        totals["inflight"] = self._inflight
        totals["max_inflight"] = self._max_inflight
        totals["prompt_tokens"], totals["completion_tokens"] = self._tokens_served
        totals["last_admitted_at"] = self._last_admitted
        timeline = [
            {
                "t": t,
                "requests": row[_REQUESTS],
                "ok": row[_OK],
                "429": row[_THROTTLED],
                "5xx": row[_FIVE_XX],
                "inflight_max": row[_INFLIGHT_MAX],
                "capacity_rps": config.rps * factor_at(config.schedule, float(t)),
                "admitted_ok": row[_ADMITTED_OK],
            }
            for t, row in enumerate(self._timeline)
        ]
        exhausted = [
            {"start": start, "end": end, "refused": refused, "first_refused_at": first}
            for (start, end), (refused, first) in zip(
                config.exhausted, self._exhaustion, strict=True
            )
        ]
        return {"totals": totals, "timeline": timeline, "exhausted": exhausted}
