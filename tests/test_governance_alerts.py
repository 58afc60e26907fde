"""Usage alerts: crossings fire once and re-arm, delivery never waits on a sink, webhooks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import random
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.errors import ClosedError, TransportError, UpstreamError
from asyncquota.governance.alerts import (
    DEFAULT_THRESHOLDS,
    REARM_AFTER,
    WEBHOOK_PACES,
    Alert,
    CallbackSink,
    LoggingSink,
    MonitorStatistics,
    Pace,
    Route,
    ShedBatchAction,
    Thresholds,
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

    def __init__(
        self,
        delay: float = 0.0,
        *,
        fail: BaseException | None = None,
        pace: Pace | None = None,
        route: Route | None = None,
    ) -> None:
        self.delay = delay
        self.fail = fail
        self.pace = pace
        self.route = route
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
        kind="usage",
        tenant="acme",
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
    ("dimension", "warns_at", "warning_action", "critical_action"),
    [
        ("upstream:openai:requests", 0.7, "enable fallback model", "shed batch traffic"),
        ("tenant:acme:gpt-4o:rpd", 0.7, "raise tier", "raise tier"),
        ("budget", 0.8, "downgrade to a cheaper model", "raise the budget"),
        ("tenant_budget:acme", 0.8, "downgrade to a cheaper model", "raise the tenant's budget"),
        ("something:else", 0.7, "review the quota", "review the quota"),
    ],
)
def test_each_dimension_family_has_its_warning_threshold_and_a_default_action_per_level(
    dimension: str, warns_at: float, warning_action: str, critical_action: str
):
    monitor = quiet()
    assert monitor.observe(dimension, warns_at - 0.01, 1.0) is None
    warning, critical = (monitor.observe(dimension, use, 1.0) for use in (warns_at, 0.9))
    assert warning is not None and critical is not None
    assert (warning.action, critical.action) == (warning_action, critical_action)
    assert critical.message == f"Usage of {dimension} reached 90 % of its limit (0.9 of 1)."


def test_critical_fires_at_90_percent_after_the_warning_then_stays_quiet():
    assert levels(quiet(), "upstream:openai:requests", [0.7, 0.89, 0.9, 0.99, 1.2]) == [
        "warning",
        None,
        "critical",
        None,
        None,
    ]


def test_a_level_re_arms_only_when_use_falls_below_its_threshold_minus_the_hysteresis():
    monitor = quiet()
    # 0.66 is not below 0.70 - 0.05: no second warning; 0.64 is, and the next crossing fires.
    assert levels(monitor, "upstream:openai:requests", [0.7, 0.66, 0.72, 0.64, 0.7]) == [
        "warning",
        None,
        None,
        None,
        "warning",
    ]
    # Critical re-arms below 0.85; the warning stays fired while use stays above 0.65.
    assert levels(monitor, "upstream:openai:requests", [0.9, 0.86, 0.95, 0.84, 0.8, 0.9]) == [
        "critical",
        None,
        None,
        None,
        None,
        "critical",
    ]


async def test_a_bucket_level_jittering_across_its_thresholds_alerts_once_until_a_quiet_minute():
    # An upstream's 1-second request bucket read from every reply in real time: 62 % and
    # 95 % used in turn, five readings a second for two minutes (it paged 133 times a night).
    monitor = quiet()
    loop = asyncio.get_running_loop()
    fired = []
    for _ in range(600):
        fired += levels(monitor, "upstream:fallback:requests", [0.62, 0.95])
        await asyncio.sleep(0.2)
    assert [level for level in fired if level] == ["critical"]
    # Half a minute below 65 % is not yet quiet; the minute starts again at the next dip.
    for _ in range(30):
        assert levels(monitor, "upstream:fallback:requests", [0.5]) == [None]
        await asyncio.sleep(1)
    assert levels(monitor, "upstream:fallback:requests", [0.95]) == [None]
    started = loop.time()
    while loop.time() - started < REARM_AFTER:
        assert levels(monitor, "upstream:fallback:requests", [0.5]) == [None]
        await asyncio.sleep(1)
    assert levels(monitor, "upstream:fallback:requests", [0.5, 0.72]) == [None, "warning"]


def test_a_jump_past_both_thresholds_fires_critical_only_and_the_passed_warning_stays_implied():
    monitor = quiet()
    # Falling back to 80 % after a critical fires no late warning; a new crossing after a
    # fall below 65 % fires the warning again.
    assert levels(monitor, "upstream:openai:requests", [0.1, 0.95, 0.8, 0.72, 0.6, 0.75]) == [
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
    assert levels(monitor, "upstream:openai:requests", [0.5, 0.31, 0.5, 0.29, 0.8, 0.61, 0.8]) == [
        "warning",
        None,
        None,
        None,
        "critical",
        None,
        None,
    ]


def test_a_reload_moves_the_thresholds_and_keeps_the_alert_under_way():
    monitor = quiet()
    assert levels(monitor, "upstream:openai:requests", [0.75]) == ["warning"]
    assert monitor.thresholds("budget")[:2] == (0.8, 0.9)

    monitor.reload(
        warning=0.5, critical=0.8, hysteresis=0.1, thresholds={"budget": Thresholds(critical=0.95)}
    )

    assert monitor.thresholds("budget")[:2] == (0.8, 0.95)  # the default's warning kept
    # Still the same warning (not repeated), critical at the new 80 %, re-armed below 40 %.
    assert levels(monitor, "upstream:openai:requests", [0.7, 0.8, 0.45, 0.39, 0.5]) == [
        None,
        "critical",
        None,
        None,
        "warning",
    ]


def test_a_reload_the_constructor_would_refuse_changes_nothing():
    monitor = quiet(warning=0.6)
    for bad in (
        {"warning": 0.9, "critical": 0.8},
        {"thresholds": {"tenant:*": Thresholds(warning=0.95)}},  # above the critical 0.9
        {"hysteresis": 0.7},
    ):
        with pytest.raises(ValueError):
            monitor.reload(**bad)  # type: ignore[arg-type]
        assert monitor.thresholds("upstream:openai:requests")[:2] == (0.6, 0.9)


@given(st.lists(st.floats(min_value=0, max_value=1.2, allow_nan=False), min_size=1, max_size=60))
def test_every_alert_is_a_fresh_crossing_and_every_fresh_crossing_alerts(ratios: list[float]):
    monitor = quiet()
    thresholds = {"warning": 0.7, "critical": 0.9}
    last_fired: dict[str, int] = {}
    below_all_since = True  # use has been below warning - hysteresis since the last alert
    for index, ratio in enumerate(ratios):
        alert = monitor.observe("upstream:openai:requests", ratio, 1.0)
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
        monitor.observe("budget", 80, 100)
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
                pace=rng.choice([None, Pace(1, per=2.0), Pace(3, per=5.0)]),
                route=rng.choice([None, Route(min_level="critical"), Route(tenants={"t1"})]),
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
            delivered = stats.sent + stats.failed + stats.dropped + stats.pending + stats.skipped
            assert delivered == stats.fired * len(sinks)
        await monitor.aclose(grace=rng.choice([0, 0.2, 3.0]))
        stats = monitor.statistics()
        assert stats.pending == 0
        ended = stats.sent + stats.failed + stats.dropped + stats.skipped
        assert ended == stats.fired * len(sinks)
        got = [alert for sink in sinks for _, alert in sink.got]
        assert stats.sent == sum(len(alert.folded) or 1 for alert in got)
        assert stats.aggregated >= sum(len(alert.folded) for alert in got)
        assert only_the_test_task_is_left()
        assert now() - loop_start <= 20 * 1.0 + 3.0


# --- webhooks: a local aiohttp server on loopback, real time -----------------------------------

real_time = pytest.mark.looptime(False)
SECRET = "k3y-d0-n0t-l0g"


class Hook:
    """What the local webhook server received."""

    def __init__(self) -> None:
        self.bodies: list[object] = []
        self.raw: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.targets: list[str] = []  # the request line's target, exactly as sent


@contextlib.asynccontextmanager
async def webhook(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
) -> AsyncIterator[tuple[str, Hook]]:
    """A webhook on 127.0.0.1 that records each POST; yields a URL with a key in its query."""
    hook = Hook()

    async def handle(request: web.Request) -> web.StreamResponse:
        hook.raw.append(await request.read())
        hook.bodies.append(await request.json())
        hook.headers.append(dict(request.headers))
        hook.paths.append(request.path_qs)
        hook.targets.append(request.raw_path)
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
                "kind": "usage",
                "tenant": None,
                "folded": [],
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
            with pytest.raises(
                UpstreamError,
                match=r"refused the message \(errcode 310000: keywords not in content\)\.$",
            ):
                await sink.send(critical_alert())
        finally:
            await sink.aclose()


@real_time
async def test_an_unreachable_webhook_raises_a_transport_error_without_the_key(refusing_port: int):
    port = refusing_port  # bound, never listening: every connect is refused
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


# --- thresholds per dimension ------------------------------------------------------------------


def test_the_budgets_warn_at_80_percent_by_default_whatever_the_monitors_own_pair():
    assert quiet().thresholds("budget") == (
        0.8,
        0.9,
        "downgrade to a cheaper model",
        "raise the budget",
    )
    monitor = quiet(warning=0.5, critical=0.6)
    assert monitor.thresholds("tenant_budget:acme") == (
        0.8,
        0.9,
        "downgrade to a cheaper model",
        "raise the tenant's budget",
    )
    assert monitor.thresholds("upstream:openai:tokens") == (
        0.5,
        0.6,
        "enable fallback model",
        "shed batch traffic",
    )
    assert levels(monitor, "budget", [0.6, 0.79, 0.8, 0.9]) == [None, None, "warning", "critical"]
    assert DEFAULT_THRESHOLDS["budget"] == Thresholds(
        warning=0.8,
        critical=0.9,
        warning_action="downgrade to a cheaper model",
        critical_action="raise the budget",
    )


def test_a_dimensions_rule_is_the_first_that_matches_and_a_default_is_overridden_field_by_field():
    monitor = quiet(
        thresholds={
            "tenant:*:gpt-4o:rpd": Thresholds(
                warning=0.5, critical=0.75, critical_action="call the customer"
            ),
            "tenant:*": Thresholds(warning=0.6),
            "budget": Thresholds(critical=0.95),
        }
    )
    # The first rule sets both levels and the critical action; the warning action comes
    # from the next rule that matches (tenant:*, merged over its default).
    assert monitor.thresholds("tenant:acme:gpt-4o:rpd") == (
        0.5,
        0.75,
        "raise tier",
        "call the customer",
    )
    # A rule that sets one level takes the other from the monitor.
    assert monitor.thresholds("tenant:acme:o1:rpd") == (0.6, 0.9, "raise tier", "raise tier")
    # The budget keeps its 80 % warning and its actions; only the critical level moved.
    assert monitor.thresholds("budget") == (
        0.8,
        0.95,
        "downgrade to a cheaper model",
        "raise the budget",
    )
    assert monitor.thresholds("something:else") == (
        0.7,
        0.9,
        "review the quota",
        "review the quota",
    )
    assert levels(monitor, "tenant:acme:gpt-4o:rpd", [0.49, 0.5, 0.74, 0.75]) == [
        None,
        "warning",
        None,
        "critical",
    ]
    alert = monitor.observe("tenant:bolt:gpt-4o:rpd", 80, 100)
    assert alert is not None and alert.action == "call the customer"
    assert levels(monitor, "budget", [0.9, 0.95]) == ["warning", "critical"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: Thresholds(warning=0.9, critical=0.8),
            "Alert thresholds must satisfy 0 < warning < critical <= 1; got warning=0.9 and "
            "critical=0.8.",
        ),
        (
            lambda: Thresholds(warning=1.5),
            "A warning threshold must be above 0 and at most 1, not 1.5.",
        ),
        (
            lambda: Thresholds(critical=float("nan")),
            "A critical threshold must be above 0 and at most 1, not nan.",
        ),
        (
            lambda: Thresholds(critical_action="  "),
            "A critical_action must be a non-empty sentence, not '  '.",
        ),
        (
            lambda: UsageMonitor(
                warning=0.5, critical=0.6, thresholds={"x:*": Thresholds(warning=0.65)}
            ),
            "The thresholds of 'x:*' must satisfy warning < critical; with the monitor's "
            "filled in they are warning=0.65 and critical=0.6.",
        ),
        (
            lambda: UsageMonitor(
                hysteresis=0.3, thresholds={"x:*": Thresholds(warning=0.25, critical=0.5)}
            ),
            "hysteresis must be at least 0 and below warning (0.25), not 0.3.",
        ),
        (
            lambda: UsageMonitor(thresholds={"": Thresholds()}),
            "A thresholds pattern must be a non-empty string, not ''.",
        ),
    ],
)
def test_invalid_thresholds_are_refused_with_a_sentence(make: Callable[[], object], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_a_tenant_dimension_names_its_tenant_unless_told_otherwise():
    monitor = quiet()
    rpd = monitor.observe("tenant:acme:gpt-4o:rpd", 95, 100)
    spend = monitor.observe("tenant_budget:bolt", 95, 100)
    told = monitor.observe("tenant:org:7:gpt-4o:rpd", 95, 100, tenant="org:7")
    upstream = monitor.observe("upstream:openai:requests", 95, 100)
    assert [a.tenant if a else "-" for a in (rpd, spend, told, upstream)] == [
        "acme",
        "bolt",
        "org:7",
        None,
    ]


# --- events: exhaustion, fallback, recovery ------------------------------------------------------

MIDNIGHT = 1_780_272_000.0  # 2026-06-01 00:00:00 UTC


def test_an_exhausted_model_fires_one_critical_alert_per_episode_with_its_recommended_action():
    acted: list[Alert] = []
    monitor = quiet(on_critical=[acted.append])
    exhausted = monitor.event(
        "exhausted",
        "claude-sonnet",
        upstream="anthropic",
        until=MIDNIGHT,
        fallback="gpt-4o",
        reason="You have reached your specified API usage limits.",
    )
    assert exhausted == Alert(
        level="critical",
        dimension="model:claude-sonnet",
        current=0.0,
        limit=0.0,
        ratio=0.0,
        message=(
            "Model claude-sonnet's quota on anthropic is exhausted until 2026-06-01 00:00:00 "
            "UTC (You have reached your specified API usage limits): traffic moved to gpt-4o."
        ),
        action=(
            "raise the quota or add credit on anthropic; make sure gpt-4o can carry the "
            "traffic meanwhile"
        ),
        at=T0,
        kind="exhausted",
    )
    # Every request that meets the exhaustion may say so: the episode fires once.
    assert monitor.event("exhausted", "claude-sonnet", upstream="anthropic") is None
    assert monitor.event("fallback", "claude-sonnet", fallback="gpt-4o") is None
    assert acted == [exhausted]
    recovered = monitor.event(
        "recovered", "claude-sonnet", upstream="anthropic", reason="a probe succeeded"
    )
    assert recovered is not None
    assert (recovered.level, recovered.kind, recovered.message, recovered.action) == (
        "info",
        "recovered",
        "Model claude-sonnet on anthropic is available again (a probe succeeded): traffic "
        "returns to it.",
        "none needed",
    )
    assert monitor.event("recovered", "claude-sonnet") is None
    # A new episode fires again.
    assert monitor.event("exhausted", "claude-sonnet") is not None
    assert len(acted) == 2


def test_a_fallback_warns_and_an_exhaustion_after_it_still_fires_critical():
    monitor = quiet()
    fallback = monitor.event("fallback", "gpt-4o", upstream="openai", reason="overloaded: HTTP 529")
    assert fallback is not None
    assert (fallback.level, fallback.kind, fallback.message, fallback.action) == (
        "warning",
        "fallback",
        "Model gpt-4o on openai is unavailable (overloaded: HTTP 529): it has no fallback, "
        "so its requests fail.",
        "check openai's status; configure a fallback model for gpt-4o",
    )
    assert monitor.event("fallback", "gpt-4o") is None
    exhausted = monitor.event("exhausted", "gpt-4o", upstream="openai")
    assert exhausted is not None
    assert (exhausted.level, exhausted.message, exhausted.action) == (
        "critical",
        "Model gpt-4o's quota on openai is exhausted: it has no fallback, so its requests fail.",
        "raise the quota or add credit on openai; configure a fallback model for gpt-4o",
    )
    told = monitor.event("fallback", "o1", message="o1 is down.", action="wait")
    assert told is not None and (told.message, told.action) == ("o1 is down.", "wait")


@pytest.mark.parametrize(
    ("kind", "model", "message"),
    [
        ("gone", "gpt-4o", "Unknown event 'gone'; use 'exhausted', 'fallback' or 'recovered'."),
        ("exhausted", "", "An event needs the model's name, not ''."),
    ],
)
def test_an_unknown_event_or_a_nameless_model_is_refused(kind: str, model: str, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        quiet().event(kind, model)  # type: ignore[arg-type]


async def test_the_logging_sink_logs_a_recovery_at_info(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="asyncquota.alerts")
    async with UsageMonitor(wall_clock=virtual_clock()) as monitor:
        monitor.event("fallback", "gpt-4o", fallback="claude-haiku")
        monitor.event("recovered", "gpt-4o")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "Model gpt-4o is unavailable: traffic moved to claude-haiku. Recommended action: "
            "check gpt-4o's status; make sure claude-haiku can carry the traffic meanwhile.",
        ),
        (
            logging.INFO,
            "Model gpt-4o is available again: traffic returns to it. Recommended action: none "
            "needed.",
        ),
    ]


# --- routing -----------------------------------------------------------------------------------


async def test_each_sink_gets_only_what_its_route_takes_and_the_rest_is_counted_skipped():
    ops = Recorder(route=Route(dimensions=("upstream:*", "budget", "model:*")))
    pager = Recorder(route=Route(min_level="critical"))
    acme = Recorder(route=Route(tenants={"acme"}))
    models = Recorder(route=Route(kinds={"exhausted", "recovered"}))
    picky = Recorder(route=Route(when=lambda alert: alert.ratio >= 0.95))
    sinks = [ops, pager, acme, models, picky]
    async with UsageMonitor(sinks=sinks, wall_clock=virtual_clock()) as monitor:
        monitor.observe("tenant:acme:gpt-4o:rpd", 70, 100)
        monitor.observe("tenant:bolt:gpt-4o:rpd", 95, 100)
        monitor.observe("upstream:openai:requests", 80, 100)
        monitor.observe("budget", 96, 100)
        monitor.event("exhausted", "claude", fallback="gpt-4o")
        monitor.event("recovered", "claude")
    assert [[alert.dimension for _, alert in sink.got] for sink in sinks] == [
        ["upstream:openai:requests", "budget", "model:claude", "model:claude"],
        ["tenant:bolt:gpt-4o:rpd", "budget", "model:claude"],
        ["tenant:acme:gpt-4o:rpd"],
        ["model:claude", "model:claude"],
        ["tenant:bolt:gpt-4o:rpd", "budget"],
    ]
    assert monitor.statistics() == MonitorStatistics(
        fired=6, sent=12, failed=0, dropped=0, pending=0, skipped=18
    )


def test_a_route_whose_predicate_raises_takes_the_alert_and_logs(
    caplog: pytest.LogCaptureFixture,
):
    def broken(alert: Alert) -> bool:
        raise KeyError("team")

    route = Route(when=broken)
    alert = quiet().observe("budget", 95, 100)
    assert alert is not None and route.takes(alert)
    assert "The route predicate" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_level": "debug"}, "Unknown alert level 'debug'; use 'info', 'warning' or"),
        ({"kinds": {"usage", "digest"}}, "Unknown alert kind 'digest'; use 'usage', "),
        ({"dimensions": ("",)}, "A route's dimension pattern must be a non-empty string, not ''."),
        ({"tenants": {""}}, "A route's tenant must be a non-empty string, not ''."),
    ],
)
def test_a_route_refuses_what_it_cannot_match(options: dict[str, object], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        Route(**options)  # type: ignore[arg-type]


# --- pacing and digests: virtual time ------------------------------------------------------------


def dimensions(sink: Recorder) -> list[tuple[float, str | list[str]]]:
    """When each message went, and its dimension (a digest: the dimensions it carries)."""
    return [
        (at, [each.dimension for each in alert.folded] if alert.folded else alert.dimension)
        for at, alert in sink.got
    ]


async def test_a_burst_beyond_a_robots_pace_goes_in_its_last_message_of_the_minute():
    sink = Recorder(pace=Pace(20, per=60))
    async with UsageMonitor(sinks=[sink], wall_clock=virtual_clock()) as monitor:
        for tenant in range(25):
            monitor.observe(f"tenant:t{tenant}:gpt-4o:rpd", 95, 100)
    assert now() == 0.0
    assert dimensions(sink) == [(0.0, f"tenant:t{tenant}:gpt-4o:rpd") for tenant in range(19)] + [
        (0.0, [f"tenant:t{tenant}:gpt-4o:rpd" for tenant in range(19, 25)])
    ]
    digest = sink.got[-1][1]
    assert (digest.level, digest.kind, digest.dimension, digest.message, digest.action) == (
        "critical",
        "digest",
        "digest",
        "6 alerts came faster than this sink's pace (20 per 60 s) allows, in one message: "
        "6 critical.",
        "see each alert's own",
    )
    assert monitor.statistics() == MonitorStatistics(
        fired=25, sent=25, failed=0, dropped=0, pending=0, aggregated=6
    )


async def test_alerts_wait_for_a_free_slot_and_the_last_slot_carries_all_that_waited():
    sink = Recorder(pace=Pace(2, per=60))
    async with UsageMonitor(sinks=[sink], wall_clock=virtual_clock()) as monitor:
        monitor.observe("tenant:a:m:rpd", 95, 100)  # t = 0: sent
        await asyncio.sleep(1)
        monitor.observe("tenant:b:m:rpd", 95, 100)  # t = 1: the last slot, nothing waits
        await asyncio.sleep(4)
        for tenant in "cde":  # t = 5: no slot until a's frees at 60, then b's is still taken
            monitor.observe(f"tenant:{tenant}:m:rpd", 95, 100)
        await asyncio.sleep(25)
        assert monitor.statistics().pending == 3
        await asyncio.sleep(30.5)  # t = 60.5
        monitor.observe("warning:f", 80, 100)  # b's slot frees at 61: sent alone
    assert dimensions(sink) == [
        (0.0, "tenant:a:m:rpd"),
        (1.0, "tenant:b:m:rpd"),
        (60.0, ["tenant:c:m:rpd", "tenant:d:m:rpd", "tenant:e:m:rpd"]),
        (61.0, "warning:f"),
    ]
    assert monitor.statistics() == MonitorStatistics(
        fired=6, sent=6, failed=0, dropped=0, pending=0, aggregated=3
    )


async def test_a_digest_that_fails_counts_every_alert_in_it_failed(
    caplog: pytest.LogCaptureFixture,
):
    sink = Recorder(pace=Pace(1, per=60), fail=RuntimeError("robot blocked"))
    async with UsageMonitor(sinks=[sink], wall_clock=virtual_clock()) as monitor:
        # With one message a minute, every message is the last: a burst goes at once.
        monitor.observe("budget", 80, 100)
        monitor.observe("budget", 90, 100)
        monitor.observe("tenant:a:m:rpd", 95, 100)
    assert now() == 0.0
    assert monitor.statistics() == MonitorStatistics(
        fired=3, sent=0, failed=3, dropped=0, pending=0, aggregated=3
    )
    assert caplog.records[-1].getMessage() == (
        f"A digest of 3 alerts (critical at worst) was not delivered to {sink!r}: "
        "RuntimeError: robot blocked."
    )


async def test_aclose_drops_what_still_waits_for_the_pace_and_leaves_no_task():
    sink = Recorder(pace=Pace(1, per=60))
    monitor = UsageMonitor(sinks=[sink], wall_clock=virtual_clock())
    monitor.start()
    monitor.observe("tenant:a:m:rpd", 95, 100)
    await asyncio.sleep(1)
    for tenant in "bc":
        monitor.observe(f"tenant:{tenant}:m:rpd", 95, 100)
    await asyncio.sleep(1)
    assert monitor.statistics().pending == 2
    await monitor.aclose(grace=2)
    assert now() == 4.0
    assert dimensions(sink) == [(0.0, "tenant:a:m:rpd")]
    assert monitor.statistics() == MonitorStatistics(
        fired=3, sent=1, failed=0, dropped=2, pending=0
    )
    assert only_the_test_task_is_left()


async def test_a_paced_logging_sink_logs_a_digest_one_alert_a_line(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="asyncquota.alerts")
    sink = LoggingSink(pace=Pace(1, per=60))
    async with UsageMonitor(sinks=[sink], wall_clock=virtual_clock()) as monitor:
        monitor.observe("budget", 95, 100)
        await asyncio.sleep(1)
        monitor.observe("upstream:openai:requests", 80, 100)
        monitor.event("exhausted", "o1")
        await asyncio.sleep(60)
    assert caplog.records[-1].levelno == logging.ERROR
    assert caplog.records[-1].getMessage() == (
        "2 alerts came faster than this sink's pace (1 per 60 s) allows, in one message: "
        "1 critical, 1 warning.\n"
        "1. [warning] Usage of upstream:openai:requests reached 80 % of its limit (80 of 100). "
        "Recommended action: enable fallback model.\n"
        "2. [critical] Model o1's quota is exhausted: it has no fallback, so its requests fail. "
        "Recommended action: raise the quota or add credit on o1; configure a fallback model "
        "for o1."
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((0,), "A pace's messages must be a positive integer, not 0."),
        ((1.5,), "A pace's messages must be a positive integer, not 1.5."),
        ((True,), "A pace's messages must be a positive integer, not True."),
        ((20, 0), "A pace's per must be a positive number of seconds, not 0."),
        ((20, float("inf")), "A pace's per must be a positive number of seconds, not inf."),
    ],
)
def test_a_pace_refuses_what_is_not_a_count_over_a_duration(
    options: tuple[object, ...], message: str
):
    with pytest.raises(ValueError, match=re.escape(message)):
        Pace(*options)  # type: ignore[arg-type]


def test_each_webhook_format_has_its_robots_pace_unless_given_one():
    url = "https://example.com/hook"
    assert {fmt: WebhookSink(url, format=fmt).pace for fmt in WEBHOOK_PACES} == {  # type: ignore[arg-type]
        "json": None,
        "wecom": Pace(20, 60.0),
        "dingtalk": Pace(20, 60.0),
        "feishu": Pace(5, 3.0),
        "slack": Pace(1, 1.0),
    }
    assert WebhookSink(url, format="wecom", pace=Pace(10)).pace == Pace(10, 60.0)
    assert str(Pace(20)) == "20 per 60 s"


# --- chat robots: formats, signatures, replies (loopback, real time) -------------------------

FEISHU_OK = {"code": 0, "msg": "success", "data": {}}
MESSAGE = "Tenant acme used 91 % of its gpt-4o requests today (910 of 1000)."
TITLE = "[asyncquota critical] tenant:acme:gpt-4o:rpd"
MARKDOWN = f"### {TITLE}\n\n{MESSAGE}\n\n> Recommended action: raise tier."


def replying(document: object) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def answer(request: web.Request) -> web.StreamResponse:
        if isinstance(document, bytes):
            return web.Response(body=document, content_type="text/html")
        return web.json_response(document)

    return answer


async def send_once(url: str, alert: Alert | None = None, **options: object) -> None:
    sink = WebhookSink(url, **options)  # type: ignore[arg-type]
    try:
        await sink.send(alert or critical_alert())
    finally:
        await sink.aclose()


@real_time
@pytest.mark.parametrize(
    ("format", "markdown", "body"),
    [
        ("feishu", False, {"msg_type": "text", "content": {"text": TEXT}}),
        (
            "feishu",
            True,
            {
                "msg_type": "post",
                "content": {
                    "post": {
                        "en_us": {
                            "title": TITLE,
                            "content": [
                                [{"tag": "text", "text": MESSAGE}],
                                [{"tag": "text", "text": "Recommended action: raise tier."}],
                            ],
                        }
                    }
                },
            },
        ),
        ("wecom", True, {"msgtype": "markdown", "markdown": {"content": MARKDOWN}}),
        (
            "dingtalk",
            True,
            {"msgtype": "markdown", "markdown": {"title": TITLE, "text": MARKDOWN}},
        ),
    ],
)
async def test_feishu_text_and_the_markdown_of_each_robot_that_has_it(
    format: str, markdown: bool, body: object
):
    answer = replying(FEISHU_OK if format == "feishu" else {"errcode": 0, "errmsg": "ok"})
    async with webhook(answer) as (url, hook):
        await send_once(url, format=format, markdown=markdown)
    assert hook.bodies == [body]


@real_time
@pytest.mark.parametrize(
    ("secret", "clock", "sign"),
    [
        # DingTalk's documented computation for a timestamp of our choosing ...
        ("SECthis-is-secret", 1_780_000_000.0, "G2BK6NklXLcS5jxqrip23DfkqGbjuEP9kk15m%2BL9faY%3D"),
        # ... and the vector an independent implementation (Rust crate dingding) pins.
        ("secret", 1_700_000_000.0, "OuzzJR5%2BxZ4%2FEYwqtNt6sMYZQMTa%2FHEGvc9miJe7XzY%3D"),
    ],
)
async def test_a_signed_dingtalk_robot_gets_timestamp_and_sign_on_its_url_as_documented(
    secret: str, clock: float, sign: str
):
    timestamp = str(round(clock * 1000))
    # The Python sample of DingTalk's custom-robot page (加签), line for line.
    string_to_sign = f"{timestamp}\n{secret}"
    hmac_code = hmac.new(
        secret.encode("utf-8"), string_to_sign.encode("utf-8"), digestmod=hashlib.sha256
    ).digest()
    assert urllib.parse.quote_plus(base64.b64encode(hmac_code)) == sign
    async with webhook() as (url, hook):
        await send_once(url, format="dingtalk", secret=secret, clock=lambda: clock)
    assert hook.targets == [f"/hook/{SECRET}-path?key={SECRET}&timestamp={timestamp}&sign={sign}"]
    assert hook.bodies == [{"msgtype": "text", "text": {"content": TEXT}}]


@real_time
async def test_a_signed_feishu_bot_gets_timestamp_and_sign_first_in_its_body_as_documented():
    secret = "this is secret"
    # The Python sample of Feishu's custom-bot page (签名校验): the key is timestamp + "\n"
    # + secret, the message empty, the timestamp in seconds.
    key = f"1780000000\n{secret}".encode()
    sign = base64.b64encode(hmac.new(key, b"", digestmod=hashlib.sha256).digest()).decode()
    assert sign == "6BTYBMvPUVSwEBCVtIgWzr7IjIHPleoBKUNsxzsQiRk="
    async with webhook(replying(FEISHU_OK)) as (url, hook):
        await send_once(url, format="feishu", secret=secret, clock=lambda: 1_780_000_000.4)
    assert hook.raw == [
        b'{"timestamp":"1780000000","sign":"6BTYBMvPUVSwEBCVtIgWzr7IjIHPleoBKUNsxzsQiRk=",'
        b'"msg_type":"text","content":{"text":"' + TEXT.encode() + b'"}}'
    ]
    assert hook.targets == [f"/hook/{SECRET}-path?key={SECRET}"]  # the URL is left alone


SIGNING = "SECs1gn1ng-s3cr3t"


@real_time
@pytest.mark.parametrize(
    ("format", "reply", "logged"),
    [
        (
            "dingtalk",
            {"errcode": 310000, "errmsg": "sign not match, more: [sign not match]"},
            "refused the message (errcode 310000: sign not match, more: [sign not match])",
        ),
        (
            "wecom",
            {"errcode": 93000, "errmsg": f"invalid webhook url, key={SECRET}"},
            "refused the message (errcode 93000: invalid webhook url, …)",
        ),
        (
            "feishu",
            {
                "code": 19021,
                "msg": "sign match fail or timestamp is not within one hour from current time",
                "data": {},
            },
            "refused the message (code 19021: sign match fail or timestamp is not within one "
            "hour from current time)",
        ),
        (
            "feishu",
            {"StatusCode": 9499, "StatusMessage": "Bad Request"},
            "refused the message (StatusCode 9499: Bad Request)",
        ),
        ("feishu", {}, "answered a reply without code: '{}'"),
        ("dingtalk", {"ok": True}, "answered a reply without errcode: '{\"ok\": true}'"),
        ("wecom", b"<html>ok</html>", "answered '<html>ok</html>', which is not its JSON reply"),
        ("feishu", [0], "answered '[0]', which is not its JSON reply"),
    ],
)
async def test_a_robots_refusal_or_a_reply_that_is_not_its_json_fails_and_its_errmsg_is_logged(
    caplog: pytest.LogCaptureFixture, format: str, reply: object, logged: str
):
    secret = SIGNING if format in ("dingtalk", "feishu") else None
    async with webhook(replying(reply)) as (url, _):
        sink = WebhookSink(url, format=format, secret=secret)  # type: ignore[arg-type]
        async with UsageMonitor(sinks=[sink]) as monitor:
            monitor.observe("budget", 95, 100)
    assert monitor.statistics().failed == 1
    port = url.split(":")[2].split("/")[0]
    assert caplog.records[-1].getMessage() == (
        f"The critical alert on budget was not delivered to {sink!r}: UpstreamError: The "
        f"webhook http://127.0.0.1:{port}/… {logged}."
    )
    assert SECRET not in caplog.text and SIGNING not in caplog.text
    assert "sign=" not in caplog.text and "timestamp=" not in caplog.text


@real_time
@pytest.mark.parametrize(
    ("format", "reply"),
    [
        ("feishu", FEISHU_OK | {"Extra": None, "StatusCode": 0, "StatusMessage": "success"}),
        ("feishu", {"Extra": None, "StatusCode": 0, "StatusMessage": "success"}),
        ("wecom", {"errcode": 0, "errmsg": "ok"}),
    ],
)
async def test_a_robots_success_reply_counts_sent(format: str, reply: object):
    async with webhook(replying(reply)) as (url, _):
        sink = WebhookSink(url, format=format)  # type: ignore[arg-type]
        async with UsageMonitor(sinks=[sink]) as monitor:
            monitor.observe("budget", 95, 100)
    assert (monitor.statistics().sent, monitor.statistics().failed) == (1, 0)


@real_time
async def test_an_unreachable_signed_robot_fails_without_its_secret_or_signed_url(
    refusing_port: int,
):
    port = refusing_port  # bound, never listening: every connect is refused
    sink = WebhookSink(
        f"http://127.0.0.1:{port}/robot/send?access_token={SECRET}",
        format="dingtalk",
        secret=SIGNING,
    )
    try:
        with pytest.raises(TransportError) as caught:
            await sink.send(critical_alert())
    finally:
        await sink.aclose()
    assert caught.value.reason == "connect_failed"
    for hidden in (SECRET, SIGNING, "sign=", "timestamp="):
        assert hidden not in caught.value.message and hidden not in repr(sink)
    assert repr(sink) == f"<WebhookSink dingtalk signed http://127.0.0.1:{port}/…>"


def digest_of(count: int, words: int = 1) -> Alert:
    folded = tuple(
        Alert(
            "warning",
            f"tenant:t{index}:m:rpd",
            70,
            100,
            0.7,
            f"Tenant t{index} used 70 %{' of its day' * words}.",
            "raise tier",
            T0,
            tenant=f"t{index}",
        )
        for index in range(count)
    )
    return Alert(
        "warning",
        "digest",
        0,
        0,
        0,
        f"{count} alerts in one message.",
        "see each alert's own",
        T0,
        kind="digest",
        folded=folded,
    )


@real_time
async def test_a_digest_lists_ten_alerts_one_a_line_and_counts_the_rest():
    async with webhook() as (url, hook):
        await send_once(url, digest_of(12), format="dingtalk")
        await send_once(url, digest_of(2), format="wecom", markdown=True)
    [text, markdown] = hook.bodies
    assert text == {
        "msgtype": "text",
        "text": {
            "content": "[asyncquota warning] 12 alerts in one message.\n"
            + "".join(
                f"{i + 1}. [warning] Tenant t{i} used 70 % of its day. Recommended action: "
                "raise tier.\n"
                for i in range(10)
            )
            + "… and 2 more."
        },
    }
    assert markdown == {
        "msgtype": "markdown",
        "markdown": {
            "content": "### [asyncquota warning] 2 alerts\n\n2 alerts in one message.\n\n"
            "1. [warning] Tenant t0 used 70 % of its day. Recommended action: raise tier.\n"
            "2. [warning] Tenant t1 used 70 % of its day. Recommended action: raise tier."
        },
    }


@real_time
async def test_a_wecom_message_is_cut_to_the_bytes_wecom_takes():
    async with webhook() as (url, hook):
        await send_once(url, digest_of(10, words=40), format="wecom")
        await send_once(url, digest_of(10, words=80), format="wecom", markdown=True)
    [text, markdown] = hook.bodies
    content = text["text"]["content"]  # type: ignore[index]
    assert len(content.encode()) == 2048
    assert content.endswith("Recomm…")
    assert len(markdown["markdown"]["content"].encode()) <= 4096  # type: ignore[index]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"format": "slack", "secret": SIGNING},
            "Only DingTalk and Feishu robots sign their messages; a slack webhook takes no secret.",
        ),
        ({"format": "dingtalk", "secret": ""}, "A webhook secret must be a non-empty string."),
        (
            {"format": "json", "markdown": True},
            "Markdown is for WeCom, DingTalk and Feishu robots, not a json webhook.",
        ),
    ],
)
def test_a_secret_or_markdown_where_the_format_has_none_is_refused(
    options: dict[str, object], message: str
):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        WebhookSink(f"https://example.com/h?key={SECRET}", **options)  # type: ignore[arg-type]
    assert SIGNING not in str(caught.value) and SECRET not in str(caught.value)
    assert repr(WebhookSink("https://example.com/h", format="feishu", markdown=True)) == (
        "<WebhookSink feishu markdown https://example.com/…>"
    )
