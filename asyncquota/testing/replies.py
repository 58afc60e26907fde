"""What the simulated upstream says, in each provider's words: bodies, SSE streams, headers.

Two dialects, chosen by the endpoint: OpenAI chat completions and Anthropic messages. Each
parses a request body into the few numbers the model needs, and renders replies and errors
in its provider's shape. Bodies that never change are encoded once, up front.

Prompt tokens are estimated as the characters of the messages' text divided by 4 (rounded
up, at least 1), the usual rule of thumb for English. Completion text is ``"tok "`` per
token, so the same rule reads it back exactly.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..signals import format_duration
from .config import HeadersStyle, ResetResolution, RetryAfterStyle

__all__ = [
    "CHAT_PATH",
    "DEFAULT_MAX_TOKENS",
    "JSON_TYPE",
    "MESSAGES_PATH",
    "SSE_TYPE",
    "AnthropicDialect",
    "Dialect",
    "OpenAIDialect",
    "Parsed",
    "date_header",
    "estimate_tokens",
    "http_date",
    "rate_limit_headers",
    "retry_after_headers",
    "rfc3339",
]

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
DEFAULT_MAX_TOKENS = 256
"""Completion budget of an OpenAI request that names none (Anthropic requires one)."""

_FILLER = "tok "
_STREAM_CHUNK_TOKENS = 16
JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Parsed:
    """The parts of a request body the model acts on."""

    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    model: str


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text: chars / 4, rounded up, at least 1."""
    return max(1, (chars + 3) // 4)


def _text_chars(content: Any) -> int:
    """Characters of text in a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _max_tokens(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"max_tokens must be a positive integer, not {value!r}."
    return value


class Dialect(Protocol):
    """A provider's way of speaking: how it reads a request and words every reply."""

    not_found_body: bytes
    throttled_requests_body: bytes
    throttled_tokens_body: bytes
    concurrency_body: bytes
    insufficient_quota_status: int
    insufficient_quota_body: bytes
    server_error_bodies: dict[int, bytes]

    def parse(self, payload: Any) -> Parsed | str:
        """The request's numbers, or the message of a 400."""
        ...

    def bad_request(self, message: str) -> bytes:
        """A 400 body saying ``message``."""
        ...

    def reply(self, parsed: Parsed, number: int, completion: int, created: int) -> bytes:
        """The whole JSON reply of ``completion`` tokens."""
        ...

    def stream(self, parsed: Parsed, number: int, completion: int, created: int) -> bytes:
        """The same reply as the provider's SSE stream."""
        ...


class OpenAIDialect:
    """OpenAI chat completions: ``{"error": {...}}`` bodies, ``data:`` chunks, ``[DONE]``."""

    __slots__ = (
        "concurrency_body",
        "insufficient_quota_body",
        "insufficient_quota_status",
        "server_error_bodies",
        "throttled_requests_body",
        "throttled_tokens_body",
    )

    def __init__(self, *, max_concurrency: int | None) -> None:
        self.throttled_requests_body = self._error(
            "Rate limit reached for requests on the simulated upstream. "
            "Please try again after the Retry-After delay.",
            "requests",
            "rate_limit_exceeded",
        )
        self.throttled_tokens_body = self._error(
            "Rate limit reached for tokens per minute on the simulated upstream.",
            "tokens",
            "rate_limit_exceeded",
        )
        self.concurrency_body = self._error(
            f"Too many concurrent requests: the concurrency limit of {max_concurrency} "
            "requests in flight is reached.",
            "requests",
            "rate_limit_exceeded",
        )
        self.insufficient_quota_status = 429
        self.insufficient_quota_body = self._error(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        )
        self.server_error_bodies = {
            500: self._error(
                "The server had an error while processing your request.", "server_error", None
            ),
            503: self._error(
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
            ),
            529: self._error("The service is overloaded.", "server_error", None),
        }

    not_found_body = orjson.dumps(
        {"error": {"message": "Unknown path.", "type": "invalid_request_error",
                   "param": None, "code": "unknown_url"}}
    )

    @staticmethod
    def _error(message: str, kind: str, code: str | None) -> bytes:
        return orjson.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )

    def bad_request(self, message: str) -> bytes:
        return self._error(message, "invalid_request_error", None)

    def parse(self, payload: Any) -> Parsed | str:
        if not isinstance(payload, dict):
            return "The body must be a JSON object."
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list."
        chars = sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
        limit = payload.get("max_completion_tokens", payload.get("max_tokens", DEFAULT_MAX_TOKENS))
        max_tokens = _max_tokens(limit)
        if isinstance(max_tokens, str):
            return max_tokens
        options = payload.get("stream_options")
        return Parsed(
            prompt_tokens=estimate_tokens(chars),
            max_tokens=max_tokens,
            stream=payload.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            model=str(payload.get("model", "simulated")),
        )

    def reply(self, parsed: Parsed, number: int, completion: int, created: int) -> bytes:
        """A chat completion of ``completion`` tokens."""
        prompt = parsed.prompt_tokens
        return orjson.dumps(
            {
                "id": f"chatcmpl-sim{number}",
                "object": "chat.completion",
                "created": created,
                "model": parsed.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _FILLER * completion},
                        "finish_reason": "length" if completion >= parsed.max_tokens else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )

    def stream(self, parsed: Parsed, number: int, completion: int, created: int) -> bytes:
        """The same completion as ``chat.completion.chunk`` events, ending in ``[DONE]``."""
        head = {
            "id": f"chatcmpl-sim{number}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": parsed.model,
        }

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

        full, rest = divmod(completion, _STREAM_CHUNK_TOKENS)
        parts = [chunk({"role": "assistant", "content": ""}, None)]
        if full:
            parts.append(chunk({"content": _FILLER * _STREAM_CHUNK_TOKENS}, None) * full)
        if rest:
            parts.append(chunk({"content": _FILLER * rest}, None))
        parts.append(chunk({}, "length" if completion >= parsed.max_tokens else "stop"))
        if parsed.include_usage:
            usage = {
                "prompt_tokens": parsed.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": parsed.prompt_tokens + completion,
            }
            parts.append(
                b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
            )
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicDialect:
    """Anthropic messages: ``{"type": "error", ...}`` bodies and named SSE events."""

    __slots__ = (
        "concurrency_body",
        "insufficient_quota_body",
        "insufficient_quota_status",
        "overloaded_event",
        "server_error_bodies",
        "throttled_requests_body",
        "throttled_tokens_body",
    )

    def __init__(self, *, max_concurrency: int | None) -> None:
        self.throttled_requests_body = self._error(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization's requests "
            "per minute on the simulated upstream.",
        )
        self.throttled_tokens_body = self._error(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization's tokens "
            "per minute on the simulated upstream.",
        )
        self.concurrency_body = self._error(
            "rate_limit_error",
            f"Too many concurrent requests: the concurrency limit of {max_concurrency} "
            "requests in flight is reached.",
        )
        # Anthropic reports an empty balance as a bad request, not as a rate limit.
        self.insufficient_quota_status = 400
        self.insufficient_quota_body = self._error(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. "
            "Please go to Plans & Billing to upgrade or purchase credits.",
        )
        overloaded = {"type": "error", "error": {"type": "overloaded_error",
                                                 "message": "Overloaded"}}
        self.server_error_bodies = {
            500: self._error("api_error", "Internal server error"),
            503: orjson.dumps(overloaded),
            529: orjson.dumps(overloaded),
        }
        self.overloaded_event = _event("error", overloaded)

    not_found_body = orjson.dumps(
        {"type": "error", "error": {"type": "not_found_error", "message": "Unknown path."}}
    )

    @staticmethod
    def _error(kind: str, message: str) -> bytes:
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})

    def bad_request(self, message: str) -> bytes:
        return self._error("invalid_request_error", message)

    def parse(self, payload: Any) -> Parsed | str:
        if not isinstance(payload, dict):
            return "The body must be a JSON object."
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: must be a non-empty list."
        if "max_tokens" not in payload:
            return "max_tokens: Field required."
        max_tokens = _max_tokens(payload["max_tokens"])
        if isinstance(max_tokens, str):
            return max_tokens
        chars = _text_chars(payload.get("system")) + sum(
            _text_chars(m.get("content")) for m in messages if isinstance(m, dict)
        )
        return Parsed(
            prompt_tokens=estimate_tokens(chars),
            max_tokens=max_tokens,
            stream=payload.get("stream") is True,
            include_usage=False,
            model=str(payload.get("model", "simulated")),
        )

    def _message(
        self, parsed: Parsed, number: int, content: list[Any], stop: str | None, output: int
    ) -> dict[str, Any]:
        return {
            "id": f"msg_sim{number}",
            "type": "message",
            "role": "assistant",
            "model": parsed.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": parsed.prompt_tokens, "output_tokens": output},
        }

    @staticmethod
    def _stop(parsed: Parsed, completion: int) -> str:
        return "max_tokens" if completion >= parsed.max_tokens else "end_turn"

    def reply(self, parsed: Parsed, number: int, completion: int, created: int) -> bytes:
        """A message of ``completion`` tokens (``created`` is unused: Anthropic sends none)."""
        content = [{"type": "text", "text": _FILLER * completion}]
        return orjson.dumps(
            self._message(parsed, number, content, self._stop(parsed, completion), completion)
        )

    def stream(
        self, parsed: Parsed, number: int, completion: int, created: int,
        *, overloaded: bool = False,
    ) -> bytes:
        """The message as Anthropic's SSE events; ``overloaded`` breaks off with an error event."""
        start = _event(
            "message_start",
            {"type": "message_start", "message": self._message(parsed, number, [], None, 1)},
        )
        if overloaded:
            return start + self.overloaded_event
        full, rest = divmod(completion, _STREAM_CHUNK_TOKENS)

        def delta(tokens: int) -> bytes:
            return _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": _FILLER * tokens}},
            )

        parts = [
            start,
            _event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
            _event("ping", {"type": "ping"}),
        ]
        if full:
            parts.append(delta(_STREAM_CHUNK_TOKENS) * full)
        if rest:
            parts.append(delta(rest))
        parts += [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": self._stop(parsed, completion), "stop_sequence": None},
                "usage": {"output_tokens": completion},
            }),
            _event("message_stop", {"type": "message_stop"}),
        ]
        return b"".join(parts)


