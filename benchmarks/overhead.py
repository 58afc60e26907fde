"""The price of asyncquota when nothing is wrong: client CPU per request, Shaper vs bare aiohttp.

A local simulated upstream (its own process, uvloop, a quota far above the load, 5 ms
latency, OpenAI rate-limit headers) answers the same chat-completion requests sent two
ways from this process on uvloop, in alternating rounds:

- ``bare``: one ``aiohttp.ClientSession`` (connector bounded to 64 sockets), each reply
  read whole;
- ``transport``: the Shaper's own pool, ``HttpTransport.send``, called directly (what
  the Shaper pays for its transport alone, shaping aside);
- ``aiohttp transport``: ``AiohttpTransport.send`` (the pool for a session of one's own);
- ``shaper``: ``Shaper.request`` with its defaults (same 64-socket pool);
- ``shaper on aiohttp``: ``Shaper.request`` over ``AiohttpTransport`` (what one pays who
  brings an aiohttp pool of one's own).

The ratio compares what a caller pays, transport included, with plain aiohttp. The
Shaper's transport is leaner than aiohttp's session, so we also print what the shaping
alone costs on top of its own transport (``shaper - transport``), the figure to watch when
the request path changes.

In both, 32 callers (chat sessions) send one request at a time, back to back: a load the
upstream takes in its stride, which is what "the price when nothing is wrong" means.

Each round times this process's CPU (``time.process_time``) over N requests. We print the
median CPU µs per request of each and the median of the per-round ratios (target ≤ 1.10×).

And the price of saying no: ``refused``, the CPU of a ``Shaper.request`` refused at once
(its class is being shed, ``shed_below``): the options checked, the body encoded, the
refusal decided, the error made and counted (target ≤ 20 µs).

Run: ``python benchmarks/overhead.py [--requests 2000] [--rounds 7] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import uvloop

from asyncquota import AiohttpTransport, HttpTransport, RejectedError, Request, Shaper
from asyncquota.testing import UpstreamConfig, run_in_process

BODY = {
    "model": "simulated",
    "messages": [{"role": "user", "content": "Where is my parcel? Order 4711, shipped Monday."}],
    "max_tokens": 16,
}
CONNECTIONS = 64
WORKERS = 32


async def bare(base_url: str, n: int) -> float:
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(base_url + "/v1/chat/completions", json=BODY) as response:
                await response.read()
                assert response.status == 200, response.status

        return await cpu_per_request(n, one)


async def transport(base_url: str, n: int) -> float:
    return await pooled(HttpTransport(max_connections=CONNECTIONS), base_url, n)


async def aiohttp_transport(base_url: str, n: int) -> float:
    return await pooled(AiohttpTransport(max_connections=CONNECTIONS), base_url, n)


async def pooled(pool: HttpTransport | AiohttpTransport, base_url: str, n: int) -> float:
    url, headers = base_url + "/v1/chat/completions", {"Content-Type": "application/json"}

    async def one() -> None:
        body = orjson.dumps(BODY)
        response = await pool.send(Request("POST", url, headers, body, timeout=60.0))
        assert response.status == 200, response.status

    try:
        return await cpu_per_request(n, one)
    finally:
        await pool.aclose()


async def shaped(base_url: str, n: int) -> float:
    return await shaped_over(None, base_url, n)


async def shaped_on_aiohttp(base_url: str, n: int) -> float:
    return await shaped_over(AiohttpTransport(max_connections=CONNECTIONS), base_url, n)


async def shaped_over(pool: AiohttpTransport | None, base_url: str, n: int) -> float:
    async with Shaper(base_url, max_connections=CONNECTIONS, transport=pool) as shaper:

        async def one() -> None:
            response = await shaper.request("POST", "/v1/chat/completions", json=BODY)
            assert response.status == 200, response.status

        return await cpu_per_request(n, one)


async def refused(base_url: str, n: int) -> float:
    async with Shaper(base_url, max_connections=CONNECTIONS) as shaper:
        shaper.shed_below("interactive", for_seconds=3600)

        async def one() -> None:
            try:
                await shaper.request("POST", "/v1/chat/completions", json=BODY)
            except RejectedError:
                return
            raise AssertionError("a shed class was served")

        return await cpu_per_request(n, one)


async def cpu_per_request(n: int, one: Callable[[], Awaitable[None]]) -> float:
    """CPU seconds per request for n requests from WORKERS callers, each one at a time."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await asyncio.gather(*(worker(10) for _ in range(WORKERS)))  # warm the pool and caches
    started = time.process_time()
    await asyncio.gather(*(worker(n // WORKERS) for _ in range(WORKERS)))
    return (time.process_time() - started) / (n // WORKERS * WORKERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each, alternating")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = parser.parse_args(argv)

    config = UpstreamConfig.preset(
        "steady", rps=1_000_000, latency_base=0.005, latency_per_token=0.0, max_concurrency=None
    )
    runs = (
        ("bare", bare),
        ("transport", transport),
        ("aiohttp_transport", aiohttp_transport),
        ("shaper", shaped),
        ("shaper_on_aiohttp", shaped_on_aiohttp),
        ("refused", refused),
    )
    cpu: dict[str, list[float]] = {name: [] for name, _ in runs}
    with run_in_process(config) as base_url:
        for _ in range(args.rounds):
            for name, run in runs:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    cpu[name].append(runner.run(run(base_url, args.requests)) * 1e6)
    ratios = [s / b for s, b in zip(cpu["shaper"], cpu["bare"], strict=True)]
    report = {
        "benchmark": "overhead",
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "bare_cpu_us_median": statistics.median(cpu["bare"]),
        "transport_cpu_us_median": statistics.median(cpu["transport"]),
        "aiohttp_transport_cpu_us_median": statistics.median(cpu["aiohttp_transport"]),
        "shaper_on_aiohttp_cpu_us_median": statistics.median(cpu["shaper_on_aiohttp"]),
        "ratio_on_aiohttp_median": statistics.median(
            s / b for s, b in zip(cpu["shaper_on_aiohttp"], cpu["bare"], strict=True)
        ),
        "shaping_cpu_us_median": statistics.median(
            s - t for s, t in zip(cpu["shaper"], cpu["transport"], strict=True)
        ),
        "shaper_cpu_us_median": statistics.median(cpu["shaper"]),
        "refused_cpu_us_median": statistics.median(cpu["refused"]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }
    print(f"client CPU per request, {args.rounds} alternating rounds of {args.requests} requests")
    print(f"  bare aiohttp : {report['bare_cpu_us_median']:8.1f} µs (median)")
    print(f"  transport    : {report['transport_cpu_us_median']:8.1f} µs (median; "
          "HttpTransport.send alone, the Shaper's pool)")
    print(f"  aiohttp pool : {report['aiohttp_transport_cpu_us_median']:8.1f} µs (median; "
          "AiohttpTransport.send alone)")
    print(f"  Shaper       : {report['shaper_cpu_us_median']:8.1f} µs (median)")
    print(f"  shaping      : {report['shaping_cpu_us_median']:8.1f} µs (median of rounds; "
          "Shaper - transport)")
    print(f"  on aiohttp   : {report['shaper_on_aiohttp_cpu_us_median']:8.1f} µs (median; "
          f"Shaper over AiohttpTransport, {report['ratio_on_aiohttp_median']:.2f}× bare)")
    verdict = "met" if report["ratio_median"] <= 1.10 else "MISSED"
    print(f"  ratio        : {report['ratio_median']:8.2f}× (median of rounds)")
    print(f"target ≤ 1.10×: {verdict}")
    print(f"  refused      : {report['refused_cpu_us_median']:8.1f} µs (median; refused at once)")
    verdict = "met" if report["refused_cpu_us_median"] <= 20 else "MISSED"
    print(f"target ≤ 20 µs: {verdict}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
