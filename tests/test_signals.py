"""What the upstream says, read right: Retry-After, rate-limit headers, error bodies."""

import json
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from asyncquota.signals import (
    MAX_BODY_CHARS,
    MAX_COUNT,
    MAX_REGAIN,
    MAX_RETRY_AFTER,
    MESSAGE_EXCERPT_CHARS,
    Classification,
    Outcome,
    QuotaSnapshot,
    QuotaWindow,
    classify_error_body,
    classify_stream_event,
    names_concurrency,
    parse_count,
    parse_duration,
    parse_http_date,
    parse_rate_limit_headers,
    parse_retry_after,
    retry_after_form,
)

# 2026-11-27T22:40:00Z, the "now" every timestamp below is read against.
NOW = datetime(2026, 11, 27, 22, 40, 0, tzinfo=UTC).timestamp()

# ---------------------------------------------------------------------------------------------
# Real-looking replies
# ---------------------------------------------------------------------------------------------

OPENAI_HEADERS = {
    "Content-Type": "application/json",
    "openai-processing-ms": "370",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "1999985",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "6m0s",
}

ANTHROPIC_HEADERS = {
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-11-27T22:40:05Z",
    "anthropic-ratelimit-tokens-limit": "480000",
    "anthropic-ratelimit-tokens-remaining": "0",
    "anthropic-ratelimit-tokens-reset": "2026-11-27T22:40:30Z",
    "anthropic-ratelimit-input-tokens-limit": "400000",
    "anthropic-ratelimit-input-tokens-remaining": "0",
    "anthropic-ratelimit-input-tokens-reset": "2026-11-27T22:40:30Z",
    "anthropic-ratelimit-output-tokens-limit": "80000",
    "anthropic-ratelimit-output-tokens-remaining": "80000",
    "anthropic-ratelimit-output-tokens-reset": "2026-11-27T22:40:00Z",
    "retry-after": "30",
    "request-id": "req_018EeWyXxfu5pfWkrYcMdjWG",
}

OPENAI_RATE_LIMITED = (
    b'{"error": {"message": "Rate limit reached for gpt-4o in organization org-abc on '
    b'requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.",'
    b' "type": "requests", "param": null, "code": "rate_limit_exceeded"}}'
)
OPENAI_INSUFFICIENT_QUOTA = (
    b'{"error": {"message": "You exceeded your current quota, please check your plan and '
    b'billing details.", "type": "insufficient_quota", "param": null, '
    b'"code": "insufficient_quota"}}'
)
OPENAI_QUOTA_AS_TYPE_ONLY = (
    b'{"error": {"message": "You exceeded your current quota.", '
    b'"type": "insufficient_quota", "param": null, "code": null}}'
)
OPENAI_BILLING_LIMIT = (
    b'{"error": {"message": "Billing hard limit has been reached", '
    b'"type": "invalid_request_error", "param": null, "code": "billing_hard_limit_reached"}}'
)
OPENAI_REQUEST_TOO_LARGE = (
    b'{"error": {"message": "Request too large for gpt-4 in organization org-abc on tokens '
    b"per min (TPM): Limit 10000, Requested 36985. The input or output tokens must be "
    b'reduced in order to run successfully.", "type": "tokens", "param": null, '
    b'"code": "rate_limit_exceeded"}}'
)
OPENAI_SERVER_ERROR = (
    b'{"error": {"message": "The server had an error while processing your request. '
    b'Sorry about that!", "type": "server_error", "param": null, "code": null}}'
)
OPENAI_OVERLOADED_503 = (
    b'{"error": {"message": "The engine is currently overloaded, please try again later",'
    b' "type": "server_error", "param": null, "code": null}}'
)
OPENAI_BAD_REQUEST = (
    b'{"error": {"message": "This model\'s maximum context length is 128000 tokens.", '
    b'"type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}'
)
ANTHROPIC_RATE_LIMITED = (
    b'{"type": "error", "error": {"type": "rate_limit_error", "message": "This request '
    b'would exceed the rate limit for your organization of 50 requests per minute."}}'
)
ANTHROPIC_OVERLOADED = (
    b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},'
    b'"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}'
)
ANTHROPIC_API_ERROR = b'{"type":"error","error":{"type":"api_error","message":"Internal error"}}'
ANTHROPIC_NO_CREDIT = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance '
    b"is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
    b'purchase credits."}}'
)
ANTHROPIC_BILLING = (
    b'{"type":"error","error":{"type":"billing_error","message":"Payment method declined."}}'
)
ANTHROPIC_AUTH = (
    b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
)
# As Anthropic sends it (anthropics/claude-code#2127, #38035), the date varying.
ANTHROPIC_SPEND_CAP = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"You have reached '
    b'your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC."},'
    b'"request_id":"req_011CZLrUfBVkVHn5T6EqQaf7"}'
)
# The monthly spend limit as a rate_limit_error (can1357/oh-my-pi#5418).
ANTHROPIC_MONTHLY_SPEND_LIMIT = (
    b'{"type":"error","error":{"type":"rate_limit_error","message":"This request would '
    b"exceed your account's monthly spend limit. Please try again later.\"}}"
)
ANTHROPIC_BAD_REQUEST = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: '
    b'Field required"}}'
)
# DeepSeek's 402 (as relayed in Aider-AI/aider#4851).
DEEPSEEK_NO_BALANCE = (
    b'{"error":{"message":"Insufficient Balance","type":"unknown_error","param":null,'
    b'"code":"invalid_request_error"}}'
)
ANTHROPIC_MESSAGE = (
    b'{"id":"msg_01","type":"message","role":"assistant","content":[{"type":"text","text":'
    b'"An \\"error\\" is when something goes wrong."}],"stop_reason":"end_turn"}'
)


def gemini_429(quota_id: str, retry_delay: str = "26s") -> bytes:
    return orjson.dumps(
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota, please check your plan and "
                "billing details.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/"
                                "generate_content_free_tier_requests",
                                "quotaId": quota_id,
                                "quotaDimensions": {"location": "global", "model": "gemini"},
                                "quotaValue": "15",
                            }
                        ],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.Help",
                        "links": [{"description": "Learn more", "url": "https://ai.google.dev"}],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": retry_delay,
                    },
                ],
            }
        }
    )


