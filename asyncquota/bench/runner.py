"""Replaying the night against one strategy, each strategy in its own fresh process.

:func:`drive` is the night itself: one task per session, each request inside
``asyncio.timeout(deadline)`` and ending in exactly one recorded outcome, a tick every
second for samples and the progress bar, and a hard stop at ``duration + the longest
deadline + STOP_GRACE`` after which whatever is still open is cancelled and counted lost.

:func:`run_strategy` runs it in a spawned process, so ``cpu_s`` and ``peak_rss_mb`` are
that strategy's own. Real runs use uvloop and talk over loopback to a simulated upstream in
yet another process (:func:`run_strategies` starts a fresh one per strategy). Virtual runs
put the simulated upstream in the strategy's process, on looptime's virtual clock: a 60 s
night runs as fast as the CPU allows, and ``cpu_s``/``peak_rss_mb`` then include the
upstream model's share.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp

from ..outcomes import RequestOutcome, classify
from ..testing import SimulatedUpstream, UpstreamConfig, run_in_process
from .metrics import NO_TENANT, RequestLog
from .progress import Progress
from .sessions import CLASSES, SessionModel
from .strategies import Strategy, Target, load_strategy

__all__ = [
    "CLOSE_TIMEOUT",
    "STOP_GRACE",
    "VIRTUAL_BASE_URL",
    "VIRTUAL_EPOCH",
    "RunSpec",
    "StrategyRun",
    "drive",
    "fetch_stats",
    "run_measured",
    "run_strategies",
    "run_strategy",
]

T = TypeVar("T")

STOP_GRACE = 5.0
"""Seconds past the last possible deadline before the run cancels what is still open."""

CLOSE_TIMEOUT = 10.0
"""Seconds a strategy gets to close its client after the run."""

VIRTUAL_EPOCH = 1_800_000_000.0
"""The Unix time at which a virtual run starts (its wall clock is this plus loop time)."""

VIRTUAL_BASE_URL = "http://simulated.upstream"
"""The base URL strategies see in virtual runs (nothing resolves it: no socket is opened)."""

_CLASS_CODES = {name: code for code, name in enumerate(CLASSES)}


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One strategy's run, as sent to its process.

    Attributes:
        strategy: the strategy's registered name.
        config: the upstream.
        model: the night.
        virtual: in process on virtual time, or for real.
        base_url: the upstream process's URL (real runs only).
        progress: draw a progress bar on stderr.
        shaper_options: the Shaper's options, as ``(name, value)`` pairs (see
            :data:`~asyncquota.bench.strategies.shaper.Options`); only for the
            ``asyncquota`` strategy. Empty (the default): the Shaper as it ships.

    Raises:
        ValueError: Shaper options for another strategy.
    """

    strategy: str
    config: UpstreamConfig
    model: SessionModel
    virtual: bool
    base_url: str | None = None
    progress: bool = False
    shaper_options: tuple[tuple[str, int | float | str | None], ...] = ()

    def __post_init__(self) -> None:
        if self.shaper_options and self.strategy != "asyncquota":
            raise ValueError(
                f"Shaper options apply to the asyncquota strategy only, not {self.strategy!r}."
            )


@dataclass(slots=True)
class StrategyRun:
    """What one strategy's process brings back.

    Attributes:
        strategy: its name.
        log: every request it was asked to make.
        samples: one per second: ``t``, ``started``, ``ok``, ``open``, plus the strategy's own.
        upstream: the upstream's ``stats()`` (totals and per-second timeline).
        stopped_at: seconds from the start when the run stopped.
        cpu_s: CPU seconds (user + system) the run took in its process.
        peak_rss_mb: the process's peak resident memory.
        wall_s: wall seconds of the run (process start-up and imports excluded).
        queue_waits: seconds from each first attempt's call to its send, by class name, or
            None when the strategy cannot tell (see ``Strategy.queue_waits``).
        queue_wait_source: what ``queue_waits`` measures (None with it).
    """

    strategy: str
    log: RequestLog
    samples: list[dict[str, float]] = field(default_factory=list)
    upstream: dict[str, Any] = field(default_factory=dict)
    stopped_at: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    wall_s: float = 0.0
    queue_waits: dict[str, array[float]] | None = None
    queue_wait_source: str | None = None


