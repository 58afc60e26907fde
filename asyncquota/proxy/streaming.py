"""A routed stream, written to the client as the model sends it.

The headers go out with the model's first content (:class:`~asyncquota.governance.
RoutedStream` opens the stream up to it, falling back unseen before), then each chunk is
written the moment it arrives: no buffering, no compression (``Content-Encoding`` is never
set, and ``X-Accel-Buffering: no`` asks a reverse proxy in front not to buffer either).

A client that goes away ends the stream where it stands: its handler is cancelled (the
server runs with ``handler_cancellation``) or its next write fails, and leaving the
``async with`` closes the upstream's connection, gives the Shaper's permit back and
settles the tenant's tier and the budget at the estimate (the model may have generated
it all). An error after the headers (an error event, a broken upstream) can no longer
change the status: it is written as the dialect's error event, and the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from ..errors import QuotaError
from ..governance import RoutedStream
from ..signals import Provider
from .replies import ProxyError, error_event, refusal_of

__all__ = ["relay"]

logger = logging.getLogger("asyncquota.proxy")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def relay(
    request: web.Request,
    stream: RoutedStream,
    *,
    dialect: Provider,
    headers: Mapping[str, str],
    ends: float,
    timed_out: ProxyError,
) -> web.StreamResponse:
    """Write an entered ``stream`` to the client, chunk by chunk; the response, ended.

    At loop time ``ends`` the stream is cut and ``timed_out`` is its last event.

    Raises:
        ConnectionResetError: the client went away (the caller's ``async with`` settles).
    """
    response = web.StreamResponse(status=stream.status, headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    try:
        async with asyncio.timeout_at(ends):
            async for chunk in stream:
                await response.write(chunk)
    except QuotaError as exc:
        # After the headers: said as the stream's last event.
        logger.info("A stream from %s broke off: %s", stream.model, exc.message)
        await response.write(error_event(dialect, refusal_of(exc)))
    except TimeoutError:
        await response.write(error_event(dialect, timed_out))
    await response.write_eof()
    return response
