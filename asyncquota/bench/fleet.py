"""One quota, many processes: the crisis split across a fleet sharing it through Redis.

``asyncquota bench --scenario fleet --processes N [--kill-redis-at S --restore-redis-at S]``
(issue 11's benchmark) replays the crisis (30 000 sessions, 60 s, the ``crisis`` upstream)
split across N real OS processes (spawned), each running its own Shaper on uvloop against
one simulated upstream in its own process, in real time. Two strategies, side by side:

- ``asyncquota``: each process's Shaper is given the quota's ``rpm``/``tpm`` and one
  :class:`asyncquota.fleet.RedisFleet` on a ``redis-server`` the bench starts on loopback
  (:class:`~asyncquota.testing.redis.RedisServer`, nothing persisted), so the N Shapers
  share one quota. With ``--kill-redis-at S`` the server is killed (SIGKILL) S seconds into
  the night, and with ``--restore-redis-at S`` started again, empty, on the same port;
- ``no-fleet``: the same N processes, each with the same Shaper and no fleet: what a fleet
  of processes gets today. Each aims at the whole quota alone (together N times it); only
  what the upstream's replies teach each of them (its rate-limit headers, which every
  Shaper mirrors, and its 429s) holds them back, once they have heard from it.

Session ``i`` of the night belongs to process ``i % N`` (:func:`split_sessions`): each
process replays its share with the harness's own driver
(:func:`~asyncquota.bench.runner.drive`). The processes start the night at one instant:
each spawns, imports, opens its Shaper (and fleet), says it is ready, and waits for the
parent's start time; each then reports when its night began against it (a few
milliseconds at most), and its log is moved by that much when the logs are merged, so
times are on one clock (seconds from the start). Wall-clock time (``time.time``) is what
the processes share; it orders them, nothing is measured with it beyond that offset.

What is measured, under ``results.<strategy>.fleet`` (:func:`fleet_figures`):

- ``goodput``: answered within the deadline ÷ the upstream's quota over the busy window
  (the standard ``goodput_ratio`` of the merged log, :func:`~asyncquota.bench.metrics.summarize`);
- ``429_share``: the upstream's 429s ÷ the requests it received (its own counts);
- ``lost``: requests the processes had to cancel at their hard stop;
- ``over_quota_max``: the worst 60 s window's requests *received by the upstream* (429s
  included: a refused request was sent all the same) ÷ the quota over those 60 s, from the
  upstream's own per-second timeline (:func:`worst_window`). Windows are whole seconds of
  the upstream's clock, so a burst straddling two seconds is counted where it fell; the
  upstream's bucket starts full, so a strategy that spends that first burst may show up to
  ``burst_seconds / 60`` above 1 in the first window;
- ``redis_calls_per_request``: the Redis round trips of every process
  (``fleet.statistics().calls``, summed) ÷ the requests the upstream received (None
  without a fleet);
- ``degraded_seconds``: the longest any process ran degraded (Redis unreachable); with
  ``--kill-redis-at``, ``degraded_after_kill_s`` and ``back_after_restore_s``: how long the
  slowest process took to notice the outage and to come back in step after the restore,
  from each process's ``degraded`` flag polled every :data:`POLL_DEGRADED` s (None: some
  process never did);
- ``per_process``: each process's sessions, requests, answers, process figures, its
  fleet statistics and its ``degraded_spells`` (``[from, to]`` in seconds from the start,
  ``to`` None if the spell lasted to the end: an outage, or Redis calls timing out when
  the process is too busy to read their answers in time); ``targets``: issue 11's
  (:data:`TARGETS`) and whether each was met.

The standard result beside it (``goodput_ratio``, latencies, ``cpu_s`` summed over the
processes, ``peak_rss_mb`` the largest process's, ``wall_s`` the longest) is the merged
fleet's, so the usual table compares the two strategies as it compares any two.

Every run is bounded: each process stops its night at the harness's hard stop, the parent
gives the processes :data:`READY_TIMEOUT` s to start and the night's horizon plus
:data:`COLLECT_GRACE` s to report, and whatever happens (an error, Ctrl-C, the command's
SIGTERM) the processes, the upstream and the redis-server are terminated (then killed) on
the way out. The processes ignore Ctrl-C themselves: stopping them is the parent's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import itertools
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from ..hooks import LoggingHook
from ..shaper import DEFAULT_MAX_CONNECTIONS, Shaper
from ..testing import UpstreamConfig, run_in_process
from ..testing.redis import INSTALL_HINT, RedisServer, find_redis_server
from .metrics import NO_OUTCOME, RequestLog, request_quota
from .report import document, table
from .runner import CLOSE_TIMEOUT, STOP_GRACE, StrategyRun, drive, fetch_stats, run_measured
from .sessions import SessionModel
from .strategies import Strategy, Target
from .strategies.shaper import QueueWaits, ShaperStrategy

__all__ = [
    "ALONE",
    "COLLECT_GRACE",
    "DEFAULT_PROCESSES",
    "FLEET",
    "FLEET_MODULE",
    "FLEET_STRATEGIES",
    "MAX_PROCESSES",
    "POLL_DEGRADED",
    "PRESET",
    "QUOTA_NAME",
    "READY_TIMEOUT",
    "SCENARIO",
    "TARGETS",
    "WINDOW_S",
    "FleetRun",
    "FleetShaperStrategy",
    "FleetUnavailable",
    "RedisOutage",
    "WorkerRun",
    "WorkerSpec",
    "fleet_document",
    "fleet_figures",
    "fleet_table",
    "fleet_unavailable",
    "merge_runs",
    "run_fleet",
    "split_sessions",
    "worst_window",
]

SCENARIO = "fleet"
"""The scenario's name on the command line."""