GEMINI_PER_MINUTE = gemini_429("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
GEMINI_PER_DAY = gemini_429("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
GEMINI_WRAPPED_IN_LIST = b"[" + gemini_429("GenerateContentInputTokensPerModelPerMinute") + b"]"
GEMINI_UNAVAILABLE = (
    b'{"error": {"code": 503, "message": "The model is overloaded. Please try again later.",'
    b' "status": "UNAVAILABLE"}}'
)
# Gemini Code Assist names its per-day quota only in an ErrorInfo (google-gemini/gemini-cli#10513).
CODE_ASSIST_PER_DAY = orjson.dumps(
    {
        "error": {
            "code": 429,
            "message": "Quota exceeded for quota metric 'Gemini 2.5 Pro Requests' and limit "
            "'Gemini 2.5 Pro Requests per day per user per tier' of service "
            "'cloudcode-pa.googleapis.com' for consumer 'project_number:681255809395'.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "RATE_LIMIT_EXCEEDED",
                    "domain": "googleapis.com",
                    "metadata": {
                        "quota_metric": "cloudcode-pa.googleapis.com/gemini_2_5_pro_requests",
                        "quota_limit": "Gemini25ProRequestsPerDayPerUserPerTier",
                    },
                }
            ],
        }
    }
)
HTML_BAD_GATEWAY = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


# ---------------------------------------------------------------------------------------------
# parse_duration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("20ms", 0.02),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),  # MICRO SIGN
        ("250μs", 0.00025),  # GREEK SMALL LETTER MU
        ("500ns", 5e-7),
        ("0.5s", 0.5),
        (".5s", 0.5),
        ("1.5h", 5400.0),
        ("0s", 0.0),
        ("7.66s", 7.66),
        ("12", 12.0),
        ("1.25", 1.25),
        ("0", 0.0),
        (" 2s ", 2.0),
    ],
)
def test_go_durations_and_plain_numbers_are_read_as_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "-1s", "-3", "1S", "1d", "1 s", "ms", "1s2", "nan", "inf", "1e3s", "٣s"]
)
def test_what_is_not_a_non_negative_go_duration_is_none(text):
    assert parse_duration(text) is None


def test_a_duration_too_large_for_a_float_is_none_rather_than_infinite():
    assert parse_duration("9" * 400 + "s") is None
    assert parse_duration("9" * 400) is None


# ---------------------------------------------------------------------------------------------
# parse_retry_after
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        # retry-after-ms takes precedence, even over a longer retry-after.
        ({"retry-after-ms": "120", "retry-after": "1"}, 0.12),
        # A broken retry-after-ms falls back to retry-after.
        ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),
        ({"retry-after-ms": "-5", "retry-after": "4"}, 4.0),
        ({"retry-after-ms": "nan", "retry-after": "4"}, 4.0),
        # HTTP dates, against NOW = Fri, 27 Nov 2026 22:40:00 GMT.
        ({"retry-after": "Fri, 27 Nov 2026 22:40:12 GMT"}, 12.0),
        ({"retry-after": "Friday, 27-Nov-26 22:41:00 GMT"}, 60.0),  # RFC 850
        ({"retry-after": "Fri Nov 27 22:40:05 2026"}, 5.0),  # asctime, no zone: GMT
        ({"retry-after": "Fri, 27 Nov 2026 22:39:00 GMT"}, 0.0),  # in the past: now
        ({"retry-after": "Sun, 06 Nov 1994 08:49:37 GMT"}, 0.0),
        # Absurd waits are clamped.
        ({"retry-after": "31536000"}, MAX_RETRY_AFTER),
        ({"retry-after": "1e999"}, MAX_RETRY_AFTER),
        ({"retry-after": "9" * 400}, MAX_RETRY_AFTER),
        ({"retry-after-ms": "1e12"}, MAX_RETRY_AFTER),
        ({"retry-after": "Fri, 01 Jan 2100 00:00:00 GMT"}, MAX_RETRY_AFTER),
        # Garbage says nothing.
        ({"retry-after": "-3"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "Infinity"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "Fri, 31 Feb 2026 22:40:12 GMT"}, None),
        ({"retry-after-ms": "250"} | {"retry-after": "x"}, 0.25),
        ({"retry-after-ms": "garbage"}, None),
        ({}, None),
        ({"x-ratelimit-reset-requests": "1s"}, None),
    ],
)
def test_retry_after_rules(headers, expected):
    assert parse_retry_after(headers, now=NOW) == expected


def test_an_http_date_is_resolved_against_the_now_given_not_the_clock():
    headers = {"Retry-After": "Fri, 27 Nov 2026 22:40:12 GMT"}
    assert parse_retry_after(headers, now=NOW - 8) == 20.0
    assert parse_retry_after(headers, now=NOW + 12) == 0.0
    assert parse_retry_after(headers, now=float("nan")) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "7", "Content-Type": "application/json"},
        {"RETRY-AFTER": "7"},
        CIMultiDict([("Retry-After", "7"), ("Retry-After", "99")]),
        CIMultiDictProxy(CIMultiDict({"retry-AFTER": "7"})),
        [("ReTry-AfTeR", "7"), ("retry-after", "99")],  # first value of a repeated name wins
        (("Retry-After", "7"),),
    ],
)
def test_header_names_match_whatever_their_case_and_container(headers):
    assert parse_retry_after(headers, now=NOW) == 7.0


def test_malformed_header_containers_read_as_no_headers():
    assert parse_retry_after([("retry-after",), 5, ("retry-after", "3")], now=NOW) == 3.0  # type: ignore[list-item]
    # Raw header bytes are read as Latin-1, as HTTP reads them.
    assert parse_retry_after({b"retry-after": b"3"}, now=NOW) == 3.0  # type: ignore[dict-item]
    assert parse_retry_after(None, now=NOW) is None  # type: ignore[arg-type]
    assert parse_retry_after(42, now=NOW) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# parse_rate_limit_headers
# ---------------------------------------------------------------------------------------------


def test_openai_headers_give_request_and_token_windows_with_go_duration_resets():
    snap = parse_rate_limit_headers(OPENAI_HEADERS, now=NOW)
    assert snap.provider == "openai"
    assert snap.requests == QuotaWindow(limit=10000, remaining=9999, reset_after=0.006)
    assert snap.tokens == QuotaWindow(limit=2_000_000, remaining=1_999_985, reset_after=360.0)
    assert snap.input_tokens.is_empty and snap.output_tokens.is_empty
    assert snap.retry_after is None
    assert not snap.is_empty
    assert snap.requests.fraction_remaining == pytest.approx(0.9999)


