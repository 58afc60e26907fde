"""The robustness matrix: one night per upstream behaviour, a covering set of behaviours.

A behaviour is a value on each of seven dimensions (:data:`DIMENSIONS`):

============  ==========================================================================
headers       the rate-limit headers: ``openai-ms`` (OpenAI's, resets to the ms),
              ``openai-s`` (resets rounded up to the second), ``anthropic-bucket``
              (Anthropic's, ``limit`` = the bucket's size), ``anthropic-per-minute``
              (``limit`` = the rate per minute, as Anthropic documents it), ``none``
retry_after   how a 429 says when to come back: ``seconds`` (``max(1, ceil(wait))``),
              ``ms`` (``retry-after-ms``), ``http-date``, ``none``
capacity      ``constant``; ``halves`` (half the rate from 10 s, back at 20 s);
              ``doubles`` (twice the rate from 10 s on)
refused       a refused request is ``counted`` against the quota, or ``free``
penalty       ``off``, or ``on``: sending inside a Retry-After window extends it by 1 s
replies       ``short`` (0.15–0.5 s, a whole answer) or ``long`` (5–30 s, a streamed one)
skew          the upstream's clock (its ``Date``, HTTP dates, RFC 3339 resets) ``0`` or
              ``+3`` s off the client's
============  ==========================================================================

Resets rounded to the second apply to OpenAI's durations only (Anthropic's instants are
always to the second, and ``none`` has none), so that choice is folded into ``headers``
rather than being a dimension of its own. :func:`~asyncquota.bench.pairwise.all_pairs`
picks the rows: every value of a dimension meets every value of every other in some row
(20 rows). Row 1 is the issue's first measurement: OpenAI headers, whole seconds, constant.

Every row's base is the night the issue measured: an upstream of 100 requests/s with a 1 s
burst (and 3 M tokens a minute, which no row reaches: it is the request quota under test),
about 5 000 chat sessions over 30 s, 70 % interactive (deadline 10 s), the rest batch
(120 s), thinking 10 s on average between turns, so that they ask for ~3x the quota (and
still ~1.5x when it doubles). A concurrency cap of 48 in flight for short replies (100/s
× 0.5 s, the longest reply) and 3 000 for long ones (100/s × 30 s: the cap fits the rate at
the longest reply, so the rate stays the limit under test, as with short replies); both
doubled with the capacity. Long replies hold a session ~17 s per turn, so their rows have
twice the sessions (10 000, which still ask ~1.8x a doubled quota) and deadlines 30 s
longer (40 s, 150 s: the caller waits as long for the answer to start), and asyncquota's
connection pool is sized to the cap (its default, 512, would allow only ~30 replies/s of
17 s): a user expecting 30 s streams sizes the pool so.

Figures per row and strategy (:func:`row_figures`):

- ``goodput``: requests answered within their deadline ÷ the row's request quota (its
  rate integrated over time, following the capacity schedule) from the upstream's first
  request to the last one it admitted, or to the night's end if that is later. (The
  bench's own ratio takes the quota up to the last request's end; with 30 s replies that
  window would run 30 s past the demand.)
- ``goodput_10s``: requests the upstream admitted in its first 10 s and answered 200 ÷ the
  quota of those 10 s, by admission time, so that long replies count in the second they
  were sent.
- ``share_429``: the upstream's 429s ÷ the requests it received.
- ``deadline_share``: requests whose deadline expired ÷ requests.
- ``queue_wait_ms``: interactive and batch first attempts' wait from the call to their
  send, p50 and p99 (asyncquota only: the Shaper's admission events; None for peers).
- ``refusal_p99_ms``: how long the slowest 1 % of refusals (shed unsent) took.
- ``cpu_s``, ``lost``: the client process's CPU (in virtual runs, the upstream model's
  share included) and requests that never ended.

:data:`TARGETS` are those the issue sets for every row; ``misses`` names those a row fails.

One run a row is one draw: in real time the same row swings from run to run by as much as
a change being measured (row 2 read 0.93 and 0.99 of the quota in two runs of the same
code on this project's machine). :func:`repeated_document` folds several runs of every
row (``asyncquota bench --matrix --repeat N``: seeds ``seed`` to ``seed + N - 1``, run
round after round so that a machine's drift falls on every row alike) into the median of
each figure, the targets judged on the medians, and ``met``: in how many runs the row met
every target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..testing import UpstreamConfig
from .metrics import request_quota
from .pairwise import all_pairs
from .report import document
from .runner import StrategyRun, run_strategies
from .sessions import SessionModel
from .strategies.shaper import Options

__all__ = [
    "DIMENSIONS",
    "DURATION",
    "MAX_REPEAT",
    "SESSIONS",
    "TARGETS",
    "MatrixRow",
    "matrix_document",
    "matrix_rows",
    "matrix_table",
    "repeated_document",
    "row_config",
    "row_figures",
    "row_model",
    "run_matrix",
]

DIMENSIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "headers": ("openai-ms", "openai-s", "anthropic-bucket", "anthropic-per-minute", "none"),
        "retry_after": ("seconds", "ms", "http-date", "none"),
        "capacity": ("constant", "halves", "doubles"),
        "refused": ("counted", "free"),
        "penalty": ("off", "on"),
        "replies": ("short", "long"),
        "skew": ("0", "+3"),
    }
)
"""Each dimension of an upstream's behaviour and its values (see the module docstring)."""