def _whole_seconds(seconds: float) -> str:
    """A Go duration rounded up to the second: ``0s``, ``1s``, ``6m0s``."""
    return format_duration(math.ceil(seconds - 1e-6))


def date_header(epoch: float) -> str:
    """A ``Date`` header's IMF-fixdate: the instant truncated to the second, as servers send it."""
    return email.utils.formatdate(math.floor(epoch), usegmt=True)


def http_date(epoch: float) -> str:
    """An IMF-fixdate no earlier than ``epoch`` (rounded up to the second, so never early)."""
    return email.utils.formatdate(math.ceil(epoch - 1e-6), usegmt=True)


def rfc3339(epoch: float) -> str:
    """An RFC 3339 UTC timestamp no earlier than ``epoch``, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(epoch - 1e-6)))


def retry_after_headers(
    style: RetryAfterStyle, wait: float, wall_clock: Callable[[], float]
) -> dict[str, str]:
    """The header that tells a throttled client to wait ``wait`` seconds, rounded up.

    Whole seconds are ``max(1, ceil(wait))``, as providers send them: a 429 never says 0.
    """
    if style == "none" or math.isinf(wait):
        return {}
    if style == "seconds":
        return {"retry-after": str(max(1, math.ceil(wait - 1e-6)))}
    if style == "ms":
        return {"retry-after-ms": str(math.ceil(wait * 1000 - 1e-6))}
    return {"retry-after": http_date(wall_clock() + wait)}


def rate_limit_headers(
    style: HeadersStyle,
    *,
    requests: tuple[float, float, float],
    tokens: tuple[float, float, float] | None,
    wall_clock: Callable[[], float],
    reset_resolution: ResetResolution = "ms",
) -> dict[str, str]:
    """Rate-limit headers for the buckets' ``(limit, level, seconds to full)``.

    The limit is whatever figure the provider states (the bucket's size, or its rate per
    minute). OpenAI style resets are Go durations until the bucket is full, to the
    millisecond or (``reset_resolution="s"``) rounded up to the second; Anthropic style
    resets are RFC 3339 instants and remaining tokens are rounded to the nearest thousand,
    as the providers do.
    """
    if style == "none":
        return {}
    capacity, level, to_full = requests
    remaining = str(max(0, math.floor(level + 1e-9)))
    if style == "openai":
        reset = format_duration if reset_resolution == "ms" else _whole_seconds
        headers = {
            "x-ratelimit-limit-requests": str(math.floor(capacity + 1e-9)),
            "x-ratelimit-remaining-requests": remaining,
            "x-ratelimit-reset-requests": reset(to_full),
        }
        if tokens is not None:
            t_capacity, t_level, t_to_full = tokens
            headers["x-ratelimit-limit-tokens"] = str(math.floor(t_capacity + 1e-9))
            headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(t_level + 1e-9)))
            headers["x-ratelimit-reset-tokens"] = reset(t_to_full)
        return headers
    wall = wall_clock()
    headers = {
        "anthropic-ratelimit-requests-limit": str(math.floor(capacity + 1e-9)),
        "anthropic-ratelimit-requests-remaining": remaining,
        "anthropic-ratelimit-requests-reset": rfc3339(wall + to_full),
    }
    if tokens is not None:
        t_capacity, t_level, t_to_full = tokens
        headers["anthropic-ratelimit-tokens-limit"] = str(math.floor(t_capacity + 1e-9))
        headers["anthropic-ratelimit-tokens-remaining"] = str(
            max(0, round(t_level / 1000.0) * 1000)
        )
        headers["anthropic-ratelimit-tokens-reset"] = rfc3339(wall + t_to_full)
    return headers

