"""One request format across providers: requests, replies and streams said in the other dialect."""

import random

import orjson
import pytest

from asyncquota.dialects import (
    ANTHROPIC,
    DEFAULT_MAX_TOKENS,
    OPENAI,
    AnthropicStreamToOpenAI,
    DialectError,
    OpenAIStreamToAnthropic,
    anthropic_error_to_openai,
    anthropic_reply_to_openai,
    anthropic_request_to_openai,
    dialect_of_path,
    openai_error_to_anthropic,
    openai_reply_to_anthropic,
    openai_request_to_anthropic,
)
from asyncquota.signals import Outcome, classify_error_body, classify_stream_event
from asyncquota.testing.replies import AnthropicDialect, OpenAIDialect, Parsed
from asyncquota.transport import SSEParser

CREATED = 1_790_000_000
PNG = "iVBORw0KGgoAAAANSUhEUg=="
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}

# The same conversation in both dialects: each is the other's exact translation.
OPENAI_REQUEST = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "Answer in one sentence."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Where was this taken, and how warm is it there?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Paris; let me check the weather.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C"},
        {"role": "assistant", "content": "Paris, at 21 °C."},
        {"role": "user", "content": "And this one?"},
    ],
    "max_tokens": 300,
    "stop": ["\n\n"],
    "temperature": 0.2,
    "top_p": 0.9,
    "stream": True,
    "stream_options": {"include_usage": True},
    "user": "user-42",
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The temperature in a city.",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "weather"}},
    "parallel_tool_calls": False,
}

ANTHROPIC_REQUEST = {
    "model": "gpt-4o",
    "system": "Answer in one sentence.",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Where was this taken, and how warm is it there?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Paris; let me check the weather."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "21 °C"}],
        },
        {"role": "assistant", "content": "Paris, at 21 °C."},
        {"role": "user", "content": "And this one?"},
    ],
    "max_tokens": 300,
    "stop_sequences": ["\n\n"],
    "temperature": 0.2,
    "top_p": 0.9,
    "stream": True,
    "metadata": {"user_id": "user-42"},
    "tools": [
        {
            "name": "weather",
            "description": "The temperature in a city.",
            "input_schema": WEATHER_SCHEMA,
        }
    ],
    "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
}


def chat(*messages, **fields):
    return {"model": "m", "messages": list(messages), **fields}


def user(content):
    return {"role": "user", "content": content}


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def test_an_openai_request_is_said_in_anthropic_and_back_unchanged():
    anthropic = openai_request_to_anthropic(OPENAI_REQUEST)
    assert anthropic == ANTHROPIC_REQUEST
    assert anthropic_request_to_openai(anthropic) == OPENAI_REQUEST


def test_an_anthropic_request_is_said_in_openai_and_back_unchanged():
    openai = anthropic_request_to_openai(ANTHROPIC_REQUEST)
    assert openai == OPENAI_REQUEST
    assert openai_request_to_anthropic(openai) == ANTHROPIC_REQUEST


def test_the_inputs_are_never_modified():
    before = orjson.dumps(OPENAI_REQUEST), orjson.dumps(ANTHROPIC_REQUEST)
    anthropic_request_to_openai(openai_request_to_anthropic(OPENAI_REQUEST))
    openai_request_to_anthropic(anthropic_request_to_openai(ANTHROPIC_REQUEST))
    assert (orjson.dumps(OPENAI_REQUEST), orjson.dumps(ANTHROPIC_REQUEST)) == before


def test_system_and_developer_messages_become_one_system_prompt_of_text_blocks():
    body = chat(
        {"role": "developer", "content": "Be terse."},
        {"role": "system", "content": [{"type": "text", "text": "Cite sources."}]},
        user("Hi"),
    )
    assert openai_request_to_anthropic(body)["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "Cite sources."},
    ]
    # Anthropic's blocks come back as one system message of text parts; cache hints drop.
    blocks = [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}]
    back = anthropic_request_to_openai({"system": blocks, "messages": [user("Hi")]})
    assert back["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "Be terse."}],
    }


def test_a_system_message_after_the_conversation_began_is_refused():
    body = chat(user("Hi"), {"role": "system", "content": "Now be rude."})
    with pytest.raises(DialectError, match="system prompt only before") as caught:
        openai_request_to_anthropic(body)
    assert caught.value.field == "messages[1].role"


