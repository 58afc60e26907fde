"""What the proxy adds: latency, time to first byte, and what aborted streams leave held.

    .venv/bin/python benchmarks/proxy.py [--requests 2000] [--rate 1000] [--seconds 5]
                                         [--aborts 10000]

The simulated upstream runs in its own process (no latency of its own, quota far above
the load), the proxy in another (``asyncquota proxy``, uvloop), the client here (uvloop,
aiohttp); everything on 127.0.0.1. Each figure compares the same requests sent directly
to the upstream and through the proxy, in the same run:

1. sequential chat completions, one at a time, direct and proxied alternately: the added
   latency is the proxied quantile less the direct one (p50, p99);
2. the same at ``--rate`` requests a second for ``--seconds`` (open loop: each request
   leaves on its schedule, whatever the others do), direct then proxied;
3. sequential streamed completions: the time to the first body byte, proxied less direct;
4. ``--aborts`` streams whose client hangs up after the first chunk (200 at a time),
   against a proxy in this process so that its Shapers can be read: what stays held
   (requests in flight, token reservations, attempts, sockets in use) once they ended.

Bounded: at most 100 000 requests per part, a minute per part, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from asyncquota.proxy import Proxy, load, serve
from asyncquota.testing import UpstreamConfig, run_in_process

KEY = "sk-bench-proxy"
ENVIRON = {"BENCH_PROXY_KEY": KEY, "BENCH_UPSTREAM_KEY": "sk-upstream"}
MOST_REQUESTS = 100_000
PART_LIMIT = 60.0
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

CONFIG = """
[proxy]
request_timeout = 60.0
shutdown_grace = 1.0
[[proxy.keys]]
name = "bench"
key_env = "BENCH_PROXY_KEY"
tenant = "acme"

[upstreams.openai]
base_url = "{upstream}"
api_key_env = "BENCH_UPSTREAM_KEY"
max_connections = 512

[models.gpt-4o-mini]
upstream = "openai"
context_window = 128000
input_per_mtok = 0.15
output_per_mtok = 0.60

[routing]
default_model = "gpt-4o-mini"

[tiers.pro]
"*" = {{ rpm = 100000000, tpm = 100000000000 }}
[tenants.members]
acme = "pro"
"""


def upstream_config() -> UpstreamConfig:
    return UpstreamConfig(
        rps=1_000_000.0, burst_seconds=1.0, latency_base=0.0, latency_per_token=0.0,
        max_concurrency=None,
    )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


AUTH = {"Authorization": f"Bearer {KEY}"}


class Client:
    """One aiohttp session; a request's latency to its whole body, or to its first byte."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def whole(self, url: str, body: dict[str, object]) -> float:
        started = time.perf_counter()
        async with self.session.post(url, json=body, headers=AUTH) as r:
            await r.read()
            assert r.status == 200, (r.status, await r.text())
        return time.perf_counter() - started

    async def first_byte(self, url: str, body: dict[str, object]) -> float:
        started = time.perf_counter()
        async with self.session.post(url, json=body, headers=AUTH) as r:
            assert r.status == 200
            await r.content.readany()
            first = time.perf_counter() - started
            await r.read()
        return first


async def alternate(
    count: int, direct: Callable[[], Awaitable[float]], proxied: Callable[[], Awaitable[float]]
) -> tuple[list[float], list[float]]:
    times: tuple[list[float], list[float]] = ([], [])
    async with asyncio.timeout(PART_LIMIT):
        for _ in range(count):
            times[0].append(await direct())
            times[1].append(await proxied())
    return times


async def at_rate(rate: float, seconds: float, send: Callable[[], Awaitable[float]]) -> list[float]:
    loop = asyncio.get_running_loop()
    count = min(MOST_REQUESTS, int(rate * seconds))
    start = loop.time() + 0.05
    tasks = []
    async with asyncio.timeout(PART_LIMIT):
        for index in range(count):
            delay = start + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send()))
        return list(await asyncio.gather(*tasks))


