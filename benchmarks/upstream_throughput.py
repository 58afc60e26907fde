"""How many requests per second the simulated upstream serves from its own process.

Starts the server (uvloop, its own process) under a generous quota, hammers it from this
process with aiohttp on uvloop for a fixed time, and prints the achieved rate next to the
server's own count. The harness needs at least 600 requests/s on a 2-core machine.

    python benchmarks/upstream_throughput.py [--seconds 5] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson
import uvloop

from asyncquota.testing import UpstreamConfig, run_in_process

TARGET_RPS = 600.0

BODY = orjson.dumps(
    {
        "model": "simulated",
        "messages": [{"role": "user", "content": "Say something short, please."}],
        "max_tokens": 16,
    }
)


async def hammer(base_url: str, *, seconds: float, concurrency: int) -> tuple[int, int, float]:
    """Send from ``concurrency`` workers for ``seconds``; (ok, failed, elapsed seconds)."""
    ok = failed = 0
    url = base_url + "/v1/chat/completions"
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        stop_at = start + seconds

        async def worker() -> None:
            nonlocal ok, failed
            while loop.time() < stop_at:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                    else:
                        failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - start
        async with session.get(base_url + "/stats") as response:
            totals = (await response.json())["totals"]
    print(f"server counted: {totals['requests']} requests, {totals['ok']} ok, "
          f"max in flight {totals['max_inflight']}")
    return ok, failed, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    # A quota nobody reaches: this measures the server, not its rate limits.
    config = UpstreamConfig(rps=1_000_000.0, tpm=1e12, latency_base=0.120,
                            latency_per_token=0.001)
    started = time.perf_counter()
    with run_in_process(config) as base_url:
        print(f"server up at {base_url} after {time.perf_counter() - started:.2f} s")
        ok, failed, elapsed = uvloop.run(
            hammer(base_url, seconds=args.seconds, concurrency=args.concurrency)
        )
    rate = (ok + failed) / elapsed
    verdict = "meets" if rate >= TARGET_RPS else "MISSES"
    print(f"{ok + failed} requests ({ok} ok, {failed} failed) in {elapsed:.2f} s "
          f"with {args.concurrency} in flight: {rate:.0f} requests/s "
          f"({verdict} the {TARGET_RPS:.0f} req/s target)")


if __name__ == "__main__":
    main()