def test_consecutive_same_role_messages_merge_into_one_anthropic_turn():
    body = chat(
        user("First."),
        user([{"type": "text", "text": "Second."}]),
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "a", "content": "one"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "two"}]},
        user("Go on."),
    )
    assert openai_request_to_anthropic(body)["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "First."}, {"type": "text", "text": "Second."}],
        },
        {"role": "assistant", "content": []},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "a", "content": "one"},
                {
                    "type": "tool_result",
                    "tool_use_id": "b",
                    "content": [{"type": "text", "text": "two"}],
                },
                {"type": "text", "text": "Go on."},
            ],
        },
    ]


def test_an_anthropic_user_turn_splits_into_tool_messages_and_the_rest_in_order():
    turn = user(
        [
            {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "1"}]},
            {"type": "tool_result", "tool_use_id": "b"},
            {"type": "text", "text": "Both done."},
        ]
    )
    assert anthropic_request_to_openai({"messages": [turn]})["messages"] == [
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "1"}]},
        {"role": "tool", "tool_call_id": "b", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "Both done."}]},
    ]


def test_an_assistant_turn_with_several_texts_and_tool_calls_keeps_them_all():
    turn = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "One."},
            {"type": "text", "text": "Two."},
            {"type": "tool_use", "id": "t", "name": "f", "input": {}},
        ],
    }
    assert anthropic_request_to_openai({"messages": [turn]})["messages"] == [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
            "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


@pytest.mark.parametrize(
    ("url", "source"),
    [
        ("https://example.com/cat.jpg", {"type": "url", "url": "https://example.com/cat.jpg"}),
        (
            "data:image/jpeg;base64,/9j/4AAQ",
            {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"},
        ),
    ],
)
def test_images_cross_by_url_or_as_base64(url, source):
    part = {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}
    block = openai_request_to_anthropic(chat(user([part])))["messages"][0]["content"][0]
    assert block == {"type": "image", "source": source}
    back = anthropic_request_to_openai({"messages": [user([block])]})["messages"][0]
    assert back == user([{"type": "image_url", "image_url": {"url": url}}])


@pytest.mark.parametrize(
    ("image_url", "field", "match"),
    [
        ({"url": "ftp://example.com/a.png"}, "url", "http\\(s\\) URL or a base64 data: URL"),
        ({"url": "data:image/png,rawbytes"}, "url", "http\\(s\\) URL or a base64 data: URL"),
        ({"url": "data:image/tiff;base64,AAAA"}, "url", "not image/tiff"),
        ({"url": "https://example.com/a.png", "detail": "high"}, "detail", '"high"'),
    ],
)
def test_an_image_anthropic_cannot_take_is_refused(image_url, field, match):
    body = chat(user([{"type": "image_url", "image_url": image_url}]))
    with pytest.raises(DialectError, match=match) as caught:
        openai_request_to_anthropic(body)
    assert caught.value.field == f"messages[0].content[0].image_url.{field}"


def test_max_tokens_defaults_for_anthropic_and_is_configurable():
    assert openai_request_to_anthropic(chat(user("Hi")))["max_tokens"] == DEFAULT_MAX_TOKENS == 4096
    body = chat(user("Hi"))
    assert openai_request_to_anthropic(body, default_max_tokens=64)["max_tokens"] == 64
    with pytest.raises(ValueError, match="default_max_tokens must be a positive integer"):
        openai_request_to_anthropic(body, default_max_tokens=0)


def test_max_completion_tokens_is_max_tokens_and_two_different_limits_are_refused():
    assert openai_request_to_anthropic(chat(max_completion_tokens=50))["max_tokens"] == 50
    same = chat(max_tokens=50, max_completion_tokens=50)
    assert openai_request_to_anthropic(same)["max_tokens"] == 50
    with pytest.raises(DialectError, match="differs from max_completion_tokens") as caught:
        openai_request_to_anthropic(chat(max_tokens=50, max_completion_tokens=60))
    assert caught.value.field == "max_tokens"
    with pytest.raises(DialectError, match="positive integer") as caught:
        openai_request_to_anthropic(chat(max_completion_tokens=0))
    assert caught.value.field == "max_completion_tokens"


def test_max_tokens_goes_to_openai_under_the_name_asked_for():
    body = {"messages": [], "max_tokens": 80}
    assert anthropic_request_to_openai(body) == {"messages": [], "max_tokens": 80}
    reasoning = anthropic_request_to_openai(body, max_tokens_field="max_completion_tokens")
    assert reasoning == {"messages": [], "max_completion_tokens": 80}


def test_a_single_stop_string_becomes_a_list_of_stop_sequences():
    assert openai_request_to_anthropic(chat(stop="END"))["stop_sequences"] == ["END"]


def test_a_temperature_above_anthropics_range_is_refused_not_scaled():
    assert openai_request_to_anthropic(chat(temperature=1))["temperature"] == 1
    with pytest.raises(DialectError, match=r"Anthropic accepts 0 to 1, not 1\.5") as caught:
        openai_request_to_anthropic(chat(temperature=1.5))
    assert caught.value.field == "temperature"


def test_a_non_streamed_request_stays_non_streamed_and_asks_no_usage_chunk():
    assert anthropic_request_to_openai({"messages": [], "stream": False}) == {
        "messages": [],
        "stream": False,
    }
    assert openai_request_to_anthropic(chat(stream=False))["stream"] is False


@pytest.mark.parametrize(
    ("openai", "anthropic"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
    ],
)
def test_each_tool_choice_has_its_counterpart(openai, anthropic):
    assert openai_request_to_anthropic(chat(tool_choice=openai))["tool_choice"] == anthropic
    assert anthropic_request_to_openai({"messages": [], "tool_choice": anthropic}) == {
        "messages": [],
        "tool_choice": openai,
    }


def test_forbidding_parallel_tool_calls_needs_no_tool_choice():
    body = openai_request_to_anthropic(chat(parallel_tool_calls=False))
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert "tool_choice" not in openai_request_to_anthropic(chat(parallel_tool_calls=True))
    none = openai_request_to_anthropic(chat(tool_choice="none", parallel_tool_calls=False))
    assert none["tool_choice"] == {"type": "none"}


def test_a_tool_without_parameters_gets_the_empty_object_schema():
    tool = {"type": "function", "function": {"name": "now"}}
    assert openai_request_to_anthropic(chat(tools=[tool]))["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    ]


def test_tool_call_arguments_are_parsed_and_empty_ones_are_an_empty_object():
    call = {"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}
    body = chat({"role": "assistant", "content": "", "tool_calls": [call]})
    assert openai_request_to_anthropic(body)["messages"][0]["content"] == [
        {"type": "tool_use", "id": "c", "name": "now", "input": {}}
    ]


@pytest.mark.parametrize(
    ("arguments", "match"),
    [('{"city": "Par', "are not valid JSON"), ('["Paris"]', "are not a JSON object")],
)
def test_tool_call_arguments_that_are_not_a_json_object_are_refused(arguments, match):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(DialectError, match=match) as caught:
        openai_request_to_anthropic(chat({"role": "assistant", "tool_calls": [call]}))
    assert caught.value.field == "messages[0].tool_calls[0].function.arguments"


def test_fields_that_say_their_default_pass_and_seed_is_dropped():
    body = chat(
        user("Hi"),
        n=1,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        response_format={"type": "text"},
        seed=7,
        service_tier=None,
    )
    assert openai_request_to_anthropic(body) == {
        "model": "m",
        "messages": [user("Hi")],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }
    thinking_off = {"messages": [], "thinking": {"type": "disabled"}}
    assert anthropic_request_to_openai(thinking_off) == {"messages": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (chat(n=2), "n"),
        (chat(logprobs=True), "logprobs"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(presence_penalty=0.5), "presence_penalty"),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format",
        ),
        (chat(reasoning_effort="high"), "reasoning_effort"),
        (chat(modalities=["text", "audio"]), "modalities"),
        (chat(stream=True, stream_options={"include_obfuscation": True}), "stream_options."),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat({"role": "user", "content": "Hi", "name": "ann"}), "messages[0].name"),
        (chat({"role": "function", "name": "f", "content": "1"}), "messages[0].role"),
        (
            chat(user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])),
            "messages[0].content[0].type",
        ),
        (
            chat(user([{"type": "file", "file": {"file_id": "file-1"}}])),
            "messages[0].content[0].type",
        ),
        (
            chat({"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}),
            "messages[0].content[0].type",
        ),
        (chat({"role": "assistant", "content": "Hi", "audio": {"id": "a1"}}), "messages[0].audio"),
        (chat({"role": "assistant", "content": None}), "messages[0].content"),
        (chat(tools=[{"type": "custom", "custom": {"name": "grep"}}]), "tools[0].type"),
        (
            chat(tools=[{"type": "function", "function": {"name": "f", "strict": True}}]),
            "tools[0].function.strict",
        ),
        (chat(tool_choice={"type": "allowed_tools"}), "tool_choice"),
        (chat(messages="Hi"), "messages"),
    ],
)
def test_what_anthropic_cannot_be_told_is_refused_naming_the_field(body, field):
    with pytest.raises(DialectError) as caught:
        openai_request_to_anthropic(body)
    assert caught.value.field.startswith(field)
    assert str(caught.value).startswith(caught.value.field + ": ")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [], "top_k": 40}, "top_k"),
        ({"messages": [], "thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"messages": [], "service_tier": "standard_only"}, "service_tier"),
        ({"messages": [], "metadata": {"user_id": "u", "team": "x"}}, "metadata.team"),
        (
            {"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools[0].type",
        ),
        (
            {"messages": [user([{"type": "tool_result", "tool_use_id": "t", "is_error": True}])]},
            "messages[0].content[0].is_error",
        ),
        (
            {"messages": [user([{"type": "document", "source": {"type": "text", "data": "x"}}])]},
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    user(
                        [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ]
                    )
                ]
            },
            "messages[0].content[0].content[0].type",
        ),
        (
            {"messages": [user([{"type": "image", "source": {"type": "file", "file_id": "f"}}])]},
            "messages[0].content[0].source.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "thinking", "thinking": "Hm.", "signature": "s"}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "system", "content": "Hi"}]}, "messages[0].role"),
        ({"messages": [], "tool_choice": {"type": "auto", "extra": 1}}, "tool_choice.extra"),
    ],
)
def test_what_openai_cannot_be_told_is_refused_naming_the_field(body, field):
    with pytest.raises(DialectError) as caught:
        anthropic_request_to_openai(body)
    assert caught.value.field == field


