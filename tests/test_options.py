"""Request options: checked once, wherever they come from, and carried through unchanged."""

import asyncio
import dataclasses

import pytest

from asyncquota import (
    BusyError,
    DeadlineExceededError,
    Fixed,
    MockTransport,
    Priority,
    RequestOptions,
    Response,
    Shaper,
)
from asyncquota.options import OPTION_HEADERS

URL = "https://api.example.com"


def test_options_store_the_rank_whatever_the_caller_wrote():
    assert RequestOptions("batch").priority == Priority.BATCH
    assert RequestOptions(Priority.CRITICAL).priority == 0
    assert RequestOptions(7).priority == 7
    assert RequestOptions().priority == Priority.INTERACTIVE


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"priority": "urgent"}, ValueError, "Unknown priority class 'urgent'"),
        ({"priority": True}, TypeError, "not bool"),
        ({"tenant": ["a"]}, TypeError, "tenant must be hashable"),
        ({"deadline": float("nan")}, ValueError, "deadline must be a number of seconds"),
        ({"deadline": 0}, ValueError, "deadline must be at least 0.001 s"),
        ({"deadline": True}, ValueError, "deadline must be a number of seconds"),
        ({"cost_tokens": -1}, ValueError, "cost_tokens must be an integer ≥ 0"),
        ({"cost_tokens": 1.5}, ValueError, "cost_tokens must be an integer ≥ 0"),
    ],
)
def test_a_malformed_option_is_refused_with_a_sentence(kwargs, error, message):
    with pytest.raises(error, match=message):
        RequestOptions(**kwargs)


def test_options_are_frozen_and_replace_checks_again():
    options = RequestOptions("batch", "acme", 30, 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.deadline = 1  # type: ignore[misc]
    assert dataclasses.replace(options, deadline=1.5).deadline == 1.5
    with pytest.raises(ValueError, match=r"at least 0\.001 s"):
        dataclasses.replace(options, deadline=0)


def test_options_from_headers_read_each_header_once():
    options = RequestOptions.from_headers(
        {
            "X-AsyncQuota-Priority": [" batch "],
            "X-AsyncQuota-Tenant": ["shop-42"],
            "X-AsyncQuota-Deadline": ["2.5"],
            "X-AsyncQuota-Cost-Tokens": ["900"],
        }
    )
    assert options == RequestOptions(Priority.BATCH, "shop-42", 2.5, 900)
    assert RequestOptions.from_headers({}) == RequestOptions()
    assert set(OPTION_HEADERS) == {
        "X-AsyncQuota-Priority",
        "X-AsyncQuota-Tenant",
        "X-AsyncQuota-Deadline",
        "X-AsyncQuota-Cost-Tokens",
    }


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-AsyncQuota-Priority": ["batch", "critical"]}, "given 2 times; give it once"),
        ({"X-AsyncQuota-Deadline": ["soon"]}, "must be a number of seconds, not 'soon'"),
        ({"X-AsyncQuota-Deadline": ["inf"]}, "must be a finite number of seconds"),
        ({"X-AsyncQuota-Cost-Tokens": ["lots"]}, "must be an integer, not 'lots'"),
    ],
)
def test_malformed_option_headers_are_refused(headers, message):
    with pytest.raises(ValueError, match=message):
        RequestOptions.from_headers(headers)


async def test_the_shaper_takes_options_as_one_object_or_as_keywords_not_both():
    seen: list[str] = []

    async def upstream(request):
        seen.append(request.url)
        return Response(200, {}, b"{}")

    async with Shaper(URL, transport=MockTransport(upstream), hooks=()) as shaper:
        options = RequestOptions("batch", "acme", deadline=5)
        reply = await shaper.request("GET", "/v1/models", options=options)
        assert reply.status == 200
        with pytest.raises(ValueError, match="either as keywords or in options, not both"):
            await shaper.request("GET", "/v1/models", options=options, tenant="other")
        with pytest.raises(TypeError, match="options must be a RequestOptions"):
            await shaper.request("GET", "/v1/models", options={"priority": "batch"})  # type: ignore[arg-type]
        assert shaper.statistics().sent == 1
    assert seen == [URL + "/v1/models"]


async def test_the_options_class_and_deadline_bound_the_wait_in_line():
    async def slow(request):
        await asyncio.sleep(10)
        return Response(200, {}, b"{}")

    loop = asyncio.get_running_loop()
    async with Shaper(URL, transport=MockTransport(slow), hooks=(), limit=Fixed(1)) as shaper:
        first = asyncio.create_task(shaper.request("GET", "/a"))
        await asyncio.sleep(0)
        started = loop.time()
        # Interactive waits 2 s at most: before its 3 s deadline, it is told "busy".
        with pytest.raises(BusyError):
            await shaper.request("GET", "/b", options=RequestOptions(deadline=3, tenant="t"))
        assert loop.time() - started == pytest.approx(2.0)
        # Its 1 s deadline comes first.
        with pytest.raises(DeadlineExceededError) as caught:
            await shaper.request("GET", "/c", options=RequestOptions("batch", deadline=1))
        assert loop.time() - started == pytest.approx(3.0)
        assert caught.value.priority == Priority.BATCH
        first.cancel()


def test_narrowed_options_keep_the_rest_and_check_what_changes():
    options = RequestOptions(priority="batch", tenant="acme", deadline=30.0, cost_tokens=5)
    narrowed = options.narrowed(12.5, 900)
    expected = RequestOptions(priority="batch", tenant="acme", deadline=12.5, cost_tokens=900)
    assert narrowed == expected
    assert options.narrowed(None, None) == RequestOptions(priority="batch", tenant="acme")
    assert options.narrowed(7, 1).deadline == 7.0  # an int, as __init__ takes it
    for deadline in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="deadline"):
            options.narrowed(deadline, 1)
    for cost in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cost_tokens"):
            options.narrowed(5.0, cost)
