"""A fleet of processes shares one quota through Redis: exactly, and through an outage.

Real redis-server (the ``redis_url`` fixture), real time (sockets do not run on virtual
time), every wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from asyncquota import MockTransport, QuotaError, RetryBudget, Shaper
from asyncquota.fleet import FleetStatistics, RedisFleet
from asyncquota.gates import CooldownGate
from asyncquota.testing import SimulatedUpstream, UpstreamConfig
from asyncquota.testing.redis import RedisServer

pytestmark = pytest.mark.looptime(False)

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class _Feedback:
    """What the fleet reads of a Shaper's feedback: whether its upstream punishes."""

    punishes = False


def _redis(url: str) -> redis.Redis:
    """The test's own view of Redis, outside the fleet."""
    return redis.Redis.from_url(url, decode_responses=True)


def _level(url: str, name: str, bucket: str) -> tuple[float, float]:
    """A shared bucket's stored level, and milliseconds since it was stamped (Redis time)."""
    with _redis(url) as client:
        level, stamp = client.hmget(f"{{aq:{name}}}:{bucket}", ["level", "stamp"])
        seconds, micros = client.time()
    return float(level), seconds * 1000 + micros / 1000 - float(stamp)


def _get(url: str, key: str) -> Any:
    with _redis(url) as client:
        return client.get(key)


def _members(url: str, key: str) -> list[str]:
    with _redis(url) as client:
        return list(client.zrange(key, 0, -1))


