"""The ``asyncquota`` command: ``asyncquota bench ...`` replays the night and reports.

    asyncquota bench --scenario crisis --sessions 30000 --duration 60 \\
        --strategies naive,openai-sdk,tenacity,cookbook --json out.json --plot out.png
    asyncquota bench --virtual ...      # in process, on virtual time

Runs are bounded (at most ``MAX_SESSIONS`` sessions and ``MAX_DURATION`` seconds, each
stopping by itself) and real runs talk to an upstream on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from ..testing import PRESETS, UpstreamConfig
from .report import document, table
from .runner import StrategyRun, run_strategies
from .sessions import SessionModel
from .strategies import STRATEGIES

__all__ = ["MAX_DURATION", "MAX_SESSIONS", "main"]

MAX_SESSIONS = 200_000
MAX_DURATION = 3_600.0


def _strategies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"Unknown strategy {', '.join(unknown) or '(none)'}; use some of "
            f"{', '.join(STRATEGIES)}, separated by commas."
        )
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncquota", description="Load shaping for rate-limited LLM APIs: benchmarks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="replay a night of chat sessions against strategies, side by side",
        description="Replay N chat sessions against a simulated rate-limited upstream, once "
        "per strategy (each in its own process), and report goodput, 429s and latencies.",
    )
    bench.add_argument("--scenario", choices=sorted(PRESETS), default="crisis")
    bench.add_argument("--sessions", type=int, default=30_000)
    bench.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    bench.add_argument(
        "--strategies", type=_strategies, default=list(STRATEGIES),
        help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all)",
    )
    bench.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    bench.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of the runs")
    bench.add_argument(
        "--virtual", action="store_true",
        help="run in process on virtual time instead of against an upstream process",
    )
    bench.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions must be between 1 and {MAX_SESSIONS}.")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be more than 0 and at most {MAX_DURATION:g} seconds.")
    config = UpstreamConfig.preset(args.scenario, seed=args.seed)
    model = SessionModel(sessions=args.sessions, duration=args.duration, seed=args.seed)
    progress = sys.stderr.isatty()

    def done(run: StrategyRun) -> None:
        print(
            f"{run.strategy}: {len(run.log)} requests, {run.log.ok} ok, "
            f"{run.wall_s:.1f} s wall",
            file=sys.stderr,
        )

    runs = run_strategies(
        args.strategies, config=config, model=model, virtual=args.virtual,
        progress=progress, on_done=done,
    )
    doc = document(
        scenario=args.scenario, config=config, model=model, virtual=args.virtual, runs=runs
    )
    print(table(doc))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    if args.plot is not None:
        from .plot import plot

        plot(doc, runs, args.plot)
    return 0
