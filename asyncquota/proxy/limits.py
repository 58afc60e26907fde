"""What a client may send: a body of bounded size that is a JSON object, and a deadline.

The header limits are the server's (aiohttp refuses a longer line or field before any
handler runs: see :mod:`.app`); the body's are here, read once: a declared length over
the limit is refused before a byte is read, a chunked body as soon as it passes it. A
body that is not a JSON object is refused with the parser's own words (line, column).

The deadline a request runs under is the client's ``X-AsyncQuota-Deadline``, else the
read timeout its SDK sends (``x-stainless-read-timeout``: an SDK gives up after it, so
work past it is wasted), each capped by the proxy's ``request_timeout``.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from ..options import OPTION_HEADERS, RequestOptions
from .replies import ProxyError

__all__ = ["READ_TIMEOUT_HEADER", "read_json", "request_options"]

READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
"""The read timeout (seconds) the OpenAI and Anthropic SDKs send with each request."""


async def read_json(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """The request's body, a JSON object of at most ``max_bytes`` bytes.

    Raises:
        ProxyError: 413 (too large), 400 (not JSON, or not an object; the message says
            where). The Content-Type is not read: ``curl -d`` says a form.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _too_large(length, max_bytes)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(None, max_bytes)
    if not body:
        raise ProxyError(400, "The request has no body; send a JSON object.")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(
            400, f"The body is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}.", code="invalid_json",
        ) from None
    if not isinstance(parsed, dict):
        raise ProxyError(
            400, f"The body must be a JSON object, not a JSON {_json_kind(parsed)}.",
            code="invalid_json",
        )
    return parsed


def request_options(headers: MultiMapping[str], *, cap: float) -> RequestOptions:
    """The ``X-AsyncQuota-*`` options of a request, its deadline capped at ``cap`` seconds.

    Raises:
        ProxyError: 400 naming the malformed header.
    """
    values = {
        name: headers.getall(name) for name in OPTION_HEADERS if name in headers
    }
    try:
        options = RequestOptions.from_headers(values)
        deadline = options.deadline
        if deadline is None and READ_TIMEOUT_HEADER in headers:
            deadline = _read_timeout(headers[READ_TIMEOUT_HEADER])
        return RequestOptions(
            priority=options.priority,
            tenant=options.tenant,
            deadline=min(cap, deadline) if deadline is not None else cap,
            cost_tokens=options.cost_tokens,
        )
    except (ValueError, TypeError) as exc:
        raise ProxyError(400, str(exc), code="invalid_header") from None


def _read_timeout(text: str) -> float | None:
    """The SDK's read timeout in seconds (None: unreadable or no bound; it is only a hint)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _too_large(length: int | None, max_bytes: int) -> ProxyError:
    size = "" if length is None else f" ({length} bytes)"
    return ProxyError(
        413, f"The request body is too large{size}: at most {max_bytes} bytes are accepted.",
        code="request_too_large",
    )


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"
