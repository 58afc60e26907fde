"""The fleet scenario's benchmark: its pure figures from known data, and the harness for real
(spawned processes, an upstream process, a redis-server killed and restored), kept tiny."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from array import array
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncquota.bench import fleet as bench_fleet
from asyncquota.bench.fleet import (
    ALONE,
    FLEET,
    FleetRun,
    FleetUnavailable,
    RedisOutage,
    WorkerRun,
    WorkerSpec,
    fleet_document,
    fleet_figures,
    fleet_table,
    merge_runs,
    run_fleet,
    split_sessions,
    worst_window,
)
from asyncquota.bench.metrics import RequestLog, summarize
from asyncquota.bench.runner import StrategyRun
from asyncquota.bench.sessions import SessionModel
from asyncquota.cli import main
from asyncquota.outcomes import RequestOutcome
from asyncquota.testing import UpstreamConfig
from asyncquota.testing.redis import INSTALL_HINT, RedisServer, find_redis_server

# Real processes on real time: looptime's virtual clock has no say here.
pytestmark = pytest.mark.looptime(False)

INTERACTIVE, BATCH = 0, 1
QUOTA = UpstreamConfig(rps=10.0)  # 600 requests a minute

# A night small enough for a few seconds of real time: 2 s of sessions, short deadlines.
TINY = SessionModel(sessions=120, duration=2.0, interactive_deadline=2.0, batch_deadline=3.0)


def timeline(counts: list[int]) -> list[dict[str, Any]]:
    return [{"t": t, "requests": n} for t, n in enumerate(counts)]


# -- splitting the night ---------------------------------------------------------------------


def test_the_sessions_go_round_robin_each_to_exactly_one_process():
    shares = split_sessions(10, 3)
    assert [list(share) for share in shares] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    crisis = split_sessions(30_000, 4)
    assert sorted(i for share in crisis for i in share) == list(range(30_000))
    assert {len(share) for share in crisis} == {7_500}


def test_more_processes_than_sessions_leaves_some_idle_and_nonsense_is_refused():
    assert [len(share) for share in split_sessions(2, 4)] == [1, 1, 0, 0]
    for sessions, processes in ((0, 2), (5, 0)):
        with pytest.raises(ValueError, match="at least 1 session across at least 1 process"):
            split_sessions(sessions, processes)


# -- the worst 60 s window -------------------------------------------------------------------


def test_a_steady_run_at_the_quota_is_1_and_a_burst_shows_in_its_window():
    assert worst_window(timeline([10] * 120), config=QUOTA)["ratio"] == 1.0
    # A second of 40 at 90 s: the windows holding it carry 630 against 600.
    burst = worst_window(timeline([10] * 90 + [40] + [10] * 29), config=QUOTA)
    assert burst == {"ratio": 1.05, "start_s": 31, "seconds": 60, "requests": 630,
                     "quota": 600.0}


def test_every_request_received_counts_429s_included_whatever_the_answer():
    # The timeline's requests are arrivals: a refused request was sent all the same.
    rows = [{"t": t, "requests": 20, "ok": 10, "429": 10} for t in range(60)]
    assert worst_window(rows, config=QUOTA)["ratio"] == 2.0


def test_a_run_shorter_than_the_window_is_measured_against_the_whole_windows_quota():
    assert worst_window(timeline([10, 20, 30]), config=QUOTA) == {
        "ratio": 0.1, "start_s": 0, "seconds": 60, "requests": 60, "quota": 600.0,
    }
    empty = worst_window([], config=QUOTA)
    assert (empty["ratio"], empty["requests"], empty["quota"]) == (None, 0, 600.0)


def test_the_windows_quota_follows_the_upstreams_schedule():
    halved = UpstreamConfig(rps=10.0, schedule=((10.0, 0.5),))
    # 10 s at 10/s then 5/s: sending 5/s throughout is 1.0 only once the halving is in.
    steady = worst_window(timeline([5] * 80), config=halved, seconds=20)
    assert (steady["ratio"], steady["start_s"], steady["quota"]) == (1.0, 10, 100.0)
    with pytest.raises(ValueError, match="at least 1 s"):
        worst_window(timeline([1]), config=QUOTA, seconds=0)


# -- merging the processes and the figures ---------------------------------------------------


def worker(index: int, rows: list[tuple[int, float, float | None, RequestOutcome | None]], *,
           offset: float = 0.0, fleet: dict[str, Any] | None = None,
           degraded: list[tuple[float, bool]] | None = None) -> WorkerRun:
    run = StrategyRun(
        strategy=FLEET,
        log=RequestLog.from_rows(rows),
        samples=[{"t": 1.0, "started": len(rows), "ok": 1.0, "limit": 8.0}],
        stopped_at=5.0,
        cpu_s=1.5,
        peak_rss_mb=40.0 + index,
        wall_s=5.0 + index,
        queue_waits={"interactive": array("d", [0.01 * (index + 1)]), "batch": array("d")},
        queue_wait_source="waits",
    )
    return WorkerRun(index=index, sessions=len(rows), run=run, offset=offset, fleet=fleet,
                     degraded=degraded or [])


def stats(calls: int, requests: int, degraded_seconds: float) -> dict[str, Any]:
    return {"calls": calls, "requests": requests, "degraded": False,
            "degraded_seconds": degraded_seconds, "live_processes": 2, "leases": calls // 4}


WORKERS = [
    worker(0, [(INTERACTIVE, 0.0, 0.5, RequestOutcome.OK),
               (BATCH, 1.0, None, None)],  # lost at the hard stop
           fleet=stats(40, 2, 0.2),
           degraded=[(0.0, False), (2.05, True), (3.2, False)]),
    worker(1, [(INTERACTIVE, 0.5, 1.0, RequestOutcome.OK),
               (INTERACTIVE, 1.5, 1.6, RequestOutcome.THROTTLED)],
           offset=0.004, fleet=stats(20, 1, 1.1),
           degraded=[(0.0, False), (2.01, True), (3.5, False)]),
]
UPSTREAM = {"totals": {"requests": 4, "ok": 2, "429": 1, "5xx": 0},
            "timeline": [{"t": 0, "requests": 3}, {"t": 1, "requests": 1}]}
OUTAGE = RedisOutage(kill_at=2.0, restore_at=3.0, killed_at=2.001, restored_at=3.1)


def test_the_processes_logs_merge_on_one_clock_and_their_figures_add_up():
    merged = merge_runs(FLEET, WORKERS, UPSTREAM)
    assert len(merged.log) == 4 and merged.log.ok == 2
    assert list(merged.log.starts) == [0.0, 1.0, 0.504, 1.504]  # process 1 began 4 ms late
    assert merged.log.open == 1
    assert merged.stopped_at == pytest.approx(5.004)
    assert merged.samples == [{"t": 1.0, "started": 4.0, "ok": 2.0, "limit": 16.0}]
    assert (merged.cpu_s, merged.peak_rss_mb, merged.wall_s) == (3.0, 41.0, 6.0)
    assert merged.queue_waits is not None
    assert list(merged.queue_waits["interactive"]) == [0.01, 0.02]
    assert merged.upstream == UPSTREAM


def result_of(run: StrategyRun) -> dict[str, Any]:
    return summarize(run.log, config=QUOTA, deadlines={"interactive": 10, "batch": 120},
                     upstream_totals=UPSTREAM["totals"], stopped_at=run.stopped_at)


def test_the_fleet_figures_of_a_known_night_with_an_outage():
    result = result_of(merge_runs(FLEET, WORKERS, UPSTREAM))
    figures = fleet_figures(result, strategy=FLEET, config=QUOTA,
                            timeline=UPSTREAM["timeline"], workers=WORKERS, outage=OUTAGE)
    per_process = figures.pop("per_process")
    assert figures == {
        "processes": 2,
        "goodput": result["goodput_ratio"],
        "429_share": 0.25,
        "lost": 1,
        "over_quota_max": round(4 / 600, 4),
        "over_quota_window": {"ratio": round(4 / 600, 4), "start_s": 0, "seconds": 60,
                              "requests": 4, "quota": 600.0},
        "upstream_requests": 4,
        "redis_calls": 60,
        "redis_calls_per_request": 15.0,  # 60 round trips for 4 requests received
        "grants": 3,
        "leases": 15,
        "degraded_seconds": 1.1,  # the longest of the processes'
        "degraded_after_kill_s": 0.049,  # the slower process noticed at 2.05 s
        "back_after_restore_s": 0.4,  # and came back at 3.5 s
        "redis": {"kill_at": 2.0, "restore_at": 3.0, "killed_at": 2.001, "restored_at": 3.1},
        "targets": {"goodput": False, "429_share": False, "over_quota_max": True,
                    "lost": False, "redis_calls_per_request": False},
    }
    assert [(p["process"], p["requests"], p["ok"], p["lost"], p["offset_ms"]) for p in
            per_process] == [(0, 2, 1, 1, 0.0), (1, 2, 1, 0, 4.0)]
    assert per_process[1]["fleet"] == stats(20, 1, 1.1)
    assert per_process[1]["degraded_spells"] == [[2.01, 3.5]]
    assert (per_process[0]["degraded_after_kill_s"], per_process[0]["back_after_restore_s"]) \
        == (0.049, 0.1)


def test_a_process_that_never_noticed_or_never_came_back_is_none_not_a_fast_figure():
    stuck = [WORKERS[0], worker(1, [(INTERACTIVE, 0.5, 1.0, RequestOutcome.OK)],
                                fleet=stats(5, 1, 3.0), degraded=[(0.0, False), (2.3, True)])]
    never = [WORKERS[0], worker(1, [(INTERACTIVE, 0.5, 1.0, RequestOutcome.OK)],
                                fleet=stats(5, 1, 0.0), degraded=[(0.0, False)])]
    result = result_of(merge_runs(FLEET, stuck, UPSTREAM))
    late = fleet_figures(result, strategy=FLEET, config=QUOTA, timeline=UPSTREAM["timeline"],
                         workers=stuck, outage=OUTAGE)
    assert (late["degraded_after_kill_s"], late["back_after_restore_s"]) == (0.299, None)
    assert late["per_process"][1]["degraded_spells"] == [[2.3, None]]
    blind = fleet_figures(result, strategy=FLEET, config=QUOTA, timeline=UPSTREAM["timeline"],
                          workers=never, outage=OUTAGE)
    # Never degraded: it has nothing to come back from, but it did not notice the outage.
    assert (blind["degraded_after_kill_s"], blind["back_after_restore_s"]) == (None, 0.1)


def test_the_degraded_spells_of_a_process_from_its_flags_changes():
    changes = [(0.0, False), (0.4, True), (0.7, False), (20.1, True), (30.2, False),
               (58.0, True)]
    assert bench_fleet._spells(changes) == [[0.4, 0.7], [20.1, 30.2], [58.0, None]]
    assert bench_fleet._spells([(0.0, False)]) == []


def test_the_baseline_has_no_redis_figures_and_no_redis_target():
    alone = [worker(i, [(INTERACTIVE, 0.0, 0.2, RequestOutcome.OK)]) for i in range(2)]
    result = result_of(merge_runs(ALONE, alone, UPSTREAM))
    figures = fleet_figures(result, strategy=ALONE, config=QUOTA,
                            timeline=UPSTREAM["timeline"], workers=alone)
    assert [figures[key] for key in ("redis_calls", "redis_calls_per_request", "grants",
                                     "leases", "degraded_seconds", "degraded_after_kill_s",
                                     "back_after_restore_s", "redis")] == [None] * 8
    assert figures["targets"]["redis_calls_per_request"] is None
    assert all(p["fleet"] is None and p["degraded_spells"] is None
               for p in figures["per_process"])


def test_the_document_has_the_fleet_under_each_result_and_a_table_row_each():
    runs = {
        FLEET: FleetRun(FLEET, merge_runs(FLEET, WORKERS, UPSTREAM), WORKERS, OUTAGE),
        ALONE: FleetRun(ALONE, merge_runs(ALONE, WORKERS[:1], UPSTREAM), WORKERS[:1]),
    }
    runs[ALONE].workers = [worker(0, [(INTERACTIVE, 0.0, 0.5, RequestOutcome.OK)])]
    doc = fleet_document(config=QUOTA, model=TINY, processes=2, runs=runs)
    doc = orjson.loads(orjson.dumps(doc))  # JSON-ready
    assert doc["scenario"] == "fleet" and doc["mode"] == "real"
    assert doc["upstream"]["preset"] == "crisis"
    assert doc["fleet"]["processes"] == 2 and doc["fleet"]["window_s"] == 60
    assert doc["fleet"]["redis"] == {"kill_at": 2.0, "restore_at": 3.0}
    for name in (FLEET, ALONE):
        fleet = doc["results"][name]["fleet"]
        assert {"processes", "goodput", "429_share", "lost", "over_quota_max",
                "redis_calls_per_request", "degraded_seconds", "per_process",
                "targets"} <= fleet.keys()
        assert doc["results"][name]["goodput_ratio"] == fleet["goodput"]
    assert doc["results"][FLEET]["fleet"]["redis_calls_per_request"] == 15.0
    printed = fleet_table(doc).splitlines()
    rows = [line.split() for line in printed if line.startswith((FLEET + " ", ALONE + " "))]
    # Per strategy: a row in the standard table, one in the fleet's, one per process.
    assert [row[0] for row in rows].count(FLEET) == 1 + 1 + 2
    assert [row[0] for row in rows].count(ALONE) == 1 + 1 + 1
    fleet_row = next(row for row in rows if row[0] == FLEET and row[1] == "2")
    assert fleet_row[3:8] == ["25.0", "0.007", "1", "15.000", "1.10"]


# -- what cannot run says so -----------------------------------------------------------------


def no_fleet_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``asyncquota.fleet`` unimportable, whether this build has it or not, on a
    machine that has redis-py and a redis-server (whether this one has them or not)."""
    monkeypatch.setitem(sys.modules, "asyncquota.fleet", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: ModuleSpec("redis", None) if name == "redis" else real(name, *a),
    )
    monkeypatch.setattr(bench_fleet, "find_redis_server", lambda: "/usr/bin/redis-server")