PRESET = "crisis"
"""The upstream preset the fleet shares (the crisis's quota)."""

FLEET = "asyncquota"
"""The strategy whose Shapers share the quota through one Redis."""

ALONE = "no-fleet"
"""The baseline: the same Shapers, each alone with the whole quota."""

FLEET_STRATEGIES: Mapping[str, str] = {
    FLEET: "each process's Shaper, given the quota's rpm/tpm, shares it through one "
    "RedisFleet",
    ALONE: "each process's Shaper, given the quota's rpm/tpm, alone (no fleet: together "
    "they aim at N times the quota; only the upstream's headers and 429s hold them back)",
}
"""The scenario's strategies, in report order."""

FLEET_MODULE = "asyncquota.fleet"
"""The fleet backend, imported only where the fleet strategy runs."""

QUOTA_NAME = "bench"
"""The name the fleet's processes give their shared quota."""

DEFAULT_PROCESSES = 4
MAX_PROCESSES = 16

WINDOW_S = 60
"""The window of ``over_quota_max``, in seconds."""

READY_TIMEOUT = 60.0
"""Seconds the processes get to start, import and open their Shapers (a loaded machine)."""

START_DELAY = 0.5
"""Seconds between the parent's start signal and the night's first instant."""

COLLECT_GRACE = 30.0
"""Seconds past a night's horizon (and its Shapers' closing) a process gets to report."""

POLL_DEGRADED = 0.01
"""Seconds between two readings of a process's ``degraded`` flag (the fleet strategy)."""

TARGETS: Mapping[str, float] = {
    "goodput": 0.95,
    "429_share": 0.01,
    "over_quota_max": 1.01,
    "lost": 0,
    "redis_calls_per_request": 1.0,
}
"""Issue 11's targets for 4 processes in the crisis: goodput ≥ 0.95 of the quota, 429s
≤ 1 %, the worst 60 s window ≤ 1.01 × the quota, nothing lost, ≤ 1 Redis round trip per
request."""

_STATISTICS = ("calls", "requests", "degraded", "degraded_seconds", "live_processes", "leases")
"""The fields of ``FleetStatistics`` the bench keeps (the fleet contract's)."""


class FleetUnavailable(RuntimeError):
    """The fleet strategy cannot run here (no redis-py, no redis-server, no fleet backend)."""


def fleet_unavailable() -> str | None:
    """Why the fleet strategy cannot run on this machine, in one line; None if it can."""
    if importlib.util.find_spec("redis") is None:
        return "the fleet needs redis (redis-py): pip install 'asyncquota[redis]'"
    if find_redis_server() is None:
        return INSTALL_HINT
    try:
        importlib.import_module(FLEET_MODULE)
    except ImportError as exc:
        if exc.name == FLEET_MODULE:
            return (
                f"this asyncquota has no fleet backend ({FLEET_MODULE}, issue 11), so the "
                f"{FLEET} strategy cannot share the quota; --strategies {ALONE} runs the "
                "baseline alone"
            )
        return f"{FLEET_MODULE} cannot be imported: {exc}"
    if "fleet" not in inspect.signature(Shaper).parameters:
        return (
            f"this asyncquota's Shaper takes no fleet= yet (issue 11), so the {FLEET} "
            f"strategy cannot share the quota; --strategies {ALONE} runs the baseline alone"
        )
    return None


# -- the pure parts ---------------------------------------------------------------------------


def split_sessions(sessions: int, processes: int) -> list[range]:
    """Each process's sessions: session ``i`` is process ``i % processes``'s.

    Round robin, so every process gets the same mix of the night (first messages spread
    over the spike, classes drawn alike) and the shares differ by one session at most.

    Raises:
        ValueError: fewer than one session or process.
    """
    if sessions < 1 or processes < 1:
        raise ValueError(
            f"A fleet splits at least 1 session across at least 1 process, not {sessions} "
            f"across {processes}."
        )
    return [range(index, sessions, processes) for index in range(processes)]