def test_anthropic_headers_give_four_windows_with_rfc3339_resets_against_now():
    snap = parse_rate_limit_headers(ANTHROPIC_HEADERS, now=NOW)
    assert snap.provider == "anthropic"
    assert snap.requests == QuotaWindow(limit=4000, remaining=3999, reset_after=5.0)
    assert snap.tokens == QuotaWindow(limit=480_000, remaining=0, reset_after=30.0)
    assert snap.input_tokens == QuotaWindow(limit=400_000, remaining=0, reset_after=30.0)
    assert snap.output_tokens == QuotaWindow(limit=80_000, remaining=80_000, reset_after=0.0)
    assert snap.retry_after == 30.0
    # The tightest window decides how tight the snapshot is.
    assert snap.fraction_remaining == 0.0
    assert snap.output_tokens.fraction_remaining == 1.0


def test_azure_remaining_minus_one_means_unknown_not_exhausted():
    snap = parse_rate_limit_headers(
        {
            "x-ratelimit-remaining-requests": "-1",
            "x-ratelimit-remaining-tokens": "-1",
            "x-ratelimit-limit-requests": "60",
        },
        now=NOW,
    )
    assert snap.provider == "openai"
    assert snap.requests == QuotaWindow(limit=60, remaining=None, reset_after=None)
    assert snap.tokens.is_empty
    assert snap.requests.fraction_remaining is None
    assert snap.fraction_remaining is None
    assert snap.retry_after is None


def test_a_reply_without_quota_headers_is_an_empty_snapshot():
    deepseek = {"Content-Type": "application/json", "x-ds-trace-id": "abc", "server": "cdn"}
    snap = parse_rate_limit_headers(deepseek, now=NOW)
    assert snap == QuotaSnapshot()
    assert snap.is_empty
    assert snap.provider is None
    assert snap.fraction_remaining is None


def test_a_retry_after_alone_makes_a_snapshot_non_empty():
    snap = parse_rate_limit_headers({"Retry-After": "7"}, now=NOW)
    assert snap.retry_after == 7.0
    assert not snap.is_empty
    assert snap.provider is None


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("59", 59),
        ("59.0", 59),
        (" 60 ", 60),
        ("59.9", 59),
        ("0", 0),
        ("1e3", 1000),
        ("-1", None),
        ("-0.5", None),
        ("nan", None),
        ("inf", None),
        ("many", None),
        ("", None),
        ("9" * 400, None),
    ],
)
def test_counts_are_non_negative_integers_or_none(value, count):
    snap = parse_rate_limit_headers({"X-RateLimit-Remaining-Requests": value}, now=NOW)
    assert snap.requests.remaining == count
    assert snap.provider == "openai"


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [
        ("2026-11-27T22:40:05Z", 5.0),
        ("2026-11-27T22:40:05.250Z", 5.25),
        ("2026-11-27T22:40:05.123456789Z", 5.123456789),
        ("2026-11-27t22:40:05z", 5.0),
        ("2026-11-27 22:40:05Z", 5.0),
        ("2026-11-28T00:40:05+02:00", 5.0),
        ("2026-11-27T17:10:05-05:30", 5.0),
        ("2026-11-27T22:39:59Z", 0.0),  # already reset
        ("2026-11-27T22:40:59.5+00:00", 59.5),
        ("2030-01-01T00:00:00Z", MAX_RETRY_AFTER),
        ("1s", 1.0),  # a proxy writing OpenAI's dialect under Anthropic's names
        ("2026-13-27T22:40:05Z", None),
        ("2026-11-27T22:40:05+24:00", None),
        ("2026-11-27T22:40:05", None),  # no zone: not RFC 3339
        ("2026-11-27", None),
        ("0000-01-01T00:00:00Z", None),
        ("tomorrow", None),
    ],
)
def test_anthropic_resets_are_rfc3339_with_offsets_and_fractions(reset, seconds):
    headers = {"anthropic-ratelimit-requests-reset": reset}
    snap = parse_rate_limit_headers(headers, now=NOW)
    assert snap.provider == "anthropic"
    if seconds is None:
        assert snap.requests.reset_after is None
    else:
        assert snap.requests.reset_after == pytest.approx(seconds, abs=1e-6)


def test_a_leap_second_is_one_second_after_59():
    snap = parse_rate_limit_headers(
        {"anthropic-ratelimit-tokens-reset": "2026-11-27T22:40:60Z"}, now=NOW
    )
    assert snap.tokens.reset_after == 60.0


def test_openai_resets_in_the_past_or_absurd_are_bounded():
    snap = parse_rate_limit_headers(
        {"x-ratelimit-reset-requests": "0s", "x-ratelimit-reset-tokens": "100000h"}, now=NOW
    )
    assert snap.requests.reset_after == 0.0
    assert snap.tokens.reset_after == MAX_RETRY_AFTER


def test_anthropic_headers_win_when_a_proxy_sends_both_dialects():
    snap = parse_rate_limit_headers(
        {"x-ratelimit-limit-requests": "10", "anthropic-ratelimit-requests-limit": "50"}, now=NOW
    )
    assert snap.provider == "anthropic"
    assert snap.requests.limit == 50


def test_case_insensitive_rate_limit_headers_in_a_multidict():
    headers = CIMultiDictProxy(CIMultiDict({k.upper(): v for k, v in OPENAI_HEADERS.items()}))
    assert parse_rate_limit_headers(headers, now=NOW) == parse_rate_limit_headers(
        OPENAI_HEADERS, now=NOW
    )


def test_fraction_remaining_of_a_window():
    assert QuotaWindow(limit=100, remaining=25).fraction_remaining == 0.25
    assert QuotaWindow(limit=0, remaining=0).fraction_remaining == 0.0
    # Anthropic rounds remaining tokens to the nearest thousand, so it can top the limit.
    assert QuotaWindow(limit=1500, remaining=2000).fraction_remaining == 1.0
    assert QuotaWindow(limit=100).fraction_remaining is None
    assert QuotaWindow(remaining=5, reset_after=1.0).fraction_remaining is None


