"""Running the proxy: listen, reload on SIGHUP, drain and stop on SIGTERM or SIGINT.

    asyncquota proxy --config gateway.toml --host 127.0.0.1 --port 8080

:func:`serve` is the server as an async context manager (tests and embedders); :func:`run`
is the command's body: uvloop where there is one, the signals, and a clean stop.

On SIGTERM the listening socket closes first (no new connection is taken), requests in
flight get ``shutdown_grace`` seconds to finish (streams included), then whatever is left
is cancelled (its reservations settled) and the gateway closes. On SIGHUP the file is
read again and applied (:meth:`Proxy.reload`): on any error it is logged and nothing
changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiohttp import web

from .app import Proxy, make_app
from .config import load

__all__ = ["run", "serve"]

logger = logging.getLogger("asyncquota.proxy")


@contextlib.asynccontextmanager
async def serve(
    proxy: Proxy, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``proxy`` on this loop; yields its base URL; on exit, drains and stops.

    ``port=0`` picks a free port. On exit, requests in flight get the settings'
    ``shutdown_grace`` seconds, then the gateway closes.
    """
    settings = proxy.settings
    runner = web.AppRunner(
        make_app(proxy),
        access_log=None,
        handle_signals=False,
        # A client that goes away cancels its handler: its upstream call ends with it.
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_grace,
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


async def run(
    path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Serve the proxy the file at ``path`` configures until SIGTERM or SIGINT.

    Raises:
        ConfigError, ValueError, OSError: the file cannot be read or is invalid, a key's
            variable is not set, the address cannot be bound.
    """
    settings, config = load(path)
    proxy = Proxy.from_config(settings, config, environ=environ)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            proxy.reload(*load(path), environ=environ)
        except (ValueError, OSError) as exc:
            logger.error("The configuration was not reloaded: %s", exc)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        async with serve(proxy, host=host, port=port) as url:
            print(f"asyncquota proxy listening on {url}", file=sys.stderr, flush=True)
            await stop.wait()
            print("asyncquota proxy stopping: finishing the requests in flight", file=sys.stderr)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