def worst_window(
    timeline: Sequence[Mapping[str, Any]], *, config: UpstreamConfig, seconds: int = WINDOW_S
) -> dict[str, Any]:
    """The window of ``seconds`` whole seconds where the upstream received the most
    requests against its quota.

    ``timeline`` is the upstream's per-second ``stats()["timeline"]``: second ``t`` of its
    clock, the ``requests`` it received then (whatever it answered). Each window starts at
    a whole second; its quota is what the upstream's rate admits over it, following the
    schedule (:func:`~asyncquota.bench.metrics.request_quota`, without the bucket's first
    burst). A run shorter than the window is one window from its start: the quota of the
    whole window against what was sent in it.

    Returns:
        ``ratio`` (requests ÷ quota, 4 decimals), ``start_s``, ``seconds``, ``requests``,
        ``quota`` (None ratio: an empty timeline).
    """
    if seconds < 1:
        raise ValueError(f"A window is at least 1 s, not {seconds!r}.")
    counts = [int(row["requests"]) for row in timeline]
    if not counts:
        return {"ratio": None, "start_s": None, "seconds": seconds, "requests": 0,
                "quota": round(request_quota(config, seconds), 1)}
    prefix = [0, *itertools.accumulate(counts)]
    best: tuple[float, int, int, float] | None = None
    for start in range(max(1, len(counts) - seconds + 1)):
        sent = prefix[min(len(counts), start + seconds)] - prefix[start]
        quota = request_quota(config, start + seconds) - request_quota(config, start)
        if best is None or sent / quota > best[0]:
            best = (sent / quota, start, sent, quota)
    assert best is not None
    ratio, start, sent, quota = best
    return {"ratio": round(ratio, 4), "start_s": start, "seconds": seconds,
            "requests": sent, "quota": round(quota, 1)}


@dataclass(slots=True)
class WorkerRun:
    """What one process of the fleet brings back.

    Attributes:
        index: the process's number (from 0).
        sessions: how many sessions it replayed.
        run: its night, as any strategy's (its log on its own clock; ``upstream`` empty).
        offset: seconds its night began after the common start (its log is moved by this).
        fleet: its ``fleet.statistics()`` at the end (the contract's fields), or None
            without a fleet.
        degraded: ``(t, degraded)`` each time its fleet's ``degraded`` flag changed, ``t``
            in seconds from the common start (empty without a fleet).
    """

    index: int
    sessions: int
    run: StrategyRun
    offset: float = 0.0
    fleet: dict[str, Any] | None = None
    degraded: list[tuple[float, bool]] = field(default_factory=list)


@dataclass(slots=True)
class RedisOutage:
    """When the bench killed and restored the redis-server, in seconds from the start.

    ``kill_at``/``restore_at`` are asked for (None: not asked); ``killed_at`` is when the
    SIGKILL was sent, ``restored_at`` when the new server answered PING (None: the night
    ended first).
    """

    kill_at: float | None = None
    restore_at: float | None = None
    killed_at: float | None = None
    restored_at: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "kill_at": self.kill_at,
            "restore_at": self.restore_at,
            "killed_at": None if self.killed_at is None else round(self.killed_at, 3),
            "restored_at": None if self.restored_at is None else round(self.restored_at, 3),
        }


@dataclass(slots=True)
class FleetRun:
    """One strategy's fleet: the merged run, each process's, and the Redis outage."""

    strategy: str
    run: StrategyRun
    workers: list[WorkerRun]
    outage: RedisOutage | None = None


def _shifted(values: array[float], offset: float) -> array[float]:
    return array("d", (value + offset for value in values)) if offset else array("d", values)


def merge_runs(strategy: str, workers: Sequence[WorkerRun],
               upstream: Mapping[str, Any]) -> StrategyRun:
    """The fleet's night as one strategy's run: the logs on the common clock, one after
    the other; the samples added second by second (``t`` kept); ``cpu_s`` summed, the
    largest ``peak_rss_mb``, the longest ``wall_s``; the queue waits pooled by class."""
    log = RequestLog()
    samples: list[dict[str, float]] = []
    waits: dict[str, array[float]] | None = None
    source: str | None = None
    stopped_at = 0.0
    for worker in sorted(workers, key=lambda w: w.index):
        run = worker.run
        log.classes.extend(run.log.classes)
        log.tenants.extend(run.log.tenants)
        log.starts.extend(_shifted(run.log.starts, worker.offset))
        log.ends.extend(_shifted(run.log.ends, worker.offset))
        log.outcomes.extend(run.log.outcomes)
        log.ok += run.log.ok
        stopped_at = max(stopped_at, run.stopped_at + worker.offset)
        for second, sample in enumerate(run.samples):
            if second == len(samples):
                samples.append({"t": sample["t"]})
            total = samples[second]
            for key, value in sample.items():
                if key != "t":
                    total[key] = total.get(key, 0.0) + value
        if run.queue_waits is not None:
            waits = {} if waits is None else waits
            for name, values in run.queue_waits.items():
                waits.setdefault(name, array("d")).extend(values)
            source = run.queue_wait_source
    runs = [worker.run for worker in workers]
    return StrategyRun(
        strategy=strategy,
        log=log,
        samples=samples,
        upstream=dict(upstream),
        stopped_at=stopped_at,
        cpu_s=sum(run.cpu_s for run in runs),
        peak_rss_mb=max((run.peak_rss_mb for run in runs), default=0.0),
        wall_s=max((run.wall_s for run in runs), default=0.0),
        queue_waits=waits,
        queue_wait_source=source,
    )


