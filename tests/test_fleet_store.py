"""RedisStore: tiers and budgets shared exactly by a fleet, on a real redis-server.

What the contract tests of test_governance_store.py cannot show with one process: four OS
processes reserving one budget at once, two Gateways built from one TOML file sharing a
tenant's day, Redis's own expiry, and Redis failing: killed, hung, or losing a reply after
a script ran (through ``FaultyLink``, a TCP relay that loses replies, cuts connections or
holds requests back), where a reservation must be neither waived nor counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from asyncquota import MockTransport, Request, Response, TenantLimitError
from asyncquota.errors import BudgetExceededError, StoreUnavailableError, UpstreamCapError
from asyncquota.governance import (
    BudgetGuard,
    BudgetReservation,
    ConfigError,
    Gateway,
    RedisStore,
    RedisURL,
    Routed,
    parse_config,
)
from asyncquota.governance.redis_store import BREAKER_OPEN
from asyncquota.governance.store import Reservation
from asyncquota.testing import SimulatedUpstream, UpstreamConfig

pytestmark = pytest.mark.looptime(False)

TAG = "{aq:governance}:"
ACCOUNT = "anthropic#1f0c9a2e"
FUTURE = 4_102_444_800.0 + 14 * 86_400  # 2100-01-15: months ahead of Redis's clock


def counter(url: str, key: str) -> float | None:
    """A counter as Redis holds it, read over a connection of the test's own."""
    with redis.Redis.from_url(url) as raw:
        value = raw.get(TAG + "c:" + key)
    return None if value is None else float(value)


def script_calls(url: str) -> int:
    """EVALSHA commands Redis has run so far."""
    with redis.Redis.from_url(url) as raw:
        stats = raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def eventually(check: Any, *, within: float = 3.0) -> None:
    """Wait (polling) until ``check()`` is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


# -- a fleet of processes ---------------------------------------------------------------------


def _spend(url: str, start: Any, results: Any) -> None:
    """One process of the fleet: 250 concurrent reservations of $0.125, half of them acme's."""

    async def main() -> tuple[Counter[str | None], Counter[str]]:
        store = RedisStore(url, timeout=10)
        guard = BudgetGuard(
            monthly=50.0,
            tenants={"acme": 10.0},
            caps={ACCOUNT: 45.0},
            store=store,
            wall_clock=lambda: FUTURE,
        )
        await store.get(["warm"])
        start.wait()  # all four processes reserve at once
        outcomes = await asyncio.gather(
            *(
                guard.reserve("acme" if n % 2 else "zeta", 0.125, account=ACCOUNT)
                for n in range(250)
            ),
            return_exceptions=True,
        )
        await store.aclose()
        granted = Counter(o.tenant for o in outcomes if isinstance(o, BudgetReservation))
        refused = Counter(type(o).__name__ for o in outcomes if isinstance(o, BaseException))
        return granted, refused

    results.put(asyncio.run(main()))


def test_1000_concurrent_reservations_from_4_processes_never_overshoot_and_sum_exactly(
    redis_url: str,
):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    results = context.Queue()
    fleet = [context.Process(target=_spend, args=(redis_url, start, results)) for _ in range(4)]
    for process in fleet:
        process.start()
    try:
        reports = [results.get(timeout=60) for _ in fleet]
    finally:
        for process in fleet:
            process.join(timeout=30)
    assert [process.exitcode for process in fleet] == [0, 0, 0, 0]
    granted: Counter[str | None] = sum((report[0] for report in reports), Counter())
    refused: Counter[str] = sum((report[1] for report in reports), Counter())

    # acme's own $10 is 80 of its 500; the cap's $45 is 360 in all, so 280 of zeta's 500.
    # Not one more, wherever the 1 000 came from; and every refusal is a refusal (Redis
    # answered each call), acme's by its budget, zeta's by the cap.
    assert granted == {"acme": 80, "zeta": 280}
    assert refused == {BudgetExceededError.__name__: 420, UpstreamCapError.__name__: 220}
    # Each granted reservation counted once on each of its counters, none in part.
    month = "2100-01"
    assert counter(redis_url, f"cap:{month}:{ACCOUNT}") == 45.0
    assert counter(redis_url, f"budget:{month}") == 45.0
    assert counter(redis_url, f"budget:{month}:tenant:acme") == 10.0
    assert counter(redis_url, f"budget:{month}:tenant:zeta") == 35.0