RPS = 100.0
TPM = 3_000_000.0
SESSIONS = 5_000
"""Sessions of a short-reply row (long-reply rows have twice as many)."""
DURATION = 30.0
THINK_MEAN = 10.0
FIRST_WINDOW = 10.0
"""Seconds at the start of the night that ``goodput_10s`` covers."""

_REPLIES = {"short": (0.15, 0.5), "long": (5.0, 30.0)}
_CAPS = {"short": 48, "long": 3_000}
_SESSIONS_FACTOR = {"short": 1, "long": 2}
_EXTRA_DEADLINE = {"short": 0.0, "long": 30.0}
_SCHEDULES: Mapping[str, tuple[tuple[float, float], ...]] = {
    "constant": (),
    "halves": ((10.0, 0.5), (20.0, 1.0)),
    "doubles": ((10.0, 2.0),),
}
_HEADERS: Mapping[str, Mapping[str, Any]] = {
    "openai-ms": {"headers_style": "openai", "reset_resolution": "ms"},
    "openai-s": {"headers_style": "openai", "reset_resolution": "s"},
    "anthropic-bucket": {"headers_style": "anthropic", "limit_header": "bucket"},
    "anthropic-per-minute": {"headers_style": "anthropic", "limit_header": "per_minute"},
    "none": {"headers_style": "none"},
}
_SKEWS = {"0": 0.0, "+3": 3.0}

TARGETS: Mapping[str, tuple[str, float]] = MappingProxyType(
    {
        "goodput": (">=", 0.95),
        "goodput_10s": (">=", 0.90),
        "share_429": ("<=", 0.02),
        "deadline_share": ("<=", 0.01),
        "lost": ("<=", 0),
    }
)
"""What the request path is to reach in every row: figure → (comparison, bound)."""

MAX_REPEAT = 10
"""The most runs of every row ``--repeat`` takes (a real-time run of the matrix takes about
20 minutes)."""

_MEDIAN_FIGURES = (
    "goodput", "goodput_10s", "share_429", "deadline_share", "refusal_p99_ms", "cpu_s",
)


@dataclass(frozen=True, slots=True)
class MatrixRow:
    """One upstream behaviour and the night replayed against it.

    Attributes:
        number: the row's number, from 1.
        behaviour: a value per dimension of :data:`DIMENSIONS`.
        config: the upstream.
        model: the night.
        shaper_options: options for the asyncquota strategy (its pool, for long replies).
    """

    number: int
    behaviour: Mapping[str, str]
    config: UpstreamConfig
    model: SessionModel
    shaper_options: Options = ()

    @property
    def label(self) -> str:
        """The behaviour in one short line."""
        return "/".join(self.behaviour[name] for name in DIMENSIONS)