def _first_change(changes: Sequence[tuple[float, bool]], *, to: bool,
                  since: float) -> float | None:
    """Seconds from ``since`` to the first change of the flag to ``to`` at or after it."""
    return next((round(t - since, 3) for t, value in changes if value is to and t >= since),
                None)


def _state_at(changes: Sequence[tuple[float, bool]], at: float) -> bool:
    """The flag at time ``at`` (False before its first reading)."""
    state = False
    for t, value in changes:
        if t > at:
            break
        state = value
    return state


def _spells(changes: Sequence[tuple[float, bool]]) -> list[list[float | None]]:
    """The spells of a degraded flag: ``[from, to]``, ``to`` None if it lasted to the end."""
    spells: list[list[float | None]] = []
    for t, value in changes:
        if value and (not spells or spells[-1][1] is not None):
            spells.append([t, None])
        elif not value and spells and spells[-1][1] is None:
            spells[-1][1] = t
    return spells


def _slowest(delays: Sequence[float | None]) -> float | None:
    """The slowest of the processes' delays; None if one never got there (or none ran)."""
    if not delays or any(delay is None for delay in delays):
        return None
    return max(delay for delay in delays if delay is not None)


def fleet_figures(
    result: Mapping[str, Any],
    *,
    strategy: str,
    config: UpstreamConfig,
    timeline: Sequence[Mapping[str, Any]],
    workers: Sequence[WorkerRun],
    outage: RedisOutage | None = None,
    window: int = WINDOW_S,
) -> dict[str, Any]:
    """One strategy's fleet figures (see the module docstring).

    Args:
        result: the merged run's standard figures
            (:func:`~asyncquota.bench.metrics.summarize`'s).
        strategy: the strategy's name (the Redis targets are the fleet's only).
        config: the shared upstream (its rate makes the quota).
        timeline: the upstream's per-second timeline.
        workers: each process's run, fleet statistics and ``degraded`` changes.
        outage: when Redis was killed and restored (None: it was not).
        window: seconds of the ``over_quota_max`` window.
    """
    worst = worst_window(timeline, config=config, seconds=window)
    stats = [worker.fleet for worker in workers if worker.fleet is not None]
    with_fleet = bool(stats) and len(stats) == len(workers)
    upstream_requests = int(result["upstream_requests"])
    calls = sum(int(s["calls"]) for s in stats) if with_fleet else None
    per_process: list[dict[str, Any]] = []
    after_kill: list[float | None] = []
    after_restore: list[float | None] = []
    for worker in sorted(workers, key=lambda w: w.index):
        log = worker.run.log
        entry: dict[str, Any] = {
            "process": worker.index,
            "sessions": worker.sessions,
            "requests": len(log),
            "ok": log.ok,
            "lost": log.outcomes.count(NO_OUTCOME),
            "offset_ms": round(worker.offset * 1000.0, 1),
            "cpu_s": round(worker.run.cpu_s, 2),
            "peak_rss_mb": round(worker.run.peak_rss_mb, 1),
            "wall_s": round(worker.run.wall_s, 2),
            "fleet": worker.fleet,
            "degraded_spells": _spells(worker.degraded) if worker.fleet is not None else None,
        }
        if worker.fleet is not None and outage is not None and outage.killed_at is not None:
            entry["degraded_after_kill_s"] = _first_change(
                worker.degraded, to=True, since=outage.killed_at
            )
            after_kill.append(entry["degraded_after_kill_s"])
            if outage.restored_at is not None:
                back: float | None = 0.0  # not degraded then: in step already
                if _state_at(worker.degraded, outage.restored_at):
                    back = _first_change(worker.degraded, to=False, since=outage.restored_at)
                entry["back_after_restore_s"] = back
                after_restore.append(back)
        per_process.append(entry)
    over = worst["ratio"]
    goodput = result["goodput_ratio"]
    share = result["upstream_429_ratio"]
    lost = int(result["lost"])
    per_request = (
        round(calls / upstream_requests, 4) if calls is not None and upstream_requests else None
    )
    degraded_seconds = (
        round(max(float(s["degraded_seconds"]) for s in stats), 3) if with_fleet else None
    )
    return {
        "processes": len(workers),
        "goodput": goodput,
        "429_share": share,
        "lost": lost,
        "over_quota_max": over,
        "over_quota_window": worst,
        "upstream_requests": upstream_requests,
        "redis_calls": calls,
        "redis_calls_per_request": per_request,
        "grants": sum(int(s["requests"]) for s in stats) if with_fleet else None,
        "leases": sum(int(s["leases"]) for s in stats) if with_fleet else None,
        "degraded_seconds": degraded_seconds,
        "degraded_after_kill_s": _slowest(after_kill) if after_kill else None,
        "back_after_restore_s": _slowest(after_restore) if after_restore else None,
        "redis": None if outage is None else outage.as_dict(),
        "per_process": per_process,
        "targets": {
            "goodput": goodput >= TARGETS["goodput"],
            "429_share": share <= TARGETS["429_share"],
            "over_quota_max": over is not None and over <= TARGETS["over_quota_max"],
            "lost": lost <= TARGETS["lost"],
            "redis_calls_per_request": None
            if strategy != FLEET
            else per_request is not None and per_request <= TARGETS["redis_calls_per_request"],
        },
    }