# ---------------------------------------------------------------------------------------------
# classify_error_body
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        # Successes, including one whose text mentions "error".
        (200, b'{"id":"chatcmpl-1","object":"chat.completion"}', Outcome.SUCCESS, None),
        (200, ANTHROPIC_MESSAGE, Outcome.SUCCESS, None),
        (200, b'{"error": null, "result": 1}', Outcome.SUCCESS, None),
        (201, b"", Outcome.SUCCESS, None),
        (204, None, Outcome.SUCCESS, None),
        # A 200 whose body is Anthropic's error envelope.
        (200, ANTHROPIC_OVERLOADED, Outcome.OVERLOADED, "overloaded_error"),
        (200, ANTHROPIC_RATE_LIMITED, Outcome.THROTTLED, "rate_limit_error"),
        (200, ANTHROPIC_API_ERROR, Outcome.RETRYABLE, "api_error"),
        (200, ANTHROPIC_AUTH, Outcome.FATAL, "authentication_error"),
        # Rate limiting.
        (429, OPENAI_RATE_LIMITED, Outcome.THROTTLED, "rate_limit_exceeded"),
        (429, ANTHROPIC_RATE_LIMITED, Outcome.THROTTLED, "rate_limit_error"),
        (429, GEMINI_PER_MINUTE, Outcome.THROTTLED, "RESOURCE_EXHAUSTED"),
        (429, GEMINI_WRAPPED_IN_LIST, Outcome.THROTTLED, "RESOURCE_EXHAUSTED"),
        (429, b"", Outcome.THROTTLED, None),
        (429, b"Too Many Requests", Outcome.THROTTLED, None),
        (429, b'{"error": "Rate limit exceeded"}', Outcome.THROTTLED, None),
        # Out of quota: do not retry.
        (429, OPENAI_INSUFFICIENT_QUOTA, Outcome.QUOTA_EXHAUSTED, "insufficient_quota"),
        (429, OPENAI_QUOTA_AS_TYPE_ONLY, Outcome.QUOTA_EXHAUSTED, "insufficient_quota"),
        (429, OPENAI_BILLING_LIMIT, Outcome.QUOTA_EXHAUSTED, "billing_hard_limit_reached"),
        (429, GEMINI_PER_DAY, Outcome.QUOTA_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (400, ANTHROPIC_NO_CREDIT, Outcome.QUOTA_EXHAUSTED, "invalid_request_error"),
        (402, ANTHROPIC_BILLING, Outcome.QUOTA_EXHAUSTED, "billing_error"),
        (402, b"", Outcome.QUOTA_EXHAUSTED, None),
        (400, ANTHROPIC_SPEND_CAP, Outcome.QUOTA_EXHAUSTED, "invalid_request_error"),
        (429, ANTHROPIC_MONTHLY_SPEND_LIMIT, Outcome.QUOTA_EXHAUSTED, "rate_limit_error"),
        (403, OPENAI_INSUFFICIENT_QUOTA, Outcome.QUOTA_EXHAUSTED, "insufficient_quota"),
        (402, DEEPSEEK_NO_BALANCE, Outcome.QUOTA_EXHAUSTED, "invalid_request_error"),
        (429, CODE_ASSIST_PER_DAY, Outcome.QUOTA_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (200, ANTHROPIC_SPEND_CAP, Outcome.QUOTA_EXHAUSTED, "invalid_request_error"),
        # One request larger than the whole window: waiting never helps.
        (429, OPENAI_REQUEST_TOO_LARGE, Outcome.FATAL, "rate_limit_exceeded"),
        # Overloaded.
        (529, ANTHROPIC_OVERLOADED, Outcome.OVERLOADED, "overloaded_error"),
        (503, OPENAI_OVERLOADED_503, Outcome.OVERLOADED, "server_error"),
        (503, GEMINI_UNAVAILABLE, Outcome.OVERLOADED, "UNAVAILABLE"),
        (500, ANTHROPIC_OVERLOADED, Outcome.OVERLOADED, "overloaded_error"),
        (503, b"", Outcome.OVERLOADED, None),
        # Transient.
        (500, OPENAI_SERVER_ERROR, Outcome.RETRYABLE, "server_error"),
        (500, ANTHROPIC_API_ERROR, Outcome.RETRYABLE, "api_error"),
        (502, HTML_BAD_GATEWAY, Outcome.RETRYABLE, None),
        (504, b"upstream request timeout", Outcome.RETRYABLE, None),
        (408, b"", Outcome.RETRYABLE, None),
        (409, b"", Outcome.RETRYABLE, None),
        (520, b"", Outcome.RETRYABLE, None),
        # Refused: a generic server-error name does not make a 4xx retryable.
        (400, OPENAI_BAD_REQUEST, Outcome.FATAL, "context_length_exceeded"),
        (400, ANTHROPIC_BAD_REQUEST, Outcome.FATAL, "invalid_request_error"),
        (400, b'{"error":{"type":"server_error"}}', Outcome.FATAL, "server_error"),
        (401, ANTHROPIC_AUTH, Outcome.FATAL, "authentication_error"),
        (403, b"Forbidden", Outcome.FATAL, None),
        (404, b'{"detail": "Not Found"}', Outcome.FATAL, None),
        (
            413,
            b'{"type":"error","error":{"type":"request_too_large"}}',
            Outcome.FATAL,
            "request_too_large",
        ),
        (
            422,
            b'{"object":"error","message":"bad","type":"BadRequestError","code":422}',
            Outcome.FATAL,
            "BadRequestError",
        ),
        (301, b"", Outcome.FATAL, None),
        (0, b"", Outcome.FATAL, None),
        (999, b"", Outcome.FATAL, None),
    ],
)
def test_classification_table(status, body, kind, code):
    result = classify_error_body(status, body)
    assert result.kind is kind
    assert result.code == code
    # A str body classifies exactly like its bytes.
    if body is not None:
        assert classify_error_body(status, body.decode("utf-8", "replace")) == result


@pytest.mark.parametrize(
    ("kind", "retryable", "congestion"),
    [
        (Outcome.SUCCESS, False, False),
        (Outcome.THROTTLED, True, True),
        (Outcome.OVERLOADED, True, True),
        (Outcome.RETRYABLE, True, False),
        (Outcome.QUOTA_EXHAUSTED, False, False),
        (Outcome.FATAL, False, False),
    ],
)
def test_which_outcomes_are_retryable_and_which_are_congestion(kind, retryable, congestion):
    assert Classification(kind).retryable is retryable
    assert Classification(kind).congestion is congestion


