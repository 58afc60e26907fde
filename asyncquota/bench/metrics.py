"""What a run measured: a compact request log, and the figures the report is made of.

The :class:`RequestLog` holds one row per request (class, start, end, outcome) in flat
arrays, so 100 000 requests cost under 2 MB and cross a process boundary cheaply.
:func:`summarize` turns a log and the upstream's counts into one strategy's result; it is
pure (no clock, no I/O), so a hand-built log pins its arithmetic.

Definitions:

- the *busy window* runs from the first request's start to the last request's end (or to
  the moment the run was stopped, if some request never ended);
- ``goodput_rps`` is the requests answered within their deadline per second of the busy
  window; ``goodput_ratio`` divides that count by the upstream's request quota over the
  same window: its rate integrated over the window's length, following its capacity
  schedule (the schedule counts from the upstream's first request, which is the window's
  start). The upstream's bucket starts full, so a strategy may reach slightly above 1.0;
- percentiles are nearest-rank over the values (``p99`` of 100 values is the 99th
  smallest); a percentile of nothing is None;
- latencies are those of answered requests (``ok``), per class; ``reject_ms`` is the time
  to a shed outcome.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..testing import UpstreamConfig
from .outcomes import NO_OUTCOME, Outcome, is_error
from .sessions import CLASSES

__all__ = ["RequestLog", "percentile", "request_quota", "summarize"]


class RequestLog:
    """One row per request started: its class code, start, end and outcome code.

    Times are in seconds from the run's start. A row's outcome is ``NO_OUTCOME`` until
    :meth:`end` records one, which it does exactly once.
    """

    __slots__ = ("classes", "ends", "ok", "outcomes", "starts")

    def __init__(self) -> None:
        self.classes = array("b")
        self.starts = array("d")
        self.ends = array("d")
        self.outcomes = array("b")
        self.ok = 0

    def __len__(self) -> int:
        return len(self.outcomes)

    def __repr__(self) -> str:
        return f"<RequestLog requests={len(self)} ok={self.ok} open={self.open}>"

    def begin(self, class_code: int, now: float) -> int:
        """Open a row for a request of class ``class_code`` started at ``now``; its index."""
        self.classes.append(class_code)
        self.starts.append(now)
        self.ends.append(math.nan)
        self.outcomes.append(NO_OUTCOME)
        return len(self.outcomes) - 1

    def end(self, index: int, now: float, outcome: Outcome) -> None:
        """Record how request ``index`` ended.

        Raises:
            ValueError: it had already ended (an outcome is recorded once).
        """
        if self.outcomes[index] != NO_OUTCOME:
            raise ValueError(f"Request {index} already ended; an outcome is recorded once.")
        self.ends[index] = now
        self.outcomes[index] = outcome
        if outcome == Outcome.OK:
            self.ok += 1

    @property
    def open(self) -> int:
        """Requests started and not ended."""
        return self.outcomes.count(NO_OUTCOME)

    @classmethod
    def from_rows(
        cls, rows: Iterable[tuple[int, float, float | None, Outcome | None]]
    ) -> RequestLog:
        """A log from ``(class_code, start, end, outcome)`` rows; None for a request still open."""
        log = cls()
        for class_code, start, end, outcome in rows:
            index = log.begin(class_code, start)
            if outcome is not None and end is not None:
                log.end(index, end, outcome)
        return log


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of values sorted ascending."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def request_quota(config: UpstreamConfig, seconds: float) -> float:
    """Requests the upstream's rate admits over its first ``seconds``, following its schedule."""
    steps = [(0.0, 1.0), *config.schedule] if not config.schedule or config.schedule[0][0] > 0 \
        else list(config.schedule)
    total = 0.0
    for i, (start, factor) in enumerate(steps):
        end = steps[i + 1][0] if i + 1 < len(steps) else math.inf
        if start >= seconds:
            break
        total += config.rps * factor * (min(end, seconds) - start)
    return total


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _p50_p99(values: list[float]) -> dict[str, float | None]:
    values.sort()
    return {"p50": _ms(percentile(values, 50)), "p99": _ms(percentile(values, 99))}


def summarize(
    log: RequestLog,
    *,
    config: UpstreamConfig,
    deadlines: Mapping[str, float],
    upstream_totals: Mapping[str, Any],
    stopped_at: float,
) -> dict[str, Any]:
    """One strategy's figures, with every key of the report's ``results`` entries.

    Args:
        log: the requests of the run.
        config: the upstream that served them (its rate and schedule make the quota).
        deadlines: seconds each class waits (``{"interactive": 10, "batch": 120}``).
        upstream_totals: the upstream's own counts (``requests``, ``ok``, ``429``, ``5xx``).
        stopped_at: when the run stopped, in the log's time; the end of the busy window
            when some request never ended.

    The process figures (``cpu_s``, ``peak_rss_mb``, ``wall_s``) are added by the runner.
    """
    latencies: dict[str, list[float]] = {name: [] for name in CLASSES}
    rejects: list[float] = []
    counts = dict.fromkeys(Outcome, 0)
    in_deadline = dict.fromkeys(CLASSES, 0)
    requests_by_class = dict.fromkeys(CLASSES, 0)
    lost = 0
    first = math.inf
    last = -math.inf
    for class_code, start, end, code in zip(
        log.classes, log.starts, log.ends, log.outcomes, strict=True
    ):
        name = CLASSES[class_code]
        requests_by_class[name] += 1
        first = min(first, start)
        if code == NO_OUTCOME:
            lost += 1
            last = max(last, stopped_at)
            continue
        last = max(last, end)
        outcome = Outcome(code)
        counts[outcome] += 1
        took = end - start
        if outcome == Outcome.OK:
            latencies[name].append(took)
            if took <= deadlines[name]:
                in_deadline[name] += 1
        elif outcome == Outcome.SHED:
            rejects.append(took)
    window = max(0.0, last - first) if log else 0.0
    quota = request_quota(config, window)
    ok_in_deadline = sum(in_deadline.values())
    upstream_requests = int(upstream_totals.get("requests", 0))
    upstream_429 = int(upstream_totals.get("429", 0))
    return {
        "requests": len(log),
        "ok": counts[Outcome.OK],
        "ok_in_deadline": ok_in_deadline,
        "shed": counts[Outcome.SHED],
        "deadline_exceeded": counts[Outcome.DEADLINE_EXCEEDED],
        "errors": sum(n for outcome, n in counts.items() if is_error(outcome)),
        "lost": lost,
        "goodput_rps": round(ok_in_deadline / window, 2) if window > 0 else 0.0,
        "goodput_ratio": round(ok_in_deadline / quota, 4) if quota > 0 else 0.0,
        "upstream_requests": upstream_requests,
        "upstream_429": upstream_429,
        "upstream_429_ratio": round(upstream_429 / upstream_requests, 4)
        if upstream_requests
        else 0.0,
        "latency_ms": {name: _p50_p99(latencies[name]) for name in CLASSES},
        "ok_in_deadline_by_class": in_deadline,
        "reject_ms": _p50_p99(rejects),
        "requests_by_class": requests_by_class,
        "outcomes": {outcome.label: n for outcome, n in counts.items()},
        "upstream_ok": int(upstream_totals.get("ok", 0)),
        "upstream_5xx": int(upstream_totals.get("5xx", 0)),
        "busy_window_s": round(window, 3),
        "quota_requests": round(quota, 1),
    }
