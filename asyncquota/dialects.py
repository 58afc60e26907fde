"""One request format across providers: OpenAI chat completions ⇄ Anthropic messages.

A Gateway that falls back from one provider to another must send each model its own
dialect and give the caller back the shape the caller sent. This module is that
translation, both ways, for everything that crosses the wire:

- requests: :func:`openai_request_to_anthropic`, :func:`anthropic_request_to_openai`;
- replies: :func:`anthropic_reply_to_openai`, :func:`openai_reply_to_anthropic`, and error
  bodies: :func:`anthropic_error_to_openai`, :func:`openai_error_to_anthropic`;
- streams: :class:`AnthropicStreamToOpenAI`, :class:`OpenAIStreamToAnthropic`, fed the
  upstream's SSE bytes as they arrive (split anywhere) or its parsed events, and giving
  back the caller's; :class:`PassThroughStream` for a caller of the model's own dialect
  (the events as they came, the usage counted); :func:`has_content` tells the events a
  gateway may hold back before the first content (and still fall back).

:func:`dialect_of_path` tells which shape an endpoint speaks; the dialects are named as
:data:`~asyncquota.signals.Provider` names them, :data:`OPENAI` and :data:`ANTHROPIC`.

A translation is faithful or it is refused. Whatever one side says that the other cannot
(several choices, log probabilities, penalties, audio, files, a JSON schema, a system
message in mid-conversation, a tool result marked as an error, a temperature above
Anthropic's 1, an unknown field, role or content type) raises :class:`DialectError`
naming the field, before anything is sent. A field the other side lacks passes only when
it is null or says the default (``n: 1``, ``logprobs: false``, ``presence_penalty: 0``,
``response_format: {"type": "text"}``, ``thinking: {"type": "disabled"}``, ...), since
then leaving it out changes nothing. Dropped on purpose, as hints that change nothing
the caller can check:

- OpenAI's ``seed``: best effort, with no promise of determinism even at OpenAI;
- Anthropic's ``cache_control``: a prompt-caching hint (OpenAI caches on its own);
- a reply's ``reasoning_content`` (DeepSeek): the reasoning, not the answer, and never
  asked for by a translated request.

Some things are said less precisely on one side, and are carried as well as they can be:

- OpenAI's ``stop`` finish reason becomes ``end_turn``: OpenAI does not say whether a
  stop sequence matched, so ``stop_sequence`` is null;
- Anthropic's cache writes count in OpenAI's ``prompt_tokens`` (its reads are also
  ``prompt_tokens_details.cached_tokens``), so totals agree both ways;
- a streamed OpenAI reply tells the prompt's size only at its end: the translated
  ``message_start`` says 0 input tokens, the ``message_delta`` the real figures; a stream
  that never sent usage ends with ``output_tokens: 0`` and ``usage`` None;
- several system messages (or text parts) become one system prompt of text blocks, and
  consecutive same-role messages one turn (Anthropic requires roles to alternate).

Ids and model names pass unchanged (the Gateway renames the model if it wants). Bodies are
JSON as orjson reads them; the inputs are never modified. Everything here is pure and
synchronous: no I/O and no clock (``created``, the reply's Unix time, is an argument).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import orjson

from .signals import Provider
from .tokens import event_usage, usage_split
from .transport import SSEEvent, SSEParser

__all__ = [
    "ANTHROPIC",
    "CHAT_PATH",
    "DEFAULT_MAX_TOKENS",
    "MESSAGES_PATH",
    "OPENAI",
    "AnthropicStreamToOpenAI",
    "DialectError",
    "OpenAIStreamToAnthropic",
    "PassThroughStream",
    "StreamTranslator",
    "anthropic_error_to_openai",
    "anthropic_reply_to_openai",
    "anthropic_request_to_openai",
    "dialect_of_path",
    "has_content",
    "openai_error_to_anthropic",
    "openai_reply_to_anthropic",
    "openai_request_to_anthropic",
]

OPENAI: Final[Provider] = "openai"
"""OpenAI chat completions, and every server that speaks them."""

ANTHROPIC: Final[Provider] = "anthropic"
"""Anthropic messages."""

CHAT_PATH: Final = "/v1/chat/completions"
MESSAGES_PATH: Final = "/v1/messages"

DEFAULT_MAX_TOKENS: Final = 4096
"""The ``max_tokens`` an OpenAI request without one is sent to Anthropic with, which
requires it: the largest output every Claude model accepts (Claude 3 Haiku's ceiling)."""

_JSON = dict[str, Any]
_Neutral = Mapping[str, tuple[object, ...]]

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"data:([^;,]+);base64,(.*)", re.DOTALL)

# Request fields each side understands (the rest must be null or in the neutral table).
_OPENAI_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "temperature",
        "top_p",
        "stream",
        "stream_options",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "seed",  # dropped: see the module's docstring
    }
)
_OPENAI_NEUTRAL: _Neutral = {
    "n": (1,),
    "logprobs": (False,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "store": (False,),
    "metadata": ({},),
}
_ANTHROPIC_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
    }
)
_ANTHROPIC_NEUTRAL: _Neutral = {"thinking": ({"type": "disabled"},)}
# What an OpenAI message may carry unused: the fields of a reply's message sent back as is.
_OPENAI_MESSAGE_NEUTRAL: _Neutral = {"annotations": ([],)}

_ANTHROPIC_STOP_TO_OPENAI: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_OPENAI_FINISH_TO_ANTHROPIC: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
# Error names: OpenAI's codes and types in Anthropic's words; Anthropic's own pass as they
# are. The other way the type crosses unchanged (signals.py reads Anthropic's names on
# either side) and these give OpenAI's code.
_OPENAI_ERROR_TO_ANTHROPIC: Final = {
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "billing_error",
    "invalid_api_key": "authentication_error",
    "invalid_request_error": "invalid_request_error",
    "server_error": "api_error",
}
_ANTHROPIC_ERROR_CODES: Final = {
    "rate_limit_error": "rate_limit_exceeded",
    "billing_error": "insufficient_quota",
    "authentication_error": "invalid_api_key",
}
_ANTHROPIC_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "timeout_error",
        "overloaded_error",
    }
)