def test_messages_are_kept_as_excerpts():
    result = classify_error_body(429, ANTHROPIC_RATE_LIMITED)
    assert result.message == (
        "This request would exceed the rate limit for your organization of 50 requests per minute."
    )
    long = orjson.dumps({"error": {"message": "  " + "x" * 5000, "code": "rate_limit_exceeded"}})
    message = classify_error_body(429, long).message
    assert message is not None
    assert len(message) == MESSAGE_EXCERPT_CHARS
    assert message == "x" * (MESSAGE_EXCERPT_CHARS - 1) + "…"
    assert classify_error_body(404, b'{"detail": "Not Found"}').message == "Not Found"
    assert classify_error_body(429, b'{"error": "Rate limit exceeded"}').message == (
        "Rate limit exceeded"
    )
    assert classify_error_body(502, HTML_BAD_GATEWAY).message is None


def test_retry_after_comes_from_the_headers_first():
    result = classify_error_body(
        429, GEMINI_PER_MINUTE, {"Retry-After-Ms": "1500", "Retry-After": "2"}, now=NOW
    )
    assert result.retry_after == 1.5


def test_retry_after_falls_back_to_geminis_retry_info():
    assert classify_error_body(429, GEMINI_PER_MINUTE).retry_after == 26.0
    assert classify_error_body(429, GEMINI_PER_MINUTE, {"server": "x"}, now=NOW).retry_after == 26.0
    body = gemini_429("GenerateContentInputTokensPerModelPerMinute", retry_delay="0.750s")
    assert classify_error_body(429, body).retry_after == 0.75
    assert classify_error_body(429, gemini_429("PerMinute", "eventually")).retry_after is None
    assert classify_error_body(429, gemini_429("PerMinute", "999999h")).retry_after == (
        MAX_RETRY_AFTER
    )


def test_a_per_day_gemini_quota_still_reports_its_retry_delay():
    result = classify_error_body(429, GEMINI_PER_DAY)
    assert result.kind is Outcome.QUOTA_EXHAUSTED
    assert result.retry_after == 26.0
    assert not result.retryable


def test_per_day_quota_is_recognised_in_the_metric_name_too():
    body = orjson.dumps(
        {
            "error": {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {"quotaMetric": "aiplatform.googleapis.com/requests_per_day"}
                        ],
                    }
                ],
            }
        }
    )
    assert classify_error_body(429, body).kind is Outcome.QUOTA_EXHAUSTED


def test_a_retry_after_date_needs_now_but_seconds_do_not():
    headers = {"Retry-After": "Fri, 27 Nov 2026 22:40:12 GMT"}
    assert classify_error_body(503, b"", headers, now=NOW).retry_after == 12.0
    assert classify_error_body(503, b"", headers).retry_after is None
    assert classify_error_body(503, b"", {"Retry-After": "12"}).retry_after == 12.0


@pytest.mark.parametrize(
    ("headers", "form"),
    [
        ({"retry-after-ms": "250", "retry-after": "1"}, "ms"),
        ({"retry-after-ms": "soon", "retry-after": "1"}, "whole-seconds"),  # ms unreadable
        ({"Retry-After": "7"}, "whole-seconds"),
        ({"retry-after": "1e999"}, "whole-seconds"),  # clamped to a day by the parser
        ({"retry-after": "0.25"}, "seconds"),
        ({"retry-after": "Fri, 27 Nov 2026 22:40:12 GMT"}, "date"),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "next tuesday"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_the_form_of_a_retry_after_says_how_finely_it_was_stated(headers, form):
    assert retry_after_form(headers) == form
    # Always the value parse_retry_after reads: a form only where a value is.
    assert (parse_retry_after(headers or {}, now=NOW) is None) is (form is None)


def test_anthropic_529_with_headers():
    result = classify_error_body(529, ANTHROPIC_OVERLOADED, ANTHROPIC_HEADERS, now=NOW)
    assert result == Classification(
        Outcome.OVERLOADED, retry_after=30.0, code="overloaded_error", message="Overloaded"
    )
    assert result.congestion and result.retryable


@pytest.mark.parametrize(
    ("status", "body", "header", "retryable"),
    [
        (429, OPENAI_RATE_LIMITED, "false", False),
        (503, b"", "False", False),
        (500, OPENAI_SERVER_ERROR, "false", False),
        (400, OPENAI_BAD_REQUEST, "true", True),
        (500, OPENAI_SERVER_ERROR, " TRUE ", True),
        (500, OPENAI_SERVER_ERROR, "maybe", True),  # unreadable: no override
        (400, OPENAI_BAD_REQUEST, "maybe", False),
        # An explicit "out of credit" is more specific than a generic hint.
        (429, OPENAI_INSUFFICIENT_QUOTA, "true", False),
        # Nothing to retry after a success.
        (200, b"{}", "true", False),
    ],
)
def test_x_should_retry_overrides_retryable(status, body, header, retryable):
    result = classify_error_body(status, body, {"X-Should-Retry": header}, now=NOW)
    assert result.retryable is retryable


def test_x_should_retry_does_not_change_congestion():
    result = classify_error_body(429, OPENAI_RATE_LIMITED, {"x-should-retry": "false"})
    assert result.should_retry is False
    assert result.kind is Outcome.THROTTLED
    assert result.congestion


def test_a_large_success_body_is_not_parsed():
    body = b'{"type":"error","error":{"type":"overloaded_error"},"pad":"' + b"x" * MAX_BODY_CHARS
    assert classify_error_body(200, body + b'"}').kind is Outcome.SUCCESS
    assert classify_error_body(529, body + b'"}').code is None


# ---------------------------------------------------------------------------------------------
# Exhaustion: what ran out, and when it comes back
# ---------------------------------------------------------------------------------------------


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


VERTEX_PER_DAY = orjson.dumps(
    {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"quotaMetric": "aiplatform.googleapis.com/requests_per_day"}],
                }
            ],
        }
    }
)


