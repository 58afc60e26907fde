"""Prometheus metrics from a Shaper's events and its live state (virtual time)."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import asyncquota
from asyncquota import Fixed, MockTransport, Response, Shaper
from asyncquota.prometheus import PrometheusHook

URL = "https://api.example.com"
USAGE = b'{"usage": {"prompt_tokens": 10, "completion_tokens": 30}}'


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_requests_waits_replies_and_sheds_are_counted_with_bounded_labels():
    registry = CollectorRegistry()
    hook = PrometheusHook("openai", registry=registry)
    replies = {
        "/a": [Response(200, {}, USAGE)],
        "/b": [Response(429, {}, b"{}"), Response(200, {}, USAGE)],
    }

    async def upstream(request):
        await asyncio.sleep(0.5)
        return replies[request.url.removeprefix(URL)].pop(0)

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=[hook], limit=Fixed(1), max_queue=1
    ) as shaper:
        hook.watch(shaper)
        calls = [
            asyncio.create_task(shaper.request("POST", "/a", json={"max_tokens": 50})),
            asyncio.create_task(shaper.request("POST", "/b", priority="batch")),
            asyncio.create_task(shaper.request("POST", "/c", priority="batch")),
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    # /c found the one-place line full behind /b: shed at once, nothing sent.
    assert [type(r).__name__ for r in results] == ["Response", "Response", "QueueFullError"]
    count = "asyncquota_requests_total"
    assert value(registry, count, upstream="openai", **{"class": "interactive"}, outcome="ok") == 1
    assert value(registry, count, upstream="openai", **{"class": "batch"}, outcome="ok") == 1
    assert value(registry, count, upstream="openai", **{"class": "batch"}, outcome="shed") == 1
    assert (
        value(
            registry,
            "asyncquota_shed_total",
            upstream="openai",
            **{"class": "batch"},
            reason="queue_full",
        )
        == 1
    )
    assert value(registry, "asyncquota_upstream_replies_total", upstream="openai", code="200") == 2
    assert value(registry, "asyncquota_upstream_replies_total", upstream="openai", code="429") == 1
    assert (
        value(registry, "asyncquota_upstream_throttled_total", upstream="openai", code="429") == 1
    )
    assert (
        value(registry, "asyncquota_retries_total", upstream="openai", reason="rate_limited") == 1
    )
    assert value(registry, "asyncquota_tokens_used_total", upstream="openai") == 80
    # Each answered attempt took 0.5 s upstream; /b waited for /a's permit in line.
    upstream_sum = value(
        registry, "asyncquota_upstream_seconds_sum", upstream="openai", **{"class": "batch"}
    )
    assert upstream_sum == pytest.approx(1.0)
    wait = value(
        registry, "asyncquota_queue_wait_seconds_sum", upstream="openai", **{"class": "batch"}
    )
    assert wait is not None and wait >= 0.5
    assert b'tenant="' not in generate_latest(registry)  # no tenant label unless asked


async def test_the_gauges_read_the_live_state_at_each_scrape():
    registry = CollectorRegistry()
    hook = PrometheusHook("anthropic", registry=registry)
    release = asyncio.Event()

    async def upstream(request):
        await release.wait()
        return Response(200, {}, b"{}")

    async with Shaper(
        URL, transport=MockTransport(upstream), hooks=[hook], limit=Fixed(2)
    ) as shaper:
        hook.watch(shaper)
        calls = [
            asyncio.create_task(shaper.request("GET", "/x", priority="batch")) for _ in range(5)
        ]
        await asyncio.sleep(0.1)
        assert value(registry, "asyncquota_inflight", upstream="anthropic") == 2
        assert value(registry, "asyncquota_concurrency_limit", upstream="anthropic") == 2
        assert (
            value(registry, "asyncquota_queue_depth", upstream="anthropic", **{"class": "batch"})
            == 3
        )
        assert value(registry, "asyncquota_cooldown_seconds", upstream="anthropic") == 0
        assert value(registry, "asyncquota_pace_requests_per_second", upstream="anthropic") is None
        release.set()
        await asyncio.gather(*calls)
        assert value(registry, "asyncquota_inflight", upstream="anthropic") == 0


async def test_tenants_are_a_label_only_when_asked_for_and_hooks_of_a_registry_agree():
    registry = CollectorRegistry()
    hook = PrometheusHook("openai", registry=registry, tenants=True)

    async def upstream(request):
        return Response(200, {}, b"{}")

    async with Shaper(URL, transport=MockTransport(upstream), hooks=[hook]) as shaper:
        await shaper.request("GET", "/x", tenant="acme")
    assert (
        value(
            registry,
            "asyncquota_requests_total",
            upstream="openai",
            **{"class": "interactive"},
            outcome="ok",
            tenant="acme",
        )
        == 1
    )
    PrometheusHook("anthropic", registry=registry, tenants=True)  # shares the families
    with pytest.raises(ValueError, match="every hook of one registry must say the same"):
        PrometheusHook("gemini", registry=registry, tenants=False)


def test_the_hook_is_reachable_from_the_package_top():
    assert asyncquota.PrometheusHook is PrometheusHook
    with pytest.raises(AttributeError):
        asyncquota.NoSuchThing  # noqa: B018


async def test_a_watched_gateway_reports_what_it_did_and_the_money_it_charged():
    from test_governance_gateway import chat, make_gateway

    from asyncquota.prometheus import watch_gateway

    registry = CollectorRegistry()
    gateway, _ = make_gateway()
    watch_gateway(gateway, registry=registry)
    async with gateway:
        await gateway.request(chat(), task="code_review", complexity="high")  # big
        await gateway.request(chat())  # small
        await gateway.request(chat())
    assert value(registry, "asyncquota_gateway_requests_total") == 3
    assert value(registry, "asyncquota_gateway_served_total") == 3
    assert value(registry, "asyncquota_gateway_fallbacks_total") == 0
    assert value(registry, "asyncquota_gateway_accounts_held") == 0
    # 1 000 tokens in and 500 out each, at the models' prices per million.
    big = (1000 * 10.0 + 500 * 30.0) / 1e6
    small = (1000 * 0.5 + 500 * 1.5) / 1e6
    assert value(registry, "asyncquota_spent_dollars_total", model="big") == pytest.approx(big)
    assert value(registry, "asyncquota_spent_dollars_total", model="small") == pytest.approx(
        2 * small
    )
    with pytest.raises(ValueError):
        watch_gateway(gateway, registry=registry)  # one gateway per registry