async def _eventually(check: Any, within: float) -> bool:
    """Whether ``check()`` comes true within ``within`` seconds (looked at every 20 ms)."""
    for _ in range(int(within / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


def _attach(fleet: RedisFleet, *, rpm: float | None, tpm: float | None) -> CooldownGate:
    gate = CooldownGate(ramp=0)
    fleet.attach(rpm=rpm, tpm=tpm, cooldown=gate, feedback=_Feedback())  # type: ignore[arg-type]
    return gate


# -- atomicity across OS processes ---------------------------------------------------------

RPM = 3000  # 50 a second, a burst of 50


def _hammer(url: str, barrier: float, seconds: float, results: Any) -> None:
    """A worker process: four tasks take request units as fast as the fleet grants them."""

    async def main() -> tuple[int, float]:
        taken, last = 0, 0.0
        async with RedisFleet(url, name="hammered") as fleet:
            _attach(fleet, rpm=RPM, tpm=None)
            await asyncio.sleep(max(0.0, barrier - time.time()))
            loop = asyncio.get_running_loop()
            stop = loop.time() + seconds

            async def spend() -> None:
                nonlocal taken, last
                while loop.time() < stop:
                    await fleet.take(1, 0)
                    taken += 1
                    last = max(last, time.time())

            await asyncio.gather(*(spend() for _ in range(4)))
        return taken, last

    results.put(asyncio.run(main()))


def test_processes_hammering_one_bucket_never_take_more_than_burst_plus_rate(redis_url: str):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    barrier = time.time() + 2.5  # after the workers have started (spawn imports take a while)
    workers = [
        context.Process(target=_hammer, args=(redis_url, barrier, 1.0, results)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0
    total = sum(taken for taken, _ in outcomes)
    last = max(at for _, at in outcomes)
    rate, burst = RPM / 60, RPM / 60
    allowed = burst + rate * (last - barrier)
    assert total <= allowed + 1e-6, (total, allowed, outcomes)
    assert total > burst  # the bucket refilled and the leases kept flowing


# -- leases, settlements -------------------------------------------------------------------


async def test_a_lease_left_unspent_goes_back_when_the_process_closes(redis_url: str):
    fleet = RedisFleet(redis_url, name="returned")
    await fleet.start()
    _attach(fleet, rpm=600, tpm=None)  # 10 a second, a burst of 10
    await fleet.take(1, 0)
    await fleet.take(1, 0)  # the first lease spent at once: the next one is larger
    assert fleet._pool.requests >= 4
    held = fleet._pool.requests
    level, _ = _level(redis_url, "returned", "requests")
    assert level <= 10 - 2 - held + 0.5  # (a few ms of refill)
    await fleet.aclose()
    level, _ = _level(redis_url, "returned", "requests")
    assert level >= 10 - 2 - 1e-6  # all but the two spent
    assert fleet.statistics().leases == 2


async def test_a_lease_that_expires_unspent_is_returned_by_the_process_itself(redis_url: str):
    async with RedisFleet(redis_url, name="expired", lease_period=0.05) as fleet:
        _attach(fleet, rpm=600, tpm=None)
        await fleet.take(1, 0)
        await fleet.take(1, 0)
        assert fleet._pool.leftover
        assert await _eventually(lambda: not fleet._pool.leftover, within=3.0)
        settled = _members(redis_url, "{aq:expired}:settled")
        assert any(member.endswith(":back") for member in settled)


async def test_a_lease_holds_its_units_so_the_bucket_never_refills_past_the_rest_of_the_burst(
    redis_url: str,
):
    async with (
        RedisFleet(redis_url, name="held", lease_period=0.5) as first,
        RedisFleet(redis_url, name="held") as second,
    ):
        _attach(first, rpm=600, tpm=None)  # 10 a second, a burst of 10
        _attach(second, rpm=600, tpm=None)
        await first.take(1, 0)
        await first.take(1, 0)  # a lease of several, mostly unspent
        leased = first._pool.requests + 1
        await asyncio.sleep(0.3)  # time enough to refill the whole burst
        await second._exchange()
        with _redis(redis_url) as client:
            level, held = (float(x) for x in client.hmget("{aq:held}:requests", "level", "held"))
        assert held == leased
        assert level == pytest.approx(10 - held)  # not 10: the lease may still be spent
        await first.aclose()  # its leftovers come back, and it holds nothing more
        with _redis(redis_url) as client:
            level, held = (float(x) for x in client.hmget("{aq:held}:requests", "level", "held"))
        assert held == 0
        assert level == pytest.approx(10 - 1)  # all but the unit spent from that lease


async def test_a_settlement_applies_once_per_id_however_often_it_is_sent(redis_url: str):
    async with (
        RedisFleet(redis_url, name="settled") as first,
        RedisFleet(redis_url, name="settled") as second,
    ):
        _attach(first, rpm=None, tpm=60)  # one token a second, a burst of 1
        _attach(second, rpm=None, tpm=60)
        await first.settle("request-1", 5)  # used 5 more than reserved: charged
        after_one, _ = _level(redis_url, "settled", "tokens")
        assert after_one <= 1 - 5 + 0.5
        await first.settle("request-1", 5)  # sent again (a reply lost): a no-op
        await second.settle("request-1", 5)  # from another process: a no-op too
        after_three, _ = _level(redis_url, "settled", "tokens")
        assert after_three == pytest.approx(after_one, abs=0.5)
        await second.settle("request-2", -3)  # another request's refund
        refunded, _ = _level(redis_url, "settled", "tokens")
        assert refunded == pytest.approx(after_three + 3, abs=0.5)
        with pytest.raises(ValueError, match="request_id"):
            await first.settle("", 1)


async def test_a_shaper_settles_its_reservations_with_the_fleet(redis_url: str):
    upstream = SimulatedUpstream(
        UpstreamConfig(rps=1000, latency_base=0.0, latency_per_token=0.0, retry_after_style="ms")
    )
    async with (
        RedisFleet(redis_url, name="reconciled") as fleet,
        Shaper(
            "http://upstream.test",
            rpm=60_000,
            tpm=600_000,
            transport=MockTransport(upstream.handle),
            hooks=(),
            fleet=fleet,
        ) as shaper,
    ):
        for _ in range(5):
            await shaper.request("POST", "/v1/chat/completions", json=BODY, cost_tokens=500)
        await asyncio.sleep(0.25)  # the settlements go within FLUSH_AFTER
        settled = _members(redis_url, "{aq:reconciled}:settled")
        # Each reply used far fewer tokens than the 500 reserved: five refunds, by id.
        assert sum(":r" in member for member in settled) == 5
        assert fleet.statistics().requests == 5
        assert shaper.statistics().ok == 5


# -- the cooldown, the retry budget, the mirror ---------------------------------------------


async def test_a_cooldown_published_by_one_process_holds_another_and_only_moves_later(
    redis_url: str,
):
    async with (
        RedisFleet(redis_url, name="cool") as first,
        RedisFleet(redis_url, name="cool") as second,
    ):
        _attach(first, rpm=6000, tpm=None)
        held = _attach(second, rpm=6000, tpm=None)
        first.publish_cooldown(2.0)
        await first._exchange()
        until = float(_get(redis_url, "{aq:cool}:cooldown"))
        await second.take(1, 0)  # any round trip brings the cooldown back
        loop = asyncio.get_running_loop()
        assert held.closed_until is not None
        assert held.closed_until == pytest.approx(loop.time() + 2.0, abs=0.3)
        assert held.probing  # held, not honoured in full: a probe of its own may end it
        first.publish_cooldown(0.5)  # shorter: the shared closure does not move earlier
        await first._exchange()
        assert float(_get(redis_url, "{aq:cool}:cooldown")) == until
        first.publish_cooldown(4.0)
        await first._exchange()
        assert float(_get(redis_url, "{aq:cool}:cooldown")) > until


async def test_a_probe_that_reopens_a_gate_is_not_undone_by_the_closure_it_published(
    redis_url: str,
):
    async with RedisFleet(redis_url, name="own") as fleet:
        gate = _attach(fleet, rpm=6000, tpm=None)
        loop = asyncio.get_running_loop()
        gate.hold(loop.time() + 2.0, probe_at=loop.time())
        fleet.publish_cooldown(gate.remaining())
        await fleet._exchange()
        gate.reopen()  # this process's probe got through
        await fleet.take(1, 0)
        await fleet._exchange()
        assert gate.is_open()


async def test_the_retry_budget_counts_the_whole_fleet(redis_url: str):
    async with (
        RedisFleet(redis_url, name="budget") as first,
        RedisFleet(redis_url, name="budget") as second,
    ):
        budgets = [
            RetryBudget(ratio=0.5, min_per_second=0, window=10, counts=f.retry_counts(window=10))
            for f in (first, second)
        ]
        loop = asyncio.get_running_loop()
        for _ in range(10):
            budgets[0].record_request(loop.time())
        await first._exchange()
        assert not budgets[1].try_spend(loop.time())  # it has not heard of them yet
        await second._exchange()
        assert [budgets[1].try_spend(loop.time()) for _ in range(6)] == [True] * 5 + [False]
        await second._exchange()
        await first._exchange()
        assert not budgets[0].try_spend(loop.time())  # the other process spent it all


async def test_the_upstreams_remaining_lowers_the_shared_level_and_never_raises_it(
    redis_url: str,
):
    async with RedisFleet(redis_url, name="mirror") as fleet:
        _attach(fleet, rpm=600, tpm=None)  # 10 a second, a burst of 10
        await fleet._exchange()
        full, _ = _level(redis_url, "mirror", "requests")
        assert full == pytest.approx(10)
        fleet.observed("requests", 3)
        await fleet._exchange()
        lowered, _ = _level(redis_url, "mirror", "requests")
        assert lowered <= 3 + 0.5
        fleet.observed("requests", 1000)
        await fleet._exchange()
        again, _ = _level(redis_url, "mirror", "requests")
        assert again <= lowered + 1  # the refill of a few milliseconds, nothing more


# -- the outage -----------------------------------------------------------------------------


async def test_redis_killed_mid_use_the_shaper_serves_its_share_then_falls_back_in_step(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    upstream = SimulatedUpstream(
        UpstreamConfig(rps=1000, latency_base=0.0, latency_per_token=0.0, retry_after_style="ms")
    )
    served = 0
    caplog.set_level(logging.WARNING, logger="asyncquota")
    async with (
        RedisFleet(redis_url, name="outage", timeout=0.05) as fleet,
        Shaper(
            "http://upstream.test",
            rpm=1200,
            transport=MockTransport(upstream.handle),
            hooks=(),
            fleet=fleet,
        ) as shaper,
    ):
        loop = asyncio.get_running_loop()
        stop = loop.time() + 2.5

        async def caller() -> None:
            nonlocal served
            while loop.time() < stop:
                try:
                    await shaper.request("POST", "/v1/chat/completions", json=BODY, deadline=5)
                    served += 1
                except QuotaError:
                    await asyncio.sleep(0.01)

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        await asyncio.sleep(0.5)
        before = served
        redis_server.stop()
        started = time.monotonic()
        ok = await fleet._exchange()
        assert not ok and time.monotonic() - started < 1.0  # failed, and did not hang
        assert fleet.statistics().degraded
        await asyncio.sleep(0.8)
        during = served - before
        assert during > 0  # the Shaper kept serving, on its own share
        assert fleet.statistics().degraded
        redis_server.start()
        assert await _eventually(lambda: not fleet.statistics().degraded, within=2.0)
        stats = fleet.statistics()
        assert not stats.degraded
        assert stats.degraded_seconds > 0.5
        assert stats.live_processes == 1
        await asyncio.gather(*callers)
    assert served > before + during
    assert "answers again" in caplog.text


async def test_a_fleet_whose_redis_is_down_from_the_start_runs_on_its_own(refusing_port: int):
    port = refusing_port  # bound, never listening: every connect is refused
    async with RedisFleet(f"redis://127.0.0.1:{port}/0", name="alone", timeout=0.05) as fleet:
        _attach(fleet, rpm=600, tpm=None)
        assert fleet.statistics().degraded
        started = time.monotonic()
        await fleet.take(1, 0)  # from the local share (10 a second, empty at first)
        assert time.monotonic() - started < 1.0
        assert fleet.statistics().live_processes == 1


# -- several Shapers against one upstream ---------------------------------------------------


async def test_three_shapers_sharing_one_quota_together_stay_within_it(redis_url: str):
    rps = 20
    upstream = SimulatedUpstream(
        UpstreamConfig(
            rps=rps, latency_base=0.01, latency_per_token=0.0, retry_after_style="ms", tpm=None
        )
    )
    fleets = [RedisFleet(redis_url, name="shared") for _ in range(3)]
    shapers = [
        Shaper(
            "http://upstream.test",
            rpm=rps * 60,
            transport=MockTransport(upstream.handle),
            hooks=(),
            fleet=fleet,
        )
        for fleet in fleets
    ]
    ok = 0
    loop = asyncio.get_running_loop()
    for fleet in fleets:
        await fleet.start()
    started = loop.time()
    async with shapers[0], shapers[1], shapers[2]:
        stop = loop.time() + 1.5

        async def caller(shaper: Shaper) -> None:
            nonlocal ok
            while loop.time() < stop:
                try:
                    await shaper.request("POST", "/v1/chat/completions", json=BODY, deadline=3)
                    ok += 1
                except QuotaError:
                    await asyncio.sleep(0.02)

        await asyncio.gather(*(caller(s) for s in shapers for _ in range(10)))
        elapsed = loop.time() - started
    for fleet in fleets:
        await fleet.aclose()
    totals = upstream.stats()["totals"]
    assert totals["429"] <= 0.02 * totals["requests"], totals
    assert totals["requests"] <= rps + rps * elapsed + 1, (totals, elapsed)
    assert ok > rps  # more than one burst: the shared bucket refilled for them all
    assert sum(f.statistics().requests for f in fleets) == totals["requests"]


async def test_shapers_sharing_one_fleet_must_shape_the_same_quota(redis_url: str):
    async with RedisFleet(redis_url, name="one") as fleet:
        transport = MockTransport(lambda request: None)  # never called
        async with Shaper("http://upstream.test", rpm=600, transport=transport, fleet=fleet):
            other = Shaper("http://upstream.test", rpm=1200, transport=transport, fleet=fleet)
            with pytest.raises(ValueError, match="same quota"):
                other.start()


# -- the surface ----------------------------------------------------------------------------


def test_the_url_password_never_shows():
    fleet = RedisFleet("redis://user:s3cret@127.0.0.1:6379/0", name="openai-main")
    assert "s3cret" not in repr(fleet)
    assert "name='openai-main'" in repr(fleet)
    with pytest.raises(ValueError) as caught:
        RedisFleet("http://user:s3cret@127.0.0.1/", name="x")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name"),
        ({"name": "a{b}"}, "braces"),
        ({"name": "x", "timeout": 0}, "timeout"),
        ({"name": "x", "lease_period": float("nan")}, "lease_period"),
    ],
)
def test_bad_configuration_is_refused_clearly(kwargs: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        RedisFleet("redis://127.0.0.1:6379/0", **kwargs)


def test_statistics_start_at_zero_and_alone():
    stats = RedisFleet("redis://127.0.0.1:6379/0", name="x").statistics()
    assert stats == FleetStatistics(
        calls=0, requests=0, degraded=False, degraded_seconds=0.0, live_processes=1, leases=0
    )


def test_the_core_imports_without_redis_and_the_fleet_says_what_to_install():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'redis' or name.startswith('redis.'):\n"
        "            raise ImportError('no redis here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import asyncquota\n"
        "asyncquota.Shaper\n"
        "try:\n"
        "    import asyncquota.fleet\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'asyncquota[redis]'" in result.stdout


async def test_a_fleet_down_from_the_start_takes_its_expected_share_not_the_whole_quota(
    refusing_port: int,
):
    port = refusing_port  # bound, never listening: every connect is refused
    url = f"redis://127.0.0.1:{port}/0"
    async with RedisFleet(url, name="four", timeout=0.05, processes=4) as fleet:
        _attach(fleet, rpm=6000, tpm=None)  # 100 a second for the fleet
        assert fleet.statistics().degraded
        assert fleet._fallback is not None and fleet._fallback[0] is not None
        assert fleet._fallback[0].rate == pytest.approx(25.0)  # a quarter of it
    async with RedisFleet(url, name="alone", timeout=0.05) as fleet:
        _attach(fleet, rpm=6000, tpm=None)
        assert fleet._fallback is not None and fleet._fallback[0] is not None
        assert fleet._fallback[0].rate == pytest.approx(100.0)  # told nothing: all of it
    with pytest.raises(ValueError, match="processes must be"):
        RedisFleet(url, name="x", processes=0)


async def test_a_timeout_our_own_busy_loop_made_late_is_not_yet_an_outage():
    # A Redis that accepts connections and never answers.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"redis://127.0.0.1:{port}/0"
        fleet = RedisFleet(url, name="hung", timeout=0.05)
        # Its client without its background task (whose heartbeats would call too).
        fleet._loop = asyncio.get_running_loop()
        fleet._redis = redis.asyncio.Redis.from_url(url)
        _attach(fleet, rpm=600, tpm=None)
        blocked = asyncio.get_running_loop().call_later(0.01, time.sleep, 0.2)  # a busy loop
        assert await fleet._call(["x"]) is None
        blocked.cancel()
        assert not fleet.statistics().degraded  # the timer ran 0.2 s late: not Redis's fault
        assert await fleet._call(["x"]) is None  # no answer on time, loop idle: an outage
        assert fleet.statistics().degraded
        await fleet._redis.aclose()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_shaper_with_a_fleet_and_no_rpm_or_tpm_is_not_held(redis_url: str):
    # Nothing of its quota is shared (no rpm, no tpm): its requests need no lease. Before
    # this was pinned, they waited for one that never came, in line until their max_wait.
    upstream = SimulatedUpstream(UpstreamConfig(rps=1000, latency_base=0.0, latency_per_token=0.0))
    async with (
        RedisFleet(redis_url, name="unbounded") as fleet,
        Shaper(
            "http://upstream.test", transport=MockTransport(upstream.handle), hooks=(), fleet=fleet
        ) as shaper,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = await asyncio.gather(
            *(shaper.request("POST", "/v1/chat/completions", json=BODY) for _ in range(50))
        )
        assert all(reply.status == 200 for reply in replies)
        assert loop.time() - started < 1.0
        assert fleet.statistics().requests == 50 and fleet.statistics().leases == 0
