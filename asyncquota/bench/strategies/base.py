"""What every strategy is: a client of the upstream that answers one call at a time.

A strategy is an async context manager built from a :class:`Target`. Inside it, the
harness calls :meth:`Strategy.complete` once per message of the night, from thousands of
tasks at once, inside ``asyncio.timeout(call.deadline)``; the call returns when the upstream
answered and raises otherwise (any exception: the harness classifies it). The same strategy
runs for real (aiohttp to an upstream process, on uvloop) and in process on virtual time
(the simulated upstream's ``handle`` behind a mock transport): the :class:`Target` hands
it the one or the other.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self

import orjson

from ...http1 import HttpTransport
from ...testing import UpstreamConfig
from ...testing.replies import CHAT_PATH
from ...transport import (
    AiohttpTransport,
    MockHandler,
    MockTransport,
    Request,
    Response,
    StreamResponse,
)
from ..sessions import Call, Tenant

__all__ = [
    "JSON_HEADERS",
    "HTTPStatusError",
    "PooledTransport",
    "Strategy",
    "Target",
    "chat_request",
    "raise_for_status",
]

JSON_HEADERS: Mapping[str, str] = {
    "content-type": "application/json",
    "authorization": "Bearer sk-bench",
}
"""Headers of every chat request (the simulated upstream checks no key)."""


class HTTPStatusError(Exception):
    """A non-2xx reply, raised as ``aiohttp``'s ``raise_for_status()`` would.

    Attributes:
        status: the HTTP status.
        headers: the reply headers (Retry-After is read from here).
    """

    def __init__(self, response: Response) -> None:
        super().__init__(f"The upstream answered {response.status}.")
        self.status = response.status
        self.headers = response.headers


def raise_for_status(response: Response) -> None:
    """Raise :class:`HTTPStatusError` unless the reply is a 2xx."""
    if not response.ok:
        raise HTTPStatusError(response)


def chat_request(base_url: str, call: Call) -> Request:
    """The POST of one chat completion."""
    return Request(
        method="POST",
        url=base_url + CHAT_PATH,
        headers=JSON_HEADERS,
        body=orjson.dumps(call.body),
    )


class PooledTransport:
    """A mock transport that, like a connection pool, lets ``max_connections`` in at once.

    In virtual runs it stands in for a real pool: a client whose aiohttp session holds 100
    sockets sends at most 100 requests at a time there too, and the rest queue (FIFO, as
    aiohttp's connector does) inside their timeout.
    """

    __slots__ = ("_inner", "_slots", "max_connections")

    def __init__(self, handler: MockHandler, *, max_connections: int) -> None:
        self._inner = MockTransport(handler)
        self._slots = asyncio.Semaphore(max_connections)
        self.max_connections = max_connections

    async def send(self, request: Request) -> Response:
        """Wait for a free connection, then send through the mock."""
        async with self._slots:
            return await self._inner.send(request)

    async def open_stream(self, request: Request) -> StreamResponse:
        """Wait for a free connection and open a stream on it; it is freed when the stream ends."""
        await self._slots.acquire()
        try:
            stream = await self._inner.open_stream(request)
        except BaseException:
            self._slots.release()
            raise
        inner_close = stream._on_close

        async def on_close(finished: bool) -> None:
            try:
                if inner_close is not None:
                    await inner_close(finished)
            finally:
                self._slots.release()

        stream._on_close = on_close
        return stream

    async def aclose(self) -> None:
        """Refuse further sends."""
        await self._inner.aclose()

    def __repr__(self) -> str:
        return f"<PooledTransport {self._inner!r}>"


@dataclass(frozen=True, slots=True)
class Target:
    """The upstream a strategy talks to, and what a user of it would know.

    Attributes:
        base_url: the upstream's base URL (a placeholder host in virtual runs).
        config: the upstream's configuration: strategies may read only its nominal quota
            (``rps``, ``tpm``), which is what their users would have read on the
            provider's pricing page, and its ``wall_clock`` (the world's clock: a
            virtual run replaces it with one on virtual time).
        handler: in virtual runs, the simulated upstream's handler; None for real runs.
        tenants: the tenants whose calls these are, with their tiers, as the service's
            operator configured them (empty: calls are nobody's). Each call names its
            tenant; only a strategy that knows tenants (asyncquota's gateway) uses them.
    """

    base_url: str
    config: UpstreamConfig
    handler: MockHandler | None = None
    tenants: tuple[Tenant, ...] = ()

    @property
    def virtual(self) -> bool:
        """True when the upstream is in process, on virtual time."""
        return self.handler is not None

    def transport(self, *, max_connections: int) -> AiohttpTransport | PooledTransport:
        """A pooled transport as the peers use: one aiohttp session for real (what people
        use today), or its stand-in in process."""
        if self.handler is not None:
            return PooledTransport(self.handler, max_connections=max_connections)
        return AiohttpTransport(max_connections=max_connections)

    def shaper_transport(self, *, max_connections: int) -> HttpTransport | PooledTransport:
        """The Shaper's own pool (its default, :class:`HttpTransport`) for real, or the
        same stand-in as the peers' in process."""
        if self.handler is not None:
            return PooledTransport(self.handler, max_connections=max_connections)
        return HttpTransport(max_connections=max_connections)


class Strategy(abc.ABC):
    """A way of calling the upstream, written as its users would write it.

    Subclasses set :attr:`name`, build their client in ``__init__`` (or in ``__aenter__``
    when it must start inside the running loop, like an ``async with`` client), answer calls
    in :meth:`complete` and release everything in :meth:`aclose` (``__aexit__`` calls it).
    :meth:`sample` may report live internals once a second (the plot draws ``limit`` and
    ``queue_*`` keys). The runner enters the strategy before the night and leaves it after.

    Args:
        target: the upstream.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, target: Target) -> None:
        self.target = target

    @abc.abstractmethod
    async def complete(self, call: Call) -> None:
        """Get one answer; raise if there is none (the harness applies the deadline)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the client (connections, background tasks)."""

    def sample(self) -> Mapping[str, float]:
        """Live internals worth plotting, e.g. ``{"limit": 40, "queue_interactive": 3}``."""
        return {}

    def queue_waits(self) -> Mapping[str, Sequence[float]] | None:
        """Seconds each first attempt waited from the call to its send, by class name.

        None (the default): the strategy cannot tell cheaply. A strategy that can says
        what it measures in :attr:`queue_wait_source`.
        """
        return None

    queue_wait_source: ClassVar[str | None] = None
    """What :meth:`queue_waits` measures, in a few words (None when it measures nothing)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
