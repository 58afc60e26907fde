"""The token cost of a request: estimated before it is sent, read from the reply after.

The estimate is deliberately simple and a little pessimistic, because it is a
reservation against a tokens-per-minute quota, reconciled with the real figure as soon
as the reply arrives:

    estimate = ceil(len(encoded JSON body) / CHARS_PER_TOKEN) + output allowance

where the output allowance is the request's ``max_tokens`` (or ``max_completion_tokens``,
or ``max_output_tokens``), else ``default_output_tokens``. Counting the whole encoded
body (keys, quotes and all) rather than only the message text overestimates the prompt
by a few per cent; ~4 characters per token is the usual figure for English with
OpenAI's and Anthropic's tokenizers. Providers count ``max_tokens`` against the quota at
admission, so reserving it is what keeps concurrent requests from overshooting together.
A caller that knows better passes ``cost_tokens`` to ``Shaper.request``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = [
    "CHARS_PER_TOKEN",
    "estimate_tokens",
    "output_allowance",
    "prompt_tokens",
    "reply_usage",
    "usage_from_mapping",
    "usage_split",
    "usage_tokens",
]

CHARS_PER_TOKEN = 4.0

_OUTPUT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_USAGE_PAIRS = (
    ("prompt_tokens", "completion_tokens"),  # OpenAI chat completions
    ("input_tokens", "output_tokens"),  # Anthropic messages, OpenAI responses
)
_ANTHROPIC_CACHE_KEYS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def estimate_tokens(body_size: int, payload: Any, *, default_output_tokens: int) -> int:
    """Tokens to reserve for a request: its encoded body's prompt share plus its output cap.

    Args:
        body_size: the encoded request body's length in bytes (the prompt estimate).
        payload: the decoded JSON the body came from, to find ``max_tokens``; may be None.
        default_output_tokens: the output allowance when the request names no cap.
    """
    return prompt_tokens(body_size) + output_allowance(
        payload, default_output_tokens=default_output_tokens
    )


def prompt_tokens(body_size: int) -> int:
    """The prompt's share of the estimate: the encoded body at ``CHARS_PER_TOKEN``."""
    return math.ceil(body_size / CHARS_PER_TOKEN)


def output_allowance(payload: Any, *, default_output_tokens: int) -> int:
    """The output tokens a request may use: its ``max_tokens`` (or a synonym), else the default."""
    if isinstance(payload, Mapping):
        for key in _OUTPUT_KEYS:
            value = payload.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return default_output_tokens


def usage_tokens(body: bytes) -> int | None:
    """Total tokens a reply says it used (OpenAI or Anthropic ``usage``), or None.

    Cheap on replies without usage (a substring test before any decoding); never raises.
    """
    split = reply_usage(body)
    return None if split is None else split[0] + split[1]


def reply_usage(body: bytes) -> tuple[int, int] | None:
    """``(input, output)`` tokens a reply body's ``usage`` names, or None (see ``usage_split``).

    Cheap on replies without usage (a substring test before any decoding); never raises.
    """
    if b'"usage"' not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = document.get("usage") if isinstance(document, dict) else None
    return usage_split(usage) if isinstance(usage, Mapping) else None


def usage_from_mapping(usage: Mapping[str, Any]) -> int | None:
    """Total tokens in one ``usage`` object (also a streamed chunk's), or None."""
    split = usage_split(usage)
    return None if split is None else split[0] + split[1]


def usage_split(usage: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(input, output)`` tokens of one ``usage`` object, or None if it names neither.

    Anthropic's cache writes and reads count as input.
    """
    for input_key, output_key in _USAGE_PAIRS:
        if input_key in usage or output_key in usage:
            read = _count(usage.get(input_key))
            if input_key == "input_tokens":  # Anthropic's cache reads and writes, if any
                for key in _ANTHROPIC_CACHE_KEYS:
                    read += _count(usage.get(key))
            return read, _count(usage.get(output_key))
    return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