def fleet_document(
    *,
    config: UpstreamConfig,
    model: SessionModel,
    processes: int,
    runs: Mapping[str, FleetRun],
    window: int = WINDOW_S,
) -> dict[str, Any]:
    """The report: :func:`~asyncquota.bench.report.document`'s for the merged runs, each
    result with its ``fleet`` figures, and the fleet described at the top."""
    doc = document(
        scenario=SCENARIO, config=config, model=model, virtual=False,
        runs={name: fleet.run for name, fleet in runs.items()},
    )
    doc["upstream"]["preset"] = PRESET
    outage = next((fleet.outage for fleet in runs.values() if fleet.outage is not None), None)
    doc["fleet"] = {
        "processes": processes,
        "quota_name": QUOTA_NAME,
        "window_s": window,
        "strategies": {name: FLEET_STRATEGIES.get(name, "") for name in runs},
        "redis": None if outage is None else {"kill_at": outage.kill_at,
                                              "restore_at": outage.restore_at},
    }
    for name, fleet in runs.items():
        result = doc["results"][name]
        result["fleet"] = fleet_figures(
            result, strategy=name, config=config, timeline=result["timeline"],
            workers=fleet.workers, outage=fleet.outage, window=window,
        )
    return doc


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fleet_table(doc: Mapping[str, Any]) -> str:
    """The standard table of the merged runs, then a row per strategy with the fleet's
    figures and a row per process."""
    header = (
        f"{'strategy':<11} {'procs':>5} {'goodput':>7} {'429 %':>6} {'worst 60s':>9} "
        f"{'lost':>5} {'redis/req':>9} {'degr s':>7} {'kill→degr':>9} {'back s':>7}"
    )
    targets = TARGETS
    lines = [
        table(doc),
        "",
        f"the crisis split across {doc['fleet']['processes']} processes sharing one quota; "
        f"worst 60s: the upstream's requests received in its worst {doc['fleet']['window_s']} s "
        f"÷ its quota then; targets: goodput ≥ {targets['goodput']:g}, 429 ≤ "
        f"{targets['429_share']:.0%}, worst 60s ≤ {targets['over_quota_max']:g}, 0 lost, "
        f"redis/req ≤ {targets['redis_calls_per_request']:g}",
        header,
        "-" * len(header),
    ]
    for name, result in doc["results"].items():
        f = result["fleet"]
        lines.append(
            f"{name:<11} {f['processes']:>5} {_cell(f['goodput'], '.3f'):>7} "
            f"{_cell(100 * f['429_share'], '.1f'):>6} {_cell(f['over_quota_max'], '.3f'):>9} "
            f"{f['lost']:>5} {_cell(f['redis_calls_per_request'], '.3f'):>9} "
            f"{_cell(f['degraded_seconds'], '.2f'):>7} "
            f"{_cell(f['degraded_after_kill_s'], '.3f'):>9} "
            f"{_cell(f['back_after_restore_s'], '.3f'):>7}"
        )
    process_header = (
        f"{'strategy':<11} {'proc':>4} {'sessions':>8} {'requests':>8} {'ok':>7} "
        f"{'lost':>5} {'redis calls':>11} {'grants':>7} {'leases':>7} {'degr s':>7} "
        f"{'cpu s':>6} {'start ms':>8}"
    )
    lines += ["", "per process", process_header, "-" * len(process_header)]
    for name, result in doc["results"].items():
        for p in result["fleet"]["per_process"]:
            stats = p["fleet"] or {}
            lines.append(
                f"{name:<11} {p['process']:>4} {p['sessions']:>8} {p['requests']:>8} "
                f"{p['ok']:>7} {p['lost']:>5} {_cell(stats.get('calls'), 'd'):>11} "
                f"{_cell(stats.get('requests'), 'd'):>7} {_cell(stats.get('leases'), 'd'):>7} "
                f"{_cell(stats.get('degraded_seconds'), '.2f'):>7} {p['cpu_s']:>6.1f} "
                f"{p['offset_ms']:>8.1f}"
            )
    return "\n".join(lines)


