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

__all__ = ["CHARS_PER_TOKEN", "estimate_tokens", "usage_from_mapping", "usage_tokens"]

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
    prompt = math.ceil(body_size / CHARS_PER_TOKEN)
    output = default_output_tokens
    if isinstance(payload, Mapping):
        for key in _OUTPUT_KEYS:
            value = payload.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                output = value
                break
    return prompt + output


def usage_tokens(body: bytes) -> int | None:
    """Total tokens a reply says it used (OpenAI or Anthropic ``usage``), or None.

    Cheap on replies without usage (a substring test before any decoding); never raises.
    """
    if b'"usage"' not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = document.get("usage") if isinstance(document, dict) else None
    return usage_from_mapping(usage) if isinstance(usage, Mapping) else None


def usage_from_mapping(usage: Mapping[str, Any]) -> int | None:
    """Total tokens in one ``usage`` object (also a streamed chunk's), or None."""
    for input_key, output_key in _USAGE_PAIRS:
        if input_key in usage or output_key in usage:
            total = 0
            for key in (input_key, output_key, *_ANTHROPIC_CACHE_KEYS):
                value = usage.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    total += value
            return total
    return None
