"""The edge to the upstream: one request in, one response out.

A transport knows nothing of queues, limits or retries: it sends exactly one attempt and
returns what came back, or raises :class:`~asyncquota.errors.TransportError` when nothing
usable came back (third-party exceptions are mapped here, at the boundary, and nowhere else).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["Request", "Response", "Transport"]


@dataclass(frozen=True, slots=True)
class Request:
    """One attempt to send to the upstream.

    Attributes:
        method: the HTTP method, upper case.
        url: the absolute URL (the configured upstream's base URL joined with the path).
        headers: request headers (credentials included: never log them).
        body: the encoded body, or None.
        timeout: the longest this attempt may take, in seconds, or None for no limit.
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    timeout: float | None = None


@dataclass(slots=True)
class Response:
    """What the upstream answered to one request.

    Attributes:
        status: the HTTP status code.
        headers: the reply headers, matched case-insensitively.
        body: the whole reply body.
        attempts: how many attempts the request took to get this answer (1 when sent once).
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    attempts: int = 1

    def __post_init__(self) -> None:
        # Callers and mocks may pass a plain dict; lookups must still ignore case.
        if not isinstance(self.headers, CIMultiDictProxy):
            self.headers = CIMultiDictProxy(CIMultiDict(self.headers))

    def json(self) -> Any:
        """The body decoded as JSON (orjson); raises ``orjson.JSONDecodeError`` if it is not."""
        return orjson.loads(self.body)

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300


class Transport(Protocol):
    """Sends one request, returns one response; maps its own failures to TransportError."""

    async def send(self, request: Request) -> Response:
        """Send ``request`` once and return the full response.

        Raises:
            TransportError: no usable reply (refused, reset, timed out, not HTTP).
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the transport sends nothing afterwards."""
        ...
