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

The reply's ``usage`` is read as a hostile upstream might write it: a figure that is not
a whole number ≥ 0 (a string, ``5e7`` as a float with a fraction, ``-3``, ``true``), or a
reply whose total passes :data:`MAX_USAGE_TOKENS`, is no reading at all (None), so the
reservation's estimate stands. The Shaper bounds a reading further by the request's own
estimate; this module only keeps numbers no reply could mean out of the gates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_USAGE_TOKENS",
    "StreamUsage",
    "estimate_tokens",
    "event_usage",
    "output_allowance",
    "prompt_tokens",
    "reply_usage",
    "usage_from_mapping",
    "usage_split",
    "usage_tokens",
]

CHARS_PER_TOKEN = 4.0

MAX_USAGE_TOKENS = 10_000_000
"""The most tokens one reply's ``usage`` is believed to count: ten million, five times the
largest context window sold (2 M) plus its output. A reply claiming more (``2**63``,
``5e7``) is garbage: its usage reads as None."""

_OUTPUT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_USAGE_PAIRS = (
    ("prompt_tokens", "completion_tokens"),  # OpenAI chat completions
    ("input_tokens", "output_tokens"),  # Anthropic messages, OpenAI responses
)
_BINARY = (bytes, bytearray, memoryview)
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
    if type(payload) is dict or isinstance(payload, Mapping):  # a dict: the fast test
        for key in _OUTPUT_KEYS:
            value = payload.get(key)
            if (
                type(value) is int or (isinstance(value, int) and not isinstance(value, bool))
            ) and value >= 0:
                return value
    return default_output_tokens


def usage_tokens(body: bytes) -> int | None:
    """Total tokens a reply says it used (OpenAI or Anthropic ``usage``), or None.

    None also for a usage that is garbage (see :func:`usage_split`). Cheap on replies
    without usage (a substring test before any decoding); never raises.
    """
    split = reply_usage(body)
    return None if split is None else split[0] + split[1]


def reply_usage(body: bytes) -> tuple[int, int] | None:
    """``(input, output)`` tokens a reply body's ``usage`` names, or None (see ``usage_split``).

    The body may be bytes or str; anything else, or a body that is not JSON, gives None.
    Cheap on replies without usage (a substring test before any decoding); never raises.
    """
    if type(body) is bytes:  # the usual body: the fast test
        # From the end, where replies put their usage (bytes' ``in`` is slower still).
        if body.rfind(b'"usage"') < 0:
            return None
    elif isinstance(body, str):
        if '"usage"' not in body:
            return None
    elif not isinstance(body, _BINARY) or b'"usage"' not in body:
        return None
    try:
        document = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return None
    usage = document.get("usage") if type(document) is dict else None
    return usage_split(usage) if type(usage) is dict else None


def usage_from_mapping(usage: Mapping[str, Any]) -> int | None:
    """Total tokens in one ``usage`` object (also a streamed chunk's), or None."""
    split = usage_split(usage)
    return None if split is None else split[0] + split[1]


def usage_split(usage: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(input, output)`` tokens of one ``usage`` object, or None if it names neither.

    Anthropic's cache writes and reads count as input. A field that is absent or null
    counts 0; one that is not a whole number ≥ 0 (an integral float such as ``12.0`` is
    one), or a total above :data:`MAX_USAGE_TOKENS`, makes the whole usage None: a
    partial reading would undercount. Never raises.
    """
    if type(usage) is not dict and not isinstance(usage, Mapping):  # a dict: the fast test
        return None
    for input_key, output_key in _USAGE_PAIRS:
        if input_key in usage or output_key in usage:
            read = _count(usage.get(input_key))
            written = _count(usage.get(output_key))
            if read is None or written is None:
                return None
            if input_key == "input_tokens":  # Anthropic's cache reads and writes, if any
                for key in _ANTHROPIC_CACHE_KEYS:
                    count = _count(usage.get(key))
                    if count is None:
                        return None
                    read += count
            if read + written > MAX_USAGE_TOKENS:
                return None
            return read, written
    return None


def _count(value: Any) -> int | None:
    """A whole number of tokens ≥ 0 (absent: 0), or None for garbage."""
    if type(value) is int:  # the usual reading: the fast test (a bool is not one)
        return value if 0 <= value <= MAX_USAGE_TOKENS else None
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_USAGE_TOKENS else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_USAGE_TOKENS:
        return int(value)
    return None


def event_usage(data: str) -> Mapping[str, Any] | None:
    """The ``usage`` object a streamed event's data names, or None (never raises).

    OpenAI's last chunk (``"usage"``, with ``stream_options.include_usage``), Anthropic's
    ``message_start`` (``"message": {"usage": ...}``) and ``message_delta``
    (``"usage"``, cumulative). Cheap on events without usage (a substring test first).
    """
    if '"usage"' not in data:
        return None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(document) is not dict:
        return None
    usage, message = document.get("usage"), document.get("message")
    if type(message) is dict and type(message.get("usage")) is dict:
        usage = message["usage"]  # Anthropic's message_start
    return usage if type(usage) is dict else None


class StreamUsage:
    """The usage a stream has reported so far: the largest input and output counts seen.

    Feed it each event's data; counts only grow (Anthropic states its input at the start
    and its output, cumulatively, in later events).
    """

    __slots__ = ("input", "output")

    def __init__(self) -> None:
        self.input = 0
        self.output = 0

    def feed(self, data: str) -> None:
        """Read the usage ``data`` names, if any (see :func:`event_usage`)."""
        usage = event_usage(data)
        split = None if usage is None else usage_split(usage)
        if split is not None:
            self.input = max(self.input, split[0])
            self.output = max(self.output, split[1])

    @property
    def total(self) -> int:
        """Input and output together (0: nothing reported)."""
        return self.input + self.output