# -- keys and expiry -----------------------------------------------------------------------------


async def test_every_key_of_a_store_shares_one_hash_tag_and_so_one_cluster_slot(redis_url: str):
    store = RedisStore(redis_url)
    try:
        await store.reserve_all(
            [
                Reservation("tier:acme:gpt:rpm:1", 1, 5, FUTURE),
                Reservation("budget:m", 2, 9, FUTURE),
            ]
        )
        await store.add("cap:m:acct", 1, expires_at=FUTURE)
    finally:
        await store.aclose()
    with redis.Redis.from_url(redis_url) as raw:
        keys = [key.decode() for key in raw.keys("*")]
    assert len(keys) == 5  # three counters, two operation records
    assert all(key.startswith(TAG) for key in keys)
    assert len({key_slot(key.encode()) for key in keys}) == 1


async def test_a_counter_is_forgotten_at_its_expiry_by_redis_clock(redis_url: str):
    store = RedisStore(redis_url)
    try:
        await store.add("k", 7, expires_at=time.time() + 0.15)
        assert await store.get(["k"]) == [7.0]
        await asyncio.sleep(0.3)
        assert await store.get(["k"]) == [0.0]
        assert await store.reserve("k", 1, limit=5, expires_at=time.time() + 60) == 1.0
    finally:
        await store.aclose()


async def test_a_live_counter_keeps_its_later_expiry(redis_url: str):
    store = RedisStore(redis_url)
    now = time.time()

    def expiry() -> int:
        with redis.Redis.from_url(redis_url) as raw:
            return int(raw.pexpiretime(TAG + "c:k"))

    try:
        await store.add("k", 1, expires_at=now + 100.0004)
        assert expiry() == math.ceil((now + 100.0004) * 1000)  # rounded up: never early
        await store.add("k", 1, expires_at=now + 50)  # an earlier expiry does not shorten it
        await store.reserve_all([Reservation("k", 1, None, now + 60)])
        assert expiry() == math.ceil((now + 100.0004) * 1000)
        await store.reserve("k", 1, limit=None, expires_at=now + 200)  # a later one extends it
        assert expiry() == math.ceil((now + 200) * 1000)
        assert await store.get(["k"]) == [4.0]
    finally:
        await store.aclose()


# -- Gateways from one TOML file --------------------------------------------------------------


def governance_file(tmp_path: Path, url: str) -> Path:
    file = tmp_path / "governance.toml"
    file.write_text(
        f"""
store = "{url}"

[upstreams.openai]
base_url = "http://openai.test"

[models.gpt]
upstream = "openai"
context_window = 128000
input_per_mtok = 2.5
output_per_mtok = 10.0

[routing]
default_model = "gpt"

[tiers.free."*"]
rpd = 5

[tenants]
default_tier = "free"

[budget]
monthly = 100.0
when_spent = "reject"
""",
        encoding="utf-8",
    )
    return file


class Upstream:
    """A simulated upstream that answers at once and counts what reached it."""

    def __init__(self) -> None:
        self.sim = SimulatedUpstream(
            UpstreamConfig(rps=1000.0, latency_base=0.0, latency_per_token=0.0)
        )
        self.seen = 0

    async def handle(self, request: Request) -> Response:
        self.seen += 1
        return await self.sim.handle(request)


def gateway_from(file: Path, upstream: Upstream) -> Gateway:
    return Gateway.from_config(
        file, transports={"openai": MockTransport(upstream.handle)}, wall_clock=time.time
    )


def chat() -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 20}


