"""The bench's commands: ``asyncquota bench`` and ``asyncquota tune`` (parsed in
:mod:`asyncquota.cli`).

    asyncquota bench --scenario crisis --sessions 30000 --duration 60 \\
        --strategies naive,openai-sdk,tenacity,cookbook --json out.json --plot out.png
    asyncquota bench --virtual ...      # in process, on virtual time
    asyncquota bench --matrix [--virtual] [--json PATH] [--strategies a,b] [--rows 1,5]
        [--repeat 3]
    asyncquota bench --scenario exhaustion [--virtual] [--json PATH]
    asyncquota bench --scenario fleet --processes 4 [--kill-redis-at 20 --restore-redis-at 25]
    asyncquota tune --scenario crisis --param limit.initial=20,64 \\
        --param retry_budget=0.05,0.2 --objective goodput --csv tune.csv --heatmap tune.png

``--matrix`` replays a 30 s night once per upstream behaviour of the robustness matrix
(:mod:`asyncquota.bench.matrix`: a covering set of behaviours, asyncquota alone unless
``--strategies`` says otherwise) and prints a row per behaviour and strategy;
``--repeat N`` runs them N times (seeds ``--seed`` on, round after round) and prints the
medians and how many runs met every target.

``--scenario exhaustion`` is the 2 a.m. night (:mod:`asyncquota.bench.exhaustion`): the
primary's quota dies at 20 s and returns at 45 s, asyncquota runs as a Gateway with a
fallback upstream (the peers know only the primary); for real it starts two upstream
processes. It is not a tuner scenario (the tuner runs a Shaper alone).

``--scenario fleet`` is issue 11's fleet (:mod:`asyncquota.bench.fleet`): the crisis split
across ``--processes`` real processes sharing one quota through a redis-server the bench
starts (``asyncquota``), beside the same processes each alone (``no-fleet``); real time
only. ``--kill-redis-at``/``--restore-redis-at`` kill and restore that server mid-night.

Runs are bounded (at most ``MAX_SESSIONS`` sessions and ``MAX_DURATION`` seconds, each
stopping by itself) and real runs talk to an upstream on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

import orjson

from ..testing import UpstreamConfig
from .exhaustion import SCENARIO as EXHAUSTION
from .exhaustion import exhaustion_document, exhaustion_table, run_exhaustion
from .fleet import (
    DEFAULT_PROCESSES,
    FLEET,
    FLEET_STRATEGIES,
    MAX_PROCESSES,
    PRESET,
    FleetRun,
    FleetUnavailable,
)
from .fleet import SCENARIO as FLEET_SCENARIO
from .matrix import (
    DURATION,
    MAX_REPEAT,
    SESSIONS,
    MatrixRow,
    matrix_document,
    matrix_rows,
    matrix_table,
    repeated_document,
    run_matrix,
)
from .report import document, table
from .runner import StrategyRun, run_strategies
from .sessions import SCENARIO_TENANTS, SessionModel
from .strategies import STRATEGIES
from .tune import Trial, describe, heatmap, prepare, rank, run_trials, write_csv
from .tune import table as tune_table

__all__ = ["BENCH_DURATION", "BENCH_SESSIONS", "MAX_DURATION", "MAX_SESSIONS", "run"]

MAX_SESSIONS = 200_000
MAX_DURATION = 3_600.0
BENCH_SESSIONS = 30_000
BENCH_DURATION = 60.0


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``asyncquota bench`` or ``asyncquota tune`` as parsed; the exit status."""
    matrix = args.command == "bench" and args.matrix
    fleet = args.command == "bench" and args.scenario == FLEET_SCENARIO
    fleet_options = ("processes", "kill_redis_at", "restore_redis_at")
    if not fleet and any(getattr(args, name, None) is not None for name in fleet_options):
        parser.error("--processes, --kill-redis-at and --restore-redis-at go with "
                     f"--scenario {FLEET_SCENARIO}.")
    fleet_only = [name for name in getattr(args, "strategies", None) or ()
                  if name not in STRATEGIES]
    if not fleet and fleet_only:
        parser.error(f"{', '.join(fleet_only)} goes with --scenario {FLEET_SCENARIO}; the "
                     f"other scenarios run {', '.join(STRATEGIES)}.")
    if args.sessions is None:
        args.sessions = SESSIONS if matrix else BENCH_SESSIONS
    if args.duration is None:
        args.duration = DURATION if matrix else BENCH_DURATION
    # The matrix's long-reply rows run twice the sessions.
    most = MAX_SESSIONS // 2 if matrix else MAX_SESSIONS
    if not 1 <= args.sessions <= most:
        parser.error(f"--sessions must be between 1 and {most}.")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be more than 0 and at most {MAX_DURATION:g} seconds.")
    if matrix:
        return _matrix(parser, args)
    if args.command == "bench" and args.rows is not None:
        parser.error("--rows goes with --matrix.")
    if args.command == "bench" and args.repeat is not None:
        parser.error("--repeat goes with --matrix.")
    args.scenario = args.scenario or "crisis"
    if fleet:
        return _fleet(parser, args)
    config = UpstreamConfig.preset(args.scenario, seed=args.seed)
    model = SessionModel(
        sessions=args.sessions,
        duration=args.duration,
        seed=args.seed,
        tenants=SCENARIO_TENANTS.get(args.scenario, ()),
    )
    if args.command == "tune":
        return _tune(parser, args, config=config, model=model)
    progress = sys.stderr.isatty()

    def done(run: StrategyRun) -> None:
        print(
            f"{run.strategy}: {len(run.log)} requests, {run.log.ok} ok, "
            f"{run.wall_s:.1f} s wall",
            file=sys.stderr,
        )

    names = args.strategies or list(STRATEGIES)
    if args.scenario == EXHAUSTION:
        runs, gateway = run_exhaustion(
            names, primary=config, model=model, virtual=args.virtual, progress=progress,
            on_done=done,
        )
        doc = exhaustion_document(
            primary=config, model=model, virtual=args.virtual, runs=runs, gateway=gateway
        )
        print(exhaustion_table(doc))
    else:
        runs = dict(run_strategies(
            names, config=config, model=model, virtual=args.virtual, progress=progress,
            on_done=done,
        ))
        doc = document(
            scenario=args.scenario, config=config, model=model, virtual=args.virtual,
            runs=runs,
        )
        print(table(doc))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    if args.plot is not None:
        from .plot import plot

        plot(doc, runs, args.plot)
    return 0


