"""The ``asyncquota`` command: ``asyncquota bench ...`` replays the night and reports;
``asyncquota tune ...`` replays it once per combination of Shaper settings and ranks them.

    asyncquota bench --scenario crisis --sessions 30000 --duration 60 \\
        --strategies naive,openai-sdk,tenacity,cookbook --json out.json --plot out.png
    asyncquota bench --virtual ...      # in process, on virtual time
    asyncquota bench --matrix [--virtual] [--json PATH] [--strategies a,b] [--rows 1,5]
    asyncquota bench --scenario exhaustion [--virtual] [--json PATH]
    asyncquota tune --scenario crisis --param limit.initial=20,64 \\
        --param retry_budget=0.05,0.2 --objective goodput --csv tune.csv --heatmap tune.png

``--matrix`` replays a 30 s night once per upstream behaviour of the robustness matrix
(:mod:`asyncquota.bench.matrix`: a covering set of behaviours, asyncquota alone unless
``--strategies`` says otherwise) and prints a row per behaviour and strategy.

``--scenario exhaustion`` is the 2 a.m. night (:mod:`asyncquota.bench.exhaustion`): the
primary's quota dies at 20 s and returns at 45 s, asyncquota runs as a Gateway with a
fallback upstream (the peers know only the primary); for real it starts two upstream
processes. It is not a tuner scenario (the tuner runs a Shaper alone).

Runs are bounded (at most ``MAX_SESSIONS`` sessions and ``MAX_DURATION`` seconds, each
stopping by itself) and real runs talk to an upstream on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..testing import PRESETS, UpstreamConfig
from .exhaustion import SCENARIO as EXHAUSTION
from .exhaustion import exhaustion_document, exhaustion_table, run_exhaustion
from .matrix import (
    DURATION,
    SESSIONS,
    MatrixRow,
    matrix_document,
    matrix_rows,
    matrix_table,
    run_matrix,
)
from .report import document, table
from .runner import StrategyRun, run_strategies
from .sessions import SCENARIO_TENANTS, SessionModel
from .strategies import STRATEGIES
from .tune import (
    METRICS,
    PARAMETERS,
    Objective,
    Trial,
    describe,
    heatmap,
    parse_objective,
    parse_param,
    prepare,
    rank,
    run_trials,
    write_csv,
)
from .tune import table as tune_table

__all__ = ["MAX_DURATION", "MAX_SESSIONS", "main"]

MAX_SESSIONS = 200_000
MAX_DURATION = 3_600.0
BENCH_SESSIONS = 30_000
BENCH_DURATION = 60.0


def _strategies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"Unknown strategy {', '.join(unknown) or '(none)'}; use some of "
            f"{', '.join(STRATEGIES)}, separated by commas."
        )
    return names


def _rows(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(
            f"--rows takes row numbers (from 1) separated by commas, not {text!r}."
        )
    return numbers


def _param(text: str) -> tuple[str, tuple[int | float | str | None, ...]]:
    try:
        return parse_param(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _objective(text: str) -> Objective:
    try:
        return parse_objective(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncquota", description="Load shaping for rate-limited LLM APIs: benchmarks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="replay a night of chat sessions against strategies, side by side",
        description="Replay N chat sessions against a simulated rate-limited upstream, once "
        "per strategy (each in its own process), and report goodput, 429s and latencies. "
        "With --matrix, once per upstream behaviour of the robustness matrix.",
    )
    bench.add_argument(
        "--scenario", choices=sorted(PRESETS),
        help=f"the upstream's preset (default crisis); {EXHAUSTION}: the primary's quota dies "
        "at 20 s and returns at 45 s, asyncquota as a Gateway falling back to a second "
        "upstream of half its capacity (two upstream processes for real), the peers on the "
        "primary alone",
    )
    bench.add_argument(
        "--sessions", type=int,
        help=f"default {BENCH_SESSIONS}; with --matrix {SESSIONS} (twice as many in the "
        "long-reply rows)",
    )
    bench.add_argument(
        "--duration", type=float,
        help=f"seconds (default {BENCH_DURATION:g}; with --matrix {DURATION:g})",
    )
    bench.add_argument(
        "--strategies", type=_strategies,
        help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all; with --matrix "
        "asyncquota)",
    )
    bench.add_argument(
        "--matrix", action="store_true",
        help="one night per upstream behaviour (a covering set of them) instead of a scenario",
    )
    bench.add_argument(
        "--rows", type=_rows, metavar="N,M,...",
        help="with --matrix: only these rows (their numbers in the full table)",
    )
    bench.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    bench.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of the runs")
    bench.add_argument(
        "--virtual", action="store_true",
        help="run in process on virtual time instead of against an upstream process",
    )
    bench.add_argument("--seed", type=int, default=0)
    tune = commands.add_parser(
        "tune",
        help="rank combinations of Shaper settings by an objective",
        description="Replay the night on virtual time once per combination of the given "
        "Shaper settings (each in its own process), and rank the combinations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="parameters: " + ", ".join(PARAMETERS) + "\n(limit is "
        + "|".join(PARAMETERS["limit"].choices) + "; none unsets an optional one)"
        + "\n\nmetrics of an objective:\n"
        + "\n".join(f"  {m.name:<18} {m.unit}" for m in METRICS.values()),
    )
    tune.add_argument(
        "--scenario", choices=sorted(set(PRESETS) - {EXHAUSTION}), default="crisis"
    )
    tune.add_argument(
        "--param", type=_param, action="append", required=True, metavar="NAME=V1,V2,...",
        help="a parameter and the values to try (repeat for more; all combinations run)",
    )
    tune.add_argument(
        "--objective", type=_objective, default=parse_objective("goodput"),
        metavar="METRIC|METRIC=WEIGHT,...",
        help="goodput (higher better), p99 or 429 (lower better), ... or a weighted sum "
        "such as goodput=1,429=-10,p99=-0.0001 (higher better); default goodput",
    )
    tune.add_argument("--sessions", type=int, default=BENCH_SESSIONS)
    tune.add_argument("--duration", type=float, default=BENCH_DURATION,
                      help=f"seconds (default {BENCH_DURATION:g})")
    tune.add_argument("--seed", type=int, default=0,
                      help="seeds the night, the upstream and the Shaper's jitter")
    tune.add_argument("--csv", type=Path, metavar="PATH", help="write every combination")
    tune.add_argument("--heatmap", type=Path, metavar="PATH", help="write a PNG of the scores")
    tune.add_argument("--jobs", type=int, default=1,
                      help="combinations run at once, each in its own process (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    matrix = args.command == "bench" and args.matrix
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
    args.scenario = args.scenario or "crisis"
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
            f"[row {row.number}] {row.label} {strategy}: goodput {result['goodput']:.3f}, "
            f"first 10 s {result['goodput_10s']:.2f}, {result['bench']['wall_s']:.1f} s wall",
            file=sys.stderr,
        )

    entries = run_matrix(
        rows, args.strategies or ["asyncquota"], virtual=args.virtual,
        progress=sys.stderr.isatty(), on_done=done,
    )
    doc = matrix_document(entries, virtual=args.virtual, seed=args.seed)
    print(matrix_table(doc))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


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