class DialectError(ValueError):
    """A body that cannot be said faithfully in the other dialect; nothing was sent.

    Attributes:
        field: where, as a path into the body (``"n"``, ``"messages[2].content[0].type"``;
            ``"stream"`` for a stream that cannot be read).
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


def dialect_of_path(path: str) -> Provider | None:
    """The dialect an endpoint speaks, from its path: OpenAI's or Anthropic's, else None.

    ``.../chat/completions`` is OpenAI's (OpenAI-compatible servers mount it under other
    prefixes); ``.../v1/messages`` is Anthropic's. A query string and a trailing slash are
    ignored; any other endpoint (embeddings, ``/v1/messages/count_tokens``) is None.
    """
    path = path.partition("?")[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return OPENAI
    if path.endswith(MESSAGES_PATH):
        return ANTHROPIC
    return None


# ---------------------------------------------------------------------------------------------
# Reading a body: every shape checked, every refusal naming its field
# ---------------------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as JSON, cut to a readable length, for an error message."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DialectError(field, f"expected an object, not {_show(value)}.")
    return value


def _list(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise DialectError(field, f"expected a list, not {_show(value)}.")
    return value


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise DialectError(field, f"expected a string, not {_show(value)}.")
    return value


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DialectError(field, f"expected a number, not {_show(value)}.")
    return value


def _check_fields(
    body: Mapping[str, Any], known: Iterable[str], neutral: _Neutral, where: str, target: str
) -> None:
    """Refuse any field of ``body`` outside ``known`` unless null or its neutral value."""
    for key, value in body.items():
        if key in known or value is None or value in neutral.get(key, ()):
            continue
        raise DialectError(
            where + key,
            f"{target} has no equivalent of {_show(value)} here, so the body cannot be translated.",
        )


def _arguments(text: object, field: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the object Anthropic's ``input`` is."""
    text = _string(text, field)
    if not text.strip():
        return {}  # some models write no arguments at all for a function without any
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise DialectError(field, f"the arguments {_show(text)} are not valid JSON.") from None
    if not isinstance(value, dict):
        raise DialectError(field, f"the arguments {_show(value)} are not a JSON object.")
    return value


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


# ---------------------------------------------------------------------------------------------
# Requests: OpenAI chat → Anthropic messages
# ---------------------------------------------------------------------------------------------