def row_config(behaviour: Mapping[str, str], *, seed: int) -> UpstreamConfig:
    """The upstream that plays ``behaviour``."""
    replies = behaviour["replies"]
    schedule = _SCHEDULES[behaviour["capacity"]]
    peak = max([1.0, *(factor for _, factor in schedule)])
    return UpstreamConfig(
        rps=RPS,
        burst_seconds=1.0,
        tpm=TPM,
        max_concurrency=int(_CAPS[replies] * peak),
        count_rejected=behaviour["refused"] == "counted",
        schedule=schedule,
        reply_seconds=_REPLIES[replies],
        penalty=behaviour["penalty"] == "on",
        penalty_extension=1.0,
        clock_skew=_SKEWS[behaviour["skew"]],
        seed=seed,
        # The styles are the dimensions' values (the config checks them).
        **{"retry_after_style": behaviour["retry_after"], **_HEADERS[behaviour["headers"]]},
    )


def row_model(
    behaviour: Mapping[str, str], *, sessions: int, duration: float, seed: int
) -> SessionModel:
    """The night against ``behaviour``: ``sessions`` (twice as many for long replies)."""
    replies = behaviour["replies"]
    base = SessionModel()
    return SessionModel(
        sessions=sessions * _SESSIONS_FACTOR[replies],
        duration=duration,
        think_mean=THINK_MEAN,
        interactive_deadline=base.interactive_deadline + _EXTRA_DEADLINE[replies],
        batch_deadline=base.batch_deadline + _EXTRA_DEADLINE[replies],
        seed=seed,
    )


def matrix_rows(
    *, seed: int = 0, sessions: int = SESSIONS, duration: float = DURATION
) -> list[MatrixRow]:
    """The covering set of behaviours, each with its upstream and night."""
    rows = []
    for number, behaviour in enumerate(all_pairs(DIMENSIONS), start=1):
        config = row_config(behaviour, seed=seed)
        options: Options = ()
        if behaviour["replies"] == "long":
            assert config.max_concurrency is not None
            options = (("max_connections", config.max_concurrency),)
        rows.append(
            MatrixRow(
                number=number,
                behaviour=MappingProxyType(behaviour),
                config=config,
                model=row_model(behaviour, sessions=sessions, duration=duration, seed=seed),
                shaper_options=options,
            )
        )
    return rows


def _ratio(count: float, quota: float) -> float:
    return round(count / quota, 4) if quota > 0 else 0.0


def row_figures(
    result: Mapping[str, Any],
    upstream_totals: Mapping[str, Any],
    *,
    config: UpstreamConfig,
    duration: float,
) -> dict[str, Any]:
    """The matrix's figures for one strategy's run of a row (see the module docstring).

    Args:
        result: the run's entry in the bench document (``report.document``'s results).
        upstream_totals: the upstream's ``stats()["totals"]``.
        config: the row's upstream.
        duration: the night's length.
    """
    last_admitted = upstream_totals.get("last_admitted_at")
    window = max(duration, last_admitted or 0.0)
    first = min(FIRST_WINDOW, duration)
    admitted_ok = sum(
        second.get("admitted_ok", 0) for second in result["timeline"] if second["t"] < first
    )
    requests = result["requests"]
    waits = result["queue_wait_ms"]
    figures: dict[str, Any] = {
        "goodput": _ratio(result["ok_in_deadline"], request_quota(config, window)),
        "goodput_10s": _ratio(admitted_ok, request_quota(config, first)),
        "share_429": result["upstream_429_ratio"],
        "deadline_share": round(result["deadline_exceeded"] / requests, 4) if requests else 0.0,
        "queue_wait_ms": waits,
        "refusal_p99_ms": result["reject_ms"]["p99"],
        "cpu_s": result["cpu_s"],
        "lost": result["lost"],
        "requests": requests,
        "ok_in_deadline": result["ok_in_deadline"],
        "quota_window_s": round(window, 3),
    }
    figures["misses"] = [name for name in TARGETS if not _meets(name, figures[name])]
    return figures


