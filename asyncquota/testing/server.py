"""The simulated upstream over real HTTP: an aiohttp app, a server, a server in its own process.

``make_app`` puts a :class:`SimulatedUpstream` behind aiohttp (its routes, plus ``GET /stats``
and ``POST /reset``); ``serve`` runs it on this loop; ``run_in_process`` runs it on uvloop in
a separate process, so a benchmark's client and the upstream do not share a CPU core.

In the server, an injected connection reset is a real one (the socket is closed with
SO_LINGER 0, so the client sees RST) and a hang is a reply that does not come.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from multiprocessing.connection import Connection

import orjson
from aiohttp import web

from ..transport import Request
from .config import UpstreamConfig
from .upstream import SimulatedUpstream

__all__ = ["UPSTREAM_KEY", "make_app", "run_in_process", "serve"]

UPSTREAM_KEY = web.AppKey("upstream", SimulatedUpstream)
"""Where the app keeps its model: ``app[UPSTREAM_KEY]``."""

START_TIMEOUT = 30.0
"""Seconds a server process may take to report its port before it is given up on."""

STOP_TIMEOUT = 5.0
"""Seconds a server process gets to stop by itself before it is terminated, then killed."""

_SHUTDOWN_GRACE = 1.0
"""Seconds in-flight replies get when the server stops (hung ones would wait forever)."""


def _abort(request: web.Request) -> None:
    """Reset the client's connection: RST, not an orderly close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _model(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM_KEY]
    try:
        body = await request.read()
    except ConnectionResetError:
        # The client gave up before its body arrived (a caller's deadline): nothing was
        # asked, nothing is answered, and it is not an error of the upstream's.
        raise asyncio.CancelledError from None
    try:
        reply = await upstream.handle(
            Request(
                method=request.method,
                url=f"http://{request.host}{request.path_qs}",
                headers=request.headers,
                body=body or None,
            )
        )
    except ConnectionResetError:
        _abort(request)
        # Nothing can be written any more; aiohttp drops the handler's end quietly.
        raise asyncio.CancelledError from None
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)


async def _stats(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[UPSTREAM_KEY].stats()), content_type="application/json"
    )


async def _reset(request: web.Request) -> web.Response:
    request.app[UPSTREAM_KEY].reset()
    return web.Response(status=204)


def make_app(upstream: SimulatedUpstream) -> web.Application:
    """An aiohttp app serving ``upstream``: its endpoints, ``GET /stats`` and ``POST /reset``.

    Every other path goes to the model too, which answers 404 (or 405) in OpenAI's shape.
    """
    app = web.Application()
    app[UPSTREAM_KEY] = upstream
    app.router.add_get("/stats", _stats)
    app.router.add_post("/reset", _reset)
    app.router.add_route("*", "/{path:.*}", _model)
    return app


@contextlib.asynccontextmanager
async def serve(
    config: UpstreamConfig, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve a fresh simulated upstream on this loop; yields its base URL, stops on exit.

    ``port=0`` picks a free port. Replies still in flight at exit get a short grace, then
    are dropped.
    """
    runner = web.AppRunner(
        make_app(SimulatedUpstream(config)),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=_SHUTDOWN_GRACE,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


FULL_COLLECTIONS_AFTER = 1_000_000
"""The server process's third collector threshold: full collections never come by
themselves within a night (see ``quiet_collector``)."""


def quiet_collector() -> None:
    """Keep the collector from holding up the server process's door.

    The model states every way its door is slow (``UpstreamConfig``: latencies, hangs);
    a pause of its own collector is none of them. Full collections grew with the
    requests in flight: 30-45 ms at ~2 s into a night, 90-170 ms at 15 s and 23 s with
    3 000 streamed answers held open. The requests a client sent meanwhile then reached
    the buckets at one instant, and on a punishing upstream each one past the first
    refusal bought a second (real time, rows 9 and 14 with seeds 3-6, paired: 4 of 8 runs
    under 0.95 of the quota with them, 1 of 8 without). So what start-up built is frozen
    out of every collection, and only the young generations are collected automatically;
    the process lives for one night, and what cycles it leaves are freed when it exits.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTIONS_AFTER)


def _serve_until_told(config: UpstreamConfig, conn: Connection) -> None:
    """The server process: report the URL, serve until the parent says stop or goes away."""
    import uvloop

    async def main() -> None:
        async with serve(config) as url:
            quiet_collector()
            conn.send(url)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            # A message or EOF (the parent closed its end, or died) both mean stop.
            loop.add_reader(conn.fileno(), stop.set)
            try:
                await stop.wait()
            finally:
                loop.remove_reader(conn.fileno())

    try:
        uvloop.run(main())
    finally:
        conn.close()


@contextlib.contextmanager
def run_in_process(config: UpstreamConfig) -> Iterator[str]:
    """Run a simulated upstream on uvloop in its own process; yields its base URL.

    The server binds 127.0.0.1 only, on a free port it reports back through a pipe. On exit
    it is asked to stop, then terminated, then killed: this always returns within about
    ``STOP_TIMEOUT + 2`` seconds. The config is pickled to the child (spawn), so its
    ``wall_clock`` must be a module-level function.

    Raises:
        RuntimeError: the server process died or did not report ready within
            ``START_TIMEOUT`` seconds.
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_serve_until_told, args=(config, child), name="simulated-upstream", daemon=True
    )
    process.start()
    child.close()
    try:
        if not parent.poll(START_TIMEOUT):
            raise RuntimeError(
                f"The simulated upstream process did not start within {START_TIMEOUT:g} s."
            )
        try:
            url = parent.recv()
        except EOFError:
            raise RuntimeError(
                f"The simulated upstream process exited before it was ready "
                f"(exit code {process.exitcode})."
            ) from None
        yield str(url)
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        parent.close()
        process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.terminate()
            process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
        process.close()
