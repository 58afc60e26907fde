"""``openai-sdk``: the official ``openai`` package's ``AsyncOpenAI``, defaults untouched.

One client for the whole fleet, ``client.chat.completions.create(...)`` per message. Its
defaults do the shaping: 2 retries on 429, 408, 409, 5xx and connection errors, waiting
what Retry-After says (up to two minutes) or an exponential backoff from 0.5 s, and a pool
of 1 000 connections.

In virtual runs the SDK keeps all of that; only the socket is replaced: an
``httpx2.AsyncClient`` whose transport hands each request to the simulated upstream, with
a 1 000-slot semaphore standing in for the pool.
"""

from __future__ import annotations

import asyncio

import httpx2
from openai import AsyncOpenAI
from openai._constants import DEFAULT_CONNECTION_LIMITS

from ...errors import TransportError
from ...transport import MockHandler, MockTransport, Request
from ..sessions import MODEL, Call
from .base import Strategy, Target

__all__ = ["OpenAISDKStrategy", "in_process_client"]


def in_process_client(handler: MockHandler, *, max_connections: int) -> httpx2.AsyncClient:
    """An httpx client whose requests the mock ``handler`` answers, through a pool stand-in."""
    upstream = MockTransport(handler)
    slots = asyncio.Semaphore(max_connections)

    async def handle(request: httpx2.Request) -> httpx2.Response:
        async with slots:
            try:
                reply = await upstream.send(
                    Request(
                        method=request.method,
                        url=str(request.url),
                        headers=dict(request.headers),
                        body=request.content,
                    )
                )
            except TransportError as exc:
                # What httpx raises when a connection drops: the SDK retries it.
                raise httpx2.ReadError(str(exc), request=request) from exc
        return httpx2.Response(
            reply.status, headers=list(reply.headers.items()), content=reply.body
        )

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handle))


class OpenAISDKStrategy(Strategy):
    """``AsyncOpenAI`` with its default retries."""

    name = "openai-sdk"
    description = "the official openai AsyncOpenAI client with its default retries"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        http_client = None
        if target.handler is not None:
            limit = DEFAULT_CONNECTION_LIMITS.max_connections or 1000
            http_client = in_process_client(target.handler, max_connections=limit)
        self._client = AsyncOpenAI(
            api_key="sk-bench", base_url=target.base_url + "/v1", http_client=http_client
        )

    async def complete(self, call: Call) -> None:
        """``chat.completions.create``; the SDK raises its own errors when it gives up."""
        await self._client.chat.completions.create(
            model=MODEL, messages=call.messages, max_tokens=call.max_tokens  # type: ignore[arg-type]
        )

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self._client.close()