def _meets(name: str, value: float) -> bool:
    comparison, bound = TARGETS[name]
    return value >= bound if comparison == ">=" else value <= bound


def run_matrix(
    rows: Sequence[MatrixRow],
    strategies: Sequence[str],
    *,
    virtual: bool,
    progress: bool = False,
    on_done: Callable[[MatrixRow, str, Mapping[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every row, one after the other, each strategy in its own process (and, for real,
    against its own upstream process); each row's entry for :func:`matrix_document`."""
    entries = []
    for row in rows:
        runs = run_strategies(
            strategies, config=row.config, model=row.model, virtual=virtual,
            progress=progress, shaper_options=row.shaper_options,
        )
        entries.append(_row_entry(row, runs, virtual=virtual))
        if on_done is not None:
            for name, result in entries[-1]["results"].items():
                on_done(row, name, result)
    return entries


def _row_entry(
    row: MatrixRow, runs: Mapping[str, StrategyRun], *, virtual: bool
) -> dict[str, Any]:
    doc = document(
        scenario=f"matrix row {row.number}", config=row.config, model=row.model,
        virtual=virtual, runs=runs,
    )
    results = {
        name: {
            **row_figures(
                doc["results"][name], runs[name].upstream.get("totals", {}),
                config=row.config, duration=row.model.duration,
            ),
            "bench": doc["results"][name],
        }
        for name in runs
    }
    return {
        "row": row.number,
        "behaviour": dict(row.behaviour),
        "label": row.label,
        "upstream": doc["upstream"],
        "model": doc["model"],
        "shaper_options": [list(option) for option in row.shaper_options],
        "results": results,
    }


def matrix_document(
    entries: Sequence[Mapping[str, Any]], *, virtual: bool, seed: int
) -> dict[str, Any]:
    """The whole matrix as JSON-ready data: the dimensions, the targets and every row.

    Each row: ``row``, ``behaviour`` (a value per dimension), ``label``, ``upstream``,
    ``model``, ``shaper_options`` and ``results``: per strategy the figures of
    :func:`row_figures` plus ``bench``, the bench's whole result for that run (latencies,
    outcomes, the upstream's per-second timeline, the client's samples).
    """
    return {
        "mode": "virtual" if virtual else "real",
        "seed": seed,
        "dimensions": {name: list(values) for name, values in DIMENSIONS.items()},
        "targets": {name: list(target) for name, target in TARGETS.items()},
        "rows": list(entries),
    }


def repeated_document(
    runs: Sequence[Sequence[Mapping[str, Any]]], *, virtual: bool, seeds: Sequence[int]
) -> dict[str, Any]:
    """Several runs of the same rows (one list of :func:`run_matrix` entries per run, in the
    order of ``seeds``) as one document: ``rows`` as in :func:`matrix_document`, each
    strategy's figures the medians over the runs (``lost`` the most any run lost), its
    ``misses`` judged on them, ``met`` the runs that met every target and ``runs`` each
    run's own figures; ``runs`` at the top holds every run's whole entries (with the
    bench's results).

    Raises:
        ValueError: no run, seeds not one per run, or runs of different rows.
    """
    if not runs or len(runs) != len(seeds):
        raise ValueError(
            f"{len(runs)} runs for {len(seeds)} seeds: one run per seed, at least one."
        )
    numbers = [entry["row"] for entry in runs[0]]
    for other in runs[1:]:
        if [entry["row"] for entry in other] != numbers:
            raise ValueError("Every run must be of the same rows, in the same order.")
    rows = []
    for index, first in enumerate(runs[0]):
        results = {}
        for name in first["results"]:
            each = [
                {key: value for key, value in run[index]["results"][name].items() if key != "bench"}
                for run in runs
            ]
            results[name] = _median_figures(each)
        rows.append({
            **{key: value for key, value in first.items() if key != "results"},
            "results": results,
        })
    return {
        "mode": "virtual" if virtual else "real",
        "seed": seeds[0],
        "seeds": list(seeds),
        "repeat": len(runs),
        "dimensions": {name: list(values) for name, values in DIMENSIONS.items()},
        "targets": {name: list(target) for name, target in TARGETS.items()},
        "rows": rows,
        "runs": [list(run) for run in runs],
    }


def _median_figures(each: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One strategy's figures over several runs of a row (see :func:`repeated_document`)."""
    figures: dict[str, Any] = {
        name: _median([run[name] for run in each]) for name in _MEDIAN_FIGURES
    }
    waits = [run["queue_wait_ms"] for run in each]
    figures["queue_wait_ms"] = (
        None
        if any(wait is None for wait in waits)
        else {
            cls: {q: _median([wait[cls][q] for wait in waits]) for q in ("p50", "p99")}
            for cls in waits[0]
        }
    )
    figures["lost"] = max(run["lost"] for run in each)
    figures["misses"] = [name for name in TARGETS if not _meets(name, figures[name])]
    figures["met"] = sum(1 for run in each if not run["misses"])
    figures["runs"] = list(each)
    return figures


def _median(values: Sequence[float | None]) -> float | None:
    """The median of the values given (None: none was given, as a class with no waits)."""
    known = sorted(value for value in values if value is not None)
    if not known:
        return None
    middle = len(known) // 2
    if len(known) % 2:
        return known[middle]
    return round((known[middle - 1] + known[middle]) / 2, 4)


_COLUMNS = (
    ("#", ">2"), ("headers", "<20"), ("retry-after", "<11"), ("capacity", "<8"),
    ("refused", "<7"), ("penalty", "<7"), ("replies", "<7"), ("skew", "<4"),
    ("strategy", "<10"), ("goodput", ">7"), ("10 s", ">5"), ("429 %", ">5"),
    ("dl %", ">5"), ("wait50", ">6"), ("wait99", ">6"), ("rej99", ">6"), ("cpu s", ">6"),
    ("lost", ">4"), ("misses", "<0"),
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def matrix_table(doc: Mapping[str, Any]) -> str:
    """The matrix as a fixed-width table: a line per row and strategy, waits in ms.

    For a :func:`repeated_document`, the medians, and a last column ``met``: the runs in
    which the row met every target.
    """
    repeat = doc.get("repeat", 1)
    columns = (*_COLUMNS, ("met", "<0")) if repeat > 1 else _COLUMNS
    header = " ".join(format(title, spec) for title, spec in columns)
    runs = (
        f"medians of {repeat} runs, seeds {doc['seeds'][0]}-{doc['seeds'][-1]}"
        if repeat > 1
        else f"seed {doc['seed']}"
    )
    lines = [
        f"robustness matrix: {len(doc['rows'])} rows, {doc['mode']} time, {runs} "
        "(goodput, 10 s: ratios of the quota; 429 %: of sends; dl %: deadline expiries; "
        "wait: interactive queue wait; rej99: refusal p99)",
        header,
        "-" * len(header),
    ]
    for entry in doc["rows"]:
        for name, r in entry["results"].items():
            waits = r["queue_wait_ms"]
            wait = waits["interactive"] if waits is not None else {"p50": None, "p99": None}
            cells = (
                entry["row"], *(entry["behaviour"][dim] for dim in DIMENSIONS), name,
                _fmt(r["goodput"], ".3f"), _fmt(r["goodput_10s"], ".2f"),
                _fmt(100 * r["share_429"], ".1f"), _fmt(100 * r["deadline_share"], ".1f"),
                _fmt(wait["p50"], ".0f"), _fmt(wait["p99"], ".0f"),
                _fmt(r["refusal_p99_ms"], ".0f"), _fmt(r["cpu_s"], ".1f"), r["lost"],
                ",".join(r["misses"]) or "-",
            )
            if repeat > 1:
                cells = (*cells, f"{r['met']}/{repeat}")
            lines.append(
                " ".join(format(c, spec) for c, (_, spec) in zip(cells, columns, strict=True))
            )
    return "\n".join(lines)

