"""Admission microbenchmark: the cost of enqueue → admit → release per request.

The Shaper's hot path without any I/O: a caller task (a chat session) pushes a request into
the priority queue with a deadline and awaits its turn; the dispatcher takes a concurrency
permit, pops the head and admits it; the caller ends its permit (success, which feeds the
adaptive limit) and asks again. With 1 000, 10 000 and 100 000 callers waiting at once
(three priority classes, 50 tenants), we time ``--admissions`` such rounds on uvloop and
divide: the cost per request at that depth, task switches included.

Targets (issue 2): ≤ 15 µs per request, and the 100 000-waiter cost within 1.5× of the
1 000-waiter cost (operations are O(log n), so depth should barely show).

Run: ``python benchmarks/admission.py [--repeat 5] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import uvloop

from asyncquota.errors import ClosedError
from asyncquota.limiter import ConcurrencyLimiter, Permit
from asyncquota.limits import AIMD
from asyncquota.priority import Priority
from asyncquota.queue import PriorityQueue

SIZES = (1_000, 10_000, 100_000)
TENANTS = 50
CLASSES = (Priority.CRITICAL, Priority.INTERACTIVE, Priority.BATCH)


class Ticket:
    """What the dispatcher hands a caller: the permit it must end."""

    __slots__ = ("permit",)

    def __init__(self) -> None:
        self.permit: Permit | None = None


async def caller(queue: PriorityQueue[Ticket], i: int) -> None:
    """A chat session: ask, wait for its turn, end the permit, ask again, until closed."""
    ticket = Ticket()
    priority, tenant = CLASSES[i % len(CLASSES)], i % TENANTS
    loop = asyncio.get_running_loop()
    while True:
        try:
            waiter = queue.push(ticket, priority=priority, tenant=tenant, deadline=loop.time() + 60)
            await waiter.future
        except ClosedError:
            return
        assert ticket.permit is not None
        ticket.permit.success()
        ticket.permit = None


async def one_round(n: int, admissions: int) -> float:
    """Seconds per request to admit ``admissions`` requests while n callers wait."""
    queue: PriorityQueue[Ticket] = PriorityQueue()
    limiter = ConcurrencyLimiter(AIMD(initial=64, max_limit=64))
    callers = [asyncio.create_task(caller(queue, i)) for i in range(n)]
    await asyncio.sleep(0)  # every caller has pushed its first request: depth is n
    assert len(queue) == n
    started = time.perf_counter()
    for _ in range(admissions):
        permit = await limiter.acquire()
        waiter = await queue.pop()
        waiter.item.permit = permit
        waiter.admit()
    elapsed = time.perf_counter() - started
    queue.close(lambda _: ClosedError("The benchmark is over."))
    await asyncio.gather(*callers)
    assert len(queue) == 0
    return elapsed / admissions


def measure(n: int, repeat: int, admissions: int) -> dict[str, float]:
    per_request_us = []
    for _ in range(repeat):
        gc.collect()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            per_request_us.append(runner.run(one_round(n, admissions)) * 1e6)
    return {
        "waiters": n,
        "median_us": statistics.median(per_request_us),
        "min_us": min(per_request_us),
        "max_us": max(per_request_us),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds per size (median is quoted)")
    parser.add_argument(
        "--admissions", type=int, default=100_000, help="requests admitted per round"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/admission.json"))
    args = parser.parse_args(argv)

    rows = [measure(n, args.repeat, args.admissions) for n in SIZES]
    base = rows[0]["median_us"]
    print(f"asyncquota admission: enqueue → admit → release, uvloop, {args.repeat} rounds each")
    print(f"{'waiters':>9} {'median µs/req':>14} {'min':>8} {'max':>8} {'vs 1 000':>9}")
    for row in rows:
        row["ratio_to_1000"] = row["median_us"] / base
        print(
            f"{row['waiters']:>9,} {row['median_us']:>14.2f} {row['min_us']:>8.2f}"
            f" {row['max_us']:>8.2f} {row['ratio_to_1000']:>8.2f}×"
        )
    worst = max(row["median_us"] for row in rows)
    scaling = rows[-1]["ratio_to_1000"]
    print(
        f"targets: ≤ 15 µs/request → {'met' if worst <= 15 else 'MISSED'}"
        f" (worst median {worst:.2f});"
        f" 100 000 within 1.5× of 1 000 → {'met' if scaling <= 1.5 else 'MISSED'} ({scaling:.2f}×)"
    )
    report = {
        "benchmark": "admission",
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "loop": "uvloop " + uvloop.__version__,
        "repeat": args.repeat,
        "admissions": args.admissions,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
