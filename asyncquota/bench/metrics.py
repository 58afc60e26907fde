"""What a run measured: a compact request log, and the figures the report is made of.

The :class:`RequestLog` holds one row per request (class, tenant, start, end, outcome) in flat
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
- latencies are those of answered requests (``ok``), per class; ``shed`` counts the
  requests refused at once with nothing sent, those refused by their tenant's own tier
  included, and ``reject_ms`` is the time to such a refusal;
- with tenants, each tenant's figures are counted the same way over its own requests;
  its ``goodput_rps`` and ``goodput_ratio`` are over the run's busy window, so the
  tenants' add up to the run's.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..outcomes import REFUSED_OUTCOMES, RequestOutcome, is_error
from ..testing import UpstreamConfig
from .sessions import CLASSES, Priority

__all__ = [
    "NO_OUTCOME",
    "NO_TENANT",
    "RequestLog",
    "percentile",
    "queue_wait_ms",
    "request_quota",
    "summarize",
]

NO_TENANT = -1
"""The tenant code of a request that is nobody's (a crowd without tenants)."""

NO_OUTCOME = -1
"""The code a request log holds for a request that has not ended (yet)."""


class RequestLog:
    """One row per request started: its class code, tenant code, start, end and outcome code.

    Times are in seconds from the run's start. A row's outcome is ``NO_OUTCOME`` until
    :meth:`end` records one, which it does exactly once. A tenant code is the tenant's
    index in the session model's tenants, or ``NO_TENANT``.
    """

    __slots__ = ("classes", "ends", "ok", "outcomes", "starts", "tenants")

    def __init__(self) -> None:
        self.classes = array("b")
        self.tenants = array("b")
        self.starts = array("d")
        self.ends = array("d")
        self.outcomes = array("b")
        self.ok = 0

    def __len__(self) -> int:
        return len(self.outcomes)

    def __repr__(self) -> str:
        return f"<RequestLog requests={len(self)} ok={self.ok} open={self.open}>"

    def begin(self, class_code: int, now: float, tenant_code: int = NO_TENANT) -> int:
        """Open a row for a request of class ``class_code`` started at ``now``; its index."""
        self.classes.append(class_code)
        self.tenants.append(tenant_code)
        self.starts.append(now)
        self.ends.append(math.nan)
        self.outcomes.append(NO_OUTCOME)
        return len(self.outcomes) - 1

    def end(self, index: int, now: float, outcome: RequestOutcome) -> None:
        """Record how request ``index`` ended.

        Raises:
            ValueError: it had already ended (an outcome is recorded once).
        """
        if self.outcomes[index] != NO_OUTCOME:
            raise ValueError(f"Request {index} already ended; an outcome is recorded once.")
        self.ends[index] = now
        self.outcomes[index] = outcome
        if outcome == RequestOutcome.OK:
            self.ok += 1

    @property
    def open(self) -> int:
        """Requests started and not ended."""
        return self.outcomes.count(NO_OUTCOME)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[tuple[int, float, float | None, RequestOutcome | None]],
        *,
        tenant_codes: Iterable[int] | None = None,
    ) -> RequestLog:
        """A log from ``(class_code, start, end, outcome)`` rows; None for a request still open.

        ``tenant_codes`` gives each row's tenant, in order (None: nobody's).
        """
        log = cls()
        rows = list(rows)
        codes = [NO_TENANT] * len(rows) if tenant_codes is None else list(tenant_codes)
        for (class_code, start, end, outcome), tenant_code in zip(rows, codes, strict=True):
            index = log.begin(class_code, start, tenant_code)
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


def queue_wait_ms(
    waits: Mapping[str, Sequence[float]] | None,
) -> dict[str, dict[str, float | None]] | None:
    """p50 and p99 of the queue waits per class, in ms (None when nothing was measured)."""
    if waits is None:
        return None
    return {name: _p50_p99(sorted(waits.get(name, ()))) for name in CLASSES}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _p50_p99(values: list[float]) -> dict[str, float | None]:
    values.sort()
    return {"p50": _ms(percentile(values, 50)), "p99": _ms(percentile(values, 99))}


class _Tally:
    """What the requests of one group (all of them, or one tenant's) came to."""

    __slots__ = (
        "counts",
        "in_deadline",
        "latencies",
        "lost",
        "rejects",
        "requests_by_class",
        "tier_rejects",
    )

    def __init__(self) -> None:
        self.counts = dict.fromkeys(RequestOutcome, 0)
        self.in_deadline = dict.fromkeys(CLASSES, 0)
        self.requests_by_class = dict.fromkeys(CLASSES, 0)
        self.latencies: dict[str, list[float]] = {name: [] for name in CLASSES}
        self.rejects: list[float] = []
        self.tier_rejects: list[float] = []
        self.lost = 0

    def add(self, name: Priority, took: float, code: int, deadline: float) -> None:
        """Count one request of class ``name`` that ended with ``code`` after ``took`` s."""
        self.requests_by_class[name] += 1
        if code == NO_OUTCOME:
            self.lost += 1
            return
        outcome = RequestOutcome(code)
        self.counts[outcome] += 1
        if outcome == RequestOutcome.OK:
            self.latencies[name].append(took)
            if took <= deadline:
                self.in_deadline[name] += 1
        elif outcome in REFUSED_OUTCOMES:
            self.rejects.append(took)
            if outcome == RequestOutcome.TENANT_LIMIT:
                self.tier_rejects.append(took)

    @property
    def requests(self) -> int:
        return sum(self.requests_by_class.values())

    @property
    def ok_in_deadline(self) -> int:
        return sum(self.in_deadline.values())

    def figures(self) -> dict[str, Any]:
        """The counts every group reports."""
        counts = self.counts
        return {
            "requests": self.requests,
            "ok": counts[RequestOutcome.OK],
            "ok_in_deadline": self.ok_in_deadline,
            "shed": sum(counts[outcome] for outcome in REFUSED_OUTCOMES),
            "deadline_exceeded": counts[RequestOutcome.DEADLINE_EXCEEDED],
            "errors": sum(n for outcome, n in counts.items() if is_error(outcome)),
            "lost": self.lost,
        }