@pytest.mark.parametrize(
    ("status", "body", "reason", "regain_at"),
    [
        (
            400,
            ANTHROPIC_SPEND_CAP,
            "Anthropic spend cap reached; regain 2026-12-01T00:00Z",
            utc(2026, 12, 1),
        ),
        (429, ANTHROPIC_MONTHLY_SPEND_LIMIT, "Anthropic monthly spend limit reached", None),
        (400, ANTHROPIC_NO_CREDIT, "Anthropic credit balance too low", None),
        (429, OPENAI_INSUFFICIENT_QUOTA, "OpenAI quota exhausted (insufficient_quota)", None),
        (403, OPENAI_INSUFFICIENT_QUOTA, "OpenAI quota exhausted (insufficient_quota)", None),
        (
            429,
            OPENAI_BILLING_LIMIT,
            "Billing stopped the account (billing_hard_limit_reached)",
            None,
        ),
        (402, ANTHROPIC_BILLING, "Billing stopped the account (billing_error)", None),
        # NOW is 14:40 on Nov 27 in California: the Gemini API's day ends at 08:00 UTC.
        (
            429,
            GEMINI_PER_DAY,
            "Gemini per-day quota exhausted; regain 2026-11-28T08:00Z",
            utc(2026, 11, 28, 8),
        ),
        # Other Google services do not document when their days end: no regain time.
        (429, VERTEX_PER_DAY, "Google per-day quota exhausted", None),
        (429, CODE_ASSIST_PER_DAY, "Google per-day quota exhausted", None),
        (402, DEEPSEEK_NO_BALANCE, "Insufficient balance", None),
        (402, b"", "Payment required (HTTP 402)", None),
        (402, b"<html>Payment Required</html>", "Payment required (HTTP 402)", None),
    ],
)
def test_each_providers_quota_gone_is_exhaustion_with_its_reason_and_regain(
    status, body, reason, regain_at
):
    result = classify_error_body(status, body, {"date": "Fri, 27 Nov 2026 22:40:00 GMT"}, now=NOW)
    assert result.kind is Outcome.QUOTA_EXHAUSTED
    assert (result.reason, result.regain_at) == (reason, regain_at)
    assert not result.retryable and not result.congestion


def test_a_per_day_gemini_refusal_keeps_its_retry_delay_beside_the_regain():
    result = classify_error_body(429, GEMINI_PER_DAY, now=NOW)
    assert (result.retry_after, result.regain_at) == (26.0, utc(2026, 11, 28, 8))


def test_a_gemini_regain_needs_the_replys_time_and_follows_californias_clock():
    assert classify_error_body(429, GEMINI_PER_DAY).regain_at is None
    assert classify_error_body(429, GEMINI_PER_DAY).reason == "Gemini per-day quota exhausted"
    # Summer (PDT, UTC-7): midnight is 07:00 UTC.
    assert classify_error_body(429, GEMINI_PER_DAY, now=utc(2026, 7, 1, 12)).regain_at == utc(
        2026, 7, 2, 7
    )
    # 23:30 PST on the eve of the spring change: the next day starts at 08:00 UTC as before.
    assert classify_error_body(429, GEMINI_PER_DAY, now=utc(2026, 3, 8, 7, 30)).regain_at == (
        utc(2026, 3, 8, 8)
    )
    # Just after midnight Pacific: a whole day to wait.
    assert classify_error_body(429, GEMINI_PER_DAY, now=utc(2026, 11, 28, 8, 0, 1)).regain_at == (
        utc(2026, 11, 29, 8)
    )
    assert classify_error_body(429, GEMINI_PER_DAY, now=float("nan")).regain_at is None


def anthropic_400(message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    )


CAP = "You have reached your specified API usage limits. You will regain access on "


@pytest.mark.parametrize(
    ("when", "regain_at"),
    [
        ("2026-12-01 at 00:00 UTC.", utc(2026, 12, 1)),
        ("2026-12-1 at 0:00 UTC", utc(2026, 12, 1)),
        ("2026-12-01T00:00:00Z.", utc(2026, 12, 1)),
        ("2026-12-01 at 00:00:30 UTC.", utc(2026, 12, 1, 0, 0, 30)),
        ("2026-12-01, 17:45 GMT.", utc(2026, 12, 1, 17, 45)),
        ("December 1, 2026 at 00:00 UTC.", utc(2026, 12, 1)),
        ("Dec 1st, 2026 at 12:00 AM UTC.", utc(2026, 12, 1)),
        ("Dec. 1 2026 at 1:30 p.m. UTC.", utc(2026, 12, 1, 13, 30)),
        ("1 December 2026 at 00:00 UTC.", utc(2026, 12, 1)),
        ("1st of Sept 2026 at 00:00 +00:00.", utc(2026, 9, 1)),
    ],
)
def test_the_spend_caps_regain_date_is_read_in_the_forms_a_person_writes_it(when, regain_at):
    result = classify_error_body(400, anthropic_400(CAP + when), now=NOW)
    assert result.kind is Outcome.QUOTA_EXHAUSTED
    assert result.regain_at == regain_at


@pytest.mark.parametrize(
    "when",
    [
        "2026-02-31 at 00:00 UTC.",  # no such day
        "2026-13-01 at 00:00 UTC.",
        "2026-12-01 at 24:00 UTC.",
        "2026-12-01 at 00:61 UTC.",
        "2026-12-01 at 13:00 PM UTC.",
        "2026-12-01 at 00:00 PST.",  # a zone not UTC: not guessed
        "2026-12-01 at 00:00.",  # no zone at all
        "2026-12-01.",  # no time
        "Smarch 1, 2026 at 00:00 UTC.",
        "the first of next month.",
        "\u0662\u0660\u0662\u0666-12-01 at 00:00 UTC.",  # other scripts' digits
        "",
    ],
)
def test_a_malformed_regain_date_gives_exhaustion_without_a_regain(when):
    result = classify_error_body(400, anthropic_400(CAP + when), now=NOW)
    assert result.kind is Outcome.QUOTA_EXHAUSTED
    assert (result.regain_at, result.reason) == (None, "Anthropic spend cap reached")


