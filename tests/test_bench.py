"""The benchmark harness: the night's numbers, the metrics' arithmetic, a small virtual run."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import statistics
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiolimiter import AsyncLimiter

from asyncquota.bench import (
    Call,
    RequestLog,
    SessionModel,
    percentile,
    request_quota,
    summarize,
)
from asyncquota.bench.report import table
from asyncquota.bench.runner import STOP_GRACE, drive
from asyncquota.bench.strategies import PEERS, Strategy, Target, load_strategy
from asyncquota.bench.strategies.base import HTTPStatusError
from asyncquota.bench.strategies.tenacity_limiter import retry_after_seconds
from asyncquota.bench.virtual import TICK, new_virtual_loop
from asyncquota.cli import main
from asyncquota.errors import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    OverloadedError,
    QueueFullError,
    ThrottledError,
    TransportError,
)
from asyncquota.outcomes import RequestOutcome, classify
from asyncquota.testing import UpstreamConfig
from asyncquota.transport import Response

DEADLINES = {"interactive": 10.0, "batch": 120.0}
INTERACTIVE, BATCH = 0, 1

# -- the night ---------------------------------------------------------------------------


def test_seven_in_ten_sessions_are_interactive_and_all_speak_first_within_the_spike():
    model = SessionModel(sessions=20_000, seed=7)
    sessions = [model.session(i) for i in range(model.sessions)]
    interactive = sum(s.priority == "interactive" for s in sessions) / len(sessions)
    firsts = [s.first_at for s in sessions]
    assert 0.69 <= interactive <= 0.71
    assert min(firsts) >= 0.0 and max(firsts) <= 5.0
    assert statistics.mean(firsts) == pytest.approx(2.5, abs=0.05)
    assert max(firsts) > 4.99 and min(firsts) < 0.01


def test_think_times_are_exponential_with_mean_30_s_and_max_tokens_span_64_to_256():
    model = SessionModel(sessions=1_000, seed=7)
    turns = [model.turn(i, n) for i in range(1_000) for n in range(20)]
    thinks = [t.think for t in turns]
    tokens = [t.max_tokens for t in turns]
    assert statistics.mean(thinks) == pytest.approx(30.0, rel=0.02)
    # An exponential's median is mean * ln 2.
    assert statistics.median(thinks) == pytest.approx(30.0 * math.log(2), rel=0.03)
    assert min(thinks) >= 0.0
    assert min(tokens) == 64 and max(tokens) == 256
    assert statistics.mean(tokens) == pytest.approx(160.0, rel=0.01)


def test_every_draw_depends_only_on_seed_session_and_turn():
    a, b = SessionModel(seed=3), SessionModel(seed=3)
    assert [a.session(i) for i in range(50)] == [b.session(i) for i in range(50)]
    # Asking in another order (as another strategy would) draws the same turn.
    assert a.turn(17, 2) == b.turn(17, 2) == a.turn(17, 2)
    other = SessionModel(seed=4)
    assert [a.session(i) for i in range(50)] != [other.session(i) for i in range(50)]


def test_a_call_carries_the_class_deadline_and_an_openai_body():
    model = SessionModel(seed=1)
    session = next(model.session(i) for i in range(100) if model.session(i).priority == "batch")
    call = model.call(session, model.turn(session.index, 0))
    assert call.deadline == 120.0
    assert call.body["max_tokens"] == call.max_tokens
    assert len(call.body["messages"][0]["content"]) == 400


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("sessions", 0, "sessions must be a positive integer"),
        ("duration", -1.0, "duration must be a positive number"),
        ("interactive_share", 1.5, "interactive_share must be between 0 and 1"),
        ("max_tokens_range", (10, 5), "max_tokens_range must be"),
    ],
)
def test_a_session_model_refuses_nonsense(field: str, value: object, words: str):
    with pytest.raises(ValueError, match=words):
        SessionModel(**{field: value})  # type: ignore[arg-type]


# -- metrics -----------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_and_none_for_nothing():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([4.0], 99) == 4.0
    assert percentile([], 50) is None


def test_the_quota_follows_the_capacity_schedule():
    shift = UpstreamConfig.preset("shift")
    assert request_quota(shift, 60.0) == 300 * 20 + 150 * 20 + 300 * 20
    assert request_quota(shift, 30.0) == 300 * 20 + 150 * 10
    assert request_quota(UpstreamConfig(rps=100.0), 2.5) == 250.0


def test_summary_of_a_hand_built_night():
    log = RequestLog.from_rows(
        [
            (INTERACTIVE, 0.0, 1.0, RequestOutcome.OK),
            (INTERACTIVE, 0.0, 3.0, RequestOutcome.OK),
            (INTERACTIVE, 1.0, 11.0, RequestOutcome.DEADLINE_EXCEEDED),
            (INTERACTIVE, 2.0, 2.25, RequestOutcome.SHED),
            (BATCH, 0.0, 2.0, RequestOutcome.OK),
            (BATCH, 1.0, 1.5, RequestOutcome.THROTTLED),
            (BATCH, 2.0, 3.0, RequestOutcome.TRANSPORT),
            (BATCH, 4.0, None, None),
        ]
    )
    result = summarize(
        log,
        config=UpstreamConfig(rps=2.0),
        deadlines=DEADLINES,
        upstream_totals={"requests": 10, "ok": 3, "429": 4, "5xx": 0},
        stopped_at=12.0,
    )
    # The busy window runs from 0 to the stop (a request never ended); 2 req/s for 12 s.
    assert result["busy_window_s"] == 12.0
    assert result["quota_requests"] == 24.0
    assert result["ok"] == result["ok_in_deadline"] == 3
    assert result["goodput_rps"] == 0.25
    assert result["goodput_ratio"] == 0.125
    assert result["lost"] == 1
    assert result["shed"] == 1
    assert result["deadline_exceeded"] == 1
    assert result["errors"] == 2
    assert result["upstream_429_ratio"] == 0.4
    assert result["latency_ms"]["interactive"] == {"p50": 1000.0, "p99": 3000.0}
    assert result["latency_ms"]["batch"] == {"p50": 2000.0, "p99": 2000.0}
    assert result["reject_ms"] == {"p50": 250.0, "p99": 250.0}
    assert result["ok_in_deadline_by_class"] == {"interactive": 2, "batch": 1}


def test_an_answer_after_its_deadline_is_ok_but_not_in_deadline():
    log = RequestLog.from_rows([(INTERACTIVE, 0.0, 10.5, RequestOutcome.OK)])
    result = summarize(log, config=UpstreamConfig(), deadlines=DEADLINES,
                       upstream_totals={}, stopped_at=10.5)
    assert (result["ok"], result["ok_in_deadline"], result["goodput_ratio"]) == (1, 0, 0.0)


def test_an_outcome_is_recorded_once():
    log = RequestLog()
    index = log.begin(INTERACTIVE, 0.0)
    log.end(index, 1.0, RequestOutcome.OK)
    with pytest.raises(ValueError, match="already ended"):
        log.end(index, 2.0, RequestOutcome.OTHER)
    assert repr(log) == "<RequestLog requests=1 ok=1 open=0>"


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (QueueFullError("full"), RequestOutcome.SHED),
        (DeadlineUnreachableError("late"), RequestOutcome.SHED),
        (DeadlineExceededError("late"), RequestOutcome.DEADLINE_EXCEEDED),
        (TimeoutError(), RequestOutcome.DEADLINE_EXCEEDED),
        (ThrottledError("slow down", status=429), RequestOutcome.THROTTLED),
        (ThrottledError("the cooldown outlasts the deadline"), RequestOutcome.THROTTLED),
        (OverloadedError("busy upstream", status=529), RequestOutcome.SERVER_ERROR),
        (asyncio.CancelledError(), RequestOutcome.CANCELLED),
        (HTTPStatusError(Response(503)), RequestOutcome.SERVER_ERROR),
        (HTTPStatusError(Response(400)), RequestOutcome.HTTP_ERROR),
        (TransportError("reset"), RequestOutcome.TRANSPORT),
        (aiohttp.ServerDisconnectedError(), RequestOutcome.TRANSPORT),
        (ConnectionResetError(), RequestOutcome.TRANSPORT),
        (KeyError("bug"), RequestOutcome.OTHER),
    ],
)
def test_whatever_a_strategy_raises_maps_to_one_outcome(
    exc: BaseException, outcome: RequestOutcome
):
    assert classify(exc) == outcome


def test_openai_errors_map_by_their_status_code():
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://x/v1/chat/completions")
    throttled = openai.RateLimitError(
        "slow down", response=httpx2.Response(429, request=request), body=None
    )
    assert classify(throttled) == RequestOutcome.THROTTLED
    assert classify(openai.APIConnectionError(request=request)) == RequestOutcome.TRANSPORT


def test_tenacity_reads_retry_after_in_each_dialect():
    def error(headers: dict[str, str]) -> HTTPStatusError:
        return HTTPStatusError(Response(429, headers))

    assert retry_after_seconds(error({"retry-after": "2"})) == 2.0
    assert retry_after_seconds(error({"retry-after-ms": "1500", "retry-after": "2"})) == 1.5
    assert retry_after_seconds(error({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"})) == 0.0
    assert retry_after_seconds(error({})) is None
    assert retry_after_seconds(TransportError("reset")) is None


# -- the loop and the driver -------------------------------------------------------------


def test_the_virtual_loop_runs_aiolimiter_contention_without_livelock():
    async def night() -> tuple[float, int]:
        limiter = AsyncLimiter(300, 1.0)
        passed = 0

        async def one() -> None:
            nonlocal passed
            async with limiter:
                passed += 1

        await asyncio.gather(*(one() for _ in range(3_000)))
        return asyncio.get_running_loop().time(), passed

    loop = new_virtual_loop()
    try:
        finished_at, passed = loop.run_until_complete(night())
    finally:
        loop.close()
    # A full bucket of 300, then 2 700 more at 300/s: 9 s of virtual time.
    assert passed == 3_000
    assert finished_at == pytest.approx(9.0, abs=0.01)


def test_a_timer_due_now_fires_one_tick_later():
    async def due_now() -> float:
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        loop.call_at(loop.time(), fired.set_result, None)
        await fired
        return loop.time()

    loop = new_virtual_loop()
    try:
        assert loop.run_until_complete(due_now()) == TICK
    finally:
        loop.close()


class _HalfSecond(Strategy):
    name = "half-second"
    description = "answers in 0.5 s"

    async def complete(self, call: Call) -> None:
        await asyncio.sleep(0.5)

    async def aclose(self) -> None:
        pass


class _Unstoppable(Strategy):
    """Ignores the deadline's cancellation once, then hangs: only the hard stop ends it."""

    name = "unstoppable"
    description = "hangs"

    async def complete(self, call: Call) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(math.inf)
        await asyncio.sleep(math.inf)

    async def aclose(self) -> None:
        pass