def test_a_refusal_says_what_has_no_equivalent():
    with pytest.raises(DialectError) as caught:
        openai_request_to_anthropic(chat(n=3))
    assert str(caught.value) == (
        "n: Anthropic has no equivalent of 3 here, so the body cannot be translated."
    )


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/chat/completions", OPENAI),
        ("/openai/v1/chat/completions?api-version=1", OPENAI),
        ("/chat/completions/", OPENAI),
        ("/v1/messages", ANTHROPIC),
        ("/anthropic/v1/messages?beta=true", ANTHROPIC),
        ("/v1/messages/count_tokens", None),
        ("/v1/embeddings", None),
    ],
)
def test_the_dialect_is_told_by_the_path(path, dialect):
    assert dialect_of_path(path) == dialect


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------


def anthropic_message(content, stop_reason="end_turn", **usage):
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7, **usage},
    }


def openai_completion(message, finish_reason="stop", **usage):
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19, **usage},
        "system_fingerprint": "fp_1",
    }


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_an_anthropic_reply_reads_as_a_chat_completion(stop_reason, finish_reason):
    message = anthropic_message(
        [{"type": "text", "text": "Hello"}, {"type": "text", "text": ", world."}], stop_reason
    )
    assert anthropic_reply_to_openai(message, created=CREATED) == {
        "id": "msg_01",
        "object": "chat.completion",
        "created": CREATED,
        "model": "claude-sonnet-4",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world.", "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }


def test_tool_use_in_a_reply_becomes_tool_calls_and_cache_tokens_are_prompt_tokens():
    message = anthropic_message(
        [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
        "tool_use",
        cache_creation_input_tokens=100,
        cache_read_input_tokens=300,
    )
    completion = anthropic_reply_to_openai(message, created=CREATED)
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    }
    assert completion["usage"] == {
        "prompt_tokens": 412,
        "completion_tokens": 7,
        "total_tokens": 419,
        "prompt_tokens_details": {"cached_tokens": 300},
    }


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ],
)
def test_a_chat_completion_reads_as_an_anthropic_message(finish_reason, stop_reason):
    message = {"role": "assistant", "content": "Hi.", "refusal": None, "annotations": []}
    assert openai_reply_to_anthropic(openai_completion(message, finish_reason)) == {
        "id": "chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o",
        "content": [{"type": "text", "text": "Hi."}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7},
    }


def test_tool_calls_in_a_completion_become_tool_use_and_cached_tokens_cache_reads():
    call = {
        "id": "call_9",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    completion = openai_completion(
        message, "tool_calls", prompt_tokens_details={"cached_tokens": 8, "audio_tokens": 0}
    )
    assert openai_reply_to_anthropic(completion) | {"id": None, "model": None} == {
        "id": None,
        "type": "message",
        "role": "assistant",
        "model": None,
        "content": [
            {"type": "tool_use", "id": "call_9", "name": "weather", "input": {"city": "Oslo"}}
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 7, "cache_read_input_tokens": 8},
    }


def test_a_reply_round_trips_with_its_usage_totals_intact():
    message = anthropic_message(
        [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}},
        ],
        "tool_use",
        cache_read_input_tokens=5,
    )
    back = openai_reply_to_anthropic(anthropic_reply_to_openai(message, created=CREATED))
    assert back == message | {
        "usage": {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 5}
    }


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (anthropic_message([], "pause_turn"), "stop_reason"),
        (anthropic_message([], None), "stop_reason"),
        (anthropic_message([{"type": "thinking", "thinking": "Hm."}]), "content[0].type"),
        (
            anthropic_message(
                [{"type": "text", "text": "x", "citations": [{"type": "char_location"}]}]
            ),
            "content[0].citations",
        ),
        (anthropic_message([], output_tokens="7"), "usage"),
    ],
)
def test_an_anthropic_reply_openai_has_no_words_for_is_refused(message, field):
    with pytest.raises(DialectError) as caught:
        anthropic_reply_to_openai(message, created=CREATED)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("completion", "field"),
    [
        (
            openai_completion({"role": "assistant", "content": "a"})
            | {"choices": [{"message": {"content": "a"}}, {"message": {"content": "b"}}]},
            "choices",
        ),
        (
            openai_completion({"role": "assistant", "content": None, "refusal": "No."}),
            "choices[0].message.refusal",
        ),
        (
            openai_completion({"role": "assistant", "content": "a"}, "function_call"),
            "choices[0].finish_reason",
        ),
        (
            openai_completion(
                {"role": "assistant", "content": "a"},
                prompt_tokens_details={"cached_tokens": 99},
            ),
            "usage.prompt_tokens_details.cached_tokens",
        ),
    ],
)
def test_a_completion_anthropic_has_no_words_for_is_refused(completion, field):
    with pytest.raises(DialectError) as caught:
        openai_reply_to_anthropic(completion)
    assert caught.value.field == field


