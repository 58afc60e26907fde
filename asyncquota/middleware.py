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
Per-request options travel in headers that the middleware removes before sending (see
:mod:`asyncquota.options`):

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
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import aiohttp
from yarl import URL

from .options import OPTION_HEADERS, RequestOptions
from .tokens import estimate_tokens
from .transport import Request, Response, transport_error

if TYPE_CHECKING:
    from aiohttp.client_middlewares import ClientHandlerType

    from .ticket import Send

__all__ = ["OPTION_HEADERS", "ShaperMiddleware"]


class Shapes(Protocol):
    """What the middleware needs of its Shaper: where it sends, and a shaped turn."""

    base_url: str
    default_output_tokens: int

    async def shape(
        self, send: Send, *, method: str, path: str, options: RequestOptions
    ) -> Response:
        """Send through the queue, the gates and the retries (``Shaper.shape``)."""


class ShaperMiddleware:
    """The aiohttp client middleware of one Shaper (get it as ``shaper.middleware``).

    Built on the Shaper's public :meth:`~asyncquota.Shaper.shape`: aiohttp sends each
    attempt, the Shaper decides when, and whether to try again.
    """

    __slots__ = ("_origin", "_shaper")

    def __init__(self, shaper: Shapes) -> None:
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
        options = RequestOptions.from_headers(
            {name: request.headers.popall(name, []) for name in OPTION_HEADERS}
        )
        if options.cost_tokens is None:
            body = request.body
            size = body.size if isinstance(body, aiohttp.payload.Payload) else len(body)
            cost = estimate_tokens(
                size or 0, None, default_output_tokens=self._shaper.default_output_tokens
            )
            options = replace(options, cost_tokens=cost)
        replies: list[aiohttp.ClientResponse] = []

        async def send(budget: float | None) -> Response:
            for earlier in replies:  # a retry: the previous reply is done with
                earlier.release()
            replies.clear()
            attempt = Request(request.method, str(request.url), timeout=budget)
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
            # aiohttp sends ``request`` itself; the path is only ever shown (messages,
            # events, logs), scrubbed by the Shaper.
            await self._shaper.shape(
                send, method=request.method, path=request.url.raw_path_qs, options=options
            )
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
