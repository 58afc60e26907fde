"""The token cost of a request: the estimate before, the usage after."""

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.tokens import (
    MAX_USAGE_TOKENS,
    estimate_tokens,
    output_allowance,
    reply_usage,
    usage_from_mapping,
    usage_split,
    usage_tokens,
)


def test_the_estimate_is_a_quarter_of_the_body_plus_the_output_cap():
    body = {"messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 50}
    size = len(orjson.dumps(body))
    assert estimate_tokens(size, body, default_output_tokens=256) == -(-size // 4) + 50
    assert output_allowance({"max_completion_tokens": 7}, default_output_tokens=256) == 7
    assert output_allowance({"max_tokens": True}, default_output_tokens=256) == 256
    assert output_allowance(None, default_output_tokens=256) == 256


@pytest.mark.parametrize(
    ("usage", "split"),
    [
        ({"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}, (30, 12)),
        ({"input_tokens": 30, "output_tokens": 12}, (30, 12)),
        (  # Anthropic's cache writes and reads are input
            {"input_tokens": 5, "cache_creation_input_tokens": 20,
             "cache_read_input_tokens": 100, "output_tokens": 12},
            (125, 12),
        ),
        ({"prompt_tokens": -3, "completion_tokens": "9"}, None),  # garbage: no reading
        ({"total_tokens": 42}, None),
    ],
)
def test_usage_splits_into_input_and_output(usage, split):
    assert usage_split(usage) == split
    assert usage_from_mapping(usage) == (None if split is None else sum(split))


def test_usage_is_read_from_a_reply_body_and_garbage_is_none():
    assert usage_tokens(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == 7
    assert usage_tokens(b'{"usage": [1, 2]}') is None
    assert usage_tokens(b'{"usage": ') is None
    assert usage_tokens(b"{}") is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 2**63, "completion_tokens": 1},
        {"input_tokens": 10, "output_tokens": 5e7},
        {"input_tokens": 10, "output_tokens": 50_000_000},
        {"input_tokens": 10, "cache_read_input_tokens": -5, "output_tokens": 3},
        {"prompt_tokens": 12.5, "completion_tokens": 1},
        {"prompt_tokens": float("nan"), "completion_tokens": 1},
        {"prompt_tokens": float("inf"), "completion_tokens": 1},
        {"prompt_tokens": "12", "completion_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": 1},
        {"prompt_tokens": [], "completion_tokens": {}},
        {"prompt_tokens": MAX_USAGE_TOKENS, "completion_tokens": 1},
    ],
)
def test_a_usage_no_reply_could_mean_is_no_reading_so_the_estimate_stands(usage):
    assert usage_split(usage) is None
    assert usage_from_mapping(usage) is None
    # As a reply body too (the standard library writes NaN and Infinity, which orjson refuses).
    assert usage_tokens(json.dumps({"usage": usage}).encode()) is None


def test_an_integral_float_and_an_absent_or_null_field_still_read():
    assert usage_split({"prompt_tokens": 12.0, "completion_tokens": None}) == (12, 0)
    assert usage_split({"output_tokens": 7}) == (0, 7)
    assert usage_split({"input_tokens": MAX_USAGE_TOKENS, "output_tokens": 0}) == (
        MAX_USAGE_TOKENS,
        0,
    )


@pytest.mark.parametrize(
    "body",
    ['{"usage": {"prompt_tokens": 3}}', None, 42, b'{"usage": 1' + b"0" * 5_000 + b"}"],
)
def test_reply_usage_takes_text_or_bytes_and_refuses_the_rest_without_raising(body):
    expected = (3, 0) if isinstance(body, str) else None
    assert reply_usage(body) == expected


USAGE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
USAGE_KEYS = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "total_tokens",
    ]
)


@given(usage=st.dictionaries(USAGE_KEYS | st.text(max_size=5), USAGE_VALUES))
def test_any_usage_reads_as_whole_bounded_counts_or_none(usage):
    split = usage_split(usage)
    if split is not None:
        used_in, used_out = split
        assert type(used_in) is int and type(used_out) is int
        assert min(used_in, used_out) >= 0
        assert used_in + used_out <= MAX_USAGE_TOKENS
    total = usage_from_mapping(usage)
    assert total == (None if split is None else sum(split))


def test_a_streams_usage_keeps_the_largest_counts_its_events_report():
    from asyncquota.tokens import StreamUsage

    usage = StreamUsage()
    for data in (
        '{"type": "message_start", "message": {"usage": {"input_tokens": 30, '
        '"cache_read_input_tokens": 10, "output_tokens": 1}}}',
        '{"type": "content_block_delta", "delta": {"text": "no usage here"}}',
        '{"type": "message_delta", "usage": {"output_tokens": 70}}',
        "not json, but it says \"usage\"",
        '{"usage": {"input_tokens": -5}}',  # garbage: ignored, not a reset
    ):
        usage.feed(data)
    assert (usage.input, usage.output, usage.total) == (40, 70, 110)


def test_an_events_usage_is_found_in_openai_and_anthropic_shapes():
    from asyncquota.tokens import event_usage

    assert event_usage('{"choices": [], "usage": {"prompt_tokens": 9}}') == {"prompt_tokens": 9}
    assert event_usage('{"message": {"usage": {"input_tokens": 3}}}') == {"input_tokens": 3}
    assert event_usage('{"usage": null}') is None
    assert event_usage("[DONE]") is None