def openai_request_to_anthropic(
    body: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """An OpenAI chat-completions request body as an Anthropic messages request body.

    Leading ``system`` and ``developer`` messages become ``system``; ``tool`` messages
    become ``tool_result`` blocks in a user turn; consecutive same-role messages are
    merged; images by data: URL or http(s) URL become image blocks; assistant
    ``tool_calls`` become ``tool_use`` blocks with their arguments parsed. ``user`` is
    ``metadata.user_id``, ``stop`` is ``stop_sequences``, ``required`` tool choice is
    ``any`` and ``parallel_tool_calls: false`` is ``disable_parallel_tool_use``.

    Args:
        body: the decoded request body.
        default_max_tokens: the ``max_tokens`` sent when the request names none
            (Anthropic requires one).

    Raises:
        DialectError: the request says something Anthropic cannot be told (see the
            module's docstring), or is malformed where the translation reads it.
        ValueError: ``default_max_tokens`` is not a positive integer.
    """
    if isinstance(default_max_tokens, bool) or not (
        isinstance(default_max_tokens, int) and default_max_tokens > 0
    ):
        raise ValueError(
            f"default_max_tokens must be a positive integer, not {default_max_tokens!r}."
        )
    body = _mapping(body, "body")
    _check_fields(body, _OPENAI_FIELDS, _OPENAI_NEUTRAL, "", "Anthropic")
    system, messages = _openai_messages_to_anthropic(body.get("messages"))
    out: _JSON = {}
    if "model" in body:
        out["model"] = body["model"]
    if system is not None:
        out["system"] = system
    out["messages"] = messages
    out["max_tokens"] = _openai_max_tokens(body, default_max_tokens)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else _list(stop, "stop")
        out["stop_sequences"] = [_string(s, f"stop[{i}]") for i, s in enumerate(stops)]
    temperature = body.get("temperature")
    if temperature is not None:
        if not 0 <= _number(temperature, "temperature") <= 1:
            raise DialectError(
                "temperature", f"Anthropic accepts 0 to 1, not {_show(temperature)}."
            )
        out["temperature"] = temperature
    for key in ("top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    options = body.get("stream_options")
    if options is not None:
        # include_usage only shapes the stream the caller gets back: the stream
        # translator is told it, Anthropic always reports usage.
        _check_fields(
            _mapping(options, "stream_options"),
            ("include_usage",),
            {},
            "stream_options.",
            "Anthropic",
        )
    if body.get("user") is not None:
        out["metadata"] = {"user_id": _string(body["user"], "user")}
    tools = body.get("tools")
    if tools is not None:
        out["tools"] = [
            _openai_tool_to_anthropic(tool, f"tools[{i}]")
            for i, tool in enumerate(_list(tools, "tools"))
        ]
    choice = _openai_tool_choice_to_anthropic(
        body.get("tool_choice"), body.get("parallel_tool_calls")
    )
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _openai_max_tokens(body: Mapping[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens")
    legacy = body.get("max_tokens")
    if value is not None and legacy is not None and value != legacy:
        raise DialectError(
            "max_tokens",
            f"{_show(legacy)} differs from max_completion_tokens {_show(value)}; "
            "Anthropic takes one limit.",
        )
    if value is None:
        value = legacy
    if value is None:
        return default
    field = "max_tokens" if legacy is not None else "max_completion_tokens"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DialectError(field, f"expected a positive integer, not {_show(value)}.")
    return value


def _openai_messages_to_anthropic(
    messages: object,
) -> tuple[str | list[_JSON] | None, list[_JSON]]:
    """``(system, messages)`` of Anthropic's request from OpenAI's message list."""
    system: list[_JSON] = []
    system_text: str | None = None  # the whole system prompt, when it is one plain string
    turns: list[_JSON] = []
    for i, raw in enumerate(_list(messages, "messages")):
        where = f"messages[{i}]"
        message = _mapping(raw, where)
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise DialectError(
                    f"{where}.role",
                    "Anthropic takes a system prompt only before the conversation, not a "
                    f"{role} message after it began.",
                )
            _check_fields(message, ("role", "content"), {}, f"{where}.", "Anthropic")
            content = message.get("content")
            system_text = content if not system and isinstance(content, str) else None
            system.extend(_openai_text_blocks(content, f"{where}.content"))
        elif role == "user":
            _check_fields(message, ("role", "content"), {}, f"{where}.", "Anthropic")
            _add_turn(turns, "user", _openai_user_content(message.get("content"), where))
        elif role == "assistant":
            _check_fields(
                message,
                ("role", "content", "tool_calls"),
                _OPENAI_MESSAGE_NEUTRAL,
                f"{where}.",
                "Anthropic",
            )
            _add_turn(turns, "assistant", _openai_assistant_content(message, where))
        elif role == "tool":
            _check_fields(
                message, ("role", "content", "tool_call_id"), {}, f"{where}.", "Anthropic"
            )
            result: _JSON = {
                "type": "tool_result",
                "tool_use_id": _string(message.get("tool_call_id"), f"{where}.tool_call_id"),
                "content": _openai_tool_content(message.get("content"), f"{where}.content"),
            }
            _add_turn(turns, "user", [result])
        else:
            raise DialectError(f"{where}.role", f"Anthropic has no role {_show(role)}.")
    if system_text is not None:
        return system_text, turns
    return (system or None), turns


def _add_turn(turns: list[_JSON], role: str, content: str | list[_JSON]) -> None:
    """Append a turn, merged into the last one if it has the same role."""
    if not turns or turns[-1]["role"] != role:
        turns.append({"role": role, "content": content})
        return
    last = turns[-1]
    last["content"] = _as_blocks(last["content"]) + _as_blocks(content)


def _as_blocks(content: str | list[_JSON]) -> list[_JSON]:
    if isinstance(content, str):
        # Anthropic refuses an empty text block; an empty string says nothing anyway.
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def _openai_text_blocks(content: object, field: str) -> list[_JSON]:
    """Text content (a string or text parts) as Anthropic text blocks."""
    if isinstance(content, str):
        return _as_blocks(content)
    blocks = []
    for j, raw in enumerate(_list(content, field)):
        part = _mapping(raw, f"{field}[{j}]")
        if part.get("type") != "text":
            raise DialectError(
                f"{field}[{j}].type", f"only text is possible here, not {_show(part.get('type'))}."
            )
        blocks.append(_openai_text_part(part, f"{field}[{j}]"))
    return blocks


def _openai_text_part(part: Mapping[str, Any], field: str) -> _JSON:
    _check_fields(part, ("type", "text"), {}, f"{field}.", "Anthropic")
    return {"type": "text", "text": _string(part.get("text"), f"{field}.text")}


def _openai_user_content(content: object, where: str) -> str | list[_JSON]:
    field = f"{where}.content"
    if isinstance(content, str):
        return content
    blocks = []
    for j, raw in enumerate(_list(content, field)):
        part = _mapping(raw, f"{field}[{j}]")
        kind = part.get("type")
        if kind == "text":
            blocks.append(_openai_text_part(part, f"{field}[{j}]"))
        elif kind == "image_url":
            blocks.append(_openai_image(part, f"{field}[{j}]"))
        else:
            raise DialectError(
                f"{field}[{j}].type", f"Anthropic has no content part {_show(kind)}."
            )
    return blocks


def _openai_image(part: Mapping[str, Any], field: str) -> _JSON:
    _check_fields(part, ("type", "image_url"), {}, f"{field}.", "Anthropic")
    image = _mapping(part.get("image_url"), f"{field}.image_url")
    _check_fields(image, ("url",), {"detail": ("auto",)}, f"{field}.image_url.", "Anthropic")
    url = _string(image.get("url"), f"{field}.image_url.url")
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    data = _DATA_URL.fullmatch(url)
    if data is None:
        raise DialectError(
            f"{field}.image_url.url",
            f"Anthropic takes an image as an http(s) URL or a base64 data: URL, not {_show(url)}.",
        )
    media_type = data[1].lower()
    if media_type not in _IMAGE_TYPES:
        raise DialectError(
            f"{field}.image_url.url",
            f"Anthropic takes JPEG, PNG, GIF and WebP images, not {media_type}.",
        )
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": data[2]},
    }


def _openai_assistant_content(message: Mapping[str, Any], where: str) -> str | list[_JSON]:
    content = message.get("content")
    calls = message.get("tool_calls")
    if calls is None:
        if content is None:
            raise DialectError(f"{where}.content", "an assistant message needs content.")
        if isinstance(content, str):
            return content
        return _openai_text_blocks(content, f"{where}.content")
    blocks = [] if content is None else _openai_text_blocks(content, f"{where}.content")
    for k, raw in enumerate(_list(calls, f"{where}.tool_calls")):
        field = f"{where}.tool_calls[{k}]"
        call = _mapping(raw, field)
        _check_fields(call, ("id", "type", "function"), {}, f"{field}.", "Anthropic")
        if call.get("type") != "function":
            raise DialectError(
                f"{field}.type", f"Anthropic has no tool call {_show(call.get('type'))}."
            )
        function = _mapping(call.get("function"), f"{field}.function")
        _check_fields(function, ("name", "arguments"), {}, f"{field}.function.", "Anthropic")
        blocks.append(
            {
                "type": "tool_use",
                "id": _string(call.get("id"), f"{field}.id"),
                "name": _string(function.get("name"), f"{field}.function.name"),
                "input": _arguments(function.get("arguments"), f"{field}.function.arguments"),
            }
        )
    return blocks


def _openai_tool_content(content: object, field: str) -> str | list[_JSON]:
    return content if isinstance(content, str) else _openai_text_blocks(content, field)


def _openai_tool_to_anthropic(raw: object, field: str) -> _JSON:
    tool = _mapping(raw, field)
    if tool.get("type") != "function":
        raise DialectError(f"{field}.type", f"Anthropic has no tool {_show(tool.get('type'))}.")
    _check_fields(tool, ("type", "function"), {}, f"{field}.", "Anthropic")
    function = _mapping(tool.get("function"), f"{field}.function")
    _check_fields(
        function,
        ("name", "description", "parameters"),
        {"strict": (False,)},
        f"{field}.function.",
        "Anthropic",
    )
    out: _JSON = {"name": _string(function.get("name"), f"{field}.function.name")}
    if function.get("description") is not None:
        out["description"] = _string(function["description"], f"{field}.function.description")
    parameters = function.get("parameters")
    # Anthropic requires a schema; OpenAI's "no parameters" is the empty object's.
    out["input_schema"] = (
        {"type": "object", "properties": {}}
        if parameters is None
        else dict(_mapping(parameters, f"{field}.function.parameters"))
    )
    return out


def _openai_tool_choice_to_anthropic(choice: object, parallel: object) -> _JSON | None:
    out: _JSON | None
    if choice is None:
        out = None
    elif choice in ("auto", "none"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        function = _mapping(choice.get("function"), "tool_choice.function")
        out = {"type": "tool", "name": _string(function.get("name"), "tool_choice.function.name")}
    else:
        raise DialectError("tool_choice", f"Anthropic has no tool choice {_show(choice)}.")
    if parallel is None or parallel is True:
        return out
    if parallel is not False:
        raise DialectError("parallel_tool_calls", f"expected a boolean, not {_show(parallel)}.")
    if out is None:
        out = {"type": "auto"}
    if out["type"] != "none":  # with no tool at all, there is nothing parallel to forbid
        out["disable_parallel_tool_use"] = True
    return out


# ---------------------------------------------------------------------------------------------
# Requests: Anthropic messages → OpenAI chat
# ---------------------------------------------------------------------------------------------


def anthropic_request_to_openai(
    body: Mapping[str, Any],
    *,
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
) -> dict[str, Any]:
    """An Anthropic messages request body as an OpenAI chat-completions request body.

    ``system`` becomes one leading system message; ``tool_result`` blocks become ``tool``
    messages (before the rest of their user turn, as OpenAI requires them right after the
    assistant's call); ``tool_use`` blocks become ``tool_calls`` with JSON arguments;
    image blocks become ``image_url`` parts (base64 as a data: URL). A streamed request
    asks for ``stream_options.include_usage``, so its usage arrives in the stream.

    Args:
        body: the decoded request body.
        max_tokens_field: the name ``max_tokens`` is sent under. ``max_tokens`` is the one
            every OpenAI-compatible server reads; OpenAI's reasoning models accept only
            ``max_completion_tokens``.

    Raises:
        DialectError: the request says something OpenAI cannot be told (see the module's
            docstring), or is malformed where the translation reads it.
    """
    body = _mapping(body, "body")
    _check_fields(body, _ANTHROPIC_FIELDS, _ANTHROPIC_NEUTRAL, "", "OpenAI")
    messages: list[_JSON] = []
    system = body.get("system")
    if system is not None:
        content = system if isinstance(system, str) else _anthropic_text_parts(system, "system")
        messages.append({"role": "system", "content": content})
    for i, raw in enumerate(_list(body.get("messages"), "messages")):
        messages.extend(_anthropic_message_to_openai(raw, f"messages[{i}]"))
    out: _JSON = {}
    if "model" in body:
        out["model"] = body["model"]
    out["messages"] = messages
    if body.get("max_tokens") is not None:
        out[max_tokens_field] = body["max_tokens"]
    stops = body.get("stop_sequences")
    if stops is not None:
        out["stop"] = [
            _string(s, f"stop_sequences[{i}]") for i, s in enumerate(_list(stops, "stop_sequences"))
        ]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stream = body.get("stream")
    if stream is not None:
        out["stream"] = stream
        if stream is True:
            out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if metadata is not None:
        metadata = _mapping(metadata, "metadata")
        _check_fields(metadata, ("user_id",), {}, "metadata.", "OpenAI")
        if metadata.get("user_id") is not None:
            out["user"] = _string(metadata["user_id"], "metadata.user_id")
    tools = body.get("tools")
    if tools is not None:
        out["tools"] = [
            _anthropic_tool_to_openai(tool, f"tools[{i}]")
            for i, tool in enumerate(_list(tools, "tools"))
        ]
    if body.get("tool_choice") is not None:
        out.update(_anthropic_tool_choice_to_openai(_mapping(body["tool_choice"], "tool_choice")))
    return out


def _block_type(block: Mapping[str, Any]) -> object:
    return block.get("type")


def _anthropic_text_parts(content: object, field: str) -> list[_JSON]:
    """Text blocks as OpenAI text parts."""
    parts = []
    for j, raw in enumerate(_list(content, field)):
        block = _mapping(raw, f"{field}[{j}]")
        if _block_type(block) != "text":
            raise DialectError(
                f"{field}[{j}].type",
                f"only text is possible here, not {_show(_block_type(block))}.",
            )
        parts.append(_anthropic_text_part(block, f"{field}[{j}]"))
    return parts


def _anthropic_text_part(block: Mapping[str, Any], field: str) -> _JSON:
    _check_fields(
        block, ("type", "text", "cache_control"), {"citations": ([],)}, f"{field}.", "OpenAI"
    )
    return {"type": "text", "text": _string(block.get("text"), f"{field}.text")}


def _anthropic_message_to_openai(raw: object, where: str) -> list[_JSON]:
    message = _mapping(raw, where)
    _check_fields(message, ("role", "content"), {}, f"{where}.", "OpenAI")
    role = message.get("role")
    content = message.get("content")
    field = f"{where}.content"
    if role == "user":
        if isinstance(content, str):
            return [{"role": "user", "content": content}]
        return _anthropic_user_blocks(_list(content, field), field)
    if role == "assistant":
        if isinstance(content, str):
            return [{"role": "assistant", "content": content}]
        return [_anthropic_assistant_blocks(_list(content, field), field)]
    raise DialectError(f"{where}.role", f"Anthropic has no role {_show(role)}.")


def _anthropic_user_blocks(blocks: list[Any], field: str) -> list[_JSON]:
    """One user turn as OpenAI messages: each tool result its own, the rest in between."""
    messages: list[_JSON] = []
    parts: list[_JSON] = []
    for j, raw in enumerate(blocks):
        where = f"{field}[{j}]"
        block = _mapping(raw, where)
        kind = _block_type(block)
        if kind == "text":
            parts.append(_anthropic_text_part(block, where))
        elif kind == "image":
            parts.append(_anthropic_image(block, where))
        elif kind == "tool_result":
            if parts:
                messages.append({"role": "user", "content": parts})
                parts = []
            messages.append(_anthropic_tool_result(block, where))
        else:
            raise DialectError(f"{where}.type", f"OpenAI has no content block {_show(kind)}.")
    if parts or not messages:
        messages.append({"role": "user", "content": parts})
    return messages


def _anthropic_image(block: Mapping[str, Any], field: str) -> _JSON:
    _check_fields(block, ("type", "source", "cache_control"), {}, f"{field}.", "OpenAI")
    source = _mapping(block.get("source"), f"{field}.source")
    kind = source.get("type")
    if kind == "url":
        _check_fields(source, ("type", "url"), {}, f"{field}.source.", "OpenAI")
        url = _string(source.get("url"), f"{field}.source.url")
    elif kind == "base64":
        _check_fields(source, ("type", "media_type", "data"), {}, f"{field}.source.", "OpenAI")
        media_type = _string(source.get("media_type"), f"{field}.source.media_type")
        data = _string(source.get("data"), f"{field}.source.data")
        url = f"data:{media_type};base64,{data}"
    else:
        raise DialectError(f"{field}.source.type", f"OpenAI has no image source {_show(kind)}.")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_tool_result(block: Mapping[str, Any], field: str) -> _JSON:
    _check_fields(
        block,
        ("type", "tool_use_id", "content", "cache_control"),
        {"is_error": (False,)},
        f"{field}.",
        "OpenAI",
    )
    content = block.get("content", "")
    return {
        "role": "tool",
        "tool_call_id": _string(block.get("tool_use_id"), f"{field}.tool_use_id"),
        "content": (
            content
            if isinstance(content, str)
            else _anthropic_text_parts(content, f"{field}.content")
        ),
    }


def _anthropic_assistant_blocks(blocks: list[Any], field: str) -> _JSON:
    texts: list[_JSON] = []
    calls: list[_JSON] = []
    for j, raw in enumerate(blocks):
        where = f"{field}[{j}]"
        block = _mapping(raw, where)
        kind = _block_type(block)
        if kind == "text":
            texts.append(_anthropic_text_part(block, where))
        elif kind == "tool_use":
            calls.append(_anthropic_tool_call(block, where))
        else:
            raise DialectError(f"{where}.type", f"OpenAI has no content block {_show(kind)}.")
    message: _JSON = {"role": "assistant"}
    if not calls:
        message["content"] = texts
        return message
    # Beside tool calls, content is null or text: one block reads best as a plain string.
    message["content"] = None if not texts else texts[0]["text"] if len(texts) == 1 else texts
    message["tool_calls"] = calls
    return message


def _anthropic_tool_call(block: Mapping[str, Any], field: str) -> _JSON:
    """A ``tool_use`` block (of a request or a reply) as an OpenAI tool call."""
    _check_fields(
        block, ("type", "id", "name", "input", "cache_control"), {}, f"{field}.", "OpenAI"
    )
    return {
        "id": _string(block.get("id"), f"{field}.id"),
        "type": "function",
        "function": {
            "name": _string(block.get("name"), f"{field}.name"),
            "arguments": _dumps(_mapping(block.get("input"), f"{field}.input")),
        },
    }


def _anthropic_tool_to_openai(raw: object, field: str) -> _JSON:
    tool = _mapping(raw, field)
    _check_fields(
        tool,
        ("name", "description", "input_schema", "cache_control"),
        {"type": ("custom",)},
        f"{field}.",
        "OpenAI",
    )
    function: _JSON = {"name": _string(tool.get("name"), f"{field}.name")}
    if tool.get("description") is not None:
        function["description"] = _string(tool["description"], f"{field}.description")
    function["parameters"] = dict(_mapping(tool.get("input_schema"), f"{field}.input_schema"))
    return {"type": "function", "function": function}


def _anthropic_tool_choice_to_openai(choice: Mapping[str, Any]) -> _JSON:
    _check_fields(
        choice, ("type", "name", "disable_parallel_tool_use"), {}, "tool_choice.", "OpenAI"
    )
    kind = choice.get("type")
    out: _JSON
    if kind in ("auto", "none"):
        out = {"tool_choice": kind}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name")
        out = {"tool_choice": {"type": "function", "function": {"name": name}}}
    else:
        raise DialectError("tool_choice.type", f"OpenAI has no tool choice {_show(kind)}.")
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


# ---------------------------------------------------------------------------------------------
# Replies, usage and errors
# ---------------------------------------------------------------------------------------------


def anthropic_reply_to_openai(message: Mapping[str, Any], *, created: int) -> dict[str, Any]:
    """An Anthropic message (a non-streamed reply) as an OpenAI ``chat.completion``.

    Text blocks join into ``content`` (null if there are none), ``tool_use`` blocks become
    ``tool_calls``; ``end_turn`` and ``stop_sequence`` finish as ``stop``, ``max_tokens``
    as ``length``, ``tool_use`` as ``tool_calls``, ``refusal`` as ``content_filter``.

    Args:
        message: the decoded reply body.
        created: the Unix time the completion says it was made (Anthropic sends none).

    Raises:
        DialectError: a content block or stop reason OpenAI has no word for, or a reply
            malformed where the translation reads it.
    """
    message = _mapping(message, "body")
    texts: list[str] = []
    calls: list[_JSON] = []
    for j, raw in enumerate(_list(message.get("content"), "content")):
        block = _mapping(raw, f"content[{j}]")
        kind = _block_type(block)
        if kind == "text":
            texts.append(_anthropic_text_part(block, f"content[{j}]")["text"])
        elif kind == "tool_use":
            calls.append(_anthropic_tool_call(block, f"content[{j}]"))
        else:
            raise DialectError(f"content[{j}].type", f"OpenAI has no content block {_show(kind)}.")
    reply: _JSON = {"role": "assistant", "content": "".join(texts) if texts else None}
    reply["refusal"] = None
    if calls:
        reply["tool_calls"] = calls
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": _finish_reason(message.get("stop_reason"), "stop_reason"),
            }
        ],
        "usage": _openai_usage(message.get("usage"), "usage"),
    }


def openai_reply_to_anthropic(completion: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` (a non-streamed reply) as an Anthropic message.

    ``content`` becomes a text block (none if empty), ``tool_calls`` become ``tool_use``
    blocks with their arguments parsed; ``stop`` finishes as ``end_turn``, ``length`` as
    ``max_tokens``, ``tool_calls`` as ``tool_use``, ``content_filter`` as ``refusal``.

    Raises:
        DialectError: several choices, a refusal, audio, a finish reason Anthropic has no
            word for, or a reply malformed where the translation reads it.
    """
    completion = _mapping(completion, "body")
    choices = _list(completion.get("choices"), "choices")
    if len(choices) != 1:
        raise DialectError("choices", f"Anthropic gives one answer, not {len(choices)}.")
    choice = _mapping(choices[0], "choices[0]")
    reply = _mapping(choice.get("message"), "choices[0].message")
    where = "choices[0].message."
    _check_fields(
        reply,
        ("role", "content", "tool_calls", "reasoning_content"),
        _OPENAI_MESSAGE_NEUTRAL,
        where,
        "Anthropic",
    )
    content: list[_JSON] = []
    text = reply.get("content")
    if text is not None and _string(text, f"{where}content"):
        content.append({"type": "text", "text": text})
    for k, raw in enumerate(_list(reply.get("tool_calls") or [], f"{where}tool_calls")):
        content.append(_openai_tool_use(raw, f"{where}tool_calls[{k}]"))
    return {
        "id": completion.get("id"),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason"), "choices[0].finish_reason"),
        "stop_sequence": None,
        "usage": _anthropic_usage(completion.get("usage"), "usage"),
    }


def _openai_tool_use(raw: object, field: str) -> _JSON:
    """An OpenAI tool call of a reply as a ``tool_use`` block."""
    call = _mapping(raw, field)
    if call.get("type", "function") != "function":
        raise DialectError(
            f"{field}.type", f"Anthropic has no tool call {_show(call.get('type'))}."
        )
    function = _mapping(call.get("function"), f"{field}.function")
    return {
        "type": "tool_use",
        "id": _string(call.get("id"), f"{field}.id"),
        "name": _string(function.get("name"), f"{field}.function.name"),
        "input": _arguments(function.get("arguments"), f"{field}.function.arguments"),
    }


def _finish_reason(stop_reason: object, field: str) -> str:
    reason = _ANTHROPIC_STOP_TO_OPENAI.get(stop_reason) if isinstance(stop_reason, str) else None
    if reason is None:
        raise DialectError(field, f"OpenAI has no finish reason for {_show(stop_reason)}.")
    return reason


def _stop_reason(finish_reason: object, field: str) -> str:
    reason = (
        _OPENAI_FINISH_TO_ANTHROPIC.get(finish_reason) if isinstance(finish_reason, str) else None
    )
    if reason is None:
        raise DialectError(field, f"Anthropic has no stop reason for {_show(finish_reason)}.")
    return reason


def _split(usage: Mapping[str, Any], field: str) -> tuple[int, int]:
    split = usage_split(usage)
    if split is None:
        raise DialectError(field, f"{_show(usage)} does not count tokens in whole numbers.")
    return split


def _openai_usage(usage: object, field: str) -> _JSON:
    """Anthropic's ``usage`` in OpenAI's words; cache reads and writes are prompt tokens."""
    usage = _mapping(usage, field)
    prompt, completion = _split(usage, field)
    out: _JSON = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = usage.get("cache_read_input_tokens")
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _anthropic_usage(usage: object, field: str) -> _JSON:
    """OpenAI's ``usage`` in Anthropic's words; cached prompt tokens are cache reads."""
    usage = _mapping(usage, field)
    prompt, completion = _split(usage, field)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if cached is None:
        return {"input_tokens": prompt, "output_tokens": completion}
    if isinstance(cached, bool) or not isinstance(cached, int) or not 0 <= cached <= prompt:
        raise DialectError(
            f"{field}.prompt_tokens_details.cached_tokens",
            f"{_show(cached)} is not a count of the {prompt} prompt tokens.",
        )
    return {
        "input_tokens": prompt - cached,
        "output_tokens": completion,
        "cache_read_input_tokens": cached,
    }


def anthropic_error_to_openai(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic error body (or stream ``error`` event) in OpenAI's ``{"error": ...}``.

    The type crosses unchanged (``overloaded_error`` says more than any OpenAI type);
    ``rate_limit_error``, ``billing_error`` and ``authentication_error`` also get OpenAI's
    code, so a client reading either field sees the same kind of failure.
    """
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    kind = error.get("type")
    kind = kind if isinstance(kind, str) else "api_error"
    return {
        "error": {
            "message": str(error.get("message", "")),
            "type": kind,
            "param": None,
            "code": _ANTHROPIC_ERROR_CODES.get(kind),
        }
    }


def openai_error_to_anthropic(body: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI error body (or streamed error) in Anthropic's ``{"type": "error", ...}``.

    The code, else the type, is said in Anthropic's words (``rate_limit_exceeded`` is
    ``rate_limit_error``, ``insufficient_quota`` is ``billing_error``, ...); an Anthropic
    name passes as it is, anything else is ``api_error``.
    """
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    kind = "api_error"
    for name in (error.get("code"), error.get("type")):
        if isinstance(name, str) and (
            name in _ANTHROPIC_ERROR_TYPES or name in _OPENAI_ERROR_TO_ANTHROPIC
        ):
            kind = _OPENAI_ERROR_TO_ANTHROPIC.get(name, name)
            break
    return {"type": "error", "error": {"type": kind, "message": str(error.get("message", ""))}}


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def _openai_sse(data: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _anthropic_sse(data: Mapping[str, Any]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class StreamTranslator(abc.ABC):
    """Upstream SSE bytes in, the caller's SSE bytes out; one instance per stream.

    The bytes may be split anywhere (inside a line, a UTF-8 character, a CRLF); an event
    is translated once it is whole. After the upstream's end (or its error) nothing more
    is translated.
    """

    __slots__ = ("_done", "_parser", "_usage")

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._usage: dict[str, Any] = {}
        self._done = False

    @property
    def done(self) -> bool:
        """Whether the upstream's stream has ended: its last event, or an error event."""
        return self._done

    @property
    def usage(self) -> tuple[int, int] | None:
        """``(input, output)`` tokens the upstream reported so far (input counts cache
        reads and writes), or None if it reported none, for the caller to reconcile."""
        return usage_split(self._usage) if self._usage else None

    def feed(self, chunk: bytes) -> bytes:
        """Take the upstream's next bytes; return the caller's bytes they complete.

        Raises:
            DialectError: an event that cannot be read, or said in the caller's dialect.
                The stream cannot go on faithfully: end it.
        """
        return self._translate(self._parser.feed(chunk))

    def flush(self) -> bytes:
        """The upstream's bytes have ended: translate an event left without its blank line.

        Raises:
            DialectError: as :meth:`feed`.
        """
        return self._translate(self._parser.flush())

    def feed_events(self, events: Iterable[SSEEvent]) -> bytes:
        """Take the upstream's next events, already parsed (a ``ShapedStream``'s); return
        the caller's bytes they make.

        Raises:
            DialectError: as :meth:`feed`.
        """
        return self._translate(events)

    def _translate(self, events: Iterable[SSEEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self._done:
                break
            self._event(event, out)
        return b"".join(out)

    @abc.abstractmethod
    def _event(self, event: SSEEvent, out: list[bytes]) -> None:
        """Translate one upstream event into ``out``."""


def _event_data(data: str) -> Mapping[str, Any]:
    """An event's data as the JSON object every event of both dialects is."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise DialectError("stream", f"an event's data is not JSON: {_show(data)}.") from None
    return _mapping(value, "stream")


class AnthropicStreamToOpenAI(StreamTranslator):
    """An Anthropic message stream, said as OpenAI ``chat.completion.chunk`` events.

    ``message_start`` opens with the assistant's role; text deltas become ``content``
    deltas; each ``tool_use`` block becomes a tool call (its id and name first, then its
    ``input_json_delta`` fragments as ``arguments`` fragments); ``message_delta`` gives the
    final chunk with its finish reason; ``message_stop`` sends the usage chunk (if asked)
    and ``data: [DONE]``. A ``ping`` becomes an SSE comment, which keeps the connection as
    alive as the ping did. An ``error`` event (an ``overloaded_error`` inside a 200)
    becomes OpenAI's ``data: {"error": ...}`` and ends the stream, without ``[DONE]``.

    Args:
        created: the Unix time every chunk says the completion was made.
        include_usage: whether the caller asked ``stream_options.include_usage``.
    """

    __slots__ = ("_created", "_id", "_include_usage", "_model", "_tools")

    def __init__(self, *, created: int, include_usage: bool) -> None:
        super().__init__()
        self._created = created
        self._include_usage = include_usage
        self._id: object = None
        self._model: object = None
        self._tools: dict[object, int] = {}  # Anthropic block index → OpenAI tool call index

    def _chunk(self, choices: list[_JSON], **extra: Any) -> bytes:
        return _openai_sse(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": choices,
                **extra,
            }
        )

    def _delta(self, delta: _JSON, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def _count(self, usage: object, field: str) -> None:
        # message_delta's usage is cumulative and may name only some counts.
        self._usage.update((k, v) for k, v in _mapping(usage, field).items() if v is not None)

    def _event(self, event: SSEEvent, out: list[bytes]) -> None:
        data = _event_data(event.data)
        kind = data.get("type")
        if kind == "message_start":
            message = _mapping(data.get("message"), "message_start.message")
            self._id, self._model = message.get("id"), message.get("model")
            self._count(message.get("usage", {}), "message_start.message.usage")
            out.append(self._delta({"role": "assistant", "content": ""}))
        elif kind == "content_block_start":
            self._block_start(data, out)
        elif kind == "content_block_delta":
            self._block_delta(data, out)
        elif kind == "content_block_stop":
            pass  # OpenAI closes nothing: a tool call ends where the next begins
        elif kind == "message_delta":
            delta = _mapping(data.get("delta"), "message_delta.delta")
            if data.get("usage") is not None:
                self._count(data["usage"], "message_delta.usage")
            reason = _finish_reason(delta.get("stop_reason"), "message_delta.delta.stop_reason")
            out.append(self._delta({}, reason))
        elif kind == "message_stop":
            if self._include_usage and self._usage:
                out.append(self._chunk([], usage=_openai_usage(self._usage, "usage")))
            out.append(b"data: [DONE]\n\n")
            self._done = True
        elif kind == "ping":
            out.append(b": ping\n\n")
        elif kind == "error":
            out.append(_openai_sse(anthropic_error_to_openai(data)))
            self._done = True
        else:
            raise DialectError("stream", f"OpenAI has no event {_show(kind)}.")

    def _block_start(self, data: Mapping[str, Any], out: list[bytes]) -> None:
        block = _mapping(data.get("content_block"), "content_block_start.content_block")
        kind = _block_type(block)
        if kind == "text":
            text = _string(block.get("text", ""), "content_block_start.content_block.text")
            if text:
                out.append(self._delta({"content": text}))
        elif kind == "tool_use":
            number = len(self._tools)
            self._tools[data.get("index")] = number
            call = _anthropic_tool_call(block, "content_block_start.content_block")
            # The input comes in fragments; a block that starts with some is its first one.
            arguments = call["function"]["arguments"]
            call["function"]["arguments"] = "" if arguments == "{}" else arguments
            out.append(self._delta({"tool_calls": [{"index": number, **call}]}))
        else:
            raise DialectError(
                "content_block_start.content_block.type",
                f"OpenAI has no content block {_show(kind)}.",
            )

    def _block_delta(self, data: Mapping[str, Any], out: list[bytes]) -> None:
        delta = _mapping(data.get("delta"), "content_block_delta.delta")
        kind = delta.get("type")
        if kind == "text_delta":
            text = _string(delta.get("text"), "content_block_delta.delta.text")
            out.append(self._delta({"content": text}))
        elif kind == "input_json_delta":
            number = self._tools.get(data.get("index"))
            if number is None:
                raise DialectError(
                    "content_block_delta.index", "input arrived for a block that is no tool use."
                )
            fragment = _string(delta.get("partial_json"), "content_block_delta.delta.partial_json")
            if fragment:
                call = {"index": number, "function": {"arguments": fragment}}
                out.append(self._delta({"tool_calls": [call]}))
        else:
            raise DialectError(
                "content_block_delta.delta.type", f"OpenAI has no delta {_show(kind)}."
            )


class OpenAIStreamToAnthropic(StreamTranslator):
    """An OpenAI ``chat.completion.chunk`` stream, said as Anthropic message events.

    The first chunk opens the message (``message_start``); ``content`` opens a text block,
    each new tool call index a ``tool_use`` block whose ``arguments`` fragments are its
    ``input_json_delta``; a block closes when the next one opens or the choice finishes;
    ``[DONE]`` sends ``message_delta`` (the stop reason, and the usage of the final chunk,
    which :func:`anthropic_request_to_openai` asks for) and ``message_stop``. A streamed
    ``{"error": ...}`` becomes Anthropic's ``error`` event and ends the stream.
    """

    __slots__ = ("_block", "_blocks", "_started", "_stop", "_text_open", "_tools")

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._blocks = 0  # blocks opened so far
        self._block: int | None = None  # the open block's index
        self._text_open = False  # whether the open block is text
        self._tools: dict[object, int] = {}  # OpenAI tool call index → Anthropic block index
        self._stop: str | None = None

    def _event(self, event: SSEEvent, out: list[bytes]) -> None:
        if event.data.strip() == "[DONE]":
            self._end(out)
            return
        data = _event_data(event.data)
        if data.get("error") is not None:
            out.append(_anthropic_sse(openai_error_to_anthropic(data)))
            self._done = True
            return
        if not self._started:
            self._started = True
            message: _JSON = {
                "id": data.get("id"),
                "type": "message",
                "role": "assistant",
                "model": data.get("model"),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                # OpenAI tells the usage only at the end: message_delta carries it.
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out.append(_anthropic_sse({"type": "message_start", "message": message}))
        if data.get("usage") is not None:
            self._usage = dict(_mapping(data["usage"], "usage"))
            _split(self._usage, "usage")
        choices = _list(data.get("choices") or [], "choices")
        if len(choices) > 1:
            raise DialectError("choices", f"Anthropic gives one answer, not {len(choices)}.")
        for choice in choices:
            self._choice(_mapping(choice, "choices[0]"), out)

    def _choice(self, choice: Mapping[str, Any], out: list[bytes]) -> None:
        delta = _mapping(choice.get("delta") or {}, "choices[0].delta")
        where = "choices[0].delta."
        _check_fields(
            delta, ("role", "content", "tool_calls", "reasoning_content"), {}, where, "Anthropic"
        )
        text = delta.get("content")
        if text is not None and _string(text, f"{where}content"):
            if not self._text_open:
                self._open({"type": "text", "text": ""}, out)
                self._text_open = True
            out.append(self._block_delta({"type": "text_delta", "text": text}))
        for k, raw in enumerate(_list(delta.get("tool_calls") or [], f"{where}tool_calls")):
            self._tool_fragment(_mapping(raw, f"{where}tool_calls[{k}]"), k, out)
        if choice.get("finish_reason") is not None:
            self._close(out)
            self._stop = _stop_reason(choice["finish_reason"], "choices[0].finish_reason")

    def _tool_fragment(self, call: Mapping[str, Any], k: int, out: list[bytes]) -> None:
        field = f"choices[0].delta.tool_calls[{k}]"
        number = call.get("index")
        function = _mapping(call.get("function") or {}, f"{field}.function")
        if number not in self._tools:
            if call.get("type", "function") != "function":
                raise DialectError(
                    f"{field}.type", f"Anthropic has no tool call {_show(call.get('type'))}."
                )
            block = {
                "type": "tool_use",
                "id": _string(call.get("id"), f"{field}.id"),
                "name": _string(function.get("name"), f"{field}.function.name"),
                "input": {},
            }
            self._tools[number] = self._open(block, out)
        elif self._tools[number] != self._block:
            raise DialectError(
                f"{field}.index",
                "Anthropic cannot go back to a tool call once another block has begun.",
            )
        fragment = function.get("arguments")
        if fragment is not None and _string(fragment, f"{field}.function.arguments"):
            out.append(self._block_delta({"type": "input_json_delta", "partial_json": fragment}))

    def _open(self, block: _JSON, out: list[bytes]) -> int:
        self._close(out)
        self._block = index = self._blocks
        self._blocks += 1
        out.append(
            _anthropic_sse({"type": "content_block_start", "index": index, "content_block": block})
        )
        return index

    def _close(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(_anthropic_sse({"type": "content_block_stop", "index": self._block}))
            self._block = None
            self._text_open = False

    def _block_delta(self, delta: _JSON) -> bytes:
        return _anthropic_sse({"type": "content_block_delta", "index": self._block, "delta": delta})

    def _end(self, out: list[bytes]) -> None:
        if self._stop is None:
            raise DialectError("stream", "the stream ended before its choice had a finish reason.")
        self._close(out)
        usage = _anthropic_usage(self._usage, "usage") if self._usage else {"output_tokens": 0}
        delta = {"stop_reason": self._stop, "stop_sequence": None}
        out.append(_anthropic_sse({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(_anthropic_sse({"type": "message_stop"}))
        self._done = True


class PassThroughStream(StreamTranslator):
    """A stream for a caller that speaks the model's dialect: each event as it came.

    Events are written back as the upstream sent them (its ``event:`` name and ``data:``
    lines; comments were the parser's to drop), and the usage they report is counted on
    the way: OpenAI's final ``usage`` chunk, Anthropic's ``message_start`` and cumulative
    ``message_delta`` counts. It never refuses an event: the caller reads its own dialect.
    """

    __slots__ = ()

    def _event(self, event: SSEEvent, out: list[bytes]) -> None:
        data = event.data
        self._count(data)
        head = "" if event.event is None else f"event: {event.event}\n"
        lines = "".join(f"data: {line}\n" for line in data.split("\n"))
        out.append(f"{head}{lines}\n".encode())
        if event.event == "message_stop" or data.strip() == "[DONE]":
            self._done = True

    def _count(self, data: str) -> None:
        usage = event_usage(data)
        if usage is not None:
            # Anthropic's message_delta is cumulative and may name only some counts.
            self._usage.update((k, v) for k, v in usage.items() if v is not None)


_PREAMBLE_EVENTS = frozenset({"message_start", "ping", "content_block_stop"})


def has_content(data: str) -> bool:
    """Whether an upstream stream event (either dialect) says what its caller must see.

    Content is a text, reasoning or tool call delta, a tool use beginning, a finish, the
    usage, an error, or the stream's end. What comes before (Anthropic's
    ``message_start``, a ``ping``, an empty text block's start; OpenAI's role-only first
    chunk) is not: a gateway may hold it back and still send the request elsewhere. An
    event it cannot read counts as content (the translator decides what becomes of it).

    Args:
        data: the event's ``data:``.
    """
    if data.strip() == "[DONE]":
        return True
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(event, dict):
        return True
    kind = event.get("type")
    if kind in _PREAMBLE_EVENTS:
        return False
    if kind == "content_block_start":
        block = event.get("content_block")
        return not (
            isinstance(block, dict) and block.get("type") == "text" and not block.get("text")
        )
    if kind is not None or event.get("usage") is not None or event.get("error") is not None:
        return True
    choices = event.get("choices")
    if not isinstance(choices, list):
        return True
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason") is not None:
            return True
        if any(delta.get(name) for name in ("content", "tool_calls", "reasoning_content")):
            return True
    return False