# -- one process of the fleet -----------------------------------------------------------------


class FleetShaperStrategy(ShaperStrategy):
    """The ``asyncquota`` strategy of one process of a fleet: a Shaper given the quota.

    Unlike the crisis's ``asyncquota`` (a Shaper with its defaults, which learns the quota
    from the upstream), every process's Shaper is told the quota's ``rpm``/``tpm``, as the
    fleet contract asks of all processes of a fleet: with ``fleet`` they share it, without
    (the ``no-fleet`` baseline) each aims at all of it. Calls, sampling and closing are the
    crisis strategy's; the Shaper does not close the fleet (its opener does).

    Args:
        target: the shared upstream.
        index: the process's number, which seeds its Shaper's jitter apart from the others'.
        fleet: a :class:`asyncquota.fleet.RedisFleet` already entered, or None.
    """

    def __init__(self, target: Target, *, index: int, fleet: Any | None = None) -> None:
        Strategy.__init__(self, target)
        config = target.config
        arguments: dict[str, Any] = {"rpm": config.rps * 60.0, "tpm": config.tpm}
        if fleet is not None:
            arguments["fleet"] = fleet
        self._fleet = fleet
        self._waits = QueueWaits()
        self._gateway = None
        self._shaper = Shaper(
            target.base_url,
            transport=target.shaper_transport(max_connections=DEFAULT_MAX_CONNECTIONS),
            wall_clock=config.wall_clock,
            hooks=(LoggingHook(), self._waits),
            seed=config.seed * 1_000 + index,
            **arguments,
        )

    def sample(self) -> Mapping[str, float]:
        """The crisis strategy's samples, and the fleet's calls, liveness and degradation."""
        sample = dict(super().sample())
        if self._fleet is not None:
            stats = self._fleet.statistics()
            sample["fleet_calls"] = float(stats.calls)
            sample["fleet_live"] = float(stats.live_processes)
            sample["fleet_degraded"] = float(bool(stats.degraded))
        return sample


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One process of the fleet, as sent to it.

    Attributes:
        strategy: ``asyncquota`` (with the fleet) or ``no-fleet``.
        index: its number, from 0.
        config: the shared upstream.
        model: the whole night (the process replays ``sessions`` of it).
        sessions: the indices of its sessions.
        base_url: the upstream process's URL.
        redis_url: the redis-server's URL (the fleet strategy only).
        processes: how many processes the fleet runs (its share while Redis is away
            before it ever counted them).
    """

    strategy: str
    index: int
    config: UpstreamConfig
    model: SessionModel
    sessions: range
    base_url: str
    redis_url: str | None = None
    processes: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in FLEET_STRATEGIES:
            raise ValueError(
                f"A fleet process runs {' or '.join(FLEET_STRATEGIES)}, not {self.strategy!r}."
            )
        if self.strategy == FLEET and self.redis_url is None:
            raise ValueError(f"The {FLEET} strategy's processes need the redis-server's URL.")


def _statistics(fleet: Any) -> dict[str, Any]:
    stats = fleet.statistics()
    return {name: getattr(stats, name) for name in _STATISTICS}


@contextlib.asynccontextmanager
async def _open_fleet(spec: WorkerSpec) -> AsyncIterator[Any]:
    """The process's RedisFleet, entered (None for the baseline)."""
    if spec.strategy != FLEET:
        yield None
        return
    reason = fleet_unavailable()
    if reason is not None:
        raise FleetUnavailable(reason)
    module = importlib.import_module(FLEET_MODULE)
    fleet_of = module.RedisFleet(spec.redis_url, name=QUOTA_NAME, processes=spec.processes)
    async with fleet_of as fleet:
        yield fleet


async def _start_time(conn: Connection) -> float:
    """Say ready, then wait for the parent's start time (wall clock) without blocking the
    loop (a fleet's heartbeat runs meanwhile)."""
    conn.send(("ready", None))
    loop = asyncio.get_running_loop()
    told = asyncio.Event()
    loop.add_reader(conn.fileno(), told.set)
    try:
        async with asyncio.timeout(READY_TIMEOUT + START_DELAY):
            await told.wait()
    finally:
        loop.remove_reader(conn.fileno())
        # Watching it made the pipe non-blocking (uvloop does): a large result sent later
        # would then fail half-written instead of waiting for the parent to read.
        os.set_blocking(conn.fileno(), True)
    kind, start_at = conn.recv()
    if kind != "start":
        raise RuntimeError(f"Expected the start signal, got {kind!r}.")
    return float(start_at)