async def drive(
    strategy: Strategy,
    model: SessionModel,
    log: RequestLog,
    *,
    on_second: Callable[[float], None] | None = None,
    sessions: Iterable[int] | None = None,
) -> float:
    """Replay the night against ``strategy``, recording into ``log``; when it stopped.

    Every request ends in one outcome, recorded once, unless the hard stop cancels it
    first: then it keeps no outcome, and the report counts it lost. ``sessions`` are the
    indices of the sessions to replay (None: all of the model's; a process of a fleet
    replays its share, :mod:`asyncquota.bench.fleet`).
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def now() -> float:
        return loop.time() - t0

    tenant_codes = {tenant.name: code for code, tenant in enumerate(model.tenants)}

    async def ask(class_code: int, tenant_code: int, deadline: float, call: Any) -> None:
        index = log.begin(class_code, now(), tenant_code)
        try:
            async with asyncio.timeout(deadline):
                await strategy.complete(call)
        except asyncio.CancelledError:
            raise  # the run is being stopped: this request stays without an outcome
        except Exception as exc:
            log.end(index, now(), classify(exc))
        else:
            log.end(index, now(), RequestOutcome.OK)

    async def converse(index: int) -> None:
        session = model.session(index)
        class_code = _CLASS_CODES[session.priority]
        tenant_code = NO_TENANT if session.tenant is None else tenant_codes[session.tenant]
        number = 0
        while True:
            turn = model.turn(index, number)
            call = model.call(session, turn)
            await ask(class_code, tenant_code, call.deadline, call)
            if now() + turn.think >= model.duration:
                return
            await asyncio.sleep(turn.think)
            number += 1

    async def tick(callback: Callable[[float], None]) -> None:
        while True:
            await asyncio.sleep(1.0 - now() % 1.0)
            callback(round(now(), 6))

    indices = range(model.sessions) if sessions is None else sessions
    tasks: list[asyncio.Task[None]] = []

    async def launch() -> None:
        # Each session's task is made when its first message is due, not all at the start:
        # 30 000 coroutines asleep from the first instant are no server's load, and
        # making them grew the heap by half a million objects in the night's first
        # second, the collector's full passes stalling every strategy's loop meanwhile.
        firsts = sorted(
            (session.first_at, session.index)
            for session in map(model.session, indices)
            if session.first_at < model.duration
        )
        for first_at, index in firsts:
            if first_at > now():
                await asyncio.sleep(first_at - now())
            tasks.append(asyncio.create_task(converse(index)))

    ticker = asyncio.create_task(tick(on_second)) if on_second is not None else None
    stop_at = model.duration + model.max_deadline + STOP_GRACE
    launcher = asyncio.create_task(launch())
    try:
        await asyncio.wait((launcher,), timeout=stop_at)
        pending: set[asyncio.Task[None]] = {launcher} if not launcher.done() else set()
        if tasks:
            _, pending_calls = await asyncio.wait(tasks, timeout=max(0.0, stop_at - now()))
            pending |= pending_calls
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if launcher.done() and not launcher.cancelled():
            launcher.result()  # the plan itself broke: say so
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    return now()


async def _run(spec: RunSpec) -> StrategyRun:
    """The run inside its process: build the target and strategy, drive, collect."""
    upstream: SimulatedUpstream | None = None
    if spec.virtual:
        # Dates in replies (HTTP-date Retry-After, RFC 3339 resets) on the virtual clock too,
        # so that a seeded virtual run is repeatable to the request.
        loop = asyncio.get_running_loop()
        config = replace(spec.config, wall_clock=lambda: VIRTUAL_EPOCH + loop.time())
        upstream = SimulatedUpstream(config)
        target = Target(VIRTUAL_BASE_URL, config, upstream.handle, tenants=spec.model.tenants)
    else:
        assert spec.base_url is not None
        target = Target(spec.base_url, spec.config, tenants=spec.model.tenants)
    log = RequestLog()
    run = StrategyRun(strategy=spec.strategy, log=log)
    strategy: Strategy
    if spec.shaper_options:
        from .strategies.shaper import ShaperStrategy

        strategy = ShaperStrategy(target, options=spec.shaper_options)
    else:
        strategy = load_strategy(spec.strategy)(target)
    horizon = spec.model.duration + spec.model.max_deadline + STOP_GRACE
    progress = Progress(spec.strategy, horizon) if spec.progress else None

    def on_second(t: float) -> None:
        sample: dict[str, float] = {"t": t, "started": len(log), "ok": log.ok, "open": log.open}
        sample.update(strategy.sample())
        run.samples.append(sample)
        if progress is not None:
            progress.update(t, sample)

    # Entered and left by hand, so that leaving is bounded by CLOSE_TIMEOUT and the run not.
    await strategy.__aenter__()
    try:
        run.stopped_at = await drive(strategy, spec.model, log, on_second=on_second)
    finally:
        if progress is not None:
            progress.close()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await strategy.__aexit__(None, None, None)
    waits = strategy.queue_waits()
    if waits is not None:
        run.queue_waits = {name: array("d", values) for name, values in waits.items()}
        run.queue_wait_source = strategy.queue_wait_source
    if upstream is not None:
        run.upstream = upstream.stats()
    else:
        run.upstream = await fetch_stats(target.base_url)
    return run


async def fetch_stats(base_url: str) -> dict[str, Any]:
    """A simulated upstream process's ``stats()``, over its ``/stats`` route."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/stats", timeout=aiohttp.ClientTimeout(total=30)) as reply,
    ):
        reply.raise_for_status()
        stats: dict[str, Any] = await reply.json()
        return stats