def report(title: str, direct: list[float], proxied: list[float]) -> None:
    d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
    p50, p99 = percentile(proxied, 0.5), percentile(proxied, 0.99)
    print(
        f"{title}: added p50 {ms(p50 - d50)}, p99 {ms(p99 - d99)} "
        f"(direct {ms(d50)} / {ms(d99)}, proxied {ms(p50)} / {ms(p99)}, {len(direct)} each)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_proxy(config: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncquota", "proxy", "--config", str(config), "--port", str(port)],
        env={**os.environ, **ENVIRON}, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while b"listening on" not in process.stderr.readline():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("The proxy did not start.")
    return process, f"http://127.0.0.1:{port}"


async def latency(upstream: str, proxy: str, args: argparse.Namespace) -> None:
    chat, streamed = "/v1/chat/completions", {**BODY, "stream": True}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(session)
        for _ in range(200):  # warm: connections, caches
            await client.whole(upstream + chat, BODY)
            await client.whole(proxy + chat, BODY)
        direct, proxied = await alternate(
            args.requests,
            lambda: client.whole(upstream + chat, BODY),
            lambda: client.whole(proxy + chat, BODY),
        )
        report("sequential", direct, proxied)
        direct = await at_rate(args.rate, args.seconds, lambda: client.whole(upstream + chat, BODY))
        proxied = await at_rate(args.rate, args.seconds, lambda: client.whole(proxy + chat, BODY))
        report(f"at {args.rate:g} requests/s", direct, proxied)
        direct, proxied = await alternate(
            args.requests // 2,
            lambda: client.first_byte(upstream + chat, streamed),
            lambda: client.first_byte(proxy + chat, streamed),
        )
        report("streaming, time to first byte", direct, proxied)


async def aborted(config: Path, count: int) -> None:
    settings, governance = load(config)
    proxy = Proxy.from_config(settings, governance, environ=ENVIRON)
    body = {**BODY, "stream": True, "max_tokens": 400}
    started = time.perf_counter()
    async with serve(proxy) as url, aiohttp.ClientSession() as session:
        lane = asyncio.Semaphore(200)

        async def one() -> None:
            async with lane:
                response = await session.post(
                    f"{url}/v1/chat/completions", json=body, headers=AUTH,
                )
                await response.content.readany()
                response.close()  # hung up after the first chunk

        async with asyncio.timeout(PART_LIMIT * 2):
            await asyncio.gather(*(one() for _ in range(min(count, MOST_REQUESTS))))
        shaper = proxy.gateway.upstreams["openai"]
        for _ in range(500):  # the last handlers notice their client is gone
            stats, transport = shaper.statistics(), shaper.transport.statistics()
            held = (stats.inflight, stats.open_reservations, transport.in_flight,
                    transport.connections_in_use)
            if held == (0, 0, 0, 0):
                break
            await asyncio.sleep(0.01)
        ended = stats.ok + stats.failed + stats.cancelled
    print(
        f"{count} streams aborted by their clients in {time.perf_counter() - started:.1f} s: "
        f"{held[0]} in flight, {held[1]} token reservations, {held[2]} attempts, "
        f"{held[3]} upstream sockets in use left ({ended} ended at the Shaper)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--aborts", type=int, default=10_000)
    args = parser.parse_args()
    if not (1 <= args.requests <= MOST_REQUESTS and 1 <= args.aborts <= MOST_REQUESTS):
        parser.error(f"--requests and --aborts must be between 1 and {MOST_REQUESTS}.")
    if not (0 < args.rate * args.seconds <= MOST_REQUESTS):
        parser.error(f"--rate times --seconds must be between 1 and {MOST_REQUESTS}.")
    with run_in_process(upstream_config()) as upstream, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.toml"
        config.write_text(CONFIG.format(upstream=upstream))
        process, proxy = start_proxy(config)
        try:
            uvloop.run(latency(upstream, proxy, args))
        finally:
            process.terminate()
            process.wait(10)
        uvloop.run(aborted(config, args.aborts))


if __name__ == "__main__":
    main()