def test_deepseek_reasoning_beside_the_answer_is_dropped():
    message = {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 is 4."}
    assert openai_reply_to_anthropic(openai_completion(message))["content"] == [
        {"type": "text", "text": "4"}
    ]


@pytest.mark.parametrize(
    ("anthropic", "openai"),
    [
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            {
                "error": {
                    "message": "Overloaded",
                    "type": "overloaded_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
        (
            {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}},
            {
                "error": {
                    "message": "Slow down.",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
        ),
        (
            {"type": "error", "error": {"type": "billing_error", "message": "No credit."}},
            {
                "error": {
                    "message": "No credit.",
                    "type": "billing_error",
                    "param": None,
                    "code": "insufficient_quota",
                }
            },
        ),
    ],
)
def test_error_bodies_cross_both_ways_and_mean_the_same(anthropic, openai):
    assert anthropic_error_to_openai(anthropic) == openai
    assert openai_error_to_anthropic(openai) == anthropic
    for status in (400, 429, 529):
        assert (
            classify_error_body(status, orjson.dumps(openai)).kind
            == classify_error_body(status, orjson.dumps(anthropic)).kind
        )
    said, meant = (
        classify_stream_event(orjson.dumps(openai)),
        classify_stream_event(orjson.dumps(anthropic)),
    )
    assert said is not None and meant is not None and said.kind == meant.kind


def test_openai_error_names_are_said_in_anthropic_words():
    def kind(error):
        return openai_error_to_anthropic({"error": error})["error"]["type"]

    assert kind({"type": "requests", "code": "rate_limit_exceeded"}) == "rate_limit_error"
    assert kind({"type": "insufficient_quota", "code": "insufficient_quota"}) == "billing_error"
    assert kind({"type": "server_error", "code": None}) == "api_error"
    assert kind({"type": "something_new"}) == "api_error"


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def anthropic_sse(*events):
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


def openai_sse(*chunks):
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def splits(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(how)
    cuts = sorted(rng.sample(range(1, len(data)), k=min(40, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def run(translator, data: bytes, how: str = "whole") -> bytes:
    return b"".join(translator.feed(chunk) for chunk in splits(data, how)) + translator.flush()


def events(data: bytes):
    """The SSE events of a translated stream, their data decoded (``[DONE]`` as is)."""
    parser = SSEParser()
    return [
        (e.event, e.data if e.data == "[DONE]" else orjson.loads(e.data))
        for e in parser.feed(data) + parser.flush()
    ]


HOW = ["whole", "bytes", "seed-1", "seed-2"]

ANTHROPIC_TEXT_STREAM = anthropic_sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Héllo"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " 🌍"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
)


def openai_chunk(delta, finish_reason=None, *, id="msg_01", model="claude-sonnet-4"):
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


@pytest.mark.parametrize("how", HOW)
def test_an_anthropic_text_stream_reads_as_openai_chunks_however_it_is_split(how):
    translator = AnthropicStreamToOpenAI(created=CREATED, include_usage=True)
    out = run(translator, ANTHROPIC_TEXT_STREAM, how)
    assert out == run(
        AnthropicStreamToOpenAI(created=CREATED, include_usage=True), ANTHROPIC_TEXT_STREAM
    )
    assert b"\n\n: ping\n\n" in out  # the keep-alive survives, as an SSE comment
    usage_chunk = openai_chunk({}) | {"choices": []}
    usage_chunk["usage"] = {
        "prompt_tokens": 30,
        "completion_tokens": 15,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert events(out) == [
        (None, openai_chunk({"role": "assistant", "content": ""})),
        (None, openai_chunk({"content": "Héllo"})),
        (None, openai_chunk({"content": " 🌍"})),
        (None, openai_chunk({}, "stop")),
        (None, usage_chunk),
        (None, "[DONE]"),
    ]
    assert translator.usage == (30, 15)
    assert translator.done


def test_without_include_usage_the_stream_has_no_usage_chunk_but_the_usage_is_known():
    translator = AnthropicStreamToOpenAI(created=CREATED, include_usage=False)
    out = events(run(translator, ANTHROPIC_TEXT_STREAM))
    assert [data for _, data in out][-2:] == [openai_chunk({}, "stop"), "[DONE]"]
    assert translator.usage == (30, 15)


def test_crlf_line_ends_split_between_cr_and_lf_are_read():
    crlf = ANTHROPIC_TEXT_STREAM.replace(b"\n", b"\r\n")
    cut = crlf.index(b"\r\n") + 1
    translator = AnthropicStreamToOpenAI(created=CREATED, include_usage=False)
    out = translator.feed(crlf[:cut]) + translator.feed(crlf[cut:]) + translator.flush()
    assert out == run(
        AnthropicStreamToOpenAI(created=CREATED, include_usage=False), ANTHROPIC_TEXT_STREAM
    )


ANTHROPIC_TOOL_STREAM = anthropic_sse(
    {
        "type": "message_start",
        "message": {"id": "msg_02", "model": "claude-sonnet-4", "usage": {"input_tokens": 40}},
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hm."}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ""},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Os'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": 'lo"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_b", "name": "time", "input": {}},
    },
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 30}},
    {"type": "message_stop"},
)


@pytest.mark.parametrize("how", HOW)
def test_an_anthropic_tool_stream_reads_as_openai_tool_call_fragments(how):
    translator = AnthropicStreamToOpenAI(created=CREATED, include_usage=False)
    out = events(run(translator, ANTHROPIC_TOOL_STREAM, how))

    def chunk(delta, finish=None):
        return (None, openai_chunk(delta, finish, id="msg_02"))

    def start(index, id, name):
        function = {"name": name, "arguments": ""}
        return chunk(
            {"tool_calls": [{"index": index, "id": id, "type": "function", "function": function}]}
        )

    def arguments(index, text):
        return chunk({"tool_calls": [{"index": index, "function": {"arguments": text}}]})

    assert out == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hm."}),
        start(0, "toolu_a", "weather"),
        arguments(0, '{"city": "Os'),
        arguments(0, 'lo"}'),
        start(1, "toolu_b", "time"),
        chunk({}, "tool_calls"),
        (None, "[DONE]"),
    ]
    assert translator.usage == (40, 30)


def test_an_overloaded_error_mid_stream_becomes_openais_error_and_ends_the_stream():
    # The simulated upstream's own overloaded stream: message_start, then the error event.
    parsed = Parsed(prompt_tokens=9, max_tokens=100, stream=True, include_usage=True, model="c")
    upstream = AnthropicDialect(max_concurrency=None).stream(parsed, 1, 0, 0, overloaded=True)
    translator = AnthropicStreamToOpenAI(created=CREATED, include_usage=True)
    out = run(translator, upstream + ANTHROPIC_TEXT_STREAM, "bytes")
    error = {
        "error": {
            "message": "Overloaded",
            "type": "overloaded_error",
            "param": None,
            "code": None,
        }
    }
    assert events(out) == [
        (None, openai_chunk({"role": "assistant", "content": ""}, id="msg_sim1", model="c")),
        (None, error),
    ]
    assert translator.done
    assert translator.usage == (9, 1)  # what message_start said, for the caller to charge
    verdict = classify_stream_event(orjson.dumps(error))
    assert verdict is not None and verdict.kind is Outcome.OVERLOADED


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
            "content_block_start.content_block.type",
        ),
        (
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "{"},
            },
            "content_block_delta.index",
        ),
        (
            {"type": "message_delta", "delta": {"stop_reason": "pause_turn"}},
            "message_delta.delta.stop_reason",
        ),
        ({"type": "surprise"}, "stream"),
    ],
)
def test_an_anthropic_stream_event_openai_has_no_words_for_is_refused(event, field):
    translator = AnthropicStreamToOpenAI(created=CREATED, include_usage=False)
    with pytest.raises(DialectError) as caught:
        run(translator, anthropic_sse(event))
    assert caught.value.field == field


