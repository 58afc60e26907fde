"""The ``asyncquota`` command: ``proxy``, ``bench`` and ``tune``.

    asyncquota proxy --config gateway.toml [--host 127.0.0.1] [--port 8080]
    asyncquota bench --scenario crisis --sessions 30000 --json out.json --plot out.png
    asyncquota bench --scenario fleet --processes 4 --json fleet.json
    asyncquota tune --scenario crisis --param limit.initial=20,64 --objective goodput

The parser lives here; each command's code in its own package (:mod:`asyncquota.proxy`,
:mod:`asyncquota.bench.cli`), imported only when it runs. A command whose extra is not
installed says so in one line, with the pip command, instead of a traceback; so does the
fleet scenario without redis-py, redis-server or the fleet backend.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .bench.cli import BENCH_DURATION, BENCH_SESSIONS
from .bench.exhaustion import SCENARIO as EXHAUSTION
from .bench.fleet import DEFAULT_PROCESSES, FLEET, FLEET_STRATEGIES, MAX_PROCESSES
from .bench.fleet import SCENARIO as FLEET_SCENARIO
from .bench.matrix import DURATION, MAX_REPEAT, SESSIONS
from .bench.strategies import STRATEGIES
from .bench.tune import METRICS, PARAMETERS, Objective, parse_objective, parse_param
from .testing import PRESETS

__all__ = ["EXTRAS", "main"]

EXTRAS = {
    "bench": ("looptime", "openai", "httpx2", "tenacity", "matplotlib"),
    "tune": ("looptime", "matplotlib"),
    "proxy": ("prometheus_client",),
}
"""Each command's third-party modules, beyond the core's."""

_EXTRA_OF = {"bench": "bench", "tune": "bench", "proxy": "proxy"}


def _strategies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [*STRATEGIES, *(name for name in FLEET_STRATEGIES if name not in STRATEGIES)]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"Unknown strategy {', '.join(unknown) or '(none)'}; use some of "
            f"{', '.join(known)}, separated by commas."
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
        prog="asyncquota",
        description="Load shaping for rate-limited LLM APIs: an OpenAI/Anthropic-compatible "
        "proxy, and the benchmarks that measure the shaping.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    proxy = commands.add_parser(
        "proxy",
        help="serve an OpenAI- and Anthropic-compatible HTTP API over a Gateway",
        description="Serve OpenAI's and Anthropic's endpoints (chat completions, "
        "completions, embeddings, responses, messages, models) over the Gateway the file "
        "configures, its [proxy] table naming the client keys. SIGHUP reloads the file; "
        "SIGTERM stops taking connections and lets requests in flight finish.",
    )
    proxy.add_argument("--config", type=Path, required=True, metavar="PATH",
                       help="the gateway's TOML file, with a [proxy] table")
    proxy.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default 127.0.0.1: this machine only)")
    proxy.add_argument("--port", type=int, default=8080, help="default 8080")
    bench = commands.add_parser(
        "bench",
        help="replay a night of chat sessions against strategies, side by side",
        description="Replay N chat sessions against a simulated rate-limited upstream, once "
        "per strategy (each in its own process), and report goodput, 429s and latencies. "
        "With --matrix, once per upstream behaviour of the robustness matrix.",
    )
    bench.add_argument(
        "--scenario", choices=sorted({*PRESETS, FLEET_SCENARIO}),
        help=f"the upstream's preset (default crisis); {EXHAUSTION}: the primary's quota dies "
        "at 20 s and returns at 45 s, asyncquota as a Gateway falling back to a second "
        "upstream of half its capacity (two upstream processes for real), the peers on the "
        f"primary alone; {FLEET_SCENARIO}: the crisis split across --processes processes, "
        f"{' and '.join(FLEET_STRATEGIES)} (real time; the {FLEET} strategy shares the "
        "quota through a redis-server the bench starts: pip install 'asyncquota[redis]')",
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
        f"asyncquota); with --scenario {FLEET_SCENARIO}: from {', '.join(FLEET_STRATEGIES)}",
    )
    bench.add_argument(
        "--matrix", action="store_true",
        help="one night per upstream behaviour (a covering set of them) instead of a scenario",
    )
    bench.add_argument(
        "--rows", type=_rows, metavar="N,M,...",
        help="with --matrix: only these rows (their numbers in the full table)",
    )
    bench.add_argument(
        "--repeat", type=int, metavar="N",
        help=f"with --matrix: run every row N times (seeds --seed to --seed + N - 1, at most "
        f"{MAX_REPEAT}) and report the medians and how many runs met every target",
    )
    bench.add_argument(
        "--processes", type=int, metavar="N",
        help=f"with --scenario {FLEET_SCENARIO}: the processes sharing the quota (default "
        f"{DEFAULT_PROCESSES}, at most {MAX_PROCESSES})",
    )
    bench.add_argument(
        "--kill-redis-at", type=float, metavar="S",
        help=f"with --scenario {FLEET_SCENARIO}: kill the redis-server S seconds into the night",
    )
    bench.add_argument(
        "--restore-redis-at", type=float, metavar="S",
        help="with --kill-redis-at: start it again (empty, same port) S seconds into the night",
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
    missing = [name for name in EXTRAS[args.command] if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"asyncquota {args.command} needs {', '.join(missing)}: "
            f"pip install 'asyncquota[{_EXTRA_OF[args.command]}]'",
            file=sys.stderr,
        )
        return 2
    if args.command == "bench" and args.scenario == FLEET_SCENARIO and (
        args.strategies is None or FLEET in args.strategies
    ):
        from .bench.fleet import fleet_unavailable

        reason = fleet_unavailable()
        if reason is not None:
            print(f"asyncquota bench --scenario {FLEET_SCENARIO}: {reason}", file=sys.stderr)
            return 2
    if args.command == "proxy":
        return _proxy(parser, args)
    from .bench.cli import run

    return run(parser, args)


def _proxy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}.")
    from .governance import ConfigError
    from .proxy import run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=_loop()) as runner:
            runner.run(run(args.config, host=args.host, port=args.port))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"asyncquota proxy: {exc}", file=sys.stderr)
        return 2
    return 0


def _loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # Windows: the core does not install it there
        return None
    return uvloop.new_event_loop