def _real_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def _virtual_loop() -> asyncio.AbstractEventLoop:
    # Imported here: the command line reads this package without the bench extra (looptime).
    from .virtual import new_virtual_loop

    return new_virtual_loop()


def run_measured(
    run_of: Callable[[T], StrategyRun], main: Coroutine[Any, Any, T], *, virtual: bool
) -> T:
    """Run ``main`` on a virtual or uvloop loop; set ``run_of(result)``'s wall, CPU, memory.

    Meant to be the whole life of a fresh process: the peak memory is the process's.
    """
    before = resource.getrusage(resource.RUSAGE_SELF)
    # The benchmark's own stopwatch: how long the run took on the machine, virtual or not.
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=_virtual_loop if virtual else _real_loop) as runner:
        result = runner.run(main)
    run = run_of(result)
    run.wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    run.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run.peak_rss_mb = after.ru_maxrss / 1024.0  # Linux reports kilobytes
    return result


def run_strategy(spec: RunSpec) -> StrategyRun:
    """Run one strategy in this process (see :func:`run_measured`, :func:`run_strategies`)."""
    return run_measured(_itself, _run(spec), virtual=spec.virtual)


def _itself(run: StrategyRun) -> StrategyRun:
    return run


@contextlib.contextmanager
def _upstream_for(spec: RunSpec) -> Iterator[RunSpec]:
    """The spec, with a fresh upstream process behind it for a real run."""
    if spec.virtual:
        yield spec
        return
    with run_in_process(spec.config) as base_url:
        yield replace(spec, base_url=base_url)


def run_strategies(
    names: Sequence[str],
    *,
    config: UpstreamConfig,
    model: SessionModel,
    virtual: bool,
    progress: bool,
    on_done: Callable[[StrategyRun], None] | None = None,
    shaper_options: tuple[tuple[str, int | float | str | None], ...] = (),
) -> Mapping[str, StrategyRun]:
    """Run each strategy, one after the other, each in a fresh spawned process.

    A real run also gets a fresh upstream process per strategy, so no strategy inherits
    another's debts (penalty windows, an emptied bucket). ``shaper_options`` go to the
    asyncquota strategy only (see :class:`RunSpec`).
    """
    context = multiprocessing.get_context("spawn")
    runs: dict[str, StrategyRun] = {}
    for name in names:
        spec = RunSpec(strategy=name, config=config, model=model, virtual=virtual,
                       progress=progress,
                       shaper_options=shaper_options if name == "asyncquota" else ())
        with _upstream_for(spec) as ready, ProcessPoolExecutor(1, mp_context=context) as pool:
            run = pool.submit(run_strategy, ready).result()
        runs[name] = run
        if on_done is not None:
            on_done(run)
    return runs