def test_a_stream_event_that_is_not_json_is_refused():
    with pytest.raises(DialectError, match="not JSON") as caught:
        AnthropicStreamToOpenAI(created=CREATED, include_usage=False).feed(b"data: {oops\n\n")
    assert caught.value.field == "stream"


def test_a_simulated_openai_stream_reads_as_anthropic_events_split_a_byte_at_a_time():
    parsed = Parsed(prompt_tokens=9, max_tokens=100, stream=True, include_usage=True, model="g")
    upstream = OpenAIDialect(max_concurrency=None).stream(parsed, 3, 20, CREATED)
    translator = OpenAIStreamToAnthropic()
    out = events(run(translator, upstream, "bytes"))
    names = [name for name, _ in out]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert out[0][1]["message"] == {
        "id": "chatcmpl-sim3",
        "type": "message",
        "role": "assistant",
        "model": "g",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    text = "".join(data["delta"]["text"] for name, data in out if name == "content_block_delta")
    assert text == "tok " * 20
    assert out[5][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 9, "output_tokens": 20},
    }
    assert translator.usage == (9, 20) and translator.done


def oa(delta, finish_reason=None):
    return {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def oa_tool(index, arguments, id=None, name=None):
    call = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        call |= {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return oa({"tool_calls": [call]})


OPENAI_TOOL_STREAM = openai_sse(
    oa({"role": "assistant", "content": None}),
    oa({"content": "Let me see."}),
    oa_tool(0, "", id="call_a", name="weather"),
    oa_tool(0, '{"city":'),
    oa_tool(0, '"Oslo"}'),
    oa_tool(1, "{}", id="call_b", name="time"),
    oa({}, "tool_calls"),
    {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-4o",
        "choices": [],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 22,
            "total_tokens": 72,
            "prompt_tokens_details": {"cached_tokens": 10},
        },
    },
)


@pytest.mark.parametrize("how", HOW)
def test_an_openai_tool_stream_reads_as_anthropic_blocks(how):
    translator = OpenAIStreamToAnthropic()
    out = events(run(translator, OPENAI_TOOL_STREAM, how))

    def ev(data):
        return (data["type"], data)

    def delta(index, delta):
        return ev({"type": "content_block_delta", "index": index, "delta": delta})

    def json_delta(index, text):
        return delta(index, {"type": "input_json_delta", "partial_json": text})

    def tool(index, id, name):
        block = {"type": "tool_use", "id": id, "name": name, "input": {}}
        return ev({"type": "content_block_start", "index": index, "content_block": block})

    assert out[1:] == [
        ev(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        delta(0, {"type": "text_delta", "text": "Let me see."}),
        ev({"type": "content_block_stop", "index": 0}),
        tool(1, "call_a", "weather"),
        json_delta(1, '{"city":'),
        json_delta(1, '"Oslo"}'),
        ev({"type": "content_block_stop", "index": 1}),
        tool(2, "call_b", "time"),
        json_delta(2, "{}"),
        ev({"type": "content_block_stop", "index": 2}),
        ev(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"input_tokens": 40, "output_tokens": 22, "cache_read_input_tokens": 10},
            }
        ),
        ev({"type": "message_stop"}),
    ]
    assert translator.usage == (50, 22)