def _matrix(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.scenario is not None or args.plot is not None:
        parser.error("--matrix replays its own upstreams and draws no plot: drop "
                     "--scenario and --plot.")
    rows = matrix_rows(seed=args.seed, sessions=args.sessions, duration=args.duration)
    if args.rows is not None:
        unknown = sorted(set(args.rows) - {row.number for row in rows})
        if unknown:
            parser.error(f"The matrix has rows 1 to {len(rows)}; no row {unknown[0]}.")
        rows = [row for row in rows if row.number in args.rows]

    def done(row: MatrixRow, strategy: str, result: Mapping[str, Any]) -> None:
        print(
            f"[row {row.number}, seed {row.config.seed}] {row.label} {strategy}: "
            f"goodput {result['goodput']:.3f}, "
            f"first 10 s {result['goodput_10s']:.2f}, {result['bench']['wall_s']:.1f} s wall",
            file=sys.stderr,
        )

    repeat = 1 if args.repeat is None else args.repeat
    if not 1 <= repeat <= MAX_REPEAT:
        parser.error(f"--repeat must be between 1 and {MAX_REPEAT}.")
    seeds = [args.seed + run for run in range(repeat)]
    runs = []
    for seed in seeds:  # round after round: a machine's drift falls on every row alike
        if seed != args.seed:
            numbers = {row.number for row in rows}
            rows = [
                row
                for row in matrix_rows(seed=seed, sessions=args.sessions, duration=args.duration)
                if row.number in numbers
            ]
        runs.append(run_matrix(
            rows, args.strategies or ["asyncquota"], virtual=args.virtual,
            progress=sys.stderr.isatty(), on_done=done,
        ))
    if repeat == 1:
        doc = matrix_document(runs[0], virtual=args.virtual, seed=args.seed)
    else:
        doc = repeated_document(runs, virtual=args.virtual, seeds=seeds)
    print(matrix_table(doc))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


def _fleet(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .fleet import fleet_document, fleet_table, run_fleet

    if args.virtual:
        parser.error(f"--scenario {FLEET_SCENARIO} runs real processes in real time: drop "
                     "--virtual.")
    names = args.strategies or list(FLEET_STRATEGIES)
    others = [name for name in names if name not in FLEET_STRATEGIES]
    if others:
        parser.error(f"--scenario {FLEET_SCENARIO} runs {', '.join(FLEET_STRATEGIES)}, not "
                     f"{', '.join(others)}.")
    processes = DEFAULT_PROCESSES if args.processes is None else args.processes
    if not 1 <= processes <= MAX_PROCESSES:
        parser.error(f"--processes must be between 1 and {MAX_PROCESSES}.")
    kill, restore = args.kill_redis_at, args.restore_redis_at
    if kill is not None and FLEET not in names:
        parser.error(f"--kill-redis-at needs the {FLEET} strategy: only its processes "
                     "talk to Redis.")
    if kill is not None and not 0 <= kill < args.duration:
        parser.error(f"--kill-redis-at must be within the night: 0 to {args.duration:g} s.")
    if restore is not None and (kill is None or restore <= kill):
        parser.error("--restore-redis-at needs an earlier --kill-redis-at.")
    config = UpstreamConfig.preset(PRESET, seed=args.seed)
    model = SessionModel(sessions=args.sessions, duration=args.duration, seed=args.seed)

    def done(fleet: FleetRun) -> None:
        run = fleet.run
        print(
            f"{run.strategy} × {len(fleet.workers)} processes: {len(run.log)} requests, "
            f"{run.log.ok} ok, {run.wall_s:.1f} s wall",
            file=sys.stderr,
        )

    # A SIGTERM (a CI's timeout, a supervisor) unwinds like Ctrl-C, so that the processes,
    # the upstream and the redis-server are stopped on the way out, not left behind.
    watching = threading.current_thread() is threading.main_thread()
    terminated = signal.signal(signal.SIGTERM, _exit_on_sigterm) if watching else None
    try:
        runs = run_fleet(
            names, config=config, model=model, processes=processes, kill_redis_at=kill,
            restore_redis_at=restore, on_done=done,
        )
    except FleetUnavailable as exc:
        print(f"asyncquota bench --scenario {FLEET_SCENARIO}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a process failed, or did not start or report in time
        print(f"asyncquota bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("asyncquota bench: interrupted; the fleet's processes were stopped.",
              file=sys.stderr)
        return 130
    finally:
        if watching:
            signal.signal(signal.SIGTERM, terminated)
    doc = fleet_document(config=config, model=model, processes=processes, runs=runs)
    print(fleet_table(doc))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    if args.plot is not None:
        from .plot import plot

        plot(doc, {name: fleet.run for name, fleet in runs.items()}, args.plot)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _tune(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    config: UpstreamConfig,
    model: SessionModel,
) -> int:
    if args.jobs < 1:
        parser.error("--jobs must be at least 1.")
    try:
        combos = prepare(args.param, config=config)
    except ValueError as exc:
        parser.error(str(exc))
    finished = 0

    def done(trial: Trial) -> None:
        nonlocal finished
        finished += 1
        print(
            f"[{finished}/{len(combos)}] {describe(trial.options)}: goodput "
            f"{trial.result['goodput_ratio']:.4f}, {trial.result['wall_s']:.1f} s wall",
            file=sys.stderr,
        )

    trials = run_trials(
        combos, scenario=args.scenario, config=config, model=model, jobs=args.jobs,
        on_done=done,
    )
    ranked = rank(trials, args.objective)
    title = (f"{args.scenario}: {model.sessions} sessions, {model.duration:g} s, virtual time, "
             f"seed {model.seed}")
    print(tune_table(ranked, objective=args.objective, title=title))
    if args.csv is not None:
        write_csv(args.csv, ranked)
    if args.heatmap is not None:
        heatmap(args.heatmap, ranked, sweep=args.param, objective=args.objective, title=title)
    return 0