def test_a_regain_beyond_a_month_ahead_is_not_believed_and_one_past_is_kept():
    far = classify_error_body(400, anthropic_400(CAP + "2099-01-01 at 00:00 UTC."), now=NOW)
    assert (far.kind, far.regain_at) == (Outcome.QUOTA_EXHAUSTED, None)
    bound = NOW + MAX_REGAIN
    stamp = datetime.fromtimestamp(bound, UTC).strftime("%Y-%m-%d at %H:%M UTC")
    assert classify_error_body(400, anthropic_400(CAP + stamp), now=NOW).regain_at == bound
    past = classify_error_body(400, anthropic_400(CAP + "2026-11-01 at 00:00 UTC."), now=NOW)
    assert past.regain_at == utc(2026, 11, 1)
    # A stated date needs no now.
    assert classify_error_body(400, ANTHROPIC_SPEND_CAP).regain_at == utc(2026, 12, 1)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, ANTHROPIC_BAD_REQUEST),
        (400, OPENAI_BAD_REQUEST),
        (
            400,
            b'{"type":"error","error":{"type":"invalid_request_error","message":"Your '
            b'usage limits are per model."}}',
        ),
        (429, ANTHROPIC_RATE_LIMITED),
        (429, GEMINI_PER_MINUTE),
        (529, ANTHROPIC_OVERLOADED),
        (200, b'{"id":"chatcmpl-1"}'),
    ],
)
def test_other_replies_carry_no_reason_and_no_regain(status, body):
    result = classify_error_body(status, body, now=NOW)
    assert result.kind is not Outcome.QUOTA_EXHAUSTED
    assert (result.reason, result.regain_at) == (None, None)


def test_a_spent_account_reported_inside_a_stream_is_exhaustion_with_its_regain():
    result = classify_stream_event(ANTHROPIC_SPEND_CAP)
    assert result is not None
    assert (result.kind, result.regain_at) == (Outcome.QUOTA_EXHAUSTED, utc(2026, 12, 1))
    assert result.reason == "Anthropic spend cap reached; regain 2026-12-01T00:00Z"
    per_day = classify_stream_event(GEMINI_PER_DAY, now=NOW)
    assert per_day is not None
    assert per_day.regain_at == utc(2026, 11, 28, 8)
    overloaded = classify_stream_event(ANTHROPIC_OVERLOADED)
    assert overloaded is not None
    assert overloaded.reason is None


@pytest.mark.parametrize(
    ("data", "kind", "code"),
    [
        (
            '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            Outcome.OVERLOADED,
            "overloaded_error",
        ),
        (
            b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}',
            Outcome.THROTTLED,
            "rate_limit_error",
        ),
        (
            b'{"type":"error","error":{"type":"api_error","message":"Internal server error"}}',
            Outcome.RETRYABLE,
            "api_error",
        ),
        (
            b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}',
            Outcome.FATAL,
            "invalid_request_error",
        ),
        (
            b'{"error":{"message":"The server had an error","type":"server_error","code":null}}',
            Outcome.RETRYABLE,
            "server_error",
        ),
        (b'{"type":"error"}', Outcome.FATAL, None),
    ],
)
def test_stream_error_events_are_classified(data, kind, code):
    result = classify_stream_event(data)
    assert result is not None
    assert result.kind is kind
    assert result.code == code


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"error"}}',
        b'{"type":"message_stop"}',
        b'{"type":"ping"}',
        b'{"id":"chatcmpl-1","choices":[{"delta":{"content":"Hi"}}]}',
        b"[DONE]",
        b"",
        "not json",
        b"\xff\xfe",
    ],
)
def test_ordinary_stream_events_are_not_errors(data):
    assert classify_stream_event(data) is None


# ---------------------------------------------------------------------------------------------
# Nothing raises, whatever arrives
# ---------------------------------------------------------------------------------------------

REAL_HEADER_NAMES = [
    "retry-after",
    "Retry-After",
    "retry-after-ms",
    "x-should-retry",
    *OPENAI_HEADERS,
    *ANTHROPIC_HEADERS,
]
HEADER_VALUES = st.one_of(
    st.text(),
    st.sampled_from(
        [
            "-1",
            "0",
            "59.0",
            "1e999",
            "nan",
            "inf",
            "6m0s",
            "1h2m3.5s",
            "-1s",
            "2026-11-27T22:40:05Z",
            "9999-12-31T23:59:60.999+23:59",
            "Fri, 27 Nov 2026 22:40:12 GMT",
            "Fri Nov 27 22:40:05 2026",
            "true",
            # What a hostile upstream sends: digits str.isdigit() accepts and int() refuses,
            # other scripts' digits, numbers too long for int(), absurd waits and dates.
            "²",
            "¹²³",
            "٣٤",
            "1" * 5000,
            "9" * 20,
            "1e12",
            "1000h",
            "99999999999999999999h",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 01 Jan 0001 00:00:00 GMT",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59",
            "\x00\r\n",
        ]
    ),
    st.floats().map(str),
    st.integers().map(str),
    st.integers(min_value=10**12, max_value=10**400).map(str),
)
HEADER_NAMES = st.text() | st.sampled_from(REAL_HEADER_NAMES)
HEADERS = st.one_of(
    st.dictionaries(HEADER_NAMES, HEADER_VALUES),
    st.lists(st.tuples(st.sampled_from(REAL_HEADER_NAMES) | st.text(), HEADER_VALUES)),
    # Raw bytes, as a server library may hand them over (read as Latin-1).
    st.lists(
        st.tuples(
            st.sampled_from(REAL_HEADER_NAMES).map(str.encode) | st.binary(),
            st.binary() | HEADER_VALUES.map(lambda v: v.encode("utf-8", "surrogatepass")),
        )
    ),
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES)).map(
        lambda pairs: CIMultiDictProxy(CIMultiDict(pairs))
    ),
)
NOWS = st.floats(allow_nan=True, allow_infinity=True) | st.just(NOW)

KEYS = st.sampled_from(
    [
        "error",
        "type",
        "code",
        "status",
        "message",
        "details",
        "@type",
        "violations",
        "quotaId",
        "quotaMetric",
        "retryDelay",
        "detail",
        "metadata",
        "quota_limit",
    ]
) | st.text(max_size=8)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "error",
            "overloaded_error",
            "rate_limit_error",
            "insufficient_quota",
            "RESOURCE_EXHAUSTED",
            "PerDay",
            "generativelanguage.googleapis.com/requests_per_day",
            "type.googleapis.com/google.rpc.ErrorInfo",
            CAP + "2026-12-01 at 00:00 UTC.",
            CAP + "9999-12-31 at 23:59 UTC.",
            CAP + "0001-01-01 at 00:00 UTC.",
            "Insufficient Balance",
            "26s",
            "-1s",
            "type.googleapis.com/google.rpc.RetryInfo",
            "type.googleapis.com/google.rpc.QuotaFailure",
        ]
    ),
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)
BODIES = st.one_of(
    st.none(),
    st.binary(),
    st.text(),
    JSONISH.map(json.dumps),
    JSONISH.map(lambda doc: json.dumps(doc).encode()),
)


