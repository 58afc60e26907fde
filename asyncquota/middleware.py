"""An aiohttp client middleware: shape every request a ``ClientSession`` sends to the upstream.

    async with Shaper("https://api.openai.com") as shaper:
        async with aiohttp.ClientSession(middlewares=[shaper.middleware]) as session:
            async with session.post(
                "https://api.openai.com/v1/chat/completions",
                json=body,
                headers={"X-AsyncQuota-Priority": "batch", "X-AsyncQuota-Tenant": "shop-42"},
            ) as response:
                ...

Requests to the Shaper's ``base_url`` go through its queue, gates and retries; requests
to any other origin pass through untouched (they do not draw on this upstream's quota).
Per-request options travel in headers that the middleware removes before sending:

    X-AsyncQuota-Priority     critical | interactive | batch | an integer rank
    X-AsyncQuota-Tenant       the tenant (a string)
    X-AsyncQuota-Deadline     seconds from now (a number)
    X-AsyncQuota-Cost-Tokens  tokens to reserve (an integer)

Without a ``cost tokens`` header the reservation is estimated from the body's size plus
the Shaper's ``default_output_tokens`` (the middleware does not decode bodies).

The middleware reads each reply's body before handing it back (the response still reads
as usual afterwards: aiohttp keeps the bytes), except ``text/event-stream`` replies, which
are returned as soon as their headers arrive so the caller can stream them. Like
``Shaper.request``, a request that ends in error raises the
:class:`~asyncquota.errors.QuotaError` it ended in, rather than returning the upstream's
error reply: a 429 that outlived its retries arrives as a ``ThrottledError`` with
``retry_after``.

The request's URL appears in errors, events and logs only scrubbed (query values and
userinfo as ``***``, see :mod:`asyncquota.urls`).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from .tokens import estimate_tokens
from .transport import Request, Response, transport_error
from .urls import redact_url

if TYPE_CHECKING:
    from aiohttp.client_middlewares import ClientHandlerType

    from .shaper import Shaper, _Ticket

__all__ = ["OPTION_HEADERS", "ShaperMiddleware"]

PRIORITY_HEADER = "X-AsyncQuota-Priority"
TENANT_HEADER = "X-AsyncQuota-Tenant"
DEADLINE_HEADER = "X-AsyncQuota-Deadline"
COST_HEADER = "X-AsyncQuota-Cost-Tokens"
OPTION_HEADERS = (PRIORITY_HEADER, TENANT_HEADER, DEADLINE_HEADER, COST_HEADER)
"""The headers that carry per-request options; never sent upstream."""


class ShaperMiddleware:
    """The aiohttp client middleware of one Shaper (get it as ``shaper.middleware``)."""

    __slots__ = ("_origin", "_shaper")

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper
        self._origin = URL(shaper.base_url)

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Shape ``request`` if it goes to the Shaper's upstream, else pass it through.

        Raises:
            QuotaError: the request ended in an error (see ``Shaper.request``).
            ValueError: an option header holds a malformed value.
        """
        if not self._is_upstream(request.url):
            return await handler(request)
        options = {name: request.headers.popall(name, None) for name in OPTION_HEADERS}
        # aiohttp sends ``request`` itself; the ticket's path and URL are only ever shown
        # (messages, events, logs), so they are scrubbed here, once, at the source.
        ticket = self._shaper._new_ticket(
            method=request.method,
            path=redact_url(request.url.raw_path_qs),
            url=redact_url(str(request.url)),
            headers={},
            body=None,
            priority=_single(options[PRIORITY_HEADER], PRIORITY_HEADER) or "interactive",
            tenant=_single(options[TENANT_HEADER], TENANT_HEADER),
            deadline=_number(options[DEADLINE_HEADER], DEADLINE_HEADER),
            cost_tokens=_cost(options[COST_HEADER], request, self._shaper),
        )
        replies: list[aiohttp.ClientResponse] = []

        async def send(ticket: _Ticket, budget: float | None) -> Response:
            for earlier in replies:  # a retry: the previous reply is done with
                earlier.release()
            replies.clear()
            attempt = Request(ticket.method, str(request.url), timeout=budget)
            try:
                async with asyncio.timeout(budget):
                    reply = await handler(request)
                    replies.append(reply)
                    streaming = reply.content_type == "text/event-stream"
                    body = b"" if streaming and reply.ok else await reply.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise transport_error(exc, attempt) from exc
            return Response(reply.status, reply.headers, body)

        try:
            await self._shaper._run(ticket, send)
        except BaseException:
            for reply in replies:
                reply.release()
            raise
        return replies[-1]

    def _is_upstream(self, url: URL) -> bool:
        origin = self._origin
        return (
            url.scheme == origin.scheme
            and url.host == origin.host
            and url.port == origin.port
            and url.raw_path.startswith(origin.raw_path.rstrip("/") + "/")
        )


def _single(values: list[str] | None, name: str) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"The {name} header was given {len(values)} times; give it once.")
    return values[0].strip()


def _number(values: list[str] | None, name: str) -> float | None:
    text = _single(values, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"The {name} header must be a number of seconds, not {text!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"The {name} header must be a finite number of seconds, not {text!r}.")
    return value


def _cost(values: list[str] | None, request: aiohttp.ClientRequest, shaper: Shaper) -> int:
    text = _single(values, COST_HEADER)
    if text is None:
        body = request.body
        size = body.size if isinstance(body, aiohttp.payload.Payload) else len(body)
        return estimate_tokens(
            size or 0, None, default_output_tokens=shaper.default_output_tokens
        )
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"The {COST_HEADER} header must be an integer, not {text!r}.") from None

