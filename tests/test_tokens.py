"""The token cost of a request: the estimate before, the usage after."""

import orjson
import pytest

from asyncquota.tokens import (
    estimate_tokens,
    output_allowance,
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
        ({"prompt_tokens": -3, "completion_tokens": "9"}, (0, 0)),  # garbage counts nothing
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