def in_range(seconds):
    return seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER


@given(headers=HEADERS, now=NOWS)
def test_any_headers_parse_without_raising_into_values_in_range(headers, now):
    assert in_range(parse_retry_after(headers, now=now))
    snap = parse_rate_limit_headers(headers, now=now)
    assert in_range(snap.retry_after)
    for window in snap.windows:
        assert window.limit is None or 0 <= window.limit <= MAX_COUNT
        assert window.remaining is None or 0 <= window.remaining <= MAX_COUNT
        assert in_range(window.reset_after)
        fraction = window.fraction_remaining
        assert fraction is None or 0.0 <= fraction <= 1.0


@given(
    status=st.integers(min_value=-1, max_value=1000) | st.sampled_from([200, 429, 503, 529]),
    body=BODIES,
    headers=st.none() | HEADERS,
    now=st.none() | NOWS,
)
def test_any_reply_classifies_without_raising(status, body, headers, now):
    result = classify_error_body(status, body, headers, now=now)
    assert isinstance(result.kind, Outcome)
    assert in_range(result.retry_after)
    assert result.message is None or len(result.message) <= MESSAGE_EXCERPT_CHARS
    assert result.code is None or len(result.code) <= MESSAGE_EXCERPT_CHARS
    assert isinstance(result.retryable, bool)
    assert result.congestion is (result.kind in (Outcome.THROTTLED, Outcome.OVERLOADED))
    assert_exhaustion_is_sound(result, now)


def assert_exhaustion_is_sound(result: Classification, now: float | None) -> None:
    """A reason exactly for exhaustion; a regain only with it, and never past belief."""
    assert (result.reason is not None) is (result.kind is Outcome.QUOTA_EXHAUSTED)
    assert result.reason is None or len(result.reason) < 100
    if result.regain_at is not None:
        assert result.kind is Outcome.QUOTA_EXHAUSTED
        if now is not None:
            assert result.regain_at - now <= MAX_REGAIN


@given(data=BODIES.filter(lambda body: body is not None), now=st.none() | NOWS)
def test_any_stream_payload_classifies_without_raising(data, now):
    result = classify_stream_event(data, now=now)
    assert result is None or in_range(result.retry_after)
    if result is not None:
        assert_exhaustion_is_sound(result, now)


@given(text=st.text() | st.from_regex(r"(\d{0,3}(\.\d{0,3})?(ns|us|µs|ms|s|m|h)){1,4}"))
def test_any_text_parses_as_a_duration_or_none(text):
    seconds = parse_duration(text)
    assert seconds is None or 0.0 <= seconds < float("inf")


@given(text=st.none() | st.text() | st.binary() | HEADER_VALUES)
def test_any_value_reads_as_a_bounded_count_a_duration_or_a_date_or_none(text):
    count = parse_count(text)
    assert count is None or (type(count) is int and 0 <= count <= MAX_COUNT)
    if text is not None:
        seconds = parse_duration(text)
        assert seconds is None or 0.0 <= seconds < float("inf")
    stamp = parse_http_date(text)
    assert stamp is None or isinstance(stamp, float)


@pytest.mark.parametrize(
    "value", ["²", "¹²³", "٣", "1" * 5000, "1e400", "-1", "nan", "inf", str(MAX_COUNT + 1)]
)
def test_a_count_no_provider_could_mean_is_no_count(value):
    snap = parse_rate_limit_headers(
        {"x-ratelimit-remaining-requests": value, "x-ratelimit-limit-requests": value}, now=NOW
    )
    assert snap.requests == QuotaWindow()
    assert parse_count(value) is None


def test_counts_read_as_integers_up_to_the_bound_from_text_or_bytes():
    assert parse_count("59") == 59
    assert parse_count(b"59.9") == 59
    assert parse_count(str(MAX_COUNT)) == MAX_COUNT
    assert parse_count(b"\xff\xfe") is None


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"x-ratelimit-reset-requests": "1000h"}, "requests"),
        ({"x-ratelimit-reset-tokens": "99999999999999999999h"}, "tokens"),
        ({"anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59Z"}, "requests"),
    ],
)
def test_a_reset_of_a_thousand_hours_or_a_far_future_date_is_clamped_to_a_day(headers, field):
    window = getattr(parse_rate_limit_headers(headers, now=NOW), field)
    assert window.reset_after == MAX_RETRY_AFTER == 86_400.0


def test_a_retry_info_delay_of_centuries_is_clamped_to_a_day():
    body = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "9" * 300 + "s"}
            ],
        }
    }
    assert classify_error_body(429, orjson.dumps(body)).retry_after == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"error":' * 5_000 + b"1" + b"}" * 5_000,
        "[" * 3_000 + "]" * 3_000,
        b'{"error": {"type": "overloaded_error", "message": "' + b"\xff" * 100 + b'"}}',
        b'{"error": {"code": 1' + b"0" * 5_000 + b"}}",
    ],
    ids=["open-brackets", "nested-errors", "nested-lists", "not-utf8", "huge-number"],
)
def test_deep_huge_or_undecodable_bodies_leave_the_status_to_decide(body):
    assert classify_error_body(503, body).kind is Outcome.OVERLOADED
    assert classify_error_body(200, body).kind is Outcome.SUCCESS
    assert classify_stream_event(body) is None


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ("Number of concurrent connections has exceeded your rate limit.", True),  # Anthropic
        ("Too many concurrent requests: the concurrency limit of 48 is reached.", True),
        ("CONCURRENCY limit reached", True),
        ("Rate limit reached for gpt-4o on requests per min (RPM): Limit 3, Used 3.", False),
        ("nonconcurrent wording", False),
        ("", False),
        (None, False),
    ],
)
def test_a_message_naming_concurrency_is_told_from_a_rate(message: str | None, named: bool):
    assert names_concurrency(message) is named