async def _watch_degraded(fleet: Any, start_at: float,
                          changes: list[tuple[float, bool]]) -> None:
    state: bool | None = None
    while True:
        degraded = bool(fleet.statistics().degraded)
        if degraded is not state:
            changes.append((round(time.time() - start_at, 4), degraded))
            state = degraded
        await asyncio.sleep(POLL_DEGRADED)


async def _work(spec: WorkerSpec, conn: Connection) -> WorkerRun:
    """The process's night: open the fleet and the Shaper, wait for the start, drive its
    share, close, and bring back the log and the fleet's statistics."""
    target = Target(spec.base_url, spec.config)
    log = RequestLog()
    run = StrategyRun(strategy=spec.strategy, log=log)
    worker = WorkerRun(index=spec.index, sessions=len(spec.sessions), run=run)
    async with _open_fleet(spec) as fleet:
        strategy = FleetShaperStrategy(target, index=spec.index, fleet=fleet)

        def on_second(t: float) -> None:
            sample: dict[str, float] = {"t": t, "started": len(log), "ok": log.ok,
                                        "open": log.open}
            sample.update(strategy.sample())
            run.samples.append(sample)

        await strategy.__aenter__()
        watcher: asyncio.Task[None] | None = None
        try:
            start_at = await _start_time(conn)
            if fleet is not None:
                watcher = asyncio.create_task(_watch_degraded(fleet, start_at, worker.degraded))
            await asyncio.sleep(max(0.0, start_at - time.time()))
            worker.offset = time.time() - start_at
            run.stopped_at = await drive(strategy, spec.model, log, on_second=on_second,
                                         sessions=spec.sessions)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await strategy.__aexit__(None, None, None)
        waits = strategy.queue_waits()
        run.queue_waits = {name: array("d", values) for name, values in waits.items()}
        run.queue_wait_source = strategy.queue_wait_source
        if fleet is not None:
            worker.fleet = _statistics(fleet)
    return worker


def _worker_run(worker: WorkerRun) -> StrategyRun:
    return worker.run


def _worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A fleet process's whole life: its night on uvloop, measured; the result (or the
    error, in one line) sent to the parent. Ctrl-C is the parent's to handle: it
    terminates its processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = run_measured(_worker_run, _work(spec, conn), virtual=False)
    except BaseException as exc:
        if not isinstance(exc, FleetUnavailable):
            traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(OSError):
            conn.send(("error", "".join(traceback.format_exception_only(exc)).strip()))
    else:
        conn.send(("done", result))
    finally:
        conn.close()


# -- the parent -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Process:
    index: int
    process: BaseProcess
    conn: Connection


@contextlib.contextmanager
def _spawned(specs: Sequence[WorkerSpec]) -> Iterator[list[_Process]]:
    """The fleet's processes, spawned; on the way out (done, failed or interrupted), each
    still alive is terminated, then killed."""
    context = multiprocessing.get_context("spawn")
    processes: list[_Process] = []
    try:
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(spec, child),
                                      name=f"fleet-{spec.index}", daemon=True)
            process.start()
            child.close()
            processes.append(_Process(spec.index, process, parent))
        yield processes
    finally:
        for p in processes:
            p.conn.close()
            if p.process.is_alive():
                p.process.terminate()
        for p in processes:
            p.process.join(2.0)
            if p.process.is_alive():
                p.process.kill()
                p.process.join(2.0)


def _receive(p: _Process) -> tuple[str, Any]:
    try:
        kind, payload = p.conn.recv()
    except (EOFError, OSError):
        p.process.join(1.0)
        raise RuntimeError(
            f"Process {p.index} of the fleet exited (exit code {p.process.exitcode}) "
            "without its results."
        ) from None
    if kind == "error":
        raise RuntimeError(f"Process {p.index} of the fleet failed: {payload}")
    return str(kind), payload


def _await_all(processes: Sequence[_Process], kind: str, *, deadline: float,
               events: list[tuple[float, Callable[[], None]]] | None = None) -> dict[int, Any]:
    """Each process's next message, which must be ``kind``, by ``deadline`` (wall clock);
    meanwhile, run each of ``events`` (sorted ``(when, action)``) when its time comes."""
    got: dict[int, Any] = {}
    events = events if events is not None else []
    by_conn = {id(p.conn): p for p in processes}
    while len(got) < len(processes):
        now = time.time()
        while events and events[0][0] <= now:
            events.pop(0)[1]()
            now = time.time()
        if now >= deadline:
            missing = sorted(p.index for p in processes if p.index not in got)
            raise RuntimeError(
                f"Fleet processes {missing} did not report {kind!r} in time; stopping them."
            )
        until = min(deadline, events[0][0]) if events else deadline
        waiting = [p.conn for p in processes if p.index not in got]
        for conn in wait(waiting, timeout=max(0.0, until - now)):
            p = by_conn[id(conn)]
            received, payload = _receive(p)
            if received != kind:
                raise RuntimeError(f"Process {p.index} said {received!r} before {kind!r}.")
            got[p.index] = payload
    return got