def _target() -> Target:
    return Target("http://unused", UpstreamConfig())


async def test_every_session_speaks_until_the_duration_and_every_request_ends_once():
    model = SessionModel(sessions=50, duration=20.0, think_mean=5.0, seed=2)
    log = RequestLog()
    seconds: list[float] = []
    stopped = await drive(_HalfSecond(_target()), model, log, on_second=seconds.append)
    expected = 0
    for i in range(model.sessions):
        t, n = model.session(i).first_at, 0
        while True:
            expected += 1
            t += 0.5 + model.turn(i, n).think
            if t >= model.duration:
                break
            n += 1
    assert len(log) == expected
    assert log.ok == expected and log.open == 0
    assert stopped < model.duration + 0.5
    assert seconds[:3] == [1.0, 2.0, 3.0]


async def test_a_session_is_made_when_its_first_message_is_due_and_starts_then():
    model = SessionModel(sessions=200, duration=10.0, spike=5.0, think_mean=5.0, seed=3)
    log = RequestLog()
    alive: list[tuple[float, int]] = []

    def count(t: float) -> None:
        alive.append((t, len(asyncio.all_tasks())))

    await drive(_HalfSecond(_target()), model, log, on_second=count)
    firsts = sorted(model.session(i).first_at for i in range(model.sessions))
    # Each session's first request starts at its first message's time.
    starts = sorted(log.starts)
    for first in firsts:
        at = bisect.bisect_left(starts, first - 1e-5)
        assert starts[at] == pytest.approx(first, abs=1e-5)
    # Only the sessions that began are tasks (plus the driver's own few), not all from 0 s.
    for t, tasks in alive[:4]:
        begun = sum(first <= t for first in firsts)
        assert tasks <= begun + 4, (t, tasks, begun)


