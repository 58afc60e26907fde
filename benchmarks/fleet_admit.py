"""Fleet microbenchmark: Redis round trips per request, the cost of a grant, an outage.

Three measurements against a throwaway ``redis-server`` on loopback (the system's, started
by ``asyncquota.testing.redis.RedisServer``), each process on uvloop:

1. **Saturation.** ``--processes`` OS processes, each a Shaper with ``fleet=RedisFleet``
   (the same name) and ``--callers`` callers sending as fast as they are let through to an
   upstream that answers at once (usage in every reply, so every request settles tokens),
   share ``--rpm`` for ``--seconds``. Printed: Redis round trips per request (all of them:
   leases, settlements, heartbeats), the sends that reached the upstream against what the
   quota allows (``burst + rate × span``), in the run and in its worst 0.1 s and 1 s.
2. **A grant's cost.** One process takes grants (a request unit and 300 tokens) through
   ``RedisFleet.take`` under a quota that never binds: p50/p99/max of a grant, and of
   the grants that needed a round trip.
3. **Outage.** One process sends at about half its quota; Redis is killed: how long until
   the fleet is degraded (a busy process finds out at its next round trip), the longest a
   grant took meanwhile, and how long after Redis is restored it is back in step.

Targets (issue 11): ≤ 0.2 round trips per request under saturation, ``admit`` p99 ≤ 1 ms
on loopback, degraded within 150 ms of the kill, back in step within 1 s.

Run: ``python benchmarks/fleet_admit.py [--processes 4] [--seconds 5] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

from asyncquota import MockTransport, QuotaError, Request, Response, Shaper
from asyncquota.fleet import RedisFleet
from asyncquota.gates import CooldownGate
from asyncquota.testing.redis import RedisServer

REPLY = Response(
    200,
    {"content-type": "application/json"},
    orjson.dumps({"usage": {"prompt_tokens": 20, "completion_tokens": 60, "total_tokens": 80}}),
)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 128}


class _Feedback:
    punishes = False


def _saturate(
    url: str, rpm: float, tpm: float, callers: int, seconds: float, barrier: float, out: Any
) -> None:
    """One process of the fleet: a Shaper whose callers never stop asking."""

    async def main() -> dict[str, Any]:
        sends: list[float] = []  # wall-clock times, comparable across the processes

        def upstream(request: Request) -> Response:
            sends.append(time.time())
            return REPLY

        async with (
            RedisFleet(url, name="bench") as fleet,
            Shaper(
                "http://upstream.test",
                rpm=rpm,
                tpm=tpm,
                transport=MockTransport(upstream),
                hooks=(),
                fleet=fleet,
                max_wait={"interactive": 30.0},
            ) as shaper,
        ):
            await asyncio.sleep(max(0.0, barrier - time.time()))
            loop = asyncio.get_running_loop()
            stop = loop.time() + seconds

            async def caller() -> None:
                while loop.time() < stop:
                    try:
                        await shaper.request("POST", "/v1/chat/completions", json=BODY)
                    except QuotaError:
                        await asyncio.sleep(0.01)

            await asyncio.gather(*(caller() for _ in range(callers)))
            stats = fleet.statistics()
        return {
            "sends": sends,
            "calls": stats.calls,
            "requests": stats.requests,
            "leases": stats.leases,
        }

    out.put(uvloop.run(main()))


def saturation(
    url: str, *, processes: int, callers: int, seconds: float, rpm: float
) -> dict[str, Any]:
    """The fleet saturated: what reached the upstream, and the round trips it took."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    barrier = time.time() + 3.0
    tpm = rpm * 1000  # never binding: the request rate is what saturates
    workers = [
        context.Process(target=_saturate, args=(url, rpm, tpm, callers, seconds, barrier, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=60 + seconds) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    sends = sorted(t for r in results for t in r.pop("sends"))
    rate = burst = rpm / 60  # the Shaper's gates' burst: one second's worth
    windows = {}
    for span in (0.1, 1.0, seconds):
        worst = max(bisect.bisect_right(sends, t + span) - i for i, t in enumerate(sends))
        windows[f"{span:g}s"] = worst / (burst + rate * span)
    calls = sum(r["calls"] for r in results)
    requests = sum(r["requests"] for r in results)
    return {
        "processes": processes,
        "callers_per_process": callers,
        "seconds": seconds,
        "rpm": rpm,
        "sent": len(sends),
        "sent_in_window": sum(1 for t in sends if barrier <= t <= barrier + seconds),
        "allowed_in_window": burst + rate * seconds,
        "worst_window_over_allowed": windows,
        "redis_calls": calls,
        "redis_calls_per_request": calls / requests if requests else None,
        "per_process": results,
    }


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}
    return {
        "n": len(ordered),
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


async def _grant_cost(url: str, grants: int) -> dict[str, Any]:
    all_grants: list[float] = []
    trips: list[float] = []
    async with RedisFleet(url, name="cost") as fleet:
        _attach(fleet, rpm=6e6, tpm=6e9)
        for _ in range(grants):
            calls = fleet.statistics().calls
            started = time.perf_counter()
            await fleet.take(1, 300)
            took = time.perf_counter() - started
            all_grants.append(took)
            if fleet.statistics().calls != calls:
                trips.append(took)
            if len(all_grants) % 50 == 0:
                await asyncio.sleep(0.002)  # a pause now and then: leases end, new ones start
        stats = fleet.statistics()
    return {
        "grants": _percentiles(all_grants),
        "round_trips": _percentiles(trips),
        "calls_per_grant": stats.calls / stats.requests,
    }


async def _until(check: Callable[[], bool], within: float = 10.0) -> float:
    """When (``perf_counter``) ``check()`` was first seen true (looked at every ms)."""
    for _ in range(int(within * 1000)):
        if check():
            return time.perf_counter()
        await asyncio.sleep(0.001)
    raise RuntimeError(f"Not within {within:g} s.")


async def _outage(server: RedisServer) -> dict[str, Any]:
    async with RedisFleet(server.url, name="outage") as fleet:
        _attach(fleet, rpm=12_000, tpm=None)
        slowest = 0.0
        stop = asyncio.Event()

        async def sender() -> None:
            nonlocal slowest
            while not stop.is_set():
                started = time.perf_counter()
                await fleet.take(1, 0)
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.01)  # 100 a second: half the quota

        task = asyncio.create_task(sender())
        await asyncio.sleep(1.0)
        healthy_slowest, slowest = slowest, 0.0
        killed = time.perf_counter()
        server.stop()
        degraded_after = await _until(lambda: fleet.statistics().degraded) - killed
        await asyncio.sleep(1.0)
        outage_slowest = slowest
        server.start()
        restored = time.perf_counter()
        back_after = await _until(lambda: not fleet.statistics().degraded) - restored
        stop.set()
        await task
        return {
            "degraded_after_kill_ms": 1000 * degraded_after,
            "back_in_step_after_restore_ms": 1000 * back_after,
            "slowest_grant_before_ms": 1000 * healthy_slowest,
            "slowest_grant_during_outage_ms": 1000 * outage_slowest,
            "timeout_ms": 1000 * fleet.timeout,
        }


def _attach(fleet: RedisFleet, *, rpm: float, tpm: float | None) -> None:
    """Give a bare fleet (no Shaper) its quota, as a Shaper's start would."""
    fleet.attach(rpm=rpm, tpm=tpm, cooldown=CooldownGate(), feedback=_Feedback())  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--callers", type=int, default=64, help="callers per process")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rpm", type=float, default=18_000.0, help="the fleet's quota")
    parser.add_argument("--grants", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with RedisServer() as server:
        saturated = saturation(
            server.url,
            processes=args.processes,
            callers=args.callers,
            seconds=args.seconds,
            rpm=args.rpm,
        )
        cost = uvloop.run(_grant_cost(server.url, args.grants))
        outage = uvloop.run(_outage(server))
    doc = {"saturation": saturated, "grant_cost": cost, "outage": outage}
    worst = ", ".join(f"{k} {v:.3f}" for k, v in saturated["worst_window_over_allowed"].items())
    print(
        f"saturation: {saturated['processes']} processes x {saturated['callers_per_process']} "
        f"callers, rpm {saturated['rpm']:g}, {saturated['seconds']:g} s: "
        f"{saturated['sent_in_window']} sent of {saturated['allowed_in_window']:.0f} allowed; "
        f"worst window / (burst + rate x span): {worst}; {saturated['redis_calls']} Redis "
        f"calls = {saturated['redis_calls_per_request']:.3f} per request"
    )
    g, t = cost["grants"], cost["round_trips"]
    print(
        f"grant cost: {g['n']} grants p50 {g['p50_ms']:.3f} ms, p99 {g['p99_ms']:.3f} ms, "
        f"max {g['max_ms']:.3f} ms; {t['n']} with a round trip: p50 {t['p50_ms']:.3f} ms, "
        f"p99 {t['p99_ms']:.3f} ms; {cost['calls_per_grant']:.3f} calls per grant"
    )
    print(
        f"outage: degraded {outage['degraded_after_kill_ms']:.1f} ms after the kill, slowest "
        f"grant during it {outage['slowest_grant_during_outage_ms']:.1f} ms (before: "
        f"{outage['slowest_grant_before_ms']:.1f} ms), back in step "
        f"{outage['back_in_step_after_restore_ms']:.1f} ms after the restore"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