def _outage_events(server: RedisServer, outage: RedisOutage,
                   start_at: float) -> list[tuple[float, Callable[[], None]]]:
    def kill() -> None:
        outage.killed_at = time.time() - start_at
        server.stop()

    def restore() -> None:
        server.start()
        outage.restored_at = time.time() - start_at

    events: list[tuple[float, Callable[[], None]]] = []
    if outage.kill_at is not None:
        events.append((start_at + outage.kill_at, kill))
    if outage.restore_at is not None:
        events.append((start_at + outage.restore_at, restore))
    return events


def _run_one(
    strategy: str,
    *,
    config: UpstreamConfig,
    model: SessionModel,
    processes: int,
    redis: RedisServer | None,
    outage: RedisOutage | None,
) -> FleetRun:
    """One strategy's fleet against a fresh upstream process (Redis given by the caller)."""
    shares = split_sessions(model.sessions, processes)
    with run_in_process(config) as base_url:
        specs = [
            WorkerSpec(strategy=strategy, index=index, config=config, model=model,
                       sessions=share, base_url=base_url,
                       redis_url=None if redis is None else redis.url, processes=len(shares))
            for index, share in enumerate(shares)
        ]
        with _spawned(specs) as spawned:
            _await_all(spawned, "ready", deadline=time.time() + READY_TIMEOUT)
            start_at = time.time() + START_DELAY
            for p in spawned:
                p.conn.send(("start", start_at))
            events = (
                _outage_events(redis, outage, start_at)
                if redis is not None and outage is not None else []
            )
            horizon = model.duration + model.max_deadline + STOP_GRACE + CLOSE_TIMEOUT
            done = _await_all(spawned, "done", deadline=start_at + horizon + COLLECT_GRACE,
                              events=events)
        workers: list[WorkerRun] = [done[index] for index in sorted(done)]
        upstream = asyncio.run(fetch_stats(base_url))
    return FleetRun(strategy=strategy, run=merge_runs(strategy, workers, upstream),
                    workers=workers, outage=outage)


def run_fleet(
    names: Sequence[str],
    *,
    config: UpstreamConfig,
    model: SessionModel,
    processes: int = DEFAULT_PROCESSES,
    kill_redis_at: float | None = None,
    restore_redis_at: float | None = None,
    on_done: Callable[[FleetRun], None] | None = None,
) -> dict[str, FleetRun]:
    """Run each strategy's fleet in turn: ``processes`` spawned processes, a fresh upstream
    process, and for the fleet strategy a fresh redis-server (killed at ``kill_redis_at``
    and restored at ``restore_redis_at``, seconds from the start, when given).

    Raises:
        ValueError: an unknown strategy, a process count out of bounds, or a restore
            without a kill or not after it.
        FleetUnavailable: the fleet strategy asked for where it cannot run (why, in one
            line: see :func:`fleet_unavailable`).
        RuntimeError: a process failed, or did not start or report in time (every process
            is stopped first).
    """
    unknown = [name for name in names if name not in FLEET_STRATEGIES]
    if unknown:
        raise ValueError(
            f"The fleet scenario runs {', '.join(FLEET_STRATEGIES)}, not {', '.join(unknown)}."
        )
    if not 1 <= processes <= MAX_PROCESSES:
        raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}, not {processes!r}.")
    for what, value in (("kill_redis_at", kill_redis_at), ("restore_redis_at", restore_redis_at)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{what} must be a number of seconds (0 or more), not {value!r}.")
    if restore_redis_at is not None and (kill_redis_at is None
                                         or restore_redis_at <= kill_redis_at):
        raise ValueError("Redis is restored after it is killed: restore_redis_at needs an "
                         "earlier kill_redis_at.")
    if FLEET in names:
        reason = fleet_unavailable()
        if reason is not None:
            raise FleetUnavailable(reason)
    runs: dict[str, FleetRun] = {}
    for name in names:
        with contextlib.ExitStack() as stack:
            redis = stack.enter_context(RedisServer()) if name == FLEET else None
            outage = (
                RedisOutage(kill_at=kill_redis_at, restore_at=restore_redis_at)
                if redis is not None and kill_redis_at is not None else None
            )
            runs[name] = _run_one(name, config=config, model=model, processes=processes,
                                  redis=redis, outage=outage)
        if on_done is not None:
            on_done(runs[name])
    return runs
