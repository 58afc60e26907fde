"""The proxy's pure parts: its [proxy] table, its keys, and how each refusal is said."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from asyncquota.errors import (
    BudgetExceededError,
    BusyError,
    DeadlineExceededError,
    NoRouteError,
    OverloadedError,
    QueueFullError,
    QuotaExhaustedError,
    TenantLimitError,
    ThrottledError,
    TransportError,
    UpstreamError,
)
from asyncquota.governance import ConfigError
from asyncquota.governance.tiers import DimensionStatus
from asyncquota.priority import Priority
from asyncquota.proxy import Keys, parse_proxy
from asyncquota.proxy.auth import presented_key
from asyncquota.proxy.replies import ProxyError, error_body, rate_headers, refusal_of

KEY = {"name": "web", "key_env": "WEB_KEY", "tenant": "acme"}


def test_the_table_takes_its_defaults_and_reads_a_keys_class():
    settings = parse_proxy({"keys": [{**KEY, "max_priority": "batch"}]})
    assert settings.max_body_bytes == 4 * 1024 * 1024
    assert settings.request_timeout == 600.0
    assert settings.keys[0].max_priority == Priority.BATCH
    assert settings.keys[0].key_env == "WEB_KEY"


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({}, "proxy.keys must list at least one key"),
        ({"keys": [KEY], "max_body_byte": 5}, "proxy.max_body_byte is not a known field; did "
         "you mean max_body_bytes?"),
        ({"keys": [KEY], "request_timeout": 0}, "proxy.request_timeout must be a number"),
        ({"keys": [{**KEY, "key_sha256": "ab" * 32}]}, "exactly one of key_env and key_sha256"),
        ({"keys": [{"name": "web", "tenant": "acme"}]}, "exactly one of key_env and key_sha256"),
        ({"keys": [{**KEY, "tenant": ""}]}, "proxy.keys[0].tenant must be a non-empty string"),
        ({"keys": [{**KEY, "max_priority": "urgent"}]}, "proxy.keys[0].max_priority: Unknown"),
        ({"keys": [KEY, {**KEY, "key_env": "OTHER"}]}, "proxy.keys[1].name repeats"),
    ],
)
def test_a_wrong_table_is_refused_naming_the_field(table, words):
    with pytest.raises(ConfigError, match=None) as refused:
        parse_proxy(table)
    assert words in str(refused.value)


@pytest.mark.parametrize("field", ["key_env", "key_sha256"])
def test_a_key_pasted_where_its_name_or_digest_belongs_is_never_shown(field):
    secret = "sk-live-0123456789"
    key = {"name": "web", "tenant": "acme", field: secret}
    with pytest.raises(ConfigError) as refused:
        parse_proxy({"keys": [key]})
    assert secret not in str(refused.value)


def test_keys_are_found_by_digest_from_the_environment_or_the_file():
    digest = hashlib.sha256(b"sk-batch").hexdigest()
    settings = parse_proxy({"keys": [KEY, {"name": "jobs", "key_sha256": digest,
                                           "tenant": "ops", "max_priority": "batch"}]})
    keys = Keys.from_specs(settings.keys, {"WEB_KEY": "sk-web"})
    web, jobs = keys.find("sk-web"), keys.find("sk-batch")
    assert web is not None and (web.name, web.tenant) == ("web", "acme")
    assert jobs is not None and jobs.max_priority == Priority.BATCH
    assert keys.find("sk-we") is None and keys.find("") is None and keys.find(None) is None
    assert "sk-web" not in repr(keys) + repr(web) and digest not in repr(jobs)


def test_a_key_whose_variable_is_unset_is_named_at_start():
    with pytest.raises(ValueError, match="'WEB_KEY', which is not set"):
        Keys.from_specs(parse_proxy({"keys": [KEY]}).keys, {})


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "bearer  sk-1 "}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"Authorization": "Basic abc", "x-api-key": "sk-2"}, "sk-2"),
        ({"Authorization": "Bearer"}, None),
        ({}, None),
    ],
)
def test_the_presented_key_is_a_bearer_token_or_x_api_key(headers, key):
    assert presented_key(headers) == key


@pytest.mark.parametrize(
    ("error", "status", "should_retry", "code"),
    [
        (TenantLimitError("over", dimension="tpm", retry_after=2.5), 429, "true",
         "rate_limit_exceeded"),
        (ThrottledError("429", status=429, retry_after=1.0), 429, "true", "rate_limit_exceeded"),
        (ThrottledError("429", status=429), 429, "false", "rate_limit_exceeded"),
        (BudgetExceededError("spent", retry_after=86400.0), 429, "false", "insufficient_quota"),
        (QuotaExhaustedError("gone", status=429), 429, "false", "insufficient_quota"),
        (BusyError("busy", retry_after=0.25), 503, "true", "busy"),
        (QueueFullError("full"), 503, "false", "queue_full"),
        (OverloadedError("529", status=529, retry_after=3.0), 503, "true", "overloaded"),
        (NoRouteError("none"), 400, "false", "no_route"),
        (DeadlineExceededError("late"), 504, "false", "deadline_exceeded"),
        (TransportError("reset"), 502, "false", "transport"),
        (UpstreamError("401", status=401), 502, "false", "upstream_auth"),
    ],
)
def test_each_refusal_has_the_status_and_headers_the_sdks_read(
    error, status, should_retry, code
):
    refusal = refusal_of(error)
    headers = refusal.headers()
    assert (refusal.status, headers["x-should-retry"], refusal.code) == (
        status, should_retry, code
    )
    if error.retry_after is None:
        assert "Retry-After" not in headers and "retry-after-ms" not in headers
    else:
        assert headers["retry-after-ms"] == str(round(error.retry_after * 1000))
        assert int(headers["Retry-After"]) >= error.retry_after
    openai_error = orjson.loads(error_body("openai", refusal))["error"]
    assert openai_error["message"] == refusal.message and openai_error["code"] == code
    anthropic_error = orjson.loads(error_body("anthropic", refusal))
    assert anthropic_error["type"] == "error"


def test_a_tenant_over_its_tokens_is_told_in_openais_tokens_type():
    refusal = refusal_of(TenantLimitError("over", dimension="tpm", retry_after=1))
    assert orjson.loads(error_body("openai", refusal))["error"]["type"] == "tokens"
    assert orjson.loads(error_body("anthropic", refusal))["error"]["type"] == "rate_limit_error"


def test_an_upstreams_own_error_json_passes_as_it_said_it():
    said = b'{"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}'
    refusal = refusal_of(UpstreamError("400", status=400, body=said))
    assert refusal.status == 400
    assert orjson.loads(error_body("openai", refusal)) == orjson.loads(said)
    cut = refusal_of(UpstreamError("400", status=400, body=said[:30]))
    assert orjson.loads(error_body("openai", cut))["error"]["message"] == "400"


def test_a_refusal_rounds_its_wait_up_never_to_zero_seconds_early():
    headers = ProxyError(429, "x", retry_after=0.2).headers()
    assert headers["Retry-After"] == "1" and headers["retry-after-ms"] == "200"


def test_rate_headers_say_the_tightest_window_of_each_kind():
    now = 1_000.0
    dims = [
        DimensionStatus("rpm", used=5, limit=60, remaining=55, resets_at=now + 30),
        DimensionStatus("rpd", used=999.4, limit=1000, remaining=0.6, resets_at=now + 3600),
        DimensionStatus("tpm", used=100, limit=40_000, remaining=39_900, resets_at=now + 0.25),
    ]
    assert rate_headers(dims, now) == {
        "x-ratelimit-limit-requests": "1000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1h0m0s",
        "x-ratelimit-limit-tokens": "40000",
        "x-ratelimit-remaining-tokens": "39900",
        "x-ratelimit-reset-tokens": "250ms",
    }
    assert rate_headers([], now) == {}