async def test_a_request_still_open_at_the_hard_stop_is_lost_not_counted():
    model = SessionModel(sessions=3, duration=1.0, spike=0.0, interactive_deadline=1.0,
                         batch_deadline=2.0)
    log = RequestLog()
    stopped = await drive(_Unstoppable(_target()), model, log)
    assert stopped == 1.0 + 2.0 + STOP_GRACE
    assert len(log) == 3 and log.open == 3
    result = summarize(log, config=UpstreamConfig(), deadlines=DEADLINES,
                       upstream_totals={}, stopped_at=stopped)
    assert result["lost"] == 3 and result["requests"] == 3


def test_unknown_strategies_are_named():
    with pytest.raises(ValueError, match="Unknown strategy 'fast'"):
        load_strategy("fast")


# -- the command -------------------------------------------------------------------------

RESULT_KEYS = {
    "requests", "ok", "ok_in_deadline", "shed", "deadline_exceeded", "errors", "lost",
    "goodput_rps", "goodput_ratio", "upstream_requests", "upstream_429",
    "upstream_429_ratio", "latency_ms", "ok_in_deadline_by_class", "reject_ms", "cpu_s",
    "peak_rss_mb", "wall_s",
}


def test_a_small_virtual_crisis_through_the_command(tmp_path: Path, capsys):
    out, picture = tmp_path / "out.json", tmp_path / "out.png"
    status = main([
        "bench", "--virtual", "--scenario", "crisis", "--sessions", "300", "--duration", "10",
        "--strategies", ",".join(PEERS), "--json", str(out), "--plot", str(picture),
    ])
    assert status == 0
    doc = orjson.loads(out.read_bytes())
    assert {"scenario", "sessions", "duration_s", "upstream", "results"} <= doc.keys()
    assert (doc["scenario"], doc["sessions"], doc["duration_s"]) == ("crisis", 300, 10.0)
    assert doc["upstream"]["rps"] == 300.0
    assert list(doc["results"]) == list(PEERS)
    for name, result in doc["results"].items():
        assert result.keys() >= RESULT_KEYS, name
        assert result["latency_ms"].keys() == {"interactive", "batch"}
        for cls in ("interactive", "batch"):
            assert result["latency_ms"][cls].keys() == {"p50", "p99"}
        assert result["ok_in_deadline_by_class"].keys() == {"interactive", "batch"}
        assert result["reject_ms"].keys() == {"p50", "p99"}
        assert result["lost"] == 0, name
        ended = result["ok"] + result["shed"] + result["deadline_exceeded"] + result["errors"]
        assert ended == result["requests"] > 300, name
        assert result["cpu_s"] > 0 and result["peak_rss_mb"] > 0, name
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert printed.strip() == table(doc)
