"""The simulated upstream behaves like a rate-limited LLM provider, to the millisecond."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import gc
import random
import statistics
import time
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from asyncquota.signals import Outcome, classify_error_body, format_duration
from asyncquota.testing import PRESETS, SimulatedUpstream, UpstreamConfig, run_in_process
from asyncquota.testing.buckets import ScheduledBucket
from asyncquota.testing.replies import retry_after_headers
from asyncquota.testing.upstream import spend_cap_body
from asyncquota.transport import Request, Response

EPOCH = 1_700_000_000.0  # 2023-11-14T22:13:20Z
OPENAI = "http://upstream/v1/chat/completions"
ANTHROPIC = "http://upstream/v1/messages"


def now() -> float:
    return asyncio.get_running_loop().time()


def virtual_wall_clock() -> float:
    return EPOCH + asyncio.get_running_loop().time()


def fixed_wall_clock() -> float:
    return EPOCH


def config(**overrides: Any) -> UpstreamConfig:
    """A fast upstream (no latency, plenty of quota) unless the test says otherwise."""
    fields: dict[str, Any] = {
        "rps": 1000.0, "latency_base": 0.0, "latency_per_token": 0.0,
        "retry_after_style": "ms", "wall_clock": fixed_wall_clock,
    }
    fields.update(overrides)
    return UpstreamConfig(**fields)


def chat(
    content: str = "hello", *, max_tokens: int = 8, url: str = OPENAI, **extra: Any
) -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, **extra}
    return Request("POST", url, body=orjson.dumps(body))


def message(content: str = "hello", *, max_tokens: int = 8, **extra: Any) -> Request:
    return chat(content, max_tokens=max_tokens, url=ANTHROPIC, **extra)


async def send_many(
    upstream: SimulatedUpstream, n: int, request: Request | None = None
) -> list[int]:
    return [(await upstream.handle(request or chat())).status for _ in range(n)]


def retry_after_ms(response: Response) -> int:
    return int(response.headers["retry-after-ms"])


def sse_data(body: bytes) -> list[str]:
    return [line[len("data: "):] for line in body.decode().split("\n") if line.startswith("data: ")]


# -- quotas ------------------------------------------------------------------------------


async def test_the_request_bucket_admits_a_burst_of_rps_then_rps_per_second():
    upstream = SimulatedUpstream(config(rps=10, count_rejected=False))
    assert await send_many(upstream, 11) == [200] * 10 + [429]
    await asyncio.sleep(0.1)
    assert await send_many(upstream, 2) == [200, 429]
    await asyncio.sleep(1.0)
    assert await send_many(upstream, 11) == [200] * 10 + [429]
    await asyncio.sleep(0.5)
    assert await send_many(upstream, 6) == [200] * 5 + [429]


async def test_a_longer_burst_window_holds_more_requests():
    upstream = SimulatedUpstream(config(rps=10, burst_seconds=3.0, count_rejected=False))
    assert await send_many(upstream, 31) == [200] * 30 + [429]


async def test_the_schedule_halves_then_restores_capacity_at_its_times():
    upstream = SimulatedUpstream(
        config(rps=10, schedule=((2.0, 0.5), (4.0, 1.0)), count_rejected=False)
    )
    await upstream.handle(chat())  # the upstream's clock starts here, at t=0
    await asyncio.sleep(1.0)
    assert await send_many(upstream, 11) == [200] * 10 + [429]
    await asyncio.sleep(2.1)  # t=3.1: capacity 5
    assert await send_many(upstream, 6) == [200] * 5 + [429]
    await asyncio.sleep(0.8)  # t=3.9: 0.8 s at 5/s gave 4 requests
    assert await send_many(upstream, 4) == [200] * 4
    refused = await upstream.handle(chat())
    # Half a request by t=4 at 5/s, the other half by t=4.05 at 10/s.
    assert retry_after_ms(refused) == 150
    await asyncio.sleep(0.149)
    assert (await upstream.handle(chat())).status == 429
    await asyncio.sleep(0.001)
    assert (await upstream.handle(chat())).status == 200
    await asyncio.sleep(1.0)  # t=5.05: capacity 10 again
    assert await send_many(upstream, 11) == [200] * 10 + [429]
    capacity = [second["capacity_rps"] for second in upstream.stats()["timeline"]]
    assert capacity == [10.0, 10.0, 5.0, 5.0, 10.0, 10.0]


async def test_over_the_concurrency_cap_a_request_is_refused_at_once_without_retry_after():
    upstream = SimulatedUpstream(
        config(max_concurrency=2, latency_base=1.0, saturation_slowdown=0.0)
    )
    first = [asyncio.create_task(upstream.handle(chat())) for _ in range(2)]
    await asyncio.sleep(0)
    refused = await upstream.handle(chat())
    assert refused.status == 429
    assert "concurrency limit of 2" in refused.json()["error"]["message"]
    assert "retry-after" not in refused.headers and "retry-after-ms" not in refused.headers
    assert [r.status for r in await asyncio.gather(*first)] == [200, 200]
    assert now() == 1.0
    assert (await upstream.handle(chat())).status == 200
    assert upstream.stats()["totals"]["max_inflight"] == 2


async def test_replies_slow_down_as_the_concurrency_cap_fills():
    upstream = SimulatedUpstream(
        config(max_concurrency=10, latency_base=1.0, saturation_slowdown=1.0)
    )
    finished: list[float] = []

    async def one() -> None:
        await upstream.handle(chat())
        finished.append(now())

    await asyncio.gather(*(one() for _ in range(10)))
    # Up to 80 % in flight at full speed; the 9th is 1.5x slower, the 10th twice as slow.
    assert finished == [1.0] * 8 + [1.5, 2.0]


async def test_tokens_are_reserved_up_front_and_reconciled_to_the_actual_completion():
    upstream = SimulatedUpstream(config(tpm=6000, latency_base=1.0))  # 100 tokens/s
    in_flight = asyncio.create_task(upstream.handle(chat("x" * 400, max_tokens=1000)))
    await asyncio.sleep(0.5)
    # 100 prompt + 1000 max_tokens reserved at t=0, 50 refilled since: 4950 left.
    refused = await upstream.handle(chat("x", max_tokens=5000))
    assert refused.status == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "4950"
    assert retry_after_ms(refused) == 510  # 51 tokens short at 100 tokens/s
    done = await in_flight
    usage = done.json()["usage"]
    assert usage["prompt_tokens"] == 100
    assert 250 <= usage["completion_tokens"] <= 1000
    # At t=1 the unused part of max_tokens came back.
    assert done.headers["x-ratelimit-remaining-tokens"] == str(6000 - usage["completion_tokens"])


async def test_a_request_larger_than_the_token_quota_gets_no_retry_after():
    upstream = SimulatedUpstream(config(tpm=600))
    refused = await upstream.handle(chat(max_tokens=1000))
    assert refused.status == 429
    assert "retry-after-ms" not in refused.headers


# -- how it says no ----------------------------------------------------------------------


def parse_wait(style: str, response: Response) -> float:
    if style == "seconds":
        return float(response.headers["retry-after"])
    if style == "ms":
        return retry_after_ms(response) / 1000
    return email.utils.parsedate_to_datetime(response.headers["retry-after"]).timestamp() - (
        virtual_wall_clock()
    )


@pytest.mark.parametrize(
    ("style", "header", "rendered"),
    [
        ("seconds", "retry-after", "1"),
        ("ms", "retry-after-ms", "250"),
        ("http-date", "retry-after", "Tue, 14 Nov 2023 22:13:21 GMT"),
    ],
)
async def test_retry_after_renders_in_each_style_and_waiting_that_long_is_enough(
    style: str, header: str, rendered: str
):
    upstream = SimulatedUpstream(
        config(rps=4, count_rejected=False, retry_after_style=style,
               wall_clock=virtual_wall_clock)
    )
    assert await send_many(upstream, 4) == [200] * 4
    refused = await upstream.handle(chat())
    assert refused.status == 429
    assert refused.headers[header] == rendered
    await asyncio.sleep(parse_wait(style, refused))
    assert (await upstream.handle(chat())).status == 200


async def test_retry_after_in_ms_is_exact_not_merely_long_enough():
    upstream = SimulatedUpstream(config(rps=4, count_rejected=False))
    await send_many(upstream, 4)
    assert retry_after_ms(await upstream.handle(chat())) == 250
    await asyncio.sleep(0.249)
    assert (await upstream.handle(chat())).status == 429
    await asyncio.sleep(0.001)
    assert (await upstream.handle(chat())).status == 200


async def test_with_retry_after_style_none_a_429_carries_no_retry_after():
    upstream = SimulatedUpstream(config(rps=1, retry_after_style="none"))
    refused = (await asyncio.gather(*(upstream.handle(chat()) for _ in range(2))))[1]
    assert refused.status == 429
    assert not {"retry-after", "retry-after-ms"} & set(refused.headers)


async def test_openai_headers_report_the_buckets_remaining_and_time_to_full():
    upstream = SimulatedUpstream(config(rps=10, tpm=60_000))  # 1000 tokens/s
    replies = [await upstream.handle(chat("x" * 40, max_tokens=100)) for _ in range(3)]
    spent = sum(r.json()["usage"]["total_tokens"] for r in replies)
    headers = replies[-1].headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "7"
    assert headers["x-ratelimit-reset-requests"] == "300ms"
    assert headers["x-ratelimit-limit-tokens"] == "60000"
    assert headers["x-ratelimit-remaining-tokens"] == str(60_000 - spent)
    assert headers["x-ratelimit-reset-tokens"] == format_duration(spent / 1000)


async def test_anthropic_headers_use_rfc3339_resets_and_round_tokens_to_thousands():
    upstream = SimulatedUpstream(
        config(rps=10, tpm=60_000, headers_style="anthropic", retry_after_style="seconds")
    )
    await send_many(upstream, 2, message("x" * 40, max_tokens=100))
    reply = await upstream.handle(message("x" * 40, max_tokens=100))
    headers = reply.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "10"
    assert headers["anthropic-ratelimit-requests-remaining"] == "7"
    assert headers["anthropic-ratelimit-requests-reset"] == "2023-11-14T22:13:21Z"
    assert headers["anthropic-ratelimit-tokens-limit"] == "60000"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "60000"  # 59 7xx, rounded
    assert headers["anthropic-ratelimit-tokens-reset"] == "2023-11-14T22:13:21Z"
    assert not any(name.startswith("x-ratelimit") for name in headers)


async def test_with_headers_style_none_no_rate_limit_headers_are_sent():
    upstream = SimulatedUpstream(config(headers_style="none", tpm=60_000))
    reply = await upstream.handle(chat())
    assert set(reply.headers) == {"content-type"}


async def test_in_penalty_mode_hammering_inside_the_window_extends_it():
    upstream = SimulatedUpstream(
        config(rps=10, count_rejected=False, penalty=True, penalty_extension=1.0)
    )
    await send_many(upstream, 10)
    assert retry_after_ms(await upstream.handle(chat())) == 100  # window until t=0.1
    await asyncio.sleep(0.05)
    # Sent inside the window: refused although the bucket would have a request at t=0.1,
    # and the window now ends a second later.
    assert retry_after_ms(await upstream.handle(chat())) == 1050
    await asyncio.sleep(1.05)
    assert (await upstream.handle(chat())).status == 200


async def test_without_penalty_mode_the_same_hammering_costs_no_extra_wait():
    upstream = SimulatedUpstream(config(rps=10, count_rejected=False))
    await send_many(upstream, 10)
    await upstream.handle(chat())
    await asyncio.sleep(0.05)
    assert retry_after_ms(await upstream.handle(chat())) == 50
    await asyncio.sleep(0.05)
    assert (await upstream.handle(chat())).status == 200


@pytest.mark.parametrize(("count_rejected", "wait_ms"), [(True, 1100), (False, 100)])
async def test_counting_rejected_requests_makes_hammering_eat_the_quota(
    count_rejected: bool, wait_ms: int
):
    upstream = SimulatedUpstream(config(rps=10, count_rejected=count_rejected))
    await send_many(upstream, 10)
    # 30 refused requests: counted, they push the bucket a whole bucket into debt (no further).
    last = [await upstream.handle(chat()) for _ in range(30)][-1]
    assert retry_after_ms(last) == wait_ms
    await asyncio.sleep(wait_ms / 1000 - 0.001)
    assert (await upstream.handle(chat())).status == 429
    if count_rejected:
        # That refusal was counted too: one more request's worth of waiting.
        await asyncio.sleep(0.101)
    else:
        await asyncio.sleep(0.001)
    assert (await upstream.handle(chat())).status == 200


async def test_fault_rates_are_roughly_as_configured_and_repeat_with_the_seed():
    async def run(seed: int) -> dict[int, int]:
        upstream = SimulatedUpstream(
            config(error_500_rate=0.1, error_503_rate=0.05, rps=1e6, seed=seed)
        )
        counts: dict[int, int] = {}
        for _ in range(2000):
            status = (await upstream.handle(chat())).status
            counts[status] = counts.get(status, 0) + 1
        assert upstream.stats()["totals"]["5xx"] == counts.get(500, 0) + counts.get(503, 0)
        return counts

    first = await run(seed=7)
    assert first == await run(seed=7)
    assert first != await run(seed=8)
    assert 150 <= first[500] <= 250
    assert 60 <= first[503] <= 140
    assert first[200] == 2000 - first[500] - first[503]


async def test_a_500_and_a_503_come_in_the_openai_shape():
    upstream = SimulatedUpstream(config(error_500_rate=1.0))
    failed = await upstream.handle(chat())
    assert failed.status == 500
    assert failed.json()["error"]["type"] == "server_error"
    upstream = SimulatedUpstream(config(error_503_rate=1.0))
    assert (await upstream.handle(chat())).status == 503


async def test_after_n_requests_the_account_is_out_of_credit():
    upstream = SimulatedUpstream(config(insufficient_quota_after=2))
    assert await send_many(upstream, 2) == [200, 200]
    out = await upstream.handle(chat())
    assert out.status == 429
    assert out.json()["error"]["code"] == "insufficient_quota"
    assert out.json()["error"]["type"] == "insufficient_quota"
    assert "retry-after-ms" not in out.headers
    anthropic = SimulatedUpstream(config(insufficient_quota_after=0))
    broke = await anthropic.handle(message())
    assert broke.status == 400
    assert "credit balance is too low" in broke.json()["error"]["message"]


async def test_an_exhausted_window_refuses_every_request_from_its_start_to_its_end():
    upstream = SimulatedUpstream(
        config(rps=2, exhausted=((20.0, 45.0),), wall_clock=virtual_wall_clock)
    )
    assert (await upstream.handle(message())).status == 200  # t=0: the upstream's clock starts
    statuses = []
    for at in (19.999, 20.0, 30.5, 44.999, 45.0, 45.0, 45.0):
        await asyncio.sleep(at - now())
        statuses.append((await upstream.handle(message())).status)
    # Dead from 20 s to 45 s; back at 45 s with its bucket full (2 requests, then a 429).
    assert statuses == [200, 400, 400, 400, 200, 200, 429]
    assert upstream.stats()["exhausted"] == [
        {"start": 20.0, "end": 45.0, "refused": 3, "first_refused_at": 20.0}
    ]


async def test_in_an_exhausted_window_anthropic_says_its_spend_cap_and_when_access_returns():
    upstream = SimulatedUpstream(config(exhausted=((20.0, 45.0),), wall_clock=virtual_wall_clock))
    await upstream.handle(message())
    await asyncio.sleep(30.5)
    refused = await upstream.handle(message())
    assert refused.status == 400
    assert refused.headers == {"content-type": "application/json"}  # no Retry-After
    # EPOCH + 45 s is 2023-11-14T22:14:05Z: the window's end on the upstream's clock.
    assert refused.body == (
        b'{"type":"error","error":{"type":"invalid_request_error","message":"You have reached '
        b'your specified API usage limits. You will regain access on 2023-11-14 at 22:14:05 '
        b'UTC."}}'
    )
    seen = classify_error_body(refused.status, refused.body, refused.headers, now=EPOCH + 30.5)
    assert (seen.kind, seen.regain_at) == (Outcome.QUOTA_EXHAUSTED, EPOCH + 45.0)


async def test_in_an_exhausted_window_openai_says_insufficient_quota_with_no_time():
    upstream = SimulatedUpstream(config(exhausted=((0.0, 10.0),)))
    refused = await upstream.handle(chat())
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.headers == {"content-type": "application/json"}
    assert upstream.stats()["totals"]["429"] == 1


async def test_a_skewed_upstream_states_its_regain_on_its_own_clock_rounded_up():
    upstream = SimulatedUpstream(
        config(exhausted=((0.0, 10.0),), wall_clock=virtual_wall_clock, clock_skew=0.25)
    )
    refused = await upstream.handle(message())
    assert b"regain access on 2023-11-14 at 22:13:31 UTC." in refused.body  # EPOCH+10.25, up


def test_a_spend_cap_regaining_at_midnight_reads_as_anthropic_writes_it():
    midnight = 1_764_547_200.0  # 2025-12-01T00:00:00Z
    message = orjson.loads(spend_cap_body(midnight))["error"]["message"]
    assert message == (
        "You have reached your specified API usage limits. "
        "You will regain access on 2025-12-01 at 00:00 UTC."
    )
    assert b"at 00:00:01 UTC" in spend_cap_body(midnight + 0.2)


async def test_anthropic_rate_limits_and_overloads_in_its_own_shapes():
    upstream = SimulatedUpstream(config(rps=1, error_529_rate=1.0, count_rejected=False))
    overloaded = await upstream.handle(message())
    assert overloaded.status == 529
    assert overloaded.json() == {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}
    }
    limited = await upstream.handle(message())
    assert limited.status == 429
    assert limited.json()["type"] == "error"
    assert limited.json()["error"]["type"] == "rate_limit_error"


async def test_an_anthropic_stream_can_break_off_with_an_overloaded_error_event():
    upstream = SimulatedUpstream(config(error_529_rate=1.0))
    reply = await upstream.handle(message(stream=True))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    events = [line for line in reply.body.decode().split("\n") if line.startswith("event: ")]
    assert events == ["event: message_start", "event: error"]
    assert orjson.loads(sse_data(reply.body)[-1])["error"]["type"] == "overloaded_error"
    assert upstream.stats()["totals"]["5xx"] == 1


# -- replies -----------------------------------------------------------------------------


async def test_a_chat_completion_reports_usage_and_estimates_the_prompt_at_four_chars_a_token():
    upstream = SimulatedUpstream(config())
    reply = await upstream.handle(chat("x" * 41, max_tokens=40))
    body = reply.json()
    assert body["object"] == "chat.completion"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 11
    assert 10 <= usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["choices"][0]["message"]["content"] == "tok " * usage["completion_tokens"]


async def test_latency_is_base_plus_time_per_completion_token():
    upstream = SimulatedUpstream(config(latency_base=0.12, latency_per_token=0.001))
    reply = await upstream.handle(chat(max_tokens=100))
    assert now() == pytest.approx(0.12 + 0.001 * reply.json()["usage"]["completion_tokens"])


async def test_an_openai_stream_is_chunks_then_usage_then_done():
    upstream = SimulatedUpstream(config())
    reply = await upstream.handle(
        chat(max_tokens=100, stream=True, stream_options={"include_usage": True})
    )
    assert reply.headers["content-type"] == "text/event-stream"
    data = sse_data(reply.body)
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "tok " * usage["completion_tokens"]
    assert chunks[-2]["choices"][0]["finish_reason"] in {"stop", "length"}


async def test_an_anthropic_reply_and_stream_have_its_shapes():
    upstream = SimulatedUpstream(config())
    reply = (await upstream.handle(message(max_tokens=50))).json()
    assert reply["type"] == "message"
    assert set(reply["usage"]) == {"input_tokens", "output_tokens"}
    streamed = await upstream.handle(message(max_tokens=50, stream=True))
    events = [line[7:] for line in streamed.body.decode().split("\n") if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    data = [orjson.loads(d) for d in sse_data(streamed.body)]
    text = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
    assert text == "tok " * data[-2]["usage"]["output_tokens"]


async def test_bad_requests_get_400_404_and_405_in_the_endpoints_shape():
    upstream = SimulatedUpstream(config())
    malformed = await upstream.handle(Request("POST", OPENAI, body=b"{not json"))
    assert malformed.status == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    no_budget = await upstream.handle(
        Request("POST", ANTHROPIC, body=orjson.dumps({"messages": [{"content": "hi"}]}))
    )
    assert no_budget.status == 400
    assert no_budget.json()["error"]["type"] == "invalid_request_error"
    assert (await upstream.handle(Request("POST", "http://upstream/v2/else"))).status == 404
    assert (await upstream.handle(Request("GET", OPENAI))).status == 405
    assert upstream.stats()["totals"]["other"] == 4


# -- faults in flight and cancellation -----------------------------------------------------


async def test_a_reset_connection_raises_connection_reset_error_and_frees_its_slot():
    upstream = SimulatedUpstream(config(reset_rate=1.0, max_concurrency=1))
    with pytest.raises(ConnectionResetError):
        await upstream.handle(chat())
    assert upstream.inflight == 0
    assert upstream.stats()["totals"]["other"] == 1


async def test_a_hanging_reply_lasts_until_the_callers_timeout_and_frees_its_slot():
    upstream = SimulatedUpstream(config(hang_rate=1.0, hang_seconds=600, tpm=6000))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(upstream.handle(chat("x" * 400, max_tokens=1000)), timeout=5)
    assert now() == 5.0
    assert upstream.inflight == 0
    assert "inflight=0" in repr(upstream)


async def test_cancelling_requests_at_random_leaks_no_slot_and_no_token():
    upstream = SimulatedUpstream(
        config(max_concurrency=20, tpm=600_000, latency_base=0.2, latency_per_token=0.001,
               hang_rate=0.1, hang_seconds=30, rps=200)
    )
    rng = random.Random(3)
    tasks = []
    for _ in range(300):
        tasks.append(asyncio.create_task(upstream.handle(chat(max_tokens=200))))
        await asyncio.sleep(rng.random() * 0.01)
        pending = [task for task in tasks if not task.done()]
        if pending and rng.random() < 0.4:
            rng.choice(pending).cancel()
    await asyncio.sleep(31)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled > 50
    assert upstream.inflight == 0
    totals = upstream.stats()["totals"]
    assert totals["ok"] + totals["429"] + totals["5xx"] + totals["other"] == totals["requests"]
    assert totals["max_inflight"] == 20
    await asyncio.sleep(60)
    # Every token is back: a request reserving the whole quota (1 prompt token) is admitted.
    whole = await upstream.handle(chat("x", max_tokens=599_999))
    assert whole.status == 200


# -- statistics --------------------------------------------------------------------------


async def test_stats_count_totals_and_a_per_second_timeline():
    upstream = SimulatedUpstream(config(rps=2, latency_base=0.5, count_rejected=False))
    burst = await asyncio.gather(*(upstream.handle(chat()) for _ in range(3)))
    assert sorted(r.status for r in burst) == [200, 200, 429]
    await upstream.handle(Request("POST", "http://upstream/nowhere"))
    await asyncio.sleep(0.7)  # t=1.2
    await upstream.handle(chat())
    stats = upstream.stats()
    totals = stats["totals"]
    assert 3 * 2 <= totals.pop("completion_tokens") <= 3 * 8
    assert totals == {
        "requests": 5, "ok": 3, "429": 1, "5xx": 0, "other": 1, "inflight": 0,
        "max_inflight": 2, "prompt_tokens": 6, "last_admitted_at": pytest.approx(1.2),
    }
    row = {"5xx": 0, "capacity_rps": 2.0}
    assert stats["timeline"] == [
        {"t": 0, "requests": 4, "ok": 2, "429": 1, "inflight_max": 2, "admitted_ok": 2, **row},
        {"t": 1, "requests": 1, "ok": 1, "429": 0, "inflight_max": 1, "admitted_ok": 1, **row},
    ]
    upstream.reset()
    assert upstream.stats() == {
        "totals": {"requests": 0, "ok": 0, "429": 0, "5xx": 0, "other": 0, "inflight": 0,
                   "max_inflight": 0, "prompt_tokens": 0, "completion_tokens": 0,
                   "last_admitted_at": None},
        "timeline": [],
        "exhausted": [],
    }


# -- bucket arithmetic -------------------------------------------------------------------


@given(
    factors=st.lists(st.floats(0.1, 4.0), min_size=0, max_size=4),
    drained_at=st.floats(0.0, 10.0),
    amount=st.floats(0.5, 8.0),
)
@example(factors=[0.5], drained_at=0.0, amount=4.0)  # fits on the very instant it shrinks
def test_a_bucket_fills_to_an_amount_exactly_when_it_says_even_across_schedule_steps(
    factors: list[float], drained_at: float, amount: float
):
    schedule = tuple((2.0 * (i + 1), f) for i, f in enumerate(factors))
    bucket = ScheduledBucket(rate=2.0, burst=2.0, schedule=schedule)
    bucket.advance(drained_at)
    bucket.take(bucket.level)
    wait = bucket.time_until(amount)
    if wait == float("inf"):
        # Never: the amount is more than the last step's bucket holds.
        assert amount > 4.0 * (factors[-1] if factors else 1.0)
        return
    if wait > 1e-6:
        early = ScheduledBucket(rate=2.0, burst=2.0, schedule=schedule)
        early.advance(drained_at)
        early.take(early.level)
        early.advance(drained_at + wait - 1e-6)
        assert not early.has(amount)
    bucket.advance(drained_at + wait)
    assert bucket.has(amount)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rps": 0}, "rps must be a positive finite number"),
        ({"max_concurrency": 0}, "max_concurrency must be a positive integer"),
        ({"schedule": ((20, 0.5), (10, 1.0))}, "strictly increasing"),
        ({"schedule": ((20, 0),)}, "schedule factor must be a positive"),
        ({"retry_after_style": "minutes"}, "retry_after_style must be one of"),
        ({"headers_style": "gemini"}, "headers_style must be one of"),
        ({"error_500_rate": 1.5}, "error_500_rate must be a share"),
        ({"error_500_rate": 0.6, "reset_rate": 0.6}, "together exceed 1"),
        ({"insufficient_quota_after": -1}, "insufficient_quota_after must be"),
        ({"limit_header": "hourly"}, "limit_header must be one of bucket, per_minute"),
        ({"reset_resolution": "us"}, "reset_resolution must be one of ms, s"),
        ({"reply_seconds": (30, 5)}, r"reply_seconds must be \(low, high\) with 0 <= low"),
        ({"reply_seconds": 5}, "reply_seconds must be a \\(low, high\\) pair"),
        ({"clock_skew": float("nan")}, "clock_skew must be a finite number"),
        ({"exhausted": ((20, 10),)}, "end after they start"),
        ({"exhausted": ((0, 30), (20, 40))}, "without overlapping"),
        ({"exhausted": ((-1, 5),)}, "start at 0 s or later"),
        ({"exhausted": ((5, float("inf")),)}, "end after they start"),
        ({"exhausted": (20, 45)}, r"a \(start, end\) pair of seconds"),
    ],
)
def test_a_bad_config_is_refused_with_a_sentence(overrides: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        UpstreamConfig(**overrides)


def test_the_presets_describe_the_harness_scenarios():
    crisis = UpstreamConfig.preset("crisis")
    assert (crisis.rps, crisis.max_concurrency, crisis.tpm) == (300, 128, 9_000_000)
    assert (crisis.headers_style, crisis.retry_after_style) == ("openai", "seconds")
    assert UpstreamConfig.preset("shift").schedule == ((20.0, 0.5), (40.0, 1.0))
    anthropic = PRESETS["anthropic"]
    assert (anthropic.headers_style, anthropic.retry_after_style) == ("anthropic", "http-date")
    assert anthropic.error_529_rate == 0.01
    assert PRESETS["penalty"].penalty
    assert PRESETS["steady"].rps > crisis.rps
    exhaustion = PRESETS["exhaustion"]
    assert (exhaustion.headers_style, exhaustion.exhausted) == ("anthropic", ((20.0, 45.0),))
    assert (exhaustion.rps, exhaustion.max_concurrency) == (crisis.rps, crisis.max_concurrency)
    assert UpstreamConfig.preset("crisis", seed=5) == dataclasses.replace(crisis, seed=5)
    with pytest.raises(ValueError, match="Unknown upstream preset 'calm'"):
        UpstreamConfig.preset("calm")


@pytest.mark.parametrize(
    ("seconds", "rendered"),
    [(0, "0s"), (0.25, "250ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723.5, "1h2m3.5s")],
)
def test_resets_render_as_go_durations(seconds: float, rendered: str):
    assert format_duration(seconds) == rendered


# -- the robustness matrix's behaviours ------------------------------------------------------


@pytest.mark.parametrize(("wait", "rendered"), [(0.0, "1"), (1e-7, "1"), (0.004, "1"),
                                                (1.0, "1"), (1.001, "2"), (6.5, "7")])
def test_a_whole_second_retry_after_is_max_1_ceil_wait_and_never_0(wait: float, rendered: str):
    assert retry_after_headers("seconds", wait, fixed_wall_clock) == {"retry-after": rendered}


async def test_a_whole_second_retry_after_over_a_fast_bucket_says_1_for_a_ms_wait():
    upstream = SimulatedUpstream(
        config(rps=1000, count_rejected=False, retry_after_style="seconds")
    )
    assert await send_many(upstream, 1000) == [200] * 1000
    refused = await upstream.handle(chat())
    assert refused.headers["retry-after"] == "1"  # the request fits in 1 ms
    await asyncio.sleep(0.001)
    assert (await upstream.handle(chat())).status == 200


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_the_limit_header_states_the_per_minute_rate_or_the_bucket_following_the_schedule(
    dialect: str,
):
    prefix = "x-ratelimit-limit-" if dialect == "openai" else "anthropic-ratelimit-"
    suffix = "" if dialect == "openai" else "-limit"
    remaining = ("x-ratelimit-remaining-requests" if dialect == "openai"
                 else "anthropic-ratelimit-requests-remaining")
    request = chat() if dialect == "openai" else message()
    for limit_header, (requests, tokens) in {
        "bucket": (("20", "10"), ("60000", "30000")),
        "per_minute": (("600", "300"), ("60000", "30000")),
    }.items():
        upstream = SimulatedUpstream(config(
            rps=10, burst_seconds=2.0, tpm=60_000, headers_style=dialect,
            limit_header=limit_header, schedule=((1.0, 0.5),),
        ))
        before = (await send_many(upstream, 3, request)) and await upstream.handle(request)
        assert before.headers[f"{prefix}requests{suffix}"] == requests[0]
        assert before.headers[f"{prefix}tokens{suffix}"] == tokens[0]
        assert before.headers[remaining] == "16"  # the bucket's level, whatever the limit says
        await asyncio.sleep(1.0)  # half the capacity
        after = await upstream.handle(request)
        assert after.headers[f"{prefix}requests{suffix}"] == requests[1]
        assert after.headers[f"{prefix}tokens{suffix}"] == tokens[1]
        assert after.headers[remaining] == "9"


async def test_openai_resets_can_be_rounded_up_to_the_second():
    upstream = SimulatedUpstream(
        config(rps=10, burst_seconds=3.0, tpm=60_000, reset_resolution="s")
    )
    headers = (await upstream.handle(chat("x" * 40, max_tokens=100))).headers
    assert headers["x-ratelimit-remaining-requests"] == "29"
    assert headers["x-ratelimit-reset-requests"] == "1s"  # 100 ms, to the second
    assert headers["x-ratelimit-reset-tokens"] == "1s"  # a few ms
    headers = (await send_many(upstream, 14) and await upstream.handle(chat())).headers
    assert headers["x-ratelimit-remaining-requests"] == "14"
    assert headers["x-ratelimit-reset-requests"] == "2s"  # 1.6 s
    await asyncio.sleep(0.6)  # 20 left, 19 after the next one: 1.1 s to full
    headers = (await upstream.handle(chat())).headers
    assert headers["x-ratelimit-reset-requests"] == "2s"


async def test_the_schedule_doubles_capacity_and_a_retry_after_across_the_step_is_honest():
    upstream = SimulatedUpstream(
        config(rps=10, schedule=((2.0, 2.0),), count_rejected=False)
    )
    await upstream.handle(chat())  # t=0
    await asyncio.sleep(1.0)
    assert await send_many(upstream, 11) == [200] * 10 + [429]
    await asyncio.sleep(0.9)  # t=1.9: 9 requests back, capacity still 10
    assert await send_many(upstream, 9) == [200] * 9
    refused = await upstream.handle(chat())
    # One request at 10/s takes 100 ms: the last 0.1 s before the step delivers it.
    assert retry_after_ms(refused) == 100
    await asyncio.sleep(0.099)
    assert (await upstream.handle(chat())).status == 429
    await asyncio.sleep(0.001)
    assert (await upstream.handle(chat())).status == 200
    await asyncio.sleep(1.0)  # t=3: capacity 20, refilled at 20/s
    assert await send_many(upstream, 21) == [200] * 20 + [429]
    capacity = [second["capacity_rps"] for second in upstream.stats()["timeline"]]
    assert capacity == [10.0, 10.0, 20.0, 20.0]


async def test_reply_seconds_draws_each_reply_time_from_its_range_whatever_the_tokens():
    upstream = SimulatedUpstream(
        config(reply_seconds=(5.0, 30.0), latency_base=1.0, latency_per_token=1.0, seed=3)
    )
    took: list[float] = []

    async def one(max_tokens: int) -> None:
        start = now()
        assert (await upstream.handle(chat(max_tokens=max_tokens))).status == 200
        took.append(now() - start)

    await asyncio.gather(*(one(8 if i % 2 else 256) for i in range(400)))
    assert 5.0 <= min(took) < 5.5 and 29.5 < max(took) <= 30.0
    assert statistics.mean(took) == pytest.approx(17.5, abs=1.0)
    assert now() == max(took)


async def test_without_clock_skew_the_model_sends_no_date_of_its_own():
    upstream = SimulatedUpstream(config())
    assert "date" not in (await upstream.handle(chat())).headers


@pytest.mark.parametrize("style", ["seconds", "ms", "http-date"])
@pytest.mark.parametrize("skew", [0.0, 3.0, -3.0])
async def test_a_skewed_upstream_dates_its_replies_and_its_retry_after_stays_honest(
    style: str, skew: float
):
    upstream = SimulatedUpstream(config(
        rps=4, count_rejected=False, retry_after_style=style, headers_style="anthropic",
        wall_clock=virtual_wall_clock, clock_skew=skew,
    ))
    await asyncio.sleep(0.3)
    ok = await upstream.handle(message())
    assert ok.headers["date"] == email.utils.formatdate(EPOCH + skew, usegmt=True)
    assert ok.json()["id"]
    # RFC 3339 resets are on the upstream's clock: full again 250 ms from its now.
    assert ok.headers["anthropic-ratelimit-requests-reset"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH + skew + 1)
    )
    await send_many(upstream, 3, message())
    refused = await upstream.handle(message())
    assert refused.status == 429
    date = email.utils.parsedate_to_datetime(refused.headers["date"]).timestamp()
    if style == "http-date":
        # Read against the reply's own Date, the date is honest whatever the skew.
        wait = email.utils.parsedate_to_datetime(refused.headers["retry-after"]).timestamp() - date
        assert wait >= 0.25
    else:
        wait = parse_wait(style, refused)
    await asyncio.sleep(wait)
    assert (await upstream.handle(message())).status == 200


# -- the real server -------------------------------------------------------------------------


@pytest.mark.looptime(False)
async def test_the_server_process_serves_limits_reports_stats_and_stops():
    small = UpstreamConfig(rps=5, latency_base=0.01, latency_per_token=0.0, count_rejected=False)
    with run_in_process(small) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:

            async def post() -> int:
                async with session.post(base_url + "/v1/chat/completions",
                                        data=chat().body) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(post() for _ in range(7)))
            assert sorted(statuses) == [200] * 5 + [429] * 2
            async with session.get(base_url + "/stats") as response:
                totals = (await response.json())["totals"]
            assert (totals["requests"], totals["ok"], totals["429"]) == (7, 5, 2)
            async with session.post(base_url + "/reset") as response:
                assert response.status == 204
            async with session.get(base_url + "/stats") as response:
                assert (await response.json())["totals"]["requests"] == 0
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(base_url + "/stats")


def test_the_server_process_collects_only_young_garbage_by_itself():
    # Run in the server process before it serves: what start-up built is frozen out of
    # every collection, and no full collection comes by itself (a pause of the model's
    # own collector would hold its door shut for up to 170 ms, a stall the model never
    # states). Restored here: this is the test process.
    from asyncquota.testing.server import FULL_COLLECTIONS_AFTER, quiet_collector

    threshold = gc.get_threshold()
    try:
        quiet_collector()
        assert gc.get_freeze_count() > 0
        young, middle, full = gc.get_threshold()
        assert (young, middle) == threshold[:2]
        assert full == FULL_COLLECTIONS_AFTER
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