async def test_two_gateways_configured_with_one_redis_share_a_tenants_day_and_the_budget(
    redis_url: str, tmp_path: Path
):
    file = governance_file(tmp_path, redis_url)
    upstream = Upstream()
    first, second = gateway_from(file, upstream), gateway_from(file, upstream)
    async with first, second:
        outcomes = await asyncio.gather(
            *(gateway.request(chat(), tenant="acme") for gateway in [first, second] * 6),
            return_exceptions=True,
        )
        served = [o for o in outcomes if isinstance(o, Routed)]
        refused = [o for o in outcomes if isinstance(o, TenantLimitError)]
        # The free tier's 5 a day, across both gateways: not 5 each.
        assert (len(served), len(refused)) == (5, 7)
        assert upstream.seen == 5
        assert {r.dimension for r in refused} == {"rpd"}
        statuses = [await gateway.quota_status("acme", "gpt") for gateway in (first, second)]
        for status in statuses:
            [rpd] = status.models["gpt"]
            assert (rpd.used, rpd.limit) == (5.0, 5.0)
        spent = [status.budget[0].used for status in statuses]
        assert spent[0] == spent[1] == pytest.approx(sum(r.cost for r in served), abs=1e-12)


async def test_while_redis_is_down_requests_are_refused_unsent_and_served_again_once_it_is_back(
    redis_url: str, redis_server: Any, tmp_path: Path
):
    upstream = Upstream()
    gateway = gateway_from(governance_file(tmp_path, redis_url), upstream)
    loop = asyncio.get_running_loop()
    async with gateway:
        await gateway.request(chat(), tenant="acme")
        redis_server.stop()
        try:
            for tenant in ("acme", None):
                started = loop.time()
                with pytest.raises(StoreUnavailableError, match="is unavailable") as caught:
                    await gateway.request(chat(), tenant=tenant)
                assert loop.time() - started < 0.5 + 1.0  # the store's timeout, and slack
                assert caught.value.reason == "store_unavailable"
                assert caught.value.path == redis_url
            assert upstream.seen == 1  # refused before anything was sent: no limit waived
        finally:
            redis_server.start()
        # Back within the breaker's open time (and a probe's round trip).
        back_by = loop.time() + 1.0
        while True:
            try:
                routed = await gateway.request(chat(), tenant="acme")
                break
            except StoreUnavailableError:
                assert loop.time() < back_by
                await asyncio.sleep(0.05)
        assert isinstance(routed, Routed)
        assert upstream.seen == 2


async def test_a_redis_that_accepts_but_never_answers_fails_each_call_within_the_timeout():
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass
        writer.close()

    hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://:hunter2-secret@127.0.0.1:{port}/0", timeout=0.2)
    loop = asyncio.get_running_loop()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        for make in (
            lambda: store.reserve("k", 1, limit=5, expires_at=FUTURE),
            lambda: store.add("k", 1, expires_at=FUTURE),
            lambda: store.get(["k"]),
        ):
            await asyncio.sleep(BREAKER_OPEN)  # the last failure's breaker has closed
            started = loop.time()
            with pytest.raises(StoreUnavailableError, match=r"did not answer within 0\.2 s") as err:
                await make()
            assert 0.15 <= loop.time() - started < 0.2 + 1.0
            assert "hunter2" not in str(err.value) and "hunter2" not in err.value.path
            # Right after a failure the breaker is open: the next call fails at once,
            # without asking Redis.
            started = loop.time()
            with pytest.raises(StoreUnavailableError, match="failed a moment ago"):
                await store.get(["k"])
            assert loop.time() - started < 0.05
        assert ticks >= 10  # the loop ran all along
        assert "hunter2" not in repr(store)
        assert "undos=1" in repr(store)  # the reservation may have run: it is to be undone
        started = loop.time()
        await store.aclose()  # tries the undo once, within the timeout, then gives it up
        assert loop.time() - started < 0.2 + 1.0
        assert "undos=0 given_up=1" in repr(store)
    finally:
        ticker.cancel()
        hung.close()
        await hung.wait_closed()


# -- lost replies: never waived, never counted twice -----------------------------------------


