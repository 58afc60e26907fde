"""The Shaper end to end on virtual time, against the simulated upstream behind a MockTransport."""

import asyncio
import collections

import pytest

from asyncquota import MockTransport, QuotaError, Response
from asyncquota.shaper import Shaper
from asyncquota.testing import SimulatedUpstream, UpstreamConfig

BODY = {"model": "m", "messages": [{"role": "user", "content": "Where is my parcel?"}]}


def frozen_wall_clock() -> float:
    return 1_800_000_000.0


async def test_a_spike_of_6000_requests_is_served_without_a_wall_of_429s():
    upstream = SimulatedUpstream(UpstreamConfig.preset("crisis", wall_clock=frozen_wall_clock))
    outcomes: collections.Counter[str] = collections.Counter()
    async with Shaper(
        "http://upstream.test", transport=MockTransport(upstream.handle), hooks=()
    ) as shaper:

        async def one(i: int) -> None:
            await asyncio.sleep(i * 5 / 6000)
            interactive = i % 10 < 7
            try:
                await shaper.request(
                    "POST",
                    "/v1/chat/completions",
                    json={**BODY, "max_tokens": 128},
                    priority="interactive" if interactive else "batch",
                    deadline=10 if interactive else 120,
                )
                outcomes["ok"] += 1
            except QuotaError as exc:
                outcomes[exc.reason] += 1

        await asyncio.gather(*(one(i) for i in range(6000)))
        stats = shaper.statistics()
    totals = upstream.stats()["totals"]
    assert sum(outcomes.values()) == 6000  # every request ended exactly once
    assert outcomes["ok"] >= 5900
    assert totals["429"] <= 0.01 * totals["requests"]
    assert stats.inflight == 0 and stats.queued == ()


async def test_a_reply_carries_how_many_attempts_it_took():
    replies = iter([Response(503, {"retry-after": "1"}), Response(200, {}, b'{"ok": true}')])
    async with Shaper(
        "http://upstream.test", transport=MockTransport(lambda request: next(replies)), hooks=()
    ) as shaper:
        response = await shaper.request("GET", "/v1/models")
    assert response.json() == {"ok": True}
    assert response.attempts == 2


async def test_a_full_url_as_path_is_refused_so_nothing_leaves_for_another_host():
    async with Shaper(
        "http://upstream.test", transport=MockTransport(lambda r: Response(200)), hooks=()
    ) as shaper:
        with pytest.raises(ValueError, match="must start with '/'"):
            await shaper.request("GET", "http://elsewhere.test/steal")
