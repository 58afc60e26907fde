"""Usage alerts: crossings fire once and re-arm, delivery never waits on a sink, webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.errors import ClosedError, TransportError, UpstreamError
from asyncquota.governance.alerts import (
    Alert,
    CallbackSink,
    LoggingSink,
    MonitorStatistics,
    ShedBatchAction,
    UsageMonitor,
    WebhookSink,
)
from asyncquota.priority import Priority

T0 = 1_780_000_000.0  # a Unix time in 2026


def virtual_clock() -> Callable[[], float]:
    """Unix time that advances with the (virtual) loop clock."""
    loop = asyncio.get_running_loop()
    return lambda: T0 + loop.time()


def now() -> float:
    return asyncio.get_running_loop().time()


def quiet(**options: object) -> UsageMonitor:
    """A monitor with no sinks and a fixed clock, for the crossing rules alone."""
    return UsageMonitor(sinks=(), wall_clock=lambda: T0, **options)  # type: ignore[arg-type]


def levels(monitor: UsageMonitor, dimension: str, ratios: list[float]) -> list[str | None]:
    """The level each observation fires (None: nothing), against a limit of 1000."""
    fired = [monitor.observe(dimension, ratio * 1000, 1000) for ratio in ratios]
    return [alert.level if alert else None for alert in fired]


class Recorder:
    """A sink that keeps what it got, when it got it, and can be made slow or broken."""

    def __init__(self, delay: float = 0.0, *, fail: BaseException | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.got: list[tuple[float, Alert]] = []
        self.closed = False

    async def send(self, alert: Alert) -> None:
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.got.append((now(), alert))

    async def aclose(self) -> None:
        self.closed = True


class Target:
    """Stands in for a Shaper: records what it was told to shed."""

    def __init__(self) -> None:
        self.calls: list[tuple[Priority | int, float]] = []

    def shed_below(self, priority: Priority | int, *, for_seconds: float) -> None:
        self.calls.append((priority, for_seconds))


def only_the_test_task_is_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# --- crossings: pure and synchronous ----------------------------------------------------------


def test_a_warning_fires_at_70_percent_once_and_stays_quiet_while_use_stays_above():
    monitor = quiet()
    assert levels(monitor, "tenant:acme:gpt-4o:rpd", [0.5, 0.69, 0.7, 0.75, 0.8, 0.72]) == [
        None,
        None,
        "warning",
        None,
        None,
        None,
    ]
    assert monitor.statistics() == MonitorStatistics(
        fired=1, sent=0, failed=0, dropped=0, pending=0
    )


def test_an_alert_carries_the_figures_a_default_sentence_the_family_action_and_wall_time():
    alert = quiet().observe("tenant:acme:gpt-4o:rpd", 910, 1000)
    assert alert == Alert(
        level="critical",
        dimension="tenant:acme:gpt-4o:rpd",
        current=910,
        limit=1000,
        ratio=0.91,
        message="Usage of tenant:acme:gpt-4o:rpd reached 91 % of its limit (910 of 1000).",
        action="raise tier",
        at=T0,
    )


def test_a_given_message_and_action_replace_the_defaults():
    alert = quiet().observe(
        "budget",
        45.5,
        50,
        message="The month's budget is 91 % spent ($45.5 of $50).",
        action="raise the budget to $80",
    )
    assert alert is not None
    assert (alert.message, alert.action) == (
        "The month's budget is 91 % spent ($45.5 of $50).",
        "raise the budget to $80",
    )


@pytest.mark.parametrize(
    ("dimension", "warning_action", "critical_action"),
    [
        ("upstream:openai:requests", "enable fallback model", "shed batch traffic"),
        ("tenant:acme:gpt-4o:rpd", "raise tier", "raise tier"),
        ("budget", "downgrade to a cheaper model", "raise the budget"),
        ("tenant_budget:acme", "downgrade to a cheaper model", "raise the tenant's budget"),
        ("something:else", "review the quota", "review the quota"),
    ],
)
def test_each_dimension_family_has_a_default_action_per_level(
    dimension: str, warning_action: str, critical_action: str
):
    monitor = quiet()
    warning, critical = (monitor.observe(dimension, use, 1.0) for use in (0.7, 0.9))
    assert warning is not None and critical is not None
    assert (warning.action, critical.action) == (warning_action, critical_action)
    assert critical.message == f"Usage of {dimension} reached 90 % of its limit (0.9 of 1)."


def test_critical_fires_at_90_percent_after_the_warning_then_stays_quiet():
    assert levels(quiet(), "budget", [0.7, 0.89, 0.9, 0.99, 1.2]) == [
        "warning",
        None,
        "critical",
        None,
        None,
    ]


def test_a_level_re_arms_only_when_use_falls_below_its_threshold_minus_the_hysteresis():
    monitor = quiet()
    # 0.66 is not below 0.70 - 0.05: no second warning; 0.64 is, and the next crossing fires.
    assert levels(monitor, "budget", [0.7, 0.66, 0.72, 0.64, 0.7]) == [
        "warning",
        None,
        None,
        None,
        "warning",
    ]
    # Critical re-arms below 0.85; the warning stays fired while use stays above 0.65.
    assert levels(monitor, "budget", [0.9, 0.86, 0.95, 0.84, 0.8, 0.9]) == [
        "critical",
        None,
        None,
        None,
        None,
        "critical",
    ]


def test_a_jump_past_both_thresholds_fires_critical_only_and_the_passed_warning_stays_implied():
    monitor = quiet()
    # Falling back to 80 % after a critical fires no late warning; a new crossing after a
    # fall below 65 % fires the warning again.
    assert levels(monitor, "budget", [0.1, 0.95, 0.8, 0.72, 0.6, 0.75]) == [
        None,
        "critical",
        None,
        None,
        None,
        "warning",
    ]


def test_dimensions_cross_independently():
    monitor = quiet()
    assert levels(monitor, "tenant:acme:gpt-4o:rpd", [0.7]) == ["warning"]
    assert levels(monitor, "tenant:bolt:gpt-4o:rpd", [0.7]) == ["warning"]
    assert levels(monitor, "tenant:acme:gpt-4o:rpd", [0.75]) == [None]
    assert repr(monitor) == (
        "<UsageMonitor new sinks=0 alerting=2 fired=2 sent=0 failed=0 dropped=0 pending=0>"
    )


def test_thresholds_and_hysteresis_are_configurable():
    monitor = quiet(warning=0.5, critical=0.8, hysteresis=0.2)
    assert levels(monitor, "budget", [0.5, 0.31, 0.5, 0.29, 0.8, 0.61, 0.8]) == [
        "warning",
        None,
        None,
        None,
        "critical",
        None,
        None,
    ]


@given(st.lists(st.floats(min_value=0, max_value=1.2, allow_nan=False), min_size=1, max_size=60))
def test_every_alert_is_a_fresh_crossing_and_every_fresh_crossing_alerts(ratios: list[float]):
    monitor = quiet()
    thresholds = {"warning": 0.7, "critical": 0.9}
    last_fired: dict[str, int] = {}
    below_all_since = True  # use has been below warning - hysteresis since the last alert
    for index, ratio in enumerate(ratios):
        alert = monitor.observe("budget", ratio, 1.0)
        if alert is not None:
            assert ratio >= thresholds[alert.level]
            # Between two alerts of one level, use dipped below that level's re-arm point.
            if alert.level in last_fired:
                between = ratios[last_fired[alert.level] + 1 : index]
                assert min(between, default=1.0) < thresholds[alert.level] - 0.05
            last_fired[alert.level] = index
            below_all_since = False
        elif below_all_since:
            assert ratio < 0.7
        if ratio < 0.65:
            below_all_since = True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warning": 0.9, "critical": 0.7}, "0 < warning < critical <= 1"),
        ({"warning": 0, "critical": 0.9}, "0 < warning < critical <= 1"),
        ({"critical": 1.5}, "0 < warning < critical <= 1"),
        ({"hysteresis": -0.1}, "hysteresis must be at least 0 and below warning (0.7), not -0.1."),
        ({"hysteresis": 0.7}, "hysteresis must be at least 0 and below warning (0.7), not 0.7."),
        ({"max_pending": 0}, "max_pending must be an integer of at least 1, not 0."),
        ({"send_timeout": 0}, "send_timeout must be a positive number of seconds, not 0."),
    ],
)
def test_invalid_configuration_is_refused_with_a_sentence_naming_the_field(
    options: dict[str, float], message: str
):
    with pytest.raises(ValueError, match=re.escape(message)):
        UsageMonitor(**options)  # type: ignore[arg-type]


def test_observing_against_a_limit_that_is_not_positive_is_refused():
    with pytest.raises(
        ValueError, match=r"The limit of 'budget' must be a positive number, not 0\."
    ):
        quiet().observe("budget", 10, 0)


# --- on_critical and ShedBatchAction --------------------------------------------------------


def test_on_critical_runs_once_per_critical_crossing_and_never_for_a_warning():
    seen: list[str] = []
    monitor = quiet(on_critical=[lambda alert: seen.append(alert.level)])
    levels(monitor, "budget", [0.7, 0.9, 0.95, 0.8, 0.9])
    assert seen == ["critical", "critical"]


def test_an_action_that_raises_is_logged_and_observe_still_returns_the_alert(
    caplog: pytest.LogCaptureFixture,
):
    def broken(alert: Alert) -> None:
        raise RuntimeError("switch is stuck")

    seen: list[Alert] = []
    monitor = quiet(on_critical=[broken, seen.append])
    alert = monitor.observe("budget", 95, 100)
    assert alert is not None and seen == [alert]
    [record] = caplog.records
    assert record.name == "asyncquota.alerts" and record.levelno == logging.ERROR
    assert record.getMessage().startswith("The on_critical action")
    assert "failed on budget." in record.getMessage()


def test_shed_batch_action_tells_every_target_to_shed_batch_for_a_minute_on_upstream_alerts():
    targets = [Target(), Target()]
    monitor = quiet(on_critical=[ShedBatchAction(targets)])
    monitor.observe("upstream:openai:requests", 950, 1000)
    assert [target.calls for target in targets] == [[(Priority.BATCH, 60.0)]] * 2


def test_shed_batch_action_leaves_a_tenant_or_budget_alert_alone_unless_told_otherwise():
    picky, any_alert = Target(), Target()
    monitor = quiet(
        on_critical=[
            ShedBatchAction([picky]),
            ShedBatchAction([any_alert], dimensions="", for_seconds=30, priority="interactive"),
        ]
    )
    monitor.observe("tenant:acme:gpt-4o:rpd", 950, 1000)
    monitor.observe("budget", 49, 50)
    assert picky.calls == []
    assert any_alert.calls == [(Priority.INTERACTIVE, 30.0)] * 2
    assert repr(ShedBatchAction([picky])) == (
        "<ShedBatchAction <Priority.BATCH: 20> for 60 s on upstream:* targets=1>"
    )


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((), {}, "A ShedBatchAction needs at least one target to shed on."),
        ((Target(),), {"for_seconds": 0}, "for_seconds must be a positive number of seconds"),
        ((Target(),), {"priority": "someday"}, "Unknown priority class 'someday'"),
    ],
)
def test_shed_batch_action_validates_its_configuration(
    args: tuple[Target, ...], options: dict[str, object], message: str
):
    with pytest.raises(ValueError, match=message):
        ShedBatchAction(list(args), **options)  # type: ignore[arg-type]


# --- delivery: virtual time --------------------------------------------------------------------


async def test_the_logging_sink_logs_a_warning_at_warning_and_a_critical_at_error(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="asyncquota.alerts")
    async with UsageMonitor(wall_clock=virtual_clock()) as monitor:
        warning = monitor.observe("tenant:acme:gpt-4o:rpd", 700, 1000)
        critical = monitor.observe("tenant:acme:gpt-4o:rpd", 900, 1000)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "Usage of tenant:acme:gpt-4o:rpd reached 70 % of its limit (700 of 1000). "
            "Recommended action: raise tier.",
        ),
        (
            logging.ERROR,
            "Usage of tenant:acme:gpt-4o:rpd reached 90 % of its limit (900 of 1000). "
            "Recommended action: raise tier.",
        ),
    ]
    assert [record.alert for record in caplog.records] == [warning, critical]
    assert monitor.statistics() == MonitorStatistics(
        fired=2, sent=2, failed=0, dropped=0, pending=0
    )
    assert repr(LoggingSink()) == "<LoggingSink asyncquota.alerts>"


async def test_callback_sinks_take_sync_and_async_functions():
    synced: list[Alert] = []
    awaited: list[tuple[float, Alert]] = []

    async def later(alert: Alert) -> None:
        await asyncio.sleep(1.5)
        awaited.append((now(), alert))

    async with UsageMonitor(
        sinks=[CallbackSink(synced.append), CallbackSink(later)], wall_clock=virtual_clock()
    ) as monitor:
        alert = monitor.observe("budget", 45, 50)
    assert synced == [alert]
    assert awaited == [(1.5, alert)]
    assert monitor.statistics().sent == 2
    assert repr(CallbackSink(later)).startswith("<CallbackSink ")


async def test_a_hanging_sink_never_delays_observe_and_is_cut_at_the_send_timeout(
    caplog: pytest.LogCaptureFixture,
):
    hanging, quick = Recorder(delay=10_000), Recorder()
    async with UsageMonitor(
        sinks=[hanging, quick], send_timeout=5, wall_clock=virtual_clock()
    ) as monitor:
        alert = monitor.observe("budget", 95, 100)
        assert alert is not None and alert.at == T0  # observe returned at t = 0
        await asyncio.sleep(1)
        assert quick.got == [(0.0, alert)]  # the other sink was not held back
        assert monitor.statistics().pending == 1
        await asyncio.sleep(4)
        assert monitor.statistics() == MonitorStatistics(
            fired=1, sent=1, failed=1, dropped=0, pending=0
        )
    assert hanging.got == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"The critical alert on budget was not delivered to {hanging!r}: it took longer than 5 s."
    ]


async def test_a_sink_that_raises_counts_as_failed_and_the_next_alert_is_still_sent(
    caplog: pytest.LogCaptureFixture,
):
    sink = Recorder(fail=ConnectionResetError("peer hung up"))
    async with UsageMonitor(sinks=[sink], wall_clock=virtual_clock()) as monitor:
        monitor.observe("budget", 70, 100)
        await asyncio.sleep(1)
        sink.fail = None
        monitor.observe("budget", 90, 100)
    assert [alert.level for _, alert in sink.got] == ["critical"]
    assert (monitor.statistics().sent, monitor.statistics().failed) == (1, 1)
    assert caplog.records[-1].getMessage().endswith(": ConnectionResetError: peer hung up.")


async def test_a_full_outbox_drops_and_counts_logs_once_and_delivers_the_rest(
    caplog: pytest.LogCaptureFixture,
):
    sink = Recorder()
    monitor = UsageMonitor(sinks=[sink], max_pending=2, wall_clock=virtual_clock())
    for tenant in ("a", "b", "c", "d"):  # not started yet: nothing leaves the outbox
        monitor.observe(f"tenant:{tenant}:gpt-4o:rpd", 700, 1000)
    assert monitor.statistics() == MonitorStatistics(
        fired=4, sent=0, failed=0, dropped=2, pending=2
    )
    [record] = caplog.records
    assert record.getMessage() == (
        f"The alert outbox of {sink!r} is full (2 waiting); alerts to it are dropped until it "
        "drains, starting with: Usage of tenant:c:gpt-4o:rpd reached 70 % of its limit "
        "(700 of 1000)."
    )
    async with monitor:
        pass
    assert [alert.dimension for _, alert in sink.got] == [
        "tenant:a:gpt-4o:rpd",
        "tenant:b:gpt-4o:rpd",
    ]
    assert monitor.statistics() == MonitorStatistics(
        fired=4, sent=2, failed=0, dropped=2, pending=0
    )


async def test_aclose_drains_the_outboxes_within_the_grace_and_closes_the_sinks():
    sink = Recorder(delay=0.5)
    async with UsageMonitor(sinks=[sink], wall_clock=virtual_clock()) as monitor:
        for tenant in ("a", "b", "c"):
            monitor.observe(f"tenant:{tenant}:gpt-4o:rpd", 95, 100)
    assert now() == 1.5
    assert [at for at, _ in sink.got] == [0.5, 1.0, 1.5]
    assert sink.closed
    assert only_the_test_task_is_left()


async def test_aclose_gives_up_after_the_grace_and_leaves_no_task_pending():
    hanging = Recorder(delay=10_000)
    slow_action_ended = asyncio.Event()

    async def slow_action(alert: Alert) -> None:
        await asyncio.sleep(10_000)
        slow_action_ended.set()

    monitor = UsageMonitor(
        sinks=[hanging], on_critical=[slow_action], send_timeout=60, wall_clock=virtual_clock()
    )
    monitor.start()
    for tenant in ("a", "b", "c"):
        monitor.observe(f"tenant:{tenant}:gpt-4o:rpd", 95, 100)
    await monitor.aclose(grace=1)
    assert now() == 1.0
    assert only_the_test_task_is_left()
    assert not slow_action_ended.is_set()
    # The one being sent was cut (failed); the two still queued were never attempted.
    assert monitor.statistics() == MonitorStatistics(
        fired=3, sent=0, failed=1, dropped=2, pending=0
    )
    assert hanging.closed
    assert repr(monitor) == (
        "<UsageMonitor closed sinks=1 alerting=3 fired=3 sent=0 failed=1 dropped=2 pending=0>"
    )


async def test_a_closed_monitor_still_answers_observe_but_sends_nothing_and_cannot_restart():
    sink, target = Recorder(), Target()
    monitor = UsageMonitor(
        sinks=[sink], on_critical=[ShedBatchAction([target])], wall_clock=virtual_clock()
    )
    await monitor.aclose()
    await monitor.aclose()  # idempotent
    alert = monitor.observe("upstream:openai:requests", 95, 100)
    assert alert is not None and alert.level == "critical"
    assert sink.got == [] and target.calls == []
    assert monitor.statistics() == MonitorStatistics(
        fired=1, sent=0, failed=0, dropped=1, pending=0
    )
    with pytest.raises(ClosedError, match=r"This UsageMonitor is closed; make a new one\."):
        monitor.start()
    with pytest.raises(ValueError, match="grace must be a number of seconds of at least 0"):
        await monitor.aclose(grace=-1)


async def test_an_async_on_critical_action_runs_in_the_background_and_its_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
):
    ran: list[float] = []

    async def switch_to_fallback(alert: Alert) -> None:
        await asyncio.sleep(1.5)
        ran.append(now())
        raise RuntimeError("no fallback configured")

    async with UsageMonitor(
        sinks=(), on_critical=[switch_to_fallback], wall_clock=virtual_clock()
    ) as monitor:
        assert monitor.observe("budget", 95, 100) is not None
        assert ran == []  # observe did not wait for it
    assert ran == [1.5]
    [record] = caplog.records
    assert record.getMessage().endswith("failed on budget.")
    assert record.exc_info is not None and "no fallback configured" in str(record.exc_info[1])


def test_an_async_action_outside_a_running_loop_is_closed_unrun_and_logged(
    caplog: pytest.LogCaptureFixture,
):
    ran: list[Alert] = []

    async def action(alert: Alert) -> None:
        ran.append(alert)

    quiet(on_critical=[action]).observe("budget", 95, 100)
    assert ran == []
    assert "did not run for budget." in caplog.records[0].getMessage()


async def test_random_sinks_and_a_random_shutdown_account_for_every_delivery_exactly_once():
    rng = random.Random(20260329)
    for _ in range(30):
        loop_start = now()
        sinks = [
            Recorder(
                delay=rng.choice([0.0, 0.3, 2.0, 10_000.0]),
                fail=rng.choice([None, None, RuntimeError("down"), asyncio.CancelledError()]),
            )
            for _ in range(rng.randint(1, 4))
        ]
        monitor = UsageMonitor(
            sinks=sinks,
            max_pending=rng.randint(1, 5),
            send_timeout=rng.choice([0.5, 5.0]),
            wall_clock=virtual_clock(),
        )
        monitor.start()
        for step in range(rng.randint(1, 20)):
            monitor.observe(f"tenant:t{step % 3}:m:rpd", rng.uniform(0, 1.2), 1)
            await asyncio.sleep(rng.choice([0, 0.1, 1.0]))
            stats = monitor.statistics()
            delivered = stats.sent + stats.failed + stats.dropped + stats.pending
            assert delivered == stats.fired * len(sinks)
        await monitor.aclose(grace=rng.choice([0, 0.2, 3.0]))
        stats = monitor.statistics()
        assert stats.pending == 0
        assert stats.sent + stats.failed + stats.dropped == stats.fired * len(sinks)
        assert stats.sent == sum(len(sink.got) for sink in sinks)
        assert only_the_test_task_is_left()
        assert now() - loop_start <= 20 * 1.0 + 3.0


# --- webhooks: a local aiohttp server on loopback, real time -----------------------------------

real_time = pytest.mark.looptime(False)
SECRET = "k3y-d0-n0t-l0g"


class Hook:
    """What the local webhook server received."""

    def __init__(self) -> None:
        self.bodies: list[object] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []


@contextlib.asynccontextmanager
async def webhook(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
) -> AsyncIterator[tuple[str, Hook]]:
    """A webhook on 127.0.0.1 that records each POST; yields a URL with a key in its query."""
    hook = Hook()

    async def handle(request: web.Request) -> web.StreamResponse:
        hook.bodies.append(await request.json())
        hook.headers.append(dict(request.headers))
        hook.paths.append(request.path_qs)
        if answer is not None:
            return await answer(request)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    app = web.Application()
    app.router.add_post("/hook/{token}", handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook/{SECRET}-path?key={SECRET}", hook
    finally:
        await runner.cleanup()


def critical_alert() -> Alert:
    return Alert(
        level="critical",
        dimension="tenant:acme:gpt-4o:rpd",
        current=910,
        limit=1000,
        ratio=0.91,
        message="Tenant acme used 91 % of its gpt-4o requests today (910 of 1000).",
        action="raise tier",
        at=T0,
    )


TEXT = (
    "[asyncquota critical] Tenant acme used 91 % of its gpt-4o requests today (910 of 1000). "
    "Recommended action: raise tier."
)


@real_time
@pytest.mark.parametrize(
    ("format", "body"),
    [
        (
            "json",
            {
                "level": "critical",
                "dimension": "tenant:acme:gpt-4o:rpd",
                "current": 910,
                "limit": 1000,
                "ratio": 0.91,
                "message": "Tenant acme used 91 % of its gpt-4o requests today (910 of 1000).",
                "action": "raise tier",
                "at": T0,
            },
        ),
        ("wecom", {"msgtype": "text", "text": {"content": TEXT}}),
        ("dingtalk", {"msgtype": "text", "text": {"content": TEXT}}),
        ("slack", {"text": TEXT}),
    ],
)
async def test_the_webhook_sink_posts_each_format_as_its_receiver_expects(
    format: str, body: object
):
    async with webhook() as (url, hook):
        sink = WebhookSink(url, format=format, headers={"X-Team": "oncall"})  # type: ignore[arg-type]
        try:
            await sink.send(critical_alert())
        finally:
            await sink.aclose()
    assert hook.bodies == [body]
    assert hook.paths == [f"/hook/{SECRET}-path?key={SECRET}"]
    assert hook.headers[0]["Content-Type"] == "application/json"
    assert hook.headers[0]["X-Team"] == "oncall"


@real_time
async def test_a_monitor_delivers_to_a_webhook_through_its_own_session_and_closes_it():
    async with webhook() as (url, hook):
        sink = WebhookSink(url, format="slack")
        async with UsageMonitor(sinks=[sink]) as monitor:
            monitor.observe(
                "tenant:acme:gpt-4o:rpd",
                910,
                1000,
                message="Tenant acme used 91 % of its gpt-4o requests today (910 of 1000).",
            )
    assert hook.bodies == [{"text": TEXT}]
    assert monitor.statistics().sent == 1
    with pytest.raises(TransportError, match="closed"):
        await sink.send(critical_alert())


@real_time
async def test_a_session_passed_in_is_used_and_left_open():
    async with webhook() as (url, hook), aiohttp.ClientSession() as session:
        sink = WebhookSink(url, session=session)
        await sink.send(critical_alert())
        await sink.aclose()
        assert not session.closed
    assert len(hook.bodies) == 1


@real_time
async def test_a_hanging_webhook_never_delays_observe_and_is_cut_at_the_send_timeout(
    caplog: pytest.LogCaptureFixture,
):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    loop = asyncio.get_running_loop()
    async with webhook(hang) as (url, hook):
        monitor = UsageMonitor(sinks=[WebhookSink(url, format="wecom")], send_timeout=0.2)
        monitor.start()
        began = loop.time()
        alert = monitor.observe("budget", 95, 100)
        observed = loop.time()
        await monitor.aclose(grace=2)  # returns once the cut delivery is counted
        closed = loop.time()
    assert alert is not None
    assert observed - began < 0.01
    assert 0.2 <= closed - began < 1.0
    assert monitor.statistics() == MonitorStatistics(
        fired=1, sent=0, failed=1, dropped=0, pending=0
    )
    assert len(hook.bodies) == 1  # it did reach the webhook, which never answered
    assert "took longer than 0.2 s" in caplog.text
    assert SECRET not in caplog.text


@real_time
async def test_the_webhook_sinks_own_timeout_raises_a_transport_error_without_the_key():
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with webhook(hang) as (url, _):
        sink = WebhookSink(url, timeout=0.2)
        try:
            with pytest.raises(TransportError) as caught:
                await sink.send(critical_alert())
        finally:
            await sink.aclose()
    port = url.split(":")[2].split("/")[0]
    assert caught.value.message == (
        f"The webhook http://127.0.0.1:{port}/… did not answer within 0.2 s."
    )
    assert caught.value.reason == "timeout"


@real_time
async def test_a_non_2xx_answer_fails_the_delivery_and_the_log_shows_neither_key_nor_headers(
    caplog: pytest.LogCaptureFixture,
):
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=403, text=f"bad key {SECRET}")

    async with webhook(refuse) as (url, _):
        sink = WebhookSink(url, headers={"Authorization": f"Bearer sk-{SECRET}"})
        async with UsageMonitor(sinks=[sink]) as monitor:
            monitor.observe("budget", 95, 100)
    assert monitor.statistics().failed == 1
    port = url.split(":")[2].split("/")[0]
    assert repr(sink) == f"<WebhookSink json http://127.0.0.1:{port}/…>"
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage() == (
        f"The critical alert on budget was not delivered to {sink!r}: "
        f"UpstreamError: The webhook http://127.0.0.1:{port}/… answered HTTP 403."
    )
    assert SECRET not in caplog.text


@real_time
async def test_a_wecom_or_dingtalk_refusal_inside_a_200_is_a_failure():
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"errcode": 310000, "errmsg": "keywords not in content"})

    async with webhook(refuse) as (url, _):
        sink = WebhookSink(url, format="dingtalk")
        try:
            with pytest.raises(UpstreamError, match=r"refused the message \(errcode 310000\)"):
                await sink.send(critical_alert())
        finally:
            await sink.aclose()


@real_time
async def test_an_unreachable_webhook_raises_a_transport_error_without_the_key():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:{SECRET}@127.0.0.1:{port}/hook/{SECRET}?access_token={SECRET}"
    sink = WebhookSink(url, format="dingtalk")
    try:
        with pytest.raises(TransportError) as caught:
            await sink.send(critical_alert())
    finally:
        await sink.aclose()
    assert caught.value.reason == "connect_failed"
    assert caught.value.message.startswith(f"The webhook http://127.0.0.1:{port}/… could not")
    assert SECRET not in caught.value.message and SECRET not in repr(sink)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": f"ftp://example.com/?key={SECRET}"}, "the one given is an ftp URL"),
        ({"url": f"/hook?key={SECRET}"}, "the one given is not"),
        ({"url": "https://example.com/h", "format": "teams"}, "Unknown webhook format 'teams'"),
        ({"url": "https://example.com/h", "timeout": 0}, "positive number of seconds, not 0"),
    ],
)
def test_a_webhook_sink_refuses_bad_configuration_without_repeating_the_url(
    options: dict[str, object], message: str
):
    with pytest.raises(ValueError, match=message) as caught:
        WebhookSink(**options)  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)