class FaultyLink:
    """A TCP relay to Redis that, on the connections open when told, loses the replies
    (``mute``), cuts the connection once a request has gone through (``cut``), or holds the
    requests back until ``release`` (``hold``). Connections opened later are not touched."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.links: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aenter__(self) -> FaultyLink:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for link in self.links:
            for writer in (link["client"], link["server"]):
                writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _flag(self, name: str) -> None:
        for link in self.links:
            link[name] = True

    def mute(self) -> None:
        self._flag("mute")

    def cut(self) -> None:
        self._flag("cut")

    def hold(self) -> None:
        self._flag("hold")

    async def release(self) -> None:
        for link in self.links:
            if link.pop("hold", False) and link["held"]:
                link["server"].write(bytes(link["held"]))
                link["held"].clear()
                await link["server"].drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.redis_port
        )
        link: dict[str, Any] = {"client": writer, "server": upstream_writer, "held": bytearray()}
        self.links.append(link)
        for pump in (self._up(reader, link), self._down(upstream_reader, link)):
            task = asyncio.create_task(pump)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _up(self, reader: asyncio.StreamReader, link: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if link.get("hold"):
                    link["held"] += data
                else:
                    link["server"].write(data)
                    await link["server"].drain()

    async def _down(self, reader: asyncio.StreamReader, link: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if link.get("cut"):
                    link["client"].close()
                    return
                if not link.get("mute"):
                    link["client"].write(data)
                    await link["client"].drain()


async def warm(store: RedisStore) -> None:
    """One connection open, and the scripts loaded (Redis forgets them when it restarts)."""
    await store.reserve("warm", 0, limit=None, expires_at=FUTURE)
    await store.add("warm", 0, expires_at=FUTURE)


@pytest.fixture
async def link(redis_server: Any, redis_url: str) -> Any:
    async with FaultyLink(redis_server.port) as relay:
        yield relay


async def test_a_reservation_that_ran_but_whose_reply_was_lost_is_undone(
    link: FaultyLink, redis_url: str
):
    store = RedisStore(link.url, timeout=0.3)
    try:
        await warm(store)  # the one connection the next call will take
        link.mute()
        request = [
            Reservation("budget", 3.0, 5.0, FUTURE),
            Reservation("cap", 5.0, 5.0, FUTURE),
            Reservation("budget", 2.0, 5.0, FUTURE),
        ]
        reserving = asyncio.create_task(store.reserve_all(request))
        await eventually(lambda: counter(redis_url, "budget") == 5.0)  # Redis ran it...
        assert counter(redis_url, "cap") == 5.0
        with pytest.raises(StoreUnavailableError, match="did not answer"):
            await reserving  # ...its caller was told no, so it must not stay counted
        await eventually(lambda: counter(redis_url, "budget") == counter(redis_url, "cap") == 0)
        # Redis has run the undo; the store counts it done when its reply is read, which
        # may come a moment after another connection sees the counters at 0.
        await eventually(lambda: "undos=0" in repr(store))
        # The caller's retry gets the whole budget: the lost one is not counted twice.
        assert await store.reserve("budget", 5.0, limit=5.0, expires_at=FUTURE) == 5.0
    finally:
        await store.aclose()


async def test_a_reservation_given_up_before_it_reached_redis_does_nothing_when_it_arrives(
    link: FaultyLink, redis_url: str
):
    store = RedisStore(link.url, timeout=0.3)
    try:
        await warm(store)
        link.hold()
        with pytest.raises(StoreUnavailableError, match="did not answer"):
            await store.reserve("budget", 5.0, limit=5.0, expires_at=FUTURE)
        await eventually(lambda: "undos=0" in repr(store))  # its tombstone is written
        ran = script_calls(redis_url)
        await link.release()  # the request reaches Redis now, long after its caller left
        await eventually(lambda: script_calls(redis_url) == ran + 1)
        assert counter(redis_url, "budget") is None
    finally:
        await store.aclose()


async def test_a_reservation_whose_caller_is_cancelled_in_flight_is_undone(
    link: FaultyLink, redis_url: str
):
    store = RedisStore(link.url, timeout=5)
    try:
        await warm(store)
        link.hold()
        reserving = asyncio.create_task(
            store.reserve_all([Reservation("a", 1, 9, FUTURE), Reservation("b", 2, 9, FUTURE)])
        )
        await asyncio.sleep(0.05)
        reserving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserving
        ran = script_calls(redis_url)
        await link.release()
        await eventually(lambda: "undos=0" in repr(store) and script_calls(redis_url) >= ran + 1)
        await eventually(lambda: counter(redis_url, "a") in (None, 0.0))
        assert counter(redis_url, "b") in (None, 0.0)
    finally:
        await store.aclose()


async def test_a_call_retried_on_a_broken_connection_after_it_ran_counts_once(
    link: FaultyLink, redis_url: str
):
    store = RedisStore(link.url, timeout=2)
    try:
        await warm(store)
        ran = script_calls(redis_url)
        link.cut()  # the reply never comes back: redis-py retries on a fresh connection
        assert await store.reserve("k", 2, limit=10, expires_at=FUTURE) == 2.0
        assert script_calls(redis_url) == ran + 2  # sent twice...
        assert counter(redis_url, "k") == 2.0  # ...counted once
        link.cut()
        assert await store.add("k", 0.5, expires_at=FUTURE) == 2.5
        assert counter(redis_url, "k") == 2.5
        assert "failures=0" in repr(store)
    finally:
        await store.aclose()


# -- construction, configuration, secrets -------------------------------------------------------


async def test_a_password_never_shows_in_repr_nor_errors(redis_server: Any):
    url = f"redis://app:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    store = RedisStore(url, name="chatbot")
    assert repr(store) == (
        f"<RedisStore redis://***@127.0.0.1:{redis_server.port}/0 name='chatbot' open "
        "calls=0 round_trips=0 failures=0 undos=0 given_up=0>"
    )
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            await store.get(["k"])  # the server knows no user "app"
        assert "s3cret" not in str(caught.value) and "s3cret" not in caught.value.path
    finally:
        await store.aclose()
    with pytest.raises(RuntimeError, match=r"closed"):
        await store.reserve("k", 1, limit=None, expires_at=FUTURE)
    with pytest.raises(ValueError, match="redis://, rediss:// or unix://") as refused:
        RedisStore("http://user:s3cret-pw@example.com")
    assert "s3cret" not in str(refused.value)


async def test_a_counter_someone_else_overwrote_fails_the_call_without_naming_its_key(
    redis_url: str,
):
    with redis.Redis.from_url(redis_url) as raw:
        raw.set(TAG + "c:tier:secret-tenant:rpd", "not-a-number")
    store = RedisStore(redis_url)
    try:
        with pytest.raises(StoreUnavailableError, match="not a number") as caught:
            await store.reserve_all(
                [Reservation("fine", 1, 5, FUTURE), Reservation("tier:secret-tenant:rpd", 1, 5, 0)]
            )
        assert "secret-tenant" not in str(caught.value)
        # Redis answered (with an error, before writing anything): nothing to undo.
        assert "undos=0" in repr(store)
        assert await store.get(["fine"]) == [0.0]
    finally:
        await store.aclose()


def test_names_prefixes_and_timeouts_are_checked():
    for bad in ("", "a{b", "c}"):
        with pytest.raises(ValueError, match="without braces"):
            RedisStore("redis://127.0.0.1:1/0", name=bad)
    with pytest.raises(ValueError, match="without braces"):
        RedisStore("redis://127.0.0.1:1/0", prefix="")
    for bad in (0, -1, math.nan, True):
        with pytest.raises(ValueError, match="timeout"):
            RedisStore("redis://127.0.0.1:1/0", timeout=bad)


async def test_an_expiry_that_is_not_a_time_is_refused_before_anything_is_sent():
    store = RedisStore("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(ValueError, match="expires_at must be a finite Unix time"):
            await store.reserve("k", 1, limit=None, expires_at=math.inf)
        assert "calls=0" in repr(store)
    finally:
        await store.aclose()


def test_the_toml_store_is_a_path_or_a_redis_url_whose_password_stays_out_of_reprs(
    tmp_path: Path,
):
    minimal = parse_config(
        {**minimal_table(), "store": "redis://:pw-in-url@10.0.0.5:6379/2"},
        base_dir=tmp_path,  # a URL is not a path: it is not taken from any folder
    )
    assert isinstance(minimal.store, RedisURL)
    assert minimal.store == "redis://:pw-in-url@10.0.0.5:6379/2"
    assert "pw-in-url" not in repr(minimal)
    for url in ("rediss://cache.internal:6380/0", "unix:///run/redis.sock?db=1"):
        data = {**minimal_table(), "store": url}
        assert parse_config(data, base_dir=tmp_path).store == url
    data = {**minimal_table(), "store": "postgres://user:pw-x@db/quota"}
    with pytest.raises(ConfigError, match="store must be a SQLite file path or a redis://") as bad:
        parse_config(data)
    assert "pw-x" not in str(bad.value)
    assert parse_config({**minimal_table(), "store": "q.db"}, base_dir=tmp_path).store == (
        tmp_path / "q.db"
    )


def minimal_table() -> dict[str, Any]:
    return {
        "upstreams": {"local": {"base_url": "http://127.0.0.1:8000"}},
        "models": {
            "llama": {
                "upstream": "local",
                "context_window": 8192,
                "input_per_mtok": 0,
                "output_per_mtok": 0,
            }
        },
    }


def test_without_redis_py_the_package_imports_and_a_redis_store_says_what_to_install():
    program = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "import asyncquota, asyncquota.governance as g\n"
        "try:\n"
        "    g.RedisStore('redis://127.0.0.1:6379/0')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'asyncquota[redis]'" in done.stdout


async def test_gateways_on_one_redis_share_each_upstreams_quota_through_a_fleet(
    redis_url: str, tmp_path: Path
):
    # With store = "redis://...", each upstream's Shaper gets a RedisFleet named after it:
    # gateways in several processes (the proxy's workers) share its rpm, not only tiers.
    file = governance_file(tmp_path, redis_url)
    upstream = Upstream()
    first, second = gateway_from(file, upstream), gateway_from(file, upstream)
    async with first, second:
        fleets = [gateway.upstreams["openai"]._fleet for gateway in (first, second)]
        assert all(fleet is not None and fleet.name == "upstream:openai" for fleet in fleets)
        for gateway in (first, second):
            await gateway.request(chat(), tenant="acme")
        assert all(fleet.statistics().requests == 1 for fleet in fleets)
        assert max(fleet.statistics().live_processes for fleet in fleets) == 2
    assert all(fleet._closed for fleet in fleets)  # the gateway closed what it made


async def test_calls_of_one_turn_share_a_round_trip_and_a_flushed_script_is_sent_whole(
    redis_url: str,
):
    with redis.Redis.from_url(redis_url) as raw:
        raw.script_flush()  # as a fresh Redis: no script loaded yet
    store = RedisStore(redis_url)
    try:
        # No script in Redis yet: by SHA (refused), then whole: two round trips.
        await store.reserve("warm", 1, limit=None, expires_at=FUTURE)
        assert store.round_trips == 2
        # 50 reservations made together: one pipeline (a script each, each atomic).
        replies = await asyncio.gather(
            *(store.reserve("shared", 1, limit=30, expires_at=FUTURE) for _ in range(50))
        )
        assert sum(reply is not None for reply in replies) == 30  # the limit, exactly
        assert store.round_trips == 3 and "calls=51" in repr(store)
        # Alone, a call is a round trip of its own.
        assert await store.get(["shared"]) == [30.0]
        assert store.round_trips == 4
        # Redis forgot the scripts (a restart, a SCRIPT FLUSH): the batch is resent whole.
        with redis.Redis.from_url(redis_url) as raw:
            raw.script_flush()
        added = await asyncio.gather(
            *(store.add("other", 2, expires_at=FUTURE) for _ in range(5))
        )
        assert sorted(added) == [2.0, 4.0, 6.0, 8.0, 10.0]
        assert store.round_trips == 6  # by SHA (refused), then whole
    finally:
        await store.aclose()


async def test_a_batch_that_breaks_in_our_own_code_fails_its_calls_instead_of_hanging_them(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    store = RedisStore(redis_url)

    async def broken(self: RedisStore, commands: Any, *, by_sha: bool) -> list[Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(RedisStore, "_pipeline", broken)  # slots: patched on the class
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                store.get(["k"]),
                store.reserve("k", 1, limit=5, expires_at=FUTURE),
                return_exceptions=True,
            ),
            timeout=2,
        )
        assert all(isinstance(o, StoreUnavailableError) for o in outcomes)
        assert "its answer was lost" in str(outcomes[0])
    finally:
        monkeypatch.undo()
        await store.aclose()
