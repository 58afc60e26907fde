"""Redis round trips per request of a Gateway on a Redis store, alone and under concurrency.

A Gateway built from a TOML file with ``store = "redis://..."`` (a throwaway redis-server
on loopback), one upstream answered in process at once, a tier (per-minute and per-day
requests) and a monthly budget: each request makes five store calls (the budget read for
its policy, the tier's previous minute, one reservation of the tier's and the budget's
counters together, two settlements). Calls made in one turn of the event loop share one
pipeline, so concurrent callers share round trips. Prints store calls and round trips per
request for 1, 16 and 64 concurrent callers, plus the upstream Shapers' fleet round trips
(the rate units).

Needs redis-server and the ``redis`` extra. Run: ``python benchmarks/gateway_store.py
[--requests 400] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from asyncquota import MockTransport, Request, Response
from asyncquota.governance import Gateway
from asyncquota.testing import SimulatedUpstream, UpstreamConfig
from asyncquota.testing.redis import RedisServer

CONFIG = """
store = "{url}"

[upstreams.openai]
base_url = "http://openai.test"
rpm = 6000000

[models.gpt]
upstream = "openai"
context_window = 128000
input_per_mtok = 2.5
output_per_mtok = 10.0

[routing]
default_model = "gpt"

[tiers.free."*"]
rpm = 1000000
rpd = 10000000

[tenants]
default_tier = "free"

[budget]
monthly = 1000000.0
"""

BODY = {"messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 20}


async def run(url: str, callers: int, requests: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="aq-gateway-store-"))
    file = folder / "gateway.toml"
    file.write_text(CONFIG.format(url=url), encoding="utf-8")
    upstream = SimulatedUpstream(
        UpstreamConfig(rps=1_000_000.0, latency_base=0.0, latency_per_token=0.0)
    )

    async def answer(request: Request) -> Response:
        return await upstream.handle(request)

    gateway = Gateway.from_config(file, transports={"openai": MockTransport(answer)})
    each = max(1, requests // callers)
    async with gateway:

        async def caller(index: int) -> None:
            for _ in range(each):
                await gateway.request(BODY, tenant=f"tenant-{index % 8}")

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.3)  # the settlements' last round trips
        store = gateway._store  # the RedisStore the file made
        fleet = gateway.upstreams["openai"]._fleet
        done = each * callers
        return {
            "callers": callers,
            "requests": done,
            "seconds": round(elapsed, 3),
            "store_calls_per_request": round(store._calls / done, 3),  # type: ignore[union-attr]
            "store_round_trips_per_request": round(store.round_trips / done, 3),  # type: ignore[union-attr]
            "fleet_round_trips_per_request": round(fleet.statistics().calls / done, 3),  # type: ignore[union-attr]
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per setting")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gateway_store.json"))
    args = parser.parse_args(argv)
    rows = []
    with RedisServer() as server:
        for callers in (1, 16, 64):
            server.stop()  # an empty Redis for each setting
            server.start()
            rows.append(asyncio.run(run(server.url, callers, args.requests)))
    print("Gateway on a Redis store: round trips per request (loopback)")
    print(" callers  requests  store calls  store round trips  fleet round trips")
    for row in rows:
        print(
            f" {row['callers']:>7}  {row['requests']:>8}  {row['store_calls_per_request']:>11.2f}"
            f"  {row['store_round_trips_per_request']:>17.2f}"
            f"  {row['fleet_round_trips_per_request']:>17.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "gateway_store", "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
