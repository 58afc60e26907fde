"""The 2 a.m. night: the primary's quota dies, the night moves to a fallback and back.

``asyncquota bench --scenario exhaustion [--virtual]`` (issue 13, item 7) replays the
crisis (30 000 sessions, 60 s) against a primary upstream in the Anthropic dialect whose
account is spent from 20 s to 45 s (the ``exhaustion`` preset: every request answered with
Anthropic's spend-cap 400, stating the window's end as the time access returns), beside a
fallback upstream in the OpenAI dialect with half the primary's capacity
(:func:`fallback_config`). asyncquota runs as a Gateway over both
(:class:`~asyncquota.bench.strategies.fallback.FallbackStrategy`); the peers run as they
are and know only the primary (they call it on its OpenAI-compatible path, where the
spent account answers OpenAI's 429 ``insufficient_quota``). Each strategy runs in its own
process; for real, against upstream processes of its own (two for asyncquota), on
virtual time with the upstreams in its process.

:func:`exhaustion_figures` is what the scenario adds to each strategy's result, under
``results.<strategy>.exhaustion``; it is pure, so a hand-built log pins it. Times are
seconds on the night's clock (from the start of the run):

- the primary's clock starts at its first request, which is the night's first (the same
  instant on virtual time, a loopback's latency later for real): its window
  ``[start, end)`` is ``dies_at``/``returns_at`` on the night's clock;
- ``first_exhaustion``: the primary's first refusal for a spent account;
- ``switch_over_s``: from it to the first reply the fallback gave a caller (None: never,
  or no fallback); ``switch_back_s``: from ``returns_at`` to the first reply the primary
  gave a caller after it (None: never);
- ``interactive``: interactive requests, those served (answered, which the harness's
  deadline makes in time) and by which model; ``allowed``: what the two upstreams'
  capacity allows, the smaller of the requests and the requests the upstreams admit from
  the first interactive request's start to the last one's end (the primary's rate outside
  its window, the fallback's throughout; the buckets' first burst not counted: in the
  crisis, demand is above it all night); ``served_ratio`` is served / allowed.
  ``during`` measures the window itself: the interactive replies another model than the
  primary gave in it, against the smaller of the interactive requests started in it and
  what the fallback admits over it (the only upstream alive then). Replies count by when
  they came, whoever asked: a fallback kept full since before the window spends its first
  instants on requests that arrived just before it, and counting only requests started in
  the window would call that capacity unused (0.97 where the fallback never idled). The
  same capacity is every strategy's denominator, peers included: it is what the night
  allows, not what a strategy knows;
- ``lost``: requests the run had to cancel at its hard stop;
- ``alerts`` (asyncquota only, None for the peers, which have none): how many the
  Gateway's monitor delivered, by kind, and ``first_after_exhaustion_s``: from the first
  exhaustion to the first alert delivered at or after it;
- ``wrong_shape``: replies the caller could not read (in the other dialect's shape), by
  model; ``targets`` holds the issue's targets and whether each was met.

The standard figures beside it (``goodput_ratio``, ``upstream_*``) are the primary's
alone, as for any scenario; asyncquota's fallback upstream is described under
``fallback_upstream`` and its totals under ``results.asyncquota.exhaustion.fallback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ..outcomes import RequestOutcome
from ..testing import SimulatedUpstream, UpstreamConfig, run_in_process
from .metrics import NO_OUTCOME, RequestLog, request_quota
from .progress import Progress
from .report import document
from .runner import (
    CLOSE_TIMEOUT,
    STOP_GRACE,
    VIRTUAL_EPOCH,
    StrategyRun,
    drive,
    fetch_stats,
    run_measured,
    run_strategies,
)
from .sessions import CLASSES, SessionModel
from .strategies import Target
from .strategies.fallback import MODELS, PRIMARY, FallbackStrategy

__all__ = [
    "FALLBACK_SHARE",
    "SCENARIO",
    "TARGETS",
    "GatewayRun",
    "GatewaySpec",
    "Served",
    "exhaustion_document",
    "exhaustion_figures",
    "exhaustion_table",
    "fallback_config",
    "run_exhaustion",
    "run_gateway",
]

SCENARIO = "exhaustion"
"""The scenario's name (and its primary upstream's preset)."""

FALLBACK_SHARE = 0.5
"""The fallback upstream's capacity, as a share of the primary's."""

TARGETS: Mapping[str, float] = {
    "served_ratio": 0.99,
    "switch_over_s": 1.0,
    "lost": 0,
    "alert_s": 1.0,
}
"""Issue 13's targets: interactive served ≥ 99 % of what the capacity allows, switch over
within 1 s, nothing lost, an alert within 1 s of the first exhaustion."""

_INTERACTIVE = CLASSES.index("interactive")
_PRIMARY = MODELS.index(PRIMARY)
_FALLBACK = 1 - _PRIMARY
_PRIMARY_URL = "http://primary.simulated"
_FALLBACK_URL = "http://fallback.simulated"


def fallback_config(primary: UpstreamConfig) -> UpstreamConfig:
    """The fallback: the primary's provider model in the OpenAI dialect, at half its capacity.

    Half its rates and concurrency cap, OpenAI's headers and whole-second Retry-After,
    never spent.
    """
    return replace(
        primary,
        rps=primary.rps * FALLBACK_SHARE,
        tpm=None if primary.tpm is None else primary.tpm * FALLBACK_SHARE,
        max_concurrency=None
        if primary.max_concurrency is None
        else max(1, int(primary.max_concurrency * FALLBACK_SHARE)),
        headers_style="openai",
        retry_after_style="seconds",
        exhausted=(),
    )


@dataclass(slots=True)
class Served:
    """Every reply a caller read, in order: when (the night's clock), its class, its model.

    Model codes index :data:`~asyncquota.bench.strategies.fallback.MODELS`.
    """

    at: array[float] = field(default_factory=lambda: array("d"))
    classes: array[int] = field(default_factory=lambda: array("b"))
    models: array[int] = field(default_factory=lambda: array("b"))


def _capacity(primary: UpstreamConfig, fallback: UpstreamConfig, start: float,
              end: float) -> float:
    """Requests both upstreams admit from ``start`` to ``end``, the primary none inside its
    exhausted windows (times on the primary's clock)."""
    if end <= start:
        return 0.0
    total = request_quota(primary, end) - request_quota(primary, start)
    for dead_from, dead_to in primary.exhausted:
        lo, hi = max(start, dead_from), min(end, dead_to)
        if hi > lo:
            total -= request_quota(primary, hi) - request_quota(primary, lo)
    return total + request_quota(fallback, end) - request_quota(fallback, start)


def _primary_only(log: RequestLog) -> Served:
    """The replies of a strategy that knows only the primary: its every answer, in order."""
    answered = sorted(
        (end, cls)
        for cls, end, code in zip(log.classes, log.ends, log.outcomes, strict=True)
        if code == RequestOutcome.OK
    )
    return Served(
        array("d", (end for end, _ in answered)),
        array("b", (cls for _, cls in answered)),
        array("b", [_PRIMARY] * len(answered)),
    )


def _first_at_or_after(times: Sequence[float], models: Sequence[int], model: int,
                       since: float | None) -> float | None:
    if since is None:
        return None
    return next(
        (t for t, m in zip(times, models, strict=True) if m == model and t >= since), None
    )


def _since(at: float | None, since: float | None) -> float | None:
    return None if at is None or since is None else round(at - since, 3)


def exhaustion_figures(
    log: RequestLog,
    *,
    served: Served | None,
    window: Mapping[str, Any],
    primary: UpstreamConfig,
    fallback: UpstreamConfig,
    stopped_at: float,
    alerts: tuple[Sequence[float], Sequence[str]] | None = None,
    wrong_shape: Sequence[int] = (0, 0),
) -> dict[str, Any]:
    """The night's exhaustion figures for one strategy (see the module docstring).

    Args:
        log: the run's requests.
        served: the replies callers read, with their model (None: a strategy that knows
            only the primary, whose every answer is the primary's).
        window: the primary's exhausted window as its ``stats()["exhausted"]`` tells it
            (``start``, ``end``, ``refused``, ``first_refused_at``, on its clock).
        primary, fallback: the two upstreams (their rates make the capacity).
        stopped_at: when the run stopped (the end of a request still open).
        alerts: the times (night's clock) and kinds of the alerts delivered (None: the
            strategy has no monitor).
        wrong_shape: replies the caller could not read, by model code.
    """
    starts, ends, outcomes, classes = log.starts, log.ends, log.outcomes, log.classes
    offset = min(starts) if len(log) else 0.0
    # The interactive span, on the primary's clock: capacity outside it serves no caller
    # who waits (the batch tail runs two minutes past the night).
    span = [
        (start - offset, (stopped_at if code == NO_OUTCOME else end) - offset)
        for cls, start, end, code in zip(classes, starts, ends, outcomes, strict=True)
        if cls == _INTERACTIVE
    ]
    span_start = min((s for s, _ in span), default=0.0)
    span_end = max((e for _, e in span), default=0.0)
    dies_at, returns_at = offset + window["start"], offset + window["end"]
    first = window["first_refused_at"]
    first_exhaustion = None if first is None else offset + first
    if served is None:
        served = _primary_only(log)
    requests = during_requests = ok = 0
    for cls, start, code in zip(classes, starts, outcomes, strict=True):
        if cls != _INTERACTIVE:
            continue
        requests += 1
        during_requests += dies_at <= start < returns_at
        ok += code == RequestOutcome.OK
    by_model = [0, 0]
    during_ok = 0
    for at, cls, model in zip(served.at, served.classes, served.models, strict=True):
        if cls == _INTERACTIVE:
            by_model[model] += 1
            during_ok += model != _PRIMARY and dies_at <= at < returns_at
    capacity = _capacity(primary, fallback, span_start, span_end)
    during_capacity = _capacity(primary, fallback, max(span_start, window["start"]),
                                min(span_end, window["end"]))
    allowed = min(requests, capacity)
    during_allowed = min(during_requests, during_capacity)
    switch_over = _since(
        _first_at_or_after(served.at, served.models, _FALLBACK, first_exhaustion),
        first_exhaustion,
    )
    switch_back = _since(
        _first_at_or_after(served.at, served.models, _PRIMARY, returns_at), returns_at
    )
    lost = outcomes.count(NO_OUTCOME)
    alert_figures = None
    alert_s = None
    if alerts is not None:
        times, kinds = alerts
        # The alarm is the exhausted alert: a usage alert that happens to follow the
        # exhaustion (a bucket read from the headers) does not say the quota is gone.
        after = [
            t
            for t, kind in zip(times, kinds, strict=True)
            if kind == "exhausted" and first_exhaustion is not None and t >= first_exhaustion
        ]
        alert_s = _since(min(after, default=None), first_exhaustion)
        alert_figures = {
            "count": len(times),
            "by_kind": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
            "first_after_exhaustion_s": alert_s,
        }
    ratio = round(ok / allowed, 4) if allowed else None
    return {
        "dies_at": round(dies_at, 3),
        "returns_at": round(returns_at, 3),
        "first_exhaustion": None if first_exhaustion is None else round(first_exhaustion, 3),
        "refused_as_exhausted": window["refused"],
        "switch_over_s": switch_over,
        "switch_back_s": switch_back,
        "interactive": {
            "requests": requests,
            "served": ok,
            "by_model": dict(zip(MODELS, by_model, strict=True)),
            "allowed": round(allowed, 1),
            "served_ratio": ratio,
        },
        "during": {
            "requests": during_requests,
            "served": during_ok,
            "allowed": round(during_allowed, 1),
            "served_ratio": round(during_ok / during_allowed, 4) if during_allowed else None,
        },
        "capacity_requests": round(capacity, 1),
        "lost": lost,
        "alerts": alert_figures,
        "wrong_shape": dict(zip(MODELS, wrong_shape, strict=True)),
        "targets": {
            "served_ratio": ratio is not None and ratio >= TARGETS["served_ratio"],
            "switch_over_s": switch_over is not None
            and switch_over <= TARGETS["switch_over_s"],
            "lost": lost <= TARGETS["lost"],
            "alert_s": alert_s is not None and alert_s <= TARGETS["alert_s"],
        },
    }


# -- running asyncquota against both upstreams -------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """asyncquota's run of the night, as sent to its process.

    Attributes:
        primary, fallback: the upstreams.
        model: the night.
        virtual: in process on virtual time, or for real.
        base_urls: the two upstream processes' URLs, primary first (real runs only).
        progress: draw a progress bar on stderr.
    """

    primary: UpstreamConfig
    fallback: UpstreamConfig
    model: SessionModel
    virtual: bool
    base_urls: tuple[str, str] | None = None
    progress: bool = False


@dataclass(slots=True)
class GatewayRun:
    """What asyncquota's process brings back beyond a :class:`StrategyRun`.

    Attributes:
        run: the run as any strategy's (``upstream``: the primary's stats).
        served: the replies callers read, with their model.
        alerts_at, alert_kinds: the alerts delivered (night's clock) and their kinds.
        wrong_shape: replies the caller could not read, by model code.
        fallback: the fallback upstream's stats.
    """

    run: StrategyRun
    served: Served
    alerts_at: array[float]
    alert_kinds: list[str]
    wrong_shape: list[int]
    fallback: dict[str, Any]


async def run_gateway(spec: GatewaySpec) -> GatewayRun:
    """The night against the Gateway, in the running loop (virtual time for a virtual run)."""
    loop = asyncio.get_running_loop()
    upstreams: list[SimulatedUpstream] = []
    if spec.virtual:
        def clock() -> float:
            return VIRTUAL_EPOCH + loop.time()

        targets = []
        for url, config in ((_PRIMARY_URL, spec.primary), (_FALLBACK_URL, spec.fallback)):
            config = replace(config, wall_clock=clock)
            upstreams.append(SimulatedUpstream(config))
            targets.append(Target(url, config, upstreams[-1].handle))
        primary, fallback = targets
    else:
        assert spec.base_urls is not None
        primary = Target(spec.base_urls[0], spec.primary)
        fallback = Target(spec.base_urls[1], spec.fallback)
    strategy = FallbackStrategy(primary, fallback)
    log = RequestLog()
    run = StrategyRun(strategy=strategy.name, log=log)
    horizon = spec.model.duration + spec.model.max_deadline + STOP_GRACE
    progress = Progress(strategy.name, horizon) if spec.progress else None

    def on_second(t: float) -> None:
        sample: dict[str, float] = {"t": t, "started": len(log), "ok": log.ok, "open": log.open}
        sample.update(strategy.sample())
        run.samples.append(sample)
        if progress is not None:
            progress.update(t, sample)

    await strategy.__aenter__()
    try:
        # drive() counts from its start, which is now: no await lies between.
        t0 = loop.time()
        run.stopped_at = await drive(strategy, spec.model, log, on_second=on_second)
    finally:
        if progress is not None:
            progress.close()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await strategy.__aexit__(None, None, None)
    run.queue_waits = {name: array("d", v) for name, v in strategy.queue_waits().items()}
    run.queue_wait_source = strategy.queue_wait_source
    if upstreams:
        run.upstream, fallback_stats = upstreams[0].stats(), upstreams[1].stats()
    else:
        run.upstream = await fetch_stats(primary.base_url)
        fallback_stats = await fetch_stats(fallback.base_url)
    return GatewayRun(
        run=run,
        served=Served(
            array("d", (t - t0 for t in strategy.served_at)),
            strategy.served_class,
            strategy.served_model,
        ),
        alerts_at=array("d", (t - t0 for t in strategy.alerts_at)),
        alert_kinds=strategy.alert_kinds,
        wrong_shape=strategy.wrong_shape,
        fallback=fallback_stats,
    )


def _gateway_process(spec: GatewaySpec) -> GatewayRun:
    """The whole life of asyncquota's process: the run, its CPU, peak memory and wall time."""
    return run_measured(_run_of, run_gateway(spec), virtual=spec.virtual)


def _run_of(result: GatewayRun) -> StrategyRun:
    return result.run


@contextlib.contextmanager
def _upstreams_for(spec: GatewaySpec) -> Iterator[GatewaySpec]:
    """The spec, with two fresh upstream processes behind it for a real run."""
    if spec.virtual:
        yield spec
        return
    with run_in_process(spec.primary) as primary, run_in_process(spec.fallback) as fallback:
        yield replace(spec, base_urls=(primary, fallback))


def run_exhaustion(
    names: Sequence[str],
    *,
    primary: UpstreamConfig,
    model: SessionModel,
    virtual: bool,
    progress: bool,
    on_done: Callable[[StrategyRun], None] | None = None,
) -> tuple[dict[str, StrategyRun], GatewayRun | None]:
    """Run each strategy in its own fresh process, asyncquota as a Gateway over both upstreams.

    The peers run as any scenario runs them (:func:`~asyncquota.bench.runner.run_strategies`,
    against the primary alone). The runs come back in the order of ``names``.
    """
    runs: dict[str, StrategyRun] = {}
    gateway: GatewayRun | None = None
    for name in names:
        if name == FallbackStrategy.name:
            spec = GatewaySpec(primary=primary, fallback=fallback_config(primary), model=model,
                               virtual=virtual, progress=progress)
            context = multiprocessing.get_context("spawn")
            with _upstreams_for(spec) as ready, ProcessPoolExecutor(
                1, mp_context=context
            ) as pool:
                gateway = pool.submit(_gateway_process, ready).result()
            runs[name] = gateway.run
            if on_done is not None:
                on_done(gateway.run)
        else:
            runs.update(run_strategies([name], config=primary, model=model, virtual=virtual,
                                       progress=progress, on_done=on_done))
    return runs, gateway


# -- the report ------------------------------------------------------------------------------


def exhaustion_document(
    *,
    primary: UpstreamConfig,
    model: SessionModel,
    virtual: bool,
    runs: Mapping[str, StrategyRun],
    gateway: GatewayRun | None,
) -> dict[str, Any]:
    """The report (:func:`~asyncquota.bench.report.document`'s), each result with its
    ``exhaustion`` figures, and the fallback upstream described."""
    doc = document(scenario=SCENARIO, config=primary, model=model, virtual=virtual, runs=runs)
    fallback = fallback_config(primary)
    doc["fallback_upstream"] = {
        f.name: getattr(fallback, f.name) for f in dataclasses.fields(fallback)
        if f.name != "wall_clock"
    }
    doc["peers"] = (
        "The peers know only the primary: they call it as they are, with no fallback, on its "
        "OpenAI-compatible path (where the spent account answers 429 insufficient_quota)."
    )
    for name, run in runs.items():
        ours = gateway if gateway is not None and run is gateway.run else None
        window = (run.upstream.get("exhausted") or [_NO_WINDOW])[0]
        figures = exhaustion_figures(
            run.log,
            served=None if ours is None else ours.served,
            window=window,
            primary=primary,
            fallback=fallback,
            stopped_at=run.stopped_at,
            alerts=None if ours is None else (ours.alerts_at, ours.alert_kinds),
            wrong_shape=(0, 0) if ours is None else ours.wrong_shape,
        )
        if ours is not None:
            figures["fallback"] = ours.fallback.get("totals", {})
        doc["results"][name]["exhaustion"] = figures
    return doc


_NO_WINDOW: Mapping[str, Any] = {"start": 0.0, "end": 0.0, "refused": 0,
                                 "first_refused_at": None}


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def exhaustion_table(doc: Mapping[str, Any]) -> str:
    """A row per strategy: interactive served (by model) against what the capacity allows,
    the switches, what was lost and the alerts; after the standard table."""
    from .report import table

    header = (
        f"{'strategy':<11} {'int req':>8} {'served':>7} {'primary':>8} {'fallback':>8} "
        f"{'allowed':>8} {'ratio':>6} {'in win':>7} {'over s':>7} {'back s':>7} "
        f"{'lost':>5} {'alerts':>6} {'alert s':>7} {'unread':>6}"
    )
    results: list[Mapping[str, Any]] = list(doc["results"].values())
    first: Mapping[str, Any] = results[0]["exhaustion"] if results else {}
    lines = [
        table(doc),
        "",
        f"the primary's quota is gone from {_cell(first.get('dies_at'), '.1f')} s to "
        f"{_cell(first.get('returns_at'), '.1f')} s; the fallback has "
        f"{FALLBACK_SHARE:.0%} of its capacity; targets: served ≥ "
        f"{TARGETS['served_ratio']:.0%} of allowed, switch ≤ {TARGETS['switch_over_s']:g} s, "
        f"0 lost, alert ≤ {TARGETS['alert_s']:g} s. {doc['peers']}",
        header,
        "-" * len(header),
    ]
    for name, result in doc["results"].items():
        e = result["exhaustion"]
        i, alerts = e["interactive"], e["alerts"]
        lines.append(
            f"{name:<11} {i['requests']:>8} {i['served']:>7} {i['by_model'][MODELS[0]]:>8} "
            f"{i['by_model'][MODELS[1]]:>8} {i['allowed']:>8.0f} "
            f"{_cell(i['served_ratio'], '.3f'):>6} "
            f"{_cell(e['during']['served_ratio'], '.3f'):>7} "
            f"{_cell(e['switch_over_s'], '.3f'):>7} {_cell(e['switch_back_s'], '.3f'):>7} "
            f"{e['lost']:>5} {'-' if alerts is None else alerts['count']:>6} "
            f"{'-' if alerts is None else _cell(alerts['first_after_exhaustion_s'], '.3f'):>7} "
            f"{sum(e['wrong_shape'].values()):>6}"
        )
    return "\n".join(lines)