def test_an_openai_error_mid_stream_becomes_anthropics_error_event():
    upstream = (
        b"data: " + orjson.dumps(oa({"role": "assistant", "content": "Hi"})) + b"\n\n"
        b'data: {"error": {"message": "Rate limit reached.", "type": "requests", '
        b'"code": "rate_limit_exceeded"}}\n\n'
        b"data: [DONE]\n\n"
    )
    translator = OpenAIStreamToAnthropic()
    out = events(run(translator, upstream, "seed-3"))
    assert [name for name, _ in out] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert out[-1][1] == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limit reached."},
    }
    assert translator.done and translator.usage is None


def test_an_openai_stream_without_usage_ends_with_zero_output_and_no_usage():
    translator = OpenAIStreamToAnthropic()
    out = events(run(translator, openai_sse(oa({"content": "x"}), oa({}, "length"))))
    assert out[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 0},
    }
    assert translator.usage is None


@pytest.mark.parametrize(
    ("stream", "field"),
    [
        (openai_sse(oa({"content": "x"})), "stream"),  # [DONE] before any finish reason
        (
            openai_sse(
                oa_tool(0, "", id="a", name="f"), oa_tool(1, "", id="b", name="g"), oa_tool(0, "1")
            ),
            "choices[0].delta.tool_calls[0].index",
        ),
        (openai_sse(oa({"refusal": "No."})), "choices[0].delta.refusal"),
        (openai_sse(oa({}, "function_call")), "choices[0].finish_reason"),
        (
            openai_sse(oa({}) | {"choices": [oa({})["choices"][0]] * 2}),
            "choices",
        ),
    ],
)
def test_an_openai_stream_anthropic_has_no_words_for_is_refused(stream, field):
    with pytest.raises(DialectError) as caught:
        run(OpenAIStreamToAnthropic(), stream)
    assert caught.value.field == field


@pytest.mark.parametrize("how", HOW)
def test_a_stream_round_trips_anthropic_to_openai_to_anthropic(how):
    as_openai = run(
        AnthropicStreamToOpenAI(created=CREATED, include_usage=True), ANTHROPIC_TOOL_STREAM, how
    )
    back = events(run(OpenAIStreamToAnthropic(), as_openai, how))
    original = events(ANTHROPIC_TOOL_STREAM)
    # The same blocks, deltas and ends; the message's figures arrive at its end instead.
    content = {"content_block_start", "content_block_delta", "content_block_stop"}
    assert [e for e in back if e[0] in content] == [
        e for e in original if e[0] in content and e[1].get("delta", {}).get("partial_json") != ""
    ]
    assert back[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 40, "output_tokens": 30},
    }