def summarize(
    log: RequestLog,
    *,
    config: UpstreamConfig,
    deadlines: Mapping[str, float],
    upstream_totals: Mapping[str, Any],
    stopped_at: float,
    tenants: Sequence[str] = (),
) -> dict[str, Any]:
    """One strategy's figures, with every key of the report's ``results`` entries.

    Args:
        log: the requests of the run.
        config: the upstream that served them (its rate and schedule make the quota).
        deadlines: seconds each class waits (``{"interactive": 10, "batch": 120}``).
        upstream_totals: the upstream's own counts (``requests``, ``ok``, ``429``, ``5xx``).
        stopped_at: when the run stopped, in the log's time; the end of the busy window
            when some request never ended.
        tenants: the tenants' names, by tenant code. When there are some, the result has a
            ``tenants`` entry: for each, its counts, ``served_ratio`` (answered within the
            deadline ÷ requests), ``goodput_rps`` and ``goodput_ratio`` (over the run's busy
            window, so the tenants' add up to the run's; the ratio is the tenant's share of
            the upstream's quota, to compare with its tier's), ``upstream_share`` (its answers ÷ the
            upstream's successful replies), ``tier_refused`` (refused by its own tier),
            ``reject_ms`` (how fast its refusals came) and ``tier_reject_ms`` (how fast
            those of its tier came).

    The process figures (``cpu_s``, ``peak_rss_mb``, ``wall_s``) are added by the runner.
    """
    total = _Tally()
    by_tenant = [_Tally() for _ in tenants]
    first = math.inf
    last = -math.inf
    for class_code, tenant_code, start, end, code in zip(
        log.classes, log.tenants, log.starts, log.ends, log.outcomes, strict=True
    ):
        name = CLASSES[class_code]
        first = min(first, start)
        last = max(last, stopped_at if code == NO_OUTCOME else end)
        total.add(name, end - start, code, deadlines[name])
        if tenant_code != NO_TENANT and by_tenant:
            by_tenant[tenant_code].add(name, end - start, code, deadlines[name])
    window = max(0.0, last - first) if log else 0.0
    quota = request_quota(config, window)
    ok_in_deadline = total.ok_in_deadline
    upstream_requests = int(upstream_totals.get("requests", 0))
    upstream_429 = int(upstream_totals.get("429", 0))
    upstream_ok = int(upstream_totals.get("ok", 0))
    result = {
        **total.figures(),
        "goodput_rps": _per_second(ok_in_deadline, window),
        "goodput_ratio": round(ok_in_deadline / quota, 4) if quota > 0 else 0.0,
        "upstream_requests": upstream_requests,
        "upstream_429": upstream_429,
        "upstream_429_ratio": round(upstream_429 / upstream_requests, 4)
        if upstream_requests
        else 0.0,
        "latency_ms": {name: _p50_p99(total.latencies[name]) for name in CLASSES},
        "ok_in_deadline_by_class": total.in_deadline,
        "reject_ms": _p50_p99(total.rejects),
        "requests_by_class": total.requests_by_class,
        "outcomes": {outcome.label: n for outcome, n in total.counts.items()},
        "upstream_ok": upstream_ok,
        "upstream_5xx": int(upstream_totals.get("5xx", 0)),
        "busy_window_s": round(window, 3),
        "quota_requests": round(quota, 1),
    }
    if tenants:
        result["tenants"] = {
            name: _tenant_figures(tally, window=window, quota=quota, upstream_ok=upstream_ok)
            for name, tally in zip(tenants, by_tenant, strict=True)
        }
    return result


def _per_second(count: int, window: float) -> float:
    return round(count / window, 2) if window > 0 else 0.0


def _tenant_figures(
    tally: _Tally, *, window: float, quota: float, upstream_ok: int
) -> dict[str, Any]:
    figures = tally.figures()
    return {
        **figures,
        "served_ratio": round(figures["ok_in_deadline"] / figures["requests"], 4)
        if figures["requests"]
        else 0.0,
        "goodput_rps": _per_second(figures["ok_in_deadline"], window),
        "goodput_ratio": round(figures["ok_in_deadline"] / quota, 4) if quota > 0 else 0.0,
        "upstream_share": round(figures["ok"] / upstream_ok, 4) if upstream_ok else 0.0,
        "tier_refused": tally.counts[RequestOutcome.TENANT_LIMIT],
        "reject_ms": _p50_p99(tally.rejects),
        "tier_reject_ms": _p50_p99(tally.tier_rejects),
        "ok_in_deadline_by_class": tally.in_deadline,
    }