def test_the_fleet_strategy_without_a_fleet_backend_fails_before_anything_starts(monkeypatch):
    no_fleet_backend(monkeypatch)
    with pytest.raises(FleetUnavailable, match=r"no fleet backend \(asyncquota.fleet"):
        run_fleet([ALONE, FLEET], config=QUOTA, model=TINY, processes=2)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "no fleet backend (asyncquota.fleet, issue 11)"),
        (["--strategies", FLEET], "--strategies no-fleet runs the baseline alone"),
    ],
)
def test_the_command_without_a_fleet_backend_is_one_line_and_status_2(
    monkeypatch, capsys, argv, says
):
    no_fleet_backend(monkeypatch)
    assert main(["bench", "--scenario", "fleet", "--processes", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
    assert err.startswith("asyncquota bench --scenario fleet: ")


def test_without_redis_py_the_command_names_the_pip_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    assert main(["bench", "--scenario", "fleet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'asyncquota[redis]'" in err


def test_without_redis_server_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setenv("AQ_REDIS_SERVER", "/nonexistent/redis-server")
    assert main(["bench", "--scenario", "fleet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install redis-server" in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--processes", "2"], "go with --scenario fleet"),
        (["--scenario", "crisis", "--kill-redis-at", "3"], "go with --scenario fleet"),
        (["--scenario", "fleet", "--strategies", ALONE, "--virtual"], "drop --virtual"),
        (["--scenario", "fleet", "--strategies", "naive"], "runs asyncquota, no-fleet, not naive"),
        (["--scenario", "fleet", "--strategies", ALONE, "--processes", "0"], "between 1 and 16"),
        (["--scenario", "fleet", "--strategies", ALONE, "--kill-redis-at", "3"],
         "needs the asyncquota strategy"),
        (["--scenario", "fleet", "--strategies", ALONE, "--restore-redis-at", "3"],
         "needs an earlier --kill-redis-at"),
        (["--scenario", "crisis", "--strategies", ALONE], "goes with --scenario fleet"),
        (["--matrix", "--strategies", ALONE], "goes with --scenario fleet"),
    ],
)
def test_options_out_of_place_are_refused(monkeypatch, capsys, argv, says):
    with pytest.raises(SystemExit) as refused:
        main(["bench", *argv])
    assert refused.value.code == 2
    assert says in capsys.readouterr().err


def test_run_fleet_refuses_what_makes_no_sense():
    for kwargs, says in (
        ({"processes": 0}, "between 1 and 16"),
        ({"restore_redis_at": 2.0}, "needs an earlier kill_redis_at"),
        ({"kill_redis_at": 3.0, "restore_redis_at": 2.0}, "needs an earlier kill_redis_at"),
        ({"kill_redis_at": -1.0}, "0 or more"),
    ):
        with pytest.raises(ValueError, match=says):
            run_fleet([ALONE], config=QUOTA, model=TINY, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not naive"):
        run_fleet(["naive"], config=QUOTA, model=TINY)
    with pytest.raises(ValueError, match="need the redis-server's URL"):
        WorkerSpec(strategy=FLEET, index=0, config=QUOTA, model=TINY, sessions=range(1),
                   base_url="http://127.0.0.1:9")


# -- for real: processes, an upstream, a redis-server ----------------------------------------


def test_the_baseline_for_real_from_the_command_line(tmp_path: Path, capsys):
    path = tmp_path / "fleet.json"
    status = main(["bench", "--scenario", "fleet", "--strategies", ALONE, "--processes", "2",
                   "--sessions", "100", "--duration", "2", "--json", str(path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "per process" in out and out.count(f"\n{ALONE} ") == 1 + 1 + 2
    doc = orjson.loads(path.read_bytes())
    result = doc["results"][ALONE]
    fleet = result["fleet"]
    assert fleet["processes"] == 2 and fleet["lost"] == 0
    assert [p["sessions"] for p in fleet["per_process"]] == [50, 50]
    assert sum(p["requests"] for p in fleet["per_process"]) == result["requests"] > 0
    # Nothing shed, nothing refused in so light a night: every request reached the upstream
    # (its count, not ours, is the worst window's) and was answered.
    assert result["ok"] == result["requests"] == fleet["upstream_requests"]
    assert fleet["over_quota_window"]["requests"] == fleet["upstream_requests"]
    assert fleet["over_quota_max"] == round(fleet["upstream_requests"] / 18_000, 4)
    assert all(abs(p["offset_ms"]) < 1_000 for p in fleet["per_process"])


def need_redis_server() -> None:
    """As the ``redis_server`` fixture: fail under ``AQ_REQUIRE_REDIS=1``, else skip."""
    if find_redis_server() is None:
        if os.environ.get("AQ_REQUIRE_REDIS") == "1":
            pytest.fail(f"AQ_REQUIRE_REDIS=1 but {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)


def test_redis_is_killed_and_restored_on_the_same_port_while_the_processes_run():
    need_redis_server()
    with RedisServer() as server:
        port = server.port
        outage = RedisOutage(kill_at=0.5, restore_at=1.2)
        started = time.monotonic()
        fleet = bench_fleet._run_one(ALONE, config=QUOTA, model=TINY, processes=2,
                                     redis=server, outage=outage)
        assert time.monotonic() - started < 30
        assert server.running and server.port == port
    assert outage.killed_at is not None and outage.restored_at is not None
    assert 0.5 <= outage.killed_at < outage.restored_at
    assert outage.restored_at >= 1.2
    assert len(fleet.workers) == 2 and fleet.run.log.open == 0
    assert len(fleet.run.log) == sum(len(w.run.log) for w in fleet.workers) > 0


def test_a_failing_process_stops_the_run_and_every_process_is_stopped():
    specs = [
        WorkerSpec(strategy=ALONE, index=index, config=QUOTA, model=TINY,
                   sessions=range(index, 10, 2), base_url=url)
        for index, url in enumerate(("http://127.0.0.1:9", "ftp://not-an-upstream"))
    ]
    with bench_fleet._spawned(specs) as spawned, pytest.raises(
        RuntimeError, match="Process 1 of the fleet failed: ValueError: base_url must be"
    ):
        bench_fleet._await_all(spawned, "ready", deadline=time.time() + 60)
    assert all(p.process.exitcode is not None for p in spawned)


def test_processes_that_do_not_report_in_time_are_stopped():
    specs = [
        WorkerSpec(strategy=ALONE, index=index, config=QUOTA, model=TINY,
                   sessions=range(index, 10, 2), base_url="http://127.0.0.1:9")
        for index in range(2)
    ]
    with bench_fleet._spawned(specs) as spawned:
        bench_fleet._await_all(spawned, "ready", deadline=time.time() + 60)
        # Ready, and waiting for a start that never comes: they report nothing.
        with pytest.raises(RuntimeError, match=r"Fleet processes \[0, 1\] did not report"):
            bench_fleet._await_all(spawned, "done", deadline=time.time() + 0.3)
        assert all(p.process.is_alive() for p in spawned)
    assert all(p.process.exitcode is not None for p in spawned)


def test_the_fleet_for_real_talks_to_redis_and_lives_through_its_outage():
    # Runs where the fleet backend is (issue 11); without it, the tests above say why it
    # cannot run. No timing is asserted: the machine is shared.
    need_redis_server()
    reason = bench_fleet.fleet_unavailable()
    if reason is not None:
        pytest.skip(reason)
    runs = run_fleet([FLEET], config=UpstreamConfig(rps=50.0), model=TINY, processes=2,
                     kill_redis_at=0.8, restore_redis_at=1.4)
    fleet = runs[FLEET]
    assert fleet.outage is not None and fleet.outage.restored_at is not None
    assert [w.fleet is not None for w in fleet.workers] == [True, True]
    assert all(w.fleet is not None and w.fleet["calls"] > 0 for w in fleet.workers)
    assert fleet.run.log.open == 0 and len(fleet.run.log) > 0
    doc = fleet_document(config=UpstreamConfig(rps=50.0), model=TINY, processes=2, runs=runs)
    figures = doc["results"][FLEET]["fleet"]
    assert figures["redis_calls"] == sum(w.fleet["calls"] for w in fleet.workers if w.fleet)
    assert figures["redis_calls_per_request"] is not None
    assert figures["degraded_seconds"] is not None and figures["lost"] == 0
